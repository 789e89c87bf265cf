"""Observability for training: metric writers, progress line, parameter table, samples.

Everything that leaves the trainer for a human goes through here (STYLE.md
practice 14):

* `MetricWriter`: TensorBoard event files (tensorboardX, no TensorFlow) plus a
  `metrics.jsonl` twin that scripts and tests read without TensorBoard. Only
  process 0 writes (multi-host); other processes get a writer whose methods
  do nothing. `read_metrics` / `read_tensorboard_scalars` read them back.
* `Progress`: one line every N steps with step/s and ETA.
* `compile_count`: XLA compilations so far in this process (the trainers log
  it as `compiles`, so a train step that recompiles shows up in the metrics).
* `parameter_overview`: a table of parameter counts, shapes, dtypes and
  shardings grouped by module path, printed at start.
* Pictures and clips of inputs next to reconstructions: `video_grid`,
  `mel_grid`, `save_png` and `write_samples` (PNG grids + mp4 files with
  sound, the audio made audible by Griffin-Lim).

Nothing here is jitted; every function takes numpy or (fully addressable)
jax arrays and copies them to the host.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import math
import os
import struct
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import jax
import numpy as np

PathLike = str | os.PathLike

METRICS_FILE = "metrics.jsonl"
# Separator between the tiles of a picture grid, in pixels, and its grey level
# (light enough to tell dark frames apart, dark enough not to glare).
_SEP = 2
_SEP_VALUE = 200


class _QuietLibraries(logging.Filter):
  """Drops the INFO chatter of libraries that log through absl (Orbax: ~25 lines per save).

  Their warnings and errors still pass; `--verbosity=1` shows everything.
  """

  _PREFIXES = ("orbax", "etils", "jax._src")

  def filter(self, record: logging.LogRecord) -> bool:
    from absl import flags

    verbosity = flags.FLAGS.verbosity if flags.FLAGS.is_parsed() else 0
    if record.levelno >= logging.WARNING or verbosity > 0:
      return True
    module = record.pathname.replace("\\", "/")
    return not any(f"/{p.replace('.', '/')}/" in module for p in self._PREFIXES)


def quiet_library_logs() -> None:
  """Installs `_QuietLibraries` on the root logger's handlers (CLIs call it in main)."""
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())


def _is_chief(enabled: bool | None) -> bool:
  """`enabled`, defaulting to "this is process 0" (the only one that writes)."""
  return jax.process_index() == 0 if enabled is None else bool(enabled)


def _to_float(name: str, value: Any) -> float:
  """A Python float from a scalar number / numpy / jax array; names the metric on error."""
  arr = np.asarray(jax.device_get(value))
  if arr.size != 1:
    raise ValueError(f"Metric {name!r} must be a scalar, got an array of shape {arr.shape}.")
  return float(arr.reshape(()))


# ----------------------------------------------------------------------------
# Metric writer
# ----------------------------------------------------------------------------


class MetricWriter:
  """Writes scalars, images and text to TensorBoard (and scalars to metrics.jsonl).

  Only the process with `enabled=True` writes; the default is
  `jax.process_index() == 0`, so on a multi-host run every process can call
  the same methods and only process 0 touches the disk. A disabled writer
  creates no directory and no file.

  Scalars are stored twice: as TensorBoard `simple_value`s (float32, as
  TensorBoard stores them) and as one JSON line per `write_scalars` call in
  `logdir/metrics.jsonl`: `{"step": 120, "loss": 0.1234, ...}` with full
  float64 precision (NaN/Inf are written as the JSON extensions NaN/Infinity,
  which Python's json module reads back). After a resume the file is appended
  to, so steps between the last checkpoint and the interruption can appear
  twice.
  """

  def __init__(
    self, logdir: PathLike, *, enabled: bool | None = None, flush_secs: int = 30
  ) -> None:
    """Opens (or appends to) the event and jsonl files in `logdir` when enabled.

    Args:
      logdir: directory for the event files and metrics.jsonl (created).
      enabled: whether this process writes; default: process 0 only.
      flush_secs: how often the TensorBoard writer's thread flushes to disk.
    """
    self.logdir = os.fspath(logdir)
    self.enabled = _is_chief(enabled)
    self._writer = None
    if self.enabled:
      # Imported here so that disabled processes never load it.
      import tensorboardX

      os.makedirs(self.logdir, exist_ok=True)
      # tensorboardX names event files by the second and opens them with
      # mode 'wb': a run resumed within the same second (a fast preemption
      # test) would truncate the previous file. A unique suffix prevents it.
      self._writer = tensorboardX.SummaryWriter(
        logdir=self.logdir,
        flush_secs=flush_secs,
        filename_suffix=f".{os.getpid()}.{time.time_ns()}",
      )

  def write_scalars(self, step: int, scalars: Mapping[str, float | np.ndarray | jax.Array]) -> None:
    """Logs scalar metrics at `step` (values may be numpy or jax scalars)."""
    if not self.enabled:
      return
    if "step" in scalars:
      raise ValueError("A metric may not be called 'step': metrics.jsonl uses it for the step.")
    values = {name: _to_float(name, value) for name, value in scalars.items()}
    for name, value in values.items():
      self._writer.add_scalar(name, value, global_step=int(step))
    # Written and closed per call: a crash loses at most the current line, and
    # readers never see a half-buffered file.
    with open(os.path.join(self.logdir, METRICS_FILE), "a") as f:
      f.write(json.dumps({"step": int(step), **values}) + "\n")

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """Logs uint8 images, [H, W, 3] (RGB) or [H, W] (grey), at `step`."""
    if not self.enabled:
      return
    for name, image in images.items():
      image = np.asarray(jax.device_get(image))
      if image.dtype != np.uint8 or not (
        image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3)
      ):
        raise ValueError(
          f"Image {name!r} must be uint8 [H, W, 3] or [H, W], got {image.dtype} {image.shape}."
        )
      fmt = "HW" if image.ndim == 2 else "HWC"
      self._writer.add_image(name, image, global_step=int(step), dataformats=fmt)

  def write_text(self, step: int, texts: Mapping[str, str]) -> None:
    """Logs text (TensorBoard renders it as markdown) at `step`."""
    if not self.enabled:
      return
    for name, text in texts.items():
      self._writer.add_text(name, str(text), global_step=int(step))

  def flush(self) -> None:
    """Writes pending events to disk."""
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    """Flushes and closes the event file; later writes are errors."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None
      self.enabled = False

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_metrics(logdir: PathLike) -> list[dict]:
  """The lines of `logdir/metrics.jsonl` in file order ([] if there is none)."""
  path = os.path.join(os.fspath(logdir), METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _masked_crc(data: bytes) -> int:
  # TFRecord framing checksums (CRC32C, then rotated and offset); tensorboardX
  # ships the same function its writer uses.
  from tensorboardX.record_writer import masked_crc32c

  return masked_crc32c(data)


def _read_records(path: str) -> list[bytes]:
  """The records of a TFRecord file: [u64 len][u32 crc(len)][data][u32 crc(data)].

  A truncated last record (the writer is still running, or was killed) ends
  the list; a checksum mismatch inside the file is an error.
  """
  records = []
  with open(path, "rb") as f:
    while True:
      header = f.read(12)
      if len(header) < 12:
        break
      (length,) = struct.unpack("<Q", header[:8])
      (length_crc,) = struct.unpack("<I", header[8:])
      if _masked_crc(header[:8]) != length_crc:
        raise ValueError(f"{path!r}: corrupt record header at byte {f.tell() - 12}.")
      data = f.read(length)
      footer = f.read(4)
      if len(data) < length or len(footer) < 4:
        break
      if _masked_crc(data) != struct.unpack("<I", footer)[0]:
        raise ValueError(f"{path!r}: corrupt record data before byte {f.tell()}.")
      records.append(data)
  return records


def _read_events(logdir: PathLike) -> list:
  """Every `Event` proto in the logdir's event files, oldest file first."""
  from tensorboardX.proto import event_pb2

  files = []
  for path in glob.glob(os.path.join(os.fspath(logdir), "events.out.tfevents.*")):
    events = []
    for record in _read_records(path):
      event = event_pb2.Event()
      event.ParseFromString(record)
      events.append(event)
    if events:
      files.append(events)
  # Order files by when they were started (their first event's wall time),
  # not by name: host names in the name would break ties arbitrarily.
  files.sort(key=lambda events: events[0].wall_time)
  return [event for events in files for event in events]


def read_tensorboard_scalars(logdir: PathLike) -> dict[str, list[tuple[int, float]]]:
  """Scalar series from the event files in `logdir`: {tag: [(step, value), ...]}.

  Each series is sorted by step. Where a step was written more than once
  (a run resumed from a checkpoint older than its last logged step), the
  value written last wins, as in the resumed run's curve.
  """
  series: dict[str, dict[int, float]] = {}
  for event in _read_events(logdir):
    if not event.HasField("summary"):
      continue
    for value in event.summary.value:
      kind = value.WhichOneof("value")
      if kind == "simple_value":
        number = float(value.simple_value)
      elif kind == "tensor" and value.tensor.float_val and value.tensor.dtype == 1:
        number = float(value.tensor.float_val[0])  # new-style scalar (DT_FLOAT)
      else:
        continue
      series.setdefault(value.tag, {})[int(event.step)] = number
  return {tag: sorted(points.items()) for tag, points in series.items()}


# ----------------------------------------------------------------------------
# Progress line
# ----------------------------------------------------------------------------


# XLA backend compilations in this process, counted by a jax.monitoring
# listener (the event `jax._src.dispatch` records around every backend
# compile; cache hits of the in-memory jit cache record nothing).
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = {"count": 0, "listening": False}


def _on_event_duration(event: str, duration: float, **_: Any) -> None:
  del duration
  if event == _COMPILE_EVENT:
    _compiles["count"] += 1


def compile_count() -> int:
  """How many XLA programs this process has compiled since the first call."""
  if not _compiles["listening"]:
    jax.monitoring.register_event_duration_secs_listener(_on_event_duration)
    _compiles["listening"] = True
  return _compiles["count"]


def _format_duration(seconds: float) -> str:
  """12m05s / 1h02m03s; minutes are always shown so the format is regular."""
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m{secs:02d}s"
  return f"{minutes}m{secs:02d}s"


class Progress:
  """Prints one progress line every `every` steps (and at the last step).

  Call `update(step, metrics)` after each training step, with `step` the
  number of steps completed so far. The line looks like

    step 120/2000 (6%) | 3.12 step/s | ETA 10m02s | loss 0.1234 video_l1 0.0567

  The rate is the number of steps between the previous printed line and this
  one over the time between them. The clock starts at the first `update`
  call, i.e. after the first step has run, so the first step's compilation
  is never counted (nor is a resume's restore). The first line gets no rate
  if it is printed by that very first call ('-- step/s | ETA --'). JAX
  dispatches steps asynchronously, so the rate is only right if the caller
  has waited for the step (e.g. fetched its metrics) before calling; the
  trainer does so on the steps it prints.
  """

  def __init__(
    self,
    total_steps: int,
    *,
    start_step: int = 0,
    every: int = 10,
    enabled: bool | None = None,
    stream: TextIO | None = None,
    clock: Callable[[], float] = time.perf_counter,
  ) -> None:
    """Sets up the line.

    Args:
      total_steps: the step the run ends at.
      start_step: the step the run starts (or resumes) from, for the log only.
      every: print every this many steps (by step number, not call count).
      enabled: whether to print; default: process 0 only.
      stream: where lines go (default sys.stdout at call time).
      clock: seconds as a float; tests inject a fake one.
    """
    if every < 1:
      raise ValueError(f"Progress every={every} must be >= 1.")
    self.total_steps = int(total_steps)
    self.start_step = int(start_step)
    self.every = int(every)
    self.enabled = _is_chief(enabled)
    self._stream = stream
    self._clock = clock
    self._last: tuple[int, float] | None = None  # (step, time) of the last reference point

  def update(self, step: int, metrics: Mapping[str, float] | None = None) -> str | None:
    """Returns (and prints) the line on printing steps, None otherwise or when disabled."""
    if not self.enabled:
      return None
    step = int(step)
    now = self._clock()
    if not (step % self.every == 0 or step >= self.total_steps):
      if self._last is None:
        self._last = (step, now)
      return None
    rate_text, eta_text = "-- step/s", "ETA --"
    if self._last is not None and step > self._last[0] and now > self._last[1]:
      rate = (step - self._last[0]) / (now - self._last[1])
      rate_text = f"{rate:.3g} step/s"
      eta_text = f"ETA {_format_duration(max(self.total_steps - step, 0) / rate)}"
    self._last = (step, now)
    percent = int(100 * step / self.total_steps) if self.total_steps > 0 else 100
    parts = [f"step {step}/{self.total_steps} ({percent}%)", rate_text, eta_text]
    if metrics:
      parts.append(" ".join(f"{k} {_to_float(k, v):.4g}" for k, v in metrics.items()))
    line = " | ".join(parts)
    print(line, file=self._stream or sys.stdout, flush=True)
    return line


# ----------------------------------------------------------------------------
# Parameter overview
# ----------------------------------------------------------------------------


def _path_parts(path) -> tuple[str, ...]:
  """('encoder', 'block_0', 'kernel') from a jax key path."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return tuple(parts)


def _spec_text(sharding: Any) -> str:
  """'P(fsdp, model)' for a NamedSharding / PartitionSpec, '' when unknown."""
  if sharding is None:
    return ""
  spec = getattr(sharding, "spec", sharding)
  if isinstance(spec, jax.sharding.PartitionSpec):

    def axis(entry):
      if entry is None:
        return "None"
      if isinstance(entry, tuple):
        return "(" + ",".join(map(str, entry)) + ")"
      return str(entry)

    return "P(" + ", ".join(axis(e) for e in spec) + ")"
  if isinstance(sharding, jax.sharding.SingleDeviceSharding):
    return ""  # an ordinary unsharded array: nothing worth a column entry
  return type(sharding).__name__


def _format_bytes(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  raise AssertionError("unreachable")


def _arrays(n: int) -> str:
  return f"{n} array" if n == 1 else f"{n} arrays"


def parameter_overview(params: Any, shardings: Any = None, *, max_depth: int = 2) -> str:
  """A text table of a parameter tree, grouped by path prefix up to `max_depth`.

  Each row is either a leaf at depth <= max_depth (with its shape) or the sum
  of all leaves under a path of exactly `max_depth` components (with the
  number of arrays in the shape column), so the rows partition the tree and
  their counts add up to the total line. dtype and sharding columns list the
  distinct values under a row. Depth counts from the root of `params`: pass
  the inner `variables['params']` to get module names at depth 1.

  Args:
    params: a (possibly Flax-boxed) tree of jax/numpy arrays or
      jax.ShapeDtypeStructs.
    shardings: optional tree with the same structure holding NamedShardings
      or PartitionSpecs; without it, a leaf's own `.sharding` is shown when it
      is a jax.Array (or ShapeDtypeStruct) with one.
    max_depth: how many path components a row keeps.
  """
  if max_depth < 1:
    raise ValueError(f"max_depth={max_depth} must be >= 1.")
  from flax.core import meta

  params = meta.unbox(params)
  explicit = {}
  if shardings is not None:
    is_spec = lambda x: isinstance(x, jax.sharding.Sharding | jax.sharding.PartitionSpec)  # noqa: E731
    for path, s in jax.tree_util.tree_flatten_with_path(meta.unbox(shardings), is_leaf=is_spec)[0]:
      explicit[_path_parts(path)] = s

  rows: dict[tuple[str, ...], dict] = {}
  total = total_bytes = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    parts = _path_parts(path)
    shape = tuple(int(d) for d in np.shape(leaf))
    dtype = np.dtype(getattr(leaf, "dtype", np.asarray(leaf).dtype))
    count = math.prod(shape)
    total += count
    total_bytes += count * dtype.itemsize
    sharding = explicit.get(parts, getattr(leaf, "sharding", None))
    key = parts[:max_depth]
    row = rows.setdefault(key, {"count": 0, "arrays": 0, "dtypes": [], "specs": [], "shape": None})
    row["count"] += count
    row["arrays"] += 1
    for field, value in (("dtypes", dtype.name), ("specs", _spec_text(sharding))):
      if value not in row[field]:
        row[field].append(value)
    if len(parts) <= max_depth:
      row["shape"] = shape  # a leaf row; a group row keeps None

  def shape_text(row):
    if row["shape"] is not None:
      return str(row["shape"])
    return _arrays(row["arrays"])

  def specs_text(row):
    specs = [s for s in row["specs"] if s]
    return " ".join(specs) if len(specs) <= 2 else f"mixed ({len(specs)} specs)"

  table = [("path", "params", "shape", "dtype", "sharding")]
  for key, row in rows.items():
    table.append(
      (
        "/".join(key) or "(root)",
        f"{row['count']:,}",
        shape_text(row),
        ",".join(row["dtypes"]),
        specs_text(row),
      )
    )
  table.append(
    (
      "total",
      f"{total:,}",
      f"{_arrays(sum(r['arrays'] for r in rows.values()))} ({_format_bytes(total_bytes)})",
      "",
      "",
    )
  )
  widths = [max(len(r[i]) for r in table) for i in range(5)]

  def fmt(r):
    cells = [r[0].ljust(widths[0]), r[1].rjust(widths[1])]
    cells += [c.ljust(w) for c, w in zip(r[2:], widths[2:], strict=True)]
    return "  ".join(cells).rstrip()

  rule = "  ".join("-" * w for w in widths)
  return "\n".join([fmt(table[0]), rule, *map(fmt, table[1:-1]), rule, fmt(table[-1])])


# ----------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------


def to_uint8_video(x: Any) -> np.ndarray:
  """Float pixels in [-1, 1] -> uint8 [0, 255] (clipped, rounded); uint8 passes through."""
  x = np.asarray(jax.device_get(x))
  if x.dtype == np.uint8:
    return x
  x = np.nan_to_num(x.astype(np.float32), nan=-1.0)
  return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def _oklab_to_linear_srgb(lab: np.ndarray) -> np.ndarray:
  """OKLab [..., 3] -> linear sRGB (Björn Ottosson, "A perceptual color space for
  image processing", 2020, https://bottosson.github.io/posts/oklab/)."""
  lms_ = lab @ np.array(
    [
      [1.0, 1.0, 1.0],
      [0.3963377774, -0.1055613458, -0.0894841775],
      [0.2158037573, -0.0638541728, -1.2914855480],
    ]
  )
  lms = lms_**3
  return lms @ np.array(
    [
      [4.0767416621, -1.2684380046, -0.0041960863],
      [-3.3077115913, 2.6097574011, -0.7034186147],
      [0.2309699292, -0.3413193965, 1.7076147010],
    ]
  )


def _make_colour_map(n: int = 256) -> np.ndarray:
  """uint8 [n, 3]: a dark-purple -> blue -> teal -> green -> yellow ramp (viridis-like).

  Built in OKLCh so that perceived lightness L rises linearly (0.27 -> 0.95);
  the hue turns from purple (300 deg) to yellow (105 deg) through blue and
  green, which stays readable for the common colour-vision deficiencies.
  Where the wanted chroma falls outside sRGB, the chroma alone is lowered
  (bisection) so lightness and hue stay as designed.
  """
  t = np.linspace(0.0, 1.0, n)
  lightness = 0.27 + 0.68 * t
  hue = np.deg2rad(300.0 - 195.0 * t)

  def rgb(chroma):
    lab = np.stack([lightness, chroma * np.cos(hue), chroma * np.sin(hue)], axis=-1)
    return _oklab_to_linear_srgb(lab)

  def in_gamut(chroma):
    x = rgb(chroma)
    return np.all((x >= 0.0) & (x <= 1.0), axis=-1)

  lo, hi = np.zeros(n), 0.10 + 0.08 * t
  ok = in_gamut(hi)
  for _ in range(30):
    mid = (lo + hi) / 2
    mid_ok = in_gamut(mid)
    lo, hi = np.where(mid_ok, mid, lo), np.where(mid_ok, hi, mid)
  chroma = np.where(ok, hi, lo)
  linear = np.clip(rgb(chroma), 0.0, 1.0)
  # sRGB transfer function (IEC 61966-2-1).
  srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
  return np.round(srgb * 255).astype(np.uint8)


_COLOUR_MAP = _make_colour_map()


def mel_to_rgb(mel: Any, vmin: float = -1.0, vmax: float = 1.0) -> np.ndarray:
  """Mel [F, L] (bins x frames) -> uint8 [F, L, 3] with the lowest bin at the BOTTOM.

  Values are mapped linearly from [vmin, vmax] (clipped; NaN shows as vmin)
  onto a perceptually ordered colour map (dark = quiet, yellow = loud).
  """
  mel = np.asarray(jax.device_get(mel), dtype=np.float32)
  if mel.ndim != 2:
    raise ValueError(f"mel_to_rgb expects [F, L], got shape {mel.shape}.")
  if not vmax > vmin:
    raise ValueError(f"vmax={vmax} must exceed vmin={vmin}.")
  x = np.nan_to_num((mel - vmin) / (vmax - vmin), nan=0.0)
  idx = np.round(np.clip(x, 0.0, 1.0) * (len(_COLOUR_MAP) - 1)).astype(np.int32)
  # Row 0 of the array is mel bin 0 (the lowest frequency); images put row 0
  # at the top, so flip to read like a spectrogram.
  return _COLOUR_MAP[idx[::-1]]


def _tile(tiles: list[list[np.ndarray]]) -> np.ndarray:
  """Rows of equally sized [h, w, 3] uint8 tiles -> one image with _SEP px gaps."""
  h, w = tiles[0][0].shape[:2]
  nrows, ncols = len(tiles), max(len(r) for r in tiles)
  out = np.full(
    (nrows * h + (nrows - 1) * _SEP, ncols * w + (ncols - 1) * _SEP, 3), _SEP_VALUE, np.uint8
  )
  for i, row in enumerate(tiles):
    for j, tile in enumerate(row):
      y, x = i * (h + _SEP), j * (w + _SEP)
      out[y : y + h, x : x + w] = tile
  return out


def _check_pair(name: str, inputs: np.ndarray, recons: np.ndarray | None, ndim: int) -> None:
  if inputs.ndim != ndim or inputs.shape[0] == 0:
    raise ValueError(f"{name}: inputs must have {ndim} dims with N > 0, got {inputs.shape}.")
  if recons is not None and recons.shape != inputs.shape:
    raise ValueError(f"{name}: recons {recons.shape} differ in shape from inputs {inputs.shape}.")


def video_grid(inputs: Any, recons: Any | None = None, *, max_frames: int = 8) -> np.ndarray:
  """Input vs reconstruction frames as one uint8 [H_img, W_img, 3] picture.

  Rows: clip 0 input, clip 0 reconstruction, clip 1 input, ...; columns:
  frames, evenly subsampled to at most `max_frames` (first and last always
  kept); 2 px grey separators. Without `recons` only the input rows appear.

  Args:
    inputs: [N, T, H, W, 3], uint8 or float in [-1, 1].
    recons: same shape as inputs, or None.
    max_frames: at most this many columns.
  """
  inputs = to_uint8_video(inputs)
  recons = None if recons is None else to_uint8_video(recons)
  _check_pair("video_grid", inputs, recons, 5)
  num_frames = inputs.shape[1]
  cols = np.unique(np.round(np.linspace(0, num_frames - 1, min(num_frames, max_frames))))
  cols = cols.astype(np.int64)
  rows = []
  for i in range(inputs.shape[0]):
    rows.append([inputs[i, t] for t in cols])
    if recons is not None:
      rows.append([recons[i, t] for t in cols])
  return _tile(rows)


def mel_grid(
  inputs: Any, recons: Any | None = None, *, vmin: float = -1.0, vmax: float = 1.0
) -> np.ndarray:
  """Input vs reconstruction mels as one uint8 picture.

  One row per clip input and one below it for its reconstruction (the same
  row order as `video_grid`), each drawn by `mel_to_rgb` (low frequencies at
  the bottom of each tile), 2 px grey separators.

  Args:
    inputs: normalised mels [N, F, L].
    recons: same shape, or None for input rows only.
    vmin, vmax: the value range mapped onto the colour map.
  """
  inputs = np.asarray(jax.device_get(inputs))
  recons = None if recons is None else np.asarray(jax.device_get(recons))
  _check_pair("mel_grid", inputs, recons, 3)
  rows = []
  for i in range(inputs.shape[0]):
    rows.append([mel_to_rgb(inputs[i], vmin, vmax)])
    if recons is not None:
      rows.append([mel_to_rgb(recons[i], vmin, vmax)])
  return _tile(rows)


def save_png(path: PathLike, image: np.ndarray) -> None:
  """Saves a uint8 [H, W, 3] or [H, W] image as PNG (creating the directory)."""
  from PIL import Image

  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim not in (2, 3):
    raise ValueError(f"save_png expects uint8 [H, W(, 3)], got {image.dtype} {image.shape}.")
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  Image.fromarray(image).save(path, format="PNG")


# ----------------------------------------------------------------------------
# Sample clips
# ----------------------------------------------------------------------------


def _playable(wave: np.ndarray) -> np.ndarray:
  # AAC clips hard outside [-1, 1]; do it ourselves (and drop NaN) so the
  # encoder never sees an invalid sample. No loudness normalisation: the
  # input and the reconstruction should play at the levels they have.
  return np.clip(np.nan_to_num(np.asarray(wave, np.float32)), -1.0, 1.0)


def write_samples(
  out_dir: PathLike, step: int, *, enabled: bool | None = None, **arrays_and_rates: Any
) -> dict[str, list[str]]:
  """Writes pictures and sounding clips of inputs vs reconstructions for one step.

  Into `out_dir/step_{step:07d}/`:

  * `video.png`: `video_grid(video_in, video_out)` (input rows only without
    video_out);
  * `mel.png`: `mel_grid(mel_in, mel_out)` (input rows only without mel_out);
  * per clip i, if video_in is given: `clip{i}_input.mp4` (the input frames
    with the original waveform `audio_in[i]`, or Griffin-Lim of `mel_in[i]`
    when no waveform is given, or no audio track when neither is);
  * per clip i, if video_out is given: `clip{i}_recon.mp4` (the reconstructed
    frames with Griffin-Lim of `mel_out[i]`; without mel_out, e.g. in stage 1
    which reconstructs no audio, the file has NO audio track, so nobody
    mistakes silence for a reconstruction).

  Without any video no mp4 is written (the mel picture still is). Griffin-Lim
  (denormalize with `mel_spec`, then `audio.mel_to_wave`) is a stand-in
  vocoder: its phase artefacts are not the model's.

  Args:
    out_dir: parent directory of the per-step folders.
    step: training step (names the folder).
    **arrays_and_rates: the keyword arguments of `write_sample_folder`:
    video_in, video_out: [N, T, H, W, 3], float in [-1, 1] or uint8.
    mel_in, mel_out: normalised mels [N, F, L].
    audio_in: original waveforms [N, S] in [-1, 1].
    mel_spec: the `audio.MelSpec` of the mels; needed for Griffin-Lim.
    fps: frame rate of the clips; default: T * sample_rate / S, the rate at
      which the audio spans the frames exactly (the presets' convention).
    sample_rate: audio rate; default `mel_spec.sample_rate`.
    griffin_lim_iters: Griffin-Lim iterations (default: the MelSpec's).
    wave_fn: normalised mel [F, L] -> waveform; replaces Griffin-Lim (e.g. the
      HiFi-GAN vocoder of `pretrained.configured.wave_maker`).
    enabled: whether this process writes; default: process 0 only.

  Returns:
    {'video_png': [...], 'mel_png': [...], 'input_mp4': [...],
    'recon_mp4': [...]}: the paths written, by kind ({} when disabled).
  """
  if not _is_chief(enabled):
    return {}
  return write_sample_folder(
    os.path.join(os.fspath(out_dir), f"step_{int(step):07d}"), **arrays_and_rates
  )


def write_sample_folder(
  folder: PathLike,
  *,
  video_in: Any = None,
  video_out: Any = None,
  mel_in: Any = None,
  mel_out: Any = None,
  audio_in: Any = None,
  mel_spec: Any = None,
  fps: float | None = None,
  sample_rate: int | None = None,
  griffin_lim_iters: int | None = None,
  wave_fn: Any = None,
) -> dict[str, list[str]]:
  """`write_samples` into `folder` itself (no per-step subfolder); writes on every process."""
  from avtok_jax.data import video_io

  written: dict[str, list[str]] = {"video_png": [], "mel_png": [], "input_mp4": [], "recon_mp4": []}
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)

  get = lambda x: None if x is None else np.asarray(jax.device_get(x))  # noqa: E731
  video_in, video_out = get(video_in), get(video_out)
  mel_in, mel_out, audio_in = get(mel_in), get(mel_out), get(audio_in)
  if video_in is None and video_out is not None:
    raise ValueError("write_samples: video_out was given without video_in.")
  if mel_in is None and mel_out is not None:
    raise ValueError("write_samples: mel_out was given without mel_in.")

  if video_in is not None:
    path = os.path.join(folder, "video.png")
    save_png(path, video_grid(video_in, video_out))
    written["video_png"].append(path)
  if mel_in is not None:
    path = os.path.join(folder, "mel.png")
    save_png(path, mel_grid(mel_in, mel_out))
    written["mel_png"].append(path)
  if video_in is None:
    return written

  if wave_fn is None:
    from avtok_jax.data import audio

    wave_fn = functools.partial(
      audio.normalized_mel_to_wave, spec=mel_spec, n_iter=griffin_lim_iters
    )
  if (mel_in is not None and audio_in is None) or mel_out is not None:
    if mel_spec is None:
      raise ValueError("write_samples: mel_spec is needed to turn mels into sound (Griffin-Lim).")
  if sample_rate is None and mel_spec is not None:
    sample_rate = int(mel_spec.sample_rate)
  has_audio = audio_in is not None or mel_in is not None
  if has_audio and sample_rate is None:
    raise ValueError("write_samples: give sample_rate (or mel_spec) to write audio.")
  if fps is None:
    num_samples = None
    if audio_in is not None:
      num_samples = audio_in.shape[-1]
    elif mel_in is not None:
      num_samples = mel_in.shape[-1] * int(mel_spec.hop_length)
    if num_samples is None:
      raise ValueError("write_samples: give fps (it cannot be inferred without audio).")
    fps = video_in.shape[1] * sample_rate / num_samples
  # Without audio, write_mp4 still wants a rate argument; it is unused.
  rate = int(sample_rate) if sample_rate is not None else 16000

  for i in range(video_in.shape[0]):
    if audio_in is not None:
      wave = audio_in[i]
    elif mel_in is not None:
      wave = wave_fn(mel_in[i])
    else:
      wave = None
    path = os.path.join(folder, f"clip{i}_input.mp4")
    video_io.write_mp4(
      path, to_uint8_video(video_in[i]), None if wave is None else _playable(wave), fps, rate
    )
    written["input_mp4"].append(path)
    if video_out is not None:
      wave = None if mel_out is None else wave_fn(mel_out[i])
      path = os.path.join(folder, f"clip{i}_recon.mp4")
      video_io.write_mp4(
        path, to_uint8_video(video_out[i]), None if wave is None else _playable(wave), fps, rate
      )
      written["recon_mp4"].append(path)
  return written
