"""Audio-video event offset: a DeSync for the built-in data that needs no learned model.

The paper's DeSync is the audio-video offset that Synchformer (Iashin et al.
2024, "Synchformer: Efficient Synchronization from Sparse Cues") predicts, a
network trained on real video. On the built-in procedural data
(`data/synthetic.py`) the sound of every event (a bounce, a floor impact, an
appearance) starts exactly at the frame where the event is seen, so the offset
can be measured directly: find the events in the frames, the onsets in the
audio, and how far apart they are.

* `visual_events` [ours]: objects are the connected regions of saturated
  pixels (the built-in objects are saturated, the backgrounds are not), linked
  from frame to frame into tracks by their centres. An event is
  - a frame where a track's velocity reverses along x or y with an
    acceleration (second difference of the centre) of at least
    `ACCEL_THRESHOLD` of the frame side, the largest of its neighbours (a
    bounce or an impact);
  - the first frame of a track that starts after frame 0 away from every
    region of the frame before (an appearance);
  - in the last frame, where the motion after cannot be seen: a track whose
    constant-velocity path would leave the frame but which is seen pressed
    against the border there (a wall contact).
* `audio_onsets`: the rectified spectral flux of the log-mel, peak picked
  above an adaptive threshold (Bello et al. 2005, "A tutorial on onset
  detection in music signals", IEEE TSAP 13(5); the peak-picking conditions
  of Dixon 2006, "Onset detection revisited", DAFx).
* `event_offset`: per clip, the mean distance in seconds from each event to
  the nearest onset and from each onset to the nearest event (symmetric: a
  chamfer distance, so missing and extra events on either side both count),
  each distance capped at `MAX_OFFSET`. A clip with no events on one side
  has no offset: NaN, left out of the mean and counted by `desync`.
* `desync`: the three on a batch, with the mean over the scored clips.

Measured on 64 clips per preset as the tokenizer sees them (generator seed 2,
frames centre-cropped, audio through int16), against the generator's event
frames; events matched within one frame, onsets within 25 ms; offsets in
seconds, audio re-paired by a random derangement or shifted by two frames:

  preset  visual P / R  audio P / R  matched  shuffled  +2 frames  -2 frames
  small   0.98 / 0.89   1.00 / 1.00  0.029    0.197     0.270      0.289
  tiny    0.99 / 0.88   1.00 / 1.00  0.010    0.053     0.099      0.090

(-2 frames advances the audio: 1 small and 28 tiny clips then have no onset
left and are not scored.)

Limits (the visual detector is made for the built-in data, not real video):

* Objects must be saturated (HSV saturation >= `SATURATION_THRESHOLD`) and
  the background not. Grey objects are invisible to it; a saturated
  background is one large static region (no events).
* Objects of one clip share a colour, so two that overlap form one region;
  the overlapping frames give no position for one of them and a mixed one
  for the other. This causes most misses.
* An acceleration needs a track's positions in the frames before and after,
  so a bounce right before or after an overlap is missed; in the last frame
  only a stop at the border is seen.
* The acceleration threshold (0.06 of the side per frame^2) lies above the
  built-in gravity (at most 0.05) and the velocity must reverse, so falling
  is not an event; stronger gravity, or motion changes without a reversal,
  are not handled.
* Time resolution is one frame (0.279 s for `small`, 0.128 s for `tiny`);
  onsets are timed to the mel hop (11.6 ms, 8 ms) and onsets closer than
  `ONSET_MIN_GAP` are merged.

Everything runs on the host in numpy (a post-processing metric, evaluated once
per run). Batch functions return one array per clip.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.ndimage
import scipy.optimize

from avtok_jax import config_lib
from avtok_jax.data import audio as audio_lib

ArrayLike = Any  # numpy or JAX arrays (converted with np.asarray)

# ----------------------------------------------------------------------------
# Settings. [ours] unless cited: chosen on generator seed 1 (96 clips of each
# of the tiny and small presets); the tests and the reported figures use
# other seeds. Lengths are fractions of the shorter frame side (the cropped
# frames the tokenizer sees), so one value serves every preset.
# ----------------------------------------------------------------------------

# Foreground: a pixel's HSV saturation (max - min) / max. Built-in objects are
# >= 0.75 away from their anti-aliased edges and backgrounds <= 0.2 before the
# brightness noise (synthetic.py module docstring); 0.5 lies between.
SATURATION_THRESHOLD = 0.5
# Regions smaller than this fraction of the frame are noise: 8 px at 64x64,
# where the smallest whole built-in object covers 48 px (16 px at 32x32).
MIN_AREA_FRACTION = 0.002
# Smallest acceleration of a bounce. The generator's bounce changes the
# velocity by >= 7.5 px per frame (its minimum speed, 4 px, plus contact
# margin and overlap, 3.5 px): 0.12 of a 64 px side, 0.23 of a 32 px side.
# Its gravity is at most 0.05 of the generated frame's side per frame^2 (0.056
# of the cropped side), below this threshold, so falling is not an event.
ACCEL_THRESHOLD = 0.06
# Largest distance between a track's last centre or constant-velocity
# prediction and the region it is linked to. The generator's top speed is
# 0.28 of its side per frame (0.32 of the cropped side), and a bounce puts
# the prediction off by up to twice the speed; hence both candidates and a
# generous gate.
LINK_DISTANCE = 0.6
# A region this much larger than the usual area of the track it was matched
# to holds that track's object and another one, overlapping.
MERGE_AREA_RATIO = 1.25
# Last frame: the constant-velocity prediction must end at least this far
# past the border the object is seen touching.
EXIT_TOLERANCE = 0.02

# Onsets. The log-mel is floored ONSET_TOP_DB below the clip's loudest value
# before the flux (as librosa's power_to_db floors at top_db below the peak):
# what is quieter cannot mark an event, and vocoder noise lives there. With
# Griffin-Lim waveforms (32 iterations) of built-in clips, a fifth of the
# onsets found without this floor were spurious (precision 0.78-0.80), none
# with 50 dB (60 dB: precision 0.97-0.98).
ONSET_TOP_DB = 50.0
# Flux units: nats of log-mel magnitude increase, averaged over the mel
# bands. On the tuning clips (with the 50 dB floor) the smallest flux at an
# event onset was 0.35 (small) and 0.61 (tiny), the largest away from onsets
# 0.19 and 0.22: the floor lies between. ONSET_DELTA is the margin above the
# local mean (Dixon's delta).
ONSET_FLOOR = 0.25
ONSET_DELTA = 0.2
# Peaks closer than this (seconds) are one onset: the generator's events are
# at least one frame (0.128 s at tiny, 0.279 s at small) apart.
ONSET_MIN_GAP = 0.1
# The adaptive threshold's mean runs over [j - m w, j + w] (Dixon 2006: m = 3).
ONSET_MEAN_SPAN = 3
# Normalised log-mel values outside this range mean another unit (raw log-mel
# reaches -11.5): the same bound as `classifier.MEL_RANGE`.
MEL_RANGE = (-4.0, 4.0)

# Event-onset distances are capped at the widest offset Synchformer
# classifies (21 classes from -2 s to +2 s), so that one spurious event cannot
# dominate a clip.
MAX_OFFSET = 2.0
OFFSET_MODES = ("symmetric", "visual_to_audio", "audio_to_visual")


# ----------------------------------------------------------------------------
# Visual events.
# ----------------------------------------------------------------------------


def _check_video(video: ArrayLike) -> np.ndarray:
  """A video batch [N, T, H, W, 3], uint8 or finite float."""
  x = np.asarray(video)
  if x.ndim != 5 or x.shape[-1] != 3 or min(x.shape[:4]) == 0:
    raise ValueError(f"video must have shape [N, T, H, W, 3] with N, T, H, W >= 1, got {x.shape}.")
  if x.dtype != np.uint8:
    if not np.issubdtype(x.dtype, np.floating):
      raise ValueError(f"video must be uint8 or float in [-1, 1], got dtype {x.dtype}.")
    if not np.all(np.isfinite(x)):
      raise ValueError("video contains NaN or Inf.")
  return x


def _unit_frames(clip: np.ndarray) -> np.ndarray:
  """One clip [T, H, W, 3] -> float32 in [0, 1]: uint8 / 255, or float [-1, 1] clipped."""
  if clip.dtype == np.uint8:
    return clip.astype(np.float32) * np.float32(1 / 255)
  # Decoders overshoot [-1, 1]; clip as writing uint8 frames would.
  return np.clip((clip.astype(np.float32) + 1.0) * 0.5, 0.0, 1.0)


def foreground_mask(
  frames: np.ndarray, saturation_threshold: float = SATURATION_THRESHOLD
) -> np.ndarray:
  """Pixels whose HSV saturation (max - min) / max is at least the threshold.

  Args:
    frames: float [..., H, W, 3] RGB in [0, 1].
    saturation_threshold: in [0, 1].

  Returns:
    bool [..., H, W]. Black pixels (max = 0) have saturation 0.
  """
  hi = frames.max(axis=-1)
  lo = frames.min(axis=-1)
  return (hi - lo) >= np.float32(saturation_threshold) * np.maximum(hi, np.float32(1e-6))


@dataclasses.dataclass(frozen=True)
class _Region:
  """A connected foreground region of one frame."""

  centre: np.ndarray  # float64 [2]: (x, y) in pixels, pixel i spanning [i, i + 1)
  box: tuple[int, int, int, int]  # (x0, y0, x1, y1), x1 and y1 exclusive
  area: int  # pixels


def _regions(mask: np.ndarray, min_area: int) -> list[_Region]:
  """8-connected components of one [H, W] mask with at least `min_area` pixels."""
  labels, n = scipy.ndimage.label(mask, structure=np.ones((3, 3), bool))
  if n == 0:
    return []
  areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
  centres = scipy.ndimage.center_of_mass(mask, labels, np.arange(1, n + 1))
  out = []
  for area, (cy, cx), (sy, sx) in zip(
    areas, centres, scipy.ndimage.find_objects(labels), strict=True
  ):
    if area >= min_area:
      box = (sx.start, sy.start, sx.stop, sy.stop)
      out.append(_Region(np.array([cx + 0.5, cy + 0.5]), box, int(area)))
  return out


def _boxes_near(a: tuple, b: tuple, pad: float) -> bool:
  """Whether two boxes overlap once each is grown by `pad` pixels."""
  return not (a[2] + pad <= b[0] or b[2] + pad <= a[0] or a[3] + pad <= b[1] or b[3] + pad <= a[1])


@dataclasses.dataclass
class _Track:
  """One object over frames.

  `region` maps a frame to the index of the region holding the object;
  `own` lists the frames where the track was matched to that region (its
  owner). Frames where it only follows another track's region (two objects
  overlapping) are left out: they give it no position.
  """

  region: dict[int, int] = dataclasses.field(default_factory=dict)
  own: set[int] = dataclasses.field(default_factory=set)

  def positions(self, regions: list[list[_Region]]) -> dict[int, np.ndarray]:
    """Centres in the own frames."""
    return {k: regions[k][self.region[k]].centre for k in sorted(self.own)}

  def usual_area(self, regions: list[list[_Region]]) -> float:
    frames = self.own or set(self.region)
    return float(np.median([regions[k][self.region[k]].area for k in frames]))


def _link(regions: list[list[_Region]], max_distance: float) -> list[_Track]:
  """Links the regions of consecutive frames into tracks.

  The tracks present in frame k - 1 are matched one-to-one to regions of
  frame k at least total distance (Hungarian algorithm, scipy
  `linear_sum_assignment`); a track's distance to a region is the smaller of
  its distances to the track's last centre and to its constant-velocity
  prediction, and pairs farther than `max_distance` are dropped. A track left
  without a region follows the nearest matched region that is at least
  MERGE_AREA_RATIO times its owner's usual area (two overlapping objects);
  the follower gets no position there. Unmatched regions start new tracks.
  """
  tracks: list[_Track] = []
  for k, frame in enumerate(regions):
    active = [t for t in tracks if k - 1 in t.region]
    owners: dict[int, _Track] = {}
    if active and frame:
      cost = np.empty((len(active), len(frame)))
      for r, t in enumerate(active):
        last = regions[k - 1][t.region[k - 1]].centre
        pred = last
        if k - 1 in t.own and k - 2 in t.own:
          pred = 2 * last - regions[k - 2][t.region[k - 2]].centre
        for c, region in enumerate(frame):
          cost[r, c] = min(
            np.linalg.norm(region.centre - last), np.linalg.norm(region.centre - pred)
          )
      for r, c in zip(*scipy.optimize.linear_sum_assignment(cost), strict=True):
        if cost[r, c] <= max_distance:
          active[r].region[k] = int(c)
          owners[int(c)] = active[r]
      for r, t in enumerate(active):
        if k in t.region:
          continue
        for c in map(int, np.argsort(cost[r], kind="stable")):
          if cost[r, c] > max_distance:
            break
          owner = owners.get(c)
          if owner is not None and frame[c].area >= MERGE_AREA_RATIO * owner.usual_area(regions):
            t.region[k] = c
            break
      for t in owners.values():
        t.own.add(k)
    for c in range(len(frame)):
      if c not in owners:
        tracks.append(_Track(region={k: c}, own={k}))
  return tracks


def _reach(track: _Track, regions: list[list[_Region]], width: int, height: int) -> np.ndarray:
  """Median (left, right, top, bottom) reach of a track's regions from their centres.

  Taken over the own frames where the region does not touch the border
  (the border cuts it short), or over all own frames if there are none.
  """
  whole, cut = [], []
  for k in sorted(track.own):
    r = regions[k][track.region[k]]
    (x, y), (x0, y0, x1, y1) = r.centre, r.box
    inside = x0 > 0 and y0 > 0 and x1 < width and y1 < height
    (whole if inside else cut).append((x - x0, x1 - x, y - y0, y1 - y))
  return np.median(np.array(whole or cut), axis=0)


def _clip_event_frames(
  frames: np.ndarray,
  saturation_threshold: float,
  min_area_fraction: float,
  accel_threshold: float,
  link_distance: float,
  exit_tolerance: float,
) -> np.ndarray:
  """Event frames of one clip, float [T, H, W, 3] in [0, 1] -> sorted distinct int64 [K]."""
  num_frames, height, width, _ = frames.shape
  side = min(height, width)
  min_area = max(1, round(min_area_fraction * height * width))
  mask = foreground_mask(frames, saturation_threshold)
  regions = [_regions(mask[k], min_area) for k in range(num_frames)]
  tracks = _link(regions, link_distance * side)
  events = set()

  # Appearances: a track starting after frame 0 whose first region no region
  # of the frame before comes within a pixel of (otherwise it is part of a
  # region that split, e.g. two objects that stop overlapping).
  for t in tracks:
    k = min(t.region)
    box = regions[k][t.region[k]].box
    if k > 0 and not any(_boxes_near(box, r.box, 1.0) for r in regions[k - 1]):
      events.add(k)

  threshold = accel_threshold * side
  for t in tracks:
    p = t.positions(regions)
    # Bounces: the velocity along x or y reverses with an acceleration of at
    # least the threshold, the largest of the track's neighbouring frames
    # along that axis (the frame before a wall contact also decelerates: the
    # contact cuts its step short).
    accel = {k: np.abs(p[k + 1] - 2 * p[k] + p[k - 1]) for k in p if k - 1 in p and k + 1 in p}
    reversed_axes = set()
    for k, a in accel.items():
      before, after = p[k] - p[k - 1], p[k + 1] - p[k]
      for axis in (0, 1):
        if (
          a[axis] >= threshold
          and before[axis] * after[axis] < 0
          and all(a[axis] >= accel[j][axis] for j in (k - 1, k + 1) if j in accel)
        ):
          events.add(k)
          reversed_axes.add((k, axis))
    # Last frame (no motion after it to see): the constant-velocity path would
    # end past a border that the object is seen touching. Built-in objects
    # never leave the frame, so that is a wall contact. An axis that reversed
    # in the frame before is skipped: the velocity before that bounce
    # predicts nothing.
    k = num_frames - 1
    if {k - 2, k - 1, k} <= p.keys():
      x, y = 2 * p[k - 1] - p[k - 2]
      left, right, top, bottom = _reach(t, regions, width, height)
      x0, y0, x1, y1 = regions[k][t.region[k]].box
      past = []
      if (k - 1, 0) not in reversed_axes:
        past += [left - x] if x0 <= 0 else []
        past += [x + right - width] if x1 >= width else []
      if (k - 1, 1) not in reversed_axes:
        past += [top - y] if y0 <= 0 else []
        past += [y + bottom - height] if y1 >= height else []
      if past and max(past) >= exit_tolerance * side:
        events.add(k)
  return np.array(sorted(events), np.int64)


def visual_event_frames(
  video: ArrayLike,
  *,
  saturation_threshold: float = SATURATION_THRESHOLD,
  min_area_fraction: float = MIN_AREA_FRACTION,
  accel_threshold: float = ACCEL_THRESHOLD,
  link_distance: float = LINK_DISTANCE,
  exit_tolerance: float = EXIT_TOLERANCE,
) -> list[np.ndarray]:
  """Frame indices of the visual events of each clip (method: module docstring).

  Args:
    video: [N, T, H, W, 3], uint8 or float in [-1, 1] (clipped there).
    saturation_threshold: HSV saturation from which a pixel is an object, in [0, 1].
    min_area_fraction: smallest object region, a fraction of H * W.
    accel_threshold: smallest bounce acceleration, a fraction of min(H, W) per frame^2.
    link_distance: largest jump of a track between frames, a fraction of min(H, W).
    exit_tolerance: last-frame wall contact margin, a fraction of min(H, W).

  Returns:
    N int64 arrays of distinct increasing frame indices in [1, T) (possibly
    empty: a static or empty video has no events).
  """
  _check_number("saturation_threshold", saturation_threshold, 0.0, 1.0)
  _check_number("min_area_fraction", min_area_fraction, 0.0, 1.0)
  _check_number("accel_threshold", accel_threshold, 0.0, math.inf)
  _check_number("link_distance", link_distance, 0.0, math.inf)
  _check_number("exit_tolerance", exit_tolerance, 0.0, math.inf)
  video = _check_video(video)
  settings = (saturation_threshold, min_area_fraction, accel_threshold, link_distance)
  return [_clip_event_frames(_unit_frames(c), *settings, exit_tolerance) for c in video]


def visual_events(video: ArrayLike, fps: float, **settings: float) -> list[np.ndarray]:
  """Times in seconds (frame index / fps) of the visual events of each clip.

  Args:
    video: [N, T, H, W, 3], uint8 or float in [-1, 1].
    fps: frames per second (`synthetic.SyntheticSpec.fps`: 3.589 for `small`).
    **settings: detector settings of `visual_event_frames`.

  Returns:
    N float64 arrays of increasing event times in seconds.
  """
  fps = _check_number("fps", fps, 0.0, math.inf, positive=True)
  return [f / fps for f in visual_event_frames(video, **settings)]


# ----------------------------------------------------------------------------
# Audio onsets.
# ----------------------------------------------------------------------------


def default_mel_spec(sample_rate: int) -> audio_lib.MelSpec:
  """The log-mel frontend of the first data preset with this sample rate.

  tiny: 8 kHz (n_fft 256, hop 64, 32 bands); small and paper: 22.05 kHz
  (n_fft 1024, hop 256, 80 bands). Other rates raise ValueError.
  """
  for preset in config_lib.DATA_PRESETS:
    c = config_lib.data_config(preset)
    if int(c.sample_rate) == sample_rate:
      return audio_lib.MelSpec.from_config(c)
  raise ValueError(
    f"No data preset has sample_rate={sample_rate}; pass mel_spec=audio.MelSpec(...) for it "
    "(e.g. audio.MelSpec.from_config(config.data))."
  )


def spectral_flux(log_mel: ArrayLike) -> np.ndarray:
  """Half-wave rectified spectral flux of log-mel spectrograms.

  SF(j) = mean_f max(0, X(f, j) - X(f, j - 1)) and SF(0) = 0: the rectified
  spectral difference of Bello et al. 2005, here on log magnitudes and
  averaged rather than summed over bands, so that its unit (nats) does not
  depend on the number of bands and a level change of the whole clip leaves
  it unchanged (away from the log floor).

  Args:
    log_mel: float [..., F, L] natural-log mel magnitudes.

  Returns:
    float64 [..., L].
  """
  x = np.asarray(log_mel, np.float64)
  rise = np.maximum(np.diff(x, axis=-1), 0.0).mean(axis=-2)
  return np.concatenate([np.zeros((*rise.shape[:-1], 1)), rise], axis=-1)


def pick_peaks(
  flux: ArrayLike,
  half_width: int,
  delta: float = ONSET_DELTA,
  floor: float = ONSET_FLOOR,
) -> np.ndarray:
  """Onset frames of one detection function.

  Frame j is an onset if (Dixon 2006, "Onset detection revisited", peak
  picking conditions 1 and 2, with w = half_width and m = ONSET_MEAN_SPAN)
    1. flux[j] is the largest value of flux[j - w : j + w + 1] (the first
       one if several are equal), and
    2. flux[j] >= mean(flux[j - m w : j + w + 1]) + delta,
  and (replacing Dixon's decaying threshold, since the flux is not
  normalised per clip: silence must give no onsets)
    3. flux[j] >= floor.

  Args:
    flux: float [L].
    half_width: w in frames, >= 1.
    delta: margin above the local mean.
    floor: absolute threshold.

  Returns:
    int64 [K] increasing frame indices.
  """
  flux = np.asarray(flux, np.float64)
  if flux.ndim != 1:
    raise ValueError(f"flux must be one detection function [L], got shape {flux.shape}.")
  w = int(half_width)
  if w < 1:
    raise ValueError(f"half_width must be >= 1, got {half_width!r}.")
  n = flux.size
  onsets = []
  for j in range(n):
    value = flux[j]
    hi = min(j + w + 1, n)
    if value < floor or value < flux[max(j - w, 0) : hi].max():
      continue
    if j > 0 and value == flux[max(j - w, 0) : j].max():
      continue  # an equal value came first
    if value >= flux[max(j - ONSET_MEAN_SPAN * w, 0) : hi].mean() + delta:
      onsets.append(j)
  return np.array(onsets, np.int64)


def _log_mel_batch(audio: ArrayLike, mel_spec: audio_lib.MelSpec) -> np.ndarray:
  """Waveforms [N, S] or normalised log-mel [N, F, L] -> float32 natural-log mel [N, F, L]."""
  x = np.asarray(audio)
  if x.ndim not in (2, 3) or min(x.shape) == 0:
    raise ValueError(
      "audio must be a waveform batch [N, S] or a normalised log-mel batch [N, F, L] "
      f"(nothing empty), got shape {x.shape}."
    )
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(
      f"audio must be float, got dtype {x.dtype} (int16 waveforms: scale them with "
      "data/tfds/common.py::audio_from_int16)."
    )
  if not np.all(np.isfinite(x)):
    raise ValueError("audio contains NaN or Inf.")
  x = x.astype(np.float32)
  if x.ndim == 2:
    return audio_lib.log_mel(x, mel_spec)
  if x.shape[1] != mel_spec.n_mels:
    raise ValueError(f"mel has {x.shape[1]} bands but mel_spec.n_mels = {mel_spec.n_mels}.")
  lo, hi = float(x.min()), float(x.max())
  if lo < MEL_RANGE[0] or hi > MEL_RANGE[1]:
    raise ValueError(
      f"mel values span [{lo:.3g}, {hi:.3g}], outside {MEL_RANGE}: expected the normalised "
      "log-mel of data/audio.py::mel_features (silence = -1)."
    )
  # Below -1 is quieter than the log floor: decoders overshoot there.
  return audio_lib.denormalize(np.maximum(x, np.float32(-1.0)), mel_spec)


def audio_onsets(
  audio: ArrayLike,
  sample_rate: int,
  *,
  mel_spec: audio_lib.MelSpec | None = None,
  min_gap: float = ONSET_MIN_GAP,
  delta: float = ONSET_DELTA,
  floor: float = ONSET_FLOOR,
  top_db: float | None = ONSET_TOP_DB,
) -> list[np.ndarray]:
  """Onset times in seconds of each clip: log-mel spectral flux, peak picked.

  An onset found at mel frame j is timed at the centre of that frame's
  window, (j + 1/2) * hop / sample_rate (HiFi-GAN framing, `data/audio.py`).
  A waveform and its `mel_features` give the same onsets. On the built-in
  clips, whose onsets lie on frame boundaries, the flux peaks at the frame
  whose window centre is half a hop before the onset: a constant -5.8 ms at
  22.05 kHz (hop 256), -4 ms at 8 kHz (hop 64), left uncorrected.

  Args:
    audio: waveforms float [N, S] at `sample_rate`, or normalised log-mel
      float [N, F, L] (`data/audio.py::mel_features`; silence = -1).
    sample_rate: Hz.
    mel_spec: the log-mel frontend; default `default_mel_spec(sample_rate)`.
      For a mel input it must be the one that made it.
    min_gap: seconds; peaks closer than this are one onset (the larger).
    delta: margin above the local mean flux (`pick_peaks`).
    floor: absolute flux threshold (`pick_peaks`).
    top_db: dB; each clip's log-mel is floored this far below its maximum
      (None: no floor beyond the frontend's log floor).

  Returns:
    N float64 arrays of increasing onset times in seconds.
  """
  sample_rate = int(_check_number("sample_rate", sample_rate, 0.0, math.inf, positive=True))
  spec = default_mel_spec(sample_rate) if mel_spec is None else mel_spec
  if spec.sample_rate != sample_rate:
    raise ValueError(f"mel_spec.sample_rate={spec.sample_rate} differs from {sample_rate}.")
  hop = spec.hop_length / sample_rate
  min_gap = _check_number("min_gap", min_gap, 0.0, math.inf, positive=True)
  half_width = max(1, round(min_gap / hop))
  log_mel = _log_mel_batch(audio, spec)
  if top_db is not None:
    # Magnitude dB: 20 log10 |X| = (20 / ln 10) * ln |X|.
    top = _check_number("top_db", top_db, 0.0, math.inf) * math.log(10.0) / 20.0
    log_mel = np.maximum(log_mel, log_mel.max(axis=(-2, -1), keepdims=True) - np.float32(top))
  flux = spectral_flux(log_mel)
  return [(pick_peaks(f, half_width, delta, floor) + 0.5) * hop for f in flux]


# ----------------------------------------------------------------------------
# Offsets.
# ----------------------------------------------------------------------------


def _times(name: str, times: ArrayLike) -> np.ndarray:
  t = np.asarray(times, np.float64).reshape(-1)
  if not np.all(np.isfinite(t)):
    raise ValueError(f"{name} contains NaN or Inf.")
  return t


def _nearest(source: np.ndarray, target: np.ndarray, cap: float) -> np.ndarray:
  """For each source time, the distance to the nearest target time, capped at `cap`."""
  return np.minimum(np.abs(source[:, None] - target[None, :]).min(axis=1), cap)


def event_offset(
  visual_times: Sequence[ArrayLike],
  audio_times: Sequence[ArrayLike],
  *,
  max_offset: float = MAX_OFFSET,
  mode: str = "symmetric",
) -> np.ndarray:
  """Per-clip audio-video event offset in seconds.

  Each distance (event to nearest onset, onset to nearest event) is capped at
  `max_offset`. A clip's offset is
  * 'visual_to_audio': the mean distance from each visual event to the
    nearest audio onset (misses extra onsets);
  * 'audio_to_visual': the mean distance from each onset to the nearest
    event (misses extra events);
  * 'symmetric' (default): the mean of the two (a chamfer distance).
  A clip with no visual event or no audio onset has nothing to pair: its
  offset is NaN (not a penalty), and `desync` leaves it out of the mean and
  counts it.

  Args:
    visual_times: N arrays of visual event times, seconds.
    audio_times: N arrays of audio onset times, seconds.
    max_offset: cap on each distance, seconds (> 0).
    mode: one of OFFSET_MODES.

  Returns:
    float64 [N] in [0, max_offset]; NaN where a side has no events.
  """
  if mode not in OFFSET_MODES:
    raise ValueError(f"mode must be one of {OFFSET_MODES}, got {mode!r}.")
  cap = _check_number("max_offset", max_offset, 0.0, math.inf, positive=True)
  if len(visual_times) != len(audio_times):
    raise ValueError(
      f"visual_times has {len(visual_times)} clips but audio_times has {len(audio_times)}."
    )
  out = np.full(len(visual_times), np.nan)
  for i, (v, a) in enumerate(zip(visual_times, audio_times, strict=True)):
    v, a = _times("visual_times", v), _times("audio_times", a)
    if v.size == 0 or a.size == 0:
      continue
    v_to_a = float(_nearest(v, a, cap).mean())
    a_to_v = float(_nearest(a, v, cap).mean())
    out[i] = {"visual_to_audio": v_to_a, "audio_to_visual": a_to_v}.get(
      mode, 0.5 * (v_to_a + a_to_v)
    )
  return out


def desync(
  video: ArrayLike,
  audio: ArrayLike,
  fps: float,
  sample_rate: int,
  *,
  mel_spec: audio_lib.MelSpec | None = None,
  max_offset: float = MAX_OFFSET,
  mode: str = "symmetric",
) -> dict[str, Any]:
  """The audio-video event offset of a batch of clips (lower is better).

  For clips of a data config `c`: fps = c.num_frames * c.sample_rate /
  c.num_samples, sample_rate = c.sample_rate, mel_spec =
  audio.MelSpec.from_config(c).

  Args:
    video: [N, T, H, W, 3], uint8 or float in [-1, 1].
    audio: waveforms float [N, S] or normalised log-mel float [N, F, L].
    fps: video frames per second.
    sample_rate: audio sample rate, Hz.
    mel_spec: log-mel frontend (`audio_onsets`).
    max_offset: cap on each event-onset distance, seconds.
    mode: `event_offset` mode.

  Returns:
    'desync': float, mean offset in seconds over the scored clips (NaN if none);
    'offsets': float64 [N] per-clip offsets, NaN for clips not scored;
    'num_clips', 'num_scored': int;
    'num_without_visual_events', 'num_without_audio_onsets': int, clips with
      nothing on that side (a clip with neither counts in both);
    'visual_times', 'audio_times': the detections, N float64 arrays each.
  """
  n_video, n_audio = np.shape(video)[0], np.shape(audio)[0]
  if n_video != n_audio:
    raise ValueError(f"video has {n_video} clips but audio has {n_audio}.")
  visual = visual_events(video, fps)
  onsets = audio_onsets(audio, sample_rate, mel_spec=mel_spec)
  offsets = event_offset(visual, onsets, max_offset=max_offset, mode=mode)
  scored = ~np.isnan(offsets)
  return {
    "desync": float(offsets[scored].mean()) if scored.any() else math.nan,
    "offsets": offsets,
    "num_clips": int(offsets.size),
    "num_scored": int(scored.sum()),
    "num_without_visual_events": sum(v.size == 0 for v in visual),
    "num_without_audio_onsets": sum(a.size == 0 for a in onsets),
    "visual_times": visual,
    "audio_times": onsets,
  }


# ----------------------------------------------------------------------------
# Scoring detections against ground truth.
# ----------------------------------------------------------------------------


def match_events(detected: ArrayLike, truth: ArrayLike, tolerance: float) -> tuple[int, int, int]:
  """One-to-one matching of one clip's detected and true event times.

  Equal times count once (several events may share a frame). Pairs are taken
  closest first, each at most `tolerance` apart.

  Args:
    detected: float [K] detected times (or frame indices).
    truth: float [M] true times, same unit.
    tolerance: >= 0, same unit.

  Returns:
    (true positives, false positives, false negatives).
  """
  tolerance = _check_number("tolerance", tolerance, 0.0, math.inf)
  d = np.unique(_times("detected", detected))
  t = np.unique(_times("truth", truth))
  dist = np.abs(d[:, None] - t[None, :])
  used_d, used_t = set(), set()
  for flat in np.argsort(dist, axis=None, kind="stable"):
    i, j = np.unravel_index(flat, dist.shape)
    if dist[i, j] > tolerance:
      break
    if i not in used_d and j not in used_t:
      used_d.add(i)
      used_t.add(j)
  tp = len(used_d)
  return tp, d.size - tp, t.size - tp


def detection_scores(
  detected: Sequence[ArrayLike], truth: Sequence[ArrayLike], tolerance: float
) -> dict[str, float]:
  """Precision and recall of detections over a batch (`match_events` per clip).

  Returns:
    'precision', 'recall' (NaN when undefined), 'true_positives',
    'false_positives', 'false_negatives'.
  """
  if len(detected) != len(truth):
    raise ValueError(f"detected has {len(detected)} clips but truth has {len(truth)}.")
  tp = fp = fn = 0
  for d, t in zip(detected, truth, strict=True):
    a, b, c = match_events(d, t, tolerance)
    tp, fp, fn = tp + a, fp + b, fn + c
  return {
    "precision": tp / (tp + fp) if tp + fp else math.nan,
    "recall": tp / (tp + fn) if tp + fn else math.nan,
    "true_positives": tp,
    "false_positives": fp,
    "false_negatives": fn,
  }


def _check_number(name: str, value: Any, lo: float, hi: float, positive: bool = False) -> float:
  """float(value), which must be finite, in [lo, hi], and > 0 if `positive`."""
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number, got {value!r}.") from None
  if not (math.isfinite(v) and lo <= v <= hi) or (positive and v <= 0):
    bound = "a positive finite number" if positive else f"a finite number in [{lo}, {hi}]"
    raise ValueError(f"{name} must be {bound}, got {value!r}.")
  return v
