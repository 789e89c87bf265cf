"""Tests of avtok_jax.data.video_io: every input file is made here with PyAV/soundfile."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.signal
import soundfile

from avtok_jax.data import video_io

# The paper preset (config_lib.data_config('paper')).
PAPER = dict(num_frames=16, height=128, width=128, sample_rate=22050, num_samples=98304)
PAPER_FPS = 16 * 22050 / 98304  # = 3675 / 1024


def _textured_frames(t: int, h: int, w: int) -> np.ndarray:
  """Smooth moving texture (sinusoids) with per-channel differences."""
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
  out = np.empty((t, h, w, 3), np.uint8)
  for i in range(t):
    for c in range(3):
      v = 128 + 60 * np.sin(xx / (5 + c) + 0.4 * i) * np.cos(yy / (7 - c) - 0.3 * i)
      v += 40 * np.sin((xx + yy) / 23 + c)
      out[i, ..., c] = np.clip(v, 0, 255).astype(np.uint8)
  return out


def _sound(n: int, sr: int, seed: int = 0) -> np.ndarray:
  """A non-periodic test sound: two chirps, band-limited noise and clicks."""
  rng = np.random.default_rng(seed)
  t = np.arange(n) / sr
  x = 0.2 * np.sin(2 * np.pi * (200 * t + 150 * t**2))
  x += 0.15 * np.sin(2 * np.pi * (1500 * t - 80 * t**2))
  noise = scipy.signal.lfilter(*scipy.signal.butter(4, 3000 / (sr / 2)), rng.standard_normal(n))
  x += 0.05 * noise
  clicks = rng.choice(n - 200, 8, replace=False)
  for c in clicks:
    x[c : c + 200] += 0.3 * np.hanning(200) * np.sin(2 * np.pi * 900 * t[:200])
  return x.astype(np.float32)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return 10 * math.log10(255.0**2 / mse)


def _lags(est: np.ndarray, ref: np.ndarray, max_lag: int) -> np.ndarray:
  """Normalised cross-correlation of est against ref for lags -max_lag..max_lag."""
  full = scipy.signal.correlate(est.astype(np.float64), ref.astype(np.float64), mode="full")
  mid = ref.shape[0] - 1
  return full[mid - max_lag : mid + max_lag + 1] / (np.linalg.norm(est) * np.linalg.norm(ref))


def test_round_trip_paper_preset(tmp_path):
  frames = _textured_frames(16, 128, 128)
  audio = _sound(PAPER["num_samples"], PAPER["sample_rate"])
  path = tmp_path / "clip.mp4"
  video_io.write_mp4(path, frames, audio, PAPER_FPS, PAPER["sample_rate"])

  info = video_io.probe(path)
  assert info.has_video and info.has_audio
  assert (info.width, info.height, info.sample_rate, info.audio_channels) == (128, 128, 22050, 1)
  assert info.fps == pytest.approx(3675 / 1024, rel=1e-9)
  assert info.duration == pytest.approx(98304 / 22050, abs=1e-3)

  got_v, got_a = video_io.read_clip(path, fps=PAPER_FPS, short_clip="error", **PAPER)
  assert got_v.shape == (16, 128, 128, 3) and got_v.dtype == np.uint8
  assert got_a.shape == (98304,) and got_a.dtype == np.float32
  assert _psnr(got_v, frames) > 30
  # Alignment: AAC priming must be removed; the best lag within +-20 ms is 0.
  max_lag = round(0.02 * PAPER["sample_rate"])
  corr = _lags(got_a, audio, max_lag)
  assert corr[max_lag] > 0.9
  assert np.argmax(corr) == max_lag


def test_resampling_picks_the_right_frames_and_centres_the_crop(tmp_path):
  src_fps, src_sr, seconds, h, w = 25, 44100, 3, 120, 160
  n_src = src_fps * seconds
  frames = np.zeros((n_src, h, w, 3), np.uint8)
  for k in range(n_src):
    frames[k, :, 30:130] = 10 + 3 * k  # frame number as a grey level
  # The 120x120 centre crop spans columns 20..139: blue bands just inside it,
  # red bands outside it that must disappear.
  frames[:, :, 20:36] = (0, 0, 255)
  frames[:, :, 124:140] = (0, 0, 255)
  frames[:, :, :20] = (255, 0, 0)
  frames[:, :, 140:] = (255, 0, 0)
  t = np.arange(src_sr * seconds) / src_sr
  left = 0.3 * np.sin(2 * np.pi * (300 * t + 40 * t**2))
  right = 0.3 * np.sin(2 * np.pi * (700 * t - 30 * t**2))
  stereo = np.stack([left, right], axis=1).astype(np.float32)
  path = tmp_path / "src.mp4"
  video_io.write_mp4(path, frames, stereo, src_fps, src_sr)
  assert video_io.probe(path).audio_channels == 2

  media = video_io.load_media(path, fps=PAPER_FPS, height=64, width=64, sample_rate=22050)
  assert media.duration == pytest.approx(3.0, abs=1e-3)
  # Target frames i/fps < 3 s: i = 0..10.
  assert media.frames.shape == (11, 64, 64, 3)
  for i, frame in enumerate(media.frames):
    # Last source frame on screen at i / fps (source frame k starts at k / 25).
    expected = math.floor(i * 1024 * src_fps / 3675 + 1e-9)
    grey = frame[20:44, 20:44].astype(np.float64).mean()
    assert round((grey - 10) / 3) == expected, (i, grey)
  # Centred crop: no red anywhere, equal blue bands on both sides.
  reds = (media.frames[..., 0] > 128) & (media.frames[..., 2] < 100)
  assert not reds.any()
  blue = (media.frames[0, 32, :, 2] > 128) & (media.frames[0, 32, :, 0] < 100)
  left_band = np.argmin(blue)  # width of the leading run of blue columns
  right_band = np.argmin(blue[::-1])
  assert left_band >= 6 and abs(left_band - right_band) <= 1, (left_band, right_band)

  # Audio: the channel mean, resampled to 22,050 Hz on the same timeline.
  t_out = np.arange(media.audio.shape[0]) / 22050
  expected = 0.15 * np.sin(2 * np.pi * (300 * t_out + 40 * t_out**2)) + 0.15 * np.sin(
    2 * np.pi * (700 * t_out - 30 * t_out**2)
  )
  assert media.audio.shape == (66150 + 44,)  # 3 s + 2 ms
  corr = _lags(media.audio, expected, 441)
  assert corr[441] > 0.95 and np.argmax(corr) == 441
  rms_ratio = np.sqrt(np.mean(media.audio**2) / np.mean(expected**2))
  assert 0.9 < rms_ratio < 1.1


def test_audio_stream_start_time_is_respected(tmp_path):
  sr = 22050
  frames = _textured_frames(25, 64, 64)
  audio = _sound(sr // 2, sr, seed=3)
  path = tmp_path / "late_audio.mkv"  # lossless PCM, start time stored in the stream
  video_io.write_mp4(path, frames, audio, 25, sr, audio_start=0.5)
  media = video_io.load_media(path, fps=25, height=64, width=64, sample_rate=sr)
  assert media.duration == pytest.approx(1.0, abs=2e-3)
  assert np.abs(media.audio[: sr // 2]).max() < 1e-6  # silence before the audio starts
  np.testing.assert_allclose(media.audio[sr // 2 : sr], audio, atol=1e-6)


def test_webm_and_mkv_read(tmp_path):
  frames = _textured_frames(8, 64, 96)
  audio = _sound(8000 * 2, 8000)  # 8 kHz: Opus stores it natively
  fps = 4.0
  for suffix, min_psnr in ((".webm", 28), (".mkv", 30)):
    path = tmp_path / f"clip{suffix}"
    video_io.write_mp4(path, frames, audio, fps, 8000)
    info = video_io.probe(path)
    assert (info.width, info.height) == (96, 64)
    got_v, got_a = video_io.read_clip(
      path,
      num_frames=8,
      fps=fps,
      height=64,
      width=96,
      sample_rate=8000,
      num_samples=16000,
      short_clip="error",
    )
    assert _psnr(got_v, frames) > min_psnr, suffix
    corr = _lags(got_a, audio, 160)
    assert corr[160] > 0.9, suffix
    assert abs(int(np.argmax(corr)) - 160) <= 8, suffix  # within 1 ms (Matroska precision)


def test_webm_resamples_unsupported_opus_rate(tmp_path):
  audio = _sound(22050, 22050)
  path = tmp_path / "clip.webm"
  video_io.write_mp4(path, _textured_frames(4, 32, 32), audio, 4, 22050)
  assert video_io.probe(path).sample_rate == 48000
  media = video_io.load_media(path, fps=4, height=32, width=32, sample_rate=22050)
  assert _lags(media.audio[:22050], audio, 50)[50] > 0.9


def test_garbage_file_is_a_media_error(tmp_path):
  path = tmp_path / "garbage.mp4"
  path.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
  for call in (
    lambda: video_io.probe(path),
    lambda: video_io.load_media(path, fps=4, height=32, width=32, sample_rate=8000),
  ):
    with pytest.raises(video_io.MediaError, match="garbage.mp4"):
      call()
  with pytest.raises(video_io.MediaError, match="no such file"):
    video_io.probe(tmp_path / "missing.mp4")


def test_damaged_mp4_is_a_media_error(tmp_path):
  good = tmp_path / "good.mp4"
  video_io.write_mp4(good, _textured_frames(50, 64, 64), _sound(44100, 22050), 25, 22050)
  data = bytearray(good.read_bytes())
  third = len(data) // 3
  data[third : 2 * third] = bytes(third)  # zero the middle third of the coded data
  bad = tmp_path / "damaged.mp4"
  bad.write_bytes(bytes(data))
  with pytest.raises(video_io.MediaError, match=r"damaged.mp4.*corrupt"):
    video_io.load_media(bad, fps=25, height=64, width=64, sample_rate=22050)


def _truncate(src, dst) -> None:
  data = src.read_bytes()
  dst.write_bytes(data[: len(data) // 2])


def test_truncated_mp4(tmp_path):
  frames = _textured_frames(50, 64, 64)
  audio = _sound(2 * 22050, 22050)
  kwargs = dict(fps=25, height=64, width=64, sample_rate=22050)
  # Default layout: the index is written last, so the first half has none.
  full = tmp_path / "full.mp4"
  video_io.write_mp4(full, frames, audio, 25, 22050)
  cut = tmp_path / "cut.mp4"
  _truncate(full, cut)
  with pytest.raises(video_io.MediaError, match="cut.mp4"):
    video_io.load_media(cut, **kwargs)
  # Index in front: FFmpeg decodes up to the cut without complaint; the header
  # still declares 2 s, so the reader reports the file as truncated.
  full_fs = tmp_path / "full_faststart.mp4"
  video_io.write_mp4(full_fs, frames, audio, 25, 22050, faststart=True)
  assert video_io.load_media(full_fs, **kwargs).frames.shape[0] == 50
  cut_fs = tmp_path / "cut_faststart.mp4"
  _truncate(full_fs, cut_fs)
  with pytest.raises(video_io.MediaError, match=r"cut_faststart.mp4.*truncated"):
    video_io.load_media(cut_fs, **kwargs)


def test_missing_audio_modes(tmp_path):
  path = tmp_path / "silent_film.mp4"
  video_io.write_mp4(path, _textured_frames(10, 32, 32), None, 10, 8000)
  assert not video_io.probe(path).has_audio
  kwargs = dict(fps=10, height=32, width=32, sample_rate=8000)
  with pytest.raises(video_io.MediaError, match=r"silent_film.mp4.*no audio stream"):
    video_io.load_media(path, **kwargs)
  media = video_io.load_media(path, missing_audio="silence", **kwargs)
  assert not media.has_audio
  assert media.audio.shape == (8016,) and not media.audio.any()  # 1 s + 2 ms
  with pytest.raises(ValueError, match="missing_audio"):
    video_io.load_media(path, missing_audio="ignore", **kwargs)


def test_audio_only_file_is_a_media_error(tmp_path):
  path = tmp_path / "speech.wav"
  soundfile.write(path, _sound(8000, 8000), 8000)
  info = video_io.probe(path)
  assert info.has_audio and not info.has_video and info.sample_rate == 8000
  with pytest.raises(video_io.MediaError, match=r"speech.wav.*no video stream"):
    video_io.read_clip(
      path, num_frames=4, fps=4, height=32, width=32, sample_rate=8000, num_samples=4000
    )


def test_short_file_pad_or_error(tmp_path):
  # 1 s of video and audio, asked for a 2 s window.
  frames = _textured_frames(8, 32, 32)
  audio = _sound(8000, 8000)
  path = tmp_path / "short.mp4"
  video_io.write_mp4(path, frames, audio, 8, 8000)
  kwargs = dict(num_frames=16, fps=8, height=32, width=32, sample_rate=8000, num_samples=16000)
  got_v, got_a = video_io.read_clip(path, short_clip="pad", **kwargs)
  assert got_v.shape == (16, 32, 32, 3) and got_a.shape == (16000,)
  assert _psnr(got_v[:8], frames) > 30
  np.testing.assert_array_equal(got_v[8:], np.broadcast_to(got_v[7], got_v[8:].shape))
  assert not got_a[8000:].any()  # zero padding after the end
  assert _lags(got_a[:8000], audio, 10)[10] > 0.9
  for mode in ("skip", "error"):
    with pytest.raises(video_io.ClipTooShortError, match=r"short.mp4.*1.000 s.*2.000 s"):
      video_io.read_clip(path, short_clip=mode, **kwargs)
  # A window that fits exactly is not short; starting 0.5 s later it is.
  media = video_io.load_media(path, fps=8, height=32, width=32, sample_rate=8000)
  video_io.cut_clip(media, start=0.0, num_frames=8, num_samples=8000, short_clip="error")
  v, a = video_io.cut_clip(media, start=0.5, num_frames=4, num_samples=4000, short_clip="error")
  np.testing.assert_array_equal(v, media.frames[4:8])
  np.testing.assert_array_equal(a, media.audio[4000:8000])
  with pytest.raises(video_io.ClipTooShortError):
    video_io.cut_clip(media, start=0.6, num_frames=4, num_samples=4000, short_clip="skip")
  with pytest.raises(ValueError, match="short_clip"):
    video_io.cut_clip(media, start=0.0, num_frames=4, num_samples=4000, short_clip="trim")


def test_write_validates_inputs(tmp_path):
  ok = np.zeros((2, 32, 32, 3), np.uint8)
  with pytest.raises(ValueError, match="even"):
    video_io.write_mp4(tmp_path / "a.mp4", np.zeros((2, 31, 32, 3), np.uint8), None, 4, 8000)
  with pytest.raises(ValueError, match="uint8"):
    video_io.write_mp4(tmp_path / "a.mp4", ok.astype(np.float32), None, 4, 8000)
  with pytest.raises(ValueError, match=r"\[T>0, H, W, 3\]"):
    video_io.write_mp4(tmp_path / "a.mp4", ok[..., :1], None, 4, 8000)
  with pytest.raises(ValueError, match="suffix"):
    video_io.write_mp4(tmp_path / "a.avi", ok, None, 4, 8000)
  with pytest.raises(ValueError, match="float"):
    video_io.write_mp4(tmp_path / "a.mp4", ok, np.zeros(100, np.int16), 4, 8000)
  with pytest.raises(ValueError, match="NaN"):
    video_io.write_mp4(tmp_path / "a.mp4", ok, np.full(100, np.nan, np.float32), 4, 8000)
  with pytest.raises(ValueError, match="fps"):
    video_io.write_mp4(tmp_path / "a.mp4", ok, None, 0, 8000)
