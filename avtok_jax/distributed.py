"""Multi-host start-up: when and how to call `jax.distributed.initialize`.

JAX runs one controller process per host (per GPU node, per TPU VM worker);
every process runs the same program, loads its share of each batch and sees
the global arrays through the mesh. `initialize` must run before anything
touches a JAX backend. Where the processes come from:

| launcher                            | what we pass                                         |
|---------------------------------------|------------------------------------------------------|
| Cloud TPU VM / pod slice              | `--distributed=on`: JAX reads the TPU metadata server |
| SLURM (`srun`), Open MPI (`mpirun`)    | nothing: JAX reads the SLURM_* / OMPI_* variables     |
| plain ssh / any other launcher        | coordinator address, process count, process id       |

`--distributed=auto` (the default) initialises when this process is one of
several: a coordinator was given (flag or environment variable), SLURM /
Open MPI report more than one task, or the environment lists several TPU
workers (`TPU_WORKER_HOSTNAMES`, set on GKE; multislice
`MEGASCALE_NUM_SLICES`). A TPU VM pod slice sets none of these (JAX finds its
workers through the metadata server), so `launch/tpu_vm.sh` passes
`--distributed=on` on slices with more than one host. A single process on one
machine stays uninitialised (no coordinator service, no ports), which is what
laptops and single-GPU boxes want.

SLURM with one task per node: JAX's SLURM detection gives each process the
GPU `SLURM_LOCALID` only (right for one task per GPU); with one task per node
set `JAX_LOCAL_DEVICE_IDS=0,1,...` to all the node's GPUs, as
`launch/gpu_multinode.sh slurm` does.

Flags (each also read from the environment variable named):

  --distributed=auto|on|off
  --coordinator_address=HOST:PORT   AVTOK_COORDINATOR_ADDRESS
  --num_processes=N                 AVTOK_NUM_PROCESSES
  --process_id=I                    AVTOK_PROCESS_ID

On the CPU backend (tests, laptops) cross-process collectives go through
gloo (`jax_cpu_collectives_implementation`); accelerators use their own
(ICI/DCN on TPU, NCCL on GPU).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from absl import flags, logging

ENV_COORDINATOR = "AVTOK_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "AVTOK_NUM_PROCESSES"
ENV_PROCESS_ID = "AVTOK_PROCESS_ID"

_DISTRIBUTED = flags.DEFINE_enum(
  "distributed",
  "auto",
  ["auto", "on", "off"],
  "Call jax.distributed.initialize: 'auto' when launched as one of several processes "
  "(coordinator given, SLURM/Open MPI with >1 task, multi-worker TPU), 'on' always, 'off' never.",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address",
  None,
  f"HOST:PORT of process 0's coordinator service (default: ${ENV_COORDINATOR}).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, f"Number of processes in the job (default: ${ENV_NUM_PROCESSES})."
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", None, f"This process' index in [0, num_processes) (default: ${ENV_PROCESS_ID})."
)


@dataclasses.dataclass(frozen=True)
class Options:
  """What `initialize` does; `from_flags` fills it from the flags and the environment."""

  mode: str = "auto"
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  @classmethod
  def from_flags(cls, environ: Mapping[str, str] | None = None) -> Options:
    env = os.environ if environ is None else environ

    def pick(value, name, kind):
      if value is not None:
        return value
      raw = env.get(name)
      if raw in (None, ""):
        return None
      try:
        return kind(raw)
      except ValueError:
        raise ValueError(f"${name}={raw!r} is not a valid {kind.__name__}.") from None

    return cls(
      mode=_DISTRIBUTED.value,
      coordinator_address=pick(_COORDINATOR.value, ENV_COORDINATOR, str),
      num_processes=pick(_NUM_PROCESSES.value, ENV_NUM_PROCESSES, int),
      process_id=pick(_PROCESS_ID.value, ENV_PROCESS_ID, int),
    )

  def check(self) -> None:
    """Raise ValueError with one line naming the inconsistent value."""
    if self.mode not in ("auto", "on", "off"):
      raise ValueError(f"--distributed={self.mode!r} must be auto, on or off.")
    explicit = (self.coordinator_address, self.num_processes, self.process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
      raise ValueError(
        "Give all three of --coordinator_address, --num_processes and --process_id "
        f"(or ${ENV_COORDINATOR}, ${ENV_NUM_PROCESSES}, ${ENV_PROCESS_ID}), or none of them; got "
        f"coordinator_address={self.coordinator_address!r}, num_processes={self.num_processes!r}, "
        f"process_id={self.process_id!r}."
      )
    if self.coordinator_address is not None:
      host, sep, port = self.coordinator_address.rpartition(":")
      if not sep or not host or not port.isdigit():
        raise ValueError(
          f"--coordinator_address={self.coordinator_address!r} must be HOST:PORT, "
          "e.g. 10.0.0.2:8476."
        )
    if self.num_processes is not None:
      if self.num_processes < 1:
        raise ValueError(f"--num_processes={self.num_processes} must be >= 1.")
      if not 0 <= self.process_id < self.num_processes:
        raise ValueError(
          f"--process_id={self.process_id} must be in [0, num_processes={self.num_processes})."
        )


def detected_launcher(environ: Mapping[str, str] | None = None) -> str | None:
  """The multi-process launcher this process runs under, or None for a lone process.

  Only launchers whose job has more than one process count: a one-task SLURM
  allocation or a single-host TPU VM is a lone process.
  """
  env = os.environ if environ is None else environ

  def count(name: str) -> int:
    try:
      return int(env.get(name, "1") or 1)
    except ValueError:
      return 1

  if "SLURM_JOB_ID" in env and count("SLURM_NTASKS") > 1:
    return "slurm"
  if count("OMPI_COMM_WORLD_SIZE") > 1:
    return "openmpi"
  # Cloud TPU VMs list every worker of the slice in TPU_WORKER_HOSTNAMES
  # (comma-separated); multislice jobs set MEGASCALE_NUM_SLICES.
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return "tpu"
  if count("MEGASCALE_NUM_SLICES") > 1:
    return "tpu"
  return None


def should_initialize(options: Options, environ: Mapping[str, str] | None = None) -> bool:
  """Whether `initialize` calls `jax.distributed.initialize` (see the module docstring)."""
  options.check()
  if options.mode == "off":
    return False
  if options.mode == "on":
    return True
  return options.coordinator_address is not None or detected_launcher(environ) is not None


def initialize(options: Options | None = None) -> bool:
  """Start the multi-controller runtime when `options` say so; True if it was started.

  Must run before the first JAX computation. Idempotent: a second call (the
  trainer called in a loop, tests) does nothing.
  """
  import jax

  options = Options.from_flags() if options is None else options
  if not should_initialize(options):
    return False
  if jax.distributed.is_initialized():
    return True
  # CPU processes exchange collectives through gloo (the CPU client's default
  # is none, which fails on the first cross-process computation).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if options.coordinator_address is not None:
    kwargs = dict(
      coordinator_address=options.coordinator_address,
      num_processes=options.num_processes,
      process_id=options.process_id,
    )
  logging.info("jax.distributed.initialize(%s)", kwargs or "auto-detected")
  jax.distributed.initialize(**kwargs)
  logging.info(
    "Process %d of %d: %d local / %d global devices.",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return True
