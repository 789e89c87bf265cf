r"""JAX against the PyTorch reference on the same work, measured in one run.

  python bench/compare.py                          # small preset, stage 1, batch 8, 3 rounds
  python bench/compare.py --preset=small --stage=vanilla --rounds=5

Each round runs, one after the other in fresh subprocesses (so no run warms
another's caches or threads), the four measurements:

  jax        bench/train_step.py --data=false          (our trainer's step)
  jax        bench/inference.py  --batches=B            (encode + decode)
  torch      bench/torch_reference.py --stochastic      (eager)
  torch      bench/torch_reference.py --stochastic --compile

`--stochastic`: the reference samples codes from softmax(cos / T) as our
train step does by default (`model.stochastic_quantization`). Encode + decode
run the stage's streams in both (stage 1: video only) with argmax codes.

Rounds alternate the order (jax first, then torch first) and the medians over
rounds are compared. Printed: each figure, and the speed ratio
torch time / JAX time (above 1: JAX is faster) for the train step against
eager and against torch.compile, and for encode + decode. One JSON line at
the end.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))

_PRESET = flags.DEFINE_enum("preset", "small", ["tiny", "small", "B", "L"], "Size preset.")
_STAGE = flags.DEFINE_enum("stage", "stage1", ["stage1", "vanilla"], "Which stage's step.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Batch size.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed train steps per measurement.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds (alternating order).")
_SKIP_COMPILE = flags.DEFINE_bool("skip_compile", False, "Leave torch.compile out.")
_THREADS = flags.DEFINE_integer("torch_threads", None, "torch threads (default: all CPUs).")

_MODALITIES = {"stage1": "video", "vanilla": "video,audio"}


def _last_json(text: str, what: str) -> dict:
  for line in reversed(text.strip().splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  raise RuntimeError(f"{what} printed no JSON result:\n{text[-3000:]}")


def _run(args: list[str], what: str) -> dict:
  proc = subprocess.run(
    [sys.executable, *args], capture_output=True, text=True, check=False, cwd=os.path.dirname(HERE)
  )
  if proc.returncode:
    raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
  return _last_json(proc.stdout, what)


def measurements(preset: str, stage: str, batch: int, steps: int, compile_: bool, threads):
  """name -> (argv, function of the JSON result -> seconds)."""
  common = [f"--preset={preset}", f"--batch_size={batch}", f"--steps={steps}"]
  torch_args = [
    os.path.join(HERE, "torch_reference.py"),
    *common,
    f"--stage={stage}",
    "--stochastic",
  ]
  if threads:
    torch_args.append(f"--threads={threads}")
  out = {
    "jax_train": (
      [os.path.join(HERE, "train_step.py"), *common, f"--stage={stage}", "--data=false"],
      lambda r: r["step_s"],
    ),
    "jax_encode_decode": (
      [
        os.path.join(HERE, "inference.py"),
        f"--preset={preset}",
        f"--batches={batch}",
        f"--modalities={_MODALITIES[stage]}",
        "--skip_generator",
        "--repeats=10",
      ],
      lambda r: r["tokenizer"][0]["encode_decode_s"],
    ),
    "torch_eager": (torch_args, lambda r: (r["train_step_s"], r["encode_decode_s"])),
  }
  if compile_:
    out["torch_compile"] = (
      [*torch_args, "--compile"],
      lambda r: (r["train_step_s"], r["encode_decode_s"]),
    )
  return out


def main(argv):
  del argv
  plan = measurements(
    _PRESET.value,
    _STAGE.value,
    _BATCH.value,
    _STEPS.value,
    not _SKIP_COMPILE.value,
    _THREADS.value,
  )
  names = list(plan)
  results: dict[str, list] = {n: [] for n in names}
  for r in range(_ROUNDS.value):
    order = names if r % 2 == 0 else names[2:] + names[:2]
    for name in order:
      args, pick = plan[name]
      value = pick(_run(args, name))
      results[name].append(value)
      print(f"round {r + 1}: {name}: {value}", flush=True)

  summary = {
    "preset": _PRESET.value,
    "stage": _STAGE.value,
    "batch_size": _BATCH.value,
    "rounds": _ROUNDS.value,
    "cpus": os.cpu_count(),
  }
  print(
    f"{_PRESET.value} {_STAGE.value}, batch {_BATCH.value}, median of {_ROUNDS.value} rounds "
    "(ratio = torch time / JAX time; above 1: JAX faster)"
  )
  # (label, JSON key, JAX measurement, index into the torch pair, ratio key prefix)
  works = (
    ("train step    ", "train_step", "jax_train", 0, "train"),
    ("encode+decode ", "encode_decode", "jax_encode_decode", 1, "encode_decode"),
  )
  torch_modes = [m for m in ("eager", "compile") if f"torch_{m}" in results]
  for label, key, jax_name, i, ratio in works:
    jax_s = summary[f"jax_{key}_s"] = statistics.median(results[jax_name])
    line = f"  {label} JAX {jax_s * 1e3:7.1f} ms"
    for mode in torch_modes:
      torch_s = summary[f"torch_{mode}_{key}_s"] = statistics.median(
        v[i] for v in results[f"torch_{mode}"]
      )
      summary[f"{ratio}_ratio_vs_{mode}"] = torch_s / jax_s
      line += f" | {mode} {torch_s * 1e3:7.1f} ms (x{torch_s / jax_s:.2f})"
    print(line)
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
