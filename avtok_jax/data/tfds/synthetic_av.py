"""TFDS builder `synthetic_av`: clips of the built-in sounding-video generator.

Builder configs `tiny` / `small` / `paper` follow the data presets of
`config_lib`. Splits: `train` (generator seed `data_config.seed`, indices
0..num_train-1) and `test` (seed `data_config.seed + 1`, indices
0..num_test-1), the same seeds and indices as the in-memory 'synthetic'
source of the Grain pipeline: every stored record equals
`make_record(spec, split_seed(config, split), i)` for the index i named in
its `source` field.

Build it with `python -m avtok_jax.data.prepare --source=synthetic_av ...`.
The record layout is described in `common.py`.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from avtok_jax import config_lib
from avtok_jax.data import synthetic
from avtok_jax.data.tfds import common

# Added to data_config.seed for the evaluation split so that train and test
# clips come from different generator streams.
EVAL_SEED_OFFSET = 1


def split_seed(data_config: ml_collections.ConfigDict, split: str) -> int:
  """Generator seed of a split: `seed` for the train split, `seed + 1` for any other."""
  return int(data_config.seed) + (0 if split == data_config.train_split else EVAL_SEED_OFFSET)


def generator_spec(data_config: ml_collections.ConfigDict) -> synthetic.SyntheticSpec:
  """The generator renders at the stored frame size (target + crop margin)."""
  hs, ws = config_lib.stored_frame_size(data_config)
  return synthetic.SyntheticSpec.from_config(data_config, height=hs, width=ws)


def make_record(
  spec: synthetic.SyntheticSpec, seed: int, index: int, audio: bool = True
) -> dict[str, Any]:
  """One generated clip in the record layout that `tfds.data_source` returns.

  audio=False: silent (`synthetic.generate(audio=False)`), for readers that
  drop the sound.
  """
  clip = synthetic.generate(spec, seed, index, audio=audio)
  return {
    "video": clip["video"],
    "audio": common.audio_to_int16(clip["audio"]),
    "label": int(clip["label"]),
    "label_name": str(clip["label_name"]).encode(),
    "source": f"synthetic:seed={seed}:index={index}".encode(),
    "start": 0.0,
    "event_times": np.asarray(clip["event_times"], np.float32),
    "event_frames": np.asarray(clip["event_frames"], np.int32),
    "event_kinds": np.asarray(clip["event_kinds"], np.int32),
  }


class SyntheticAv(tfds.core.GeneratorBasedBuilder):
  """The built-in procedural sounding-video data set (AVTOK.md section 7)."""

  VERSION = tfds.core.Version("1.0.0")
  # TFDS 4.9.10 derives `code_path` for builders inside a package through the
  # `importlib_resources` backport, which it does not install; state it.
  code_path = common.CODE_DIR / f"{__name__.rsplit('.', 1)[-1]}.py"
  RELEASE_NOTES = {"1.0.0": "First version."}
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(name=p, description=f"Clips of the '{p}' data preset.")
    for p in config_lib.DATA_PRESETS
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "tiny"

  def __init__(
    self,
    *,
    data_config: ml_collections.ConfigDict | None = None,
    num_train: int = 1000,
    num_test: int = 128,
    **kwargs,
  ):
    """Args: data_config (sizes must match the preset), clips per split, TFDS kwargs."""
    if num_train < 1 or num_test < 0:
      raise ValueError(f"num_train must be >= 1 and num_test >= 0, got {num_train}, {num_test}.")
    # Set before super().__init__, which may already read `info`.
    preset = common.preset_of(kwargs, self.DEFAULT_BUILDER_CONFIG_NAME)
    if preset not in config_lib.DATA_PRESETS:
      raise ValueError(
        f"Unknown synthetic_av config {preset!r}; use one of {config_lib.DATA_PRESETS}."
      )
    self._data_config = common.preset_data_config(preset, data_config)
    self._num = {self._data_config.train_split: num_train, self._data_config.eval_split: num_test}
    self.report: dict[str, Any] = {}
    # array_record: random access for Grain, and TFRecord writing needs TensorFlow.
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> common.LocalDatasetInfo:
    c = self._data_config
    features = common.base_features(c, list(synthetic.class_names(c.num_classes)))
    features["event_times"] = tfds.features.Tensor(shape=(None,), dtype=np.float32)
    features["event_frames"] = tfds.features.Tensor(shape=(None,), dtype=np.int32)
    features["event_kinds"] = tfds.features.Tensor(shape=(None,), dtype=np.int32)
    # Built directly: `dataset_info_from_configs` fails outside a package data
    # dir (ENVIRONMENT.md). TFDS stores the records in hashed-key order (its
    # default; with shuffling disabled its writer sorts all records in memory),
    # so record i is not generator index i: `source` names the index.
    return common.LocalDatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(features),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split, n) for split, n in self._num.items() if n > 0}

  def _generate_examples(self, split: str, num: int):
    spec = generator_spec(self._data_config)
    seed = split_seed(self._data_config, split)
    for i in tqdm.tqdm(range(num), desc=f"synthetic_av {split}", unit="clip"):
      yield i, make_record(spec, seed, i)

  def _download_and_prepare(self, dl_manager, download_config=None):
    super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
    c = self._data_config
    self.report = {
      "dataset": f"{self.name}/{self.builder_config.name}",
      "examples": {s: int(info.num_examples) for s, info in self.info.splits.items()},
      "generator": {
        "seeds": {s: split_seed(c, s) for s in self._num if self._num[s] > 0},
        "num_classes": int(c.num_classes),
        "stored_frame_size": list(config_lib.stored_frame_size(c)),
      },
      "skipped": [],
    }
    # self.data_dir is still the temporary directory here; TFDS renames it.
    common.write_report(self.data_dir, self.report)
