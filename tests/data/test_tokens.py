"""Token datasets: written by `avtok_jax.tokenize_dataset`, read by `tokens.TokenSource` / Grain.

One tiny tokenizer workdir (config.json + a checkpoint, as the trainer leaves
it) and one token folder of 6 clips (batches of 4: the last one padded) are
built once per module.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from avtok_jax import config_lib, tokenize_dataset
from avtok_jax import tokenize as tokenize_lib
from avtok_jax.data import pipeline, tokens

ROOT = pathlib.Path(__file__).resolve().parents[2]
NUM_CLIPS = 6


@pytest.fixture(scope="module")
def workdir(tiny_tokenizer_dir):
  return tiny_tokenizer_dir


@pytest.fixture(scope="module")
def token_dir(workdir, tmp_path_factory):
  out = tmp_path_factory.mktemp("tokens")
  options = tokenize_dataset.Options(num_clips=NUM_CLIPS, batch_size=4, records_per_shard=4)
  metadata = tokenize_dataset.run(str(workdir), str(out), options)
  return out, metadata


def _records(token_dir, split="train"):
  source = tokens.TokenSource(token_dir, split)
  return [source[i] for i in range(len(source))]


def test_records_equal_direct_encoding(workdir, token_dir):
  out, metadata = token_dir
  assert json.loads((out / tokens.TOKENS_FILE).read_text()) == json.loads(json.dumps(metadata))
  split = metadata["splits"]["train"]
  # 6 records in shards of 4: two files, named by index and count.
  assert split["num_records"] == NUM_CLIPS and split["skipped"] == []
  assert split["files"] == [tokens.shard_name("train", i, 2) for i in range(2)]
  assert sorted(p.name for p in out.iterdir()) == sorted(split["files"] + [tokens.TOKENS_FILE])
  config = config_lib.load_config(workdir / config_lib.RUN_CONFIG_FILE)
  assert metadata["tokenizer_workdir"] == str(workdir) and metadata["step"] == 2
  assert metadata["tokenizer_digest"] == tokens.tokenizer_digest(config)
  model = config_lib.model_config("tiny")
  assert (metadata["num_video_tokens"], metadata["num_audio_tokens"]) == (
    model.num_video_tokens,
    model.num_audio_tokens,
  )
  assert metadata["codebook_size"] == 64 and metadata["num_classes"] == 10
  assert metadata["data"] == "synthetic" and metadata["data_preset"] == "tiny"

  # Reference: the pipeline's eval batches of the same clips through the module itself.
  tok = tokenize_lib.load_tokenizer(workdir)
  c = ml_collections.ConfigDict(config.data.to_dict())
  c.batch_size, c.num_workers = NUM_CLIPS, 0
  batch = next(pipeline.make_iterator(c, "train", train=False, process_index=0, process_count=1))
  encode = jax.jit(lambda v, x, y: tok.module.apply(v, x, y, method="encode"))
  expected = encode(
    tok.variables, jnp.asarray(batch["video_patches"]), jnp.asarray(batch["mel_patches"])
  )
  records = _records(out)
  np.testing.assert_array_equal(
    np.stack([r["video_codes"] for r in records]), expected["video"]["codes"]
  )
  np.testing.assert_array_equal(
    np.stack([r["audio_codes"] for r in records]), expected["audio"]["codes"]
  )
  assert [int(r["label"]) for r in records] == list(batch["label"])
  assert [r["source"] for r in records] == [f"synthetic:seed=0:index={i}" for i in range(6)]
  for r in records:
    assert r["video_codes"].dtype == np.int32 and r["video_codes"].shape == (
      model.num_video_tokens,
    )
    assert r["audio_codes"].dtype == np.int32 and r["audio_codes"].shape == (
      model.num_audio_tokens,
    )
  # Not a degenerate tokenizer: the clips do not all share one code.
  assert len(np.unique(np.stack([r["video_codes"] for r in records]))) > 4


def test_iterator_batches_shuffles_and_resumes(token_dir):
  out, _ = token_dir
  stored = _records(out)
  rows = {tuple(r["video_codes"]) + tuple(r["audio_codes"]) + (int(r["label"]),) for r in stored}
  kwargs = dict(seed=3, process_index=0, process_count=1)
  it = tokens.make_token_iterator(out, "train", 4, **kwargs)
  head = [next(it) for _ in range(2)]
  state = it.get_state()
  expected = [next(it) for _ in range(4)]  # crosses several epochs of 6 records
  model = config_lib.model_config("tiny")
  for b in head + expected:
    assert set(b) == {"video_codes", "audio_codes", "label"}
    assert b["video_codes"].shape == (4, model.num_video_tokens)
    assert b["audio_codes"].shape == (4, model.num_audio_tokens)
    assert b["video_codes"].dtype == np.int32 and b["audio_codes"].dtype == np.int32
    assert b["label"].shape == (4,) and b["label"].dtype == np.int32
  # Every epoch is a permutation of the stored records (6 records = 1.5 batches).
  flat = [
    tuple(v) + tuple(a) + (int(lab),)
    for b in head + expected
    for v, a, lab in zip(b["video_codes"], b["audio_codes"], b["label"], strict=True)
  ]
  for epoch in range(4):
    assert set(flat[6 * epoch : 6 * epoch + 6]) == rows
  assert flat[:6] != flat[6:12]  # reshuffled each epoch
  it2 = tokens.make_token_iterator(out, "train", 4, **kwargs)
  it2.set_state(state)
  for want, got in zip(expected, [next(it2) for _ in range(4)], strict=True):
    for k in want:
      np.testing.assert_array_equal(want[k], got[k])


def test_iterator_one_epoch_in_order_and_process_shards(token_dir):
  out, _ = token_dir
  stored = np.stack([r["video_codes"] for r in _records(out)])
  it = tokens.make_token_iterator(
    out,
    "train",
    4,
    shuffle=False,
    num_epochs=1,
    drop_remainder=False,
    process_count=1,
    process_index=0,
  )
  batches = list(it)
  assert [len(b["label"]) for b in batches] == [4, 2]
  np.testing.assert_array_equal(np.concatenate([b["video_codes"] for b in batches]), stored)
  # Two processes: batch 4 = 2 each, disjoint halves of the same permutation.
  seen = []
  for index in range(2):
    it = tokens.make_token_iterator(
      out, "train", 4, seed=5, num_epochs=1, process_index=index, process_count=2
    )
    got = list(it)
    assert [len(b["label"]) for b in got] == [2]  # 3 records each, full batches only
    seen += [tuple(v) for b in got for v in b["video_codes"]]
  assert len(set(seen)) == 4 and set(seen) <= {tuple(v) for v in stored}


MULTI_DEVICE_SCRIPT = """
import json, sys
import jax
from avtok_jax import tokenize_dataset
assert jax.local_device_count() == 4, jax.devices()
# batch 3 rounds up to 4 (one clip per device); 6 clips = 4 + (2 real, 2 padding).
options = tokenize_dataset.Options(num_clips=6, batch_size=3, records_per_shard=4)
tokenize_dataset.run(sys.argv[1], sys.argv[2], options)
"""


def test_multi_device_encoding_equals_single_device(workdir, token_dir, tmp_path):
  out, _ = token_dir
  env = dict(
    os.environ,
    XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
    PYTHONPATH=str(ROOT),
  )
  proc = subprocess.run(
    [sys.executable, "-c", MULTI_DEVICE_SCRIPT, str(workdir), str(tmp_path / "tokens4")],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "on 4 cpu device(s)" in proc.stdout
  one, four = _records(out), _records(tmp_path / "tokens4")
  assert len(four) == len(one) == NUM_CLIPS
  for a, b in zip(one, four, strict=True):
    np.testing.assert_array_equal(a["video_codes"], b["video_codes"])
    np.testing.assert_array_equal(a["audio_codes"], b["audio_codes"])
    assert (a["label"], a["source"]) == (b["label"], b["source"])


def test_second_split_joins_the_folder_and_other_tokenizers_are_refused(
  workdir, token_dir, tmp_path
):
  out, _ = token_dir
  folder = tmp_path / "tokens"
  shutil.copytree(out, folder)
  options = tokenize_dataset.Options(num_clips=3, batch_size=4, split="test")
  tokenize_dataset.run(str(workdir), str(folder), options)
  meta = tokens.read_metadata(folder)
  assert {k: v["num_records"] for k, v in meta["splits"].items()} == {"test": 3, "train": 6}
  # The test split is generated with another seed: other clips.
  test = _records(folder, "test")
  assert [r["source"] for r in test] == [f"synthetic:seed=1:index={i}" for i in range(3)]
  assert len(_records(folder, "train")) == NUM_CLIPS
  meta["step"] = 7
  tokens.write_metadata(folder, meta)
  with pytest.raises(ValueError, match="already holds tokens with step=7"):
    tokenize_dataset.run(str(workdir), str(folder), options)


def test_reader_errors(token_dir, tmp_path):
  out, _ = token_dir
  with pytest.raises(ValueError, match=r"has the splits \['train'\], not 'validation'"):
    tokens.TokenSource(out, "validation")
  with pytest.raises(FileNotFoundError, match="is not a token folder"):
    tokens.TokenSource(tmp_path, "train")
  with pytest.raises(ValueError, match="shorter than the 52 bytes"):
    tokens.decode_record(b"\x00" * 20, 8, 4)
  record = tokens.encode_record(np.arange(8), np.arange(4) + 60, 7, "clip é.mp4")
  back = tokens.decode_record(record, 8, 4)
  assert back["source"] == "clip é.mp4" and int(back["label"]) == 7
  np.testing.assert_array_equal(back["audio_codes"], [60, 61, 62, 63])
  with pytest.raises(ValueError, match="divisible by process_count=2"):
    tokens.make_token_iterator(out, "train", 3, process_index=0, process_count=2)
  # A shard that went missing is named.
  broken = tmp_path / "broken"
  broken.mkdir()
  meta = tokens.read_metadata(out)
  tokens.write_metadata(broken, meta)
  with pytest.raises(FileNotFoundError, match="train.array_record-00000-of-00002"):
    tokens.TokenSource(broken, "train")
