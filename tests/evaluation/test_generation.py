"""The token-space class probe and the generation report (evaluation/generation.py)."""

import numpy as np

from avtok_jax.evaluation import generation


def _codes(rng, labels, informative):
  """Codes whose distribution depends on the class (informative) or not."""
  n, k = len(labels), 32
  base = rng.integers(0, k, (n, 12))
  if informative:
    base[:, :6] = labels[:, None] * 3 + rng.integers(0, 3, (n, 6))
  return base


def test_probe_reads_class_from_informative_tokens_only():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, 400)
  test_labels = rng.integers(0, 5, 200)
  probe = generation.TokenProbe({"video": _codes(rng, labels, True)}, labels, 32, 5)
  assert probe.train_accuracy > 0.95
  assert probe.accuracy({"video": _codes(rng, test_labels, True)}, test_labels) > 0.9
  # Tokens that ignore the class are read at chance.
  chance = probe.accuracy({"video": _codes(rng, test_labels, False)}, test_labels)
  assert chance < 0.4
  blind = generation.TokenProbe({"video": _codes(rng, labels, False)}, labels, 32, 5)
  assert blind.accuracy({"video": _codes(rng, test_labels, False)}, test_labels) < 0.4


def test_report_lists_every_figure():
  metrics = {
    "task": "joint",
    "step": 10,
    "num_clips": 4,
    "chance_accuracy": 0.1,
    "sampling": {"temperature": 1.0},
    "real/class_accuracy_video": 1.0,
    "generated/class_accuracy_video": 0.25,
    "generated/desync_s": 0.5,
    "shuffled_real/desync_s": 0.2,
    "vocoder": "griffin_lim",
  }
  text = generation.report_markdown(metrics, ("video", "audio"))
  assert "mp4 sound by griffin_lim" in text
  assert "| class accuracy, video | 1.000 | - | 0.250 | - |" in text
  assert "| event offset, s (lower is better) | - | - | 0.500 | 0.200 |" in text
