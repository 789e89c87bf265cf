r"""Sampling speed of the AR generator with and without the KV cache (tokens per second).

  python bench/sampling_speed.py                       # small preset, batch 8
  python bench/sampling_speed.py --size=tiny --no_cache_steps=4

Cases (random-init weights; speed does not depend on them):

* ours, cJAVG: prompt [class], 64 video + 16 audio codes generated (the
  `small` tokenizer: 64 + 16 tokens, codebook 1024, 10 classes), 81 positions;
* ours, A2V: prompt [16 audio codes, SEP], 64 video codes generated;
* paper length, cJAVG: prompt [class], 1024 + 128 codes generated, 1153
  positions [paper].

tokens/s = batch x generated tokens / seconds of one warm (compiled) call;
compile time is printed apart. Without the cache every step runs the whole
padded sequence, so its per-step cost does not depend on the step: at the
paper length the script times `--no_cache_steps` steps at the full
sequence length (a prompt of 1153 - n tokens and n new ones) instead of all
1152.

Measured on the 2-core VM (2026-11-26, small preset, batch 8, fp32, top-k 100,
two runs while another job kept the machine at load ~3, so +-30%):

| case                         | KV cache      | no cache     | speed-up |
|------------------------------|---------------|--------------|----------|
| ours cJAVG (1 + 80, len 81)  | 431-632 tok/s | 87-92 tok/s  | 5-7x     |
| ours A2V (17 + 64, len 81)   | 475-711 tok/s | 97-116 tok/s | 5-6x     |
| paper cJAVG (1 + 1152, 1153) | 275-418 tok/s | 1.4 tok/s    | 200-290x |

At the paper length one full clip (1152 tokens) for 8 prompts takes 22-34 s
with the cache and ~110 minutes without it. The head-major cache layout
[B, heads, S, head_dim] made the cached paper-length case 5x faster than a
[B, S, heads, head_dim] cache (84 tok/s) on this CPU.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from absl import app, flags

from avtok_jax import config_lib, sampling
from avtok_jax.models import generator

_SIZE = flags.DEFINE_enum("size", "small", list(generator.GENERATOR_PRESETS), "Generator preset.")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences sampled at once.")
_NO_CACHE_STEPS = flags.DEFINE_integer(
  "no_cache_steps", 8, "Steps timed without the cache at the paper length."
)
_SKIP_PAPER = flags.DEFINE_bool("skip_paper", False, "Only the short (ours) cases.")

# The small tokenizer's codebook on the built-in data (its figures in the README
# before 2026-12-07 were measured with the earlier 1024-code codebook).
VOCAB = generator.Vocab(
  codebook_size=config_lib.model_config("small").codebook_size, num_classes=10
)


def _time(fn, *args, **kwargs) -> tuple[float, float]:
  """(first call, compile included; warm call) in seconds."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args, **kwargs))
  t1 = time.perf_counter()
  jax.block_until_ready(fn(*args, **kwargs))
  t2 = time.perf_counter()
  return t1 - t0, t2 - t1


def measure(
  size: str,
  batch: int,
  max_length: int,
  prompt_len: int,
  num_new: int,
  no_cache_new: int,
  vocab: generator.Vocab = VOCAB,
) -> dict[str, float]:
  """Tokens/s of `sampling.sample` (KV cache) and `sample_without_cache` for one case.

  Without the cache the timed steps are the last `no_cache_new` positions of
  the case's full length (a longer prompt), so its per-step cost is the
  worst one.
  """
  model = generator.build_generator(generator.generator_config(size), vocab, max_length)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  opts = dict(temperature=1.0, top_k=100, allowed=vocab.codes)
  key = jax.random.key(1)
  prompt = jax.random.randint(jax.random.key(2), (batch, prompt_len), 0, vocab.size)
  first, warm = _time(sampling.sample, model, params, prompt, num_new, key, **opts)
  out = {"cache_tokens_per_s": batch * num_new / warm, "cache_s": warm, "cache_first_s": first}
  nc_prompt_len = prompt_len + num_new - no_cache_new
  prompt = jax.random.randint(jax.random.key(2), (batch, nc_prompt_len), 0, vocab.size)
  first, warm = _time(
    sampling.sample_without_cache, model, params, prompt, no_cache_new, key, **opts
  )
  out.update(
    no_cache_tokens_per_s=batch * no_cache_new / warm,
    no_cache_s=warm,
    no_cache_first_s=first,
    no_cache_length=nc_prompt_len + no_cache_new - 1,
  )
  return out


def _case(name: str, max_length: int, prompt_len: int, num_new: int, no_cache_new: int) -> None:
  batch = _BATCH.value
  r = measure(_SIZE.value, batch, max_length, prompt_len, num_new, no_cache_new)
  print(
    f"{name}: {prompt_len} prompt + {num_new} new, batch {batch}, {_SIZE.value} preset\n"
    f"  KV cache : {r['cache_tokens_per_s']:9.1f} tokens/s  ({r['cache_s']:.3f} s warm, "
    f"first call {r['cache_first_s']:.1f} s)\n"
    f"  no cache : {r['no_cache_tokens_per_s']:9.1f} tokens/s  ({r['no_cache_s']:.3f} s warm "
    f"for {no_cache_new} steps at length {r['no_cache_length']}, first call "
    f"{r['no_cache_first_s']:.1f} s)\n"
    f"  speed-up : {r['cache_tokens_per_s'] / r['no_cache_tokens_per_s']:9.1f} x"
  )


def main(argv) -> None:
  del argv
  print(f"devices: {jax.devices()}")
  _case("ours cJAVG", 1 + 64 + 16, 1, 64 + 16, 64 + 16)
  _case("ours A2V", 16 + 1 + 64, 16 + 1, 64, 64)
  if not _SKIP_PAPER.value:
    _case("paper cJAVG", 1 + 1024 + 128, 1, 1024 + 128, _NO_CACHE_STEPS.value)


if __name__ == "__main__":
  app.run(main)
