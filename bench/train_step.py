r"""Steady-state speed of the tokenizer's train step: step time, clips/s, FLOP/s and MFU.

  python bench/train_step.py --preset=small                 # stage 1, this machine
  python bench/train_step.py --preset=small --stage=vanilla --steps=30
  python bench/train_step.py --preset=L --batch_size=8      # on a GPU / TPU

What it runs: exactly the trainer's step (`avtok_jax.plan.tokenizer_setup`,
the same state, shardings, jit and `donate_argnums` as `train.run`) of the
stage config (`configs/vfal_stage1.py` or `configs/vanilla.py`) at the
preset, GAN off unless `--gan` (the PyTorch reference of
`bench/torch_reference.py` has none).

What it reports (one JSON line at the end, read by `bench/compare.py`):

* `compile_s`: lowering + XLA compilation of the step.
* `step_s`: median wall time of one step, each step waited for
  (`block_until_ready`), after `--warmup` steps; `clips_per_s` = batch / step_s.
* `flops_per_step`: XLA's cost analysis of the compiled step
  (`compiled.cost_analysis()["flops"]`: multiply-adds count 2, elementwise
  ops 1), plus the matmul FLOPs of the fused CPU attention kernel's custom
  calls, which XLA counts as 0 (`cpu_attention.hlo_flops`).
  `flops_per_s` = that / step_s.
* `peak_flops_per_s`: a square matmul of `--peak_size` (default 2048 on
  CPU, 8192 on accelerators) in the compute dtype of the preset, measured in
  the same run (median of 10); `mfu` = flops_per_s / peak. On a GPU/TPU the
  chip's datasheet peak is printed next to it when known (`--chip_peak`
  overrides: TFLOP/s).
* `data`: the step time with the real Grain pipeline feeding it (the
  trainer's loop: `next(iterator)`, `pipeline.to_global_array`, step, no
  per-step wait; the keys the stage reads) against the same loop on one
  fixed batch, `--steps` steps each, in `--data_rounds` alternating rounds;
  `pipeline_slowdown` = the median over rounds of pipeline / fixed - 1
  (the data pipeline is the bottleneck when it is clearly above 0). On a
  CPU that XLA keeps busy the workers compete with the step for the cores,
  so their CPU time is reported too (psutil): `pipeline_cpu_s` per step
  (workers + this process' extra) and `pipeline_cpu_share` of the step's
  own CPU time (`step_cpu_s`, all of XLA's threads).
* `recompiles_after_warmup`: XLA compilations counted while timing
  (`reporting.compile_count`); must be 0.
* with `--matmul_ceiling`: every dot_general of the step's jaxpr (forward
  and backward; our attention kernel's matmuls are not among them), each
  jitted and timed alone (`matmul_alone_s`, `matmul_flops_per_s`), and
  `mfu_ceiling` = flops_per_step / matmul_alone_s / peak: the MFU of a step
  whose other ops took no time, i.e. the most XLA's matmuls at these shapes
  allow.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import json
import math
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import psutil
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from avtok_jax import config_lib, plan, reporting, sharding, train  # noqa: E402
from avtok_jax.data import pipeline  # noqa: E402
from avtok_jax.kernels import cpu_attention  # noqa: E402


def _define_flags() -> None:
  """Command-line flags (defined only when run as a script, so that tests can import us)."""
  global _PRESET, _STAGE, _BATCH, _STEPS, _WARMUP, _DATA, _GAN, _PEAK_SIZE, _CHIP_PEAK, _OVERRIDES
  global _MATMULS, _DATA_ROUNDS
  _PRESET = flags.DEFINE_enum("preset", "small", ["tiny", "small", "B", "L"], "Size preset.")
  _STAGE = flags.DEFINE_enum("stage", "stage1", ["stage1", "vanilla"], "Which stage's step.")
  _BATCH = flags.DEFINE_integer("batch_size", None, "Global batch (default: the preset's).")
  _STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")
  _WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
  _DATA = flags.DEFINE_bool("data", True, "Also time the step fed by the real Grain pipeline.")
  _GAN = flags.DEFINE_bool("gan", False, "Keep the stage's GAN (off by default).")
  _PEAK_SIZE = flags.DEFINE_integer("peak_size", None, "Side of the peak-FLOP/s matmul.")
  _CHIP_PEAK = flags.DEFINE_float("chip_peak", None, "The chip's peak TFLOP/s, if known.")
  _DATA_ROUNDS = flags.DEFINE_integer(
    "data_rounds", 4, "Alternating rounds of the fixed-batch and pipeline loops."
  )
  _MATMULS = flags.DEFINE_bool(
    "matmul_ceiling", False, "Also time each of the step's matmuls alone (the MFU ceiling)."
  )
  _OVERRIDES = flags.DEFINE_multi_string(
    "set", [], "Config overrides KEY=VALUE (Python literal), e.g. --set=model.remat=True."
  )


# Dense bf16 datasheet peaks (TFLOP/s, without sparsity) of chips we may run
# on: NVIDIA H100 SXM 989, H200 989 (same compute as H100), A100 312; Google
# TPU v4 275, v5e 197, v5p 459, v6e 918.
_CHIP_PEAKS_BF16 = {
  "H100": 989e12,
  "H200": 989e12,
  "A100": 312e12,
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v6": 918e12,
}


def load_config(stage: str, preset: str, batch_size: int | None, gan: bool, overrides=()):
  """The stage config at `preset` (`config_lib.load_config_file`), GAN off unless asked.

  `overrides`: "key.path=value" strings, the value read as a Python literal
  (else kept as a string).
  """
  name = "vfal_stage1" if stage == "stage1" else "vanilla"
  config = config_lib.load_config_file(os.path.join(ROOT, "configs", f"{name}.py:{preset}"))
  config.gan.enabled = config.gan.enabled and gan
  if batch_size:
    config.data.batch_size = batch_size
  for item in overrides:
    key, _, value = item.partition("=")
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    try:
      node[leaf] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[leaf] = value
  return config


def measure_peak(dtype, size: int, reps: int = 10) -> float:
  """FLOP/s of a jitted [size, size] @ [size, size] in `dtype` (median of `reps`)."""

  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  mm = jax.jit(lambda x, y: x @ y)
  mm(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    mm(a, b).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * size**3 / statistics.median(times)


def chip_peak(device) -> float | None:
  kind = getattr(device, "device_kind", "")
  for name, peak in _CHIP_PEAKS_BF16.items():
    if name.lower() in kind.lower():
      return peak
  return None


def flop_count(compiled) -> float:
  """XLA's cost analysis of the compiled program, plus our CPU attention kernel's FLOPs.

  XLA counts custom calls as 0 FLOPs; `cpu_attention.hlo_flops` adds the
  kernel's matmuls as XLA counts them for the same attention in XLA ops.
  """
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):  # older jax: one dict per program
    cost = cost[0]
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  return flops + cpu_attention.hlo_flops(compiled.as_text())


def step_matmuls(jaxpr) -> collections.Counter:
  """The dot_generals of a closed jaxpr and all its sub-jaxprs: Counter of (lhs, rhs, dims) keys.

  lhs / rhs: `jax.ShapeDtypeStruct`s; dims: `dimension_numbers`. A `scan`
  body counts `length` times; a `while` body once (its trip count is data).
  """
  found = collections.Counter()

  def walk(jx, times):
    for eqn in jx.eqns:
      if eqn.primitive.name == "dot_general":
        lhs, rhs = (jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars)
        dims = eqn.params["dimension_numbers"]
        found[(lhs, rhs, tuple(tuple(map(tuple, d)) for d in dims))] += times
      inner = times * eqn.params["length"] if eqn.primitive.name == "scan" else times
      for value in eqn.params.values():
        for sub in value if isinstance(value, list | tuple) else (value,):
          sub = getattr(sub, "jaxpr", sub)
          if hasattr(sub, "eqns"):
            walk(sub, inner)

  walk(jaxpr.jaxpr, 1)
  return found


def time_matmuls(matmuls: collections.Counter, reps: int = 20) -> tuple[float, float]:
  """(seconds, FLOPs) of all `matmuls` (`step_matmuls`) run one at a time, each jitted alone.

  Each distinct matmul's time is the median of `reps` runs on random operands
  in its own dtype and XLA's default layouts.
  """
  total_s = total_flops = 0.0
  for i, ((lhs, rhs, dims), count) in enumerate(matmuls.items()):
    keys = jax.random.split(jax.random.key(i))
    a, b = (
      jax.random.normal(k, x.shape).astype(x.dtype) for k, x in zip(keys, (lhs, rhs), strict=True)
    )
    fn = jax.jit(lambda x, y, dims=dims: jax.lax.dot_general(x, y, dims))
    out = fn(a, b).block_until_ready()
    (contract, _), _ = dims
    flops = 2 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in contract)
    times = []
    for _ in range(reps):
      t = time.perf_counter()
      fn(a, b).block_until_ready()
      times.append(time.perf_counter() - t)
    total_s += count * statistics.median(times)
    total_flops += count * flops
  return total_s, total_flops


class StepBench:
  """The trainer's jitted step on its sharded state, ready to time.

  Like `train.run`, everything runs inside one mesh + logical-axis-rules
  context (`with bench.context():`), entered once around a timing loop.
  """

  def __init__(self, config):
    train.check_config(config)
    self.config = config
    self.mesh = sharding.make_mesh(dict(config.mesh))
    self.setup = s = plan.tokenizer_setup(config, self.mesh)
    with self.context():
      rng = jax.random.key_data(jax.random.key(config.seed))
      self.state = jax.jit(lambda r: nn.unbox(s.init_state(r)), out_shardings=s.state_shardings)(
        rng
      )
    self.step_fn = jax.jit(
      s.train_step,
      in_shardings=(s.state_shardings, s.batch_sharding),
      out_shardings=(s.state_shardings, None),
      donate_argnums=(0,),
    )
    self.iterator = pipeline.make_iterator(
      config.data,
      config.data.train_split,
      train=True,
      seed=config.seed,
      keys=tuple(self.setup.abstract_batch),
    )
    self.batch = self.next_batch()

  def context(self) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES))
    return stack

  def next_batch(self):
    local = next(self.iterator)
    return pipeline.to_global_array(
      {k: v for k, v in local.items() if k in self.setup.abstract_batch}, self.setup.batch_sharding
    )

  def compile(self):
    """Compiles the step ahead of time; later steps run this executable (no second compile)."""
    with self.context():
      t = time.perf_counter()
      traced = self.step_fn.trace(self.state, self.batch)
      compiled = traced.lower().compile()
      seconds = time.perf_counter() - t
    self.jaxpr = traced.jaxpr  # the traced step (`step_matmuls` reads it)
    self.step_fn = compiled
    return compiled, seconds

  def _step(self, batch=None):
    self.state, metrics = self.step_fn(self.state, self.batch if batch is None else batch)
    return metrics

  def timed_steps(self, n: int) -> list[float]:
    """Wall time of each of `n` steps, each waited for."""
    times = []
    with self.context():
      for _ in range(n):
        t = time.perf_counter()
        self._step()["loss"].block_until_ready()
        times.append(time.perf_counter() - t)
    return times

  def loop_costs(self, n: int, real_data: bool) -> tuple[float, float, float]:
    """(wall, this process' CPU, its child processes' CPU) seconds per step of the trainer's
    loop shape (no per-step wait).

    The children are the Grain worker processes (their CPU is what the
    pipeline costs; this process' CPU is mostly XLA's threads).
    """
    cpu0 = _cpu_seconds()
    with self.context():
      t = time.perf_counter()
      for _ in range(n):
        metrics = self._step(self.next_batch() if real_data else None)
      metrics["loss"].block_until_ready()
      wall = time.perf_counter() - t
    cpu1 = _cpu_seconds()
    return wall / n, (cpu1[0] - cpu0[0]) / n, (cpu1[1] - cpu0[1]) / n


def _cpu_seconds() -> tuple[float, float]:
  """(CPU seconds of this process, of its live child processes) so far (psutil)."""
  me = psutil.Process()
  times = me.cpu_times()
  children = 0.0
  for child in me.children(recursive=True):
    try:
      t = child.cpu_times()
    except psutil.NoSuchProcess:
      continue
    children += t.user + t.system
  return times.user + times.system, children


def run(
  config,
  steps: int,
  warmup: int,
  data: bool,
  peak_size: int | None,
  chip: float | None,
  matmul_ceiling: bool = False,
  data_rounds: int = 4,
):

  reporting.compile_count()
  device = jax.devices()[0]
  bench = StepBench(config)
  compiled, compile_s = bench.compile()
  # XLA's cost analysis is of the per-device (SPMD-partitioned) program.
  flops = flop_count(compiled) * jax.device_count()
  bench.timed_steps(warmup)
  compiles0 = reporting.compile_count()
  times = bench.timed_steps(steps)
  out = {
    "framework": "jax",
    "jax": jax.__version__,
    "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
    "devices": jax.device_count(),
    "preset": config.model.size,
    "stage": config.stage,
    "batch_size": config.data.batch_size,
    "dtype": config.model.dtype,
    "compile_s": round(compile_s, 2),
    "step_s": statistics.median(times),
    "step_s_min": min(times),
    "clips_per_s": config.data.batch_size / statistics.median(times),
    "flops_per_step": flops,
    "flops_per_s": flops / statistics.median(times),
  }
  if data:
    # Alternating rounds (fixed, pipeline, pipeline, fixed, ...): this VM's
    # speed drifts by 20-40% within minutes, more than the effect measured.
    costs = {False: [], True: []}
    for r in range(data_rounds):
      for real_data in (False, True) if r % 2 == 0 else (True, False):
        costs[real_data].append(bench.loop_costs(steps, real_data=real_data))
    # Medians over rounds of (wall, own CPU, workers' CPU) per step.
    (fixed_s, step_cpu, _), (real_s, real_cpu, worker_cpu) = (
      [statistics.median(c[i] for c in costs[k]) for i in range(3)] for k in (False, True)
    )
    rounds = [p[0] / f[0] - 1 for p, f in zip(costs[True], costs[False], strict=True)]
    # CPU the pipeline adds per step: its workers' plus what the loop's own
    # process spends more than on a fixed batch (next(), to_global_array).
    pipeline_cpu = worker_cpu + max(real_cpu - step_cpu, 0.0)
    out.update(
      loop_fixed_s=fixed_s,
      loop_pipeline_s=real_s,
      pipeline_slowdown=statistics.median(rounds),
      pipeline_slowdown_rounds=rounds,
      step_cpu_s=step_cpu,
      pipeline_worker_cpu_s=worker_cpu,
      pipeline_cpu_s=pipeline_cpu,
      pipeline_cpu_share=pipeline_cpu / step_cpu,
    )
  out["recompiles_after_warmup"] = reporting.compile_count() - compiles0
  dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
  size = peak_size or (2048 if device.platform == "cpu" else 8192)
  out["peak_matmul"] = f"{size}x{size} {jnp.dtype(dtype).name}"
  out["peak_flops_per_s"] = measure_peak(dtype, size)
  # Host CPU devices (--xla_force_host_platform_device_count) share the cores
  # the peak matmul already used; each accelerator chip has its own peak.
  peak_units = 1 if device.platform == "cpu" else jax.device_count()
  out["mfu"] = out["flops_per_s"] / (out["peak_flops_per_s"] * peak_units)
  if matmul_ceiling:
    # If all but the matmuls took no time and each matmul ran as fast as it
    # does alone, the step would take matmul_alone_s: its MFU is the most
    # this step can reach with XLA's matmuls at these shapes.
    matmuls = step_matmuls(bench.jaxpr)
    alone_s, matmul_flops = time_matmuls(matmuls)
    out.update(
      matmuls=sum(matmuls.values()),
      distinct_matmuls=len(matmuls),
      matmul_flops=matmul_flops,
      matmul_alone_s=alone_s,
      matmul_flops_per_s=matmul_flops / alone_s,
      mfu_ceiling=flops / alone_s / (out["peak_flops_per_s"] * peak_units),
    )
  chip = chip * 1e12 if chip else chip_peak(device)
  if chip:
    out["chip_peak_flops_per_s"] = chip
    out["mfu_vs_chip"] = out["flops_per_s"] / (chip * jax.device_count())
  return out


def report(out) -> str:
  lines = [
    f"{out['preset']} {out['stage']} batch {out['batch_size']} on {out['devices']} x "
    f"{out['device']} ({out['dtype']}), jax {out['jax']}",
    f"  compile {out['compile_s']:.1f} s; step {out['step_s'] * 1e3:.1f} ms (min "
    f"{out['step_s_min'] * 1e3:.1f}), {out['clips_per_s']:.1f} clips/s",
    f"  {out['flops_per_step'] / 1e9:.2f} GFLOP/step (XLA cost analysis + attention kernel) = "
    f"{out['flops_per_s'] / 1e9:.1f} GFLOP/s; peak {out['peak_matmul']} matmul "
    f"{out['peak_flops_per_s'] / 1e9:.1f} GFLOP/s -> MFU {100 * out['mfu']:.1f}%",
  ]
  if "chip_peak_flops_per_s" in out:
    lines.append(
      f"  vs the chip's bf16 peak {out['chip_peak_flops_per_s'] / 1e12:.0f} TFLOP/s: "
      f"MFU {100 * out['mfu_vs_chip']:.1f}%"
    )
  if "loop_pipeline_s" in out:
    lines.append(
      f"  loop: fixed batch {out['loop_fixed_s'] * 1e3:.1f} ms/step, Grain pipeline "
      f"{out['loop_pipeline_s'] * 1e3:.1f} ms/step ({100 * out['pipeline_slowdown']:+.1f}%, "
      f"median of rounds {', '.join(f'{100 * x:+.1f}' for x in out['pipeline_slowdown_rounds'])})"
    )
    lines.append(
      f"  CPU per step: the step {out['step_cpu_s'] * 1e3:.0f} ms (all threads), the pipeline "
      f"{out['pipeline_cpu_s'] * 1e3:.1f} ms (workers {out['pipeline_worker_cpu_s'] * 1e3:.1f}) "
      f"= {100 * out['pipeline_cpu_share']:.1f}% of the step's"
    )
  if "matmul_alone_s" in out:
    lines.append(
      f"  its {out['matmuls']} matmuls ({out['distinct_matmuls']} shapes, "
      f"{out['matmul_flops'] / 1e9:.2f} GFLOP) run alone: {out['matmul_alone_s'] * 1e3:.1f} ms "
      f"({out['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s) -> MFU ceiling "
      f"{100 * out['mfu_ceiling']:.1f}% (the step if only its matmuls took time)"
    )
  lines.append(f"  recompilations while timing: {out['recompiles_after_warmup']}")
  return "\n".join(lines)


def main(argv):
  del argv
  reporting.quiet_library_logs()
  config = load_config(_STAGE.value, _PRESET.value, _BATCH.value, _GAN.value, _OVERRIDES.value)
  out = run(
    config,
    _STEPS.value,
    _WARMUP.value,
    _DATA.value,
    _PEAK_SIZE.value,
    _CHIP_PEAK.value,
    _MATMULS.value,
    _DATA_ROUNDS.value,
  )
  print(report(out))
  print(json.dumps(out))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
