"""PyTorch reference networks for the pretrained-network tests, with the public key layouts.

Each class is written here from the published definition it names (facts
only: layer order, key names, constants), so that `load_state_dict(strict=True)`
on it proves a state dict has exactly the public keys and shapes, and its
output is what the public PyTorch code computes:

* `TorchLPIPS`: LPIPS v0.1 (richzhang/PerceptualSimilarity `lpips/lpips.py`)
  on torchvision's VGG16 `features`;
* `TorchVGGish`: harritaylor/torchvggish `torchvggish/vggish.py` (`VGG`);
* `TorchI3D`: piergiaj/pytorch-i3d `pytorch_i3d.py` (`InceptionI3d` with
  `Unit3D`, `MaxPool3dSamePadding` and `InceptionModule`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from avtok_jax.pretrained import lpips


def vgg_features(c_in: int, plan: tuple) -> torch.nn.Sequential:
  """torchvision-style VGG `features`: 3x3 conv + ReLU per number, 2x2 max pool per "M"."""
  layers = []
  for v in plan:
    if v == "M":
      layers.append(torch.nn.MaxPool2d(2, 2))
    else:
      layers += [torch.nn.Conv2d(c_in, v, 3, padding=1), torch.nn.ReLU()]
      c_in = v
  return torch.nn.Sequential(*layers)


# ----------------------------------------------------------------------------
# LPIPS-VGG
# ----------------------------------------------------------------------------


class TorchLPIPS(torch.nn.Module):
  """`features.N.*` of torchvision VGG16 + lpips heads `linK.model.1.weight`."""

  def __init__(self):
    super().__init__()
    self.features = vgg_features(
      3, (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
    )
    for k, c in enumerate(lpips.TAP_CHANNELS):
      head = torch.nn.Module()
      head.model = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Conv2d(c, 1, 1, bias=False))
      setattr(self, f"lin{k}", head)

  def taps(self, x):
    out = []
    for i, layer in enumerate(self.features):
      x = layer(x)
      if i in (3, 8, 15, 22, 29):  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
        out.append(x)
    return out

  def forward(self, x, y):
    shift = torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None]
    scale = torch.tensor([0.458, 0.448, 0.450])[None, :, None, None]
    fx, fy = self.taps((x - shift) / scale), self.taps((y - shift) / scale)
    total = 0
    for k, (a, b) in enumerate(zip(fx, fy, strict=True)):
      a = a / (torch.sqrt(torch.sum(a**2, dim=1, keepdim=True)) + 1e-10)
      b = b / (torch.sqrt(torch.sum(b**2, dim=1, keepdim=True)) + 1e-10)
      head = getattr(self, f"lin{k}").model
      total = total + head((a - b) ** 2).mean(dim=(2, 3), keepdim=True)
    return total.reshape(-1)


def lpips_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  """Random LPIPS weights: He-scaled convs, small biases, non-negative heads (as trained ones)."""
  rng = np.random.default_rng(seed)
  sd = {}
  for key, shape in lpips.lpips_state_dict_shapes().items():
    if key.startswith("lin"):
      sd[key] = np.abs(rng.standard_normal(shape, dtype=np.float32)) * 0.1
    elif key.endswith("bias"):
      sd[key] = rng.standard_normal(shape, dtype=np.float32) * 0.05
    else:
      fan_in = int(np.prod(shape[1:]))
      sd[key] = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
  return sd


def torch_lpips(state_dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """The reference distance of NHWC images x, y in [-1, 1] -> [N]."""
  torch.set_num_threads(2)
  net = TorchLPIPS()
  net.load_state_dict(
    {k: torch.as_tensor(np.asarray(v)) for k, v in state_dict.items()}, strict=True
  )
  net.eval()
  with torch.no_grad():
    x, y = (torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))) for a in (x, y))
    return net(x, y).numpy()


# ----------------------------------------------------------------------------
# VGGish
# ----------------------------------------------------------------------------


class TorchVGGish(torch.nn.Module):
  """torchvggish's VGG: `features` then `embeddings`, NCHW -> NHWC flatten."""

  def __init__(self, final_relu: bool = True):
    super().__init__()
    self.features = vgg_features(1, (64, "M", 128, "M", 256, 256, "M", 512, 512, "M"))
    fcs = [torch.nn.Linear(512 * 4 * 6, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 4096)]
    fcs += [torch.nn.ReLU(), torch.nn.Linear(4096, 128)]
    self.embeddings = torch.nn.Sequential(*fcs, *([torch.nn.ReLU()] if final_relu else []))

  def forward(self, x):  # x: [B, 1, 96, 64]
    h = self.features(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1)
    return self.embeddings(h)


def torch_vggish(state_dict, examples: np.ndarray, final_relu: bool = True) -> np.ndarray:
  """Reference embeddings [B, 128] of log-mel examples [B, 96, 64]."""
  torch.set_num_threads(2)
  net = TorchVGGish(final_relu)
  net.load_state_dict(
    {k: torch.as_tensor(np.asarray(v)) for k, v in state_dict.items()}, strict=True
  )
  net.eval()
  with torch.no_grad():
    return net(torch.from_numpy(np.ascontiguousarray(examples[:, None]))).numpy()


# ----------------------------------------------------------------------------
# I3D (piergiaj/pytorch-i3d layout)
# ----------------------------------------------------------------------------


def same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """piergiaj's dynamic 'same' padding of one axis: (before, after).

  Total max(k - s, 0) when the size divides by the stride, else
  max(k - size % s, 0); before = total // 2 (`Unit3D.compute_pad`).
  """
  total = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
  return total // 2, total - total // 2


def tf_same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TensorFlow's SAME padding: output ceil(size / s), total max((out - 1) s + k - size, 0)."""
  out = math.ceil(size / stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def _pad_same(x, kernel, stride):
  pads = [same_pad(n, k, s) for n, k, s in zip(x.shape[2:], kernel, stride, strict=True)]
  (tf, tb), (hf, hb), (wf, wb) = pads
  return F.pad(x, (wf, wb, hf, hb, tf, tb))  # zeros, as F.pad's default


class TorchUnit3D(torch.nn.Module):
  """Conv3d (padding 0, dynamically 'same'-padded) -> BatchNorm3d(eps 1e-3) -> ReLU."""

  def __init__(self, c_in, c_out, kernel=(1, 1, 1), stride=(1, 1, 1), logits=False):
    super().__init__()
    self.kernel, self.stride, self.is_logits = tuple(kernel), tuple(stride), logits
    self.conv3d = torch.nn.Conv3d(c_in, c_out, kernel, stride, padding=0, bias=logits)
    if not logits:
      self.bn = torch.nn.BatchNorm3d(c_out, eps=1e-3, momentum=0.01)

  def forward(self, x):
    x = self.conv3d(_pad_same(x, self.kernel, self.stride))
    if self.is_logits:
      return x
    return F.relu(self.bn(x))


class TorchMaxPoolSame(torch.nn.Module):
  """MaxPool3d after the same dynamic padding, with zeros (piergiaj's MaxPool3dSamePadding)."""

  def __init__(self, kernel, stride):
    super().__init__()
    self.kernel, self.stride = tuple(kernel), tuple(stride)

  def forward(self, x):
    return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class TorchInception(torch.nn.Module):
  def __init__(self, c_in, channels):
    super().__init__()
    c0, c1a, c1b, c2a, c2b, c3 = channels
    self.b0 = TorchUnit3D(c_in, c0)
    self.b1a = TorchUnit3D(c_in, c1a)
    self.b1b = TorchUnit3D(c1a, c1b, (3, 3, 3))
    self.b2a = TorchUnit3D(c_in, c2a)
    self.b2b = TorchUnit3D(c2a, c2b, (3, 3, 3))
    self.b3a = TorchMaxPoolSame((3, 3, 3), (1, 1, 1))
    self.b3b = TorchUnit3D(c_in, c3)

  def forward(self, x):
    branches = (self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x)))
    return torch.cat(branches, dim=1)


# (endpoint, kind, args), as in pytorch_i3d.py's InceptionI3d.__init__.
_I3D_LAYERS = (
  ("Conv3d_1a_7x7", "unit", (64, (7, 7, 7), (2, 2, 2))),
  ("MaxPool3d_2a_3x3", "pool", ((1, 3, 3), (1, 2, 2))),
  ("Conv3d_2b_1x1", "unit", (64, (1, 1, 1), (1, 1, 1))),
  ("Conv3d_2c_3x3", "unit", (192, (3, 3, 3), (1, 1, 1))),
  ("MaxPool3d_3a_3x3", "pool", ((1, 3, 3), (1, 2, 2))),
  ("Mixed_3b", "mixed", (64, 96, 128, 16, 32, 32)),
  ("Mixed_3c", "mixed", (128, 128, 192, 32, 96, 64)),
  ("MaxPool3d_4a_3x3", "pool", ((3, 3, 3), (2, 2, 2))),
  ("Mixed_4b", "mixed", (192, 96, 208, 16, 48, 64)),
  ("Mixed_4c", "mixed", (160, 112, 224, 24, 64, 64)),
  ("Mixed_4d", "mixed", (128, 128, 256, 24, 64, 64)),
  ("Mixed_4e", "mixed", (112, 144, 288, 32, 64, 64)),
  ("Mixed_4f", "mixed", (256, 160, 320, 32, 128, 128)),
  ("MaxPool3d_5a_2x2", "pool", ((2, 2, 2), (2, 2, 2))),
  ("Mixed_5b", "mixed", (256, 160, 320, 32, 128, 128)),
  ("Mixed_5c", "mixed", (384, 192, 384, 48, 128, 128)),
)


class TorchI3D(torch.nn.Module):
  """I3D RGB stream; forward(x [B, 3, T, H, W]) -> ({endpoint: NCDHW}, logits [B, classes, T'])."""

  def __init__(self, num_classes: int = 400):
    super().__init__()
    self.names = []
    c_in = 3
    for name, kind, args in _I3D_LAYERS:
      if kind == "unit":
        module = TorchUnit3D(c_in, args[0], args[1], args[2])
        c_in = args[0]
      elif kind == "pool":
        module = TorchMaxPoolSame(*args)
      else:
        module = TorchInception(c_in, args)
        c_in = args[0] + args[2] + args[4] + args[5]
      self.add_module(name, module)
      self.names.append(name)
    self.avg_pool = torch.nn.AvgPool3d((2, 7, 7), stride=(1, 1, 1))
    self.dropout = torch.nn.Dropout(0.5)
    self.logits = TorchUnit3D(c_in, num_classes, logits=True)

  def forward(self, x):
    endpoints = {}
    for name in self.names:
      x = getattr(self, name)(x)
      endpoints[name] = x
    logits = self.logits(self.dropout(self.avg_pool(x)))
    return endpoints, logits[:, :, :, 0, 0]


def random_i3d(x: torch.Tensor, num_classes: int = 400, seed: int = 0) -> TorchI3D:
  """A TorchI3D in eval mode with random weights and BatchNorm statistics close to x's.

  Convs are He-scaled; BatchNorm's gamma is drawn in [0.5, 1.5] (piergiaj's
  checkpoints carry one, so it must be converted), beta around 0. The moving
  statistics are first set to the batch statistics of `x` (one train-mode
  pass with momentum 1, so every layer is roughly normalised and nothing
  vanishes or explodes through the 60 layers), then perturbed.
  """
  torch.manual_seed(seed)
  net = TorchI3D(num_classes)
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, torch.nn.Conv3d):
        fan_in = module.weight[0].numel()
        module.weight.normal_(0.0, math.sqrt(2.0 / fan_in))
        if module.bias is not None:
          module.bias.normal_(0.0, 0.1)
      elif isinstance(module, torch.nn.BatchNorm3d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.1)
        module.momentum = 1.0
    net.train()
    net(x)
    for module in net.modules():
      if isinstance(module, torch.nn.BatchNorm3d):
        module.momentum = 0.01
        module.running_mean.add_(torch.randn_like(module.running_mean) * 0.05)
        module.running_var.mul_(torch.empty_like(module.running_var).uniform_(0.8, 1.25))
  return net.eval()
