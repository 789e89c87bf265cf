r"""Input-pipeline throughput at the paper clip size (16x128x128, 98,304 samples @ 22,050 Hz).

  python bench/data_pipeline.py                      # builds 256 clips in a temp dir
  python bench/data_pipeline.py --data_dir=/data/avtok --preset=paper

Prints clips/s for (a) the built-in generator alone, (b) building the
array_record data set, and (c) the Grain pipeline (read, crop/flip, log-mel,
patchify, batch) in-process and with 1 and 2 worker processes, each after a
warm-up (worker start-up and first batches are not counted). Target on a
2-core machine: >= 50 clips/s with 2 workers.
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import tempfile
import time

from absl import app, flags

_DATA_DIR = flags.DEFINE_string(
  "data_dir", "", "An existing data dir with synthetic_av/<preset>; default: build one."
)
_PRESET = flags.DEFINE_enum("preset", "paper", ["tiny", "small", "paper"], "Clip size.")
_NUM_CLIPS = flags.DEFINE_integer("num_clips", 256, "Train clips to build when no --data_dir.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Batch size.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "Worker process counts to measure.")
_WARMUP = flags.DEFINE_integer("warmup_batches", 4, "Batches before timing starts.")
_BATCHES = flags.DEFINE_integer("batches", 40, "Timed batches per setting.")
_GENERATOR_CLIPS = flags.DEFINE_integer("generator_clips", 32, "Clips timed for the generator.")


def _time_generator(data_config, n: int) -> float:
  from avtok_jax.data import synthetic
  from avtok_jax.data.tfds import synthetic_av

  spec = synthetic_av.generator_spec(data_config)
  synthetic.generate(spec, 0, 0)  # warm-up (caches, first-call costs)
  start = time.perf_counter()
  for i in range(n):
    synthetic.generate(spec, 0, 1 + i)
  return n / (time.perf_counter() - start)


def _build(data_dir: str, preset: str, num: int) -> float:
  import tensorflow_datasets as tfds

  from avtok_jax.data import prepare

  tfds.disable_progress_bar()
  start = time.perf_counter()
  prepare.prepare("synthetic_av", data_dir, preset=preset, num=num, num_test=8)
  return num / (time.perf_counter() - start)


def _time_pipeline(data_config, warmup: int, batches: int) -> tuple[float, float]:
  """(clips/s after warm-up, seconds to the first batch)."""
  from avtok_jax.data import pipeline

  start = time.perf_counter()
  it = pipeline.make_iterator(data_config, "train", train=True, process_index=0, process_count=1)
  next(it)
  first = time.perf_counter() - start
  for _ in range(warmup - 1):
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  rate = batches * data_config.batch_size / (time.perf_counter() - start)
  if hasattr(it, "close"):
    it.close()
  return rate, first


def main(argv):
  del argv
  from avtok_jax import config_lib

  preset = _PRESET.value
  c = config_lib.data_config(preset)
  hs, ws = config_lib.stored_frame_size(c)
  print(
    f"AVTok data pipeline benchmark, {datetime.datetime.now().isoformat(timespec='seconds')}, "
    f"{platform.node()}, {os.cpu_count()} CPUs"
  )
  print(
    f"preset {preset}: {c.num_frames}x{c.height}x{c.width} video (stored {hs}x{ws}), "
    f"{c.num_samples} samples @ {c.sample_rate} Hz, batch {_BATCH_SIZE.value}"
  )
  rows = [("generator alone (1 process)", _time_generator(c, _GENERATOR_CLIPS.value), None)]
  tmp = None
  data_dir = _DATA_DIR.value
  if not data_dir:
    tmp = data_dir = tempfile.mkdtemp(prefix="avtok_bench_")
    rows.append(
      (
        f"build synthetic_av ({_NUM_CLIPS.value} clips)",
        _build(data_dir, preset, _NUM_CLIPS.value),
        None,
      )
    )
  try:
    for workers in (int(w) for w in _WORKERS.value):
      c = config_lib.data_config(preset)
      c.source = "tfds:synthetic_av"
      c.data_dir = data_dir
      c.batch_size = _BATCH_SIZE.value
      c.num_workers = workers
      rate, first = _time_pipeline(c, _WARMUP.value, _BATCHES.value)
      name = "in-process" if workers == 0 else f"{workers} worker process{'es' * (workers > 1)}"
      rows.append((f"array_record + Grain, {name}", rate, first))
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)
  print(f"\n| {'what':<44} | {'clips/s':>8} | {'first batch':>11} |")
  print(f"|{'-' * 46}|{'-' * 10}|{'-' * 13}|")
  for name, rate, first in rows:
    first_s = "" if first is None else f"{first:.1f} s"
    print(f"| {name:<44} | {rate:8.1f} | {first_s:>11} |")


if __name__ == "__main__":
  # Guarded: Grain's spawned workers re-import this file.
  app.run(main)
