"""Tests of the VGGish frontend and network (avtok_jax.pretrained.vggish).

The real torchvggish weights cannot be downloaded here: the network tests use
random weights with the public key names and shapes, and compare against a
PyTorch reference written from torchvggish's definition
(`torch_refs.TorchVGGish`, loaded with strict=True, which also checks the key
names and shapes).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch_refs  # tests/pretrained/torch_refs.py

from avtok_jax.pretrained import vggish, weights


def _random_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  sd = {}
  for key, shape in vggish.vggish_state_dict_shapes().items():
    if key.endswith("bias"):
      sd[key] = rng.standard_normal(shape, dtype=np.float32) * 0.05
    else:
      fan_in = int(np.prod(shape[1:]))
      sd[key] = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
  return sd


@pytest.fixture(scope="module")
def state_dict():
  return _random_state_dict()


@pytest.fixture(scope="module")
def model(state_dict, tmp_path_factory):
  path = tmp_path_factory.mktemp("vggish") / "vggish.npz"
  weights.save_state_dict(path, state_dict)
  return vggish.load_vggish(path, batch_size=4)


def _sine(freq: float, seconds: float, sr: int) -> np.ndarray:
  t = np.arange(int(round(seconds * sr))) / sr
  return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# ----------------------------------------------------------------------------
# Frontend
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(("band", "sr"), [(10, 16000), (30, 22050), (55, 44100)])
def test_sine_energy_lands_in_its_mel_band(band, sr):
  # Centre of `band` on the HTK mel scale: 64 bands, edges equally spaced in
  # mel between 125 and 7500 Hz (66 edges, band i centred on edge i + 1).
  mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731
  centre_mel = np.linspace(mel(125.0), mel(7500.0), 66)[band + 1]
  freq = 700.0 * (np.exp(centre_mel / 1127.0) - 1.0)
  examples = vggish.vggish_log_mel_examples(_sine(freq, 1.5, sr), sr)
  profile = examples.mean(axis=(0, 1))  # [64] mean log-mel per band
  assert int(np.argmax(profile)) == band
  far = np.abs(np.arange(64) - band) >= 3
  assert profile[band] - profile[far].max() > 2.0  # e^2 = 7x the energy of any far band


def test_example_and_frame_counts():
  # F = 1 + (S - 400) // 160 frames, K = 1 + (F - 96) // 96 examples (16 kHz).
  assert vggish.vggish_log_mel(np.zeros(16000)).shape == (98, 64)
  cases = {15600: 1, 30959: 1, 30960: 2, 46320: 3}
  for samples, k in cases.items():
    assert vggish.vggish_log_mel_examples(np.zeros(samples), 16000).shape == (k, 96, 64)
  # 2.2 s at 22.05 kHz -> 35200 samples at 16 kHz -> 218 frames -> 2 examples.
  assert vggish.vggish_log_mel_examples(np.zeros(48510), 22050).shape == (2, 96, 64)


def test_silence_is_the_log_offset_and_output_is_float32():
  ex = vggish.vggish_log_mel_examples(np.zeros(16000, np.float32), 16000)
  assert ex.dtype == np.float32
  np.testing.assert_allclose(ex, np.log(0.01), rtol=1e-6)


def test_mel_matrix_shape_and_dc_bin():
  m = vggish.mel_matrix()
  assert m.shape == (257, 64)
  assert np.all(m[0] == 0) and np.all(m >= 0) and m.max() <= 1.0
  # Nothing above 7500 Hz (bin k is at k * 8000 / 256 Hz).
  assert np.all(m[int(np.ceil(7500 / (8000 / 256))) + 1 :] == 0)


def test_short_or_bad_audio_is_refused(model):
  with pytest.raises(ValueError, match=r"too short.*15600 samples at 16000 Hz \(0\.975 s"):
    vggish.vggish_log_mel_examples(np.zeros(int(0.96 * 22050), np.float32), 22050)
  with pytest.raises(ValueError, match="15600"):
    model.embed(np.zeros((2, 15599), np.float32), 16000)
  with pytest.raises(ValueError, match="mono"):
    vggish.vggish_log_mel_examples(np.zeros((2, 20000), np.float32), 16000)
  with pytest.raises(ValueError, match="sample_rate"):
    vggish.vggish_log_mel_examples(np.zeros(20000, np.float32), 0)
  with pytest.raises(ValueError, match=r"waves \[N, samples\]"):
    model.embed(np.zeros(20000, np.float32), 16000)


# ----------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------


_torch_embed = torch_refs.torch_vggish


def test_embed_shape_and_pytorch_reference(model, state_dict):
  rng = np.random.default_rng(3)
  # Two clips of 2.2 s at 22.05 kHz: noise plus a tone, so the log-mel is far from flat.
  waves = 0.1 * rng.standard_normal((2, 48510)).astype(np.float32)
  waves += _sine(440.0, 2.2, 22050)[None]
  emb = model.embed(waves, 22050)
  assert emb.shape == (2, 2, 128) and emb.dtype == np.float32
  assert np.all(emb >= 0)  # the port's final ReLU
  examples = np.stack([vggish.vggish_log_mel_examples(w, 22050) for w in waves]).reshape(4, 96, 64)
  want = _torch_embed(state_dict, examples).reshape(2, 2, 128)
  assert np.abs(want).max() > 1e-2 and np.mean(want > 0) > 0.2  # a real comparison
  np.testing.assert_allclose(emb, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_pre_activation_embedding_and_padded_chunks(state_dict, model):
  """final_relu=False gives the TF reference's pre-activation output; 3 examples pad to 4."""
  rng = np.random.default_rng(4)
  examples = rng.normal(-2.0, 1.5, (3, 96, 64)).astype(np.float32)
  pre = vggish.VGGish(model.params, final_relu=False, batch_size=4).embed_examples(examples)
  want = _torch_embed(state_dict, examples, final_relu=False)
  assert pre.shape == (3, 128) and np.any(want < 0)
  np.testing.assert_allclose(pre, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_missing_key_and_wrong_shape_are_named(state_dict):
  broken = dict(state_dict)
  del broken["embeddings.2.bias"]
  broken["features.6.weight"] = np.zeros((256, 128, 3, 1), np.float32)
  with pytest.raises(ValueError) as e:
    vggish.vggish_params_from_state_dict(broken, source="my.npz")
  msg = str(e.value)
  assert "my.npz" in msg and "missing key 'embeddings.2.bias'" in msg
  assert "'features.6.weight' has shape (256, 128, 3, 1), expected (256, 128, 3, 3)" in msg


def test_pca_postprocess(model, tmp_path):
  # Identity PCA, zero means, stored in torchvggish's [128, 1] column form.
  path = tmp_path / "pca.npz"
  weights.save_state_dict(
    path, {"pca_eigen_vectors": np.eye(128), "pca_means": np.zeros((128, 1), np.float32)}
  )
  with_pca = vggish.VGGish(model.params, pca=vggish.load_pca(path))
  e = np.zeros((1, 128), np.float32)
  e[0, :4] = [-3.0, 3.0, 1.0, -0.5]
  q = with_pca.postprocess(e)
  # round((clip(e, -2, 2) + 2) * 255 / 4): 0, 255, round(191.25), round(95.625), round(127.5)
  np.testing.assert_array_equal(q[0, :5], [0, 255, 191, 96, 128])
  with pytest.raises(ValueError, match="PCA"):
    model.postprocess(e)
