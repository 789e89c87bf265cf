"""The benchmark scripts run and report what they claim (tiny preset; no timing asserted).

Speed itself is measured by running the scripts (bench/README.md), never by a
test; these tests check that the figures are computed from real runs: the
step's FLOP count from XLA, no recompilation while timing, encode/decode at
each batch, and the JAX-vs-PyTorch comparison's parsing and ratios.
"""

from __future__ import annotations

import glob
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from absl import flags as absl_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import attention  # noqa: E402
import inference  # noqa: E402
import profile_step  # noqa: E402
import train_step  # noqa: E402


@pytest.fixture(scope="module")
def tiny_step():
  """bench/train_step.py's figures for the tiny preset, stage 1, batch 4, on one device."""
  config = train_step.load_config("stage1", "tiny", batch_size=4, gan=False)
  return train_step.run(
    config, steps=3, warmup=1, data=True, peak_size=256, chip=None, matmul_ceiling=True
  )


def test_train_step_bench_reports_flops_mfu_and_no_recompiles(tiny_step):
  out = tiny_step
  assert out["preset"] == "tiny" and out["batch_size"] == 4
  # XLA's count for the compiled step: a tiny model's forward + backward is
  # millions of FLOPs, not zero and not absurd.
  assert 1e6 < out["flops_per_step"] < 1e11
  assert out["step_s"] > 0 and out["peak_flops_per_s"] > 1e8
  assert math.isclose(out["mfu"], out["flops_per_s"] / out["peak_flops_per_s"])
  assert out["recompiles_after_warmup"] == 0
  assert out["loop_fixed_s"] > 0 and out["loop_pipeline_s"] > 0
  assert len(out["pipeline_slowdown_rounds"]) == 4
  assert out["step_cpu_s"] > 0 and out["pipeline_cpu_s"] >= 0
  assert math.isclose(out["pipeline_cpu_share"], out["pipeline_cpu_s"] / out["step_cpu_s"])
  assert "MFU" in train_step.report(out)
  # The matmul ceiling: the step's own dots (forward and backward), timed alone.
  assert out["matmuls"] > out["distinct_matmuls"] > 10
  assert 0 < out["matmul_flops"] < out["flops_per_step"]
  assert out["matmul_alone_s"] > 0
  assert math.isclose(
    out["mfu_ceiling"], out["flops_per_step"] / out["matmul_alone_s"] / out["peak_flops_per_s"]
  )
  assert "MFU ceiling" in train_step.report(out)


def test_step_matmuls_counts_scan_bodies_and_flops():
  w1, w2 = jnp.ones((8, 16)), jnp.ones((16, 16))

  def f(x):
    y = x @ w1
    y, _ = jax.lax.scan(lambda c, _: (c @ w2, None), y, None, length=3)
    return y.sum()

  matmuls = train_step.step_matmuls(jax.make_jaxpr(f)(jnp.ones((4, 8))))
  shapes = {(lhs.shape, rhs.shape): n for (lhs, rhs, _), n in matmuls.items()}
  assert shapes == {((4, 8), (8, 16)): 1, ((4, 16), (16, 16)): 3}
  seconds, flops = train_step.time_matmuls(matmuls, reps=2)
  assert flops == 2 * 4 * 16 * 8 + 3 * 2 * 4 * 16 * 16 and seconds > 0


@pytest.mark.slow
def test_train_step_bench_counts_the_flops_of_every_host_device(tiny_step):
  """On 2 forced CPU devices the step's FLOPs are the whole batch's, not one device's share."""
  single = tiny_step
  cmd = [sys.executable, str(ROOT / "bench" / "train_step.py"), "--preset=tiny", "--batch_size=4"]
  cmd += ["--steps=1", "--warmup=0", "--data=false", "--peak_size=256"]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  two = json.loads(proc.stdout.strip().splitlines()[-1])
  assert two["devices"] == 2
  # Same model and batch: the same work, up to the partitioner's few extra ops.
  assert 0.9 < two["flops_per_step"] / single["flops_per_step"] < 1.2
  assert math.isclose(two["mfu"], two["flops_per_s"] / two["peak_flops_per_s"])


def test_profile_step_names_the_ops_of_the_traced_step(tmp_path):
  config = train_step.load_config("stage1", "tiny", batch_size=4, gan=False)
  out = profile_step.run(config, steps=2, warmup=1, trace_dir=str(tmp_path), depth=3)
  assert glob.glob(str(tmp_path / "**" / "*.trace.json.gz"), recursive=True)
  assert out["op_ms_per_step"] > 0 and out["named_ops"] > 10
  paths = [op["path"] for op in out["ops"]]
  # Forward and backward ops of the encoder are both found and named.
  assert any("encoder" in p and not p.startswith("BWD(") for p in paths), paths[:20]
  assert any("encoder" in p and p.startswith("BWD(") for p in paths), paths[:20]
  assert math.isclose(sum(out["groups"].values()), out["op_ms_per_step"], rel_tol=1e-6)
  assert "by module path" in profile_step.report(out, top=5)


def test_profile_step_parses_hlo_metadata():
  text = (
    '  %fusion.3 = f32[8,4]{1,0} fusion(%p), kind=kLoop, metadata={op_name="jit(train_step)/'
    'transpose(jvp(AVTok))/AVTok._encode_one/encoder/block_0/attn/dot_general"}\n'
  )
  meta = profile_step.op_metadata(text)
  assert meta["fusion.3"][0] == "f32[8,4]{1,0}"
  assert profile_step.module_path(meta["fusion.3"][1], 3) == "BWD(AVTok))/AVTok._encode_one/encoder"


def test_train_step_bench_overrides_and_chip_peak():
  config = train_step.load_config(
    "vanilla", "tiny", batch_size=None, gan=False, overrides=["model.remat=True", "seed=3"]
  )
  assert config.model.remat is True and config.seed == 3 and not config.gan.enabled

  class FakeH100:
    device_kind = "NVIDIA H100 80GB HBM3"

  assert train_step.chip_peak(FakeH100()) == 989e12


def test_inference_bench_encodes_decodes_each_batch():
  out = inference.run("tiny", ["1", "2"], 0, repeats=1, generator=False, gen_batch=1)
  assert [row["batch"] for row in out["tokenizer"]] == [1, 2]
  for row in out["tokenizer"]:
    assert row["encode_decode_s"] > 0
    assert math.isclose(row["encode_clips_per_s"], row["batch"] / row["encode_s"])


def test_inference_bench_out_of_memory_detection():
  assert inference._is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while"))
  assert not inference._is_out_of_memory(ValueError("shapes do not match"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compare_runs_jax_and_torch_and_prints_ratios():
  proc = subprocess.run(
    [
      sys.executable,
      str(ROOT / "bench" / "compare.py"),
      "--preset=tiny",
      "--batch_size=4",
      "--steps=2",
      "--rounds=1",
      "--skip_compile",
      "--torch_threads=1",
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["preset"] == "tiny" and summary["rounds"] == 1
  assert math.isclose(
    summary["train_ratio_vs_eager"],
    summary["torch_eager_train_step_s"] / summary["jax_train_step_s"],
  )
  assert summary["encode_decode_ratio_vs_eager"] > 0
  assert "torch_compile_train_step_s" not in summary
  assert "train step" in proc.stdout and "encode+decode" in proc.stdout


@pytest.mark.slow
def test_attention_bench_times_each_implementation_and_the_step_both_ways():
  # Importing it defines no flags (they would clash with other modules' in one process).
  assert not {"shapes", "iters"} & set(absl_flags.FLAGS)
  ops = attention.op_ab((2, 8, 2, 8), causal=True, rounds=2, iters=2)
  assert set(ops) == {"jax.nn", "explicit", "kernel"}
  assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in ops.values())
  step = attention.step_ab("tiny", rounds=2, steps=1)
  assert step["xla_step_ms"] > 0 and step["kernel_step_ms"] > 0
  assert math.isclose(step["step_speedup"], step["xla_step_ms"] / step["kernel_step_ms"])
  assert step["recompiles_while_timing"] == 0
  assert step["kernel_calls_per_step"]["xla"] == 0
  assert step["kernel_calls_per_step"]["kernel"] >= 2  # forward and backward
  assert "AVTOK_CPU_ATTENTION" not in os.environ
