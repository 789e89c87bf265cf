"""TFDS builder `av_folder`: fixed-length clips cut from a folder of real videos.

The manual folder holds video files (.mp4 .webm .mkv .mov .avi .m4v, searched
recursively) and optionally a CSV (`csv_path`, or `labels.csv` in the folder
when no path is given) in one of two layouts:

* `filename,label[,split]` (header optional): `filename` relative to the
  folder (a bare file name is also looked up anywhere below it); no split
  column means `train`.
* VGGSound: `youtube_id,start_seconds,label,split` without header; the file is
  `{youtube_id}_{start_seconds:06d}.{ext}` or `{youtube_id}.{ext}`.

Without a CSV the label of a file is the name of its parent folder and every
file goes to `train`. Class ids are the sorted label names; with a CSV every
label it lists counts, also when its files are missing, so that ids do not
depend on which files were downloaded.

Each file is decoded once (`video_io.load_media`, centre crop + resize to the
stored size target + crop_margin) and cut into back-to-back windows of the
clip duration from t = 0, at most `max_clips_per_file`. A window that reaches
past the end is padded ('pad') or skipped and reported ('skip'), per
`short_clip`; files without audio fail or get silence per `missing_audio`.
Files that cannot be decoded, that the CSV lists but are not on disk, or that
it lists twice are skipped and reported: the builder writes
`prepare_report.json` (counts, file names, reasons) next to the data and keeps
it in `builder.report`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import multiprocessing
import os
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from avtok_jax import config_lib
from avtok_jax.data import video_io
from avtok_jax.data.tfds import common

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")
DEFAULT_CSV_NAME = "labels.csv"
_HEADER_FIRST_FIELDS = ("filename", "file", "path", "youtube_id", "ytid", "# ytid")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One file to decode: where it is, its label and split."""

  path: str  # absolute
  rel: str  # relative to the manual folder (names the clips' `source`)
  label: str
  split: str


@dataclasses.dataclass
class Scan:
  """What the manual folder and CSV hold, before any decoding."""

  entries: list[Entry]
  class_names: list[str]
  csv_path: str | None
  csv_layout: str | None  # 'filename' | 'vggsound' | None
  skipped: list[dict[str, Any]]  # missing / duplicate rows
  unlisted_files: list[str]  # on disk but not in the CSV


@dataclasses.dataclass(frozen=True)
class ClipJob:
  """Everything a (possibly separate) process needs to cut the clips of one file."""

  entry: Entry
  fps: float
  height: int
  width: int
  sample_rate: int
  num_frames: int
  num_samples: int
  max_clips: int
  short_clip: str
  missing_audio: str


def find_videos(root: str) -> list[str]:
  """Video files below `root`, as sorted paths relative to it."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in filenames:
      if os.path.splitext(name)[1].lower() in VIDEO_SUFFIXES:
        found.append(os.path.relpath(os.path.join(dirpath, name), root))
  return sorted(found)


def scan_folder(manual_dir: str, csv_path: str | None = None) -> Scan:
  """Lists the files to decode with labels and splits (see the module docstring)."""
  manual_dir = os.path.abspath(os.fspath(manual_dir))
  if not os.path.isdir(manual_dir):
    raise ValueError(f"av_folder: manual_dir {manual_dir!r} is not a directory.")
  if csv_path is None and os.path.isfile(os.path.join(manual_dir, DEFAULT_CSV_NAME)):
    csv_path = os.path.join(manual_dir, DEFAULT_CSV_NAME)
  videos = find_videos(manual_dir)
  if csv_path is None:
    if not videos:
      raise ValueError(
        f"av_folder: no video files ({', '.join(VIDEO_SUFFIXES)}) found below {manual_dir!r}."
      )
    entries = [
      Entry(
        path=os.path.join(manual_dir, rel),
        rel=rel,
        label=os.path.basename(os.path.dirname(os.path.join(manual_dir, rel))),
        split="train",
      )
      for rel in videos
    ]
    return Scan(
      entries=entries,
      class_names=sorted({e.label for e in entries}),
      csv_path=None,
      csv_layout=None,
      skipped=[],
      unlisted_files=[],
    )

  csv_path = os.path.abspath(os.fspath(csv_path))
  layout, rows = read_csv(csv_path)
  by_rel = set(videos)
  by_name = collections.defaultdict(list)  # file name -> rel paths
  by_stem = collections.defaultdict(list)  # name without suffix -> rel paths
  for rel in videos:
    by_name[os.path.basename(rel)].append(rel)
    by_stem[os.path.splitext(os.path.basename(rel))[0]].append(rel)

  entries, skipped, used, labels = [], [], set(), set()
  for line, key, label, split in rows:
    labels.add(label)
    if layout == "filename":
      shown = key
      rel, why = _lookup_filename(key, by_rel, by_name)
    else:
      youtube_id, start = key
      shown = f"{youtube_id}_{start:06d}"
      rel, why = _lookup_stem((shown, youtube_id), by_stem)
    if rel is None:
      skipped.append(_problem(shown, split, "missing", f"{csv_path} line {line}: {why}"))
      continue
    if rel in used:
      skipped.append(
        _problem(rel, split, "duplicate", f"listed again in {csv_path} line {line}; first kept")
      )
      continue
    used.add(rel)
    entries.append(Entry(path=os.path.join(manual_dir, rel), rel=rel, label=label, split=split))
  unlisted = [rel for rel in videos if rel not in used]
  return Scan(
    entries=entries,
    class_names=sorted(labels),
    csv_path=csv_path,
    csv_layout=layout,
    skipped=skipped,
    unlisted_files=unlisted,
  )


def read_csv(csv_path: str) -> tuple[str, list[tuple[int, Any, str, str]]]:
  """Parses a label CSV; returns (layout, [(line, key, label, split)]).

  key is the file name for the 'filename' layout and (youtube_id,
  start_seconds) for the 'vggsound' layout.
  """
  if not os.path.isfile(csv_path):
    raise ValueError(f"av_folder: CSV file {csv_path!r} does not exist.")
  with open(csv_path, newline="", encoding="utf-8") as f:
    raw = [
      (i + 1, [field.strip() for field in row])
      for i, row in enumerate(csv.reader(f))
      if row and any(field.strip() for field in row)
    ]
  if not raw:
    raise ValueError(f"av_folder: CSV file {csv_path!r} is empty.")
  first = raw[0][1]
  has_header = first[0].lower() in _HEADER_FIRST_FIELDS
  width = len(first)
  if width == 4 and (has_header or _is_int(first[1])):
    layout = "vggsound"
  elif width in (2, 3):
    layout = "filename"
  else:
    raise ValueError(
      f"av_folder: {csv_path!r} line {raw[0][0]}: expected 'filename,label[,split]' or "
      f"VGGSound 'youtube_id,start_seconds,label,split', got {width} columns: {first}."
    )
  rows = []
  for line, row in raw[1:] if has_header else raw:
    if len(row) != width:
      raise ValueError(
        f"av_folder: {csv_path!r} line {line}: expected {width} columns like the first "
        f"line, got {len(row)}: {row}."
      )
    if layout == "vggsound":
      youtube_id, start, label, split = row
      if not _is_int(start):
        raise ValueError(
          f"av_folder: {csv_path!r} line {line}: start_seconds {start!r} is not an integer."
        )
      key = (youtube_id, int(start))
    else:
      key, label = row[0], row[1]
      split = row[2] if width == 3 else "train"
    if not key or not label:
      raise ValueError(f"av_folder: {csv_path!r} line {line}: empty file name or label: {row}.")
    common.check_split_name(split, f"av_folder: {csv_path!r} line {line}")
    rows.append((line, key, label, split))
  if not rows:
    raise ValueError(f"av_folder: CSV file {csv_path!r} has a header but no rows.")
  return layout, rows


def cut_file(job: ClipJob) -> dict[str, Any]:
  """Decodes one file and cuts its clips; failures come back as report entries.

  Returns {'clips': [(start, frames, audio_int16)], 'padded': int,
  'has_audio': bool, 'skipped': [problem dicts]}. Top level so that
  worker processes can run it.
  """
  e = job.entry
  out = {"clips": [], "padded": 0, "has_audio": True, "skipped": []}
  try:
    media = video_io.load_media(
      e.path,
      fps=job.fps,
      height=job.height,
      width=job.width,
      sample_rate=job.sample_rate,
      missing_audio=job.missing_audio,
    )
  except video_io.MediaError as err:
    out["skipped"].append(_problem(e.rel, e.split, "undecodable", str(err)))
    return out
  out["has_audio"] = media.has_audio
  window = job.num_samples / job.sample_rate
  for k in range(job.max_clips):
    start = k * window
    if k > 0 and start >= media.duration:
      break
    cut = dict(start=start, num_frames=job.num_frames, num_samples=job.num_samples)
    try:
      frames, wave = video_io.cut_clip(media, short_clip="skip", **cut)
    except video_io.ClipTooShortError as err:
      if job.short_clip != "pad":
        out["skipped"].append(_problem(e.rel, e.split, "too_short", str(err), start=start))
        continue
      frames, wave = video_io.cut_clip(media, short_clip="pad", **cut)
      out["padded"] += 1
    out["clips"].append((start, frames, common.audio_to_int16(wave)))
  return out


class AvFolder(tfds.core.GeneratorBasedBuilder):
  """Sounding-video clips from a folder of real video files (e.g. VGGSound)."""

  VERSION = tfds.core.Version("1.0.0")
  # TFDS 4.9.10 derives `code_path` for builders inside a package through the
  # `importlib_resources` backport, which it does not install; state it.
  code_path = common.CODE_DIR / f"{__name__.rsplit('.', 1)[-1]}.py"
  RELEASE_NOTES = {"1.0.0": "First version."}
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(name=p, description=f"Clips of the '{p}' data preset.")
    for p in config_lib.DATA_PRESETS
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "paper"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put the video files (.mp4 .webm .mkv .mov .avi .m4v) in one folder (sub-folders
  are searched; without a CSV their names are the labels) and pass it as
  --manual_dir, with --csv for a 'filename,label[,split]' or VGGSound
  'youtube_id,start_seconds,label,split' label file.
  """

  def __init__(
    self,
    *,
    data_config: ml_collections.ConfigDict | None = None,
    csv_path: str | None = None,
    num_proc: int = 1,
    **kwargs,
  ):
    """Args: data_config (sizes must match the preset), CSV, decoding processes, TFDS kwargs."""
    preset = common.preset_of(kwargs, self.DEFAULT_BUILDER_CONFIG_NAME)
    if preset not in config_lib.DATA_PRESETS:
      raise ValueError(
        f"Unknown av_folder config {preset!r}; use one of {config_lib.DATA_PRESETS}."
      )
    if num_proc < 1:
      raise ValueError(f"num_proc must be >= 1, got {num_proc}.")
    # Set before super().__init__, which may already read `info`.
    self._data_config = common.preset_data_config(preset, data_config)
    self._csv_path = csv_path
    self._num_proc = num_proc
    self._scan: Scan | None = None
    self._stats: dict[str, Any] = {}
    self.report: dict[str, Any] = {}
    # array_record: random access for Grain, and TFRecord writing needs TensorFlow.
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> common.LocalDatasetInfo:
    features = common.base_features(self._data_config, class_names=None)
    features["has_audio"] = tfds.features.Scalar(dtype=np.bool_)
    # Built directly: `dataset_info_from_configs` fails outside a package
    # data dir (ENVIRONMENT.md).
    return common.LocalDatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(features),
    )

  def _split_generators(self, dl_manager):
    self._scan = scan_folder(os.fspath(dl_manager.manual_dir), self._csv_path)
    self.info.features["label"].names = self._scan.class_names
    by_split = collections.defaultdict(list)
    for entry in self._scan.entries:
      by_split[entry.split].append(entry)
    if not by_split:
      raise ValueError(
        f"av_folder: none of the files listed in {self._scan.csv_path} were found below "
        f"{dl_manager.manual_dir}: {_summarise(self._scan.skipped)}"
      )
    self._stats = {
      "examples": {},
      "padded": 0,
      "silent": [],
      "skipped": list(self._scan.skipped),
      "files": {},
    }
    return {split: self._generate_examples(split, entries) for split, entries in by_split.items()}

  def _generate_examples(self, split: str, entries: list[Entry]):
    c = self._data_config
    hs, ws = config_lib.stored_frame_size(c)
    jobs = [
      ClipJob(
        entry=e,
        fps=config_lib.fps(c),
        height=hs,
        width=ws,
        sample_rate=int(c.sample_rate),
        num_frames=int(c.num_frames),
        num_samples=int(c.num_samples),
        max_clips=int(c.max_clips_per_file),
        short_clip=c.short_clip,
        missing_audio=c.missing_audio,
      )
      for e in entries
    ]
    label_ids = {name: i for i, name in enumerate(self._scan.class_names)}
    st = self._stats
    st["examples"].setdefault(split, 0)
    st["files"].setdefault(split, 0)
    progress = tqdm.tqdm(total=len(jobs), desc=f"av_folder {split}", unit="file")
    for job, result in _ordered_map(cut_file, jobs, self._num_proc):
      e = job.entry
      progress.update(1)
      st["skipped"].extend(result["skipped"])
      st["padded"] += result["padded"]
      if not result["has_audio"] and result["clips"]:
        st["silent"].append(e.rel)
      if result["clips"]:
        st["files"][split] += 1
      progress.set_postfix(
        clips=st["examples"][split] + len(result["clips"]), skipped=len(st["skipped"])
      )
      for start, frames, wave in result["clips"]:
        st["examples"][split] += 1
        yield (
          f"{e.rel}@{start:.3f}",
          {
            "video": frames,
            "audio": wave,
            "label": label_ids[e.label],
            "label_name": e.label,
            "source": e.rel,
            "start": np.float32(start),
            "has_audio": bool(result["has_audio"]),
          },
        )
    progress.close()
    if st["examples"][split] == 0:
      # TFDS cannot write an empty split; say why instead of its generic error.
      raise ValueError(
        f"av_folder: split {split!r} has no usable clip: all {len(entries)} files were "
        f"skipped. {_summarise([s for s in st['skipped'] if s['split'] == split])}"
      )

  def _download_and_prepare(self, dl_manager, download_config=None):
    super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
    st, scan = self._stats, self._scan
    counts = collections.Counter(s["kind"] for s in st["skipped"])
    self.report = {
      "dataset": f"{self.name}/{self.builder_config.name}",
      "manual_dir": os.fspath(dl_manager.manual_dir),
      "csv": scan.csv_path,
      "csv_layout": scan.csv_layout,
      "num_classes": len(scan.class_names),
      "examples": {s: int(info.num_examples) for s, info in self.info.splits.items()},
      "files_used": dict(st["files"]),
      "padded_clips": st["padded"],
      "silent_audio_files": st["silent"],
      "unlisted_files": len(scan.unlisted_files),
      "skipped_counts": dict(counts),
      "skipped": st["skipped"],
    }
    # self.data_dir is still the temporary directory here; TFDS renames it.
    common.write_report(self.data_dir, self.report)


def _ordered_map(
  fn: Callable[[ClipJob], dict[str, Any]], jobs: list[ClipJob], num_proc: int
) -> Iterator[tuple[ClipJob, dict[str, Any]]]:
  """(job, fn(job)) in job order, in `num_proc` processes with a bounded backlog."""
  if num_proc == 1:
    for job in jobs:
      yield job, fn(job)
    return
  # 'spawn': the parent holds TFDS writer threads, which fork does not copy.
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(num_proc, mp_context=context) as pool:
    pending = collections.deque()
    for job in jobs:
      pending.append((job, pool.submit(fn, job)))
      # At most 2 decoded files per process wait here (memory stays flat).
      if len(pending) >= 2 * num_proc:
        done_job, future = pending.popleft()
        yield done_job, future.result()
    while pending:
      done_job, future = pending.popleft()
      yield done_job, future.result()


def _problem(file: str, split: str, kind: str, reason: str, **extra) -> dict[str, Any]:
  return {"file": file, "split": split, "kind": kind, "reason": reason, **extra}


def _summarise(skipped: list[dict[str, Any]], limit: int = 5) -> str:
  lines = [f"{s['file']}: {s['kind']}: {s['reason']}" for s in skipped[:limit]]
  more = f" ... and {len(skipped) - limit} more" if len(skipped) > limit else ""
  return "; ".join(lines) + more


def _lookup_filename(
  name: str, by_rel: set[str], by_name: dict[str, list[str]]
) -> tuple[str | None, str]:
  """(relative path, '') or (None, why not)."""
  rel = os.path.normpath(name)
  if rel in by_rel:
    return rel, ""
  matches = by_name.get(os.path.basename(rel), [])
  if len(matches) == 1:
    return matches[0], ""
  if matches:
    return None, f"file name {name!r} is ambiguous: {', '.join(matches)}; give the relative path"
  return None, f"{name!r} is not in the folder (looked for a video file of that name)"


def _lookup_stem(stems: tuple[str, ...], by_stem: dict[str, list[str]]) -> tuple[str | None, str]:
  """(relative path, '') of the first stem found, or (None, why not)."""
  for stem in stems:
    matches = by_stem.get(stem)
    if matches:
      return sorted(matches)[0], ""
  tried = " or ".join(f"{s}.{{{','.join(x[1:] for x in VIDEO_SUFFIXES)}}}" for s in stems)
  return None, f"no video file named {tried} in the folder"


def _is_int(text: str) -> bool:
  try:
    int(text)
  except ValueError:
    return False
  return True
