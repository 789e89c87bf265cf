r"""Command line: train one VFAL phase.

  python -m avtok_jax.main --config=configs/vfal_stage1.py:small --workdir=workdir/stage1
  python -m avtok_jax.main --config=configs/vfal_stage2.py:small --workdir=workdir/stage2 \
      --config.init_from=workdir/stage1

Any config value can be overridden with --config.key=value. Re-running the
same command resumes from the workdir's latest checkpoint.
"""

import logging

from absl import app, flags
from ml_collections import config_flags

from avtok_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Phase config file (configs/*.py[:ARG]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging.Filter):
  """Drops the INFO chatter of libraries that log through absl (Orbax: ~25 lines per save).

  Their warnings and errors still pass; `--verbosity=1` shows everything.
  """

  _PREFIXES = ("orbax", "etils", "jax._src")

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING or flags.FLAGS.verbosity > 0:
      return True
    module = record.pathname.replace("\\", "/")
    return not any(f"/{p.replace('.', '/')}/" in module for p in self._PREFIXES)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  train.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
