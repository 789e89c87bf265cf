"""Representation alignment of the encoder's patch-wise tokens (L_rep) [REPA].

REPA (Yu et al. 2025, "Representation Alignment for Generation") maps a
network's hidden tokens through a small MLP and maximises their cosine
similarity to the patch features of a frozen pretrained encoder. AVTok
applies it to the shared encoder's outputs at patch positions of each
modality, with an audio-visual foundation model as the teacher (AVTOK.md
section 3).

The pieces:

* `Projector`: the per-modality MLP (3 layers, SiLU, hidden 2048 [REPA]).
* `FeatureTeacher`: the interface a frozen teacher implements. A real
  audio-visual foundation model (e.g. CAV-MAE) plugs in here: it only has to
  turn a raw clip into a grid of feature vectors.
* `RandomFeatureTeacher`: the one teacher that needs no downloaded weights
  (see its docstring for what it is and is not good for).
* `resample_to_grid`: brings the teacher's feature grid onto the tokenizer's
  token grid, in the row-major token order of `avtok_jax.data.patches`.
* `alignment_loss`: mean negative cosine similarity, target stop-gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


class Projector(nn.Module):
  """MLP from encoder patch-wise tokens to teacher feature space [REPA].

  Dense(hidden) -> SiLU -> Dense(hidden) -> SiLU -> Dense(out_dim), as in REPA's
  projector (hidden 2048). Returns float32 [B, N, out_dim].
  """

  hidden_dim: int = 2048  # [REPA]
  out_dim: int = 768
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    def dense(features, names, name):
      return nn.Dense(
        features,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), names[1:]),
        name=name,
      )

    x = nn.with_logical_constraint(tokens.astype(self.dtype), ("batch", "length", "embed"))
    # Column-parallel first layer, replicated-input second layer and
    # row-parallel last layer: 'model' appears at most once per kernel.
    h = nn.silu(dense(self.hidden_dim, ("embed", "mlp"), "fc1")(x))
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = nn.silu(dense(self.hidden_dim, (None, "mlp"), "fc2")(h))
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    out = dense(self.out_dim, ("mlp", None), "fc3")(h)
    return nn.with_logical_constraint(out.astype(jnp.float32), ("batch", "length", None))


@runtime_checkable
class FeatureTeacher(Protocol):
  """A frozen network that maps a raw clip to patch features (the REPA target).

  Implementations must be pure functions of their inputs (callable inside
  `jax.jit`); their outputs are treated as constants (stop-gradient) by
  `alignment_loss`. Inputs are the raw streams, not the tokenizer's patches:

  * video: float [B, T, H, W, 3] in [-1, 1] -> [B, t', h', w', C]
  * mel: normalised log-mel [B, F, L] (mel bins x frames, ~[-1, 1]) -> [B, f', l', C]

  The output grids need not match the tokenizer's token grids:
  `resample_to_grid` maps them.
  """

  @property
  def feature_dim(self) -> int:
    """C, the feature size of both streams."""
    ...

  def video_features(self, video: jax.Array) -> jax.Array: ...

  def audio_features(self, mel: jax.Array) -> jax.Array: ...


class RandomFeatureTeacher:
  """A fixed, never-trained random convolutional feature extractor built from a seed.

  Each stream is a 3-layer conv net with He-scaled Gaussian weights drawn by
  numpy from `seed` (the same weights on every machine, no download):

  * video: Conv3D (2, 4, 4)/stride (2, 4, 4) -> GELU -> Conv3D 3x3x3/stride
    (1, 2, 2) -> GELU -> 1x1x1 to `feature_dim`: grid (T/2, H/8, W/8);
  * mel: Conv2D 4x4/stride 4 -> GELU -> Conv2D 3x3/stride 2 -> GELU -> 1x1 to
    `feature_dim`: grid (F/8, L/8).

  What it is good for: it exercises the whole L_rep machinery (teacher call,
  resampling, projector, loss, gradients, sharding) end to end, and gives a
  deterministic, input-dependent, spatially local target, so the loss is a
  real function of the encoder's tokens and can be driven down. Random conv
  features keep low-level structure (colour, edges, local energy; cf. Saxe
  et al. 2011, "On random weights and unsupervised feature learning").

  What it is not: a semantic teacher. It carries no knowledge beyond what
  the reconstruction loss already asks the encoder to keep, and no
  audio-visual correspondence, so it cannot be expected to reproduce the
  benefit REPA reports with a pretrained foundation model. Swap in a real
  `FeatureTeacher` for that.
  """

  def __init__(self, seed: int = 0, feature_dim: int = 64, hidden_dim: int = 64):
    self._feature_dim = int(feature_dim)
    self.hidden_dim = int(hidden_dim)
    self.seed = int(seed)
    rng = np.random.default_rng(self.seed)

    def he(shape: tuple[int, ...]) -> np.ndarray:
      fan_in = math.prod(shape[:-1])
      return (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(np.float32)

    h, c = self.hidden_dim, self._feature_dim
    # Kernels are laid out spatial..., in, out (lax "...IO").
    self._video = (he((2, 4, 4, 3, h)), he((3, 3, 3, h, h)), he((1, 1, 1, h, c)))
    self._audio = (he((4, 4, 1, h)), he((3, 3, h, h)), he((1, 1, h, c)))

  @property
  def feature_dim(self) -> int:
    return self._feature_dim

  def video_features(self, video: jax.Array) -> jax.Array:
    """float [B, T, H, W, 3] in [-1, 1] -> [B, ceil(T/2), ceil(H/8), ceil(W/8), C]."""
    if video.ndim != 5 or video.shape[-1] != 3:
      raise ValueError(f"video_features expects [B, T, H, W, 3], got {tuple(video.shape)}.")
    strides = ((2, 4, 4), (1, 2, 2), (1, 1, 1))
    return _conv_stack(jnp.asarray(video, jnp.float32), self._video, strides, "NDHWC", "DHWIO")

  def audio_features(self, mel: jax.Array) -> jax.Array:
    """normalised mel [B, F, L] -> [B, ceil(F/8), ceil(L/8), C]."""
    if mel.ndim != 3:
      raise ValueError(f"audio_features expects [B, F, L], got {tuple(mel.shape)}.")
    x = jnp.asarray(mel, jnp.float32)[..., None]
    strides = ((4, 4), (2, 2), (1, 1))
    return _conv_stack(x, self._audio, strides, "NHWC", "HWIO")


def _conv_stack(
  x: jax.Array,
  kernels: Sequence[np.ndarray],
  strides: Sequence[tuple[int, ...]],
  lhs_spec: str,
  rhs_spec: str,
) -> jax.Array:
  numbers = (lhs_spec, rhs_spec, lhs_spec)
  for i, (kernel, stride) in enumerate(zip(kernels, strides, strict=True)):
    x = jax.lax.conv_general_dilated(
      x,
      jnp.asarray(kernel),
      window_strides=stride,
      padding="SAME",
      dimension_numbers=numbers,
      precision=jax.lax.Precision.HIGHEST,
    )
    if i < len(kernels) - 1:
      x = nn.gelu(x, approximate=True)
  return jax.lax.stop_gradient(x)


def resample_to_grid(
  features: jax.Array, grid_out: Sequence[int], method: str = "linear"
) -> jax.Array:
  """[B, *grid_in, C] -> [B, prod(grid_out), C], tokens in row-major order over grid_out.

  Resizes the grid with `jax.image.resize` (linear by default, with the
  antialiasing triangle filter when a grid axis shrinks, i.e. a local
  average). The grid order matches `avtok_jax.data.patches` (first grid axis
  slowest). Returns the features unchanged (only flattened) when the grids
  match.
  """
  grid_out = tuple(int(g) for g in grid_out)
  grid_in = tuple(features.shape[1:-1])
  if len(grid_in) != len(grid_out):
    raise ValueError(
      f"Cannot resample a {len(grid_in)}-D feature grid {grid_in} to the "
      f"{len(grid_out)}-D grid {grid_out}."
    )
  batch, channels = features.shape[0], features.shape[-1]
  if grid_in != grid_out:
    features = jax.image.resize(
      features.astype(jnp.float32), (batch, *grid_out, channels), method=method
    )
  return features.reshape(batch, math.prod(grid_out), channels)


def teacher_targets(
  teacher: FeatureTeacher, modality: str, inputs: jax.Array, grid: Sequence[int]
) -> jax.Array:
  """The teacher's features for one stream on the tokenizer's token grid: [B, prod(grid), C].

  `modality` is 'video' (inputs [B, T, H, W, 3] in [-1, 1]) or 'audio'
  (inputs: normalised mel [B, F, L]).
  """
  if modality == "video":
    feats = teacher.video_features(inputs)
  elif modality == "audio":
    feats = teacher.audio_features(inputs)
  else:
    raise ValueError(f"modality must be 'video' or 'audio', got {modality!r}.")
  return jax.lax.stop_gradient(resample_to_grid(feats, grid))


def alignment_loss(pred: jax.Array, target: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean negative cosine similarity between projected tokens and teacher features [REPA].

  Args:
    pred: [B, N, C], the projector's output (gradient flows into it).
    target: [B, N, C], teacher features (stop-gradient).
    mask: optional [B] or [B, N]; the mean runs over the kept tokens.

  Returns:
    float32 scalar in [-1, 1]: -1 when every token points the same way as its
    target, 0 for orthogonal directions.
  """
  if pred.shape != target.shape:
    raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ.")
  pred = pred.astype(jnp.float32)
  target = jax.lax.stop_gradient(target.astype(jnp.float32))
  cos = jnp.sum(_l2_normalize(pred) * _l2_normalize(target), axis=-1)  # [B, N]
  if mask is None:
    return -jnp.mean(cos)
  mask = jnp.asarray(mask, jnp.float32)
  if mask.ndim == 1:
    mask = mask[:, None]
  mask = jnp.broadcast_to(mask, cos.shape)
  total = jnp.sum(mask)
  return jnp.where(total > 0, -jnp.sum(cos * mask) / jnp.maximum(total, 1e-12), 0.0)


def _l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  # eps inside the sqrt keeps the gradient finite at x = 0.
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps * eps)
