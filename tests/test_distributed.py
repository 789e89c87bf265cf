"""When `--distributed` starts jax.distributed, and its one-line errors (the real start: test_multiprocess)."""

import os
import signal

import pytest

from avtok_jax import checkpointing, distributed

Options = distributed.Options


@pytest.mark.parametrize(
  "env,launcher",
  [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "slurm"),
    ({"SLURM_NTASKS": "4"}, None),  # no job: not under SLURM
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "openmpi"),
    ({"TPU_WORKER_HOSTNAMES": "t0"}, None),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, "tpu"),
    ({"MEGASCALE_NUM_SLICES": "2"}, "tpu"),
  ],
)
def test_detected_launcher(env, launcher):
  assert distributed.detected_launcher(env) == launcher


def test_auto_starts_only_for_several_processes():
  lone = Options()
  assert not distributed.should_initialize(lone, {})
  assert distributed.should_initialize(lone, {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"})
  given = Options(coordinator_address="localhost:1234", num_processes=2, process_id=1)
  assert distributed.should_initialize(given, {})
  assert not distributed.should_initialize(Options(mode="off"), {"OMPI_COMM_WORLD_SIZE": "8"})
  assert distributed.should_initialize(Options(mode="on"), {})


@pytest.mark.parametrize(
  "options,named",
  [
    (Options(coordinator_address="h:1"), "Give all three"),
    (Options(coordinator_address="h", num_processes=2, process_id=0), "HOST:PORT"),
    (Options(coordinator_address="h:x", num_processes=2, process_id=0), "HOST:PORT"),
    (Options(coordinator_address="h:1", num_processes=2, process_id=2), "--process_id=2"),
    (Options(coordinator_address="h:1", num_processes=0, process_id=0), "--num_processes=0"),
    (Options(mode="sometimes"), "--distributed='sometimes'"),
  ],
)
def test_inconsistent_options_are_one_line_errors(options, named):
  with pytest.raises(ValueError, match=named) as e:
    options.check()
  assert "\n" not in str(e.value)


def test_options_from_the_environment(monkeypatch):
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  env = {
    distributed.ENV_COORDINATOR: "10.0.0.2:8476",
    distributed.ENV_NUM_PROCESSES: "4",
    distributed.ENV_PROCESS_ID: "3",
  }
  assert Options.from_flags(env) == Options("auto", "10.0.0.2:8476", 4, 3)
  with pytest.raises(ValueError, match=r"\$AVTOK_NUM_PROCESSES='four' is not a valid int"):
    Options.from_flags({distributed.ENV_NUM_PROCESSES: "four"})


def test_sigterm_stops_a_single_process_at_once():
  with checkpointing.PreemptionHandler() as preemption:
    assert not preemption.should_stop(sync=False)
    os.kill(os.getpid(), signal.SIGTERM)
    # One process: no agreement needed, the flag counts between sync steps too.
    assert preemption.should_stop(sync=False)
