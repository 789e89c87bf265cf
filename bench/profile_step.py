r"""Where the train step's time goes: per-op times from a `jax.profiler` trace.

  python bench/profile_step.py --preset=small                # stage 1, this machine
  python bench/profile_step.py --preset=small --depth=5 --top=40
  python bench/profile_step.py --preset=small --trace_dir=/tmp/trace   # keep the trace

What it does: builds the trainer's jitted step exactly as `bench/train_step.py`
does, runs `--warmup` steps, then traces `--steps` steps with
`jax.profiler` (Perfetto JSON next to the TensorBoard trace, so the trace
also opens in TensorBoard's profile plugin or ui.perfetto.dev). Every
compiled XLA op (a fusion, a dot, a collective) is a named event in the
trace on the backends that record them (XLA CPU does); the script sums each
op's time per step and names it by the `op_name` metadata XLA keeps in the
optimized HLO (`compiled.as_text()`): the Flax module path and the jax
primitive, `transpose(jvp(...))` marking the backward pass. Printed:

* the top `--top` ops: ms per step, result shape, module path;
* the same time grouped by the first `--depth` parts of the module path
  (e.g. `AVTok._encode_one/encoder/block_0/attn`), forward and backward
  apart (`BWD(...)`).

Times are summed over the threads that ran them: with ops overlapping on
several cores the total exceeds the step's wall time. Events that are not
ops (executor waits, Python) are left out. One JSON line at the end.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile

import jax
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402

from avtok_jax import reporting  # noqa: E402

# Trace events that are the runtime's bookkeeping, not compiled ops.
_NOT_OPS = re.compile(r"Execute|Await|Rendezvous|Wait|Pjit|LaunchOnDevice|ParseArguments|^\$")
_OP_LINE = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (\S+) .*?op_name="([^"]+)"')


def _define_flags() -> None:
  flags.DEFINE_enum("preset", "small", ["tiny", "small", "B", "L"], "Size preset.")
  flags.DEFINE_enum("stage", "stage1", ["stage1", "vanilla"], "Which stage's step.")
  flags.DEFINE_integer("batch_size", None, "Global batch (default: the preset's).")
  flags.DEFINE_integer("steps", 5, "Traced steps.")
  flags.DEFINE_integer("warmup", 3, "Untraced steps after compilation.")
  flags.DEFINE_integer("top", 25, "How many single ops to list.")
  flags.DEFINE_integer("depth", 4, "Module-path parts to group by.")
  flags.DEFINE_string("trace_dir", None, "Keep the trace here (default: a temporary folder).")
  flags.DEFINE_multi_string("set", [], "Config overrides KEY=VALUE, as bench/train_step.py.")


def op_metadata(hlo_text: str) -> dict[str, tuple[str, str]]:
  """{instruction name: (result shape, op_name)} of an optimized HLO module's text."""
  meta = {}
  for line in hlo_text.splitlines():
    m = _OP_LINE.match(line)
    if m and m.group(1) not in meta:
      meta[m.group(1)] = (m.group(2), m.group(3))
  return meta


def module_path(op_name: str, depth: int) -> str:
  """The first `depth` parts of an op_name, jit wrappers dropped, backward marked `BWD(`."""
  path = re.sub(r"jit\([^)]*\)/", "", op_name).replace("transpose(jvp(", "BWD(")
  return "/".join(path.split("/")[:depth])


def op_times(trace_dir: str) -> collections.Counter:
  """Total microseconds per op name over every complete event of the Perfetto trace."""
  files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    raise FileNotFoundError(f"No Perfetto trace (*.trace.json.gz) under {trace_dir}.")
  with gzip.open(max(files, key=os.path.getmtime)) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  totals = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and not _NOT_OPS.search(e.get("name", "")):
      totals[e["name"]] += e.get("dur", 0)
  return totals


def run(config, steps: int, warmup: int, trace_dir: str | None, depth: int) -> dict:
  bench = train_step.StepBench(config)
  compiled, _ = bench.compile()
  meta = op_metadata(compiled.as_text())  # the executable the timed steps run
  bench.timed_steps(max(warmup, 1))
  with contextlib.ExitStack() as stack:
    folder = trace_dir or stack.enter_context(tempfile.TemporaryDirectory())
    jax.profiler.start_trace(folder, create_perfetto_trace=True)
    try:
      times = bench.timed_steps(steps)
    finally:
      jax.profiler.stop_trace()
    totals = op_times(folder)
  per_step = {name: us / steps / 1e3 for name, us in totals.items()}
  ops = [
    {
      "op": name,
      "ms": ms,
      "shape": meta.get(name, ("", ""))[0],
      "path": module_path(meta.get(name, ("", ""))[1], 99),
    }
    for name, ms in sorted(per_step.items(), key=lambda kv: -kv[1])
  ]
  groups = collections.Counter()
  for op in ops:
    groups[module_path(op["path"], depth) if op["path"] else "(no metadata)"] += op["ms"]
  return {
    "preset": config.model.size,
    "stage": config.stage,
    "devices": jax.device_count(),
    "step_s": statistics.median(times),
    "op_ms_per_step": sum(per_step.values()),
    "named_ops": sum(1 for op in ops if op["path"]),
    "ops": ops,
    "groups": dict(groups.most_common()),
  }


def report(out: dict, top: int) -> str:
  lines = [
    f"{out['preset']} {out['stage']} on {out['devices']} device(s): step "
    f"{out['step_s'] * 1e3:.1f} ms; ops {out['op_ms_per_step']:.1f} ms per step "
    "(summed over threads)",
    f"top {top} ops (ms/step, shape, module path):",
  ]
  for op in out["ops"][:top]:
    lines.append(f"  {op['ms']:7.2f}  {op['op']:<28} {op['shape'][:28]:<28} {op['path'][-80:]}")
  lines.append("by module path (ms/step):")
  for path, ms in list(out["groups"].items())[:top]:
    lines.append(f"  {ms:7.2f}  {path}")
  return "\n".join(lines)


def main(argv):
  del argv
  reporting.quiet_library_logs()
  f = flags.FLAGS
  config = train_step.load_config(f.stage, f.preset, f.batch_size, False, f.set)
  out = run(config, f.steps, f.warmup, f.trace_dir, f.depth)
  print(report(out, f.top))
  summary = {k: v for k, v in out.items() if k != "ops"}
  summary["top_ops"] = out["ops"][: f.top]
  print(json.dumps(summary))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
