r"""Command line: train one VFAL phase, or an AR generator on a token set.

  python -m avtok_jax.main --config=configs/vfal_stage1.py:small --workdir=workdir/stage1
  python -m avtok_jax.main --config=configs/vfal_stage2.py:small --workdir=workdir/stage2 \
      --config.init_from=workdir/stage1

  python -m avtok_jax.main --config=configs/ar_a2v.py:small --workdir=workdir/ar_a2v \
      --config.tokens_dir=workdir/tokens

Configs with `trainer = 'ar'` (configs/ar_*.py) go to `train_ar.run`, all
others to the tokenizer trainer `train.run`. Any config value can be
overridden with --config.key=value. Re-running the same command resumes from
the workdir's latest checkpoint.

Multi-host (TPU pod slices, GPU clusters): run the same command on every
host; `--distributed` (see `avtok_jax/distributed.py`) starts JAX's
multi-controller runtime, auto-detected on Cloud TPU, SLURM and Open MPI, or
from `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`.
`launch/tpu_vm.sh` and `launch/gpu_multinode.sh` do this for you.
"""

from absl import app, flags
from ml_collections import config_flags

from avtok_jax import distributed, reporting, train, train_ar

_CONFIG = config_flags.DEFINE_config_file("config", None, "Phase config file (configs/*.py[:ARG]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_STOP_AFTER = flags.DEFINE_integer(
  "stop_after_step",
  None,
  "End this invocation after that step, with a checkpoint (the schedule still runs to "
  "config.total_steps; rerun the same command to continue).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  reporting.quiet_library_logs()
  try:
    distributed.initialize()
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  config = _CONFIG.value
  trainer = train_ar if config.get("trainer") == train_ar.TRAINER else train
  trainer.run(config, _WORKDIR.value, stop_after=_STOP_AFTER.value)


if __name__ == "__main__":
  app.run(main)
