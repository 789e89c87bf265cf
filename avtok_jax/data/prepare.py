r"""Builds a TFDS (array_record) data set for training: built-in clips or a folder of videos.

  # Built-in sounding-video clips:
  python -m avtok_jax.data.prepare --source=synthetic_av --preset=tiny \
      --num=1000 --num_test=128 --data_dir=/data/avtok

  # Real videos (e.g. VGGSound: vggsound.csv + {youtube_id}_{start:06d}.mp4):
  python -m avtok_jax.data.prepare --source=av_folder --manual_dir=/data/vggsound/video \
      --csv=/data/vggsound/vggsound.csv --data_dir=/data/avtok [--preset=paper] [--num_proc=8]

It prints how many clips each split got, every file it skipped and why (also
in `prepare_report.json` next to the data), and the config flags that train
on the result.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds
from absl import flags
from etils import epath

from avtok_jax import config_lib
from avtok_jax.data import tfds as builders

# Skipped files listed on the console; the JSON report has all of them.
_MAX_LISTED = 30


def prepare(
  source: str,
  data_dir: str,
  *,
  preset: str = "paper",
  manual_dir: str | None = None,
  csv_path: str | None = None,
  max_clips_per_file: int = 1,
  short_clip: str = "pad",
  missing_audio: str = "error",
  num_proc: int = 1,
  num: int = 1000,
  num_test: int = 128,
  seed: int = 0,
  overwrite: bool = False,
) -> tuple[tfds.core.DatasetBuilder, dict[str, Any]]:
  """Builds `source` ('synthetic_av' | 'av_folder') into data_dir; returns (builder, report)."""
  if source not in builders.BUILDERS:
    raise ValueError(f"Unknown source {source!r}; choose one of {sorted(builders.BUILDERS)}.")
  data_config = config_lib.data_config(preset)
  download_config = tfds.download.DownloadConfig()
  if source == "synthetic_av":
    data_config.seed = seed

    def make_builder():
      return builders.SyntheticAv(
        config=preset,
        data_dir=data_dir,
        data_config=data_config,
        num_train=num,
        num_test=num_test,
      )

  else:
    if not manual_dir:
      raise ValueError("--source=av_folder needs --manual_dir (the folder with the videos).")
    data_config.max_clips_per_file = max_clips_per_file
    data_config.short_clip = short_clip
    data_config.missing_audio = missing_audio
    download_config.manual_dir = os.path.abspath(manual_dir)

    def make_builder():
      return builders.AvFolder(
        config=preset,
        data_dir=data_dir,
        data_config=data_config,
        csv_path=csv_path,
        num_proc=num_proc,
      )

  builder = make_builder()
  if overwrite and builder.is_prepared():
    # Deleted here rather than by TFDS's FORCE_REDOWNLOAD: a builder that has
    # loaded the old data's class names refuses to set different ones.
    epath.Path(builder.data_dir).rmtree()
    builder = make_builder()
  existed = builder.is_prepared()
  builder.download_and_prepare(download_config=download_config)
  report = builders.read_report(builder.data_dir)
  report["reused_existing"] = bool(existed and not overwrite)
  return builder, report


def format_summary(builder: tfds.core.DatasetBuilder, report: dict[str, Any]) -> str:
  """Human-readable summary of a build: counts, skipped files, where, how to train on it."""
  name = builder.name
  preset = builder.builder_config.name
  lines = [f"Data set {report['dataset']} in {builder.data_dir}"]
  if report.get("reused_existing"):
    lines.append("  (already prepared: reused; pass --overwrite to rebuild)")
  for split, n in sorted(report["examples"].items()):
    lines.append(f"  {split}: {n} clips")
  if report.get("csv"):
    lines.append(f"  labels from {report['csv']} ({report['csv_layout']} layout)")
  if "num_classes" in report:
    lines.append(f"  classes: {report['num_classes']}")
  if report.get("padded_clips"):
    lines.append(f"  clips padded past the end of their file: {report['padded_clips']}")
  silent = report.get("silent_audio_files") or []
  if silent:
    lines.append(f"  files without audio, given silence: {len(silent)}")
  if report.get("unlisted_files"):
    lines.append(
      f"  video files in the folder but not in the CSV (ignored): {report['unlisted_files']}"
    )
  skipped = report.get("skipped") or []
  if skipped:
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(report.get("skipped_counts", {}).items()))
    lines.append(f"  SKIPPED {len(skipped)} ({counts}):")
    for s in skipped[:_MAX_LISTED]:
      where = f" at {s['start']:.2f} s" if "start" in s else ""
      lines.append(f"    [{s['split']}] {s['file']}{where}: {s['kind']}: {s['reason']}")
    if len(skipped) > _MAX_LISTED:
      lines.append(f"    ... and {len(skipped) - _MAX_LISTED} more")
  else:
    lines.append("  skipped: none")
  lines.append(f"  report: {os.path.join(builder.data_dir, builders.common.REPORT_FILENAME)}")
  flags_line = f"--config.data.source=tfds:{name} --config.data.data_dir={builder.data_dir_root}"
  if "num_classes" in report and name == "av_folder":
    flags_line += f" --config.data.num_classes={report['num_classes']}"
  lines.append(f"Train on it with a '{preset}' config and: {flags_line}")
  return "\n".join(lines)


def _flag_values() -> flags.FlagValues:
  # A private FlagValues: importing this module must not add flags to the
  # global absl FLAGS that trainers and Grain workers parse.
  fv = flags.FlagValues()
  flags.DEFINE_enum(
    "source", None, sorted(builders.BUILDERS), "Which data set to build.", flag_values=fv
  )
  flags.DEFINE_string("data_dir", None, "Where TFDS writes the data set.", flag_values=fv)
  flags.DEFINE_enum(
    "preset", "paper", list(config_lib.DATA_PRESETS), "Clip size preset.", flag_values=fv
  )
  flags.DEFINE_string("manual_dir", None, "av_folder: folder with the videos.", flag_values=fv)
  flags.DEFINE_string(
    "csv", None, "av_folder: label CSV (default: labels.csv in --manual_dir).", flag_values=fv
  )
  flags.DEFINE_integer(
    "max_clips_per_file", 1, "av_folder: clips cut from each file.", flag_values=fv
  )
  flags.DEFINE_enum(
    "short_clip",
    "pad",
    ["pad", "skip"],
    "av_folder: pad or skip (and report) windows past the end of a file.",
    flag_values=fv,
  )
  flags.DEFINE_enum(
    "missing_audio",
    "error",
    ["error", "silence"],
    "av_folder: skip (and report) files without audio, or give them silence.",
    flag_values=fv,
  )
  flags.DEFINE_integer("num_proc", 1, "av_folder: processes decoding videos.", flag_values=fv)
  flags.DEFINE_integer("num", 1000, "synthetic_av: train clips.", flag_values=fv)
  flags.DEFINE_integer("num_test", 128, "synthetic_av: test clips.", flag_values=fv)
  flags.DEFINE_integer(
    "seed", 0, "synthetic_av: generator seed (test uses seed + 1).", flag_values=fv
  )
  flags.DEFINE_bool("overwrite", False, "Rebuild if the data set already exists.", flag_values=fv)
  flags.DEFINE_bool("help", False, "Show this help.", flag_values=fv)
  return fv


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; argv[0] is the program name."""
  fv = _flag_values()
  fv(list(sys.argv if argv is None else argv))
  if fv.help:
    print(__doc__.strip() + "\n\nFlags:\n" + fv.get_help())
    return 0
  if not fv.source or not fv.data_dir:
    raise SystemExit("--source and --data_dir are required (see --help).")
  # Our own tqdm bars count clips/files; TFDS's would print a second set.
  tfds.disable_progress_bar()
  builder, report = prepare(
    fv.source,
    fv.data_dir,
    preset=fv.preset,
    manual_dir=fv.manual_dir,
    csv_path=fv.csv,
    max_clips_per_file=fv.max_clips_per_file,
    short_clip=fv.short_clip,
    missing_audio=fv.missing_audio,
    num_proc=fv.num_proc,
    num=fv.num,
    num_test=fv.num_test,
    seed=fv.seed,
    overwrite=fv.overwrite,
  )
  print(format_summary(builder, report))
  return 0


if __name__ == "__main__":
  sys.exit(main())
