r"""A plain PyTorch (eager, optionally torch.compile) re-implementation of our tokenizer train step.

  python bench/torch_reference.py --preset=small --batch_size=8 --steps=20
  python bench/torch_reference.py --preset=small --steps=20 --compile --stage=vanilla

What it is for: benchmarks that compare JAX and PyTorch speed on the SAME
work. It is the JAX train step of `avtok_jax.train.make_train_step` with the
GAN off (`config.gan.enabled=False`), written again in torch from the same
config, so that sizes always match:

* `build(config) -> AVTokTorch`: the module. `forward(batch, ss_ratio=0.0)`
  returns `(loss, metrics)`, the weighted total and every unweighted term, as
  `losses.combine` logs them (`video_l1`, `video_l2`, `audio_l1`, `audio_l2`,
  `vq`, `prior`, `alignment`, `loss`). `batch` holds `video_patches` (uint8 in
  [0, 255] or float in [-1, 1]) and `mel_patches`, the pipeline's keys.
* `make_train_step(model, lr=None, compile=False)`: Adam(b1 0.5, b2 0.9) with
  the config's learning-rate multipliers / frozen parameters
  (`config.param_rules`, e.g. the prior's x50) and global-norm gradient
  clipping (`config.optim.grad_clip`); the returned callable does
  zero_grad / forward / backward / clip / step and returns the metrics. The
  learning-rate schedule (warmup + cosine) is left out: a constant `lr`.
* `AVTokTorch.encode(batch)` / `.decode(codes)` / `.reconstruct(batch)`:
  inference (no grad, argmax codes) for the config's modalities.
* `load_jax_params(module, jax_params)`: copies a JAX parameter tree (from
  `train.Models(config).init`, boxed or not, with or without scan-stacked
  blocks, per-modality block norms included) into the module;
  `tests/test_torch_reference.py` then checks the losses against the JAX
  train step on the tiny preset, for the default and non-default options.
* `load_config(stage, preset)`: the stage config (`configs/vfal_stage1.py` or
  `configs/vanilla.py`) with the GAN off.

Where each piece comes from (our JAX modules are the specification):

* Blocks (`avtok_jax/models/layers.py`): pre-LN blocks, LayerNorm eps 1e-6,
  multi-head attention with no q/k/v bias (`model.qkv_bias`), output bias,
  softmax scale 1/sqrt(head_dim), MLP Dense -> GELU (tanh approximation) ->
  Dense with mlp_dim = width * mlp_ratio. With `model.norms='inside'` every
  LayerNorm of the shared encoder / decoder is per modality (`{m}_norm1`,
  `{m}_norm2`, final `{m}_norm`; the stack is called with the stream's
  modality), attention and MLP stay shared; with 'outside' they are shared
  (`norm1`, `norm2`, `norm`). The encoder ends with a LayerNorm; the decoder
  only with norms='inside' and `model.head_norm`. Fixed sin-cos position
  tables come from `layers.sincos_table` itself.
* Tokenizer (`avtok_jax/models/tokenizer.py`), options read from
  `config.model` as `models.build_tokenizer` passes them: per modality m,
  Dense m_embed + grid PE = h; holistic queries m_queries, plus with
  `locality='both'` a summary of each token's region (token t's region is
  the patches j with floor(j * n_tokens / n_patches) = t): where regions hold
  one patch at most, the mean of h over the region; where a region holds
  several (`region_slots` > 1: the largest region's size, e.g. audio on
  tiny/small), Dense m_region_in over the region's float patches side by
  side (slot k = the region's k-th patch, zero-padded up to `slots`); then
  norms='outside': one LayerNorm m_in_norm over [h ; queries], norms='inside':
  queries + 1D PE over their positions and no norm; the shared encoder (once
  per modality), quant_in on the query outputs, quantizer; decoder input:
  content = quant_out(quantized * `model.code_scale`), latents = content + 1D
  PE, patch queries = m_patch_queries + grid PE, plus with locality 'decoder'
  or 'both' the content of their region's token, or with several patches per
  region content @ m_region_out[slot of the patch] (m_region_out [slots,
  width, width], identity at init; every token through every slot's map,
  then each patch picks its own, as JAX computes it); [latents ; patch
  queries] through the shared decoder, m_out_norm (norms='outside' only),
  zero-init m_head.
* Quantizer (`avtok_jax/models/quantizer.py`): l2-normalised input and
  codebook (raw rows drawn N(0, `model.codebook_init_std`^2)); the code is
  argmax cos, or in training with `model.stochastic_quantization` (the JAX
  default, True) a sample of softmax(cos / T) by Gumbel-max; the gradient to
  z per `model.quantizer_gradient`: 'straight_through' (q + z - sg(z)) or
  'rotation' (`quantizer._rotate_onto`, the same formula: value q, gradient
  R^T g with R the stop-gradient rotation taking z onto q); loss 0.25 *
  commit + 1.0 * codebook (means over tokens and code dims).
* AR prior (`avtok_jax/models/prior.py`): causal transformer over the
  quantizer outputs of [video ; audio] (unit vectors, not scaled by
  code_scale, gradient as above), learned start token and positions,
  logits = normalised prediction . stop_grad(codebook)^T / T, two rounds;
  round 2 replaces a fraction `ss_ratio` of the inputs by codes sampled from
  round 1's softmax (`prior.scheduled_sampling_ratio` of the step, as the JAX
  step; the sampling always runs, as there, where the ratio is a traced
  value); loss = cross-entropy averaged over the rounds (`losses.prior_loss`).
* Alignment (`avtok_jax/models/alignment.py`, `train.py`): per modality the
  projector Dense -> SiLU -> Dense -> SiLU -> Dense on the encoder's patch
  tokens, negative cosine to the 'random' teacher's features, averaged over
  modalities. The teacher is computed here too: the SAME numpy conv kernels
  (`alignment.RandomFeatureTeacher`, read from its attributes), SAME padding,
  GELU (tanh) between convs, then `jax.image.resize` 'linear' with
  antialiasing, rebuilt as per-axis weight matrices (`_resize_matrix`).
  `forward(..., teacher_features={m: [B, N_m, C]})` takes precomputed targets
  instead.
* Loss assembly (`train.make_train_step`, `losses.py`): L1 + L2 per modality,
  `vq` summed over modalities, weights from `config.loss_weights` (the
  perceptual term has no network yet and is skipped in JAX as well).

Timing note: torch's OpenMP threads spin while they wait. On a CPU shared
with other busy processes that makes every op wait for a descheduled thread
(measured on the 2-core VM under load: small stage-1 step 7.1 s on 2 threads,
0.53 s on 1, 0.40 s on 2 with OMP_WAIT_POLICY=PASSIVE); set
`OMP_WAIT_POLICY=PASSIVE` or `--threads=1` there. The JSON line records both.

Left out (documented differences): the dead-code restarts of the codebook
(every `restart_dead_codes_every` steps, a cheap where), the cumulative code
histogram, the LR schedule, bfloat16 compute (`model.dtype`; this reference
runs float32) and remat/scan (JAX memory/compile-time tools, same maths).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Mapping
from typing import Any

import flax.linen as flax_nn
import numpy as np
import torch
import torch.nn.functional as F
from flax import traverse_util
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from avtok_jax import config_lib, optimizer  # noqa: E402
from avtok_jax.data import patches as patches_lib  # noqa: E402
from avtok_jax.models import alignment as alignment_lib  # noqa: E402
from avtok_jax.models import layers as layers_lib  # noqa: E402
from avtok_jax.models import prior as prior_lib  # noqa: E402

MODALITIES = ("video", "audio")
_LN_EPS = 1e-6  # layers.LayerNorm
_STAGE_FILES = {"stage1": "vfal_stage1", "vanilla": "vanilla"}
# RandomFeatureTeacher's conv strides (video_features / audio_features).
_VIDEO_STRIDES = ((2, 4, 4), (1, 2, 2), (1, 1, 1))
_AUDIO_STRIDES = ((4, 4), (2, 2), (1, 1))


def load_config(stage: str = "stage1", preset: str = "small"):
  """The `configs/` stage config ('stage1' or 'vanilla') of a size preset, GAN off."""
  if stage not in _STAGE_FILES:
    raise ValueError(f"stage must be one of {sorted(_STAGE_FILES)}, got {stage!r}.")
  path = ROOT / "configs" / f"{_STAGE_FILES[stage]}.py"
  config = config_lib.load_config_file(f"{path}:{preset}")
  config.gan.enabled = False
  return config


# ----------------------------------------------------------------------------- building blocks


def _dense(fan_in: int, fan_out: int, bias: bool = True) -> nn.Linear:
  """Xavier-uniform weight, zero bias (layers._KERNEL_INIT / _zeros)."""
  layer = nn.Linear(fan_in, fan_out, bias=bias)
  nn.init.xavier_uniform_(layer.weight)
  if bias:
    nn.init.zeros_(layer.bias)
  return layer


def _layer_norm(width: int) -> nn.LayerNorm:
  return nn.LayerNorm(width, eps=_LN_EPS)


def _l2_normalize(x: torch.Tensor, eps_sq: float) -> torch.Tensor:
  return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + eps_sq)


class Mlp(nn.Module):
  def __init__(self, width: int, hidden: int):
    super().__init__()
    self.fc1 = _dense(width, hidden)
    self.fc2 = _dense(hidden, width)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Attention(nn.Module):
  """q/k/v/out projections as in layers.Attention (heads laid out head-major)."""

  def __init__(self, width: int, num_heads: int, qkv_bias: bool, causal: bool):
    super().__init__()
    if width % num_heads:
      raise ValueError(f"width={width} is not divisible by num_heads={num_heads}.")
    self.num_heads, self.causal = num_heads, causal
    self.query = _dense(width, width, qkv_bias)
    self.key = _dense(width, width, qkv_bias)
    self.value = _dense(width, width, qkv_bias)
    self.out = _dense(width, width, True)

  def forward(self, x):
    b, n, w = x.shape

    def heads(t):
      return t.view(b, n, self.num_heads, w // self.num_heads).transpose(1, 2)

    q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
    return self.out(o.transpose(1, 2).reshape(b, n, w))


class Block(nn.Module):
  """Pre-LN block; with `modalities`, norm1 / norm2 are per modality (`{m}_norm1`, ...)."""

  def __init__(self, width, num_heads, mlp_dim, qkv_bias, causal, modalities=()):
    super().__init__()
    self.modalities = tuple(modalities)
    for name in ("norm1", "norm2"):
      for m in self.modalities or (None,):
        self.add_module(layers_lib._norm_name(name, m, self.modalities), _layer_norm(width))
    self.attn = Attention(width, num_heads, qkv_bias, causal)
    self.mlp = Mlp(width, mlp_dim)

  def forward(self, x, modality=None):
    norm1 = getattr(self, layers_lib._norm_name("norm1", modality, self.modalities))
    norm2 = getattr(self, layers_lib._norm_name("norm2", modality, self.modalities))
    x = x + self.attn(norm1(x))
    return x + self.mlp(norm2(x))


class Transformer(nn.Module):
  """`depth` blocks named block_0, block_1, ... (+ final LayerNorm `norm` or `{m}_norm`).

  `modalities` non-empty: every LayerNorm is per modality and `forward` takes
  `modality=` (layers.Transformer); the rest is shared.
  """

  def __init__(
    self,
    depth,
    width,
    num_heads,
    mlp_dim,
    qkv_bias=False,
    causal=False,
    final_norm=True,
    modalities=(),
  ):
    super().__init__()
    self.depth, self.final_norm = depth, final_norm
    self.modalities = tuple(modalities)
    for i in range(depth):
      block = Block(width, num_heads, mlp_dim, qkv_bias, causal, self.modalities)
      self.add_module(f"block_{i}", block)
    if final_norm:
      for m in self.modalities or (None,):
        self.add_module(layers_lib._norm_name("norm", m, self.modalities), _layer_norm(width))

  def forward(self, x, modality=None):
    for i in range(self.depth):
      x = getattr(self, f"block_{i}")(x, modality)
    if self.final_norm:
      x = getattr(self, layers_lib._norm_name("norm", modality, self.modalities))(x)
    return x


class Quantizer(nn.Module):
  """l2-normalised VQ, straight-through or rotation, 0.25 commit + 1.0 codebook (quantizer.py)."""

  def __init__(
    self,
    codebook_size,
    code_dim,
    commit_weight,
    codebook_weight,
    temperature,
    gradient="straight_through",
    init_std=1.0,
  ):
    super().__init__()
    if gradient not in ("straight_through", "rotation"):
      raise ValueError(f"gradient={gradient!r} must be 'straight_through' or 'rotation'.")
    self.codebook = nn.Parameter(torch.randn(codebook_size, code_dim) * init_std)
    self.commit_weight, self.codebook_weight = commit_weight, codebook_weight
    self.temperature, self.gradient = temperature, gradient

  def normalized_codebook(self) -> torch.Tensor:
    return _unit(self.codebook)

  def forward(self, z: torch.Tensor, stochastic: bool) -> dict[str, torch.Tensor]:
    z = _unit(z)
    codebook = self.normalized_codebook()
    scores = z.detach() @ codebook.detach().t()
    if stochastic:
      gumbel = -torch.empty_like(scores).exponential_().log()
      scores = scores / self.temperature + gumbel
    codes = scores.argmax(-1)
    q = F.embedding(codes, codebook)
    commit = (q.detach() - z).square().mean()
    codebook_loss = (q - z.detach()).square().mean()
    if self.gradient == "rotation":
      quantized = _rotate_onto(z, q.detach())
    else:
      quantized = q.detach() + (z - z.detach())
    return {
      "codes": codes,
      "quantized": quantized,
      "loss": self.commit_weight * commit + self.codebook_weight * codebook_loss,
    }


def _rotate_onto(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
  """quantizer._rotate_onto: value q, gradient to z R^T g, R = I - 2 r r^T + 2 q z^T constant.

  For unit rows z, q (q without gradient); r = (z + q) / |z + q|.
  """
  zs = z.detach()
  r = _unit(zs + q)
  proj_r = (r * z).sum(-1, keepdim=True)
  proj_z = (zs * z).sum(-1, keepdim=True)
  rotated = z - 2.0 * r * proj_r + 2.0 * q * proj_z
  return q + (rotated - rotated.detach())


def _unit(x: torch.Tensor) -> torch.Tensor:
  """quantizer.l2_normalize: x * rsqrt(max(|x|^2, 1e-24))."""
  return x * torch.rsqrt(torch.clamp(x.square().sum(-1, keepdim=True), min=1e-24))


class Prior(nn.Module):
  """The causal AR prior over quantized codes (prior.ARPrior), two rounds in training."""

  def __init__(self, depth, width, num_heads, code_dim, max_length, mlp_ratio, temperature):
    super().__init__()
    self.in_proj = _dense(code_dim, width)
    self.start_token = nn.Parameter(torch.randn(width) * 0.02)
    self.pos_embed = nn.Parameter(torch.randn(max_length, width) * 0.02)
    mlp_dim = int(round(mlp_ratio * width))
    self.transformer = Transformer(depth, width, num_heads, mlp_dim, causal=True)
    self.out_proj = _dense(width, code_dim)
    self.temperature = temperature

  def _round(self, inputs: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    b, length, _ = inputs.shape
    x = self.in_proj(inputs[:, :-1])
    x = torch.cat([self.start_token.expand(b, 1, -1), x], dim=1) + self.pos_embed[:length]
    pred = self.out_proj(self.transformer(x))
    pred = _l2_normalize(pred, 1e-12)
    return pred @ codebook.t() / self.temperature

  def forward(self, quantized, codebook, ss_ratio) -> tuple[torch.Tensor, torch.Tensor]:
    codebook = codebook.detach()
    logits1 = self._round(quantized, codebook)
    guide = logits1.detach()
    # A sample of softmax(logits1) by Gumbel-max (what jax.random.categorical does).
    predicted = (guide - torch.empty_like(guide).exponential_().log()).argmax(-1)
    ratio = torch.as_tensor(ss_ratio, dtype=torch.float32, device=quantized.device)
    replace = torch.rand(quantized.shape[:2], device=quantized.device) < ratio
    inputs2 = torch.where(replace[..., None], F.embedding(predicted, codebook), quantized)
    return logits1, self._round(inputs2, codebook)


class Projector(nn.Module):
  """alignment.Projector: Dense -> SiLU -> Dense -> SiLU -> Dense."""

  def __init__(self, width, hidden, out_dim):
    super().__init__()
    self.fc1 = _dense(width, hidden)
    self.fc2 = _dense(hidden, hidden)
    self.fc3 = _dense(hidden, out_dim)

  def forward(self, x):
    return self.fc3(F.silu(self.fc2(F.silu(self.fc1(x)))))


# ----------------------------------------------------------------------------- the teacher


def _resize_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_in, size_out] weights of jax.image.resize 'linear' (antialiased) along one axis.

  Output sample i sits at input coordinate (i + 0.5) * size_in / size_out - 0.5;
  input j gets the triangle weight max(0, 1 - |x_i - j| / s), s = max(size_in /
  size_out, 1) (the filter widens when shrinking), normalised per output.
  """
  inv_scale = size_in / size_out
  kernel_scale = max(inv_scale, 1.0)
  centres = (np.arange(size_out) + 0.5) * inv_scale - 0.5
  dist = np.abs(centres[None, :] - np.arange(size_in)[:, None]) / kernel_scale
  weights = np.maximum(0.0, 1.0 - dist)
  total = weights.sum(0, keepdims=True)
  weights = np.where(np.abs(total) > 1000 * np.finfo(np.float32).eps, weights / total, 0.0)
  inside = (centres >= -0.5) & (centres <= size_in - 0.5)
  return np.where(inside[None, :], weights, 0.0).astype(np.float32)


def _same_pad(sizes, kernel, stride) -> list[int]:
  """F.pad amounts (last axis first) of lax 'SAME' padding."""
  pads = []
  for n, k, s in zip(sizes, kernel, stride, strict=True):
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    pads.append((total // 2, total - total // 2))
  return [p for pair in reversed(pads) for p in pair]


class RandomTeacher(nn.Module):
  """alignment.RandomFeatureTeacher + resample_to_grid in torch (buffers only, no parameters)."""

  def __init__(self, seed: int, feature_dim: int, grids: Mapping[str, tuple[int, ...]], shapes):
    super().__init__()
    teacher = alignment_lib.RandomFeatureTeacher(seed=seed, feature_dim=feature_dim)
    self.grids = {m: tuple(g) for m, g in grids.items()}
    self.kernels: dict[str, list[str]] = {}
    self.strides = {"video": _VIDEO_STRIDES, "audio": _AUDIO_STRIDES}
    self.resize: dict[str, list[tuple[int, str]]] = {}
    for m, kernels in (("video", teacher._video), ("audio", teacher._audio)):
      names = []
      for i, k in enumerate(kernels):
        # spatial..., in, out (lax ...IO) -> out, in, spatial...
        nd = k.ndim - 2
        w = np.transpose(k, (nd + 1, nd, *range(nd)))
        name = f"{m}_conv{i}"
        self.register_buffer(name, torch.from_numpy(np.ascontiguousarray(w)), persistent=False)
        names.append(name)
      self.kernels[m] = names
      # The teacher's output grid for the model's input shape, then per-axis
      # resampling matrices onto the token grid (axes of equal size are skipped).
      grid_in = list(shapes[m])
      for stride in self.strides[m]:
        grid_in = [math.ceil(n / s) for n, s in zip(grid_in, stride, strict=True)]
      self.resize[m] = []
      for axis, (n_in, n_out) in enumerate(zip(grid_in, self.grids[m], strict=True)):
        if n_in != n_out:
          name = f"{m}_resize{axis}"
          matrix = torch.from_numpy(_resize_matrix(n_in, n_out))
          self.register_buffer(name, matrix, persistent=False)
          self.resize[m].append((axis, name))

  @torch.no_grad()
  def forward(self, modality: str, raw: torch.Tensor) -> torch.Tensor:
    """video [B, T, H, W, 3] in [-1, 1] or mel [B, F, L] -> [B, prod(grid), C]."""
    if modality == "video":
      x, conv = raw.permute(0, 4, 1, 2, 3), F.conv3d
    else:
      x, conv = raw[:, None], F.conv2d
    names = self.kernels[modality]
    for i, (name, stride) in enumerate(zip(names, self.strides[modality], strict=True)):
      w = getattr(self, name)
      x = F.pad(x, _same_pad(x.shape[2:], w.shape[2:], stride))
      x = conv(x, w, stride=stride)
      if i < len(names) - 1:
        x = F.gelu(x, approximate="tanh")
    for axis, name in self.resize[modality]:
      # x: [B, C, *grid]; contract grid axis `axis` with [n_in, n_out].
      x = torch.movedim(torch.movedim(x, axis + 2, -1) @ getattr(self, name), -1, axis + 2)
    b, c = x.shape[:2]
    return x.reshape(b, c, -1).transpose(1, 2)


# ----------------------------------------------------------------------------- the tokenizer


def _region_layout(
  num_patches: int, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
  """(regions [N], gather [n_t, slots], slot [N]): tokenizer._regions and _region_layout.

  regions[j] = floor(j * n_t / N), the token of patch j's region; row t of
  `gather` lists token t's patches in order, padded with -1 up to `slots`, the
  size of the largest region; slot[j] is patch j's place in its region.
  """
  regions = torch.div(torch.arange(num_patches) * num_tokens, num_patches, rounding_mode="floor")
  first = torch.searchsorted(regions, torch.arange(num_tokens))
  slot = torch.arange(num_patches) - first[regions]
  slots = int(slot.max()) + 1 if num_patches else 1
  gather = torch.full((num_tokens, slots), -1, dtype=torch.long)
  gather[regions, slot] = torch.arange(num_patches)
  return regions, gather, slot


def _to_float_patches(x: torch.Tensor) -> torch.Tensor:
  """tokenizer.to_float_patches: uint8 [0, 255] -> [-1, 1]; floats pass as float32."""
  if not torch.is_floating_point(x):
    return x.to(torch.float32) * (1 / 127.5) - 1.0
  return x.to(torch.float32)


class AVTokTorch(nn.Module):
  """The AVTok tokenizer + projectors + teacher of one training config (see the module docstring).

  Submodule and parameter names follow the JAX tree ('encoder.block_0.attn.query'
  is 'encoder/block_0/attn/query'), so `load_jax_params` maps them one to one.
  """

  def __init__(self, config):
    super().__init__()
    config_lib.check_model_config(config.model, config.data)
    self.config = config
    m, d = config.model, config.data
    self.modalities = tuple(config.modalities)
    self.weights = {k: float(v) for k, v in dict(config.loss_weights).items()}
    self.stochastic = bool(m.stochastic_quantization)
    self.use_prior = m.prior_depth > 0 and self.weights.get("prior", 0.0) > 0
    self.use_alignment = self.weights.get("alignment", 0.0) > 0
    grids = patches_lib.token_grids(d)
    self.grids = {"video": tuple(grids["video"]), "audio": tuple(grids["mel"])}
    self.num_tokens = {"video": m.num_video_tokens, "audio": m.num_audio_tokens}
    self.num_patches = {k: math.prod(g) for k, g in self.grids.items()}
    pt, ph, pw = d.video_patch
    pf, pl = d.mel_patch
    patch_dim = {"video": pt * ph * pw * 3, "audio": pf * pl}
    self.video_shape = (d.num_frames, d.height, d.width)
    self.mel_shape = (d.mel.n_mels, config_lib.num_mel_frames(d))
    self.video_patch, self.mel_patch = tuple(d.video_patch), tuple(d.mel_patch)
    width, mlp_dim = m.width, int(m.width * m.mlp_ratio)
    # The options build_tokenizer passes (check_model_config has validated them).
    self.norms, self.head_norm, self.locality = m.norms, bool(m.head_norm), m.locality
    self.code_scale = float(m.code_scale)
    inside = self.norms == "inside"

    stack = dict(width=width, num_heads=m.num_heads, mlp_dim=mlp_dim, qkv_bias=m.qkv_bias)
    stack["modalities"] = MODALITIES if inside else ()
    self.encoder = Transformer(m.encoder_depth, final_norm=True, **stack)
    self.decoder = Transformer(m.decoder_depth, final_norm=inside and self.head_norm, **stack)
    self.quant_in = _dense(width, m.code_dim)
    self.quantizer = Quantizer(
      m.codebook_size,
      m.code_dim,
      m.commit_weight,
      m.codebook_weight,
      m.quantizer_temperature,
      gradient=m.quantizer_gradient,
      init_std=float(m.codebook_init_std),
    )
    self.quant_out = _dense(m.code_dim, width)
    self.prior = (
      Prior(
        m.prior_depth,
        m.prior_width,
        m.prior_heads,
        m.code_dim,
        m.num_video_tokens + m.num_audio_tokens,
        m.prior_mlp_ratio,
        m.prior_temperature,
      )
      if m.prior_depth > 0
      else None
    )
    for mod in MODALITIES:
      self.add_module(f"{mod}_embed", _dense(patch_dim[mod], width))
      if not inside:
        self.add_module(f"{mod}_in_norm", _layer_norm(width))
        self.add_module(f"{mod}_out_norm", _layer_norm(width))
      queries = torch.randn(self.num_tokens[mod], width) * 0.02
      self.register_parameter(f"{mod}_queries", nn.Parameter(queries))
      patch_queries = torch.randn(self.num_patches[mod], width) * 0.02
      self.register_parameter(f"{mod}_patch_queries", nn.Parameter(patch_queries))
      head = nn.Linear(width, patch_dim[mod])  # zero-init head [LARP]
      nn.init.zeros_(head.weight)
      nn.init.zeros_(head.bias)
      self.add_module(f"{mod}_head", head)
      projector = Projector(width, m.align_hidden_dim, config.alignment.feature_dim)
      self.add_module(f"{mod}_projector", projector)
      # Fixed sin-cos tables, built by our own numpy function.
      table = layers_lib.sincos_table(self.grids[mod], width)
      self.register_buffer(f"{mod}_pos", torch.from_numpy(table), persistent=False)
    latent_pos = {
      mod: torch.from_numpy(layers_lib.sincos_table((self.num_tokens[mod],), width))
      for mod in MODALITIES
    }
    for mod, table in latent_pos.items():
      # Also the holistic queries' position table with norms='inside'.
      self.register_buffer(f"{mod}_latent_pos", table, persistent=False)
      # Locality: token t's region is the patches j with floor(j * n_t / N) = t;
      # `pool` [n_t, N] averages a region (an empty region gives a zero row).
      n_patches, n_tok = self.num_patches[mod], self.num_tokens[mod]
      regions, gather, slot = _region_layout(n_patches, n_tok)
      pool = F.one_hot(regions, n_tok).t().to(torch.float32)
      pool = pool / pool.sum(1, keepdim=True).clamp(min=1.0)
      self.register_buffer(f"{mod}_regions", regions, persistent=False)
      self.register_buffer(f"{mod}_pool", pool, persistent=False)
      self.register_buffer(f"{mod}_gather", gather, persistent=False)
      self.register_buffer(f"{mod}_slot", slot, persistent=False)
      # Region maps (tokenizer._region_paths), only where a region holds several
      # patches: m_region_in Dense(slots * patch_dim -> width) (xavier, zero bias)
      # with locality 'both', m_region_out [slots, width, width] identities with
      # 'decoder' or 'both'. Otherwise None, as in JAX (no parameter).
      slots = gather.shape[1]
      region_in = region_out = None
      if slots > 1 and self.locality == "both":
        region_in = _dense(slots * patch_dim[mod], width)
      if slots > 1 and self.locality in ("decoder", "both"):
        region_out = nn.Parameter(torch.eye(width).repeat(slots, 1, 1))
      self.add_module(f"{mod}_region_in", region_in)
      self.register_parameter(f"{mod}_region_out", region_out)
    if config.alignment.teacher != "random":
      raise ValueError(f"Only the 'random' teacher is implemented, got {config.alignment.teacher}.")
    self.teacher = RandomTeacher(
      config.alignment.teacher_seed,
      config.alignment.feature_dim,
      self.grids,
      {"video": self.video_shape, "audio": self.mel_shape},
    )

  # --- one stream ---------------------------------------------------------------

  def _part(self, modality: str, name: str):
    return getattr(self, f"{modality}_{name}")

  def _stream(self, modality: str) -> dict[str, str]:
    """The shared stacks' `modality=` (per-modality norms only with norms='inside')."""
    return {"modality": modality} if self.norms == "inside" else {}

  def _encode_one(self, modality: str, x: torch.Tensor, stochastic: bool) -> dict[str, Any]:
    b = x.shape[0]
    h = self._part(modality, "embed")(x) + self._part(modality, "pos")
    queries = self._part(modality, "queries").expand(b, -1, -1)
    region_in = self._part(modality, "region_in")
    if region_in is not None:
      # Several patches per region: each query reads its region's patches side by
      # side, [B, n_t, slots * P], zeros in the padding (tokenizer._encode_one).
      gather = self._part(modality, "gather")
      side = torch.where((gather >= 0)[None, :, :, None], x[:, gather.clamp(min=0)], 0.0)
      queries = queries + region_in(side.reshape(b, gather.shape[0], -1))
    elif self.locality == "both":
      queries = queries + self._part(modality, "pool") @ h  # region means of h
    if self.norms == "outside":
      seq = self._part(modality, "in_norm")(torch.cat([h, queries], dim=1))
    else:
      queries = queries + self._part(modality, "latent_pos")
      seq = torch.cat([h, queries], dim=1)
    out = self.encoder(seq, **self._stream(modality))
    n = self.num_patches[modality]
    q = self.quantizer(self.quant_in(out[:, n:]), stochastic)
    q["patch_tokens"] = out[:, :n]
    return q

  def _decode_one(self, modality: str, quantized: torch.Tensor) -> torch.Tensor:
    b, n_tokens = quantized.shape[:2]
    content = self.quant_out(quantized * self.code_scale)
    latents = content + self._part(modality, "latent_pos")
    patch_queries = self._part(modality, "patch_queries") + self._part(modality, "pos")
    patch_queries = patch_queries.expand(b, -1, -1)
    if self.locality in ("decoder", "both"):
      # Each patch query adds its region's token content (no latent position table),
      # through its slot's map when regions hold several patches (tokenizer._decode_one:
      # every token through every slot's map, [B, n_t, slots, width], then patch j takes
      # (its region, its slot)).
      regions = self._part(modality, "regions")
      region_out = self._part(modality, "region_out")
      if region_out is None:
        region = content[:, regions]
      else:
        per_slot = torch.einsum("btd,sde->btse", content, region_out)
        region = per_slot[:, regions, self._part(modality, "slot")]
      patch_queries = patch_queries + region
    seq = torch.cat([latents, patch_queries], dim=1)
    out = self.decoder(seq, **self._stream(modality))[:, n_tokens:]
    if self.norms == "outside":
      out = self._part(modality, "out_norm")(out)
    return self._part(modality, "head")(out)

  def _inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keys = {"video": "video_patches", "audio": "mel_patches"}
    return {m: _to_float_patches(batch[keys[m]]) for m in self.modalities}

  def unpatchify(self, modality: str, x: torch.Tensor) -> torch.Tensor:
    """patches_lib.unpatchify_video / unpatchify_mel with torch's permute."""
    b = x.shape[0]
    if modality == "video":
      (t, h, w), (pt, ph, pw) = self.video_shape, self.video_patch
      x = x.reshape(b, t // pt, h // ph, w // pw, pt, ph, pw, 3)
      return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, t, h, w, 3)
    (f, length), (pf, pl) = self.mel_shape, self.mel_patch
    x = x.reshape(b, f // pf, length // pl, pf, pl)
    return x.permute(0, 1, 3, 2, 4).reshape(b, f, length)

  # --- training loss ------------------------------------------------------------

  def forward(
    self,
    batch: Mapping[str, torch.Tensor],
    ss_ratio: float | torch.Tensor = 0.0,
    teacher_features: Mapping[str, torch.Tensor] | None = None,
  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The JAX train step's loss (GAN off): (total, {term: unweighted value, 'loss': total})."""
    targets = self._inputs(batch)
    terms: dict[str, torch.Tensor] = {}
    streams = {}
    for m in self.modalities:
      s = self._encode_one(m, targets[m], self.stochastic)
      recon = self._decode_one(m, s["quantized"])
      terms[f"{m}_l1"] = (recon - targets[m]).abs().mean()
      terms[f"{m}_l2"] = (recon - targets[m]).square().mean()
      streams[m] = s
    vq = [streams[m]["loss"] for m in self.modalities]
    terms["vq"] = sum(vq[1:], vq[0])
    if self.use_prior:
      quantized = torch.cat([streams[m]["quantized"] for m in self.modalities], dim=1)
      codes = torch.cat([streams[m]["codes"] for m in self.modalities], dim=1).reshape(-1)
      rounds = self.prior(quantized, self.quantizer.normalized_codebook(), ss_ratio)
      ce = [F.cross_entropy(r.reshape(-1, r.shape[-1]), codes) for r in rounds]
      terms["prior"] = sum(ce[1:], ce[0]) / len(ce)
    if self.use_alignment:
      aligned = []
      for m in self.modalities:
        pred = self._part(m, "projector")(streams[m]["patch_tokens"])
        if teacher_features is not None:
          target = teacher_features[m].to(pred.dtype)
        else:
          target = self.teacher(m, self.unpatchify(m, targets[m]))
        cos = (_l2_normalize(pred, 1e-12) * _l2_normalize(target, 1e-12)).sum(-1)
        aligned.append(-cos.mean())
      terms["alignment"] = sum(aligned[1:], aligned[0]) / len(aligned)
    total = torch.zeros((), dtype=torch.float32, device=targets[self.modalities[0]].device)
    for name, value in terms.items():
      weight = self.weights.get(name, 0.0)
      if weight != 0.0:
        total = total + weight * value
    metrics = {k: v.detach() for k, v in terms.items()}
    metrics["loss"] = total.detach()
    return total, metrics

  # --- inference ------------------------------------------------------------------

  @torch.no_grad()
  def encode(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Patches -> argmax codes {m: int64 [B, n_m]} for the config's modalities."""
    inputs = self._inputs(batch)
    return {m: self._encode_one(m, x, False)["codes"] for m, x in inputs.items()}

  @torch.no_grad()
  def decode(self, codes: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Codes -> reconstructed patches {m: float32 [B, N_m, P_m]}."""
    codebook = self.quantizer.normalized_codebook()
    return {m: self._decode_one(m, F.embedding(c.long(), codebook)) for m, c in codes.items()}

  @torch.no_grad()
  def reconstruct(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return self.decode(self.encode(batch))

  # --- JAX parameter paths --------------------------------------------------------

  def jax_paths(self) -> dict[str, str]:
    """{torch parameter name: '/'-joined JAX parameter path} for every parameter."""
    paths = {}
    for module_name, module in self.named_modules():
      for pname, _ in module.named_parameters(recurse=False):
        parts = module_name.split(".") if module_name else []
        if isinstance(module, nn.LayerNorm):
          leaf = {"weight": "scale", "bias": "bias"}[pname]
        elif isinstance(module, nn.Linear):
          leaf = {"weight": "kernel", "bias": "bias"}[pname]
        else:
          leaf = pname
        full = f"{module_name}.{pname}" if module_name else pname
        paths[full] = "/".join(parts + [leaf])
    return paths


def build(config) -> AVTokTorch:
  """The torch module for a training config (`load_config` or any `configs/` config)."""
  return AVTokTorch(config)


# ----------------------------------------------------------------------------- JAX parameters


def _flatten_jax(tree: Any) -> dict[str, np.ndarray]:
  """{"a/b/kernel": numpy array} of a (boxed or unboxed) JAX parameter tree."""
  flat = traverse_util.flatten_dict(flax_nn.unbox(tree), sep="/")
  return {path: np.asarray(value) for path, value in flat.items()}


def _expand_scan(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for path, value in flat.items():
    parts = path.split("/")
    if "blocks" in parts:
      i = parts.index("blocks")
      for layer in range(value.shape[0]):
        name = "/".join(parts[:i] + [f"block_{layer}"] + parts[i + 1 :])
        out[name] = value[layer]
    else:
      out[path] = value
  return out


@torch.no_grad()
def load_jax_params(module: AVTokTorch, jax_params: Any) -> None:
  """Copies the JAX params (tokenizer + 'video_projector' / 'audio_projector') into `module`.

  Strict: every JAX leaf must land on one torch parameter and every torch
  parameter must be set. Dense kernels [in..., out...] become weight [out, in]
  (the attention's [embed, heads, kv] / [heads, kv, embed] kernels are
  flattened head-major first).
  """
  flat = _expand_scan(_flatten_jax(jax_params))
  params = dict(module.named_parameters())
  paths = module.jax_paths()
  missing = sorted(p for p in paths.values() if p not in flat)
  extra = sorted(set(flat) - set(paths.values()))
  if missing or extra:
    raise ValueError(f"JAX tree does not match: missing {missing[:8]}, unexpected {extra[:8]}.")
  for name, path in paths.items():
    p, value = params[name], flat[path]
    if path.endswith("/kernel"):
      out_dim, in_dim = p.shape
      value = value.reshape(in_dim, out_dim).T
    if tuple(value.shape) != tuple(p.shape):
      raise ValueError(f"{path}: JAX shape {value.shape} vs torch {tuple(p.shape)}.")
    p.copy_(torch.from_numpy(np.array(value, dtype=np.float32, copy=True)))


def num_params(module: nn.Module) -> int:
  return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- the train step


def scheduled_sampling_ratio(step: int, config) -> float:
  """`prior.scheduled_sampling_ratio` of the config's schedule, as a Python float."""
  return float(
    prior_lib.scheduled_sampling_ratio(
      step,
      config.total_steps,
      max_ratio=config.prior.ss_max_ratio,
      peak_fraction=config.prior.ss_peak_fraction,
    )
  )


def param_groups(model: AVTokTorch, lr: float) -> list[dict[str, Any]]:
  """Adam groups from `config.param_rules` (`optimizer.validate_rules`: first match wins).

  'frozen' tensors get requires_grad=False and no group; 'lr_xM' ones train at M x lr.
  """
  rules = optimizer.validate_rules(model.config.param_rules)
  groups: dict[float, list[nn.Parameter]] = {}
  paths = model.jax_paths()
  for name, p in model.named_parameters():
    label = next((value for regex, value in rules if regex.search(paths[name])), "lr_x1")
    if label == optimizer.FROZEN:
      p.requires_grad_(False)
      continue
    groups.setdefault(float(label.removeprefix("lr_x")), []).append(p)
  return [{"params": ps, "lr": lr * mult} for mult, ps in sorted(groups.items())]


def make_train_step(model: AVTokTorch, lr: float | None = None, *, compile: bool = False):
  """`step(batch) -> metrics`: zero_grad, forward, backward, clip, Adam(b1, b2) step.

  `lr` defaults to `config.optim.lr` (constant); `compile` runs the forward
  (and with it the backward, through AOTAutograd) under torch.compile. The
  step counter drives the prior's scheduled-sampling ratio as in JAX.
  """
  config = model.config
  lr = float(config.optim.lr if lr is None else lr)
  groups = param_groups(model, lr)
  trainable = [p for g in groups for p in g["params"]]
  o = config.optim
  opt = torch.optim.Adam(groups, lr=lr, betas=(float(o.b1), float(o.b2)), eps=1e-8)
  clip = float(o.get("grad_clip", 0.0) or 0.0)
  loss_fn = torch.compile(model) if compile else model
  counter = {"step": 0}

  def step(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ratio = torch.tensor(scheduled_sampling_ratio(counter["step"], config))
    opt.zero_grad(set_to_none=True)
    loss, metrics = loss_fn(batch, ratio)
    loss.backward()
    if clip:
      metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(trainable, clip)
    opt.step()
    counter["step"] += 1
    return metrics

  step.optimizer = opt
  step.model = model
  return step


# ----------------------------------------------------------------------------- CLI


def random_batch(model: AVTokTorch, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
  """A batch in the pipeline's format: uint8 video patches, mel patches in [-1, 1]."""
  g = torch.Generator().manual_seed(seed)
  shapes = {
    m: (batch_size, model.num_patches[m], model._part(m, "head").out_features) for m in MODALITIES
  }
  return {
    "video_patches": torch.randint(0, 256, shapes["video"], generator=g, dtype=torch.uint8),
    "mel_patches": torch.rand(shapes["audio"], generator=g) * 2 - 1,
  }


def _median_time(fn, steps: int) -> float:
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="small", choices=config_lib.MODEL_PRESETS)
  parser.add_argument("--stage", default="stage1", choices=sorted(_STAGE_FILES))
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--steps", type=int, default=20, help="timed train steps")
  parser.add_argument("--warmup", type=int, default=3, help="untimed train steps first")
  parser.add_argument("--compile", action="store_true", help="torch.compile the forward")
  parser.add_argument(
    "--stochastic",
    action="store_true",
    help="sample codes from softmax(cos/T) as the JAX train step's default (else argmax)",
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all CPUs)"
  )
  args = parser.parse_args(argv)

  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  config = load_config(args.stage, args.preset)
  config.data.batch_size = args.batch_size
  config.model.stochastic_quantization = bool(args.stochastic)
  model = build(config)
  step = make_train_step(model, compile=args.compile)
  batch = random_batch(model, args.batch_size, args.seed)

  start = time.perf_counter()
  metrics = step(batch)
  first = time.perf_counter() - start
  for _ in range(max(args.warmup - 1, 0)):
    step(batch)
  train_s = _median_time(lambda: step(batch), args.steps)

  recon = torch.compile(model.reconstruct) if args.compile else model.reconstruct
  for _ in range(2):
    recon(batch)
  infer_s = _median_time(lambda: recon(batch), max(args.steps // 2, 3))

  result = {
    "framework": "torch",
    "torch": torch.__version__,
    "compile": bool(args.compile),
    "preset": args.preset,
    "stage": args.stage,
    "modalities": list(config.modalities),
    "batch_size": args.batch_size,
    "codes": "stochastic" if args.stochastic else "argmax",
    "dtype": "float32",
    "threads": torch.get_num_threads(),
    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
    "params": num_params(model),
    "first_step_s": first,
    "train_step_s": train_s,
    "clips_per_s": args.batch_size / train_s,
    "encode_decode_s": infer_s,
    "steps": args.steps,
    "loss_first_step": float(metrics["loss"]),
  }
  print(
    f"torch {torch.__version__} ({'compile' if args.compile else 'eager'}), "
    f"{result['threads']} threads, {args.preset}/{args.stage}, batch {args.batch_size}, "
    f"{result['params']:,} params, {result['codes']} codes"
  )
  print(f"first step (incl. compile): {first:.3f} s")
  print(
    f"train step: {train_s * 1e3:.1f} ms (median of {args.steps} after {args.warmup} warm-up), "
    f"{result['clips_per_s']:.1f} clips/s"
  )
  print(f"encode+decode: {infer_s * 1e3:.1f} ms per batch")
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
