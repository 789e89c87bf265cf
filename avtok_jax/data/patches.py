"""Patchify / unpatchify for video and mel, exact inverses of each other.

Every function uses only the array's own `.reshape` and `.transpose` methods,
so the same code runs on numpy arrays (in Grain workers, without importing
JAX) and on JAX arrays, traced or not (inside `jax.jit`).

Token order (the model's sin-cos position tables rely on it):

* video `[..., T, H, W, C]` with patch `(pt, ph, pw)`: tokens run over the
  grid `(T/pt, H/ph, W/pw)` in row-major order (time slowest, then rows, then
  columns); inside a token the values are laid out `(pt, ph, pw, C)`.
* mel `[..., F, L]` (mel bins x time frames) with patch `(pf, pl)`: tokens run
  over the grid `(F/pf, L/pl)` in row-major order (frequency slowest, then
  time), as when the mel is read as a one-channel image; inside a token the
  values are laid out `(pf, pl)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Array = Any  # numpy.ndarray or jax.Array; only .shape/.reshape/.transpose are used.


def video_grid(video_shape: Sequence[int], patch: Sequence[int]) -> tuple[int, int, int]:
  """Token grid `(T/pt, H/ph, W/pw)` of a video of shape `(T, H, W[, C])`."""
  if len(video_shape) not in (3, 4):
    raise ValueError(f"video_shape must be (T, H, W) or (T, H, W, C), got {tuple(video_shape)}.")
  if len(patch) != 3:
    raise ValueError(f"Video patch must be (pt, ph, pw), got {tuple(patch)}.")
  return _grid(tuple(video_shape[:3]), tuple(patch), "video (T, H, W)")


def mel_grid(mel_shape: Sequence[int], patch: Sequence[int]) -> tuple[int, int]:
  """Token grid `(F/pf, L/pl)` of a mel of shape `(F, L)`."""
  if len(mel_shape) != 2:
    raise ValueError(f"mel_shape must be (F, L), got {tuple(mel_shape)}.")
  if len(patch) != 2:
    raise ValueError(f"Mel patch must be (pf, pl), got {tuple(patch)}.")
  return _grid(tuple(mel_shape), tuple(patch), "mel (F, L)")


def token_grids(data_config: Any) -> dict[str, tuple[int, ...]]:
  """Token grids of one clip for a `config.data`: {'video': (nt, nh, nw), 'mel': (nf, nl)}."""
  mel_frames = data_config.num_samples // data_config.mel.hop_length
  return {
    "video": video_grid(
      (data_config.num_frames, data_config.height, data_config.width), data_config.video_patch
    ),
    "mel": mel_grid((data_config.mel.n_mels, mel_frames), data_config.mel_patch),
  }


def patchify_video(video: Array, patch: Sequence[int]) -> Array:
  """`[..., T, H, W, C]` -> `[..., (T/pt)*(H/ph)*(W/pw), pt*ph*pw*C]`."""
  if video.ndim < 4:
    raise ValueError(f"patchify_video expects [..., T, H, W, C], got shape {tuple(video.shape)}.")
  *lead, t, h, w, c = video.shape
  nt, nh, nw = video_grid((t, h, w), patch)
  pt, ph, pw = patch
  n = len(lead)
  x = video.reshape(*lead, nt, pt, nh, ph, nw, pw, c)
  # (..., nt, pt, nh, ph, nw, pw, c) -> (..., nt, nh, nw, pt, ph, pw, c)
  x = x.transpose(*range(n), n, n + 2, n + 4, n + 1, n + 3, n + 5, n + 6)
  return x.reshape(*lead, nt * nh * nw, pt * ph * pw * c)


def unpatchify_video(patches: Array, video_shape: Sequence[int], patch: Sequence[int]) -> Array:
  """Inverse of `patchify_video`: `[..., N, pt*ph*pw*C]` -> `[..., T, H, W, C]`."""
  if len(video_shape) != 4:
    raise ValueError(f"video_shape must be (T, H, W, C), got {tuple(video_shape)}.")
  t, h, w, c = video_shape
  nt, nh, nw = video_grid((t, h, w), patch)
  pt, ph, pw = patch
  expected = (nt * nh * nw, pt * ph * pw * c)
  if patches.ndim < 2 or tuple(patches.shape[-2:]) != expected:
    raise ValueError(
      f"unpatchify_video: patches of shape {tuple(patches.shape)} do not hold a video of "
      f"shape {tuple(video_shape)} with patch {tuple(patch)} (expected [..., {expected[0]}, "
      f"{expected[1]}])."
    )
  lead = tuple(patches.shape[:-2])
  n = len(lead)
  x = patches.reshape(*lead, nt, nh, nw, pt, ph, pw, c)
  # (..., nt, nh, nw, pt, ph, pw, c) -> (..., nt, pt, nh, ph, nw, pw, c)
  x = x.transpose(*range(n), n, n + 3, n + 1, n + 4, n + 2, n + 5, n + 6)
  return x.reshape(*lead, t, h, w, c)


def patchify_mel(mel: Array, patch: Sequence[int]) -> Array:
  """`[..., F, L]` -> `[..., (F/pf)*(L/pl), pf*pl]`."""
  if mel.ndim < 2:
    raise ValueError(f"patchify_mel expects [..., F, L], got shape {tuple(mel.shape)}.")
  *lead, f, length = mel.shape
  nf, nl = mel_grid((f, length), patch)
  pf, pl = patch
  n = len(lead)
  x = mel.reshape(*lead, nf, pf, nl, pl)
  x = x.transpose(*range(n), n, n + 2, n + 1, n + 3)
  return x.reshape(*lead, nf * nl, pf * pl)


def unpatchify_mel(patches: Array, mel_shape: Sequence[int], patch: Sequence[int]) -> Array:
  """Inverse of `patchify_mel`: `[..., N, pf*pl]` -> `[..., F, L]`."""
  f, length = mel_shape
  nf, nl = mel_grid((f, length), patch)
  pf, pl = patch
  expected = (nf * nl, pf * pl)
  if patches.ndim < 2 or tuple(patches.shape[-2:]) != expected:
    raise ValueError(
      f"unpatchify_mel: patches of shape {tuple(patches.shape)} do not hold a mel of shape "
      f"{tuple(mel_shape)} with patch {tuple(patch)} (expected [..., {expected[0]}, "
      f"{expected[1]}])."
    )
  lead = tuple(patches.shape[:-2])
  n = len(lead)
  x = patches.reshape(*lead, nf, nl, pf, pl)
  x = x.transpose(*range(n), n, n + 2, n + 1, n + 3)
  return x.reshape(*lead, f, length)


def _grid(shape: tuple[int, ...], patch: tuple[int, ...], what: str) -> tuple[int, ...]:
  if any(int(p) <= 0 for p in patch):
    raise ValueError(f"Patch sizes must be positive, got {patch} for {what}.")
  if any(s % p for s, p in zip(shape, patch, strict=True)):
    raise ValueError(f"The {what} shape {shape} is not divisible by the patch {patch}.")
  return tuple(s // p for s, p in zip(shape, patch, strict=True))
