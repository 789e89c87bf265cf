r"""Audio-to-video generation (A2V): [audio codes, SEP] -> video codes.

Given a clip's audio tokens and SEP, the generator writes the clip's video tokens
(AVTOK.md section 5, panel (c) of the method figure [paper]). Classifier-free
guidance contrasts the audio condition with the dropped condition (every
audio code replaced by the null token).

Launch (after a tokenizer run, e.g. the quickstart's workdir/stage3):

  python -m avtok_jax.tokenize_dataset --workdir=workdir/stage3 --split=train --out=workdir/tokens
  python -m avtok_jax.tokenize_dataset --workdir=workdir/stage3 --split=test --out=workdir/tokens
  python -m avtok_jax.main --config=configs/ar_a2v.py:small --workdir=workdir/ar_a2v \
      --config.tokens_dir=workdir/tokens
  python -m avtok_jax.generate --generator=workdir/ar_a2v --input=clip.mp4 --out=workdir/generated_a2v

Argument: the generator size preset, `tiny`, `small` (default) or `L`
(models/generator.py); use the one of the tokenizer's size (L for the
paper's B/L tokenizers). The vocabulary, sequence length and class names
come from the token set's tokens.json. Any field can be overridden, e.g.
`--config.total_steps=500 --config.sampling.cfg_scale=3`.

Hardware and what to expect:
* tiny: tests only (4 steps, seconds on a CPU).
* small: the built-in data on a 2-core CPU (6 layers of width 256, batch 32).
  Generation quality is bounded by the tokenizer's: decoded clips look like
  its reconstructions (docs/results/generation.md has the measured figures).
* L: the paper's 632M generator [paper/LARP] on an accelerator with the
  paper-size tokenizer's tokens of VGGSound.
"""

from avtok_jax import config_lib, train_ar


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, size="small")
  return train_ar.base_config(args.size, "a2v")
