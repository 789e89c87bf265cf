"""The VFAL trainer end to end on the tiny preset.

One uninterrupted stage-1 run (a module fixture) is the reference for the
stage chain, the kill-and-resume test and the multi-device test, so that the
number of compiled train steps stays small.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from avtok_jax import checkpointing, optimizer, reporting, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 4


def load_config(name: str, arg: str = "tiny", **overrides):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.total_steps = STEPS
  config.log_every = 1
  config.checkpoint_every = 2
  config.sample_every = STEPS
  for key, value in overrides.items():
    config[key] = value
  return config


def load_params(config, workdir):
  """The params of the latest checkpoint in `workdir`, as host numpy arrays."""
  models = train.Models(config)
  fresh = nn.unbox(models.init(jax.random.key(0)))["params"]
  params, restored, _ = checkpointing.restore_params_partial(
    os.path.join(workdir, "checkpoints"), fresh
  )
  assert restored
  return jax.tree.map(np.asarray, params)


def flat(tree):
  return {
    jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
  }


def losses_by_step(workdir):
  return {m["step"]: m for m in reporting.read_metrics(workdir)}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("stage1")
  config = load_config("vfal_stage1")
  metrics = train.run(config, workdir)
  return config, workdir, metrics


def test_stage1_trains_and_writes_everything(stage1):
  config, workdir, metrics = stage1
  assert np.isfinite(metrics["loss"])
  logged = reporting.read_metrics(workdir)
  assert [m["step"] for m in logged] == list(range(1, STEPS + 1))
  assert {"video_l1", "vq", "prior", "alignment", "gan", "codebook_usage", "grad_norm"} <= set(
    logged[-1]
  )
  assert "audio_l1" not in logged[-1]  # stage 1 runs video only
  # tiny restarts unused codebook entries every 2 steps: 32 tokens a batch
  # cannot use all 64 entries, so step 2 moves some and step 1 none.
  assert logged[0]["dead_codes_restarted"] == 0 and logged[1]["dead_codes_restarted"] > 0
  # The held-out check rides on the last step's record: video only in stage 1.
  assert logged[-1]["eval/clips"] == config.eval_batches * config.data.batch_size
  assert 5.0 < logged[-1]["eval/video_psnr"] < 60.0 and "eval/mel_l1" not in logged[-1]
  assert metrics["eval/video_psnr"] == logged[-1]["eval/video_psnr"]
  scalars = reporting.read_tensorboard_scalars(workdir)
  assert len(scalars["loss"]) == STEPS
  samples = pathlib.Path(workdir, "samples", f"step_{STEPS:07d}")
  assert (samples / "video.png").exists() and len(list(samples.glob("*.mp4"))) == 4
  assert checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [2, 4]
  # The frozen audio modules kept their checksum (the trainer raises otherwise).
  assert len({m["frozen_checksum"] for m in logged}) == 1
  # Compile counter (reporting.compile_count): every program of the loop is
  # compiled by the end of step 1 (train step, checksum) or at the first
  # checkpoint; from step 2 on nothing recompiles (a train step that
  # retraced on a changed dtype, sharding or Python value would add one).
  compiles = [m["compiles"] for m in logged]
  assert compiles[0] >= 2, compiles
  assert compiles[1:] == [compiles[1]] * (STEPS - 1), compiles


def test_held_out_scores_are_per_clip_means_without_padding():
  """Known errors in, known scores out; padded clips of the last batch do not count."""
  config = load_config("vfal_stage2", init_from="unused")
  config.data.num_eval_examples = 6  # batches of 4: 4 + (2 real, 2 padding)
  config.eval_batches = 5  # more than there are: stops at the end of the split
  seen = []

  def fake_eval_fn(params, codebook_stats, batch):
    n = batch["video_patches"].shape[0]
    seen.append(n)
    video, mel = np.zeros((n, 4, 8, 8, 3)), np.zeros((n, 16, 32))
    # Clip i's video error is 0.1 * (i + 1); the mel error is 0.2 everywhere.
    err = 0.1 * (np.arange(n) + 1.0)[:, None, None, None, None]
    return {"video": (video, video + err), "audio": (mel, mel + 0.2)}

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  scores = train.evaluate_held_out(
    config, fake_eval_fn, {"params": {}, "codebook_stats": {}}, sharding
  )
  assert seen == [4, 4]
  errors = [0.1, 0.2, 0.3, 0.4, 0.1, 0.2]  # real clips only
  assert scores["eval/clips"] == 6
  np.testing.assert_allclose(scores["eval/video_l1"], np.mean(errors))
  np.testing.assert_allclose(
    scores["eval/video_psnr"], np.mean([10 * np.log10(4 / e**2) for e in errors])
  )
  np.testing.assert_allclose(scores["eval/mel_l1"], 0.2)


@pytest.mark.slow
def test_stage_chain_with_init_from_and_frozen_params_bit_identical(stage1, tmp_path):
  config1, workdir1, _ = stage1
  p1 = flat(load_params(config1, workdir1))

  config2 = load_config("vfal_stage2", init_from=str(workdir1))
  workdir2 = tmp_path / "stage2"
  metrics2 = train.run(config2, workdir2)
  assert np.isfinite(metrics2["loss"]) and "audio_l1" in metrics2
  p2 = flat(load_params(config2, workdir2))
  trainable2 = flat(optimizer.trainable_mask(load_params(config2, workdir2), config2.param_rules))
  changed = {k for k in p1 if not np.array_equal(p1[k], p2[k])}
  for key, train_it in trainable2.items():
    if not train_it:
      assert key not in changed, f"frozen {key} changed in stage 2"
  assert any("audio_" in k for k in changed), "stage 2 did not train the audio modules"
  assert any("prior" in k for k in changed)
  # The shared stacks' audio LayerNorms (encoder/block_i/audio_norm*) are audio modules.
  assert not any(("encoder" in k or "video_" in k) and "audio_" not in k for k in changed)

  config3 = load_config("vfal_stage3", init_from=str(workdir2))
  workdir3 = tmp_path / "stage3"
  metrics3 = train.run(config3, workdir3)
  assert np.isfinite(metrics3["loss"]) and {"video_l1", "audio_l1", "gan"} <= set(metrics3)
  p3 = flat(load_params(config3, workdir3))
  changed3 = {k for k in p2 if not np.array_equal(p2[k], p3[k])}
  assert any("decoder" in k for k in changed3)
  assert not any("encoder" in k or "quantizer" in k or "prior" in k for k in changed3)
  assert pathlib.Path(workdir3, "samples", f"step_{STEPS:07d}", "mel.png").exists()


@pytest.mark.slow
def test_kill_and_resume_continues_exactly(stage1, tmp_path, monkeypatch):
  config, reference_dir, _ = stage1
  workdir = tmp_path / "interrupted"

  class FakePreemption:
    """SIGTERM arrives during step 1 (not a checkpoint step): the first poll says stop."""

    polls = 0

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return False

    def should_stop(self, *, sync):
      del sync
      self.polls += 1
      return self.polls == 1

  monkeypatch.setattr(train.checkpointing, "PreemptionHandler", FakePreemption)
  train.run(config, workdir)
  assert checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == 1
  monkeypatch.undo()

  train.run(config, workdir)  # resumes at step 1
  reference = losses_by_step(reference_dir)
  resumed = losses_by_step(workdir)
  for step in range(1, STEPS + 1):
    assert resumed[step]["loss"] == reference[step]["loss"], step
  a, b = flat(load_params(config, reference_dir)), flat(load_params(config, workdir))
  assert all(np.array_equal(a[k], b[k]) for k in a)


MULTI_DEVICE_SCRIPT = r"""
import json, sys
import jax
from tests.test_train import load_config
from avtok_jax import reporting, train
assert jax.device_count() == 8, jax.devices()
out = {}
for name, mesh in [("data4_model2", dict(data=4, fsdp=1, model=2)),
                   ("data2_fsdp2_model2", dict(data=2, fsdp=2, model=2))]:
  config = load_config("vfal_stage1", sample_every=1000, checkpoint_every=1000)
  config.mesh.update(mesh)
  workdir = sys.argv[1] + "/" + name
  train.run(config, workdir)
  out[name] = {m["step"]: m["loss"] for m in reporting.read_metrics(workdir)}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_multi_device_meshes_match_one_device(stage1, tmp_path):
  _, reference_dir, _ = stage1
  env = dict(
    os.environ,
    XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
    PYTHONPATH=str(ROOT),
  )
  proc = subprocess.run(
    [sys.executable, "-c", MULTI_DEVICE_SCRIPT, str(tmp_path)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  result = json.loads(proc.stdout.split("RESULT ", 1)[1])
  reference = losses_by_step(reference_dir)
  for name, per_step in result.items():
    for step in (1, 2, 3):
      assert per_step[str(step)] == pytest.approx(reference[step]["loss"], abs=1e-4, rel=1e-4), (
        name,
        step,
      )


@pytest.mark.parametrize(
  "edit,devices,field",
  [
    (lambda c: c.data.update(batch_size=6), 4, "config.data.batch_size"),
    (lambda c: c.model.update(codebook_size=63), 8, "codebook_size"),
    (lambda c: c.data.update(video_patch=(2, 8, 7)), 1, "video_patch"),
    (lambda c: c.update(modalities=("video", "smell")), 1, "modalities"),
    (lambda c: c.update(restart_dead_codes_every=-1), 1, "restart_dead_codes_every"),
  ],
)
def test_bad_configs_give_one_line_errors(edit, devices, field):
  config = load_config("vfal_stage1")
  edit(config)
  config.mesh.update(dict(data=-1, model=2 if field == "codebook_size" else 1))
  with pytest.raises(ValueError, match=field) as info:
    from avtok_jax import config_lib

    config_lib.check_train_config(config)
    train.check_config(config, num_devices=devices)
  assert "\n" not in str(info.value)


def test_unknown_preset_is_named():
  with pytest.raises(ValueError, match="huge"):
    load_config("vfal_stage1", arg="huge")


def test_restart_dead_codes_moves_only_unused_entries_onto_encoder_outputs():
  codebook = np.arange(12, dtype=np.float32).reshape(6, 2)
  params = {"quantizer": {"codebook": codebook}, "encoder": {"w": np.ones(3)}}
  counts_at_last = np.array([5.0, 0, 2, 0, 1, 0])
  counts = counts_at_last + np.array([3.0, 1, 0, 0, 2, 0])  # entries 2, 3, 5 unused since
  z = np.array([[10.0, 11.0], [20.0, 21.0]])
  rng = jax.random.key(0)

  new, snapshot, moved = train.restart_dead_codes(params, counts, counts_at_last, z, rng, True)
  cb = np.asarray(new["quantizer"]["codebook"])
  assert float(moved) == 3
  np.testing.assert_array_equal(cb[[0, 1, 4]], codebook[[0, 1, 4]])
  for row in cb[[2, 3, 5]]:
    assert any(np.array_equal(row, zi) for zi in z), row
  np.testing.assert_array_equal(snapshot, counts)
  assert new["encoder"] is params["encoder"]

  same, snapshot, moved = train.restart_dead_codes(params, counts, counts_at_last, z, rng, False)
  np.testing.assert_array_equal(same["quantizer"]["codebook"], codebook)
  np.testing.assert_array_equal(snapshot, counts_at_last)
  assert float(moved) == 0
