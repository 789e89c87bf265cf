"""Shared fixtures: a tiny tokenizer workdir and a token folder made from it (built once per session).

The workdir is what the trainer leaves (config.json of `configs/vanilla.py:tiny`
and a step-2 checkpoint), with random variables in the model's real shapes
instead of trained ones: two real trainer steps cost ~3 min on the 2-core
CPU, this ~5 s. The spread (N(0, 0.2), LayerNorm scales around 1) is large
enough that different clips get different codes. Tests must not write into
either folder (copy it first).
"""

import json
import os
import pathlib
import subprocess
import sys

# Tests compile with XLA's CPU backend optimisations off: the programs compute
# the same things, compile 2-3x faster (measured: a scan/remat layer test 41 s
# -> 16 s on the 2-core VM) and compiling is most of a tiny test's time.
# Subprocess tests append their device-count flag to this. The flags are those
# of the pinned jaxlib (XLA aborts on unknown ones); bench/ measures speed with
# the default flags.
FAST_COMPILE_FLAGS = (
  "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
  "--xla_cpu_use_fusion_emitters=false"
)
if FAST_COMPILE_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from avtok_jax import checkpointing, config_lib  # noqa: E402
from avtok_jax.models import build_tokenizer  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def make_tokenizer_workdir(workdir: pathlib.Path):
  """Writes a tiny vanilla tokenizer workdir into `workdir`; returns its config."""
  config = config_lib.load_config_file(str(ROOT / "configs" / "vanilla.py") + ":tiny")
  config_lib.save_config(config, workdir / config_lib.RUN_CONFIG_FILE)
  tokenizer = build_tokenizer(config.model, config.data)
  abstract = jax.eval_shape(
    lambda rng: tokenizer.init(rng, **tokenizer.example_inputs(1), train=False), jax.random.key(0)
  )
  abstract = jax.tree.map(
    lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
    abstract,
    is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )
  rng = np.random.default_rng(0)

  def fill(path, x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return jnp.zeros(x.shape, x.dtype)
    value = rng.normal(0.0, 0.2, x.shape)
    if jax.tree_util.keystr(path).endswith("['scale']"):
      value += 1.0
    return jnp.asarray(value, x.dtype)

  state = {"step": np.int32(2), **jax.tree_util.tree_map_with_path(fill, abstract)}
  with checkpointing.Checkpointer(workdir / "checkpoints", async_save=False) as ckpt:
    ckpt.save(2, state)
  return config


def pytest_collection_modifyitems(config, items):
  """Runs the test files that hold a `slow` test first, each file's tests kept together.

  CI runs the files on 2 xdist workers (`-n 2 --dist=loadfile`, README), one
  file at a time per worker in this order: the long files started first
  finish while the other worker works through the many short ones, instead
  of one of them running alone at the end. Module fixtures still run once.
  """
  del config
  slow_files = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.path not in slow_files)  # stable: file order kept


@pytest.fixture(scope="session")
def run_on_8_cpu_devices():
  """run(script, out_dir, timeout) -> the facts.json that `script out_dir` wrote.

  The script runs in a subprocess with 8 forced host CPU devices (the flag
  must be set before JAX starts) and this checkout on its path; a failure
  shows the end of its output.
  """

  def run(script: pathlib.Path, out: pathlib.Path, timeout: int = 600) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
      [sys.executable, str(script), str(out)],
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return json.loads((out / "facts.json").read_text())

  return run


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> pathlib.Path:
  path = tmp_path_factory.mktemp("tiny_tokenizer")
  make_tokenizer_workdir(path)
  return path


@pytest.fixture(scope="session")
def tiny_tokens(tiny_tokenizer_dir, tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
  """(tokenizer workdir, token folder with 8 'train' and 4 'test' built-in clips)."""
  from avtok_jax import tokenize_dataset

  out = tmp_path_factory.mktemp("tiny_tokens")
  for split, n in (("train", 8), ("test", 4)):
    options = tokenize_dataset.Options(num_clips=n, batch_size=4, split=split)
    tokenize_dataset.run(str(tiny_tokenizer_dir), str(out), options)
  return tiny_tokenizer_dir, out
