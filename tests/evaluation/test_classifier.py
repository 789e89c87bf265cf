"""Tests of the built-in-data audio-video classifier (avtok_jax.evaluation.classifier)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg

from avtok_jax import config_lib
from avtok_jax.evaluation import classifier as clf

NUM_CLIPS = 64
# Eval-split clips far past the 512 the shipped JSON's accuracy was measured
# on: never seen in training (another seed) nor in the reported check.
FRESH_START = 5000


def _frechet(x: np.ndarray, y: np.ndarray) -> float:
  """||mu_x - mu_y||^2 + Tr(S_x + S_y - 2 (S_x S_y)^(1/2)) (Heusel et al. 2017, eq. 6)."""
  mu_x, mu_y = x.mean(0), y.mean(0)
  s_x, s_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  covmean = scipy.linalg.sqrtm(s_x @ s_y).real
  return float(np.sum((mu_x - mu_y) ** 2) + np.trace(s_x + s_y - 2 * covmean))


@pytest.fixture(scope="module", params=clf.SHIPPED_PRESETS)
def shipped(request):
  """(preset, classifier, fresh held-out clips as float video in [-1, 1], mel, labels)."""
  preset = request.param
  c = config_lib.data_config(preset)
  c.num_eval_examples = FRESH_START + NUM_CLIPS
  video, mel, labels = clf.builtin_clips(
    c, c.eval_split, range(FRESH_START, FRESH_START + NUM_CLIPS)
  )
  video = video.astype(np.float32) / 127.5 - 1.0
  return preset, clf.load_classifier(preset), video, mel, labels


def test_shipped_weights_load_with_their_facts(shipped):
  preset, model, _, _, _ = shipped
  assert model.preset == preset
  assert model.class_names == clf.synthetic.class_names(10)
  facts = model.facts
  assert facts["preset"] == preset and facts["steps"] >= 1
  assert facts["heldout_accuracy"]["video"] >= 0.95
  assert facts["heldout_accuracy"]["audio"] >= 0.95
  # Cached: the evaluation loads it once per preset.
  assert clf.load_classifier(preset) is model


def test_fresh_heldout_clips_are_classified(shipped):
  _, model, video, mel, labels = shipped
  assert len(set(labels.tolist())) == 10  # every class present
  feats_v, logits_v = model.video(video)
  feats_a, logits_a = model.audio(mel)
  assert feats_v.shape == feats_a.shape == (NUM_CLIPS, clf.ARCH.feature_dim)
  assert logits_v.shape == logits_a.shape == (NUM_CLIPS, 10)
  # Chance is 0.1; the shipped weights score ~1.0 on these clips.
  assert clf.accuracy(logits_v, labels) >= 0.85
  assert clf.accuracy(logits_a, labels) >= 0.85
  # uint8 frames are accepted and mean the same video.
  uint8 = np.round((video + 1.0) * 127.5).astype(np.uint8)
  np.testing.assert_allclose(model.video(uint8)[0], feats_v, atol=1e-4)
  # A clip's features do not depend on the rest of its batch (GroupNorm, not BatchNorm).
  np.testing.assert_allclose(model.audio(mel[::-1])[0][::-1], feats_a, atol=1e-4)
  # Zero padding of a short last chunk does not leak into the real clips.
  np.testing.assert_allclose(model.audio(mel[:3])[0], feats_a[:3], atol=1e-4)


def test_frechet_distance_self_zero_and_noise_far(shipped):
  _, model, video, mel, _ = shipped
  rng = np.random.default_rng(0)
  half = NUM_CLIPS // 2
  # Heavy noise: std 0.5 in units where the data spans [-1, 1].
  noisy_video = np.clip(video + rng.normal(0, 0.5, video.shape), -1, 1)
  noisy_mel = np.clip(mel + rng.normal(0, 0.5, mel.shape), -1, 3)
  for run, clean, noisy in ((model.video, video, noisy_video), (model.audio, mel, noisy_mel)):
    feats, _ = run(clean)
    noisy_feats = run(noisy.astype(np.float32))[0][:half]
    a, b = feats[:half], feats[half:]
    scale = float(np.trace(np.cov(a, rowvar=False)))
    assert scale > 0
    assert abs(_frechet(a, a)) < 1e-3 * scale
    # Baseline: two disjoint sets of clean clips (same size, same classes) differ
    # only by sampling; the same clips under heavy noise must be much further.
    # Measured with the shipped weights: 7-10x the baseline.
    baseline = _frechet(a, b)
    far = _frechet(a, noisy_feats)
    assert far > 3 * baseline, (far, baseline)


def test_bad_inputs_raise_clear_errors():
  model = clf.load_classifier("tiny")
  t, h, w, _ = model.video_shape
  f, length = model.mel_shape
  with pytest.raises(ValueError, match=r"video must have shape \[N, T, H, W, 3\] = \[N, 4, 32, 32"):
    model.video(np.zeros((2, t, h + 1, w, 3), np.float32))
  with pytest.raises(ValueError, match="video must have shape"):
    model.video(np.zeros((t, h, w, 3), np.float32))  # no batch axis
  with pytest.raises(ValueError, match="N >= 1"):
    model.video(np.zeros((0, t, h, w, 3), np.float32))
  with pytest.raises(ValueError, match="mel must have shape"):
    model.audio(np.zeros((2, length, f), np.float32))  # transposed
  with pytest.raises(ValueError, match=r"x / 127.5 - 1"):
    model.video(np.full((1, t, h, w, 3), 200.0, np.float32))  # [0, 255] floats
  with pytest.raises(ValueError, match="NaN"):
    model.video(np.full((1, t, h, w, 3), np.nan, np.float32))
  with pytest.raises(ValueError, match="raw log-mel"):
    model.audio(np.full((1, f, length), -11.5, np.float32))
  with pytest.raises(ValueError, match="No shipped classifier weights for preset 'paper'"):
    clf.load_classifier("paper")
  with pytest.raises(ValueError, match="Unknown data preset"):
    clf.load_classifier("huge")


def test_training_entry_point_writes_loadable_weights(tmp_path):
  out = tmp_path / "clf_tiny.msgpack"
  lines = []
  facts = clf.train_classifier(
    "tiny", 3, out, batch_size=8, pool=16, eval_clips=NUM_CLIPS, log_every=1, log=lines.append
  )
  assert any(line.startswith("step 3/3") for line in lines)
  on_disk = json.loads(clf.facts_path(out).read_text())
  assert on_disk == facts
  assert facts["steps"] == 3 and facts["preset"] == "tiny"
  for branch in ("video", "audio"):
    assert 0.0 <= facts["heldout_accuracy"][branch] <= 1.0
  model = clf.load_classifier("tiny", path=out)
  video = np.zeros((NUM_CLIPS, *model.video_shape), np.float32)
  feats, logits = model.video(video)
  assert feats.shape == (NUM_CLIPS, clf.ARCH.feature_dim) and np.all(np.isfinite(logits))
  with pytest.raises(ValueError, match="not 'small'"):
    clf.load_classifier("small", path=out)
  # Weights replaced without their facts are refused.
  out.write_bytes(out.read_bytes()[:-1] + b"\x00")
  clf._load.cache_clear()
  with pytest.raises(ValueError, match="does not match"):
    clf.load_classifier("tiny", path=out)
  with pytest.raises(ValueError, match="missing"):
    clf.load_classifier("tiny", path=tmp_path / "absent.msgpack")


def test_command_line_requires_out():
  with pytest.raises(SystemExit, match="--out"):
    clf.main(["classifier", "--preset=tiny"])
