"""Flat weight files and their mapping onto Flax parameter trees.

Pretrained networks (LPIPS's VGG16, VGGish) are shipped by their authors as
PyTorch state dicts, which are pickles: loading one runs code. We never read
those. A one-off converter (outside this package) writes the same flat
`{name: array}` dictionary, with exactly the public PyTorch key names and
layouts, to one of two data-only formats that this module reads and writes:

* `.npz`: numpy's zip of `.npy` arrays, read with `np.load(allow_pickle=False)`
  so that an object array in the file is refused instead of unpickled.
* `.safetensors`: the Hugging Face safetensors layout (an 8-byte
  little-endian header length, a JSON header `{name: {"dtype", "shape",
  "data_offsets": [begin, end]}}`, then the raw little-endian C-order
  bytes; format described in the huggingface/safetensors README). Read and
  written here with numpy alone, so the `safetensors` package is not needed.

`params_from_state_dict` then turns such a flat dictionary into a nested
Flax `params` tree, checking every expected key and shape and converting the
layouts (`conv_oihw_to_hwio`, `linear_oi_to_io`, ...) on the way. Every
problem in a file (missing keys, wrong shapes, non-float or non-finite
arrays) is reported in one ValueError that names the keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

PathLike = str | os.PathLike

SUFFIXES = (".npz", ".safetensors")

# safetensors dtype codes <-> numpy dtypes (little-endian). BF16 has no numpy
# dtype: it is widened to float32 on read (the upper 16 bits of a float32).
_ST_TO_NP = {
  "F64": np.dtype("<f8"),
  "F32": np.dtype("<f4"),
  "F16": np.dtype("<f2"),
  "I64": np.dtype("<i8"),
  "I32": np.dtype("<i4"),
  "I16": np.dtype("<i2"),
  "I8": np.dtype("i1"),
  "U8": np.dtype("u1"),
  "BOOL": np.dtype("?"),
}
_NP_TO_ST = {v.newbyteorder("="): k for k, v in _ST_TO_NP.items()}
# A header larger than this is not a weight file (the format caps it at 100 MB).
_MAX_HEADER_BYTES = 100 * 1024 * 1024


# ----------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------


def _suffix(path: PathLike) -> str:
  suffix = os.path.splitext(os.fspath(path))[1].lower()
  if suffix not in SUFFIXES:
    raise ValueError(
      f"Weight file {os.fspath(path)!r} has suffix {suffix!r}; expected one of {SUFFIXES}. "
      "PyTorch .pt/.pth/.bin files are pickles and are not loaded here: convert them once to "
      "an .npz of the state dict (np.savez(path, **{k: v.numpy() for k, v in sd.items()}))."
    )
  return suffix


def load_state_dict(path: PathLike) -> dict[str, np.ndarray]:
  """Reads a flat {name: array} weight file (.npz or .safetensors); never unpickles."""
  path = os.fspath(path)
  suffix = _suffix(path)
  if not os.path.isfile(path):
    raise ValueError(f"Weight file {path!r} does not exist (or is not a file).")
  if suffix == ".npz":
    try:
      with np.load(path, allow_pickle=False) as f:
        return {name: f[name] for name in f.files}
    except ValueError as e:  # object arrays need pickle, which we refuse
      raise ValueError(f"Weight file {path!r} could not be read without pickle: {e}") from e
    except (OSError, EOFError) as e:
      raise ValueError(f"Weight file {path!r} is not a readable .npz: {e}") from e
  return _read_safetensors(path)


def load_state_dicts(
  paths: PathLike | Sequence[PathLike],
  reader: Callable[[PathLike], Mapping[str, np.ndarray]] | None = None,
) -> dict[str, np.ndarray]:
  """`reader` (default `load_state_dict`) of one path, or of several merged.

  A key found in two files is an error naming both.
  """
  reader = reader or load_state_dict
  if isinstance(paths, str | os.PathLike):
    return dict(reader(paths))
  paths = list(paths)
  if not paths:
    raise ValueError("No weight file given.")
  merged: dict[str, np.ndarray] = {}
  origin: dict[str, str] = {}
  for path in paths:
    for name, value in reader(path).items():
      if name in merged:
        raise ValueError(f"Key {name!r} appears in both {origin[name]!r} and {os.fspath(path)!r}.")
      merged[name], origin[name] = value, os.fspath(path)
  return merged


def save_state_dict(path: PathLike, arrays: Mapping[str, Any]) -> None:
  """Writes a flat {name: array} dictionary as .npz (uncompressed) or .safetensors."""
  path = os.fspath(path)
  suffix = _suffix(path)
  arrays = {str(k): np.asarray(v) for k, v in arrays.items()}
  for name, value in arrays.items():
    if value.dtype.hasobject:
      raise ValueError(f"Array {name!r} has dtype object; only numeric arrays can be saved.")
  if suffix == ".npz":
    # np.savez appends ".npz" to names without it; ours always has it.
    np.savez(path, **arrays)
  else:
    _write_safetensors(path, arrays)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  with open(path, "rb") as f:
    blob = f.read()
  if len(blob) < 8:
    raise ValueError(f"Weight file {path!r} is too short to be .safetensors.")
  (n,) = struct.unpack("<Q", blob[:8])
  if n > min(_MAX_HEADER_BYTES, len(blob) - 8):
    raise ValueError(f"Weight file {path!r}: header length {n} is larger than the file.")
  try:
    header = json.loads(blob[8 : 8 + n].decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"Weight file {path!r}: the .safetensors header is not JSON: {e}") from e
  if not isinstance(header, dict):
    raise ValueError(f"Weight file {path!r}: the .safetensors header is not a JSON object.")
  data = memoryview(blob)[8 + n :]
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      code, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"Weight file {path!r}: bad header entry for {name!r}: {info!r}") from e
    count = int(np.prod(shape, dtype=np.int64))
    if code == "BF16":
      itemsize, dtype = 2, np.dtype("<u2")
    elif code in _ST_TO_NP:
      dtype = _ST_TO_NP[code]
      itemsize = dtype.itemsize
    else:
      raise ValueError(f"Weight file {path!r}: array {name!r} has unsupported dtype {code!r}.")
    if not 0 <= begin <= end <= len(data) or end - begin != count * itemsize:
      raise ValueError(
        f"Weight file {path!r}: array {name!r} of shape {shape} and dtype {code} has byte range "
        f"[{begin}, {end}), which does not fit the data ({len(data)} bytes)."
      )
    arr = np.frombuffer(data[begin:end], dtype=dtype).reshape(shape)
    if code == "BF16":
      arr = (arr.astype(np.uint32) << 16).view(np.float32)
    out[name] = arr.astype(arr.dtype.newbyteorder("="), copy=True)
  return out


def _write_safetensors(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  header: dict[str, Any] = {}
  chunks = []
  offset = 0
  for name in sorted(arrays):
    value = arrays[name]
    code = _NP_TO_ST.get(value.dtype.newbyteorder("="))
    if code is None:
      raise ValueError(f"Array {name!r} has dtype {value.dtype}, which .safetensors cannot hold.")
    raw = np.ascontiguousarray(value, dtype=_ST_TO_NP[code]).tobytes()
    header[name] = {
      "dtype": code,
      "shape": list(value.shape),
      "data_offsets": [offset, offset + len(raw)],
    }
    chunks.append(raw)
    offset += len(raw)
  text = json.dumps(header, separators=(",", ":")).encode("utf-8")
  text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, as the format recommends
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for raw in chunks:
      f.write(raw)


# ----------------------------------------------------------------------------
# Layout conversions (PyTorch -> Flax)
# ----------------------------------------------------------------------------


def conv_oihw_to_hwio(w: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [out, in, kh, kw] -> flax Conv kernel [kh, kw, in, out].

  Both frameworks compute a cross-correlation (no kernel flip), so a transpose
  is the whole conversion.
  """
  return np.transpose(w, (2, 3, 1, 0))


def linear_oi_to_io(w: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] (y = x W^T + b) -> flax Dense kernel [in, out]."""
  return np.transpose(w)


def same_layout(w: np.ndarray) -> np.ndarray:
  """Biases and other vectors: no change."""
  return w


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """One entry of a PyTorch state dict and where it goes in the Flax tree.

  key: the flat PyTorch key ("features.0.weight").
  path: the Flax params path (("vgg", "conv1_1", "kernel")).
  shape: the PyTorch shape, checked before conversion.
  convert: PyTorch layout -> Flax layout.
  """

  key: str
  path: tuple[str, ...]
  shape: tuple[int, ...]
  convert: Callable[[np.ndarray], np.ndarray] = same_layout


def expected_shapes(specs: Iterable[ParamSpec]) -> dict[str, tuple[int, ...]]:
  """{PyTorch key: PyTorch shape}: what a weight file must contain."""
  return {s.key: s.shape for s in specs}


def params_from_state_dict(
  state_dict: Mapping[str, Any],
  specs: Sequence[ParamSpec],
  *,
  source: str = "state dict",
  strict: bool = False,
) -> dict[str, Any]:
  """Checks a flat PyTorch-style state dict against `specs` and builds the Flax params tree.

  Every key in `specs` must be present with exactly its PyTorch shape, a
  floating dtype and finite values; all problems are collected and raised in
  one ValueError that names the keys and `source` (the file). Keys not in
  `specs` are ignored (a full torchvision VGG16 state dict also holds the
  classifier), unless `strict`. Arrays come out as float32 numpy arrays in the
  Flax layout.
  """
  problems = []
  tree: dict[str, Any] = {}
  for spec in specs:
    if spec.key not in state_dict:
      problems.append(f"missing key {spec.key!r} (expected shape {spec.shape})")
      continue
    value = np.asarray(state_dict[spec.key])
    if tuple(value.shape) != tuple(spec.shape):
      problems.append(
        f"key {spec.key!r} has shape {tuple(value.shape)}, expected {tuple(spec.shape)}"
      )
      continue
    if not np.issubdtype(value.dtype, np.floating):
      problems.append(f"key {spec.key!r} has dtype {value.dtype}, expected a float dtype")
      continue
    if not np.all(np.isfinite(value)):
      problems.append(f"key {spec.key!r} contains NaN or Inf")
      continue
    node = tree
    for part in spec.path[:-1]:
      node = node.setdefault(part, {})
    node[spec.path[-1]] = np.ascontiguousarray(spec.convert(value.astype(np.float32)))
  if strict:
    known = {s.key for s in specs}
    extra = sorted(k for k in state_dict if k not in known)
    if extra:
      problems.append(f"unexpected keys {extra}")
  if problems:
    raise ValueError(f"Invalid weights in {source}: " + "; ".join(problems) + ".")
  return tree


# ----------------------------------------------------------------------------
# Converted checkpoints (what `python -m avtok_jax.pretrained.convert` writes)
# ----------------------------------------------------------------------------

CONVERTED_PARAMS = "variables.msgpack"
CONVERTED_INFO = "convert.json"


def save_converted(
  dst: PathLike, net: str, variables: Mapping[str, Any], info: Mapping[str, Any]
) -> pathlib.Path:
  """Writes a converted network to the folder `dst`: Flax variables + what they came from.

  `dst/variables.msgpack` is `flax.serialization.msgpack_serialize` of the
  variables tree ({'params': ..., and e.g. 'batch_stats'}; msgpack holds data
  only, nothing in it is executed on load); `dst/convert.json` records the
  network name, the source files with their SHA-256 and the parameter count.
  """
  from flax import serialization

  dst = pathlib.Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  tree = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), dict(variables))
  count = int(sum(np.size(a) for a in jax.tree_util.tree_leaves(tree)))
  tmp = dst / (CONVERTED_PARAMS + ".tmp")
  tmp.write_bytes(serialization.msgpack_serialize(tree))
  tmp.replace(dst / CONVERTED_PARAMS)
  meta = {"net": net, "num_parameters": count, **dict(info)}
  (dst / CONVERTED_INFO).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
  return dst


def is_converted(path: PathLike) -> bool:
  """True when `path` is a folder written by `save_converted`."""
  return (pathlib.Path(path) / CONVERTED_PARAMS).is_file()


def config_to_json(config: Any) -> dict[str, Any]:
  """A size-config dataclass as JSON-ready data (tuples become lists)."""
  return json.loads(json.dumps(dataclasses.asdict(config)))


def lists_to_tuples(x: Any) -> Any:
  """Nested lists (JSON, `--set` values) -> nested tuples, as frozen size configs hold them."""
  return tuple(lists_to_tuples(v) for v in x) if isinstance(x, list | tuple) else x


def config_from_json(cls: type, data: Mapping[str, Any], *, source: str) -> Any:
  """`cls(**data)` with JSON lists back to tuples; unknown fields are an error naming `source`."""
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(data) - names)
  if unknown:
    raise ValueError(f"{source}: unknown {cls.__name__} fields {unknown} in {CONVERTED_INFO}.")
  return cls(**{k: lists_to_tuples(v) for k, v in data.items()})


def converted_info(path: PathLike) -> dict[str, Any]:
  """The `convert.json` of a converted folder ({} when it has none or is not a folder)."""
  info_path = pathlib.Path(path) / CONVERTED_INFO
  if not info_path.is_file():
    return {}
  try:
    return json.loads(info_path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{os.fspath(info_path)!r} is not JSON: {e}") from e


def load_converted(path: PathLike, net: str) -> dict[str, Any]:
  """Reads the variables tree (numpy float32) of a folder written by `save_converted`.

  Raises ValueError naming the folder when it is not a converted checkpoint,
  holds another network, or its msgpack is unreadable.
  """
  from flax import serialization

  path = pathlib.Path(path)
  info_path, params_path = path / CONVERTED_INFO, path / CONVERTED_PARAMS
  if not params_path.is_file() or not info_path.is_file():
    raise ValueError(
      f"{os.fspath(path)!r} is not a converted checkpoint (want {CONVERTED_PARAMS} and "
      f"{CONVERTED_INFO}); write one with: python -m avtok_jax.pretrained.convert --net={net} "
      f"--src=FILE.pth --dst={os.fspath(path)}"
    )
  try:
    info = json.loads(info_path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{os.fspath(info_path)!r} is not JSON: {e}") from e
  if info.get("net") != net:
    raise ValueError(
      f"{os.fspath(path)!r} holds a converted {info.get('net')!r} network, not {net!r}."
    )
  try:
    tree = serialization.msgpack_restore(params_path.read_bytes())
  except Exception as e:  # msgpack raises several unrelated types on corrupt input
    raise ValueError(f"{os.fspath(params_path)!r} is not a readable msgpack checkpoint: {e}") from e
  if not isinstance(tree, dict) or "params" not in tree:
    raise ValueError(f"{os.fspath(params_path)!r} holds no 'params' tree.")
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), tree)


def check_variables(got: Mapping[str, Any], expected: Mapping[str, Any], *, source: str) -> None:
  """Raises one ValueError naming `source` when `got`'s tree paths or shapes differ from `expected`.

  `expected` may hold arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape(model.init, ...)`).
  """

  def flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in p): tuple(np.shape(v)) for p, v in leaves}

  want, have = flat(expected), flat(got)
  missing = sorted(set(want) - set(have))
  extra = sorted(set(have) - set(want))
  shapes = [
    f"{k}: {have[k]} != {want[k]}" for k in sorted(set(want) & set(have)) if have[k] != want[k]
  ]
  problems = []
  if missing:
    problems.append(f"missing {missing[:5]} ({len(missing)} in all)")
  if extra:
    problems.append(f"unexpected {extra[:5]} ({len(extra)} in all)")
  if shapes:
    problems.append(f"wrong shapes {shapes[:5]} ({len(shapes)} in all)")
  if problems:
    raise ValueError(f"{source} does not match the network: " + "; ".join(problems) + ".")
