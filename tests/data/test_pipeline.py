"""Grain pipeline: batch layout, crops, sharding, exact resume (in-process and 2 workers)."""

import itertools

import jax
import numpy as np
import pytest

from avtok_jax import config_lib
from avtok_jax.data import audio, patches, pipeline
from avtok_jax.data import tfds as builders
from avtok_jax.data.tfds import common


def _config(**overrides):
  c = config_lib.data_config("tiny")
  c.num_train_examples = 8
  c.num_eval_examples = 5
  c.batch_size = 2
  c.num_workers = 0
  for k, v in overrides.items():
    c[k] = v
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b, mel_atol=0.0):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert sorted(x) == sorted(y)
    for k in x:
      if k == "mel_patches" and mel_atol:
        np.testing.assert_allclose(x[k], y[k], rtol=0, atol=mel_atol, err_msg=k)
      else:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _mel(record, c):
  return audio.mel_features(common.audio_from_int16(record["audio"]), audio.MelSpec.from_config(c))


def _crops(video, c, flips=(False, True)):
  """Every crop (and flip) the train pipeline may take of a stored video."""
  hs, ws = config_lib.stored_frame_size(c)
  for y0, x0, flip in itertools.product(range(hs - c.height + 1), range(ws - c.width + 1), flips):
    crop = video[:, y0 : y0 + c.height, x0 : x0 + c.width]
    yield crop[:, :, ::-1] if flip else crop


def test_train_keys_skip_what_a_stage_does_not_read():
  c = _config()
  assert pipeline.train_keys(("video",)) == ("video_patches", "label")
  assert pipeline.train_keys(("audio",)) == ("mel_patches", "label")
  assert pipeline.train_keys(("video", "audio")) == pipeline.TRAIN_KEYS
  with pytest.raises(ValueError, match="Unknown modalities"):
    pipeline.train_keys(("depth",))
  full = _take(pipeline.make_iterator(c, "train", train=True, process_index=0, process_count=1), 3)
  video = _take(
    pipeline.make_iterator(
      c, "train", train=True, process_index=0, process_count=1, keys=pipeline.train_keys(("video",))
    ),
    3,
  )
  # Same examples, same crops and flips; no log-mel.
  for a, b in zip(full, video, strict=True):
    assert sorted(b) == ["label", "video_patches"]
    np.testing.assert_array_equal(a["video_patches"], b["video_patches"])
    np.testing.assert_array_equal(a["label"], b["label"])
  with pytest.raises(ValueError, match="subset"):
    pipeline.Preprocess(c, train=True, keys=("audio",))
  with pytest.raises(ValueError, match="evaluation batches"):
    pipeline.Preprocess(c, train=False, keys=("label",))


def test_train_batches_layout_and_crops():
  c = _config(shuffle=False)
  grids = patches.token_grids(c)
  it = pipeline.make_iterator(c, "train", train=True, process_index=0, process_count=1)
  source = pipeline.make_source(c, "train")
  batches = _take(it, 5)  # 10 examples: wraps around the 8-example epoch
  for k, batch in enumerate(batches):
    assert sorted(batch) == ["label", "mel_patches", "video_patches"]
    assert batch["video_patches"].shape == (2, 32, 2 * 8 * 8 * 3)
    assert batch["video_patches"].dtype == np.uint8
    assert batch["mel_patches"].shape == (2, 4 * 8, 8 * 8)
    assert batch["mel_patches"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    assert np.prod(grids["video"]) == 32 and np.prod(grids["mel"]) == 32
    # Normalised log-mel: silence is exactly -1, nothing below it.
    assert batch["mel_patches"].min() >= -1.0 and batch["mel_patches"].max() <= 1.5
    for j in range(2):
      record = source[(2 * k + j) % 8]
      assert batch["label"][j] == record["label"]
      video = patches.unpatchify_video(
        batch["video_patches"][j], (c.num_frames, c.height, c.width, 3), c.video_patch
      )
      assert any(np.array_equal(video, crop) for crop in _crops(record["video"], c))
      mel = patches.unpatchify_mel(batch["mel_patches"][j], (c.mel.n_mels, 64), c.mel_patch)
      np.testing.assert_array_equal(mel, _mel(record, c))
  # Augmentation is random per example: not every clip gets the centre crop.
  centre_crops = [
    patches.patchify_video(source[i % 8]["video"][:, 2:34, 2:34], c.video_patch) for i in range(10)
  ]
  got = [b["video_patches"][j] for b in batches for j in range(2)]
  assert not all(np.array_equal(g, e) for g, e in zip(got, centre_crops, strict=True))


def test_eval_batches_centre_crop_audio_mask_and_float_video():
  c = _config(video_dtype="float32")
  source = pipeline.make_source(c, "test")
  batches = list(pipeline.make_dataset(c, "test", train=False, process_index=0, process_count=1))
  # 5 examples, padded to 6 = 3 full batches; the padding is masked.
  assert len(batches) == 3
  np.testing.assert_array_equal(np.concatenate([b["mask"] for b in batches]), [True] * 5 + [False])
  for k, batch in enumerate(batches):
    assert sorted(batch) == ["audio", "label", "mask", "mel_patches", "video_patches"]
    assert batch["video_patches"].dtype == np.float32
    assert batch["video_patches"].min() >= -1 and batch["video_patches"].max() <= 1
    assert batch["audio"].shape == (2, c.num_samples) and batch["audio"].dtype == np.float32
    for j in range(2):
      index = 2 * k + j
      record = source[index if index < 5 else 0]
      centre = record["video"][:, 2:34, 2:34]
      video = patches.unpatchify_video(batch["video_patches"][j], centre.shape, c.video_patch)
      np.testing.assert_allclose(video, centre / 127.5 - 1, atol=1e-6)
      np.testing.assert_array_equal(batch["audio"][j], common.audio_from_int16(record["audio"]))
      assert batch["label"][j] == record["label"]


def _index_of(mel_patches, c, mels):
  mel = patches.unpatchify_mel(mel_patches, (c.mel.n_mels, 64), c.mel_patch)
  (hits,) = np.nonzero([np.array_equal(mel, m) for m in mels])
  assert len(hits) == 1
  return int(hits[0])


def test_processes_get_disjoint_examples():
  c = _config()
  source = pipeline.make_source(c, "train")
  mels = [_mel(source[i], c) for i in range(8)]
  seen = []
  for p in range(2):
    # Global batch 2 over 2 processes: 1 example per process per step.
    it = pipeline.make_iterator(c, "train", train=True, process_index=p, process_count=2)
    seen.append([_index_of(b["mel_patches"][0], c, mels) for b in _take(it, 4)])
  # One epoch of 8 examples, shuffled, split between the processes.
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(8))
  assert seen[0] + seen[1] != [0, 2, 4, 6, 1, 3, 5, 7]  # shuffled
  # Eval: the same number of batches on every process, every example once.
  evals = [
    list(pipeline.make_dataset(c, "test", train=False, process_index=p, process_count=2))
    for p in range(2)
  ]
  assert len(evals[0]) == len(evals[1]) == 3
  masks = np.stack([np.concatenate([b["mask"] for b in e]) for e in evals])
  np.testing.assert_array_equal(masks, [[True, True, True], [True, True, False]])
  with pytest.raises(ValueError, match=r"batch_size=3 is not divisible by process_count=2"):
    pipeline.make_dataset(
      _config(batch_size=3), "train", train=True, process_index=0, process_count=2
    )


def test_global_batches_do_not_depend_on_process_count():
  # Process p's batch is rows [p*B/2, (p+1)*B/2) of the 1-process batch, crops and flips
  # included: a 2-host run trains on exactly the batches of a 1-host run.
  c = _config(batch_size=4)
  one = _take(pipeline.make_iterator(c, "train", train=True, process_index=0, process_count=1), 3)
  two = [
    _take(pipeline.make_iterator(c, "train", train=True, process_index=p, process_count=2), 3)
    for p in range(2)
  ]
  for step, batch in enumerate(one):
    for key in ("video_patches", "mel_patches", "label"):
      joined = np.concatenate([two[0][step][key], two[1][step][key]])
      np.testing.assert_array_equal(joined, batch[key])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_iterator_state(num_workers):
  c = _config(num_workers=num_workers)
  it = pipeline.make_iterator(c, "train", train=True, seed=3, process_index=0, process_count=1)
  head = _take(it, 3)
  state = it.get_state()
  expected = _take(it, 3)  # crosses the epoch boundary (8 examples = 4 batches)
  if num_workers:
    it.close()
  it2 = pipeline.make_iterator(c, "train", train=True, seed=3, process_index=0, process_count=1)
  it2.set_state(state)
  _assert_batches_equal(_take(it2, 3), expected)
  if num_workers:
    it2.close()
    # Worker processes change nothing in the data: same batches as in-process
    # (the mel up to float rounding: workers run BLAS on one thread, which can
    # change the summation order of the filter-bank matmul).
    ref = pipeline.make_iterator(
      _config(num_workers=0), "train", train=True, seed=3, process_index=0, process_count=1
    )
    _assert_batches_equal(head + expected, _take(ref, 6), mel_atol=1e-5)


def test_tfds_source_matches_in_memory_source(tmp_path):
  builder = builders.SyntheticAv(
    config="tiny", data_dir=str(tmp_path), num_train=4, num_test=3, data_config=_config()
  )
  builder.download_and_prepare()
  mem = _config(num_eval_examples=3)
  disk = _config(num_eval_examples=3, source="tfds:synthetic_av", data_dir=str(tmp_path))
  by_audio = {}
  for c in (mem, disk):
    batches = list(pipeline.make_dataset(c, "test", train=False, process_index=0, process_count=1))
    examples = {}
    for b in batches:
      for j in range(2):
        if b["mask"][j]:
          examples[b["audio"][j].tobytes()] = {k: b[k][j] for k in b}
    by_audio[c.source] = examples
  assert len(by_audio["synthetic"]) == 3
  assert by_audio["synthetic"].keys() == by_audio["tfds:synthetic_av"].keys()
  for key, ex in by_audio["synthetic"].items():
    other = by_audio["tfds:synthetic_av"][key]
    for k in ex:
      np.testing.assert_array_equal(ex[k], other[k], err_msg=k)
  train = pipeline.make_iterator(disk, "train", train=True, process_index=0, process_count=1)
  assert next(train)["video_patches"].shape == (2, 32, 384)


def test_clear_errors(tmp_path):
  with pytest.raises(ValueError, match=r"video_dtype='int8'"):
    pipeline.make_dataset(_config(video_dtype="int8"), "train", train=True)
  with pytest.raises(ValueError, match=r"No prepared synthetic_av/tiny data set.*prepare"):
    pipeline.make_source(_config(source="tfds:synthetic_av", data_dir=str(tmp_path)), "train")
  with pytest.raises(ValueError, match=r"Unknown data source 'imagenet'"):
    pipeline.make_source(_config(source="imagenet"), "train")
  with pytest.raises(ValueError, match=r"splits 'train' and 'test', not 'validation'"):
    pipeline.make_source(_config(), "validation")


def test_to_global_array():
  c = _config(batch_size=4)
  batch = next(pipeline.make_iterator(c, "test", train=False, process_index=0, process_count=1))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  arrays = pipeline.to_global_array(batch, sharding)
  assert sorted(arrays) == sorted(batch)
  for k, v in arrays.items():
    assert isinstance(v, jax.Array) and v.sharding == sharding
    np.testing.assert_array_equal(np.asarray(v), batch[k])
  per_leaf = pipeline.to_global_array(batch, {k: sharding for k in batch})
  np.testing.assert_array_equal(np.asarray(per_leaf["label"]), batch["label"])


def test_cli_streams_batches(capsys):
  argv = ["pipeline", "--preset=tiny", "--num_batches=2", "--batch_size=4", "--num_workers=0"]
  assert pipeline.main(argv + ["--eval", "--split=test"]) == 0
  text = capsys.readouterr().out
  assert "video_patches:   uint8 (4, 32, 384)" in text
  assert "audio: float32 (4, 4096)" in text and "mask:" in text
  assert "2 batches of 4 from synthetic (test, preset tiny, 0 workers)" in text
