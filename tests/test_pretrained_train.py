"""The trainer switches to converted pretrained networks by config alone (tiny preset, end to end).

No public weights can be downloaded here: each network is a random state dict
with the public key names and shapes (from the ports' own shape tables),
written with `torch.save` as the public `.pth` files are, converted with
`avtok_jax.pretrained.convert.convert` (the CLI's function) and named in the
config:

* `lpips.weights`: the perceptual term appears in the logged metrics and in
  the total; without weights it is absent (skipped with a warning);
* `alignment.teacher='cav_mae'` + `alignment.cav_mae_weights`: a small
  CAV-MAE (width 48, frames resized 32 -> 64, our 32-band mel mapped onto its
  128-bin fbank) is the L_rep teacher of stage 1 and of vanilla (both
  streams); the projectors end in the teacher's width, not
  `config.alignment.feature_dim`;
* `vocoder.weights` + `vocoder.mel='data'`: the samples' sound is the HiFi-GAN's.

Every run goes through `train.run` for 2 steps, with the GAN and the held-out
check off (they compile programs that do not touch these networks).
"""

from __future__ import annotations

import json
import logging
import math
import pathlib

import numpy as np
import pytest
import torch
from test_train import load_config

from avtok_jax import config_lib, losses, reporting, train
from avtok_jax.data import audio as audio_lib
from avtok_jax.data import patches as patches_lib
from avtok_jax.data import pipeline, video_io
from avtok_jax.pretrained import cav_mae, configured, convert, hifigan, lpips

STEPS = 2
TINY_DATA = config_lib.data_config("tiny")
TINY_MEL = audio_lib.MelSpec.from_config(TINY_DATA)
# The tiny preset's mel (32 bands, hop 64 = 4 * 4 * 4) as HiFi-GAN's input.
VOCODER = hifigan.HiFiGANConfig(
  n_mels=TINY_MEL.n_mels,
  upsample_rates=(4, 4, 4),
  upsample_kernel_sizes=(8, 8, 8),
  upsample_initial_channel=16,
  resblock_kernel_sizes=(3,),
  resblock_dilation_sizes=((1, 3, 5),),
)
# A CAV-MAE whose every size follows from its shapes (`cav_mae.config_from_params`
# reads heads = width // 64 and 128 mel bins, as the released ViT-B has), so
# that the config's path alone rebuilds it: 48 wide (not the tiny preset's
# align_out_dim 32), frames 64 x 64 (the tiny preset's 32 x 32 are resized),
# audio 64 fbank frames x 128 bins.
CAV_MAE = cav_mae.CAVMAEConfig.small(
  16, width=48, num_heads=1, mlp_dim=96, num_mel_bins=128, audio_length=64, image_size=64
)


# ----------------------------------------------------------------------------- weights


def _random_state_dict(shapes, seed: int) -> dict[str, np.ndarray]:
  """He-scaled weights, LayerNorm scales around 1, small biases and embeddings."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in shapes.items():
    if key.endswith("weight_g"):  # HiFi-GAN's weight-norm gains
      value = rng.uniform(0.5, 1.5, shape)
    elif len(shape) >= 2 and not key.startswith(("pos_embed", "modality")):
      fan_in = math.prod(shape[1:])
      value = rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)
    elif "norm" in key and key.endswith("weight"):
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    else:
      value = 0.1 * rng.standard_normal(shape)
    out[key] = value.astype(np.float32)
  return out


def _torch_save(path: pathlib.Path, state_dict, wrap: str = "", prefix: str = "") -> pathlib.Path:
  tensors = {prefix + k: torch.from_numpy(v) for k, v in state_dict.items()}
  torch.save({wrap: tensors} if wrap else tensors, path)
  return path


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> dict[str, str]:
  """{'lpips', 'cav_mae', 'hifigan'}: converted folders of random torch checkpoints."""
  src = tmp_path_factory.mktemp("torch_checkpoints")
  dst = tmp_path_factory.mktemp("converted")
  # LPIPS: torchvision's VGG16 file + the lpips heads file (non-negative, as trained ones).
  sd = _random_state_dict(lpips.lpips_state_dict_shapes(), seed=0)
  heads = {k: np.abs(v) for k, v in sd.items() if k.startswith("lin")}
  vgg = {k: v for k, v in sd.items() if k.startswith("features.")}
  files = [_torch_save(src / "vgg16.pth", vgg), _torch_save(src / "lpips_vgg.pth", heads)]
  out = {"lpips": convert.convert("lpips", files, dst / "lpips")}
  # CAV-MAE: a DataParallel state dict (`module.` prefix), with a decoder key to ignore.
  specs = cav_mae.param_specs(CAV_MAE)
  sd = _random_state_dict({s.key: s.shape for s in specs}, seed=1)
  sd["decoder_embed.weight"] = np.zeros((16, CAV_MAE.width), np.float32)
  path = _torch_save(src / "cav_mae.pth", sd, prefix="module.")
  out["cav_mae"] = convert.convert("cav_mae", path, dst / "cav_mae")
  # HiFi-GAN: a weight-normalised generator under 'generator', as the public files.
  sd = _random_state_dict(hifigan.hifigan_state_dict_shapes(VOCODER), seed=2)
  path = _torch_save(src / "g_tiny.pth", sd, wrap="generator")
  out["hifigan"] = convert.convert("hifigan", path, dst / "hifigan")
  return {k: str(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- runs


def _config(name: str = "vfal_stage1", **networks):
  """The tiny preset of `configs/{name}.py` for STEPS steps, with `networks` ({dotted: value})."""
  config = load_config(name)
  config.total_steps = config.sample_every = config.checkpoint_every = STEPS
  config.gan.enabled = False
  config.eval_batches = 0
  for dotted, value in networks.items():
    group, key = dotted.split(".")
    config[group][key] = value
  return config


def _run(config, workdir):
  train.run(config, workdir)
  return reporting.read_metrics(workdir)


@pytest.fixture(scope="module")
def lpips_run(nets, tmp_path_factory):
  """Stage 1 with LPIPS and the CAV-MAE teacher."""
  workdir = tmp_path_factory.mktemp("stage1_lpips")
  config = _config(
    **{
      "alignment.teacher": "cav_mae",
      "alignment.cav_mae_weights": nets["cav_mae"],
      "lpips.weights": nets["lpips"],
    }
  )
  return config, workdir, _run(config, workdir)


@pytest.fixture(scope="module")
def vanilla_run(nets, tmp_path_factory):
  """Vanilla (both streams) without LPIPS, with the CAV-MAE teacher and the HiFi-GAN vocoder."""
  workdir = tmp_path_factory.mktemp("vanilla")
  config = _config(
    "vanilla",
    **{
      "alignment.teacher": "cav_mae",
      "alignment.cav_mae_weights": nets["cav_mae"],
      "vocoder.weights": nets["hifigan"],
      "vocoder.mel": "data",
    },
  )
  mp = pytest.MonkeyPatch()
  mp.setattr(losses, "_warned_no_perceptual", False)  # warn in this run, whatever ran before
  records = []
  handler = logging.Handler(logging.WARNING)
  handler.emit = records.append
  logger = logging.getLogger("absl")
  logger.addHandler(handler)
  try:
    metrics = _run(config, workdir)
  finally:
    logger.removeHandler(handler)
    mp.undo()
  return config, workdir, metrics, [r.getMessage() for r in records]


# ----------------------------------------------------------------------------- (a) LPIPS


def test_lpips_weights_add_the_perceptual_term_to_the_loss(lpips_run):
  config, workdir, metrics = lpips_run
  assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
  weights = dict(config.loss_weights)
  for m in metrics:
    assert np.isfinite(m["perceptual"]) and m["perceptual"] > 0, m
    # The total is the weighted sum of the logged terms, LPIPS included.
    terms = {k: m[k] for k in weights if k in m}
    assert set(terms) == {"video_l1", "video_l2", "vq", "prior", "alignment", "perceptual"}
    others = sum(weights[k] * v for k, v in terms.items() if k != "perceptual")
    assert m["loss"] - others == pytest.approx(weights["perceptual"] * m["perceptual"], rel=1e-4)
    assert weights["perceptual"] * m["perceptual"] > 0.05 * abs(m["loss"])  # a real share
  # The run's config names the weights, so evaluation finds the same network.
  saved = json.loads((workdir / config_lib.RUN_CONFIG_FILE).read_text())
  assert saved["lpips"]["weights"] == config.lpips.weights


def test_without_lpips_weights_the_perceptual_term_is_skipped_with_a_warning(vanilla_run):
  config, _, metrics, warnings = vanilla_run
  assert config.loss_weights.perceptual > 0 and not config.lpips.weights
  assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
  assert all("perceptual" not in m and np.isfinite(m["loss"]) for m in metrics)
  assert any("perceptual" in w and "skipped" in w for w in warnings), warnings


# ----------------------------------------------------------------------------- (b) CAV-MAE


def _projectors(workdir) -> dict[str, np.ndarray]:
  """The projectors' last layers in the run's last checkpoint, read at the teacher's width.

  `restore_params_partial` raises on a shape mismatch, so this only returns
  when the stored output width is CAV_MAE.width.
  """
  hidden = config_lib.model_config("tiny").align_hidden_dim
  target = {
    f"{m}_projector": {
      "fc3": {
        "kernel": np.zeros((hidden, CAV_MAE.width), np.float32),
        "bias": np.zeros((CAV_MAE.width,), np.float32),
      }
    }
    for m in ("video", "audio")
  }
  params, restored, fresh = train.checkpointing.restore_params_partial(
    workdir / "checkpoints", target
  )
  assert not fresh and len(restored) == 4, (restored, fresh)
  return {m: np.asarray(params[f"{m}_projector"]["fc3"]["kernel"]) for m in ("video", "audio")}


@pytest.mark.parametrize("run", ["lpips_run", "vanilla_run"])
def test_cav_mae_teacher_aligns_at_its_own_width(run, request):
  config, workdir, metrics, *_ = request.getfixturevalue(run)
  assert config.alignment.feature_dim != CAV_MAE.width  # the teacher's width must win
  streams = set(config.modalities)
  assert streams == ({"video", "audio"} if run == "vanilla_run" else {"video"})
  for m in metrics:
    assert np.isfinite(m["alignment"]) and -1.0 <= m["alignment"] <= 1.0, m
  # The config's path alone rebuilds the converted network, every size included.
  teacher = configured.build_teacher(config)
  assert isinstance(teacher, cav_mae.CAVMAETeacher) and teacher.config == CAV_MAE
  kernels = _projectors(workdir)
  assert all(np.all(np.isfinite(k)) and np.any(k != 0) for k in kernels.values())


# ----------------------------------------------------------------------------- (c) vocoder


def _sample_mels(config, n: int) -> np.ndarray:
  """The normalised mels [n, F, L] of the clips the samples show: the first eval batch."""
  it = pipeline.make_iterator(config.data, config.data.eval_split, train=False, seed=config.seed)
  batch = next(it)
  mel_shape = (config.data.mel.n_mels, config_lib.num_mel_frames(config.data))
  patches = np.asarray(batch["mel_patches"][:n], np.float32)
  return np.asarray(
    patches_lib.unpatchify_mel(patches, mel_shape, tuple(config.data.mel_patch)), np.float32
  )


def _rms(x: np.ndarray) -> float:
  return float(np.sqrt(np.mean(np.square(x))))


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
  a, b = a - a.mean(), b - b.mean()
  return float(a @ b / np.sqrt((a @ a) * (b @ b) + 1e-20))


def test_samples_sound_is_the_configured_vocoder(vanilla_run):
  """The input clips' sound is the HiFi-GAN's output for their mel, not Griffin-Lim's.

  AAC is lossy, so the decoded track is compared loosely: correlation and
  level against the vocoder called directly on the same mel, and
  (un)correlation against Griffin-Lim of that mel.
  """
  config, workdir, _, _ = vanilla_run
  vocoder = configured.load_vocoder(config)
  assert isinstance(vocoder, hifigan.Vocoder) and vocoder.sample_rate == config.data.sample_rate
  folder = workdir / "samples" / f"step_{STEPS:07d}"
  clips = sorted(folder.glob("clip*_input.mp4"))
  assert len(clips) == config.num_sample_clips
  mels = _sample_mels(config, len(clips))  # the batch the samples were written from
  d = config.data

  def decoded(path):
    media = video_io.load_media(
      path, fps=config_lib.fps(d), height=d.height, width=d.width, sample_rate=d.sample_rate
    )
    assert media.has_audio, path
    return media.audio

  for i, path in enumerate(clips):
    want = np.clip(vocoder(mels[i]), -1.0, 1.0)
    got = decoded(path)[: want.shape[0]]
    griffin_lim = audio_lib.mel_to_wave(audio_lib.denormalize(mels[i], TINY_MEL), TINY_MEL)
    corr, corr_gl = _correlation(got, want), _correlation(got, griffin_lim[: want.shape[0]])
    assert corr > 0.9 and abs(corr_gl) < 0.3, (corr, corr_gl)
    assert _rms(got) == pytest.approx(_rms(want), rel=0.2)
    assert abs(_rms(want) - _rms(griffin_lim)) > 0.2 * _rms(want)  # the two are told apart
  # Vanilla reconstructs the mel too: its clips sound (through the same vocoder).
  for path in sorted(folder.glob("clip*_recon.mp4")):
    assert _rms(decoded(path)) > 0


# ----------------------------------------------------------------------------- (d) config errors


@pytest.mark.parametrize(
  "networks,field",
  [
    ({"alignment.teacher": "cav_mae"}, "alignment.cav_mae_weights"),
    ({"alignment.teacher": "dino"}, "alignment.teacher='dino'"),
    ({"vocoder.mel": "bigvgan"}, "vocoder.mel='bigvgan'"),
  ],
)
def test_bad_network_configs_give_one_line_errors(networks, field):
  config = _config(**networks)
  with pytest.raises(ValueError, match=field) as info:
    config_lib.check_train_config(config)
  assert "\n" not in str(info.value)


def test_missing_cav_mae_weights_are_named_before_training(tmp_path):
  missing = str(tmp_path / "no_such_cav_mae")
  config = _config(**{"alignment.teacher": "cav_mae", "alignment.cav_mae_weights": missing})
  with pytest.raises(ValueError, match="alignment.cav_mae_weights") as info:
    train.run(config, tmp_path / "run")
  message = str(info.value)
  assert missing in message and "does not exist" in message and "\n" not in message
  assert not (tmp_path / "run" / "checkpoints").exists()
  # The loader (used by evaluation and the planner too) names field and path as well.
  with pytest.raises(ValueError, match="config.alignment.cav_mae_weights=") as info:
    configured.build_teacher(config)
  assert missing in str(info.value)
