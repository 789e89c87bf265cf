"""Freezing and learning-rate multipliers as config data, compiled into optax.

A stage config carries `param_rules`: a tuple of `(regex, value)` pairs. Each
parameter's '/'-joined path (e.g. 'encoder/block_0/attn/query/kernel',
'audio_projector/dense_0/kernel') is matched with `re.search` against the
rules in order; the FIRST matching rule gives its value:

* 'frozen': the parameter never changes (its update is exactly zero and the
  optimizer keeps no Adam moments for it);
* a float M > 0: the parameter trains with M times the scheduled learning rate
  (the AR prior's x50 [LARP]).

Unmatched parameters train with multiplier 1. Each distinct value becomes one
label ('frozen', 'lr_x1', 'lr_x50', ...) and one branch of
`optax.partition` (a.k.a. `optax.multi_transform`), the pattern of big_vision's
`optax.py::make` (STYLE.md practice 4).

Typical use in a trainer:

  tx = optimizer.make_optimizer(config.optim, params, config.param_rules, config.total_steps)
  opt_state = tx.init(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optimizer.apply_updates(params, updates, optimizer.trainable_mask(params, rules))
  logging.info(optimizer.summarize(params, rules))
  checksum = optimizer.frozen_checksum(params, rules)  # logged; must never change in a stage
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

FROZEN = "frozen"
SCHEDULES = ("cosine", "constant")

PyTree = Any
Rules = Sequence[tuple[str, str | float]]


# ----------------------------------------------------------------------------- paths and labels


def _key_name(key: Any) -> str | None:
  """One path component as a string; None for the `.value` of a boxed (partitioned) leaf."""
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    # flax's nn.Partitioned / LogicallyPartitioned store the array in `.value`:
    # dropping it gives boxed and unboxed trees the same paths.
    return None if key.name == "value" else key.name
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def _path_str(path: tuple[Any, ...]) -> str:
  return "/".join(name for name in map(_key_name, path) if name is not None)


def param_paths(params: PyTree) -> PyTree:
  """The tree of '/'-joined key paths, e.g. 'encoder/block_0/mlp/fc1/kernel'."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _path_str(path), params)


def validate_rules(rules: Rules) -> list[tuple[re.Pattern[str], str]]:
  """Compiles the rules and turns their values into labels; errors name the bad rule.

  Returns:
    [(compiled regex, label)] in rule order.
  """
  compiled = []
  for i, rule in enumerate(rules):
    if isinstance(rule, str) or len(rule) != 2:
      raise ValueError(f"param_rules[{i}]={rule!r} is not a (regex, value) pair.")
    pattern, value = rule
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ValueError(f"param_rules[{i}]: regex {pattern!r} does not compile: {e}.") from e
    compiled.append((regex, _label(value, pattern)))
  return compiled


def _label(value: str | float, pattern: str) -> str:
  """'frozen' or 'lr_x{multiplier:g}' for a rule's value."""
  if isinstance(value, str):
    if value != FROZEN:
      raise ValueError(
        f"Rule {pattern!r}: value {value!r} must be {FROZEN!r} or a learning-rate multiplier."
      )
    return FROZEN
  if isinstance(value, bool) or not isinstance(value, int | float):
    raise ValueError(f"Rule {pattern!r}: value {value!r} must be {FROZEN!r} or a number.")
  if not math.isfinite(value) or value <= 0:
    # A zero multiplier would still keep (useless) Adam moments: say 'frozen'.
    raise ValueError(
      f"Rule {pattern!r}: multiplier {value!r} must be finite and > 0 (use {FROZEN!r} to freeze)."
    )
  return f"lr_x{float(value):g}"


def _multiplier(label: str) -> float:
  return float(label.removeprefix("lr_x"))


def param_labels(params: PyTree, rules: Rules) -> PyTree:
  """The tree of labels ('frozen', 'lr_x1', 'lr_x50', ...) for `params` under `rules`.

  Raises:
    ValueError: a rule is malformed, its regex does not compile, or it matches
      no parameter at all (almost certainly a typo that would silently train
      what it meant to freeze). The message names the rule.
  """
  compiled = validate_rules(rules)
  paths = jax.tree_util.tree_leaves(param_paths(params))
  for regex, _ in compiled:
    if not any(regex.search(p) for p in paths):
      some = ", ".join(sorted({p.split("/")[0] for p in paths}))
      raise ValueError(f"Rule {regex.pattern!r} matches no parameter (top-level modules: {some}).")

  def label(path: tuple[Any, ...], _) -> str:
    name = _path_str(path)
    for regex, value in compiled:
      if regex.search(name):
        return value
    return "lr_x1"

  return jax.tree_util.tree_map_with_path(label, params)


def trainable_mask(params: PyTree, rules: Rules) -> PyTree:
  """True for every parameter that is not frozen."""
  return jax.tree.map(lambda label: label != FROZEN, param_labels(params, rules))


# ----------------------------------------------------------------------------- schedule and optimizer


def make_schedule(optim_config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine decay to `min_lr_ratio * lr` at `total_steps` [LARP].

  The warmup starts at lr / warmup_steps (not 0) and reaches lr at step
  warmup_steps - 1, so the first step already learns; the cosine runs from
  step warmup_steps (lr) to step total_steps (min_lr_ratio * lr) and stays
  there. `schedule='constant'` keeps lr after the warmup.
  """
  lr = float(optim_config.lr)
  warmup = int(optim_config.warmup_steps)
  kind = optim_config.schedule
  floor = lr * float(optim_config.min_lr_ratio)
  if kind not in SCHEDULES:
    raise ValueError(f"optim.schedule={kind!r} must be one of {SCHEDULES}.")
  if warmup < 0 or total_steps < 1:
    raise ValueError(
      f"optim.warmup_steps={warmup} must be >= 0 and total_steps={total_steps} >= 1."
    )
  decay_steps = max(1, total_steps - warmup)

  def schedule(step: jax.Array) -> jax.Array:
    step = jnp.asarray(step, jnp.float32)
    ramp = jnp.minimum(1.0, (step + 1.0) / max(warmup, 1))
    if kind == "constant":
      after = jnp.float32(lr)
    else:
      progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
      after = floor + (lr - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup, lr * ramp, after).astype(jnp.float32)

  return schedule


def _is_kernel(path: tuple[Any, ...], _) -> bool:
  # Weight decay on matrices only: decaying LayerNorm scales, biases, learned
  # queries and the l2-normalised codebook has no regularising meaning [ours].
  return _path_str(path).endswith("kernel")


def make_optimizer(
  optim_config: ml_collections.ConfigDict, params: PyTree, rules: Rules, total_steps: int
) -> optax.GradientTransformation:
  """Adam(b1, b2) [LARP] with per-label learning-rate multipliers and frozen parameters.

  The chain is:

  1. zero the gradients of frozen parameters, so that
  2. `clip_by_global_norm(grad_clip)` measures only what trains (a frozen
     encoder's gradient must not shrink the audio modules' updates in stage 2);
  3. `optax.partition` over the labels: 'frozen' -> `set_to_zero`, 'lr_xM' ->
     Adam (+ decoupled weight decay on kernels) scaled by M * schedule.

  Args:
    optim_config: `config.optim` (lr, b1, b2, weight_decay, warmup_steps,
      schedule, min_lr_ratio, grad_clip; optional eps, default 1e-8).
    params: the parameter tree (or its `jax.eval_shape`); only its structure
      and paths are read, to validate the rules now rather than at `init`.
    rules: `config.param_rules`.
    total_steps: length of the schedule.
  """
  labels = param_labels(params, rules)  # validates the rules against this tree
  schedule = make_schedule(optim_config, total_steps)
  eps = float(optim_config.get("eps", 1e-8))
  weight_decay = float(optim_config.weight_decay)

  def branch(multiplier: float) -> optax.GradientTransformation:
    parts = [optax.scale_by_adam(b1=float(optim_config.b1), b2=float(optim_config.b2), eps=eps)]
    if weight_decay > 0:
      parts.append(
        optax.add_decayed_weights(
          weight_decay, mask=lambda p: jax.tree_util.tree_map_with_path(_is_kernel, p)
        )
      )
    parts.append(optax.scale_by_learning_rate(lambda step: multiplier * schedule(step)))
    return optax.chain(*parts)

  transforms = {FROZEN: optax.set_to_zero()}
  for label in set(jax.tree.leaves(labels)) - {FROZEN}:
    transforms[label] = branch(_multiplier(label))

  # Labels are recomputed from whatever tree `init`/`update` see (boxed or
  # unboxed, concrete or abstract), so they always match its structure.
  def label_fn(tree: PyTree) -> PyTree:
    return param_labels(tree, rules)

  def frozen_fn(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda label: label == FROZEN, label_fn(tree))

  chain = [optax.masked(optax.set_to_zero(), frozen_fn)]
  grad_clip = optim_config.get("grad_clip", 0.0)
  if grad_clip:
    chain.append(optax.clip_by_global_norm(float(grad_clip)))
  chain.append(optax.partition(transforms, label_fn))
  return optax.chain(*chain)


def apply_updates(params: PyTree, updates: PyTree, trainable: PyTree) -> PyTree:
  """`optax.apply_updates` that returns frozen leaves untouched (the same arrays).

  Adding a zero update is not always the identity at the bit level
  (-0.0 + 0.0 = +0.0), and skipping the add lets a donated buffer pass through.
  `trainable` is `trainable_mask(params, rules)`.
  """
  return jax.tree.map(
    lambda p, u, t: jnp.asarray(p + u).astype(jnp.asarray(p).dtype) if t else p,
    params,
    updates,
    trainable,
  )


# ----------------------------------------------------------------------------- checks and reports


def _as_uint32(x: jax.Array) -> jax.Array:
  """The raw bits of `x` as uint32 (one value per element; 8-byte types give two)."""
  x = jnp.asarray(x)
  size = x.dtype.itemsize
  if size >= 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  small = {1: jnp.uint8, 2: jnp.uint16}[size]
  return jax.lax.bitcast_convert_type(x, small).astype(jnp.uint32)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """Row-major element index, uint32, built from iotas (no reshape of a sharded array)."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  return index


def frozen_checksum(params: PyTree, rules: Rules) -> jax.Array:
  """A float32 fingerprint of the frozen parameters' bits; 0.0 when nothing is frozen.

  Every frozen element's raw bits b (uint32 view) are mixed to m = b ^ (b >> 16)
  and summed as sum_k m_k * (2k + 1) modulo 2^32, k running over all frozen
  elements in tree order; the result's low 24 bits are returned as an exactly
  representable float32 integer (so it logs as an ordinary scalar).

  Guarantee: changing any ONE frozen element by one ulp, flipping its sign or
  changing its exponent changes the checksum (the change reaches the low 24
  bits of m, and the odd weight 2k + 1 is invertible modulo 2^24). Changes to
  several elements can cancel only by coincidence (about 1 in 2^24). Jittable.
  """
  labels = param_labels(params, rules)
  total = jnp.uint32(0)
  offset = 0
  for x, label in zip(jax.tree.leaves(params), jax.tree.leaves(labels), strict=True):
    if label != FROZEN:
      continue
    bits = _as_uint32(x)
    mixed = bits ^ (bits >> 16)
    weight = (_flat_index(bits.shape) + jnp.uint32(offset % 2**32)) * jnp.uint32(2) + jnp.uint32(1)
    total = total + jnp.sum(mixed * weight, dtype=jnp.uint32)
    offset += math.prod(bits.shape)
  return (total & jnp.uint32(0xFFFFFF)).astype(jnp.float32)


def summarize(params: PyTree, rules: Rules) -> str:
  """A table of tensors and parameters per label and per top-level module."""
  labels = jax.tree.leaves(param_labels(params, rules))
  paths = jax.tree.leaves(param_paths(params))
  sizes = [int(np.prod(np.shape(x))) for x in jax.tree.leaves(params)]
  by_label: dict[str, list[int]] = {}
  by_module: dict[str, tuple[set[str], list[int]]] = {}
  for path, label, size in zip(paths, labels, sizes, strict=True):
    by_label.setdefault(label, []).append(size)
    module_labels, module_sizes = by_module.setdefault(path.split("/")[0], (set(), []))
    module_labels.add(label)
    module_sizes.append(size)

  def order(label: str) -> tuple[bool, float]:
    return (label == FROZEN, 0.0 if label == FROZEN else _multiplier(label))

  total = sum(sizes)
  rows = [f"{'label':<24} {'tensors':>8} {'params':>14} {'share':>7}"]
  for label in sorted(by_label, key=order):
    n = sum(by_label[label])
    rows.append(f"{label:<24} {len(by_label[label]):>8} {n:>14,} {n / max(total, 1):>7.1%}")
  rows.append(f"{'total':<24} {len(sizes):>8} {total:>14,}")
  rows.append("")
  rows.append(f"{'module':<24} {'tensors':>8} {'params':>14}  labels")
  for module in sorted(by_module):
    module_labels, module_sizes = by_module[module]
    names = ", ".join(sorted(module_labels, key=order))
    rows.append(f"{module:<24} {len(module_sizes):>8} {sum(module_sizes):>14,}  {names}")
  return "\n".join(rows)
