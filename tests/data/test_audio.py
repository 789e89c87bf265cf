"""Tests of the log-mel frontend (avtok_jax.data.audio)."""

from __future__ import annotations

import math

import jax
import librosa
import numpy as np
import pytest

from avtok_jax import config_lib
from avtok_jax.data import audio

PAPER = audio.MelSpec.from_config(config_lib.data_config("paper"))
TINY = audio.MelSpec.from_config(config_lib.data_config("tiny"))


def _chord_and_burst(n: int, sr: int, seed: int = 1) -> np.ndarray:
  """A C-major chord with a Hann-shaped noise burst: tonal and noisy parts."""
  t = np.arange(n) / sr
  x = sum(0.2 * np.sin(2 * np.pi * f * t) for f in (261.63, 329.63, 392.0))
  burst = np.zeros(n)
  start, width = n // 3, 2000
  burst[start : start + width] = (
    np.random.default_rng(seed).standard_normal(width) * 0.3 * np.hanning(width)
  )
  return (x + burst).astype(np.float32)


@pytest.mark.parametrize("preset", config_lib.DATA_PRESETS)
def test_from_config_matches_each_preset(preset):
  c = config_lib.data_config(preset)
  spec = audio.MelSpec.from_config(c)
  assert spec.sample_rate == c.sample_rate
  for field in ("n_fft", "hop_length", "win_length", "n_mels", "fmin", "fmax", "log_floor"):
    assert getattr(spec, field) == c.mel[field], field
  assert (spec.norm_min, spec.norm_max) == (c.mel.norm_min, c.mel.norm_max)
  assert spec.griffin_lim_iters == c.mel.griffin_lim_iters
  wave = np.random.default_rng(0).standard_normal(c.num_samples).astype(np.float32) * 0.1
  mel = audio.mel_features(wave, spec)
  assert mel.shape == (c.mel.n_mels, config_lib.num_mel_frames(c))
  assert mel.dtype == np.float32


def test_shapes_tiny_and_paper():
  rng = np.random.default_rng(0)
  assert audio.log_mel(rng.standard_normal(4096).astype(np.float32), TINY).shape == (32, 64)
  assert audio.log_mel(rng.standard_normal(98304).astype(np.float32), PAPER).shape == (80, 384)
  # Leading batch dimensions are kept.
  batch = rng.standard_normal((2, 3, 4096)).astype(np.float32)
  out = audio.log_mel(batch, TINY)
  assert out.shape == (2, 3, 32, 64)
  np.testing.assert_array_equal(out[1, 2], audio.log_mel(batch[1, 2], TINY))


def test_matches_librosa_stft_with_hifigan_padding():
  wave = _chord_and_burst(22050, 22050)
  pad = (PAPER.n_fft - PAPER.hop_length) // 2
  stft = librosa.stft(
    np.pad(wave, pad, mode="reflect"),
    n_fft=1024,
    hop_length=256,
    win_length=1024,
    window="hann",
    center=False,
  )
  fb = librosa.filters.mel(sr=22050, n_fft=1024, n_mels=80, fmin=0.0, fmax=8000.0)
  expected = np.log(np.maximum(fb @ np.abs(stft), 1e-5))
  got = audio.log_mel(wave, PAPER)
  assert got.shape == expected.shape == (80, 22050 // 256)
  # float32 FFTs differ by round-off of ~1e-7 of the peak: compare the bins
  # within 10 nats (a factor 2e4) of the peak, where that is < 1e-3 in log.
  loud = expected >= expected.max() - 10
  assert loud.mean() > 0.3
  assert np.max(np.abs(got - expected)[loud]) < 1e-3


@pytest.mark.parametrize("freq", [300.0, 1000.0, 4000.0])
def test_pure_tone_peaks_in_its_band(freq):
  sr = PAPER.sample_rate
  wave = (0.5 * np.sin(2 * np.pi * freq * np.arange(sr) / sr)).astype(np.float32)
  mel = audio.log_mel(wave, PAPER)
  centres = librosa.mel_frequencies(PAPER.n_mels + 2, fmin=PAPER.fmin, fmax=PAPER.fmax)[1:-1]
  peak = int(np.argmax(mel[:, 10:-10].mean(axis=1)))
  assert abs(peak - int(np.argmin(np.abs(centres - freq)))) <= 1, (peak, centres[peak])


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_mel_ceiling_bounds_every_full_scale_wave_and_is_nearly_reached(size):
  spec = audio.MelSpec.from_config(config_lib.base_train_config(size, "stage1").data)
  ceiling = audio.mel_ceiling(spec)
  n = spec.hop_length * 64
  rng = np.random.default_rng(0)
  # A cosine at the centre of the widest mel band's peak bin: the loudest case.
  filters = audio.mel_filters(spec)
  band = int(np.argmax(filters.sum(axis=-1)))
  freq = int(np.argmax(filters[band])) * spec.sample_rate / spec.n_fft
  waves = [
    np.sign(rng.standard_normal(n)),
    rng.uniform(-1, 1, n),
    np.ones(n),
    np.cos(2 * np.pi * freq * np.arange(n) / spec.sample_rate),
  ]
  peaks = [float(audio.mel_features(w.astype(np.float32), spec).max()) for w in waves]
  assert max(peaks) <= ceiling
  assert peaks[-1] > ceiling - 0.25, (peaks, ceiling)  # a bound, not a loose guess


def test_normalize_round_trip_and_silence():
  rng = np.random.default_rng(0)
  x = rng.uniform(PAPER.norm_min - 1, PAPER.norm_max + 1, 200_000).astype(np.float32)
  y = audio.normalize(x, PAPER)
  assert y.dtype == np.float32
  back = audio.denormalize(y, PAPER)
  assert np.max(np.abs(back - x)) <= 1e-6
  assert np.mean(back == x) > 0.7  # bit-exact for most elements
  # The end points map to -1 and 1; no clipping outside them.
  np.testing.assert_allclose(
    audio.normalize(np.array([PAPER.norm_min, PAPER.norm_max]), PAPER), [-1.0, 1.0], atol=1e-12
  )
  assert y.min() < -1 and y.max() > 1
  silence = audio.mel_features(np.zeros(98304, np.float32), PAPER)
  assert np.all(silence == -1.0)
  # The config subtree works as the spec (duck typing) and JAX arrays stay JAX.
  cfg_mel = config_lib.mel_config("paper")
  np.testing.assert_array_equal(audio.normalize(x, cfg_mel), y)
  yj = audio.normalize(jax.numpy.asarray(x), PAPER)
  assert isinstance(yj, jax.Array)
  np.testing.assert_allclose(np.asarray(yj), y, atol=1e-6)
  np.testing.assert_allclose(np.asarray(audio.denormalize(yj, PAPER)), x, atol=2e-6)


def test_griffin_lim_improves_with_iterations():
  sr = PAPER.sample_rate
  n = 2 * sr // PAPER.hop_length * PAPER.hop_length
  wave = _chord_and_burst(n, sr)
  mel = audio.log_mel(wave, PAPER)
  convergence = []
  for n_iter in (1, 8, 32):
    rec = audio.mel_to_wave(mel, PAPER, n_iter=n_iter, seed=0)
    assert rec.shape == (n,) and rec.dtype == np.float32
    convergence.append(audio.spectral_convergence(wave, rec, PAPER))
  assert convergence[0] > convergence[1] > convergence[2], convergence
  assert convergence[2] < 0.4
  # Reconstructed mel is close to the input: ~10% relative L1 of mel magnitudes.
  rec_mel = audio.log_mel(rec, PAPER)
  rel_l1 = np.abs(np.exp(rec_mel) - np.exp(mel)).sum() / np.exp(mel).sum()
  assert rel_l1 < 0.2, rel_l1
  # Deterministic for a seed, different for another; `length` is honoured.
  again = audio.mel_to_wave(mel, PAPER, n_iter=32, seed=0)
  np.testing.assert_array_equal(again, rec)
  assert not np.array_equal(audio.mel_to_wave(mel, PAPER, n_iter=32, seed=1), rec)
  assert audio.mel_to_wave(mel, PAPER, n_iter=1, length=n - 100).shape == (n - 100,)


def test_spectral_convergence_formula():
  rng = np.random.default_rng(0)
  target = rng.uniform(0, 1, (5, 7))
  estimate = target * 1.1
  # ||0.1 S||_F / ||S||_F = 0.1.
  assert audio.spectral_convergence(target, estimate, magnitudes=True) == pytest.approx(0.1)
  wave = _chord_and_burst(4096, 8000)
  assert audio.spectral_convergence(wave, wave, TINY) == 0.0
  assert audio.spectral_convergence(wave, -wave, TINY) == pytest.approx(0.0, abs=1e-6)
  with pytest.raises(ValueError, match="shape"):
    audio.spectral_convergence(wave, wave[:-1], TINY)


def test_jax_matches_librosa_frontend():
  rng = np.random.default_rng(0)
  sr = PAPER.sample_rate
  waves = np.stack(
    [
      _chord_and_burst(98304, sr),
      (0.1 * rng.standard_normal(98304)).astype(np.float32),
      np.zeros(98304, np.float32),
    ]
  )
  fn = jax.jit(lambda w: audio.log_mel_jax(w, PAPER))
  got = np.asarray(fn(waves))
  expected = audio.log_mel(waves, PAPER)
  assert got.shape == expected.shape == (3, 80, 384)
  above = expected > math.log(PAPER.log_floor) + 1e-3
  assert above[:2].mean() > 0.6
  assert np.max(np.abs(got - expected)[above]) < 1e-3
  np.testing.assert_array_equal(got[2], expected[2])  # silence: both at the floor
  # Finite gradients, also through exactly silent frames.
  grad = jax.grad(lambda w: audio.log_mel_jax(w, TINY).sum())(np.zeros(4096, np.float32))
  assert np.all(np.isfinite(np.asarray(grad)))


def test_bad_inputs():
  with pytest.raises(ValueError, match="samples"):
    audio.log_mel(np.zeros(100, np.float32), PAPER)
  with pytest.raises(ValueError, match="NaN"):
    audio.log_mel(np.full(4096, np.nan, np.float32), TINY)
  with pytest.raises(ValueError, match="fmax"):
    audio.MelSpec(sample_rate=8000, fmax=8000.0)
  with pytest.raises(ValueError, match=r"\[80, frames\]"):
    audio.mel_to_wave(np.zeros((32, 10), np.float32), PAPER)
