"""Loads pickles of plain numpy data without letting the file run code.

`pickle.load` calls whatever callable the file names (a `__reduce__` that
returns `os.system` runs a shell command), so it must never see a file we did
not write. `load_numpy_pickle` uses a `pickle.Unpickler` whose `find_class`
(the hook the standard library documents for this purpose: Python docs,
"Restricting Globals" in the `pickle` module page) resolves only the few
globals that a pickle of numpy arrays, numpy scalars, dicts, lists and tuples
needs:

* `numpy.ndarray`, `numpy.dtype` and numpy's array/scalar rebuilders
  (`_reconstruct`, `scalar`, `_frombuffer`), under both their numpy 2 module
  path (`numpy._core.*`) and the numpy 1 one (`numpy.core.*`) that older
  pickles name;
* `collections.OrderedDict`;
* `_codecs.encode`, which protocol-2 pickles use to rebuild `bytes`.

Everything else is refused with an `UnsafePickleError` naming the file and the
global, before anything is called. The loaded object is then checked to be a
tree of dicts / lists / tuples whose leaves are numeric numpy arrays (no
object dtype), numpy scalars, Python numbers, strings, bytes or None.
"""

from __future__ import annotations

import importlib
import os
import pickle
from typing import Any

import numpy as np

PathLike = str | os.PathLike

# (module, name) pairs a pickle of plain numpy data may name. numpy 1 pickles
# say `numpy.core.*`; numpy 2 renamed that package `numpy._core` and keeps
# `numpy.core` only as a deprecated alias, so both spellings map to the
# numpy 2 location (see `_resolve`).
_NUMPY_CORE_GLOBALS = {
  ("multiarray", "_reconstruct"),
  ("multiarray", "scalar"),
  ("numeric", "_frombuffer"),
}
_ALLOWED = (
  {("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"), ("_codecs", "encode")}
  | {(f"numpy.core.{m}", n) for m, n in _NUMPY_CORE_GLOBALS}
  | {(f"numpy._core.{m}", n) for m, n in _NUMPY_CORE_GLOBALS}
)

_PLAIN_LEAVES = (int, float, complex, bool, str, bytes, type(None))


class UnsafePickleError(pickle.UnpicklingError):
  """A pickle names a global outside the allow-list or holds non-numpy data."""


def _resolve(module: str, name: str) -> Any:
  if module.startswith("numpy.core."):
    # Prefer the numpy 2 location: importing `numpy.core.*` warns there.
    try:
      return getattr(importlib.import_module("numpy._core." + module[len("numpy.core.") :]), name)
    except (ImportError, AttributeError):
      pass
  return getattr(importlib.import_module(module), name)


class _NumpyOnlyUnpickler(pickle.Unpickler):
  def __init__(self, file, path: str):
    super().__init__(file)
    self._path = path

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in _ALLOWED:
      raise UnsafePickleError(
        f"Refusing to load {self._path!r}: it names the global {module}.{name}, which a pickle "
        "of plain numpy arrays / dicts / lists does not need (loading it could run arbitrary "
        "code)."
      )
    return _resolve(module, name)


def _check_tree(obj: Any, where: str, path: str) -> None:
  if isinstance(obj, dict):
    for key, value in obj.items():
      if not isinstance(key, _PLAIN_LEAVES):
        raise UnsafePickleError(f"{path!r}: dict key at {where} has type {type(key).__name__}.")
      _check_tree(value, f"{where}[{key!r}]", path)
  elif isinstance(obj, list | tuple):
    for i, value in enumerate(obj):
      _check_tree(value, f"{where}[{i}]", path)
  elif isinstance(obj, np.ndarray | np.generic):
    if obj.dtype.hasobject:
      raise UnsafePickleError(f"{path!r}: the array at {where} has dtype {obj.dtype} (objects).")
  elif not isinstance(obj, _PLAIN_LEAVES):
    raise UnsafePickleError(f"{path!r}: {where} has type {type(obj).__name__}.")


def load_numpy_pickle(path: PathLike) -> Any:
  """Unpickles `path`, allowing only numpy arrays/scalars in dicts, lists and tuples.

  Raises:
    FileNotFoundError: `path` does not exist.
    UnsafePickleError: the file names any other global, or the loaded object
      holds anything but plain data (e.g. an object-dtype array).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No pickle file at {path!r}.")
  with open(path, "rb") as f:
    obj = _NumpyOnlyUnpickler(f, path).load()
  _check_tree(obj, "<root>", path)
  return obj
