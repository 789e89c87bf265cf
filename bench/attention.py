r"""A/B of the attention implementations, alone and inside the whole train step.

  python bench/attention.py                            # ops at the small preset's shapes
  python bench/attention.py --shapes=8x192x4x32,1x192x4x32 --causal --rounds=10
  python bench/attention.py --step --preset=small      # + the train step, kernel vs XLA

Op level: for each shape BxLxHEADSxD, `jax.nn.dot_product_attention`,
`layers.explicit_attention` (XLA ops, head-major, hand-written backward) and,
where it builds, the fused FFI kernel `kernels.cpu_attention.attention`;
each jitted forward and forward+backward (`jax.grad` of a weighted sum) timed
as the median of `--iters` calls, the implementations alternating within each
of `--rounds` rounds, and the medians over rounds printed.

`--step`: two copies of `bench/train_step.py`'s `StepBench` in this process,
one traced with `AVTOK_CPU_ATTENTION=xla` (so `layers.dot_product_attention`
takes `explicit_attention`) and one with the kernel, alternating rounds of
`--steps` waited steps: the VM's speed drifts 20-40% within minutes, so only
an alternating A/B in one process is a fair comparison; it also counts the
kernel's custom calls in each compiled step (0 in the XLA one). One JSON
line at the end.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
  if path not in sys.path:
    sys.path.insert(0, path)

import train_step  # noqa: E402  (bench/train_step.py; its flags are defined only when run)

from avtok_jax import reporting  # noqa: E402
from avtok_jax.kernels import cpu_attention  # noqa: E402
from avtok_jax.models import layers  # noqa: E402


def _define_flags() -> None:
  """Command-line flags (defined only when run as a script, so that tests can import us)."""
  global _SHAPES, _CAUSAL, _ROUNDS, _ITERS, _STEP, _PRESET, _STEPS
  _SHAPES = flags.DEFINE_list("shapes", ["8x192x4x32", "1x192x4x32"], "BxLxHEADSxD shapes.")
  _CAUSAL = flags.DEFINE_bool("causal", False, "Causal attention.")
  _ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating rounds.")
  _ITERS = flags.DEFINE_integer("iters", 20, "Calls per implementation per round.")
  _STEP = flags.DEFINE_bool("step", False, "Also A/B the whole train step (kernel vs XLA).")
  _PRESET = flags.DEFINE_enum("preset", "small", ["tiny", "small", "B", "L"], "Step's preset.")
  _STEPS = flags.DEFINE_integer("steps", 5, "Waited train steps per implementation per round.")


def _median_call_ms(fn, args, iters: int) -> float:
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * statistics.median(times)


def implementations(causal: bool) -> dict:
  impls = {
    "jax.nn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal),
    "explicit": lambda q, k, v: layers.explicit_attention(q, k, v, causal),
  }
  if cpu_attention.available():
    impls["kernel"] = lambda q, k, v: cpu_attention.attention(q, k, v, causal)
  return impls


def op_ab(shape: tuple[int, ...], causal: bool, rounds: int, iters: int) -> dict:
  """{impl: {'fwd_ms': median, 'fwd_bwd_ms': median}} at one shape."""
  q, k, v, g = (jax.random.normal(key, shape) for key in jax.random.split(jax.random.key(0), 4))
  fns = {}
  for name, fn in implementations(causal).items():
    loss = lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v) * g)  # noqa: E731
    fns[name] = (jax.jit(fn), jax.jit(jax.grad(loss, argnums=(0, 1, 2))))
  times = {name: ([], []) for name in fns}
  for fwd, fwd_bwd in fns.values():  # compile + warm up
    jax.block_until_ready((fwd(q, k, v), fwd_bwd(q, k, v)))
  for _ in range(rounds):
    for name, (fwd, fwd_bwd) in fns.items():
      times[name][0].append(_median_call_ms(fwd, (q, k, v), iters))
      times[name][1].append(_median_call_ms(fwd_bwd, (q, k, v), iters))
  return {
    name: {"fwd_ms": statistics.median(f), "fwd_bwd_ms": statistics.median(fb)}
    for name, (f, fb) in times.items()
  }


def step_ab(preset: str, rounds: int, steps: int) -> dict:
  """Median step time (ms) of the trainer's step with the kernel and with XLA attention."""
  config = train_step.load_config("stage1", preset, None, False)
  benches, calls = {}, {}
  before = os.environ.get("AVTOK_CPU_ATTENTION")
  try:
    for name in ("xla", "kernel"):
      os.environ["AVTOK_CPU_ATTENTION"] = name  # read when the step is traced (in compile)
      benches[name] = train_step.StepBench(config)
      compiled, _ = benches[name].compile()
      calls[name] = compiled.as_text().count('custom_call_target="avtok_cpu_attention')
  finally:
    if before is None:
      os.environ.pop("AVTOK_CPU_ATTENTION", None)
    else:
      os.environ["AVTOK_CPU_ATTENTION"] = before
  for bench in benches.values():
    bench.timed_steps(2)
  times = {name: [] for name in benches}
  compiles0 = reporting.compile_count()
  for r in range(rounds):
    order = list(benches) if r % 2 == 0 else list(benches)[::-1]
    for name in order:
      times[name].extend(benches[name].timed_steps(steps))
  out = {f"{name}_step_ms": 1e3 * statistics.median(t) for name, t in times.items()}
  out["step_speedup"] = out["xla_step_ms"] / out["kernel_step_ms"]
  out["recompiles_while_timing"] = reporting.compile_count() - compiles0
  out["kernel_calls_per_step"] = calls  # custom calls in each compiled step
  return out


def main(argv):
  del argv
  reporting.quiet_library_logs()
  if not cpu_attention.available():
    print("fused CPU attention kernel unavailable here (see the warning above)")
  out = {"jax": jax.__version__, "device": jax.devices()[0].platform, "causal": _CAUSAL.value}
  for text in _SHAPES.value:
    shape = tuple(int(x) for x in text.lower().split("x"))
    res = op_ab(shape, _CAUSAL.value, _ROUNDS.value, _ITERS.value)
    out[text] = res
    for name, r in res.items():
      print(
        f"{text} {name:9s} forward {r['fwd_ms']:7.2f} ms   forward+backward {r['fwd_bwd_ms']:7.2f} ms"
      )
  if _STEP.value and cpu_attention.available():
    res = step_ab(_PRESET.value, _ROUNDS.value, _STEPS.value)
    out["step"] = res
    print(
      f"train step ({_PRESET.value}, stage 1): XLA attention {res['xla_step_ms']:.1f} ms, "
      f"kernel {res['kernel_step_ms']:.1f} ms -> {res['step_speedup']:.3f}x; "
      f"recompilations while timing: {res['recompiles_while_timing']}"
    )
  print(json.dumps(out))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
