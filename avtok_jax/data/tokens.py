"""Token datasets: a data set encoded once by a tokenizer, stored as array_record shards.

`python -m avtok_jax.tokenize_dataset` writes them (see there); the AR
generator trains on them through `make_token_iterator` (AVTOK.md section 5).

Layout of a token folder `DIR`:

* `DIR/tokens.json`: the metadata (`read_metadata`): which tokenizer (workdir,
  step, `tokenizer_digest`), its codebook size and tokens per clip, the class
  names, the data set, and per split the shard files, the record count and
  the input files that were skipped.
* `DIR/{split}.array_record-{i:05d}-of-{n:05d}`: the records of a split in
  their stored order (shard i holds records i * R ... (i + 1) * R - 1),
  written with `group_size:1` so that any record is read on its own.

One record = one clip [ours]: little-endian int32

  [label, video_codes (n_v), audio_codes (n_a)]

followed by the clip's source name in UTF-8 (the rest of the record). n_v and
n_a come from `tokens.json`. A fixed layout rather than a general serialiser:
no pickle, nothing to execute, and a record is one `np.frombuffer`.

Batches of `make_token_iterator` (B = batch_size // process_count):

| key           | dtype / shape    |
|---------------|------------------|
| `video_codes` | int32 [B, n_v]   |
| `audio_codes` | int32 [B, n_a]   |
| `label`       | int32 [B]        |
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags

TOKENS_FILE = "tokens.json"
FORMAT = "avtok-tokens/1"
RECORD_LAYOUT = "int32le[label, video_codes(n_v), audio_codes(n_a)] + utf8(source)"
# Random access reads one record per lookup only with one record per chunk
# group (Grain's ArrayRecordDataSource refuses other group sizes).
WRITER_OPTIONS = "group_size:1"
# [ours] 10k records per shard: about 46 MB of paper-size codes (1152 int32).
RECORDS_PER_SHARD = 10_000
# Batches each reader thread keeps ready [ours]: records are a few KB.
_PREFETCH_BATCHES = 8
# The data fields that decide what a tokenizer sees (not batch size, workers, source).
_GEOMETRY_FIELDS = (
  "preset",
  "num_frames",
  "height",
  "width",
  "crop_margin",
  "sample_rate",
  "num_samples",
  "video_patch",
  "mel_patch",
  "mel",
)


# ----------------------------------------------------------------------------- records


def shard_name(split: str, index: int, count: int) -> str:
  """File name of shard `index` of `count` of a split: `{split}.array_record-00000-of-00002`."""
  return f"{split}.array_record-{index:05d}-of-{count:05d}"


def encode_record(
  video_codes: np.ndarray, audio_codes: np.ndarray, label: int, source: str = ""
) -> bytes:
  """One record's bytes (the layout of the module docstring).

  Args:
    video_codes: int [n_v], the clip's video codes.
    audio_codes: int [n_a], its audio codes.
    label: class id.
    source: where the clip came from (file name or generator index).
  """
  values = np.concatenate(
    [np.asarray([label]), np.asarray(video_codes).reshape(-1), np.asarray(audio_codes).reshape(-1)]
  )
  if values.size and (
    values.min() < np.iinfo(np.int32).min or values.max() > np.iinfo(np.int32).max
  ):
    raise ValueError("Token record values must fit in int32.")
  return values.astype("<i4").tobytes() + str(source).encode("utf-8")


def decode_record(data: bytes, num_video_tokens: int, num_audio_tokens: int) -> dict[str, Any]:
  """A record's bytes -> {'video_codes': int32 [n_v], 'audio_codes': int32 [n_a],
  'label': int32 [], 'source': str}."""
  count = 1 + num_video_tokens + num_audio_tokens
  if len(data) < 4 * count:
    raise ValueError(
      f"A token record of {len(data)} bytes is shorter than the {4 * count} bytes of "
      f"1 + {num_video_tokens} + {num_audio_tokens} int32 values."
    )
  values = np.frombuffer(data, dtype="<i4", count=count).astype(np.int32)
  return {
    "video_codes": values[1 : 1 + num_video_tokens],
    "audio_codes": values[1 + num_video_tokens :],
    "label": values[0],
    "source": bytes(data[4 * count :]).decode("utf-8"),
  }


class TokenWriter:
  """Writes one split's records into array_record shards of `records_per_shard` records.

  Shards are written under temporary names and renamed to
  `shard_name(split, i, n)` by `close()`, when n is known. Use as a context
  manager; `close()` returns the file names (relative to `out_dir`).
  """

  def __init__(
    self, out_dir: str | os.PathLike, split: str, records_per_shard: int = RECORDS_PER_SHARD
  ):
    from array_record.python import array_record_module

    if records_per_shard < 1:
      raise ValueError(f"records_per_shard={records_per_shard} must be >= 1.")
    self._module = array_record_module
    self.out_dir = os.fspath(out_dir)
    self.split = split
    self.records_per_shard = int(records_per_shard)
    self.num_records = 0
    self._writer = None
    self._temp: list[str] = []
    self._files: list[str] | None = None
    os.makedirs(self.out_dir, exist_ok=True)

  def write(
    self, video_codes: np.ndarray, audio_codes: np.ndarray, label: int, source: str = ""
  ) -> None:
    """Appends one clip's record (see `encode_record`)."""
    if self._files is not None:
      raise ValueError(f"TokenWriter for split {self.split!r} is already closed.")
    if self.num_records % self.records_per_shard == 0:
      self._close_shard()
      path = os.path.join(self.out_dir, f".{self.split}.array_record-{len(self._temp):05d}.tmp")
      self._writer = self._module.ArrayRecordWriter(path, WRITER_OPTIONS)
      self._temp.append(path)
    self._writer.write(encode_record(video_codes, audio_codes, label, source))
    self.num_records += 1

  def _close_shard(self) -> None:
    if self._writer is not None:
      if not self._writer.ok():
        raise OSError(f"Writing {self._temp[-1]} failed.")
      self._writer.close()
      self._writer = None

  def close(self) -> list[str]:
    """Finishes the last shard and renames every shard to its final name."""
    if self._files is None:
      self._close_shard()
      n = len(self._temp)
      self._files = [shard_name(self.split, i, n) for i in range(n)]
      for temp, name in zip(self._temp, self._files, strict=True):
        os.replace(temp, os.path.join(self.out_dir, name))
    return list(self._files)

  def abort(self) -> None:
    """Closes and deletes what was written (after an error)."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    for path in self._temp:
      if os.path.exists(path):
        os.remove(path)
    self._files = []

  def __enter__(self) -> TokenWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()


# ----------------------------------------------------------------------------- metadata


def tokenizer_digest(config: ml_collections.ConfigDict) -> str:
  """A short hash of what decides a tokenizer's codes: `config.model`, modalities, data geometry.

  Batch size, workers, data source and training schedule are left out, so a
  run continued with other such settings keeps its digest. 16 hex digits of
  SHA-256 over canonical JSON.
  """
  data = config.data
  described = {
    "model": config.model.to_dict(),
    "modalities": list(config.get("modalities", ("video", "audio"))),
    "data": {k: data[k].to_dict() if k == "mel" else data[k] for k in _GEOMETRY_FIELDS},
  }
  text = json.dumps(described, sort_keys=True, default=list)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_metadata(token_dir: str | os.PathLike) -> dict[str, Any]:
  """`token_dir/tokens.json`, checked for the fields readers rely on."""
  path = os.path.join(os.fspath(token_dir), TOKENS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{token_dir} is not a token folder: it has no {TOKENS_FILE} "
      "(write one with python -m avtok_jax.tokenize_dataset)."
    )
  try:
    with open(path) as f:
      meta = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}.") from e
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    found = meta.get("format") if isinstance(meta, dict) else None
    raise ValueError(f"{path} is not a {FORMAT} token metadata file (format {found!r}).")
  missing = [
    k for k in ("num_video_tokens", "num_audio_tokens", "codebook_size", "splits") if k not in meta
  ]
  if missing:
    raise ValueError(f"{path} lacks the fields {missing}.")
  return meta


def write_metadata(token_dir: str | os.PathLike, metadata: Mapping[str, Any]) -> str:
  """Writes `token_dir/tokens.json` atomically (a reader never sees half a file); returns its path."""
  path = os.path.join(os.fspath(token_dir), TOKENS_FILE)
  temp = path + ".tmp"
  with open(temp, "w") as f:
    json.dump({"format": FORMAT, "record_layout": RECORD_LAYOUT, **metadata}, f, indent=2)
    f.write("\n")
  os.replace(temp, path)
  return path


# ----------------------------------------------------------------------------- reading


class TokenSource:
  """Random-access source over one split of a token folder (Grain `RandomAccessDataSource`).

  `source[i]` -> {'video_codes': int32 [n_v], 'audio_codes': int32 [n_a],
  'label': int32 [], 'source': str}, record i in stored order. Holds only
  plain values and Grain's ArrayRecordDataSource, so it pickles into worker
  processes.
  """

  def __init__(self, token_dir: str | os.PathLike, split: str):
    self.token_dir = os.fspath(token_dir)
    meta = read_metadata(self.token_dir)
    splits = meta["splits"]
    if split not in splits:
      raise ValueError(
        f"Token folder {self.token_dir} has the splits {sorted(splits)}, not {split!r}."
      )
    self.split = split
    self.num_video_tokens = int(meta["num_video_tokens"])
    self.num_audio_tokens = int(meta["num_audio_tokens"])
    self.codebook_size = int(meta["codebook_size"])
    info = splits[split]
    paths = [os.path.join(self.token_dir, name) for name in info["files"]]
    absent = [p for p in paths if not os.path.isfile(p)]
    if absent:
      raise FileNotFoundError(
        f"Token folder {self.token_dir} lists shards of split {split!r} that are missing: "
        f"{', '.join(os.path.basename(p) for p in absent)}."
      )
    self._len = int(info["num_records"])
    self._source = grain.sources.ArrayRecordDataSource(paths) if paths else None
    stored = len(self._source) if self._source is not None else 0
    if stored != self._len:
      raise ValueError(
        f"Token folder {self.token_dir}: split {split!r} should hold {self._len} records "
        f"({TOKENS_FILE}) but its shards hold {stored}; rewrite it."
      )

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self._len:
      raise IndexError(f"TokenSource index {index} is out of range [0, {self._len}).")
    try:
      return decode_record(self._source[index], self.num_video_tokens, self.num_audio_tokens)
    except ValueError as e:
      raise ValueError(f"{self!r}, record {index}: {e}") from e

  def __repr__(self) -> str:
    return f"TokenSource({self.token_dir!r}, split={self.split!r}, len={self._len})"


class _TrainingExample(grain.transforms.Map):
  """Drops the record's source name: a batch holds arrays only."""

  def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    return {
      "video_codes": record["video_codes"],
      "audio_codes": record["audio_codes"],
      "label": np.int32(record["label"]),
    }


def make_token_dataset(
  token_dir: str | os.PathLike,
  split: str,
  batch_size: int,
  *,
  seed: int = 0,
  shuffle: bool = True,
  num_epochs: int | None = None,
  drop_remainder: bool = True,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.IterDataset:
  """The batched Grain dataset of one split for this process (pipeline order, STYLE.md 13).

  source -> [shuffle] -> repeat(num_epochs) -> [process_index::process_count]
  -> map -> batch -> to_iter_dataset.

  Args:
    token_dir: a folder written by `avtok_jax.tokenize_dataset`.
    split: which split.
    batch_size: GLOBAL batch; each process gets batch_size // process_count.
    seed: shuffle seed in [0, 2**32); each epoch is a new permutation.
    shuffle: shuffle the records (False: stored order).
    num_epochs: passes over the split; None = forever.
    drop_remainder: drop a last partial batch (only happens with num_epochs).
    process_index, process_count: default `jax.process_index()` / `jax.process_count()`.
  """
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count}).")
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(
      f"batch_size={batch_size} must be positive and divisible by process_count={process_count}: "
      "every process loads batch_size // process_count records."
    )
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs={num_epochs} must be >= 1 (or None = forever).")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed={seed} must be in [0, 2**32).")
  # Grain reads absl flags, which raise unless parsed; outside `app.run` mark them parsed.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

  source = TokenSource(token_dir, split)
  if len(source) == 0:
    raise ValueError(f"Split {split!r} of token folder {token_dir} is empty.")
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  if num_epochs is not None:
    # Every process gets the same number of records (and so of batches).
    ds = ds[: len(ds) // process_count * process_count]
  ds = ds[process_index::process_count]
  ds = ds.map(_TrainingExample())
  ds = ds.batch(batch_size // process_count, drop_remainder=drop_remainder)
  read_options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=_PREFETCH_BATCHES)
  return ds.to_iter_dataset(read_options)


def make_token_iterator(
  token_dir: str | os.PathLike,
  split: str,
  batch_size: int,
  *,
  seed: int = 0,
  shuffle: bool = True,
  num_epochs: int | None = None,
  drop_remainder: bool = True,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.DatasetIterator:
  """`iter(make_token_dataset(...))`: a checkpointable iterator (`get_state()` / `set_state()`).

  Yields {'video_codes': int32 [B, n_v], 'audio_codes': int32 [B, n_a],
  'label': int32 [B]} with B = batch_size // process_count; turn them into
  global arrays with `pipeline.to_global_array`.
  """
  return iter(
    make_token_dataset(
      token_dir,
      split,
      batch_size,
      seed=seed,
      shuffle=shuffle,
      num_epochs=num_epochs,
      drop_remainder=drop_remainder,
      process_index=process_index,
      process_count=process_count,
    )
  )
