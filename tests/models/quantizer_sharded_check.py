"""Runs the quantizer on 1 device and on a 2x4 `data x model` mesh; saves both results.

Run by `tests/models/test_quantizer_sharded.py` in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag must be set
before JAX starts, hence the separate process):

  python tests/models/quantizer_sharded_check.py OUT_DIR

Writes OUT_DIR/results.npz (arrays, keys prefixed 'single/' and 'sharded/')
and OUT_DIR/facts.json (shard shapes, HLO shapes, dispatch facts).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from avtok_jax import sharding  # noqa: E402
from avtok_jax.models import quantizer  # noqa: E402

# Distinct sizes so that shapes in the compiled HLO can be told apart:
# K = 64 codes (16 per model shard), code_dim 8, 4 x 6 = 24 tokens (12 per data shard).
K, D, B, L = 64, 8, 4, 6
TEMPERATURE = 0.5  # High enough that sampling often differs from argmax.
MODEL = quantizer.VectorQuantizer(codebook_size=K, code_dim=D, temperature=TEMPERATURE)


def _inputs():
  rng = np.random.default_rng(0)
  z = rng.standard_normal((B, L, D)).astype(np.float32)
  mask = rng.random((B, L)) < 0.75
  w = rng.standard_normal((B, L, D)).astype(np.float32)
  return z, mask, w


def _init(key, z):
  return nn.unbox(MODEL.init({"params": key}, z, train=False))


def _step(variables, z, mask, w, key, stochastic):
  """Forward + backward: gradients of loss + sum(w * quantized) w.r.t. codebook and z."""

  def objective(params, z):
    out, updates = MODEL.apply(
      {"params": params, "codebook_stats": variables["codebook_stats"]},
      z,
      train=True,
      stochastic=stochastic,
      mask=mask,
      rngs={"sample": key},
      mutable=["codebook_stats"],
    )
    return out.loss + jnp.sum(w * out.quantized), (out, nn.unbox(updates))

  (_, (out, updates)), (g_params, g_z) = jax.value_and_grad(
    objective, argnums=(0, 1), has_aux=True
  )(variables["params"], z)
  lookup = MODEL.apply(variables, out.codes, method=quantizer.VectorQuantizer.lookup)
  return {
    "codes": out.codes,
    "quantized": out.quantized,
    "z": out.z,
    "lookup": lookup,
    "commit_loss": out.commit_loss,
    "codebook_loss": out.codebook_loss,
    "loss": out.loss,
    "perplexity": out.perplexity,
    "usage": out.usage,
    "counts": updates["codebook_stats"]["counts"],
    "grad_codebook": g_params["codebook"],
    "grad_z": g_z,
  }


def _odd(z, codebook, key):
  """The kernels on 3 tokens, which the 2-way data axis cannot split (tokens stay automatic)."""
  z = quantizer.l2_normalize(z)
  codebook = quantizer.l2_normalize(codebook)
  codes = quantizer.nearest_codes(z, codebook)
  sampled = quantizer.nearest_codes(z, codebook, key=key, temperature=TEMPERATURE)
  return {
    "codes": codes,
    "sampled": sampled,
    "lookup": quantizer.lookup_codes(sampled, codebook),
    "histogram": quantizer.code_histogram(sampled, jnp.ones(sampled.shape), K),
  }


def _flatten(prefix, results):
  return {
    f"{prefix}/{mode}/{k}": np.asarray(v) for mode, r in results.items() for k, v in r.items()
  }


def main(out_dir: str) -> None:
  assert jax.device_count() == 8, jax.devices()
  z, mask, w = _inputs()
  init_key, sample_key = jax.random.key(1), jax.random.key(2)
  step = jax.jit(_step, static_argnames="stochastic")

  # 1 device, no mesh: plain jnp.
  variables = jax.jit(_init)(init_key, z)
  single = {
    mode: step(variables, z, mask, w, sample_key, stochastic=mode == "stochastic")
    for mode in ("deterministic", "stochastic")
  }
  single_params = np.asarray(variables["params"]["codebook"])
  odd = jax.jit(_odd)
  z_odd = z[0, :3]
  single["odd"] = odd(z_odd, single_params, sample_key)

  # 2 x 4 data x model mesh.
  mesh = sharding.make_mesh({"data": 2, "model": 4})
  facts = {}
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    facts["vocab_axes"] = list(quantizer.vocab_mesh_axes())
    try:
      quantizer.nearest_codes(jnp.ones((B * L, D)), jnp.ones((K - 2, D)))
      facts["indivisible_error"] = ""
    except ValueError as e:
      facts["indivisible_error"] = str(e)
    abstract = jax.eval_shape(lambda k, z: MODEL.init({"params": k}, z, train=False), init_key, z)
    state_shardings = sharding.state_shardings(mesh, abstract)
    sharded_vars = jax.jit(_init, out_shardings=state_shardings)(init_key, z)
    act = sharding.logical_sharding(mesh, ("batch", "length", "code"))
    z_s = jax.device_put(z, act)
    w_s = jax.device_put(w, act)
    mask_s = jax.device_put(mask, sharding.logical_sharding(mesh, ("batch", "length")))
    sharded = {
      mode: step(sharded_vars, z_s, mask_s, w_s, sample_key, stochastic=mode == "stochastic")
      for mode in ("deterministic", "stochastic")
    }
    sharded["odd"] = odd(z_odd, sharded_vars["params"]["codebook"], sample_key)
    hlo = {
      mode: step.lower(sharded_vars, z_s, mask_s, w_s, sample_key, stochastic=mode == "stochastic")
      .compile()
      .as_text()
      for mode in ("deterministic", "stochastic")
    }

  codebook = sharded_vars["params"]["codebook"]
  counts = sharded_vars["codebook_stats"]["counts"]
  facts["codebook_shard_shapes"] = sorted(
    {tuple(s.data.shape) for s in codebook.addressable_shards}
  )
  facts["counts_shard_shapes"] = sorted({tuple(s.data.shape) for s in counts.addressable_shards})
  facts["grad_codebook_shard_shapes"] = sorted(
    {tuple(s.data.shape) for s in sharded["deterministic"]["grad_codebook"].addressable_shards}
  )
  facts["codebook_spec"] = str(codebook.sharding.spec)
  # Every array shape in the compiled (per-device) programs.
  facts["hlo_shapes"] = {
    mode: sorted(set(re.findall(r"\b[a-z]+[0-9]*\[([0-9,]*)\]", text)))
    for mode, text in hlo.items()
  }
  # Dispatch: a data-only mesh or rules without 'vocab' run the plain path.
  # The plain path on a batch-only split still draws the Gumbel noise per
  # device ([tokens/8, K] blocks), with the codes of 1 device.
  zf = quantizer.l2_normalize(jnp.asarray(z).reshape(B * L, D))
  cb = quantizer.l2_normalize(jnp.asarray(single_params))
  sample = jax.jit(lambda z, c, k: quantizer.nearest_codes(z, c, key=k, temperature=TEMPERATURE))
  single["data_only"] = {"sampled": sample(zf, cb, sample_key)}
  data_mesh = sharding.make_mesh({"data": 8})
  with jax.set_mesh(data_mesh):
    with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
      facts["vocab_axes_data_only_mesh"] = list(quantizer.vocab_mesh_axes())
      z_d = jax.device_put(zf, sharding.logical_sharding(data_mesh, ("batch", "code")))
      sharded["data_only"] = {"sampled": sample(z_d, cb, sample_key)}
      text = sample.lower(z_d, cb, sample_key).compile().as_text()
      facts["data_only_hlo_shapes"] = sorted(set(re.findall(r"\b[a-z]+[0-9]*\[([0-9,]*)\]", text)))
      facts["data_only_collectives"] = sorted(set(re.findall(r"all-gather|all-reduce", text)))
    with nn.logical_axis_rules([("batch", "data")]):
      facts["vocab_axes_unmapped"] = list(quantizer.vocab_mesh_axes())

  arrays = {**_flatten("single", single), **_flatten("sharded", sharded)}
  arrays["single/params"] = single_params
  arrays["sharded/params"] = np.asarray(codebook)
  np.savez(os.path.join(out_dir, "results.npz"), **arrays)
  with open(os.path.join(out_dir, "facts.json"), "w") as f:
    json.dump(facts, f)


if __name__ == "__main__":
  main(sys.argv[1])
