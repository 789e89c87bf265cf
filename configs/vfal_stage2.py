r"""VFAL stage 2, audio later: audio modules learn to use the frozen video tokenizer.

AVTOK.md section 4. Starts from stage 1's parameters (`init_from`, required;
the audio modules, untouched by stage 1, keep their fresh initialisation) and
trains only the audio modules (audio_embed, audio_queries,
audio_patch_queries, audio_head, and the audio LayerNorms inside the shared
encoder and decoder: encoder/block_i/audio_norm1, ...), the audio alignment
projector and the AR prior (lr x50 [LARP]). The shared encoder and decoder,
quant_in / quantizer / quant_out and every video_* module are frozen, so the
audio stream must fit into the codebook and the weights video already
shaped. Both modalities are run: the prior models [video ; audio] codes
(cross-modal). Losses: L^a_rec (L1 + L2 on the mel), L_vq, L_prior,
L_rep(audio); no video reconstruction term (nothing it could train is
trainable here) and no GAN.

This is `vfal_stage1.get_config` edited (STYLE.md practice 3): change a
stage-1 default and stage 2 follows.

Launch, after stage 1 (see configs/vfal_stage1.py):

  python -m avtok_jax.main --config=configs/vfal_stage2.py:small --workdir=workdir/stage2 \
      --config.init_from=workdir/stage1

Argument: the size preset, `tiny`, `small` (default), `B` or `L`.

Hardware and what to expect: the same machines as stage 1, and fewer steps
(tiny 4, small 600 on the 2-core CPU, ~2.4 step/s, 246 s measured 2026-12-08;
B/L 50k). The mel reconstructions' L1 falls quickly (only the small audio
modules train): held-out mel L1 0.070 after the quickstart's stage 2 (each
mel patch's mean: 0.080); the frozen parameters' checksum in the log stays
constant for the whole stage.
"""

from avtok_jax import config_lib

TOTAL_STEPS = {"tiny": 4, "small": 600, "B": 50_000, "L": 50_000}  # [ours]

PARAM_RULES = (
  # Audio modules, the audio LayerNorms inside the shared stacks and the
  # audio projector: the new stream.
  (r"(^|/)audio_", 1.0),
  # The cross-modal AR prior keeps learning, 50x faster [LARP].
  (r"^prior/", 50.0),
  # Everything else is frozen: shared encoder/decoder, quant_in, quantizer
  # (codebook), quant_out, video_* and the video projector.
  (r".*", "frozen"),
)


def get_config(arg: str | None = None):
  stage1 = config_lib.load_sibling_config(__file__, "vfal_stage1")
  config = stage1.get_config(arg)
  size = config.size
  config.stage = "stage2"
  config.modalities = ("video", "audio")
  config.total_steps = TOTAL_STEPS[size]
  config.param_rules = PARAM_RULES
  config.loss_weights = config_lib.loss_weights("audio_l1", "audio_l2", "vq", "prior", "alignment")
  config.gan.enabled = False
  config.gan.modalities = ("audio",)  # if switched on: the video side cannot change
  return config
