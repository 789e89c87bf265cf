"""`python -m avtok_jax.tokenize encode|decode` and `tokenize_dataset` on real mp4 files.

The tokenizer workdir is built as in tests/data/test_tokens.py (config.json +
a checkpoint of random variables in the shapes of init), once per module.
"""

import os
import pathlib
import subprocess
import sys

import av
import numpy as np
import pytest

from avtok_jax import config_lib, tokenize_dataset
from avtok_jax import tokenize as tokenize_lib
from avtok_jax.data import synthetic, tokens, video_io

ROOT = pathlib.Path(__file__).resolve().parents[1]
_TINY = config_lib.model_config("tiny")
NV, NA = _TINY.num_video_tokens, _TINY.num_audio_tokens  # tokens per clip of the tiny tokenizer


@pytest.fixture(scope="module")
def workdir(tiny_tokenizer_dir):
  return tiny_tokenizer_dir


@pytest.fixture(scope="module")
def tok(workdir):
  return tokenize_lib.load_tokenizer(workdir)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
  """Two built-in clips as mp4 files with sound (the tiny preset: 4 frames, 0.512 s)."""
  folder = tmp_path_factory.mktemp("clips")
  paths = synthetic.write_clips(str(folder), 2, preset="tiny", progress=False)
  return folder, [pathlib.Path(p) for p in paths]


def _exit_message(argv, main=tokenize_lib.main) -> str:
  with pytest.raises(SystemExit) as e:
    main(argv)
  message = str(e.value.code)
  assert "Traceback" not in message and len(message.splitlines()) == 1, message
  return message


def test_encode_then_decode_round_trip(workdir, tok, clips, tmp_path):
  _, paths = clips
  codes_file = tmp_path / "codes.npz"
  tokenize_lib.main(
    ["tokenize", "encode", f"--workdir={workdir}", f"--input={paths[0]}", f"--output={codes_file}"]
  )
  with np.load(codes_file, allow_pickle=False) as f:
    saved = {k: f[k] for k in f.files}
  assert saved["video_codes"].dtype == np.int32 and saved["video_codes"].shape == (NV,)
  assert saved["audio_codes"].dtype == np.int32 and saved["audio_codes"].shape == (NA,)
  assert int(saved["codebook_size"]) == 64 and int(saved["step"]) == 2
  assert str(saved["tokenizer_workdir"]) == str(workdir)
  assert str(saved["tokenizer_digest"]) == tok.digest and str(saved["source"]) == str(paths[0])
  # The CLI's codes are those of the library on the same clip.
  direct = tokenize_lib.encode_clip(tok, *tokenize_lib.read_input(paths[0], tok.data_config))
  np.testing.assert_array_equal(saved["video_codes"], direct["video_codes"])
  np.testing.assert_array_equal(saved["audio_codes"], direct["audio_codes"])
  clip = tokenize_lib.load_clip(paths[0], tok.data_config)
  assert clip["video_patches"].shape == (32, 384) and clip["video_patches"].dtype == np.uint8
  assert clip["mel_patches"].shape == (32, 64) and clip["mel_patches"].dtype == np.float32
  codes = tok.encode_fn(tok.variables, clip["video_patches"][None], clip["mel_patches"][None])
  np.testing.assert_array_equal(codes["video"][0], saved["video_codes"])

  out = tmp_path / "decoded.mp4"
  tokenize_lib.main(
    ["tokenize", "decode", f"--workdir={workdir}", f"--codes={codes_file}", f"--output={out}"]
  )
  c = tok.data_config
  info = video_io.probe(out)
  assert info.has_video and info.has_audio and (info.height, info.width) == (32, 32)
  with av.open(str(out)) as container:
    stream = container.streams.audio[0]
    # The audio track holds exactly the clip's samples (AAC priming is in the edit list).
    assert stream.duration * stream.time_base * c.sample_rate == c.num_samples
    assert container.streams.video[0].frames == c.num_frames
  media = video_io.load_media(
    out, fps=config_lib.fps(c), height=c.height, width=c.width, sample_rate=c.sample_rate
  )
  assert media.frames.shape == (4, 32, 32, 3) and np.abs(media.audio).max() > 0

  video, wave = tokenize_lib.decode_codes(tok, saved["video_codes"], saved["audio_codes"])
  assert video.dtype == np.uint8 and video.shape == (4, 32, 32, 3)
  assert wave.dtype == np.float32 and wave.shape == (4096,)
  batch_video, batch_wave = tokenize_lib.decode_codes(
    tok, np.stack([saved["video_codes"]] * 2), np.stack([saved["audio_codes"]] * 2)
  )
  assert batch_video.shape == (2, 4, 32, 32, 3) and batch_wave.shape == (2, 4096)
  np.testing.assert_array_equal(batch_video[1], batch_video[0])
  # Batch 2 vs batch 1: XLA may sum in another order, so a pixel on a rounding
  # boundary can move by one uint8 level (seen: 1 of 12288).
  diff = np.abs(batch_video[1].astype(np.int16) - video)
  assert diff.max() <= 1 and np.mean(diff > 0) < 1e-3
  # No vocoder in the run's config: Griffin-Lim (tests/evaluation/test_pretrained_eval.py
  # checks a configured HiFi-GAN).
  assert tok.vocoder == "griffin_lim"
  mel = tok.decode_fn(
    tok.variables, {"video": saved["video_codes"][None], "audio": saved["audio_codes"][None]}
  )["audio"][0]
  np.testing.assert_allclose(wave, tokenize_lib.vocode(np.asarray(mel), tok.mel_spec), atol=1e-6)


def test_av_folder_tokens_equal_cli_codes_and_list_corrupt_files(
  workdir, tok, clips, tmp_path, capsys
):
  folder, paths = clips
  (folder / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
  with open(folder / "labels.csv", "a") as f:
    f.write("corrupt.mp4,red_ball_bell,train\n")
  out = tmp_path / "tokens"
  tokenize_dataset.main(
    ["tokenize_dataset", f"--workdir={workdir}", f"--data=av_folder:{folder}", f"--out={out}"]
  )
  printed = capsys.readouterr().out
  assert "Skipped 1 input file(s):" in printed and "corrupt.mp4" in printed
  assert "Tokenized 2 clips" in printed
  meta = tokens.read_metadata(out)
  skipped = meta["splits"]["train"]["skipped"]
  assert len(skipped) == 1 and skipped[0].startswith("corrupt.mp4: ")
  assert meta["data"] == f"av_folder:{folder}" and meta["num_classes"] == 2
  source = tokens.TokenSource(out, "train")
  by_name = {source[i]["source"]: source[i] for i in range(len(source))}
  assert sorted(by_name) == sorted(p.name for p in paths)
  for path in paths:
    # A file encodes to the same codes by the CLI and inside a token data set.
    direct = tokenize_lib.encode_clip(tok, *tokenize_lib.read_input(path, tok.data_config))
    np.testing.assert_array_equal(by_name[path.name]["video_codes"], direct["video_codes"])
    np.testing.assert_array_equal(by_name[path.name]["audio_codes"], direct["audio_codes"])
  (folder / "corrupt.mp4").unlink()


def test_errors_are_one_line(workdir, tok, clips, tmp_path):
  _, paths = clips
  empty = tmp_path / "empty"
  empty.mkdir()
  codes = tmp_path / "codes.npz"
  common = [f"--input={paths[0]}", f"--output={codes}"]
  assert "No checkpoints in" in _exit_message(["t", "encode", f"--workdir={empty}", *common])
  # The same through the real command line (a fresh process): one line on stderr, status 1.
  proc = subprocess.run(
    [sys.executable, "-m", "avtok_jax.tokenize", "encode", f"--workdir={empty}", *common],
    cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
    timeout=600,
  )  # fmt: skip
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert (
    proc.stderr.strip().splitlines()[-1]
    == f"avtok_jax.tokenize encode: No checkpoints in {empty} (looked for {empty}/checkpoints)."
  )
  with pytest.raises(SystemExit, match="give a command, encode or decode.\nusage:"):
    tokenize_lib.main(["t", "--workdir=x"])
  message = _exit_message(
    ["tokenize_dataset", f"--workdir={empty}", f"--out={tmp_path / 't'}"], tokenize_dataset.main
  )
  assert "No checkpoints in" in message
  message = _exit_message(
    ["tokenize_dataset", f"--workdir={workdir}", f"--out={tmp_path / 't'}", "--data=imagenet"],
    tokenize_dataset.main,
  )
  assert "--data='imagenet': use one of" in message

  # Bad inputs: the messages come from video_io and name the file.
  corrupt = tmp_path / "corrupt.mp4"
  corrupt.write_bytes(b"not a video at all" * 10)
  message = _exit_message(
    ["t", "encode", f"--workdir={workdir}", f"--input={corrupt}", f"--output={codes}"]
  )
  assert str(corrupt) in message
  silent = tmp_path / "silent.mp4"
  video_io.write_mp4(silent, np.zeros((4, 32, 32, 3), np.uint8), None, fps=7.8125, sample_rate=8000)
  message = _exit_message(
    ["t", "encode", f"--workdir={workdir}", f"--input={silent}", f"--output={codes}"]
  )
  assert "has no audio stream" in message and str(silent) in message

  # Codes files that do not fit the tokenizer.
  bad = tmp_path / "bad.npz"
  decode = [
    "t",
    "decode",
    f"--workdir={workdir}",
    f"--codes={bad}",
    f"--output={tmp_path / 'o.mp4'}",
  ]
  np.savez(bad, video_codes=np.zeros(5, np.int32), audio_codes=np.zeros(NA, np.int32))
  message = _exit_message(decode)
  assert str(bad) in message and "video_codes has shape (5,)" in message
  np.savez(
    bad, video_codes=np.zeros(NV, np.int32), audio_codes=np.zeros(NA, np.int32), codebook_size=128
  )
  message = _exit_message(decode)
  assert str(bad) in message and "codebook of 128 entries" in message
  np.savez(bad, video_codes=np.full(NV, 64, np.int32), audio_codes=np.zeros(NA, np.int32))
  message = _exit_message(decode)
  assert str(bad) in message and "outside the tokenizer's codebook [0, 64)" in message
  assert not (tmp_path / "o.mp4").exists()
  with pytest.raises(ValueError, match=r"video must be uint8 \[4, 36, 36, 3\] \(stored size\)"):
    tokenize_lib.encode_clip(tok, np.zeros((4, 30, 30, 3), np.uint8), np.zeros(4096, np.float32))
  with pytest.raises(ValueError, match="audio_codes has shape"):
    tokenize_lib.decode_codes(tok, np.zeros(NV, np.int32), np.zeros((4, 2), np.int32))
