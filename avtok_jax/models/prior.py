"""Autoregressive prior over the quantized codes (L_prior) [LARP].

LARP (Wang et al. 2025, "LARP: Tokenizing Videos with a Learned
Autoregressive Generative Prior") trains a small causal transformer next to
the tokenizer: it reads the l2-normalised quantized codes of a clip and
predicts the next code as logits = prediction . codebook^T / T. Its
cross-entropy (weight 0.06) shapes the latent space so that an AR generator
later finds it easy to model; its gradient reaches the encoder through the
straight-through quantized codes, never through the codebook. AVTok runs it
over the concatenated [video ; audio] code sequence, which makes it
cross-modal (AVTOK.md section 3).

Training runs two rounds with scheduled sampling [LARP]: round 2 reads the
same sequence with a random fraction `ss_ratio` of its inputs replaced by the
codes round 1 predicted (sampled from round 1's softmax), and the loss is the
mean over both rounds; `ss_ratio` ramps linearly from 0 to 0.5
(`scheduled_sampling_ratio`). Evaluation runs one round.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from avtok_jax.models import layers

Dtype = Any


class ARPrior(nn.Module):
  """Causal transformer predicting each code of a sequence from the codes before it.

  Attributes:
    depth, width, num_heads, mlp_ratio: the transformer ("GPT-C" 12 x 384 in
      [LARP], AVTOK.md section 3).
    code_dim: size of a quantized code (16 [LARP]).
    max_length: longest code sequence (size of the learned position table).
    temperature: logits = cos(prediction, code) / temperature. 1.0 is LARP's
      configured value (`latent_ce_temperature`); with both vectors unit-norm
      it bounds the logits to [-1, 1] and the cross-entropy from below by
      log(1 + (K - 1) exp(-2 / T)), a gentle regulariser rather than a sharp
      density model. Lower it (e.g. 0.1) for a sharper prior.
    ss_sample: scheduled sampling draws the replacement codes from round 1's
      softmax [LARP] (True) or takes its argmax (False).
    remat, scan: passed to `layers.Transformer`.
    dtype, param_dtype: compute and parameter dtypes; logits are float32.
  """

  depth: int
  width: int
  num_heads: int
  code_dim: int
  max_length: int
  mlp_ratio: float = 4.0
  temperature: float = 1.0  # [LARP]
  ss_sample: bool = True  # [LARP]
  remat: bool = False
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    quantized: jax.Array,
    codebook: jax.Array,
    *,
    train: bool,
    ss_ratio: float | jax.Array = 0.0,
  ) -> tuple[jax.Array, ...]:
    """Logits of every position, one [B, L, K] float32 array per round.

    Args:
      quantized: [B, L, code_dim], the (straight-through) quantized codes.
      codebook: [K, code_dim], l2-normalised entries (gradient stopped here).
      train: two rounds with scheduled sampling if True, one round if False.
      ss_ratio: probability that a round-2 input is replaced by round 1's
        prediction; a Python 0 needs no rng, anything else draws from the
        'sample' rng stream.

    Returns:
      (logits,) in eval, (logits_round1, logits_round2) in training.
      logits[:, t] predicts code t from codes < t (position 0 from a learned
      start token alone).
    """
    batch, length, dim = quantized.shape
    if dim != self.code_dim:
      raise ValueError(f"ARPrior(code_dim={self.code_dim}) got codes of size {dim}.")
    if length > self.max_length:
      raise ValueError(f"Code sequence of length {length} exceeds max_length={self.max_length}.")
    if codebook.ndim != 2 or codebook.shape[1] != self.code_dim:
      raise ValueError(f"codebook must be [K, {self.code_dim}], got {tuple(codebook.shape)}.")
    # The prior must not move the codebook [LARP]: only the encoder side
    # (through `quantized`) and the prior's own weights learn from L_prior.
    codebook = jax.lax.stop_gradient(codebook.astype(jnp.float32))

    in_proj = nn.Dense(
      self.width,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), ("code", "embed")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
      name="in_proj",
    )
    start = self.param(
      "start_token",
      nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
      (self.width,),
      self.param_dtype,
    )
    pos = self.param(
      "pos_embed",
      nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed")),
      (self.max_length, self.width),
      self.param_dtype,
    )
    transformer = layers.Transformer(
      depth=self.depth,
      num_heads=self.num_heads,
      mlp_dim=int(round(self.mlp_ratio * self.width)),
      causal=True,
      remat=self.remat,
      scan=self.scan,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="transformer",
    )
    out_proj = nn.Dense(
      self.code_dim,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), ("embed", "code")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("code",)),
      name="out_proj",
    )

    def one_round(inputs: jax.Array) -> jax.Array:
      # Shift right: position t reads [start, c_0, ..., c_{t-1}].
      x = in_proj(inputs[:, :-1].astype(self.dtype)).astype(jnp.float32)
      x = jnp.concatenate(
        [jnp.broadcast_to(start.astype(jnp.float32), (batch, 1, self.width)), x], axis=1
      )
      x = x + pos[:length].astype(jnp.float32)
      x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
      h = transformer(x)
      pred = out_proj(h.astype(self.dtype)).astype(jnp.float32)
      pred = pred * jax.lax.rsqrt(jnp.sum(jnp.square(pred), axis=-1, keepdims=True) + 1e-12)
      logits = jnp.einsum("bld,kd->blk", pred, codebook) / self.temperature
      return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

    logits1 = one_round(quantized)
    if not train:
      return (logits1,)

    if isinstance(ss_ratio, int | float) and ss_ratio == 0:
      inputs2 = quantized
    else:
      key_codes, key_mask = jax.random.split(self.make_rng("sample"))
      guide = jax.lax.stop_gradient(logits1)
      if self.ss_sample:
        predicted = layers.sample_categorical(key_codes, guide)
      else:
        predicted = jnp.argmax(guide, axis=-1)
      replace = jax.random.bernoulli(key_mask, jnp.asarray(ss_ratio, jnp.float32), (batch, length))
      predicted_codes = jnp.take(codebook, predicted, axis=0).astype(quantized.dtype)
      inputs2 = jnp.where(replace[..., None], predicted_codes, quantized)
    logits2 = one_round(inputs2)
    return (logits1, logits2)


def scheduled_sampling_ratio(
  step: int | jax.Array,
  total_steps: int,
  max_ratio: float = 0.5,
  peak_fraction: float = 0.3,
) -> jax.Array:
  """Scheduled-sampling ratio: linear from 0 at step 0 to `max_ratio` at `peak_fraction` of training.

  [LARP]: max ratio 0.5, reached at 30% of the steps (`mix_ss_peak_steps_ratio`),
  constant afterwards. Works on traced steps (inside `jax.jit`).
  """
  peak = float(total_steps) * float(peak_fraction)
  step = jnp.asarray(step, jnp.float32)
  if peak <= 0:
    return jnp.asarray(max_ratio, jnp.float32) + 0.0 * step
  return jnp.minimum(step / peak, 1.0) * max_ratio


def top1_accuracy(logits: jax.Array, codes: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Fraction of positions whose highest logit is the true code (a health metric of the prior)."""
  hit = (jnp.argmax(logits, axis=-1) == codes).astype(jnp.float32)
  if mask is None:
    return jnp.mean(hit)
  mask = jnp.asarray(mask, jnp.float32)
  if mask.ndim == 1:
    mask = mask[:, None]
  mask = jnp.broadcast_to(mask, hit.shape)
  return jnp.sum(hit * mask) / jnp.maximum(jnp.sum(mask), 1.0)
