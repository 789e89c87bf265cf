r"""Class-conditional joint audio-video generation (cJAVG): [class] -> video codes, audio codes.

Given a class token, the generator writes a clip's video tokens and then its
audio tokens (AVTOK.md section 5, panel (e) of the method figure [paper]).
Classifier-free guidance contrasts the class with the null class.

Launch (after a tokenizer run, e.g. the quickstart's workdir/stage3):

  python -m avtok_jax.tokenize_dataset --workdir=workdir/stage3 --split=train --out=workdir/tokens
  python -m avtok_jax.tokenize_dataset --workdir=workdir/stage3 --split=test --out=workdir/tokens
  python -m avtok_jax.main --config=configs/ar_joint.py:small --workdir=workdir/ar_joint \
      --config.tokens_dir=workdir/tokens
  python -m avtok_jax.generate --generator=workdir/ar_joint --class_name=NAME --out=workdir/generated_joint

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
  return train_ar.base_config(args.size, "joint")
