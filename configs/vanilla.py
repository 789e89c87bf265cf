r"""Vanilla joint training from scratch: the ablation VFAL is compared with.

AVTOK.md section 4. Both modalities from the first step, every parameter
trainable (the AR prior at lr x50 [LARP]), every loss term: both
reconstruction terms (+ LPIPS when `lpips.weights` is given), GAN on video
and mel (mel only for `small`, as VFAL stage 3), L_vq, L_prior over
[video ; audio], L_rep on both streams.

It gets the same number of steps as VFAL stages 1 + 2 + 3 together and the
discriminators of stage 3 (both read from those configs, so the budgets stay
equal; `tiny` keeps 4 steps for tests), and its GAN starts at the step where
the VFAL run's GAN first acts on the same decoder.

Launch:

  python -m avtok_jax.main --config=configs/vanilla.py:small --workdir=workdir/vanilla

Argument: the size preset, `tiny`, `small` (default), `B` or `L`.

Hardware and what to expect: as VFAL stage 1. The paper's finding to
reproduce: joint training from scratch suppresses the audio stream (worse
SI-SDR / rFAD / MR-STFT than VFAL at a similar video quality).
"""

from avtok_jax import config_lib

# [ours] small: 1200 + 300, where VFAL's stage 3 switches the GAN on; others as stage 1.
GAN_START = {"tiny": 2, "small": 1500, "B": 20_000, "L": 20_000}

PARAM_RULES = (
  # The AR prior learns 50x faster than the tokenizer [LARP]; all else x1.
  (r"^prior/", 50.0),
)


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, size="small")
  config = config_lib.base_train_config(args.size, "vanilla")
  config.modalities = ("video", "audio")
  config.total_steps = sum(
    config_lib.load_sibling_config(__file__, name).TOTAL_STEPS[args.size]
    for name in ("vfal_stage1", "vfal_stage2", "vfal_stage3")
  )
  if args.size == "tiny":
    config.total_steps = 4  # tests only: as short as every other tiny run
  config.param_rules = PARAM_RULES
  config.loss_weights = config_lib.loss_weights()  # every generator term
  config.gan.enabled = True
  config.gan.start_step = GAN_START[args.size]
  # The discriminators VFAL's stage 3 uses (small: mel only; its video
  # discriminator makes a CPU step ~20x slower), so both runs get the same GAN.
  config.gan.modalities = config_lib.load_sibling_config(__file__, "vfal_stage3").GAN_MODALITIES[
    args.size
  ]
  return config
