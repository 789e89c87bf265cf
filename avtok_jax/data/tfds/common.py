"""What the TFDS builders and the Grain pipeline agree on: record layout, audio storage, reports.

Record layout (one example = one fixed-length clip), shared by
`synthetic_av`, `av_folder` and the in-memory 'synthetic' source:

| key          | type                                  | meaning                                   |
|--------------|---------------------------------------|-------------------------------------------|
| `video`      | uint8 [T, Hs, Ws, 3]                  | frames at the stored size (see below)     |
| `audio`      | int16 [num_samples]                   | mono waveform, `round(x * 32767)`         |
| `label`      | int (ClassLabel)                      | class id                                  |
| `label_name` | bytes (Text)                          | class name                                |
| `source`     | bytes (Text)                          | where the clip came from                  |
| `start`      | float (seconds)                       | clip start inside the source              |

`synthetic_av` (and the in-memory source) add `event_times` float32 [K],
`event_frames` int32 [K] and `event_kinds` int32 [K]; `av_folder` adds
`has_audio` (bool: False when silence was substituted for a missing track).

Stored frame size: `Hs, Ws = height + crop_margin, width + crop_margin`
(`config_lib.stored_frame_size`), so that training can random-crop the target
size out of them and evaluation takes the centre crop.

Audio is stored as 16-bit PCM (scale 32767, clipped to [-1, 1] first): half
the bytes of float32, at the resolution of the 16-bit audio that real clips
(VGGSound's AAC tracks) are mastered at; the rounding error is at most
1.5e-5 per sample (about -96 dB full scale).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from avtok_jax import config_lib

AUDIO_SCALE = 32767.0
CODE_DIR = epath.Path(__file__).parent
REPORT_FILENAME = "prepare_report.json"
# Sizes that a builder config (named after a preset) fixes in the stored files.
GEOMETRY_FIELDS = (
  "num_frames",
  "height",
  "width",
  "crop_margin",
  "sample_rate",
  "num_samples",
)
_SPLIT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def audio_to_int16(audio: np.ndarray) -> np.ndarray:
  """float [-1, 1] -> int16 (values outside [-1, 1] are clipped, NaN is an error)."""
  audio = np.asarray(audio, dtype=np.float32)
  if not np.all(np.isfinite(audio)):
    raise ValueError("Audio contains NaN or Inf; refusing to store it.")
  return np.round(np.clip(audio, -1.0, 1.0) * AUDIO_SCALE).astype(np.int16)


def audio_from_int16(audio: np.ndarray) -> np.ndarray:
  """int16 -> float32 in [-1, 1]; float input passes through as float32."""
  if audio.dtype == np.int16:
    return audio.astype(np.float32) * np.float32(1.0 / AUDIO_SCALE)
  return np.asarray(audio, dtype=np.float32)


def preset_of(builder_kwargs: dict[str, Any], default: str) -> str:
  """The builder config (= preset) name a builder is being constructed with."""
  config = builder_kwargs.get("config") or default
  return config if isinstance(config, str) else config.name


def preset_data_config(
  preset: str, data_config: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
  """`data_config` checked to match the stored geometry of `preset` (or the preset's own)."""
  reference = config_lib.data_config(preset)
  if data_config is None:
    return reference
  config_lib.check_data_config(data_config)
  diffs = [
    f"{k}={data_config[k]} (preset {preset!r} stores {reference[k]})"
    for k in GEOMETRY_FIELDS
    if data_config[k] != reference[k]
  ]
  if diffs:
    raise ValueError(
      f"The TFDS builder config {preset!r} stores clips of the '{preset}' preset, but the data "
      f"config differs in: {', '.join(diffs)}. Build with the preset's sizes."
    )
  return data_config


class LocalDatasetInfo(tfds.core.DatasetInfo):
  """`tfds.core.DatasetInfo` of a data set that only ever exists on local disk.

  A builder whose data dir holds no `dataset_info.json` yet (every build,
  every "not prepared" check) calls `initialize_from_bucket`, which makes a
  `tempfile.mkdtemp("tfds")` directory for metadata from TFDS's GCS bucket
  and, with GCS disabled or nothing there, returns without removing it:
  one empty directory left in /tmp per call. Ours are never on GCS.
  """

  def initialize_from_bucket(self) -> None:
    return


def base_features(
  data_config: ml_collections.ConfigDict, class_names: list[str] | None
) -> dict[str, Any]:
  """The feature connectors every builder has (see the module docstring)."""
  hs, ws = config_lib.stored_frame_size(data_config)
  # encoding='bytes' stores the raw buffer; TFDS's default writes one protobuf
  # varint per value, which made reading a paper clip 27 ms instead of ~1 ms.
  return {
    "video": tfds.features.Tensor(
      shape=(data_config.num_frames, hs, ws, 3), dtype=np.uint8, encoding="bytes"
    ),
    "audio": tfds.features.Tensor(
      shape=(data_config.num_samples,), dtype=np.int16, encoding="bytes"
    ),
    # names=None: the names are set once the data is scanned, and read back
    # from `label.labels.txt` when the data set is loaded.
    "label": tfds.features.ClassLabel(names=class_names),
    "label_name": tfds.features.Text(),
    "source": tfds.features.Text(),
    "start": tfds.features.Scalar(dtype=np.float32),
  }


def check_split_name(name: str, where: str) -> str:
  if not _SPLIT_NAME.match(name):
    raise ValueError(f"{where}: split name {name!r} is not a valid identifier (e.g. train, test).")
  return name


def write_report(dataset_dir: os.PathLike | str, report: dict[str, Any]) -> str:
  path = os.path.join(os.fspath(dataset_dir), REPORT_FILENAME)
  with open(path, "w") as f:
    json.dump(report, f, indent=2, sort_keys=False)
    f.write("\n")
  return path


def read_report(dataset_dir: os.PathLike | str) -> dict[str, Any]:
  """The JSON summary the builder wrote next to the data (`prepare_report.json`)."""
  path = os.path.join(os.fspath(dataset_dir), REPORT_FILENAME)
  with open(path) as f:
    return json.load(f)
