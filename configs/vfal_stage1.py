r"""VFAL stage 1, video first: the shared tokenizer learns from video alone.

AVTOK.md section 4. Trains the shared encoder and decoder, quant_in /
quantizer (the codebook) / quant_out, every video_* module, the AR prior
(lr x50 [LARP]) and the video alignment projector. The audio modules and the
audio projector exist in the tree but are frozen (and not run). Losses:
L^v_rec (L1 + L2, + LPIPS when `lpips.weights` is given), GAN on video,
L_vq, L_prior over the video codes, L_rep(video).

Launch (the CPU demo; stages 2 and 3 start from this run's workdir):

  python -m avtok_jax.main --config=configs/vfal_stage1.py:small --workdir=workdir/stage1
  python -m avtok_jax.main --config=configs/vfal_stage2.py:small --workdir=workdir/stage2 \
      --config.init_from=workdir/stage1
  python -m avtok_jax.main --config=configs/vfal_stage3.py:small --workdir=workdir/stage3 \
      --config.init_from=workdir/stage2

Argument: the size preset, `tiny`, `small` (default), `B` or `L`
(config_lib.model_config); any field can then be overridden, e.g.
`--config.total_steps=300`. `--config.total_steps` also rescales the warmup
(5%, linked with get_ref).

Hardware and what to expect:
* tiny: tests only (4 steps, seconds on a CPU); its reconstructions mean nothing.
* small: the first-run demo on the built-in sounding-video data, sized so that
  stages 1 + 2 + 3 together take about 20 minutes of training on a 2-core CPU
  (measured 2026-12-08: stage 1 at ~3.5 step/s, 873 s; 1195 s for the three
  training loops, 21 min 14 s for the whole quickstart). Held-out video PSNR
  after this stage: 23.98 dB (each patch's mean colour: 22.33 dB);
  docs/results/learning.md has the curve and the design behind it. No GAN
  here: on CPU it costs more than it gives at this length.
* B / L: accelerators (B: one 80 GB GPU or a TPU v4-8; L, the paper's model:
  a TPU pod slice or a multi-GPU node with FSDP, `--config.mesh.fsdp=N`) on
  VGGSound (`--config.data.source=tfds:av_folder`). 100k steps at the global
  batch of 128 [LARP] is about 70 epochs of VGGSound's ~180k training clips
  [ours].
"""

from avtok_jax import config_lib

# [ours]: tiny for tests; small tuned on the 2-core CPU demo; B/L ~70 epochs.
TOTAL_STEPS = {"tiny": 4, "small": 3000, "B": 100_000, "L": 100_000}
# (enabled, start_step) of the video GAN [ours]: tiny switches it on mid-run
# so tests cover both sides; B/L start after the reconstruction has settled.
GAN = {"tiny": (True, 2), "small": (False, 0), "B": (True, 20_000), "L": (True, 20_000)}

PARAM_RULES = (
  # Audio modules and the audio projector wait for stage 2: the top-level
  # audio_* modules and the audio LayerNorms inside the shared stacks
  # (encoder/block_0/audio_norm1, ...).
  (r"(^|/)audio_", "frozen"),
  # The AR prior learns 50x faster than the tokenizer [LARP].
  (r"^prior/", 50.0),
  # The codebook 10x [ours]: unit-norm rows then follow the encoder's outputs
  # within ~100 steps (docs/results/learning.md).
  (r"^quantizer/", 10.0),
  # Everything else (shared encoder/decoder, quantizer, video_*, video projector) at x1.
)


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, size="small")
  config = config_lib.base_train_config(args.size, "stage1")
  config.modalities = ("video",)
  config.total_steps = TOTAL_STEPS[args.size]
  config.param_rules = PARAM_RULES
  config.loss_weights = config_lib.loss_weights(
    "video_l1", "video_l2", "perceptual", "gan", "lecam", "vq", "prior", "alignment"
  )
  config.gan.enabled, config.gan.start_step = GAN[args.size]
  config.gan.modalities = ("video",)
  return config
