"""Checkpoints: the one module that talks to Orbax.

A checkpoint step directory holds two items:

* `state/`      - the training state, any pytree of (possibly sharded)
                  `jax.Array`s: params, optimizer state (optax namedtuples are
                  fine), codebook statistics, step counter, PRNG key. Typed
                  keys (`jax.random.key`) round-trip as they are: Orbax stores
                  their key data and rebuilds the typed key from the target's
                  dtype, so the trainer need not call `jax.random.key_data`.
* `data_state/` - the Grain iterator state of EVERY process, one JSON file per
                  process (`process_{i}-of-{n}.json`). Orbax composite items
                  must have the same names on all processes (the primary
                  process creates their directories), so the process index is
                  in the file name, not in the item name.

Restores go straight into the target's shardings (shapes -> shardings ->
arrays), so a state saved on one mesh restores onto another without ever being
whole on one device. `restore_params_partial` is "init from previous stage":
it copies the parameters two stages share and keeps the fresh init for the
rest.

Preemption: `PreemptionHandler` turns SIGTERM into a flag the trainer polls
after each step; the trainer then saves with `force=True`, waits and exits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import types
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers

_STATE = "state"
_DATA_STATE = "data_state"

# ----------------------------------------------------------------------------
# Per-process JSON item (the Grain iterator state).
# ----------------------------------------------------------------------------


def _data_state_filename() -> str:
  return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class _DataStateHandler(ocp.CheckpointHandler):
  """Writes one JSON file per process (Orbax's JsonCheckpointHandler writes on the primary only)."""

  def save(self, directory: epath.Path, args: _DataStateSave) -> None:
    # Serialized synchronously inside `Checkpointer.save`, so the caller may
    # keep advancing its iterator right away.
    (directory / _data_state_filename()).write_text(json.dumps(args.item))

  def restore(self, directory: epath.Path, args: _DataStateRestore | None = None) -> dict:
    del args
    path = directory / _data_state_filename()
    if not path.exists():
      found = sorted(p.name for p in directory.iterdir())
      raise FileNotFoundError(
        f"No data-iterator state for this process at {path} (found {found}); was the "
        "checkpoint written with a different number of processes?"
      )
    return json.loads(path.read_text())

  def metadata(self, directory: epath.Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@ocp.args.register_with_handler(_DataStateHandler, for_save=True)
@dataclasses.dataclass
class _DataStateSave(ocp.args.CheckpointArgs):
  item: Mapping[str, Any]


@ocp.args.register_with_handler(_DataStateHandler, for_restore=True)
@dataclasses.dataclass
class _DataStateRestore(ocp.args.CheckpointArgs):
  pass


# ----------------------------------------------------------------------------
# Pytree helpers.
# ----------------------------------------------------------------------------


def _key_str(key: Any) -> str:
  for attr in ("key", "idx", "name"):  # DictKey, SequenceKey / FlattenedIndexKey, GetAttrKey.
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _path_str(path: Iterable[Any]) -> str:
  return "/".join(_key_str(k) for k in path)


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """'/'-joined path -> shape for every leaf that has a shape.

  Works on arrays, ShapeDtypeStructs and Orbax metadata alike; namedtuples
  (stored by Orbax as dicts keyed by field name) give the same paths either
  way because field names are used, and tuple indices are plain numbers.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_str(p): _stored_shape(x) for p, x in leaves if hasattr(x, "shape")}


def _stored_shape(x: Any) -> tuple[int, ...]:
  """The shape Orbax stores for `x`: typed PRNG keys are stored as their key data."""
  dtype = getattr(x, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return tuple(jax.eval_shape(jax.random.key_data, x).shape)
  return tuple(x.shape)


def _abstract(x: Any) -> Any:
  """A ShapeDtypeStruct carrying the sharding to restore `x` into."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    return x  # Python scalars: Orbax restores them as they were saved.
  sharding = getattr(x, "sharding", None)
  if sharding is None:
    # No sharding given (numpy arrays, bare ShapeDtypeStructs): land on the
    # first local device rather than as numpy, so the result is a jax.Array.
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _describe(paths: Iterable[str], limit: int = 8) -> str:
  paths = sorted(paths)
  more = f" ... (+{len(paths) - limit} more)" if len(paths) > limit else ""
  return ", ".join(paths[:limit]) + more


def _as_path(directory: str | os.PathLike) -> epath.Path:
  """An absolute path (Orbax wants one); URLs such as gs://bucket/run stay as they are."""
  directory = os.fspath(directory)
  return epath.Path(directory if "://" in directory else os.path.abspath(directory))


def _open_manager(
  directory: epath.Path,
  *,
  options: ocp.CheckpointManagerOptions,
  state_handler: ocp.CheckpointHandler | None = None,
) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
    directory,
    options=options,
    item_handlers={
      _STATE: state_handler or ocp.StandardCheckpointHandler(),
      _DATA_STATE: _DataStateHandler(),
    },
  )


def _stored_state_shapes(manager: ocp.CheckpointManager, step: int, directory: epath.Path) -> Any:
  """The stored `state` tree of `step` as Orbax metadata (shapes, dtypes)."""
  metadata = manager.item_metadata(step)
  state = metadata[_STATE] if _STATE in metadata else None
  if state is None:
    raise FileNotFoundError(f"Checkpoint {directory}/{step} has no '{_STATE}' item.")
  return state.tree


def _resolve_step(manager: ocp.CheckpointManager, directory: epath.Path, step: int | None) -> int:
  steps = list(manager.all_steps())
  if not steps:
    raise FileNotFoundError(f"No checkpoint found in {directory}.")
  if step is None:
    return max(steps)
  if step not in steps:
    raise FileNotFoundError(
      f"No checkpoint for step {step} in {directory}; available steps: {sorted(steps)}."
    )
  return step


# ----------------------------------------------------------------------------
# The checkpointer.
# ----------------------------------------------------------------------------


class Checkpointer:
  """Saves and restores the training state and the data-iterator state.

  Keeps the latest `keep` checkpoints plus every step divisible by
  `keep_every` (if set). With `async_save` the arrays are copied off the
  devices during `save` and written in a background thread; call
  `wait_until_finished()` (or `close()`) before exiting.

  All processes must call every method (Orbax coordinates them).
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    keep: int = 3,
    keep_every: int | None = None,
    async_save: bool = True,
  ):
    if keep < 1:
      raise ValueError(f"Checkpointer keep={keep}: must keep at least one checkpoint.")
    if keep_every is not None and keep_every < 1:
      raise ValueError(f"Checkpointer keep_every={keep_every}: must be positive or None.")
    self.directory = _as_path(directory)
    policies = [checkpoint_managers.LatestN(n=keep)]
    if keep_every is not None:
      policies.append(checkpoint_managers.EveryNSteps(interval_steps=keep_every))
    self._name_format = ocp.step.standard_name_format()
    options = ocp.CheckpointManagerOptions(
      preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=async_save,
      step_name_format=self._name_format,
      create=True,
    )
    self._manager = _open_manager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """The newest saved step, or None when there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """All saved steps, ascending."""
    return sorted(self._manager.all_steps())

  def save(
    self, step: int, state: Any, *, data_state: dict | None = None, force: bool = False
  ) -> bool:
    """Saves `state` (and this process's `data_state`) as `step`; True if it wrote one.

    `force` is passed on to Orbax (saves even when its save policy would
    skip `step`). A step that already exists is never overwritten: that
    happens when a preemption save lands on a step just saved periodically,
    and returns False.
    """
    step = int(step)
    if step in self._manager.all_steps():
      return False
    items = {_STATE: ocp.args.StandardSave(state)}
    if data_state is not None:
      items[_DATA_STATE] = _DataStateSave(data_state)
    return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=force))

  def restore(self, target: Any, *, step: int | None = None) -> tuple[Any, dict | None]:
    """Restores `step` (default: latest) into the shapes, dtypes and shardings of `target`.

    `target` is a pytree of `jax.ShapeDtypeStruct`s with `.sharding` (from
    `jax.eval_shape` plus shardings) or of concrete arrays; each array is
    read directly into its sharding. Leaves without a sharding land on the
    first local device. Returns (state, data_state or None when that step
    saved none).
    """
    self._manager.wait_until_finished()  # Listed steps may still be being written.
    step = _resolve_step(self._manager, self.directory, step)
    stored = _flat_shapes(_stored_state_shapes(self._manager, step, self.directory))
    wanted = _flat_shapes(target)
    problems = []
    if missing := set(wanted) - set(stored):
      problems.append(f"missing from the checkpoint: {_describe(missing)}")
    if extra := set(stored) - set(wanted):
      problems.append(f"in the checkpoint but not in the target: {_describe(extra)}")
    mismatched = [
      f"{p} (checkpoint {stored[p]}, target {wanted[p]})"
      for p in sorted(set(wanted) & set(stored))
      if stored[p] != wanted[p]
    ]
    if mismatched:
      problems.append(f"shape mismatch: {_describe(mismatched)}")
    if problems:
      raise ValueError(
        f"Cannot restore checkpoint {self.directory}/{step} into the target: " + "; ".join(problems)
      )
    items = {_STATE: ocp.args.StandardRestore(jax.tree.map(_abstract, target))}
    step_dir = ocp.step.find_step_path(self.directory, self._name_format, step=step)
    if (step_dir / _DATA_STATE).exists():
      items[_DATA_STATE] = _DataStateRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    data_state = restored[_DATA_STATE] if _DATA_STATE in items else None
    return restored[_STATE], data_state

  def wait_until_finished(self) -> None:
    """Blocks until every pending asynchronous save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, then releases Orbax's resources."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()


# ----------------------------------------------------------------------------
# Init from a previous stage.
# ----------------------------------------------------------------------------


def _nested(flat: Mapping[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def restore_params_partial(
  directory: str | os.PathLike,
  target_params: Any,
  *,
  step: int | None = None,
  item_path: tuple[str, ...] = ("params",),
) -> tuple[Any, list[str], list[str]]:
  """Copies into a fresh init every parameter a previous stage's checkpoint shares with it.

  Reads `state[item_path...]` of the latest (or the given) checkpoint that
  `Checkpointer.save` wrote under `directory`. Each leaf of `target_params`
  (the fresh init: nested dicts of concrete, possibly sharded arrays, as
  Flax makes them) whose '/'-joined path exists there is restored into the
  target leaf's sharding and dtype; the others keep their fresh values.
  Checkpoint leaves the target lacks are ignored (and logged).

  Returns (merged params, restored paths, fresh paths).
  Raises ValueError when a shared path has a different shape.
  """
  directory = _as_path(directory)
  if not directory.exists():
    raise FileNotFoundError(f"No checkpoint directory {directory} to initialize from.")
  manager = _open_manager(
    directory,
    options=ocp.CheckpointManagerOptions(
      read_only=True, create=False, step_name_format=ocp.step.standard_name_format()
    ),
    # PyTree (not Standard) handler: only it restores a subset of the stored
    # tree, so the other stage's optimizer state and extra modules are never read.
    state_handler=ocp.PyTreeCheckpointHandler(),
  )
  try:
    step = _resolve_step(manager, directory, step)
    stored_tree = _stored_state_shapes(manager, step, directory)
    for key in item_path:
      if not isinstance(stored_tree, Mapping) or key not in stored_tree:
        raise KeyError(f"Checkpoint {directory}/{step} has no state/{'/'.join(item_path)}.")
      stored_tree = stored_tree[key]
    stored = _flat_shapes(stored_tree)

    target_leaves = jax.tree_util.tree_flatten_with_path(target_params)[0]
    to_restore: dict[tuple[str, ...], Any] = {}
    restored_paths, fresh_paths = [], []
    for path, leaf in target_leaves:
      name = _path_str(path)
      if name not in stored:
        fresh_paths.append(name)
        continue
      if stored[name] != _stored_shape(leaf):
        raise ValueError(
          f"Cannot initialize '{name}' from {directory}/{step}: checkpoint shape "
          f"{stored[name]} != target shape {_stored_shape(leaf)}."
        )
      to_restore[tuple(_key_str(k) for k in path)] = _abstract(leaf)
      restored_paths.append(name)
    if ignored := set(stored) - {_path_str(p) for p, _ in target_leaves}:
      logging.info(
        "Init from %s/%s ignores %d leaves: %s", directory, step, len(ignored), _describe(ignored)
      )

    restored_flat: dict[str, Any] = {}
    if to_restore:
      item = _nested({(*item_path, *p): v for p, v in to_restore.items()})
      restored = manager.restore(
        step,
        args=ocp.args.Composite(
          **{
            _STATE: ocp.args.PyTreeRestore(
              item=item,
              restore_args=ocp.checkpoint_utils.construct_restore_args(item),
              partial_restore=True,
            )
          }
        ),
      )[_STATE]
      for key in item_path:
        restored = restored[key]
      restored_flat = {
        _path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]
      }
  finally:
    manager.close()

  merged = jax.tree_util.tree_map_with_path(
    lambda p, x: restored_flat.get(_path_str(p), x), target_params
  )
  return merged, sorted(restored_paths), sorted(fresh_paths)


# ----------------------------------------------------------------------------
# Preemption.
# ----------------------------------------------------------------------------


def saved_step(workdir: str | os.PathLike, step: int | None = None) -> tuple[str, int]:
  """(checkpoint directory, step) of a training workdir: its latest step, or `step` if saved.

  Raises FileNotFoundError (no `workdir/checkpoints`, or nothing finished in
  it) or ValueError (`step` was not saved), each naming the folder.
  """
  workdir = os.fspath(workdir)
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No checkpoints in {workdir} (looked for {directory}).")
  with Checkpointer(directory) as ckpt:
    steps = ckpt.all_steps()
  if not steps:
    raise FileNotFoundError(f"{directory} holds no finished checkpoint.")
  if step is None:
    return directory, steps[-1]
  if step not in steps:
    raise ValueError(f"No checkpoint of step {step} in {directory}; saved steps: {steps}.")
  return directory, int(step)


def restore_complete(
  directory: str | os.PathLike, abstract: Any, *, step: int, item_path: tuple[str, ...], what: str
) -> Any:
  """Every leaf of `abstract` (e.g. `jax.eval_shape(init)[collection]`, boxed or not) from a checkpoint.

  Unlike `restore_params_partial` nothing may stay fresh: a leaf the
  checkpoint lacks raises ValueError naming `what` and the first paths.
  """
  target = jax.tree.map(
    lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
    abstract,
    is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )
  restored, _, missing = restore_params_partial(directory, target, step=step, item_path=item_path)
  if missing:
    missing = sorted(missing)
    raise ValueError(
      f"Checkpoint {os.fspath(directory)}/{step} lacks {what} {', '.join(missing[:5])}"
      f"{' ...' if len(missing) > 5 else ''}: is config.json the config it was trained with?"
    )
  return restored


class PreemptionHandler:
  """Turns SIGTERM (and optionally SIGINT) into a flag polled between steps.

  Usage::

    with PreemptionHandler() as preemption:
      for step in ...:
        state = train_step(state, batch)
        if preemption.requested:
          checkpointer.save(step, state, data_state=it.get_state(), force=True)
          checkpointer.wait_until_finished()
          break

  The handler only sets the flag, never raises, so a signal can not tear a
  step (or an Orbax write) in half. The previous handlers come back on exit.
  Must be entered on the main thread (a Python rule for signal handlers).

  Multi-host: the signal reaches hosts at different steps (or only some
  hosts), yet all must save the same step and leave together. The trainers
  therefore ask `should_stop(sync=...)` rather than read `requested`: with
  one process it is the flag; with several, every process contributes its
  flag at the same steps (`sync=True`: the log steps, where the loop syncs
  with the host anyway) through `multihost_utils.process_allgather`, and all
  stop if any was signalled. Between sync steps it answers False.
  """

  def __init__(self, *, sigint: bool = False):
    self.requested = False
    self.signum: int | None = None
    self._signals = [signal.SIGTERM] + ([signal.SIGINT] if sigint else [])
    self._previous: dict[int, Any] = {}

  def should_stop(self, *, sync: bool) -> bool:
    """Whether every process stops after this step (see the class docstring)."""
    if jax.process_count() == 1:
      return self.requested
    if not sync:
      return False
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.any(flags))

  def _handle(self, signum: int, frame: types.FrameType | None) -> None:
    del frame
    self.requested = True
    self.signum = signum

  def __enter__(self) -> PreemptionHandler:
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError("PreemptionHandler must be entered on the main thread.")
    for signum in self._signals:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info: object) -> None:
    for signum, previous in self._previous.items():
      # None means the old handler was not installed from Python: the
      # closest we can restore is the default action.
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    self._previous.clear()
