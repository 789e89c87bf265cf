"""Saves a state sharded over a 2x4 mesh and restores it onto other shardings.

Run by `tests/test_checkpointing.py` in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag must be set
before JAX starts, hence the separate process):

  python tests/checkpointing_sharded_check.py OUT_DIR

Writes OUT_DIR/facts.json: for each restore, whether the values are equal to
the saved ones and the shardings the restored arrays have.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from avtok_jax import checkpointing, sharding  # noqa: E402


def _state(mesh: jax.sharding.Mesh, specs: dict[str, P]) -> dict:
  """Params with distinct values, their adam state, a step and a key, laid out by `specs`."""
  params = {
    "kernel": jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16) / 7.0,
    "codebook": jnp.arange(16 * 4, dtype=jnp.float32).reshape(16, 4) - 3.0,
  }
  opt_state = optax.adam(1e-3).init(params)
  opt_state = jax.tree.map(lambda x: x + 0.5 if x.ndim else x + 3, opt_state)
  state = {"params": params, "opt_state": opt_state, "step": jnp.int32(7)}

  def place(path, x):
    name = jax.tree_util.keystr(path[-1:])
    spec = next((s for k, s in specs.items() if k in name), P())
    return jax.device_put(x, NamedSharding(mesh, spec))

  state = jax.tree_util.tree_map_with_path(place, state)
  state["rng"] = jax.device_put(jax.random.key(3), NamedSharding(mesh, P()))
  return state


def _same(a: jax.Array, b: jax.Array) -> bool:
  if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
    a, b = jax.random.key_data(a), jax.random.key_data(b)
  return a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


def _summary(restored: dict, saved: dict) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(restored)[0]
  return {
    "equal": all(jax.tree.leaves(jax.tree.map(_same, restored, saved))),
    "specs": {
      jax.tree_util.keystr(p): str(x.sharding.spec)
      for p, x in leaves
      if isinstance(x.sharding, NamedSharding)
    },
    "mesh_shapes": sorted(
      {str(dict(x.sharding.mesh.shape)) for _, x in leaves if isinstance(x.sharding, NamedSharding)}
    ),
    "shard_shapes": {
      jax.tree_util.keystr(p): list(x.sharding.shard_shape(x.shape)) for p, x in leaves
    },
  }


def main(out: Path) -> None:
  assert len(jax.devices()) == 8, jax.devices()
  mesh_24 = sharding.make_mesh({"data": 2, "model": 4})
  mesh_42 = sharding.make_mesh({"data": 4, "model": 2})
  specs_24 = {"kernel": P("data", "model"), "codebook": P("model", None)}
  to_save = _state(mesh_24, specs_24)
  saved = _state(mesh_24, specs_24)  # An identical copy to compare against.
  ckpt = checkpointing.Checkpointer(out / "ckpt", keep=2)
  ckpt.save(7, to_save, data_state={"index": 3})
  # Delete the saved arrays while the asynchronous save may still be in
  # flight, as `donate_argnums` in the train step would.
  for x in jax.tree.leaves(to_save):
    x.delete()
  ckpt.wait_until_finished()

  facts = {"saved": _summary(saved, saved)}
  # Target 1: everything replicated on the (4, 2) mesh.
  abstract = jax.eval_shape(lambda: saved)
  replicated = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh_42, P())),
    abstract,
  )
  restored, data_state = ckpt.restore(replicated)
  facts["replicated"] = _summary(restored, saved)
  facts["data_state"] = data_state

  # Target 2: the other mesh, split the other way round.
  other = _state(mesh_42, {"kernel": P("model", "data"), "codebook": P("data", None)})
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), other
  )
  restored, _ = ckpt.restore(target)
  facts["resharded"] = _summary(restored, saved)

  # Init from a previous stage onto a sharded fresh init with one new parameter.
  fresh = {
    "kernel": jax.device_put(jnp.zeros((8, 16)), NamedSharding(mesh_42, P("model", "data"))),
    "new": jax.device_put(jnp.ones((4, 8)), NamedSharding(mesh_42, P("data", None))),
  }
  merged, restored_paths, fresh_paths = checkpointing.restore_params_partial(out / "ckpt", fresh)
  facts["partial"] = {
    "restored_paths": restored_paths,
    "fresh_paths": fresh_paths,
    "kernel_equal": _same(merged["kernel"], saved["params"]["kernel"]),
    "new_equal": _same(merged["new"], fresh["new"]),
    "kernel_spec": str(merged["kernel"].sharding.spec),
    "kernel_mesh": str(dict(merged["kernel"].sharding.mesh.shape)),
    "new_spec": str(merged["new"].sharding.spec),
  }
  ckpt.close()
  (out / "facts.json").write_text(json.dumps(facts, indent=1))


if __name__ == "__main__":
  main(Path(sys.argv[1]))
