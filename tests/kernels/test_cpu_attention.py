"""The fused CPU attention kernel (avtok_jax/kernels/cpu_attention.{cc,py}).

Built by the test run itself with the local C++ compiler (into the user's
kernel cache), then checked against `jax.nn.dot_product_attention`: values and
all three gradients, causal or not, at lengths that cross the kernel's
64-row query blocks and head dims that are not multiples of its 8-lane
vectors; dtypes, leading dims, vmap, sharding over 8 host devices, and the
fallback when no compiler works.
"""

import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avtok_jax.kernels import cpu_attention
from avtok_jax.models import layers


@pytest.fixture(scope="module", autouse=True)
def built():
  assert cpu_attention.available(), (
    "the kernel must build on the test machine (needs a C++ compiler)"
  )


def _qkvg(shape_q, shape_kv=None, seed=0, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 4)
  shape_kv = shape_kv or shape_q
  shapes = (shape_q, shape_kv, shape_kv, shape_q)
  return [jax.random.normal(key, s).astype(dtype) for key, s in zip(keys, shapes, strict=True)]


def _value_and_grads(fn, q, k, v, g):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(g))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
  "batch,length,heads,dim",
  [(2, 1, 2, 8), (2, 7, 3, 12), (3, 24, 4, 16), (1, 65, 2, 32), (2, 130, 1, 20)],
)
def test_equals_jax_attention_and_its_gradients(causal, batch, length, heads, dim):
  q, k, v, g = _qkvg((batch, length, heads, dim))
  ours = jax.jit(lambda q, k, v: cpu_attention.attention(q, k, v, causal))
  ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
  for a, b in zip(
    _value_and_grads(ours, q, k, v, g), _value_and_grads(ref, q, k, v, g), strict=True
  ):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


def test_queries_and_keys_of_different_lengths():
  q, k, v, g = _qkvg((2, 5, 2, 8), (2, 70, 2, 8))
  ours = lambda q, k, v: cpu_attention.attention(q, k, v)  # noqa: E731
  for a, b in zip(
    _value_and_grads(ours, q, k, v, g),
    _value_and_grads(jax.nn.dot_product_attention, q, k, v, g),
    strict=True,
  ):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


def test_is_deterministic_and_ignores_masked_keys():
  q, k, v, g = _qkvg((2, 40, 2, 16))
  fn = jax.jit(
    jax.grad(lambda q, k, v: jnp.sum(cpu_attention.attention(q, k, v, True) * g), (0, 1, 2))
  )
  first, second = fn(q, k, v), fn(q, k, v)
  for a, b in zip(first, second, strict=True):
    np.testing.assert_array_equal(a, b)
  # Causal: the last key is seen by the last query only; changing it moves
  # no other query's output.
  out = cpu_attention.attention(q, k, v, True)
  out2 = cpu_attention.attention(q, k.at[:, -1].add(5.0), v.at[:, -1].add(5.0), True)
  np.testing.assert_array_equal(out[:, :-1], out2[:, :-1])
  assert not np.allclose(out[:, -1], out2[:, -1])


def test_bfloat16_in_bfloat16_out():
  q, k, v, g = _qkvg((2, 24, 2, 16), dtype=jnp.bfloat16)
  out, vjp = jax.vjp(lambda q, k, v: cpu_attention.attention(q, k, v, True), q, k, v)
  assert out.dtype == jnp.bfloat16
  assert all(d.dtype == jnp.bfloat16 for d in vjp(g))
  ref = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)), is_causal=True)
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=2e-2)


def test_leading_dims_and_vmap():
  q, k, v, _ = _qkvg((2, 3, 10, 2, 8))
  ref = jax.nn.dot_product_attention(
    q.reshape(6, 10, 2, 8), k.reshape(6, 10, 2, 8), v.reshape(6, 10, 2, 8), is_causal=True
  ).reshape(q.shape)
  np.testing.assert_allclose(cpu_attention.attention(q, k, v, True), ref, atol=2e-6)
  mapped = jax.vmap(lambda q, k, v: cpu_attention.attention(q, k, v, True))(q, k, v)
  np.testing.assert_allclose(mapped, ref, atol=2e-6)


def test_bad_shapes_raise_a_clear_error():
  q, k, v, _ = _qkvg((2, 8, 2, 8))
  with pytest.raises(ValueError, match="k and v must match"):
    cpu_attention.attention(q, k, v[..., :4])
  with pytest.raises(ValueError, match=r"\[\.\.\., L, heads, d\]"):
    cpu_attention.attention(q[0, 0], k[0, 0], v[0, 0])


def _layers_attention_hlo(q, k, v):
  # A new function each time: jit caches traces per function, and the choice
  # of implementation is made when tracing.
  fn = lambda q, k, v: layers.dot_product_attention(q, k, v, causal=True)  # noqa: E731
  return jax.jit(fn).lower(q, k, v).as_text(), fn(q, k, v)


def test_layers_use_the_kernel_on_cpu_unless_told_not_to(monkeypatch):
  q, k, v, _ = _qkvg((2, 8, 2, 8))
  ref = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  hlo, out = _layers_attention_hlo(q, k, v)
  assert "avtok_cpu_attention_forward" in hlo
  np.testing.assert_allclose(out, ref, atol=2e-6)
  monkeypatch.setenv("AVTOK_CPU_ATTENTION", "xla")
  assert not cpu_attention.available()
  hlo, out = _layers_attention_hlo(q, k, v)
  assert "avtok_cpu_attention_forward" not in hlo
  np.testing.assert_allclose(out, ref, atol=2e-6)


def test_library_is_cached_per_build(monkeypatch, tmp_path):
  monkeypatch.setenv("AVTOK_KERNEL_CACHE", str(tmp_path))
  path = cpu_attention.library_path()
  assert path.parent == tmp_path and path.suffix == ".so"
  built_at = path.stat().st_mtime_ns
  assert cpu_attention.library_path() == path
  assert path.stat().st_mtime_ns == built_at
  assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left
  # Another compiler (here: extra flags through $CXX) is another library.
  monkeypatch.setenv("CXX", "c++ -DAVTOK_TEST_VARIANT")
  assert cpu_attention.library_path() != path


def test_without_a_compiler_it_warns_and_falls_back(monkeypatch, tmp_path):
  monkeypatch.setenv("AVTOK_KERNEL_CACHE", str(tmp_path))
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  with pytest.raises(RuntimeError, match="no working C.. compiler"):
    cpu_attention.library_path()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert cpu_attention._load.__wrapped__() is False
  assert any("pure-XLA path" in str(w.message) for w in caught)
  # A compiler that fails names the source and shows its message.
  monkeypatch.setenv("CXX", "c++ -DAVTOK_NO_SUCH_FLAG -fno-such-option")
  with pytest.raises(RuntimeError, match=r"compiling .*cpu_attention\.cc failed"):
    cpu_attention.library_path()
  assert list(tmp_path.iterdir()) == []


def test_sharded_over_8_devices_splits_batch_and_heads(tmp_path, run_on_8_cpu_devices):
  facts = run_on_8_cpu_devices(Path(__file__).with_name("cpu_attention_sharded_check.py"), tmp_path)
  for name, f in facts.items():
    assert f["value_err"] < 1e-5 and f["grad_err"] < 1e-5, (name, f)
    assert f["num_calls"] == 2, (name, f)  # one forward, one backward
  # Batch over 4 devices: each runs the kernel on 2 of the 8 clips, no gathers.
  assert facts["batch"]["call_shapes"] == ["2,24,4,16", "2,4,24"]
  assert not facts["batch"]["all_gather"]
  assert facts["batch"]["grad_spec"] == "P('data',)"
  # Batch over 4 and heads over 2: 2 clips x 2 heads each.
  assert facts["batch_heads"]["call_shapes"] == ["2,2,24", "2,24,2,16"]
  assert not facts["batch_heads"]["all_gather"]
  # A split length cannot be kept (each work item needs whole rows): gathered.
  assert facts["length"]["call_shapes"] == ["8,24,4,16", "8,4,24"]


def test_hlo_flops_counts_the_attention_matmuls_as_xla_does():
  """The kernel's calls count the FLOPs XLA's cost analysis gives explicit_attention's matmuls."""
  q, k, v, g = _qkvg((2, 10, 3, 8), (2, 12, 3, 8))

  def compiled(att):
    loss = lambda q, k, v: jnp.sum(att(q, k, v) * g)  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, (0, 1, 2))).lower(q, k, v).compile()

  kernel = compiled(cpu_attention.attention)
  counted = cpu_attention.hlo_flops(kernel.as_text())
  assert counted == 2 * 6 * 2 * 3 * 10 * 12 * 8  # 2 forward + 4 backward matmuls
  xla = compiled(lambda q, k, v: layers.explicit_attention(q, k, v)).cost_analysis()["flops"]
  # XLA also counts the softmax's elementwise work; the matmuls dominate.
  assert counted <= xla <= 1.3 * counted
  assert cpu_attention.hlo_flops("no attention here") == 0.0
