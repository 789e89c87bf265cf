"""TFDS builders (array_record, no TensorFlow needed): `synthetic_av` and `av_folder`.

Importing this package registers both builders with TFDS, so that
`tfds.data_source('synthetic_av/tiny', data_dir=...)` and
`tfds.builder('av_folder/paper', ...)` find them. Build data with
`python -m avtok_jax.data.prepare`; the record layout is in `common.py`.
"""

from avtok_jax.data.tfds import av_folder, common, synthetic_av
from avtok_jax.data.tfds.av_folder import AvFolder
from avtok_jax.data.tfds.common import read_report
from avtok_jax.data.tfds.synthetic_av import SyntheticAv

BUILDERS = {"synthetic_av": SyntheticAv, "av_folder": AvFolder}

__all__ = [
  "BUILDERS",
  "AvFolder",
  "SyntheticAv",
  "av_folder",
  "common",
  "read_report",
  "synthetic_av",
]
