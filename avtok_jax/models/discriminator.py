"""Patch discriminators for the GAN term: 3D conv on videos, 2D conv on mel spectrograms.

PatchGAN-style (Isola et al. 2017): a few strided convolutions with
LeakyReLU(0.2), GroupNorm on every block but the first, and a final
convolution to one logit per output cell, so the discriminator judges local
patches and its output is a grid of logits. Convolutions use SAME padding,
so any input size works (the tiny 4x32x32 / 32x64 and the paper 16x128x128 /
80x384 presets alike); each block halves the spatial axes.

[LARP] uses a transformer discriminator on video patches; AVTOK.md section 3
leaves the choice open and the issue allows a 3D-conv one, which is cheaper
on our CPUs and needs no position tables per input size [ours].

Losses (non-saturating, LeCam) live in `avtok_jax/losses.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def _conv_kernel_init(names: tuple[str | None, ...]):
  """LeCun-normal conv kernel drawn as a [prod(spatial) * C_in, C_out] matrix, then reshaped.

  Same distribution (the fan-in is the same), but XLA:CPU compiles random
  draws of rank-4/5 shapes 10-20x slower than rank-2 ones (measured with jax
  0.10.2: ~10-18 s vs ~1 s per kernel), which dominated the init time.
  """
  base = nn.initializers.lecun_normal()

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
    return base(key, (math.prod(shape[:-1]), shape[-1]), dtype).reshape(shape)

  return nn.with_logical_partitioning(init, names)


class _ConvDiscriminator(nn.Module):
  """Shared body: strided conv blocks + 1-channel conv head, any number of spatial axes."""

  channels: Sequence[int]
  kernel: tuple[int, ...]
  strides: Sequence[tuple[int, ...]]
  head_kernel: tuple[int, ...]
  use_norm: bool = True
  num_groups: int = 32
  negative_slope: float = 0.2
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, *spatial, C_in] -> float32 logits [B, *spatial_out]."""
    n_spatial = len(self.kernel)
    spatial_none = (None,) * n_spatial
    kernel_names = (*spatial_none, "conv_in", "conv_out")
    act_names = ("batch", *spatial_none, "conv_out")
    x = x.astype(self.dtype)
    for i, (features, stride) in enumerate(zip(self.channels, self.strides, strict=True)):
      x = nn.Conv(
        features,
        self.kernel,
        strides=stride,
        padding="SAME",
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=_conv_kernel_init(kernel_names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
        name=f"conv_{i}",
      )(x)
      x = nn.with_logical_constraint(x, act_names)
      # No norm on the first block (PatchGAN): it would erase the input's
      # global statistics, which are informative for real vs fake.
      if self.use_norm and i > 0:
        x = nn.GroupNorm(
          num_groups=math.gcd(self.num_groups, features),
          dtype=jnp.float32,
          param_dtype=self.param_dtype,
          scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("conv_out",)),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
          name=f"norm_{i}",
        )(x.astype(jnp.float32))
      x = nn.leaky_relu(x, self.negative_slope).astype(self.dtype)
    logits = nn.Conv(
      1,
      self.head_kernel,
      padding="SAME",
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_conv_kernel_init((*spatial_none, "conv_in", None)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
      name="head",
    )(x)
    return logits[..., 0].astype(jnp.float32)


class VideoDiscriminator(nn.Module):
  """3D-conv patch discriminator on videos.

  Each block: Conv3D kernel (3, 4, 4), stride (st, 2, 2) -> [GroupNorm] ->
  LeakyReLU(0.2). The first block keeps time (st = 1), the others halve it
  (until it reaches 1), so the 16x128x128 paper clip gives a 4x16x16 grid of
  logits with the default three blocks and the tiny 4x32x32 clip a 1x4x4 grid.

  Input: [B, T, H, W, 3] in [-1, 1]. Output: float32 logits [B, t, h, w].
  """

  channels: Sequence[int] = (64, 128, 256)
  use_norm: bool = True
  num_groups: int = 32
  negative_slope: float = 0.2
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, video: jax.Array) -> jax.Array:
    if video.ndim != 5:
      raise ValueError(f"VideoDiscriminator expects [B, T, H, W, C], got {tuple(video.shape)}.")
    strides = tuple((1 if i == 0 else 2, 2, 2) for i in range(len(self.channels)))
    return _ConvDiscriminator(
      channels=tuple(self.channels),
      kernel=(3, 4, 4),
      strides=strides,
      head_kernel=(3, 3, 3),
      use_norm=self.use_norm,
      num_groups=self.num_groups,
      negative_slope=self.negative_slope,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="body",
    )(video)


class MelDiscriminator(nn.Module):
  """2D-conv patch discriminator on normalised log-mel spectrograms.

  The mel is read as a one-channel image (bins x frames), as the tokenizer
  reads it; the channel axis is added here. Each block: Conv2D 4x4, stride 2
  -> [GroupNorm] -> LeakyReLU(0.2): the 80x384 paper mel gives a 10x48 grid
  of logits with three blocks, the tiny 32x64 mel a 4x8 grid.

  Input: [B, F, L]. Output: float32 logits [B, f, l].
  """

  channels: Sequence[int] = (64, 128, 256)
  use_norm: bool = True
  num_groups: int = 32
  negative_slope: float = 0.2
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, mel: jax.Array) -> jax.Array:
    if mel.ndim != 3:
      raise ValueError(f"MelDiscriminator expects [B, F, L], got {tuple(mel.shape)}.")
    return _ConvDiscriminator(
      channels=tuple(self.channels),
      kernel=(4, 4),
      strides=((2, 2),) * len(self.channels),
      head_kernel=(3, 3),
      use_norm=self.use_norm,
      num_groups=self.num_groups,
      negative_slope=self.negative_slope,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="body",
    )(mel[..., None])
