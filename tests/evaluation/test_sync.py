"""Tests of the audio-video event offset (avtok_jax.evaluation.sync).

Built-in clips are made as the tokenizer sees them: rendered at the stored
frame size, centre-cropped, audio through int16, mel = `mel_features`. They
use generator seed 3; the detector settings were chosen on seed 1 and the
reported figures use seed 2. Measured on these clips (tolerance: one frame for
events, 25 ms for onsets):

  preset (clips)  visual P / R   audio P / R   offset: matched  shuffled  +2 frames  -2 frames
  small (24)      0.925 / 0.871  1.00 / 1.00   0.038 s          0.204 s   0.300 s    0.266 s
  tiny (48)       0.959 / 0.886  1.00 / 1.00   0.013 s          0.044 s   0.070 s    0.113 s

Every event found, none extra (so the offset is the onset timing only) in
14 of the 24 small clips and 32 of the 48 tiny ones.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from avtok_jax import config_lib
from avtok_jax.data import audio, synthetic
from avtok_jax.evaluation import sync

SEED = 3
NUM_CLIPS = {"tiny": 48, "small": 24}


@functools.cache
def _builtin(preset: str) -> dict:
  """Clips of the data preset as the tokenizer sees them, with their true event frames.

  Cached: the fixtures share one copy, which no test modifies.
  """
  c = config_lib.data_config(preset)
  hs, ws = config_lib.stored_frame_size(c)
  spec = synthetic.SyntheticSpec.from_config(c, height=hs, width=ws)
  dy, dx = (hs - c.height) // 2, (ws - c.width) // 2
  video, wave, frames = [], [], []
  for i in range(NUM_CLIPS[preset]):
    clip = synthetic.generate(spec, SEED, i)
    video.append(clip["video"][:, dy : dy + c.height, dx : dx + c.width])
    # The int16 round trip of the stored records (data/tfds/common.py).
    wave.append(np.round(np.clip(clip["audio"], -1, 1) * 32767).astype(np.float32) / 32767)
    frames.append(clip["event_frames"])
  mel_spec = audio.MelSpec.from_config(c)
  wave = np.stack(wave)
  return {
    "video": np.stack(video),
    "wave": wave,
    "mel": audio.mel_features(wave, mel_spec),
    "mel_spec": mel_spec,
    "fps": spec.fps,
    "sample_rate": spec.sample_rate,
    "samples_per_frame": spec.samples_per_frame,
    "event_frames": frames,
    "event_times": [np.unique(f) / spec.fps for f in frames],
  }


@pytest.fixture(scope="module", params=["tiny", "small"])
def builtin(request):
  return request.param, _builtin(request.param)


@pytest.fixture(scope="module")
def small():
  return _builtin("small")


# ----------------------------------------------------------------------------
# Detectors against the generator's ground truth.
# ----------------------------------------------------------------------------


def test_visual_events_match_ground_truth(builtin):
  preset, d = builtin
  frames = sync.visual_event_frames(d["video"])
  assert len(frames) == NUM_CLIPS[preset]
  num_frames = d["video"].shape[1]
  for f in frames:
    assert f.dtype == np.int64 and np.all(np.diff(f) > 0) and np.all((f >= 1) & (f < num_frames))
  scores = sync.detection_scores(frames, d["event_frames"], tolerance=1)
  # Measured: tiny P 0.959 R 0.886, small P 0.925 R 0.871.
  assert scores["recall"] >= 0.8, scores
  assert scores["precision"] >= 0.85, scores
  # Times are frame / fps; float video in [-1, 1] gives the same events.
  times = sync.visual_events(d["video"].astype(np.float32) / 127.5 - 1.0, d["fps"])
  for f, t in zip(frames, times, strict=True):
    np.testing.assert_allclose(t, f / d["fps"], rtol=0, atol=1e-12)


def test_audio_onsets_match_ground_truth(builtin):
  _, d = builtin
  onsets = sync.audio_onsets(d["wave"], d["sample_rate"])
  scores = sync.detection_scores(onsets, d["event_times"], tolerance=0.025)
  assert scores["precision"] >= 0.95 and scores["recall"] >= 0.95, scores  # measured 1.0 / 1.0
  # The normalised log-mel gives exactly the waveform's onsets.
  from_mel = sync.audio_onsets(d["mel"], d["sample_rate"], mel_spec=d["mel_spec"])
  for a, b in zip(onsets, from_mel, strict=True):
    np.testing.assert_array_equal(a, b)
  # Documented timing: the flux peaks half a hop before an onset on a frame boundary.
  errors = [
    a - t[np.argmin(np.abs(t - a))]
    for on, t in zip(onsets, d["event_times"], strict=True)
    for a in on
  ]
  half_hop = 0.5 * d["mel_spec"].hop_length / d["sample_rate"]
  assert np.median(errors) == pytest.approx(-half_hop, abs=1e-9)


def test_offset_is_half_a_hop_when_detections_are_exact(builtin):
  """With the exact audio, a clip whose events are all found is off by the onset timing only."""
  _, d = builtin
  out = sync.desync(d["video"], d["wave"], d["fps"], d["sample_rate"])
  half_hop = 0.5 * d["mel_spec"].hop_length / d["sample_rate"]
  exact = [
    i
    for i, (v, t) in enumerate(zip(out["visual_times"], d["event_times"], strict=True))
    if v.shape == t.shape and np.allclose(v, t)
  ]
  assert len(exact) >= 0.4 * len(d["event_times"])  # measured 14/24 (small), 32/48 (tiny)
  np.testing.assert_allclose(out["offsets"][exact], half_hop, atol=1e-9)
  # Ground truth against itself: exactly zero.
  np.testing.assert_array_equal(sync.event_offset(d["event_times"], d["event_times"]), 0.0)


def test_offset_separates_matched_from_shuffled_and_shifted_audio(small):
  d = small
  fps, sr, spf = d["fps"], d["sample_rate"], d["samples_per_frame"]
  matched = sync.desync(d["video"], d["mel"], fps, sr, mel_spec=d["mel_spec"])
  n = matched["num_clips"]
  assert matched["num_scored"] == n
  assert matched["num_without_visual_events"] == matched["num_without_audio_onsets"] == 0
  assert matched["desync"] == pytest.approx(np.mean(matched["offsets"]))
  # Measured 0.038 s; one frame is 0.279 s.
  assert matched["desync"] < 0.2 / fps

  # Audio of clip perm[i] with the video of clip i (a derangement).
  order = np.random.default_rng(0).permutation(n)
  perm = np.empty(n, int)
  perm[order] = np.roll(order, 1)
  assert not np.any(perm == np.arange(n))
  shuffled = sync.desync(d["video"], d["mel"][perm], fps, sr, mel_spec=d["mel_spec"])
  assert matched["desync"] < 0.3 * shuffled["desync"]  # measured 0.204 s

  for frames in (2, -2):  # measured 0.300 s and 0.266 s
    k = abs(frames) * spf
    pad = np.zeros((n, k), np.float32)
    wave = d["wave"]
    moved = (
      np.concatenate([pad, wave[:, :-k]], 1)
      if frames > 0
      else np.concatenate([wave[:, k:], pad], 1)
    )
    shifted = sync.desync(d["video"], moved, fps, sr)
    assert matched["desync"] < 0.3 * shifted["desync"], frames


# ----------------------------------------------------------------------------
# Edge cases.
# ----------------------------------------------------------------------------


def test_silent_audio_and_static_video_are_counted_not_scored(small):
  d = small
  fps, sr = d["fps"], d["sample_rate"]
  video, wave = d["video"][:4], d["wave"][:4]
  silent = sync.desync(video, np.zeros_like(wave), fps, sr)
  assert all(a.size == 0 for a in silent["audio_times"])
  assert silent["num_without_audio_onsets"] == 4 and silent["num_without_visual_events"] == 0
  assert silent["num_scored"] == 0 and math.isnan(silent["desync"])
  assert np.all(np.isnan(silent["offsets"]))
  # The mel of silence (-1 everywhere) too.
  silent_mel = np.full((4, *d["mel"].shape[1:]), -1.0, np.float32)
  assert all(a.size == 0 for a in sync.audio_onsets(silent_mel, sr, mel_spec=d["mel_spec"]))

  static = np.repeat(video[:, :1], video.shape[1], axis=1)  # the first frame held
  out = sync.desync(static, wave, fps, sr)
  assert out["num_without_visual_events"] == 4 and out["num_without_audio_onsets"] == 0
  assert out["num_scored"] == 0 and math.isnan(out["desync"])

  # Mixed batch: only the clip with both sides is scored.
  mixed = sync.desync(
    np.stack([video[0], static[1]]), np.stack([wave[0], np.zeros_like(wave[1])]), fps, sr
  )
  assert mixed["num_scored"] == 1 and mixed["num_clips"] == 2
  assert math.isnan(mixed["offsets"][1]) and mixed["desync"] == mixed["offsets"][0]
  assert mixed["num_without_visual_events"] == 1 and mixed["num_without_audio_onsets"] == 1


def test_videos_without_objects_have_no_events():
  rng = np.random.default_rng(0)
  grey_noise = np.repeat(rng.integers(0, 256, (2, 6, 32, 32, 1), dtype=np.uint8), 3, axis=-1)
  black = np.zeros((2, 6, 32, 32, 3), np.uint8)
  one_frame = rng.uniform(-1, 1, (2, 1, 32, 32, 3)).astype(np.float32)
  for video in (grey_noise, black, one_frame):
    assert all(f.size == 0 for f in sync.visual_event_frames(video))


# ----------------------------------------------------------------------------
# Hand-made scenes: one red square on grey.
# ----------------------------------------------------------------------------

SIDE, SQUARE = 48, 8


def _scene(paths: list[list[tuple[int, int] | None]]) -> np.ndarray:
  """uint8 [1, T, 48, 48, 3]: one 8x8 red square per path, at (x0, y0) or absent (None)."""
  num_frames = len(paths[0])
  video = np.full((num_frames, SIDE, SIDE, 3), 128, np.uint8)
  for path in paths:
    for k, corner in enumerate(path):
      if corner is not None:
        x0, y0 = corner
        video[k, y0 : y0 + SQUARE, x0 : x0 + SQUARE] = (220, 30, 30)
  return video[None]


def test_bounce_and_appearance_are_found_at_their_frames():
  # Moves right 6 px per frame, touches the right border in frame 6, comes back.
  xs = [4, 10, 16, 22, 28, 34, 40, 34, 28]
  mover = [(x, 20) for x in xs]
  # Appears in frame 3, far from everything in frame 2, then stays.
  newcomer = [None] * 3 + [(4, 36)] * 6
  assert sync.visual_event_frames(_scene([mover, newcomer]))[0].tolist() == [3, 6]
  assert sync.visual_event_frames(_scene([mover]))[0].tolist() == [6]
  # A larger threshold (0.3 of the side = 14.4 px/frame^2 > the bounce's 12) misses it.
  assert sync.visual_event_frames(_scene([mover]), accel_threshold=0.3)[0].size == 0


def test_last_frame_wall_contact():
  # 6 px per frame to the right; in the last frame it would reach x0 = 42
  # (2 px past the border) but is stopped at it (x0 = 40, touching).
  stopped = [(x, 20) for x in (18, 24, 30, 36, 40)]
  assert sync.visual_event_frames(_scene([stopped]))[0].tolist() == [4]
  # Same, with a tolerance larger than the 2 px overshoot (0.05 * 48 = 2.4 px): no event.
  assert sync.visual_event_frames(_scene([stopped]), exit_tolerance=0.05)[0].size == 0
  # Arriving exactly at the border at its own speed is no contact: the path ends there.
  assert sync.visual_event_frames(_scene([[(x, 20) for x in (16, 22, 28, 34, 40)]]))[0].size == 0
  # Short of the border: no event.
  assert sync.visual_event_frames(_scene([[(x, 20) for x in (12, 18, 24, 30, 36)]]))[0].size == 0


def test_falling_and_turning_without_reversal_are_not_events():
  # A thrown square under 2 px/frame^2 gravity (< 0.06 * 48 = 2.9): it rises,
  # turns over at the top and falls; no wall is touched.
  ys = [30 - 8 * k + k * k for k in range(8)]  # 30, 23, 18, 15, 14, 15, 18, 23
  path = [(6 + 4 * k, y) for k, y in enumerate(ys)]
  assert sync.visual_event_frames(_scene([path]))[0].size == 0


# ----------------------------------------------------------------------------
# Onsets on hand-made audio.
# ----------------------------------------------------------------------------


def test_onsets_of_tone_bursts():
  sr = 22050
  t = np.arange(sr) / sr  # one second
  wave = np.zeros(sr, np.float32)
  starts = (0.2, 0.5, 0.8)
  for start in starts:
    on = t >= start
    wave[on] += (0.5 * np.sin(2 * np.pi * 880 * t[on]) * np.exp(-(t[on] - start) / 0.03)).astype(
      np.float32
    )
  # 1024 samples is not a whole number of hops: onsets fall between frames.
  onsets = sync.audio_onsets(wave[None], sr)[0]
  assert onsets.shape == (3,)
  np.testing.assert_allclose(onsets, starts, atol=2 * 256 / sr)
  # Quiet bursts (-40 dB) are found as well: the flux is level-independent.
  quiet = sync.audio_onsets(0.01 * wave[None], sr)[0]
  np.testing.assert_allclose(quiet, onsets, atol=1e-12)
  # A stricter floor than any flux value finds nothing.
  assert sync.audio_onsets(wave[None], sr, floor=50.0)[0].size == 0


def test_spectral_flux_and_peak_picking():
  log_mel = np.zeros((2, 4, 6))
  log_mel[0, :2, 3:] = 2.0  # two of four bands rise by 2 at frame 3
  flux = sync.spectral_flux(log_mel)
  np.testing.assert_allclose(flux[0], [0, 0, 0, 1.0, 0, 0])
  np.testing.assert_allclose(flux[1], 0.0)
  # Decreases do not count.
  np.testing.assert_allclose(sync.spectral_flux(-log_mel)[0], 0.0)

  f = np.array([0, 1.0, 0, 0, 0.5, 0, 0, 0, 0.9, 0.9, 0])
  assert sync.pick_peaks(f, 1, delta=0.0, floor=0.2).tolist() == [1, 4, 8]  # first of equal values
  assert sync.pick_peaks(f, 1, delta=0.0, floor=0.6).tolist() == [1, 8]
  assert sync.pick_peaks(f, 3, delta=0.0, floor=0.2).tolist() == [1, 8]  # 4 is within 3 of 1
  # delta: frame 4 needs 0.5 >= mean(f[1:6]) + delta = 0.3 + delta.
  assert sync.pick_peaks(f, 1, delta=0.15, floor=0.2).tolist() == [1, 4, 8]
  assert sync.pick_peaks(f, 1, delta=0.25, floor=0.2).tolist() == [1, 8]


# ----------------------------------------------------------------------------
# Offsets and matching.
# ----------------------------------------------------------------------------


def test_event_offset_by_hand():
  v, a = (
    [np.array([0.5]), np.array([0.0, 1.0]), np.array([]), np.array([1.0])],
    [
      np.array([0.6, 2.0]),
      np.array([0.0, 1.0]),
      np.array([0.3]),
      np.array([]),
    ],
  )
  # Clip 0: visual->audio 0.1; audio->visual (0.1 + 1.5) / 2 = 0.8.
  np.testing.assert_allclose(sync.event_offset(v, a), [0.45, 0.0, np.nan, np.nan])
  np.testing.assert_allclose(
    sync.event_offset(v, a, mode="visual_to_audio"), [0.1, 0.0, np.nan, np.nan]
  )
  np.testing.assert_allclose(
    sync.event_offset(v, a, mode="audio_to_visual"), [0.8, 0.0, np.nan, np.nan]
  )
  # Capped at 1 s: audio->visual (0.1 + 1.0) / 2.
  np.testing.assert_allclose(sync.event_offset(v, a, max_offset=1.0)[0], 0.5 * (0.1 + 0.55))
  with pytest.raises(ValueError, match="mode"):
    sync.event_offset(v, a, mode="nearest")
  with pytest.raises(ValueError, match="max_offset"):
    sync.event_offset(v, a, max_offset=0.0)
  with pytest.raises(ValueError, match="clips"):
    sync.event_offset(v, a[:3])
  with pytest.raises(ValueError, match="NaN"):
    sync.event_offset([np.array([np.nan])], [np.array([0.0])])


def test_match_events():
  # Equal true times count once; pairs are taken closest first.
  assert sync.match_events([1.0, 2.1], [1.0, 1.0, 2.0], 0) == (1, 1, 1)
  assert sync.match_events([1.0, 2.1], [1.0, 2.0], 0.2) == (2, 0, 0)
  # 1.9 would pair with 2.0, but 2.05 is closer to it and takes it.
  assert sync.match_events([1.9, 2.05], [2.0], 0.2) == (1, 1, 0)
  assert sync.match_events([], [1.0], 1) == (0, 0, 1)
  scores = sync.detection_scores([[1.0], []], [[1.0], [2.0]], 0)
  assert scores["precision"] == 1.0 and scores["recall"] == 0.5
  assert math.isnan(sync.detection_scores([[]], [[]], 0)["precision"])


# ----------------------------------------------------------------------------
# Settings and input checks.
# ----------------------------------------------------------------------------


def test_default_mel_spec_follows_the_presets():
  for preset in ("tiny", "small"):
    c = config_lib.data_config(preset)
    assert sync.default_mel_spec(c.sample_rate) == audio.MelSpec.from_config(c)
  with pytest.raises(ValueError, match="sample_rate=16000"):
    sync.default_mel_spec(16000)


def test_bad_inputs_raise():
  video = np.zeros((1, 4, 32, 32, 3), np.uint8)
  wave = np.zeros((1, 4096), np.float32)
  with pytest.raises(ValueError, match=r"\[N, T, H, W, 3\]"):
    sync.visual_event_frames(video[0])
  with pytest.raises(ValueError, match="dtype"):
    sync.visual_event_frames(video.astype(np.int32))
  with pytest.raises(ValueError, match="NaN"):
    sync.visual_event_frames(np.full(video.shape, np.nan, np.float32))
  with pytest.raises(ValueError, match="saturation_threshold"):
    sync.visual_event_frames(video, saturation_threshold=1.5)
  with pytest.raises(ValueError, match="fps"):
    sync.visual_events(video, 0.0)
  with pytest.raises(ValueError, match="int16"):
    sync.audio_onsets(wave.astype(np.int16), 8000)
  with pytest.raises(ValueError, match="shape"):
    sync.audio_onsets(wave[0], 8000)
  with pytest.raises(ValueError, match="normalised"):
    sync.audio_onsets(np.full((1, 32, 64), -11.5, np.float32), 8000)
  with pytest.raises(ValueError, match="bands"):
    sync.audio_onsets(np.zeros((1, 80, 64), np.float32), 8000)
  with pytest.raises(ValueError, match="differs"):
    sync.audio_onsets(wave, 8000, mel_spec=audio.MelSpec())
  with pytest.raises(ValueError, match="clips"):
    sync.desync(np.concatenate([video, video]), wave, 7.8125, 8000)
