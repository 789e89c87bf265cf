r"""Command line: train one VFAL phase.

  python -m avtok_jax.main --config=configs/vfal_stage1.py:small --workdir=workdir/stage1
  python -m avtok_jax.main --config=configs/vfal_stage2.py:small --workdir=workdir/stage2 \
      --config.init_from=workdir/stage1

Any config value can be overridden with --config.key=value. Re-running the
same command resumes from the workdir's latest checkpoint.
"""

from absl import app, flags
from ml_collections import config_flags

from avtok_jax import reporting, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Phase config file (configs/*.py[:ARG]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  reporting.quiet_library_logs()
  train.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
