"""Tests of the reconstruction metrics (avtok_jax.evaluation.metrics)."""

from __future__ import annotations

import math

import jax
import librosa
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim

from avtok_jax import config_lib
from avtok_jax.data import audio
from avtok_jax.evaluation import metrics

# ----------------------------------------------------------------------------
# Test signals
# ----------------------------------------------------------------------------


def _structured_frames(n: int, h: int, w: int, c: int, seed: int) -> np.ndarray:
  """Smooth gradients, a sinusoidal texture, a sharp-edged square and a dark disc, in [0, 1].

  Large flat and slowly varying regions are where float32 second moments cancel
  the most, so these frames exercise SSIM's precision more than noise does.
  """
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
  out = np.empty((n, h, w, c))
  for i in range(n):
    phase = rng.uniform(0, 2 * np.pi)
    for ch in range(c):
      img = 0.55 + 0.3 * xx * (ch + 1) / c - 0.1 * yy
      img += 0.04 * np.sin(2 * np.pi * (3 * xx + 2 * yy) + phase + ch)
      top, left = rng.integers(2, h // 2), rng.integers(2, w // 2)
      img[top : top + h // 3, left : left + w // 3] = 0.9 - 0.1 * ch
      img[(yy - 0.7) ** 2 + (xx - 0.3) ** 2 < 0.02] = 0.05
      out[i, ..., ch] = img
  return np.clip(out, 0.0, 1.0)


def _degrade(x: np.ndarray, seed: int) -> np.ndarray:
  """A plausible reconstruction in [0, 1]: shifted one pixel, slightly dimmed, a little noise."""
  rng = np.random.default_rng(seed)
  y = 0.97 * np.roll(x, 1, axis=-2) + 0.01
  return np.clip(y + 0.02 * rng.standard_normal(x.shape), 0.0, 1.0)


def _pair(kind: str, shape: tuple[int, ...], scale: float, seed: int):
  """(x, y) of `kind` random/structured, mapped from [0, 1] to [-1, 1] or [0, 255]."""
  if kind == "random":
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=shape)
    y = np.clip(x + 0.15 * rng.standard_normal(shape), 0.0, 1.0)
  else:
    frames = int(np.prod(shape[:-3]))
    x = _structured_frames(frames, *shape[-3:], seed=seed).reshape(shape)
    y = _degrade(x, seed + 1)
  if scale == 2.0:
    return 2.0 * x - 1.0, 2.0 * y - 1.0
  return np.round(scale * x), np.round(scale * y)


def _sk_ssim(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
  return sk_ssim(
    x,
    y,
    gaussian_weights=True,
    sigma=1.5,
    use_sample_covariance=False,
    data_range=data_range,
    channel_axis=-1,
  )


IMAGE_SHAPE = (3, 24, 20, 3)  # [N, H, W, C]
VIDEO_SHAPE = (2, 3, 16, 18, 2)  # [N, T, H, W, C]

# ----------------------------------------------------------------------------
# PSNR and SSIM against scikit-image
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("data_range", [2.0, 255.0])
@pytest.mark.parametrize("kind", ["random", "structured"])
@pytest.mark.parametrize("shape", [IMAGE_SHAPE, VIDEO_SHAPE], ids=["image", "video"])
def test_psnr_and_ssim_match_skimage(shape, kind, data_range):
  x, y = _pair(kind, shape, data_range, seed=len(shape))
  got_psnr = np.asarray(metrics.psnr(x, y, data_range))
  got_ssim = np.asarray(metrics.ssim(x, y, data_range))
  assert got_psnr.shape == got_ssim.shape == (shape[0],)
  for i in range(shape[0]):
    # PSNR: one MSE over the whole example (all frames of a video).
    assert got_psnr[i] == pytest.approx(sk_psnr(x[i], y[i], data_range=data_range), abs=1e-4)
    # SSIM: per frame (2-D, channels last), then the mean over frames.
    frames = x[i].reshape((-1,) + x.shape[-3:]), y[i].reshape((-1,) + y.shape[-3:])
    expected = np.mean([_sk_ssim(a, b, data_range) for a, b in zip(*frames, strict=True)])
    assert got_ssim[i] == pytest.approx(expected, abs=1e-4)
  # Non-trivial values (so agreement means something).
  assert np.all(got_ssim < 0.99) and np.all(got_ssim > 0.05)


def test_ssim_float32_precision_on_bright_low_contrast_frames():
  # Means near 240 of 255 with local deviations of ~2: E[x^2] - E[x]^2 cancels ~4 of
  # float32's 7 digits. Shifting by the frame mean first keeps the error near 1e-6
  # (without the shift it is ~1e-5 here).
  rng = np.random.default_rng(20)
  yy, xx = np.meshgrid(np.linspace(0, 1, 24), np.linspace(0, 1, 24), indexing="ij")
  texture = np.sin(2 * np.pi * (3 * xx + 2 * yy))[None, :, :, None]
  x = 240.0 + 2.0 * texture + rng.standard_normal((2, 24, 24, 3))
  y = x + rng.standard_normal(x.shape)
  got = np.asarray(metrics.ssim(x, y, 255.0))
  expected = [_sk_ssim(x[i], y[i], 255.0) for i in range(2)]
  np.testing.assert_allclose(got, expected, atol=3e-6, rtol=0)


def test_ssim_is_in_the_expected_order_and_one_for_identical():
  x, y = _pair("structured", IMAGE_SHAPE, 2.0, seed=3)
  noisier = np.clip(y + 0.3 * np.random.default_rng(0).standard_normal(y.shape), -1, 1)
  s_same, s_y, s_noisier = (np.asarray(metrics.ssim(x, z)) for z in (x, y, noisier))
  np.testing.assert_allclose(s_same, 1.0, atol=1e-6)
  assert np.all(s_y < s_same) and np.all(s_noisier < s_y)


def test_psnr_identical_is_finite_and_capped():
  x = np.random.default_rng(0).uniform(-1, 1, size=(2, 8, 8, 3)).astype(np.float32)
  for data_range in (2.0, 255.0):
    got = np.asarray(metrics.psnr(x, x, data_range))
    np.testing.assert_allclose(got, 100.0, rtol=1e-6)  # the documented cap
  # uint8 inputs work (cast to float).
  a = np.zeros((1, 4, 4, 1), np.uint8)
  b = np.full((1, 4, 4, 1), 255, np.uint8)
  assert float(metrics.psnr(a, b, 255.0)[0]) == pytest.approx(0.0, abs=1e-6)


def test_psnr_and_ssim_are_jittable():
  x, y = _pair("random", IMAGE_SHAPE, 2.0, seed=5)
  x, y = x.astype(np.float32), y.astype(np.float32)
  # data_range traced too: it cannot be validated then, but must still work.
  both = jax.jit(lambda a, b, r: (metrics.psnr(a, b, r), metrics.ssim(a, b, r)))
  jp, js = both(x, y, 2.0)
  np.testing.assert_allclose(jp, metrics.psnr(x, y), rtol=1e-6)
  np.testing.assert_allclose(js, metrics.ssim(x, y), rtol=1e-6)


def test_image_metrics_reject_bad_inputs():
  img = np.zeros((2, 16, 16, 3), np.float32)
  with pytest.raises(ValueError, match="differ in shape"):
    metrics.psnr(img, img[:1])
  with pytest.raises(ValueError, match="differ in shape"):
    metrics.ssim(img, img[..., :2])
  with pytest.raises(ValueError, match="data_range"):
    metrics.psnr(img, img, data_range=0.0)
  with pytest.raises(ValueError, match="data_range"):
    metrics.ssim(img, img, data_range=-1.0)
  with pytest.raises(ValueError, match="images .* or videos"):
    metrics.ssim(img[0], img[0])
  with pytest.raises(ValueError, match="at least 11x11"):
    metrics.ssim(img[:, :10], img[:, :10])
  with pytest.raises(ValueError, match="a batch axis"):
    metrics.psnr(img[0, 0, 0], img[0, 0, 0])


# ----------------------------------------------------------------------------
# SI-SDR
# ----------------------------------------------------------------------------


def _smooth_noise(n: int, seed: int, width: int = 6) -> np.ndarray:
  """Broadband, mildly low-passed noise (a moving average of white noise)."""
  white = np.random.default_rng(seed).standard_normal(n + width)
  return np.convolve(white, np.ones(width) / width, mode="valid")[:n]


def _si_sdr_by_hand(s: np.ndarray, s_hat: np.ndarray) -> float:
  s, s_hat = s - s.mean(), s_hat - s_hat.mean()
  target = (s_hat @ s) / (s @ s) * s
  return 10 * math.log10((target @ target) / ((s_hat - target) @ (s_hat - target)))


def test_si_sdr_scaled_copy_is_very_large():
  x = _smooth_noise(4000, seed=0)[None].astype(np.float32)
  got = float(metrics.si_sdr(x, 0.5 * x)[0])
  assert got > 80.0
  # Scale invariance also holds for a large gain and an added offset (zero-mean step).
  assert float(metrics.si_sdr(x, 3.0 * x + 0.2)[0]) > 80.0


def test_si_sdr_known_snr_with_orthogonal_noise():
  rng = np.random.default_rng(1)
  n = 4000
  x = rng.standard_normal(n)
  x -= x.mean()
  noise = rng.standard_normal(n)
  # Remove the mean and the component along x: then alpha = 1 and SI-SDR = SNR exactly.
  noise -= noise.mean()
  noise -= (noise @ x) / (x @ x) * x
  rows = []
  for snr_db in (-5.0, 0.0, 12.5, 30.0):
    scale = math.sqrt((x @ x) / (noise @ noise) / 10 ** (snr_db / 10))
    rows.append((x, x + scale * noise, snr_db))
  ref = np.stack([r[0] for r in rows]).astype(np.float32)
  est = np.stack([r[1] for r in rows]).astype(np.float32)
  got = np.asarray(metrics.si_sdr(ref, est))
  np.testing.assert_allclose(got, [r[2] for r in rows], atol=0.01)


def test_si_sdr_shifted_copy_matches_hand_computation():
  x = _smooth_noise(4000, seed=2)
  rows = [np.roll(x, k) for k in (1, 2, 3, 5)]
  ref = np.stack([x] * len(rows)).astype(np.float32)
  est = np.stack(rows).astype(np.float32)
  got = np.asarray(metrics.si_sdr(ref, est))
  expected = [
    _si_sdr_by_hand(ref[i].astype(np.float64), est[i].astype(np.float64)) for i in range(4)
  ]
  np.testing.assert_allclose(got, expected, atol=1e-3)
  # A larger shift decorrelates more: the values fall.
  assert np.all(np.diff(got) < 0)
  # A one-sample shift keeps 5/6 of the moving-average window: clearly positive.
  assert got[0] > 3.0 and got[-1] < 0.0


def test_si_sdr_sign_convention_and_independent_noise():
  rng = np.random.default_rng(3)
  x = rng.standard_normal(8000)
  n = rng.standard_normal(8000)
  ref = np.stack([x, x, x]).astype(np.float32)
  est = np.stack([x + 0.1 * n, x + 0.5 * n, rng.standard_normal(8000)]).astype(np.float32)
  good, worse, unrelated = np.asarray(metrics.si_sdr(ref, est))
  # HIGHER is better: a cleaner estimate scores higher.
  assert good > worse > unrelated
  assert good == pytest.approx(20.0, abs=0.5) and worse == pytest.approx(6.0, abs=0.5)
  # Independent noise: |alpha| ~ 1 / sqrt(S), so about -10 log10(S) = -39 dB.
  assert unrelated < -25.0


def test_si_sdr_rejects_bad_inputs():
  w = np.zeros((2, 100), np.float32)
  with pytest.raises(ValueError, match="differ in shape"):
    metrics.si_sdr(w, w[:, :50])
  with pytest.raises(ValueError, match=r"waveforms \[N, S\]"):
    metrics.si_sdr(w[0], w[0])
  with pytest.raises(ValueError, match="eps"):
    metrics.si_sdr(w, w, eps=-1.0)


# ----------------------------------------------------------------------------
# Multi-resolution STFT
# ----------------------------------------------------------------------------

NUM_SAMPLES = 6000


def _sine(freq: float, n: int = NUM_SAMPLES, sr: int = 16000) -> np.ndarray:
  return 0.5 * np.sin(2 * np.pi * freq * np.arange(n) / sr)


def test_stft_magnitude_matches_librosa():
  wave = (_sine(440.0) + 0.1 * _smooth_noise(NUM_SAMPLES, seed=4)).astype(np.float32)
  for n_fft, hop, win in ((512, 128, 512), (256, 64, 200)):
    got = np.asarray(metrics._stft_magnitude(wave[None], n_fft, hop, win))[0]
    ref = np.abs(
      librosa.stft(
        wave, n_fft=n_fft, hop_length=hop, win_length=win, window="hann", pad_mode="reflect"
      )
    ).T
    ref = np.maximum(ref, math.sqrt(metrics.STFT_POWER_FLOOR))
    assert got.shape == ref.shape == (1 + NUM_SAMPLES // hop, n_fft // 2 + 1)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * ref.max())


def test_mr_stft_identical_is_zero_and_scaling_is_exact():
  # White noise: no spectral nulls, so no bin is floored and the scaling is exact.
  rng = np.random.default_rng(5)
  x = (0.3 * rng.standard_normal((2, NUM_SAMPLES))).astype(np.float32)
  for n_fft, hop, win in metrics.DEFAULT_STFT_RESOLUTIONS:
    mag = np.asarray(metrics._stft_magnitude(x, n_fft, hop, win))
    assert mag.min() > math.sqrt(metrics.STFT_POWER_FLOOR)
  np.testing.assert_array_equal(np.asarray(metrics.multi_resolution_stft(x, x)), 0.0)
  # Reference x, estimate 2x: L_sc = || |X| - 2|X| || / || |X| || = 1, L_mag = log 2.
  sc, mag = (np.asarray(t) for t in metrics.multi_resolution_stft_terms(x, 2 * x))
  assert sc.shape == mag.shape == (2, len(metrics.DEFAULT_STFT_RESOLUTIONS))
  np.testing.assert_allclose(sc, 1.0, rtol=1e-5)
  np.testing.assert_allclose(mag, math.log(2.0), rtol=1e-5)
  # Reference 2x, estimate x: L_sc = || 2|X| - |X| || / || 2|X| || = 0.5, L_mag = log 2.
  sc, mag = (np.asarray(t) for t in metrics.multi_resolution_stft_terms(2 * x, x))
  np.testing.assert_allclose(sc, 0.5, rtol=1e-5)
  np.testing.assert_allclose(mag, math.log(2.0), rtol=1e-5)
  total = np.asarray(metrics.multi_resolution_stft(2 * x, x))
  np.testing.assert_allclose(total, 0.5 + math.log(2.0), rtol=1e-5)


def test_mr_stft_orders_noise_above_slightly_noisy_sine():
  sine = _sine(440.0)
  noise = 0.5 * np.random.default_rng(7).standard_normal(NUM_SAMPLES)
  slightly = sine + 0.01 * np.random.default_rng(8).standard_normal(NUM_SAMPLES)
  ref = np.stack([sine, sine]).astype(np.float32)
  est = np.stack([noise, slightly]).astype(np.float32)
  bad, good = np.asarray(metrics.multi_resolution_stft(ref, est))
  assert bad > good > 0
  assert bad > 2 * good


def test_mr_stft_custom_resolutions_and_bad_inputs():
  x = _smooth_noise(1000, seed=9)[None].astype(np.float32)
  res = ((64, 16, 64), (256, 64, 128))
  sc, mag = metrics.multi_resolution_stft_terms(x, 0.5 * x, resolutions=res)
  assert sc.shape == (1, 2)
  np.testing.assert_allclose(np.asarray(sc), 0.5, rtol=1e-5)
  with pytest.raises(ValueError, match="too short"):
    metrics.multi_resolution_stft(x, x)  # 1000 samples < n_fft 2048
  with pytest.raises(ValueError, match="win_length <= n_fft"):
    metrics.multi_resolution_stft(x, x, resolutions=((64, 16, 128),))
  with pytest.raises(ValueError, match="resolutions must be"):
    metrics.multi_resolution_stft(x, x, resolutions=((64, 16),))
  with pytest.raises(ValueError, match="differ in shape"):
    metrics.multi_resolution_stft(x, x[:, :500], resolutions=res)


# ----------------------------------------------------------------------------
# Mel L1
# ----------------------------------------------------------------------------


def test_mel_l1_on_mels_and_on_waves():
  rng = np.random.default_rng(10)
  mel = rng.uniform(-1, 1, size=(2, 8, 12)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(metrics.mel_l1(mel, mel)), 0.0)
  shifted = mel + np.array([0.25, -0.5], np.float32)[:, None, None]
  np.testing.assert_allclose(np.asarray(metrics.mel_l1(mel, shifted)), [0.25, 0.5], rtol=1e-6)

  spec = audio.MelSpec.from_config(config_lib.data_config("tiny"))
  n = 1024
  waves = np.stack([_sine(500.0, n, spec.sample_rate), 0.2 * _smooth_noise(n, seed=11)])
  waves = waves.astype(np.float32)
  est = (waves + 0.05 * rng.standard_normal(waves.shape)).astype(np.float32)
  got = np.asarray(metrics.mel_l1(waves, est, spec=spec))
  expected = np.abs(audio.mel_features(waves, spec) - audio.mel_features(est, spec)).mean(
    axis=(1, 2)
  )
  np.testing.assert_allclose(got, expected, rtol=1e-3)
  assert np.all(got > 0.01)
  with pytest.raises(ValueError, match="differ in shape"):
    metrics.mel_l1(mel, mel[:, :4])
  with pytest.raises(ValueError, match="MelSpec"):
    metrics.mel_l1(waves, est, spec="tiny")


# ----------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------


def _frechet_by_eigh(mu1, s1, mu2, s2) -> float:
  """Reference through symmetric square roots: Tr sqrt(s1 s2) = Tr sqrt(s1^1/2 s2 s1^1/2)."""
  w, v = np.linalg.eigh(s1)
  r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  inner = np.linalg.eigvalsh(r1 @ s2 @ r1)
  tr = np.sum(np.sqrt(np.clip(inner, 0, None)))
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr)


def test_feature_statistics_is_unbiased():
  f = np.random.default_rng(12).standard_normal((50, 6)).astype(np.float32)
  mu, sigma = metrics.feature_statistics(f)
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(mu, f.astype(np.float64).mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False, ddof=1), rtol=1e-10)
  with pytest.raises(ValueError, match="at least 2"):
    metrics.feature_statistics(f[:1])
  with pytest.raises(ValueError, match=r"\[N, D\]"):
    metrics.feature_statistics(f[0])


def test_frechet_identical_sets_is_zero():
  f = 10.0 * np.random.default_rng(13).standard_normal((200, 16))
  d = metrics.frechet_distance_from_features(f, f)
  scale = np.trace(np.cov(f, rowvar=False))
  assert abs(d) < 1e-6 * scale


def test_frechet_closed_form_for_commuting_covariances():
  rng = np.random.default_rng(14)
  dim = 8
  mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
  a, b = rng.uniform(0.2, 3.0, dim), rng.uniform(0.2, 3.0, dim)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  # Diagonal covariances.
  d = metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  assert d == pytest.approx(expected, rel=1e-9)
  # The same spectra in a shared random basis: the covariances commute, same distance.
  q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
  d = metrics.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
  assert d == pytest.approx(expected, rel=1e-8)
  # From 20k samples per set: the sample statistics converge, loosely.
  f1 = mu1 + rng.standard_normal((20000, dim)) * np.sqrt(a)
  f2 = mu2 + rng.standard_normal((20000, dim)) * np.sqrt(b)
  assert metrics.frechet_distance_from_features(f1, f2) == pytest.approx(expected, rel=0.05)


def test_frechet_with_fewer_samples_than_dimensions():
  rng = np.random.default_rng(15)
  dim = 48
  f1 = rng.standard_normal((20, dim))
  f2 = 0.5 + 1.5 * rng.standard_normal((30, dim))
  (mu1, s1), (mu2, s2) = metrics.feature_statistics(f1), metrics.feature_statistics(f2)
  assert np.linalg.matrix_rank(s1) < dim
  d = metrics.frechet_distance(mu1, s1, mu2, s2)
  assert math.isfinite(d)
  assert d == pytest.approx(_frechet_by_eigh(mu1, s1, mu2, s2), rel=1e-4)
  # Identical singular sets are still ~0.
  assert abs(metrics.frechet_distance(mu1, s1, mu1, s1)) < 1e-6 * np.trace(s1)


@pytest.mark.parametrize("n1,n2,dim", [(300, 200, 16), (20, 30, 48), (12, 12, 400)])
def test_frechet_from_features_equals_the_matrix_square_root_form(n1, n2, dim):
  """The nuclear-norm route (no D x D square root) gives the textbook value."""
  rng = np.random.default_rng(16)
  f1 = rng.standard_normal((n1, dim)) @ rng.standard_normal((dim, dim)) * 0.3
  f2 = 0.2 + 1.3 * rng.standard_normal((n2, dim))
  (mu1, s1), (mu2, s2) = metrics.feature_statistics(f1), metrics.feature_statistics(f2)
  expected = _frechet_by_eigh(mu1, s1, mu2, s2)
  assert metrics.frechet_distance_from_features(f1, f2) == pytest.approx(expected, rel=1e-6)
  assert metrics.frechet_distance_from_features(f1, f1) == pytest.approx(
    0.0, abs=1e-9 * np.trace(s1)
  )


def test_frechet_rejects_bad_inputs():
  eye = np.eye(3)
  with pytest.raises(ValueError, match="dimensions differ"):
    metrics.frechet_distance(np.zeros(3), eye, np.zeros(2), np.eye(2))
  with pytest.raises(ValueError, match=r"mu \[D\] and sigma \[D, D\]"):
    metrics.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), eye)
  with pytest.raises(ValueError, match="NaN"):
    metrics.frechet_distance(np.full(3, np.nan), eye, np.zeros(3), eye)
  # A "covariance" with a negative eigenvalue: the square root is genuinely complex.
  with pytest.raises(ValueError, match="imaginary"):
    metrics.frechet_distance(np.zeros(3), np.diag([1.0, -4.0, 1.0]), np.zeros(3), eye)


# ----------------------------------------------------------------------------
# Codebook health
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5, 64])
def test_codebook_health_uniform_codes(k):
  size = 64
  codes = np.tile(np.arange(k) * (size // k), 7).reshape(7, k)  # k codes, 7 times each
  h = metrics.codebook_health(codes, size)
  assert h["distinct_codes"] == k
  assert h["codebook_usage"] == pytest.approx(k / size)
  assert h["perplexity"] == pytest.approx(k, rel=1e-12)


def test_codebook_health_skewed_codes_and_bad_inputs():
  codes = np.array([0, 0, 0, 1], np.int32)  # p = (3/4, 1/4)
  h = metrics.codebook_health(jax.numpy.asarray(codes), 10)
  entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
  assert h["perplexity"] == pytest.approx(math.exp(entropy), rel=1e-12)
  assert (h["distinct_codes"], h["codebook_usage"]) == (2, 0.2)
  with pytest.raises(ValueError, match=r"codes must lie in \[0, 10\)"):
    metrics.codebook_health(np.array([0, 10]), 10)
  with pytest.raises(ValueError, match=r"codes must lie"):
    metrics.codebook_health(np.array([-1, 3]), 10)
  with pytest.raises(ValueError, match="integer array"):
    metrics.codebook_health(np.array([0.0, 1.0]), 10)
  with pytest.raises(ValueError, match="empty"):
    metrics.codebook_health(np.zeros((0,), np.int32), 10)
  with pytest.raises(ValueError, match="positive integer"):
    metrics.codebook_health(codes, 0)
