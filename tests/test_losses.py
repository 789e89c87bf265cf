"""Loss terms: hand-computed values, masks, combination, LeCam, the perceptual warning."""

import logging as py_logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avtok_jax import losses


def _softplus(x):
  return np.log1p(np.exp(x))


def test_l1_l2_reconstruction_values():
  pred = jnp.array([[1.0, 2.0], [3.0, 5.0]])
  target = jnp.array([[0.0, 2.0], [1.0, 1.0]])
  # |d| = [1, 0, 2, 4] -> 7/4; d^2 = [1, 0, 4, 16] -> 21/4
  assert float(losses.l1(pred, target)) == pytest.approx(7 / 4)
  assert float(losses.l2(pred, target)) == pytest.approx(21 / 4)
  rec = losses.reconstruction(pred, target, prefix="video")
  assert set(rec) == {"video_l1", "video_l2"}
  assert float(rec["video_l1"]) == pytest.approx(7 / 4)
  assert float(rec["video_l2"]) == pytest.approx(21 / 4)
  assert rec["video_l1"].dtype == jnp.float32


def test_masks_example_and_token_level():
  pred = jnp.arange(12, dtype=jnp.float32).reshape(2, 3, 2)
  target = jnp.zeros_like(pred)
  # Example mask [B]: only example 1 -> mean of 6..11 = 8.5.
  assert float(losses.l1(pred, target, mask=jnp.array([False, True]))) == pytest.approx(8.5)
  # Token mask [B, N]: tokens (0, 0) and (1, 2) -> values 0, 1, 10, 11 -> 5.5.
  tok = jnp.array([[1, 0, 0], [0, 0, 1]], dtype=bool)
  assert float(losses.l1(pred, target, mask=tok)) == pytest.approx(5.5)
  assert float(losses.l2(pred, target, mask=tok)) == pytest.approx((0 + 1 + 100 + 121) / 4)
  # Nothing kept -> 0, not NaN.
  assert float(losses.l1(pred, target, mask=jnp.zeros((2,), bool))) == 0.0
  with pytest.raises(ValueError, match="prefix"):
    losses.l1(pred, target, mask=jnp.ones((3,), bool))


def test_gan_losses_values():
  real = jnp.array([2.0, -1.0])
  fake = jnp.array([0.5, -3.0])
  g = losses.generator_adversarial(fake)
  np.testing.assert_allclose(float(g), np.mean(_softplus(-np.array([0.5, -3.0]))), rtol=1e-6)
  d = losses.discriminator_loss(real, fake)
  expected = np.mean(_softplus(-np.array([2.0, -1.0]))) + np.mean(_softplus(np.array([0.5, -3.0])))
  np.testing.assert_allclose(float(d), expected, rtol=1e-6)
  # Both move the right way: D's loss falls as real rises / fake falls, G's falls as fake rises.
  assert float(losses.discriminator_loss(real + 1, fake - 1)) < float(d)
  assert float(losses.generator_adversarial(fake + 1)) < float(g)


def test_lecam_values_and_ema():
  real = jnp.array([1.0, 3.0])
  fake = jnp.array([-2.0, 0.5])
  ema_real, ema_fake = 2.0, -1.0
  # relu(real - ema_fake) = [2, 4] -> mean sq 10; relu(ema_real - fake) = [4, 1.5] -> (16 + 2.25) / 2.
  value = losses.lecam(real, fake, ema_real, ema_fake)
  assert float(value) == pytest.approx(10 + 18.25 / 2)
  # Gradient only through the logits, not the EMA anchors.
  g_ema = jax.grad(lambda e: losses.lecam(real, fake, e, ema_fake))(jnp.float32(ema_real))
  assert float(g_ema) == 0.0
  assert float(losses.update_ema(1.0, jnp.array([3.0, 5.0]), decay=0.9)) == pytest.approx(
    0.9 * 1.0 + 0.1 * 4.0
  )
  assert float(losses.update_ema(1.0, jnp.array([3.0]))) == pytest.approx(0.999 + 0.001 * 3)


class _FakeQuant(NamedTuple):
  loss: jax.Array


def test_vq_sums_modalities_and_skips_missing():
  assert float(losses.vq([_FakeQuant(jnp.float32(0.5)), _FakeQuant(jnp.float32(0.25))])) == 0.75
  assert float(losses.vq([_FakeQuant(jnp.float32(0.5)), None])) == 0.5
  assert losses.vq([None]) is None


def test_prior_loss_cross_entropy_rounds_and_mask():
  rng = np.random.default_rng(0)
  logits1 = rng.standard_normal((2, 3, 5)).astype(np.float32)
  logits2 = rng.standard_normal((2, 3, 5)).astype(np.float32)
  codes = np.array([[0, 4, 2], [1, 1, 3]])

  def ce(lg):
    logp = lg - np.log(np.sum(np.exp(lg), axis=-1, keepdims=True))
    return -np.take_along_axis(logp, codes[..., None], axis=-1)[..., 0]  # [B, L]

  got = losses.prior_loss([jnp.asarray(logits1), jnp.asarray(logits2)], jnp.asarray(codes))
  np.testing.assert_allclose(float(got), (ce(logits1).mean() + ce(logits2).mean()) / 2, rtol=1e-5)
  mask = np.array([[1, 1, 0], [0, 1, 0]], bool)
  got_m = losses.prior_loss([jnp.asarray(logits1)], jnp.asarray(codes), jnp.asarray(mask))
  np.testing.assert_allclose(float(got_m), ce(logits1)[mask].mean(), rtol=1e-5)
  # bfloat16 logits are evaluated in float32.
  got_bf16 = losses.prior_loss([jnp.asarray(logits1, jnp.bfloat16)], jnp.asarray(codes))
  assert got_bf16.dtype == jnp.float32
  with pytest.raises(ValueError, match="do not match"):
    losses.prior_loss([jnp.asarray(logits1)], jnp.asarray(codes[:, :2]))


def test_alignment_wrapper():
  x = jnp.array([[[1.0, 0.0], [0.0, 2.0]]])
  assert float(losses.alignment(x, 3 * x)) == pytest.approx(-1.0, abs=1e-6)


def test_combine_weights_skips_and_flat_dict():
  terms = {
    "video_l1": jnp.float32(2.0),
    "video_l2": jnp.float32(3.0),
    "perceptual": None,  # not configured
    "gan": jnp.float32(5.0),
    "prior": jnp.float32(7.0),  # weight 0 below: logged, not added
    "prior_acc": jnp.float32(0.5),  # no weight: logged only
  }
  weights = dict(losses.DEFAULT_WEIGHTS, prior=0.0)
  total, logged = losses.combine(terms, weights)
  assert float(total) == pytest.approx(1.0 * 2.0 + 1.0 * 3.0 + 0.3 * 5.0)
  assert set(logged) == {"video_l1", "video_l2", "gan", "prior", "prior_acc", "loss"}
  assert float(logged["prior"]) == 7.0  # unweighted
  assert float(logged["loss"]) == float(total)
  assert all(v.shape == () and v.dtype == jnp.float32 for v in logged.values())
  # Inside jit, too.
  total_jit, _ = jax.jit(lambda t: losses.combine(t, weights))(
    {k: v for k, v in terms.items() if v is not None}
  )
  assert float(total_jit) == pytest.approx(float(total))


def test_combine_errors():
  with pytest.raises(ValueError, match="unknown terms.*vido_l1"):
    losses.combine({"video_l1": jnp.float32(1.0)}, {"vido_l1": 1.0})
  with pytest.raises(ValueError, match="scalar"):
    losses.combine({"video_l1": jnp.ones((2,))}, {"video_l1": 1.0})
  with pytest.raises(ValueError, match="reserved"):
    losses.combine({"loss": jnp.float32(1.0)}, {})


def test_default_weights_match_design():
  w = losses.DEFAULT_WEIGHTS
  assert (w["video_l1"], w["gan"], w["vq"], w["prior"], w["alignment"], w["lecam"]) == (
    1.0,
    0.3,
    0.1,
    0.06,
    0.5,
    1e-3,
  )


def test_perceptual_missing_warns_once_and_callable_is_used(monkeypatch, caplog):
  monkeypatch.setattr(losses, "_warned_no_perceptual", False)
  video = jnp.zeros((2, 2, 4, 4, 3))
  with caplog.at_level(py_logging.WARNING):
    assert losses.perceptual(None, video, video) is None
    assert losses.perceptual(None, video, video) is None
  warnings = [r for r in caplog.records if "perceptual" in r.getMessage()]
  assert len(warnings) == 1

  def fake_lpips(a, b):  # per-example distances
    return jnp.mean(jnp.abs(a - b), axis=(1, 2, 3, 4))

  pred = video.at[0].set(1.0)
  assert float(losses.perceptual(fake_lpips, pred, video)) == pytest.approx(0.5)
  assert float(losses.perceptual(fake_lpips, pred, video, mask=jnp.array([1, 0]))) == 1.0
