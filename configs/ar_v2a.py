r"""Video-to-audio generation (V2A): [video codes, SEP] -> audio codes.

Given a clip's video tokens and SEP, the generator writes the clip's audio tokens
(AVTOK.md section 5, panel (d) of the method figure [paper]). Classifier-free
guidance contrasts the video condition with the dropped condition (every
video code replaced by the null token).

Launch (after a tokenizer run, e.g. the quickstart's workdir/stage3):

  python -m avtok_jax.tokenize_dataset --workdir=workdir/stage3 --split=train --out=workdir/tokens
  python -m avtok_jax.tokenize_dataset --workdir=workdir/stage3 --split=test --out=workdir/tokens
  python -m avtok_jax.main --config=configs/ar_v2a.py:small --workdir=workdir/ar_v2a \
      --config.tokens_dir=workdir/tokens
  python -m avtok_jax.generate --generator=workdir/ar_v2a --input=clip.mp4 --out=workdir/generated_v2a

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
  return train_ar.base_config(args.size, "v2a")
