"""AVTok: the shared-weight dual-stream audio-video tokenizer (AVTOK.md section 2).

Single-stream pass, run once per present modality m in {video, audio} with the
SAME encoder, decoder, quantizer projections and codebook [paper, figure (b)].
With the configs' design (norms='inside', locality='both'; the knobs are the
attributes below, measured in docs/results/learning.md):

  patches -> Dense m_embed = content;  h = content + fixed sin-cos PE over m's token grid
  holistic queries m_queries + 1D PE + the query's region of patches      [locality, ours]
    (the mean of h over the region, or, where a region holds several patches,
    m_region_in over its patches side by side)
  [h ; queries] -> shared `encoder` (bidirectional; its LayerNorms are LN^m)
    outputs at patch positions -> "patch-wise tokens" (continuous, for L_rep)
    outputs at query positions -> `quant_in` (width -> code_dim) -> `quantizer` -> codes
  codes -> Q^-1 (unit vectors) x code_scale -> `quant_out` (code_dim -> width) = latents
  [latents + 1D PE ; m_patch_queries + grid PE + the latent of the patch's region
    (through m_region_out[the patch's slot] where regions hold several patches)]
    -> shared `decoder` (LayerNorms LN^m) -> outputs at patch-query positions
    -> zero-init Dense m_head -> patches

A token's region: patch j (row-major over the grid) belongs to token
floor(j * n_tokens / n_patches); with one token per patch (the paper's video
ratio) token t's region is patch t. Nothing normalises outside the residual
stream: a LayerNorm there discards each patch's brightness and contrast
(norms='outside' is the first design, LN^m over the encoder's input and
before the head, kept for comparison).

There is no cross-attention between the streams: they meet only through the
shared weights, the single codebook, the alignment loss and the cross-modal AR
prior (`prior`, over the concatenated [video ; audio] codes) [paper].

Parameter tree (top level): `encoder`, `decoder`, `quant_in`, `quantizer`,
`quant_out`, `prior` (when prior_depth > 0) and, per modality m, `m_embed`,
`m_queries`, `m_patch_queries`, `m_head`; the per-modality LayerNorms live in
the shared stacks as `encoder/block_i/m_norm1`, `m_norm2`, `encoder/m_norm`
(with scan: `encoder/blocks/m_norm1`, stacked). Every per-modality name
starts with its modality after a '/', so freezing rules are regexes like
`(^|/)audio_` (VFAL stage 2). With norms='outside' the tree has
`m_in_norm` / `m_out_norm` instead and shared `norm1` / `norm2` / `norm`.

Initialisation: a modality absent from the input is skipped entirely (no
compute, no parameters touched), so `init` must see BOTH modalities to create
the complete tree:

  model = build_tokenizer(config.model, config.data)
  variables = model.init(jax.random.key(0), **model.example_inputs(), train=False)

after which any subset of modalities can be applied with those variables.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avtok_jax.models import layers
from avtok_jax.models.prior import ARPrior
from avtok_jax.models.quantizer import VectorQuantizer

Dtype = Any
MODALITIES = ("video", "audio")

# Learned queries start small [LARP/TiTok: N(0, 0.02)].
_QUERY_INIT = nn.initializers.normal(stddev=0.02)
_KERNEL_INIT = nn.initializers.xavier_uniform()


@functools.lru_cache(maxsize=32)
def _position_table(grid: tuple[int, ...], dim: int) -> np.ndarray:
  """Cached fixed sin-cos table (a trace-time constant, built once per shape)."""
  table = layers.sincos_table(grid, dim)
  table.flags.writeable = False
  return table


NORMS = ("inside", "outside")
LOCALITY = ("none", "decoder", "both")


@functools.lru_cache(maxsize=32)
def _regions(num_patches: int, num_tokens: int) -> np.ndarray:
  """int [num_patches]: floor(j * num_tokens / num_patches), the token of each patch's region."""
  regions = (np.arange(num_patches) * num_tokens) // num_patches
  regions.flags.writeable = False
  return regions


@functools.lru_cache(maxsize=32)
def _pooling_matrix(num_patches: int, num_tokens: int) -> np.ndarray:
  """float32 [num_tokens, num_patches]: row t averages the patches of token t's region.

  A token whose region is empty (more tokens than patches) gets a zero row.
  """
  regions = _regions(num_patches, num_tokens)
  pool = np.zeros((num_tokens, num_patches), np.float32)
  pool[regions, np.arange(num_patches)] = 1.0
  pool /= np.maximum(pool.sum(1, keepdims=True), 1.0)
  pool.flags.writeable = False
  return pool


@functools.lru_cache(maxsize=32)
def _region_layout(num_patches: int, num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
  """(gather int [num_tokens, slots], slot int [num_patches]) of the regions.

  Row t of `gather` lists token t's patches in order, padded with -1 up to
  `slots`, the size of the largest region; `slot[j]` is patch j's place in
  its region.
  """
  regions = _regions(num_patches, num_tokens)
  first = np.searchsorted(regions, np.arange(num_tokens))
  slot = np.arange(num_patches) - first[regions]
  slots = int(slot.max()) + 1 if num_patches else 1
  gather = np.full((num_tokens, slots), -1, np.int64)
  gather[regions, slot] = np.arange(num_patches)
  for a in (gather, slot):
    a.flags.writeable = False
  return gather, slot


def _identity_stack(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
  """[slots, width, width] identity matrices: a region path that starts as the plain latent."""
  del key
  return jnp.broadcast_to(jnp.eye(shape[-1], dtype=dtype), shape)


def to_float_patches(patches: jax.Array) -> jax.Array:
  """uint8 patches in [0, 255] -> float32 in [-1, 1]; float patches pass through as float32.

  The pipeline may ship video as uint8 (4x less host->device traffic); the
  model always sees the normalised units that its reconstructions are in. The
  map is the one the pipeline applies for `video_dtype='float32'`.
  """
  if jnp.issubdtype(patches.dtype, jnp.integer):
    return patches.astype(jnp.float32) * jnp.float32(1 / 127.5) - jnp.float32(1)
  return patches.astype(jnp.float32)


class AVTok(nn.Module):
  """The AVTok tokenizer: one encoder and one decoder shared by video and audio.

  Attributes:
    video_grid: video token grid (T', H', W') (from `patches.token_grids`).
    audio_grid: mel token grid (F', L').
    video_patch_dim: values per video patch, pt*ph*pw*3.
    audio_patch_dim: values per mel patch, pf*pl.
    width: transformer width (768 for L).
    encoder_depth: blocks in the shared encoder.
    decoder_depth: blocks in the shared decoder.
    num_heads: attention heads.
    mlp_dim: MLP hidden width (mlp_ratio * width).
    num_video_tokens: holistic (discrete) video tokens per clip.
    num_audio_tokens: holistic (discrete) audio tokens per clip.
    codebook_size: entries of the single shared codebook.
    code_dim: factorised code dimension.
    qkv_bias: bias on the q/k/v projections ([LARP]: none).
    commit_weight: quantizer commitment weight.
    codebook_weight: quantizer codebook weight.
    quantizer_temperature: softmax(cos / T) temperature of stochastic code choice.
    quantizer_gradient: 'straight_through' or 'rotation' (`VectorQuantizer.gradient`).
    prior_depth: AR prior blocks; 0 builds no prior.
    prior_width: AR prior width.
    prior_heads: AR prior heads.
    prior_mlp_ratio: AR prior MLP ratio.
    prior_temperature: AR prior logit temperature.
    norms: where the per-modality LayerNorms sit [paper: "separate ...
      normalization layers per modality"; where is ours]. 'inside': every
      LayerNorm of the shared encoder and decoder blocks (and the encoder's
      final one) is per modality, nothing normalises outside the residual
      stream. 'outside': one LN^m over the encoder's input sequence and one
      before the head, shared norms in the blocks (the first design; a
      LayerNorm outside the residual blocks discards each patch's brightness
      and contrast, which measurably slows learning, docs/results/learning.md).
    head_norm: with norms='inside', a per-modality LayerNorm before the head
      (the decoder's final norm); ignored with 'outside', which has m_out_norm.
    locality: 'none' | 'decoder' | 'both' [ours]. Token t's region is the
      run of patches j (row-major) with floor(j * n_tokens / n_patches) = t.
      'decoder': each patch query adds its region token's latent
      (quant_out of the code, without the latent position table); 'both':
      in addition each holistic query adds the mean of its region's patch
      tokens (embedding + grid table). Attention still mixes everything;
      the paths give the routing a local start (docs/results/learning.md).
    code_scale: the unit code vectors are multiplied by this before
      `quant_out` [ours], so that the content reaches the decoder at the
      scale of the position tables instead of ~6x below it.
    codebook_init_std: std of the codebook's N(0, s^2) init (rows are
      l2-normalised at use, so s sets how far an Adam step turns them).
    remat: rematerialise transformer blocks in the backward pass.
    scan: roll transformer blocks into `nn.scan` (params stacked on 'layers').
    dtype: compute dtype of the matmuls (norms, residuals and outputs stay float32).
    param_dtype: parameter dtype.
  """

  video_grid: tuple[int, int, int]
  audio_grid: tuple[int, int]
  video_patch_dim: int
  audio_patch_dim: int
  width: int
  encoder_depth: int
  decoder_depth: int
  num_heads: int
  mlp_dim: int
  num_video_tokens: int
  num_audio_tokens: int
  codebook_size: int
  code_dim: int = 16
  qkv_bias: bool = False
  commit_weight: float = 0.25
  codebook_weight: float = 1.0
  quantizer_temperature: float = 0.03
  quantizer_gradient: str = "rotation"
  prior_depth: int = 0
  prior_width: int = 384
  prior_heads: int = 6
  prior_mlp_ratio: float = 4.0
  prior_temperature: float = 1.0
  norms: str = "inside"
  head_norm: bool = False
  locality: str = "both"
  code_scale: float = 1.0
  codebook_init_std: float = 1.0
  remat: bool = False
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    stack = dict(
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      qkv_bias=self.qkv_bias,
      remat=self.remat,
      scan=self.scan,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    if self.norms not in NORMS or self.locality not in LOCALITY:
      raise ValueError(
        f"norms={self.norms!r} must be one of {NORMS} and locality={self.locality!r} one of "
        f"{LOCALITY}."
      )
    # ONE encoder and ONE decoder, each called once per modality [paper];
    # with norms='inside' their LayerNorms are per modality.
    inside = self.norms == "inside"
    stack["modalities"] = MODALITIES if inside else ()
    self.encoder = layers.Transformer(self.encoder_depth, final_norm=True, **stack)
    # The decoder's final norm, when there is one, is per modality
    # ('inside' + head_norm, or m_out_norm with norms='outside').
    self.decoder = layers.Transformer(
      self.decoder_depth, final_norm=inside and self.head_norm, **stack
    )
    self.quant_in = self._dense(self.code_dim, ("embed", "code"))
    self.quantizer = VectorQuantizer(
      self.codebook_size,
      code_dim=self.code_dim,
      init_std=self.codebook_init_std,
      commit_weight=self.commit_weight,
      codebook_weight=self.codebook_weight,
      temperature=self.quantizer_temperature,
      gradient=self.quantizer_gradient,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    self.quant_out = self._dense(self.width, ("code", "embed"))
    if self.prior_depth > 0:
      self.prior = ARPrior(
        depth=self.prior_depth,
        width=self.prior_width,
        num_heads=self.prior_heads,
        code_dim=self.code_dim,
        max_length=self.num_video_tokens + self.num_audio_tokens,
        mlp_ratio=self.prior_mlp_ratio,
        temperature=self.prior_temperature,
        remat=self.remat,
        scan=self.scan,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
      )
    else:
      self.prior = None

    # Per-modality parts [paper]: spelled out (not built in a loop) so that the
    # parameter names are visible here and greppable.
    # (With norms='inside' the per-modality norms live in the shared stacks,
    # named encoder/.../{m}_norm1 etc.)
    self.video_embed = self._dense(self.width, ("patch", "embed"))
    self.video_queries = self._queries("video_queries", self.num_video_tokens)
    self.video_patch_queries = self._queries("video_patch_queries", self.num_patches("video"))
    self.video_head = self._head(self.video_patch_dim)

    self.audio_embed = self._dense(self.width, ("patch", "embed"))
    self.audio_queries = self._queries("audio_queries", self.num_audio_tokens)
    self.audio_patch_queries = self._queries("audio_patch_queries", self.num_patches("audio"))
    self.audio_head = self._head(self.audio_patch_dim)

    # Where a token's region holds several patches (audio: 240 patches, 64
    # tokens), the locality paths read and write each patch of the region
    # through its own linear map [ours]; with one patch per token (video)
    # they need none. See `_region_paths`.
    self.video_region_in, self.video_region_out = self._region_paths("video")
    self.audio_region_in, self.audio_region_out = self._region_paths("audio")

    if not inside:
      self.video_in_norm = layers.LayerNorm(param_dtype=self.param_dtype)
      self.video_out_norm = layers.LayerNorm(param_dtype=self.param_dtype)
      self.audio_in_norm = layers.LayerNorm(param_dtype=self.param_dtype)
      self.audio_out_norm = layers.LayerNorm(param_dtype=self.param_dtype)

  # --- construction helpers ---------------------------------------------------

  def _dense(self, features: int, names: tuple[str, str]) -> nn.Dense:
    return nn.Dense(
      features,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.with_logical_partitioning(_KERNEL_INIT, names),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), names[1:]),
    )

  def _head(self, features: int) -> nn.Dense:
    # Zero-init output head [LARP]: the reconstruction starts at 0 (mid-grey /
    # mid-range mel), so early training is not dominated by random outputs.
    return nn.Dense(
      features,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed", "patch")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("patch",)),
    )

  def _region_paths(self, modality: str) -> tuple[nn.Dense | None, jax.Array | None]:
    """(m_region_in, m_region_out) when m's regions hold several patches, else (None, None).

    m_region_in: Dense(slots * patch_dim -> width) of the region's patches
    side by side (zero-padded), added to the holistic query instead of the
    mean of the region's patch tokens, which would superimpose the patches.
    m_region_out: [slots, width, width], identity at init; patch j of a
    region adds latent @ m_region_out[slot(j)] instead of the latent itself,
    so that a linear path can write each patch of the region differently.
    """
    slots = self.region_slots(modality)
    if slots <= 1:
      return None, None
    region_in = None
    if self.locality == "both":
      region_in = self._dense(self.width, ("patch", "embed"))
    region_out = None
    if self.locality in ("decoder", "both"):
      # The output width is 'kv' (replicated), as one dim may use 'embed' (fsdp).
      init = nn.with_logical_partitioning(_identity_stack, ("slot", "embed", "kv"))
      shape = (slots, self.width, self.width)
      region_out = self.param(f"{modality}_region_out", init, shape, self.param_dtype)
    return region_in, region_out

  def _queries(self, name: str, length: int) -> jax.Array:
    init = nn.with_logical_partitioning(_QUERY_INIT, ("length", "embed"))
    return self.param(name, init, (length, self.width), self.param_dtype)

  # --- shapes -------------------------------------------------------------------

  def grid(self, modality: str) -> tuple[int, ...]:
    """Token grid of the modality's patches: (T', H', W') or (F', L')."""
    return tuple(self.video_grid) if modality == "video" else tuple(self.audio_grid)

  def num_patches(self, modality: str) -> int:
    """Patches per clip, N_m."""
    return int(np.prod(self.grid(modality)))

  def patch_dim(self, modality: str) -> int:
    """Values per patch, P_m."""
    return self.video_patch_dim if modality == "video" else self.audio_patch_dim

  def num_tokens(self, modality: str) -> int:
    """Holistic (discrete) tokens per clip, n_m."""
    return self.num_video_tokens if modality == "video" else self.num_audio_tokens

  def example_inputs(
    self, batch_size: int = 1, video_dtype: Dtype = jnp.float32
  ) -> dict[str, jax.Array]:
    """Zero inputs for both modalities (for `init` / `jax.eval_shape`); usable unbound."""
    return {
      "video_patches": jnp.zeros(
        (batch_size, self.num_patches("video"), self.video_patch_dim), video_dtype
      ),
      "audio_patches": jnp.zeros(
        (batch_size, self.num_patches("audio"), self.audio_patch_dim), jnp.float32
      ),
    }

  def _parts(self, modality: str) -> dict[str, Any]:
    if modality not in MODALITIES:
      raise ValueError(f"Unknown modality {modality!r}; expected one of {MODALITIES}.")
    names = ("embed", "queries", "patch_queries", "head")
    if self.norms == "outside":
      names += ("in_norm", "out_norm")
    return {name: getattr(self, f"{modality}_{name}") for name in names}

  def region_of_patch(self, modality: str) -> np.ndarray:
    """int [N_m]: the holistic token whose region holds each patch (see `locality`)."""
    return _regions(self.num_patches(modality), self.num_tokens(modality))

  def region_slots(self, modality: str) -> int:
    """Patches in the largest region of m's tokens (1: one patch per token, or fewer)."""
    return _region_layout(self.num_patches(modality), self.num_tokens(modality))[0].shape[1]

  # --- one stream ---------------------------------------------------------------

  def _encode_one(
    self, modality: str, patches: jax.Array, train: bool, stochastic: bool
  ) -> dict[str, Any]:
    parts = self._parts(modality)
    n_patches, n_tokens = self.num_patches(modality), self.num_tokens(modality)
    expected = (n_patches, self.patch_dim(modality))
    if patches.ndim != 3 or tuple(patches.shape[1:]) != expected:
      raise ValueError(
        f"{modality}_patches must be [batch, {expected[0]}, {expected[1]}] for this model, "
        f"got {tuple(patches.shape)}."
      )
    batch = patches.shape[0]
    x = to_float_patches(patches)
    h = parts["embed"](x.astype(self.dtype)).astype(jnp.float32)
    h = h + _position_table(self.grid(modality), self.width)
    queries = jnp.broadcast_to(
      parts["queries"].astype(jnp.float32)[None], (batch, n_tokens, self.width)
    )
    region_in = getattr(self, f"{modality}_region_in")
    if region_in is not None:
      # Each holistic query reads its region's patches side by side [ours].
      gather, _ = _region_layout(n_patches, n_tokens)
      side = jnp.where(gather[None, :, :, None] >= 0, jnp.take(x, gather, axis=1), 0.0)
      side = side.reshape(batch, n_tokens, -1)
      queries = queries + region_in(side.astype(self.dtype)).astype(jnp.float32)
    elif self.locality == "both":
      # Each holistic query starts from the mean of its region's patch tokens [ours].
      pool = _pooling_matrix(n_patches, n_tokens)
      queries = queries + jnp.einsum("tn,bnd->btd", pool, h)
    if self.norms == "outside":
      # One LayerNorm over the whole sequence, queries included (TiTok's
      # ln_pre): the N(0, 0.02) queries enter at unit scale, as the patches
      # do. Left raw (and without a position table), every query left the
      # encoder as nearly the same vector (mean cosine 0.97 between a clip's
      # code vectors at init, one code per clip after 300 steps).
      seq = parts["in_norm"](jnp.concatenate([h, queries], axis=1))
    else:
      # The queries get a 1D position table as the patches get theirs
      # [TiTok adds one to its latent tokens], which sets them apart at
      # unit scale without a LayerNorm outside the residual stream.
      queries = queries + _position_table((n_tokens,), self.width)
      seq = jnp.concatenate([h, queries], axis=1)
    seq = nn.with_logical_constraint(seq, ("batch", "length", "embed"))
    out = self.encoder(seq, **self._stream(modality))
    patch_tokens = nn.with_logical_constraint(out[:, :n_patches], ("batch", "length", "embed"))
    z = self.quant_in(out[:, n_patches:].astype(self.dtype)).astype(jnp.float32)
    z = nn.with_logical_constraint(z, ("batch", "length", "code"))
    q = self.quantizer(z, train=train, stochastic=stochastic)
    return {
      "codes": q.codes,
      "quantized": q.quantized,
      "patch_tokens": patch_tokens,
      "quantizer": q,
    }

  def _decode_one(self, modality: str, quantized: jax.Array) -> jax.Array:
    parts = self._parts(modality)
    batch, n_tokens = quantized.shape[:2]
    if n_tokens != self.num_tokens(modality):
      raise ValueError(
        f"{modality}: expected {self.num_tokens(modality)} tokens per clip, got {n_tokens}."
      )
    content = self.quant_out((quantized * self.code_scale).astype(self.dtype)).astype(jnp.float32)
    latents = content + _position_table((n_tokens,), self.width)
    patch_queries = parts["patch_queries"].astype(jnp.float32) + _position_table(
      self.grid(modality), self.width
    )
    n_patches = patch_queries.shape[0]
    patch_queries = jnp.broadcast_to(patch_queries[None], (batch, n_patches, self.width))
    if self.locality in ("decoder", "both"):
      # Each patch query adds its region's latent [ours], through its slot's
      # map when regions hold several patches.
      regions = self.region_of_patch(modality)
      region_out = getattr(self, f"{modality}_region_out")
      if region_out is None:
        region = jnp.take(content, regions, axis=1)
      else:
        # Every token through every slot's map, [B, T, slots, width], then
        # patch j takes (its region, its slot).
        _, slot = _region_layout(n_patches, n_tokens)
        per_slot = jnp.einsum(
          "btd,sde->btse", content.astype(self.dtype), region_out.astype(self.dtype)
        ).astype(jnp.float32)
        region = per_slot[:, regions, slot]
      patch_queries = patch_queries + region
    seq = jnp.concatenate([latents, patch_queries], axis=1)
    seq = nn.with_logical_constraint(seq, ("batch", "length", "embed"))
    out = self.decoder(seq, **self._stream(modality))[:, n_tokens:]
    if self.norms == "outside":
      out = parts["out_norm"](out)
    recon = parts["head"](out.astype(self.dtype)).astype(jnp.float32)
    return nn.with_logical_constraint(recon, ("batch", "length", "patch"))

  def _stream(self, modality: str) -> dict[str, str]:
    """The shared stacks' `modality=` argument (per-modality norms only with norms='inside')."""
    return {"modality": modality} if self.norms == "inside" else {}

  @staticmethod
  def _present(
    video_patches: jax.Array | None, audio_patches: jax.Array | None
  ) -> dict[str, jax.Array]:
    present = {
      m: x for m, x in (("video", video_patches), ("audio", audio_patches)) if x is not None
    }
    if not present:
      raise ValueError("Give video_patches, audio_patches or both.")
    return present

  # --- public API ---------------------------------------------------------------

  def encode(
    self,
    video_patches: jax.Array | None = None,
    audio_patches: jax.Array | None = None,
    *,
    train: bool = False,
    stochastic: bool = False,
  ) -> dict[str, dict[str, Any]]:
    """Patches -> discrete tokens, per present modality.

    Args:
      video_patches: [B, N_v, pt*ph*pw*3], uint8 in [0, 255] or float in [-1, 1].
      audio_patches: [B, N_a, pf*pl], normalised log-mel.
      train: training mode (the quantizer updates its usage counts).
      stochastic: sample codes from softmax(cos / T) (needs the 'sample' rng).

    Returns:
      {m: {'codes': int32 [B, n_m], 'quantized': float32 [B, n_m, code_dim]
      (its gradient reaches z: straight-through or rotated), 'patch_tokens': float32 [B, N_m, width],
      'quantizer': QuantizerOutput}} for each present modality m.
    """
    present = self._present(video_patches, audio_patches)
    return {m: self._encode_one(m, x, train, stochastic) for m, x in present.items()}

  def decode(self, codes: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Discrete tokens -> patches: {m: int32 [B, n_m]} -> {m: float32 [B, N_m, P_m]}.

    Reconstructions are in the input's normalised units (video in [-1, 1],
    mel normalised).
    """
    unknown = set(codes) - set(MODALITIES)
    if unknown:
      raise ValueError(f"decode: unknown modalities {sorted(unknown)}; expected {MODALITIES}.")
    return {
      m: self._decode_one(m, self.quantizer.lookup(codes[m])) for m in MODALITIES if m in codes
    }

  def __call__(
    self,
    video_patches: jax.Array | None = None,
    audio_patches: jax.Array | None = None,
    *,
    train: bool,
    stochastic: bool = False,
    prior_ss_ratio: float | jax.Array = 0.0,
    run_prior: bool = True,
  ) -> dict[str, Any]:
    """Encode, quantize, decode (and run the AR prior) for training and evaluation.

    Args:
      video_patches: see `encode`; None skips the video stream entirely.
      audio_patches: see `encode`; None skips the audio stream entirely.
      train: training mode (usage counts; two scheduled-sampling prior rounds).
      stochastic: stochastic code choice (rng stream 'sample').
      prior_ss_ratio: scheduled-sampling ratio of the prior's second round.
      run_prior: run the AR prior (when the model has one).

    Returns:
      {m: {'recon' float32 [B, N_m, P_m], 'codes' int32 [B, n_m],
      'quantized' [B, n_m, code_dim], 'patch_tokens' [B, N_m, width],
      'quantizer' QuantizerOutput}} per present modality, plus, when the prior
      runs, 'prior_logits' (tuple of float [B, L, K], one per round) and
      'prior_codes' (int32 [B, L], the targets) over the concatenated
      [video ; audio] sequence of the present modalities.
    """
    present = self._present(video_patches, audio_patches)
    out: dict[str, Any] = {}
    for m, x in present.items():
      stream = self._encode_one(m, x, train, stochastic)
      # Decode the quantized codes (value q, gradient passed on to z) so that
      # the reconstruction loss reaches the encoder through the quantizer [LARP].
      stream["recon"] = self._decode_one(m, stream["quantized"])
      out[m] = stream
    if self.prior is not None and run_prior:
      # Cross-modal prior over [video ; audio] (just the present part in stage 1)
      # [paper]; its gradient reaches the encoder through the quantized
      # codes, while the codebook it scores against is stop-gradiented inside.
      # Audio alone (no VFAL stage does this) is read from position 0.
      quantized = jnp.concatenate([out[m]["quantized"] for m in present], axis=1)
      out["prior_logits"] = self.prior(
        quantized, self.quantizer.codebook(), train=train, ss_ratio=prior_ss_ratio
      )
      out["prior_codes"] = jnp.concatenate([out[m]["codes"] for m in present], axis=1)
    return out
