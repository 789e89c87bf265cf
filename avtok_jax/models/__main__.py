"""Parameter table of the AVTok tokenizer for a size preset (nothing is allocated).

  python -m avtok_jax.models --preset=L

builds the model for the preset (on its data preset's shapes, or --data), takes
the parameter shapes with `jax.eval_shape`, and prints the count per top-level
module, the total, the total without the AR prior and the video-only
(LARP-comparable) subtotal, and for L compares them with LARP-L (173M) and the
paper (208.4M for everything it trains).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import flax.linen as nn
import jax
from absl import flags

from avtok_jax import config_lib
from avtok_jax.models import build_tokenizer

LARP_L_PARAMS = 173e6  # LARP-L tokenizer [LARP]
PAPER_PARAMS = 208.4e6  # AVTok, everything the tokenizer stage trains [paper]


def param_shapes(model_config, data_config) -> dict[str, Any]:
  """Unboxed `params` shapes (ShapeDtypeStructs) of the tokenizer, via eval_shape."""
  model = build_tokenizer(model_config, data_config)
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), **model.example_inputs(1), train=False)
  )
  return nn.unbox(variables)["params"]


def count_by_module(params: dict[str, Any]) -> dict[str, int]:
  """{top-level module name: number of parameters}."""
  return {
    name: sum(math.prod(x.shape) for x in jax.tree.leaves(sub)) for name, sub in params.items()
  }


def summarize(params: dict[str, Any]) -> dict[str, int]:
  """Totals: all, without the prior, video-only (shared + video parts), audio parts.

  The audio parts are every parameter with an `audio_` name on its path: the
  top-level audio_* modules and the audio LayerNorms inside the shared
  encoder and decoder (encoder/block_0/audio_norm1, ...).
  """
  counts = count_by_module(params)
  total = sum(counts.values())
  prior = counts.get("prior", 0)
  audio = sum(
    math.prod(x.shape)
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
    if any(str(getattr(k, "key", "")).startswith("audio_") for k in path)
  )
  return {
    "total": total,
    "without_prior": total - prior,
    "video_only": total - prior - audio,
    "audio_modules": audio,
    "prior": prior,
  }


def projector_params(width: int, hidden: int, out: int) -> int:
  """Parameters of one REPA-style alignment projector: 3 Dense layers width->hidden->hidden->out."""
  return width * hidden + hidden + hidden * hidden + hidden + hidden * out + out


def format_table(size: str, model_config, data_config) -> str:
  """The printed report for one preset."""
  params = param_shapes(model_config, data_config)
  counts = count_by_module(params)
  s = summarize(params)
  order = ["encoder", "decoder", "quant_in", "quantizer", "quant_out"]
  order += sorted(k for k in counts if k.startswith("video_"))
  order += sorted(k for k in counts if k.startswith("audio_"))
  order += [k for k in counts if k not in order]  # the prior, and anything new
  lines = [
    f"AVTok preset {size!r} on data preset {data_config.preset!r}: width {model_config.width}, "
    f"{model_config.encoder_depth}+{model_config.decoder_depth} blocks, "
    f"{model_config.num_video_tokens}+{model_config.num_audio_tokens} tokens, codebook "
    f"{model_config.codebook_size}x{model_config.code_dim}, prior "
    f"{model_config.prior_depth}x{model_config.prior_width}",
    f"{'module':<22}{'params':>14}{'share':>9}",
  ]
  for name in order:
    lines.append(f"{name:<22}{counts[name]:>14,}{counts[name] / s['total']:>9.1%}")
  lines += [
    "-" * 45,
    f"{'total':<22}{s['total']:>14,}",
    f"{'total without prior':<22}{s['without_prior']:>14,}",
    f"{'video-only (no prior)':<22}{s['video_only']:>14,}   (LARP-comparable)",
    f"{'audio parts':<22}{s['audio_modules']:>14,}   (audio_* modules and LayerNorms)",
  ]
  if size == "L":
    proj = 2 * projector_params(
      model_config.width, model_config.align_hidden_dim, model_config.align_out_dim
    )
    lines += [
      "",
      f"vs LARP-L ({LARP_L_PARAMS / 1e6:.0f}M): video-only {s['video_only'] / 1e6:.1f}M "
      f"({s['video_only'] / LARP_L_PARAMS - 1:+.1%}); without prior "
      f"{s['without_prior'] / 1e6:.1f}M = video-only + {s['audio_modules'] / 1e6:.2f}M audio "
      "parts",
      f"vs the paper ({PAPER_PARAMS / 1e6:.1f}M, everything it trains): with prior "
      f"{s['total'] / 1e6:.1f}M ({s['total'] / PAPER_PARAMS - 1:+.1%}); adding two REPA-style "
      f"projectors ({model_config.width}->{model_config.align_hidden_dim}->"
      f"{model_config.align_hidden_dim}->{model_config.align_out_dim}, {proj / 1e6:.1f}M, an "
      f"estimate: they are not in this module) gives {(s['total'] + proj) / 1e6:.1f}M "
      f"({(s['total'] + proj) / PAPER_PARAMS - 1:+.1%})",
    ]
  return "\n".join(lines)


def _flag_values() -> flags.FlagValues:
  # A private FlagValues: importing this module must not define global flags.
  fv = flags.FlagValues()
  flags.DEFINE_enum(
    "preset", "L", list(config_lib.MODEL_PRESETS), "Model size preset.", flag_values=fv
  )
  flags.DEFINE_enum(
    "data",
    None,
    list(config_lib.DATA_PRESETS),
    "Data preset (default: the one the model preset is meant for).",
    flag_values=fv,
  )
  return fv


def main(argv: list[str] | None = None) -> int:
  """Prints the parameter table for --preset (argv[0] is the program name)."""
  fv = _flag_values()
  fv(list(sys.argv if argv is None else argv))
  model_config = config_lib.model_config(fv.preset)
  data_config = config_lib.data_config(fv.data or config_lib.data_preset_for(fv.preset))
  print(format_table(fv.preset, model_config, data_config))
  return 0


if __name__ == "__main__":
  sys.exit(main())
