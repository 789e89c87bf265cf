"""Every file in configs/ builds for every preset it takes, and bad values are named."""

import importlib.util
import pathlib

import pytest

from avtok_jax import config_lib, losses

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(p for p in CONFIG_DIR.glob("*.py") if not p.name.startswith("_"))


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_there_are_configs():
  assert CONFIG_FILES, f"no config files found in {CONFIG_DIR}"


# The argument each config file takes: data.py a data preset, every training
# config a model size.
DATA_ONLY = {"data.py"}
# Generator configs (configs/ar_*.py, trainer 'ar') take a generator size and
# have their own schema: tested below and in tests/test_train_ar.py.
AR_CONFIGS = sorted(p for p in CONFIG_FILES if p.name.startswith("ar_"))
TRAIN_CONFIGS = sorted(p for p in CONFIG_FILES if p.name not in DATA_ONLY and p not in AR_CONFIGS)


def _cases():
  for path in CONFIG_FILES:
    if path in AR_CONFIGS:
      continue
    presets = config_lib.DATA_PRESETS if path.name in DATA_ONLY else config_lib.MODEL_PRESETS
    for preset in presets:
      yield pytest.param(path, preset, id=f"{path.name}:{preset}")


@pytest.mark.parametrize("path,preset", list(_cases()))
def test_config_builds(path, preset):
  config = _load(path).get_config(preset)
  config_lib.check_data_config(config.data)
  assert path.read_text().lstrip().startswith(('"""', 'r"""')), "config needs a docstring"
  if path.name in DATA_ONLY:
    assert config.data.preset == preset
    return
  assert config.size == preset
  assert config.data.preset == config_lib.data_preset_for(preset)
  config_lib.check_model_config(config.model, config.data)
  # The trainer refuses stages 2 and 3 without the previous stage's workdir.
  if config.stage in ("stage2", "stage3"):
    with pytest.raises(ValueError, match="init_from is empty"):
      config_lib.check_train_config(config)
    config.init_from = "/tmp/previous_stage"
  config_lib.check_train_config(config)
  assert "--workdir=" in path.read_text(), "docstring needs the launch command"


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


# ----------------------------------------------------------------------------- training configs

# The fields the trainer reads (contract with avtok_jax/train.py).
TRAIN_FIELDS = {
  "size",
  "stage",
  "model",
  "data",
  "modalities",
  "seed",
  "total_steps",
  "init_from",
  "eval_batches",
  "mesh",
  "optim",
  "param_rules",
  "loss_weights",
  "gan",
  "prior",
  "alignment",
  "lpips",
  "fvd",
  "fad",
  "vocoder",
  "log_every",
  "sample_every",
  "checkpoint_every",
  "keep_checkpoints",
  "keep_every",
  "restart_dead_codes_every",
  "num_sample_clips",
}
STAGE_OF = {
  "vfal_stage1.py": "stage1",
  "vfal_stage2.py": "stage2",
  "vfal_stage3.py": "stage3",
  "vanilla.py": "vanilla",
}


def test_every_stage_has_a_config():
  assert sorted(p.name for p in TRAIN_CONFIGS) == sorted(STAGE_OF)


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_train_config_schema(path):
  config = _load(path).get_config("tiny")
  assert set(config) == TRAIN_FIELDS
  assert config.stage == STAGE_OF[path.name]
  assert set(config.mesh) == {"data", "fsdp", "model"}
  assert set(config.optim) == {
    "lr",
    "b1",
    "b2",
    "weight_decay",
    "warmup_steps",
    "schedule",
    "min_lr_ratio",
    "grad_clip",
  }
  assert (config.optim.lr, config.optim.b1, config.optim.b2) == (1e-4, 0.5, 0.9)  # [LARP]
  assert set(config.gan) == {
    "enabled",
    "start_step",
    "lr",
    "b1",
    "b2",
    "disc_every",
    "channels",
    "lecam_decay",
    "modalities",
  }
  assert set(config.loss_weights) <= set(losses.DEFAULT_WEIGHTS) - {"discriminator"}
  for name, weight in config.loss_weights.items():
    assert weight == losses.DEFAULT_WEIGHTS[name]
  assert config.alignment.feature_dim == config.model.align_out_dim
  assert config.total_steps == 4 and config.data.batch_size == 4 and config.data.num_workers == 0


# (modalities, loss terms present, loss terms absent) per stage [AVTOK.md section 4].
_STAGE_LOSSES = {
  "stage1": (("video",), {"video_l1", "gan", "vq", "prior", "alignment"}, {"audio_l1", "audio_l2"}),
  "stage2": (
    ("video", "audio"),
    {"audio_l1", "audio_l2", "vq", "prior", "alignment"},
    {"video_l1", "video_l2", "perceptual", "gan"},
  ),
  "stage3": (
    ("video", "audio"),
    {"video_l1", "video_l2", "audio_l1", "audio_l2", "gan"},
    {"vq", "prior", "alignment"},
  ),
  "vanilla": (
    ("video", "audio"),
    set(losses.DEFAULT_WEIGHTS) - {"discriminator"},
    set(),
  ),
}


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_stage_modalities_and_losses(path):
  config = _load(path).get_config("small")
  modalities, present, absent = _STAGE_LOSSES[config.stage]
  assert tuple(config.modalities) == modalities
  assert present <= set(config.loss_weights)
  assert not absent & set(config.loss_weights)
  assert set(config.gan.modalities) <= set(config.modalities)


def test_sizes_and_batches():
  stage1 = _load(CONFIG_DIR / "vfal_stage1.py")
  assert stage1.get_config(None).size == "small"  # the CPU demo is the default
  for size, batch in (("tiny", 4), ("small", 8), ("B", 128), ("L", 128)):
    assert stage1.get_config(size).data.batch_size == batch
  # The paper's model and data for L [paper/LARP].
  big = stage1.get_config("L")
  assert (big.model.width, big.data.num_frames, big.data.height) == (768, 16, 128)


@pytest.mark.parametrize("path", AR_CONFIGS, ids=lambda p: p.name)
def test_generator_configs(path):
  from avtok_jax import train_ar
  from avtok_jax.models import generator

  assert len(AR_CONFIGS) == 3
  text = path.read_text()
  assert (
    text.lstrip().startswith('r"""') and "--workdir=" in text and "--config.tokens_dir=" in text
  )
  module = _load(path)
  for size in generator.GENERATOR_PRESETS:
    config = module.get_config(size)
    assert config.trainer == train_ar.TRAINER and config.size == size
    assert config.task == path.stem.removeprefix("ar_")
  with pytest.raises(ValueError, match="Unknown generator size 'huge'"):
    module.get_config("huge")
  with pytest.raises(ValueError, match="Unknown config argument 'steps'"):
    module.get_config("tiny,steps=3")


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_bad_arguments_are_named(path):
  module = _load(path)
  with pytest.raises(ValueError, match="Unknown model preset 'huge'"):
    module.get_config("huge")
  with pytest.raises(ValueError, match="Unknown config argument 'steps'"):
    module.get_config("tiny,steps=3")


def test_linked_values_follow_overrides():
  config = _load(CONFIG_DIR / "vfal_stage1.py").get_config("small")
  assert config.optim.warmup_steps == config.total_steps // 20
  config.total_steps = 2000
  assert config.optim.warmup_steps == 100
  config.model.align_out_dim = 48
  assert config.alignment.feature_dim == 48
  config.optim.warmup_steps = 7  # an explicit value wins over the link
  config.total_steps = 4000
  assert config.optim.warmup_steps == 7


def test_later_stages_are_derived_from_earlier_ones(tmp_path):
  # Copy the stage configs, edit stage 1's get_config, and load stage 2 / 3
  # from the copies: the edit must reach them (STYLE.md practice 3).
  for name in ("vfal_stage1.py", "vfal_stage2.py", "vfal_stage3.py", "vanilla.py"):
    (tmp_path / name).write_text((CONFIG_DIR / name).read_text())
  with (tmp_path / "vfal_stage1.py").open("a") as f:
    f.write(
      "\n_original = get_config\n\n"
      "def get_config(arg=None):\n"
      "  config = _original(arg)\n"
      "  config.seed = 1234\n"
      "  config.optim.b2 = 0.95\n"
      "  return config\n"
    )
  for name in ("vfal_stage2.py", "vfal_stage3.py"):
    config = _load(tmp_path / name).get_config("tiny")
    assert (config.seed, config.optim.b2) == (1234, 0.95), name
  assert _load(tmp_path / "vanilla.py").get_config("tiny").seed == 0  # vanilla starts afresh
  # Unedited, stage 2 keeps stage 1's shared fields.
  s1 = _load(CONFIG_DIR / "vfal_stage1.py").get_config("small")
  s2 = _load(CONFIG_DIR / "vfal_stage2.py").get_config("small")
  for field in ("model", "data", "optim", "mesh", "prior", "alignment"):
    if field == "optim":
      s1.optim.warmup_steps = s2.optim.warmup_steps  # 5% of each stage's own steps
    assert s1[field].to_dict() == s2[field].to_dict(), field


@pytest.mark.parametrize("size", ["small", "L"])
def test_vanilla_gets_the_vfal_budget(size):
  configs = {
    name: _load(CONFIG_DIR / f"{name}.py").get_config(size)
    for name in ("vfal_stage1", "vfal_stage2", "vfal_stage3", "vanilla")
  }
  steps = {name: c.total_steps for name, c in configs.items()}
  assert steps["vanilla"] == steps["vfal_stage1"] + steps["vfal_stage2"] + steps["vfal_stage3"]
  # ... and the discriminators of stage 3 (small: mel only).
  assert configs["vanilla"].gan.modalities == configs["vfal_stage3"].gan.modalities


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("stage", "stage4", "stage='stage4'"),
    ("modalities", ("video", "speech"), "modalities="),
    ("total_steps", 0, "total_steps=0"),
    ("loss_weights.video_l3", 1.0, "unknown terms \\['video_l3'\\]"),
    ("optim.schedule", "linear", "optim.schedule='linear'"),
    ("param_rules", (("^(enc", "frozen"),), "does not compile"),
    ("model.num_heads", 5, "num_heads=5"),
  ],
)
def test_bad_train_values_are_named(field, value, message):
  config = _load(CONFIG_DIR / "vfal_stage1.py").get_config("tiny")
  *parents, leaf = field.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  node[leaf] = value
  with pytest.raises(ValueError, match=message):
    config_lib.check_train_config(config)
