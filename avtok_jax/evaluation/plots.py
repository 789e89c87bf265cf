"""Figures for evaluation reports: per-clip metric histograms and training curves.

Reconstruction grids and mel comparisons are `reporting.video_grid` and
`reporting.mel_grid` (the trainer's sample pictures); this module adds the
matplotlib figures. Everything renders off-screen (Agg) into PNG files.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

# Per-clip values worth a histogram, with their axis labels.
HISTOGRAM_KEYS = {
  "psnr": "PSNR (dB) ↑",
  "ssim": "SSIM ↑",
  "lpips": "LPIPS ↓",
  "mel_l1": "mel L1 ↓",
  "si_sdr": "SI-SDR (dB) ↑",
  "mr_stft": "MR-STFT ↓",
}

# Training scalars plotted by default (those present), one panel each.
CURVE_KEYS = (
  "loss",
  "video_l1",
  "audio_l1",
  "vq",
  "prior",
  "gan",
  "codebook_usage",
  "eval/video_psnr",
  "eval/mel_l1",
)


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")  # off-screen; must precede the pyplot import
  import matplotlib.pyplot as plt

  return plt


def _grid(n: int) -> tuple[int, int]:
  cols = min(3, n)
  return math.ceil(n / cols), cols


def _finish(plt, fig, axes, used: int, path: str | os.PathLike) -> str:
  """Blanks the unused panels, writes the PNG, frees the figure; returns the path."""
  for ax in list(axes.flat)[used:]:
    ax.axis("off")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return os.fspath(path)


def save_histograms(path: str | os.PathLike, per_clip: Mapping[str, Sequence[float]]) -> str:
  """One histogram per metric of `per_clip` ({key: values}), mean marked; returns the path."""
  items = [(k, np.asarray(v, np.float64)) for k, v in per_clip.items() if len(v)]
  if not items:
    raise ValueError("save_histograms: no per-clip values to plot.")
  plt = _pyplot()
  rows, cols = _grid(len(items))
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
  for ax, (key, values) in zip(axes.flat, items, strict=False):
    finite = values[np.isfinite(values)]
    ax.hist(finite, bins=min(30, max(5, len(finite) // 4)), color="#4c72b0")
    ax.axvline(finite.mean(), color="#c44e52", label=f"mean {finite.mean():.4g}")
    ax.set_xlabel(HISTOGRAM_KEYS.get(key, key))
    ax.set_ylabel("clips")
    ax.legend(fontsize=8)
  return _finish(plt, fig, axes, len(items), path)


def save_training_curves(
  path: str | os.PathLike,
  scalars: Mapping[str, Sequence[tuple[int, float]]],
  keys: Sequence[str] = CURVE_KEYS,
) -> str:
  """Training-curve panels from TensorBoard scalars ({tag: [(step, value)]}); returns the path.

  `reporting.read_tensorboard_scalars(workdir)` gives `scalars`. Tags not
  in `keys` are left out; with none of them present, every tag is plotted.
  """
  chosen = [k for k in keys if scalars.get(k)] or sorted(k for k in scalars if scalars[k])
  if not chosen:
    raise ValueError("save_training_curves: no scalars to plot.")
  plt = _pyplot()
  rows, cols = _grid(len(chosen))
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
  for ax, key in zip(axes.flat, chosen, strict=False):
    steps, values = zip(*sorted(scalars[key]), strict=True)
    ax.plot(steps, values, marker="o" if len(steps) < 4 else None, color="#4c72b0")
    ax.set_title(key, fontsize=10)
    ax.set_xlabel("step")
  return _finish(plt, fig, axes, len(chosen), path)
