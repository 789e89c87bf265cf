"""VectorQuantizer on one device: codes, straight-through gradients, sampling, statistics."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avtok_jax import sharding
from avtok_jax.models import quantizer
from avtok_jax.models.quantizer import VectorQuantizer

K, D = 16, 8
SHAPE = (4, 6, D)  # One input shape for most tests: fewer programs to compile.


@functools.partial(jax.jit, static_argnames=("model", "train", "stochastic", "mutable"))
def _call(model, variables, z, mask=None, rng=None, *, train, stochastic=False, mutable=False):
  """Jitted `model.apply` (one compile per configuration, faster than eager here)."""
  rngs = None if rng is None else {"sample": rng}
  return model.apply(
    variables, z, train=train, stochastic=stochastic, mask=mask, rngs=rngs, mutable=mutable
  )


def _normalize_np(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@functools.cache
def _initial_variables():
  """Boxed variables of the default quantizer (init in training mode, compiled once)."""
  model = VectorQuantizer(codebook_size=K, code_dim=D)
  init = jax.jit(lambda key, z: model.init({"params": key}, z, train=True))
  return init(jax.random.key(100), jnp.zeros(SHAPE))


def _setup(seed=0, **kwargs):
  """(model with these attributes, unboxed variables, random z of SHAPE).

  Every configuration shares the default variables: no attribute but the
  sizes changes the variables.
  """
  model = VectorQuantizer(codebook_size=K, code_dim=D, **kwargs)
  z = jax.random.normal(jax.random.key(seed), SHAPE)
  return model, nn.unbox(_initial_variables()), z


def _with_codebook(codebook, **kwargs):
  """A quantizer whose codebook is the given [K, D] array (stats zero)."""
  codebook = jnp.asarray(codebook, jnp.float32)
  model = VectorQuantizer(codebook_size=codebook.shape[0], code_dim=codebook.shape[1], **kwargs)
  counts = jnp.zeros((codebook.shape[0],), jnp.float32)
  return model, {"params": {"codebook": codebook}, "codebook_stats": {"counts": counts}}


def test_variables_shapes_dtypes_and_logical_axes():
  variables = _initial_variables()
  codebook = variables["params"]["codebook"]
  counts = variables["codebook_stats"]["counts"]
  assert set(variables) == {"params", "codebook_stats"}
  assert list(variables["params"]) == ["codebook"]
  assert codebook.names == ("vocab", "code") and codebook.value.shape == (K, D)
  assert codebook.value.dtype == jnp.float32
  # N(0, 1) init: unnormalized rows.
  assert 0.5 < float(jnp.std(codebook.value)) < 1.5
  assert counts.names == ("vocab",) and counts.value.shape == (K,)
  # Counts start at zero even though init ran in training mode.
  np.testing.assert_array_equal(counts.value, np.zeros(K))


def test_codes_are_the_cosine_nearest_neighbour():
  model, variables, z = _setup()
  out = _call(model, variables, z, train=False)
  assert out.codes.shape == SHAPE[:-1] and out.codes.dtype == jnp.int32
  assert out.quantized.shape == SHAPE and out.quantized.dtype == jnp.float32
  assert out.z.shape == SHAPE
  for name in ("commit_loss", "codebook_loss", "loss", "perplexity", "usage"):
    assert getattr(out, name).shape == (), name

  codebook = _normalize_np(variables["params"]["codebook"])
  zn = _normalize_np(z)
  expected = np.argmax(zn @ codebook.T, axis=-1)
  np.testing.assert_array_equal(out.codes, expected)
  # Same as the smallest Euclidean distance between unit vectors.
  dist = ((zn[..., None, :] - codebook) ** 2).sum(-1)
  np.testing.assert_array_equal(out.codes, np.argmin(dist, axis=-1))

  np.testing.assert_allclose(out.z, zn, atol=1e-6)
  lookup = model.apply(variables, out.codes, method=VectorQuantizer.lookup)
  np.testing.assert_array_equal(out.quantized, lookup)  # Bit-exact value.
  np.testing.assert_allclose(lookup, codebook[expected], atol=1e-6)
  np.testing.assert_allclose(
    model.apply(variables, method=VectorQuantizer.codebook), codebook, atol=1e-6
  )

  # Losses: means over positions and code dims (the LARP / LlamaGen mse).
  mse = np.mean((codebook[expected] - zn) ** 2)
  np.testing.assert_allclose(out.commit_loss, mse, rtol=1e-5)
  np.testing.assert_allclose(out.codebook_loss, mse, rtol=1e-5)
  np.testing.assert_allclose(out.loss, 0.25 * mse + 1.0 * mse, rtol=1e-5)


def test_compute_dtype_and_input_checks():
  model, variables, z = _setup(dtype=jnp.bfloat16)
  out = _call(model, variables, z.astype(jnp.bfloat16), train=False)
  assert out.quantized.dtype == jnp.bfloat16 and out.z.dtype == jnp.bfloat16
  assert out.loss.dtype == jnp.float32 and out.perplexity.dtype == jnp.float32
  # The search itself is float32: same codes as from the float32 input.
  ref = _call(
    VectorQuantizer(codebook_size=K, code_dim=D),
    variables,
    z.astype(jnp.bfloat16).astype(jnp.float32),
    train=False,
  )
  np.testing.assert_array_equal(out.codes, ref.codes)
  with pytest.raises(ValueError, match="Expected z"):
    model.apply(variables, jnp.ones((2, D + 1)), train=False)


def test_straight_through_gradient_is_the_identity():
  model, variables, x = _setup(seed=1)
  w = jax.random.normal(jax.random.key(7), x.shape)

  def through_quantizer(x):
    return jnp.sum(w * model.apply(variables, x, train=True).quantized)

  def through_normalize_only(x):
    return jnp.sum(w * quantizer.l2_normalize(x))

  g_vq = jax.jit(jax.grad(through_quantizer))(x)
  g_ref = jax.jit(jax.grad(through_normalize_only))(x)
  assert float(jnp.max(jnp.abs(g_ref))) > 1e-3
  np.testing.assert_allclose(g_vq, g_ref, rtol=1e-5, atol=1e-6)


def test_rotation_trick_keeps_the_value_and_rotates_the_gradient():
  """gradient='rotation': value exactly q; d/dz = vjp of normalize at R^T w, R: z -> q orthogonal."""
  model, variables, x = _setup(seed=1)
  rotating = VectorQuantizer(codebook_size=K, code_dim=D, gradient="rotation")
  w = jax.random.normal(jax.random.key(7), x.shape)
  out = _call(rotating, variables, x, train=True)
  np.testing.assert_array_equal(out.quantized, _call(model, variables, x, train=True).quantized)

  g = jax.jit(jax.grad(lambda x: jnp.sum(w * rotating.apply(variables, x, train=True).quantized)))(
    x
  )
  z = np.asarray(quantizer.l2_normalize(x), np.float64).reshape(-1, D)
  q = np.asarray(out.quantized, np.float64).reshape(-1, D)
  expected = []
  for zi, qi, wi in zip(z, q, np.asarray(w, np.float64).reshape(-1, D), strict=True):
    r = (zi + qi) / np.linalg.norm(zi + qi)
    rot = np.eye(D) - 2 * np.outer(r, r) + 2 * np.outer(qi, zi)
    np.testing.assert_allclose(rot @ zi, qi, atol=1e-5)  # takes z to q ...
    np.testing.assert_allclose(rot.T @ rot, np.eye(D), atol=1e-5)  # ... and is a rotation
    expected.append(rot.T @ wi)
  expected = jnp.asarray(np.stack(expected).reshape(x.shape), jnp.float32)
  _, vjp = jax.vjp(quantizer.l2_normalize, x)
  np.testing.assert_allclose(g, vjp(expected)[0], rtol=1e-4, atol=1e-5)
  # Not the straight-through gradient.
  g_st = jax.jit(jax.grad(lambda x: jnp.sum(w * model.apply(variables, x, train=True).quantized)))(
    x
  )
  assert float(jnp.max(jnp.abs(g - g_st))) > 1e-3


def test_codebook_gradient_only_through_codebook_loss():
  x = jax.random.normal(jax.random.key(2), SHAPE)
  w = jax.random.normal(jax.random.key(3), x.shape)

  def grads(model, variables, pick):
    def objective(params, x):
      out = model.apply({"params": params}, x, train=True)
      return pick(out)

    return jax.jit(jax.grad(objective, argnums=(0, 1)))(variables["params"], x)

  # No loss weights: the quantized output and the loss give the codebook nothing.
  model0, variables, _ = _setup(commit_weight=0.0, codebook_weight=0.0)
  g_params, _ = grads(model0, variables, lambda o: jnp.sum(w * o.quantized) + o.loss)
  np.testing.assert_array_equal(g_params["codebook"], 0.0)

  model, _, _ = _setup()
  # Codebook loss: gradient to the used codebook rows only, none to z.
  g_params, g_x = grads(model, variables, lambda o: o.codebook_loss)
  np.testing.assert_array_equal(g_x, 0.0)
  used = np.unique(_call(model, variables, x, train=False).codes)
  row_norms = np.linalg.norm(g_params["codebook"], axis=-1)
  assert np.all(row_norms[used] > 0)
  np.testing.assert_array_equal(np.delete(row_norms, used), 0.0)
  # Commitment loss: gradient to z only.
  g_params, g_x = grads(model, variables, lambda o: o.commit_loss)
  np.testing.assert_array_equal(g_params["codebook"], 0.0)
  assert float(jnp.max(jnp.abs(g_x))) > 0


def test_stochastic_versus_deterministic_choice():
  # The temperature only matters for sampling: the default model gives argmax.
  model, variables, z = _setup(seed=4)
  hot = model.clone(temperature=10.0)
  argmax = _call(model, variables, z, train=False).codes

  def sample(model, seed, train=True):
    return _call(model, variables, z, rng=jax.random.key(seed), train=train, stochastic=True).codes

  a, b, c = sample(hot, 0), sample(hot, 0), sample(hot, 1)
  np.testing.assert_array_equal(a, b)  # Same rng, same codes.
  assert np.any(a != argmax) and np.any(a != c)
  # Eval is always argmax, even when asked to sample and given an rng.
  np.testing.assert_array_equal(sample(model, 0, train=False), argmax)
  # Training without the flag is argmax too.
  np.testing.assert_array_equal(_call(model, variables, z, train=True).codes, argmax)
  # Very low temperature: the noise cannot overcome any similarity gap.
  np.testing.assert_array_equal(sample(model.clone(temperature=1e-6), 0), argmax)


def test_sampling_frequencies_follow_softmax():
  angles = np.array([0.0, 0.3, 0.6, 1.2])
  codebook = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
  temperature = 0.25
  model, variables = _with_codebook(codebook, temperature=temperature)
  n = 4000
  z = jnp.tile(jnp.array([[1.0, 0.0]]), (n, 1))
  out = _call(model, variables, z, rng=jax.random.key(0), train=True, stochastic=True)
  freq = np.bincount(np.asarray(out.codes), minlength=4) / n
  logits = np.cos(angles) / temperature
  expected = np.exp(logits - logits.max())
  expected /= expected.sum()
  # Binomial std <= sqrt(0.25 / 4000) = 0.008.
  np.testing.assert_allclose(freq, expected, atol=0.03)


def test_usage_metrics_on_hand_made_histograms():
  cases = {
    (2, 2, 0, 0): (0.5, 2.0),
    (1, 1, 1, 1): (1.0, 4.0),
    (5, 0, 0, 0): (0.25, 1.0),
    (0, 0, 0, 0): (0.0, 1.0),
    (1, 3, 0, 0): (0.5, np.exp(-(0.25 * np.log(0.25) + 0.75 * np.log(0.75)))),
  }
  for counts, (usage, perplexity) in cases.items():
    m = quantizer.usage_metrics(jnp.array(counts, jnp.float32))
    assert set(m) == {"codebook_usage", "codebook_perplexity"}
    np.testing.assert_allclose(m["codebook_usage"], usage, rtol=1e-6, err_msg=str(counts))
    np.testing.assert_allclose(m["codebook_perplexity"], perplexity, rtol=1e-6, err_msg=str(counts))


def test_batch_statistics_and_mask():
  model, variables = _with_codebook(np.eye(4))
  # Tokens exactly on codes 0, 0, 1, 1, 2, 3.
  codes = np.array([[0, 0, 1], [1, 2, 3]])
  z = jnp.asarray(np.eye(4)[codes] * 3.0)  # Any scale: normalized inside.
  out = _call(model, variables, z, train=False)
  np.testing.assert_array_equal(out.codes, codes)
  np.testing.assert_allclose(out.usage, 1.0)
  p = np.array([2, 2, 1, 1]) / 6
  np.testing.assert_allclose(out.perplexity, np.exp(-(p * np.log(p)).sum()), rtol=1e-6)
  np.testing.assert_allclose(out.loss, 0.0, atol=1e-7)

  # Mask out codes 2 and 3, and move those tokens far from every code:
  # they change neither the statistics nor the losses.
  mask = np.array([[True, True, True], [True, False, False]])
  z_far = z.at[1, 1:].set(jnp.array([-1.0, -1.0, -1.0, -1.0]))
  out = _call(model, variables, z_far, mask, train=False)
  np.testing.assert_allclose(out.usage, 0.5)
  np.testing.assert_allclose(out.perplexity, 2.0, rtol=1e-6)
  np.testing.assert_allclose(out.commit_loss, 0.0, atol=1e-7)
  np.testing.assert_allclose(out.codebook_loss, 0.0, atol=1e-7)
  unmasked = _call(model, variables, z_far, train=False)
  assert float(unmasked.commit_loss) > 0.1


def test_codebook_stats_accumulate_only_when_mutable_in_training():
  model, variables, z1 = _setup(seed=5)
  z2 = jax.random.normal(jax.random.key(6), z1.shape)
  mask = np.ones(z1.shape[:-1], bool)
  mask[0, :2] = False

  mutable = ("codebook_stats",)
  out1, upd1 = _call(model, variables, z1, mask, train=True, mutable=mutable)
  counts1 = np.asarray(nn.unbox(upd1)["codebook_stats"]["counts"])
  expected1 = np.bincount(np.asarray(out1.codes)[mask], minlength=K)
  np.testing.assert_array_equal(counts1, expected1)

  variables2 = {**variables, **nn.unbox(upd1)}
  all_true = np.ones_like(mask)
  out2, upd2 = _call(model, variables2, z2, all_true, train=True, mutable=mutable)
  counts2 = np.asarray(nn.unbox(upd2)["codebook_stats"]["counts"])
  np.testing.assert_array_equal(counts2, expected1 + np.bincount(out2.codes.ravel(), minlength=K))
  assert counts2.sum() == mask.sum() + z2.shape[0] * z2.shape[1]
  m = quantizer.usage_metrics(counts2)
  np.testing.assert_allclose(m["codebook_usage"], np.mean(counts2 > 0))

  # Eval does not count, even when the collection is mutable.
  _, upd_eval = _call(model, variables2, z2, all_true, train=False, mutable=mutable)
  np.testing.assert_array_equal(nn.unbox(upd_eval)["codebook_stats"]["counts"], counts1)
  # Not mutable, or no stats at all (params only): training applies still work.
  out = _call(model, variables2, z2, all_true, train=True)
  np.testing.assert_array_equal(out.codes, out2.codes)
  out = _call(model, {"params": variables["params"]}, z2, all_true, train=True)
  np.testing.assert_array_equal(out.codes, out2.codes)


def test_plain_path_without_vocab_sharding():
  assert quantizer.vocab_mesh_axes() == ()
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    assert quantizer.vocab_mesh_axes() == ()  # 'vocab' -> 'model' of size 1.
