"""Tests of the memory planner (`python -m avtok_jax.plan`).

The per-device bytes are checked against really initialised sharded arrays on
8 forced CPU devices (a subprocess, as in test_train.py); the compiled path
on a trimmed tiny config (compiling the full tiny stage-1 step takes ~40 s on
the 2-core CPU).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from avtok_jax import config_lib, plan, sharding, train
from avtok_jax.models import __main__ as models_cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGE1 = str(ROOT / "configs" / "vfal_stage1.py")


def load(arg: str = "tiny", name: str = STAGE1):
  return config_lib.load_config_file(f"{name}:{arg}")


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
  code = plan.main(["plan", *args])
  out = capsys.readouterr()
  return code, out.out, out.err


def test_l_parameters_match_the_models_table_and_fsdp_divides_them():
  config = load("L")
  config.mesh.update(data=1, fsdp=8, model=1)
  # compile=True: with 8 planned devices on this host it is skipped, with a note.
  p = plan.make_plan(config, num_devices=8, compile=True, device_memory_gb=4)
  table = models_cli.count_by_module(models_cli.param_shapes(config.model, config.data))
  tokenizer = sum(table.values())
  assert p.param_counts["tokenizer (incl. prior)"] == tokenizer
  assert round(tokenizer / 1e6, 1) == 197.9  # the README's figure
  assert p.param_counts["prior"] == table["prior"]
  rows = {r.name: r for r in p.rows}
  # float32 parameters: 4 bytes each, tokenizer + the two alignment projectors;
  # Adam keeps two moments of each trainable one.
  assert rows["parameters"].total == 4 * (tokenizer + p.param_counts["projectors"])
  assert rows["optimizer state"].total >= 2 * 4 * p.param_counts["trainable"]
  for name in ("parameters", "optimizer state"):
    # Whole on every device: norms, biases, the codebook and the projectors' fc2/fc3
    # kernels (logical names (None, 'mlp') / ('mlp', None): nothing maps to fsdp),
    # 45 MiB of the 139 MiB of parameters per device.
    assert rows[name].total / 8 <= rows[name].per_device < rows[name].total / 5
  assert p.mesh == {"data": 1, "fsdp": 8, "model": 1} and p.batch_per_device == 16
  assert p.compiled is None and "planning 8 devices" in p.compile_note
  assert p.fits is False
  text = plan.format_plan(p)
  assert "WARNING:" in text and "--config.data.batch_size=" in text
  assert "--config.mesh.fsdp" not in text  # already all on fsdp


def test_warning_with_tiny_device_memory(capsys, tmp_path):
  code, out, _ = run_cli(
    capsys,
    f"--config={STAGE1}:tiny",
    "--compile=false",
    "--device_memory_gb=0.001",
    f"--json={tmp_path / 'plan.json'}",
  )
  assert code == 0
  warning = [line for line in out.splitlines() if line.startswith("WARNING:")]
  assert len(warning) == 1 and "exceeds the usable" in warning[0]
  assert "--config.model.remat=true" in out  # tiny runs without remat
  saved = json.loads((tmp_path / "plan.json").read_text())
  assert saved["fits"] is False and saved["budget"] == int(saved["device_memory"] * 0.9)
  assert saved["mesh"] == {"data": 1, "fsdp": 1, "model": 1}


@pytest.mark.parametrize(
  "args,devices",
  [
    (("--config.mesh.data=3",), 8),  # 8 devices not divisible by 3
    (("--config.mesh.data=2", "--config.mesh.fsdp=2"), 8),  # needs 4 devices
    ((), 8),  # batch 4 over data*fsdp = 8
    (("--config.mesh.model=2", "--config.model.codebook_size=63"), 2),
  ],
)
def test_bad_mesh_gives_the_trainers_one_line_error(capsys, args, devices):
  config = load()
  for arg in args:
    key, value = arg.removeprefix("--config.").split("=")
    section, field = key.split(".")
    config[section][field] = int(value)
  with pytest.raises(ValueError) as trainer_error:
    train.check_config(config, devices)
    sharding.make_mesh(dict(config.mesh), [plan._PlannedDevice(i) for i in range(devices)])
  code, out, err = run_cli(
    capsys, f"--config={STAGE1}:tiny", f"--devices={devices}", "--compile=false", *args
  )
  assert code == 1 and out == ""
  assert err == f"Error: {trainer_error.value}\n"


def test_compiled_memory_analysis_on_cpu():
  # Trimmed tiny stage 1 (no GAN, prior, alignment or restarts) to keep the compile short.
  config = load()
  config.gan.enabled = False
  config.model.prior_depth = 0
  config.param_rules = ((r"^audio_", "frozen"),)
  config.restart_dead_codes_every = 0
  config.loss_weights = config_lib.loss_weights("video_l1", "video_l2", "vq")
  p = plan.make_plan(config, compile=True, device_memory_gb=1)
  c = p.compiled
  assert c is not None, p.compile_note
  for field in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"):
    assert c[field] > 0, field
  # The arguments are the state and the batch (less what the step never reads: jit
  # drops unused inputs, here the mel patches and labels of stage 1); the donated
  # state is aliased by the new one.
  rows = {r.name: r.per_device for r in p.rows}
  state = rows["parameters"] + rows["optimizer state"] + rows["other state"]
  assert state <= c["argument_size_in_bytes"] <= state + rows["batch"]
  assert state - rows["other state"] <= c["alias_size_in_bytes"] <= state
  # The analytic estimate is in the compiled figure's range.
  assert 0.5 < p.analytic_total.per_device / c["total_in_bytes"] < 2
  text = plan.format_plan(p)
  assert p.fits and "Compiled train step" in text and "WARNING:" not in text


def test_ar_plan_without_a_token_set():
  config = load("L", str(ROOT / "configs" / "ar_joint.py"))
  p = plan.make_plan(config, num_devices=16, compile=False)
  # 632.8M: the L generator, vocabulary 8503 with 309 classes (models/generator.py table).
  assert round(p.param_counts["generator"] / 1e6, 1) == 632.8
  assert p.batch_per_device == 16 and "309 classes" in " ".join(p.notes)


MULTI_DEVICE_SCRIPT = r"""
import json, sys
import flax.linen as nn
import jax
from avtok_jax import config_lib, plan
config = config_lib.load_config_file(sys.argv[1] + ":tiny")
config.mesh.update(data=2, fsdp=2, model=2)
p = plan.make_plan(config, compile=False)
setup = plan.tokenizer_setup(config, plan.plan_mesh(config.mesh))
rng = jax.random.key_data(jax.random.key(config.seed))
# The trainer's init (train.run); compiled without LLVM optimisation, which halves
# its compile time here and does not change where the arrays go.
init = jax.jit(lambda r: nn.unbox(setup.init_state(r)), out_shardings=setup.state_shardings)
state = init.lower(rng).compile({"xla_backend_optimization_level": 0})(rng)
measured = {
  name: sum(x.addressable_shards[0].data.nbytes for k in keys if k in state
            for x in jax.tree.leaves(state[k]))
  for name, keys in setup.groups.items()
}
rows = {r.name: [r.total, r.per_device] for r in p.rows}
print("RESULT " + json.dumps({"measured": measured, "rows": rows, "devices": jax.device_count()}))
"""


def test_per_device_bytes_match_sharded_arrays():
  env = dict(
    os.environ,
    XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
    PYTHONPATH=str(ROOT),
  )
  proc = subprocess.run(
    [sys.executable, "-c", MULTI_DEVICE_SCRIPT, STAGE1],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  result = json.loads(proc.stdout.split("RESULT ", 1)[1])
  assert result["devices"] == 8
  rows = result["rows"]
  for name, nbytes in result["measured"].items():
    if nbytes:
      assert rows[name][1] == nbytes, name
  # Something is really split (fsdp x model over the parameters).
  total, per_device = rows["parameters"]
  assert per_device < total / 2
