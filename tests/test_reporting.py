"""Tests of avtok_jax.reporting: writers, progress line, parameter table, samples."""

from __future__ import annotations

import io
import math
import os
import re

import av
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from avtok_jax import config_lib, reporting
from avtok_jax.data import audio

# ----------------------------------------------------------------------------
# MetricWriter
# ----------------------------------------------------------------------------


def test_scalars_read_back_from_jsonl_and_tensorboard(tmp_path):
  logdir = tmp_path / "logs"
  with reporting.MetricWriter(logdir, enabled=True) as writer:
    writer.write_scalars(1, {"loss": 0.5, "lr": np.float32(1e-4)})
    writer.write_scalars(20, {"loss": jnp.asarray(0.25), "lr": np.asarray([2e-4])})
    writer.write_scalars(300, {"train/psnr": 21.5})
    with pytest.raises(ValueError, match="'bad'"):
      writer.write_scalars(3, {"bad": np.ones(2)})

  lines = reporting.read_metrics(logdir)
  assert [line["step"] for line in lines] == [1, 20, 300]
  assert lines[0] == {"step": 1, "loss": 0.5, "lr": pytest.approx(1e-4)}
  assert lines[1]["loss"] == 0.25 and lines[1]["lr"] == pytest.approx(2e-4)
  assert lines[2] == {"step": 300, "train/psnr": 21.5}

  scalars = reporting.read_tensorboard_scalars(logdir)
  assert set(scalars) == {"loss", "lr", "train/psnr"}
  assert scalars["loss"] == [(1, 0.5), (20, 0.25)]
  steps, values = zip(*scalars["lr"], strict=True)
  assert steps == (1, 20)
  np.testing.assert_allclose(values, [1e-4, 2e-4], rtol=1e-6)  # float32 in TensorBoard
  assert scalars["train/psnr"] == [(300, 21.5)]


def test_images_and_text_reach_the_event_file(tmp_path):
  rgb = np.zeros((6, 10, 3), np.uint8)
  rgb[:, :5, 0] = 255
  grey = np.full((4, 8), 128, np.uint8)
  with reporting.MetricWriter(tmp_path, enabled=True) as writer:
    writer.write_images(7, {"samples/video": rgb, "grey": grey})
    writer.write_text(7, {"config": "lr: 1e-4"})
    with pytest.raises(ValueError, match="'float'"):
      writer.write_images(7, {"float": rgb.astype(np.float32)})

  images, texts = {}, {}
  for event in reporting._read_events(tmp_path):
    for value in event.summary.value:
      if value.HasField("image"):
        images[value.tag] = (event.step, Image.open(io.BytesIO(value.image.encoded_image_string)))
      elif value.HasField("tensor") and value.tensor.string_val:
        texts[value.tag] = (event.step, value.tensor.string_val[0].decode())
  step, image = images["samples/video"]
  assert step == 7 and image.size == (10, 6)
  np.testing.assert_array_equal(np.asarray(image.convert("RGB")), rgb)
  assert images["grey"][1].size == (8, 4)
  assert texts == {"config/text_summary": (7, "lr: 1e-4")}


def test_resumed_run_overwrites_repeated_steps_and_appends_jsonl(tmp_path):
  with reporting.MetricWriter(tmp_path, enabled=True) as writer:
    for step in (1, 2, 3):
      writer.write_scalars(step, {"loss": float(step)})
  # A second run (resumed from step 1) rewrites steps 2 and 3.
  with reporting.MetricWriter(tmp_path, enabled=True) as writer:
    for step in (2, 3):
      writer.write_scalars(step, {"loss": 10.0 * step})
  assert len(glob_events(tmp_path)) == 2
  assert reporting.read_tensorboard_scalars(tmp_path)["loss"] == [(1, 1.0), (2, 20.0), (3, 30.0)]
  assert [m["step"] for m in reporting.read_metrics(tmp_path)] == [1, 2, 3, 2, 3]


def glob_events(path):
  return [name for name in os.listdir(path) if name.startswith("events.out.tfevents.")]


def test_disabled_writer_writes_nothing(tmp_path):
  logdir = tmp_path / "not_process_0"
  writer = reporting.MetricWriter(logdir, enabled=False)
  writer.write_scalars(1, {"loss": 1.0})
  writer.write_images(1, {"x": np.zeros((2, 2, 3), np.uint8)})
  writer.write_text(1, {"t": "x"})
  writer.flush()
  writer.close()
  assert not logdir.exists()
  assert reporting.read_metrics(logdir) == []
  assert reporting.read_tensorboard_scalars(logdir) == {}
  # On this single process the default is enabled (process 0 writes).
  assert reporting.MetricWriter(tmp_path / "chief").enabled
  out = reporting.write_samples(
    tmp_path / "samples", 1, video_in=np.zeros((1, 2, 4, 4, 3), np.uint8), fps=2.0, enabled=False
  )
  assert out == {} and not (tmp_path / "samples").exists()


def test_truncated_event_file_is_read_up_to_the_cut(tmp_path):
  with reporting.MetricWriter(tmp_path, enabled=True) as writer:
    for step in range(5):
      writer.write_scalars(step, {"x": float(step)})
  (path,) = glob_events(tmp_path)
  path = tmp_path / path
  data = path.read_bytes()
  path.write_bytes(data[:-3])  # the last record loses its footer
  assert reporting.read_tensorboard_scalars(tmp_path)["x"] == [(s, float(s)) for s in range(4)]
  corrupt = bytearray(data)
  corrupt[-6] ^= 0xFF  # a data byte of the last record
  path.write_bytes(bytes(corrupt))
  with pytest.raises(ValueError, match="corrupt"):
    reporting.read_tensorboard_scalars(tmp_path)


# ----------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------

_LINE = re.compile(
  r"^step (\d+)/(\d+) \((\d+)%\) \| (\S+) step/s \| ETA (?:(\d+)h)?(\d+)m(\d+)s(?: \| (.*))?$"
)


def _eta_seconds(match) -> int:
  hours, minutes, seconds = match.group(5, 6, 7)
  return int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds)


def test_progress_prints_every_n_steps_with_rate_and_eta():
  now = [100.0]
  stream = io.StringIO()
  progress = reporting.Progress(2000, every=10, stream=stream, clock=lambda: now[0], enabled=True)
  lines = {}
  for step in range(1, 31):
    # Step 1 takes 60 s (compilation); every later step 0.5 s.
    now[0] += 60.0 if step == 1 else 0.5
    line = progress.update(step, {"loss": 0.123456, "video_l1": jnp.asarray(0.0567)})
    if line is not None:
      lines[step] = line
  assert sorted(lines) == [10, 20, 30]
  assert stream.getvalue().splitlines() == [lines[10], lines[20], lines[30]]
  for step, line in lines.items():
    match = _LINE.match(line)
    assert match, line
    assert int(match.group(1)) == step and int(match.group(2)) == 2000
    assert int(match.group(3)) == int(100 * step / 2000)
    # The clock started after step 1, so the compile never enters the rate.
    assert float(match.group(4)) == pytest.approx(2.0)
    assert _eta_seconds(match) == round((2000 - step) / 2.0)
    assert match.group(8) == "loss 0.1235 video_l1 0.0567"
  assert "ETA 16m25s" in lines[30]  # 1970 steps at 2 step/s


def test_progress_last_step_hours_resume_and_disabled():
  now = [0.0]
  stream = io.StringIO()
  progress = reporting.Progress(
    25_005, start_step=25_000, every=1000, stream=stream, clock=lambda: now[0], enabled=True
  )
  assert progress.update(25_001) is None  # starts the clock
  now[0] += 8.0
  line = progress.update(25_005)  # the last step always prints
  match = _LINE.match(line)
  assert match and float(match.group(4)) == pytest.approx(0.5)
  assert _eta_seconds(match) == 0 and match.group(8) is None

  slow = reporting.Progress(10_000, every=5, stream=io.StringIO(), clock=lambda: now[0])
  slow.update(1)
  now[0] += 40.0
  match = _LINE.match(slow.update(5))  # 0.1 step/s, 9995 steps left
  assert float(match.group(4)) == pytest.approx(0.1)
  assert match.group(5) == "27" and _eta_seconds(match) == 99_950

  first = reporting.Progress(100, every=1, stream=io.StringIO(), clock=lambda: 0.0)
  assert first.update(1) == "step 1/100 (1%) | -- step/s | ETA --"

  quiet = io.StringIO()
  disabled = reporting.Progress(10, every=1, stream=quiet, enabled=False)
  assert disabled.update(10) is None and quiet.getvalue() == ""


# ----------------------------------------------------------------------------
# parameter_overview
# ----------------------------------------------------------------------------


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(6, name="fc1")(x)
    return nn.LayerNorm(name="norm")(x)


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(5, name="embed")(x)
    x = _Block(name="block")(x)
    return nn.Dense(3, use_bias=False, name="head")(x)


def _table_rows(text: str) -> dict[str, list[str]]:
  lines = text.splitlines()
  assert lines[0].split() == ["path", "params", "shape", "dtype", "sharding"]
  rows = {}
  for line in lines[2:]:
    if line.startswith("-"):
      continue
    cells = re.split(r"\s{2,}", line.strip())
    rows[cells[0]] = cells[1:]
  return rows


def test_parameter_overview_counts_every_module():
  params = _Net().init(jax.random.key(0), jnp.zeros((1, 4)))["params"]
  expected = {
    "embed/bias": 5,
    "embed/kernel": 20,
    "block/fc1": 36,
    "block/norm": 12,
    "head/kernel": 18,
  }
  rows = _table_rows(reporting.parameter_overview(params))
  assert {k: int(v[0].replace(",", "")) for k, v in rows.items() if k != "total"} == expected
  assert rows["embed/kernel"][1:] == ["(4, 5)", "float32"]
  assert rows["block/fc1"][1] == "2 arrays"
  total = sum(x.size for x in jax.tree.leaves(params))
  assert total == 91 and rows["total"] == ["91", "7 arrays (364 B)"]

  # Depth 1 groups whole modules; ShapeDtypeStructs work like arrays.
  abstract = jax.eval_shape(lambda: params)
  rows = _table_rows(reporting.parameter_overview(abstract, max_depth=1))
  assert {k: v[0] for k, v in rows.items()} == {
    "embed": "25",
    "block": "48",
    "head": "18",
    "total": "91",
  }
  # Deeper than the tree: every leaf on its own row.
  rows = _table_rows(reporting.parameter_overview(params, max_depth=5))
  assert rows["block/norm/scale"][:2] == ["6", "(6,)"]


def test_parameter_overview_shows_shardings():
  params = _Net().init(jax.random.key(0), jnp.zeros((1, 4)))["params"]
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("model",))
  P = jax.sharding.PartitionSpec

  def spec_for(x):
    return P(None, "model") if x.ndim == 2 else P()

  shardings = jax.tree.map(lambda x: jax.sharding.NamedSharding(mesh, spec_for(x)), params)
  sharded = jax.device_put(params, shardings)

  rows = _table_rows(reporting.parameter_overview(sharded, max_depth=3))
  assert rows["embed/kernel"][3] == "P(None, model)"
  assert rows["embed/bias"][3] == "P()"
  assert rows["total"][0] == "91"
  # From an explicit tree (e.g. the trainer's out_shardings) for abstract params.
  abstract = jax.eval_shape(lambda: params)
  rows = _table_rows(reporting.parameter_overview(abstract, shardings, max_depth=2))
  assert rows["head/kernel"][3] == "P(None, model)"
  assert rows["block/fc1"][3] == "P() P(None, model)"
  specs = jax.tree.map(spec_for, params)
  rows = _table_rows(reporting.parameter_overview(abstract, specs, max_depth=2))
  assert rows["head/kernel"][3] == "P(None, model)"
  # Without shardings, plain arrays have no sharding column entry.
  rows = _table_rows(reporting.parameter_overview(jax.tree.map(np.asarray, params)))
  assert len(rows["head/kernel"]) == 3


# ----------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------


def test_to_uint8_video():
  x = np.array([-1.0, -2.0, 0.0, 1.0, 3.0, np.nan], np.float32)
  np.testing.assert_array_equal(reporting.to_uint8_video(x), [0, 0, 128, 255, 255, 0])
  np.testing.assert_array_equal(reporting.to_uint8_video(jnp.asarray([-1.0, 1.0])), [0, 255])
  u = np.arange(256, dtype=np.uint8)
  assert reporting.to_uint8_video(u) is u


def test_colour_map_lightness_rises():
  cmap = reporting._COLOUR_MAP.astype(np.float64) / 255
  linear = np.where(cmap <= 0.04045, cmap / 12.92, ((cmap + 0.055) / 1.055) ** 2.4)
  luminance = linear @ np.array([0.2126, 0.7152, 0.0722])  # Rec. 709
  assert cmap.shape == (256, 3)
  # Rises over every 4 entries; adjacent entries may dip by uint8 rounding only
  # (the ramp is designed in OKLab lightness, which is not exactly Y).
  assert np.all(np.diff(luminance[::4]) > 0)
  assert np.all(np.diff(luminance) > -1e-4)
  assert luminance[0] < 0.03 and luminance[-1] > 0.8


def test_mel_to_rgb_puts_low_frequencies_at_the_bottom():
  mel = np.full((32, 64), -1.0, np.float32)
  mel[:4] = 1.0  # a loud band in the lowest 4 mel bins
  rgb = reporting.mel_to_rgb(mel)
  assert rgb.shape == (32, 64, 3) and rgb.dtype == np.uint8
  brightness = rgb.astype(np.float32).mean(axis=(1, 2))
  assert np.all(brightness[-4:] > brightness[:-4].max() + 50)
  np.testing.assert_array_equal(rgb[-1, 0], reporting._COLOUR_MAP[-1])
  np.testing.assert_array_equal(rgb[0, 0], reporting._COLOUR_MAP[0])
  # vmin/vmax set the range; out-of-range values clip.
  mid = reporting.mel_to_rgb(np.full((2, 2), 5.0), vmin=0.0, vmax=10.0)
  np.testing.assert_array_equal(mid[0, 0], reporting._COLOUR_MAP[128])


def test_video_grid_layout():
  n, t, h, w = 2, 12, 6, 10
  inputs = np.zeros((n, t, h, w, 3), np.uint8)
  for i in range(n):
    for f in range(t):
      inputs[i, f] = 10 * f + i
  recons = inputs + 100
  grid = reporting.video_grid(inputs, recons, max_frames=8)
  assert grid.shape == (4 * h + 3 * 2, 8 * w + 7 * 2, 3) and grid.dtype == np.uint8
  frames = np.round(np.linspace(0, t - 1, 8)).astype(int)
  assert frames[0] == 0 and frames[-1] == t - 1
  for col, f in enumerate(frames):
    x = col * (w + 2)
    assert grid[0, x, 0] == 10 * f  # clip 0 input
    assert grid[h + 2, x, 0] == 10 * f + 100  # clip 0 recon
    assert grid[2 * (h + 2), x, 0] == 10 * f + 1  # clip 1 input
    assert grid[3 * (h + 2), x, 0] == 10 * f + 101  # clip 1 recon
  assert np.all(grid[h : h + 2] == reporting._SEP_VALUE)  # separator rows
  # Fewer frames than max_frames: all of them; float input; inputs only.
  grid = reporting.video_grid(np.ones((1, 3, h, w, 3), np.float32), max_frames=8)
  assert grid.shape == (h, 3 * w + 4, 3) and grid[0, 0, 0] == 255
  with pytest.raises(ValueError, match="differ in shape"):
    reporting.video_grid(inputs, recons[:, :4])


def test_mel_grid_layout():
  inputs = np.full((3, 32, 64), -1.0, np.float32)
  recons = np.full((3, 32, 64), 1.0, np.float32)
  grid = reporting.mel_grid(inputs, recons)
  assert grid.shape == (6 * 32 + 5 * 2, 64, 3)
  np.testing.assert_array_equal(grid[0, 0], reporting._COLOUR_MAP[0])  # input on top
  np.testing.assert_array_equal(grid[34, 0], reporting._COLOUR_MAP[-1])  # recon below
  assert reporting.mel_grid(inputs).shape == (3 * 32 + 2 * 2, 64, 3)


def test_save_png(tmp_path):
  image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  path = tmp_path / "a" / "b.png"
  reporting.save_png(path, image)
  with Image.open(path) as png:
    assert png.format == "PNG"
    np.testing.assert_array_equal(np.asarray(png), image)


# ----------------------------------------------------------------------------
# write_samples
# ----------------------------------------------------------------------------


def _decoded(path) -> tuple[int, int | None, tuple[int, int]]:
  """(video frames, audio samples or None without an audio track, (H, W))."""
  with av.open(str(path)) as container:
    frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
  with av.open(str(path)) as container:
    if not container.streams.audio:
      samples = None
    else:
      samples = sum(f.samples for f in container.decode(audio=0))
  return len(frames), samples, frames[0].shape[:2]


@pytest.fixture(scope="module")
def tiny_batch():
  config = config_lib.data_config("tiny")
  spec = audio.MelSpec.from_config(config)
  n, s = 2, config.num_samples
  t = np.arange(s) / config.sample_rate
  waves = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 1500 * t)])
  waves = waves.astype(np.float32)
  mels = np.stack([audio.mel_features(w, spec) for w in waves])
  video = np.random.default_rng(0).uniform(-1, 1, (n, config.num_frames, 32, 32, 3))
  return config, spec, video.astype(np.float32), mels, waves


def test_write_samples_full(tmp_path, tiny_batch):
  config, spec, video, mels, waves = tiny_batch
  assert mels.shape == (2, 32, 64)
  out = reporting.write_samples(
    tmp_path,
    120,
    video_in=video,
    video_out=jnp.asarray(video * 0.5),
    mel_in=mels,
    mel_out=mels * 0.9,
    audio_in=waves,
    mel_spec=spec,
    fps=config_lib.fps(config),
    griffin_lim_iters=4,
  )
  folder = tmp_path / "step_0000120"
  assert out["video_png"] == [str(folder / "video.png")]
  assert out["mel_png"] == [str(folder / "mel.png")]
  assert out["input_mp4"] == [str(folder / f"clip{i}_input.mp4") for i in range(2)]
  assert out["recon_mp4"] == [str(folder / f"clip{i}_recon.mp4") for i in range(2)]
  with Image.open(folder / "video.png") as png:
    assert png.size == (4 * 32 + 3 * 2, 4 * 32 + 3 * 2)  # (width, height)
  with Image.open(folder / "mel.png") as png:
    assert png.size == (64, 4 * 32 + 3 * 2)
  for path in out["input_mp4"] + out["recon_mp4"]:
    assert _decoded(path) == (4, 4096, (32, 32))


def test_write_samples_stage1_and_inferred_fps(tmp_path, tiny_batch):
  config, spec, video, mels, _ = tiny_batch
  # Stage 1: no audio reconstruction and no waveform -> input sound from
  # Griffin-Lim of mel_in, recon without an audio track; fps from the audio.
  out = reporting.write_samples(
    tmp_path,
    3,
    video_in=video[:1],
    video_out=video[:1],
    mel_in=mels[:1],
    mel_spec=spec,
    griffin_lim_iters=2,
  )
  assert _decoded(out["input_mp4"][0]) == (4, 4096, (32, 32))
  assert _decoded(out["recon_mp4"][0]) == (4, None, (32, 32))
  with av.open(out["input_mp4"][0]) as container:
    rate = container.streams.video[0].average_rate
  assert math.isclose(float(rate), config_lib.fps(config))
  with Image.open(out["mel_png"][0]) as png:
    assert png.size == (64, 32)  # input row only
  with pytest.raises(ValueError, match="mel_spec"):
    reporting.write_samples(tmp_path, 4, video_in=video, mel_in=mels)
  with pytest.raises(ValueError, match="fps"):
    reporting.write_samples(tmp_path, 5, video_in=video)
