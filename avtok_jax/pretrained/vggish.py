"""VGGish audio embeddings (for the rFAD metric), as a Flax module with weights from a local file.

VGGish (Hershey et al. 2017, "CNN Architectures for Large-Scale Audio
Classification") maps 0.96 s of 16 kHz audio to a 128-d embedding; the
Fréchet Audio Distance (Kilgour et al. 2019) compares the Gaussian statistics
of these embeddings over two sets of clips.

Frontend (`vggish_log_mel_examples`, numpy), with the constants of the
reference `vggish_params.py` and the formulas of `mel_features.py`
(tensorflow/models, research/audioset/vggish; the PyTorch port
harritaylor/torchvggish uses the same files):

* mono audio resampled to 16 kHz (the reference uses resampy; we use soxr's
  default "HQ" quality, which differs from it only near the band edge);
* frames of 25 ms (400 samples) every 10 ms (160 samples), no padding, so
  F = 1 + (S - 400) // 160 frames for S samples;
* periodic Hann window (0.5 - 0.5 cos(2 pi n / 400)), FFT length 512 (the next
  power of two), magnitude spectrum;
* 64 mel bands between 125 and 7500 Hz on the HTK mel scale
  mel(f) = 1127 ln(1 + f / 700), triangles linear in mel, band edges equally
  spaced in mel, the DC bin given zero weight (`spectrogram_to_mel_matrix`);
* log(mel + 0.01);
* examples of 96 frames with a hop of 96 frames (0.96 s, no overlap), so
  K = 1 + (F - 96) // 96 examples; the shortest clip that gives one example
  has 400 + 95 * 160 = 15600 samples at 16 kHz (0.975 s).

Network (`VGGishNet`), following torchvggish `vggish.py` (a port of the
TF-slim `vggish_slim.py`): input [B, 96 frames, 64 bands, 1]; 3x3 convs with
padding 1 and ReLU: 64, pool, 128, pool, 256, 256, pool, 512, 512, pool (2x2,
stride 2); flatten the [6, 4, 512] map in (frame, band, channel) order; fully
connected 4096, ReLU, 4096, ReLU, 128, ReLU. The final ReLU is in the
PyTorch port but not in the current TF reference (`fc2` has
activation_fn=None; see harritaylor/torchvggish issue #24): we follow the port
by default (its weights are what the file holds), `final_relu=False` gives the
TF reference's pre-activation embedding.

Weights (`load_vggish`): either a folder written by the converter from the
torchvggish release files (github.com/harritaylor/torchvggish, release v0.1,
the URLs in its `hubconf.py`),

    python -m avtok_jax.pretrained.convert --net=vggish \
      --src=vggish-10086976.pth[,vggish_pca_params-970ea276.pth] --dst=DIR

or an .npz / .safetensors with exactly the torchvggish state-dict keys and
layouts: `features.{0,3,6,8,11,13}.{weight,bias}` (OIHW) and
`embeddings.{0,2,4}.{weight,bias}` ([out, in]). The optional PCA
post-processor (`VGGish.postprocess`, the AudioSet release's PCA whitening and
8-bit quantisation) needs `pca_eigen_vectors` [128, 128] and `pca_means` [128]
(or torchvggish's column form [128, 1]): from the PCA file given as a second
--src (stored in the folder as the variables collection 'pca') or from
`load_vggish(pca_path=...)`. FAD uses the raw embeddings, so it is off by default.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.fft
import soxr

from avtok_jax.pretrained import weights

PathLike = str | os.PathLike

# vggish_params.py
SAMPLE_RATE = 16000
STFT_WINDOW_SECONDS = 0.025
STFT_HOP_SECONDS = 0.010
NUM_MEL_BINS = 64
MEL_MIN_HZ = 125.0
MEL_MAX_HZ = 7500.0
LOG_OFFSET = 0.01
EXAMPLE_WINDOW_SECONDS = 0.96
EXAMPLE_HOP_SECONDS = 0.96
EMBEDDING_SIZE = 128
QUANTIZE_MIN_VAL = -2.0
QUANTIZE_MAX_VAL = 2.0
# mel_features.py: HTK mel scale constants.
MEL_BREAK_FREQUENCY_HERTZ = 700.0
MEL_HIGH_FREQUENCY_Q = 1127.0

# Derived exactly as mel_features.log_mel_spectrogram / vggish_input derive them.
WINDOW_LENGTH = int(round(SAMPLE_RATE * STFT_WINDOW_SECONDS))  # 400
HOP_LENGTH = int(round(SAMPLE_RATE * STFT_HOP_SECONDS))  # 160
FFT_LENGTH = 2 ** int(math.ceil(math.log2(WINDOW_LENGTH)))  # 512
EXAMPLE_FRAMES = int(round(EXAMPLE_WINDOW_SECONDS / STFT_HOP_SECONDS))  # 96
EXAMPLE_HOP_FRAMES = int(round(EXAMPLE_HOP_SECONDS / STFT_HOP_SECONDS))  # 96
# Fewest 16 kHz samples that give one example: 15600 (0.975 s).
MIN_SAMPLES = WINDOW_LENGTH + (EXAMPLE_FRAMES - 1) * HOP_LENGTH

# (our name, torchvggish `features` index, in, out); a max-pool follows the
# layers marked True.
VGGISH_CONVS = (
  ("conv1", 0, 1, 64, True),
  ("conv2", 3, 64, 128, True),
  ("conv3_1", 6, 128, 256, False),
  ("conv3_2", 8, 256, 256, True),
  ("conv4_1", 11, 256, 512, False),
  ("conv4_2", 13, 512, 512, True),
)
# (our name, torchvggish `embeddings` index, in, out).
VGGISH_FCS = (
  ("fc1_1", 0, 512 * 6 * 4, 4096),
  ("fc1_2", 2, 4096, 4096),
  ("fc2", 4, 4096, EMBEDDING_SIZE),
)


# ----------------------------------------------------------------------------
# Frontend (numpy)
# ----------------------------------------------------------------------------


def hertz_to_mel(hz: np.ndarray | float) -> np.ndarray:
  """HTK mel scale: 1127 ln(1 + f / 700) (mel_features.hertz_to_mel)."""
  return MEL_HIGH_FREQUENCY_Q * np.log1p(
    np.asarray(hz, dtype=np.float64) / MEL_BREAK_FREQUENCY_HERTZ
  )


def mel_to_hertz(mel: np.ndarray | float) -> np.ndarray:
  """Inverse of `hertz_to_mel`."""
  return MEL_BREAK_FREQUENCY_HERTZ * np.expm1(
    np.asarray(mel, dtype=np.float64) / MEL_HIGH_FREQUENCY_Q
  )


@functools.lru_cache(maxsize=1)
def mel_matrix() -> np.ndarray:
  """float64 [257, 64] mel weights (mel_features.spectrogram_to_mel_matrix).

  Band i is a triangle over mel edges (e_i, e_{i+1}, e_{i+2}), the edges
  equally spaced in mel from MEL_MIN_HZ to MEL_MAX_HZ; the slopes are linear
  in mel, not in Hz; the DC bin gets zero weight (HTK). Unnormalised.
  """
  bins_mel = hertz_to_mel(np.linspace(0.0, SAMPLE_RATE / 2, FFT_LENGTH // 2 + 1))[:, None]
  edges = np.linspace(hertz_to_mel(MEL_MIN_HZ), hertz_to_mel(MEL_MAX_HZ), NUM_MEL_BINS + 2)
  lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
  rising = (bins_mel - lower) / (center - lower)
  falling = (upper - bins_mel) / (upper - center)
  m = np.maximum(0.0, np.minimum(rising, falling))
  m[0, :] = 0.0
  m.flags.writeable = False  # shared through the cache
  return m


@functools.lru_cache(maxsize=1)
def _periodic_hann() -> np.ndarray:
  """Periodic Hann window of WINDOW_LENGTH (mel_features.periodic_hann)."""
  n = np.arange(WINDOW_LENGTH)
  w = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / WINDOW_LENGTH)
  w.flags.writeable = False
  return w


def vggish_log_mel(wave_16k: np.ndarray) -> np.ndarray:
  """float32 [F, 64] log-mel frames of a 16 kHz mono waveform (mel_features.log_mel_spectrogram).

  F = 1 + (S - 400) // 160; needs S >= 400.
  """
  wave = np.asarray(wave_16k, dtype=np.float64)
  if wave.ndim != 1 or wave.shape[0] < WINDOW_LENGTH:
    raise ValueError(
      f"vggish_log_mel needs a 1-D waveform of at least {WINDOW_LENGTH} samples, got {wave.shape}."
    )
  frames = np.lib.stride_tricks.sliding_window_view(wave, WINDOW_LENGTH)[::HOP_LENGTH]
  magnitude = np.abs(scipy.fft.rfft(frames * _periodic_hann(), n=FFT_LENGTH, axis=-1))
  return np.log(magnitude @ mel_matrix() + LOG_OFFSET).astype(np.float32)


def vggish_log_mel_examples(wave: np.ndarray, sample_rate: int) -> np.ndarray:
  """The VGGish input for one mono clip: float32 [K, 96, 64] (examples, frames, mel bands).

  The clip is resampled to 16 kHz (soxr), turned into log-mel frames
  (`vggish_log_mel`) and cut into K = 1 + (F - 96) // 96 non-overlapping
  examples of 0.96 s; the frames after the last whole example are dropped, as
  in the reference (`vggish_input.waveform_to_examples`).

  Raises ValueError for a non-1-D or non-finite wave, a bad sample rate, or a
  clip shorter than MIN_SAMPLES = 15600 samples at 16 kHz (0.975 s).
  """
  wave = np.asarray(wave)
  if wave.ndim != 1:
    raise ValueError(
      f"vggish_log_mel_examples expects one mono clip [samples], got shape {wave.shape} "
      "(average the channels first)."
    )
  if not np.issubdtype(wave.dtype, np.floating):
    raise ValueError(f"wave has dtype {wave.dtype}; expected float samples in [-1, 1].")
  if not np.all(np.isfinite(wave)):
    raise ValueError("wave contains NaN or Inf.")
  sample_rate = _check_sample_rate(sample_rate)
  wave = wave.astype(np.float64)
  if sample_rate != SAMPLE_RATE:
    wave = soxr.resample(wave, sample_rate, SAMPLE_RATE)
  if wave.shape[0] < MIN_SAMPLES:
    seconds = MIN_SAMPLES / SAMPLE_RATE
    raise ValueError(
      f"Clip too short for VGGish: {wave.shape[0]} samples at {SAMPLE_RATE} Hz; one 0.96 s "
      f"example needs at least {MIN_SAMPLES} samples at {SAMPLE_RATE} Hz ({seconds:.3f} s, "
      f"about {math.ceil(seconds * sample_rate)} samples at {sample_rate} Hz)."
    )
  log_mel = vggish_log_mel(wave)
  k = 1 + (log_mel.shape[0] - EXAMPLE_FRAMES) // EXAMPLE_HOP_FRAMES
  starts = np.arange(k) * EXAMPLE_HOP_FRAMES
  return log_mel[starts[:, None] + np.arange(EXAMPLE_FRAMES)[None, :]]


def _check_sample_rate(sample_rate: Any) -> int:
  if isinstance(sample_rate, bool) or int(sample_rate) != sample_rate or sample_rate <= 0:
    raise ValueError(f"sample_rate must be a positive integer (Hz), got {sample_rate!r}.")
  return int(sample_rate)


# ----------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------


def vggish_param_specs() -> tuple[weights.ParamSpec, ...]:
  """Every torchvggish key the weight file must hold, its shape, and its place in the Flax tree."""
  specs = []
  for name, index, c_in, c_out, _ in VGGISH_CONVS:
    specs.append(
      weights.ParamSpec(
        f"features.{index}.weight", (name, "kernel"), (c_out, c_in, 3, 3), weights.conv_oihw_to_hwio
      )
    )
    specs.append(weights.ParamSpec(f"features.{index}.bias", (name, "bias"), (c_out,)))
  for name, index, d_in, d_out in VGGISH_FCS:
    specs.append(
      weights.ParamSpec(
        f"embeddings.{index}.weight", (name, "kernel"), (d_out, d_in), weights.linear_oi_to_io
      )
    )
    specs.append(weights.ParamSpec(f"embeddings.{index}.bias", (name, "bias"), (d_out,)))
  return tuple(specs)


def vggish_state_dict_shapes() -> dict[str, tuple[int, ...]]:
  """{PyTorch key: shape} of a complete torchvggish weight file."""
  return weights.expected_shapes(vggish_param_specs())


class VGGishNet(nn.Module):
  """VGGish: log-mel examples [B, 96, 64] -> embeddings [B, 128] (see module docstring)."""

  final_relu: bool = True
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, examples: jax.Array) -> jax.Array:
    if examples.ndim != 3 or examples.shape[1:] != (EXAMPLE_FRAMES, NUM_MEL_BINS):
      raise ValueError(
        f"VGGish expects examples [B, {EXAMPLE_FRAMES}, {NUM_MEL_BINS}], got {examples.shape}."
      )
    x = examples.astype(self.dtype)[..., None]
    for name, _, _, c_out, pool in VGGISH_CONVS:
      x = nn.Conv(
        c_out,
        (3, 3),
        padding=((1, 1), (1, 1)),
        dtype=self.dtype,
        precision=self.precision,
        name=name,
      )(x)
      x = nn.relu(x)
      if pool:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    # [B, 6, 4, 512] flattened in (frame, band, channel) order: torchvggish
    # transposes its NCHW map to NHWC before `view`, for the TF-slim weights.
    x = x.reshape((x.shape[0], -1))
    for i, (name, _, _, d_out) in enumerate(VGGISH_FCS):
      x = nn.Dense(d_out, dtype=self.dtype, precision=self.precision, name=name)(x)
      if i < len(VGGISH_FCS) - 1 or self.final_relu:
        x = nn.relu(x)
    return x.astype(jnp.float32)


def vggish_apply(
  params: Any,
  examples: jax.Array,
  *,
  final_relu: bool = True,
  dtype: Any = jnp.float32,
  precision: Any = None,
) -> jax.Array:
  """Pure VGGish forward: examples [B, 96, 64] -> float32 [B, 128]; jit-able."""
  net = VGGishNet(final_relu=final_relu, dtype=dtype, precision=precision)
  return net.apply({"params": params}, examples)


def vggish_params_from_state_dict(
  state_dict: dict[str, np.ndarray], *, source: str = "state dict"
) -> dict[str, Any]:
  """Checks a flat torchvggish state dict and converts it to the VGGishNet params tree."""
  return weights.params_from_state_dict(state_dict, vggish_param_specs(), source=source)


# Keys of the AudioSet PCA parameters (vggish_params.PCA_EIGEN_VECTORS_NAME / PCA_MEANS_NAME).
PCA_KEYS = ("pca_eigen_vectors", "pca_means")


def pca_from_state_dict(
  state_dict: dict[str, Any], *, source: str = "state dict"
) -> tuple[np.ndarray, np.ndarray]:
  """float32 (eigen_vectors [128, 128], means [128]) from `pca_eigen_vectors`, `pca_means`.

  `pca_means` may be [128] (the TF release's .npz) or [128, 1] (torchvggish's
  column form). Raises ValueError naming `source` and the bad keys.
  """
  sd = dict(state_dict)
  if "pca_means" in sd and np.shape(sd["pca_means"]) == (EMBEDDING_SIZE, 1):
    sd["pca_means"] = np.reshape(sd["pca_means"], (EMBEDDING_SIZE,))
  specs = (
    weights.ParamSpec("pca_eigen_vectors", ("eigen_vectors",), (EMBEDDING_SIZE, EMBEDDING_SIZE)),
    weights.ParamSpec("pca_means", ("means",), (EMBEDDING_SIZE,)),
  )
  tree = weights.params_from_state_dict(sd, specs, source=source)
  return tree["eigen_vectors"], tree["means"]


def load_pca(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
  """float32 (eigen_vectors [128, 128], means [128]) from an .npz/.safetensors file."""
  return pca_from_state_dict(weights.load_state_dict(path), source=os.fspath(path))


def convert_state_dict(
  state_dict: dict[str, np.ndarray], source: str = "state dict"
) -> dict[str, Any]:
  """The converter's hook (`avtok_jax.pretrained.convert`): {'params': ...[, 'pca': ...]}.

  `state_dict` holds torchvggish's `vggish-10086976.pth` keys, possibly merged
  with the PCA file's (`vggish_pca_params-970ea276.pth`); when any PCA key is
  present both must be, and they are stored as the collection
  {'pca': {'eigen_vectors': [128, 128], 'means': [128]}} that `load_vggish`
  picks up. Raises ValueError naming `source` and every missing or mis-shaped key.
  """
  variables: dict[str, Any] = {"params": vggish_params_from_state_dict(state_dict, source=source)}
  if any(k in state_dict for k in PCA_KEYS):
    vectors, means = pca_from_state_dict(state_dict, source=source)
    variables["pca"] = {"eigen_vectors": vectors, "means": means}
  return variables


@functools.lru_cache(maxsize=1)
def _abstract_variables() -> dict[str, Any]:
  x = jax.ShapeDtypeStruct((1, EXAMPLE_FRAMES, NUM_MEL_BINS), jnp.float32)
  abstract = dict(jax.eval_shape(lambda x: VGGishNet().init(jax.random.key(0), x), x))
  spec = jax.ShapeDtypeStruct
  abstract["pca"] = {
    "eigen_vectors": spec((EMBEDDING_SIZE, EMBEDDING_SIZE), jnp.float32),
    "means": spec((EMBEDDING_SIZE,), jnp.float32),
  }
  return abstract


def load_converted_vggish(
  path: PathLike,
) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray] | None]:
  """(params, pca or None) from a folder written by the converter (`--net=vggish`).

  Raises ValueError naming the folder when it is not a converted VGGish or
  its shapes differ from `VGGishNet`'s.
  """
  variables = weights.load_converted(path, "vggish")
  expected = _abstract_variables()
  if "pca" not in variables:
    expected = {"params": expected["params"]}
  weights.check_variables(variables, expected, source=repr(os.fspath(path)))
  pca = variables.get("pca")
  return variables["params"], None if pca is None else (pca["eigen_vectors"], pca["means"])


def _bucket(n: int, cap: int) -> int:
  """The batch a chunk of n examples is padded to: the next power of two, at most cap.

  Bounds the number of compiled programs by log2(cap) whatever the clip counts.
  """
  return min(cap, 1 << max(0, (n - 1).bit_length()))


class VGGish:
  """Loaded VGGish: `embed(waves, sample_rate) -> [N, K, 128]` (see module docstring)."""

  def __init__(
    self,
    params: Any,
    *,
    final_relu: bool = True,
    pca: tuple[np.ndarray, np.ndarray] | None = None,
    batch_size: int = 64,
    dtype: Any = jnp.float32,
    precision: Any = jax.lax.Precision.HIGHEST,
  ):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    self.params = jax.device_put(params)
    self.final_relu = final_relu
    self.pca = pca
    self.batch_size = int(batch_size)
    self._fn = jax.jit(
      functools.partial(vggish_apply, final_relu=final_relu, dtype=dtype, precision=precision)
    )

  def embed_examples(self, examples: np.ndarray) -> np.ndarray:
    """float32 [B, 128] embeddings of log-mel examples [B, 96, 64], in padded chunks."""
    examples = np.asarray(examples, dtype=np.float32)
    if examples.ndim != 3 or examples.shape[1:] != (EXAMPLE_FRAMES, NUM_MEL_BINS):
      raise ValueError(
        f"VGGish expects examples [B, {EXAMPLE_FRAMES}, {NUM_MEL_BINS}], got {examples.shape}."
      )
    out = []
    for start in range(0, examples.shape[0], self.batch_size):
      chunk = examples[start : start + self.batch_size]
      size = _bucket(chunk.shape[0], self.batch_size)
      padded = np.pad(chunk, ((0, size - chunk.shape[0]), (0, 0), (0, 0)))
      out.append(np.asarray(self._fn(self.params, padded))[: chunk.shape[0]])
    if not out:
      return np.zeros((0, EMBEDDING_SIZE), np.float32)
    return np.concatenate(out, axis=0)

  def embed(self, waves: np.ndarray | Sequence[np.ndarray], sample_rate: int) -> np.ndarray:
    """float32 [N, K, 128]: K embeddings (one per 0.96 s example) for each of N mono clips.

    waves: [N, S] float samples in [-1, 1] at `sample_rate` (resampled to
    16 kHz). Clips must hold at least 0.975 s (MIN_SAMPLES at 16 kHz).
    """
    waves = np.asarray(waves)
    if waves.ndim != 2:
      raise ValueError(f"VGGish.embed expects waves [N, samples], got shape {waves.shape}.")
    if waves.shape[0] == 0:
      raise ValueError("VGGish.embed got no clips (N = 0).")
    examples = np.stack([vggish_log_mel_examples(w, sample_rate) for w in waves])
    n, k = examples.shape[:2]
    emb = self.embed_examples(examples.reshape((n * k, EXAMPLE_FRAMES, NUM_MEL_BINS)))
    return emb.reshape((n, k, EMBEDDING_SIZE))

  def postprocess(self, embeddings: np.ndarray) -> np.ndarray:
    """AudioSet-release PCA whitening + 8-bit quantisation (torchvggish `Postprocessor`).

    q = round((clip(V (e - mu), -2, 2) + 2) * 255 / 4), returned as float32 in
    [0, 255] with the input's shape. Needs the PCA file (`load_vggish(pca_path=...)`).
    """
    if self.pca is None:
      raise ValueError(
        "VGGish.postprocess needs PCA parameters: load_vggish(..., pca_path=...), or a folder "
        "converted with the PCA file as a second --src."
      )
    e = np.asarray(embeddings, dtype=np.float64)
    if e.shape[-1:] != (EMBEDDING_SIZE,):
      raise ValueError(f"embeddings must end in {EMBEDDING_SIZE}, got shape {e.shape}.")
    vectors, means = (a.astype(np.float64) for a in self.pca)
    projected = (e - means) @ vectors.T
    clipped = np.clip(projected, QUANTIZE_MIN_VAL, QUANTIZE_MAX_VAL)
    scale = 255.0 / (QUANTIZE_MAX_VAL - QUANTIZE_MIN_VAL)
    return np.round((clipped - QUANTIZE_MIN_VAL) * scale).astype(np.float32)


def load_vggish(
  path: PathLike,
  *,
  pca_path: PathLike | None = None,
  final_relu: bool = True,
  batch_size: int = 64,
  dtype: Any = jnp.float32,
  precision: Any = jax.lax.Precision.HIGHEST,
) -> VGGish:
  """Loads torchvggish weights: a converted folder, or an .npz/.safetensors file.

  `path` is a folder written by `python -m avtok_jax.pretrained.convert
  --net=vggish` (its PCA parameters, when converted with the PCA file, are
  used by `VGGish.postprocess`) or a weight file. `pca_path`, an .npz /
  .safetensors with `pca_eigen_vectors` and `pca_means`, takes precedence over
  a folder's PCA. Raises ValueError naming the file and every missing or
  mis-shaped key.
  """
  if os.path.isdir(path):
    params, pca = load_converted_vggish(path)
  else:
    params = vggish_params_from_state_dict(weights.load_state_dict(path), source=os.fspath(path))
    pca = None
  if pca_path is not None:
    pca = load_pca(pca_path)
  return VGGish(
    params,
    final_relu=final_relu,
    pca=pca,
    batch_size=batch_size,
    dtype=dtype,
    precision=precision,
  )
