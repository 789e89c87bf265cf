"""Reading and writing sounding videos (mp4/mkv/webm) with PyAV.

Reading decodes a whole file once into a `Media` on a fixed target grid
(frames at the target fps from t=0, centre-cropped and resized; mono audio at
the target sample rate on the same timeline) and `cut_clip` takes windows out
of it. Every failure of FFmpeg/PyAV is turned into a `MediaError` that names
the file and says what is wrong.

Timeline conventions (used by every function here):

* t = 0 is the presentation time of the first decoded video frame. Audio that
  starts before it is dropped; audio that starts after it is preceded by
  silence. Where the audio track does not cover the video (a missing lead-in
  or tail) the audio is silent, as a player would play it.
* Target frame i shows the source frame on screen at time i / fps: the last
  source frame whose timestamp is <= i / fps (the first frame if none).
* The video lasts from t = 0 to the end of the last decoded frame (its
  timestamp plus its duration). `Media.audio` covers that span plus 2 ms
  (containers that store milliseconds can put the end up to 1 ms early).
* A file is rejected (MediaError) when it cannot be opened, when FFmpeg
  reports corrupt data while decoding, or when far less video decodes than
  its header declares (a truncated file). A file that is merely short is
  not an error: `cut_clip` pads or raises ClipTooShortError on request.

Resampling choices: frames are centre-cropped to the target aspect ratio,
then resized with libswscale ('area' filter when shrinking, bicubic when
enlarging); audio channels are averaged to mono and resampled with soxr
('HQ' quality; soxr's whole-signal resampler compensates its own filter delay,
so the output stays aligned with the input).
"""

from __future__ import annotations

import dataclasses
import fractions
import logging
import math
import os
from collections.abc import Iterator

import av
import numpy as np
import soxr

PathLike = str | os.PathLike

# Container suffix -> (video codec, audio codec, pixel format). The native
# FFmpeg 'aac' encoder ships with PyAV's FFmpeg; Opus is the audio codec WebM
# allows besides Vorbis (which PyAV's FFmpeg cannot encode). Matroska gets
# float PCM: lossless and without encoder delay.
_CODECS = {
  ".mp4": ("libx264", "aac"),
  ".m4v": ("libx264", "aac"),
  ".mov": ("libx264", "aac"),
  ".mkv": ("libx264", "pcm_f32le"),
  ".webm": ("libvpx-vp9", "libopus"),
}
# libopus only accepts these rates (RFC 6716, section 2); other rates are
# resampled to 48 kHz before encoding.
_OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
# Timestamps closer than this are treated as equal when matching target frame
# times to source frame times (float error of rational time bases).
_TIME_EPS = 1e-6


class MediaError(ValueError):
  """A media file cannot be used; the message names the file and the problem."""


class ClipTooShortError(MediaError):
  """The requested clip window reaches past the end of the media."""


@dataclasses.dataclass(frozen=True)
class MediaInfo:
  """What `probe` finds in a file without decoding it."""

  path: str
  duration: float
  has_video: bool
  has_audio: bool
  fps: float | None
  width: int | None
  height: int | None
  sample_rate: int | None
  audio_channels: int | None


@dataclasses.dataclass
class Media:
  """A whole decoded file on the target grid.

  Attributes:
    frames: uint8 [T, H, W, 3]; frame i shows time i / fps.
    audio: float32 [N] mono at `sample_rate` covering [0, duration + 2 ms):
      N = round((duration + 0.002) * sample_rate). The extra 2 ms keeps the
      real samples a clip window may reach when a container rounds the video
      end down (see _END_TOLERANCE).
    fps: target frame rate.
    sample_rate: target audio rate.
    duration: seconds of video (t = 0 to the end of the last frame).
    path: the file it came from.
    has_audio: False when the file had no audio and silence was substituted.
  """

  frames: np.ndarray
  audio: np.ndarray
  fps: float
  sample_rate: int
  duration: float
  path: str
  has_audio: bool


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------


def _as_fraction(rate: float | fractions.Fraction, what: str) -> fractions.Fraction:
  """An exact rational for a rate; floats such as 3675/1024 convert exactly."""
  if isinstance(rate, fractions.Fraction):
    frac = rate
  else:
    if not math.isfinite(float(rate)):
      raise ValueError(f"{what} must be finite, got {rate!r}.")
    # limit_denominator turns e.g. 29.97002997 back into 30000/1001 and keeps
    # dyadic rates such as 3675/1024 exact.
    frac = fractions.Fraction(float(rate)).limit_denominator(1_000_000)
  if frac <= 0:
    raise ValueError(f"{what} must be positive, got {rate!r}.")
  return frac


def write_mp4(
  path: PathLike,
  frames: np.ndarray,
  audio: np.ndarray | None,
  fps: float | fractions.Fraction,
  sample_rate: int,
  *,
  crf: int = 18,
  audio_bitrate: int = 128_000,
  preset: str = "medium",
  faststart: bool = False,
  audio_start: float = 0.0,
) -> None:
  """Writes frames (and audio) to a video file; the codecs follow the suffix.

  .mp4/.m4v/.mov: H.264 (libx264, yuv420p) + AAC (FFmpeg's native encoder;
  its 1024-sample priming delay is recorded in the mp4 edit list, which the
  reader honours, so audio stays aligned). .mkv: H.264 + float PCM. .webm:
  VP9 + Opus (audio at a rate Opus does not support is resampled to 48 kHz).

  Args:
    path: output file; its suffix picks the container and codecs.
    frames: uint8 [T, H, W, 3] RGB. H and W must be even (yuv420p stores
      colour at half resolution); odd sizes raise instead of being padded, so
      what is read back has the size that was written.
    audio: float [N] mono or [N, C] (C = 1 or 2) in about [-1, 1], or None for
      a file without an audio track.
    fps: frame rate; non-integer rates are stored exactly as a fraction.
    sample_rate: audio sample rate in Hz.
    crf: constant rate factor of the video encoder (lower = better).
    audio_bitrate: bits per second for AAC/Opus (ignored for PCM).
    preset: libx264 speed preset.
    faststart: put the mp4 index in front of the data (streamable files).
    audio_start: seconds after the first frame at which the audio track
      starts (>= 0). .mkv/.webm store it as the audio stream's start time
      (to the container's 1 ms precision). .mp4 gets leading silence instead:
      FFmpeg's mp4 muxer writes a delayed AAC track about 1024 samples early
      (its edit list counts the encoder priming as part of the delay).
  """
  path = os.fspath(path)
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in _CODECS:
    raise ValueError(
      f"Cannot write {path!r}: unsupported suffix {suffix!r}; use one of {sorted(_CODECS)}."
    )
  frames = np.asarray(frames)
  if frames.dtype != np.uint8:
    raise ValueError(f"Cannot write {path!r}: frames must be uint8, got {frames.dtype}.")
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
    raise ValueError(
      f"Cannot write {path!r}: frames must have shape [T>0, H, W, 3], got {frames.shape}."
    )
  _, height, width, _ = frames.shape
  if height % 2 or width % 2:
    raise ValueError(
      f"Cannot write {path!r}: frame size {height}x{width} must be even in both "
      "dimensions (yuv420p stores colour at half resolution); crop or pad the frames."
    )
  rate = _as_fraction(fps, f"fps for {path!r}")
  if not (math.isfinite(audio_start) and audio_start >= 0):
    raise ValueError(f"Cannot write {path!r}: audio_start must be >= 0, got {audio_start!r}.")
  if audio is not None:
    audio = _check_audio_for_writing(path, audio, sample_rate)
  video_codec, audio_codec = _CODECS[suffix]
  if audio is not None and audio_start > 0 and audio_codec == "aac":
    lead = np.zeros((round(audio_start * sample_rate), audio.shape[1]), np.float32)
    audio, audio_start = np.concatenate([lead, audio]), 0.0

  options = {"movflags": "+faststart"} if faststart and suffix in (".mp4", ".m4v", ".mov") else {}
  try:
    with av.open(path, mode="w", options=options) as container:
      vstream = container.add_stream(video_codec, rate=rate)
      vstream.width, vstream.height = width, height
      vstream.pix_fmt = "yuv420p"
      vstream.time_base = 1 / rate
      if video_codec == "libx264":
        vstream.options = {"crf": str(crf), "preset": preset}
      else:
        # b=0 + crf is libvpx's constant-quality mode; 'good' + cpu-used 4
        # trades a little quality for a several-fold speed-up.
        vstream.options = {"crf": str(crf + 12), "b": "0", "deadline": "good", "cpu-used": "4"}

      astream = None
      audio_rate = sample_rate
      if audio is not None:
        if audio_codec == "libopus" and sample_rate not in _OPUS_RATES:
          audio = soxr.resample(audio, sample_rate, 48000, quality="HQ").astype(np.float32)
          audio_rate = 48000
        astream = container.add_stream(audio_codec, rate=audio_rate)
        astream.layout = "mono" if audio.shape[1] == 1 else "stereo"
        astream.format = _audio_format(audio_codec)
        if audio_codec != "pcm_f32le":
          astream.bit_rate = audio_bitrate
        astream.time_base = fractions.Fraction(1, audio_rate)

      # Interleave roughly by time: muxers buffer otherwise, but feeding the
      # streams in order keeps memory flat for long files.
      audio_chunks = (
        _audio_frames(audio, audio_rate, astream, round(audio_start * audio_rate))
        if astream
        else iter(())
      )
      next_audio = next(audio_chunks, None)
      for i in range(frames.shape[0]):
        t = i / rate
        while next_audio is not None and next_audio.pts / audio_rate <= t:
          container.mux(astream.encode(next_audio))
          next_audio = next(audio_chunks, None)
        frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
        frame.pts = i
        # Not vstream.time_base: the muxer replaces that with its own (e.g.
        # 1/14700 for mp4) once the header is written.
        frame.time_base = 1 / rate
        container.mux(vstream.encode(frame))
      while next_audio is not None:
        container.mux(astream.encode(next_audio))
        next_audio = next(audio_chunks, None)
      container.mux(vstream.encode(None))
      if astream is not None:
        container.mux(astream.encode(None))
  except av.error.FFmpegError as e:
    raise MediaError(f"Writing {path!r} failed in FFmpeg: {e}") from e


def _audio_format(codec: str) -> str:
  return {"aac": "fltp", "pcm_f32le": "flt", "libopus": "flt"}[codec]


def _check_audio_for_writing(path: str, audio: np.ndarray, sample_rate: int) -> np.ndarray:
  """Returns audio as float32 [N, C] after checking dtype, shape and values."""
  audio = np.asarray(audio)
  if not np.issubdtype(audio.dtype, np.floating):
    raise ValueError(
      f"Cannot write {path!r}: audio must be a float array in [-1, 1], got {audio.dtype}."
    )
  if audio.ndim == 1:
    audio = audio[:, None]
  if audio.ndim != 2 or audio.shape[1] not in (1, 2) or audio.shape[0] == 0:
    raise ValueError(
      f"Cannot write {path!r}: audio must have shape [N>0] or [N>0, 1 or 2 channels], "
      f"got {audio.shape}."
    )
  if not np.all(np.isfinite(audio)):
    raise ValueError(f"Cannot write {path!r}: audio contains NaN or Inf.")
  if int(sample_rate) != sample_rate or sample_rate <= 0:
    raise ValueError(f"Cannot write {path!r}: sample_rate must be a positive integer.")
  return audio.astype(np.float32)


def _audio_frames(audio: np.ndarray, rate: int, stream, first_pts: int) -> Iterator[av.AudioFrame]:
  """Cuts [N, C] float audio into encoder-sized frames with sample pts."""
  # AAC and Opus need fixed-size frames; PCM takes any size.
  size = stream.codec_context.frame_size or 1024
  layout = "mono" if audio.shape[1] == 1 else "stereo"
  fmt = stream.format.name
  for start in range(0, audio.shape[0], size):
    chunk = audio[start : start + size]
    if fmt == "fltp":
      data = np.ascontiguousarray(chunk.T)
    else:  # flt, interleaved
      data = np.ascontiguousarray(chunk.reshape(1, -1))
    frame = av.AudioFrame.from_ndarray(data, format=fmt, layout=layout)
    frame.sample_rate = rate
    frame.pts = first_pts + start
    frame.time_base = fractions.Fraction(1, rate)
    yield frame


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------

# A clip window may end this far past the video's end and still count as
# inside it: Matroska/WebM store timestamps in whole milliseconds, so the end
# of a file can come out up to a millisecond early.
_END_TOLERANCE = 0.002
_MISSING_AUDIO = ("error", "silence")
_SHORT_CLIP = ("pad", "skip", "error")


def _open(path: str):
  """av.open with every failure turned into a MediaError naming the file."""
  if not os.path.exists(path):
    raise MediaError(f"{path!r}: no such file.")
  if os.path.isdir(path):
    raise MediaError(f"{path!r}: is a directory, not a media file.")
  try:
    return av.open(path, mode="r")
  except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
    raise MediaError(f"{path!r}: not a readable media file ({e}).") from e


def _video_stream(container):
  """The first real video stream (cover art pictures are skipped), or None."""
  for stream in container.streams.video:
    if not stream.disposition & av.stream.Disposition.attached_pic:
      return stream
  return None


def _stream_duration(container, stream) -> float | None:
  if stream is not None and stream.duration is not None and stream.time_base is not None:
    return float(stream.duration * stream.time_base)
  if container.duration is not None:
    return container.duration / av.time_base
  return None


def probe(path: PathLike) -> MediaInfo:
  """Reads the header of a media file (no decoding).

  Raises:
    MediaError: the file is missing, unreadable, corrupt, or has neither a
      video nor an audio stream.
  """
  path = os.fspath(path)
  with _open(path) as container:
    vstream = _video_stream(container)
    astream = container.streams.audio[0] if container.streams.audio else None
    if vstream is None and astream is None:
      raise MediaError(f"{path!r}: contains neither a video nor an audio stream.")
    duration = _stream_duration(container, vstream if vstream is not None else astream)
    if duration is None:
      raise MediaError(f"{path!r}: the container does not state a duration.")
    fps = None
    if vstream is not None:
      rate = vstream.average_rate or vstream.guessed_rate or vstream.base_rate
      fps = float(rate) if rate else None
    return MediaInfo(
      path=path,
      duration=duration,
      has_video=vstream is not None,
      has_audio=astream is not None,
      fps=fps,
      width=vstream.codec_context.width if vstream is not None else None,
      height=vstream.codec_context.height if vstream is not None else None,
      sample_rate=astream.codec_context.sample_rate if astream is not None else None,
      audio_channels=astream.codec_context.channels if astream is not None else None,
    )


def _check_target(path: str, fps: float, height: int, width: int, sample_rate: int) -> None:
  if not (math.isfinite(fps) and fps > 0):
    raise ValueError(f"Reading {path!r}: fps must be positive, got {fps!r}.")
  if height <= 0 or width <= 0:
    raise ValueError(f"Reading {path!r}: target size must be positive, got {height}x{width}.")
  if sample_rate <= 0 or int(sample_rate) != sample_rate:
    raise ValueError(
      f"Reading {path!r}: sample_rate must be a positive integer, got {sample_rate!r}."
    )


def load_media(
  path: PathLike,
  *,
  fps: float,
  height: int,
  width: int,
  sample_rate: int,
  missing_audio: str = "error",
) -> Media:
  """Decodes a whole file onto the target grid (see the module docstring).

  Args:
    path: a video file FFmpeg can read (mp4, mkv, webm, avi, ...).
    fps: target frame rate.
    height, width: target frame size; the source is centre-cropped to this
      aspect ratio, then resized.
    sample_rate: target audio rate; channels are averaged to mono.
    missing_audio: 'error' raises MediaError for a file without audio;
      'silence' returns zeros (and `has_audio=False`).

  Raises:
    MediaError: unreadable or corrupt file, no video stream, no decodable
      video frame, or no audio stream when missing_audio == 'error'.
    ValueError: an unknown option or a bad target.
  """
  path = os.fspath(path)
  if missing_audio not in _MISSING_AUDIO:
    raise ValueError(
      f"missing_audio={missing_audio!r} is not one of {_MISSING_AUDIO} (reading {path!r})."
    )
  _check_target(path, fps, height, width, sample_rate)
  with _open(path) as container:
    vstream = _video_stream(container)
    if vstream is None:
      raise MediaError(f"{path!r}: has no video stream (audio-only or data file).")
    astream = container.streams.audio[0] if container.streams.audio else None
    if astream is None and missing_audio == "error":
      raise MediaError(
        f"{path!r}: has no audio stream (pass missing_audio='silence' to read it with silent audio)."
      )
    vstream.thread_type = "AUTO"  # frame + slice threads: decoding dominates read time
    video = _FrameResampler(path, fps, height, width, vstream)
    audio = _AudioCollector(path, astream) if astream is not None else None
    streams = [vstream] + ([astream] if astream is not None else [])
    where = "while demuxing"
    try:
      for packet in container.demux(streams):
        where = (
          f"at {float(packet.pts * packet.time_base):.3f} s" if packet.pts is not None else where
        )
        if packet.stream is vstream:
          for frame in packet.decode():
            video.add(frame)
        else:
          for frame in packet.decode():
            audio.add(frame)
    except av.error.FFmpegError as e:
      raise MediaError(f"{path!r}: corrupt or undecodable data {where} ({e}).") from e
    frames, t0, duration = video.finish()
    _check_not_truncated(path, vstream, t0, duration)
  n_audio = round((duration + _END_TOLERANCE) * sample_rate)
  if audio is None:
    samples = np.zeros(n_audio, np.float32)
  else:
    samples = audio.finish(t0, n_audio, sample_rate)
  return Media(
    frames=frames,
    audio=samples,
    fps=float(fps),
    sample_rate=int(sample_rate),
    duration=duration,
    path=path,
    has_audio=audio is not None,
  )


def _check_not_truncated(path: str, stream, t0: float, duration: float) -> None:
  """MediaError when far less video decodes than the stream header declares.

  A truncated mp4 whose index sits in front ("faststart") opens and decodes
  up to the cut without any FFmpeg error; without this check its clips would
  be silently padded. Only the video stream's own declared duration is used
  (the container's is the longest stream's, and audio may legitimately run
  longer). The tolerance allows for headers that are slightly off.
  """
  if stream.duration is None or not stream.time_base:
    return
  start = float(stream.start_time * stream.time_base) if stream.start_time is not None else t0
  declared = float(stream.duration * stream.time_base)
  decoded = t0 - start + duration
  if decoded < declared - max(0.5, 0.05 * declared):
    raise MediaError(
      f"{path!r}: truncated or corrupt: its header declares {declared:.3f} s of video "
      f"but only {decoded:.3f} s could be decoded."
    )


class _FrameResampler:
  """Picks, crops and resizes source frames onto the target frame grid as they stream in.

  Only source frames that some target frame shows are converted to RGB, so a
  25 fps source read at ~3.6 fps costs one RGB conversion per ~7 decoded frames.
  """

  def __init__(self, path: str, fps: float, height: int, width: int, stream):
    self.path, self.fps, self.height, self.width = path, float(fps), height, width
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    self.nominal_period = 1.0 / float(rate) if rate else None
    # Container timestamps are rounded to the time base (1 ms in Matroska);
    # equal-up-to-rounding times must compare as equal.
    self.eps = _TIME_EPS + (float(stream.time_base) if stream.time_base else 0.0)
    self.t0 = None
    self.current = None  # (time, av.VideoFrame, duration in time_base) on screen
    self.current_rgb = None
    self.last_period = None
    self.out = []
    self.dropped = 0

  def _time(self, frame) -> float | None:
    if frame.pts is None or frame.time_base is None:
      return None
    return float(frame.pts * frame.time_base)

  def add(self, frame) -> None:
    t = self._time(frame)
    if t is None:  # no timestamp: assume it follows the previous frame
      if self.current is None:
        t = 0.0
      else:
        t = self.current[0] + (self.last_period or self.nominal_period or 1.0 / self.fps)
    else:
      if self.t0 is None:
        self.t0 = t
      t -= self.t0
    if self.t0 is None:
      self.t0 = 0.0
    if self.current is not None:
      if t <= self.current[0]:
        # A frame not later than the one on screen can never be shown on a
        # monotonic timeline; keep the earlier one (and count it).
        self.dropped += 1
        return
      self.last_period = t - self.current[0]
      self._emit_until(t)
    self.current = (t, frame, frame.duration)
    self.current_rgb = None

  def _emit_until(self, t_next: float) -> None:
    """Emits every target frame shown before `t_next` (it shows the current frame)."""
    while len(self.out) / self.fps + self.eps < t_next:
      if self.current_rgb is None:
        self.current_rgb = _crop_resize(self.current[1], self.height, self.width)
      self.out.append(self.current_rgb)

  def finish(self) -> tuple[np.ndarray, float, float]:
    if self.current is None:
      raise MediaError(f"{self.path!r}: the video stream has no decodable frame.")
    t_last, frame, dur = self.current
    period = None
    if dur and frame.time_base is not None:
      period = float(dur * frame.time_base)
    period = period or self.last_period or self.nominal_period or 1.0 / self.fps
    duration = t_last + period
    # Target frames that are on screen for at least _END_TOLERANCE.
    self._emit_until(duration - _END_TOLERANCE + self.eps)
    if self.dropped:
      logging.warning(
        "%r: dropped %d video frames whose timestamps went backwards.", self.path, self.dropped
      )
    frames = np.stack(self.out) if self.out else np.zeros((0, self.height, self.width, 3), np.uint8)
    return frames, self.t0, duration


def _crop_resize(frame, height: int, width: int) -> np.ndarray:
  """Centre crop to the target aspect ratio, then resize; returns uint8 [H, W, 3]."""
  src_h, src_w = frame.height, frame.width
  # Crop the dimension that is too long for the target aspect ratio.
  if src_w * height > src_h * width:
    crop_h, crop_w = src_h, max(1, round(src_h * width / height))
  else:
    crop_h, crop_w = max(1, round(src_w * height / width)), src_w
  rgb = frame.to_ndarray(format="rgb24")
  top, left = (src_h - crop_h) // 2, (src_w - crop_w) // 2
  rgb = rgb[top : top + crop_h, left : left + crop_w]
  if (crop_h, crop_w) == (height, width):
    return np.ascontiguousarray(rgb)
  # 'area' averages every source pixel when shrinking (no aliasing); it is
  # not meant for enlarging, where bicubic is used.
  shrink = crop_h >= height and crop_w >= width
  cropped = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
  resized = cropped.reformat(
    width=width, height=height, interpolation="AREA" if shrink else "BICUBIC"
  )
  return resized.to_ndarray()


class _AudioCollector:
  """Gathers decoded audio as float32 [C, n] blocks placed by their timestamps."""

  def __init__(self, path: str, stream):
    self.path = path
    self.rate = stream.codec_context.sample_rate
    self.blocks = []  # (start sample relative to the first block, float32 [C, n])
    self.first_time = None  # seconds; stays None if the stream has no timestamps
    self.write_pos = 0

  def add(self, frame) -> None:
    data = _audio_to_float(frame, self.path)
    if self.rate is None or self.rate <= 0:
      self.rate = frame.sample_rate
    if frame.sample_rate != self.rate:
      raise MediaError(
        f"{self.path!r}: audio sample rate changes mid-stream ({self.rate} -> {frame.sample_rate} Hz)."
      )
    t = float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base else None
    if not self.blocks:
      self.first_time = t
      pos = 0
    else:
      pos = self.write_pos
      if t is not None and self.first_time is not None:
        stamped = max(0, round((t - self.first_time) * self.rate))
        # Follow the timestamps only for a real gap or overlap (> 10 ms);
        # smaller deviations are timestamp rounding and would cause clicks.
        if abs(stamped - pos) > 0.01 * self.rate:
          pos = stamped
    self.blocks.append((pos, data))
    self.write_pos = pos + data.shape[1]

  def finish(self, t0: float, n_out: int, sample_rate: int) -> np.ndarray:
    """Exactly `n_out` samples of mono audio at `sample_rate` from video time 0."""
    if not self.blocks:
      # An audio stream without a decodable frame: the file is broken, not silent.
      raise MediaError(f"{self.path!r}: the audio stream has no decodable samples.")
    total = max(pos + b.shape[1] for pos, b in self.blocks)
    mono = np.zeros(total, np.float32)
    for pos, block in self.blocks:
      # Mono = the mean of the channels (also if the layout changes mid-stream).
      mono[pos : pos + block.shape[1]] = block.mean(axis=0)  # later blocks win an overlap
    # Place it on the video timeline at the source rate, then resample. Audio
    # without timestamps is taken to start with the video.
    first = t0 if self.first_time is None else self.first_time
    offset = round((first - t0) * self.rate)
    if offset > 0:
      mono = np.concatenate([np.zeros(offset, np.float32), mono])
    elif offset < 0:
      mono = mono[-offset:]
    # Keep a little more than needed so the resampler sees the true signal
    # at the end, then cut to length after resampling.
    keep = math.ceil(n_out * self.rate / sample_rate) + 64
    mono = mono[:keep]
    if self.rate != sample_rate and mono.size:
      mono = soxr.resample(mono, self.rate, sample_rate, quality="HQ").astype(np.float32)
    mono = mono[:n_out]
    if mono.shape[0] < n_out:
      mono = np.pad(mono, (0, n_out - mono.shape[0]))
    return np.ascontiguousarray(mono, dtype=np.float32)


# Integer sample formats -> full-scale value (FFmpeg's convention: s16 spans
# [-32768, 32767] and maps to [-1, 1)).
_INT_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2147483648.0, "s64": 9223372036854775808.0}


def _audio_to_float(frame, path: str) -> np.ndarray:
  """A decoded audio frame as float32 [channels, samples]."""
  name = frame.format.name
  base = name.rstrip("p")
  channels = frame.layout.nb_channels
  arr = frame.to_ndarray()
  if not frame.format.is_planar:
    arr = arr.reshape(-1, channels).T
  if base in ("flt", "dbl"):
    out = arr.astype(np.float32)
  elif base in _INT_SCALE:
    out = arr.astype(np.float64)
    if base == "u8":
      out -= 128.0
    out = (out / _INT_SCALE[base]).astype(np.float32)
  else:
    raise MediaError(f"{path!r}: unsupported audio sample format {name!r}.")
  return out[:, : frame.samples]


def cut_clip(
  media: Media,
  *,
  start: float,
  num_frames: int,
  num_samples: int,
  short_clip: str = "pad",
) -> tuple[np.ndarray, np.ndarray]:
  """Cuts the window [start, start + num_samples / sample_rate) out of `media`.

  Frames start at index round(start * fps), audio at round(start * sample_rate).

  Args:
    media: from `load_media`.
    start: window start in seconds (>= 0).
    num_frames: frames to return.
    num_samples: audio samples to return.
    short_clip: what to do when the window reaches past the end of the video:
      'pad' repeats the last frame and zero-pads the audio from the end of
      the video on; 'skip' and
      'error' raise ClipTooShortError (callers that skip catch it).

  Returns:
    (uint8 [num_frames, H, W, 3], float32 [num_samples]).
  """
  if short_clip not in _SHORT_CLIP:
    raise ValueError(
      f"short_clip={short_clip!r} is not one of {_SHORT_CLIP} (cutting {media.path!r})."
    )
  if not (math.isfinite(start) and start >= 0):
    raise ValueError(f"Cutting {media.path!r}: start must be >= 0 seconds, got {start!r}.")
  if num_frames <= 0 or num_samples <= 0:
    raise ValueError(
      f"Cutting {media.path!r}: num_frames and num_samples must be positive, "
      f"got {num_frames} and {num_samples}."
    )
  f0 = round(start * media.fps)
  s0 = round(start * media.sample_rate)
  window = num_samples / media.sample_rate
  n_frames = media.frames.shape[0]
  short = f0 + num_frames > n_frames or start + window > media.duration + _END_TOLERANCE
  if short and short_clip != "pad":
    raise ClipTooShortError(
      f"{media.path!r}: clip is {media.duration:.3f} s long but the window "
      f"[{start:.3f}, {start + window:.3f}) s of {window:.3f} s "
      f"({num_frames} frames) reaches past its end."
    )
  if f0 >= n_frames:
    if n_frames == 0:
      raise ClipTooShortError(f"{media.path!r}: has no frames to pad a clip from.")
    # Padding repeats the last frame, also for a window wholly past the end.
    idx = np.full(num_frames, n_frames - 1)
  else:
    idx = np.minimum(np.arange(f0, f0 + num_frames), n_frames - 1)
  frames = media.frames[idx]
  # A padded clip is silent from the end of the video on (Media.audio runs
  # 2 ms further, which only windows that end within that tolerance use).
  audio_end = round(media.duration * media.sample_rate) if short else s0 + num_samples
  audio = media.audio[s0 : min(s0 + num_samples, audio_end)]
  if audio.shape[0] < num_samples:
    audio = np.pad(audio, (0, num_samples - audio.shape[0]))
  return frames, audio.astype(np.float32, copy=False)


def read_clip(
  path: PathLike,
  *,
  start: float = 0.0,
  num_frames: int,
  fps: float,
  height: int,
  width: int,
  sample_rate: int,
  num_samples: int,
  missing_audio: str = "error",
  short_clip: str = "pad",
) -> tuple[np.ndarray, np.ndarray]:
  """`load_media` + `cut_clip`: one clip of a file on the target grid."""
  if short_clip not in _SHORT_CLIP:
    raise ValueError(f"short_clip={short_clip!r} is not one of {_SHORT_CLIP} (reading {path!r}).")
  media = load_media(
    path,
    fps=fps,
    height=height,
    width=width,
    sample_rate=sample_rate,
    missing_audio=missing_audio,
  )
  return cut_clip(
    media, start=start, num_frames=num_frames, num_samples=num_samples, short_clip=short_clip
  )
