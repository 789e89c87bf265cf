"""A small audio-video classifier of the built-in data: a feature space for Frechet distances.

Real FVD/FAD use networks trained on real data (I3D on Kinetics, VGGish on
AudioSet). For the built-in procedural clips (`data/synthetic.py`, 10
classes) a network trained on those clips themselves gives a feature space
that knows what matters there (colour, shape, texture; pitch, timbre), and a
class accuracy for generated clips. `AVClassifier` has two independent
branches, one per modality, so that video and audio are scored separately:

* video [N, T, H, W, 3] in [-1, 1] (the tokenizer's video units): per frame,
  three patch-merging stages (4x4, 2x2, 2x2), one temporal layer over 3
  neighbouring frames, global average pooling over (T, H, W), Dense(D) + GELU
  = features, Dense(C) = logits;
* mel [N, F, L] normalised log-mel (`data/audio.py::mel_features`, silence
  = -1): three patch-merging stages over (F, L) ((2, 4), 2x2, 2x2), average
  pooling over time only (pitch is a position on the frequency axis, so the
  frequency positions are kept and flattened), Dense(D) + GELU = features,
  Dense(C) = logits.

A patch-merging stage cuts the map into non-overlapping patches, stacks each
patch's values (space-to-depth) and applies Dense -> GroupNorm -> GELU: a
convolution whose kernel equals its stride, as in ViT's patch embedding
(Dosovitskiy et al. 2021, section 3.1) and Swin's patch merging (Liu et al.
2021, section 3.1). It is chosen over overlapping convolutions for speed on CPU, where XLA runs
convolution gradients slowly: a stack of three stride-2 3x3 convolutions of
half these widths took 1.8 s per video training step of 32 small clips, this
one 0.6 s (measured on the 2-core CPU while shared with other jobs).

Features are the D = 128 penultimate activations, as FID takes Inception's
pool3 activations (Heusel et al. 2017, "GANs Trained by a Two Time-Scale
Update Rule Converge to a Local Nash Equilibrium", section 4) and FVD takes
I3D's logits layer input (Unterthiner et al. 2018, "Towards Accurate
Generative Models of Video", section 3). The normalisation is GroupNorm (Wu &
He 2018) so that features of a clip never depend on the rest of its batch.

Weights for the `tiny` and `small` data presets ship in `assets/`
(`classifier_{preset}.msgpack`, `flax.serialization.to_bytes` of the params,
next to `classifier_{preset}.json` with the training facts and the SHA-256
of the weights). Retrain one with

  python -m avtok_jax.evaluation.classifier --preset=small --steps=300 \\
      --out=avtok_jax/evaluation/assets/classifier_small.msgpack

Training draws clips of the train split (generator seed `data.seed`, indices
0 .. pool-1) once into memory, augments them with random crops, horizontal
flips and mild Gaussian noise, and reports the accuracy of each branch on the
first `eval_clips` clips of the eval split (seed `data.seed + 1`: a different
generator stream, see `data/tfds/synthetic_av.py::split_seed`), preprocessed
exactly as the tokenizer's evaluation sees them (`data/pipeline.py::Preprocess`
with train=False: centre crop, int16 audio, log-mel).

Runtime: `load_classifier(preset)` -> `Classifier` with `.video(video)` and
`.audio(mel)`, each returning (features [N, D], logits [N, C]) as numpy.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import scipy.stats

from avtok_jax import config_lib
from avtok_jax.data import patches, synthetic

ASSETS_DIR = pathlib.Path(__file__).resolve().parent / "assets"
SHIPPED_PRESETS = ("tiny", "small")
FORMAT_VERSION = 1

# Accepted input ranges. Decoders are not bounded and overshoot [-1, 1], so
# video is clipped to [-1, 1] (as writing uint8 frames would) and normalised
# log-mel is clipped below at -1 (the log floor: nothing real is quieter than
# silence). Values beyond these generous bounds mean other units: float video
# in [0, 255], or raw log-mel, which always reaches far below -4 in
# normalised terms (its floor is log(1e-5) = -11.5).
VIDEO_BOUND = 4.0
MEL_RANGE = (-4.0, 4.0)
# Full float32 matmuls: GPUs and TPUs would otherwise use TF32/bf16 passes, and
# features (hence Frechet distances) would depend on the device.
_PRECISION = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class ClassifierArch:
  """Network sizes (the same for every preset; recorded in the JSON next to the weights).

  Video height and width must be divisible by the product of the video patch
  sides (16), mel bins and frames by the products of the audio patches (8, 16).
  """

  video_channels: tuple[int, ...] = (32, 64, 128)
  video_patches: tuple[tuple[int, int], ...] = ((4, 4), (2, 2), (2, 2))
  audio_channels: tuple[int, ...] = (32, 64, 128)
  audio_patches: tuple[tuple[int, int], ...] = ((2, 4), (2, 2), (2, 2))
  feature_dim: int = 128
  num_groups: int = 8
  num_classes: int = 10

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ClassifierArch:
    """Inverse of dataclasses.asdict after a JSON round trip (lists back to tuples)."""
    d = dict(d)
    for key in ("video_channels", "audio_channels"):
      if key in d:
        d[key] = tuple(int(v) for v in d[key])
    for key in ("video_patches", "audio_patches"):
      if key in d:
        d[key] = tuple(tuple(int(v) for v in p) for p in d[key])
    return cls(**d)


ARCH = ClassifierArch()


# ----------------------------------------------------------------------------
# Network.
# ----------------------------------------------------------------------------


def _space_to_depth(x: jax.Array, patch: tuple[int, int]) -> jax.Array:
  """[B, H, W, C] -> [B, H/ph, W/pw, ph*pw*C]: each non-overlapping patch stacked."""
  b, h, w, c = x.shape
  ph, pw = patch
  x = x.reshape(b, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // ph, w // pw, ph * pw * c)


class _Stage(nn.Module):
  """Dense -> GroupNorm -> GELU over the last axis."""

  channels: int
  num_groups: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.channels, precision=_PRECISION)(x)
    x = nn.GroupNorm(num_groups=min(self.num_groups, self.channels))(x)
    return nn.gelu(x)


class VideoBranch(nn.Module):
  """[N, T, H, W, 3] in [-1, 1] -> (features [N, D], logits [N, C]); see the module docstring."""

  channels: Sequence[int]
  patches: Sequence[tuple[int, int]]
  feature_dim: int
  num_classes: int
  num_groups: int

  @nn.compact
  def __call__(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
    n, t, h, w, c = video.shape
    x = video.reshape(n * t, h, w, c)
    for i, (ch, patch) in enumerate(zip(self.channels, self.patches, strict=True)):
      x = _Stage(ch, self.num_groups, name=f"stage{i}")(_space_to_depth(x, patch))
    x = x.reshape(n, t, *x.shape[1:])
    # Each frame sees its two neighbours (zero beyond the clip): motion and
    # flicker, like a temporal convolution of kernel 3.
    pad = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
    x = jnp.concatenate([pad[:, :-2], x, pad[:, 2:]], axis=-1)
    x = _Stage(self.channels[-1], self.num_groups, name="temporal")(x)
    x = jnp.mean(x, axis=(1, 2, 3))
    features = nn.gelu(nn.Dense(self.feature_dim, precision=_PRECISION, name="features")(x))
    return features, nn.Dense(self.num_classes, precision=_PRECISION, name="logits")(features)


class AudioBranch(nn.Module):
  """[N, F, L] normalised log-mel -> (features [N, D], logits [N, C]); see the module docstring."""

  channels: Sequence[int]
  patches: Sequence[tuple[int, int]]
  feature_dim: int
  num_classes: int
  num_groups: int

  @nn.compact
  def __call__(self, mel: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = mel[..., None]
    for i, (ch, patch) in enumerate(zip(self.channels, self.patches, strict=True)):
      x = _Stage(ch, self.num_groups, name=f"stage{i}")(_space_to_depth(x, patch))
    # Mean over time, keep frequency: [N, F', L', C] -> [N, F' * C].
    x = jnp.mean(x, axis=2).reshape(x.shape[0], -1)
    features = nn.gelu(nn.Dense(self.feature_dim, precision=_PRECISION, name="features")(x))
    return features, nn.Dense(self.num_classes, precision=_PRECISION, name="logits")(features)


class AVClassifier(nn.Module):
  """Two independent branches; `video(...)` and `audio(...)` apply one, `__call__` both."""

  arch: ClassifierArch = ARCH

  def setup(self):
    a = self.arch
    self.video_branch = VideoBranch(
      a.video_channels, a.video_patches, a.feature_dim, a.num_classes, a.num_groups
    )
    self.audio_branch = AudioBranch(
      a.audio_channels, a.audio_patches, a.feature_dim, a.num_classes, a.num_groups
    )

  def video(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.video_branch(video)

  def audio(self, mel: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.audio_branch(mel)

  def __call__(self, video: jax.Array, mel: jax.Array):
    return self.video(video), self.audio(mel)


# ----------------------------------------------------------------------------
# Shapes and input checks.
# ----------------------------------------------------------------------------


def input_shapes(data_config: ml_collections.ConfigDict) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Per-clip shapes ((T, H, W, 3), (F, L)) the classifier of a data config takes."""
  c = data_config
  return (
    (int(c.num_frames), int(c.height), int(c.width), 3),
    (int(c.mel.n_mels), int(config_lib.num_mel_frames(c))),
  )


def _check_batch(x: Any, per_clip: tuple[int, ...], what: str, layout: str, preset: str):
  x = np.asarray(x)
  if x.ndim != len(per_clip) + 1 or tuple(x.shape[1:]) != per_clip or x.shape[0] == 0:
    raise ValueError(
      f"{what} must have shape [N, {layout}] = [N, {', '.join(map(str, per_clip))}] with N >= 1 "
      f"for preset {preset!r}, got {tuple(x.shape)}."
    )
  return x


def prepare_video(video: Any, per_clip: tuple[int, ...], preset: str = "?") -> np.ndarray:
  """Checks a video batch and returns float32 in [-1, 1].

  uint8 frames are mapped with x / 127.5 - 1 (the pipeline's float_video
  map). Float values within +-VIDEO_BOUND are clipped to [-1, 1]; anything
  else raises ValueError.
  """
  x = _check_batch(video, per_clip, "video", "T, H, W, 3", preset)
  if x.dtype == np.uint8:
    return x.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1)
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"video must be uint8 or float in [-1, 1], got dtype {x.dtype}.")
  x = x.astype(np.float32)
  if not np.all(np.isfinite(x)):
    raise ValueError("video contains NaN or Inf.")
  lo, hi = float(x.min()), float(x.max())
  if lo < -VIDEO_BOUND or hi > VIDEO_BOUND:
    raise ValueError(
      f"video values span [{lo:.3g}, {hi:.3g}]; expected float in [-1, 1] (values within "
      f"+-{VIDEO_BOUND} are clipped). Map uint8 frames with x / 127.5 - 1."
    )
  return np.clip(x, -1.0, 1.0)


def prepare_mel(mel: Any, per_clip: tuple[int, ...], preset: str = "?") -> np.ndarray:
  """Checks a normalised log-mel batch and returns float32, clipped below at -1 (silence)."""
  x = _check_batch(mel, per_clip, "mel", "n_mels, frames", preset)
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"mel must be a float normalised log-mel, got dtype {x.dtype}.")
  x = x.astype(np.float32)
  if not np.all(np.isfinite(x)):
    raise ValueError("mel contains NaN or Inf.")
  lo, hi = float(x.min()), float(x.max())
  if lo < MEL_RANGE[0] or hi > MEL_RANGE[1]:
    raise ValueError(
      f"mel values span [{lo:.3g}, {hi:.3g}], outside {MEL_RANGE}: expected the normalised "
      "log-mel of data/audio.py::mel_features (silence = -1), not raw log-mel or magnitudes."
    )
  return np.maximum(x, np.float32(-1.0))


def _batched(fn: Callable, x: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Applies a jitted fn to x in chunks of one fixed size (zero-padded: one compiled program
  per chunk size; small inputs use the next power of two)."""
  n = x.shape[0]
  size = min(int(batch_size), 1 << max(n - 1, 0).bit_length())
  feats, logits = [], []
  for start in range(0, n, size):
    chunk = x[start : start + size]
    m = chunk.shape[0]
    if m < size:
      chunk = np.concatenate([chunk, np.zeros((size - m, *chunk.shape[1:]), chunk.dtype)])
    f, lg = jax.device_get(fn(chunk))
    feats.append(np.asarray(f[:m]))
    logits.append(np.asarray(lg[:m]))
  return np.concatenate(feats), np.concatenate(logits)


# ----------------------------------------------------------------------------
# Runtime API.
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _jitted_branches(arch: ClassifierArch) -> tuple[Callable, Callable]:
  """(video_fn, audio_fn)(params, x), jitted once per arch: classifiers of one arch (and the
  trainer's held-out check) share their compiled programs."""
  model = AVClassifier(arch)
  video = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AVClassifier.video))
  audio = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AVClassifier.audio))
  return video, audio


class Classifier:
  """Trained `AVClassifier` for one data preset: jitted, batched, input-checked.

  `video(video)` / `audio(mel)` -> (features float32 [N, D], logits float32
  [N, C]) numpy arrays; `class_names[i]` names logit i.
  """

  def __init__(
    self,
    preset: str,
    params: Any,
    facts: dict[str, Any] | None = None,
    *,
    arch: ClassifierArch = ARCH,
    batch_size: int = 64,
  ):
    self.preset = preset
    self.data_config = config_lib.data_config(preset)
    self.arch = arch
    self.facts = dict(facts or {})
    self.batch_size = int(batch_size)
    self.video_shape, self.mel_shape = input_shapes(self.data_config)
    self.class_names = synthetic.class_names(arch.num_classes)
    self.feature_dim = arch.feature_dim
    self.num_classes = arch.num_classes
    self.params = params
    self._video, self._audio = _jitted_branches(arch)

  def video(self, video: Any) -> tuple[np.ndarray, np.ndarray]:
    """[N, T, H, W, 3] float in [-1, 1] (or uint8) -> (features [N, D], logits [N, C])."""
    x = prepare_video(video, self.video_shape, self.preset)
    return _batched(functools.partial(self._video, self.params), x, self.batch_size)

  def audio(self, mel: Any) -> tuple[np.ndarray, np.ndarray]:
    """[N, F, L] normalised log-mel -> (features [N, D], logits [N, C])."""
    x = prepare_mel(mel, self.mel_shape, self.preset)
    return _batched(functools.partial(self._audio, self.params), x, self.batch_size)

  def __repr__(self) -> str:
    acc = self.facts.get("heldout_accuracy", {})
    return f"Classifier(preset={self.preset!r}, D={self.feature_dim}, heldout_accuracy={acc})"


def facts_path(weights_path: str | os.PathLike) -> pathlib.Path:
  """The JSON of training facts that goes with a weights file (same stem, .json)."""
  return pathlib.Path(weights_path).with_suffix(".json")


def shipped_weights_path(preset: str) -> pathlib.Path:
  return ASSETS_DIR / f"classifier_{preset}.msgpack"


def check_arch_fits(arch: ClassifierArch, data_config: ml_collections.ConfigDict) -> None:
  """Raises ValueError if the preset's video or mel does not divide into the arch's patches."""
  (_, h, w, _), (f, length) = input_shapes(data_config)
  problems = []
  for what, (a, b), patches_ in (
    ("video (H, W)", (h, w), arch.video_patches),
    ("mel (F, L)", (f, length), arch.audio_patches),
  ):
    pa, pb = math.prod(p[0] for p in patches_), math.prod(p[1] for p in patches_)
    if a % pa or b % pb:
      problems.append(f"{what} = ({a}, {b}) is not divisible by ({pa}, {pb})")
  if len(arch.video_patches) != len(arch.video_channels):
    problems.append("video_patches and video_channels differ in length")
  if len(arch.audio_patches) != len(arch.audio_channels):
    problems.append("audio_patches and audio_channels differ in length")
  if problems:
    raise ValueError(
      f"Classifier arch does not fit preset {data_config.preset!r}: " + "; ".join(problems) + "."
    )


def init_params(arch: ClassifierArch, data_config: ml_collections.ConfigDict, seed: int = 0):
  """Fresh parameters of `AVClassifier(arch)` for the shapes of a data config."""
  check_arch_fits(arch, data_config)
  video_shape, mel_shape = input_shapes(data_config)
  model = AVClassifier(arch)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, *video_shape)), jnp.zeros((1, *mel_shape)))[
      "params"
    ]
  )
  # Drawn with numpy: `model.init` compiles for 10 s on a busy 2-core CPU
  # (20 s op by op), which the trainer's few-step test pays every time. The
  # values follow flax's defaults: Dense kernels LeCun-normal, i.e. a normal
  # truncated to +-2 std with variance 1 / fan_in (jax.nn.initializers.
  # variance_scaling; 0.8796... is the std of a standard normal truncated to
  # [-2, 2]); biases 0; GroupNorm scales 1.
  rng = np.random.default_rng([seed, 0])

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      std = 1.0 / math.sqrt(math.prod(leaf.shape[:-1])) / 0.87962566103423978
      x = scipy.stats.truncnorm.rvs(-2.0, 2.0, size=leaf.shape, random_state=rng) * std
      return jnp.asarray(x, leaf.dtype)
    return jnp.full(leaf.shape, 1.0 if name == "scale" else 0.0, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _abstract_params(arch: ClassifierArch, data_config: ml_collections.ConfigDict):
  return jax.eval_shape(lambda: init_params(arch, data_config))


def load_classifier(preset: str, path: str | os.PathLike | None = None) -> Classifier:
  """The classifier of a data preset: the shipped weights, or those written to `path`.

  Raises ValueError for an unknown preset, a preset without shipped weights,
  a missing file, weights that do not match their JSON (preset, SHA-256) or
  parameter shapes that do not match the network.
  """
  if preset not in config_lib.DATA_PRESETS:
    raise ValueError(f"Unknown data preset {preset!r}; choose one of {config_lib.DATA_PRESETS}.")
  if path is None:
    if preset not in SHIPPED_PRESETS:
      raise ValueError(
        f"No shipped classifier weights for preset {preset!r} (shipped: {SHIPPED_PRESETS}). "
        f"Train them with `python -m avtok_jax.evaluation.classifier --preset={preset} "
        "--steps=N --out=FILE` and call load_classifier(preset, path=FILE)."
      )
    path = shipped_weights_path(preset)
  return _load(preset, str(path))


@functools.lru_cache(maxsize=8)
def _load(preset: str, path: str) -> Classifier:
  # Cached: one Classifier (and its compiled programs) per file.
  weights = pathlib.Path(path)
  meta_path = facts_path(weights)
  for p in (weights, meta_path):
    if not p.is_file():
      raise ValueError(f"Classifier file {p} is missing (weights and their .json go together).")
  data = weights.read_bytes()
  facts = json.loads(meta_path.read_text())
  if facts.get("preset") != preset:
    raise ValueError(
      f"{weights} holds a classifier for preset {facts.get('preset')!r}, not {preset!r}."
    )
  digest = hashlib.sha256(data).hexdigest()
  if facts.get("sha256") != digest:
    raise ValueError(
      f"{weights} does not match {meta_path} (SHA-256 {digest[:12]}... vs "
      f"{str(facts.get('sha256'))[:12]}...): the weights were replaced without their facts."
    )
  arch = ClassifierArch.from_dict(facts.get("arch", {}))
  data_config = config_lib.data_config(preset)
  expected = _abstract_params(arch, data_config)
  restored = flax.serialization.msgpack_restore(data)
  got_shapes = jax.tree.map(lambda a: tuple(np.shape(a)), restored)
  want_shapes = jax.tree.map(lambda a: tuple(a.shape), expected)
  if got_shapes != want_shapes:
    raise ValueError(
      f"Parameters in {weights} do not match the AVClassifier of preset {preset!r} "
      f"({arch}); retrain them."
    )
  params = jax.tree.map(lambda a, e: jnp.asarray(a, e.dtype), restored, expected)
  return Classifier(preset, params, facts, arch=arch)


# ----------------------------------------------------------------------------
# Built-in clips in classifier units.
# ----------------------------------------------------------------------------


def builtin_clips(
  data_config: ml_collections.ConfigDict,
  split: str,
  indices: Sequence[int] | range,
  *,
  full_frames: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Clips of the in-memory 'synthetic' source, as the tokenizer's evaluation sees them.

  Returns (video uint8 [N, T, H, W, 3], mel float32 [N, F, L] normalised,
  labels int32 [N]). The video is the centre crop (`Preprocess` with
  train=False); with full_frames=True it is the stored frames (target size +
  crop_margin), for random crops. Map video to [-1, 1] with x / 127.5 - 1.
  """
  # Imported here: the pipeline pulls in Grain and TFDS, which the runtime API does not need.
  import threadpoolctl

  from avtok_jax.data import pipeline

  c = data_config
  source = pipeline.SyntheticSource(c, split)
  pre = pipeline.Preprocess(c, train=False)
  video_shape, mel_shape = input_shapes(c)
  rng = np.random.default_rng(0)  # unused with train=False
  videos, mels, labels = [], [], []
  # One BLAS thread: the mel filter-bank matmul is many times slower with
  # OpenBLAS threads on a small machine (see pipeline._init_worker).
  with threadpoolctl.threadpool_limits(limits=1):
    for i in indices:
      record = source[int(i)]
      out = pre.random_map(record, rng)
      if full_frames:
        videos.append(record["video"])
      else:
        videos.append(patches.unpatchify_video(out["video_patches"], video_shape, c.video_patch))
      mels.append(patches.unpatchify_mel(out["mel_patches"], mel_shape, c.mel_patch))
      labels.append(int(out["label"]))
  return np.stack(videos), np.stack(mels).astype(np.float32), np.asarray(labels, np.int32)


# ----------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------


def _random_crops(
  video: np.ndarray, size: tuple[int, int], rng: np.random.Generator, flip: bool
) -> np.ndarray:
  """[B, T, Hs, Ws, 3] -> [B, T, h, w, 3]: one random crop (+ horizontal flip) per clip."""
  h, w = size
  dy, dx = video.shape[2] - h, video.shape[3] - w
  out = np.empty((video.shape[0], video.shape[1], h, w, 3), video.dtype)
  for b in range(video.shape[0]):
    y0, x0 = int(rng.integers(0, dy + 1)), int(rng.integers(0, dx + 1))
    clip = video[b, :, y0 : y0 + h, x0 : x0 + w]
    out[b] = clip[:, :, ::-1] if flip and rng.random() < 0.5 else clip
  return out


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(np.argmax(logits, axis=-1) == labels))


def train_classifier(
  preset: str,
  steps: int,
  out: str | os.PathLike,
  *,
  batch_size: int = 32,
  lr: float = 2e-3,
  seed: int = 0,
  pool: int = 2048,
  eval_clips: int = 512,
  noise_std: float = 0.05,
  log_every: int = 50,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Trains both branches on built-in clips, writes weights + JSON, returns the facts.

  Loss: cross-entropy of each branch, summed (the branches share nothing).
  Optimiser: Adam with linear warmup (5% of steps) and cosine decay.
  """
  if steps < 1 or batch_size < 1 or pool < 1 or eval_clips < 1:
    raise ValueError(
      f"steps={steps}, batch_size={batch_size}, pool={pool} and eval_clips={eval_clips} "
      "must all be >= 1."
    )
  c = config_lib.data_config(preset)
  if eval_clips > c.num_eval_examples:
    raise ValueError(f"eval_clips={eval_clips} > num_eval_examples={c.num_eval_examples}.")
  if pool > c.num_train_examples:
    raise ValueError(f"pool={pool} > num_train_examples={c.num_train_examples}.")
  out = pathlib.Path(out)
  arch = dataclasses.replace(ARCH, num_classes=int(c.num_classes))

  # --- data: a fixed pool of train clips, the eval clips ---
  t0 = time.perf_counter()
  pool_video, pool_mel, pool_labels = builtin_clips(c, c.train_split, range(pool), full_frames=True)
  eval_video, eval_mel, eval_labels = builtin_clips(c, c.eval_split, range(eval_clips))
  gen_s = time.perf_counter() - t0
  log(f"Generated {pool} train + {eval_clips} eval clips ({preset}) in {gen_s:.1f} s.")

  # --- model + optimizer ---
  model = AVClassifier(arch)
  params = init_params(arch, c, seed)
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, lr, warmup_steps=max(1, steps // 20), decay_steps=steps
  )
  tx = optax.adam(schedule)
  opt_state = jax.jit(tx.init)(params)

  # --- step ---
  def loss_fn(p, video, mel, labels):
    (_, lv), (_, la) = model.apply({"params": p}, video, mel)
    loss_v = optax.softmax_cross_entropy_with_integer_labels(lv, labels).mean()
    loss_a = optax.softmax_cross_entropy_with_integer_labels(la, labels).mean()
    metrics = {
      "loss_video": loss_v,
      "loss_audio": loss_a,
      "acc_video": jnp.mean(jnp.argmax(lv, -1) == labels),
      "acc_audio": jnp.mean(jnp.argmax(la, -1) == labels),
    }
    return loss_v + loss_a, metrics

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(p, state, video, mel, labels):
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, video, mel, labels)
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state, metrics

  # --- loop ---
  rng = np.random.default_rng([seed, 1])
  t1 = time.perf_counter()
  for step in range(steps):
    idx = rng.choice(pool, size=batch_size, replace=pool < batch_size)
    video = _random_crops(pool_video[idx], (c.height, c.width), rng, flip=bool(c.random_flip))
    video = video.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1)
    mel = pool_mel[idx]
    # Gaussian noise of a random strength in [0, noise_std] per clip, drawn on
    # the host: random numbers inside the step doubled its compile time.
    for x in (video, mel):
      sigma = noise_std * rng.random((batch_size,) + (1,) * (x.ndim - 1), dtype=np.float32)
      x += sigma * rng.standard_normal(x.shape, dtype=np.float32)
    params, opt_state, metrics = train_step(params, opt_state, video, mel, pool_labels[idx])
    if (step + 1) % log_every == 0 or step + 1 == steps:
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not all(math.isfinite(v) for v in m.values()):
        raise FloatingPointError(f"Non-finite classifier loss at step {step + 1}: {m}.")
      rate = (step + 1) / (time.perf_counter() - t1)
      log(
        f"step {step + 1}/{steps}: loss video {m['loss_video']:.3f} audio {m['loss_audio']:.3f}, "
        f"batch acc video {m['acc_video']:.2f} audio {m['acc_audio']:.2f} ({rate:.2f} step/s)"
      )
  train_s = time.perf_counter() - t1

  # --- held-out accuracy, through the runtime class ---
  classifier = Classifier(preset, params, arch=arch)
  _, logits_v = classifier.video(eval_video)
  _, logits_a = classifier.audio(eval_mel)
  acc = {"video": accuracy(logits_v, eval_labels), "audio": accuracy(logits_a, eval_labels)}
  log(
    f"Held-out accuracy on {eval_clips} eval clips: video {acc['video']:.4f}, audio "
    f"{acc['audio']:.4f}."
  )

  # --- write ---
  data = flax.serialization.to_bytes(jax.device_get(params))
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_bytes(data)
  facts = {
    "format_version": FORMAT_VERSION,
    "preset": preset,
    "steps": steps,
    "batch_size": batch_size,
    "lr": lr,
    "seed": seed,
    "noise_std": noise_std,
    "train_clips": {"split": c.train_split, "seed": int(c.seed), "indices": [0, pool]},
    "eval_clips": {"split": c.eval_split, "seed": int(c.seed) + 1, "indices": [0, eval_clips]},
    "heldout_accuracy": acc,
    "generate_seconds": round(gen_s, 1),
    "train_seconds": round(train_s, 1),
    "arch": dataclasses.asdict(arch),
    "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__},
    "sha256": hashlib.sha256(data).hexdigest(),
  }
  text = json.dumps(facts, indent=1) + "\n"
  facts_path(out).write_text(text)
  log(f"Wrote {out} ({len(data)} bytes) and {facts_path(out)}.")
  return json.loads(text)  # exactly what the file holds (tuples become lists)


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def _flag_values():
  # A private FlagValues, like data/synthetic.py: importing this module must not
  # register flags in the global absl FLAGS.
  from absl import flags

  fv = flags.FlagValues()
  flags.DEFINE_enum(
    "preset", "small", list(config_lib.DATA_PRESETS), "Data preset.", flag_values=fv
  )
  flags.DEFINE_integer("steps", 400, "Training steps.", flag_values=fv)
  flags.DEFINE_string(
    "out", None, "Weights file (.msgpack); the JSON goes next to it.", flag_values=fv
  )
  flags.DEFINE_integer("batch_size", 32, "Clips per step.", flag_values=fv)
  flags.DEFINE_float("lr", 2e-3, "Peak learning rate.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Initialisation and sampling seed.", flag_values=fv)
  flags.DEFINE_integer("pool", 2048, "Train clips generated up front.", flag_values=fv)
  flags.DEFINE_integer("eval_clips", 512, "Held-out clips for the accuracy.", flag_values=fv)
  flags.DEFINE_integer("log_every", 50, "Steps between progress lines.", flag_values=fv)
  flags.DEFINE_boolean("help", False, "Show this help.", flag_values=fv)
  return fv


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; argv[0] is the program name."""
  from absl import flags

  fv = _flag_values()
  argv = list(sys.argv if argv is None else argv)
  try:
    fv(argv)
  except flags.Error as e:
    raise SystemExit(f"{e}\nRun with --help to list the flags.") from None
  if fv.help:
    print("Trains the built-in-data audio-video classifier.\n\nFlags:\n" + fv.get_help())
    return 0
  if not fv.out:
    raise SystemExit("--out FILE is required.")
  train_classifier(
    fv.preset,
    fv.steps,
    fv.out,
    batch_size=fv.batch_size,
    lr=fv.lr,
    seed=fv.seed,
    pool=fv.pool,
    eval_clips=fv.eval_clips,
    log_every=fv.log_every,
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
