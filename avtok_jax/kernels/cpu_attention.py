"""Fused multi-head attention for XLA:CPU through the XLA FFI.

`attention(q, k, v, causal)` equals `jax.nn.dot_product_attention(q, k, v,
is_causal=causal)` for q, k, v [..., L, heads, d] (tested to float32 rounding,
values and gradients) but runs as one custom call forward and one backward
(`cpu_attention.cc`): each (batch, head) pair is one work item on XLA's
intra-op thread pool, and the [L, L] scores never leave a thread-local buffer.
The backward recomputes the probabilities from the saved log-sum-exp, so the
residuals are q, k, v, the output and [..., heads, L] floats.

Build: the first call compiles `cpu_attention.cc` with the C++ compiler `$CXX`
(default `c++`) against the FFI headers shipped in jaxlib, with
`-march=native`, into `$AVTOK_KERNEL_CACHE` (default
`~/.cache/avtok_jax/kernels`), keyed by the source, the jaxlib version, the
compiler and this CPU; later processes load the cached library (~5 s once).
Without a working compiler `available()` is False with a warning saying why,
and `layers.dot_product_attention` uses the pure-XLA `explicit_attention`.
`AVTOK_CPU_ATTENTION=xla` chooses that path on purpose (A/B benchmarks).

Sharding: with several devices both calls are `custom_partitioning` ops, so
under a mesh that splits batch and/or heads each device runs the kernel on
its shard (a split length or head dim is gathered first: each work item
needs whole rows).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import re
import shlex
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

SOURCE = Path(__file__).with_name("cpu_attention.cc")
_FORWARD = "avtok_cpu_attention_forward"
_BACKWARD = "avtok_cpu_attention_backward"
_SYMBOLS = {_FORWARD: "AvtokAttentionForward", _BACKWARD: "AvtokAttentionBackward"}


def cache_dir() -> Path:
  """Where compiled kernels are kept (`$AVTOK_KERNEL_CACHE` or the user cache dir)."""
  if path := os.environ.get("AVTOK_KERNEL_CACHE"):
    return Path(path)
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "avtok_jax" / "kernels"


def _compiler() -> list[str]:
  return shlex.split(os.environ.get("CXX", "c++"))


def _compile_command(output: Path) -> list[str]:
  return [
    *_compiler(),
    "-O3",
    "-march=native",  # the library is cached per CPU (see _cpu_signature)
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-isystem",
    jax.ffi.include_dir(),
    str(SOURCE),
    "-o",
    str(output),
  ]


def _cpu_signature() -> str:
  """This CPU's model and feature flags (what -march=native compiles for)."""
  try:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return platform.processor() or platform.machine()
  keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
  return "\n".join(sorted(set(keep)))


def library_path() -> Path:
  """Compiles `cpu_attention.cc` unless a library built the same way is cached; its path.

  Raises RuntimeError with the compiler's message if compilation fails.
  """
  try:
    version = subprocess.run(
      [*_compiler(), "--version"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
  except (OSError, subprocess.SubprocessError) as e:
    raise RuntimeError(f"no working C++ compiler {_compiler()} ({e}); set $CXX") from e
  key = hashlib.sha256()
  for part in (SOURCE.read_bytes(), jaxlib.__version__, version, _cpu_signature()):
    key.update(part if isinstance(part, bytes) else part.encode())
  key.update(" ".join(_compile_command(Path("out"))).encode())
  path = cache_dir() / f"cpu_attention-{key.hexdigest()[:16]}.so"
  if path.exists():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  # Build beside the target and rename: processes building at once (pytest
  # workers) never load a half-written library.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
  os.close(fd)
  try:
    done = subprocess.run(_compile_command(Path(tmp)), capture_output=True, text=True, timeout=600)
    if done.returncode:
      raise RuntimeError(f"compiling {SOURCE} failed:\n{done.stderr[-3000:]}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


@functools.cache
def _load() -> bool:
  try:
    library = ctypes.cdll.LoadLibrary(str(library_path()))
  except (RuntimeError, OSError) as e:
    warnings.warn(
      f"avtok_jax: fused CPU attention unavailable, using the pure-XLA path instead: {e}",
      RuntimeWarning,
      stacklevel=3,
    )
    return False
  for target, symbol in _SYMBOLS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  return True


def available() -> bool:
  """Whether `attention` can run here (compiling the kernel on the first call)."""
  return os.environ.get("AVTOK_CPU_ATTENTION", "kernel") != "xla" and _load()


_CALL = re.compile(
  r'custom_call_target="(avtok_cpu_attention_(?:forward|backward))", '
  r"operand_layout_constraints=\{\w+\[([\d,]+)\](?:\{[\d,]*\})?, \w+\[([\d,]+)\]"
)


def hlo_flops(hlo_text: str) -> float:
  """Matmul FLOPs of the kernel's custom calls in compiled HLO text.

  XLA's cost analysis counts custom calls as 0 FLOPs, so benchmarks add
  these: per call 2 * (matmuls) * batch * heads * Lq * Lk * d, with the
  matmuls the maths needs (forward: q k^T and P v; backward: dv, dP, dq, dk)
  -- what XLA counts for the same attention written in XLA ops; the
  backward's recomputation of q k^T is not counted.
  """
  total = 0.0
  for target, q_shape, k_shape in _CALL.findall(hlo_text):
    *batch, lq, heads, dim = (int(x) for x in q_shape.split(","))
    lk = int(k_shape.split(",")[-3])
    matmuls = 2 if target == _FORWARD else 4
    total += 2.0 * matmuls * math.prod(batch) * heads * lq * lk * dim
  return total


def _check(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
  if not (q.ndim == k.ndim == v.ndim >= 3):
    raise ValueError(
      f"attention wants q, k, v [..., L, heads, d]; got {q.shape}, {k.shape}, {v.shape}"
    )
  if k.shape != v.shape or q.shape[:-3] + q.shape[-2:] != k.shape[:-3] + k.shape[-2:]:
    raise ValueError(
      f"attention: k and v must match and q may differ from k only in length; got q {q.shape}, "
      f"k {k.shape}, v {v.shape}"
    )


def _f32(*xs: jax.Array) -> tuple[jax.Array, ...]:
  return tuple(x.astype(jnp.float32) for x in xs)


def _forward_call(q, k, v, causal):
  """The forward custom call on float32 q, k, v: (out, lse [..., heads, Lq])."""
  *batch, length, heads, _ = q.shape
  return jax.ffi.ffi_call(
    _FORWARD,
    (
      jax.ShapeDtypeStruct(q.shape, jnp.float32),
      jax.ShapeDtypeStruct((*batch, heads, length), jnp.float32),
    ),
    vmap_method="broadcast_all",
  )(q, k, v, causal=bool(causal))


def _backward_call(q, k, v, out, lse, d_out, causal):
  """The backward custom call on float32 operands: (dq, dk, dv)."""
  shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
  return jax.ffi.ffi_call(_BACKWARD, shapes, vmap_method="broadcast_all")(
    q, k, v, out, lse, d_out, causal=bool(causal)
  )


def _head_specs(spec: P, rank: int) -> tuple[P, P]:
  """Shardings the kernel accepts, from q's: (for [..., L, heads, d], for lse [..., heads, L]).

  Leading (batch) dims and heads keep their mesh axes; the length and head
  dims are whole on each device (each work item needs a head's full rows).
  """
  spec = tuple(spec) + (None,) * (rank - len(spec))
  *lead, _, heads, _ = spec
  return P(*lead, None, heads, None), P(*lead, heads, None)


# Sharding-rule factors of each operand / result kind (Shardy notation): q / k
# lengths, heads, head dim; "..." are the leading batch dims.
_RULES = {"q": "... q h d", "kv": "... k h d", "lse": "... h q"}


def _partitioned(call, operands: tuple[str, ...], results: tuple[str, ...]):
  """`call` as a `custom_partitioning` op: each device runs the kernel on its shard.

  Without this XLA cannot split a custom call and gathers whole operands on
  every device. `operands` / `results` name each array's kind (`_RULES`).
  """
  op = custom_partitioning(call, static_argnums=(len(operands),))

  def shardings(mesh, arg_shapes, kinds):
    x, lse = _head_specs(arg_shapes[0].sharding.spec, len(arg_shapes[0].shape))
    return tuple(NamedSharding(mesh, lse if kind == "lse" else x) for kind in kinds)

  def infer(causal, mesh, arg_shapes, result_shape):
    del causal, result_shape
    return shardings(mesh, arg_shapes, results)

  def partition(causal, mesh, arg_shapes, result_shape):
    del result_shape
    local = functools.partial(call, causal=causal)
    outs, ins = shardings(mesh, arg_shapes, results), shardings(mesh, arg_shapes, operands)
    return mesh, local, outs, ins

  rule = ", ".join(_RULES[k] for k in operands) + " -> " + ", ".join(_RULES[k] for k in results)
  # Listed in the order the factors first appear in the rule (Shardy wants it).
  op.def_partition(partition, infer, sharding_rule=rule, need_replication_factors=("q", "d", "k"))
  return op


_forward_partitioned = _partitioned(_forward_call, ("q", "kv", "kv"), ("q", "lse"))
_backward_partitioned = _partitioned(
  _backward_call, ("q", "kv", "kv", "q", "lse", "q"), ("q", "kv", "kv")
)


def _multi_device() -> bool:
  return jax.device_count() > 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = False) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v for q, k, v [..., L, heads, d] (causal: top-left aligned).

  Computed in float32 and returned in q's dtype. Builds and registers the
  kernel on first use; RuntimeError where it cannot (see `available()`).
  With several devices the calls are `custom_partitioning` ops (batch and
  heads stay split as the operands are); on one device plain custom calls
  (which also support `jax.vmap`).
  """
  return _forward(q, k, v, causal)[0]


def _forward(q, k, v, causal):
  _check(q, k, v)
  if not _load():
    raise RuntimeError("the fused CPU attention kernel could not be built here (see the warning)")
  call = _forward_partitioned if _multi_device() else _forward_call
  out, lse = call(*_f32(q, k, v), bool(causal))
  return out.astype(q.dtype), (q, k, v, out, lse)


def _backward(causal, residuals, d_out):
  q, k, v, out, lse = residuals
  call = _backward_partitioned if _multi_device() else _backward_call
  q32, k32, v32, g32 = _f32(q, k, v, d_out)
  dq, dk, dv = call(q32, k32, v32, out, lse, g32, bool(causal))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


attention.defvjp(_forward, _backward)
