"""The built-in sounding-video data: procedural clips whose events are heard where seen.

Each clip shows 1-3 moving objects of one class on a desaturated background.
The class fixes what the objects look like (shape, colour hue, texture) and
what they sound like (timbre, pitch band, decay); see `class_styles`. Every
event -- an object bouncing off a side wall or the ceiling ('bounce'), hitting
the floor ('impact') or appearing ('appear') -- happens at a frame instant k
(time k / fps):

* bounce/impact: the object touches the border in frame k (its extreme point
  is pushed `_CONTACT_OVERLAP` px past the wall, like a squash) and moves away
  after. In every other frame it keeps at least `_WALL_MARGIN` px from every
  wall, so "touches a border" and "has a wall event" are the same thing.
* appear: the object is absent in frame k - 1 and present in frame k.
* the event's sound starts exactly at sample k * samples_per_frame (nothing of
  it before) with a 1.5 ms attack.

Motion is simulated on the frame grid (positions are only defined at frame
instants), which is what makes the timing exact even at the paper's ~3.6 fps.

Variety: backgrounds (flat, linear or radial gradients, smooth value noise,
tiles, static grain; random low-saturation colours), object count (1-3), sizes,
speeds, gravity (half the clips), colour shade and texture phase per object,
visual noise, loudness, background audio noise and, in half the clips, a
quiet class hum under the event sounds.

Ground truth for measurement: object colours are saturated (HSV saturation
>= 0.75 away from their anti-aliased edges) and backgrounds are not (<= 0.2
before the visual noise), so objects can be found from pixels alone;
`generate(..., with_ground_truth=True)` also returns per-frame boxes.

Everything is deterministic in (seed, index): one `np.random.default_rng([seed,
index])` feeds the whole clip; no global random state, no clock.

Command line (writes mp4 files with sound, labels.csv and events.json):

  python -m avtok_jax.data.synthetic --out DIR --num 16 [--seed 0] \
      [--preset paper] [--start_index 0] [--split train]
"""

from __future__ import annotations

import colorsys
import csv
import dataclasses
import fractions
import functools
import json
import math
import os
import sys
from collections.abc import Sequence

import numpy as np

# Event kinds; `generate` returns them as int32 codes indexing this tuple.
EVENT_KINDS = ("appear", "bounce", "impact")
APPEAR, BOUNCE, IMPACT = 0, 1, 2
MAX_OBJECTS = 3

# Geometry of wall contact, in pixels (see the module docstring). The margin
# is larger than the anti-aliasing reach of the renderer (<= 0.5 px plus the
# sqrt(2) under-estimate of polygon distances at corners), so an object that is
# not in contact never colours a border pixel.
_WALL_MARGIN = 2.0
_CONTACT_OVERLAP = 1.5
# An object must leave the wall by more than the margin in the frame after a
# contact, so the slowest speed per axis is margin + overlap (+ slack).
_MIN_SPEED_PX = _WALL_MARGIN + _CONTACT_OVERLAP + 0.5

# Pixel values are kept inside [_LO, _HI] before the visual noise (amplitude
# <= _LO) is added, so uint8 addition never wraps.
_LO, _HI = 6.0, 249.0
_MAX_PIXEL_NOISE = 5

_ATTACK_S = 0.0015  # attack ramp of every event sound
_PEAK = 0.95  # the audio is scaled (never clipped) to peak at most here


class SyntheticSpecError(ValueError):
  """A `SyntheticSpec` or a `generate` argument that cannot produce valid clips."""


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """Sizes of the generated clips; the audio spans exactly the frames' window."""

  num_frames: int = 16
  height: int = 128
  width: int = 128
  sample_rate: int = 22050
  num_samples: int = 98304
  num_classes: int = 10

  def __post_init__(self):
    problems = []
    for name in ("num_frames", "height", "width", "sample_rate", "num_samples", "num_classes"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int | np.integer):
        problems.append(f"{name}={value!r} is not an integer")
    if problems:
      raise SyntheticSpecError("Invalid SyntheticSpec: " + "; ".join(problems) + ".")
    if self.num_frames < 2:
      problems.append(f"num_frames={self.num_frames} < 2 (an event needs a frame before it)")
    if min(self.height, self.width) < 24:
      problems.append(f"frames {self.height}x{self.width} are smaller than 24x24")
    # Class pitches reach ~2.6 kHz (with harmonics filtered at 0.45 * rate).
    if self.sample_rate < 8000:
      problems.append(f"sample_rate={self.sample_rate} Hz is below 8000 Hz")
    if self.num_samples < 1 or self.num_samples % max(self.num_frames, 1):
      problems.append(
        f"num_samples={self.num_samples} is not a positive multiple of num_frames="
        f"{self.num_frames} (each frame must span a whole number of samples)"
      )
    if self.num_classes < 1:
      problems.append(f"num_classes={self.num_classes} < 1")
    if problems:
      raise SyntheticSpecError("Invalid SyntheticSpec: " + "; ".join(problems) + ".")

  @classmethod
  def from_config(
    cls, data_config, *, height: int | None = None, width: int | None = None
  ) -> SyntheticSpec:
    """Reads the fields of `config_lib.data_config()`; height/width override the config."""
    return cls(
      num_frames=int(data_config.num_frames),
      height=int(data_config.height if height is None else height),
      width=int(data_config.width if width is None else width),
      sample_rate=int(data_config.sample_rate),
      num_samples=int(data_config.num_samples),
      num_classes=int(data_config.num_classes),
    )

  @property
  def samples_per_frame(self) -> int:
    return self.num_samples // self.num_frames

  @property
  def frame_rate(self) -> fractions.Fraction:
    """Exact frames per second (e.g. 16 * 22050 / 98304 = 11025/3072)."""
    return fractions.Fraction(self.num_frames * self.sample_rate, self.num_samples)

  @property
  def fps(self) -> float:
    return self.num_frames * self.sample_rate / self.num_samples

  @property
  def duration(self) -> float:
    """Clip length in seconds (the same for frames and audio)."""
    return self.num_samples / self.sample_rate


# ----------------------------------------------------------------------------
# Classes: look and sound.
# ----------------------------------------------------------------------------

SHAPES = (
  "circle",
  "square",
  "triangle",
  "diamond",
  "star",
  "ring",
  "cross",
  "hexagon",
  "heart",
  "bar",
)
TEXTURES = ("solid", "stripes", "checker", "dots", "gradient", "rings")
TIMBRES = ("bell", "buzz", "pluck", "knock", "whistle", "tone", "saw", "hiss", "organ", "drum")

# Pitch ladder: ten centre pitches a factor 4/3 apart (160 Hz .. 2.1 kHz). An
# event's pitch stays within 7% of its class centre (plus the whistle's 8%
# glide), so neighbouring rungs never overlap.
_PITCH_LADDER = tuple(160.0 * (4.0 / 3.0) ** i for i in range(10))

_COLOUR_NAMES = (
  ("red", 0.0),
  ("orange", 30.0),
  ("yellow", 56.0),
  ("lime", 90.0),
  ("green", 130.0),
  ("teal", 170.0),
  ("sky", 200.0),
  ("blue", 232.0),
  ("violet", 272.0),
  ("magenta", 310.0),
)

# The hand-made classes: every attribute differs between any two of them.
# (colour, shape, name used for the shape, texture, timbre, pitch rung, decay)
# decay = time constant of the event sound in frame periods.
_HAND_MADE = (
  ("red", "circle", "ball", "solid", "bell", 6, 0.18),
  ("orange", "square", "box", "stripes", "buzz", 1, 0.10),
  ("yellow", "triangle", "triangle", "checker", "pluck", 3, 0.14),
  ("lime", "diamond", "diamond", "dots", "knock", 5, 0.08),
  ("green", "star", "star", "gradient", "whistle", 8, 0.12),
  ("teal", "ring", "ring", "stripes", "tone", 4, 0.15),
  ("sky", "cross", "cross", "checker", "saw", 7, 0.10),
  ("blue", "hexagon", "hexagon", "dots", "hiss", 9, 0.09),
  ("violet", "heart", "heart", "rings", "organ", 2, 0.16),
  ("magenta", "bar", "bar", "gradient", "drum", 0, 0.12),
)


@dataclasses.dataclass(frozen=True)
class ClassStyle:
  """What one class looks and sounds like."""

  name: str
  hue: float  # in [0, 1)
  shape: str
  texture: str
  timbre: str
  pitch: float  # centre pitch in Hz
  decay: float  # event-sound time constant, in frame periods


def _colour_name(hue_deg: float) -> str:
  dist = [min(abs(hue_deg - h), 360 - abs(hue_deg - h)) for _, h in _COLOUR_NAMES]
  return _COLOUR_NAMES[int(np.argmin(dist))][0]


@functools.lru_cache(maxsize=16)
def class_styles(num_classes: int = 10) -> tuple[ClassStyle, ...]:
  """The first `num_classes` class styles; the first ten are hand-made.

  Beyond ten, class i = 10 q + s gets shape s and the first (timbre, texture)
  pair, walking from (timbre s + q, texture s + 2 q), that no earlier class of
  that shape uses. Each shape has 60 such pairs, so (shape, timbre, texture) is
  unique for the first 600 classes (VGGSound has 309). Hues step by the golden
  angle and pitches walk the ladder (shifted by a third of an octave every 30
  q), so classes also differ in colour and pitch from their neighbours. Class i
  depends only on classes < i: asking for more classes never changes earlier
  ones.
  """
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
    raise SyntheticSpecError(f"num_classes must be an integer >= 1, got {num_classes!r}.")
  styles = []
  hues = dict(_COLOUR_NAMES)
  used = set()
  for i in range(num_classes):
    if i < len(_HAND_MADE):
      colour, shape, shape_word, texture, timbre, rung, decay = _HAND_MADE[i]
      hue_deg = hues[colour]
      name = f"{colour}_{shape_word}_{timbre}"
      pitch = _PITCH_LADDER[rung]
    else:
      q, s = divmod(i, 10)
      shape = SHAPES[s]
      for d in range(10 * len(TEXTURES)):  # all (timbre, texture) pairs; past 600 repeats
        timbre = TIMBRES[(s + q + d) % 10]
        texture = TEXTURES[(s + 2 * q + d // 10) % len(TEXTURES)]
        if (shape, timbre, texture) not in used:
          break
      hue_deg = (i * 137.50776) % 360.0  # golden angle
      pitch = _PITCH_LADDER[(3 * s + 7 * q) % 10] * 2.0 ** (((q // 30) % 3 - 1) / 3)
      decay = 0.08 + 0.1 * ((i * 0.618034) % 1.0)
      name = f"c{i:04d}_{_colour_name(hue_deg)}_{shape}_{texture}_{timbre}"
    used.add((shape, timbre, texture))
    styles.append(
      ClassStyle(
        name=name,
        hue=hue_deg / 360.0,
        shape=shape,
        texture=texture,
        timbre=timbre,
        pitch=pitch,
        decay=decay,
      )
    )
  return tuple(styles)


def class_names(num_classes: int = 10) -> tuple[str, ...]:
  """Stable human-readable class names, e.g. 'red_ball_bell'."""
  return tuple(s.name for s in class_styles(num_classes))


# ----------------------------------------------------------------------------
# Shapes: signed distance functions in object coordinates (unit size).
# ----------------------------------------------------------------------------


def _regular_polygon(n: int, radius: float, start_deg: float = -90.0) -> np.ndarray:
  a = np.deg2rad(start_deg) + 2 * np.pi * np.arange(n) / n
  return np.stack([radius * np.cos(a), radius * np.sin(a)], axis=1)


def _rect(hx: float, hy: float) -> np.ndarray:
  return np.array([[-hx, -hy], [hx, -hy], [hx, hy], [-hx, hy]])


def _star_pieces(outer: float, inner: float) -> list[np.ndarray]:
  tips = _regular_polygon(5, outer)
  valleys = _regular_polygon(5, inner, start_deg=-90.0 + 36.0)
  pieces = [valleys]  # the inner pentagon ...
  for i in range(5):  # ... plus one triangle per tip
    pieces.append(np.stack([tips[i], valleys[i], valleys[i - 1]]))
  return pieces


def _half_planes(vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Outward unit normals n and offsets c of a convex polygon: inside <=> n.p <= c."""
  centre = vertices.mean(axis=0)
  edges = np.roll(vertices, -1, axis=0) - vertices
  normals = np.stack([edges[:, 1], -edges[:, 0]], axis=1)
  normals /= np.linalg.norm(normals, axis=1, keepdims=True)
  offsets = np.sum(normals * vertices, axis=1)
  flip = np.sum(normals * centre, axis=1) > offsets  # centre must be inside
  normals[flip] *= -1
  offsets[flip] *= -1
  return normals, offsets


_POLYGON_PIECES = {
  "square": [_rect(0.8, 0.8)],
  "triangle": [_regular_polygon(3, 1.05)],
  "diamond": [np.array([[0.0, -1.0], [0.62, 0.0], [0.0, 1.0], [-0.62, 0.0]])],
  "star": _star_pieces(1.05, 0.45),
  "cross": [_rect(0.95, 0.32), _rect(0.32, 0.95)],
  "hexagon": [_regular_polygon(6, 0.95, start_deg=0.0)],
  "bar": [_rect(1.0, 0.42)],
}
_HALF_PLANES = {k: [_half_planes(p) for p in v] for k, v in _POLYGON_PIECES.items() if k != "heart"}
_CIRCLE_R = 0.9
_RING_R = (0.55, 0.95)
# A heart: two discs (centre x, centre y, radius) and the triangle below them.
# Every piece is convex and fat, so the union has no hair-thin tips that a
# wall contact could hide.
_HEART_DISCS = ((-0.42, -0.3, 0.5), (0.42, -0.3, 0.5))
_POLYGON_PIECES["heart"] = [np.array([[-0.86, -0.12], [0.86, -0.12], [0.0, 0.95]])]
_HEART_HALF_PLANES = _half_planes(_POLYGON_PIECES["heart"][0])


def _circle_points(radius: float, centre=(0.0, 0.0), n: int = 720) -> np.ndarray:
  a = 2 * np.pi * np.arange(n) / n
  return np.stack([centre[0] + radius * np.cos(a), centre[1] + radius * np.sin(a)], axis=1)


def _outline(shape: str) -> np.ndarray:
  """Points whose extremes in every direction are the shape's extremes."""
  if shape == "heart":
    discs = [_circle_points(r, (x, y)) for x, y, r in _HEART_DISCS]
    return np.concatenate([*discs, *_POLYGON_PIECES["heart"]])
  if shape in _POLYGON_PIECES:
    return np.concatenate(_POLYGON_PIECES[shape])  # extremes of a union lie on vertices
  if shape == "circle":
    return _circle_points(_CIRCLE_R)
  if shape == "ring":
    return _circle_points(_RING_R[1])
  raise SyntheticSpecError(f"Unknown shape {shape!r}; known: {SHAPES}.")


_OUTLINES = {s: _outline(s) for s in SHAPES}


def _outer(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[n, size] x-terms and [n, size] y-terms -> [n, size(y), size(x)] sums."""
  return b[:, :, None] + a[:, None, :]


def _convex_sdf(half_planes, dx, dy, cos, sin, radius) -> np.ndarray:
  # Max over edges of the distance to the edge line: exact inside and along
  # edges, an under-estimate (by at most a factor sqrt(2) at right angles) near
  # outside corners. Each distance is linear in the pixel offsets, so it is
  # an outer sum of two small per-axis terms (two passes over the window).
  normals, offsets = half_planes
  d = None
  for (nx, ny), c in zip(normals, offsets, strict=True):
    # n . R(-angle) (dx, dy) / r, in pixels: rotate the normal instead.
    ax, ay = nx * cos - ny * sin, nx * sin + ny * cos
    term = _outer(ax * dx, ay * dy - c * radius)
    d = term if d is None else np.maximum(d, term, out=d)
  return d


def _disc_sdf(x, y, r, dx, dy, cos, sin, radius) -> np.ndarray:
  # Distance to a disc centred at (x, y) in object units, in pixels.
  cx, cy = radius * (cos * x - sin * y), radius * (sin * x + cos * y)
  return np.sqrt(_outer((dx - cx) ** 2, (dy - cy) ** 2)) - r * radius


def _sdf(shape: str, dx, dy, cos: float, sin: float, radius: float) -> np.ndarray:
  """Signed distance in pixels (negative inside) over a window [n, size, size].

  dx, dy: [n, size] offsets of the window's pixel centres from the object's
  centre; the object is rotated by the angle with the given cos/sin and
  scaled by `radius`.
  """
  args = (dx, dy, cos, sin, radius)
  if shape in _HALF_PLANES:
    out = _convex_sdf(_HALF_PLANES[shape][0], *args)
    for piece in _HALF_PLANES[shape][1:]:
      np.minimum(out, _convex_sdf(piece, *args), out=out)
    return out
  if shape == "heart":
    out = _convex_sdf(_HEART_HALF_PLANES, *args)
    for x, y, r in _HEART_DISCS:
      np.minimum(out, _disc_sdf(x, y, r, *args), out=out)
    return out
  if shape == "circle":
    return _disc_sdf(0.0, 0.0, _CIRCLE_R, *args)
  if shape == "ring":
    rho = _disc_sdf(0.0, 0.0, 0.0, *args)
    return np.maximum(rho - _RING_R[1] * radius, _RING_R[0] * radius - rho)
  raise SyntheticSpecError(f"Unknown shape {shape!r}; known: {SHAPES}.")


def _texture(texture: str, u: np.ndarray, v: np.ndarray, phase: float) -> np.ndarray | None:
  """Mix weight of the second colour, in [0, 1] (None = solid)."""
  if texture == "solid":
    return None
  if texture == "stripes":
    return (np.sin(2 * np.pi * 1.6 * (u + 0.5 * v) + phase) > 0).astype(np.float32)
  if texture == "checker":
    return ((np.floor(u * 2.2 + phase) + np.floor(v * 2.2)) % 2).astype(np.float32)
  if texture == "dots":
    fu = (u * 1.8 + phase) % 1.0 - 0.5
    fv = (v * 1.8) % 1.0 - 0.5
    return (fu * fu + fv * fv < 0.09).astype(np.float32)
  if texture == "gradient":
    return np.clip(0.5 + 0.5 * (u + v) * 0.75, 0.0, 1.0).astype(np.float32)
  if texture == "rings":
    return (np.sin(2 * np.pi * 2.2 * np.hypot(u, v) + phase) > 0).astype(np.float32)
  raise SyntheticSpecError(f"Unknown texture {texture!r}; known: {TEXTURES}.")


# ----------------------------------------------------------------------------
# Scene: objects moving on the frame grid, and their events.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Object:
  radius: float  # pixels per object unit
  angle: float  # radians; constant, so the extents are constant
  ext: np.ndarray  # [left, right, top, bottom] distance from centre to the extreme
  colour1: np.ndarray  # RGB in [0, 1]
  colour2: np.ndarray
  texture_phase: float
  start: int = 0
  pos: np.ndarray | None = None  # [T, 2] (x, y); NaN while absent
  events: list | None = None  # (frame, kind, normal speed in px/frame)


@dataclasses.dataclass
class _Scene:
  objects: list
  events: list  # (frame, kind, object index, loudness in [0, 1])
  size_norm: list  # per object: 0 = smallest radius, 1 = largest


def _extents(radius: float, angle: float, shape: str) -> np.ndarray:
  c, s = math.cos(angle), math.sin(angle)
  p = _OUTLINES[shape]
  x = radius * (c * p[:, 0] - s * p[:, 1])
  y = radius * (s * p[:, 0] + c * p[:, 1])
  return np.array([-x.min(), x.max(), -y.min(), y.max()])


def _wall_step(x, v, lo, hi, margin, overlap, vmin):
  """One axis of one frame step: returns (x, v, wall) with wall -1/0/+1."""
  if x - lo < margin:
    return lo - overlap, max(abs(v), vmin), -1
  if hi - x < margin:
    return hi + overlap, -max(abs(v), vmin), 1
  return x, v, 0


def _simulate(obj, spec, start, pos0, vel0, gravity, rebound, vmin, vmax):
  """Moves one object from frame `start`; fills obj.pos and obj.events.

  Each axis moves by its velocity per frame; a position that would come
  closer than the margin to a wall (or cross it) is replaced by the contact
  position and the velocity turns away from that wall: a bounce (an impact on
  the floor) in exactly that frame.
  """
  t_frames = spec.num_frames
  el, er, et, eb = obj.ext
  xlo, xhi = el, spec.width - er  # allowed centre range (contact at the ends)
  ylo, yhi = et, spec.height - eb
  pos = np.full((t_frames, 2), np.nan)
  events = []
  x, y = pos0
  vx, vy = vel0
  pos[start] = (x, y)
  if start > 0:
    events.append((start, APPEAR, 0.0))
  for k in range(start + 1, t_frames):
    vy = float(np.clip(vy + gravity, -vmax, vmax))
    x_new, vx_new, wall_x = _wall_step(x + vx, vx, xlo, xhi, _WALL_MARGIN, _CONTACT_OVERLAP, vmin)
    y_new, vy_new, wall_y = _wall_step(y + vy, vy, ylo, yhi, _WALL_MARGIN, _CONTACT_OVERLAP, vmin)
    if wall_y == 1 and gravity > 0:
      # Rebound fast enough to stay in the air for a few frames (flight time
      # ~ 2 v / g) rather than hitting the floor in every frame.
      vy_new = -max(rebound * abs(vy), vmin, 2.5 * gravity)
    if wall_x:
      events.append((k, BOUNCE, abs(vx)))
    if wall_y:
      events.append((k, IMPACT if wall_y == 1 else BOUNCE, abs(vy)))
    x, y, vx, vy = x_new, y_new, vx_new, vy_new
    pos[k] = (x, y)
  obj.start, obj.pos, obj.events = start, pos, events


def _box(obj, k):
  x, y = obj.pos[k]
  el, er, et, eb = obj.ext
  return x - el, y - et, x + er, y + eb


def _overlap_area(a, b) -> float:
  w = min(a[2], b[2]) - max(a[0], b[0])
  h = min(a[3], b[3]) - max(a[1], b[1])
  return max(w, 0.0) * max(h, 0.0)


def _spawn(rng, obj, spec, others, frames):
  """A start position keeping a margin from the walls and, if possible, off others."""
  el, er, et, eb = obj.ext
  pad = _WALL_MARGIN + 1.0
  best, best_cost = None, math.inf
  for _ in range(24):
    x = rng.uniform(el + pad, spec.width - er - pad)
    y = rng.uniform(et + pad, spec.height - eb - pad)
    box = (x - el, y - et, x + er, y + eb)
    cost = sum(
      _overlap_area(box, _box(o, k))
      for o in others
      for k in frames
      if 0 <= k < spec.num_frames and not np.isnan(o.pos[k, 0])
    )
    if cost < best_cost:
      best, best_cost = (x, y), cost
    if cost == 0:
      break
  return best


def _make_scene(spec: SyntheticSpec, style: ClassStyle, rng: np.random.Generator) -> _Scene:
  size = min(spec.height, spec.width)
  # Radii scale with the frame, but not below ~4 px: smaller shapes are blobs.
  r_lo = max(0.09 * size, min(4.0, 0.125 * size))
  r_hi = max(0.17 * size, 1.4 * r_lo)
  vmin = max(_MIN_SPEED_PX, 0.05 * size)
  vmax = max(vmin + 2.0, 0.28 * size)
  # After a contact an object must be able to leave the wall without reaching
  # the opposite one within a frame (reach <= 1.2 radii for every shape).
  free = size - 2 * 1.2 * r_hi
  vmax = min(vmax, free - 2 * (_WALL_MARGIN + _CONTACT_OVERLAP))
  if vmax < vmin:  # cannot happen for specs that pass validation (>= 24 px)
    raise SyntheticSpecError(f"Frames {spec.height}x{spec.width} leave no room to move.")
  # Gravity in half of the clips: things fall and hit the floor ('impact').
  gravity = rng.uniform(0.02, 0.05) * size if rng.random() < 0.5 else 0.0
  rebound = rng.uniform(0.75, 1.0)
  num_objects = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
  objects, size_norm, starts, vels = [], [], [], []
  for j in range(num_objects):
    u = rng.random()
    radius = r_lo + u * (r_hi - r_lo)
    angle = np.deg2rad(rng.uniform(-12.0, 12.0))
    hue = (style.hue + rng.uniform(-0.015, 0.015)) % 1.0
    sat = rng.uniform(0.85, 1.0)
    val = rng.uniform(0.75, 0.97)
    c1 = np.array(colorsys.hsv_to_rgb(hue, sat, val))
    c2 = np.array(colorsys.hsv_to_rgb(hue, sat, val * rng.uniform(0.45, 0.6)))
    if rng.random() < 0.5:
      c1, c2 = c2, c1
    obj = _Object(
      radius=radius,
      angle=angle,
      ext=_extents(radius, angle, style.shape),
      colour1=c1,
      colour2=c2,
      texture_phase=rng.uniform(0, 2 * np.pi),
    )
    # Objects present from the start are simulated first and drawn first, so
    # an appearing object is drawn on top of them.
    starts.append(0 if (j == 0 or rng.random() < 0.6) else int(rng.integers(1, spec.num_frames)))
    speed = rng.uniform(vmin, vmax, size=2) * rng.choice([-1.0, 1.0], size=2)
    vels.append(speed)
    objects.append(obj)
    size_norm.append(u)
  order = np.argsort(starts, kind="stable")
  objects = [objects[i] for i in order]
  size_norm = [size_norm[i] for i in order]
  starts = [starts[i] for i in order]
  vels = [vels[i] for i in order]
  for j, obj in enumerate(objects):
    pos0 = _spawn(rng, obj, spec, objects[:j], (starts[j] - 1, starts[j]) if starts[j] else ())
    _simulate(obj, spec, starts[j], pos0, vels[j], gravity, rebound, vmin, vmax)
  if not any(o.events for o in objects):
    # Too short or too slow for a wall: the last object appears mid-clip instead,
    # so every clip has at least one event.
    start = int(rng.integers(1, spec.num_frames))
    obj = objects[-1]
    pos0 = _spawn(rng, obj, spec, objects[:-1], (start - 1, start))
    _simulate(obj, spec, start, pos0, vels[-1], gravity, rebound, vmin, vmax)
  events = []
  for j, obj in enumerate(objects):
    for frame, kind, speed in obj.events:
      loud = 1.0 if kind == APPEAR else min(speed / vmax, 1.0)
      events.append((frame, kind, j, loud))
  events.sort(key=lambda e: (e[0], e[2], e[1]))
  return _Scene(objects=objects, events=events, size_norm=size_norm)


# ----------------------------------------------------------------------------
# Video.
# ----------------------------------------------------------------------------


def _to_pixel(rgb: np.ndarray) -> np.ndarray:
  """[0, 1] colour -> float pixel value inside [_LO, _HI]."""
  return _LO + np.asarray(rgb, np.float32) * (_HI - _LO)


def _background(spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
  """A static desaturated background (float32 [H, W, 3] in [0, 1])."""
  h, w = spec.height, spec.width

  def colour():
    return np.array(
      colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.2), rng.uniform(0.3, 0.85)),
      np.float32,
    )

  c1, c2 = colour(), colour()
  yy = (np.arange(h, dtype=np.float32)[:, None] + 0.5) / h
  xx = (np.arange(w, dtype=np.float32)[None, :] + 0.5) / w
  kind = rng.integers(5)
  if kind == 0:  # flat
    mix = np.zeros((h, w), np.float32)
  elif kind == 1:  # linear gradient at a random angle
    a = rng.uniform(0, 2 * np.pi)
    g = np.cos(a) * (xx - 0.5) + np.sin(a) * (yy - 0.5)
    mix = (g - g.min()) / max(float(g.max() - g.min()), 1e-6)
  elif kind == 2:  # radial gradient
    cx, cy = rng.uniform(0.2, 0.8, size=2)
    g = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    mix = g / float(g.max())
  elif kind == 3:  # smooth value noise (bilinear upsampling of a coarse grid)
    gh, gw = rng.integers(3, 9, size=2)
    grid = rng.random((gh + 1, gw + 1)).astype(np.float32)
    gy, gx = yy[:, 0] * gh, xx[0] * gw
    iy, ix = np.minimum(gy.astype(int), gh - 1), np.minimum(gx.astype(int), gw - 1)
    fy, fx = (gy - iy)[:, None], (gx - ix)[None, :]
    top = grid[iy][:, ix] * (1 - fx) + grid[iy][:, ix + 1] * fx
    bot = grid[iy + 1][:, ix] * (1 - fx) + grid[iy + 1][:, ix + 1] * fx
    mix = top * (1 - fy) + bot * fy
  else:  # low-contrast tiles
    n = rng.integers(2, 7)
    mix = ((np.floor(xx * n) + np.floor(yy * n)) % 2).astype(np.float32) * 0.6
  mix = np.broadcast_to(mix, (h, w))[..., None]
  bg = c1 * (1 - mix) + c2 * mix
  if rng.random() < 0.5:  # fine static grain, brightness only
    bg = bg * rng.uniform(0.93, 1.07, size=(h, w, 1)).astype(np.float32)
  return np.clip(bg, 0.0, 1.0)


def _render_video(
  spec: SyntheticSpec, style: ClassStyle, scene: _Scene, rng: np.random.Generator
) -> np.ndarray:
  t_frames, h, w = spec.num_frames, spec.height, spec.width
  bg = np.rint(_to_pixel(_background(spec, rng))).astype(np.uint8)
  video = np.repeat(bg[None], t_frames, axis=0)
  reach = float(np.max(np.hypot(*_OUTLINES[style.shape].T)))
  for obj in scene.objects:
    # Each object is drawn in a square window around it, all frames at once.
    frames = np.arange(obj.start, t_frames)
    cx, cy = obj.pos[frames, 0], obj.pos[frames, 1]
    half = int(math.ceil(obj.radius * reach)) + 2
    size = 2 * half + 1
    ox = np.floor(cx).astype(int) - half
    oy = np.floor(cy).astype(int) - half
    offs = np.arange(size, dtype=np.float32) + 0.5
    dx = ((ox[:, None] + offs) - cx[:, None]).astype(np.float32)  # [n, size]
    dy = ((oy[:, None] + offs) - cy[:, None]).astype(np.float32)
    cos, sin = math.cos(obj.angle), math.sin(obj.angle)
    # Anti-aliasing: coverage falls from 1 to 0 over one pixel across the edge.
    alpha = _sdf(style.shape, dx, dy, cos, sin, obj.radius)
    np.subtract(0.5, alpha, out=alpha)
    np.clip(alpha, 0.0, 1.0, out=alpha)
    if style.texture == "solid":
      mix = None
    else:  # object coordinates (rotated, in radii) for the texture
      inv_r = 1.0 / obj.radius
      u = _outer((cos * inv_r) * dx, (sin * inv_r) * dy)
      v = _outer((-sin * inv_r) * dx, (cos * inv_r) * dy)
      mix = alpha * _texture(style.texture, u, v, obj.texture_phase)
    # Premultiplied colour plus 0.5 (the truncating uint8 cast then rounds to
    # nearest), built per channel: numpy broadcasts over a trailing axis of 3
    # slowly.
    p1, p2 = _to_pixel(obj.colour1), _to_pixel(obj.colour2)
    channels = []
    for ch in range(3):
      colour = alpha * p1[ch] + 0.5
      if mix is not None:
        colour += mix * (p2[ch] - p1[ch])
      channels.append(colour)
    colour = np.stack(channels, axis=-1)
    keep = np.repeat(1.0 - alpha, 3).reshape(colour.shape)
    # out = (1 - alpha) * under + alpha * colour; the loop only cuts each
    # frame's window at the frame border.
    for i, k in enumerate(frames):
      y0, x0 = max(oy[i], 0), max(ox[i], 0)
      y1, x1 = min(oy[i] + size, h), min(ox[i] + size, w)
      if y0 >= y1 or x0 >= x1:
        continue
      win = (i, slice(y0 - oy[i], y1 - oy[i]), slice(x0 - ox[i], x1 - ox[i]))
      under = video[k, y0:y1, x0:x1]
      video[k, y0:y1, x0:x1] = (under * keep[win] + colour[win]).astype(np.uint8)
  # Visual noise (brightness only): values lie in [_LO, _HI], so adding a
  # small signed offset as wrapped uint8 is exact. Random bytes mapped through
  # a table are several times cheaper than rng.integers.
  amp = int(rng.integers(0, _MAX_PIXEL_NOISE + 1))
  if amp:
    table = ((np.arange(256) % (2 * amp + 1)) - amp).astype(np.int8).view(np.uint8)
    noise = np.take(table, np.frombuffer(rng.bytes(t_frames * h * w), np.uint8))
    video += np.repeat(noise, 3).reshape(video.shape)
  return video


# ----------------------------------------------------------------------------
# Audio.
# ----------------------------------------------------------------------------


def _harmonics(theta: np.ndarray, f: float, sr: int, amps, decays=None, t=None) -> np.ndarray:
  """sum_n amps[n-1] * sin(n * theta) for the harmonics n below 0.45 * sr.

  sin(n x) comes from the Chebyshev recurrence sin((n+1)x) = 2 cos(x) sin(nx) -
  sin((n-1)x), which costs two multiply-adds per harmonic instead of a sine.
  """
  s_prev = np.zeros_like(theta)
  s_cur = np.sin(theta)
  two_cos = 2 * np.cos(theta)
  out = np.zeros_like(theta)
  for n, amp in enumerate(amps, start=1):
    if n * f >= 0.45 * sr:
      break
    if amp:
      part = amp * s_cur
      if decays is not None:
        part *= np.exp(-t / decays[n - 1])
      out += part
    s_prev, s_cur = s_cur, two_cos * s_cur - s_prev
  return out


def _timbre(timbre: str, f: float, t: np.ndarray, tau: float, sr: int, rng) -> np.ndarray:
  """One event sound at pitch f with its decay envelope (not yet normalised)."""
  env = np.exp(-t / np.float32(tau))
  theta = (2 * np.pi * f) * t
  if timbre == "tone":
    return env * _harmonics(theta, f, sr, (1.0, 0.2))
  if timbre == "bell":  # Chowning FM, inharmonic ratio 1.41, decaying index
    # Index <= 1.2 keeps the carrier dominant (Bessel J0(1.2) = 0.67 > J1(1.2) =
    # 0.50), so the spectral peak stays at the class pitch.
    index = 1.2 * np.exp(-t / np.float32(0.5 * tau))
    return env * np.sin(theta + index * np.sin(np.float32(1.41) * theta))
  if timbre == "buzz":  # square-like: odd harmonics at 1/n
    return env * _harmonics(theta, f, sr, (1.0, 0.0, 1 / 3, 0.0, 1 / 5, 0.0, 1 / 7, 0.0, 1 / 9))
  if timbre == "saw":
    return env * _harmonics(theta, f, sr, [(-1.0) ** (n + 1) / n for n in range(1, 9)])
  if timbre == "organ":
    return env * _harmonics(theta, f, sr, (1.0, 0.5, 0.35, 0.2))
  if timbre == "pluck":  # higher harmonics die faster
    n = np.arange(1, 7)
    return _harmonics(theta, f, sr, 1.0 / n, decays=np.float32(tau) / n, t=t)
  if timbre == "knock":  # modes of a free-free uniform bar (Euler-Bernoulli): 1, 2.76, 5.40
    out = np.zeros_like(t)
    for ratio, amp, d in ((1.0, 1.0, 1.0), (2.76, 0.5, 0.5), (5.40, 0.25, 0.25)):
      if ratio * f < 0.45 * sr:
        out += amp * np.exp(-t / np.float32(tau * d)) * np.sin(np.float32(ratio) * theta)
    return out
  if timbre == "whistle":  # upward glide 0.96 f -> 1.04 f
    inst = f * (0.96 + 0.08 * (1 - env))
    return env * np.sin((2 * np.pi / sr) * np.cumsum(inst, dtype=np.float64)).astype(np.float32)
  if timbre == "drum":  # fast pitch drop onto f
    inst = f * (1.0 + 0.8 * np.exp(-t / np.float32(0.1 * tau)))
    return env * np.sin((2 * np.pi / sr) * np.cumsum(inst, dtype=np.float64)).astype(np.float32)
  if timbre == "hiss":  # noise through a resonance at f (Q = 12), shaped in the spectrum
    noise = np.fft.rfft(rng.standard_normal(t.size))
    freqs = np.fft.rfftfreq(t.size, 1.0 / sr)
    noise /= np.sqrt(1.0 + (24.0 * (freqs - f) / f) ** 2)  # |H| of a resonator, Q = 12
    return env * np.fft.irfft(noise, t.size).astype(np.float32)
  raise SyntheticSpecError(f"Unknown timbre {timbre!r}; known: {TIMBRES}.")


def _render_audio(
  spec: SyntheticSpec, style: ClassStyle, scene: _Scene, rng: np.random.Generator
) -> np.ndarray:
  sr, n, spf = spec.sample_rate, spec.num_samples, spec.samples_per_frame
  frame_period = spf / sr
  # Background: coloured noise (RMS <= 0.01) and, in half the clips, a quiet
  # class hum an octave below the class pitch with a slow swell (peak <=
  # 0.025). Together they stay ~20 dB under the quietest event (peak >= 0.3)
  # so that onsets remain clear. The noise: random bytes (uniform, cheaper
  # than Gaussian draws) low-passed by a moving average of random width
  # (width 1 = white).
  width = int(rng.integers(1, 17))
  noise = np.cumsum(np.frombuffer(rng.bytes(n + width), np.int8), dtype=np.float64)
  audio = noise[width:] - noise[:-width]
  # (np.dot would be faster alone, but it wakes BLAS threads that then spin and
  # slow the rest of the clip down.)
  audio *= rng.uniform(0.001, 0.01) / max(math.sqrt(np.mean(np.square(audio))), 1e-12)
  if rng.random() < 0.5:
    # float32 phases are accurate to ~1e-3 rad over a clip: plenty for a hum.
    theta = np.arange(n, dtype=np.float32) * np.float32(np.pi * style.pitch / sr)
    sin, cos = np.sin(theta), np.cos(theta)
    hum = sin * (1.0 + 0.6 * cos)  # sin(x) + 0.3 sin(2x)
    # The swell (< 1.5 Hz) is computed every 64 samples and held in between.
    rate, phase = rng.uniform(0.3, 1.5), rng.uniform(0, 2 * np.pi)
    coarse = np.arange(0, n, 64) * (2 * np.pi * rate / sr) + phase
    swell = np.repeat(1.0 + 0.3 * np.sin(coarse), 64)[:n]
    audio += rng.uniform(0.004, 0.015) * swell * hum
  clip_gain = rng.uniform(0.5, 1.0)
  attack = max(int(round(_ATTACK_S * sr)), 2)
  ramp = (np.arange(attack, dtype=np.float32) + 1.0) / attack  # first value is not 0
  base_tau = float(np.clip(style.decay * frame_period, 0.004, 0.25))
  click_len = int(math.ceil(0.012 * sr))
  cache = {}  # (object, kind) -> full-length normalised sound (not for noise timbres)
  for frame, kind, j, loud in scene.events:
    onset = frame * spf
    tau = base_tau * (1.4 if kind == APPEAR else 1.0)
    key = (j, kind == APPEAR)
    sound = cache.get(key)
    if sound is None:
      # Pitch: bigger objects sound lower, within +-7% of the class centre.
      f = style.pitch * 1.07 ** (1.0 - 2.0 * scene.size_norm[j])
      t = np.arange(int(math.ceil(6 * tau * sr)), dtype=np.float32) / np.float32(sr)
      sound = _timbre(style.timbre, f, t, tau, sr, rng)
      sound /= max(float(np.max(np.abs(sound))), 1e-9)
      sound[:attack] *= ramp[: sound.size]
      if style.timbre != "hiss":
        cache[key] = sound
    length = min(sound.size, n - onset)
    gain = clip_gain * (0.7 + 0.3 * loud) * {APPEAR: 0.85, BOUNCE: 1.0, IMPACT: 1.15}[kind]
    audio[onset : onset + length] += gain * sound[:length]
    if kind == IMPACT:  # a broadband knock on top of the tone
      m = min(click_len, length)
      t = np.arange(m, dtype=np.float32) / np.float32(sr)
      click = rng.uniform(-0.5, 0.5, m) * np.exp(-t / np.float32(0.002))
      click[: min(attack, m)] *= ramp[:m]
      audio[onset : onset + m] += gain * click
  peak = float(np.max(np.abs(audio)))
  if peak > _PEAK:
    audio *= _PEAK / peak
  return audio.astype(np.float32)


# ----------------------------------------------------------------------------
# Public entry point.
# ----------------------------------------------------------------------------


def generate(
  spec: SyntheticSpec,
  seed: int,
  index: int,
  *,
  label: int | None = None,
  with_ground_truth: bool = False,
  audio: bool = True,
) -> dict[str, np.ndarray | int | str]:
  """Generates clip `index` of the data set numbered by `seed`.

  Args:
    spec: clip sizes.
    seed: data set seed (>= 0).
    index: clip number (>= 0).
    label: class to draw; default `index % spec.num_classes` (balanced classes).
    with_ground_truth: also return 'object_boxes' float32 [T, MAX_OBJECTS, 4]
      (x0, y0, x1, y1 in pixels: the shape's exact extent clipped to the frame;
      NaN where the object is absent or does not exist) and 'event_objects'
      int32 [K] (which object each event belongs to).
    audio: False skips rendering the sound (more than half of the time of a
      clip) and returns silence; the video and everything else are the same
      (the sound is drawn last from the clip's generator).

  Returns:
    'video' uint8 [T, H, W, 3]; 'audio' float32 [num_samples], peak <= 0.95;
    'label' int; 'label_name' str; 'event_times' float32 [K] seconds (sorted);
    'event_frames' int32 [K]; 'event_kinds' int32 [K] indexing EVENT_KINDS.
    K >= 1. Several events may share a frame.
  """
  if not isinstance(spec, SyntheticSpec):
    raise SyntheticSpecError(f"spec must be a SyntheticSpec, got {type(spec).__name__}.")
  for name, value in (("seed", seed), ("index", index)):
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
      raise SyntheticSpecError(f"{name} must be an integer >= 0, got {value!r}.")
  if label is None:
    label = int(index) % spec.num_classes
  elif isinstance(label, bool) or not isinstance(label, int | np.integer):
    raise SyntheticSpecError(f"label must be an integer, got {label!r}.")
  if not 0 <= label < spec.num_classes:
    raise SyntheticSpecError(f"label={label} is outside [0, {spec.num_classes}).")
  style = class_styles(spec.num_classes)[label]
  rng = np.random.default_rng([int(seed), int(index)])
  scene = _make_scene(spec, style, rng)
  video = _render_video(spec, style, scene, rng)
  if audio:
    sound = _render_audio(spec, style, scene, rng)
  else:
    sound = np.zeros(spec.num_samples, np.float32)
  frames = np.array([e[0] for e in scene.events], np.int32)
  out = {
    "video": video,
    "audio": sound,
    "label": int(label),
    "label_name": style.name,
    # k * spf / sr, computed in float64 then stored as float32.
    "event_times": (frames.astype(np.float64) * spec.samples_per_frame / spec.sample_rate).astype(
      np.float32
    ),
    "event_frames": frames,
    "event_kinds": np.array([e[1] for e in scene.events], np.int32),
  }
  if with_ground_truth:
    boxes = np.full((spec.num_frames, MAX_OBJECTS, 4), np.nan, np.float32)
    for j, obj in enumerate(scene.objects):
      for k in range(obj.start, spec.num_frames):
        x0, y0, x1, y1 = _box(obj, k)
        boxes[k, j] = (max(x0, 0), max(y0, 0), min(x1, spec.width), min(y1, spec.height))
    out["object_boxes"] = boxes
    out["event_objects"] = np.array([e[2] for e in scene.events], np.int32)
  return out


# ----------------------------------------------------------------------------
# Command line: write clips as mp4 files with sound.
# ----------------------------------------------------------------------------


def _read_labels(path: str) -> dict[str, tuple[str, str]]:
  if not os.path.exists(path):
    return {}
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  if not rows or rows[0] != ["filename", "label", "split"]:
    raise ValueError(f"{path} exists but does not start with the header 'filename,label,split'.")
  return {r[0]: (r[1], r[2]) for r in rows[1:] if r}


def write_clips(
  out_dir: str,
  num: int,
  *,
  seed: int = 0,
  preset: str = "paper",
  start_index: int = 0,
  split: str = "train",
  num_classes: int | None = None,
  progress: bool = True,
) -> list[str]:
  """Writes clips start_index .. start_index + num - 1 as mp4 files with sound.

  Also writes (or updates, keeping other files' rows) `labels.csv` with header
  `filename,label,split` and `events.json` mapping each filename to its label
  and events. Returns the paths of the mp4 files.
  """
  # Imported here: the generator itself must stay light for Grain workers.
  import tqdm

  from avtok_jax import config_lib
  from avtok_jax.data import video_io

  if num < 0 or start_index < 0:
    raise ValueError(f"num={num} and start_index={start_index} must be >= 0.")
  config = config_lib.data_config(preset)
  if num_classes is not None:
    config.num_classes = num_classes
  spec = SyntheticSpec.from_config(config)
  os.makedirs(out_dir, exist_ok=True)
  labels_path = os.path.join(out_dir, "labels.csv")
  events_path = os.path.join(out_dir, "events.json")
  labels = _read_labels(labels_path)
  events = {}
  if os.path.exists(events_path):
    with open(events_path) as f:
      events = json.load(f)
  paths = []
  for index in tqdm.trange(start_index, start_index + num, desc="clips", disable=not progress):
    clip = generate(spec, seed, index)
    filename = f"{index:06d}_{clip['label_name']}.mp4"
    path = os.path.join(out_dir, filename)
    video_io.write_mp4(
      path, clip["video"], clip["audio"], fps=spec.frame_rate, sample_rate=spec.sample_rate
    )
    labels[filename] = (clip["label_name"], split)
    events[filename] = {
      "label": clip["label_name"],
      "label_id": clip["label"],
      "split": split,
      "seed": seed,
      "index": index,
      "fps": spec.fps,
      "sample_rate": spec.sample_rate,
      "event_times": [round(float(t), 6) for t in clip["event_times"]],
      "event_frames": [int(k) for k in clip["event_frames"]],
      "event_kinds": [EVENT_KINDS[int(c)] for c in clip["event_kinds"]],
    }
    paths.append(path)
  with open(labels_path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["filename", "label", "split"])
    for filename in sorted(labels):
      writer.writerow([filename, *labels[filename]])
  with open(events_path, "w") as f:
    json.dump(dict(sorted(events.items())), f, indent=1)
  return paths


def _flag_values():
  # A private FlagValues: importing this module must not register flags in the
  # global absl FLAGS that trainers and Grain workers parse.
  from absl import flags

  fv = flags.FlagValues()
  flags.DEFINE_string("out", None, "Output directory.", flag_values=fv)
  flags.DEFINE_integer("num", 16, "Number of clips to write.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Data set seed.", flag_values=fv)
  flags.DEFINE_enum("preset", "paper", ["tiny", "small", "paper"], "Clip size.", flag_values=fv)
  flags.DEFINE_integer("start_index", 0, "Index of the first clip.", flag_values=fv)
  flags.DEFINE_string("split", "train", "Split name written to labels.csv.", flag_values=fv)
  flags.DEFINE_integer("num_classes", 10, "Number of classes.", flag_values=fv)
  flags.DEFINE_boolean("help", False, "Show this help.", flag_values=fv)
  return fv


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; argv[0] is the program name."""
  from absl import flags

  fv = _flag_values()
  argv = list(sys.argv if argv is None else argv)
  try:
    fv(argv)
  except flags.Error as e:
    raise SystemExit(f"{e}\nRun with --help to list the flags.") from None
  if fv.help:
    print(
      "Writes built-in sounding-video clips as mp4 files with sound, plus labels.csv"
      " and events.json.\n\nFlags:\n" + fv.get_help()
    )
    return 0
  if not fv.out:
    raise SystemExit("--out DIR is required.")
  paths = write_clips(
    fv.out,
    fv.num,
    seed=fv.seed,
    preset=fv.preset,
    start_index=fv.start_index,
    split=fv.split,
    num_classes=fv.num_classes,
  )
  print(
    f"Wrote {len(paths)} clips ({fv.preset}, seed {fv.seed}, split {fv.split}) with "
    f"labels.csv and events.json to {fv.out}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
