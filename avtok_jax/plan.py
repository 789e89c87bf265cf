r"""Memory planner: parameters, optimizer state and activations per device, before a run.

  python -m avtok_jax.plan --config=configs/vfal_stage1.py:L --devices=8 --compile=false
  python -m avtok_jax.plan --config=configs/vfal_stage1.py:L --config.mesh.fsdp=8 \
      --device_memory_gb=16 --json=plan.json
  python -m avtok_jax.plan --config=configs/ar_a2v.py:L --devices=16 --compile=false

Builds exactly what the trainer builds for the config (`train.py` for tokenizer
configs, `train_ar.py` for `trainer='ar'` configs): the mesh from
`config.mesh`, the train state from `jax.eval_shape` of the init, its
shardings from the logical-axis rules (`sharding.state_shardings`), and the
train step. Nothing is allocated.

* Parameters and optimizer state, per device: the sum over the state's leaves
  of the bytes of one shard (each axis split over the mesh axes its
  PartitionSpec names, rounded up where it does not divide).
* Activations, analytic: the per-block saved activations of every transformer
  stack times its depth (with or without remat), plus the quantizer / prior /
  output logits, the patch in/out layers and the discriminator, for the
  per-device batch (`analytic_activation_bytes`; formulas in the comments
  there). A rough figure: it ignores XLA's fusion and scheduling.
* Compiled (unless --compile=false): `jax.jit(train_step, in_shardings=,
  out_shardings=, donate_argnums=(0,)).lower(...).compile().memory_analysis()`,
  XLA's own buffer assignment for one device. Compiling needs the real
  devices: with --devices different from this host's device count the
  compile is skipped (on CPU, run with
  XLA_FLAGS=--xla_force_host_platform_device_count=N to compile for N
  devices). On CPU L takes minutes to compile.

Budget: 90% of the device memory (--device_memory_gb, else the device's
`memory_stats()['bytes_limit']`), leaving room for XLA's workspace,
fragmentation and the runtime. Over budget, a line starting with "WARNING:"
says by how much and what to change (FSDP, remat, a smaller per-device batch).

Config errors are the trainer's one-line errors (`config_lib.check_train_config`,
`train.check_config`, `sharding.make_mesh`); a stage 2/3 config needs no
`init_from` here (nothing is restored).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from avtok_jax import config_lib, optimizer, sharding, train, train_ar
from avtok_jax.data import pipeline
from avtok_jax.data import tokens as tokens_lib
from avtok_jax.models import build_tokenizer

# Share of the device memory a plan may fill [ours]: the rest is left to XLA's
# workspace, fragmentation and the runtime (JAX's GPU client preallocates 75%
# by default, TPU reserves a little for the runtime).
USABLE_FRACTION = 0.9
# On CPU the planner compiles without LLVM optimisation: the buffer assignment
# that memory_analysis reports is decided before code generation and came out
# identical (tiny stage 1: argument/output/alias/temp bytes equal at levels 0
# and 3), while the compile took about a third less time [ours, jax 0.10.2].
_CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
# Generator presets -> the tokenizer preset whose tokens they model (train_ar.py:
# "use the one of the tokenizer's size (L for the paper's B/L tokenizers)").
_TOKENIZER_FOR_GENERATOR = {"tiny": "tiny", "small": "small", "L": "L"}
# Classes of a token set when no tokens_dir is given: the built-in data's 10,
# VGGSound's 309 for L [paper].
_DEFAULT_CLASSES = {"tiny": 10, "small": 10, "L": 309}
_MEMORY_FIELDS = (
  "argument_size_in_bytes",
  "output_size_in_bytes",
  "alias_size_in_bytes",
  "temp_size_in_bytes",
  "generated_code_size_in_bytes",
)


# ----------------------------------------------------------------------------- mesh


class _PlannedDevice:
  """Stands in for one device of a device count this host does not have.

  Only lets `sharding.make_mesh` check and resolve `config.mesh` for that
  count (same errors as the trainer); the planner then uses the mesh's shape.
  """

  platform = "planned"

  def __init__(self, index: int):
    self.id = index

  def __repr__(self) -> str:
    return f"PlannedDevice({self.id})"


def plan_mesh(
  mesh_config: Mapping[str, int], num_devices: int | None = None
) -> jax.sharding.Mesh | jax.sharding.AbstractMesh:
  """The trainer's mesh for `num_devices` (default: this host's devices).

  A real `Mesh` when the count is this host's (so the step can be compiled),
  otherwise an `AbstractMesh` of the same shape (shardings and shapes only).
  Raises `sharding.make_mesh`'s ValueError when the mesh does not fit.
  """
  if num_devices is None or num_devices == jax.device_count():
    return sharding.make_mesh(dict(mesh_config))
  fake = sharding.make_mesh(dict(mesh_config), [_PlannedDevice(i) for i in range(num_devices)])
  sizes = tuple(int(fake.shape[a]) for a in sharding.MESH_AXES)
  return jax.sharding.AbstractMesh(
    sizes, sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(sizes)
  )


def _mesh_context(mesh):
  if isinstance(mesh, jax.sharding.AbstractMesh):
    return jax.sharding.use_abstract_mesh(mesh)
  return jax.set_mesh(mesh)


def _mesh_sizes(mesh) -> dict[str, int]:
  return {a: int(mesh.shape[a]) for a in sharding.MESH_AXES}


# ----------------------------------------------------------------------------- bytes


def shard_bytes(leaf: jax.ShapeDtypeStruct, named: jax.sharding.NamedSharding) -> int:
  """Bytes of the largest shard of `leaf` under `named` (one device's part).

  Each axis is split over the mesh axes its PartitionSpec entry names;
  an axis that does not divide is rounded up (the first shards are the full
  ones).
  """
  spec = tuple(named.spec) + (None,) * (len(leaf.shape) - len(named.spec))
  shape = [
    -(-dim // sharding.axis_size(named.mesh, entry))
    for dim, entry in zip(leaf.shape, spec, strict=True)
  ]
  return math.prod(shape) * np.dtype(leaf.dtype).itemsize


def tree_bytes(abstract: Any, shardings: Any | None = None) -> tuple[int, int]:
  """(total bytes, bytes on one device) of a tree of ShapeDtypeStructs and its NamedShardings."""
  leaves = jax.tree.leaves(abstract)
  total = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves)
  if shardings is None:
    return total, total
  named = jax.tree.leaves(shardings)
  if len(named) != len(leaves):
    raise ValueError(f"{len(leaves)} arrays but {len(named)} shardings.")
  return total, sum(shard_bytes(x, s) for x, s in zip(leaves, named, strict=True))


def human(num_bytes: float) -> str:
  """Bytes in binary units: '512 B', '1.50 KiB', '3.25 GiB'."""
  value = float(num_bytes)
  if abs(value) < 1024:
    return f"{value:.0f} B"
  units = ("KiB", "MiB", "GiB", "TiB")
  i = 0
  value /= 1024
  while abs(value) >= 1024 and i < len(units) - 1:
    value /= 1024
    i += 1
  return f"{value:.2f} {units[i]}"


# ----------------------------------------------------------------------------- trainers


@dataclasses.dataclass
class TrainerSetup:
  """What the trainer jit-compiles, in abstract form, plus how its state splits into rows."""

  trainer: str  # 'tokenizer' | 'ar'
  abstract_state: Any  # unboxed ShapeDtypeStructs
  boxed_state: Any  # the same with their logical-axis boxes (re-shard on another mesh)
  state_shardings: Any
  abstract_batch: dict[str, jax.ShapeDtypeStruct]
  batch_sharding: Any
  train_step: Callable[..., Any]
  groups: dict[str, tuple[str, ...]]  # row name -> top-level state keys
  trainable: Any  # bool tree over state['params']
  param_counts: dict[str, int]  # named parameter counts for the header
  notes: list[str]
  # (rng key data) -> boxed state, the trainer's init: `jax.jit(lambda r:
  # nn.unbox(init_state(r)), out_shardings=state_shardings)(rng_data)` builds it.
  init_state: Callable[[jax.Array], Any]


def _count(tree: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _abstract_state(init_state: Callable, seed: int, mesh) -> tuple[Any, Any, Any]:
  """(unboxed state shapes, their NamedShardings on `mesh`, the boxed shapes)."""
  rules = sharding.LOGICAL_AXIS_RULES
  rng_data = jax.random.key_data(jax.random.key(seed))
  with _mesh_context(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init_state, rng_data)
    shardings = sharding.state_shardings(mesh, boxed, rules)
  return train._strip_boxes(boxed), shardings, boxed


def tokenizer_setup(config: ml_collections.ConfigDict, mesh) -> TrainerSetup:
  """The tokenizer trainer's state, batch and step as `train.run` builds them."""
  rules = sharding.LOGICAL_AXIS_RULES
  models = train.Models(config)
  with _mesh_context(mesh), nn.logical_axis_rules(rules):
    abstract_vars = jax.eval_shape(models.init, jax.random.key(config.seed))
  abstract_params = train._strip_boxes(abstract_vars["params"])
  trainable = optimizer.trainable_mask(abstract_params, config.param_rules)
  tx = optimizer.make_optimizer(
    config.optim, abstract_params, config.param_rules, config.total_steps
  )
  disc_tx = train._make_disc_optimizer(config) if config.gan.enabled else None
  init_state = train.make_init_state(config, models, tx, disc_tx, trainable)
  abstract_state, state_shardings, boxed_state = _abstract_state(init_state, config.seed, mesh)
  tok = models.tokenizer
  batch = config.data.batch_size
  video_dtype = jnp.uint8 if config.data.video_dtype == "uint8" else jnp.float32
  # The pipeline's training batch (data/pipeline.py: Preprocess, train=True,
  # keys=train_keys(modalities), as train.run asks for it).
  every_key = {
    "video_patches": jax.ShapeDtypeStruct(
      (batch, tok.num_patches("video"), tok.video_patch_dim), video_dtype
    ),
    "mel_patches": jax.ShapeDtypeStruct(
      (batch, tok.num_patches("audio"), tok.audio_patch_dim), jnp.float32
    ),
    "label": jax.ShapeDtypeStruct((batch,), jnp.int32),
  }
  abstract_batch = {k: every_key[k] for k in pipeline.train_keys(config.modalities)}
  tokenizer_params = {k: v for k, v in abstract_params.items() if not k.endswith("_projector")}
  counts = {
    "tokenizer (incl. prior)": _count(tokenizer_params),
    "prior": _count(tokenizer_params.get("prior", {})),
    "projectors": _count(abstract_params) - _count(tokenizer_params),
    "trainable": sum(
      math.prod(x.shape)
      for x, t in zip(jax.tree.leaves(abstract_params), jax.tree.leaves(trainable), strict=True)
      if t
    ),
  }
  if config.gan.enabled:
    counts["discriminators"] = _count(abstract_state["disc_params"])
  groups = {
    "parameters": ("params",),
    "optimizer state": ("opt_state",),
    "discriminator parameters": ("disc_params",),
    "discriminator optimizer state": ("disc_opt_state",),
    "other state": ("step", "rng", "codebook_stats", "restart_counts", "lecam_ema"),
  }
  return TrainerSetup(
    trainer="tokenizer",
    abstract_state=abstract_state,
    boxed_state=boxed_state,
    state_shardings=state_shardings,
    abstract_batch=abstract_batch,
    batch_sharding=jax.sharding.NamedSharding(mesh, sharding.logical_spec(("batch",))),
    train_step=train.make_train_step(config, models, tx, disc_tx, trainable),
    groups=groups,
    trainable=trainable,
    param_counts=counts,
    notes=[],
    init_state=init_state,
  )


def ar_metadata(config: ml_collections.ConfigDict) -> tuple[dict[str, Any], str]:
  """(token-set metadata, where it came from) for a generator config.

  From `config.tokens_dir` when set; otherwise the tokenizer preset of the
  generator's size (codebook, tokens per clip) and its usual class count.
  """
  if config.tokens_dir:
    return tokens_lib.read_metadata(config.tokens_dir), f"token set {config.tokens_dir}"
  size = config.generator.size
  if size not in _TOKENIZER_FOR_GENERATOR:
    raise ValueError(
      f"config.generator.size={size!r}: choose one of {tuple(_TOKENIZER_FOR_GENERATOR)}."
    )
  model = config_lib.model_config(_TOKENIZER_FOR_GENERATOR[size])
  meta = {
    "codebook_size": model.codebook_size,
    "num_video_tokens": model.num_video_tokens,
    "num_audio_tokens": model.num_audio_tokens,
    "num_classes": _DEFAULT_CLASSES[size],
  }
  source = (
    f"tokenizer preset {_TOKENIZER_FOR_GENERATOR[size]!r} (no --config.tokens_dir): codebook "
    f"{meta['codebook_size']}, {meta['num_video_tokens']}+{meta['num_audio_tokens']} tokens, "
    f"{meta['num_classes']} classes"
  )
  return meta, source


def ar_setup(config: ml_collections.ConfigDict, mesh) -> TrainerSetup:
  """The generator trainer's state, batch and step as `train_ar.run` builds them."""
  meta, source = ar_metadata(config)
  task = train_ar.Task(config, meta)
  rules = sharding.LOGICAL_AXIS_RULES
  with _mesh_context(mesh), nn.logical_axis_rules(rules):
    abstract_params = train._strip_boxes(jax.eval_shape(task.init, jax.random.key(0))["params"])
  tx = optimizer.make_optimizer(
    config.optim, abstract_params, config.param_rules, config.total_steps
  )

  init_state = train_ar.make_init_state(task, tx)

  abstract_state, state_shardings, boxed_state = _abstract_state(init_state, config.seed, mesh)
  batch = config.batch_size
  # data/tokens.py: make_token_iterator's batches.
  abstract_batch = {
    "video_codes": jax.ShapeDtypeStruct((batch, int(meta["num_video_tokens"])), jnp.int32),
    "audio_codes": jax.ShapeDtypeStruct((batch, int(meta["num_audio_tokens"])), jnp.int32),
    "label": jax.ShapeDtypeStruct((batch,), jnp.int32),
  }
  trainable = optimizer.trainable_mask(abstract_params, config.param_rules)
  return TrainerSetup(
    trainer="ar",
    abstract_state=abstract_state,
    boxed_state=boxed_state,
    state_shardings=state_shardings,
    abstract_batch=abstract_batch,
    batch_sharding=jax.sharding.NamedSharding(mesh, sharding.logical_spec(("batch",))),
    train_step=train_ar.make_train_step(config, task, tx),
    groups={
      "parameters": ("params",),
      "optimizer state": ("opt_state",),
      "other state": ("step", "rng"),
    },
    trainable=trainable,
    param_counts={"generator": _count(abstract_params)},
    notes=[
      f"Task {config.task}: sequences of {task.layout.length} tokens, vocabulary "
      f"{task.vocab.size}, from the {source}."
    ],
    init_state=init_state,
  )


# ----------------------------------------------------------------------------- activations


def transformer_activation_bytes(
  *,
  seq: int,
  width: int,
  heads: int,
  mlp: int,
  depth: int,
  dtype_bytes: int,
  remat: bool,
  model_shards: int = 1,
  gated_mlp: bool = False,
  attention_scores: bool = True,
) -> int:
  """Bytes a pre-LN transformer stack keeps for its backward pass, per example.

  Per block (elements; e = bytes of the compute dtype, M = model-axis size;
  the residual stream and the norm inputs are float32 in layers.py /
  generator.py):
    residual stream before attention and before the MLP (norm inputs), f32:   2 s w  x 4
    norm outputs (inputs of the q/k/v and first MLP matmuls):                  2 s w  x e
    q, k, v and the attention output (heads split over 'model'):               4 s w / M x e
    attention logits in f32 (softmax backward) and probabilities in dtype:     H s^2 / M x (4 + e)
    MLP hidden before and after the nonlinearity ('mlp' split over 'model'):   2 s m / M x e
      (SwiGLU: gate, up and their product, 3 s m / M x e)
  This is the accounting of Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models", section 4.1) without dropout
  masks and with our dtypes. The s^2 terms assume XLA's attention
  (`jax.nn.dot_product_attention` without a fused kernel); a fused flash
  kernel keeps none of them (`attention_scores=False`).
  Without remat the stack keeps `depth` blocks' worth. With remat (nn.remat
  per block, nothing saveable) it keeps each block's f32 input, 4 s w, and
  rebuilds one block at a time in the backward pass: depth x 4 s w + one block.
  """
  s, w, m, e = seq, width, mlp, dtype_bytes
  hidden = (3 if gated_mlp else 2) * s * m
  block = 2 * s * w * 4 + 2 * s * w * e + (4 * s * w + hidden) * e // model_shards
  if attention_scores:
    block += heads * s * s * (4 + e) // model_shards
  if remat:
    return depth * s * w * 4 + block
  return depth * block


def _discriminator_pass_bytes(models: train.Models, modality: str) -> int:
  """Bytes one discriminator pass keeps for its backward, per example.

  Shapes from `jax.eval_shape` with `capture_intermediates`: every module
  output (convolutions, GroupNorms), f32, counted twice for the LeakyReLU
  output that follows each.
  """
  shape = models.video_shape if modality == "video" else models.mel_shape
  disc = models.discriminators[modality]
  x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)

  def run(x):
    variables = disc.init(jax.random.key(0), x)
    _, state = disc.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    return state["intermediates"]

  captured = jax.eval_shape(run, x)
  return 2 * 4 * sum(math.prod(a.shape) for a in jax.tree.leaves(captured))


def tokenizer_activation_bytes(
  config: ml_collections.ConfigDict, model_shards: int = 1, attention_scores: bool = True
) -> int:
  """Analytic activation bytes of one tokenizer train step, per example (see the comments)."""
  c = config.model
  tok = build_tokenizer(c, config.data)
  e = jnp.dtype(c.dtype).itemsize
  weights = dict(config.loss_weights)
  mlp = int(c.width * c.mlp_ratio)
  stack = dict(
    width=c.width,
    heads=c.num_heads,
    mlp=mlp,
    dtype_bytes=e,
    remat=bool(c.remat),
    model_shards=model_shards,
    attention_scores=attention_scores,
  )
  codes_per_shard = -(-c.codebook_size // model_shards)
  total, tokens = 0, 0
  for m in config.modalities:
    patches, n_tok = tok.num_patches(m), tok.num_tokens(m)
    tokens += n_tok
    # Shared encoder over [patches ; queries] and decoder over [latents ; patch queries].
    total += transformer_activation_bytes(seq=patches + n_tok, depth=c.encoder_depth, **stack)
    total += transformer_activation_bytes(seq=n_tok + patches, depth=c.decoder_depth, **stack)
    # Quantizer: the [tokens, K/M] f32 scores and their softmax (or Gumbel noise).
    total += 2 * n_tok * codes_per_shard * 4
    # Patch in/out: f32 input patches, embeddings, head input and reconstruction.
    total += 2 * patches * (tok.patch_dim(m) + c.width) * 4
    if weights.get("alignment", 0.0) > 0:
      # Projector: two SiLU hidden layers (before and after SiLU) and its output.
      total += patches * (4 * c.align_hidden_dim + c.align_out_dim) * e
  if c.prior_depth > 0 and weights.get("prior", 0.0) > 0:
    # Two scheduled-sampling rounds in training (models/prior.py), each a causal
    # stack over the codes plus [L, K/M] f32 logits and their softmax.
    prior = transformer_activation_bytes(
      seq=tokens,
      width=c.prior_width,
      heads=c.prior_heads,
      mlp=int(c.prior_width * c.prior_mlp_ratio),
      depth=c.prior_depth,
      dtype_bytes=e,
      remat=bool(c.remat),
      model_shards=model_shards,
      attention_scores=attention_scores,
    )
    total += 2 * (prior + 2 * tokens * codes_per_shard * 4)
  if config.gan.enabled:
    models = train.Models(config)
    passes = {m: _discriminator_pass_bytes(models, m) for m in config.gan.modalities}
    # The generator's adversarial term backpropagates through one pass on the
    # fakes; the discriminator's own update (after the tokenizer's backward)
    # runs real and fake passes.
    total = max(total + sum(passes.values()), 2 * sum(passes.values()))
  return total


def ar_activation_bytes(
  config: ml_collections.ConfigDict, model_shards: int = 1, attention_scores: bool = True
) -> int:
  """Analytic activation bytes of one generator train step, per example."""
  meta, _ = ar_metadata(config)
  task = train_ar.Task(config, meta)
  g = config.generator
  seq = task.layout.length - 1
  stack = transformer_activation_bytes(
    seq=seq,
    width=g.width,
    heads=g.num_heads,
    mlp=g.mlp_dim,
    depth=g.depth,
    dtype_bytes=jnp.dtype(g.dtype).itemsize,
    remat=bool(g.remat),
    model_shards=model_shards,
    gated_mlp=True,
    attention_scores=attention_scores,
  )
  outputs = task.model.num_outputs
  # Logits [T, V/M] in f32 and their softmax; token embeddings f32.
  return stack + 2 * seq * (-(-outputs // model_shards)) * 4 + seq * g.width * 4


# ----------------------------------------------------------------------------- compile


def compiled_memory(setup: TrainerSetup, mesh: jax.sharding.Mesh) -> dict[str, int] | None:
  """XLA's memory_analysis of the train step as the trainer jits it (None if unsupported)."""
  step = jax.jit(
    setup.train_step,
    in_shardings=(setup.state_shardings, setup.batch_sharding),
    out_shardings=(setup.state_shardings, None),
    donate_argnums=(0,),
  )
  options = _CPU_COMPILER_OPTIONS if mesh.devices.flat[0].platform == "cpu" else None
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    lowered = step.lower(setup.abstract_state, setup.abstract_batch)
  stats = lowered.compile(options).memory_analysis()
  if stats is None:
    return None
  out = {name: int(getattr(stats, name)) for name in _MEMORY_FIELDS}
  # What one device holds at once: the inputs, the outputs that do not reuse
  # a donated input, and the temporaries.
  out["total_in_bytes"] = (
    out["argument_size_in_bytes"]
    + out["output_size_in_bytes"]
    - out["alias_size_in_bytes"]
    + out["temp_size_in_bytes"]
    + out["generated_code_size_in_bytes"]
  )
  peak = getattr(stats, "peak_memory_in_bytes", None)
  if peak is not None:
    out["peak_memory_in_bytes"] = int(peak)
  return out


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass
class Row:
  """One component: bytes of the whole thing (unsharded) and on one device."""

  name: str
  total: int
  per_device: int


@dataclasses.dataclass
class Plan:
  """Everything the planner prints (and writes as JSON)."""

  config: str
  trainer: str
  num_devices: int
  mesh: dict[str, int]
  global_batch: int
  batch_per_device: int
  remat: bool
  param_counts: dict[str, int]
  rows: list[Row]  # state, batch, gradients, activations
  analytic_total: Row
  compiled: dict[str, int] | None
  compile_note: str
  device_memory: int | None
  device_memory_source: str
  notes: list[str]
  suggestions: list[str]

  @property
  def budget(self) -> int | None:
    return None if self.device_memory is None else int(self.device_memory * USABLE_FRACTION)

  @property
  def needed(self) -> int:
    """Bytes per device the plan is checked against: compiled if there, else analytic."""
    if self.compiled is not None:
      return self.compiled["total_in_bytes"]
    return self.analytic_total.per_device

  @property
  def fits(self) -> bool | None:
    return None if self.budget is None else self.needed <= self.budget

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["budget"] = self.budget
    out["needed"] = self.needed
    out["fits"] = self.fits
    out["usable_fraction"] = USABLE_FRACTION
    return out


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """The trainer's config checks for `num_devices` devices (one-line ValueErrors)."""
  if config.get("trainer") == train_ar.TRAINER:
    # train_ar.check_config's mesh checks; the rest needs a token set.
    train_ar.check_mesh_fit(config, plan_mesh(config.mesh, num_devices), num_devices)
    return
  checked = ml_collections.ConfigDict(config.to_dict())
  if checked.stage in ("stage2", "stage3") and not checked.init_from:
    checked.init_from = "(not needed for planning)"
  config_lib.check_train_config(checked)
  train.check_config(config, num_devices)
  plan_mesh(config.mesh, num_devices)


def _device_memory(override_gb: float | None) -> tuple[int | None, str]:
  if override_gb is not None:
    if override_gb <= 0:
      raise ValueError(f"--device_memory_gb={override_gb} must be > 0.")
    return int(override_gb * 2**30), "--device_memory_gb"
  device = jax.local_devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{device.device_kind} memory_stats()['bytes_limit']"
  return None, f"unknown ({device.platform} reports no memory_stats)"


def make_plan(
  config: ml_collections.ConfigDict,
  *,
  name: str = "",
  num_devices: int | None = None,
  compile: bool = True,
  device_memory_gb: float | None = None,
) -> Plan:
  """Plans memory for `config` on `num_devices` devices (default: this host's)."""
  local = jax.device_count()
  devices = local if num_devices is None else int(num_devices)
  if devices < 1:
    raise ValueError(f"--devices={devices} must be >= 1.")
  check_config(config, devices)
  mesh = plan_mesh(config.mesh, devices)
  sizes = _mesh_sizes(mesh)
  is_ar = config.get("trainer") == train_ar.TRAINER
  setup = ar_setup(config, mesh) if is_ar else tokenizer_setup(config, mesh)
  global_batch = config.batch_size if is_ar else config.data.batch_size
  per_device_batch = global_batch // (sizes["data"] * sizes["fsdp"])

  rows = []
  state, shardings = setup.abstract_state, setup.state_shardings
  for row_name, keys in setup.groups.items():
    present = [k for k in keys if k in state]
    if not present:
      continue
    total, per = tree_bytes({k: state[k] for k in present}, {k: shardings[k] for k in present})
    rows.append(Row(row_name, total, per))
  rows.append(
    Row(
      "batch",
      *tree_bytes(setup.abstract_batch, {k: setup.batch_sharding for k in setup.abstract_batch}),
    )
  )
  # Gradients of the trainable parameters, sharded like them (f32), alive
  # between the backward pass and the optimizer update.
  grads = jax.tree.map(lambda x, t: x if t else None, state["params"], setup.trainable)
  grad_shardings = jax.tree.map(lambda s, t: s if t else None, shardings["params"], setup.trainable)
  rows.append(Row("gradients (trainable)", *tree_bytes(grads, grad_shardings)))
  activations = ar_activation_bytes if is_ar else tokenizer_activation_bytes
  remat = bool(config.generator.remat if is_ar else config.model.remat)
  rows.append(
    Row(
      f"activations (estimate, remat {'on' if remat else 'off'})",
      activations(config) * global_batch,
      activations(config, sizes["model"]) * per_device_batch,
    )
  )
  flash = activations(config, sizes["model"], attention_scores=False) * per_device_batch
  notes = list(setup.notes)
  notes.append(
    f"The activation estimate keeps XLA attention's s^2 scores; with a fused flash-attention "
    f"kernel (e.g. cuDNN on GPU in bf16) it would be {human(flash)} per device."
  )
  analytic = Row("total (analytic)", sum(r.total for r in rows), sum(r.per_device for r in rows))

  compiled, note = None, ""
  if not compile:
    note = "skipped (--compile=false)"
  elif isinstance(mesh, jax.sharding.AbstractMesh):
    note = (
      f"skipped: planning {devices} devices on a host with {local}; compiling needs the real "
      f"devices (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count={devices})"
    )
  else:
    compiled = compiled_memory(setup, mesh)
    if compiled is None:
      note = "not available on this backend"
  memory, source = _device_memory(device_memory_gb)
  plan = Plan(
    config=name,
    trainer="generator (train_ar)" if is_ar else f"tokenizer (train, {config.stage})",
    num_devices=devices,
    mesh=sizes,
    global_batch=global_batch,
    batch_per_device=per_device_batch,
    remat=remat,
    param_counts=setup.param_counts,
    rows=rows,
    analytic_total=analytic,
    compiled=compiled,
    compile_note=note,
    device_memory=memory,
    device_memory_source=source,
    notes=notes,
    suggestions=[],
  )
  if plan.fits is False:
    plan.suggestions = _suggestions(plan, setup, is_ar)
  return plan


def _suggestions(plan: Plan, setup: TrainerSetup, is_ar: bool) -> list[str]:
  """What to change when the plan does not fit, with the analytic figures it would give."""
  out = []
  m = plan.mesh
  rows = {r.name: r for r in plan.rows}
  state = rows["parameters"].per_device + rows["optimizer state"].per_device
  max_fsdp = plan.num_devices // m["model"]
  if m["fsdp"] < max_fsdp:
    # The same state re-sharded on the all-FSDP mesh (data x fsdp, and so the
    # per-device batch, stay the same).
    mesh = jax.sharding.AbstractMesh(
      (1, max_fsdp, m["model"]),
      sharding.MESH_AXES,
      axis_types=(jax.sharding.AxisType.Auto,) * len(sharding.MESH_AXES),
    )
    keys = ("params", "opt_state")
    boxed = {k: setup.boxed_state[k] for k in keys}
    with _mesh_context(mesh):
      shardings = sharding.state_shardings(mesh, boxed)
    _, sharded = tree_bytes({k: setup.abstract_state[k] for k in keys}, shardings)
    out.append(
      f"shard parameters and optimizer state over more devices: --config.mesh.fsdp={max_fsdp} "
      f"--config.mesh.data=1 (now fsdp={m['fsdp']}): parameters + optimizer state "
      f"{human(state)} per device would become {human(sharded)}"
    )
  if not plan.remat:
    key = "generator.remat" if is_ar else "model.remat"
    out.append(f"recompute activations in the backward pass: --config.{key}=true")
  activations = next(r for r in plan.rows if r.name.startswith("activations")).per_device
  per_example = activations / plan.batch_per_device
  fixed = plan.analytic_total.per_device - activations
  fitting = int((plan.budget - fixed) // per_example) if plan.budget > fixed else 0
  fitting = min(fitting, plan.batch_per_device - 1)
  shards = m["data"] * m["fsdp"]
  batch_key = "batch_size" if is_ar else "data.batch_size"
  if fitting >= 1:
    out.append(
      f"a smaller per-device batch: --config.{batch_key}={fitting * shards} ({fitting} per "
      f"device instead of {plan.batch_per_device}, the most the analytic estimate fits; "
      f"{human(per_example)} of activations per clip), or more devices at the same global batch"
    )
  else:
    out.append(
      f"the parameters, optimizer state and gradients alone ({human(fixed)} per device) leave no "
      f"room for one clip's activations ({human(per_example)}): shard them first"
    )
  return out


def _count_str(n: int) -> str:
  return f"{n / 1e6:.1f}M ({n:,})" if n >= 1e6 else f"{n:,}"


def format_plan(plan: Plan) -> str:
  """The printed report."""
  m = plan.mesh
  lines = [
    f"Memory plan for {plan.config or 'the config'}: {plan.trainer}",
    f"Mesh data={m['data']} fsdp={m['fsdp']} model={m['model']} over {plan.num_devices} "
    f"device(s); batch {plan.global_batch} global, {plan.batch_per_device} per device "
    f"(data*fsdp={m['data'] * m['fsdp']}).",
    "Parameters: " + ", ".join(f"{k} {_count_str(v)}" for k, v in plan.param_counts.items()) + ".",
    *plan.notes,
    "",
    f"{'component':<36}{'total':>14}{'per device':>14}",
  ]
  for row in plan.rows:
    lines.append(f"{row.name:<36}{human(row.total):>14}{human(row.per_device):>14}")
  lines += [
    "-" * 64,
    f"{plan.analytic_total.name:<36}{human(plan.analytic_total.total):>14}"
    f"{human(plan.analytic_total.per_device):>14}",
    "",
  ]
  if plan.compiled is None:
    lines.append(f"Compiled (XLA memory_analysis): {plan.compile_note}.")
  else:
    c = plan.compiled
    lines += [
      "Compiled train step, per device (XLA memory_analysis):",
      f"  arguments {human(c['argument_size_in_bytes'])}, outputs "
      f"{human(c['output_size_in_bytes'])}, aliased (donated) {human(c['alias_size_in_bytes'])}, "
      f"temporaries {human(c['temp_size_in_bytes'])}, code "
      f"{human(c['generated_code_size_in_bytes'])}",
      f"  total = arguments + outputs - aliased + temporaries + code = "
      f"{human(c['total_in_bytes'])}",
    ]
  what = "compiled total" if plan.compiled is not None else "analytic total"
  if plan.device_memory is None:
    lines.append(
      f"Device memory: {plan.device_memory_source}; pass --device_memory_gb=X to check the "
      "plan against it."
    )
  else:
    lines.append(
      f"Device memory {human(plan.device_memory)} ({plan.device_memory_source}); usable budget "
      f"{human(plan.budget)} ({USABLE_FRACTION:.0%}, the rest left to XLA and the runtime); "
      f"{what} {human(plan.needed)} = {plan.needed / plan.budget:.1%} of the budget."
    )
    if not plan.fits:
      lines.append(
        f"WARNING: {what} {human(plan.needed)} per device exceeds the usable "
        f"{human(plan.budget)} ({USABLE_FRACTION:.0%} of {human(plan.device_memory)}) by "
        f"{human(plan.needed - plan.budget)}. Try:"
      )
      lines += [f"  - {s}" for s in plan.suggestions]
  return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def _flag_values(argv: list[str]) -> tuple[flags.FlagValues, Any]:
  # A private FlagValues: importing this module must not define global flags.
  # config_flags finds the --config.key=value overrides in `argv` when defined.
  fv = flags.FlagValues()
  config = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file (configs/*.py[:ARG]) and --config.key=value overrides.",
    flag_values=fv,
    sys_argv=argv,
  )
  flags.DEFINE_integer(
    "devices", None, "Plan for this many devices (default: this host's).", flag_values=fv
  )
  flags.DEFINE_boolean(
    "compile", True, "Compile the train step for XLA's memory_analysis.", flag_values=fv
  )
  flags.DEFINE_float(
    "device_memory_gb",
    None,
    "Memory of one device in GiB (default: memory_stats()['bytes_limit'] where reported).",
    flag_values=fv,
  )
  flags.DEFINE_string("json", "", "Also write the numbers to this JSON file.", flag_values=fv)
  return fv, config


def main(argv: Sequence[str] | None = None) -> int:
  """Prints the plan (argv[0] is the program name); returns the exit status."""
  argv = list(sys.argv if argv is None else argv)
  fv, config_holder = _flag_values(argv)
  try:
    rest = fv(argv)
  except flags.Error as e:
    print(f"Error: {e}", file=sys.stderr)
    return 2
  if len(rest) > 1:
    print(f"Error: unexpected arguments {rest[1:]}.", file=sys.stderr)
    return 2
  if config_holder.value is None:
    print("Error: --config is required (e.g. --config=configs/vfal_stage1.py:L).", file=sys.stderr)
    return 2
  from avtok_jax import reporting

  reporting.quiet_library_logs()
  try:
    plan = make_plan(
      config_holder.value,
      name=config_flags.get_config_filename(fv["config"]),
      num_devices=fv.devices,
      compile=fv.compile,
      device_memory_gb=fv.device_memory_gb,
    )
  except (ValueError, FileNotFoundError) as e:
    print(f"Error: {e}", file=sys.stderr)
    return 1
  print(format_plan(plan))
  if fv.json:
    with open(fv.json, "w") as f:
      json.dump(plan.to_json(), f, indent=2)
      f.write("\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
