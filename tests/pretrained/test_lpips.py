"""Tests of LPIPS-VGG (avtok_jax.pretrained.lpips) and the weight-file helpers it uses.

The real VGG16/LPIPS weights cannot be downloaded here, so every test builds
random weights with the public PyTorch key names and shapes. The whole network
is checked against a PyTorch reference written from the lpips package's
definition (`torch_refs.TorchLPIPS`), into which the same state dict is loaded
with strict=True (which also proves the key names and shapes match a
torchvision-style VGG16 and the lpips heads).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch_refs  # tests/pretrained/torch_refs.py

from avtok_jax.pretrained import lpips, weights

H = W = 32  # smallest comfortable size (relu5_3 is 2x2 here)


@pytest.fixture(scope="module")
def state_dict():
  return torch_refs.lpips_state_dict()


@pytest.fixture(scope="module")
def weight_file(state_dict, tmp_path_factory):
  path = tmp_path_factory.mktemp("lpips") / "lpips_vgg.npz"
  weights.save_state_dict(path, state_dict)
  return path


@pytest.fixture(scope="module")
def metric(weight_file):
  return lpips.load_lpips(weight_file)


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (2, H, W, 3)).astype(np.float32)
  # y: x plus a smooth perturbation, so the distance is not saturated.
  y = np.clip(x + 0.3 * np.sin(np.linspace(0, 6, W))[None, None, :, None], -1, 1)
  return x, y.astype(np.float32)


# ----------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------


def test_matches_pytorch_reference(metric, state_dict, images):
  x, y = images
  got = np.asarray(metric(x, y))
  want = torch_refs.torch_lpips(state_dict, x, y)
  assert got.shape == (2,)
  np.testing.assert_allclose(got, want, rtol=1e-4)
  assert np.all(want > 1e-3)  # a real comparison, not of two zeros


def test_identity_symmetry_and_positivity(metric, images):
  x, y = images
  np.testing.assert_array_equal(np.asarray(metric(x, x)), 0.0)
  d_xy, d_yx = np.asarray(metric(x, y)), np.asarray(metric(y, x))
  np.testing.assert_allclose(d_xy, d_yx, rtol=1e-5)
  assert np.all(d_xy > 0)


def test_video_is_mean_over_frames(metric, images):
  x, y = images
  per_frame = np.asarray(metric(x, y))
  video = np.asarray(metric(x[None], y[None]))  # [1, T=2, H, W, 3]
  assert video.shape == (1,)
  np.testing.assert_allclose(video[0], per_frame.mean(), rtol=1e-5)


def test_pure_function_on_videos_with_finite_gradient_inside_jit(metric, images):
  """lpips_apply as a training loss: jitted, videos [N, T=1, ...], differentiated."""
  _, y = images
  black = -np.ones_like(y)  # many all-zero ReLU features: sqrt'(0) must not leak NaN
  per_frame = np.asarray(metric(black, y))

  # params as an argument, as in a training step (closing over them would
  # make 15M constants and a slow compile).
  def loss(a, params):
    return lpips.lpips_apply(params, a, y[:, None]).sum()

  value, grad = jax.jit(jax.value_and_grad(loss))(black[:, None], metric.params)
  np.testing.assert_allclose(float(value), per_frame.sum(), rtol=1e-5)
  grad = np.asarray(grad)
  assert grad.shape == (2, 1, H, W, 3)
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_unit_normalize_has_finite_gradient_at_zero():
  f = jnp.zeros((1, 2, 2, 4)).at[0, 0, 0].set(jnp.array([3.0, 4.0, 0.0, 0.0]))
  out = lpips._unit_normalize(f)
  np.testing.assert_allclose(out[0, 0, 0], [0.6, 0.8, 0, 0], rtol=1e-6)
  np.testing.assert_array_equal(out[0, 1, 1], 0.0)
  grad = jax.jit(jax.grad(lambda a: jnp.sum(lpips._unit_normalize(a) * jnp.arange(4.0))))(f)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_conv_layout_matches_direct_correlation():
  """OIHW -> HWIO: a flax-layout conv equals sum_{c,i,j} x[y+i, x+j, c] w[o, c, i, j]."""
  rng = np.random.default_rng(2)
  x = rng.standard_normal((1, 5, 6, 3)).astype(np.float32)
  w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)  # [out, in, kh, kw], asymmetric
  got = jax.lax.conv_general_dilated(
    x,
    weights.conv_oihw_to_hwio(w),
    (1, 1),
    ((1, 1), (1, 1)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    precision=jax.lax.Precision.HIGHEST,
  )
  padded = np.pad(x[0], ((1, 1), (1, 1), (0, 0)))
  want = np.zeros((5, 6, 4), np.float64)
  for r in range(5):
    for c in range(6):
      want[r, c] = np.einsum("ijk,okij->o", padded[r : r + 3, c : c + 3], w)
  np.testing.assert_allclose(np.asarray(got)[0], want, rtol=1e-5, atol=1e-5)


def test_missing_key_is_named(state_dict, tmp_path):
  broken = dict(state_dict)
  del broken["features.14.weight"]
  path = tmp_path / "broken.npz"
  weights.save_state_dict(path, broken)
  with pytest.raises(ValueError, match=r"missing key 'features\.14\.weight'") as e:
    lpips.load_lpips(path)
  assert str(path) in str(e.value)


def test_wrong_shape_is_named(state_dict, tmp_path):
  broken = dict(state_dict)
  broken["lin3.model.1.weight"] = np.ones((1, 256, 1, 1), np.float32)
  path = tmp_path / "broken.npz"
  weights.save_state_dict(path, broken)
  with pytest.raises(ValueError, match=r"'lin3\.model\.1\.weight' has shape \(1, 256, 1, 1\)"):
    lpips.load_lpips(path)


def test_missing_file_and_pickle_formats_are_refused(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    lpips.load_lpips(tmp_path / "nope.npz")
  with pytest.raises(ValueError, match="pickles"):
    lpips.load_lpips(tmp_path / "vgg.pth")
  obj = tmp_path / "objects.npz"
  np.savez(obj, a=np.array([{"x": 1}], dtype=object))
  with pytest.raises(ValueError, match="without pickle"):
    weights.load_state_dict(obj)


def test_safetensors_round_trip_and_split_files(state_dict, tmp_path):
  st = tmp_path / "lpips.safetensors"
  weights.save_state_dict(st, state_dict)
  back = weights.load_state_dict(st)
  assert back.keys() == state_dict.keys()
  for k, v in state_dict.items():
    assert back[k].dtype == np.float32
    np.testing.assert_array_equal(back[k], v)
  # VGG16 features and lpips heads in two files, as they are published.
  vgg = {k: v for k, v in state_dict.items() if k.startswith("features.")}
  heads = {k: v for k, v in state_dict.items() if k.startswith("lin")}
  weights.save_state_dict(tmp_path / "vgg.npz", vgg)
  weights.save_state_dict(tmp_path / "heads.safetensors", heads)
  merged = weights.load_state_dicts([tmp_path / "vgg.npz", tmp_path / "heads.safetensors"])
  a = lpips.lpips_params_from_state_dict(merged)
  b = lpips.lpips_params_from_state_dict(state_dict)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  with pytest.raises(ValueError, match="appears in both"):
    weights.load_state_dicts([tmp_path / "vgg.npz", tmp_path / "vgg.npz"])


def test_safetensors_reads_bf16_and_f16(tmp_path):
  """Hand-written file: a BF16 tensor (1.0, -2.0) and an F16 one, per the published layout."""
  import json
  import struct

  bf16 = np.array([0x3F80, 0xC000], dtype="<u2").tobytes()  # 1.0, -2.0
  f16 = np.array([0.5, 3.0], dtype="<f2").tobytes()
  header = {
    "a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]},
    "b": {"dtype": "F16", "shape": [1, 2], "data_offsets": [4, 8]},
    "__metadata__": {"format": "pt"},
  }
  text = json.dumps(header).encode()
  path = tmp_path / "x.safetensors"
  path.write_bytes(struct.pack("<Q", len(text)) + text + bf16 + f16)
  sd = weights.load_state_dict(path)
  np.testing.assert_array_equal(sd["a"], np.array([1.0, -2.0], np.float32))
  np.testing.assert_array_equal(sd["b"], np.array([[0.5, 3.0]], np.float16))


def test_bad_inputs_are_refused(metric, images):
  x, y = images
  with pytest.raises(ValueError, match="differ in shape"):
    metric(x, y[:1])
  with pytest.raises(ValueError, match=r"\[-1, 1\]"):
    metric(x * 255, y)
  with pytest.raises(ValueError, match="dtype uint8"):
    metric(np.zeros((1, H, W, 3), np.uint8), np.zeros((1, H, W, 3), np.uint8))
  with pytest.raises(ValueError, match="H, W >= 16"):
    metric(x[:, :8], y[:, :8])
  with pytest.raises(ValueError, match="3\\]"):
    metric(x[..., :1], y[..., :1])
