"""Every file in configs/ builds for every preset, and bad values are named."""

import importlib.util
import pathlib

import pytest

from avtok_jax import config_lib

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(p for p in CONFIG_DIR.glob("*.py") if not p.name.startswith("_"))


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_there_are_configs():
  assert CONFIG_FILES, f"no config files found in {CONFIG_DIR}"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("preset", config_lib.DATA_PRESETS)
def test_config_builds(path, preset):
  config = _load(path).get_config(preset)
  config_lib.check_data_config(config.data)
  assert config.data.preset == preset
  assert path.read_text().lstrip().startswith(('"""', 'r"""')), "config needs a docstring"


@pytest.mark.parametrize("preset", config_lib.DATA_PRESETS)
def test_presets_line_up_audio_and_video(preset):
  c = config_lib.data_config(preset)
  config_lib.check_data_config(c)
  # The audio covers the frames' window exactly, and a frame spans whole hops.
  assert c.num_samples / c.sample_rate == pytest.approx(c.num_frames / config_lib.fps(c))
  assert (c.num_samples // c.num_frames) % c.mel.hop_length == 0


def test_paper_preset_matches_the_paper():
  c = config_lib.data_config("paper")
  assert (c.num_frames, c.height, c.width) == (16, 128, 128)
  assert (c.num_samples, c.sample_rate) == (98304, 22050)
  assert (c.mel.n_mels, config_lib.num_mel_frames(c)) == (80, 384)


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("video_patch", (3, 8, 8), "video_patch"),
    ("num_samples", 98305, "num_samples=98305"),
    ("missing_audio", "ignore", "missing_audio"),
    ("short_clip", "drop", "short_clip"),
  ],
)
def test_bad_values_are_named(field, value, message):
  c = config_lib.data_config("paper")
  c[field] = value
  with pytest.raises(ValueError, match=message):
    config_lib.check_data_config(c)


def test_parse_arg():
  a = config_lib.parse_arg("tiny,flag=true,n=3", preset="paper", flag=False, n=1)
  assert (a.preset, a.flag, a.n) == ("tiny", True, 3)
  with pytest.raises(ValueError, match="Unknown config argument 'nope'"):
    config_lib.parse_arg("nope=1", preset="paper")
  with pytest.raises(ValueError, match="Unknown data preset"):
    config_lib.data_config("huge")
