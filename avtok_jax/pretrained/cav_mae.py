"""CAV-MAE's audio and video encoders in Flax, as a representation-alignment teacher.

CAV-MAE (Gong et al. 2023, "Contrastive Audio-Visual Masked Autoencoder",
ICLR; public code YuanGongND/cav-mae, `src/models/cav_mae.py`) pairs two
ViT-B towers with one shared block. This module ports the encoder half of
its `CAVMAE` class, exactly as `CAVMAE.forward_feat` computes single-modality
token features (no masking):

* audio: fbank [B, 1024 frames, 128 bins] -> unsqueeze a channel and swap the
  last two axes ([B, 1, 128, 1024], frequency on the image height) ->
  `patch_embed_a.proj` (Conv2d 1 -> 768, kernel = stride = 16) -> 8 x 64 = 512
  patches, frequency-major -> + `pos_embed_a` [1, 512, 768] + `modality_a`
  [1, 1, 768] -> `blocks_a.0..10`;
* video: one RGB frame [B, 3, 224, 224] -> `patch_embed_v.proj` (Conv2d
  3 -> 768, k = s = 16) -> 14 x 14 = 196 patches -> + `pos_embed_v`
  [1, 196, 768] + `modality_v` -> `blocks_v.0..10`;
* then each stream alone through the unified block `blocks_u.0` with its
  modality-specific LayerNorms (`Block.forward(x, 'a')` uses `norm1_a` /
  `norm2_a`, `'v'` uses `norm1_v` / `norm2_v`), and the final `norm_a` /
  `norm_v`. (`norm` and the unified `norm1` / `norm2` are only used for the
  joint audio-visual sequence; they are not needed here and not loaded.)

The blocks are timm ViT blocks (pre-norm; `attn.qkv` Linear(D, 3D) with bias,
scaled dot-product attention with scale head_dim ** -0.5, `attn.proj`;
`mlp.fc1` -> exact GELU -> `mlp.fc2`), 12 heads, MLP ratio 4. The LayerNorms
are plain `torch.nn.LayerNorm` (eps 1e-5): `run_cavmae_pretrain.py` builds
`CAVMAE(...)` without a `norm_layer` argument and the class default is
`nn.LayerNorm`. With 11 modality-specific blocks there is 12 - 11 = 1 unified
block (the class hard-codes 12 blocks in all). The sin-cos position
embeddings are frozen but stored in the checkpoint, so they are loaded, not
recomputed.

Input preprocessing (`src/dataloader.py`, `AudiosetDataset`;
`src/preprocess/extract_audio.py`; the `egs/*/run_cavmae_*.sh` scripts):

* audio: 16 kHz mono (ffmpeg `-ar 16000`, first channel), floats in [-1, 1]
  as `torchaudio.load` gives them; the clip's mean is subtracted; then
  `torchaudio.compliance.kaldi.fbank(htk_compat=True, use_energy=False,
  window_type='hanning', num_mel_bins=128, dither=0.0, frame_shift=10)`
  with every other argument at its default (`kaldi_fbank` below); zero-padded
  at the end or cut to `target_length` = 1024 frames; normalised as
  (fbank - dataset_mean) / dataset_std with dataset_mean = -5.081 and
  dataset_std = 4.4849 (the scripts' values). CAV-MAE divides by the std
  itself, not by 2 * std as its predecessor AST does;
* video: `T.Resize(224, bicubic)`, `T.CenterCrop(224)`, `T.ToTensor()` ([0, 1])
  and `T.Normalize` with the ImageNet mean (0.485, 0.456, 0.406) and std
  (0.229, 0.224, 0.225).

The teacher (`CAVMAETeacher`) implements `alignment.FeatureTeacher`. The
training step only has the normalised 80-band log-mel of the clip, not its
waveform, so the audio stream maps that log-mel onto CAV-MAE's Kaldi fbank
grid (`mel_to_fbank`: level calibration, interpolation in frequency and time;
see its docstring for the assumptions); `audio_features_from_wave` is the
exact path from a waveform, for evaluation.

Weights: `python -m avtok_jax.pretrained.convert --net=cav_mae --src=FILE.pth
--dst=DIR` (the pretrained checkpoints are DataParallel state dicts; the
converter drops the `module.` prefix) and `load_cav_mae(DIR)`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avtok_jax.pretrained import weights

PathLike = str | os.PathLike

# --- audio frontend constants -------------------------------------------------
# 16 kHz mono input (src/preprocess/extract_audio.py: ffmpeg -ar 16000).
SAMPLE_RATE = 16000
# torchaudio.compliance.kaldi.fbank defaults (frame_length 25 ms, preemphasis
# 0.97, low_freq 20 Hz, high_freq 0 = Nyquist, round_to_power_of_two,
# remove_dc_offset, snip_edges) and CAV-MAE's own arguments (frame_shift 10 ms,
# hanning window, dither 0, use_energy False, htk_compat True; src/dataloader.py).
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
# Kaldi's log floor: torch.finfo(torch.float).eps, as torchaudio's _get_epsilon.
LOG_FLOOR = float(np.finfo(np.float32).eps)
# Dataset statistics of the fbank (dataset_mean / dataset_std of every
# egs/*/run_cavmae_*.sh script); dataloader: (fbank - mean) / std.
FBANK_MEAN = -5.081
FBANK_STD = 4.4849
# --- video constants (src/dataloader.py, T.Normalize) -------------------------
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class CAVMAEConfig:
  """Sizes of the encoder. The defaults are the released ViT-B model.

  width 768, 12 heads, MLP 3072 (ratio 4), 11 modality-specific + 1 unified
  block, patch 16, audio 1024 frames x 128 mel bins, video 224 x 224
  (`CAVMAE.__init__` defaults and `run_cavmae_pretrain.py`). `small()` is a
  test-sized variant with the same structure.
  """

  width: int = 768
  num_heads: int = 12
  mlp_dim: int = 3072
  modality_depth: int = 11
  unified_depth: int = 1
  patch_size: int = 16
  audio_length: int = 1024
  num_mel_bins: int = 128
  image_size: int = 224
  layer_norm_eps: float = 1e-5  # torch.nn.LayerNorm default

  def __post_init__(self):
    problems = []
    if self.width % self.num_heads:
      problems.append(f"width={self.width} is not divisible by num_heads={self.num_heads}")
    p = self.patch_size
    if self.audio_length % p or self.num_mel_bins % p or self.image_size % p:
      problems.append(
        f"audio {self.audio_length}x{self.num_mel_bins} and image {self.image_size} must be "
        f"multiples of patch_size={p}"
      )
    if min(self.modality_depth, self.unified_depth) < 0 or self.unified_depth < 1:
      problems.append("need modality_depth >= 0 and unified_depth >= 1")
    if problems:
      raise ValueError("Invalid CAVMAEConfig: " + "; ".join(problems) + ".")

  @classmethod
  def small(cls, patch_size: int = 16, **overrides: Any) -> CAVMAEConfig:
    """Width 32, 2 heads, 1 + 1 blocks, audio 64 frames x 32 bins, video 32 x 32 (for tests)."""
    kwargs = dict(
      width=32,
      num_heads=2,
      mlp_dim=128,
      modality_depth=1,
      unified_depth=1,
      patch_size=patch_size,
      audio_length=64,
      num_mel_bins=32,
      image_size=32,
    )
    kwargs.update(overrides)
    return cls(**kwargs)

  @property
  def audio_grid(self) -> tuple[int, int]:
    """(frequency, time) patches: (8, 64) for ViT-B (`pos_embed_a` is built on 8 x 64)."""
    return self.num_mel_bins // self.patch_size, self.audio_length // self.patch_size

  @property
  def video_grid(self) -> tuple[int, int]:
    return self.image_size // self.patch_size, self.image_size // self.patch_size

  @property
  def num_audio_patches(self) -> int:
    return math.prod(self.audio_grid)

  @property
  def num_video_patches(self) -> int:
    return math.prod(self.video_grid)


# ----------------------------------------------------------------------------
# Flax encoder
# ----------------------------------------------------------------------------


class Attention(nn.Module):
  """timm `Attention`: one qkv projection, softmax(q k^T / sqrt(head_dim)) v, output projection."""

  width: int
  num_heads: int
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, _ = x.shape
    h = self.num_heads
    dh = self.width // h
    dense = functools.partial(nn.Dense, dtype=self.dtype, precision=self.precision)
    qkv = dense(3 * self.width, name="qkv")(x).reshape(b, n, 3, h, dh)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, H, dh]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision) * (dh**-0.5)
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", attn, v, precision=self.precision)
    return dense(self.width, name="proj")(out.reshape(b, n, self.width))


class Mlp(nn.Module):
  """timm `Mlp`: fc1 -> exact (erf) GELU -> fc2."""

  width: int
  mlp_dim: int
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = functools.partial(nn.Dense, dtype=self.dtype, precision=self.precision)
    x = nn.gelu(dense(self.mlp_dim, name="fc1")(x), approximate=False)
    return dense(self.width, name="fc2")(x)


class Block(nn.Module):
  """CAV-MAE's pre-norm transformer block; `suffixes` picks which LayerNorm pairs exist.

  A modality-specific block (`blocks_a.i`, `blocks_v.i`) is only ever called
  with `modality=None` (norm1 / norm2); the unified block is called with 'a'
  (norm1_a / norm2_a) or 'v' (norm1_v / norm2_v); attention and MLP are shared.
  """

  width: int
  num_heads: int
  mlp_dim: int
  eps: float
  suffixes: tuple[str, ...] = ("",)
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, modality: str | None = None) -> jax.Array:
    suffix = "" if modality is None else f"_{modality}"
    if suffix not in self.suffixes:
      raise ValueError(f"This block has LayerNorms for {self.suffixes}, not {suffix!r}.")

    def norm(name):
      return nn.LayerNorm(epsilon=self.eps, dtype=jnp.float32, name=name)

    attn = Attention(self.width, self.num_heads, self.dtype, self.precision, name="attn")
    mlp = Mlp(self.width, self.mlp_dim, self.dtype, self.precision, name="mlp")
    x = x + attn(norm(f"norm1{suffix}")(x).astype(self.dtype)).astype(x.dtype)
    return x + mlp(norm(f"norm2{suffix}")(x).astype(self.dtype)).astype(x.dtype)


class CAVMAEEncoder(nn.Module):
  """CAV-MAE's single-modality token features (`CAVMAE.forward_feat`).

  `audio(fbank [B, audio_length, num_mel_bins]) -> [B, Na, width]` (tokens
  frequency-major: Na = (bins / p) x (frames / p)) and
  `video(frames [B, image_size, image_size, 3]) -> [B, Nv, width]`, both
  float32, from inputs already normalised as CAV-MAE's dataloader does
  (`audio_input`, `video_input`). `__call__` runs both (used by `init`).
  """

  config: CAVMAEConfig = CAVMAEConfig()
  dtype: Any = jnp.float32
  precision: Any = None

  def setup(self):
    c = self.config
    conv = functools.partial(
      nn.Conv,
      features=c.width,
      kernel_size=(c.patch_size, c.patch_size),
      strides=(c.patch_size, c.patch_size),
      padding="VALID",
      dtype=self.dtype,
      precision=self.precision,
    )
    self.patch_embed_a = conv(name="patch_embed_a")
    self.patch_embed_v = conv(name="patch_embed_v")
    zeros = nn.initializers.zeros
    self.pos_embed_a = self.param("pos_embed_a", zeros, (1, c.num_audio_patches, c.width))
    self.pos_embed_v = self.param("pos_embed_v", zeros, (1, c.num_video_patches, c.width))
    normal = nn.initializers.normal(0.02)
    self.modality_a = self.param("modality_a", normal, (1, 1, c.width))
    self.modality_v = self.param("modality_v", normal, (1, 1, c.width))
    block = functools.partial(
      Block, c.width, c.num_heads, c.mlp_dim, c.layer_norm_eps, dtype=self.dtype,
      precision=self.precision,
    )  # fmt: skip
    # setup names list entries blocks_a_0, blocks_a_1, ...
    self.blocks_a = [block() for _ in range(c.modality_depth)]
    self.blocks_v = [block() for _ in range(c.modality_depth)]
    self.blocks_u = [block(suffixes=("_a", "_v")) for _ in range(c.unified_depth)]
    self.norm_a = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=jnp.float32)
    self.norm_v = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=jnp.float32)

  def _tower(self, x, blocks, modality, final_norm):
    for blk in blocks:
      x = blk(x)
    # forward_feat loops `a = blk(a, 'a')` over blocks_u, so several unified
    # blocks chain (the released model has exactly one).
    for blk in self.blocks_u:
      x = blk(x, modality)
    return final_norm(x).astype(jnp.float32)

  def audio(self, fbank: jax.Array) -> jax.Array:
    c = self.config
    if fbank.ndim != 3 or fbank.shape[1:] != (c.audio_length, c.num_mel_bins):
      raise ValueError(
        f"audio expects a normalised fbank [B, {c.audio_length}, {c.num_mel_bins}], "
        f"got {tuple(fbank.shape)}."
      )
    # [B, frames, bins] -> NHWC [B, bins, frames, 1]: the reference's
    # unsqueeze(1).transpose(2, 3) puts frequency on the image height.
    x = jnp.swapaxes(fbank.astype(self.dtype), 1, 2)[..., None]
    x = self.patch_embed_a(x)  # [B, bins/p, frames/p, D]
    x = x.reshape(x.shape[0], -1, c.width) + self.pos_embed_a + self.modality_a
    return self._tower(x.astype(self.dtype), self.blocks_a, "a", self.norm_a)

  def video(self, frames: jax.Array) -> jax.Array:
    c = self.config
    if frames.ndim != 4 or frames.shape[1:] != (c.image_size, c.image_size, 3):
      raise ValueError(
        f"video expects normalised frames [B, {c.image_size}, {c.image_size}, 3], "
        f"got {tuple(frames.shape)}."
      )
    x = self.patch_embed_v(frames.astype(self.dtype))  # [B, S/p, S/p, D]
    x = x.reshape(x.shape[0], -1, c.width) + self.pos_embed_v + self.modality_v
    return self._tower(x.astype(self.dtype), self.blocks_v, "v", self.norm_v)

  def __call__(self, fbank: jax.Array, frames: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.audio(fbank), self.video(frames)


def example_inputs(config: CAVMAEConfig, batch: int = 1) -> tuple[jax.Array, jax.Array]:
  """Zero inputs of the encoder's shapes (for `init` / `jax.eval_shape`)."""
  c = config
  return (
    jnp.zeros((batch, c.audio_length, c.num_mel_bins), jnp.float32),
    jnp.zeros((batch, c.image_size, c.image_size, 3), jnp.float32),
  )


# ----------------------------------------------------------------------------
# State dict -> params
# ----------------------------------------------------------------------------


def param_specs(config: CAVMAEConfig) -> tuple[weights.ParamSpec, ...]:
  """Every encoder key of the public state dict (without `module.`), its shape and Flax path."""
  c = config
  d, p = c.width, c.patch_size
  S = weights.ParamSpec
  lin, conv = weights.linear_oi_to_io, weights.conv_oihw_to_hwio
  specs = [
    S("patch_embed_a.proj.weight", ("patch_embed_a", "kernel"), (d, 1, p, p), conv),
    S("patch_embed_a.proj.bias", ("patch_embed_a", "bias"), (d,)),
    S("patch_embed_v.proj.weight", ("patch_embed_v", "kernel"), (d, 3, p, p), conv),
    S("patch_embed_v.proj.bias", ("patch_embed_v", "bias"), (d,)),
    S("pos_embed_a", ("pos_embed_a",), (1, c.num_audio_patches, d)),
    S("pos_embed_v", ("pos_embed_v",), (1, c.num_video_patches, d)),
    S("modality_a", ("modality_a",), (1, 1, d)),
    S("modality_v", ("modality_v",), (1, 1, d)),
  ]

  def norm(key, path):
    return [S(f"{key}.weight", (*path, "scale"), (d,)), S(f"{key}.bias", (*path, "bias"), (d,))]

  def block(key, name, suffixes):
    out = []
    for s in suffixes:
      out += norm(f"{key}.norm1{s}", (name, f"norm1{s}"))
      out += norm(f"{key}.norm2{s}", (name, f"norm2{s}"))
    for sub, fan_out, fan_in in (
      ("attn.qkv", 3 * d, d),
      ("attn.proj", d, d),
      ("mlp.fc1", c.mlp_dim, d),
      ("mlp.fc2", d, c.mlp_dim),
    ):
      path = (name, *sub.split("."))
      out.append(S(f"{key}.{sub}.weight", (*path, "kernel"), (fan_out, fan_in), lin))
      out.append(S(f"{key}.{sub}.bias", (*path, "bias"), (fan_out,)))
    return out

  for i in range(c.modality_depth):
    specs += block(f"blocks_a.{i}", f"blocks_a_{i}", ("",))
    specs += block(f"blocks_v.{i}", f"blocks_v_{i}", ("",))
  for i in range(c.unified_depth):
    specs += block(f"blocks_u.{i}", f"blocks_u_{i}", ("_a", "_v"))
  specs += norm("norm_a", ("norm_a",)) + norm("norm_v", ("norm_v",))
  return tuple(specs)


def infer_config(
  state_dict: Mapping[str, Any], config: CAVMAEConfig | None = None, **overrides: Any
) -> CAVMAEConfig:
  """The config a state dict's shapes imply; unknown values fall back to `config` (or ViT-B).

  Width, MLP size, patch size, block counts and the video size follow from
  the shapes. Not stored in any shape: the number of heads (default
  width // 64, i.e. 12 for ViT-B, unless `config` / `num_heads=` says) and
  how the audio patches split into frequency x time (`num_mel_bins` from
  `config`, default 128 as in every released model). Keys that are missing
  or odd are left to `params_from_state_dict` to report.
  """
  return _infer({k: tuple(np.shape(v)) for k, v in state_dict.items()}, config, overrides)


def _infer(
  shapes: Mapping[str, tuple[int, ...]], config: CAVMAEConfig | None, overrides: dict[str, Any]
) -> CAVMAEConfig:
  base = config or CAVMAEConfig()
  found: dict[str, Any] = {}
  shape = shapes.get

  if (s := shape("pos_embed_a")) and len(s) == 3:
    found["width"] = s[2]
  if (s := shape("patch_embed_v.proj.weight")) and len(s) == 4 and s[2] == s[3]:
    found["patch_size"] = s[2]
  if (s := shape("blocks_a.0.mlp.fc1.weight")) and len(s) == 2:
    found["mlp_dim"] = s[0]

  def count(prefix):
    pattern = re.compile(rf"^{prefix}\.(\d+)\.")
    ids = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
    return max(ids) + 1 if ids else None

  if (n := count("blocks_a")) is not None:
    found["modality_depth"] = n
  if (n := count("blocks_u")) is not None:
    found["unified_depth"] = n
  p = found.get("patch_size", base.patch_size)
  if (s := shape("pos_embed_v")) and len(s) == 3:
    side = math.isqrt(s[1])
    if side * side == s[1]:
      found["image_size"] = side * p
  bins = overrides.get("num_mel_bins", base.num_mel_bins)
  if (s := shape("pos_embed_a")) and len(s) == 3 and bins % p == 0 and s[1] % (bins // p) == 0:
    found["audio_length"] = s[1] // (bins // p) * p
  width = found.get("width", base.width)
  if config is None and "num_heads" not in overrides:
    found["num_heads"] = max(1, width // 64)
  return dataclasses.replace(base, **{**found, **overrides})


CONFIG_CLASS = CAVMAEConfig


def config_for_state_dict(
  state_dict: Mapping[str, Any], *, source: str = "state dict", **overrides: Any
) -> CAVMAEConfig:
  """`infer_config` with `overrides` (the converter's `--set`, e.g. num_heads=16)."""
  try:
    return infer_config(_strip_module(state_dict), **overrides)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{source}: no valid CAVMAEConfig with {overrides}: {e}") from e


def convert_state_dict(
  state_dict: Mapping[str, np.ndarray],
  source: str = "state dict",
  config: CAVMAEConfig | None = None,
) -> dict[str, Any]:
  """{'params': tree} (float32 numpy) of the encoder from a flat CAV-MAE state dict.

  Keys are the public ones without the DataParallel `module.` prefix (a
  prefixed dict is accepted too). Decoder / MAE / classifier keys and the
  unused `norm`, `blocks_u.*.norm1` / `norm2` and modality-specific blocks'
  `norm1_a` ... copies are ignored. The sizes are inferred from the shapes
  (`infer_config`) unless `config` is given; every missing or mis-shaped key
  is reported in one ValueError that names `source`.
  """
  state_dict = _strip_module(state_dict)
  if config is None:
    try:
      config = infer_config(state_dict)
    except ValueError as e:
      raise ValueError(f"Invalid weights in {source}: the shapes imply no valid config: {e}") from e
  params = weights.params_from_state_dict(state_dict, param_specs(config), source=source)
  return {"params": params}


def _strip_module(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  if state_dict and all(k.startswith("module.") for k in state_dict):
    return {k[len("module.") :]: v for k, v in state_dict.items()}
  return dict(state_dict)


def config_from_params(params: Mapping[str, Any], **overrides: Any) -> CAVMAEConfig:
  """The config of a converted params tree (heads and mel bins as in `infer_config`)."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    flat["/".join(str(getattr(k, "key", k)) for k in path)] = tuple(np.shape(leaf))
  # The state-dict shapes `_infer` reads, from their Flax counterparts.
  shapes: dict[str, tuple[int, ...]] = {}
  for name in ("pos_embed_a", "pos_embed_v"):
    if name in flat:
      shapes[name] = flat[name]
  if len(k := flat.get("patch_embed_v/kernel", ())) == 4:
    shapes["patch_embed_v.proj.weight"] = (k[3], k[2], k[0], k[1])
  if len(k := flat.get("blocks_a_0/mlp/fc1/kernel", ())) == 2:
    shapes["blocks_a.0.mlp.fc1.weight"] = (k[1], k[0])
  for key in flat:
    if m := re.match(r"^blocks_([au])_(\d+)/", key):
      shapes[f"blocks_{m.group(1)}.{m.group(2)}."] = ()
  return _infer(shapes, None, overrides)


# ----------------------------------------------------------------------------
# Audio frontend (numpy): resampling, Kaldi fbank, normalisation
# ----------------------------------------------------------------------------


def kaldi_mel_scale(hz: np.ndarray | float) -> np.ndarray:
  """Kaldi's mel scale, 1127 ln(1 + f / 700) (torchaudio.compliance.kaldi.mel_scale)."""
  return 1127.0 * np.log1p(np.asarray(hz, np.float64) / 700.0)


def kaldi_inverse_mel_scale(mel: np.ndarray | float) -> np.ndarray:
  return 700.0 * np.expm1(np.asarray(mel, np.float64) / 1127.0)


def _frame_sizes(sample_rate: int) -> tuple[int, int, int]:
  """(window_size, window_shift, padded FFT size): 400, 160, 512 at 16 kHz."""
  size = int(sample_rate * FRAME_LENGTH_MS * 0.001)
  shift = int(sample_rate * FRAME_SHIFT_MS * 0.001)
  return size, shift, 1 << (size - 1).bit_length()


def num_fbank_frames(num_samples: int, sample_rate: int = SAMPLE_RATE) -> int:
  """Frames of `kaldi_fbank` for a clip (snip_edges: 1 + (N - 400) // 160, 0 if N < 400)."""
  size, shift, _ = _frame_sizes(sample_rate)
  return 0 if num_samples < size else 1 + (num_samples - size) // shift


@functools.lru_cache(maxsize=8)
def kaldi_mel_banks(num_mel_bins: int = 128, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """float64 [num_mel_bins, fft_size // 2 + 1] triangular filters (kaldi.get_mel_banks).

  Triangles of peak 1, evenly spaced on `kaldi_mel_scale` between LOW_FREQ
  and the Nyquist frequency (num_bins + 2 edges), evaluated at the FFT bin
  frequencies k * sample_rate / fft_size for k < fft_size / 2; the Nyquist
  bin gets weight 0 (torchaudio pads the matrix with a zero column).
  """
  _, _, fft_size = _frame_sizes(sample_rate)
  nyquist = 0.5 * sample_rate
  mel_low, mel_high = kaldi_mel_scale(LOW_FREQ), kaldi_mel_scale(nyquist)
  delta = (mel_high - mel_low) / (num_mel_bins + 1)
  left = mel_low + np.arange(num_mel_bins)[:, None] * delta
  center, right = left + delta, left + 2 * delta
  mel = kaldi_mel_scale(np.arange(fft_size // 2) * sample_rate / fft_size)[None, :]
  up = (mel - left) / (center - left)
  down = (right - mel) / (right - center)
  banks = np.maximum(0.0, np.minimum(up, down))
  banks = np.pad(banks, ((0, 0), (0, 1)))
  banks.flags.writeable = False
  return banks


def _hanning(size: int) -> np.ndarray:
  """Kaldi's 'hanning' window: symmetric, 0.5 - 0.5 cos(2 pi n / (N - 1))."""
  return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(size) / (size - 1))


def kaldi_fbank(
  wave_16k: np.ndarray, num_mel_bins: int = 128, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
  """float32 [frames, num_mel_bins] log mel filterbank, as CAV-MAE calls Kaldi's fbank.

  Follows the definitions of `torchaudio.compliance.kaldi.fbank` with CAV-MAE's
  arguments (htk_compat=True, use_energy=False, window_type='hanning',
  dither=0, frame_shift=10 ms; defaults otherwise: frame_length 25 ms,
  snip_edges, remove_dc_offset, preemphasis 0.97, round_to_power_of_two,
  use_power, use_log_fbank, low_freq 20, high_freq = Nyquist):

  1. frames of 400 samples every 160 (at 16 kHz), only whole frames;
  2. each frame minus its mean (DC offset);
  3. pre-emphasis y[n] = x[n] - 0.97 x[n - 1], with x[-1] := x[0];
  4. times the symmetric Hann window, zero-padded to 512;
  5. power spectrum |rfft|^2, then the `kaldi_mel_banks` filters;
  6. natural log of max(energy, float32 eps).

  With use_energy=False, htk_compat changes nothing. Computed in float64.
  `wave_16k` is mono float samples in [-1, 1] (the scale torchaudio.load
  returns, which CAV-MAE's statistics assume).
  """
  wave = np.asarray(wave_16k, np.float64)
  if wave.ndim != 1:
    raise ValueError(f"kaldi_fbank expects one mono clip [samples], got shape {wave.shape}.")
  size, shift, fft_size = _frame_sizes(sample_rate)
  n = num_fbank_frames(wave.shape[0], sample_rate)
  if n == 0:
    raise ValueError(f"Clip of {wave.shape[0]} samples is shorter than one {size}-sample frame.")
  frames = np.lib.stride_tricks.sliding_window_view(wave, size)[::shift][:n]
  frames = frames - frames.mean(axis=1, keepdims=True)
  previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
  frames = (frames - PREEMPHASIS * previous) * _hanning(size)
  power = np.abs(np.fft.rfft(frames, n=fft_size, axis=1)) ** 2
  energies = power @ kaldi_mel_banks(num_mel_bins, sample_rate).T
  return np.log(np.maximum(energies, LOG_FLOOR)).astype(np.float32)


def resample(wave: np.ndarray, sample_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
  """Band-limited resampling with soxr (as `vggish.py`); CAV-MAE used ffmpeg's resampler."""
  import soxr

  wave = np.asarray(wave, np.float64)
  if int(sample_rate) == int(target_rate):
    return wave
  return soxr.resample(wave, int(sample_rate), int(target_rate))


def pad_or_cut(fbank: Any, length: int) -> Any:
  """Zero-pad at the end or cut to `length` frames (axis -2), as the dataloader does."""
  n = fbank.shape[-2]
  if n >= length:
    return fbank[..., :length, :]
  pad = [(0, 0)] * (fbank.ndim - 2) + [(0, length - n), (0, 0)]
  return jnp.pad(fbank, pad) if isinstance(fbank, jax.Array) else np.pad(fbank, pad)


def normalize_fbank(fbank: Any) -> Any:
  """(fbank - FBANK_MEAN) / FBANK_STD (CAV-MAE's dataloader; std, not 2 * std)."""
  return (fbank - FBANK_MEAN) / FBANK_STD


def audio_input(
  wave: np.ndarray, sample_rate: int, config: CAVMAEConfig | None = None
) -> np.ndarray:
  """float32 [audio_length, num_mel_bins]: a mono clip as CAV-MAE's dataloader feeds it.

  Resample to 16 kHz, subtract the clip mean, `kaldi_fbank`, zero-pad / cut to
  `audio_length` frames, normalise. `wave`: [samples] floats in [-1, 1].
  """
  config = config or CAVMAEConfig()
  wave = np.asarray(wave)
  if wave.ndim != 1 or not np.issubdtype(wave.dtype, np.floating):
    raise ValueError(
      f"audio_input expects a mono float clip [samples], got {wave.dtype} {wave.shape}."
    )
  wave = resample(wave, sample_rate)
  wave = wave - wave.mean()
  fbank = kaldi_fbank(wave, config.num_mel_bins)
  return normalize_fbank(pad_or_cut(fbank, config.audio_length)).astype(np.float32)


# ----------------------------------------------------------------------------
# Video frontend
# ----------------------------------------------------------------------------


def video_input(frames: Any, image_size: int = 224) -> jax.Array:
  """float32 [..., image_size, image_size, 3]: frames as CAV-MAE's dataloader feeds them.

  `frames` [..., H, W, 3] are uint8 (0..255) or floats in [-1, 1] (our video
  convention). The centre square is cropped and resized to `image_size`
  (bicubic, antialiased when shrinking: `jax.image.resize`; the reference
  resizes the short side with PIL bicubic then centre-crops, the same
  geometry), scaled to [0, 1] and normalised with the ImageNet mean / std.
  jit-able.
  """
  x = jnp.asarray(frames)
  if x.ndim < 3 or x.shape[-1] != 3:
    raise ValueError(f"video_input expects [..., H, W, 3] frames, got {tuple(x.shape)}.")
  if jnp.issubdtype(x.dtype, jnp.integer):
    x = x.astype(jnp.float32) / 255.0
  else:
    x = (x.astype(jnp.float32) + 1.0) * 0.5
  h, w = x.shape[-3], x.shape[-2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  x = x[..., top : top + s, left : left + s, :]
  if s != image_size:
    lead = x.shape[:-3]
    x = x.reshape(-1, s, s, 3)
    x = jax.image.resize(x, (x.shape[0], image_size, image_size, 3), method="bicubic")
    x = x.reshape(*lead, image_size, image_size, 3)
  return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


# ----------------------------------------------------------------------------
# Our log-mel -> CAV-MAE's fbank
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _MelMap:
  freq: np.ndarray  # [bins, n_mels] interpolation weights
  offset: np.ndarray  # [bins] log-level offset, added after interpolation
  band_offset: np.ndarray  # [n_mels] per-source-band offset, added before
  valid: np.ndarray  # [bins] bool: the band lies within the source's range
  time: np.ndarray  # [fbank_frames, mel_frames]


def _slaney_mel(hz: np.ndarray) -> np.ndarray:
  import librosa

  return librosa.hz_to_mel(np.asarray(hz, np.float64), htk=False)


@functools.lru_cache(maxsize=16)
def _mel_map(mel_spec: Any, num_mel_bins: int, mel_frames: int) -> _MelMap:
  from avtok_jax.data import audio

  spec = mel_spec
  # Source (our HiFi-GAN-style log-mel): Slaney mel filters on a magnitude
  # spectrum of a periodic Hann window of win_length.
  filters = audio.mel_filters(spec).astype(np.float64)  # [n_mels, n_fft/2+1]
  area = filters.sum(axis=1)
  win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(spec.win_length) / spec.win_length)
  energy_src = np.sum(win**2)
  # log PSD per sample at 16 kHz of a locally noise-like signal from the mel
  # magnitude m: E|X| = sqrt(pi / 4 * P * sum(w^2)) (Rayleigh mean), and the
  # per-sample PSD scales with the sample rate: P16 = P_src * 16000 / sr.
  band_offset = (
    -2.0 * np.log(area) - np.log(np.pi / 4) - np.log(energy_src)
    + np.log(SAMPLE_RATE / spec.sample_rate)
  )  # fmt: skip
  import librosa

  centres_src = librosa.mel_frequencies(spec.n_mels + 2, fmin=spec.fmin, fmax=spec.fmax)[1:-1]
  # Target (Kaldi fbank at 16 kHz): filter centres, filter gains including the
  # pre-emphasis response, window energy.
  banks = kaldi_mel_banks(num_mel_bins, SAMPLE_RATE)
  size, shift, fft_size = _frame_sizes(SAMPLE_RATE)
  omega = 2 * np.pi * np.arange(fft_size // 2 + 1) / fft_size
  preemph = 1.0 - 2.0 * PREEMPHASIS * np.cos(omega) + PREEMPHASIS**2
  gain = banks @ preemph
  energy_dst = np.sum(_hanning(size) ** 2)
  mel_low, mel_high = kaldi_mel_scale(LOW_FREQ), kaldi_mel_scale(SAMPLE_RATE / 2)
  delta = (mel_high - mel_low) / (num_mel_bins + 1)
  centres_dst = kaldi_inverse_mel_scale(mel_low + (np.arange(num_mel_bins) + 1) * delta)
  xp, x = _slaney_mel(centres_src), _slaney_mel(centres_dst)
  freq = np.stack([np.interp(x, xp, e) for e in np.eye(spec.n_mels)], axis=1)
  # Kaldi bands that hold no FFT bin (the narrowest, lowest ones) are always
  # at the floor; so are bands above our fmax (no information there).
  valid = (centres_dst <= min(spec.fmax, spec.sample_rate / 2)) & (gain > 0)
  # Kaldi takes the log of one noisy frame, not of its expectation: for a band
  # summing k independent exponential bins, E[log] = log E - (log k - digamma(k))
  # (k from the triangle's weights; neighbouring windowed bins are correlated,
  # so this is a lower bound on the gap).
  from scipy.special import digamma

  dof = np.where(valid, banks.sum(1) ** 2 / np.maximum((banks**2).sum(1), 1e-30), 1.0)
  jensen = np.log(dof) - digamma(dof)
  offset = np.log(np.where(valid, gain * energy_dst, 1.0)) - jensen
  # Time: our frame t is centred on sample (t + 1/2) * hop (reflect-padded,
  # uncentred framing); Kaldi frame i on (160 i + 200) / 16000 s.
  seconds = mel_frames * spec.hop_length / spec.sample_rate
  n_dst = num_fbank_frames(round(seconds * SAMPLE_RATE))
  t_src = (np.arange(mel_frames) + 0.5) * spec.hop_length / spec.sample_rate
  t_dst = (np.arange(n_dst) * shift + size / 2) / SAMPLE_RATE
  time = np.stack([np.interp(t_dst, t_src, e) for e in np.eye(mel_frames)], axis=1)
  out = _MelMap(freq, offset, band_offset, valid, time)
  for a in (out.freq, out.offset, out.band_offset, out.valid, out.time):
    a.flags.writeable = False
  return out


def mel_to_fbank(mel: jax.Array, mel_spec: Any, num_mel_bins: int = 128) -> jax.Array:
  """Our normalised log-mel [B, n_mels, L] -> an estimate of Kaldi's log fbank [B, frames, bins].

  `frames` = `num_fbank_frames` of the clip's duration at 16 kHz (L * hop / sr
  seconds); not padded and not normalised. A 128-band Kaldi fbank cannot be
  recovered exactly from an 80-band magnitude mel of another window, so this
  is an estimate under stated assumptions, all constants computed from the
  two definitions:

  * levels: each of our bands is read as the log power spectral density of a
    locally noise-like signal (mel magnitude = filter area x Rayleigh mean
    sqrt(pi/4 x PSD x window energy)); the PSD is rescaled to 16 kHz samples,
    and each Kaldi band is that PSD times its filter gain (sum of its
    triangle, weighted by the pre-emphasis response) and its window energy;
  * frequency: log-PSD linearly interpolated on the (Slaney) mel axis from
    our band centres to the Kaldi band centres, held constant beyond our
    first / last centre; Kaldi bands above our fmax get the log floor;
  * time: linear interpolation from our frame centres to Kaldi's;
  * Kaldi logs one noisy frame, not its expectation: each band's level is
    lowered by the mean log-gap of a sum of k exponential bins, log k -
    digamma(k), k = (sum of its weights)^2 / (sum of squares);
  * then the Kaldi floor log(float32 eps); Kaldi bands that hold no FFT bin
    are at the floor, as in Kaldi.

  Measured on 4.46 s clips at 22,050 Hz (paper MelSpec) against
  `kaldi_fbank` of the same waveform, in normalised units (/ FBANK_STD;
  the exact fbank's spread is ~0.5-0.8 there): white or low-passed noise,
  bias < 0.01 and mean |error| 0.12; tones + weak noise, bias -0.05 and mean
  |error| 0.17 (the rest is the frame-to-frame noise of a 25 ms power
  spectrum, which an 80-band magnitude mel does not carry).

  Per-frame DC removal and the clip-mean removal are not modelled (they only
  touch the lowest band). `mel_spec` is an `audio.MelSpec` (hashable);
  jit-able (the maps are numpy constants built per input length).
  """
  if mel.ndim != 3 or mel.shape[1] != mel_spec.n_mels:
    raise ValueError(f"mel_to_fbank expects [B, {mel_spec.n_mels}, L], got {tuple(mel.shape)}.")
  from avtok_jax.data import audio

  m = _mel_map(mel_spec, int(num_mel_bins), int(mel.shape[2]))
  hp = jax.lax.Precision.HIGHEST
  log_mel = audio.denormalize(jnp.asarray(mel, jnp.float32), mel_spec)
  log_psd = 2.0 * log_mel + jnp.asarray(m.band_offset, jnp.float32)[:, None]
  log_fb = jnp.einsum("jm,bml->bjl", jnp.asarray(m.freq, jnp.float32), log_psd, precision=hp)
  log_fb = log_fb + jnp.asarray(m.offset, jnp.float32)[:, None]
  floor = math.log(LOG_FLOOR)
  log_fb = jnp.where(jnp.asarray(m.valid)[:, None], log_fb, floor)
  log_fb = jnp.einsum("bjl,kl->bkj", log_fb, jnp.asarray(m.time, jnp.float32), precision=hp)
  return jnp.maximum(log_fb, floor)


# ----------------------------------------------------------------------------
# Loading and the teacher
# ----------------------------------------------------------------------------


def load_cav_mae(
  path: PathLike, config: CAVMAEConfig | None = None, **overrides: Any
) -> tuple[dict[str, Any], CAVMAEConfig]:
  """(variables {'params': ...}, config) from a converted folder or a flat .npz/.safetensors.

  A folder is what `python -m avtok_jax.pretrained.convert --net=cav_mae`
  writes (`weights.load_converted(path, 'cav_mae')`); a file holds the public
  PyTorch keys (`module.` prefix allowed) and is converted here. Without
  `config` the sizes come from the shapes (`infer_config`; pass e.g.
  `num_heads=` for non-ViT-B widths). The tree is checked against the
  encoder built from the config; mismatches raise ValueError naming `path`.
  """
  source = repr(os.fspath(path))
  if weights.is_converted(path) or os.path.isdir(path):
    variables = weights.load_converted(path, "cav_mae")
    stored = weights.converted_info(path).get("config")
    if config is None and stored is not None:
      config = weights.config_from_json(CAVMAEConfig, stored, source=source)
      config = dataclasses.replace(config, **overrides)
    elif config is None:
      config = config_from_params(variables["params"], **overrides)
    elif overrides:
      config = dataclasses.replace(config, **overrides)
  else:
    state_dict = _strip_module(weights.load_state_dict(path))
    if config is None:
      config = infer_config(state_dict, **overrides)
    elif overrides:
      config = dataclasses.replace(config, **overrides)
    variables = convert_state_dict(state_dict, source=source, config=config)
  expected = jax.eval_shape(CAVMAEEncoder(config).init, jax.random.key(0), *example_inputs(config))
  weights.check_variables({"params": variables["params"]}, expected, source=source)
  return {"params": variables["params"]}, config


class CAVMAETeacher:
  """CAV-MAE as an `alignment.FeatureTeacher` (frozen, jit-able, params closed over).

  * `video_features(video [B, T, H, W, 3] in [-1, 1])`: every `frame_stride`-th
    frame through `video_input` and the video tower (CAV-MAE is an image
    model: one frame at a time) -> [B, ceil(T / frame_stride), g, g, C] with
    g = image_size / patch (14 for ViT-B).
  * `audio_features(mel [B, n_mels, L])`: our normalised log-mel ->
    `mel_to_fbank` -> zero-pad to `audio_length` frames (as the dataloader
    pads the fbank) -> normalise -> audio tower -> [B, bins / p, t, C]
    (frequency x time, like our mel), keeping only the t = ceil(frames / p)
    time columns that see the clip (the rest only see padding).
  * `audio_features_from_wave(wave [B, S], sample_rate)`: the exact fbank
    path (numpy, not jit-able) for evaluation.

  C = `feature_dim` = width (768). `mel_spec` is the `audio.MelSpec` of the
  mel the teacher receives (`audio.MelSpec.from_config(config.data)`).
  """

  def __init__(
    self,
    params: Mapping[str, Any],
    config: CAVMAEConfig,
    mel_spec: Any,
    *,
    frame_stride: int = 1,
    dtype: Any = jnp.float32,
    precision: Any = None,
  ):
    if int(frame_stride) < 1:
      raise ValueError(f"frame_stride must be >= 1, got {frame_stride}.")
    self.config = config
    self.mel_spec = mel_spec
    self.frame_stride = int(frame_stride)
    self.model = CAVMAEEncoder(config, dtype=dtype, precision=precision)
    self.params = jax.device_put(jax.tree_util.tree_map(jnp.asarray, dict(params)))

  @property
  def feature_dim(self) -> int:
    return self.config.width

  def encode_video(self, frames: jax.Array) -> jax.Array:
    """Normalised frames [N, S, S, 3] -> [N, Nv, C]."""
    return self.model.apply({"params": self.params}, frames, method=CAVMAEEncoder.video)

  def encode_audio(self, fbank: jax.Array) -> jax.Array:
    """Normalised fbank [N, audio_length, bins] -> [N, Na, C]."""
    return self.model.apply({"params": self.params}, fbank, method=CAVMAEEncoder.audio)

  def video_features(self, video: jax.Array) -> jax.Array:
    if video.ndim != 5 or video.shape[-1] != 3:
      raise ValueError(f"video_features expects [B, T, H, W, 3], got {tuple(video.shape)}.")
    video = video[:, :: self.frame_stride]
    b, t = video.shape[:2]
    frames = video_input(video.reshape(b * t, *video.shape[2:]), self.config.image_size)
    feats = self.encode_video(frames)
    g = self.config.video_grid
    return jax.lax.stop_gradient(feats.reshape(b, t, *g, self.config.width))

  def audio_features(self, mel: jax.Array) -> jax.Array:
    if mel.ndim != 3:
      raise ValueError(f"audio_features expects [B, F, L], got {tuple(mel.shape)}.")
    fbank = mel_to_fbank(mel, self.mel_spec, self.config.num_mel_bins)
    return self._audio_tokens(normalize_fbank(pad_or_cut(fbank, self.config.audio_length)),
                              fbank.shape[1])  # fmt: skip

  def audio_features_from_wave(self, wave: np.ndarray, sample_rate: int) -> jax.Array:
    """Exact CAV-MAE audio path from waveforms [B, S] (numpy preprocessing, then the tower)."""
    wave = np.asarray(wave)
    if wave.ndim != 2:
      raise ValueError(f"audio_features_from_wave expects [B, samples], got {wave.shape}.")
    fbank = np.stack([audio_input(w, sample_rate, self.config) for w in wave])
    frames = num_fbank_frames(resample(wave[0], sample_rate).shape[0])
    return self._audio_tokens(jnp.asarray(fbank), frames)

  def _audio_tokens(self, fbank: jax.Array, frames: int) -> jax.Array:
    c = self.config
    feats = self.encode_audio(fbank).reshape(fbank.shape[0], *c.audio_grid, c.width)
    keep = max(1, min(c.audio_grid[1], -(-frames // c.patch_size)))
    return jax.lax.stop_gradient(feats[:, :, :keep])


def load_cav_mae_teacher(
  path: PathLike,
  mel_spec: Any,
  *,
  config: CAVMAEConfig | None = None,
  frame_stride: int = 1,
  dtype: Any = jnp.float32,
  precision: Any = None,
  **overrides: Any,
) -> CAVMAETeacher:
  """`CAVMAETeacher` from `load_cav_mae(path, config, **overrides)`."""
  variables, config = load_cav_mae(path, config, **overrides)
  return CAVMAETeacher(
    variables["params"], config, mel_spec, frame_stride=frame_stride, dtype=dtype,
    precision=precision,
  )  # fmt: skip
