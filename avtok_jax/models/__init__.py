"""Flax linen models: the AVTok tokenizer, its quantizer, AR prior and building blocks.

`build_tokenizer(config.model, config.data)` is the one place where config
values become module hyper-parameters; the modules themselves take explicit
typed arguments only (STYLE.md practice 6).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from avtok_jax import config_lib
from avtok_jax.data import patches
from avtok_jax.models.layers import Transformer, sincos_table
from avtok_jax.models.prior import ARPrior
from avtok_jax.models.quantizer import QuantizerOutput, VectorQuantizer
from avtok_jax.models.tokenizer import MODALITIES, AVTok

__all__ = [
  "MODALITIES",
  "ARPrior",
  "AVTok",
  "QuantizerOutput",
  "Transformer",
  "VectorQuantizer",
  "build_tokenizer",
  "sincos_table",
]


def build_tokenizer(
  model_config: ml_collections.ConfigDict, data_config: ml_collections.ConfigDict
) -> AVTok:
  """The `AVTok` for a `config.model` (see `config_lib.model_config`) and a `config.data`.

  Token grids and patch sizes come from the data config, so one model size
  works with any data preset whose shapes fit.
  """
  config_lib.check_model_config(model_config, data_config)
  grids = patches.token_grids(data_config)
  pt, ph, pw = data_config.video_patch
  pf, pl = data_config.mel_patch
  m = model_config
  return AVTok(
    video_grid=tuple(grids["video"]),
    audio_grid=tuple(grids["mel"]),
    video_patch_dim=pt * ph * pw * 3,
    audio_patch_dim=pf * pl,
    width=m.width,
    encoder_depth=m.encoder_depth,
    decoder_depth=m.decoder_depth,
    num_heads=m.num_heads,
    mlp_dim=int(m.width * m.mlp_ratio),
    num_video_tokens=m.num_video_tokens,
    num_audio_tokens=m.num_audio_tokens,
    codebook_size=m.codebook_size,
    code_dim=m.code_dim,
    qkv_bias=m.qkv_bias,
    commit_weight=m.commit_weight,
    codebook_weight=m.codebook_weight,
    quantizer_temperature=m.quantizer_temperature,
    quantizer_gradient=m.quantizer_gradient,
    prior_depth=m.prior_depth,
    prior_width=m.prior_width,
    prior_heads=m.prior_heads,
    prior_mlp_ratio=m.prior_mlp_ratio,
    prior_temperature=m.prior_temperature,
    norms=m.norms,
    head_norm=m.head_norm,
    locality=m.locality,
    code_scale=m.code_scale,
    codebook_init_std=m.codebook_init_std,
    remat=m.remat,
    scan=m.scan,
    dtype=jnp.dtype(m.dtype),
    param_dtype=jnp.dtype(m.param_dtype),
  )
