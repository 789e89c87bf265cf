"""Mesh construction and logical-axis rules."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from avtok_jax import sharding


def test_make_mesh_fills_and_names_axes():
  n = len(jax.devices())
  mesh = sharding.make_mesh({"data": -1})
  assert mesh.axis_names == sharding.MESH_AXES
  assert dict(mesh.shape) == {"data": n, "fsdp": 1, "model": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert dict(sharding.make_mesh((1, -1, 1)).shape)["fsdp"] == n


@pytest.mark.parametrize(
  "shape,message",
  [
    ({"data": -1, "model": -1}, "at most one axis may be -1"),
    ({"tensor": 2}, "Unknown mesh axes"),
    ({"data": 0}, "sizes must be positive"),
    ({"data": len(jax.devices()) + 1}, "devices"),
    ((1, 1), "must list sizes"),
  ],
)
def test_make_mesh_errors(shape, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(shape)


def test_rules_map_each_mesh_axis_once():
  assert sharding.logical_spec(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)
  assert sharding.logical_spec(("embed", "mlp")) == P("fsdp", "model")
  assert sharding.logical_spec(("vocab", "code")) == P("model", None)
  assert sharding.mesh_axis_for("vocab") == "model"
  assert sharding.mesh_axis_for("no_such_axis") is None
  mesh = sharding.make_mesh({"data": -1})
  assert sharding.axis_size(mesh, ("data", "fsdp")) == len(jax.devices())
  assert sharding.axis_size(mesh, None) == 1


def test_state_shardings_follow_the_logical_names():
  import flax.linen as nn
  import jax.numpy as jnp

  from avtok_jax.models import layers

  abstract = jax.eval_shape(
    layers.Mlp(8).init, jax.random.key(0), jax.ShapeDtypeStruct((2, 3, 4), jnp.float32)
  )
  mesh = sharding.make_mesh({"data": -1})
  shardings = nn.unbox(sharding.state_shardings(mesh, abstract))
  assert shardings["params"]["fc1"]["kernel"].spec == P("fsdp", "model")
  assert shardings["params"]["fc2"]["bias"].spec == P("fsdp")
