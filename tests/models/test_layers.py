"""Transformer layers: position tables, attention masking, scan/remat equivalence, dtypes, axes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avtok_jax.models import layers

WIDTH, HEADS, MLP = 32, 4, 64


def test_sincos_1d_matches_the_formula():
  table = layers.sincos_table((7,), 8)
  pos, i = 5, 1
  omega = 1.0 / 10000 ** (i / 4)
  assert table[pos, i] == pytest.approx(np.sin(pos * omega), abs=1e-6)
  assert table[pos, 4 + i] == pytest.approx(np.cos(pos * omega), abs=1e-6)


@pytest.mark.parametrize("grid,dim", [((4, 16, 16), 768), ((10, 48), 64), ((2, 4, 4), 32)])
def test_sincos_tables_are_distinct_and_row_major(grid, dim):
  table = layers.sincos_table(grid, dim)
  assert table.shape == (int(np.prod(grid)), dim) and table.dtype == np.float32
  # Every position has its own code.
  assert len({row.tobytes() for row in table}) == table.shape[0]
  # Row-major: moving along the last grid axis changes only the last axis' channels.
  per_axis = 2 * (dim // (2 * len(grid)))
  last = slice((len(grid) - 1) * per_axis, len(grid) * per_axis)
  diff = np.abs(table[1] - table[0])
  assert diff[last].max() > 0
  assert diff[: (len(grid) - 1) * per_axis].max() == 0


def test_sincos_rejects_bad_sizes():
  with pytest.raises(ValueError, match="even dim"):
    layers.sincos_1d(np.arange(3), 7)
  with pytest.raises(ValueError, match="too small"):
    layers.sincos_table((2, 2, 2), 4)


def _run(module, x, params=None):
  variables = params if params is not None else module.init(jax.random.key(0), x)
  return variables, module.apply(variables, x)


def test_causal_attention_ignores_the_future():
  x = jax.random.normal(jax.random.key(1), (2, 6, WIDTH))
  attn = layers.Attention(HEADS, causal=True)
  params, y = _run(attn, x)
  x2 = x.at[:, 4:].set(jax.random.normal(jax.random.key(2), (2, 2, WIDTH)))
  y2 = attn.apply(params, x2)
  np.testing.assert_allclose(y[:, :4], y2[:, :4], atol=1e-6)
  assert np.abs(np.asarray(y[:, 4:] - y2[:, 4:])).max() > 1e-3
  # Bidirectional attention does see the future.
  bi = layers.Attention(HEADS, causal=False)
  assert np.abs(np.asarray(bi.apply(params, x)[:, :4] - bi.apply(params, x2)[:, :4])).max() > 1e-3


def test_attention_matches_a_reference_softmax_attention():
  x = jax.random.normal(jax.random.key(3), (1, 5, WIDTH))
  attn = layers.Attention(HEADS)
  params, y = _run(attn, x)
  p = nn.unbox(params)["params"]
  q, k, v = (jnp.einsum("bld,dhk->blhk", x, p[n]["kernel"]) for n in ("query", "key", "value"))
  logits = jnp.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(WIDTH // HEADS)
  out = jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(logits, axis=-1), v)
  ref = jnp.einsum("bqhk,hkd->bqd", out, p["out"]["kernel"]) + p["out"]["bias"]
  np.testing.assert_allclose(y, ref, atol=1e-5)


def _stack_blocks(unrolled: dict, depth: int) -> dict:
  blocks = [unrolled[f"block_{i}"] for i in range(depth)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)


def test_scan_and_remat_compute_the_same_function():
  depth = 3
  x = jax.random.normal(jax.random.key(4), (2, 7, WIDTH))
  plain = layers.Transformer(depth, HEADS, MLP)
  params = nn.unbox(plain.init(jax.random.key(0), x))
  scanned = {
    "params": {
      "blocks": _stack_blocks(params["params"], depth),
      "norm": params["params"]["norm"],
    }
  }

  def loss(module, p):
    return jnp.sum(module.apply(p, x) ** 2)

  ref_val, ref_grad = jax.value_and_grad(lambda p: loss(plain, p))(params)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref_grad))
  for remat, scan in [(True, False), (False, True), (True, True)]:
    module = layers.Transformer(depth, HEADS, MLP, remat=remat, scan=scan)
    p = scanned if scan else params
    # The parameter layout is the one init produces.
    shapes = jax.tree.map(jnp.shape, nn.unbox(module.init(jax.random.key(0), x)))
    assert shapes == jax.tree.map(jnp.shape, p)
    val, grad = jax.value_and_grad(lambda p, m=module: loss(m, p))(p)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    if scan:
      grad = {
        "params": {
          **{
            f"block_{i}": jax.tree.map(lambda g, i=i: g[i], grad["params"]["blocks"])
            for i in range(depth)
          },
          "norm": grad["params"]["norm"],
        }
      }
    # Summation order differs between the three forms: compare at float32
    # noise level relative to the largest gradient.
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale)


def test_every_parameter_has_logical_axes():
  x = jnp.ones((1, 3, WIDTH))
  for scan in (False, True):
    variables = layers.Transformer(2, HEADS, MLP, scan=scan).init(jax.random.key(0), x)
    specs = jax.tree_util.tree_leaves_with_path(
      nn.get_partition_spec(variables), is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)
    )
    arrays = jax.tree.leaves(nn.unbox(variables))
    assert len(specs) == len(arrays)
    for (path, spec), array in zip(specs, arrays, strict=True):
      assert len(spec) == array.ndim and all(name is not None for name in spec), (path, spec)
      if scan and "blocks" in jax.tree_util.keystr(path):
        assert spec[0] == "layers", (path, spec)


def test_bfloat16_compute_keeps_float32_params_and_residual():
  x = jax.random.normal(jax.random.key(5), (2, 4, WIDTH))
  f32 = layers.Transformer(2, HEADS, MLP)
  bf16 = layers.Transformer(2, HEADS, MLP, dtype=jnp.bfloat16)
  params = f32.init(jax.random.key(0), x)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(nn.unbox(params)))
  y32, y16 = f32.apply(params, x), bf16.apply(params, x)
  assert y16.dtype == jnp.float32
  # bfloat16 matmuls: close to float32, but not identical (the knob does something).
  err = float(jnp.abs(y32 - y16).max())
  assert 0 < err < 0.1, err


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [1, 7, 24])
def test_explicit_attention_equals_jax_attention_and_its_gradients(causal, length):
  rng = np.random.default_rng(length)
  q, k, v = (jnp.asarray(rng.standard_normal((2, length, 3, 8)) * 2, jnp.float32) for _ in "qkv")
  d_out = jnp.asarray(rng.standard_normal((2, length, 3, 8)), jnp.float32)

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * d_out)

  ours = lambda q, k, v: layers.explicit_attention(q, k, v, causal)  # noqa: E731
  ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
  # Differentiated, the output comes from the hand-written forward rule;
  # undifferentiated from the primal (the same head-major computation).
  out, _ = jax.vjp(ours, q, k, v)
  np.testing.assert_allclose(out, ref(q, k, v), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.jit(ours)(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-6)
  got = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
  for name, g, w in zip("qkv", got, want, strict=True):
    if length > 1 or name == "v":  # one key: softmax is constant, q and k get no gradient
      assert float(jnp.abs(w).max()) > 0, name
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=name)


def test_explicit_attention_keeps_bfloat16_inputs_in_bfloat16():
  q, k, v = (jnp.ones((1, 4, 2, 8), jnp.bfloat16) for _ in "qkv")
  out, vjp = jax.vjp(lambda q, k, v: layers.explicit_attention(q, k, v, True), q, k, v)
  assert out.dtype == jnp.bfloat16
  assert [g.dtype for g in vjp(jnp.ones_like(out))] == [jnp.bfloat16] * 3
  assert layers.explicit_attention(q, k, v, True).dtype == jnp.bfloat16


def test_first_argmax_is_jnp_argmax_with_ties_and_gumbel_max_is_categorical():
  x = jnp.asarray([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [-1.0, -5.0, -1.0, 7.0]])
  np.testing.assert_array_equal(layers.first_argmax(x), [1, 0, 3])
  logits = jax.random.normal(jax.random.key(0), (5, 33, 257)) * 3
  for seed in range(4):
    key = jax.random.key(seed)
    np.testing.assert_array_equal(
      layers.gumbel_max(key, logits), jax.random.categorical(key, logits, axis=-1)
    )
  # Really samples: not always the argmax.
  assert np.mean(np.asarray(layers.gumbel_max(key, logits) != jnp.argmax(logits, -1))) > 0.1


@pytest.mark.parametrize("size", [12, 13, 64])
def test_two_stage_categorical_samples_the_softmax(size):
  """sample_categorical (block, then entry) has the softmax's frequencies; prime K falls back."""
  probs = np.arange(1, size + 1, dtype=np.float64)
  probs /= probs.sum()
  n = 200_000
  logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (n, size))
  draws = np.asarray(jax.jit(layers.sample_categorical)(jax.random.key(0), logits))
  assert draws.dtype == np.int32 and draws.min() >= 0 and draws.max() < size
  freq = np.bincount(draws, minlength=size) / n
  # 5 standard errors of a binomial frequency.
  np.testing.assert_array_less(np.abs(freq - probs), 5 * np.sqrt(probs * (1 - probs) / n))
  if size == 13:  # no divisor up to sqrt(13): plain Gumbel-max, the same draw as categorical
    np.testing.assert_array_equal(draws, jax.random.categorical(jax.random.key(0), logits, axis=-1))
