"""Vector quantizer with an l2-normalized, factorized codebook sharded over the mesh.

The quantizer of LARP [LARP] (itself the LlamaGen / ViT-VQGAN recipe): the
encoder output is projected to a low-dimensional code space (`code_dim`, 16),
both the input and the codebook entries are l2-normalized, and the nearest
code is the one with the largest cosine similarity (for unit vectors this is
the same as the smallest Euclidean distance). Training passes the decoder's
gradient to the encoder by the straight-through estimator [LARP] or the
rotation trick (`gradient`) and uses the usual two VQ-VAE losses
(commitment 0.25, codebook 1.0 [LARP]); optionally the code is *sampled* from
softmax(cos / T), T = 0.03 [LARP], instead of taken by argmax.

Sharding. The codebook parameter carries the logical axes ('vocab', 'code').
When a mesh is set (`jax.set_mesh`) and the logical rules map 'vocab' onto
mesh axes of total size m > 1, the search, the lookup and the code histogram
run inside `jax.shard_map`, manual over the vocab axes and over the 'batch'
axes (the flattened tokens are split over those when their number divides;
otherwise the batch axes stay automatic, which is still correct):

* search: each device scores its tokens against its [K/m, code_dim] slice,
  keeps the local best score and its *global* index (local index + the
  shard's offset); `pmax` over the vocab axes gives the best score and `pmin`
  over the indices of the shards that reach it picks the lowest index, which
  is exactly the tie-breaking of `jnp.argmax` on the full row. The
  [tokens, K] score matrix only ever exists as [tokens/d, K/m] blocks.
* lookup: each device gathers the rows it owns, writes zeros elsewhere, and a
  `psum` over the vocab axes assembles the vectors (x + 0 + ... + 0 is
  exact). The codebook gradient is scatter-added per device and summed over
  the batch axes: a [K/m, code_dim] all-reduce, tokens are never gathered.
* histogram: each device counts its tokens' codes that fall in its slice,
  then sums over the batch axes, so the counts stay sharded like the codebook.

Without a mesh, with 'vocab' unmapped, or with vocab axes of size 1, the
same math runs as plain jnp. Tested with Auto mesh axes (`sharding.make_mesh`).

Stochastic choice (Gumbel-max on cos / T): the noise of (token n, code k) is
element (n, k) of one `jax.random.gumbel(key, (tokens, K))` draw, constrained
to the same [tokens/d, K/m] blocks as the scores, so each device only
computes its block. Guarantee: with JAX's partitionable threefry (the default,
`jax_threefry_partitionable=True`) those values do not depend on the
sharding, so for the same key, inputs and codebook the sampled codes are the
same unsharded and on any mesh. They do depend on a token's position in the
flattened batch (as any per-position noise would).

Memory: the [tokens/d, K/m] score block (float32) is the peak of this
module; at the paper's sizes (8192 codes, 1152 tokens per clip) that is
37.7 MB per clip on a device holding the whole codebook.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from avtok_jax.models import layers

Dtype = Any

# The search runs in float32 at full matmul precision: code_dim is 16, so it
# is cheap, and TPUs would otherwise use bf16 passes for float32 matmuls,
# which can flip near-ties and break sharded == unsharded.
_SEARCH_PRECISION = lax.Precision.HIGHEST


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along `axis`, computed in float32 (as torch's F.normalize)."""
  x = x.astype(jnp.float32)
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  # rsqrt(max(|x|^2, eps^2)) has a finite gradient at x = 0, unlike a norm.
  return x * lax.rsqrt(jnp.maximum(sq, eps * eps))


def usage_metrics(counts: jax.Array) -> dict[str, jax.Array]:
  """Codebook health from a code histogram `counts` [K] (batch or cumulative).

  Returns {'codebook_usage': fraction of entries with count > 0,
  'codebook_perplexity': exp(entropy of counts / sum(counts))}. An empty
  histogram gives usage 0 and perplexity 1.
  """
  counts = jnp.asarray(counts, jnp.float32)
  total = jnp.sum(counts)
  probs = counts / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)
  entropy = jnp.sum(jax.scipy.special.entr(probs))  # -p log p, 0 at p = 0.
  return {
    "codebook_usage": jnp.mean((counts > 0).astype(jnp.float32)),
    "codebook_perplexity": jnp.exp(entropy),
  }


@flax.struct.dataclass
class QuantizerOutput:
  """What `VectorQuantizer.__call__` returns (shapes for an input [..., code_dim])."""

  quantized: jax.Array  # [..., code_dim]: value codebook()[codes], gradient to z (`gradient`).
  codes: jax.Array  # int32 [...]
  z: jax.Array  # [..., code_dim]: the l2-normalized input.
  commit_loss: jax.Array  # scalar: mean (sg(q) - z)^2 over unmasked positions and code dims.
  codebook_loss: jax.Array  # scalar: mean (q - sg(z))^2 over unmasked positions and code dims.
  loss: jax.Array  # commit_weight * commit_loss + codebook_weight * codebook_loss.
  perplexity: jax.Array  # scalar: exp(entropy) of this batch's (unmasked) code histogram.
  usage: jax.Array  # scalar: fraction of codebook entries used in this batch.


# ------------------------------------------------------------------------------
# Mesh helpers.
# ------------------------------------------------------------------------------


def _mesh_axes_for(logical_name: str) -> tuple[str, ...]:
  """Mesh axes of size > 1 that the current logical rules map `logical_name` to.

  Empty when no mesh is set or the rules leave the name unmapped. Axes that
  are already manual (inside an enclosing shard_map) are left out.
  """
  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()
  if mesh.empty or not rules:
    return ()
  spec = nn.logical_to_mesh_axes((logical_name,), rules)
  entry = spec[0] if spec is not None and len(spec) else None
  if entry is None:
    return ()
  names = (entry,) if isinstance(entry, str) else tuple(entry)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
  types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
  return tuple(
    a for a in names if a in sizes and sizes[a] > 1 and types[a] != jax.sharding.AxisType.Manual
  )


def vocab_mesh_axes() -> tuple[str, ...]:
  """Mesh axes that shard the logical axis 'vocab' (the codebook rows) right now.

  Empty (plain jnp path) without a mesh, when the rules leave 'vocab'
  unmapped, or when the mapped axes have total size 1.
  """
  return _mesh_axes_for("vocab")


def _axes_size(axes: tuple[str, ...]) -> int:
  """Number of shards the current mesh's `axes` split an array into."""
  mesh = jax.sharding.get_abstract_mesh()
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
  return math.prod(sizes[a] for a in axes)


class _Layout(NamedTuple):
  """How the sharded kernels split their work (all axes are manual in shard_map)."""

  vocab_axes: tuple[str, ...]  # split the codebook rows; empty = unsharded.
  token_axes: tuple[str, ...]  # split the flattened tokens (the 'batch' mesh axes).
  shard_size: int  # codebook rows per vocab shard.

  @property
  def tokens(self) -> str | tuple[str, ...] | None:
    """PartitionSpec entry of the token dimension."""
    return self.token_axes or None

  @property
  def axis_names(self) -> set[str]:
    return set(self.vocab_axes + self.token_axes)


def _layout(num_tokens: int, num_codes: int) -> _Layout:
  """The layout for `num_tokens` flattened tokens against `num_codes` codes."""
  vocab_axes = vocab_mesh_axes()
  if not vocab_axes:
    return _Layout((), (), num_codes)
  num_shards = _axes_size(vocab_axes)
  if num_codes % num_shards:
    raise ValueError(
      f"codebook_size {num_codes} is not divisible by the {num_shards} shards of the "
      f"vocab mesh axes {vocab_axes}."
    )
  # Tokens are also split manually over the batch axes, so that the scatters
  # (code histogram, codebook gradient) reduce [K/m]-sized partial results
  # over those axes instead of gathering [tokens, code_dim] inputs. When the
  # token count does not divide, those axes stay automatic (still correct).
  token_axes = tuple(a for a in _mesh_axes_for("batch") if a not in vocab_axes)
  if token_axes and num_tokens % _axes_size(token_axes):
    token_axes = ()
  return _Layout(vocab_axes, token_axes, num_codes // num_shards)


def _shard_offset(layout: _Layout) -> jax.Array:
  """Global index of this vocab shard's first row (inside shard_map)."""
  # axis_index over several axes linearizes them major-to-minor, the same
  # order PartitionSpec(('a', 'b')) uses to lay out the shards.
  return lax.axis_index(layout.vocab_axes) * layout.shard_size


# ------------------------------------------------------------------------------
# Per-shard kernels (also the whole computation when unsharded, offset 0).
# ------------------------------------------------------------------------------


def _local_best(
  z: jax.Array,
  codebook: jax.Array,
  offset: jax.Array | int,
  noise: jax.Array | None,
  temperature: float,
) -> tuple[jax.Array, jax.Array]:
  """Best score and its global code index among `codebook` rows (a shard or all of it).

  Deterministic: score = cos. Stochastic (noise given): score = cos / T +
  Gumbel noise, whose argmax is a sample of softmax(cos / T) (Gumbel-max).
  """
  scores = jnp.einsum("nd,kd->nk", z, codebook, precision=_SEARCH_PRECISION)
  if noise is not None:
    scores = scores / temperature + noise
  # first_argmax returns the first maximal index (lowest index on ties), as jnp.argmax.
  return jnp.max(scores, axis=-1), layers.first_argmax(scores) + offset


def _local_lookup(codes: jax.Array, codebook: jax.Array, offset: jax.Array | int) -> jax.Array:
  """Rows of `codebook` for the codes it owns, zeros for the others."""
  local = codes - offset
  inside = (local >= 0) & (local < codebook.shape[0])
  rows = jnp.take(codebook, jnp.where(inside, local, 0), axis=0)
  return jnp.where(inside[:, None], rows, jnp.zeros_like(rows))


def _local_histogram(
  codes: jax.Array, weights: jax.Array, shard_size: int, offset: jax.Array | int
) -> jax.Array:
  """Weighted counts of the codes in [offset, offset + shard_size)."""
  local = codes - offset
  inside = (local >= 0) & (local < shard_size)
  # Out-of-shard codes go to index shard_size, which mode='drop' discards
  # (negative indices would wrap around instead).
  index = jnp.where(inside, local, shard_size)
  return jnp.zeros((shard_size,), jnp.float32).at[index].add(weights, mode="drop")


# ------------------------------------------------------------------------------
# Sharded / unsharded dispatch.
# ------------------------------------------------------------------------------


def nearest_codes(
  z: jax.Array,
  codebook: jax.Array,
  *,
  key: jax.Array | None = None,
  temperature: float = 1.0,
) -> jax.Array:
  """int32 [N] codes of unit vectors z [N, D] against a unit-row codebook [K, D].

  argmax cosine similarity, or (with `key`) a sample of softmax(cos / T).
  Sharded over the vocab mesh axes when the context maps 'vocab' to any.
  """
  num_tokens, num_codes = z.shape[0], codebook.shape[0]
  layout = _layout(num_tokens, num_codes)
  noise = None
  if key is not None:
    # Noise of (token n, code k) = element (n, k) of one draw on the full
    # logical shape. With partitionable threefry (the JAX default) each
    # device computes only its block and the values do not depend on the
    # layout, so sampled codes are the same on any mesh and unsharded.
    noise = jax.random.gumbel(key, (num_tokens, num_codes), jnp.float32)
    if layout.vocab_axes:
      tokens = layout.tokens if layout.token_axes else P.UNCONSTRAINED
      noise = lax.with_sharding_constraint(noise, P(tokens, layout.vocab_axes))
  if not layout.vocab_axes:
    return _local_best(z, codebook, 0, noise, temperature)[1]

  def search(z, codebook, *noise):
    best, index = _local_best(
      z, codebook, _shard_offset(layout), noise[0] if noise else None, temperature
    )
    global_best = lax.pmax(best, layout.vocab_axes)
    # Among shards reaching the global best, the lowest global index wins.
    candidate = jnp.where(best == global_best, index, num_codes)
    return lax.pmin(candidate, layout.vocab_axes)

  args = (z, codebook) + ((noise,) if noise is not None else ())
  in_specs = (P(layout.tokens, None), P(layout.vocab_axes, None))
  in_specs += (P(layout.tokens, layout.vocab_axes),) if noise is not None else ()
  return jax.shard_map(
    search, in_specs=in_specs, out_specs=P(layout.tokens), axis_names=layout.axis_names
  )(*args)


def lookup_codes(codes: jax.Array, codebook: jax.Array) -> jax.Array:
  """codebook[codes] for int codes [N] (sharded over the vocab mesh axes when mapped)."""
  layout = _layout(codes.shape[0], codebook.shape[0])
  if not layout.vocab_axes:
    return jnp.take(codebook, codes, axis=0)

  def gather(codes, codebook):
    rows = _local_lookup(codes, codebook, _shard_offset(layout))
    # The gradient w.r.t. the (token-invariant) codebook shard is psum-ed
    # over the token axes by shard_map's transpose.
    return lax.psum(rows, layout.vocab_axes)

  return jax.shard_map(
    gather,
    in_specs=(P(layout.tokens), P(layout.vocab_axes, None)),
    out_specs=P(layout.tokens, None),
    axis_names=layout.axis_names,
  )(codes, codebook)


def code_histogram(codes: jax.Array, weights: jax.Array, num_codes: int) -> jax.Array:
  """float32 [num_codes] weighted histogram of int codes [N] (sharded like the codebook)."""
  layout = _layout(codes.shape[0], num_codes)
  if not layout.vocab_axes:
    return _local_histogram(codes, weights, num_codes, 0)

  def count(codes, weights):
    counts = _local_histogram(codes, weights, layout.shard_size, _shard_offset(layout))
    return lax.psum(counts, layout.token_axes) if layout.token_axes else counts

  return jax.shard_map(
    count,
    in_specs=(P(layout.tokens), P(layout.tokens)),
    out_specs=P(layout.vocab_axes),
    axis_names=layout.axis_names,
  )(codes, weights)


def _activation_names(ndim: int, last: str | None) -> tuple[str | None, ...]:
  """Logical names of an activation [batch, length..., last] of rank `ndim`."""
  if ndim <= 1:
    return (last,) * ndim
  return ("batch",) + ("length",) * (ndim - 2) + (last,)


# ------------------------------------------------------------------------------
# The module.
# ------------------------------------------------------------------------------


GRADIENTS = ("straight_through", "rotation")


def _rotate_onto(z: jax.Array, q: jax.Array) -> jax.Array:
  """R z for unit rows z, q [N, D], with R = I - 2 r r^T + 2 q z^T (r = (z + q) / |z + q|) constant.

  R is the rotation in the plane of z and q that takes z to q (Fifty et al.
  2024, eq. 4, for unit vectors where their scale factor is 1): the value is
  q up to rounding, and the gradient w.r.t. z is R^T times the incoming one.
  For z = -q (measure zero) r is undefined; the eps keeps it finite.
  """
  zs = lax.stop_gradient(z)
  r = l2_normalize(zs + q)
  proj_r = jnp.sum(r * z, axis=-1, keepdims=True)
  proj_z = jnp.sum(zs * z, axis=-1, keepdims=True)
  rotated = z - 2.0 * r * proj_r + 2.0 * q * proj_z
  # Exactly q in value (the rotation's rounding error is ~1e-7): the forward
  # pass then matches straight-through bit for bit.
  return q + (rotated - lax.stop_gradient(rotated))


class VectorQuantizer(nn.Module):
  """l2-normalized VQ (straight-through or rotation-trick gradients), vocab-sharded codebook.

  Attributes:
    codebook_size: number of codebook entries K.
    code_dim: dimension of the code vectors (16 [LARP]).
    init_std: std of the N(0, s^2) init of the raw codebook rows. The rows
      are l2-normalised at use, so s only sets how far an optimizer step
      turns them: with Adam a row of norm ~s*sqrt(code_dim) turns by about
      lr / (s*sqrt(code_dim)) radians per step [ours].
    commit_weight: weight of the commitment loss (0.25 [LARP]).
    codebook_weight: weight of the codebook loss (1.0 [LARP]).
    temperature: T of the stochastic choice softmax(cos / T) (0.03 [LARP]).
    gradient: how the decoder's gradient reaches z. 'straight_through'
      (VQ-VAE, [LARP]): copied unchanged. 'rotation' (the rotation trick,
      Fifty et al. 2024, "Restructuring Vector Quantization with the
      Rotation Trick", section 4): q is written as R z with R the rotation
      taking z to q (stop-gradient), so the gradient reaching z is R^T times
      the decoder's, i.e. it keeps its angle to z instead of to q.
    dtype: dtype of the returned `quantized` and `z` (the search and the losses
      are float32).
    param_dtype: dtype of the codebook parameter.
  """

  codebook_size: int
  code_dim: int = 16
  init_std: float = 1.0
  commit_weight: float = 0.25
  codebook_weight: float = 1.0
  temperature: float = 0.03
  gradient: str = "straight_through"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    if self.gradient not in GRADIENTS:
      raise ValueError(f"gradient={self.gradient!r} must be one of {GRADIENTS}.")
    self.embedding = self.param(
      "codebook",
      nn.with_logical_partitioning(nn.initializers.normal(stddev=self.init_std), ("vocab", "code")),
      (self.codebook_size, self.code_dim),
      self.param_dtype,
    )
    # Cumulative code counts live outside `params` (they are no parameters and
    # must not be touched by the optimizer). Only declared when they exist or
    # can be created, so params-only applies (e.g. decoding) work.
    if self.is_mutable_collection("codebook_stats") or self.has_variable(
      "codebook_stats", "counts"
    ):
      self.counts = self.variable(
        "codebook_stats",
        "counts",
        nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",)),
        None,
        (self.codebook_size,),
        jnp.float32,
      )
    else:
      self.counts = None

  def codebook(self) -> jax.Array:
    """[K, code_dim] l2-normalized codebook (float32, sharded over 'vocab')."""
    return nn.with_logical_constraint(l2_normalize(self.embedding), ("vocab", "code"))

  def lookup(self, codes: jax.Array) -> jax.Array:
    """l2-normalized code vectors [..., code_dim] of int codes [...], in `dtype`."""
    codes = jnp.asarray(codes, jnp.int32)
    flat = lookup_codes(codes.reshape(-1), self.codebook())
    vectors = flat.reshape(*codes.shape, self.code_dim).astype(self.dtype)
    return nn.with_logical_constraint(vectors, _activation_names(vectors.ndim, "code"))

  def __call__(
    self,
    z: jax.Array,
    *,
    train: bool,
    stochastic: bool = False,
    mask: jax.Array | None = None,
  ) -> QuantizerOutput:
    """Quantizes z [..., code_dim] (any scale: it is l2-normalized here).

    Args:
      z: encoder output projected to code_dim.
      train: training mode (stochastic choice and histogram updates only then).
      stochastic: sample codes from softmax(cos / T) (only when `train`); needs
        the 'sample' rng stream.
      mask: optional bool [...]: True marks positions that count in the losses
        and the statistics (codes are computed everywhere).

    Returns:
      A `QuantizerOutput`.
    """
    if z.shape[-1] != self.code_dim:
      raise ValueError(f"Expected z [..., {self.code_dim}], got shape {z.shape}.")
    lead = z.shape[:-1]
    z = nn.with_logical_constraint(l2_normalize(z), _activation_names(z.ndim, "code"))
    z_flat = z.reshape(-1, self.code_dim)
    codebook = self.codebook()

    key = self.make_rng("sample") if (train and stochastic) else None
    codes_flat = nearest_codes(
      lax.stop_gradient(z_flat), lax.stop_gradient(codebook), key=key, temperature=self.temperature
    )
    q_flat = lookup_codes(codes_flat, codebook)

    if mask is None:
      weights = jnp.ones(codes_flat.shape, jnp.float32)
    else:
      weights = jnp.broadcast_to(mask, lead).reshape(-1).astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(weights), 1.0) * self.code_dim

    # Mean over positions and code dims, the LlamaGen/LARP mse convention
    # that the 0.25 / 1.0 / 0.1 weights were tuned with.
    def masked_mse(a, b):
      return jnp.sum(weights[:, None] * jnp.square(a - b)) / denom

    commit_loss = masked_mse(lax.stop_gradient(q_flat), z_flat)
    codebook_loss = masked_mse(q_flat, lax.stop_gradient(z_flat))
    loss = self.commit_weight * commit_loss + self.codebook_weight * codebook_loss

    hist = code_histogram(codes_flat, weights, self.codebook_size)
    batch_metrics = usage_metrics(hist)
    if train and self.counts is not None and not self.is_initializing():
      if self.is_mutable_collection("codebook_stats"):
        self.counts.value = nn.with_logical_constraint(self.counts.value + hist, ("vocab",))

    if self.gradient == "rotation":
      q_st = _rotate_onto(z_flat, lax.stop_gradient(q_flat))
    else:
      # Straight-through: the value is exactly q (z - sg(z) is exactly 0), the
      # gradient w.r.t. z is the identity and none reaches the codebook.
      q_st = lax.stop_gradient(q_flat) + (z_flat - lax.stop_gradient(z_flat))
    names = _activation_names(z.ndim, "code")
    return QuantizerOutput(
      quantized=nn.with_logical_constraint(q_st.reshape(z.shape).astype(self.dtype), names),
      codes=nn.with_logical_constraint(codes_flat.reshape(lead), names[:-1]),
      z=z.astype(self.dtype),
      commit_loss=commit_loss,
      codebook_loss=codebook_loss,
      loss=loss,
      perplexity=batch_metrics["codebook_perplexity"],
      usage=batch_metrics["codebook_usage"],
    )
