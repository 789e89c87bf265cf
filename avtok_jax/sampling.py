"""Autoregressive sampling from the generator (AVTOK.md section 5): KV cache, CFG, top-k/top-p.

`sample` fills a KV cache with the prompt in one call (prefill) and then
feeds one token per step inside a `jax.lax.scan`; `sample_without_cache`
recomputes the whole (padded) sequence at every step inside a
`jax.lax.fori_loop` and exists for tests and speed comparisons. Both are one
compiled program per (model, shapes, static options) and draw token i of
every sequence with the key `jax.random.fold_in(rng, i)`, so with the same
seed they produce the same tokens (up to float rounding of the logits).

Per step, the next-token logits go through, in this order:

1. classifier-free guidance [Ho & Salimans 2022]: with an unconditional
   prompt, the conditional and unconditional prompts run as one doubled batch
   and logits = uncond + cfg_scale * (cond - uncond) (scale 1 = conditional);
2. the `allowed` id range: ids outside [lo, hi) get -inf (e.g. codes only,
   never SEP / class ids);
3. greedy (argmax) when `greedy` or temperature == 0; otherwise
   logits / temperature, top-k [Fan et al. 2018], top-p (nucleus) [Holtzman
   et al. 2019], and a categorical draw.
The chosen token is fed to both halves of a CFG batch.

Sharding: nothing here names devices; call inside `jax.set_mesh(mesh)` and
`flax.linen.logical_axis_rules(LOGICAL_AXIS_RULES)` with sharded parameters
and the model's logical constraints shard the program.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from avtok_jax.models import generator as generator_lib
from avtok_jax.models import layers

# -----------------------------------------------------------------------------
# Logit filters (pure functions on [..., V] float logits).
# -----------------------------------------------------------------------------


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
  """Keep the k largest logits of the last axis, set the others to -inf [Fan et al. 2018].

  Ties with the k-th largest value are all kept. k <= 0 or k >= V: unchanged.
  `k` must be a Python int (it fixes a shape).
  """
  vocab = logits.shape[-1]
  if k <= 0 or k >= vocab:
    return logits
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float | jax.Array) -> jax.Array:
  """Nucleus filter [Holtzman et al. 2019]: keep the smallest top set with probability >= p.

  Tokens are ranked by logit; a token is kept when the probability mass of the
  tokens ranked above it is below p, so the most likely token is always kept
  and the kept set is the smallest prefix whose mass reaches p. Ties with the
  last kept logit are kept too. The others become -inf. p may be traced; a
  Python p >= 1 returns the logits unchanged.
  """
  if isinstance(p, int | float) and p >= 1.0:
    return logits
  sorted_logits = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
  probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = mass_before < p
  keep = keep.at[..., 0].set(True)
  threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < threshold, -jnp.inf, logits)


def restrict_to_range(logits: jax.Array, allowed: tuple[int, int] | None) -> jax.Array:
  """Set the logits of ids outside the half-open range [lo, hi) to -inf (None: unchanged)."""
  if allowed is None:
    return logits
  lo, hi = allowed
  ids = jnp.arange(logits.shape[-1])
  return jnp.where((ids >= lo) & (ids < hi), logits, -jnp.inf)


def guided_logits(cond: jax.Array, uncond: jax.Array, scale: float | jax.Array) -> jax.Array:
  """Classifier-free guidance [Ho & Salimans 2022]: uncond + scale * (cond - uncond)."""
  return uncond + scale * (cond - uncond)


def choose_tokens(
  logits: jax.Array,
  key: jax.Array,
  *,
  greedy: bool,
  temperature: float | jax.Array = 1.0,
  top_k: int = 0,
  top_p: float | jax.Array = 1.0,
  allowed: tuple[int, int] | None = None,
) -> jax.Array:
  """One token per row of `logits` [..., V]: range mask, then argmax or filtered sampling.

  Returns [...] int32. `greedy` ignores temperature, top_k and top_p.
  """
  logits = restrict_to_range(logits.astype(jnp.float32), allowed)
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  logits = top_k_filter(logits, top_k)
  logits = top_p_filter(logits, top_p)
  return layers.gumbel_max(key, logits)


# -----------------------------------------------------------------------------
# Sampling loops.
# -----------------------------------------------------------------------------


def _variables(params: Mapping) -> dict:
  """{'params': ...} from either the 'params' collection or a variables dict; unboxed."""
  params = nn.unbox(params)
  if "params" in params:
    return {"params": params["params"]}
  return {"params": params}


def _check(
  model: generator_lib.Generator,
  prompt: jax.Array,
  num_new: int,
  uncond_prompt: jax.Array | None,
  allowed: tuple[int, int] | None,
  temperature: float,
  top_p: float,
) -> None:
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt must be [B, P] with P >= 1, got shape {tuple(prompt.shape)}.")
  if num_new < 1:
    raise ValueError(f"num_new must be >= 1, got {num_new}.")
  if prompt.shape[1] + num_new - 1 > model.max_length:
    raise ValueError(
      f"Prompt length {prompt.shape[1]} + {num_new} new tokens needs "
      f"{prompt.shape[1] + num_new - 1} positions; the model has max_length={model.max_length}."
    )
  if uncond_prompt is not None and tuple(uncond_prompt.shape) != tuple(prompt.shape):
    raise ValueError(
      f"uncond_prompt {tuple(uncond_prompt.shape)} must have the prompt's shape "
      f"{tuple(prompt.shape)}."
    )
  if allowed is not None:
    lo, hi = allowed
    if not 0 <= lo < hi <= model.num_outputs:
      raise ValueError(f"allowed={allowed} must satisfy 0 <= lo < hi <= {model.num_outputs}.")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}.")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}.")


def _options(temperature, top_k, top_p, greedy):
  """Static (compile-time) choices: greedy, top_k, whether to apply top-p."""
  return bool(greedy or temperature == 0), int(top_k), bool(top_p < 1.0)


def _make_chooser(batch, greedy, top_k, use_top_p, allowed, use_cfg, temperature, top_p, scale):
  """next_token(logits [B or 2B, V], rng, i) -> [B] int32, with CFG mixing when use_cfg."""

  def next_token(logits, rng, i):
    if use_cfg:
      logits = guided_logits(logits[:batch], logits[batch:], scale)
    return choose_tokens(
      logits,
      jax.random.fold_in(rng, i),
      greedy=greedy,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p if use_top_p else 1.0,
      allowed=allowed,
    )

  return next_token


@functools.partial(
  jax.jit,
  static_argnames=("model", "num_new", "greedy", "top_k", "use_top_p", "allowed", "use_cfg"),
)
def _sample_cached(
  variables, prompt, uncond_prompt, rng, temperature, top_p, cfg_scale,
  *, model, num_new, greedy, top_k, use_top_p, allowed, use_cfg,
):  # fmt: skip
  batch, prompt_len = prompt.shape
  tokens = jnp.concatenate([prompt, uncond_prompt]) if use_cfg else prompt
  next_token = _make_chooser(
    batch, greedy, top_k, use_top_p, allowed, use_cfg, temperature, top_p, cfg_scale
  )
  double = (lambda t: jnp.concatenate([t, t])) if use_cfg else (lambda t: t)
  # The last generated token is never fed back: prompt_len + num_new - 1 positions.
  cache = generator_lib.init_cache(model, tokens.shape[0], prompt_len + num_new - 1)
  logits, state = model.apply({**variables, "cache": cache}, tokens, decode=True, mutable=["cache"])
  first = next_token(logits[:, -1], rng, 0)

  def step(carry, i):
    cache, previous = carry
    logits, state = model.apply(
      {**variables, "cache": cache}, double(previous)[:, None], decode=True, mutable=["cache"]
    )
    token = next_token(logits[:, -1], rng, i)
    return (state["cache"], token), token

  _, rest = jax.lax.scan(step, (state["cache"], first), jnp.arange(1, num_new))
  return jnp.concatenate([first[:, None], rest.T], axis=1)


@functools.partial(
  jax.jit,
  static_argnames=("model", "num_new", "greedy", "top_k", "use_top_p", "allowed", "use_cfg"),
)
def _sample_recompute(
  variables, prompt, uncond_prompt, rng, temperature, top_p, cfg_scale,
  *, model, num_new, greedy, top_k, use_top_p, allowed, use_cfg,
):  # fmt: skip
  batch, prompt_len = prompt.shape
  tokens = jnp.concatenate([prompt, uncond_prompt]) if use_cfg else prompt
  next_token = _make_chooser(
    batch, greedy, top_k, use_top_p, allowed, use_cfg, temperature, top_p, cfg_scale
  )
  double = (lambda t: jnp.concatenate([t, t])) if use_cfg else (lambda t: t)
  # A fixed-length buffer (static shapes): positions after the current one
  # hold padding that the causal mask hides from the logits we read.
  length = prompt_len + num_new - 1
  buffer = jnp.zeros((tokens.shape[0], length), jnp.int32).at[:, :prompt_len].set(tokens)
  out = jnp.zeros((batch, num_new), jnp.int32)

  def body(i, carry):
    buffer, out = carry
    logits = model.apply(variables, buffer)
    last = jax.lax.dynamic_index_in_dim(logits, prompt_len - 1 + i, axis=1, keepdims=False)
    token = next_token(last, rng, i)
    out = out.at[:, i].set(token)
    # At the last step the write index (length) is clamped to length - 1 by
    # JAX; the buffer is not read again, so that is harmless.
    buffer = jax.lax.dynamic_update_slice(buffer, double(token)[:, None], (0, prompt_len + i))
    return buffer, out

  _, out = jax.lax.fori_loop(0, num_new, body, (buffer, out))
  return out


def _run(
  impl,
  model,
  params,
  prompt,
  num_new,
  rng,
  temperature,
  top_k,
  top_p,
  cfg_scale,
  uncond_prompt,
  allowed,
  greedy,
):
  prompt = jnp.asarray(prompt, jnp.int32)
  if uncond_prompt is not None:
    uncond_prompt = jnp.asarray(uncond_prompt, jnp.int32)
  num_new = int(num_new)
  temperature, top_p = float(temperature), float(top_p)
  allowed = None if allowed is None else (int(allowed[0]), int(allowed[1]))
  _check(model, prompt, num_new, uncond_prompt, allowed, temperature, top_p)
  greedy, top_k, use_top_p = _options(temperature, top_k, top_p, greedy)
  return impl(
    _variables(params),
    prompt,
    uncond_prompt,
    rng,
    jnp.float32(temperature if temperature > 0 else 1.0),
    jnp.float32(top_p),
    jnp.float32(cfg_scale),
    model=model,
    num_new=num_new,
    greedy=greedy,
    top_k=top_k,
    use_top_p=use_top_p,
    allowed=allowed,
    use_cfg=uncond_prompt is not None,
  )


def sample(
  model: generator_lib.Generator,
  params: Mapping,
  prompt: jax.Array,
  num_new: int,
  rng: jax.Array,
  *,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  cfg_scale: float = 1.0,
  uncond_prompt: jax.Array | None = None,
  allowed: tuple[int, int] | None = None,
  greedy: bool = False,
) -> jax.Array:
  """Generate `num_new` tokens after `prompt` with the KV cache.

  Args:
    model: the `Generator` (a static argument: one compiled program per
      model, prompt shape, num_new and static options below).
    params: its 'params' collection, or a variables dict {'params': ...};
      boxed (logically partitioned) or plain.
    prompt: [B, P] int ids (P >= 1), e.g. [audio codes, SEP] or [class token].
    num_new: number of tokens to generate (P + num_new - 1 <= max_length).
    rng: a JAX PRNG key; token i uses `jax.random.fold_in(rng, i)`.
    temperature: softmax temperature (traced: changing it does not
      recompile); 0 means greedy.
    top_k: keep the k most likely ids (0 = off; static).
    top_p: nucleus mass in (0, 1] (1 = off; whether it is on is static, the
      value is traced).
    cfg_scale: classifier-free guidance scale (traced), used with uncond_prompt.
    uncond_prompt: [B, P] unconditional prompt (e.g. the null class token,
      or the condition tokens replaced by a dropped token); None = no CFG.
    allowed: half-open id range [lo, hi) that may be generated, e.g.
      `vocab.codes` = (0, K); None = every output id.
    greedy: argmax instead of sampling.

  Returns:
    [B, num_new] int32 tokens.
  """
  return _run(
    _sample_cached, model, params, prompt, num_new, rng,
    temperature, top_k, top_p, cfg_scale, uncond_prompt, allowed, greedy,
  )  # fmt: skip


def sample_without_cache(
  model: generator_lib.Generator,
  params: Mapping,
  prompt: jax.Array,
  num_new: int,
  rng: jax.Array,
  *,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  cfg_scale: float = 1.0,
  uncond_prompt: jax.Array | None = None,
  allowed: tuple[int, int] | None = None,
  greedy: bool = False,
) -> jax.Array:
  """`sample` without the KV cache: every step runs the full [B, P + num_new - 1] sequence.

  Same arguments, same random keys and the same result as `sample` (up to
  float rounding); O(length) times more compute. For tests and speed
  comparisons.
  """
  return _run(
    _sample_recompute, model, params, prompt, num_new, rng,
    temperature, top_k, top_p, cfg_scale, uncond_prompt, allowed, greedy,
  )  # fmt: skip
