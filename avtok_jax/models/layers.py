"""Transformer building blocks shared by the tokenizer, the AR prior and the generator.

Pre-LN blocks (LayerNorm -> attention -> residual, LayerNorm -> MLP ->
residual) as in ViT / LARP. Attention goes through
`jax.nn.dot_product_attention`, so backends with fused kernels (cuDNN flash
attention on GPU, Pallas/Mosaic on TPU) use them without code changes.

Precision: parameters are stored in `param_dtype` (float32); matmuls run in
`dtype` (float32 or bfloat16); LayerNorm statistics are always computed in
float32 and the residual stream stays in float32, so that bfloat16 only
touches the matmul inputs.

Every parameter carries logical axis names (see `avtok_jax/sharding.py`);
activations are constrained to ('batch', 'length', 'embed') between blocks.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# Kernel initialisation: Xavier-uniform weights, zero biases (the ViT
# convention of big_vision, also used by MAE/LARP-style tokenizers).
_KERNEL_INIT = nn.initializers.xavier_uniform()


def _kernel(names: tuple[str | None, ...], init=_KERNEL_INIT):
  return nn.with_logical_partitioning(init, names)


def _zeros(names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _ones(names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


def sincos_1d(positions: np.ndarray, dim: int) -> np.ndarray:
  """[len(positions), dim] sin-cos table (Vaswani et al. 2017: base 10000).

  The first half of the channels holds sin(pos * w_i), the second half
  cos(pos * w_i), with w_i = 10000^(-i / (dim / 2)).
  """
  if dim % 2:
    raise ValueError(f"sin-cos position embedding needs an even dim, got {dim}.")
  omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
  angles = np.asarray(positions, np.float64)[:, None] * omega[None, :]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def sincos_table(grid: tuple[int, ...], dim: int) -> np.ndarray:
  """Fixed sin-cos position table for a 1D/2D/3D token grid: [prod(grid), dim].

  Rows follow row-major order over `grid` (the token order of
  `avtok_jax.data.patches`). The channels are split evenly between the grid
  axes (axis 0 first), each part a 1D table of that axis' coordinate (the
  MAE 2D construction generalised to n axes); each part gets an even number
  of channels, and channels left over when dim is not divisible are zero.
  """
  grid = tuple(int(g) for g in grid)
  if not grid or any(g < 1 for g in grid):
    raise ValueError(f"Invalid position grid {grid}.")
  per_axis = 2 * (dim // (2 * len(grid)))
  if per_axis == 0:
    raise ValueError(f"dim={dim} is too small for a {len(grid)}-D sin-cos table.")
  coords = np.meshgrid(*[np.arange(g) for g in grid], indexing="ij")
  parts = [sincos_1d(c.reshape(-1), per_axis) for c in coords]
  table = np.concatenate(parts, axis=1)
  pad = dim - table.shape[1]
  if pad:
    table = np.pad(table, ((0, 0), (0, pad)))
  return table


class LayerNorm(nn.LayerNorm):
  """`nn.LayerNorm` computed and returned in float32, with logically named scale/bias."""

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  scale_init: Any = _ones(("embed",))
  bias_init: Any = _zeros(("embed",))


class Mlp(nn.Module):
  """Dense -> GELU (tanh approximation) -> Dense.

  The tanh form of GELU is 4x faster than the erf form on our CPUs
  (ENVIRONMENT.md) and indistinguishable in training.
  """

  hidden_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    h = nn.Dense(
      self.hidden_dim,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_kernel(("embed", "mlp")),
      bias_init=_zeros(("mlp",)),
      name="fc1",
    )(x)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = nn.gelu(h, approximate=True)
    return nn.Dense(
      width,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_kernel(("mlp", "embed")),
      bias_init=_zeros(("embed",)),
      name="fc2",
    )(h)


class HeadProjection(nn.Module):
  """A Dense layer to or from the (heads, head_dim) layout, with a 3-D kernel.

  `nn.DenseGeneral` initialises a flattened 2-D kernel and reshapes it, which
  breaks its 3-D logical names once a mesh is active; this keeps the kernel
  3-D throughout: [embed, heads, kv] (to_heads) or [heads, kv, embed].
  """

  num_heads: int
  head_dim: int
  width: int
  to_heads: bool = True
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.to_heads:
      shape, names = (self.width, self.num_heads, self.head_dim), ("embed", "heads", "kv")
      init = nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))
      bias_shape, bias_names, equation = shape[1:], names[1:], "...d,dhk->...hk"
    else:
      shape, names = (self.num_heads, self.head_dim, self.width), ("heads", "kv", "embed")
      init = nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2)
      bias_shape, bias_names, equation = shape[2:], names[2:], "...hk,hkd->...d"
    kernel = self.param("kernel", _kernel(names, init), shape, self.param_dtype)
    y = jnp.einsum(equation, x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", _zeros(bias_names), bias_shape, self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class Attention(nn.Module):
  """Multi-head self-attention through `jax.nn.dot_product_attention`."""

  num_heads: int
  qkv_bias: bool = False
  causal: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width={width} is not divisible by num_heads={self.num_heads}.")
    head_dim = width // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def proj(name):
      y = HeadProjection(self.num_heads, head_dim, width, use_bias=self.qkv_bias, **kw, name=name)(
        x
      )
      return nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))

    q, k, v = proj("query"), proj("key"), proj("value")
    out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    return HeadProjection(
      self.num_heads, head_dim, width, to_heads=False, use_bias=True, **kw, name="out"
    )(out)


class Block(nn.Module):
  """Pre-LN transformer block; the residual stream stays in float32."""

  num_heads: int
  mlp_dim: int
  qkv_bias: bool = False
  causal: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.with_logical_constraint(x.astype(jnp.float32), ("batch", "length", "embed"))
    h = LayerNorm(param_dtype=self.param_dtype, name="norm1")(x).astype(self.dtype)
    h = Attention(
      self.num_heads,
      qkv_bias=self.qkv_bias,
      causal=self.causal,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="attn",
    )(h)
    x = x + h.astype(jnp.float32)
    h = LayerNorm(param_dtype=self.param_dtype, name="norm2")(x).astype(self.dtype)
    h = Mlp(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(h)
    x = x + h.astype(jnp.float32)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class _ScanBlock(Block):
  """Block with the (carry, output) signature that `nn.scan` expects."""

  @nn.compact
  def __call__(self, x: jax.Array, _: Any = None) -> tuple[jax.Array, None]:
    return super().__call__(x), None


class Transformer(nn.Module):
  """A stack of `depth` pre-LN blocks (+ final LayerNorm).

  `remat` recomputes each block's activations in the backward pass (memory
  for compute); `scan` rolls the blocks into one `nn.scan` loop, so that the
  program (and its compile time) does not grow with depth. With scan the
  block parameters are stacked along a leading 'layers' axis under
  `blocks/`; without it they are `block_0`, `block_1`, ...
  """

  depth: int
  num_heads: int
  mlp_dim: int
  qkv_bias: bool = False
  causal: bool = False
  remat: bool = False
  scan: bool = False
  final_norm: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kwargs = dict(
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      qkv_bias=self.qkv_bias,
      causal=self.causal,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    x = x.astype(jnp.float32)
    if self.scan:
      block_cls = _ScanBlock
      if self.remat:
        # prevent_cse=False is the recommended setting under scan (Flax docs).
        block_cls = nn.remat(block_cls, prevent_cse=False)
      stack = nn.scan(
        block_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=self.depth,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x, _ = stack(**kwargs, name="blocks")(x, None)
    else:
      block_cls = nn.remat(Block) if self.remat else Block
      for i in range(self.depth):
        x = block_cls(**kwargs, name=f"block_{i}")(x)
    if self.final_norm:
      x = LayerNorm(param_dtype=self.param_dtype, name="norm")(x)
    return x
