"""The built-in sounding-video generator: determinism, sizes, audio-visual sync, CLI.

Events are checked against the generated pixels and samples with detectors
written here (saturation masks, border contact, short-time energy onsets),
not by reading the generator's internals.
"""

import csv
import json

import av
import numpy as np
import pytest

from avtok_jax import config_lib
from avtok_jax.data import synthetic


def _spec(preset: str) -> synthetic.SyntheticSpec:
  return synthetic.SyntheticSpec.from_config(config_lib.data_config(preset))


TINY = _spec("tiny")
PAPER = _spec("paper")


# ----------------------------------------------------------------------------
# Detectors.
# ----------------------------------------------------------------------------


def _object_mask(video: np.ndarray) -> np.ndarray:
  """Object pixels: HSV saturation > 0.5 (objects are saturated, backgrounds are not)."""
  v = video.astype(np.float32)
  hi, lo = v.max(-1), v.min(-1)
  return (hi - lo) / np.maximum(hi, 1.0) > 0.5


def _border_contact(mask: np.ndarray) -> np.ndarray:
  """[T, 4] bool: object pixels in the left, right, top, bottom border line."""
  return np.stack(
    [mask[:, :, 0].any(1), mask[:, :, -1].any(1), mask[:, 0, :].any(1), mask[:, -1, :].any(1)],
    axis=1,
  )


def _onsets(audio: np.ndarray, sr: int) -> np.ndarray:
  """Sample positions where the energy of the next 4 ms jumps 8x over the last 20 ms."""
  x = audio.astype(np.float64) ** 2
  n = x.size
  w, back = max(int(0.004 * sr), 8), int(0.02 * sr)
  c = np.concatenate([[0.0], np.cumsum(x)])
  idx = np.arange(n)
  ahead = (c[np.minimum(idx + w, n)] - c[idx]) / w
  behind = (c[idx] - c[np.maximum(idx - back, 0)]) / back
  rising = (ahead > 8 * behind) & (ahead > 0.01 * ahead.max())
  starts = idx[rising & ~np.concatenate([[False], rising[:-1]])]
  out = []
  for s in starts:
    if not out or s - out[-1] > 2 * w:
      out.append(s)
  return np.array(out, dtype=np.int64)


def _first_rise(audio: np.ndarray, onset: int, sr: int) -> int | None:
  """First sample within 10 ms of `onset` louder than 3x the peak of the 20 ms before.

  The background noise is bounded and the previous event's tail only
  decays, so nothing but a new sound crosses that line.
  """
  a = np.abs(audio.astype(np.float64))
  lo = onset - int(0.01 * sr)
  level = a[onset - int(0.03 * sr) : lo].max()
  above = np.nonzero(a[lo : onset + int(0.01 * sr)] > 3 * level)[0]
  return lo + int(above[0]) if above.size else None


def _hue_deg(video: np.ndarray) -> float:
  """Circular mean hue (degrees) of the object pixels."""
  v = video[_object_mask(video)].astype(np.float64) / 255.0
  r, g, b = v[:, 0], v[:, 1], v[:, 2]
  hue = np.arctan2(np.sqrt(3.0) * (g - b), 2 * r - g - b)  # standard hexcone approximation
  return float(np.rad2deg(np.angle(np.mean(np.exp(1j * hue)))) % 360.0)


def _peak_frequency(audio: np.ndarray, sr: int) -> float:
  spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.size)))
  spectrum[: int(60 * audio.size / sr)] = 0  # ignore anything under 60 Hz
  return float(np.argmax(spectrum) * sr / audio.size)


# ----------------------------------------------------------------------------
# Spec.
# ----------------------------------------------------------------------------


def test_spec_from_config_and_properties():
  assert (PAPER.num_frames, PAPER.height, PAPER.width) == (16, 128, 128)
  assert (PAPER.sample_rate, PAPER.num_samples, PAPER.num_classes) == (22050, 98304, 10)
  assert PAPER.samples_per_frame == 6144
  assert PAPER.fps == pytest.approx(3.5888671875)
  assert PAPER.duration == pytest.approx(98304 / 22050)
  assert float(PAPER.frame_rate) == PAPER.fps
  assert (TINY.num_frames, TINY.height, TINY.width, TINY.sample_rate) == (4, 32, 32, 8000)
  assert TINY.samples_per_frame == 1024 and TINY.fps == pytest.approx(7.8125)
  bigger = synthetic.SyntheticSpec.from_config(config_lib.data_config("tiny"), height=40, width=48)
  assert (bigger.height, bigger.width, bigger.num_frames) == (40, 48, 4)


@pytest.mark.parametrize(
  "kwargs, words",
  [
    (dict(num_samples=98305), "num_samples"),
    (dict(num_frames=1, num_samples=98304), "num_frames"),
    (dict(height=8), "smaller than 24x24"),
    (dict(sample_rate=4000), "sample_rate"),
    (dict(num_classes=0), "num_classes"),
    (dict(width=64.0), "width"),
  ],
)
def test_invalid_spec_raises(kwargs, words):
  with pytest.raises(synthetic.SyntheticSpecError, match=words) as info:
    synthetic.SyntheticSpec(**kwargs)
  assert isinstance(info.value, ValueError)


def test_invalid_generate_arguments_raise():
  with pytest.raises(ValueError, match="seed"):
    synthetic.generate(TINY, -1, 0)
  with pytest.raises(ValueError, match="index"):
    synthetic.generate(TINY, 0, -3)
  with pytest.raises(ValueError, match="label"):
    synthetic.generate(TINY, 0, 0, label=10)
  with pytest.raises(ValueError, match="num_classes"):
    synthetic.class_names(0)


def test_class_names():
  names = synthetic.class_names()
  assert len(names) == 10 and len(set(names)) == 10
  assert names[0] == "red_ball_bell"
  assert all(n.replace("_", "").isalnum() for n in names)
  many = synthetic.class_names(309)  # as many as VGGSound
  assert len(set(many)) == 309 and many[:10] == names
  assert synthetic.class_names(1) == names[:1]
  styles = synthetic.class_styles(309)
  assert len({(s.shape, s.timbre, s.texture) for s in styles}) == 309


# ----------------------------------------------------------------------------
# Determinism, shapes, ranges.
# ----------------------------------------------------------------------------


def test_determinism():
  for spec, index in ((TINY, 3), (PAPER, 7)):
    a = synthetic.generate(spec, 5, index)
    b = synthetic.generate(spec, 5, index)
    assert a.keys() == b.keys()
    for key in a:
      if isinstance(a[key], np.ndarray):
        assert a[key].dtype == b[key].dtype
        assert a[key].tobytes() == b[key].tobytes(), key
      else:
        assert a[key] == b[key]
  base = synthetic.generate(TINY, 5, 3)
  for other in (synthetic.generate(TINY, 5, 13), synthetic.generate(TINY, 6, 3)):
    assert other["label"] == base["label"]  # same class (index % 10), different clip
    assert other["video"].tobytes() != base["video"].tobytes()
    assert other["audio"].tobytes() != base["audio"].tobytes()


def test_silent_clips_keep_everything_but_the_sound():
  """audio=False (a video-only pipeline) skips the sound; the rest is the same clip."""
  full = synthetic.generate(TINY, 5, 3, with_ground_truth=True)
  silent = synthetic.generate(TINY, 5, 3, with_ground_truth=True, audio=False)
  assert full.keys() == silent.keys()
  assert silent["audio"].shape == full["audio"].shape and silent["audio"].dtype == np.float32
  assert not silent["audio"].any() and full["audio"].any()
  for key in full:
    if key != "audio":
      np.testing.assert_array_equal(np.asarray(full[key]), np.asarray(silent[key]), err_msg=key)


@pytest.mark.parametrize("preset, count", [("tiny", 60), ("paper", 4)])
def test_shapes_dtypes_ranges(preset, count):
  spec = _spec(preset)
  names = synthetic.class_names(spec.num_classes)
  for index in range(count):
    clip = synthetic.generate(spec, 0, index)
    assert set(clip) == {
      "video",
      "audio",
      "label",
      "label_name",
      "event_times",
      "event_frames",
      "event_kinds",
    }
    assert clip["video"].shape == (spec.num_frames, spec.height, spec.width, 3)
    assert clip["video"].dtype == np.uint8
    assert clip["audio"].shape == (spec.num_samples,) and clip["audio"].dtype == np.float32
    assert np.all(np.isfinite(clip["audio"]))
    assert 0.05 < np.max(np.abs(clip["audio"])) <= 0.95
    assert isinstance(clip["label"], int) and 0 <= clip["label"] < spec.num_classes
    assert clip["label_name"] == names[clip["label"]]
    times, frames, kinds = clip["event_times"], clip["event_frames"], clip["event_kinds"]
    assert times.dtype == np.float32 and frames.dtype == np.int32 and kinds.dtype == np.int32
    assert times.ndim == frames.ndim == kinds.ndim == 1
    assert 1 <= times.size == frames.size == kinds.size
    assert np.all(np.diff(times) >= 0)
    assert np.all((frames >= 1) & (frames < spec.num_frames))
    np.testing.assert_allclose(times, frames / spec.fps, rtol=1e-6)
    assert np.all((kinds >= 0) & (kinds < len(synthetic.EVENT_KINDS)))
  assert synthetic.EVENT_KINDS == ("appear", "bounce", "impact")


def test_forced_label_and_ground_truth_keys():
  clip = synthetic.generate(TINY, 1, 4, label=7, with_ground_truth=True)
  assert clip["label"] == 7 and clip["label_name"] == synthetic.class_names()[7]
  boxes = clip["object_boxes"]
  assert boxes.shape == (TINY.num_frames, synthetic.MAX_OBJECTS, 4) and boxes.dtype == np.float32
  assert clip["event_objects"].shape == clip["event_frames"].shape
  plain = synthetic.generate(TINY, 1, 4, label=7)
  assert plain["video"].tobytes() == clip["video"].tobytes()  # the extra keys change nothing


# ----------------------------------------------------------------------------
# Audio-visual correspondence, measured.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("preset, count", [("tiny", 150), ("paper", 16)])
def test_audio_onsets_at_event_frames(preset, count):
  spec = _spec(preset)
  rises = []
  for index in range(count):
    clip = synthetic.generate(spec, 11, index)
    audio = clip["audio"]
    expected = np.unique(clip["event_frames"]) * spec.samples_per_frame
    found = _onsets(audio, spec.sample_rate)
    assert found.size, index
    # Every event is heard, and nothing is heard that is not an event.
    to_found = np.abs(expected[:, None] - found[None, :]).min(1) / spec.sample_rate
    to_expected = np.abs(found[:, None] - expected[None, :]).min(1) / spec.sample_rate
    assert np.all(to_found < 1 / spec.fps), (index, expected, found)
    assert np.all(to_found < 0.010), (index, expected, found)
    assert np.all(to_expected < 0.010), (index, expected, found)
    # Tighter: the detector's 4 ms look-ahead window fires once it holds part
    # of the onset, so an onset exactly at sample k * spf is found in
    # [k * spf - window, k * spf]; sound starting 1 ms early or late is not.
    nearest = found[np.abs(expected[:, None] - found[None, :]).argmin(1)]
    window = max(int(0.004 * spec.sample_rate), 8)
    assert np.all((nearest <= expected) & (nearest >= expected - window)), (index, expected, found)
    # Sample-precise: the waveform leaves the background at the onset sample,
    # not before it (an attack of 1.5 ms, so within 2 ms after it).
    for onset in expected:
      rise = _first_rise(audio, onset, spec.sample_rate)
      assert rise is not None and onset <= rise <= onset + 0.002 * spec.sample_rate, (index, onset)
      rises.append((rise - onset) / spec.sample_rate)
    # Nothing of the first event before its onset sample: only the quiet
    # background plays up to there, then the level jumps.
    first = expected[0]
    before = np.sqrt(np.mean(audio[first - spec.samples_per_frame // 2 : first] ** 2))
    after = np.sqrt(np.mean(audio[first : first + int(0.01 * spec.sample_rate)] ** 2))
    assert before < 0.03 and after > 5 * before, (index, before, after)
  assert np.median(rises) < 0.0005  # most onsets are audible within half a millisecond


@pytest.mark.parametrize("preset, count", [("tiny", 150), ("paper", 16)])
def test_visual_events_at_event_frames(preset, count):
  spec = _spec(preset)
  seen_kinds = set()
  for index in range(count):
    clip = synthetic.generate(spec, 11, index, with_ground_truth=True)
    mask = _object_mask(clip["video"])
    frames, kinds = clip["event_frames"], clip["event_kinds"]
    seen_kinds.update(int(k) for k in kinds)
    boxes = clip["object_boxes"]
    present = ~np.isnan(boxes[..., 0])

    # The boxes describe the pixels: every object pixel is inside some box
    # (plus 1 px of anti-aliasing), and every box is well filled.
    covered = np.zeros_like(mask)
    for k in range(spec.num_frames):
      for j in np.nonzero(present[k])[0]:
        x0, y0, x1, y1 = boxes[k, j]
        ys = slice(max(int(np.floor(y0)) - 1, 0), int(np.ceil(y1)) + 1)
        xs = slice(max(int(np.floor(x0)) - 1, 0), int(np.ceil(x1)) + 1)
        covered[k, ys, xs] = True
        tight = (
          slice(int(np.floor(y0)), int(np.ceil(y1))),
          slice(int(np.floor(x0)), int(np.ceil(x1))),
        )
        assert mask[k][tight].mean() > 0.2, (index, k, j)
    assert not np.any(mask & ~covered), index

    # Bounce/impact: an object touches a border exactly in the event frames;
    # impacts are on the floor, bounces on a side wall or the ceiling.
    contact = _border_contact(mask)
    want_bounce = np.zeros(spec.num_frames, bool)
    want_impact = np.zeros(spec.num_frames, bool)
    want_bounce[frames[kinds == synthetic.BOUNCE]] = True
    want_impact[frames[kinds == synthetic.IMPACT]] = True
    np.testing.assert_array_equal(contact[:, :3].any(1), want_bounce, err_msg=str(index))
    np.testing.assert_array_equal(contact[:, 3], want_impact, err_msg=str(index))

    # Appear: no object pixels where the object is in frame k (apart from other
    # objects' boxes) in frame k - 1, and its box is filled in frame k.
    for k, kind, j in zip(frames, kinds, clip["event_objects"], strict=True):
      if kind != synthetic.APPEAR:
        continue
      assert not present[:k, j].any() and present[k, j]
      x0, y0, x1, y1 = boxes[k, j]
      region = np.zeros(mask.shape[1:], bool)
      region[int(np.floor(y0)) : int(np.ceil(y1)), int(np.floor(x0)) : int(np.ceil(x1))] = True
      others = np.zeros_like(region)
      for i in np.nonzero(present[k - 1])[0]:
        ox0, oy0, ox1, oy1 = boxes[k - 1, i]
        others[
          max(int(np.floor(oy0)) - 1, 0) : int(np.ceil(oy1)) + 1,
          max(int(np.floor(ox0)) - 1, 0) : int(np.ceil(ox1)) + 1,
        ] = True
      free = region & ~others
      assert free.sum() > 0.3 * region.sum(), (index, k)  # the check below is not vacuous
      assert not mask[k - 1][free].any(), (index, k)
      assert mask[k][region].mean() > 0.2, (index, k)
  if preset == "tiny":
    assert seen_kinds == {synthetic.APPEAR, synthetic.BOUNCE, synthetic.IMPACT}


# ----------------------------------------------------------------------------
# Classes and variety.
# ----------------------------------------------------------------------------


def test_classes_differ_in_look_and_sound():
  seeds = (0, 1, 2)
  hues = np.zeros((10, len(seeds)))
  pitch = np.zeros((10, len(seeds)))
  for c in range(10):
    for s, seed in enumerate(seeds):
      clip = synthetic.generate(TINY, seed, c)
      assert clip["label"] == c
      hues[c, s] = _hue_deg(clip["video"])
      pitch[c, s] = np.log2(_peak_frequency(clip["audio"], TINY.sample_rate))
  # Nearest class centre (leave nothing out: the spreads are what is tested).
  hue_centre = np.rad2deg(np.angle(np.exp(1j * np.deg2rad(hues)).mean(1))) % 360
  pitch_centre = pitch.mean(1)
  for c in range(10):
    for s in range(len(seeds)):
      d_hue = np.abs((hues[c, s] - hue_centre + 180) % 360 - 180)
      assert np.argmin(d_hue) == c, (c, s, hues[c], hue_centre)
      assert np.argmin(np.abs(pitch[c, s] - pitch_centre)) == c, (c, s, pitch[c], pitch_centre)
  # The ten centres are well apart: >= 15 degrees of hue, >= 0.25 octave.
  hue_gap = np.abs((hue_centre[:, None] - hue_centre[None] + 180) % 360 - 180)
  pitch_gap = np.abs(pitch_centre[:, None] - pitch_centre[None])
  off = ~np.eye(10, dtype=bool)
  assert hue_gap[off].min() > 15 and pitch_gap[off].min() > 0.25


def test_same_class_clips_vary():
  clips = [synthetic.generate(PAPER, 0, 3 + 10 * i, with_ground_truth=True) for i in range(8)]
  assert len({c["label"] for c in clips}) == 1
  videos = np.stack([c["video"] for c in clips]).astype(np.float32)
  # Backgrounds differ (mean colour of the first frame's corners region) ...
  corner_means = videos[:, 0, :6, :6].mean(axis=(1, 2))
  assert np.ptp(corner_means, axis=0).max() > 30
  # ... as do the number of objects, their sizes, loudness and event counts.
  counts = {int((~np.isnan(c["object_boxes"][-1, :, 0])).sum()) for c in clips}
  assert len(counts) >= 2
  widths = np.concatenate(
    [
      (c["object_boxes"][..., 2] - c["object_boxes"][..., 0])[~np.isnan(c["object_boxes"][..., 0])]
      for c in clips
    ]
  )
  assert widths.max() > 1.3 * widths.min()
  levels = [np.sqrt(np.mean(c["audio"] ** 2)) for c in clips]
  assert max(levels) > 1.3 * min(levels)
  assert len({c["event_frames"].size for c in clips}) >= 3
  for a, b in zip(clips, clips[1:], strict=False):
    assert np.abs(a["video"].astype(int) - b["video"].astype(int)).mean() > 5


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def test_cli_writes_playable_mp4_with_sound(tmp_path, capsys):
  out = tmp_path / "clips"
  assert synthetic.main(["synthetic", "--out", str(out), "--num", "2", "--preset", "tiny"]) == 0
  assert "Wrote 2 clips" in capsys.readouterr().out
  # A second call adds test clips to the same folder without losing the first.
  synthetic.main(
    ["synthetic", f"--out={out}", "--num=1", "--preset=tiny", "--start_index=5", "--split=test"]
  )
  names = synthetic.class_names()
  expected = {0: "train", 1: "train", 5: "test"}
  files = {i: f"{i:06d}_{names[i % 10]}.mp4" for i in expected}
  assert sorted(p.name for p in out.glob("*.mp4")) == sorted(files.values())

  with open(out / "labels.csv", newline="") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["filename", "label", "split"]
  assert sorted(rows[1:]) == sorted([files[i], names[i % 10], expected[i]] for i in expected)

  events = json.loads((out / "events.json").read_text())
  assert set(events) == set(files.values())
  for i, filename in files.items():
    clip = synthetic.generate(TINY, 0, i)
    info = events[filename]
    assert info["label"] == clip["label_name"]
    assert info["event_frames"] == clip["event_frames"].tolist()
    np.testing.assert_allclose(info["event_times"], clip["event_times"], atol=1e-5)
    assert info["event_kinds"] == [synthetic.EVENT_KINDS[k] for k in clip["event_kinds"]]

    with av.open(str(out / filename)) as container:
      assert len(container.streams.video) == 1 and len(container.streams.audio) == 1
      assert container.streams.audio[0].rate == TINY.sample_rate
      frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == TINY.num_frames
    assert frames[0].shape == (TINY.height, TINY.width, 3)
    # Lossy, but recognisably the same picture.
    assert np.abs(np.stack(frames).astype(int) - clip["video"].astype(int)).mean() < 12
    with av.open(str(out / filename)) as container:
      audio = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
    assert audio.size >= 0.9 * TINY.num_samples and np.abs(audio).max() > 0.05


def test_cli_requires_out(tmp_path):
  with pytest.raises(SystemExit, match="--out"):
    synthetic.main(["synthetic", "--num", "1"])
