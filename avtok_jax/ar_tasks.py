"""Sequence layouts of the three generation tasks over AVTok's unified tokens.

AVTOK.md section 5 and panels (c)-(e) of `../shared/reference/pipeline.png`
[paper]:

| task  | prefix (given)            | generated                      |
|-------|---------------------------|--------------------------------|
| a2v   | n_a audio codes, SEP      | n_v video codes                |
| v2a   | n_v video codes, SEP      | n_a audio codes                |
| joint | one class token           | n_v video codes, n_a audio codes |

Token ids follow `models.generator.Vocab`: codes 0..K-1 (the tokenizer's
single codebook, so audio and video codes share ids), SEP, one token per
class and the null class.

Training reads a sequence `s` of length L = prefix + generated as inputs
`s[:-1]` and targets `s[1:]`; the loss counts only targets in the generated
part (`loss_mask`). Two corruptions [ours, after LARP's generator recipe,
which names token and class dropout 0.1 without details]:

* condition dropout (for classifier-free guidance, Ho & Salimans 2022): with
  probability p per example the condition is replaced by the null token
  (joint: the class token becomes the null class; a2v/v2a: every condition
  code becomes the null id, SEP stays), so the same network also learns the
  unconditional model that CFG subtracts;
* token dropout: each INPUT token of the generated part is replaced by a
  uniformly random code with probability p; targets stay clean, so the model
  learns to continue from imperfect histories like its own samples.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

TASKS = ("a2v", "v2a", "joint")


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where the condition and the generated codes sit in a task's sequence.

  Attributes:
    task: 'a2v', 'v2a' or 'joint'.
    num_video: video codes per clip (n_v).
    num_audio: audio codes per clip (n_a).
  """

  task: str
  num_video: int
  num_audio: int

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"Unknown generation task {self.task!r}; choose one of {TASKS}.")
    if self.num_video < 1 or self.num_audio < 1:
      raise ValueError(
        f"Layout needs positive code counts, got num_video={self.num_video}, "
        f"num_audio={self.num_audio}."
      )

  @property
  def num_condition(self) -> int:
    """Condition tokens before SEP (a2v: n_a, v2a: n_v) or the class token (joint: 1)."""
    return {"a2v": self.num_audio, "v2a": self.num_video, "joint": 1}[self.task]

  @property
  def prefix_length(self) -> int:
    """Tokens given to the sampler: the condition plus SEP (a2v, v2a) or the class token."""
    return self.num_condition + (0 if self.task == "joint" else 1)

  @property
  def num_generated(self) -> int:
    """Codes the model generates."""
    return {"a2v": self.num_video, "v2a": self.num_audio, "joint": self.num_video + self.num_audio}[
      self.task
    ]

  @property
  def length(self) -> int:
    """Full sequence length L (the model sees L - 1 input positions)."""
    return self.prefix_length + self.num_generated

  @property
  def generates(self) -> tuple[str, ...]:
    """Modalities produced, in sequence order."""
    return {"a2v": ("video",), "v2a": ("audio",), "joint": ("video", "audio")}[self.task]

  def split_generated(self, generated: Any) -> dict[str, Any]:
    """[B, num_generated] codes -> {'video': [B, n_v]} / {'audio': [B, n_a]} / both (joint)."""
    if self.task == "joint":
      return {"video": generated[:, : self.num_video], "audio": generated[:, self.num_video :]}
    return {self.generates[0]: generated}


def build_sequences(
  layout: Layout, vocab: Any, video_codes: jax.Array, audio_codes: jax.Array, label: jax.Array
) -> jax.Array:
  """Clean training sequences [B, L] int32 from a batch of codes and labels.

  Args:
    layout: the task's `Layout`.
    vocab: `models.generator.Vocab` (needs `.sep` and `.class_token`).
    video_codes: int [B, n_v].
    audio_codes: int [B, n_a].
    label: int [B] class indices (used by 'joint' only).
  """
  video_codes = jnp.asarray(video_codes, jnp.int32)
  audio_codes = jnp.asarray(audio_codes, jnp.int32)
  batch = video_codes.shape[0]
  sep = jnp.full((batch, 1), vocab.sep, jnp.int32)
  if layout.task == "a2v":
    parts = [audio_codes, sep, video_codes]
  elif layout.task == "v2a":
    parts = [video_codes, sep, audio_codes]
  else:
    parts = [vocab.class_token(jnp.asarray(label, jnp.int32))[:, None], video_codes, audio_codes]
  seq = jnp.concatenate(parts, axis=1)
  if seq.shape[1] != layout.length:
    raise ValueError(
      f"{layout.task}: codes give sequences of length {seq.shape[1]}, the layout expects "
      f"{layout.length} (n_v={layout.num_video}, n_a={layout.num_audio})."
    )
  return seq


def loss_mask(layout: Layout) -> np.ndarray:
  """bool [L - 1]: True where the target `s[j + 1]` is a generated code."""
  return np.arange(1, layout.length) >= layout.prefix_length


def drop_condition(layout: Layout, vocab: Any, seq: jax.Array, drop: jax.Array) -> jax.Array:
  """Replaces the condition of the examples where `drop` [B] is True by the null token."""
  positions = np.arange(layout.length) < layout.num_condition
  replace = jnp.asarray(drop, bool)[:, None] & positions[None, :]
  return jnp.where(replace, jnp.int32(vocab.null_class), seq)


def unconditional_prompt(layout: Layout, vocab: Any, prompt: jax.Array) -> jax.Array:
  """The 'dropped condition' version of prompts [B, prefix_length] (CFG's other half)."""
  drop = jnp.ones((prompt.shape[0],), bool)
  positions = np.arange(layout.prefix_length) < layout.num_condition
  return jnp.where(drop[:, None] & positions[None, :], jnp.int32(vocab.null_class), prompt)


def corrupt_inputs(
  layout: Layout,
  vocab: Any,
  seq: jax.Array,
  rng: jax.Array,
  *,
  token_dropout: float,
  condition_dropout: float,
) -> jax.Array:
  """Training inputs [B, L - 1]: condition dropout, then token dropout on generated inputs."""
  rng_cond, rng_tok, rng_code = jax.random.split(rng, 3)
  batch = seq.shape[0]
  if condition_dropout > 0:
    seq = drop_condition(
      layout, vocab, seq, jax.random.bernoulli(rng_cond, condition_dropout, (batch,))
    )
  inputs = seq[:, :-1]
  if token_dropout > 0:
    generated = np.arange(layout.length - 1) >= layout.prefix_length
    hit = jax.random.bernoulli(rng_tok, token_dropout, inputs.shape) & generated[None, :]
    random_codes = jax.random.randint(rng_code, inputs.shape, 0, vocab.codebook_size, jnp.int32)
    inputs = jnp.where(hit, random_codes, inputs)
  return inputs


def prompts(
  layout: Layout, vocab: Any, video_codes: Any = None, audio_codes: Any = None, label: Any = None
) -> jax.Array:
  """Sampler prompts [B, prefix_length]: [audio, SEP] (a2v), [video, SEP] (v2a), [class] (joint)."""
  if layout.task == "joint":
    if label is None:
      raise ValueError("joint generation needs class labels.")
    return vocab.class_token(jnp.asarray(label, jnp.int32))[:, None]
  condition = audio_codes if layout.task == "a2v" else video_codes
  if condition is None:
    raise ValueError(f"{layout.task} needs {'audio' if layout.task == 'a2v' else 'video'} codes.")
  condition = jnp.asarray(condition, jnp.int32)
  if condition.shape[1] != layout.num_condition:
    raise ValueError(
      f"{layout.task}: condition has {condition.shape[1]} codes per clip, the generator was "
      f"trained with {layout.num_condition}."
    )
  sep = jnp.full((condition.shape[0], 1), vocab.sep, jnp.int32)
  return jnp.concatenate([condition, sep], axis=1)


def cross_entropy(
  logits: jax.Array, targets: jax.Array, mask: np.ndarray
) -> tuple[jax.Array, jax.Array]:
  """(mean CE, mean accuracy) over the positions where `mask` [L-1] is True; logits [B, L-1, V]."""
  logits = logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  weights = jnp.broadcast_to(jnp.asarray(mask, jnp.float32)[None], ce.shape)
  total = jnp.maximum(weights.sum(), 1.0)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return (ce * weights).sum() / total, (correct * weights).sum() / total
