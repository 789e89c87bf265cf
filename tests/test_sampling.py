"""Sampling: KV cache == full recompute, CFG, top-k / top-p, allowed ids, seeds."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avtok_jax import sampling
from avtok_jax.models import generator

VOCAB = generator.Vocab(codebook_size=16, num_classes=3)
MODEL = generator.build_generator(generator.generator_config("tiny"), VOCAB, 12)
B, P, NEW = 2, 3, 8
# One set of sampling options shared by several tests (one compiled program per path).
ALLOWED = (4, 12)
OPTS = dict(temperature=1.3, top_k=5, top_p=0.9, allowed=ALLOWED)


@functools.cache
def _params():
  tokens = jnp.zeros((1, P), jnp.int32)
  return jax.jit(MODEL.init)(jax.random.key(0), tokens)["params"]


def _prompt(seed=1):
  return jax.random.randint(jax.random.key(seed), (B, P), 0, VOCAB.size)


# --- filters on hand-made logits ----------------------------------------------


def test_top_k_filter():
  logits = jnp.array([[1.0, 5.0, 3.0, 2.0], [0.0, 3.0, 3.0, 1.0]])
  out = np.asarray(sampling.top_k_filter(logits, 2))
  np.testing.assert_array_equal(out[0], [-np.inf, 5.0, 3.0, -np.inf])
  np.testing.assert_array_equal(out[1], [-np.inf, 3.0, 3.0, -np.inf])
  np.testing.assert_array_equal(np.isfinite(sampling.top_k_filter(logits, 1)[0]), [0, 1, 0, 0])
  # Ties with the k-th value are all kept.
  np.testing.assert_array_equal(np.isfinite(sampling.top_k_filter(logits, 2)[1]), [0, 1, 1, 0])
  np.testing.assert_array_equal(sampling.top_k_filter(logits, 0), logits)
  np.testing.assert_array_equal(sampling.top_k_filter(logits, 4), logits)


def test_top_p_filter():
  # Probabilities 0.5, 0.3, 0.15, 0.05 in a shuffled order.
  probs = np.array([0.15, 0.5, 0.05, 0.3])
  logits = jnp.asarray(np.log(probs)[None], jnp.float32)

  def kept(p):
    return np.isfinite(np.asarray(sampling.top_p_filter(logits, p)[0])).astype(int).tolist()

  assert kept(0.3) == [0, 1, 0, 0]  # the top token alone reaches 0.3
  assert kept(0.5 + 1e-3) == [0, 1, 0, 1]
  assert kept(0.7) == [0, 1, 0, 1]
  assert kept(0.85) == [1, 1, 0, 1]
  assert kept(0.99) == [1, 1, 1, 1]
  assert kept(1e-6) == [0, 1, 0, 0]  # never empty
  np.testing.assert_array_equal(sampling.top_p_filter(logits, 1.0), logits)
  # Kept logits are unchanged; a traced p works.
  out = jax.jit(sampling.top_p_filter)(logits, jnp.float32(0.7))
  np.testing.assert_allclose(out[0, [1, 3]], logits[0, [1, 3]])


def test_range_mask_and_guidance():
  logits = jnp.arange(6.0)[None]
  np.testing.assert_array_equal(
    np.isfinite(sampling.restrict_to_range(logits, (1, 4))[0]), [0, 1, 1, 1, 0, 0]
  )
  cond, uncond = jnp.array([2.0, 0.0]), jnp.array([1.0, 1.0])
  np.testing.assert_allclose(sampling.guided_logits(cond, uncond, 3.0), [4.0, -2.0])
  np.testing.assert_allclose(sampling.guided_logits(cond, uncond, 1.0), cond)


def test_choose_tokens_draws_only_from_the_filtered_set_in_proportion():
  logits = jnp.log(jnp.array([0.1, 0.4, 0.2, 0.3]))
  keys = jax.random.split(jax.random.key(0), 4000)
  draw = jax.jit(jax.vmap(lambda k: sampling.choose_tokens(logits, k, greedy=False, top_k=2)))
  counts = np.bincount(np.asarray(draw(keys)), minlength=4) / 4000
  assert counts[0] == 0 and counts[2] == 0
  assert counts[1] == pytest.approx(4 / 7, abs=0.03)
  assert sampling.choose_tokens(logits, keys[0], greedy=True) == 1
  assert sampling.choose_tokens(logits, keys[0], greedy=True, allowed=(2, 4)) == 3


# --- sampling loops on a tiny random model -----------------------------------


def test_greedy_cached_equals_full_recompute():
  params, prompt = _params(), _prompt()
  cached = sampling.sample(MODEL, params, prompt, NEW, jax.random.key(0), greedy=True)
  full = sampling.sample_without_cache(MODEL, params, prompt, NEW, jax.random.key(5), greedy=True)
  assert cached.shape == (B, NEW) and cached.dtype == jnp.int32
  np.testing.assert_array_equal(cached, full)
  # temperature 0 is greedy too (same compiled program), whatever the key.
  zero_t = sampling.sample(MODEL, params, prompt, NEW, jax.random.key(9), temperature=0.0)
  np.testing.assert_array_equal(zero_t, cached)
  # Greedy decoding of a random model still varies along the sequence.
  assert len(np.unique(np.asarray(cached))) > 2


def test_sampled_cached_equals_full_recompute_and_respects_allowed():
  params, prompt = _params(), _prompt()
  cached = sampling.sample(MODEL, params, prompt, NEW, jax.random.key(3), **OPTS)
  full = sampling.sample_without_cache(MODEL, params, prompt, NEW, jax.random.key(3), **OPTS)
  np.testing.assert_array_equal(cached, full)
  # (e) only ids in [4, 12) are generated (16 draws from 21 ids otherwise).
  assert np.all((np.asarray(cached) >= ALLOWED[0]) & (np.asarray(cached) < ALLOWED[1]))
  # Fixed seeds give identical outputs; another seed gives others.
  again = sampling.sample(MODEL, params, prompt, NEW, jax.random.key(3), **OPTS)
  np.testing.assert_array_equal(again, cached)
  other = sampling.sample(MODEL, params, prompt, NEW, jax.random.key(4), **OPTS)
  assert np.any(np.asarray(other) != np.asarray(cached))


def test_classifier_free_guidance():
  params, prompt = _params(), _prompt()
  uncond = jnp.full((B, P), VOCAB.null_class, jnp.int32).at[:, 1:].set(prompt[:, 1:])
  key = jax.random.key(3)
  cond_only = sampling.sample(MODEL, params, prompt, NEW, key, **OPTS)
  uncond_only = sampling.sample(MODEL, params, uncond, NEW, key, **OPTS)

  def cfg(scale):
    return sampling.sample(
      MODEL, params, prompt, NEW, key, cfg_scale=scale, uncond_prompt=uncond, **OPTS
    )

  # (b) scale 1 is the conditional model, scale 0 the unconditional one.
  np.testing.assert_array_equal(cfg(1.0), cond_only)
  np.testing.assert_array_equal(cfg(0.0), uncond_only)
  assert np.any(np.asarray(cond_only) != np.asarray(uncond_only))
  assert np.any(np.asarray(cfg(4.0)) != np.asarray(cond_only))


def test_argument_checks():
  params, prompt = _params(), _prompt()
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="max_length"):
    sampling.sample(MODEL, params, prompt, 11, key)
  with pytest.raises(ValueError, match="uncond_prompt"):
    sampling.sample(MODEL, params, prompt, 2, key, uncond_prompt=prompt[:1])
  with pytest.raises(ValueError, match="allowed"):
    sampling.sample(MODEL, params, prompt, 2, key, allowed=(0, VOCAB.size + 1))
  with pytest.raises(ValueError, match="top_p"):
    sampling.sample(MODEL, params, prompt, 2, key, top_p=0.0)
  with pytest.raises(ValueError, match="num_new"):
    sampling.sample(MODEL, params, prompt, 0, key)
