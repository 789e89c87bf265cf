"""Tests of the CAV-MAE encoder port (avtok_jax.pretrained.cav_mae).

The released checkpoints cannot be downloaded here, so a PyTorch reference of
CAV-MAE's encoder is written below from the public model's structure
(YuanGongND/cav-mae `src/models/cav_mae.py`: timm-style blocks whose class
carries norm1/norm2 and the unified block's norm1_a/norm2_a/norm1_v/norm2_v,
patch-embedding convolutions, stored position embeddings, modality tokens,
`forward_feat`), filled with random weights (LayerNorms included) in a small
configuration, saved under the public key names with the DataParallel
`module.` prefix and a few decoder keys, and converted with the real
converter. The Kaldi fbank is checked against a torch reference of the same
documented steps (torchaudio is not installed).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from avtok_jax import config_lib
from avtok_jax.data import audio
from avtok_jax.models import alignment
from avtok_jax.pretrained import cav_mae, convert, weights

torch.set_default_dtype(torch.float32)


# ---------------------------------------------------------------------------- torch reference


class TorchAttention(nn.Module):
  def __init__(self, dim: int, heads: int):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
    return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class TorchMlp(nn.Module):
  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class TorchBlock(nn.Module):
  """Every block of the public class has all six LayerNorms; `modality` picks a pair."""

  def __init__(self, dim: int, heads: int, hidden: int):
    super().__init__()
    for name in ("norm1", "norm1_a", "norm1_v", "norm2", "norm2_a", "norm2_v"):
      setattr(self, name, nn.LayerNorm(dim))
    self.attn, self.mlp = TorchAttention(dim, heads), TorchMlp(dim, hidden)

  def forward(self, x, modality=None):
    s = "" if modality is None else f"_{modality}"
    x = x + self.attn(getattr(self, f"norm1{s}")(x))
    return x + self.mlp(getattr(self, f"norm2{s}")(x))


class TorchPatchEmbed(nn.Module):
  def __init__(self, channels: int, dim: int, p: int):
    super().__init__()
    self.proj = nn.Conv2d(channels, dim, kernel_size=p, stride=p)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class TorchCAVMAE(nn.Module):
  def __init__(self, c: cav_mae.CAVMAEConfig):
    super().__init__()
    d = c.width
    self.patch_embed_a = TorchPatchEmbed(1, d, c.patch_size)
    self.patch_embed_v = TorchPatchEmbed(3, d, c.patch_size)
    self.modality_a = nn.Parameter(torch.zeros(1, 1, d))
    self.modality_v = nn.Parameter(torch.zeros(1, 1, d))
    self.pos_embed_a = nn.Parameter(torch.zeros(1, c.num_audio_patches, d))
    self.pos_embed_v = nn.Parameter(torch.zeros(1, c.num_video_patches, d))

    def blocks(n):
      return nn.ModuleList(TorchBlock(d, c.num_heads, c.mlp_dim) for _ in range(n))

    self.blocks_a, self.blocks_v = blocks(c.modality_depth), blocks(c.modality_depth)
    self.blocks_u = blocks(c.unified_depth)
    self.norm_a, self.norm_v, self.norm = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
    # A piece of the MAE decoder: the converter must ignore it.
    self.decoder_embed = nn.Linear(d, 16)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, 16))

  def forward_feat(self, a, v):
    a = self.patch_embed_a(a.unsqueeze(1).transpose(2, 3)) + self.pos_embed_a + self.modality_a
    v = self.patch_embed_v(v) + self.pos_embed_v + self.modality_v
    for blk in self.blocks_a:
      a = blk(a)
    for blk in self.blocks_v:
      v = blk(v)
    for blk in self.blocks_u:
      a = blk(a, "a")
    for blk in self.blocks_u:
      v = blk(v, "v")
    return self.norm_a(a), self.norm_v(v)


def _torch_model(config: cav_mae.CAVMAEConfig, seed: int = 0) -> TorchCAVMAE:
  torch.manual_seed(seed)
  model = TorchCAVMAE(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif p.ndim == 1:
        p.copy_(0.1 * torch.randn_like(p))
      elif p.ndim >= 2 and not name.startswith(("pos_embed", "modality", "mask")):
        fan_in = math.prod(p.shape[1:])
        p.copy_(torch.randn_like(p) / math.sqrt(fan_in))
      else:
        p.copy_(0.5 * torch.randn_like(p))
  return model


CONFIGS = {16: cav_mae.CAVMAEConfig.small(16), 8: cav_mae.CAVMAEConfig.small(8)}


def _convert(patch: int, tmp):
  """(config, torch model, jax variables, loaded config, folder) via the real converter path."""
  config = CONFIGS[patch]
  model = _torch_model(config, seed=patch)
  sd = {f"module.{k}": v for k, v in model.state_dict().items()}
  torch.save(sd, tmp / "cav.pth")
  # Heads and mel bins are in no weight shape: given at conversion (the CLI's
  # --set for one patch size, the function's keywords for the other), recorded
  # in convert.json, and read back by the loader without being repeated.
  dst = tmp / "converted"
  if patch == 8:
    argv = ["--net=cav_mae", f"--src={tmp / 'cav.pth'}", f"--dst={dst}"]
    assert convert.main(argv + ["--set=num_heads=2", "--set", "num_mel_bins=32"]) == 0
  else:
    convert.convert("cav_mae", tmp / "cav.pth", dst, num_heads=2, num_mel_bins=32)
  variables, loaded_config = cav_mae.load_cav_mae(dst)
  assert loaded_config == config
  return config, model, variables, loaded_config, tmp


def test_config_recorded_at_conversion_and_bad_overrides(tmp_path):
  config = CONFIGS[16]
  torch.save(_torch_model(config).state_dict(), tmp_path / "cav.pth")
  # Without --set, the released models' defaults are assumed (width // 64 heads, 128 bins):
  # wrong for this small model, and recorded as such, so a user can see what was assumed.
  dst = convert.convert("cav_mae", tmp_path / "cav.pth", tmp_path / "default")
  info = weights.converted_info(dst)
  assert info["config"]["num_heads"] == 1 and info["config"]["num_mel_bins"] == 128
  with pytest.raises(ValueError, match="no valid CAVMAEConfig"):
    convert.convert("cav_mae", tmp_path / "cav.pth", tmp_path / "bad", num_layers=3)
  with pytest.raises(ValueError, match="no size config"):
    convert.convert("i3d", tmp_path / "cav.pth", tmp_path / "bad", num_heads=3)
  assert convert.parse_overrides(["a=[8, 8]", "b=x", "c=2"]) == {"a": [8, 8], "b": "x", "c": 2}
  with pytest.raises(ValueError, match="not KEY=VALUE"):
    convert.parse_overrides(["num_heads"])


@pytest.fixture(scope="module", params=[16, 8], ids=["p16", "p8"])
def converted(request, tmp_path_factory):
  return _convert(request.param, tmp_path_factory.mktemp(f"cav_p{request.param}"))


def _features(config, model, variables, fbank, frames):
  enc = cav_mae.CAVMAEEncoder(config, precision=jax.lax.Precision.HIGHEST)
  a, v = jax.jit(enc.apply)(variables, jnp.asarray(fbank), jnp.asarray(frames))
  with torch.no_grad():
    ta, tv = model.forward_feat(
      torch.from_numpy(fbank), torch.from_numpy(np.moveaxis(frames, -1, 1).copy())
    )
  return np.asarray(a), np.asarray(v), ta.numpy(), tv.numpy()


def _assert_close(got, want, rtol=1e-4):
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


# ---------------------------------------------------------------------------- encoder


def test_encoder_matches_torch(converted):
  config, model, variables, loaded_config, _ = converted
  assert loaded_config.audio_length == config.audio_length
  assert loaded_config.patch_size == config.patch_size
  rng = np.random.default_rng(0)
  fbank = rng.standard_normal((2, config.audio_length, config.num_mel_bins)).astype(np.float32)
  frames = rng.standard_normal((2, config.image_size, config.image_size, 3)).astype(np.float32)
  a, v, ta, tv = _features(loaded_config, model, variables, fbank, frames)
  assert a.shape == (2, config.num_audio_patches, config.width)
  assert v.shape == (2, config.num_video_patches, config.width)
  _assert_close(a, ta)
  _assert_close(v, tv)


def test_preprocessing_path_matches_torch(converted):
  """Wave at 22,050 Hz -> audio_input; uint8 frames -> video_input; both towers vs torch."""
  config, model, variables, loaded_config, _ = converted
  rng = np.random.default_rng(1)
  sr = 22050
  t = np.arange(int(0.5 * sr)) / sr
  wave = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
  fbank = cav_mae.audio_input(wave, sr, config)
  assert fbank.shape == (config.audio_length, config.num_mel_bins) and fbank.dtype == np.float32
  # 0.5 s -> 8000 samples at 16 kHz -> 48 frames, then zero fbank (normalised) padding.
  assert cav_mae.num_fbank_frames(8000) == 48
  np.testing.assert_allclose(fbank[48:], (0 - cav_mae.FBANK_MEAN) / cav_mae.FBANK_STD, rtol=1e-6)
  uint8 = rng.integers(0, 256, (1, config.image_size, config.image_size, 3), dtype=np.uint8)
  frames = np.asarray(cav_mae.video_input(uint8, config.image_size))
  # torchvision ToTensor + Normalize, by hand.
  mean, std = np.array(cav_mae.IMAGENET_MEAN), np.array(cav_mae.IMAGENET_STD)
  np.testing.assert_allclose(frames, (uint8 / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
  # Our [-1, 1] float convention lands on the same input.
  floats = uint8.astype(np.float32) / 127.5 - 1.0
  np.testing.assert_allclose(
    np.asarray(cav_mae.video_input(floats, config.image_size)), frames, atol=1e-5
  )
  a, v, ta, tv = _features(loaded_config, model, variables, fbank[None], frames)
  _assert_close(a, ta)
  _assert_close(v, tv)


def test_infer_config_and_specs_of_vit_b():
  """ViT-B shapes: 512 audio patches on an 8 x 64 grid, 196 video patches, 12 + 1 blocks."""
  c = cav_mae.CAVMAEConfig()
  assert c.audio_grid == (8, 64) and c.num_audio_patches == 512 and c.num_video_patches == 196
  specs = {s.key: s.shape for s in cav_mae.param_specs(c)}
  assert specs["patch_embed_a.proj.weight"] == (768, 1, 16, 16)
  assert specs["pos_embed_a"] == (1, 512, 768) and specs["pos_embed_v"] == (1, 196, 768)
  assert specs["blocks_a.10.attn.qkv.weight"] == (2304, 768)
  assert "blocks_u.0.norm1_v.weight" in specs and "blocks_a.11.norm1.weight" not in specs

  class Shape:  # np.shape() of a stand-in array without allocating ViT-B
    def __init__(self, shape):
      self.shape = shape

  shapes = {k: Shape(v) for k, v in specs.items()}
  assert cav_mae.infer_config(shapes) == c
  # The Flax tree of ViT-B is exactly what the specs convert to (shapes only, no compute).
  tree = jax.eval_shape(
    cav_mae.CAVMAEEncoder(c).init, jax.random.key(0), *cav_mae.example_inputs(c)
  )
  flat = {"/".join(p.key for p in path): leaf.shape for path, leaf in
          jax.tree_util.tree_flatten_with_path(tree["params"])[0]}  # fmt: skip
  converted = {
    "/".join(s.path): s.convert(np.empty(s.shape, np.float32)).shape for s in cav_mae.param_specs(c)
  }
  assert flat == converted
  assert sum(math.prod(v) for v in flat.values()) > 160e6  # two ViT-B towers + the shared block


def test_converter_errors_name_file_and_key(tmp_path):
  config = CONFIGS[16]
  sd = {f"module.{k}": v for k, v in _torch_model(config).state_dict().items()}
  del sd["module.blocks_u.0.norm2_v.bias"]
  sd["module.blocks_v.0.attn.qkv.weight"] = torch.zeros(5, 32)
  path = tmp_path / "broken.pth"
  torch.save(sd, path)
  with pytest.raises(ValueError) as err:
    convert.convert("cav_mae", path, tmp_path / "out")
  msg = str(err.value)
  assert str(path) in msg
  assert "missing key 'blocks_u.0.norm2_v.bias'" in msg
  assert "'blocks_v.0.attn.qkv.weight' has shape (5, 32)" in msg


def test_load_flat_file_and_mismatch(converted, tmp_path):
  config, model, variables, _, _ = converted
  flat = {k: v.numpy() for k, v in model.state_dict().items()}
  np.savez(tmp_path / "cav.npz", **flat)
  got, got_config = cav_mae.load_cav_mae(tmp_path / "cav.npz", num_heads=2, num_mel_bins=32)
  assert got_config == config
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, variables)
  with pytest.raises(ValueError, match="cav.npz"):
    cav_mae.load_cav_mae(tmp_path / "cav.npz", config=cav_mae.CAVMAEConfig.small(16, width=64))


# ---------------------------------------------------------------------------- fbank


def _torch_kaldi_fbank(wave: np.ndarray, bins: int, sr: int = 16000) -> np.ndarray:
  """The documented Kaldi fbank steps (torchaudio.compliance.kaldi) written in torch ops."""
  x = torch.from_numpy(wave.astype(np.float64))
  size, shift, nfft = int(sr * 0.025), int(sr * 0.010), 512
  frames = x.unfold(0, size, shift)  # snip_edges: whole frames only
  frames = frames - frames.mean(dim=1, keepdim=True)
  prev = torch.nn.functional.pad(frames.unsqueeze(0), (1, 0), mode="replicate").squeeze(0)
  frames = frames - 0.97 * prev[:, :-1]
  frames = frames * torch.hann_window(size, periodic=False, dtype=torch.float64)
  frames = torch.nn.functional.pad(frames, (0, nfft - size))
  power = torch.fft.rfft(frames).abs() ** 2

  def mel(f):
    return 1127.0 * torch.log(1.0 + f / 700.0)

  lo, hi = (
    mel(torch.tensor(20.0, dtype=torch.float64)),
    mel(torch.tensor(sr / 2.0, dtype=torch.float64)),
  )
  delta = (hi - lo) / (bins + 1)
  b = torch.arange(bins, dtype=torch.float64).unsqueeze(1)
  left, center, right = lo + b * delta, lo + (b + 1) * delta, lo + (b + 2) * delta
  m = mel(torch.arange(nfft // 2, dtype=torch.float64) * sr / nfft).unsqueeze(0)
  banks = torch.clamp(
    torch.minimum((m - left) / (center - left), (right - m) / (right - center)), min=0
  )
  banks = torch.nn.functional.pad(banks, (0, 1))
  eps = torch.finfo(torch.float32).eps
  return torch.clamp(power @ banks.T, min=eps).log().numpy()


@pytest.mark.parametrize("bins", [128, 32])
def test_kaldi_fbank_matches_torch_reference(bins):
  rng = np.random.default_rng(bins)
  n = 16000 + 123
  t = np.arange(n) / 16000
  wave = 0.2 * np.sin(2 * np.pi * 1000 * t) + 0.05 * rng.standard_normal(n)
  got = cav_mae.kaldi_fbank(wave, bins)
  want = _torch_kaldi_fbank(wave, bins)
  assert got.shape == (1 + (n - 400) // 160, bins) == want.shape
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
  # The lowest bands hold no FFT bin at 128 bands: they sit at the floor, as in Kaldi.
  banks = cav_mae.kaldi_mel_banks(bins)
  assert banks.shape == (bins, 257) and np.all(banks[:, -1] == 0)


def test_mel_to_fbank_estimates_kaldi_fbank():
  """Our normalised 80-band log-mel -> Kaldi fbank estimate, vs the exact fbank of the waveform."""
  spec = audio.MelSpec.from_config(config_lib.data_config("paper"))
  rng = np.random.default_rng(0)
  n = config_lib.data_config("paper").num_samples
  wave = (0.1 * rng.standard_normal(n)).astype(np.float32)
  w16 = cav_mae.resample(wave, spec.sample_rate)
  exact = cav_mae.kaldi_fbank(w16 - w16.mean())
  mel = audio.normalize(audio.log_mel(wave, spec), spec)
  est = np.asarray(jax.jit(cav_mae.mel_to_fbank, static_argnums=(1, 2))(mel[None], spec, 128))[0]
  assert est.shape == exact.shape == (444, 128)
  err = (est - exact) / cav_mae.FBANK_STD
  assert abs(err.mean()) < 0.03 and np.abs(err).mean() < 0.16, (err.mean(), np.abs(err).mean())


# ---------------------------------------------------------------------------- teacher


def test_teacher_on_tiny_preset_under_jit(tmp_path):
  config, _, _, _, tmp = _convert(8, tmp_path)
  data = config_lib.data_config("tiny")
  spec = audio.MelSpec.from_config(data)
  teacher = cav_mae.load_cav_mae_teacher(
    tmp / "converted", spec, num_heads=2, num_mel_bins=32, frame_stride=2
  )
  assert isinstance(teacher, alignment.FeatureTeacher) and teacher.feature_dim == config.width
  b = 2
  rng = np.random.default_rng(3)
  video = rng.uniform(-1, 1, (b, data.num_frames, data.height, data.width, 3)).astype(np.float32)
  wave = (0.1 * rng.standard_normal((b, data.num_samples))).astype(np.float32)
  mel = np.stack([audio.normalize(audio.log_mel(w, spec), spec) for w in wave])
  assert mel.shape == (b, data.mel.n_mels, config_lib.num_mel_frames(data))
  v_grid = tuple(
    s // p
    for s, p in zip((data.num_frames, data.height, data.width), data.video_patch, strict=True)
  )
  a_grid = (data.mel.n_mels // data.mel_patch[0], mel.shape[2] // data.mel_patch[1])

  @jax.jit
  def targets(video, mel):
    return (
      alignment.teacher_targets(teacher, "video", video, v_grid),
      alignment.teacher_targets(teacher, "audio", mel, a_grid),
    )

  tv, ta = targets(jnp.asarray(video), jnp.asarray(mel))
  assert tv.shape == (b, math.prod(v_grid), config.width)
  assert ta.shape == (b, math.prod(a_grid), config.width)
  assert np.all(np.isfinite(tv)) and np.all(np.isfinite(ta))
  # Raw grids: frames subsampled by 2; 0.512 s -> 49 fbank frames -> ceil(49 / p) time columns.
  g = config.image_size // config.patch_size
  assert jax.eval_shape(teacher.video_features, video).shape == (b, 2, g, g, config.width)
  fa = jax.eval_shape(teacher.audio_features, mel)
  keep = min(config.audio_grid[1], -(-49 // config.patch_size))
  assert fa.shape == (b, config.audio_grid[0], keep, config.width)
  # The exact waveform path gives the same grid.
  assert teacher.audio_features_from_wave(wave, data.sample_rate).shape == fa.shape
