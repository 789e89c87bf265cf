r"""Encode a data set once with a trained tokenizer into a token folder (array_record shards).

  python -m avtok_jax.tokenize_dataset --workdir=TOKENIZER_DIR --out=DIR \
      [--data=synthetic|config|av_folder:PATH] [--split=train] [--num_clips=N] \
      [--step=S] [--batch_size=B]

Writes `DIR/{split}.array_record-{i:05d}-of-{n:05d}` and (creates or updates)
`DIR/tokens.json`; the record layout and the reader are in
`avtok_jax/data/tokens.py`. Run it once per split into the same DIR; a DIR
that holds tokens of another tokenizer (or step) is refused.

* `--data` as in `avtok_jax.evaluate`: 'synthetic' (the built-in generator
  at the tokenizer's preset), 'config' (the run's own data config) or
  'av_folder:PATH' (every video file under PATH, built into a temporary TFDS
  set first; files that cannot be used are skipped, printed and listed in
  tokens.json).
* Clips are encoded in eval mode (centre crop, argmax codes, no prior),
  preprocessed exactly as evaluation preprocesses them, in stored order.
* Batches are split over every local device (a 'data' mesh axis, the
  tokenizer replicated); the last batch is padded with copies of its last clip
  and the padding is dropped, so every clip is written, once.

Runs on one host (process); with several processes only process 0 writes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import grain
import jax
import ml_collections
import numpy as np
import tqdm
from absl import flags

from avtok_jax import reporting, sharding
from avtok_jax import tokenize as tokenize_lib
from avtok_jax.data import pipeline, synthetic, tokens
from avtok_jax.data.tfds import common

# Clips preprocessed ahead of the device by Grain's reader threads [ours].
_READ_THREADS = 2
_PREFETCH_CLIPS = 64


@dataclasses.dataclass
class Options:
  """What to encode; the flags of the command line.

  Attributes:
    data: 'synthetic' | 'config' | 'av_folder:PATH' (see the module docstring).
    split: split to encode (the data config's names: 'train' / 'test').
    num_clips: clips to encode from the start of the split; 0 = all of it.
    step: checkpoint step; None = the latest.
    batch_size: clips per encoder call; 0 = the run's batch size. Rounded up
      to a multiple of the local device count.
    records_per_shard: records per array_record file.
  """

  data: str = "synthetic"
  split: str = "train"
  num_clips: int = 0
  step: int | None = None
  batch_size: int = 0
  records_per_shard: int = tokens.RECORDS_PER_SHARD


# ----------------------------------------------------------------------------- data


def _data(
  config: ml_collections.ConfigDict, options: Options, scratch: str
) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """(data config, info) of `options.data` (`evaluate.eval_data`; may build a TFDS set in scratch)."""
  from avtok_jax.evaluation import evaluate

  data_config, _, info = evaluate.eval_data(config, options.data, options.num_clips, scratch)
  if options.data == "synthetic":
    where = f"built-in generator ({data_config.preset})"
  elif options.data == "config":
    where = data_config.source + (f" in {data_config.data_dir}" if data_config.data_dir else "")
  else:
    where = f"video files under {options.data.split(':', 1)[1]}"
  info["description"] = f"{where}, {options.split} split"
  return data_config, info


def _class_names(data_config: ml_collections.ConfigDict) -> list[str]:
  if data_config.source == "synthetic":
    return list(synthetic.class_names(int(data_config.num_classes)))
  import tensorflow_datasets as tfds

  name = data_config.source[len(pipeline.TFDS_PREFIX) :]
  builder = tfds.builder(f"{name}/{data_config.preset}", data_dir=data_config.data_dir)
  return list(builder.info.features["label"].names)


def _skipped(data_config: ml_collections.ConfigDict, info: dict[str, Any], split: str) -> list:
  """'file: reason' of the input files the data set builder skipped (for this split)."""
  if "data_build" in info:  # av_folder:PATH, built just now (every split of the folder)
    return list(info["data_build"].get("skipped", []))
  if data_config.source.startswith(pipeline.TFDS_PREFIX):
    import tensorflow_datasets as tfds

    name = data_config.source[len(pipeline.TFDS_PREFIX) :]
    builder = tfds.builder(f"{name}/{data_config.preset}", data_dir=data_config.data_dir)
    try:
      report = common.read_report(builder.data_dir)
    except (OSError, ValueError):
      return []
    return [
      f"{s['file']}: {s['reason']}"
      for s in report.get("skipped", [])
      if s.get("split", split) == split
    ]
  return []


class _EncoderInput(grain.transforms.Map):
  """Record -> eval-mode model inputs + label + source name (pipeline.Preprocess, eval)."""

  def __init__(self, data_config: ml_collections.ConfigDict):
    self.preprocess = pipeline.Preprocess(data_config, train=False)

  def map(self, record: dict[str, Any]) -> dict[str, Any]:
    # Eval mode draws nothing from the generator (centre crop, no flip).
    out = self.preprocess.random_map(record, np.random.default_rng(0))
    source = record.get("source", b"")
    return {
      "video_patches": out["video_patches"],
      "mel_patches": out["mel_patches"],
      "label": int(out["label"]),
      "source": source.decode() if isinstance(source, bytes) else str(source),
    }


def _clips(
  data_config: ml_collections.ConfigDict, split: str, num_clips: int
) -> tuple[int, Iterator[dict[str, Any]]]:
  """(number of clips, iterator over them in stored order)."""
  source = pipeline.make_source(data_config, split)
  n = len(source) if num_clips <= 0 else min(num_clips, len(source))
  if n == 0:
    raise ValueError(f"Split {split!r} of {data_config.source!r} is empty.")
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # Grain reads absl flags, which raise unless parsed
  ds = grain.MapDataset.source(source)[:n].map(_EncoderInput(data_config))
  read = grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_CLIPS)
  return n, iter(ds.to_iter_dataset(read))


def _batches(clips: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
  batch = []
  for clip in clips:
    batch.append(clip)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


# ----------------------------------------------------------------------------- model


def make_sharded_encoder(tok: tokenize_lib.Tokenizer, devices=None):
  """(encode, batch_sharding): argmax codes of batches split over `devices` (default: local).

  encode(video_patches [B, N_v, P_v], mel_patches [B, N_a, P_a]) (host
  arrays, B a multiple of the device count) -> {'video': int32 [B, n_v],
  'audio': int32 [B, n_a]} as jax.Arrays, dispatched asynchronously. The
  tokenizer is replicated; the batch is split over the mesh's 'data' axis
  (the trainer's logical rules map 'batch' onto it).
  """
  devices = list(jax.local_devices() if devices is None else devices)
  mesh = sharding.make_mesh({"data": -1}, devices)
  rules = sharding.LOGICAL_AXIS_RULES
  batch_sharding = jax.sharding.NamedSharding(mesh, sharding.logical_spec(("batch",)))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  variables = jax.device_put(tok.variables, replicated)
  encode = jax.jit(
    tok.encode_fn, in_shardings=(replicated, batch_sharding, batch_sharding), out_shardings=None
  )

  def run(video_patches: np.ndarray, mel_patches: np.ndarray):
    if video_patches.shape[0] % len(devices):
      raise ValueError(
        f"Batch of {video_patches.shape[0]} is not divisible by {len(devices)} devices."
      )
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      codes = encode(
        variables,
        jax.device_put(video_patches, batch_sharding),
        jax.device_put(mel_patches, batch_sharding),
      )
    return codes

  return run, batch_sharding


def _pad(x: np.ndarray, size: int) -> np.ndarray:
  """Pads axis 0 to `size` with copies of the last row."""
  return x if len(x) == size else np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


# ----------------------------------------------------------------------------- run


def _metadata_base(tok: tokenize_lib.Tokenizer, data_config, info, class_names):
  c = tok.config
  return {
    "format": tokens.FORMAT,
    "record_layout": tokens.RECORD_LAYOUT,
    "tokenizer_workdir": tok.workdir,
    "step": tok.step,
    "tokenizer_digest": tok.digest,
    "stage": c.get("stage", "?"),
    "size": c.get("size", "?"),
    "codebook_size": tok.codebook_size,
    "num_video_tokens": tok.num_video_tokens,
    "num_audio_tokens": tok.num_audio_tokens,
    "num_classes": len(class_names),
    "class_names": class_names,
    "data": info["data"],
    "data_preset": data_config.preset,
    "data_source": data_config.source,
  }


def _check_existing(out_dir: str, base: dict[str, Any]) -> dict[str, Any]:
  """The splits already in `out_dir` (if its tokens come from the same tokenizer and data)."""
  if not os.path.isfile(os.path.join(out_dir, tokens.TOKENS_FILE)):
    return {}
  old = tokens.read_metadata(out_dir)
  for key in ("tokenizer_workdir", "step", "tokenizer_digest", "data", "num_classes"):
    if old.get(key) != base[key]:
      raise ValueError(
        f"{out_dir} already holds tokens with {key}={old.get(key)!r}, not {base[key]!r}; "
        "write to another --out (or delete it)."
      )
  return dict(old["splits"])


def run(workdir: str, out_dir: str, options: Options | None = None) -> dict[str, Any]:
  """Encodes `options.split` of `options.data` into `out_dir`; returns the metadata written."""
  options = options or Options()
  if options.num_clips < 0:
    raise ValueError(f"num_clips={options.num_clips} must be >= 0 (0 = the whole split).")
  if options.batch_size < 0:
    raise ValueError(f"batch_size={options.batch_size} must be >= 0 (0 = the run's).")
  if not options.split or "/" in options.split or options.split.startswith("."):
    raise ValueError(f"split={options.split!r} is not a split name.")
  started = time.perf_counter()
  tok = tokenize_lib.load_tokenizer(workdir, options.step)
  out_dir = os.path.abspath(out_dir)
  is_main = jax.process_index() == 0
  encode, _ = make_sharded_encoder(tok)
  devices = jax.local_device_count()
  batch = options.batch_size or int(tok.data_config.batch_size)
  batch = math.ceil(batch / devices) * devices

  with tempfile.TemporaryDirectory(prefix="avtok_tokens_data_") as scratch:
    data_config, info = _data(tok.config, options, scratch)
    class_names = _class_names(data_config)
    skipped = _skipped(data_config, info, options.split)
    base = _metadata_base(tok, data_config, info, class_names)
    splits = _check_existing(out_dir, base)
    num, clips = _clips(data_config, options.split, options.num_clips)
    os.makedirs(out_dir, exist_ok=True)
    old_files = splits.pop(options.split, {}).get("files", [])

    used = np.zeros(tok.codebook_size, bool)
    writer = tokens.TokenWriter(out_dir, options.split, options.records_per_shard)
    progress = tqdm.tqdm(
      total=num, desc=f"tokenize {options.split}", unit="clip", disable=not is_main
    )
    pending = None  # the previous batch: its codes are fetched after the next is dispatched

    def finish(item) -> None:
      codes, chunk = item
      video_codes, audio_codes = (
        np.asarray(x, np.int32) for x in jax.device_get((codes["video"], codes["audio"]))
      )
      for i, clip in enumerate(chunk):  # padding rows (i >= len(chunk)) are dropped
        if is_main:
          writer.write(video_codes[i], audio_codes[i], clip["label"], clip["source"])
        used[video_codes[i]] = used[audio_codes[i]] = True
      progress.update(len(chunk))

    try:
      for chunk in _batches(clips, batch):
        video = _pad(np.stack([c["video_patches"] for c in chunk]), batch)
        mel = _pad(np.stack([c["mel_patches"] for c in chunk]), batch)
        codes = encode(video, mel)
        if pending is not None:
          finish(pending)
        pending = (codes, chunk)
      if pending is not None:
        finish(pending)
    except BaseException:
      writer.abort()
      raise
    finally:
      progress.close()
    files = writer.close() if is_main else []
    for name in set(old_files) - set(files):  # a rewritten split with fewer shards
      if is_main and os.path.exists(os.path.join(out_dir, name)):
        os.remove(os.path.join(out_dir, name))

  written = writer.num_records if is_main else num
  if written != num:
    raise RuntimeError(f"Wrote {written} records but the split has {num} clips.")
  splits[options.split] = {
    "num_records": written,
    "files": files,
    "description": info["description"],
    "skipped": skipped,
  }
  metadata = dict(base, splits=dict(sorted(splits.items())))
  if is_main:
    tokens.write_metadata(out_dir, metadata)

  seconds = time.perf_counter() - started
  if skipped:
    print(f"Skipped {len(skipped)} input file(s):")
    for line in skipped:
      print(f"  {line}")
  print(
    f"Tokenized {written} clips ({info['description']}) with {tok.workdir} step {tok.step} on "
    f"{devices} {jax.devices()[0].platform} device(s) in {seconds:.1f} s "
    f"({written / max(seconds, 1e-9):.1f} clips/s with loading and compilation): "
    f"{tok.num_video_tokens} + {tok.num_audio_tokens} tokens per clip, {int(used.sum())} of "
    f"{tok.codebook_size} codes used, {len(skipped)} file(s) skipped -> "
    f"{out_dir}/{options.split}.array_record-*-of-{len(files):05d}, {tokens.TOKENS_FILE}"
  )
  return metadata


# ----------------------------------------------------------------------------- command line


def _flag_values():
  # A private FlagValues per call: `main` can run several times in one process (tests).
  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "Tokenizer training workdir.", flag_values=fv)
  flags.DEFINE_string("out", None, "Token folder to write.", flag_values=fv)
  flags.DEFINE_string(
    "data",
    "synthetic",
    "synthetic | config | av_folder:PATH (a folder of video files).",
    flag_values=fv,
  )
  flags.DEFINE_string("split", "train", "Split to encode.", flag_values=fv)
  flags.DEFINE_integer("num_clips", 0, "Clips to encode; 0 = the whole split.", flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.", flag_values=fv)
  flags.DEFINE_integer("batch_size", 0, "Clips per encoder call; 0 = the run's.", flag_values=fv)
  flags.DEFINE_integer(
    "records_per_shard", tokens.RECORDS_PER_SHARD, "Records per array_record file.", flag_values=fv
  )
  return fv


def main(argv: list[str] | None = None) -> int:
  """The command line; errors become one line on stderr and exit status 1 (SystemExit)."""
  fv = _flag_values()
  try:
    rest = fv(list(sys.argv if argv is None else argv))
  except flags.Error as e:
    raise SystemExit(f"avtok_jax.tokenize_dataset: {e}") from e
  if len(rest) > 1:
    raise SystemExit(f"avtok_jax.tokenize_dataset: unexpected arguments {rest[1:]}.")
  absent = [f"--{k}" for k in ("workdir", "out") if not fv[k].value]
  if absent:
    raise SystemExit(f"avtok_jax.tokenize_dataset: give {', '.join(absent)}.")
  reporting.quiet_library_logs()
  logging.getLogger("absl").setLevel(logging.WARNING)
  options = Options(
    data=fv.data,
    split=fv.split,
    num_clips=fv.num_clips,
    step=fv.step,
    batch_size=fv.batch_size,
    records_per_shard=fv.records_per_shard,
  )
  try:
    run(fv.workdir, fv.out, options)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"avtok_jax.tokenize_dataset: {e}") from e
  return 0


if __name__ == "__main__":
  # Run the importable module's main, not this __main__ copy (Grain transforms
  # are looked up by module name).
  from avtok_jax import tokenize_dataset as _tokenize_dataset

  sys.exit(_tokenize_dataset.main())
