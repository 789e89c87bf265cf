"""Transformer building blocks shared by the tokenizer, the AR prior and the generator.

Pre-LN blocks (LayerNorm -> attention -> residual, LayerNorm -> MLP ->
residual) as in ViT / LARP. On accelerators attention goes through
`jax.nn.dot_product_attention`, so backends with fused kernels (cuDNN flash
attention on GPU, Pallas/Mosaic on TPU) use them without code changes; on
CPU it is our fused FFI kernel (`avtok_jax/kernels/cpu_attention.py`), or,
where that cannot be compiled, `explicit_attention`: the same maths in XLA
ops laid out head-major with a hand-written backward pass (see there).

Precision: parameters are stored in `param_dtype` (float32); matmuls run in
`dtype` (float32 or bfloat16); LayerNorm statistics are always computed in
float32 and the residual stream stays in float32, so that bfloat16 only
touches the matmul inputs.

Every parameter carries logical axis names (see `avtok_jax/sharding.py`);
activations are constrained to ('batch', 'length', 'embed') between blocks.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avtok_jax.kernels import cpu_attention

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


def first_argmax(x: jax.Array) -> jax.Array:
  """int32 index of the first maximum along the last axis: `jnp.argmax` for finite inputs.

  Written as a max-reduce followed by a min-reduce over the indices that reach
  it, because XLA CPU emits `jnp.argmax`'s (value, index) tuple reduce as a
  scalar loop: with Gumbel noise fused into it (`gumbel_max`) that loop ran
  1.8x slower than these two reductions (bench note in bench/README.md).
  Rows holding NaN give the last index instead of the NaN's.
  """
  size = x.shape[-1]
  best = jnp.max(x, axis=-1, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  first = jnp.min(jnp.where(x == best, index, size), axis=-1)
  return jnp.minimum(first, size - 1)


def gumbel_max(key: jax.Array, logits: jax.Array) -> jax.Array:
  """A sample of softmax(logits) along the last axis (int32): argmax(logits + Gumbel noise).

  The same draw as `jax.random.categorical(key, logits, axis=-1)` (one
  `jax.random.gumbel(key, logits.shape)`, first index on ties), computed
  with `first_argmax`.
  """
  return first_argmax(logits + jax.random.gumbel(key, logits.shape, logits.dtype))


def sample_categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
  """A sample of softmax(logits) along the last axis (int32), in two stages for large K.

  Gumbel-max over all K entries draws K random numbers per row; on CPU that
  dominated the AR prior's scheduled sampling (8 x 128 rows of 8192 codes:
  159 ms against 11 ms this way, bench note in docs/results/learning.md).
  With K = b * m (b the largest divisor of K up to sqrt(K)), a block is drawn
  from the blocks' total probabilities (logsumexp of each block's logits),
  then an entry of that block from its own logits: P(block) P(entry | block)
  = softmax(logits), exactly, with b + m random numbers per row. Falls back
  to `gumbel_max` when K has no such divisor (b = 1).
  """
  size = logits.shape[-1]
  blocks = max((d for d in range(1, math.isqrt(size) + 1) if size % d == 0), default=1)
  if blocks == 1:
    return gumbel_max(key, logits)
  key_block, key_entry = jax.random.split(key)
  grouped = logits.reshape(*logits.shape[:-1], blocks, size // blocks)
  block = gumbel_max(key_block, jax.nn.logsumexp(grouped, axis=-1))
  inner = jnp.take_along_axis(grouped, block[..., None, None], axis=-2)[..., 0, :]
  return block * (size // blocks) + gumbel_max(key_entry, inner)


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
    # Computed on [tokens, width]: on [B, L, ...] operands XLA:CPU's fused
    # elementwise loops after the matmuls (bias, GELU and their gradients)
    # index through bitcasts and ran ~1.4x slower (LayerNorm + MLP fwd+bwd
    # 9.8-10.8 vs 14.3-15.0 ms; the small train step 284.3 vs 321.2 ms,
    # bench/README.md). The logical constraint stays on the [B, L, mlp] view.
    lead, width = x.shape[:-1], x.shape[-1]
    h = nn.Dense(
      self.hidden_dim,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_kernel(("embed", "mlp")),
      bias_init=_zeros(("mlp",)),
      name="fc1",
    )(x.reshape(-1, width))
    h = nn.with_logical_constraint(h.reshape(*lead, self.hidden_dim), ("batch", "length", "mlp"))
    h = nn.gelu(h.reshape(-1, self.hidden_dim), approximate=True)
    return nn.Dense(
      width,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_kernel(("mlp", "embed")),
      bias_init=_zeros(("embed",)),
      name="fc2",
    )(h).reshape(x.shape)


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


def _heads_first(x: jax.Array) -> jax.Array:
  """[B, L, heads, d] <-> [B, heads, L, d]."""
  return jnp.swapaxes(x, 1, 2)


def _attention_probs(q: jax.Array, k: jax.Array, causal: bool) -> jax.Array:
  """float32 softmax(q k^T) [B, heads, Lq, Lk] of (already scaled) head-major q, k [B, heads, L, d]."""
  s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  if causal:
    # Top-left aligned, as jax.nn.dot_product_attention(is_causal=True).
    s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -1e30)
  e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
  return e * (1.0 / jnp.sum(e, axis=-1, keepdims=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def explicit_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = False) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v for q, k, v [B, L, heads, d], with a hand-written VJP.

  Equal to `jax.nn.dot_product_attention` (to float32 rounding; tested), but
  faster on XLA CPU, forward and backward:

  * the matmuls run head-major: q, k, v are transposed once to
    [B, heads, L, d] and the output back. With [B, L, heads, d] operands
    XLA CPU computed P.V into a transposed [B, heads, d, L] result and took
    5-6 ms for it against 2.6 ms head-major (B=8, L=192, d=32, 4 heads);
    forward alone 5.7 against 7.8 ms for `jax.nn.dot_product_attention`
    (medians of 10 alternating rounds, bench/README.md);
  * the backward is the textbook one (dv = P^T dO, dP = dO V^T,
    dS = P * (dP - rowsum(dO * O)), dq = dS K, dk = dS^T q; as in
    FlashAttention's backward, Dao et al. 2022, without the tiling), saving
    P and O instead of letting autodiff replay the softmax: fewer passes
    over the [B, heads, L, L] arrays and no transposed copies of P.
  """
  return _explicit_attention_fwd(q, k, v, causal)[0]


def _explicit_attention_fwd(q, k, v, causal):
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  q, k, v = _heads_first(q), _heads_first(k), _heads_first(v)
  p = _attention_probs(q, k, causal)
  out = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v)
  return _heads_first(out), (q, k, v, p, out)


def _explicit_attention_bwd(causal, residuals, d_out):
  del causal  # masked entries of P are 0, so they get no gradient.
  q, k, v, p, out = residuals
  d_out = _heads_first(d_out)
  f32 = jnp.float32
  dv = jnp.einsum("bhqk,bhqd->bhkd", p.astype(d_out.dtype), d_out, preferred_element_type=f32)
  dp = jnp.einsum("bhqd,bhkd->bhqk", d_out, v, preferred_element_type=f32)
  delta = jnp.einsum("bhqd,bhqd->bhq", d_out, out, preferred_element_type=f32)
  ds = (p * (dp - delta[..., None])).astype(q.dtype)
  dq = jnp.einsum("bhqk,bhkd->bhqd", ds, k, preferred_element_type=f32) * (q.shape[-1] ** -0.5)
  dk = jnp.einsum("bhqk,bhqd->bhkd", ds, q, preferred_element_type=f32)
  dq, dk, dv = _heads_first(dq), _heads_first(dk), _heads_first(dv)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


explicit_attention.defvjp(_explicit_attention_fwd, _explicit_attention_bwd)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool) -> jax.Array:
  """Attention of q, k, v [B, L, heads, d] with the fastest implementation of the backend.

  CPU: the fused FFI kernel `kernels.cpu_attention.attention` when it builds
  here (else, or with `AVTOK_CPU_ATTENTION=xla`, `explicit_attention`);
  GPU / TPU: `jax.nn.dot_product_attention` (cuDNN / Pallas kernels).
  """
  if jax.default_backend() == "cpu":
    if cpu_attention.available():
      return cpu_attention.attention(q, k, v, causal)
    return explicit_attention(q, k, v, causal)
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal)


class Attention(nn.Module):
  """Multi-head self-attention (`dot_product_attention`)."""

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
    out = dot_product_attention(q, k, v, self.causal)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    return HeadProjection(
      self.num_heads, head_dim, width, to_heads=False, use_bias=True, **kw, name="out"
    )(out)


class Block(nn.Module):
  """Pre-LN transformer block; the residual stream stays in float32.

  `modalities` non-empty: the two LayerNorms are per modality
  (`{m}_norm1`, `{m}_norm2`) and the call names the stream that runs
  (`modality=`); attention and MLP weights are shared. Empty: one
  `norm1` / `norm2` (the generator, the prior).
  """

  num_heads: int
  mlp_dim: int
  qkv_bias: bool = False
  causal: bool = False
  modalities: tuple[str, ...] = ()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _norm(self, name: str, modality: str | None) -> LayerNorm:
    return LayerNorm(param_dtype=self.param_dtype, name=_norm_name(name, modality, self.modalities))

  @nn.compact
  def __call__(self, x: jax.Array, modality: str | None = None) -> jax.Array:
    x = nn.with_logical_constraint(x.astype(jnp.float32), ("batch", "length", "embed"))
    h = self._norm("norm1", modality)(x).astype(self.dtype)
    h = Attention(
      self.num_heads,
      qkv_bias=self.qkv_bias,
      causal=self.causal,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="attn",
    )(h)
    x = x + h.astype(jnp.float32)
    h = self._norm("norm2", modality)(x).astype(self.dtype)
    h = Mlp(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(h)
    x = x + h.astype(jnp.float32)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


def _norm_name(name: str, modality: str | None, modalities: tuple[str, ...]) -> str:
  """`name` for shared norms, `{modality}_{name}` for per-modality ones (checked)."""
  if not modalities:
    if modality is not None:
      raise ValueError(f"modality={modality!r} given to a stack without per-modality norms.")
    return name
  if modality not in modalities:
    raise ValueError(f"modality={modality!r} must be one of {modalities}.")
  return f"{modality}_{name}"


class _ScanBlock(Block):
  """Block with the (carry, output) signature that `nn.scan` expects."""

  @nn.compact
  def __call__(self, x: jax.Array, modality: str | None = None) -> tuple[jax.Array, None]:
    return super().__call__(x, modality), None


class Transformer(nn.Module):
  """A stack of `depth` pre-LN blocks (+ final LayerNorm).

  `modalities` non-empty: every LayerNorm (the blocks' and the final one) is
  per modality and `__call__` takes `modality=`; everything else is shared
  by the streams (AVTok's "separate normalization layers per modality,
  sharing the remaining parameters" [paper]).

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
  modalities: tuple[str, ...] = ()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, modality: str | None = None) -> jax.Array:
    kwargs = dict(
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      qkv_bias=self.qkv_bias,
      causal=self.causal,
      modalities=tuple(self.modalities),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    x = x.astype(jnp.float32)
    if self.scan:
      block_cls = _ScanBlock
      if self.remat:
        # prevent_cse=False is the recommended setting under scan (Flax docs).
        block_cls = nn.remat(block_cls, prevent_cse=False, static_argnums=(2,))
      stack = nn.scan(
        block_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=self.depth,
        # The modality is a static string, the same for every layer.
        in_axes=(nn.broadcast,),
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x, _ = stack(**kwargs, name="blocks")(x, modality)
    else:
      # The modality (a string) is static: argument 2 of Block.__call__ counting self.
      block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
      for i in range(self.depth):
        x = block_cls(**kwargs, name=f"block_{i}")(x, modality)
    if self.final_norm:
      name = _norm_name("norm", modality, tuple(self.modalities))
      x = LayerNorm(param_dtype=self.param_dtype, name=name)(x)
    return x
