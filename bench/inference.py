r"""Inference speed: tokenizer encode / decode clips/s and AR generator tokens/s.

  python bench/inference.py --preset=small                 # this machine
  python bench/inference.py --preset=L --max_batch=256     # a GPU / TPU
  python bench/inference.py --preset=small --batches=8 --skip_generator   # one batch (compare.py)

Tokenizer (random-init weights of `--preset`, the stage's modalities: video
and audio; speed does not depend on the weights): jitted `AVTok.encode`
(patches -> token ids, argmax codes) and `AVTok.decode` (ids -> patches),
timed apart and together (`encode_decode_s`: encode then decode, one batch),
at batch 1 (`--modalities`, default both) and doubling up to `--max_batch` or the largest batch that fits
(an allocation failure ends the search; on CPU `--max_batch` does). Each
figure is the median of `--repeats` warm calls; compile time is printed apart.

Generator (`bench/sampling_speed.measure`): tokens/s of `sampling.sample`
with the KV cache and of `sample_without_cache`, for the joint (cJAVG) layout
of the preset's token counts ([class] + video + audio codes).

One JSON line at the end (`bench/compare.py` reads `tokenizer[...]`).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
  if path not in sys.path:
    sys.path.insert(0, path)

from avtok_jax import config_lib  # noqa: E402
from avtok_jax.models import build_tokenizer  # noqa: E402


def _define_flags() -> None:
  """Command-line flags (defined only when run as a script, so that tests can import us)."""
  global \
    _PRESET, \
    _BATCHES, \
    _MAX_BATCH, \
    _REPEATS, \
    _MODALITIES, \
    _SKIP_GENERATOR, \
    _GEN_BATCH, \
    _NO_CACHE_STEPS
  _PRESET = flags.DEFINE_enum("preset", "small", ["tiny", "small", "B", "L"], "Size preset.")
  _BATCHES = flags.DEFINE_list("batches", None, "Batch sizes (default: 1, 2, 4, ... max_batch).")
  _MAX_BATCH = flags.DEFINE_integer("max_batch", 64, "Largest batch tried in the doubling search.")
  _REPEATS = flags.DEFINE_integer("repeats", 5, "Warm calls timed per figure.")
  _MODALITIES = flags.DEFINE_list("modalities", ["video", "audio"], "Streams encoded / decoded.")
  _SKIP_GENERATOR = flags.DEFINE_bool("skip_generator", False, "Tokenizer only.")
  _GEN_BATCH = flags.DEFINE_integer("generator_batch", 8, "Sequences sampled at once.")
  _NO_CACHE_STEPS = flags.DEFINE_integer(
    "generator_no_cache_steps", 16, "Steps timed without the KV cache (at the full length)."
  )


def _median(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _is_out_of_memory(err: Exception) -> bool:
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


class TokenizerBench:
  """Jitted encode / decode of the preset's tokenizer (random weights)."""

  def __init__(self, preset: str, modalities=("video", "audio")):
    model_config = config_lib.model_config(preset)
    data_config = config_lib.data_config(model_config.data_preset)
    self.model = build_tokenizer(model_config, data_config)
    self.modalities = tuple(modalities)
    tok = self.model
    example = tok.example_inputs(1)
    self.params = jax.jit(lambda r: tok.init(r, **example, train=False))(jax.random.key(0))
    self.encode = jax.jit(
      lambda v, v_patches, a_patches: {
        m: out["codes"] for m, out in tok.apply(v, v_patches, a_patches, method=tok.encode).items()
      }
    )
    self.decode = jax.jit(lambda v, codes: tok.apply(v, codes, method=tok.decode))

  def inputs(self, batch: int):
    tok = self.model
    video = jax.random.randint(
      jax.random.key(1), (batch, tok.num_patches("video"), tok.video_patch_dim), 0, 256
    ).astype(jnp.uint8)
    mel = jax.random.uniform(
      jax.random.key(2), (batch, tok.num_patches("audio"), tok.audio_patch_dim), minval=-1.0
    )
    return (
      video if "video" in self.modalities else None,
      mel if "audio" in self.modalities else None,
    )

  def measure(self, batch: int, repeats: int) -> dict[str, float]:
    video, mel = self.inputs(batch)
    t = time.perf_counter()
    codes = self.encode(self.params, video, mel)
    recon = self.decode(self.params, codes)
    jax.block_until_ready(recon)
    compile_s = time.perf_counter() - t
    enc = _median(lambda: self.encode(self.params, video, mel), repeats)
    dec = _median(lambda: self.decode(self.params, codes), repeats)
    both = _median(lambda: self.decode(self.params, self.encode(self.params, video, mel)), repeats)
    return {
      "batch": batch,
      "compile_s": compile_s,
      "encode_s": enc,
      "decode_s": dec,
      "encode_decode_s": both,
      "encode_clips_per_s": batch / enc,
      "decode_clips_per_s": batch / dec,
      "encode_decode_clips_per_s": batch / both,
    }


def run(
  preset: str,
  batches,
  max_batch: int,
  repeats: int,
  generator: bool,
  gen_batch: int,
  modalities=("video", "audio"),
  no_cache_steps: int = 16,
):
  out = {
    "framework": "jax",
    "jax": jax.__version__,
    "device": f"{jax.devices()[0].platform}:{getattr(jax.devices()[0], 'device_kind', '')}",
    "preset": preset,
    "modalities": list(modalities),
    "tokenizer": [],
  }
  bench = TokenizerBench(preset, modalities)
  sizes = [int(b) for b in batches] if batches else []
  if not sizes:
    b = 1
    while b <= max_batch:
      sizes.append(b)
      b *= 2
  for b in sizes:
    try:
      row = bench.measure(b, repeats)
    except Exception as err:  # noqa: BLE001 - only allocation failures end the search
      if not _is_out_of_memory(err):
        raise
      out["largest_batch_that_fits"] = out["tokenizer"][-1]["batch"] if out["tokenizer"] else 0
      out["first_batch_out_of_memory"] = b
      break
    out["tokenizer"].append(row)
    print(
      f"tokenizer batch {b:4d}: encode {row['encode_clips_per_s']:8.1f} clips/s, decode "
      f"{row['decode_clips_per_s']:8.1f} clips/s, encode+decode "
      f"{row['encode_decode_clips_per_s']:8.1f} clips/s (compile {row['compile_s']:.1f} s)",
      flush=True,
    )
  if generator:
    import sampling_speed  # here: it defines its own absl flags when imported

    m = config_lib.model_config(preset)
    gen_size = preset if preset in ("tiny", "small") else "L"
    n_new = m.num_video_tokens + m.num_audio_tokens
    vocab = sampling_speed.generator.Vocab(codebook_size=m.codebook_size, num_classes=10)
    r = sampling_speed.measure(
      gen_size, gen_batch, 1 + n_new, 1, n_new, min(no_cache_steps, n_new), vocab
    )
    r.update(generator=gen_size, batch=gen_batch, sequence=1 + n_new)
    out["generator"] = r
    print(
      f"generator {gen_size}, cJAVG [class] + {n_new} codes, batch {gen_batch}: KV cache "
      f"{r['cache_tokens_per_s']:.1f} tokens/s, no cache {r['no_cache_tokens_per_s']:.1f} "
      f"tokens/s ({r['cache_tokens_per_s'] / r['no_cache_tokens_per_s']:.1f}x)"
    )
  return out


def main(argv):
  del argv
  out = run(
    _PRESET.value,
    _BATCHES.value,
    _MAX_BATCH.value,
    _REPEATS.value,
    not _SKIP_GENERATOR.value,
    _GEN_BATCH.value,
    _MODALITIES.value,
    _NO_CACHE_STEPS.value,
  )
  print(json.dumps(out))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
