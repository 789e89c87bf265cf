"""TFDS builders: write array_record, read back through tfds.data_source and Grain."""

import csv
import json
import os
import tempfile

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from avtok_jax import config_lib
from avtok_jax.data import prepare, synthetic, video_io
from avtok_jax.data import tfds as builders
from avtok_jax.data.tfds import synthetic_av

TINY = config_lib.data_config("tiny")
FPS = config_lib.fps(TINY)  # 7.8125
HS, WS = config_lib.stored_frame_size(TINY)  # 36 x 36
SR = TINY.sample_rate
WINDOW = TINY.num_samples / SR  # 0.512 s


def _source_media(seconds: float, seed: int, audio: bool = True):
  """Smooth moving gradients (H.264 keeps them well) and a tone per file."""
  t = int(round(seconds * FPS))
  yy, xx = np.mgrid[0:HS, 0:WS].astype(np.float32)
  frames = np.stack(
    [
      np.stack(
        [
          (xx * 5 + 20 * k + 40 * seed) % 200 + 20,
          (yy * 4 + 10 * k) % 200 + 30,
          np.full_like(xx, 60 + 30 * seed + 5 * k),
        ],
        axis=-1,
      )
      for k in range(t)
    ]
  ).astype(np.uint8)
  wave = None
  if audio:
    n = int(round(seconds * SR))
    wave = (0.4 * np.sin(2 * np.pi * (250 + 120 * seed) * np.arange(n) / SR)).astype(np.float32)
  return frames, wave


def _write(path, seconds, seed, audio=True):
  frames, wave = _source_media(seconds, seed, audio)
  video_io.write_mp4(path, frames, wave, fps=FPS, sample_rate=SR)
  return frames, wave


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
  """good.mp4 (1.2 s: two full windows + a short one), clip.mkv (lossless audio),
  noaudio.mp4, short.mp4 (0.25 s, shorter than one window), corrupt.mp4."""
  d = tmp_path_factory.mktemp("media")
  sources = {
    "good.mp4": _write(str(d / "good.mp4"), 1.2, 0),
    "clip.mkv": _write(str(d / "clip.mkv"), 0.6, 1),
    "noaudio.mp4": _write(str(d / "noaudio.mp4"), 0.6, 2, audio=False),
    "short.mp4": _write(str(d / "short.mp4"), 0.25, 3),
  }
  (d / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(3000))
  return d, sources


def _config(**overrides):
  c = config_lib.data_config("tiny")
  for k, v in overrides.items():
    c[k] = v
  return c


def _build_av_folder(tmp_path, manual_dir, csv_path=None, num_proc=1, **overrides):
  builder = builders.AvFolder(
    config="tiny",
    data_dir=str(tmp_path / "out"),
    data_config=_config(**overrides),
    csv_path=csv_path and str(csv_path),
    num_proc=num_proc,
  )
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
  )
  return builder


def _records(data_dir, name, split):
  source = tfds.data_source(name, split=split, data_dir=str(data_dir), download=False)
  # Through Grain, as the pipeline reads it.
  return list(grain.MapDataset.source(source)), source


def _decoded(path, start, missing_audio="error"):
  """What video_io gives for one clip at the stored size: the builder must store exactly this."""
  media = video_io.load_media(
    path, fps=FPS, height=HS, width=WS, sample_rate=SR, missing_audio=missing_audio
  )
  return video_io.cut_clip(
    media, start=start, num_frames=TINY.num_frames, num_samples=TINY.num_samples, short_clip="pad"
  )


def test_synthetic_av_writes_generator_clips(tmp_path):
  builder = builders.SyntheticAv(
    config="tiny", data_dir=str(tmp_path), num_train=4, num_test=2, data_config=_config()
  )
  builder.download_and_prepare()
  spec = synthetic_av.generator_spec(TINY)
  assert (spec.height, spec.width) == (HS, WS)
  names = list(synthetic.class_names(TINY.num_classes))
  seen = {}
  for split, n in (("train", 4), ("test", 2)):
    records, source = _records(tmp_path, "synthetic_av/tiny", split)
    assert len(records) == n
    assert source.dataset_info.features["label"].names == names
    indices = []
    for r in records:
      seed, index = [int(p.split("=")[1]) for p in r["source"].decode().split(":")[1:]]
      assert seed == synthetic_av.split_seed(TINY, split)
      expected = synthetic_av.make_record(spec, seed, index)
      for key in ("video", "audio", "event_times", "event_frames", "event_kinds"):
        np.testing.assert_array_equal(r[key], expected[key], err_msg=key)
      assert r["video"].shape == (4, HS, WS, 3) and r["video"].dtype == np.uint8
      assert r["audio"].dtype == np.int16
      assert r["label"] == expected["label"] and r["label_name"] == expected["label_name"]
      assert names[r["label"]] == r["label_name"].decode()
      indices.append(index)
      seen[(split, index)] = r["video"]
    assert sorted(indices) == list(range(n))
  # Train and test come from different generator streams.
  for (split, _), video in seen.items():
    if split == "test":
      assert not any(np.array_equal(video, v) for (s, _), v in seen.items() if s == "train"), (
        "a test clip equals a train clip"
      )
  report = builders.read_report(builder.data_dir)
  assert report["examples"] == {"train": 4, "test": 2}
  assert report["skipped"] == []


def test_av_folder_filename_csv_pad_and_error(tmp_path, media_dir):
  folder, sources = media_dir
  csv_path = tmp_path / "labels.csv"
  csv_path.write_text(
    "filename,label,split\n"
    "good.mp4,dog,train\n"
    "clip.mkv,cat,test\n"
    "noaudio.mp4,dog,train\n"
    "short.mp4,cat,train\n"
    "corrupt.mp4,dog,train\n"
    "missing.mp4,bird,train\n"
  )
  builder = _build_av_folder(
    tmp_path, folder, csv_path, short_clip="pad", missing_audio="error", max_clips_per_file=3
  )
  report = builder.report
  assert report == builders.read_report(builder.data_dir)
  assert report["csv_layout"] == "filename"
  kinds = {(s["file"], s["kind"]) for s in report["skipped"]}
  assert kinds == {
    ("noaudio.mp4", "undecodable"),
    ("corrupt.mp4", "undecodable"),
    ("missing.mp4", "missing"),
  }
  reasons = {s["file"]: s["reason"] for s in report["skipped"]}
  assert "no audio" in reasons["noaudio.mp4"]
  assert "corrupt.mp4" in reasons["corrupt.mp4"]
  assert report["skipped_counts"] == {"undecodable": 2, "missing": 1}
  # good.mp4: 1.2 s -> windows at 0, 0.512 (full) and 1.024 (padded);
  # short.mp4: 0.25 s -> one padded window; clip.mkv: 0.6 s, max 3 -> 0 and 0.512 (padded).
  assert report["examples"] == {"train": 4, "test": 2}
  assert report["padded_clips"] == 3
  # All labels of the CSV count (bird's only file is missing), sorted.
  train, source = _records(builder.data_dir_root, "av_folder/tiny", "train")
  test, _ = _records(builder.data_dir_root, "av_folder/tiny", "test")
  assert source.dataset_info.features["label"].names == ["bird", "cat", "dog"]
  got = sorted((r["source"].decode(), round(float(r["start"]), 3)) for r in train + test)
  assert got == [
    ("clip.mkv", 0.0),
    ("clip.mkv", 0.512),
    ("good.mp4", 0.0),
    ("good.mp4", 0.512),
    ("good.mp4", 1.024),
    ("short.mp4", 0.0),
  ]
  csv_labels = {"good.mp4": "dog", "clip.mkv": "cat", "short.mp4": "cat"}
  for r in train + test:
    name = r["source"].decode()
    assert r["label_name"].decode() == csv_labels[name]
    assert r["label"] == ["bird", "cat", "dog"].index(csv_labels[name])
    assert r["has_audio"]
    frames, wave = _decoded(str(folder / name), float(r["start"]))
    np.testing.assert_array_equal(r["video"], frames)
    np.testing.assert_array_equal(r["audio"], builders.common.audio_to_int16(wave))
  # Against what was written (lossy H.264): the first clip of good.mp4.
  first = next(r for r in train if r["source"] == b"good.mp4" and r["start"] == 0)
  src_frames, src_wave = sources["good.mp4"]
  assert np.abs(first["video"].astype(int) - src_frames[:4].astype(int)).mean() < 3
  # clip.mkv has lossless PCM audio: equal up to int16 rounding.
  mkv = next(r for r in test if r["start"] == 0)
  np.testing.assert_allclose(
    mkv["audio"] / 32767, sources["clip.mkv"][1][: TINY.num_samples], atol=2e-4
  )


def test_av_folder_no_header_skip_and_silence(tmp_path, media_dir):
  folder, _ = media_dir
  csv_path = tmp_path / "two_columns.csv"
  csv_path.write_text("good.mp4,dog\nnoaudio.mp4,cat\nshort.mp4,cat\n")
  builder = _build_av_folder(
    tmp_path, folder, csv_path, short_clip="skip", missing_audio="silence", max_clips_per_file=3
  )
  report = builder.report
  skipped = sorted((s["file"], s["kind"], s.get("start")) for s in report["skipped"])
  assert skipped == [
    ("good.mp4", "too_short", pytest.approx(1.024)),
    ("noaudio.mp4", "too_short", pytest.approx(0.512)),
    ("short.mp4", "too_short", 0.0),
  ]
  assert report["silent_audio_files"] == ["noaudio.mp4"]
  assert report["unlisted_files"] == 2  # clip.mkv, corrupt.mp4
  # Without a split column everything is train.
  assert report["examples"] == {"train": 3}  # good.mp4 x2, noaudio.mp4 x1
  records, _ = _records(builder.data_dir_root, "av_folder/tiny", "train")
  silent = [r for r in records if r["source"] == b"noaudio.mp4"]
  assert len(silent) == 1 and not silent[0]["has_audio"]
  assert not np.any(silent[0]["audio"])
  frames, _ = _decoded(str(folder / "noaudio.mp4"), 0.0, missing_audio="silence")
  np.testing.assert_array_equal(silent[0]["video"], frames)


def test_av_folder_vggsound_csv_parallel(tmp_path):
  folder = tmp_path / "vggsound"
  folder.mkdir()
  _write(str(folder / "abc_000010.mp4"), 0.6, 0)
  _write(str(folder / "-x_y_000030.mp4"), 0.6, 1)
  _write(str(folder / "plainid.mp4"), 0.6, 2)
  csv_path = tmp_path / "vggsound.csv"
  with open(csv_path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["abc", "10", "vehicle horn, car horn, honking", "train"])
    w.writerow(["-x_y", "30", "dog barking", "test"])
    w.writerow(["plainid", "7", "dog barking", "train"])
    w.writerow(["gone", "5", "cat meowing", "train"])
  builder = _build_av_folder(tmp_path, folder, csv_path, num_proc=2)
  report = builder.report
  assert report["csv_layout"] == "vggsound"
  assert [(s["file"], s["kind"]) for s in report["skipped"]] == [("gone_000005", "missing")]
  assert report["examples"] == {"train": 2, "test": 1}
  names = ["cat meowing", "dog barking", "vehicle horn, car horn, honking"]
  train, source = _records(builder.data_dir_root, "av_folder/tiny", "train")
  test, _ = _records(builder.data_dir_root, "av_folder/tiny", "test")
  assert source.dataset_info.features["label"].names == names
  got = sorted((r["source"].decode(), r["label_name"].decode(), r["label"]) for r in train)
  assert got == [
    ("abc_000010.mp4", names[2], 2),
    ("plainid.mp4", names[1], 1),
  ]
  assert [r["source"] for r in test] == [b"-x_y_000030.mp4"]
  frames, wave = _decoded(str(folder / "-x_y_000030.mp4"), 0.0)
  np.testing.assert_array_equal(test[0]["video"], frames)
  np.testing.assert_array_equal(test[0]["audio"], builders.common.audio_to_int16(wave))


def test_av_folder_labels_from_folders(tmp_path):
  folder = tmp_path / "videos"
  (folder / "dog").mkdir(parents=True)
  (folder / "cat" / "more").mkdir(parents=True)
  _write(str(folder / "dog" / "a.mp4"), 0.6, 0)
  _write(str(folder / "cat" / "more" / "b.webm"), 0.6, 1)
  builder = _build_av_folder(tmp_path, folder)
  assert builder.report["csv"] is None
  records, source = _records(builder.data_dir_root, "av_folder/tiny", "train")
  assert source.dataset_info.features["label"].names == ["dog", "more"]
  got = sorted((r["source"].decode(), r["label_name"].decode()) for r in records)
  assert got == [(os.path.join("cat", "more", "b.webm"), "more"), ("dog/a.mp4", "dog")]


def test_bad_inputs_raise_clear_errors(tmp_path, media_dir):
  folder, _ = media_dir
  bad = tmp_path / "bad.csv"
  bad.write_text("good.mp4,dog,train\nclip.mkv,cat\n")
  with pytest.raises(ValueError, match=r"bad\.csv.*line 2: expected 3 columns"):
    builders.av_folder.read_csv(str(bad))
  bad.write_text("a,b,c,d,e\n")
  with pytest.raises(ValueError, match=r"line 1: expected 'filename,label\[,split\]'"):
    builders.av_folder.read_csv(str(bad))
  bad.write_text("good.mp4,dog,train/x\n")
  with pytest.raises(ValueError, match=r"split name 'train/x'"):
    builders.av_folder.read_csv(str(bad))
  # Every file fails: the error names the files instead of TFDS's generic one.
  only_bad = tmp_path / "only_bad.csv"
  only_bad.write_text("corrupt.mp4,dog\n")
  with pytest.raises(ValueError, match=r"no usable clip.*corrupt\.mp4: undecodable"):
    _build_av_folder(tmp_path, folder, only_bad)
  # The stored geometry is the preset's.
  with pytest.raises(ValueError, match=r"crop_margin=0 \(preset 'tiny' stores 4\)"):
    builders.SyntheticAv(config="tiny", data_dir=str(tmp_path), data_config=_config(crop_margin=0))


def test_prepare_cli_prints_summary(tmp_path, media_dir, capsys):
  folder, _ = media_dir
  out = tmp_path / "data"
  assert (
    prepare.main(
      [
        "prepare",
        "--source=synthetic_av",
        "--preset=tiny",
        "--num=3",
        "--num_test=1",
        f"--data_dir={out}",
      ]
    )
    == 0
  )
  text = capsys.readouterr().out
  assert "train: 3 clips" in text and "test: 1 clips" in text
  assert f"--config.data.source=tfds:synthetic_av --config.data.data_dir={out}" in text
  assert (
    prepare.main(
      [
        "prepare",
        "--source=av_folder",
        "--preset=tiny",
        f"--manual_dir={folder}",
        f"--data_dir={out}",
        "--missing_audio=silence",
      ]
    )
    == 0
  )
  text = capsys.readouterr().out
  # No CSV: labels are the folder name, and the corrupt file is reported.
  assert "train: 4 clips" in text
  assert "SKIPPED 1 (undecodable: 1)" in text and "corrupt.mp4" in text
  assert "files without audio, given silence: 1" in text
  assert "--config.data.source=tfds:av_folder" in text and "--config.data.num_classes=1" in text
  with open(os.path.join(out, "av_folder", "tiny", "1.0.0", "prepare_report.json")) as f:
    assert json.load(f)["skipped_counts"] == {"undecodable": 1}


def test_av_folder_reads_the_generator_export(tmp_path):
  # `python -m avtok_jax.data.synthetic --out DIR` writes mp4s and labels.csv,
  # which av_folder picks up without --csv.
  folder = tmp_path / "export"
  synthetic.write_clips(str(folder), 3, preset="tiny", split="test", progress=False)
  builder = _build_av_folder(tmp_path, folder)
  assert builder.report["csv"] == str(folder / "labels.csv")
  assert builder.report["examples"] == {"test": 3}
  records, source = _records(builder.data_dir_root, "av_folder/tiny", "test")
  names = source.dataset_info.features["label"].names
  for r in records:
    index = int(r["source"].decode()[:6])
    expected = synthetic.generate(synthetic_av.generator_spec(TINY), 0, index)
    assert r["label_name"].decode() == expected["label_name"]
    assert names[r["label"]] == expected["label_name"]


def test_builders_leave_no_temp_dirs(tmp_path, monkeypatch):
  """TFDS's `DatasetInfo.initialize_from_bucket` leaves an empty mkdtemp("tfds") per unprepared
  builder; ours (`common.LocalDatasetInfo`) make none, in a build nor in a "not prepared" check."""
  scratch = tmp_path / "scratch"
  scratch.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))
  builder = builders.SyntheticAv(
    config="tiny", data_dir=str(tmp_path / "data"), num_train=2, num_test=0, data_config=_config()
  )
  assert not builder.is_prepared()
  builder.download_and_prepare()
  (tmp_path / "videos" / "dog").mkdir(parents=True)
  _write(str(tmp_path / "videos" / "dog" / "a.mp4"), 0.6, 0)
  _build_av_folder(tmp_path, tmp_path / "videos")
  assert (
    tfds.builder("synthetic_av/tiny", data_dir=str(tmp_path / "elsewhere")).is_prepared() is False
  )
  assert sorted(p.name for p in scratch.iterdir() if p.name.endswith("tfds")) == []
