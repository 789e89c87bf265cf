"""Multi-host training for real: 2 JAX processes on localhost (gloo collectives, 4 CPU devices each).

Both processes run `python -m avtok_jax.main` with `--coordinator_address`,
stop after step 2 with a checkpoint (`--stop_after_step`), are started again
and resume to step 4. The result must equal one process with 8 devices
running the same 4 steps: same losses, same parameters, same Orbax
checkpoint steps. Nothing is mocked: real `jax.distributed`, real per-process
Grain shards assembled with `jax.make_array_from_process_local_data`, real
multi-host Orbax saves and restores.
"""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from avtok_jax import checkpointing, config_lib, reporting
from tests.test_train import flat, load_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 4
# The tiny stage-1 preset at a global batch of 8 (one example per device), the
# GAN's discriminator and dead-code restarts included.
ARGS = [
  "--config=configs/vfal_stage1.py:tiny",
  f"--config.total_steps={STEPS}",
  "--config.data.batch_size=8",
  "--config.log_every=1",
  "--config.checkpoint_every=2",
  "--config.sample_every=1000",
  "--config.eval_batches=0",
]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
  )
  for name in ("AVTOK_COORDINATOR_ADDRESS", "AVTOK_NUM_PROCESSES", "AVTOK_PROCESS_ID"):
    env.pop(name, None)
  return env


def _check(proc: subprocess.CompletedProcess | subprocess.Popen, out: str, err: str, what: str):
  assert proc.returncode == 0, f"{what} failed:\n{out[-3000:]}\n{err[-6000:]}"


def _run_two_processes(workdir, *extra):
  """Both processes of one job; returns their (stdout, stderr)."""
  address = f"localhost:{_free_port()}"
  procs = [
    subprocess.Popen(
      [sys.executable, "-m", "avtok_jax.main", *ARGS, f"--workdir={workdir}", *extra]
      + [f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT,
      env=_env(4),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=600))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
    _check(p, out, err, f"process {i}")
  return outputs


@pytest.mark.slow
def test_two_processes_with_restart_match_one_process(tmp_path):
  reference = tmp_path / "one_process"
  proc = subprocess.run(
    [sys.executable, "-m", "avtok_jax.main", *ARGS, f"--workdir={reference}"],
    cwd=ROOT,
    env=_env(8),
    capture_output=True,
    text=True,
    timeout=600,
  )
  _check(proc, proc.stdout, proc.stderr, "the 1-process run")

  workdir = tmp_path / "two_processes"
  first = _run_two_processes(workdir, "--stop_after_step=2")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert checkpointing.Checkpointer(ckpt_dir).latest_step() == 2
  # Each process saved its own Grain iterator state next to the shared arrays.
  data_files = sorted(os.listdir(os.path.join(ckpt_dir, "2", "data_state")))
  assert [f for f in data_files if f.startswith("process_")] == [
    "process_0-of-2.json",
    "process_1-of-2.json",
  ], data_files
  assert "Process 0 of 2: 4 local / 8 global devices" in first[0][1]
  assert "Process 1 of 2: 4 local / 8 global devices" in first[1][1]

  second = _run_two_processes(workdir)
  for _, err in second:
    assert "Resumed from" in err and "at step 2" in err, err[-3000:]
  # Only process 0 writes metrics, samples and the progress line.
  assert "Done: stage1 at step 4" in second[0][0]
  assert "Done:" not in second[1][0]

  ref_metrics = {m["step"]: m for m in reporting.read_metrics(reference)}
  metrics = {m["step"]: m for m in reporting.read_metrics(workdir)}
  assert sorted(metrics) == sorted(ref_metrics) == list(range(1, STEPS + 1))
  for step in range(1, STEPS + 1):
    for key in ("loss", "video_l1", "prior", "codebook_usage"):
      assert metrics[step][key] == pytest.approx(ref_metrics[step][key], rel=1e-5, abs=1e-6), (
        step,
        key,
      )

  config = config_lib.load_config(reference / config_lib.RUN_CONFIG_FILE)
  assert config.data.batch_size == 8
  a, b = flat(load_params(config, reference)), flat(load_params(config, workdir))
  assert sorted(a) == sorted(b)
  worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
  assert worst < 1e-5, worst
