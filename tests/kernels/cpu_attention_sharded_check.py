"""Run by test_cpu_attention.py in a subprocess with 8 forced CPU devices.

Writes facts.json to argv[1]: per sharding of q, k, v, the max difference
of the kernel's value and gradients from `jax.nn.dot_product_attention`, the
per-device operand shapes of the kernel's custom calls in the compiled HLO,
and whether XLA had to all-gather.
"""

import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from avtok_jax.kernels import cpu_attention

B, L, H, D = 8, 24, 4, 16


def main(out: Path) -> None:
  assert jax.device_count() == 8, jax.devices()
  assert cpu_attention.available()
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, g = (jax.random.normal(key, (B, L, H, D)) for key in keys)

  def loss(fn, q, k, v, g):
    return jnp.sum(fn(q, k, v) * g)

  ours = lambda q, k, v: cpu_attention.attention(q, k, v, True)  # noqa: E731
  ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
  ref_val, ref_grads = jax.value_and_grad(loss, argnums=(1, 2, 3))(ref, q, k, v, g)
  facts = {}
  for name, spec in {
    "batch": P("data"),
    "batch_heads": P("data", None, "model"),
    "length": P(None, "data"),
  }.items():
    sharding = NamedSharding(mesh, spec)
    args = [jax.device_put(x, sharding) for x in (q, k, v, g)]
    fn = jax.jit(jax.value_and_grad(lambda q, k, v, g: loss(ours, q, k, v, g), argnums=(0, 1, 2)))
    hlo = fn.lower(*args).compile().as_text()
    val, grads = fn(*args)
    calls = [ln for ln in hlo.splitlines() if 'custom_call_target="avtok_cpu_attention' in ln]
    facts[name] = {
      "value_err": float(abs(val - ref_val)) / float(abs(ref_val)),
      "grad_err": max(
        float(jnp.max(jnp.abs(a - b))) for a, b in zip(grads, ref_grads, strict=True)
      ),
      "grad_spec": str(grads[0].sharding.spec),
      "call_shapes": sorted({s for ln in calls for s in re.findall(r"f32\[([\d,]+)\]", ln)}),
      "num_calls": len(calls),
      "all_gather": "all-gather" in hlo,
    }
  (out / "facts.json").write_text(json.dumps(facts))


if __name__ == "__main__":
  main(Path(sys.argv[1]))
