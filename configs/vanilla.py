r"""Vanilla joint training from scratch: the ablation VFAL is compared with.

AVTOK.md section 4. Both modalities from the first step, every parameter
trainable (the AR prior at lr x50 [LARP]), every loss term: both
reconstruction terms (+ LPIPS when `lpips.weights` is given), GAN on video
and mel as VFAL stage 3 (none for `small`), L_vq, L_prior over
[video ; audio], L_rep on both streams.

It gets the same number of steps as VFAL stages 1 + 2 + 3 together and the
discriminators of stage 3 (both read from those configs, so the budgets stay
equal; `tiny` keeps 4 steps for tests), and its GAN starts at the step where
the VFAL run's GAN first acts on the same decoder.

Launch:

  python -m avtok_jax.main --config=configs/vanilla.py:small --workdir=workdir/vanilla

Argument: the size preset, `tiny`, `small` (default), `B` or `L`.

Hardware and what to expect: as VFAL stage 1 (small: 3900 steps at
~1.9 step/s on the 2-core CPU). The paper's finding to reproduce: joint
training from scratch suppresses the audio stream (worse SI-SDR / rFAD /
MR-STFT than VFAL at a similar video quality). At the small demo's budget it
does not (2026-12-08, docs/results/demo_eval.md): video 24.12 vs VFAL's
24.02 dB, mel L1 0.044 vs 0.063.
"""

from avtok_jax import config_lib

PARAM_RULES = (
  # The AR prior learns 50x faster than the tokenizer [LARP], the codebook
  # 10x as in stage 1 [ours]; all else x1.
  (r"^prior/", 50.0),
  (r"^quantizer/", 10.0),
)


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, size="small")
  config = config_lib.base_train_config(args.size, "vanilla")
  config.modalities = ("video", "audio")
  stages = [
    config_lib.load_sibling_config(__file__, name)
    for name in ("vfal_stage1", "vfal_stage2", "vfal_stage3")
  ]
  steps = [stage.TOTAL_STEPS[args.size] for stage in stages]
  config.total_steps = sum(steps)
  config.param_rules = PARAM_RULES
  config.loss_weights = config_lib.loss_weights()  # every generator term
  # The discriminators of VFAL's stage 3 (none for small, mel + video for
  # B/L), from the step where VFAL's GAN first acts on the decoder: stage 1's
  # GAN start where it has one (B/L), else stage 3's first step [ours].
  config.gan.modalities = stages[2].GAN_MODALITIES[args.size]
  config.gan.enabled = bool(config.gan.modalities)
  stage1_gan, stage1_gan_start = stages[0].GAN[args.size]
  config.gan.start_step = stage1_gan_start if stage1_gan else steps[0] + steps[1]
  if args.size == "tiny":
    # Tests only: as short as every other tiny run, the GAN on from mid-run.
    config.total_steps, config.gan.start_step = 4, 2
  return config
