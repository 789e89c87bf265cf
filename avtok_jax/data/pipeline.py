"""Grain input pipeline: clip records -> patchified, normalised batches.

Order (STYLE.md practice 13, after flax `examples/gemma/input_pipeline_grain.py`):

  MapDataset.source -> shuffle -> repeat -> random_map(preprocess)
    -> ProcessBlocks (this process' block of each global batch) -> batch
    -> to_iter_dataset -> mp_prefetch

Training shuffles (one global permutation per epoch, reseeded each epoch),
repeats forever and drops nothing but the shard's remainder at the end of the
index space. Evaluation reads each example once, in stored order, padded with
masked copies of example 0 up to a multiple of the global batch, so that every
process gets the same number of full batches (`mask` marks the real ones).

Per-example randomness (crop offsets, flips) comes from the generator Grain
derives from the seed and the example's global position, so the batches do
not depend on the number of processes, and a restored
iterator state (`get_state()` / `set_state()`) continues with exactly the
batches an uninterrupted run would have produced. The batches do not depend
on `num_workers` either, except that the log-mel may differ in the last float
bits (workers run BLAS on one thread, the main process may use several).

Output batch (B = batch_size // process_count):

| key             | train | eval | dtype / shape                                           |
|-----------------|-------|------|---------------------------------------------------------|
| `video_patches` | yes   | yes  | [B, N_v, pt*ph*pw*3], uint8 or float32 in [-1, 1]       |
| `mel_patches`   | yes   | yes  | float32 [B, N_a, pf*pl], normalised log-mel (~[-1, 1])  |
| `label`         | yes   | yes  | int32 [B]                                               |
| `audio`         |       | yes  | float32 [B, num_samples], the waveform in [-1, 1]       |
| `mask`          |       | yes  | bool [B], False for padding examples                    |

A training pipeline can be asked for fewer keys (`keys=`, e.g.
`train_keys(("video",))` for a video-only stage): what is not asked for is
not computed (stage 1 skips the log-mel, ~1 ms a clip, and the built-in
generator does not render the sound, ~2 ms a clip of the small preset).

Token orders are those of `patches.py`.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from avtok_jax import config_lib
from avtok_jax.data import audio as audio_lib
from avtok_jax.data import patches
from avtok_jax.data import tfds as builders  # also registers the builders with TFDS
from avtok_jax.data.tfds import common, synthetic_av

TFDS_PREFIX = "tfds:"
# Batches each reader keeps ready (Grain's default is 500 elements, which for
# paper-size batches would hold gigabytes per worker).
_PREFETCH_BATCHES = 2


class SyntheticSource:
  """Random-access source over the built-in generator (records as `synthetic_av` stores them).

  Index i of a split is generator clip (split_seed, i): the same clip that
  `synthetic_av` writes for that index, so in-memory and TFDS runs see the
  same data. audio=False: silent records (the sound is not rendered), for a
  pipeline that does not read it (`train_keys` without 'mel_patches').
  """

  def __init__(self, data_config: ml_collections.ConfigDict, split: str, audio: bool = True):
    if split == data_config.train_split:
      self._len = int(data_config.num_train_examples)
    elif split == data_config.eval_split:
      self._len = int(data_config.num_eval_examples)
    else:
      raise ValueError(
        f"The 'synthetic' source has the splits {data_config.train_split!r} and "
        f"{data_config.eval_split!r}, not {split!r}."
      )
    self._spec = synthetic_av.generator_spec(data_config)
    self._seed = synthetic_av.split_seed(data_config, split)
    self._split = split
    self._audio = audio

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self._len:
      raise IndexError(f"SyntheticSource index {index} is out of range [0, {self._len}).")
    return synthetic_av.make_record(self._spec, self._seed, index, audio=self._audio)

  def __repr__(self) -> str:
    return (
      f"SyntheticSource(split={self._split!r}, seed={self._seed}, len={self._len}, "
      f"audio={self._audio})"
    )


class _PaddedSource:
  """Pads a source with masked copies of example 0 up to `length` examples."""

  def __init__(self, source, length: int):
    self._source = source
    self._n = len(source)
    self._length = length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    record = dict(self._source[index if index < self._n else 0])
    record["mask"] = index < self._n
    return record

  def __repr__(self) -> str:
    return f"_PaddedSource({self._source!r}, length={self._length})"


def make_source(data_config: ml_collections.ConfigDict, split: str, audio: bool = True) -> Any:
  """The random-access source of `data_config.source` for one split.

  'synthetic' -> SyntheticSource (audio=False: silent, not rendered);
  'tfds:synthetic_av' / 'tfds:av_folder' ->
  `tfds.data_source('{name}/{preset}', split, data_dir=data_config.data_dir)`.
  """
  source = data_config.source
  if source == "synthetic":
    return SyntheticSource(data_config, split, audio=audio)
  if not source.startswith(TFDS_PREFIX):
    raise ValueError(
      f"Unknown data source {source!r}: use 'synthetic', 'tfds:synthetic_av' or 'tfds:av_folder'."
    )
  name = source[len(TFDS_PREFIX) :]
  if name not in builders.BUILDERS:
    raise ValueError(
      f"Unknown TFDS data set {name!r} in source={source!r}; known: {sorted(builders.BUILDERS)}."
    )
  if not data_config.data_dir:
    raise ValueError(f"source={source!r} needs data_dir (where `avtok_jax.data.prepare` wrote it).")
  full_name = f"{name}/{data_config.preset}"
  builder = tfds.builder(full_name, data_dir=data_config.data_dir)
  if not builder.is_prepared():
    raise ValueError(
      f"No prepared {full_name} data set under data_dir={data_config.data_dir!r} (looked in "
      f"{builder.data_dir}). Build it first: python -m avtok_jax.data.prepare "
      f"--source={name} --preset={data_config.preset} --data_dir={data_config.data_dir} ..."
    )
  if split not in builder.info.splits:
    raise ValueError(
      f"{full_name} in {builder.data_dir} has the splits {sorted(builder.info.splits)}, "
      f"not {split!r}."
    )
  stored = tuple(builder.info.features["video"].shape)
  hs, ws = config_lib.stored_frame_size(data_config)
  expected = (data_config.num_frames, hs, ws, 3)
  if stored != expected:
    raise ValueError(
      f"{full_name} in {builder.data_dir} stores video {stored}, but the data config expects "
      f"{expected} (num_frames, height + crop_margin, width + crop_margin, 3)."
    )
  return tfds.data_source(full_name, split=split, data_dir=data_config.data_dir, download=False)


TRAIN_KEYS = ("video_patches", "mel_patches", "label")


def train_keys(modalities) -> tuple[str, ...]:
  """The training batch keys a stage training `modalities` reads (the label always)."""
  unknown = set(modalities) - {"video", "audio"}
  if unknown:
    raise ValueError(f"Unknown modalities {sorted(unknown)}: use 'video' and/or 'audio'.")
  wanted = {"video_patches": "video" in modalities, "mel_patches": "audio" in modalities}
  return tuple(k for k in TRAIN_KEYS if wanted.get(k, True))


class Preprocess(grain.transforms.RandomMap):
  """One record -> model inputs: crop (+ flip), log-mel, patchify.

  `keys` (training only): the subset of TRAIN_KEYS to produce (default all);
  the others are not computed. Holds only plain values (it is pickled into
  every worker process).
  """

  def __init__(self, data_config: ml_collections.ConfigDict, *, train: bool, keys=None):
    c = data_config
    self.train = train
    if keys is None:
      keys = TRAIN_KEYS
    elif not train:
      raise ValueError("keys= selects training outputs; evaluation batches always have all keys.")
    elif not keys or set(keys) - set(TRAIN_KEYS):
      raise ValueError(f"keys={tuple(keys)} must be a non-empty subset of {TRAIN_KEYS}.")
    self.keys = tuple(k for k in TRAIN_KEYS if k in keys)
    self.num_frames, self.height, self.width = int(c.num_frames), int(c.height), int(c.width)
    self.stored_height, self.stored_width = config_lib.stored_frame_size(c)
    self.num_samples = int(c.num_samples)
    self.video_patch = tuple(int(p) for p in c.video_patch)
    self.mel_patch = tuple(int(p) for p in c.mel_patch)
    self.mel_spec = audio_lib.MelSpec.from_config(c)
    self.random_crop = train and bool(c.random_crop)
    self.random_flip = train and bool(c.random_flip)
    self.float_video = c.video_dtype == "float32"

  def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    video, wave = record["video"], record["audio"]
    expected = (self.num_frames, self.stored_height, self.stored_width, 3)
    if video.shape != expected or wave.shape != (self.num_samples,):
      raise ValueError(
        f"Record {_source_name(record)} has video {video.shape} and audio {wave.shape}, but "
        f"the data config expects {expected} and ({self.num_samples},); rebuild the data set "
        "for this config."
      )
    dy, dx = self.stored_height - self.height, self.stored_width - self.width
    if self.random_crop:
      y0, x0 = int(rng.integers(0, dy + 1)), int(rng.integers(0, dx + 1))
    else:
      y0, x0 = dy // 2, dx // 2
    video = video[:, y0 : y0 + self.height, x0 : x0 + self.width]
    if self.random_flip and rng.random() < 0.5:
      video = video[:, :, ::-1]
    out = {}
    if "video_patches" in self.keys:
      video_patches = patches.patchify_video(video, self.video_patch)
      if self.float_video:
        video_patches = video_patches.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1)
      out["video_patches"] = np.ascontiguousarray(video_patches)
    if "mel_patches" in self.keys:
      wave = common.audio_from_int16(wave)
      mel = audio_lib.mel_features(wave, self.mel_spec)
      out["mel_patches"] = np.ascontiguousarray(
        patches.patchify_mel(mel, self.mel_patch), np.float32
      )
    out["label"] = np.int32(record["label"])
    if not self.train:
      out["audio"] = wave
      out["mask"] = np.bool_(record.get("mask", True))
    return out


def make_dataset(
  data_config: ml_collections.ConfigDict,
  split: str,
  *,
  train: bool,
  seed: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  keys=None,
) -> grain.IterDataset:
  """The batched Grain dataset of one split for this process (see the module docstring).

  `keys`: the training batch's keys (`train_keys(modalities)`), default all.
  """
  config_lib.check_data_config(data_config)
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count}).")
  if data_config.batch_size % process_count:
    raise ValueError(
      f"batch_size={data_config.batch_size} is not divisible by process_count={process_count}: "
      "every process loads batch_size // process_count examples."
    )
  local_batch = data_config.batch_size // process_count
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed={seed} must be in [0, 2**32).")
  _ensure_flags_parsed()

  preprocess = Preprocess(data_config, train=train, keys=keys)
  # Evaluation always reads the sound (its keys are all of TRAIN_KEYS).
  source = make_source(data_config, split, audio="mel_patches" in preprocess.keys)
  if len(source) == 0:
    raise ValueError(f"Split {split!r} of source {data_config.source!r} is empty.")
  if not train:
    global_batch = data_config.batch_size
    source = _PaddedSource(source, math.ceil(len(source) / global_batch) * global_batch)
  ds = grain.MapDataset.source(source)
  if train:
    if data_config.shuffle:
      ds = ds.shuffle(seed=seed)
    ds = ds.repeat(None)
  # The random map sees the global stream, so an example's crop and flip
  # depend on its global position only (not on which process reads it); then
  # each process takes its contiguous block of every global batch.
  map_seed = int(np.random.SeedSequence([seed, 0, 1]).generate_state(1)[0])
  ds = ds.random_map(preprocess, seed=map_seed)
  ds = ProcessBlocks(ds, local_batch, process_index, process_count)
  ds = ds.batch(local_batch, drop_remainder=train)
  read_options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=_PREFETCH_BATCHES)
  ds = ds.to_iter_dataset(read_options)
  if data_config.num_workers > 0:
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=int(data_config.num_workers),
        per_worker_buffer_size=int(data_config.worker_buffer_size),
      ),
      worker_init_fn=_init_worker,
    )
  return ds


class ProcessBlocks(grain.MapDataset):
  """This process' share of every global batch: a contiguous block of `block` examples.

  Global batch b holds examples [b * G, (b + 1) * G) with G = block * count;
  process p reads [b * G + p * block, b * G + (p + 1) * block). With
  `jax.make_array_from_process_local_data` (process p's devices hold rows
  p * block ..) the global batch is then the same array, in the same row
  order, whatever the number of processes: a 2-host run sees exactly the
  batches of a 1-host run (tested in tests/test_multiprocess.py). Only whole
  global batches are kept (train streams are infinite; eval sources are
  padded to whole batches first).
  """

  def __init__(self, parent: grain.MapDataset, block: int, index: int, count: int):
    super().__init__(parent)
    if block < 1 or not 0 <= index < count:
      raise ValueError(f"ProcessBlocks: block={block}, index={index}, count={count} do not fit.")
    self._block, self._index, self._count = block, index, count
    self._length = len(parent) // (block * count) * block

  def __len__(self) -> int:
    return self._length

  def _parent_index(self, index: int) -> int:
    batch, offset = divmod(index, self._block)
    return (batch * self._count + self._index) * self._block + offset

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._parent_index(index)]

  def __str__(self) -> str:
    return f"ProcessBlocks(block={self._block}, process={self._index} of {self._count})"


def make_iterator(
  data_config: ml_collections.ConfigDict,
  split: str,
  *,
  train: bool,
  seed: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  keys=None,
) -> grain.DatasetIterator:
  """`iter(make_dataset(...))`: a checkpointable iterator (`get_state()` / `set_state()`)."""
  ds = make_dataset(
    data_config,
    split,
    train=train,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    keys=keys,
  )
  return iter(ds)


def to_global_array(local_batch: Any, sharding: Any) -> Any:
  """Per-process batches -> global jax.Arrays (`jax.make_array_from_process_local_data`).

  `sharding` is one `jax.sharding.Sharding` for every leaf (the leading axis
  is the batch axis) or a pytree of shardings matching `local_batch`.
  """
  import jax

  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
  return jax.tree.map(jax.make_array_from_process_local_data, sharding, local_batch)


def _source_name(record: dict[str, Any]) -> str:
  source = record.get("source", b"?")
  return source.decode() if isinstance(source, bytes) else str(source)


def _ensure_flags_parsed() -> None:
  """Grain reads absl flags, which raise unless parsed; outside `app.run` mark them parsed."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _init_worker(worker_index: int, worker_count: int) -> None:
  """Runs in each Grain worker process before it reads data.

  One BLAS thread per worker: the workers already use every core, and on a
  small machine OpenBLAS's own threads make the mel filter-bank matmul 20-40x
  slower (measured: 24 ms vs 0.6 ms for 80x513 @ 513x384 on 2 cores).
  """
  del worker_index, worker_count
  # threadpoolctl comes with librosa (through scikit-learn).
  import threadpoolctl

  threadpoolctl.threadpool_limits(limits=1)


def _flag_values() -> flags.FlagValues:
  # A private FlagValues: the trainer imports this module and owns the global flags.
  fv = flags.FlagValues()
  flags.DEFINE_enum(
    "preset", "paper", list(config_lib.DATA_PRESETS), "Data size preset.", flag_values=fv
  )
  flags.DEFINE_string(
    "source", "synthetic", "'synthetic', 'tfds:synthetic_av' or 'tfds:av_folder'.", flag_values=fv
  )
  flags.DEFINE_string("data_dir", "", "TFDS data dir (for tfds: sources).", flag_values=fv)
  flags.DEFINE_string("split", "train", "Split to read.", flag_values=fv)
  flags.DEFINE_bool("eval", False, "Eval mode (centre crop, waveform, mask).", flag_values=fv)
  flags.DEFINE_integer("num_batches", 8, "Batches to stream.", flag_values=fv)
  flags.DEFINE_integer("batch_size", None, "Global batch size (default: config).", flag_values=fv)
  flags.DEFINE_integer("num_workers", None, "Worker processes (default: config).", flag_values=fv)
  return fv


def main(argv: list[str] | None = None) -> int:
  """Streams a few batches and prints their layout and the throughput."""
  import sys
  import time

  fv = _flag_values()
  fv(list(sys.argv if argv is None else argv))
  c = config_lib.data_config(fv.preset)
  c.source, c.data_dir = fv.source, fv.data_dir
  if fv.batch_size is not None:
    c.batch_size = fv.batch_size
  if fv.num_workers is not None:
    c.num_workers = fv.num_workers
  it = make_iterator(c, fv.split, train=not fv.eval, process_index=0, process_count=1)
  start = time.perf_counter()
  seen = 0
  for i, batch in enumerate(itertools.islice(it, fv.num_batches)):
    if i == 0:
      first = time.perf_counter() - start
      for key, value in sorted(batch.items()):
        print(
          f"{key:>14}: {str(value.dtype):>7} {tuple(value.shape)}  "
          f"range [{value.min():.3f}, {value.max():.3f}]"
        )
      start = time.perf_counter()
    else:
      seen += len(batch["label"])
  rate = seen / max(time.perf_counter() - start, 1e-9)
  print(
    f"{fv.num_batches} batches of {c.batch_size} from {c.source} ({fv.split}, preset "
    f"{fv.preset}, {c.num_workers} workers): first batch after {first:.1f} s, then "
    f"{rate:.1f} clips/s"
  )
  if hasattr(it, "close"):
    it.close()
  return 0


if __name__ == "__main__":
  import sys

  # Run the importable module's main, not this __main__ copy: Grain pickles the
  # transforms by module name for its worker processes.
  from avtok_jax.data import pipeline as _pipeline

  sys.exit(_pipeline.main())
