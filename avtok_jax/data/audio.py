"""Log-mel audio frontend (numpy/librosa for the input pipeline, JAX for on-device use).

Conventions follow the 22.05 kHz, 80-band HiFi-GAN recipe (Kong et al. 2020,
`meldataset.py::mel_spectrogram`), so that a vocoder of that family can be
plugged in later:

* reflect-pad the waveform by (n_fft - hop_length) / 2 on each side and frame
  it without centring, which gives exactly num_samples // hop_length frames;
* periodic Hann window of win_length (zero-padded to n_fft), magnitude (not
  power) spectrum;
* Slaney-style mel filters (librosa.filters.mel defaults: Slaney mel scale,
  area-normalised triangles);
* natural log of max(mel, log_floor).

`normalize` maps [norm_min, norm_max] affinely onto [-1, 1] without clipping,
so `denormalize` inverts it exactly; norm_min is log(log_floor), so silence is
exactly -1.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import scipy.fft


@dataclasses.dataclass(frozen=True)
class MelSpec:
  """Every constant of the log-mel transform and its inverse."""

  sample_rate: int = 22050
  n_fft: int = 1024
  hop_length: int = 256
  win_length: int = 1024
  n_mels: int = 80
  fmin: float = 0.0
  fmax: float = 8000.0
  log_floor: float = 1e-5
  norm_min: float = math.log(1e-5)
  norm_max: float = 2.5
  griffin_lim_iters: int = 32

  def __post_init__(self):
    problems = []
    if self.win_length > self.n_fft:
      problems.append(f"win_length={self.win_length} > n_fft={self.n_fft}")
    if (self.n_fft - self.hop_length) % 2 or self.hop_length <= 0:
      problems.append(
        f"n_fft - hop_length = {self.n_fft - self.hop_length} must be even and hop_length positive "
        "(the waveform is padded by half of it on each side)"
      )
    if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
      problems.append(
        f"need 0 <= fmin < fmax <= sample_rate / 2, got fmin={self.fmin}, fmax={self.fmax}, "
        f"sample_rate={self.sample_rate}"
      )
    if self.log_floor <= 0:
      problems.append(f"log_floor={self.log_floor} must be positive")
    if not self.norm_max > self.norm_min:
      problems.append(f"norm_max={self.norm_max} must exceed norm_min={self.norm_min}")
    if problems:
      raise ValueError("Invalid MelSpec: " + "; ".join(problems) + ".")

  @classmethod
  def from_config(cls, data_config: Any) -> MelSpec:
    """From `config.data` (see `config_lib.data_config`): sample_rate + mel.*."""
    m = data_config.mel
    return cls(
      sample_rate=int(data_config.sample_rate),
      n_fft=int(m.n_fft),
      hop_length=int(m.hop_length),
      win_length=int(m.win_length),
      n_mels=int(m.n_mels),
      fmin=float(m.fmin),
      fmax=float(m.fmax),
      log_floor=float(m.log_floor),
      norm_min=float(m.norm_min),
      norm_max=float(m.norm_max),
      griffin_lim_iters=int(m.griffin_lim_iters),
    )

  @property
  def pad(self) -> int:
    """Reflect padding on each side of the waveform."""
    return (self.n_fft - self.hop_length) // 2

  def num_frames(self, num_samples: int) -> int:
    """Mel frames for a waveform of `num_samples` samples."""
    return num_samples // self.hop_length


@functools.lru_cache(maxsize=16)
def mel_filters(spec: MelSpec) -> np.ndarray:
  """float32 [n_mels, n_fft // 2 + 1] Slaney mel filter bank (cached per spec)."""
  fb = librosa.filters.mel(
    sr=spec.sample_rate, n_fft=spec.n_fft, n_mels=spec.n_mels, fmin=spec.fmin, fmax=spec.fmax
  ).astype(np.float32)
  fb.flags.writeable = False  # shared through the cache
  return fb


@functools.lru_cache(maxsize=16)
def _mel_filters_t(spec: MelSpec) -> np.ndarray:
  fbt = np.ascontiguousarray(mel_filters(spec).T)
  fbt.flags.writeable = False
  return fbt


@functools.lru_cache(maxsize=16)
def _window(spec: MelSpec) -> np.ndarray:
  """Periodic Hann window of win_length, zero-padded (centred) to n_fft."""
  win = librosa.filters.get_window("hann", spec.win_length, fftbins=True)
  win = librosa.util.pad_center(win, size=spec.n_fft).astype(np.float32)
  win.flags.writeable = False
  return win


def _check_wave(wave: np.ndarray, spec: MelSpec) -> None:
  if wave.ndim < 1:
    raise ValueError(f"wave must have a time axis, got shape {wave.shape}.")
  if wave.shape[-1] <= spec.pad or wave.shape[-1] < spec.hop_length:
    raise ValueError(
      f"wave has {wave.shape[-1]} samples; the log-mel needs more than {spec.pad} "
      f"(reflect padding) and at least hop_length={spec.hop_length}."
    )


def magnitude_spectrogram(wave: np.ndarray, spec: MelSpec) -> np.ndarray:
  """float32 [..., n_fft // 2 + 1, num_samples // hop_length] |STFT| (HiFi-GAN framing)."""
  return np.swapaxes(_magnitude_frames_last(wave, spec), -1, -2)


def _magnitude_frames_last(wave: np.ndarray, spec: MelSpec) -> np.ndarray:
  """float32 [..., frames, n_fft // 2 + 1] |STFT|."""
  wave = np.asarray(wave, dtype=np.float32)
  _check_wave(wave, spec)
  if not np.all(np.isfinite(wave)):
    raise ValueError("wave contains NaN or Inf.")
  pad = [(0, 0)] * (wave.ndim - 1) + [(spec.pad, spec.pad)]
  padded = np.pad(wave, pad, mode="reflect")
  # Frames as a strided view, then one batched real FFT: the same framing as
  # librosa.stft(center=False) on the padded signal. scipy.fft transforms
  # float32 natively and is ~8x faster than numpy.fft here (6 vs 0.7 ms per
  # paper-size clip on a 2-core EPYC).
  frames = np.lib.stride_tricks.sliding_window_view(padded, spec.n_fft, axis=-1)
  frames = frames[..., :: spec.hop_length, :][..., : spec.num_frames(wave.shape[-1]), :]
  stft = scipy.fft.rfft(frames * _window(spec), axis=-1)
  return np.abs(stft)


def log_mel(wave: np.ndarray, spec: MelSpec) -> np.ndarray:
  """float32 [..., n_mels, num_samples // hop_length] natural-log mel magnitudes."""
  mag = _magnitude_frames_last(wave, spec)
  # [..., frames, bins] @ [bins, n_mels]: the contiguous operand order is the
  # fast one for BLAS.
  mel = np.matmul(mag, _mel_filters_t(spec))
  return np.swapaxes(np.log(np.maximum(mel, np.float32(spec.log_floor))), -1, -2)


def _norm_range(spec: Any) -> tuple[float, float]:
  """(low, high) anchors of the normalisation, low rounded to float32.

  `log_mel` returns float32, so the floor value it produces for silence is
  float32(norm_min); anchoring the map there (a change of < 1e-6) makes
  silence land on exactly -1 instead of one float32 step above it.
  """
  return float(np.float32(spec.norm_min)), float(spec.norm_max)


def normalize(log_mel: np.ndarray | jax.Array, spec: Any) -> np.ndarray | jax.Array:
  """Affine map of [norm_min, norm_max] onto [-1, 1]; no clipping, so it is invertible.

  `spec` is a MelSpec or anything with norm_min/norm_max (e.g. config.data.mel).
  numpy inputs are mapped in float64 and returned in their own float dtype (so
  the round trip is exact up to one float32 rounding); JAX inputs stay in JAX.
  """
  lo, hi = _norm_range(spec)
  scale = 2.0 / (hi - lo)
  if isinstance(log_mel, jax.Array):
    return (log_mel - lo) * scale - 1.0
  x = np.asarray(log_mel)
  dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
  return ((x.astype(np.float64) - lo) * scale - 1.0).astype(dtype)


def denormalize(mel: np.ndarray | jax.Array, spec: Any) -> np.ndarray | jax.Array:
  """Exact inverse of `normalize`."""
  lo, hi = _norm_range(spec)
  half_range = (hi - lo) / 2.0
  if isinstance(mel, jax.Array):
    return (mel + 1.0) * half_range + lo
  y = np.asarray(mel)
  dtype = y.dtype if np.issubdtype(y.dtype, np.floating) else np.float32
  return ((y.astype(np.float64) + 1.0) * half_range + lo).astype(dtype)


@functools.lru_cache(maxsize=16)
def mel_ceiling(spec: MelSpec) -> float:
  """The largest normalised log-mel any waveform in [-1, 1] can have [ours].

  |STFT| of a frame is at most the sum of the window (every sample at +-1 in
  phase with the bin), so mel band k is at most sum(window) * sum_b filter[k, b].
  Decoders are not bounded; values above this (or below -1, the silence floor)
  are not a sound, and `evaluate.make_codec` clips decoded mels to
  [-1, mel_ceiling] as it clips video to [-1, 1].
  """
  peak = float(np.sum(np.abs(_window(spec)))) * float(np.max(np.sum(mel_filters(spec), axis=-1)))
  return float(normalize(np.log(np.float64(max(peak, spec.log_floor))), spec))


def mel_features(wave: np.ndarray, spec: MelSpec) -> np.ndarray:
  """normalize(log_mel(wave)): the audio input the model sees."""
  return normalize(log_mel(wave, spec), spec)


def mel_to_wave(
  log_mel: np.ndarray,
  spec: MelSpec,
  *,
  n_iter: int | None = None,
  length: int | None = None,
  seed: int = 0,
) -> np.ndarray:
  """Griffin-Lim vocoder: log-mel [n_mels, frames] (not normalised) -> float32 waveform.

  The mel magnitudes are mapped back to a linear spectrogram by non-negative
  least squares (librosa.feature.inverse.mel_to_stft), then librosa's fast
  Griffin-Lim (Perraudin et al. 2013, momentum 0.99) runs on the padded
  signal with our framing; the reflect padding is cut off at the end.
  Deterministic for a given seed (random initial phase).

  Args:
    log_mel: float [n_mels, frames] natural-log mel (use `denormalize` first
      for model outputs).
    spec: the MelSpec it was computed with.
    n_iter: Griffin-Lim iterations (default spec.griffin_lim_iters).
    length: output samples (default frames * hop_length).
    seed: seed of the random initial phase.
  """
  log_mel = np.asarray(log_mel, dtype=np.float32)
  if log_mel.ndim != 2 or log_mel.shape[0] != spec.n_mels:
    raise ValueError(f"log_mel must have shape [{spec.n_mels}, frames], got {log_mel.shape}.")
  n_iter = spec.griffin_lim_iters if n_iter is None else int(n_iter)
  if n_iter < 1:
    raise ValueError(f"n_iter must be >= 1, got {n_iter}.")
  frames = log_mel.shape[1]
  length = frames * spec.hop_length if length is None else int(length)
  mel = np.exp(log_mel)
  mag = librosa.feature.inverse.mel_to_stft(
    mel,
    sr=spec.sample_rate,
    n_fft=spec.n_fft,
    power=1.0,
    fmin=spec.fmin,
    fmax=spec.fmax,
  )
  # With center=False, frame t covers padded samples [t*hop, t*hop + n_fft),
  # exactly the framing of `magnitude_spectrogram`.
  padded_len = (frames - 1) * spec.hop_length + spec.n_fft
  wave = librosa.griffinlim(
    mag,
    n_iter=n_iter,
    hop_length=spec.hop_length,
    win_length=spec.win_length,
    n_fft=spec.n_fft,
    window="hann",
    center=False,
    length=padded_len,
    random_state=np.random.default_rng(seed),
  )
  wave = wave[spec.pad : spec.pad + length]
  if wave.shape[0] < length:
    wave = np.pad(wave, (0, length - wave.shape[0]))
  return wave.astype(np.float32)


def normalized_mel_to_wave(
  mel: np.ndarray, spec: MelSpec, *, n_iter: int | None = None
) -> np.ndarray:
  """Griffin-Lim of a NORMALISED mel [n_mels, frames] (model units): `denormalize`, then
  `mel_to_wave`. The offline vocoder of samples, evaluation and decoding."""
  return mel_to_wave(denormalize(np.asarray(mel, np.float32), spec), spec, n_iter=n_iter)


def spectral_convergence(
  target: np.ndarray,
  estimate: np.ndarray,
  spec: MelSpec | None = None,
  *,
  magnitudes: bool = False,
) -> float:
  """|| |S_target| - |S_est| ||_F / || |S_target| ||_F.

  The spectral-convergence term of the multi-resolution STFT loss (Arik et
  al. 2018, "Fast Spectrogram Inversion using Multi-head Convolutional Neural
  Networks", eq. 3; also Yamamoto et al. 2020, Parallel WaveGAN). Waveforms
  are turned into magnitudes with `magnitude_spectrogram(·, spec)`; pass
  `magnitudes=True` to compare magnitude spectrograms directly.
  """
  if magnitudes:
    s_t, s_e = np.abs(np.asarray(target)), np.abs(np.asarray(estimate))
  else:
    if spec is None:
      raise ValueError("spectral_convergence of waveforms needs a MelSpec for the STFT.")
    target, estimate = np.asarray(target), np.asarray(estimate)
    if target.shape != estimate.shape:
      raise ValueError(
        f"target and estimate waveforms differ in shape: {target.shape} vs {estimate.shape}."
      )
    s_t, s_e = magnitude_spectrogram(target, spec), magnitude_spectrogram(estimate, spec)
  if s_t.shape != s_e.shape:
    raise ValueError(f"spectrogram shapes differ: {s_t.shape} vs {s_e.shape}.")
  s_t, s_e = s_t.astype(np.float64), s_e.astype(np.float64)
  denom = np.linalg.norm(s_t)
  if denom == 0:
    raise ValueError("target spectrogram is all zeros: spectral convergence is undefined.")
  return float(np.linalg.norm(s_t - s_e) / denom)


def log_mel_jax(wave: jax.Array, spec: MelSpec) -> jax.Array:
  """JAX twin of `log_mel` (same framing, window and librosa filter bank); jit-able.

  wave: float [..., num_samples] -> float32 [..., n_mels, num_samples // hop_length].
  """
  wave = jnp.asarray(wave, dtype=jnp.float32)
  _check_wave(wave, spec)
  n = spec.num_frames(wave.shape[-1])
  pad = [(0, 0)] * (wave.ndim - 1) + [(spec.pad, spec.pad)]
  padded = jnp.pad(wave, pad, mode="reflect")
  # Static gather indices [frames, n_fft]: a single gather, no Python loop.
  idx = np.arange(n)[:, None] * spec.hop_length + np.arange(spec.n_fft)[None, :]
  frames = padded[..., idx] * jnp.asarray(_window(spec))
  stft = jnp.fft.rfft(frames, axis=-1)
  power = jnp.real(stft) ** 2 + jnp.imag(stft) ** 2
  # sqrt of a clamped power: identical values above 1e-10, and a finite
  # gradient for exactly silent bins (|z| has none at z = 0).
  mag = jnp.sqrt(jnp.maximum(power, 1e-20))
  fb = jnp.asarray(mel_filters(spec))
  # HIGHEST: TPUs/GPUs would otherwise run this matmul in bf16/tf32.
  mel = jnp.einsum("mf,...tf->...mt", fb, mag, precision=jax.lax.Precision.HIGHEST)
  return jnp.log(jnp.maximum(mel, spec.log_floor))
