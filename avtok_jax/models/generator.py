"""Llama-style decoder-only transformer that generates AVTok token sequences (AVTOK.md section 5).

Architecture [Llama; LlamaGen (Sun et al. 2024) for images; LARP's generator]:
token embedding + learned absolute position embedding, pre-RMSNorm blocks
(RMSNorm -> causal multi-head self-attention -> residual, RMSNorm -> SwiGLU
MLP -> residual), a final RMSNorm and an untied output projection. No biases
anywhere. The residual stream and the norms stay in float32; matmuls run in
`dtype` (float32 or bfloat16) on parameters stored in `param_dtype`.

Vocabulary layout [ours; SEP id = codebook size as in AVTOK.md section 5]:

| ids               | meaning                                        |
|-------------------|------------------------------------------------|
| 0 .. K-1          | tokenizer codes (K = codebook size)            |
| K                 | SEP (between the prefix and the generated part)|
| K+1 .. K+C        | class tokens (C classes, class i -> K+1+i)     |
| K+C+1             | the null class (classifier-free guidance)      |

so the vocabulary has K + C + 2 ids (`Vocab`, `vocab_size`). The sequence
layouts per task (A2V: audio codes, SEP, video codes; V2A: video codes, SEP,
audio codes; cJAVG: class token, video codes, audio codes) are the caller's;
this module only sees token ids.

Sharding: the embedding table is ('vocab', 'embed') and the output kernel
('embed', 'vocab'), so both are split over the 'model' mesh axis like the
tokenizer's codebook (avtok_jax/sharding.py); attention kernels are
('embed', 'heads', 'kv') / ('heads', 'kv', 'embed'), the MLP ('embed', 'mlp') /
('mlp', 'embed'); activations between blocks are constrained to
('batch', 'length', 'embed') and the logits to ('batch', 'length', 'vocab').

KV cache (decoding). `Generator.__call__(tokens, decode=True)` reads and
writes the Flax 'cache' collection: per layer `cached_key` and `cached_value`
[B, heads, S, head_dim] (S = cache length; head-major for fast decoding) and `cache_index` (int32 scalar),
plus a top-level `position` (int32 scalar) that gives the absolute position
of the next token. A call with T tokens writes them at positions
position .. position+T-1, attends causally within them and to everything
before them in the cache, adds the position embeddings of those absolute
positions and advances the indices by T. So one call with a P-token prompt
(prefill) followed by calls with one token each (decoding) gives the same
logits as one full forward pass over the whole sequence. Make an empty cache
with `init_cache(model, batch_size, length)` and pass it as
`model.apply({'params': p, 'cache': cache}, tokens, decode=True,
mutable=['cache'])`. Writing past the cache length (or past `max_length`
positions) is NOT checked inside the program (JAX clamps the indices): the
caller sizes the cache (`avtok_jax.sampling` does).

Parameter counts (`count_params`, computed with `jax.eval_shape`; width
1280, 30 layers, SwiGLU 3584, learned positions for max_length 1153 =
1 + 1024 + 128 [paper]): the blocks and the final norm hold 609,562,880
parameters, every vocabulary row costs 1280 in the embedding and 1280 in the
output head, every position 1280. The paper reports 632.0M and 632.4M for
its generators [paper]. We found:

* 632.0M = 609,562,880 + 1280 x (8193 + 8193 + 1153) = 632,012,800: codes +
  SEP in both the embedding and the head, 1153 positions, no class tokens
  (the A2V / V2A generators; with K = 8192 exactly and no SEP it is
  632,010,240, also 632.0M; the 0.1M rounding cannot tell them apart).
* 632.4M = 632.0M + 310 x 1280 = 632,409,600: the same plus an input-only
  table of 309 VGGSound classes + 1 null class (LlamaGen's class embedding
  with a CFG row; 309 rows alone give 632,408,320, also 632.4M). So the
  cJAVG generator reads class tokens but its head does not predict them.
* Our unified layout with the head over the whole vocabulary (8192 + 1 +
  309 + 1 = 8503 ids in and out, 1153 positions) has 632,806,400 (632.8M,
  0.13% above 632.0M). `output_size=K+1` (config `predict_conditions=False`)
  restricts the head to codes + SEP and reproduces the paper's 632.4M exactly;
  with `Vocab(8192, 0)` it gives 632,014,080 (632.0M).
No other (vocab, length) pair near these values fits both figures: the 0.4M
gap between them is one 1280-wide table of ~310 rows.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from avtok_jax.models import layers

Dtype = Any

# Embedding tables (token, position) start at N(0, 0.02) [GPT-2; LlamaGen];
# matmul kernels use the package's Xavier-uniform convention (layers.py).
_EMBED_INIT = nn.initializers.normal(stddev=0.02)
_KERNEL_INIT = nn.initializers.xavier_uniform()


# -----------------------------------------------------------------------------
# Vocabulary layout.
# -----------------------------------------------------------------------------


def sep_id(codebook_size: int) -> int:
  """Id of the SEP token: the codebook size (AVTOK.md section 5)."""
  return int(codebook_size)


def class_id(codebook_size: int, class_index: int | jax.Array) -> int | jax.Array:
  """Id of class `class_index` (0-based): codebook_size + 1 + class_index; works on arrays."""
  return codebook_size + 1 + class_index


def null_class_id(codebook_size: int, num_classes: int) -> int:
  """Id of the null class used as the unconditional prompt of classifier-free guidance."""
  return int(codebook_size) + int(num_classes) + 1


def vocab_size(codebook_size: int, num_classes: int) -> int:
  """Number of token ids: K codes + SEP + C classes + null class = K + C + 2."""
  return int(codebook_size) + int(num_classes) + 2


@dataclasses.dataclass(frozen=True)
class Vocab:
  """The generator's vocabulary: K codes, SEP, C class tokens and a null class (module docstring).

  Attributes:
    codebook_size: K, the tokenizer's codebook size; codes are ids 0..K-1.
    num_classes: C, the number of class tokens (0 for A2V / V2A only).
  """

  codebook_size: int
  num_classes: int = 0

  def __post_init__(self):
    if self.codebook_size < 1 or self.num_classes < 0:
      raise ValueError(
        f"Invalid vocabulary: codebook_size={self.codebook_size}, num_classes={self.num_classes}."
      )

  @property
  def sep(self) -> int:
    """SEP id (= K)."""
    return sep_id(self.codebook_size)

  @property
  def null_class(self) -> int:
    """Null-class id (= K + C + 1)."""
    return null_class_id(self.codebook_size, self.num_classes)

  @property
  def size(self) -> int:
    """Number of ids (= K + C + 2)."""
    return vocab_size(self.codebook_size, self.num_classes)

  @property
  def codes(self) -> tuple[int, int]:
    """Half-open id range [0, K) of the codes: the `allowed` range for sampling codes."""
    return (0, self.codebook_size)

  def class_token(self, class_index: int | jax.Array) -> int | jax.Array:
    """Id of class `class_index` (0-based; int or int array)."""
    if isinstance(class_index, int) and not 0 <= class_index < self.num_classes:
      raise ValueError(f"Class {class_index} is outside 0..{self.num_classes - 1}.")
    return class_id(self.codebook_size, class_index)


# -----------------------------------------------------------------------------
# Layers.
# -----------------------------------------------------------------------------


class RMSNorm(nn.RMSNorm):
  """RMSNorm [Zhang & Sennrich 2019; Llama] computed and returned in float32.

  eps 1e-5 is LlamaGen's `norm_eps`; the scale is named ('embed',).
  """

  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  scale_init: Any = nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",))


class SwiGLU(nn.Module):
  """SwiGLU MLP [Shazeer 2020; Llama]: down(silu(gate(x)) * up(x)), no biases."""

  hidden_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]

    def dense(features, names, name):
      return nn.Dense(
        features,
        use_bias=False,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(_KERNEL_INIT, names),
        name=name,
      )

    gate = dense(self.hidden_dim, ("embed", "mlp"), "gate")(x)
    up = dense(self.hidden_dim, ("embed", "mlp"), "up")(x)
    h = nn.silu(gate) * up
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return dense(width, ("mlp", "embed"), "down")(h)


class CausalSelfAttention(nn.Module):
  """Causal multi-head self-attention without biases, with an optional KV cache.

  decode=False: plain causal attention over the input (`is_causal`).
  decode=True: the T input tokens are written into the 'cache' collection at
  `cache_index` and attend to cache positions <= their own absolute position
  (module docstring). During `init` the cache variables are created empty and
  the call behaves like decode=False.
  """

  num_heads: int
  decode: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"width={width} is not divisible by num_heads={self.num_heads}.")
    head_dim = width // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def proj(name):
      y = layers.HeadProjection(self.num_heads, head_dim, width, use_bias=False, **kw, name=name)(x)
      return nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))

    q, k, v = proj("query"), proj("key"), proj("value")
    if self.decode:
      initialized = self.has_variable("cache", "cached_key")
      # Head-major [B, heads, S, head_dim] [ours]: a decoding step reads the
      # cache without a transpose; at 1153 positions this made cached sampling
      # ~5x faster than a [B, S, heads, head_dim] cache on our CPU
      # (bench/sampling_speed.py).
      # At init the input's length is the cache length (init_cache).
      shape = (batch, self.num_heads, length, head_dim)
      cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
      cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
      if initialized:
        index = cache_index.value
        cache_len = cached_key.value.shape[2]
        names = ("batch", "heads", "length", "kv")
        keys = jax.lax.dynamic_update_slice(
          cached_key.value, jnp.swapaxes(k, 1, 2).astype(cached_key.value.dtype), (0, 0, index, 0)
        )
        values = jax.lax.dynamic_update_slice(
          cached_value.value,
          jnp.swapaxes(v, 1, 2).astype(cached_value.value.dtype),
          (0, 0, index, 0),
        )
        keys = nn.with_logical_constraint(keys, names)
        values = nn.with_logical_constraint(values, names)
        cached_key.value, cached_value.value = keys, values
        cache_index.value = index + length
        # Query t sits at absolute position index + t and sees keys 0..index + t
        # (the rest of the cache is either the future or still empty).
        query_pos = index + jnp.arange(length)
        mask = jnp.arange(cache_len)[None, :] <= query_pos[:, None]
        # dot_product_attention wants [B, S, heads, head_dim]; XLA folds these
        # transposes into the attention matmuls.
        out = jax.nn.dot_product_attention(
          q, jnp.swapaxes(keys, 1, 2), jnp.swapaxes(values, 1, 2), mask=mask[None, None]
        )
      else:
        out = layers.dot_product_attention(q, k, v, causal=True)
    else:
      out = layers.dot_product_attention(q, k, v, causal=True)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    return layers.HeadProjection(
      self.num_heads, head_dim, width, to_heads=False, use_bias=False, **kw, name="out"
    )(out)


class DecoderBlock(nn.Module):
  """Pre-RMSNorm Llama block; the residual stream stays in float32."""

  num_heads: int
  mlp_dim: int
  norm_eps: float = 1e-5
  decode: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.with_logical_constraint(x.astype(jnp.float32), ("batch", "length", "embed"))
    h = RMSNorm(self.norm_eps, param_dtype=self.param_dtype, name="attn_norm")(x)
    h = CausalSelfAttention(
      self.num_heads,
      decode=self.decode,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="attn",
    )(h.astype(self.dtype))
    x = x + h.astype(jnp.float32)
    h = RMSNorm(self.norm_eps, param_dtype=self.param_dtype, name="mlp_norm")(x)
    h = SwiGLU(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(
      h.astype(self.dtype)
    )
    x = x + h.astype(jnp.float32)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class _ScanDecoderBlock(DecoderBlock):
  """DecoderBlock with the (carry, output) signature that `nn.scan` expects."""

  @nn.compact
  def __call__(self, x: jax.Array, _: Any = None) -> tuple[jax.Array, None]:
    return super().__call__(x), None


# -----------------------------------------------------------------------------
# The generator.
# -----------------------------------------------------------------------------


class Generator(nn.Module):
  """Llama-style decoder-only transformer over the `Vocab` ids (module docstring).

  Attributes:
    vocab_size: number of input ids (`Vocab.size`).
    max_length: longest sequence (rows of the learned position table).
    width, depth, num_heads, mlp_dim: transformer sizes (mlp_dim = SwiGLU hidden).
    output_size: number of ids the head predicts (ids 0..output_size-1);
      None = the whole vocabulary. `vocab.sep + 1` predicts codes + SEP only
      (the paper's count, module docstring).
    norm_eps: RMSNorm epsilon (1e-5 [LlamaGen]).
    remat: recompute each block's activations in the backward pass.
    scan: roll the blocks into one `nn.scan` (parameters and caches stacked
      along a leading 'layers' axis under `blocks/`; else `block_0`, ...).
    dtype, param_dtype: compute and parameter dtypes; logits are float32.
  """

  vocab_size: int
  max_length: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  output_size: int | None = None
  norm_eps: float = 1e-5
  remat: bool = False
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def num_outputs(self) -> int:
    """Width of the logits (`output_size`, or the vocabulary size when None)."""
    return self.vocab_size if self.output_size is None else self.output_size

  @nn.compact
  def __call__(self, tokens: jax.Array, *, decode: bool = False) -> jax.Array:
    """Next-token logits.

    Args:
      tokens: [B, T] int ids in [0, vocab_size).
      decode: use and advance the KV cache (the 'cache' collection must be
        passed and mutable, except during `init`).

    Returns:
      [B, T, num_outputs] float32; logits[:, t] predicts the token after
      tokens[:, t] (after absolute position position + t in decode mode).
    """
    batch, length = tokens.shape
    if length > self.max_length:
      raise ValueError(f"Sequence of length {length} exceeds max_length={self.max_length}.")
    if self.output_size is not None and not 0 < self.output_size <= self.vocab_size:
      raise ValueError(f"output_size={self.output_size} must be in 1..{self.vocab_size}.")
    table = self.param(
      "embedding",
      nn.with_logical_partitioning(_EMBED_INIT, ("vocab", "embed")),
      (self.vocab_size, self.width),
      self.param_dtype,
    )
    pos_table = self.param(
      "pos_embed",
      nn.with_logical_partitioning(_EMBED_INIT, ("length", "embed")),
      (self.max_length, self.width),
      self.param_dtype,
    )
    if decode:
      initialized = self.has_variable("cache", "position")
      position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
      start = position.value if initialized else jnp.zeros((), jnp.int32)
      if initialized:
        position.value = start + length
      pos = jax.lax.dynamic_slice_in_dim(pos_table, start, length, axis=0)
    else:
      pos = pos_table[:length]

    x = jnp.take(table, tokens, axis=0).astype(jnp.float32) + pos.astype(jnp.float32)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    kwargs = dict(
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      norm_eps=self.norm_eps,
      decode=decode,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    if self.scan:
      block_cls = _ScanDecoderBlock
      if self.remat:
        # prevent_cse=False is the recommended setting under scan (Flax docs).
        block_cls = nn.remat(block_cls, prevent_cse=False)
      stack = nn.scan(
        block_cls,
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True},
        length=self.depth,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x, _ = stack(**kwargs, name="blocks")(x, None)
    else:
      block_cls = nn.remat(DecoderBlock) if self.remat else DecoderBlock
      for i in range(self.depth):
        x = block_cls(**kwargs, name=f"block_{i}")(x)
    x = RMSNorm(self.norm_eps, param_dtype=self.param_dtype, name="norm")(x)
    logits = nn.Dense(
      self.num_outputs,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.with_logical_partitioning(_KERNEL_INIT, ("embed", "vocab")),
      name="head",
    )(x.astype(self.dtype))
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))


def init_cache(model: Generator, batch_size: int, length: int | None = None) -> dict:
  """An empty KV cache for `batch_size` sequences of up to `length` tokens (default max_length).

  Returns the 'cache' collection (a nested dict of zeros: per layer
  `cached_key` / `cached_value` [batch, heads, length, head_dim] in the
  model's compute dtype and `cache_index` int32 [], stacked along a leading
  layer axis with scan; top-level `position` int32 []). Only shapes are
  traced (no parameters are built). Works inside `jax.jit`.
  """
  length = model.max_length if length is None else int(length)
  if not 0 < length <= model.max_length:
    raise ValueError(f"Cache length {length} must be in 1..max_length={model.max_length}.")
  tokens = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
  shapes = jax.eval_shape(lambda t: model.init(jax.random.key(0), t, decode=True), tokens)["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def count_params(model: Generator) -> int:
  """Number of parameters of `model` (from `jax.eval_shape`; nothing is allocated)."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)["params"]
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes)))


# -----------------------------------------------------------------------------
# Presets and the builder.
# -----------------------------------------------------------------------------

GENERATOR_PRESETS = ("tiny", "small", "L")


def swiglu_hidden(width: int, multiple_of: int) -> int:
  """Llama's SwiGLU hidden size: 2/3 of 4 x width, rounded up to `multiple_of` [Llama].

  1280 -> 3584 with multiple_of 256 (LARP's L); 256 -> 688 with multiple_of 16.
  """
  hidden = int(2 * 4 * width / 3)
  return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def generator_config(size: str = "L") -> ml_collections.ConfigDict:
  """The generator's sizes and knobs (`build_generator` turns them into a `Generator`).

  | size  | width | layers | heads | SwiGLU | params (vocab 8503, 1153 positions) |
  |-------|-------|--------|-------|--------|-------------------------------------|
  | L     | 1280  | 30     | 20    | 3584   | 632.8M (632.0M / 632.4M: docstring) |
  | small | 256   | 6      | 4     | 688    | [ours] CPU demo                     |
  | tiny  | 32    | 2      | 2     | 64     | [ours] tests                        |

  Fields: size, width, depth, num_heads, mlp_dim, norm_eps, predict_conditions
  (True: the head covers the whole vocabulary; False: codes + SEP only, the
  paper's parameter count), remat, scan, dtype, param_dtype.
  """
  if size not in GENERATOR_PRESETS:
    raise ValueError(f"Unknown generator size {size!r}; choose from {GENERATOR_PRESETS}.")
  c = ml_collections.ConfigDict()
  c.size = size
  if size == "L":
    # [LARP] (LlamaGen-L-like widths, 30 layers): 632M with vocab 8192 [paper].
    c.width, c.depth, c.num_heads = 1280, 30, 20
    c.mlp_dim = swiglu_hidden(1280, 256)  # 3584 [LARP]
  elif size == "small":
    c.width, c.depth, c.num_heads = 256, 6, 4  # [ours]
    c.mlp_dim = swiglu_hidden(256, 16)  # 688 [ours, Llama's rule]
  else:  # tiny
    c.width, c.depth, c.num_heads, c.mlp_dim = 32, 2, 2, 64  # [ours]
  c.norm_eps = 1e-5  # [LlamaGen]
  c.predict_conditions = True  # [ours] head over the whole vocabulary
  big = size == "L"
  # bf16 compute with fp32 parameters, remat + scan for the accelerator size [ours].
  c.dtype = "bfloat16" if big else "float32"
  c.param_dtype = "float32"
  c.remat = big
  c.scan = big
  return c


def build_generator(
  gen_config: ml_collections.ConfigDict, vocab: Vocab, max_length: int
) -> Generator:
  """The `Generator` for a `generator_config(...)`, a vocabulary and a sequence length.

  Args:
    gen_config: sizes and knobs (`generator_config`).
    vocab: the token layout (codebook size from the tokenizer, number of classes).
    max_length: longest sequence (prefix + generated tokens), e.g.
      1 + 1024 + 128 = 1153 for the paper's tasks.
  """
  c = gen_config
  return Generator(
    vocab_size=vocab.size,
    max_length=int(max_length),
    width=c.width,
    depth=c.depth,
    num_heads=c.num_heads,
    mlp_dim=c.mlp_dim,
    output_size=None if c.predict_conditions else vocab.sep + 1,
    norm_eps=c.norm_eps,
    remat=c.remat,
    scan=c.scan,
    dtype=jnp.dtype(c.dtype),
    param_dtype=jnp.dtype(c.param_dtype),
  )
