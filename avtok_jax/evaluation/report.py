"""Markdown for evaluation results: one run's report and side-by-side comparisons.

The main table has the columns of the paper's reconstruction table
(`../shared/reference/table_recon.png`), in its order: Resolution, #Tokens,
PSNR, rFVD, LPIPS, SI-SDR, rFAD, MR-STFT. The paper prints SI-SDR as
lower-is-better, i.e. the negative of the usual SI-SDR; our table prints
that column as -SI-SDR (so it reads like the paper's) and metrics.json keeps
the usual sign under `si_sdr` (higher is better).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

HEADLINE_KEYS = (
  "psnr",
  "ssim",
  "lpips",
  "rfvd",
  "si_sdr",
  "mr_stft",
  "mel_l1",
  "rfad",
  "codebook_usage",
  "perplexity",
)

# (column title, metrics.json key, sign applied for display, digits)
PAPER_COLUMNS = (
  ("PSNR↑", "psnr", 1.0, 2),
  ("rFVD↓", "rfvd", 1.0, 2),
  ("LPIPS↓", "lpips", 1.0, 3),
  ("−SI-SDR↓", "si_sdr", -1.0, 2),
  ("rFAD↓", "rfad", 1.0, 2),
  ("MR-STFT↓", "mr_stft", 1.0, 3),
)

# (title, key, digits) of the second table: what a tokenizer's health needs.
EXTRA_ROWS = (
  ("PSNR of each patch's mean colour (the floor to beat) ↑", "patch_mean_psnr", 2),
  ("SSIM ↑", "ssim", 4),
  ("mel L1 (normalised log-mel) ↓", "mel_l1", 4),
  ("SI-SDR, usual sign (dB) ↑", "si_sdr", 2),
  ("vocoder ceiling: SI-SDR of vocoder(input mel) (dB) ↑", "vocoder_ceiling_si_sdr", 2),
  ("vocoder ceiling: MR-STFT of vocoder(input mel) ↓", "vocoder_ceiling_mr_stft", 3),
  ("classifier Frechet distance, video ↓", "classifier_fd_video", 3),
  ("classifier Frechet distance, audio ↓", "classifier_fd_audio", 3),
  ("classifier accuracy on input video", "classifier_accuracy_video_real", 3),
  ("classifier accuracy on reconstructed video", "classifier_accuracy_video_recon", 3),
  ("classifier accuracy on input audio", "classifier_accuracy_audio_real", 3),
  ("classifier accuracy on reconstructed audio", "classifier_accuracy_audio_recon", 3),
  ("codebook usage (fraction of entries used)", "codebook_usage", 4),
  ("code perplexity", "perplexity", 1),
  ("distinct codes", "distinct_codes", 0),
  ("video codebook usage", "video_codebook_usage", 4),
  ("audio codebook usage", "audio_codebook_usage", 4),
  ("tokens per clip", "tokens_per_clip", 0),
  ("encode clips/s", "encode_clips_per_s", 1),
  ("decode clips/s", "decode_clips_per_s", 1),
)


def cell(value: Any, sign: float = 1.0, digits: int = 3) -> str:
  """A table cell: a number rounded, or the reason there is none (shortened)."""
  if value is None:
    return "-"
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, int | float):
    return f"{sign * value:.{digits}f}"
  text = str(value)
  return "not configured" if text == "not configured" else text.split(":")[0]


def resolution(config: Any) -> str:
  """'T×H×W + F×L (M)': the clip size and the mel size, as the paper's Resolution column."""
  d = config.data
  mel_frames = int(d.num_samples) // int(d.mel.hop_length)
  return f"{d.num_frames}×{d.height}×{d.width} + {d.mel.n_mels}×{mel_frames} (M)"


def paper_table(rows: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
  """The paper's reconstruction table for rows of (name, metrics)."""
  head = ["Method", "Resolution", "#Tokens"] + [c[0] for c in PAPER_COLUMNS]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, m in rows:
    cells = [name, str(m.get("resolution", "-")), cell(m.get("tokens_per_clip"), digits=0)]
    cells += [cell(m.get(key), sign, digits) for _, key, sign, digits in PAPER_COLUMNS]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def extra_table(rows: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
  """Health and diagnostic figures, one column per run."""
  head = ["Figure"] + [name for name, _ in rows]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for title, key, digits in EXTRA_ROWS:
    if not any(key in m for _, m in rows):
      continue
    lines.append(
      "| " + " | ".join([title] + [cell(m.get(key), 1.0, digits) for _, m in rows]) + " |"
    )
  return "\n".join(lines) + "\n"


_NOTES = """\
Definitions (avtok_jax/evaluation/metrics.py): PSNR on [-1, 1] pixels (peak-to-peak 2),
SSIM with an 11×11 Gaussian window (σ 1.5, K1 0.01, K2 0.03), both per clip then averaged;
rFVD = Frechet distance of Kinetics-400 I3D logits (frames resized to 224×224, clips under 16
frames repeated to 16) between the input and reconstructed clips; LPIPS(VGG16) and rFAD (VGGish)
need weights from a local path and say "not configured" without them. Audio metrics compare the
original waveform with the vocoded reconstructed mel (the run's HiFi-GAN, else Griffin-Lim: see
"vocoder" above); the vocoder ceiling rows give the same figures for the vocoded input mel.
−SI-SDR is printed as the paper prints it
(lower is better); metrics.json keeps `si_sdr` with the usual sign. Frechet distances depend on
the number of clips: compare runs at the same `num_clips` only.
"""


# metrics.json keys naming the pretrained weights an evaluation used.
WEIGHT_KEYS = ("lpips_weights", "i3d_weights", "vggish_weights")


def format_report(metrics: Mapping[str, Any], figures: Mapping[str, Any]) -> str:
  """report.md of one evaluation."""
  name = f"{metrics.get('stage', '?')} ({metrics.get('size', '?')})"
  out = [
    f"# Reconstruction: {name}, step {metrics.get('step')}\n",
    f"- checkpoint: `{metrics.get('workdir')}` step {metrics.get('step')}",
    f"- data: {metrics.get('data')}, {metrics.get('num_clips')} clips",
    f"- vocoder: {metrics.get('vocoder', '-')}",
    f"- written: {datetime.datetime.now().isoformat(timespec='seconds')}",
  ]
  weights = [f"{k.split('_')[0]} `{metrics[k]}`" for k in WEIGHT_KEYS if k in metrics]
  if weights:
    out.append(f"- pretrained weights: {', '.join(weights)}")
  build = metrics.get("data_build")
  if build:
    out.append(
      f"- data build: clips per split {build.get('examples')}, files skipped "
      f"{build.get('skipped_counts') or 'none'}"
    )
    out += [f"  - skipped {line}" for line in build.get("skipped", [])]
  out += ["", paper_table([(name, metrics)]), "", extra_table([(name, metrics)])]
  out += ["", _NOTES]
  for key, title in (
    ("reconstructions", "Inputs (rows 1, 3, ...) and reconstructions"),
    ("mels", "Input and reconstructed mels"),
    ("histograms", "Per-clip metrics"),
    ("training_curves", "Training curves"),
  ):
    if key in figures:
      out += [f"## {title}\n", f"![{key}]({figures[key]})\n"]
  if figures.get("clips"):
    out += ["## Clips (input vs reconstruction, with sound)\n"]
    out += [f"- [{p}]({p})" for p in figures["clips"]]
  return "\n".join(out) + "\n"


def compare(runs: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
  """Side-by-side markdown of several metrics.json dicts: (name, metrics) pairs."""
  lines = ["| Run | checkpoint | step | data | clips |", "|---|---|---|---|---|"]
  for name, m in runs:
    lines.append(
      f"| {name} | `{m.get('workdir')}` | {m.get('step')} | {m.get('data')} | {m.get('num_clips')} |"
    )
  return "\n".join(
    [
      "\n".join(lines) + "\n",
      paper_table(runs),
      extra_table(list(runs)),
      _NOTES,
    ]
  )
