"""Device mesh and logical-axis rules: sharding as data.

Modules name the axes of every parameter and main activation with logical
names; these rules map them onto the three mesh axes (the MaxText / big_vision
convention):

* `data`  - pure data parallelism (batch split, parameters replicated);
* `fsdp`  - batch split AND parameters split along their `embed` axis
            (ZeRO-3 style: gathered per layer by XLA when needed);
* `model` - tensor parallelism: MLP hidden units, attention heads and the
            codebook / output vocabulary.

Flax assigns each mesh axis at most once per array, trying rules in order, so
an activation `('batch', 'length', 'embed')` shards its batch over
`('data', 'fsdp')` and leaves `embed` whole, while a kernel `('embed', 'mlp')`
is split over `fsdp` x `model`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

MESH_AXES = ("data", "fsdp", "model")

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("batch", ("data", "fsdp")),
  ("embed", "fsdp"),
  ("mlp", "model"),
  ("heads", "model"),
  ("vocab", "model"),
  ("conv_out", "model"),
  ("length", None),
  ("kv", None),
  ("code", None),
  ("patch", None),
  ("conv_in", None),
  ("layers", None),
  ("slot", None),
)


def make_mesh(
  shape: Mapping[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
  """A mesh over `devices` (default: all) with axes `data`, `fsdp`, `model`.

  `shape` maps axis names to sizes (missing axes get 1, one axis may be -1 to
  take the remaining devices) or lists the three sizes in MESH_AXES order.
  Axis types are Auto (GSPMD propagation), which is what Flax linen's
  logical constraints expect.
  """
  devices = list(jax.devices() if devices is None else devices)
  if not isinstance(shape, Mapping):
    if len(shape) != len(MESH_AXES):
      raise ValueError(f"Mesh shape {tuple(shape)} must list sizes for {MESH_AXES}.")
    shape = dict(zip(MESH_AXES, shape, strict=True))
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"Unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}.")
  sizes = [int(shape.get(name, 1)) for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"Mesh shape {dict(shape)}: at most one axis may be -1.")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"Mesh shape {dict(shape)}: sizes must be positive (or one -1).")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(
        f"Mesh shape {dict(shape)}: {len(devices)} devices are not divisible by {known}."
      )
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
      f"Mesh shape {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices, "
      f"but {len(devices)} are available."
    )
  device_array = np.asarray(devices).reshape(sizes)
  return jax.sharding.Mesh(
    device_array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  )


def mesh_axis_for(
  logical_name: str, rules: Sequence[tuple[str, str | tuple[str, ...] | None]] = LOGICAL_AXIS_RULES
) -> str | tuple[str, ...] | None:
  """The mesh axis (or axes) a logical axis name maps to under `rules`."""
  for name, mesh_axes in rules:
    if name == logical_name:
      return mesh_axes
  return None


def logical_spec(
  logical_names: Sequence[str | None],
  rules: Sequence[tuple[str, str | tuple[str, ...] | None]] = LOGICAL_AXIS_RULES,
) -> jax.sharding.PartitionSpec:
  """PartitionSpec of an array whose axes carry these logical names."""
  return nn.logical_to_mesh_axes(tuple(logical_names), rules)


def logical_sharding(
  mesh: jax.sharding.Mesh,
  logical_names: Sequence[str | None],
  rules: Sequence[tuple[str, str | tuple[str, ...] | None]] = LOGICAL_AXIS_RULES,
) -> jax.sharding.NamedSharding:
  """NamedSharding on `mesh` of an array whose axes carry these logical names."""
  return jax.sharding.NamedSharding(mesh, logical_spec(logical_names, rules))


def axis_size(mesh: jax.sharding.Mesh, mesh_axes: str | tuple[str, ...] | None) -> int:
  """Number of shards a (possibly composite) mesh axis splits an array into."""
  if mesh_axes is None:
    return 1
  if isinstance(mesh_axes, str):
    mesh_axes = (mesh_axes,)
  return math.prod(mesh.shape[a] for a in mesh_axes)


def state_shardings(mesh: jax.sharding.Mesh, abstract_tree, rules=LOGICAL_AXIS_RULES):
  """NamedShardings for a (possibly boxed) variable tree from `jax.eval_shape(init)`.

  Leaves boxed with logical names (`nn.with_logical_partitioning`) follow the
  rules, leaves boxed with mesh-axis names (`nn.with_partitioning`) keep them,
  unboxed leaves are replicated. The result has the structure of the unboxed
  tree (empty nodes such as optax's MaskedNode stay empty nodes).
  """

  def one(leaf):
    if isinstance(leaf, nn.Partitioned) and not jax.tree.leaves(leaf.value):
      return leaf.value  # e.g. a box around optax's MaskedNode: no array to place
    if isinstance(leaf, nn.LogicallyPartitioned):
      spec = logical_spec(leaf.names, rules)
    elif isinstance(leaf, nn.Partitioned):
      spec = jax.sharding.PartitionSpec(*leaf.names)
    else:
      spec = jax.sharding.PartitionSpec()
    return jax.sharding.NamedSharding(mesh, spec)

  return jax.tree.map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
