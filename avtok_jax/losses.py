"""Loss terms of the AVTok tokenizer, each a small pure function returning a float32 scalar.

AVTOK.md section 3. The trainer computes the terms it needs, puts them in one
`{name: value}` dict (None for a term that is not configured this step) and
calls `combine(terms, weights)`, which returns the weighted total and a FLAT
dict of every computed, unweighted term plus 'loss' for logging.

Masks. Every term that averages over examples or tokens takes an optional
`mask` whose shape is a prefix of the averaged array's shape ([B] to drop
padding examples, [B, N] to drop tokens); the result is the mean over the
kept entries (0 when nothing is kept). Boolean or float masks both work.

All arithmetic runs in float32 whatever the compute dtype of the model
(STYLE.md practice 10).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
from absl import logging

from avtok_jax.models import alignment as alignment_lib

# The loss names `combine` knows and their default weights.
DEFAULT_WEIGHTS: dict[str, float] = {
  "video_l1": 1.0,  # [LARP] pixel loss weight 1.0
  "video_l2": 1.0,  # AVTOK.md section 3 ("L1 (+ L2)", 1.0 / 1.0) [LARP]
  "audio_l1": 1.0,  # [ours] the mel is an image in [-1, 1]: same weights as pixels
  "audio_l2": 1.0,  # [ours]
  "perceptual": 1.0,  # [LARP] LPIPS weight 1.0
  "gan": 0.3,  # [LARP] generator adversarial weight (disc_weight 0.3)
  "vq": 0.1,  # [LARP] applied to 0.25 * commit + 1.0 * codebook
  "prior": 0.06,  # [LARP] latent cross-entropy weight of the AR prior
  "alignment": 0.5,  # [REPA] lambda = 0.5
  "discriminator": 1.0,  # [ours] the discriminator's own objective, optimised separately
  "lecam": 1e-3,  # [LARP] LeCam weight (Tseng et al. 2021)
}

# A perceptual distance on videos: (pred [B, T, H, W, 3], target [B, T, H, W, 3]),
# both in [-1, 1] -> per-example distances [B] or a scalar. The LPIPS(VGG16)
# network plugs in here (a later issue); any callable of this shape works.
Perceptual = Callable[[jax.Array, jax.Array], jax.Array]


class HasVqLoss(Protocol):
  """Anything with a scalar `loss` field, e.g. `quantizer.QuantizerOutput`."""

  loss: jax.Array


_warned_no_perceptual = False


# ----------------------------------------------------------------------------- helpers


def masked_mean(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean of `x` (float32) over the entries `mask` keeps; `mask.shape` is a prefix of `x.shape`.

  Returns 0 when the mask keeps nothing (an all-padding eval batch), not NaN.
  """
  x = jnp.asarray(x, jnp.float32)
  if mask is None:
    return jnp.mean(x)
  mask = jnp.asarray(mask)
  if mask.ndim > x.ndim or tuple(x.shape[: mask.ndim]) != tuple(mask.shape):
    raise ValueError(
      f"Mask of shape {tuple(mask.shape)} is not a prefix of the loss shape {tuple(x.shape)}."
    )
  m = mask.astype(jnp.float32).reshape(mask.shape + (1,) * (x.ndim - mask.ndim))
  m = jnp.broadcast_to(m, x.shape)
  total = jnp.sum(m)
  return jnp.where(total > 0, jnp.sum(x * m) / jnp.maximum(total, 1e-12), 0.0)


def _f32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


# ----------------------------------------------------------------------------- reconstruction


def l1(pred: jax.Array, target: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean absolute error."""
  return masked_mean(jnp.abs(_f32(pred) - _f32(target)), mask)


def l2(pred: jax.Array, target: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean squared error."""
  return masked_mean(jnp.square(_f32(pred) - _f32(target)), mask)


def reconstruction(
  pred: jax.Array, target: jax.Array, *, prefix: str, mask: jax.Array | None = None
) -> dict[str, jax.Array]:
  """{f'{prefix}_l1', f'{prefix}_l2'} for one modality (patches, pixels or mel)."""
  return {f"{prefix}_l1": l1(pred, target, mask), f"{prefix}_l2": l2(pred, target, mask)}


def perceptual(
  lpips_fn: Perceptual | None,
  pred_video: jax.Array,
  target_video: jax.Array,
  mask: jax.Array | None = None,
) -> jax.Array | None:
  """Mean perceptual distance, or None (logged once per process) when no network is configured.

  Without LPIPS weights the term is skipped rather than faked: `combine`
  leaves None terms out of the total and out of the logged dict.
  """
  global _warned_no_perceptual
  if lpips_fn is None:
    if not _warned_no_perceptual:
      _warned_no_perceptual = True
      logging.warning(
        "No perceptual (LPIPS) network is configured: the perceptual loss term is skipped."
      )
    return None
  return masked_mean(lpips_fn(pred_video, target_video), mask)


# ----------------------------------------------------------------------------- GAN


def generator_adversarial(fake_logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Non-saturating generator loss: mean softplus(-D(fake)) = -log sigmoid(D(fake)).

  Goodfellow et al. 2014, the non-saturating form used by StyleGAN and [LARP].
  """
  return masked_mean(jax.nn.softplus(-_f32(fake_logits)), mask)


def discriminator_loss(
  real_logits: jax.Array, fake_logits: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
  """Non-saturating discriminator loss: mean softplus(-D(real)) + mean softplus(D(fake))."""
  return masked_mean(jax.nn.softplus(-_f32(real_logits)), mask) + masked_mean(
    jax.nn.softplus(_f32(fake_logits)), mask
  )


def lecam(
  real_logits: jax.Array,
  fake_logits: jax.Array,
  ema_real: jax.Array | float,
  ema_fake: jax.Array | float,
) -> jax.Array:
  """LeCam regulariser of the discriminator (Tseng et al. 2021, eq. 3).

  mean(relu(D(real) - ema_fake)^2) + mean(relu(ema_real - D(fake))^2), where
  the anchors are exponential moving averages of the mean D outputs (kept by
  the trainer with `update_ema`). Weight 1e-3 [LARP]. The anchors carry no
  gradient.
  """
  ema_real = jax.lax.stop_gradient(_f32(ema_real))
  ema_fake = jax.lax.stop_gradient(_f32(ema_fake))
  return jnp.mean(jnp.square(jax.nn.relu(_f32(real_logits) - ema_fake))) + jnp.mean(
    jnp.square(jax.nn.relu(ema_real - _f32(fake_logits)))
  )


def update_ema(ema: jax.Array | float, value: jax.Array, decay: float = 0.999) -> jax.Array:
  """decay * ema + (1 - decay) * mean(value), without gradient (LeCam anchors, decay [LARP])."""
  value = jax.lax.stop_gradient(jnp.mean(_f32(value)))
  return decay * _f32(ema) + (1.0 - decay) * value


# ----------------------------------------------------------------------------- VQ, prior, alignment


def vq(quantizer_outputs: Sequence[HasVqLoss | None]) -> jax.Array | None:
  """Sum of the quantizer losses (0.25 * commit + codebook) of the modalities that ran.

  Summed, not averaged, over modalities: each modality also adds its own
  reconstruction terms, so each pays its own VQ term. None entries (a
  stream that did not run) are ignored; with none left the term is None.
  """
  losses = [_f32(out.loss) for out in quantizer_outputs if out is not None]
  if not losses:
    return None
  return sum(losses[1:], losses[0])


def prior_loss(
  logits_rounds: Sequence[jax.Array], codes: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
  """Cross-entropy of the AR prior's logits against the codes, averaged over rounds [LARP].

  Args:
    logits_rounds: one [B, L, K] array per round (`prior.ARPrior` output).
    codes: int [B, L], the target code of each position.
    mask: optional [B] or [B, L].

  The log-partition is a logsumexp over the vocabulary and the target logit
  is picked by a one-hot product rather than a gather, so with logits
  sharded over 'vocab' both reduce with one all-reduce each.
  """
  if not logits_rounds:
    raise ValueError("prior_loss needs at least one round of logits.")
  per_round = []
  for logits in logits_rounds:
    logits = _f32(logits)
    if logits.shape[:-1] != codes.shape:
      raise ValueError(
        f"Prior logits of shape {tuple(logits.shape)} do not match codes {tuple(codes.shape)}."
      )
    one_hot = jax.nn.one_hot(codes, logits.shape[-1], dtype=jnp.float32)
    target_logit = jnp.sum(logits * one_hot, axis=-1)
    per_round.append(masked_mean(jax.nn.logsumexp(logits, axis=-1) - target_logit, mask))
  return sum(per_round[1:], per_round[0]) / len(per_round)


def alignment(pred: jax.Array, target: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Negative cosine similarity to the (stop-gradient) teacher features [REPA].

  See `avtok_jax.models.alignment.alignment_loss`.
  """
  return alignment_lib.alignment_loss(pred, target, mask)


# ----------------------------------------------------------------------------- combination


def combine(
  terms: Mapping[str, jax.Array | None], weights: Mapping[str, float]
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted sum of the loss terms and a flat dict of every computed term plus 'loss'.

  * A term that is None (not configured or not computed this step) is left
    out of the total and of the dict.
  * A computed term with weight 0, or without a weight, is logged in the dict
    but not added to the total.
  * A weight that names neither a given term nor a known loss
    (`DEFAULT_WEIGHTS`) raises: it is almost certainly a typo that would
    silently drop a loss.

  Returns:
    (total float32 scalar, {name: unweighted float32 scalar, ..., 'loss': total}).
  """
  unknown = sorted(set(weights) - set(terms) - set(DEFAULT_WEIGHTS))
  if unknown:
    raise ValueError(
      f"Loss weights name unknown terms {unknown}; known terms: "
      f"{sorted(set(DEFAULT_WEIGHTS) | set(terms))}."
    )
  if "loss" in terms:
    raise ValueError("'loss' is reserved for the total and cannot be a term name.")
  total = jnp.zeros((), jnp.float32)
  logged: dict[str, jax.Array] = {}
  for name, value in terms.items():
    if value is None:
      continue
    value = _f32(value)
    if value.shape != ():
      raise ValueError(f"Loss term {name!r} must be a scalar, got shape {tuple(value.shape)}.")
    logged[name] = value
    weight = float(weights.get(name, 0.0))
    if weight != 0.0:
      total = total + weight * value
  logged["loss"] = total
  return total, logged
