"""LPIPS with a VGG16 trunk, as a Flax module whose weights come from a local file.

LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as
a Perceptual Metric", eq. 1) between images x and y:

    d(x, y) = sum_l  mean_{h,w}  sum_c  w_{l,c} * (f^l_{hwc}(x) - f^l_{hwc}(y))^2,
    f^l = F^l / (||F^l||_2 over channels + 1e-10),

where F^l are VGG16 activations at five taps and w_l >= 0 are the learned
linear heads. Constants and structure follow the reference implementation
(richzhang/PerceptualSimilarity, `lpips/lpips.py` and
`lpips/pretrained_networks.py`, version 0.1):

* inputs in [-1, 1] pass a ScalingLayer: (x - shift) / scale with
  shift = [-.030, -.088, -.188], scale = [.458, .448, .450] (RGB);
* the trunk is torchvision's VGG16 `features`: 3x3 convs with padding 1 and
  ReLU, 2x2 max-pools with stride 2; the taps are relu1_2, relu2_2, relu3_3,
  relu4_3 and relu5_3 (after torchvision `features` indices 3, 8, 15, 22, 29);
* `normalize_tensor`: x / (sqrt(sum_c x^2) + eps), eps = 1e-10;
* the heads are 1x1 convs without bias (`NetLinLayer`), then a spatial mean
  (`spatial_average`), summed over the five taps. The head is linear, so we
  take the spatial mean first and apply the head to the [N, C] means: same
  value, less work.

Weights (`load_lpips`): either a folder written by the converter from the two
public PyTorch files,

    python -m avtok_jax.pretrained.convert --net=lpips \
      --src=vgg16-397923af.pth,vgg.pth --dst=DIR

(`vgg16-397923af.pth`: torchvision's ImageNet VGG16, the file
`torchvision.models.vgg16(weights="IMAGENET1K_V1")` downloads;
`vgg.pth`: `lpips/weights/v0.1/vgg.pth` of richzhang/PerceptualSimilarity,
also in the `lpips` PyPI package), or an .npz / .safetensors of float32
arrays with the same keys and layouts: torchvision VGG16
`features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}` (OIHW) and the
`lpips` package's heads `lin{0..4}.model.1.weight` ([1, C, 1, 1]; `model.0`
is the head's Dropout). Files may be split (e.g. the VGG16 features and the
lpips heads), given as a list of paths. VGG16's classifier keys are ignored.

Inputs are float images [N, H, W, 3] in [-1, 1] with H, W >= 16 (relu5_3 sits
after four 2x pools); videos [N, T, H, W, 3] give the mean over the T frames
of the per-frame distance, shape [N]. `lpips_apply(params, x, y)` is the pure,
jit-able function for use inside a training step; `load_lpips(path)` returns
an `LPIPS` object for evaluation that checks its inputs and jits once per
shape.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avtok_jax.pretrained import weights

PathLike = str | os.PathLike

# ScalingLayer constants (lpips/lpips.py, ScalingLayer).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# normalize_tensor's eps (lpips/__init__.py).
EPS = 1e-10
# VGG16 conv layers as (our name, torchvision `features` index, in, out);
# the block of a layer is the digit after "conv". Indices from torchvision's
# vgg16 "D" configuration [64, 64, M, 128, 128, M, 256 x3, M, 512 x3, M, 512 x3, M]
# with a ReLU after every conv.
VGG16_CONVS = (
  ("conv1_1", 0, 3, 64),
  ("conv1_2", 2, 64, 64),
  ("conv2_1", 5, 64, 128),
  ("conv2_2", 7, 128, 128),
  ("conv3_1", 10, 128, 256),
  ("conv3_2", 12, 256, 256),
  ("conv3_3", 14, 256, 256),
  ("conv4_1", 17, 256, 512),
  ("conv4_2", 19, 512, 512),
  ("conv4_3", 21, 512, 512),
  ("conv5_1", 24, 512, 512),
  ("conv5_2", 26, 512, 512),
  ("conv5_3", 28, 512, 512),
)
# Channels at the five taps (lpips/lpips.py, self.chns for 'vgg').
TAP_CHANNELS = (64, 128, 256, 512, 512)
# Smallest image side: relu5_3 is after four 2x2/2 max-pools.
MIN_SIZE = 16
# How far outside [-1, 1] a pixel may be (float rounding) before LPIPS.__call__ refuses it.
RANGE_TOLERANCE = 1e-3


def lpips_param_specs() -> tuple[weights.ParamSpec, ...]:
  """Every PyTorch key the weight file must hold, its shape, and its place in the Flax tree."""
  specs = []
  for name, index, c_in, c_out in VGG16_CONVS:
    specs.append(
      weights.ParamSpec(
        f"features.{index}.weight",
        ("vgg", name, "kernel"),
        (c_out, c_in, 3, 3),
        weights.conv_oihw_to_hwio,
      )
    )
    specs.append(weights.ParamSpec(f"features.{index}.bias", ("vgg", name, "bias"), (c_out,)))
  for k, c in enumerate(TAP_CHANNELS):
    specs.append(
      weights.ParamSpec(
        f"lin{k}.model.1.weight", (f"lin{k}", "kernel"), (1, c, 1, 1), _head_to_dense
      )
    )
  return tuple(specs)


def lpips_state_dict_shapes() -> dict[str, tuple[int, ...]]:
  """{PyTorch key: shape} of a complete LPIPS-VGG weight file."""
  return weights.expected_shapes(lpips_param_specs())


def _head_to_dense(w: np.ndarray) -> np.ndarray:
  """NetLinLayer 1x1 conv weight [1, C, 1, 1] -> Dense kernel [C, 1]."""
  return w.reshape(1, -1).T


# Feature maps with at most this many pixels are convolved as one matmul of
# 3x3 patches (im2col). XLA:CPU's convolution is pathological on tiny maps:
# a 512->512 3x3 conv on [4, 2, 2, 512] takes ~200 ms against ~8 ms as a
# matmul, and [32, 2, 2, 512] 1.7 s against 10 ms (jax 0.10.2, 2-core EPYC),
# while from 4x4 up both cost the same. The patches cost 9x the (tiny) map.
_IM2COL_MAX_PIXELS = 16


class Conv3x3(nn.Module):
  """3x3 convolution, stride 1, padding 1, with bias; params as nn.Conv's (kernel HWIO, bias)."""

  features: int
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
      "kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features), jnp.float32
    )
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    h, w = x.shape[-3:-1]
    if h * w <= _IM2COL_MAX_PIXELS:
      xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
      patches = jnp.concatenate(
        [xp[:, i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=-1
      )
      # (i, j, c) patch order matches the row-major reshape of the HWIO kernel.
      y = jnp.matmul(patches, kernel.reshape(-1, self.features), precision=self.precision)
    else:
      y = jax.lax.conv_general_dilated(
        x,
        kernel,
        (1, 1),
        ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=self.precision,
      )
    return y + bias


class VGG16Features(nn.Module):
  """torchvision VGG16 `features` up to relu5_3, NHWC; returns the five LPIPS taps."""

  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    taps = []
    block = 1
    for name, _, _, c_out in VGG16_CONVS:
      this_block = int(name[4])
      if this_block != block:
        taps.append(x)
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        block = this_block
      x = Conv3x3(c_out, dtype=self.dtype, precision=self.precision, name=name)(x)
      x = nn.relu(x)
    taps.append(x)
    return tuple(taps)


def _unit_normalize(f: jax.Array) -> jax.Array:
  """f / (||f||_2 over channels + EPS), with a finite gradient where f is all zero.

  ReLU features can be zero in every channel at a pixel; sqrt'(0) is infinite,
  so the norm is taken of a safe value there (the double-where trick) and the
  result is exactly the reference value everywhere.
  """
  sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
  nonzero = sq > 0
  norm = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)
  return f / (norm + EPS)


class LPIPSNet(nn.Module):
  """LPIPS-VGG distance between two image batches [N, H, W, 3] in [-1, 1] -> [N] (float32).

  `dtype` is the trunk's compute dtype (parameters stay float32); the
  normalisation, differences and heads are always float32.
  """

  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    _check_shapes(x.shape, y.shape, video=False)
    n = x.shape[0]
    z = jnp.concatenate([x, y], axis=0).astype(jnp.float32)
    z = (z - jnp.asarray(SHIFT, jnp.float32)) / jnp.asarray(SCALE, jnp.float32)
    taps = VGG16Features(dtype=self.dtype, precision=self.precision, name="vgg")(
      z.astype(self.dtype)
    )
    total = jnp.zeros((n,), jnp.float32)
    for k, f in enumerate(taps):
      f = _unit_normalize(f.astype(jnp.float32))
      diff = jnp.mean(jnp.square(f[:n] - f[n:]), axis=(1, 2))  # [N, C]
      head = nn.Dense(
        1,
        use_bias=False,
        dtype=jnp.float32,
        precision=jax.lax.Precision.HIGHEST,
        name=f"lin{k}",
      )
      total = total + head(diff)[:, 0]
    return total


def _check_shapes(x_shape: Sequence[int], y_shape: Sequence[int], *, video: bool) -> None:
  x_shape, y_shape = tuple(x_shape), tuple(y_shape)
  if x_shape != y_shape:
    raise ValueError(f"LPIPS inputs differ in shape: {x_shape} vs {y_shape}.")
  ndims = (4, 5) if video else (4,)
  if len(x_shape) not in ndims or x_shape[-1] != 3:
    want = "[N, H, W, 3] images or [N, T, H, W, 3] videos" if video else "[N, H, W, 3]"
    raise ValueError(f"LPIPS expects {want}, got shape {x_shape}.")
  if min(x_shape[-3:-1]) < MIN_SIZE:
    raise ValueError(
      f"LPIPS-VGG needs H, W >= {MIN_SIZE} (four 2x poolings before relu5_3), got {x_shape}."
    )


def lpips_apply(
  params: Any,
  x: jax.Array,
  y: jax.Array,
  *,
  dtype: Any = jnp.float32,
  precision: Any = None,
) -> jax.Array:
  """Pure LPIPS-VGG distance: images [N, H, W, 3] or videos [N, T, H, W, 3] in [-1, 1] -> [N].

  For videos the per-frame distances are averaged over T. `params` is the
  tree returned by `lpips_params_from_state_dict` (`LPIPS.params`). Shapes are
  checked at trace time; values are not (see `LPIPS.__call__`). jit-able and
  differentiable in x and y; `dtype`/`precision` must be static (Python values).
  """
  _check_shapes(x.shape, y.shape, video=True)
  net = LPIPSNet(dtype=dtype, precision=precision)
  if x.ndim == 5:
    n, t = x.shape[:2]
    frames = (n * t, *x.shape[2:])
    d = net.apply({"params": params}, x.reshape(frames), y.reshape(frames))
    return jnp.mean(d.reshape(n, t), axis=1)
  return net.apply({"params": params}, x, y)


def lpips_params_from_state_dict(
  state_dict: dict[str, np.ndarray], *, source: str = "state dict"
) -> dict[str, Any]:
  """Checks a flat PyTorch-layout state dict and converts it to the LPIPSNet params tree."""
  return weights.params_from_state_dict(state_dict, lpips_param_specs(), source=source)


def convert_state_dict(
  state_dict: dict[str, np.ndarray], source: str = "state dict"
) -> dict[str, Any]:
  """The converter's hook (`avtok_jax.pretrained.convert`): {'params': LPIPSNet params}.

  `state_dict` is torchvision's VGG16 state dict merged with the lpips v0.1
  heads (`lpips_param_specs` lists the keys used; others are ignored).
  Raises ValueError naming `source` and every missing or mis-shaped key.
  """
  return {"params": lpips_params_from_state_dict(state_dict, source=source)}


@functools.lru_cache(maxsize=1)
def _abstract_params() -> Any:
  x = jax.ShapeDtypeStruct((1, MIN_SIZE, MIN_SIZE, 3), jnp.float32)
  return jax.eval_shape(lambda x: LPIPSNet().init(jax.random.key(0), x, x), x)["params"]


class LPIPS:
  """An LPIPS-VGG metric with loaded weights: `lpips(x, y) -> [N]` (see module docstring).

  Inputs are checked eagerly (shape, float dtype, values within [-1, 1] up to
  RANGE_TOLERANCE), then passed to a jitted `lpips_apply` (one compilation per
  input shape; a video batch [N, T, ...] runs as the image batch [N * T, ...]).
  Use `lpips_apply(lpips.params, x, y)` inside your own jitted code.
  """

  def __init__(self, params: Any, *, dtype: Any = jnp.float32, precision: Any = None):
    self.params = jax.device_put(params)
    self.dtype = dtype
    self.precision = precision
    self._fn = jax.jit(functools.partial(lpips_apply, dtype=dtype, precision=precision))

  def __call__(self, x: Any, y: Any) -> jax.Array:
    x, y = _check_images(x, "x"), _check_images(y, "y")
    _check_shapes(x.shape, y.shape, video=True)
    if x.ndim == 5:
      # Frames as an image batch outside jit: videos share the image program.
      n, t = x.shape[:2]
      frames = (n * t, *x.shape[2:])
      return jnp.mean(self._fn(self.params, x.reshape(frames), y.reshape(frames)).reshape(n, t), 1)
    return self._fn(self.params, x, y)


def _check_images(a: Any, name: str) -> jax.Array:
  arr = jnp.asarray(a)
  if not jnp.issubdtype(arr.dtype, jnp.floating):
    raise ValueError(
      f"LPIPS input {name} has dtype {arr.dtype}; expected float images in [-1, 1] "
      "(map uint8 frames with x / 127.5 - 1)."
    )
  try:
    lo, hi = float(jnp.min(arr)), float(jnp.max(arr))
  except jax.errors.ConcretizationTypeError:
    return arr  # traced (called under jit): values cannot be checked here
  if not (np.isfinite(lo) and np.isfinite(hi)):
    raise ValueError(f"LPIPS input {name} contains NaN or Inf.")
  if lo < -1 - RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
    raise ValueError(
      f"LPIPS input {name} has values in [{lo:.4g}, {hi:.4g}]; expected images in [-1, 1] "
      "(clip reconstructions first; map [0, 1] images with 2 * x - 1)."
    )
  return arr


def load_lpips(
  path: PathLike | Sequence[PathLike],
  *,
  dtype: Any = jnp.float32,
  precision: Any = jax.lax.Precision.HIGHEST,
) -> LPIPS:
  """Loads LPIPS-VGG weights: a converted folder, or .npz/.safetensors file(s) (merged).

  `path` is a folder written by `python -m avtok_jax.pretrained.convert
  --net=lpips` (see the module docstring), one .npz/.safetensors file, or a
  list of them. The default precision is HIGHEST so that the metric does not
  depend on the accelerator's default (bf16/tf32) matmul passes; pass
  `precision=None` for speed. Raises ValueError naming the file or folder and
  every missing or mis-shaped key.
  """
  if isinstance(path, str | os.PathLike) and os.path.isdir(path):
    params = weights.load_converted(path, "lpips")["params"]
    weights.check_variables(params, _abstract_params(), source=repr(os.fspath(path)))
    return LPIPS(params, dtype=dtype, precision=precision)
  state_dict = weights.load_state_dicts(path)
  source = (
    os.fspath(path) if isinstance(path, str | os.PathLike) else str([os.fspath(p) for p in path])
  )
  params = lpips_params_from_state_dict(state_dict, source=source)
  return LPIPS(params, dtype=dtype, precision=precision)
