r"""VFAL stage 3, decoders: fine-tune the decoder side for both modalities.

AVTOK.md section 4. Starts from stage 2's parameters (`init_from`, required)
with the tokens fixed: the encoder side (encoder, quant_in, quantizer, the
*_embed / *_in_norm / holistic *_queries modules), the AR prior and both
alignment projectors are frozen. Trains the shared decoder, quant_out and,
per modality, the patch queries, the region maps out (where a token covers
several patches), the output LayerNorm (inside `decoder/` with the configs'
norms='inside') and head. Losses: both
reconstruction terms (+ LPIPS when `lpips.weights` is given) and the GAN on
video and mel (none for `small`, see GAN_MODALITIES), from the first step
(the decoder starts from a trained state).

This is `vfal_stage2.get_config` edited (STYLE.md practice 3).

Launch, after stage 2 (see configs/vfal_stage1.py):

  python -m avtok_jax.main --config=configs/vfal_stage3.py:small --workdir=workdir/stage3 \
      --config.init_from=workdir/stage2

Argument: the size preset, `tiny`, `small` (default), `B` or `L`.

Hardware and what to expect: the same machines as stage 1 (tiny 4 steps,
small 300 on the 2-core CPU, 76 s measured 2026-12-08, B/L 25k). The tokens
of a clip are the same before and after this stage (the encoder side is
frozen); only the reconstructions sharpen (small's quickstart: held-out mel
L1 0.070 -> 0.063, video PSNR 23.98 -> 24.02 dB).
"""

from avtok_jax import config_lib

TOTAL_STEPS = {"tiny": 4, "small": 300, "B": 25_000, "L": 25_000}  # [ours]
# GAN modalities [ours]; () = no GAN. small has none: its video discriminator's
# 3D convolutions made a step 20x slower on the 2-core CPU (7 s instead of
# 0.33 s), and the mel one raised the held-out mel L1 from 0.101 to 0.138 in
# the 200 steps of the first demo (2026-11-26; docs/results/demo_eval.md at
# commit 40311db).
GAN_MODALITIES = {
  "tiny": ("video", "audio"),
  "small": (),
  "B": ("video", "audio"),
  "L": ("video", "audio"),
}

PARAM_RULES = (
  # The shared decoder and the code -> width projection.
  (r"^(decoder|quant_out)/", 1.0),
  # Per-modality decoder-side modules ('(/|$)': the queries and region maps
  # are bare arrays). The decoder's per-modality LayerNorms are in `decoder/`.
  (r"^(video|audio)_(patch_queries|region_out|out_norm|head)(/|$)", 1.0),
  # Everything else is frozen: encoder, quant_in, quantizer, *_embed,
  # *_in_norm, holistic *_queries, prior, projectors.
  (r".*", "frozen"),
)


def get_config(arg: str | None = None):
  stage2 = config_lib.load_sibling_config(__file__, "vfal_stage2")
  config = stage2.get_config(arg)
  config.stage = "stage3"
  config.modalities = ("video", "audio")
  config.total_steps = TOTAL_STEPS[config.size]
  config.param_rules = PARAM_RULES
  config.loss_weights = config_lib.loss_weights(
    "video_l1", "video_l2", "audio_l1", "audio_l2", "perceptual", "gan", "lecam"
  )
  config.gan.modalities = GAN_MODALITIES[config.size]
  config.gan.enabled = bool(config.gan.modalities)
  config.gan.start_step = 0
  return config
