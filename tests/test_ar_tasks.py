"""Sequence layouts, loss masks and corruptions of the generation tasks (ar_tasks.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avtok_jax import ar_tasks
from avtok_jax.models.generator import Vocab

VOCAB = Vocab(codebook_size=16, num_classes=3)  # SEP 16, classes 17..19, null 20
NV, NA = 5, 3


def _batch(b=2):
  rng = np.random.default_rng(0)
  return (
    rng.integers(0, 16, (b, NV)).astype(np.int32),
    rng.integers(0, 16, (b, NA)).astype(np.int32),
    np.arange(b, dtype=np.int32) % 3,
  )


@pytest.mark.parametrize(
  "task,prefix,generated", [("a2v", NA + 1, NV), ("v2a", NV + 1, NA), ("joint", 1, NV + NA)]
)
def test_layout_sequences_and_mask(task, prefix, generated):
  layout = ar_tasks.Layout(task, NV, NA)
  assert (layout.prefix_length, layout.num_generated) == (prefix, generated)
  video, audio, label = _batch()
  seq = np.asarray(ar_tasks.build_sequences(layout, VOCAB, video, audio, label))
  assert seq.shape == (2, prefix + generated)
  if task == "a2v":
    np.testing.assert_array_equal(seq[:, :NA], audio)
    assert (seq[:, NA] == VOCAB.sep).all()
    np.testing.assert_array_equal(seq[:, NA + 1 :], video)
  elif task == "v2a":
    np.testing.assert_array_equal(seq[:, :NV], video)
    assert (seq[:, NV] == VOCAB.sep).all()
    np.testing.assert_array_equal(seq[:, NV + 1 :], audio)
  else:
    np.testing.assert_array_equal(seq[:, 0], 17 + label)
    np.testing.assert_array_equal(seq[:, 1 : 1 + NV], video)
    np.testing.assert_array_equal(seq[:, 1 + NV :], audio)
  # The mask marks exactly the targets s[j + 1] that are generated codes.
  mask = ar_tasks.loss_mask(layout)
  targets = seq[:, 1:]
  assert mask.shape == (layout.length - 1,)
  assert mask.sum() == generated
  assert not mask[: prefix - 1].any() and mask[prefix - 1 :].all()
  np.testing.assert_array_equal(targets[:, mask], seq[:, prefix:])
  # The split of generated codes gives back the modalities.
  parts = layout.split_generated(seq[:, prefix:])
  if task != "v2a":
    np.testing.assert_array_equal(parts["video"], video)
  if task != "a2v":
    np.testing.assert_array_equal(parts["audio"], audio)


def test_masked_cross_entropy_ignores_the_prefix():
  layout = ar_tasks.Layout("a2v", NV, NA)
  mask = ar_tasks.loss_mask(layout)
  targets = jnp.zeros((1, layout.length - 1), jnp.int32)
  logits = jnp.zeros((1, layout.length - 1, VOCAB.size))
  # Perfect predictions on the generated positions, garbage on the prefix.
  logits = logits.at[0, :, 0].set(jnp.where(jnp.asarray(mask), 50.0, -50.0))
  ce, acc = ar_tasks.cross_entropy(logits, targets, mask)
  assert float(ce) < 1e-6 and float(acc) == 1.0
  ce_all, _ = ar_tasks.cross_entropy(logits, targets, np.ones_like(mask))
  assert float(ce_all) > 10.0


@pytest.mark.parametrize("task", ar_tasks.TASKS)
def test_condition_dropout_and_prompts(task):
  layout = ar_tasks.Layout(task, NV, NA)
  video, audio, label = _batch()
  seq = ar_tasks.build_sequences(layout, VOCAB, video, audio, label)
  dropped = np.asarray(ar_tasks.drop_condition(layout, VOCAB, seq, jnp.array([True, False])))
  np.testing.assert_array_equal(dropped[1], np.asarray(seq)[1])
  assert (dropped[0, : layout.num_condition] == VOCAB.null_class).all()
  np.testing.assert_array_equal(
    dropped[0, layout.num_condition :], np.asarray(seq)[0, layout.num_condition :]
  )
  prompt = np.asarray(ar_tasks.prompts(layout, VOCAB, video, audio, label))
  np.testing.assert_array_equal(prompt, np.asarray(seq)[:, : layout.prefix_length])
  uncond = np.asarray(ar_tasks.unconditional_prompt(layout, VOCAB, jnp.asarray(prompt)))
  np.testing.assert_array_equal(uncond, dropped[:1, : layout.prefix_length].repeat(2, 0))


def test_token_dropout_touches_only_generated_inputs():
  layout = ar_tasks.Layout("v2a", NV, NA)
  video, audio, label = _batch(64)
  seq = ar_tasks.build_sequences(layout, VOCAB, video, audio, label)
  inputs = np.asarray(
    ar_tasks.corrupt_inputs(
      layout, VOCAB, seq, jax.random.key(0), token_dropout=0.5, condition_dropout=0.0
    )
  )
  clean = np.asarray(seq)[:, :-1]
  changed = inputs != clean
  assert not changed[:, : layout.prefix_length].any()
  # Random codes hit ~half of the generated inputs (a few coincide with the clean code).
  frac = changed[:, layout.prefix_length :].mean()
  assert 0.3 < frac < 0.6, frac
  assert inputs.max() < VOCAB.codebook_size or (inputs == VOCAB.sep).any()


def test_layout_errors():
  with pytest.raises(ValueError, match="Unknown generation task"):
    ar_tasks.Layout("t2v", 4, 4)
  layout = ar_tasks.Layout("a2v", NV, NA)
  with pytest.raises(ValueError, match="trained with 3"):
    ar_tasks.prompts(layout, VOCAB, audio_codes=np.zeros((1, 4), np.int32))
