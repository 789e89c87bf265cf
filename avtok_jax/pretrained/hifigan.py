"""HiFi-GAN generator (the mel -> waveform vocoder) as a Flax module, with weights from a file.

HiFi-GAN: Kong, Kim and Bae 2020, "HiFi-GAN: Generative Adversarial Networks
for Efficient and High Fidelity Speech Synthesis". Structure and constants
follow the public reference implementation, the jik876/hifi-gan repository:
`models.py` (classes `Generator` and `ResBlock1`) and `config_v1.json`; the
mel it was trained on is `meldataset.py::mel_spectrogram`. Only the
generator is ported (the discriminators are not needed to vocode).

Generator (`models.py::Generator.forward`), on a natural-log mel [B, n_mels, T]:

* `conv_pre`: Conv1d(n_mels -> C, kernel 7, padding 3), C = upsample_initial_channel;
* for each upsampling level i with rate u and kernel k: leaky_relu(slope 0.1)
  (`LRELU_SLOPE`), then `ups.{i}`: ConvTranspose1d(C / 2^i -> C / 2^(i+1),
  kernel k, stride u, padding (k - u) // 2), which lengthens T to
  (T - 1) u - 2 ((k - u) // 2) + k (= T u when k - u is even); then the MEAN of
  the level's resblocks `resblocks.{i * K + j}` (j < K = len(resblock_kernel_sizes))
  applied to the same input;
* ResBlock1 with kernel k and dilations (d_1, d_2, ...): for each m,
  x <- x + convs2.m(leaky_relu(convs1.m(leaky_relu(x, 0.1)), 0.1)), where
  convs1.m is Conv1d(k, dilation d_m, padding d_m (k - 1) / 2) and convs2.m is
  Conv1d(k, dilation 1, padding (k - 1) / 2), both C -> C channels with bias;
* leaky_relu with torch's default slope 0.01 (`F.leaky_relu(x)`), `conv_post`:
  Conv1d(C / 2^L -> 1, kernel 7, padding 3, with bias), tanh.

So the output has T * prod(upsample_rates) samples: the hop length of the mel.

V1 (`config_v1.json`, the 22.05 kHz, 80-band `generator_v1` release; the
LJSpeech / VCTK / universal V1 checkpoints share it): upsample_rates
[8, 8, 2, 2], upsample_kernel_sizes [16, 16, 4, 4], upsample_initial_channel
512, resblock "1", resblock_kernel_sizes [3, 7, 11], resblock_dilation_sizes
[[1, 3, 5]] * 3; 13.92 M parameters (Table 1 of the paper). Its mel
(`config_v1.json`: sampling_rate 22050, n_fft 1024, hop_size 256, win_size
1024, num_mels 80, fmin 0, fmax 8000; `meldataset.py`: reflect padding of
(n_fft - hop) / 2, no centring, Hann window, magnitude, librosa Slaney mel
filters, natural log of max(mel, 1e-5)) is the one `avtok_jax.data.audio`
computes (HiFi-GAN adds 1e-9 to the power before the square root, which only
moves bins far below the 1e-5 floor). `HIFIGAN_V1_MEL` holds those settings.
ResBlock2 (resblock "2", `config_v3.json`) is not supported.

Checkpoints (`generator_v1`, `g_02500000`, ...) are `{'generator': state_dict}`
and keep torch's weight normalisation (`torch.nn.utils.weight_norm`, dim 0):
`{name}.weight_g`, `{name}.weight_v`, `{name}.bias` for name in `conv_pre`,
`ups.{i}`, `resblocks.{j}.convs1.{m}`, `resblocks.{j}.convs2.{m}`, `conv_post`.
v has the layer's weight shape (Conv1d [out, in, k]; ConvTranspose1d
[in, out, k]) and g the shape [v.shape[0], 1, 1]; the weight is
w = g * v / ||v||, the norm over all axes but 0. `convert_state_dict` folds
that, and also accepts weights whose normalisation was removed (plain
`{name}.weight`) and the newer parametrisation keys
`{name}.parametrizations.weight.original0` (g) / `.original1` (v).

Flax layout (`HiFiGANGenerator`): input [B, n_mels, T] as torch (our
pipeline's mel layout too), output [B, T * hop]; internally NWC. Each conv
holds `kernel` [k, in, out] and `bias` [out]; for the transposed convs
`kernel[j, c, o] = torch_weight[c, o, j]` (no flip stored; the module flips it).
Modules are named `conv_pre`, `ups_{i}`, `resblocks_{j}` (with `convs1_{m}`,
`convs2_{m}`) and `conv_post`.

Use: `convert.py --net=hifigan --src=generator_v1 --dst=DIR` once, then
`load_vocoder(DIR, mel_spec=spec)` gives a `Vocoder` that takes our
normalised mels ([..., n_mels, frames], `audio.normalize` units), maps them
back with `audio.denormalize` and returns float32 waves at the vocoder's
sample rate. `Vocoder.mel_to_wave(log_mel, spec)` has the signature of
`audio.mel_to_wave` (Griffin-Lim) for drop-in use.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avtok_jax.data import audio as audio_lib
from avtok_jax.pretrained import weights

PathLike = str | os.PathLike

# leaky_relu slope inside the generator (`models.py`: LRELU_SLOPE = 0.1).
LRELU_SLOPE = 0.1
# Slope of the last leaky_relu before conv_post (`F.leaky_relu` default, torch).
FINAL_LRELU_SLOPE = 0.01
# conv_pre / conv_post kernel size and padding (`models.py::Generator`).
OUTER_KERNEL = 7
# The mel the V1 weights were trained on (`config_v1.json` + `meldataset.py`, see above).
# norm_min / norm_max / griffin_lim_iters are ours and are not compared.
HIFIGAN_V1_MEL = audio_lib.MelSpec(
  sample_rate=22050,
  n_fft=1024,
  hop_length=256,
  win_length=1024,
  n_mels=80,
  fmin=0.0,
  fmax=8000.0,
  log_floor=1e-5,
)
# MelSpec fields that define the log-mel transform (what a vocoder is trained on).
MEL_FIELDS = (
  "sample_rate",
  "n_fft",
  "hop_length",
  "win_length",
  "n_mels",
  "fmin",
  "fmax",
  "log_floor",
)


@dataclasses.dataclass(frozen=True)
class HiFiGANConfig:
  """Generator hyper-parameters; the defaults are `config_v1.json` (HiFi-GAN V1)."""

  n_mels: int = 80
  upsample_rates: tuple[int, ...] = (8, 8, 2, 2)
  upsample_kernel_sizes: tuple[int, ...] = (16, 16, 4, 4)
  upsample_initial_channel: int = 512
  resblock: str = "1"
  resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
  resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))

  def __post_init__(self):
    # Accept lists (e.g. from a JSON config) but store hashable tuples: the
    # config is a static argument of the jitted generator.
    for name in ("upsample_rates", "upsample_kernel_sizes", "resblock_kernel_sizes"):
      object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
    dil = tuple(tuple(int(d) for d in ds) for ds in self.resblock_dilation_sizes)
    object.__setattr__(self, "resblock_dilation_sizes", dil)
    problems = []
    if str(self.resblock) != "1":
      problems.append(
        f"resblock={self.resblock!r}: only ResBlock1 (resblock '1', the V1/V2 generators) is "
        "ported; ResBlock2 (resblock '2', config_v3.json) is not supported"
      )
    if len(self.upsample_rates) != len(self.upsample_kernel_sizes) or not self.upsample_rates:
      problems.append(
        f"upsample_rates {self.upsample_rates} and upsample_kernel_sizes "
        f"{self.upsample_kernel_sizes} must be non-empty and of equal length"
      )
    for u, k in zip(self.upsample_rates, self.upsample_kernel_sizes, strict=False):
      if u < 1 or k < u:
        problems.append(f"upsample rate {u} with kernel {k}: need 1 <= rate <= kernel")
    if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
      problems.append(
        f"resblock_kernel_sizes {self.resblock_kernel_sizes} and resblock_dilation_sizes "
        f"{self.resblock_dilation_sizes} must have equal length"
      )
    for k in self.resblock_kernel_sizes:
      if k < 1 or k % 2 == 0:
        problems.append(f"resblock kernel {k} must be odd (padding d * (k - 1) / 2)")
    if self.upsample_initial_channel % (2 ** len(self.upsample_rates)):
      problems.append(
        f"upsample_initial_channel={self.upsample_initial_channel} must be divisible by "
        f"2^{len(self.upsample_rates)}"
      )
    if problems:
      raise ValueError("Invalid HiFiGANConfig: " + "; ".join(problems) + ".")

  @property
  def hop_length(self) -> int:
    """Output samples per mel frame: the product of the upsampling rates."""
    return math.prod(self.upsample_rates)

  def channels(self, level: int) -> int:
    """Channels after upsampling level `level` (0-based); level -1 is conv_pre's output."""
    return self.upsample_initial_channel // 2 ** (level + 1)


# ----------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------


class Conv1d(nn.Module):
  """torch Conv1d (stride 1, symmetric zero padding, dilation) on NWC; kernel [k, in, out]."""

  features: int
  kernel_size: int
  dilation: int = 1
  padding: int = 0
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
      "kernel",
      nn.initializers.lecun_normal(),
      (self.kernel_size, x.shape[-1], self.features),
      jnp.float32,
    )
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    y = jax.lax.conv_general_dilated(
      x,
      kernel,
      window_strides=(1,),
      padding=((self.padding, self.padding),),
      rhs_dilation=(self.dilation,),
      dimension_numbers=("NWC", "WIO", "NWC"),
      precision=self.precision,
    )
    return y + bias


class ConvTranspose1d(nn.Module):
  """torch ConvTranspose1d (output_padding 0, dilation 1) on NWC.

  torch: y[t] = sum_{i, j: i * stride - padding + j = t} W[:, :, j]^T x[i], length
  (T - 1) * stride - 2 * padding + k. The same as a stride-1 correlation of the
  input dilated by `stride` (stride - 1 zeros between samples), zero-padded by
  k - 1 - padding on each side, with the kernel reversed in time: that is
  what runs here (`lhs_dilation`). kernel[j, c, o] = torch weight[c, o, j].
  """

  features: int
  kernel_size: int
  stride: int
  padding: int = 0
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param(
      "kernel", nn.initializers.lecun_normal(), (k, x.shape[-1], self.features), jnp.float32
    )
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    edge = k - 1 - self.padding
    y = jax.lax.conv_general_dilated(
      x,
      kernel[::-1],
      window_strides=(1,),
      padding=((edge, edge),),
      lhs_dilation=(self.stride,),
      dimension_numbers=("NWC", "WIO", "NWC"),
      precision=self.precision,
    )
    return y + bias


class ResBlock1(nn.Module):
  """HiFi-GAN ResBlock1 (`models.py`): x + convs2(lrelu(convs1(lrelu(x)))) per dilation."""

  channels: int
  kernel_size: int
  dilations: tuple[int, ...]
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    for m, d in enumerate(self.dilations):
      h = nn.leaky_relu(x, LRELU_SLOPE)
      h = Conv1d(
        self.channels, k, d, d * (k - 1) // 2, precision=self.precision, name=f"convs1_{m}"
      )(h)
      h = nn.leaky_relu(h, LRELU_SLOPE)
      h = Conv1d(self.channels, k, 1, (k - 1) // 2, precision=self.precision, name=f"convs2_{m}")(h)
      x = x + h
    return x


class HiFiGANGenerator(nn.Module):
  """HiFi-GAN generator: natural-log mel [B, n_mels, T] -> waveform [B, T * hop] in [-1, 1].

  The mel is in HiFi-GAN's own units (`audio.log_mel`, NOT `audio.normalize`d).
  """

  config: HiFiGANConfig = HiFiGANConfig()
  precision: Any = None

  @nn.compact
  def __call__(self, mel: jax.Array) -> jax.Array:
    cfg = self.config
    if mel.ndim != 3 or mel.shape[1] != cfg.n_mels:
      raise ValueError(f"HiFiGANGenerator expects mel [B, {cfg.n_mels}, T], got {mel.shape}.")
    pad = (OUTER_KERNEL - 1) // 2
    x = jnp.swapaxes(mel.astype(jnp.float32), 1, 2)  # NWC
    x = Conv1d(cfg.channels(-1), OUTER_KERNEL, 1, pad, self.precision, name="conv_pre")(x)
    num_kernels = len(cfg.resblock_kernel_sizes)
    for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True)):
      x = nn.leaky_relu(x, LRELU_SLOPE)
      ch = cfg.channels(i)
      x = ConvTranspose1d(ch, k, u, (k - u) // 2, self.precision, name=f"ups_{i}")(x)
      total = None
      for j, (rk, dil) in enumerate(
        zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True)
      ):
        y = ResBlock1(ch, rk, dil, self.precision, name=f"resblocks_{i * num_kernels + j}")(x)
        total = y if total is None else total + y
      x = total / num_kernels
    x = nn.leaky_relu(x, FINAL_LRELU_SLOPE)
    x = Conv1d(1, OUTER_KERNEL, 1, pad, self.precision, name="conv_post")(x)
    return jnp.tanh(x[..., 0])


@functools.partial(jax.jit, static_argnames=("config", "precision"))
def generator_apply(
  params: Any, log_mel: jax.Array, *, config: HiFiGANConfig, precision: Any = None
) -> jax.Array:
  """Pure jitted generator: params tree, natural-log mel [B, n_mels, T] -> [B, T * hop].

  Compiled once per (config, precision, input shape); shared by all `Vocoder`s.
  """
  return HiFiGANGenerator(config, precision).apply({"params": params}, log_mel)


# ----------------------------------------------------------------------------
# PyTorch state dict -> Flax params
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layer:
  """One weight-normalised torch conv: its key prefix, Flax path and torch weight shape."""

  prefix: str
  path: tuple[str, ...]
  shape: tuple[int, ...]  # torch layout: Conv1d [out, in, k], ConvTranspose1d [in, out, k]
  transposed: bool = False

  @property
  def out_channels(self) -> int:
    return self.shape[1] if self.transposed else self.shape[0]


def _layers(config: HiFiGANConfig) -> list[_Layer]:
  """Every conv of the generator, in `models.py` order."""
  cfg = config
  out = [_Layer("conv_pre", ("conv_pre",), (cfg.channels(-1), cfg.n_mels, OUTER_KERNEL))]
  num_kernels = len(cfg.resblock_kernel_sizes)
  for i, k in enumerate(cfg.upsample_kernel_sizes):
    c_in, c_out = cfg.channels(i - 1), cfg.channels(i)
    out.append(_Layer(f"ups.{i}", (f"ups_{i}",), (c_in, c_out, k), transposed=True))
    for j, (rk, dil) in enumerate(
      zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True)
    ):
      r = i * num_kernels + j
      for conv in ("convs1", "convs2"):
        for m in range(len(dil)):
          out.append(
            _Layer(
              f"resblocks.{r}.{conv}.{m}", (f"resblocks_{r}", f"{conv}_{m}"), (c_out, c_out, rk)
            )
          )
  last = cfg.channels(len(cfg.upsample_rates) - 1)
  out.append(_Layer("conv_post", ("conv_post",), (1, last, OUTER_KERNEL)))
  return out


# Weight-norm key pairs (g, v): torch.nn.utils.weight_norm and the newer parametrisation.
_WEIGHT_NORM_KEYS = (
  ("weight_g", "weight_v"),
  ("parametrizations.weight.original0", "parametrizations.weight.original1"),
)


def _torch_weight_shape(state_dict: Mapping[str, Any], prefix: str) -> tuple[int, ...] | None:
  """Shape of a layer's torch weight (plain or weight-norm v), or None when absent."""
  for key in (f"{prefix}.weight", *(f"{prefix}.{v}" for _, v in _WEIGHT_NORM_KEYS)):
    if key in state_dict:
      return tuple(np.shape(state_dict[key]))
  return None


def _check_float(key: str, value: np.ndarray, problems: list[str]) -> bool:
  if not np.issubdtype(value.dtype, np.floating):
    problems.append(f"key {key!r} has dtype {value.dtype}, expected a float dtype")
    return False
  if not np.all(np.isfinite(value)):
    problems.append(f"key {key!r} contains NaN or Inf")
    return False
  return True


def fold_weight_norm(g: np.ndarray, v: np.ndarray) -> np.ndarray:
  """w = g * v / ||v|| (norm over all axes but 0, torch `weight_norm(dim=0)`), in float64."""
  v64 = np.asarray(v, np.float64)
  norm = np.sqrt(np.sum(np.square(v64), axis=tuple(range(1, v64.ndim)), keepdims=True))
  return (np.asarray(g, np.float64).reshape(norm.shape) * v64 / norm).astype(np.float32)


def _layer_weight(
  state_dict: Mapping[str, Any], layer: _Layer, problems: list[str]
) -> np.ndarray | None:
  """The layer's plain torch weight (weight norm folded), or None after noting a problem."""
  p, shape = layer.prefix, layer.shape
  g_shape = (shape[0], 1, 1)
  for g_name, v_name in _WEIGHT_NORM_KEYS:
    g_key, v_key = f"{p}.{g_name}", f"{p}.{v_name}"
    if g_key not in state_dict and v_key not in state_dict:
      continue
    if f"{p}.weight" in state_dict:
      problems.append(f"layer {p!r} has both {p}.weight and {g_key}/{v_key}")
      return None
    if g_key not in state_dict or v_key not in state_dict:
      have, lack = (g_key, v_key) if g_key in state_dict else (v_key, g_key)
      problems.append(f"missing key {lack!r} (weight norm: {have!r} is present)")
      return None
    g, v = np.asarray(state_dict[g_key]), np.asarray(state_dict[v_key])
    ok = True
    for key, value, want in ((g_key, g, g_shape), (v_key, v, shape)):
      if tuple(value.shape) != want:
        problems.append(f"key {key!r} has shape {tuple(value.shape)}, expected {want}")
        ok = False
      elif not _check_float(key, value, problems):
        ok = False
    if not ok:
      return None
    if np.any(np.all(v.reshape(v.shape[0], -1) == 0, axis=1)):
      problems.append(f"key {v_key!r} has an all-zero slice: its weight norm is undefined")
      return None
    return fold_weight_norm(g, v)
  key = f"{p}.weight"
  if key not in state_dict:
    problems.append(
      f"missing key {p + '.weight_g'!r} / {p + '.weight_v'!r} (or {key!r} without weight "
      f"norm; expected weight shape {shape})"
    )
    return None
  w = np.asarray(state_dict[key])
  if tuple(w.shape) != shape:
    problems.append(f"key {key!r} has shape {tuple(w.shape)}, expected {shape}")
    return None
  if not _check_float(key, w, problems):
    return None
  return w.astype(np.float32)


def hifigan_state_dict_shapes(config: HiFiGANConfig | None = None) -> dict[str, tuple[int, ...]]:
  """{torch key: shape} of a weight-normalised generator checkpoint (V1 by default)."""
  out = {}
  for layer in _layers(config or HiFiGANConfig()):
    out[f"{layer.prefix}.weight_g"] = (layer.shape[0], 1, 1)
    out[f"{layer.prefix}.weight_v"] = layer.shape
    out[f"{layer.prefix}.bias"] = (layer.out_channels,)
  return out


def _known_keys(layer: _Layer) -> set[str]:
  keys = {f"{layer.prefix}.weight", f"{layer.prefix}.bias"}
  for g, v in _WEIGHT_NORM_KEYS:
    keys |= {f"{layer.prefix}.{g}", f"{layer.prefix}.{v}"}
  return keys


def _infer(
  n_mels: int,
  channels: int,
  up_kernels: Sequence[int],
  resblock_kernels: Sequence[int],
  num_dilations: int,
  source: str,
  overrides: Mapping[str, Any] | None = None,
) -> HiFiGANConfig:
  """A config from the sizes that weights reveal (see `infer_config`), then `overrides`."""
  overrides = dict(overrides or {})
  problems = []
  if any(k % 2 for k in up_kernels) and "upsample_rates" not in overrides:
    problems.append(f"upsample kernel sizes {tuple(up_kernels)} are not all even")
  if num_dilations != 3 and "resblock_dilation_sizes" not in overrides:
    problems.append(f"resblocks have {num_dilations} dilated convs, not 3 (dilations 1, 3, 5)")
  if problems:
    raise ValueError(
      f"Cannot infer the HiFi-GAN config of {source}: " + "; ".join(problems) + ". Its upsample "
      "rates / dilations are not the public V1/V2 ones; pass config=HiFiGANConfig(...) (converter: "
      "--set=upsample_rates=[...] --set=resblock_dilation_sizes=[[...], ...])."
    )
  inferred = dict(
    n_mels=n_mels,
    upsample_rates=tuple(k // 2 for k in up_kernels),
    upsample_kernel_sizes=tuple(up_kernels),
    upsample_initial_channel=channels,
    resblock_kernel_sizes=tuple(resblock_kernels),
    resblock_dilation_sizes=((1, 3, 5),) * len(resblock_kernels),
  )
  fields = {f.name for f in dataclasses.fields(HiFiGANConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"{source}: unknown HiFiGANConfig fields {unknown} (known: {sorted(fields)}).")
  overrides = {k: weights.lists_to_tuples(v) for k, v in overrides.items()}
  return HiFiGANConfig(**{**inferred, **overrides})


def _count(keys: Sequence[str], pattern: str) -> int:
  """1 + the largest index captured by `pattern` among `keys` (0 when none match)."""
  found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
  return max(found) + 1 if found else 0


def infer_config(
  state_dict: Mapping[str, Any], *, source: str = "state dict", **overrides: Any
) -> HiFiGANConfig:
  """The generator config implied by a torch state dict's keys and shapes.

  Read from the weights: n_mels and upsample_initial_channel (conv_pre), the
  number of upsampling levels and their kernel sizes (`ups.{i}`), the
  resblock kernel sizes and count per level (`resblocks.{j}`). NOT in the
  weights, so assumed as in every public ResBlock1 config (V1, V2): upsample
  rate = kernel / 2, and dilations (1, 3, 5) (3 dilated convs per resblock).
  Anything else needs an explicit `config=`. Falls back to the V1 value for a
  part whose keys are missing, so that `convert_state_dict` can then name
  every missing key at once.
  """
  keys = list(state_dict)
  if any(re.match(r"resblocks\.\d+\.convs\.\d+\.", k) for k in keys):
    raise ValueError(
      f"{source} holds ResBlock2 weights (resblocks.*.convs.*: resblock '2', config_v3.json); "
      "only ResBlock1 generators (V1, V2) are supported."
    )
  v1 = HiFiGANConfig()
  pre = _torch_weight_shape(state_dict, "conv_pre")
  channels, n_mels = (pre[0], pre[1]) if pre and len(pre) == 3 else (512, 80)
  num_ups = _count(keys, r"ups\.(\d+)\.")
  up_kernels = []
  for i in range(num_ups):
    shape = _torch_weight_shape(state_dict, f"ups.{i}")
    fallback = v1.upsample_kernel_sizes[i] if i < len(v1.upsample_kernel_sizes) else 16
    up_kernels.append(shape[-1] if shape else fallback)
  num_blocks = _count(keys, r"resblocks\.(\d+)\.")
  if not num_ups or num_blocks % num_ups or not num_blocks:
    return v1  # broken beyond inference: let the key checks against V1 report it
  resblock_kernels = []
  for j in range(num_blocks // num_ups):
    shape = _torch_weight_shape(state_dict, f"resblocks.{j}.convs1.0")
    resblock_kernels.append(shape[-1] if shape else 3)
  num_dilations = _count(keys, r"resblocks\.0\.convs1\.(\d+)\.")
  return _infer(n_mels, channels, up_kernels, resblock_kernels, num_dilations, source, overrides)


def config_from_params(params: Mapping[str, Any], *, source: str = "params") -> HiFiGANConfig:
  """`infer_config` for a Flax params tree (as `convert_state_dict` builds it)."""
  try:
    k_pre, n_mels, channels = np.shape(params["conv_pre"]["kernel"])
    num_ups = _count(list(params), r"ups_(\d+)$")
    up_kernels = [np.shape(params[f"ups_{i}"]["kernel"])[0] for i in range(num_ups)]
    num_blocks = _count(list(params), r"resblocks_(\d+)$")
    if not num_ups or not num_blocks or num_blocks % num_ups:
      raise ValueError(f"{num_ups} upsampling levels and {num_blocks} resblocks")
    rks = [
      np.shape(params[f"resblocks_{j}"]["convs1_0"]["kernel"])[0]
      for j in range(num_blocks // num_ups)
    ]
    num_dilations = _count(list(params["resblocks_0"]), r"convs1_(\d+)$")
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{source} is not a HiFi-GAN generator params tree: {e!r}") from e
  return _infer(n_mels, channels, up_kernels, rks, num_dilations, source)


CONFIG_CLASS = HiFiGANConfig


def config_for_state_dict(
  state_dict: Mapping[str, Any], *, source: str = "state dict", **overrides: Any
) -> HiFiGANConfig:
  """`infer_config` with `overrides` (the converter's `--set`), which may supply the
  upsample rates / dilations that the shapes cannot; `convert_state_dict` then
  checks every shape against the result."""
  return infer_config(state_dict, source=source, **overrides)


def convert_state_dict(
  state_dict: Mapping[str, Any],
  source: str = "state dict",
  config: HiFiGANConfig | None = None,
) -> dict[str, Any]:
  """Checks a flat HiFi-GAN generator state dict and builds `{'params': tree}` (numpy float32).

  Weight norm is folded (w = g v / ||v||); plain `.weight` keys (weight norm
  removed) are accepted too. `config` defaults to `infer_config(state_dict)`.
  Every missing, mis-shaped, non-float, non-finite or unexpected key is named
  in one ValueError together with `source`.
  """
  config = config or infer_config(state_dict, source=source)
  problems: list[str] = []
  tree: dict[str, Any] = {}
  known: set[str] = set()
  for layer in _layers(config):
    known |= _known_keys(layer)
    w = _layer_weight(state_dict, layer, problems)
    b_key = f"{layer.prefix}.bias"
    b = None
    if b_key not in state_dict:
      problems.append(f"missing key {b_key!r} (expected shape {(layer.out_channels,)})")
    else:
      b = np.asarray(state_dict[b_key])
      if tuple(b.shape) != (layer.out_channels,):
        problems.append(
          f"key {b_key!r} has shape {tuple(b.shape)}, expected {(layer.out_channels,)}"
        )
        b = None
      elif not _check_float(b_key, b, problems):
        b = None
    if w is None or b is None:
      continue
    # ConvTranspose1d [in, out, k] -> [k, in, out]; Conv1d [out, in, k] -> [k, in, out].
    kernel = np.transpose(w, (2, 0, 1) if layer.transposed else (2, 1, 0))
    node = tree
    for part in layer.path:
      node = node.setdefault(part, {})
    node["kernel"] = np.ascontiguousarray(kernel, np.float32)
    node["bias"] = np.ascontiguousarray(b, np.float32)
  extra = sorted(k for k in state_dict if k not in known)
  if extra:
    problems.append(f"unexpected keys {extra[:10]} ({len(extra)} in all; config {config})")
  if problems:
    raise ValueError(
      f"Invalid HiFi-GAN generator weights in {source}: " + "; ".join(problems) + "."
    )
  return {"params": tree}


# ----------------------------------------------------------------------------
# Vocoder
# ----------------------------------------------------------------------------


def mel_mismatches(a: Any, b: Any) -> list[str]:
  """The log-mel transform fields (`MEL_FIELDS`) in which two MelSpecs differ."""
  out = []
  for name in MEL_FIELDS:
    x, y = getattr(a, name), getattr(b, name)
    if not math.isclose(float(x), float(y), rel_tol=1e-9, abs_tol=0.0):
      out.append(f"{name} {x} vs {y}")
  return out


class Vocoder:
  """A HiFi-GAN generator with loaded weights, for our normalised mels.

  `vocoder(mel)`: mel [..., n_mels, frames] in `audio.normalize` units (the
  model's) -> float32 numpy waves [..., frames * hop] at
  `vocoder_mel.sample_rate`. The mel is `audio.denormalize`d with `mel_spec`
  (back to natural-log mel, HiFi-GAN's input units) and run through a jitted
  generator, one compilation per input shape.

  Construction checks that `mel_spec` (our mel) has the transform the weights
  were trained on (`vocoder_mel`, default `HIFIGAN_V1_MEL`) and that the
  network fits it: hop_length == prod(upsample_rates) and n_mels == conv_pre's
  input channels. A ValueError names every mismatch.
  """

  def __init__(
    self,
    params: Any,
    config: HiFiGANConfig,
    *,
    mel_spec: audio_lib.MelSpec,
    vocoder_mel: audio_lib.MelSpec | None = None,
    precision: Any = jax.lax.Precision.HIGHEST,
    source: str = "params",
  ):
    vocoder_mel = HIFIGAN_V1_MEL if vocoder_mel is None else vocoder_mel
    problems = []
    if config.hop_length != vocoder_mel.hop_length:
      problems.append(
        f"the network upsamples by {config.hop_length} (rates {config.upsample_rates}) but "
        f"its mel has hop_length {vocoder_mel.hop_length}"
      )
    if config.n_mels != vocoder_mel.n_mels:
      problems.append(
        f"the network takes {config.n_mels} mel bands, its mel has {vocoder_mel.n_mels}"
      )
    if problems:
      raise ValueError(
        f"HiFi-GAN weights {source} do not fit vocoder_mel: " + "; ".join(problems) + "."
      )
    diff = mel_mismatches(mel_spec, vocoder_mel)
    if diff:
      raise ValueError(
        f"Our mel settings differ from the ones the HiFi-GAN weights {source} were trained on "
        f"(ours vs the vocoder's): {'; '.join(diff)}. The V1 vocoder needs the 'paper'/'small' "
        "mel presets (22050 Hz, n_fft 1024, hop 256, win 1024, 80 mels, fmin 0, fmax 8000, "
        "log floor 1e-5); pass vocoder_mel= for weights trained on another mel."
      )
    expected = jax.eval_shape(
      functools.partial(HiFiGANGenerator(config).init, jax.random.PRNGKey(0)),
      jax.ShapeDtypeStruct((1, config.n_mels, 4), jnp.float32),
    )
    weights.check_variables({"params": params}, expected, source=source)
    self.params = jax.device_put(params)
    self.config = config
    self.mel_spec = mel_spec
    self.vocoder_mel = vocoder_mel
    self.precision = precision

  @property
  def sample_rate(self) -> int:
    return int(self.vocoder_mel.sample_rate)

  @property
  def hop_length(self) -> int:
    return self.config.hop_length

  def log_mel_to_wave(self, log_mel: Any) -> np.ndarray:
    """Natural-log mel [..., n_mels, frames] (`audio.log_mel` units) -> float32 [..., frames * hop]."""
    x = np.asarray(log_mel, np.float32)
    if x.ndim < 2 or x.shape[-2] != self.config.n_mels or x.shape[-1] < 1:
      raise ValueError(
        f"The vocoder expects mels [..., {self.config.n_mels}, frames >= 1], got shape {x.shape}."
      )
    if not np.all(np.isfinite(x)):
      raise ValueError("The mel given to the vocoder contains NaN or Inf.")
    lead = x.shape[:-2]
    batch = x.reshape((-1, *x.shape[-2:]))
    wave = generator_apply(self.params, batch, config=self.config, precision=self.precision)
    return np.asarray(wave, np.float32).reshape((*lead, -1))

  def __call__(self, mel: Any) -> np.ndarray:
    """Normalised mel [..., n_mels, frames] (`audio.normalize` units) -> float32 [..., frames * hop]."""
    return self.log_mel_to_wave(audio_lib.denormalize(np.asarray(mel, np.float32), self.mel_spec))

  def mel_to_wave(
    self,
    log_mel: np.ndarray,
    spec: audio_lib.MelSpec,
    *,
    n_iter: int | None = None,
    length: int | None = None,
    seed: int = 0,
  ) -> np.ndarray:
    """Drop-in for `audio.mel_to_wave`: log-mel [n_mels, frames] (NOT normalised) -> float32.

    `spec` must have the vocoder's mel transform. `length` crops or zero-pads
    the output (default frames * hop). `n_iter` and `seed` are Griffin-Lim's
    and are ignored: the network is deterministic.
    """
    del n_iter, seed
    diff = mel_mismatches(spec, self.vocoder_mel)
    if diff:
      raise ValueError(f"mel_to_wave: spec differs from the vocoder's mel: {'; '.join(diff)}.")
    log_mel = np.asarray(log_mel, np.float32)
    if log_mel.ndim != 2:
      raise ValueError(
        f"log_mel must have shape [{self.config.n_mels}, frames], got {log_mel.shape}."
      )
    wave = self.log_mel_to_wave(log_mel)
    length = log_mel.shape[1] * spec.hop_length if length is None else int(length)
    wave = wave[:length]
    if wave.shape[0] < length:
      wave = np.pad(wave, (0, length - wave.shape[0]))
    return wave


def load_vocoder(
  path: PathLike,
  *,
  mel_spec: audio_lib.MelSpec | None = None,
  vocoder_mel: audio_lib.MelSpec | None = None,
  config: HiFiGANConfig | None = None,
  precision: Any = jax.lax.Precision.HIGHEST,
) -> Vocoder:
  """Loads a HiFi-GAN generator as a `Vocoder`.

  path: a folder written by `python -m avtok_jax.pretrained.convert --net=hifigan`
    (`weights.save_converted`), or a flat .npz / .safetensors torch-layout
    state dict (with or without weight norm; read by `weights.load_state_dict`).
  mel_spec: OUR mel settings (`audio.MelSpec.from_config(config.data)`), used to
    denormalise; default `vocoder_mel` (then only the normalisation constants
    are MelSpec's defaults).
  vocoder_mel: the mel the weights were trained on; default `HIFIGAN_V1_MEL`.
  config: the generator config; default inferred from the weight shapes
    (`infer_config`: upsample rate = kernel / 2, dilations (1, 3, 5)).
  precision: of the convolutions; HIGHEST so results do not depend on the
    accelerator's default bf16/tf32 passes.
  """
  source = repr(os.fspath(path))
  if os.path.isdir(path):
    variables = weights.load_converted(path, "hifigan")
    params = variables["params"]
    stored = weights.converted_info(path).get("config")
    if config is None and stored is not None:
      config = weights.config_from_json(HiFiGANConfig, stored, source=source)
    config = config or config_from_params(params, source=source)
  else:
    state_dict = weights.load_state_dict(path)
    params = convert_state_dict(state_dict, source=source, config=config)["params"]
    config = config or infer_config(state_dict, source=source)
  vocoder_mel = HIFIGAN_V1_MEL if vocoder_mel is None else vocoder_mel
  mel_spec = vocoder_mel if mel_spec is None else mel_spec
  return Vocoder(
    params, config, mel_spec=mel_spec, vocoder_mel=vocoder_mel, precision=precision, source=source
  )
