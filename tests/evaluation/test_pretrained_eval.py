"""Evaluation and generation switch pretrained networks by the run's config alone.

A copy of the session's tiny tokenizer workdir (tests/conftest.py) gets a
config.json naming converted random networks, each written in its public
PyTorch layout (`torch.save`) and converted with `pretrained.convert.convert`:
LPIPS (`lpips.weights`), a piergiaj-layout I3D (`fvd.i3d_weights`), VGGish
(`fad.vggish_weights`) and a small HiFi-GAN on the tiny preset's mel (32
bands, hop 64; `vocoder.weights`, `vocoder.mel='data'`). One evaluation, no
flag, must use every one of them.

The I3D forward costs seconds per clip on a CPU (frames resized to 224), so
its feature function is replaced by a cheap one that reads the loaded
variables; the test checks that those are the converted ones and that rFVD
is the Frechet distance of its features. Tiny clips (0.512 s) are too short
for VGGish: the end-to-end run reports "not computable", and the FAD path is
run directly on longer clips.
"""

import json
import pathlib
import shutil
import sys

import jax
import numpy as np
import pytest
import torch

from avtok_jax import config_lib
from avtok_jax import tokenize as tokenize_lib
from avtok_jax.data import audio as audio_lib
from avtok_jax.data import patches as patches_lib
from avtok_jax.evaluation import evaluate, generation
from avtok_jax.evaluation import metrics as metrics_lib
from avtok_jax.pretrained import configured, convert, hifigan, i3d, vggish

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "pretrained"))
import torch_refs  # noqa: E402  (tests/pretrained/torch_refs.py)

NUM_CLIPS = 3
# The tiny preset's mel: 32 bands, hop 64 = 4 * 4 * 4.
SMALL_HIFIGAN = hifigan.HiFiGANConfig(
  n_mels=32,
  upsample_rates=(4, 4, 4),
  upsample_kernel_sizes=(8, 8, 8),
  upsample_initial_channel=16,
  resblock_kernel_sizes=(3,),
  resblock_dilation_sizes=((1, 3, 5),),
)


def _convert(net: str, state_dict, folder: pathlib.Path) -> str:
  """torch.save(state_dict) -> `convert.convert(net, ...)`; returns the converted folder."""
  folder.mkdir(parents=True, exist_ok=True)
  src = folder / f"{net}.pth"
  torch.save({k: torch.as_tensor(np.asarray(v)) for k, v in state_dict.items()}, src)
  return str(convert.convert(net, src, folder / "converted"))


def _hifigan_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  """Random weight-normalised generator weights (g away from ||v||, so folding matters)."""
  rng = np.random.default_rng(seed)
  sd = {}
  for key, shape in hifigan.hifigan_state_dict_shapes(SMALL_HIFIGAN).items():
    if key.endswith("weight_g"):
      sd[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:
      sd[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
  return sd


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
  """{name: converted folder} of random LPIPS, I3D, VGGish and HiFi-GAN weights."""
  tmp = tmp_path_factory.mktemp("converted")
  torch.manual_seed(0)
  i3d_sd = {k: v.numpy() for k, v in torch_refs.TorchI3D(400).state_dict().items()}
  vggish_sd = {k: v.numpy() for k, v in torch_refs.TorchVGGish().state_dict().items()}
  return {
    "lpips": _convert("lpips", torch_refs.lpips_state_dict(0), tmp / "lpips"),
    "i3d": _convert("i3d", i3d_sd, tmp / "i3d"),
    "vggish": _convert("vggish", vggish_sd, tmp / "vggish"),
    "hifigan": _convert("hifigan", _hifigan_state_dict(), tmp / "hifigan"),
  }


@pytest.fixture(scope="module")
def run_dir(tiny_tokenizer_dir, nets, tmp_path_factory):
  """A copy of the tiny tokenizer run whose config.json names every converted network."""
  workdir = tmp_path_factory.mktemp("configured_run") / "run"
  shutil.copytree(tiny_tokenizer_dir, workdir)
  config = config_lib.load_config(workdir / config_lib.RUN_CONFIG_FILE)
  config.lpips.weights = nets["lpips"]
  config.fvd.i3d_weights = nets["i3d"]
  config.fad.vggish_weights = nets["vggish"]
  config.vocoder.weights = nets["hifigan"]
  config.vocoder.mel = "data"
  config_lib.save_config(config, workdir / config_lib.RUN_CONFIG_FILE)
  return workdir


def _cheap_i3d_features(variables, videos):
  """Stands in for the I3D forward: mean colour [N, 3] times 3 x 400 numbers of the variables."""
  flat = np.concatenate([np.ravel(x)[:64] for x in jax.tree.leaves(jax.device_get(variables))])
  return np.asarray(videos, np.float32).mean(axis=(1, 2, 3)) @ flat[: 3 * 400].reshape(3, 400)


@pytest.fixture(scope="module")
def evaluated(run_dir):
  """One evaluation without any weight flag; records what the networks were called with."""
  seen = {"i3d_variables": [], "i3d_features": [], "wave_makers": 0, "wave_fn": None}
  mp = pytest.MonkeyPatch()

  def features(variables, videos):
    seen["i3d_variables"].append(variables)
    return _cheap_i3d_features(variables, videos)

  real_wave_maker = configured.wave_maker

  def counting_wave_maker(config):
    seen["wave_makers"] += 1
    return real_wave_maker(config)

  real_write = evaluate.reporting.write_sample_folder

  def write_sample_folder(folder, **kwargs):
    seen["wave_fn"] = kwargs.get("wave_fn")
    return real_write(folder, **kwargs)

  real_call = i3d.I3DFeatures.__call__

  def call(self, videos):
    out = real_call(self, videos)
    seen["i3d_features"].append(out)
    return out

  mp.setattr(i3d, "_features", features)
  mp.setattr(i3d.I3DFeatures, "__call__", call)
  mp.setattr(configured, "wave_maker", counting_wave_maker)
  mp.setattr(evaluate.reporting, "write_sample_folder", write_sample_folder)
  try:
    options = evaluate.Options(num_clips=NUM_CLIPS, batch_size=NUM_CLIPS, num_sample_clips=1)
    metrics = evaluate.run(str(run_dir), options)
  finally:
    mp.undo()
  return metrics, pathlib.Path(run_dir, "eval", "2"), seen


def _eval_clips(run_dir):
  """(original waves [N, S], input mels [N, F, L]) of the clips `evaluated` scores."""
  config = evaluate.load_run_config(str(run_dir))
  data_config, split, _ = evaluate.eval_data(config, "synthetic", NUM_CLIPS, "")
  data_config.batch_size = NUM_CLIPS
  batch = next(evaluate._batches(data_config, split, NUM_CLIPS, config.get("seed", 0)))
  mask = batch["mask"]
  mel_shape = (data_config.mel.n_mels, config_lib.num_mel_frames(data_config))
  mel = patches_lib.unpatchify_mel(
    np.asarray(batch["mel_patches"]), mel_shape, data_config.mel_patch
  )
  return np.asarray(batch["audio"], np.float32)[mask], mel[mask]


def test_lpips_from_config(evaluated, nets):
  metrics, out, _ = evaluated
  assert isinstance(metrics["lpips"], float) and metrics["lpips"] > 0.0
  assert metrics["lpips_weights"] == nets["lpips"]
  assert f"lpips `{nets['lpips']}`" in (out / "report.md").read_text()


def test_i3d_from_config(evaluated, run_dir, nets):
  metrics, _, seen = evaluated
  assert metrics["i3d_weights"] == nets["i3d"]
  # The variables the features were computed with are the converted folder's.
  want = i3d.load_i3d_params(nets["i3d"])
  assert seen["i3d_variables"]
  for got in seen["i3d_variables"]:
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), want)
  # rFVD is the Frechet distance of those features: one batch, inputs then reconstructions.
  assert len(seen["i3d_features"]) == 2
  real, recon = seen["i3d_features"]
  assert real.shape == recon.shape == (NUM_CLIPS, 400)
  assert isinstance(metrics["rfvd"], float)
  want_fd = metrics_lib.frechet_distance_from_features(real, recon)
  assert metrics["rfvd"] == pytest.approx(float(want_fd), rel=1e-6)
  # The flag still overrides the config (here with a folder that does not exist).
  config = evaluate.load_run_config(str(run_dir))
  with pytest.raises(FileNotFoundError, match="no_such_i3d"):
    evaluate._pretrained(evaluate.Options(i3d_weights="/no_such_i3d"), config, ("video",))


def test_vocoder_from_config(evaluated, run_dir, nets):
  metrics, out, seen = evaluated
  assert metrics["vocoder"] == f"hifigan: {nets['hifigan']}"
  assert f"- vocoder: hifigan: {nets['hifigan']}" in (out / "report.md").read_text()
  assert seen["wave_makers"] == 1  # built once per run, not per clip
  config = evaluate.load_run_config(str(run_dir))
  spec = audio_lib.MelSpec.from_config(config.data)
  vocoder = hifigan.load_vocoder(nets["hifigan"], mel_spec=spec, vocoder_mel=spec)
  real, mel_in = _eval_clips(run_dir)
  # The vocoder ceiling vocodes the INPUT mel with the same vocoder.
  by_vocoder = vocoder(mel_in)
  assert by_vocoder.shape == real.shape
  want = metrics_lib.si_sdr(real, by_vocoder).mean()
  assert metrics["vocoder_ceiling_si_sdr"] == pytest.approx(float(want), rel=1e-4, abs=1e-4)
  griffin_lim = np.stack([tokenize_lib.vocode(m, spec) for m in mel_in])
  assert float(metrics_lib.si_sdr(real, griffin_lim).mean()) != pytest.approx(float(want), abs=1e-2)
  # The mp4 files are vocoded by it too.
  np.testing.assert_allclose(seen["wave_fn"](mel_in[0]), by_vocoder[0], rtol=1e-5, atol=1e-6)
  assert (out / "clips" / "clip0_recon.mp4").is_file()


def test_vggish_from_config_too_short(evaluated, nets):
  metrics, _, _ = evaluated
  # Read from config.fad.vggish_weights (without it: "not configured").
  assert metrics["rfad"].startswith("not computable: clips of 0.512 s")
  saved = json.loads((evaluated[1] / "metrics.json").read_text())
  assert saved["vocoder"] == metrics["vocoder"]


def test_vggish_from_config_computes_rfad(run_dir, nets):
  """On clips long enough (2 s at 8 kHz), the config's VGGish gives a real rFAD."""
  config = evaluate.load_run_config(str(run_dir))
  config.data.num_samples = 2 * int(config.data.sample_rate)
  found = evaluate._pretrained(evaluate.Options(rfvd=False), config, ("audio",))
  assert isinstance(found["vggish"], vggish.VGGish)
  assert found["weights"]["vggish_weights"] == nets["vggish"]
  rng = np.random.default_rng(0)
  sr = int(config.data.sample_rate)
  real = (0.3 * rng.standard_normal((3, config.data.num_samples))).astype(np.float32)
  fake = (real + 0.2 * rng.standard_normal(real.shape)).astype(np.float32)
  features = evaluate._FeatureSets()
  evaluate._add_vggish_features(features, found["vggish"], real, fake, sr)
  value = evaluate.rfad(features)
  direct = vggish.load_vggish(nets["vggish"])
  a = direct.embed(real, sr).reshape(-1, 128)
  b = direct.embed(fake, sr).reshape(-1, 128)
  assert len(a) >= 3  # several 0.96 s examples per clip
  assert value == pytest.approx(float(metrics_lib.frechet_distance_from_features(a, b)), rel=1e-4)
  assert value > 0.0


def test_tokenize_decode_and_codec_use_the_tokenizer_vocoder(run_dir, nets, tmp_path, monkeypatch):
  tok = tokenize_lib.load_tokenizer(run_dir)
  assert tok.vocoder == f"hifigan: {nets['hifigan']}"
  rng = np.random.default_rng(0)
  codes = {
    "video_codes": rng.integers(0, tok.codebook_size, tok.num_video_tokens, dtype=np.int32),
    "audio_codes": rng.integers(0, tok.codebook_size, tok.num_audio_tokens, dtype=np.int32),
  }
  codes_file = tmp_path / "codes.npz"
  tokenize_lib.save_codes(codes_file, codes, tok)
  written = {}
  real_write = tokenize_lib.write_clip

  def write_clip(path, video, audio, data_config):
    written["wave"] = np.asarray(audio)
    return real_write(path, video, audio, data_config)

  monkeypatch.setattr(tokenize_lib, "write_clip", write_clip)
  out = tmp_path / "decoded.mp4"
  tokenize_lib.main(
    ["tokenize", "decode", f"--workdir={run_dir}", f"--codes={codes_file}", f"--output={out}"]
  )
  assert out.is_file()
  mel = np.asarray(
    tok.decode_fn(
      tok.variables,
      {"video": codes["video_codes"][None], "audio": codes["audio_codes"][None]},
    )["audio"]
  )[0]
  spec = tok.mel_spec
  vocoder = hifigan.load_vocoder(nets["hifigan"], mel_spec=spec, vocoder_mel=spec)
  want = vocoder(mel)
  np.testing.assert_allclose(written["wave"], want, rtol=1e-4, atol=1e-5)
  assert not np.allclose(written["wave"], tokenize_lib.vocode(mel, spec), atol=1e-3)
  # generate.py / train_ar.py vocode through the Codec: the same vocoder, batched.
  codec = generation.Codec(str(run_dir))
  assert codec.vocoder == tok.vocoder
  np.testing.assert_allclose(codec.vocode(mel[None])[0], want, rtol=1e-4, atol=1e-5)


def test_older_config_without_the_keys_uses_griffin_lim(tiny_tokenizer_dir, tmp_path):
  """A config.json from before the keys: Griffin-Lim, the shipped I3D, nothing else."""
  old = tmp_path / "old"
  shutil.copytree(tiny_tokenizer_dir, old)
  path = old / config_lib.RUN_CONFIG_FILE
  raw = json.loads(path.read_text())
  for key in ("lpips", "fvd", "fad", "vocoder"):
    raw.pop(key, None)
  path.write_text(json.dumps(raw))
  config = evaluate.load_run_config(str(old))
  assert configured.vocoder_name(config) == "griffin_lim"
  found = evaluate._pretrained(evaluate.Options(rfvd=False), config, ("video", "audio"))
  assert found["lpips"] == "not configured" and found["vggish"] == "not configured"
  tok = tokenize_lib.load_tokenizer(old)
  mel = np.zeros((32, 64), np.float32)
  np.testing.assert_allclose(tok.vocode(mel), tokenize_lib.vocode(mel, tok.mel_spec))
