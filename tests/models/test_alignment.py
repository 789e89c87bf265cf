"""Representation alignment: projector, teacher, resampling, loss and its gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avtok_jax.data import patches
from avtok_jax.models import alignment


def test_projector_shapes_and_logical_axes():
  proj = alignment.Projector(hidden_dim=32, out_dim=12, dtype=jnp.bfloat16)
  tokens = jax.ShapeDtypeStruct((2, 5, 16), jnp.bfloat16)
  variables = jax.eval_shape(proj.init, jax.random.key(0), tokens)
  out = jax.eval_shape(proj.apply, variables, tokens)
  assert out.shape == (2, 5, 12) and out.dtype == jnp.float32
  params = variables["params"]
  assert params["fc1"]["kernel"].names == ("embed", "mlp")
  assert params["fc1"]["kernel"].value.dtype == jnp.float32  # param_dtype
  assert params["fc3"]["kernel"].value.shape == (32, 12)


def test_loss_identical_opposite_orthogonal():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32)
  assert float(alignment.alignment_loss(x, 2.5 * x)) == pytest.approx(-1.0, abs=1e-5)
  assert float(alignment.alignment_loss(x, -x)) == pytest.approx(1.0, abs=1e-5)
  a = jnp.zeros((1, 3, 4)).at[..., 0].set(1.0)
  b = jnp.zeros((1, 3, 4)).at[..., 1].set(3.0)
  assert float(alignment.alignment_loss(a, b)) == pytest.approx(0.0, abs=1e-6)
  # Mask: token 0 identical, tokens 1-2 opposite; keeping token 0 alone gives -1.
  target = jnp.concatenate([a[:, :1], -a[:, 1:]], axis=1)
  assert float(alignment.alignment_loss(a, target)) == pytest.approx(1 / 3, abs=1e-6)
  mask = jnp.array([[True, False, False]])
  assert float(alignment.alignment_loss(a, target, mask)) == pytest.approx(-1.0, abs=1e-6)


def test_resample_exact_when_grids_match_and_shapes():
  rng = np.random.default_rng(1)
  feats = jnp.asarray(rng.standard_normal((2, 2, 3, 4, 5)), jnp.float32)
  same = alignment.resample_to_grid(feats, (2, 3, 4))
  np.testing.assert_array_equal(same, feats.reshape(2, 24, 5))
  # Row-major order, as patches.py: token (t, h, w) sits at (t * 3 + h) * 4 + w.
  np.testing.assert_array_equal(same[:, (1 * 3 + 2) * 4 + 3], feats[:, 1, 2, 3])
  assert alignment.resample_to_grid(feats, (1, 6, 2)).shape == (2, 12, 5)
  # A constant field stays constant under resampling.
  const = jnp.full((1, 8, 16, 3), 2.0)
  np.testing.assert_allclose(alignment.resample_to_grid(const, (4, 8)), 2.0, rtol=1e-6)
  with pytest.raises(ValueError, match="2-D grid"):
    alignment.resample_to_grid(feats, (6, 4))


def test_random_teacher_deterministic_input_dependent_and_grids():
  teacher = alignment.RandomFeatureTeacher(seed=3, feature_dim=16, hidden_dim=8)
  assert isinstance(teacher, alignment.FeatureTeacher)
  assert teacher.feature_dim == 16
  rng = np.random.default_rng(2)
  video = jnp.asarray(rng.uniform(-1, 1, (2, 4, 32, 32, 3)), jnp.float32)
  mel = jnp.asarray(rng.uniform(-1, 1, (2, 32, 64)), jnp.float32)
  vf = jax.jit(teacher.video_features)(video)
  af = jax.jit(teacher.audio_features)(mel)
  # On the tiny preset the teacher grids equal the token grids (patch 2x8x8 and 8x8).
  assert vf.shape == (2, *patches.video_grid((4, 32, 32), (2, 8, 8)), 16)
  assert af.shape == (2, *patches.mel_grid((32, 64), (8, 8)), 16)
  # Deterministic: a second teacher from the same seed gives the same features.
  again = alignment.RandomFeatureTeacher(seed=3, feature_dim=16, hidden_dim=8)
  np.testing.assert_array_equal(jax.jit(again.video_features)(video), vf)
  np.testing.assert_array_equal(jax.jit(again.audio_features)(mel), af)
  # Input dependent: example 0 and 1 differ; a different seed differs.
  assert float(jnp.abs(vf[0] - vf[1]).mean()) > 1e-3
  assert float(jnp.abs(af[0] - af[1]).mean()) > 1e-3
  other = alignment.RandomFeatureTeacher(seed=4, feature_dim=16, hidden_dim=8)
  assert float(jnp.abs(other.video_features(video) - vf).mean()) > 1e-3
  # Paper sizes (shapes only): 16x128x128 video, 80x384 mel.
  vshape = jax.eval_shape(teacher.video_features, jax.ShapeDtypeStruct((1, 16, 128, 128, 3), "f4"))
  ashape = jax.eval_shape(teacher.audio_features, jax.ShapeDtypeStruct((1, 80, 384), "f4"))
  assert vshape.shape == (1, 8, 16, 16, 16) and ashape.shape == (1, 10, 48, 16)
  targets = alignment.teacher_targets(teacher, "video", video, (1, 4, 4))
  assert targets.shape == (2, 16, 16)


def test_gradient_reaches_projector_not_target():
  teacher = alignment.RandomFeatureTeacher(seed=0, feature_dim=8, hidden_dim=8)
  proj = alignment.Projector(hidden_dim=16, out_dim=8)
  rng = np.random.default_rng(3)
  tokens = jnp.asarray(rng.standard_normal((2, 32, 12)), jnp.float32)
  mel = jnp.asarray(rng.uniform(-1, 1, (2, 32, 64)), jnp.float32)
  params = proj.init(jax.random.key(1), tokens)["params"]

  def loss_fn(params, tokens, mel):
    target = alignment.teacher_targets(teacher, "audio", mel, (4, 8))
    return alignment.alignment_loss(proj.apply({"params": params}, tokens), target)

  g_params, g_tokens, g_mel = jax.jit(jax.grad(loss_fn, argnums=(0, 1, 2)))(params, tokens, mel)
  norms = [float(jnp.linalg.norm(x)) for x in jax.tree.leaves(nn.unbox(g_params))]
  assert all(n > 0 for n in norms)
  assert float(jnp.linalg.norm(g_tokens)) > 0  # flows on into the encoder
  assert float(jnp.abs(g_mel).max()) == 0.0  # the teacher is frozen

  # And the direct target input gets no gradient either.
  x = jnp.asarray(rng.standard_normal((1, 3, 4)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((1, 3, 4)), jnp.float32)
  gy = jax.grad(lambda y: alignment.alignment_loss(x, y))(y)
  assert float(jnp.abs(gy).max()) == 0.0
