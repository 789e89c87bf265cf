"""Patchify/unpatchify: exact inverses, documented token order, numpy and JAX."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avtok_jax import config_lib
from avtok_jax.data import patches


def _video(shape):
  return np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)


def test_video_roundtrip_numpy_and_token_order():
  x = _video((4, 8, 6, 8, 3))  # [lead=4, T=8, H=6, W=8, C=3]
  patch = (2, 3, 4)
  p = patches.patchify_video(x, patch)
  assert p.shape == (4, (8 // 2) * (6 // 3) * (8 // 4), 2 * 3 * 4 * 3)
  assert p.dtype == np.uint8
  np.testing.assert_array_equal(patches.unpatchify_video(p, (8, 6, 8, 3), patch), x)
  # Token order: t-major, then h, then w; inside a token (pt, ph, pw, C).
  nt, nh, nw = patches.video_grid((8, 6, 8), patch)
  for b in range(4):
    for ti in range(nt):
      for hi in range(nh):
        for wi in range(nw):
          token = p[b, (ti * nh + hi) * nw + wi]
          block = x[b, ti * 2 : ti * 2 + 2, hi * 3 : hi * 3 + 3, wi * 4 : wi * 4 + 4, :]
          np.testing.assert_array_equal(token, block.reshape(-1))


def test_video_no_lead_dims_and_float():
  x = np.random.default_rng(1).standard_normal((4, 8, 8, 3)).astype(np.float32)
  p = patches.patchify_video(x, (2, 4, 4))
  assert p.shape == (2 * 2 * 2, 2 * 4 * 4 * 3)
  np.testing.assert_array_equal(patches.unpatchify_video(p, x.shape, (2, 4, 4)), x)


def test_mel_roundtrip_and_token_order():
  mel = np.random.default_rng(2).standard_normal((3, 16, 24)).astype(np.float32)
  patch = (8, 4)
  p = patches.patchify_mel(mel, patch)
  assert p.shape == (3, 2 * 6, 32)
  np.testing.assert_array_equal(patches.unpatchify_mel(p, (16, 24), patch), mel)
  nf, nl = patches.mel_grid((16, 24), patch)
  for fi in range(nf):
    for li in range(nl):
      np.testing.assert_array_equal(
        p[1, fi * nl + li], mel[1, fi * 8 : fi * 8 + 8, li * 4 : li * 4 + 4].reshape(-1)
      )


def test_jax_matches_numpy_eager_and_jit():
  video = _video((2, 4, 8, 8, 3)).astype(np.float32)
  mel = np.random.default_rng(3).standard_normal((2, 16, 32)).astype(np.float32)
  vp, mp = (2, 4, 4), (8, 8)

  @jax.jit
  def roundtrip(v, m):
    pv = patches.patchify_video(v, vp)
    pm = patches.patchify_mel(m, mp)
    return (
      pv,
      pm,
      patches.unpatchify_video(pv, v.shape[1:], vp),
      patches.unpatchify_mel(pm, m.shape[1:], mp),
    )

  pv, pm, v2, m2 = roundtrip(jnp.asarray(video), jnp.asarray(mel))
  np.testing.assert_array_equal(np.asarray(pv), patches.patchify_video(video, vp))
  np.testing.assert_array_equal(np.asarray(pm), patches.patchify_mel(mel, mp))
  np.testing.assert_array_equal(np.asarray(v2), video)
  np.testing.assert_array_equal(np.asarray(m2), mel)
  # Eager JAX arrays go through the same code path.
  eager = patches.patchify_video(jnp.asarray(video), vp)
  assert isinstance(eager, jax.Array)
  np.testing.assert_array_equal(np.asarray(eager), np.asarray(pv))


def test_grids_from_config_match_design():
  # AVTOK.md section 2: 4x16x16 = 1024 video tokens, 10x48 = 480 mel tokens (paper preset).
  grids = patches.token_grids(config_lib.data_config("paper"))
  assert grids == {"video": (4, 16, 16), "mel": (10, 48)}
  grids = patches.token_grids(config_lib.data_config("tiny"))
  assert grids == {"video": (2, 4, 4), "mel": (4, 8)}


def test_errors_name_the_shapes():
  with pytest.raises(ValueError, match=r"not divisible by the patch"):
    patches.patchify_video(np.zeros((5, 8, 8, 3)), (2, 4, 4))
  with pytest.raises(ValueError, match=r"not divisible by the patch"):
    patches.patchify_mel(np.zeros((10, 30)), (8, 8))
  with pytest.raises(ValueError, match=r"\[\.\.\., T, H, W, C\]"):
    patches.patchify_video(np.zeros((8, 8, 3)), (2, 4, 4))
  with pytest.raises(ValueError, match=r"do not hold a video"):
    patches.unpatchify_video(np.zeros((7, 96)), (4, 8, 8, 3), (2, 4, 4))
  with pytest.raises(ValueError, match=r"do not hold a mel"):
    patches.unpatchify_mel(np.zeros((4, 63)), (16, 16), (8, 8))
