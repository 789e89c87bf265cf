"""Tests of the HiFi-GAN generator port (avtok_jax.pretrained.hifigan).

The released generators cannot be downloaded here, so the tests build a small
PyTorch generator written below from the structure of jik876/hifi-gan's
`models.py` (`Generator`, `ResBlock1`), with torch's own weight normalisation,
so that its state dict has exactly the public key names
(`conv_pre.weight_g`, `ups.0.weight_v`, `resblocks.3.convs1.2.bias`, ...).
Random weights (with g far from ||v||, so the folding matters) go through the
converter CLI's `convert` and `load_vocoder`, and the JAX waveform is
compared with PyTorch's. The small network upsamples by 4 * 4 * 4 = 64 and
takes 32 mels: the 'tiny' preset's mel, which stands in for HiFi-GAN's
22.05 kHz / 80-band mel (`vocoder_mel=TINY_MEL`).
"""

from __future__ import annotations

import math
import warnings

import jax
import numpy as np
import pytest
import torch

from avtok_jax import config_lib
from avtok_jax.data import audio
from avtok_jax.pretrained import convert, hifigan, weights

TINY_MEL = audio.MelSpec.from_config(config_lib.data_config("tiny"))
SMALL = hifigan.HiFiGANConfig(
  n_mels=TINY_MEL.n_mels,
  upsample_rates=(4, 4, 4),
  upsample_kernel_sizes=(8, 8, 8),
  upsample_initial_channel=32,
  resblock_kernel_sizes=(3, 5),
  resblock_dilation_sizes=((1, 3, 5), (1, 3, 5)),
)
FRAMES = 10


# ----------------------------------------------------------------------------
# PyTorch reference (jik876/hifi-gan models.py: Generator with ResBlock1)
# ----------------------------------------------------------------------------


def _wn(module: torch.nn.Module, parametrized: bool) -> torch.nn.Module:
  if parametrized:
    return torch.nn.utils.parametrizations.weight_norm(module)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # the legacy API is what the checkpoints used
    return torch.nn.utils.weight_norm(module)


class _TorchResBlock1(torch.nn.Module):
  def __init__(self, ch: int, k: int, dilations, parametrized: bool):
    super().__init__()
    self.convs1 = torch.nn.ModuleList(
      _wn(torch.nn.Conv1d(ch, ch, k, 1, dilation=d, padding=d * (k - 1) // 2), parametrized)
      for d in dilations
    )
    self.convs2 = torch.nn.ModuleList(
      _wn(torch.nn.Conv1d(ch, ch, k, 1, dilation=1, padding=(k - 1) // 2), parametrized)
      for _ in dilations
    )

  def forward(self, x):
    for c1, c2 in zip(self.convs1, self.convs2, strict=True):
      h = torch.nn.functional.leaky_relu(x, 0.1)
      h = torch.nn.functional.leaky_relu(c1(h), 0.1)
      x = x + c2(h)
    return x


class _TorchGenerator(torch.nn.Module):
  def __init__(self, cfg: hifigan.HiFiGANConfig, parametrized: bool = False):
    super().__init__()
    ch = cfg.upsample_initial_channel
    self.num_kernels = len(cfg.resblock_kernel_sizes)
    self.conv_pre = _wn(torch.nn.Conv1d(cfg.n_mels, ch, 7, 1, padding=3), parametrized)
    self.ups = torch.nn.ModuleList()
    self.resblocks = torch.nn.ModuleList()
    for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True)):
      c_in, c_out = ch // 2**i, ch // 2 ** (i + 1)
      self.ups.append(
        _wn(torch.nn.ConvTranspose1d(c_in, c_out, k, u, padding=(k - u) // 2), parametrized)
      )
      for rk, dil in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True):
        self.resblocks.append(_TorchResBlock1(c_out, rk, dil, parametrized))
    self.conv_post = _wn(torch.nn.Conv1d(c_out, 1, 7, 1, padding=3), parametrized)

  def forward(self, x):
    x = self.conv_pre(x)
    for i, up in enumerate(self.ups):
      x = up(torch.nn.functional.leaky_relu(x, 0.1))
      blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
      x = sum(block(x) for block in blocks) / self.num_kernels
    x = self.conv_post(torch.nn.functional.leaky_relu(x))
    return torch.tanh(x)[:, 0]


def _torch_model(cfg=SMALL, seed: int = 0, parametrized: bool = False) -> _TorchGenerator:
  """A reference generator with random weights; g is rescaled so that w != v / ||v|| * g0."""
  torch.manual_seed(seed)
  model = _TorchGenerator(cfg, parametrized).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(("weight_g", "original0")):
        p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
  return model


def _torch_wave(model: _TorchGenerator, log_mel: np.ndarray) -> np.ndarray:
  torch.set_num_threads(2)
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(log_mel, np.float32))).numpy()


def _state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _removed_weight_norm(model: torch.nn.Module) -> dict[str, np.ndarray]:
  """The state dict with plain `.weight` keys, as `remove_weight_norm` leaves it."""
  sd = _state_dict(model)
  out = {k: v for k, v in sd.items() if not k.endswith(("weight_g", "weight_v"))}
  for key in sd:
    if key.endswith(".weight_g"):
      prefix = key[: -len(".weight_g")]
      out[prefix + ".weight"] = dict(model.named_modules())[prefix].weight.detach().numpy().copy()
  return out


def _assert_close(got: np.ndarray, want: np.ndarray) -> None:
  assert got.shape == want.shape
  scale = float(np.max(np.abs(want)))
  assert scale > 1e-3  # a real comparison, not of two near-zero signals
  assert float(np.max(np.abs(got - want))) <= 1e-4 * scale


@pytest.fixture(scope="module")
def model():
  return _torch_model()


@pytest.fixture(scope="module")
def log_mel():
  rng = np.random.default_rng(0)
  return rng.uniform(-8.0, 1.0, (2, TINY_MEL.n_mels, FRAMES)).astype(np.float32)


@pytest.fixture(scope="module")
def converted(model, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("hifigan")
  torch.save({"generator": model.state_dict()}, tmp / "g.pth")
  return convert.convert("hifigan", tmp / "g.pth", tmp / "converted")


@pytest.fixture(scope="module")
def vocoder(converted):
  return hifigan.load_vocoder(converted, mel_spec=TINY_MEL, vocoder_mel=TINY_MEL)


# ----------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------


def test_converted_checkpoint_matches_pytorch(vocoder, model, log_mel, converted):
  assert vocoder.config == SMALL  # inferred from the shapes
  assert vocoder.hop_length == 64 and vocoder.sample_rate == TINY_MEL.sample_rate
  got = vocoder.log_mel_to_wave(log_mel)
  assert got.dtype == np.float32 and got.shape == (2, FRAMES * 64)
  _assert_close(got, _torch_wave(model, log_mel))
  info = (converted / weights.CONVERTED_INFO).read_text()
  assert '"net": "hifigan"' in info


def test_weight_norm_removed_and_parametrized_keys(model, log_mel, tmp_path):
  plain = _removed_weight_norm(model)
  assert "ups.1.weight" in plain and not any(k.endswith("weight_g") for k in plain)
  path = tmp_path / "plain.safetensors"
  weights.save_state_dict(path, plain)
  voc = hifigan.load_vocoder(path, mel_spec=TINY_MEL, vocoder_mel=TINY_MEL)
  _assert_close(voc.log_mel_to_wave(log_mel), _torch_wave(model, log_mel))
  # torch.nn.utils.parametrizations.weight_norm keys: same weights, same params.
  new = _torch_model(parametrized=True)
  assert "conv_pre.parametrizations.weight.original0" in new.state_dict()
  a = hifigan.convert_state_dict(_state_dict(new), source="new")["params"]
  b = hifigan.convert_state_dict(_removed_weight_norm(model), source="old")["params"]
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), a, b)


def test_normalised_mel_path_matches_pytorch_on_log_mel(vocoder, model):
  """wave -> audio.log_mel -> normalize -> Vocoder (denormalises) == torch on the log-mel."""
  t = np.arange(FRAMES * TINY_MEL.hop_length) / TINY_MEL.sample_rate
  waves = np.stack([np.sin(2 * np.pi * 440 * t), 0.3 * np.sign(np.sin(2 * np.pi * 97 * t))])
  waves = waves.astype(np.float32)
  log_mel = audio.log_mel(waves, TINY_MEL)
  assert log_mel.shape == (2, TINY_MEL.n_mels, FRAMES)
  got = vocoder(audio.normalize(log_mel, TINY_MEL))
  _assert_close(got, _torch_wave(model, log_mel))
  # The drop-in for audio.mel_to_wave: one clip, natural-log mel, optional length.
  one = vocoder.mel_to_wave(log_mel[0], TINY_MEL)
  np.testing.assert_allclose(one, got[0], rtol=0, atol=1e-6)  # normalize round trip: 1 ulp
  assert vocoder.mel_to_wave(log_mel[0], TINY_MEL, length=100).shape == (100,)
  padded = vocoder.mel_to_wave(log_mel[0], TINY_MEL, length=FRAMES * 64 + 5)
  np.testing.assert_array_equal(padded[-5:], 0.0)


def test_transposed_conv_matches_torch_for_odd_padding():
  """ConvTranspose1d padding semantics, also where kernel - stride is odd and not 2 * stride."""
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 3, 5)).astype(np.float32)  # torch [B, C, T]
  for k, s in ((7, 3), (4, 4), (5, 2), (6, 2)):
    w = rng.standard_normal((3, 4, k)).astype(np.float32)  # [in, out, k]
    p = (k - s) // 2
    want = torch.nn.functional.conv_transpose1d(
      torch.from_numpy(x), torch.from_numpy(w), stride=s, padding=p
    ).numpy()
    conv = hifigan.ConvTranspose1d(4, k, s, p, precision=jax.lax.Precision.HIGHEST)
    params = {"kernel": np.transpose(w, (2, 0, 1)), "bias": np.zeros(4, np.float32)}
    got = np.asarray(conv.apply({"params": params}, x.transpose(0, 2, 1))).transpose(0, 2, 1)
    assert got.shape == want.shape == (2, 4, (5 - 1) * s - 2 * p + k)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# Rates that are not kernel / 2 and two dilations: not inferable from the shapes.
_ODD = hifigan.HiFiGANConfig(
  n_mels=32,
  upsample_rates=(3,),
  upsample_kernel_sizes=(7,),
  upsample_initial_channel=8,
  resblock_kernel_sizes=(3,),
  resblock_dilation_sizes=((1, 2),),
)


def test_explicit_config_for_non_v1_rates(log_mel):
  """Rates that are not kernel / 2 cannot be inferred: config= gives them."""
  cfg = _ODD
  torch_model = _torch_model(cfg, seed=1)
  sd = _state_dict(torch_model)
  with pytest.raises(ValueError, match="pass config="):
    hifigan.convert_state_dict(sd, source="odd.pth")
  params = hifigan.convert_state_dict(sd, source="odd.pth", config=cfg)["params"]
  got = hifigan.generator_apply(
    params, log_mel[:1], config=cfg, precision=jax.lax.Precision.HIGHEST
  )
  _assert_close(np.asarray(got), _torch_wave(torch_model, log_mel[:1]))


def test_converter_set_records_the_config_for_the_loader(log_mel, tmp_path):
  """`--set` gives what the shapes cannot; convert.json keeps it; load_vocoder reads it back."""
  cfg = _ODD
  torch_model = _torch_model(cfg, seed=1)
  torch.save({"generator": torch_model.state_dict()}, tmp_path / "g_odd")  # no suffix, as released
  argv = ["--net=hifigan", f"--src={tmp_path / 'g_odd'}", f"--dst={tmp_path / 'out'}"]
  assert convert.main(argv) == 2  # not inferable, and nothing given
  sets = ["--set=upsample_rates=[3]", "--set=resblock_dilation_sizes=[[1, 2]]"]
  assert convert.main(argv + sets) == 0
  assert weights.converted_info(tmp_path / "out")["config"]["upsample_rates"] == [3]
  mel = audio.MelSpec(sample_rate=96, n_fft=9, hop_length=3, win_length=9, n_mels=32, fmax=48)
  vocoder = hifigan.load_vocoder(tmp_path / "out", mel_spec=mel, vocoder_mel=mel)
  assert vocoder.config == cfg
  got = vocoder.log_mel_to_wave(log_mel[:1])
  _assert_close(np.asarray(got), _torch_wave(torch_model, log_mel[:1]))


def test_v1_layout_and_size():
  """A full-size V1 torch generator: keys/shapes as published, 13.92 M parameters, V1 inferred."""
  sd = _state_dict(_TorchGenerator(hifigan.HiFiGANConfig()))
  want = hifigan.hifigan_state_dict_shapes()
  assert {k: v.shape for k, v in sd.items()} == want
  assert want["conv_pre.weight_g"] == (512, 1, 1) and want["ups.0.weight_g"] == (512, 1, 1)
  assert want["ups.0.weight_v"] == (512, 256, 16) and want["ups.3.weight_v"] == (64, 32, 4)
  assert want["resblocks.11.convs2.2.weight_v"] == (32, 32, 11)
  assert want["conv_post.weight_v"] == (1, 32, 7) and want["conv_post.bias"] == (1,)
  assert hifigan.infer_config(sd) == hifigan.HiFiGANConfig()
  params = hifigan.convert_state_dict(sd, source="generator_v1")["params"]
  count = sum(np.size(a) for a in jax.tree.leaves(params))
  assert 13.92e6 <= count < 13.93e6
  assert hifigan.config_from_params(params) == hifigan.HiFiGANConfig()


def test_missing_and_misshaped_keys_are_named(model, tmp_path):
  sd = _state_dict(model)
  broken = dict(sd)
  del broken["resblocks.3.convs1.2.weight_v"]
  broken["ups.1.bias"] = np.zeros(3, np.float32)
  broken["conv_post.weight_g"] = np.ones((2, 1, 1), np.float32)
  path = tmp_path / "broken.npz"
  weights.save_state_dict(path, broken)
  with pytest.raises(ValueError) as e:
    convert.convert("hifigan", path, tmp_path / "out")
  msg = str(e.value)
  assert str(path) in msg
  assert "missing key 'resblocks.3.convs1.2.weight_v'" in msg
  assert "'ups.1.bias' has shape (3,), expected (8,)" in msg
  assert "'conv_post.weight_g' has shape (2, 1, 1), expected (1, 1, 1)" in msg
  # A whole layer gone (weight norm removed or not), and a stray key.
  plain = _removed_weight_norm(model)
  del plain["conv_pre.weight"]
  plain["mpd.extra"] = np.zeros(1, np.float32)
  with pytest.raises(ValueError, match=r"'conv_pre\.weight_g'.*'conv_pre\.weight'") as e:
    hifigan.convert_state_dict(plain, source="'x.pth'")
  assert "'x.pth'" in str(e.value) and "unexpected keys ['mpd.extra']" in str(e.value)
  resblock2 = {"resblocks.0.convs.0.weight_v": np.zeros((4, 4, 3), np.float32)}
  with pytest.raises(ValueError, match="ResBlock2"):
    hifigan.convert_state_dict({**sd, **resblock2}, source="v3")


def test_mel_mismatch_is_refused(converted, vocoder, log_mel):
  # Default vocoder_mel is HiFi-GAN V1's (hop 256, 80 mels): the small network does not fit it.
  with pytest.raises(ValueError, match=r"upsamples by 64.*hop_length 256.*32 mel bands"):
    hifigan.load_vocoder(converted, mel_spec=TINY_MEL)
  # Our mel (the tiny preset) against a vocoder trained on another mel.
  other = audio.MelSpec(
    sample_rate=16000, n_fft=256, hop_length=64, win_length=256, n_mels=32, fmax=8000.0
  )
  with pytest.raises(ValueError, match=r"sample_rate 8000 vs 16000; fmax 4000\.0 vs 8000\.0"):
    hifigan.load_vocoder(converted, mel_spec=TINY_MEL, vocoder_mel=other)
  with pytest.raises(ValueError, match="spec differs"):
    vocoder.mel_to_wave(log_mel[0], other)
  with pytest.raises(ValueError, match=r"\[\.\.\., 32, frames"):
    vocoder(np.zeros((2, 80, FRAMES), np.float32))
  # The paper preset's mel is HiFi-GAN V1's.
  paper = audio.MelSpec.from_config(config_lib.data_config("paper"))
  assert hifigan.mel_mismatches(paper, hifigan.HIFIGAN_V1_MEL) == []
  assert math.prod(hifigan.HiFiGANConfig().upsample_rates) == paper.hop_length


def test_config_validation():
  with pytest.raises(ValueError, match="ResBlock2"):
    hifigan.HiFiGANConfig(resblock="2")
  with pytest.raises(ValueError, match="equal length"):
    hifigan.HiFiGANConfig(upsample_rates=(8, 8))
