"""The AR generator trainer, the generate CLI and the generation evaluation, end to end (tiny).

A tiny tokenizer workdir (random weights, conftest.py) encodes a few built-in
clips into a token folder; each task then trains a tiny generator for a few
steps through `avtok_jax.main`'s code path and generates decodable clips.
"""

import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest

from avtok_jax import ar_tasks, config_lib, generate, train_ar
from avtok_jax.data import video_io
from avtok_jax.evaluation import generation

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(task, tokens_dir, **overrides):
  config = config_lib.load_config_file(f"{ROOT}/configs/ar_{task}.py:tiny")
  config.tokens_dir = str(tokens_dir)
  config.eval_batches = 1
  config.num_sample_clips = 1
  config.sample_every = config.total_steps  # one sample folder per run
  for k, v in overrides.items():
    config[k] = v
  return config


def test_configs_build():
  for task in ar_tasks.TASKS:
    for size in ("tiny", "small", "L"):
      config = config_lib.load_config_file(f"{ROOT}/configs/ar_{task}.py:{size}")
      assert config.trainer == train_ar.TRAINER and config.task == task
  with pytest.raises(ValueError, match="tokens_dir is empty"):
    train_ar.run(_config("a2v", ""), "/tmp/never_written")


def test_config_errors(tiny_tokens, tmp_path):
  _, tokens_dir = tiny_tokens
  with pytest.raises(ValueError, match="token_dropout"):
    train_ar.run(_config("a2v", tokens_dir, token_dropout=1.5), tmp_path / "w")
  config = _config("a2v", tokens_dir)
  config.task = "t2v"
  with pytest.raises(ValueError, match="t2v"):
    train_ar.run(config, tmp_path / "w")
  with pytest.raises(FileNotFoundError, match="not a token folder"):
    train_ar.run(_config("a2v", tmp_path), tmp_path / "w")


@pytest.mark.parametrize("task", ar_tasks.TASKS)
def test_train_and_generate(task, tiny_tokens, tmp_path):
  tokenizer_dir, tokens_dir = tiny_tokens
  workdir = tmp_path / f"ar_{task}"
  metrics = train_ar.run(_config(task, tokens_dir), workdir)
  assert np.isfinite(metrics["loss"]) and "eval/loss" in metrics
  assert (workdir / config_lib.RUN_CONFIG_FILE).is_file()
  samples = sorted((workdir / "samples").glob("step_*/clip0_generated.mp4"))
  assert samples, "no generated sample clips were written"
  info = video_io.probe(str(samples[-1]))
  assert info.has_audio

  # The CLI path: one conditioning file (a2v / v2a) or a class name (joint).
  out = tmp_path / "generated"
  meta = json.loads((tokens_dir / "tokens.json").read_text())
  if task == "joint":
    kwargs = {"class_name": meta["class_names"][1]}
  else:
    clip = tmp_path / "input.mp4"
    _write_builtin_clip(tokenizer_dir, clip)
    kwargs = {"input_path": str(clip)}
  paths = generate.generate_files(str(workdir), str(out), num_samples=2, task_name=task, **kwargs)
  assert len(paths) == 2
  for p in paths:
    assert video_io.probe(p).has_audio
  codes = np.load(out / "codes.npz")
  assert codes["video_codes"].shape[0] == 2 and codes["audio_codes"].max() < meta["codebook_size"]
  if task != "v2a":
    return  # the checks below hold for every task; one is enough for the CPU budget
  # Same seed, same clips.
  again = tmp_path / "again"
  generate.generate_files(str(workdir), str(again), num_samples=2, **kwargs)
  for m in ("video_codes", "audio_codes"):
    np.testing.assert_array_equal(np.load(again / "codes.npz")[m], codes[m])


def test_generation_scores(tiny_tokens, tmp_path):
  """Scoring a (joint: both modalities generated) generator on held-out built-in clips."""
  _, tokens_dir = tiny_tokens
  workdir = tmp_path / "ar_joint"
  train_ar.run(_config("joint", tokens_dir, num_sample_clips=0), workdir)
  scores = generation.evaluate_generation(
    str(workdir), num_clips=4, batch_size=4, out_dir=str(tmp_path / "eval"), num_sample_clips=1
  )
  assert scores["num_clips"] == 4
  for m in ("video", "audio"):
    assert 0.0 <= scores[f"generated/class_accuracy_{m}"] <= 1.0
    assert np.isfinite(scores[f"generated/fd_{m}"])
  assert scores["real/class_accuracy_video"] >= 0.0
  assert 0.0 <= scores["generated/token_probe_accuracy"] <= 1.0
  assert (tmp_path / "eval" / "report.md").read_text().count("|") > 10


def test_resume_continues_exactly(tiny_tokens, tmp_path):
  """Killed after step 2 and restarted == one uninterrupted run (params, losses, data order)."""
  _, tokens_dir = tiny_tokens
  kw = dict(total_steps=4, num_sample_clips=0, checkpoint_every=2)
  straight = train_ar.run(_config("v2a", tokens_dir, **kw), tmp_path / "straight")
  workdir = tmp_path / "resumed"
  train_ar.run(_config("v2a", tokens_dir, **kw), workdir)
  # As if killed after the step-2 checkpoint: drop everything newer.
  for step_dir in (workdir / "checkpoints").iterdir():
    if step_dir.name.isdigit() and int(step_dir.name) > 2:
      shutil.rmtree(step_dir)
  resumed = train_ar.run(_config("v2a", tokens_dir, **kw), workdir)
  assert resumed["loss"] == straight["loss"]
  assert resumed["eval/loss"] == straight["eval/loss"]
  _, _, p1, s1 = generation.load_generator(str(tmp_path / "straight"))
  _, _, p2, s2 = generation.load_generator(str(workdir))
  assert s1 == s2 == 4
  jax.tree.map(np.testing.assert_array_equal, p1, p2)


def _write_builtin_clip(tokenizer_dir, path):
  from avtok_jax.data import synthetic
  from avtok_jax.data.tfds import synthetic_av

  config = config_lib.load_config(os.path.join(tokenizer_dir, config_lib.RUN_CONFIG_FILE))
  c = config.data
  clip = synthetic.generate(synthetic_av.generator_spec(c), synthetic_av.split_seed(c, "test"), 0)
  video_io.write_mp4(
    str(path),
    clip["video"],
    clip["audio"].astype(np.float32) / 32768.0,
    config_lib.fps(c),
    c.sample_rate,
  )
