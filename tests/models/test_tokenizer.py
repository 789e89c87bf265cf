"""AVTok tokenizer: presets, parameter tree, shapes, gradients, eval consistency, precision.

Everything runs the `tiny` preset on CPU; each jitted function is built once
per module (fixtures) because every new compile costs seconds here. The `L`
preset is only traced and compiled (`@pytest.mark.slow`), never run.
"""

from __future__ import annotations

import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend import core as jax_core

from avtok_jax import config_lib
from avtok_jax.models import VectorQuantizer, build_tokenizer
from avtok_jax.models import __main__ as models_main
from avtok_jax.models.quantizer import l2_normalize

BATCH = 2
LOGICAL_NAMES = {
  "batch",
  "length",
  "embed",
  "mlp",
  "heads",
  "kv",
  "vocab",
  "code",
  "patch",
  "conv_in",
  "conv_out",
  "layers",
  "slot",
}
PER_MODALITY = ("embed", "queries", "patch_queries", "head")
# Per-modality LayerNorms inside the shared stacks (norms='inside'), per block and final.
BLOCK_NORMS = ("norm1", "norm2")
SHARED = ("encoder", "decoder", "quant_in", "quantizer", "quant_out")


def _model(size: str = "tiny", **overrides):
  model_config = config_lib.model_config(size)
  model_config.update(overrides)
  return build_tokenizer(model_config, config_lib.data_config(config_lib.data_preset_for(size)))


def _init(model, batch_size: int = BATCH):
  fn = jax.jit(lambda key: model.init(key, **model.example_inputs(batch_size), train=False))
  return nn.unbox(fn(jax.random.key(0)))


def _with_random_heads(params, seed: int = 1):
  """The heads start at zero (so does every gradient upstream of them): randomise them."""
  params = dict(params)
  for i, m in enumerate(("video", "audio")):
    key = jax.random.key(seed * 10 + i)
    head = params[f"{m}_head"]
    params[f"{m}_head"] = {
      "kernel": 0.1 * jax.random.normal(key, head["kernel"].shape, head["kernel"].dtype),
      "bias": head["bias"],
    }
  return params


def _stack_blocks(tree):
  """Plain-layout transformer params (block_0, block_1, ...) -> the scan layout (blocks, stacked)."""
  if not isinstance(tree, dict):
    return tree
  if "block_0" in tree:
    depth = sum(1 for k in tree if re.fullmatch(r"block_\d+", k))
    out = {k: v for k, v in tree.items() if not k.startswith("block_")}
    out["blocks"] = jax.tree.map(
      lambda *xs: jnp.stack(xs), *[tree[f"block_{i}"] for i in range(depth)]
    )
    return out
  return {k: _stack_blocks(v) for k, v in tree.items()}


def _paths(tree) -> list[tuple[str, ...]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [tuple(str(k.key) for k in path) for path, _ in flat]


@pytest.fixture(scope="module")
def tiny():
  return _model("tiny")


@pytest.fixture(scope="module")
def params(tiny):
  return _init(tiny)["params"]


@pytest.fixture(scope="module")
def batch(tiny):
  rng = np.random.default_rng(0)
  inputs = tiny.example_inputs(BATCH)
  video_u8 = rng.integers(0, 256, inputs["video_patches"].shape, dtype=np.uint8)
  return {
    "video_u8": video_u8,
    # The pipeline's float32 video (pipeline.py, video_dtype='float32').
    "video": video_u8.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1),
    "audio": np.tanh(rng.normal(size=inputs["audio_patches"].shape)).astype(np.float32),
  }


@pytest.fixture(scope="module")
def forward(tiny):
  """Eval-mode forward, jitted once per input structure (both / video / audio / uint8)."""
  return jax.jit(lambda p, v, a: tiny.apply({"params": p}, v, a, train=False))


# --- presets -------------------------------------------------------------------


@pytest.mark.parametrize("size", config_lib.MODEL_PRESETS)
def test_model_presets_fit_their_data(size):
  model_config = config_lib.model_config(size)
  data_config = config_lib.data_config(config_lib.data_preset_for(size))
  config_lib.check_model_config(model_config, data_config)
  assert model_config.codebook_size % 8 == 0  # shards over 4 or 8 devices


def test_L_preset_is_the_paper():
  c = config_lib.model_config("L")
  assert (c.width, c.encoder_depth, c.decoder_depth, c.num_heads, c.mlp_ratio) == (
    768,
    12,
    12,
    12,
    4.0,
  )
  assert (c.num_video_tokens, c.num_audio_tokens, c.codebook_size, c.code_dim) == (
    1024,
    128,
    8192,
    16,
  )
  assert (c.prior_depth, c.prior_width, c.qkv_bias) == (12, 384, False)
  assert [config_lib.data_preset_for(s) for s in config_lib.MODEL_PRESETS] == [
    "tiny",
    "small",
    "paper",
    "paper",
  ]


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("num_heads", 5, "num_heads=5 does not divide width=48"),
    ("prior_heads", 3, "prior_heads=3 does not divide prior_width=32"),
    ("dtype", "float16", "dtype='float16'"),
    ("codebook_size", 1, "codebook_size=1"),
    ("num_audio_tokens", 0, "num_audio_tokens=0"),
  ],
)
def test_bad_model_values_are_named(field, value, message):
  c = config_lib.model_config("tiny")
  c[field] = value
  with pytest.raises(ValueError, match=re.escape(message)):
    config_lib.check_model_config(c, config_lib.data_config("tiny"))
  with pytest.raises(ValueError, match="Unknown model preset"):
    config_lib.model_config("XL")


# --- parameter tree ------------------------------------------------------------


def test_one_encoder_one_decoder_and_named_modality_parts(tiny):
  shapes = jax.eval_shape(
    lambda: tiny.init(jax.random.key(0), **tiny.example_inputs(1), train=False)
  )
  params = shapes["params"]
  expected = set(SHARED) | {"prior"}
  expected |= {f"{m}_{part}" for m in ("video", "audio") for part in PER_MODALITY}
  # Region maps only where a token's region holds several patches (tiny: audio's
  # 32 patches over 8 tokens; video has one token per patch).
  assert (tiny.region_slots("video"), tiny.region_slots("audio")) == (1, 4)
  expected |= {"audio_region_in", "audio_region_out"}
  assert set(params) == expected
  paths = _paths(nn.unbox(params))
  for name in ("encoder", "decoder"):
    holders = {p[: p.index(name) + 1] for p in paths if name in p}
    assert holders == {(name,)}, f"{name} appears at {holders}"
  # The per-modality norms are the only per-modality parameters inside the shared
  # stacks: every block holds both modalities' norm1 / norm2, the encoder a final
  # norm per modality, the decoder none (the heads read the residual stream).
  unboxed = nn.unbox(params)
  for name, finals in (("encoder", {"video_norm", "audio_norm"}), ("decoder", set())):
    block_names = {k for k in unboxed[name] if k.startswith("block_")}
    assert set(unboxed[name]) == block_names | finals, name
    for block in block_names:
      expected_block = {f"{m}_{n}" for m in ("video", "audio") for n in BLOCK_NORMS}
      assert set(unboxed[name][block]) == expected_block | {"attn", "mlp"}, (name, block)
  # Shared weights: every transformer block lives under the one encoder / decoder
  # (or the prior), never under a per-modality name.
  for p in paths:
    if any(k.startswith("block_") for k in p):
      assert p[0] in ("encoder", "decoder", "prior"), p
  # Logical axis names on every parameter and on the codebook statistics.
  boxed = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  for leaf in boxed:
    assert isinstance(leaf, nn.LogicallyPartitioned), leaf
    assert len(leaf.names) == len(leaf.value.shape)
    assert set(leaf.names) <= LOGICAL_NAMES, leaf.names
  assert nn.unbox(shapes)["codebook_stats"]["quantizer"]["counts"].shape == (tiny.codebook_size,)


# --- shapes --------------------------------------------------------------------


@pytest.mark.parametrize("present", [("video", "audio"), ("video",), ("audio",)])
def test_output_shapes_for_both_and_each_alone(tiny, params, batch, forward, present):
  v = batch["video"] if "video" in present else None
  a = batch["audio"] if "audio" in present else None
  out = forward(params, v, a)
  assert set(out) == set(present) | {"prior_logits", "prior_codes"}
  for m in present:
    n_patches, patch_dim, n_tokens = tiny.num_patches(m), tiny.patch_dim(m), tiny.num_tokens(m)
    s = out[m]
    assert s["recon"].shape == (BATCH, n_patches, patch_dim) and s["recon"].dtype == jnp.float32
    assert s["codes"].shape == (BATCH, n_tokens) and s["codes"].dtype == jnp.int32
    assert 0 <= int(s["codes"].min()) and int(s["codes"].max()) < tiny.codebook_size
    assert s["quantized"].shape == (BATCH, n_tokens, tiny.code_dim)
    assert s["patch_tokens"].shape == (BATCH, n_patches, tiny.width)
    assert s["quantizer"].loss.shape == ()
  length = sum(tiny.num_tokens(m) for m in present)
  (logits,) = out["prior_logits"]  # one round in eval
  assert logits.shape == (BATCH, length, tiny.codebook_size)
  np.testing.assert_array_equal(
    out["prior_codes"], np.concatenate([out[m]["codes"] for m in present], axis=1)
  )


def test_absent_modality_costs_nothing(tiny, params, batch):
  """With one stream, the traced program reads none of the other stream's parameters.

  Per-modality parameters are the top-level `m_*` modules and the `m_norm*`
  LayerNorms inside the shared encoder and decoder.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  leaves = [leaf for _, leaf in flat]
  paths = [tuple(str(k.key) for k in path) for path, _ in flat]
  for present, absent in (("video", "audio"), ("audio", "video")):
    inputs = {f"{present}_patches": batch[present]}
    jaxpr = jax.make_jaxpr(
      lambda *ls, inputs=inputs: tiny.apply(
        {"params": jax.tree.unflatten(treedef, ls)}, **inputs, train=False
      )
    )(*leaves).jaxpr
    used = {v for eqn in jaxpr.eqns for v in eqn.invars if not isinstance(v, jax_core.Literal)}
    for path, var in zip(paths, jaxpr.invars, strict=True):
      name = "/".join(path)
      if any(k.startswith(absent + "_") for k in path):
        assert var not in used, f"{present}-only forward reads {name}"
      elif any(k.startswith(present + "_") for k in path) or path[0] in (
        "encoder",
        "decoder",
        "quant_in",
      ):
        assert var in used, f"{present}-only forward does not read {name}"


# --- eval consistency, input formats, zero-init heads ----------------------------


def test_decode_of_encode_equals_recon_and_uint8_equals_float(tiny, params, batch):
  def run(p, v_u8, v, a):
    variables = {"params": p}
    out_u8 = tiny.apply(variables, v_u8, a, train=False, run_prior=False)
    out = tiny.apply(variables, v, a, train=False, run_prior=False)
    enc = tiny.apply(variables, v, a, method=tiny.encode)
    dec = tiny.apply(variables, {m: enc[m]["codes"] for m in enc}, method=tiny.decode)
    return out_u8, out, enc, dec

  run = jax.jit(run)
  # Freshly initialised: the zero-init heads reconstruct exactly zero.
  out_u8, out, _, dec = run(params, batch["video_u8"], batch["video"], batch["audio"])
  for m in ("video", "audio"):
    np.testing.assert_array_equal(out[m]["recon"], 0.0)
    np.testing.assert_array_equal(dec[m], 0.0)

  out_u8, out, enc, dec = run(
    _with_random_heads(params), batch["video_u8"], batch["video"], batch["audio"]
  )
  for m in ("video", "audio"):
    assert float(jnp.abs(out[m]["recon"]).max()) > 1e-3  # not trivially zero
    np.testing.assert_array_equal(enc[m]["codes"], out[m]["codes"])
    np.testing.assert_allclose(enc[m]["patch_tokens"], out[m]["patch_tokens"], atol=1e-6)
    np.testing.assert_allclose(dec[m], out[m]["recon"], atol=1e-5)
    np.testing.assert_array_equal(out_u8[m]["codes"], out[m]["codes"])
    np.testing.assert_allclose(out_u8[m]["recon"], out[m]["recon"], atol=1e-5)


def test_queries_are_set_apart_so_tokens_differ_at_init():
  """Regression: raw N(0, 0.02) queries left the encoder as ~one vector per clip.

  They were 50x smaller than the attention outputs added to them, so every
  token of a clip had ~the same code vector (mean cosine 0.97 on the built-in
  data) and the small demo collapsed to one code per clip. Now each query
  carries a 1D position table and its region's patch tokens (locality
  'both'), so the tokens of a freshly initialised model already spread over
  the sphere and over many codes.
  """
  model = _model("small")
  params = _init(model, 2)["params"]
  rng = np.random.default_rng(0)
  shape = model.example_inputs(2)["video_patches"].shape
  video = rng.integers(0, 256, shape, dtype=np.uint8)
  enc = jax.jit(lambda p, v: model.apply({"params": p}, v, None, method=model.encode))(
    params, video
  )["video"]
  z = np.asarray(enc["quantizer"].z, np.float64)  # [2, 128, code_dim], unit rows
  for clip in range(2):
    cos = z[clip] @ z[clip].T
    off_diagonal = cos[~np.eye(len(cos), dtype=bool)]
    assert off_diagonal.mean() < 0.8, off_diagonal.mean()
    assert len(np.unique(np.asarray(enc["codes"])[clip])) >= 24


# --- gradients -----------------------------------------------------------------


@pytest.mark.parametrize("gradient", ["straight_through", "rotation"])
def test_gradients_reach_the_encoder_through_the_quantizer(params, batch, gradient):
  """d L / d (pre-quantizer features) is the configured estimate through the quantizer.

  A zero perturbation is added to the quantizer's input z (the `quant_in`
  output) and to its output `quantized`; their gradients are d L / d z and
  d L / d quantized = g. The quantizer l2-normalises z and then passes on g
  unchanged (straight-through) or rotated by R^T, R the rotation in the
  plane of z and q taking z to q (the rotation trick), so d L / d z must
  equal the normalisation's vector-Jacobian product of that, and the
  codebook gets no gradient from the reconstruction loss.
  """
  tiny = _model("tiny", quantizer_gradient=gradient)
  targets = {"video": batch["video"], "audio": batch["audio"]}
  n_tokens = {m: tiny.num_tokens(m) for m in targets}
  assert n_tokens["video"] != n_tokens["audio"]  # tells the two quantizer calls apart
  perturb = {
    f"{m}_{what}": jnp.zeros((BATCH, n_tokens[m], tiny.code_dim))
    for m in targets
    for what in ("z", "q")
  }

  def loss_fn(p, perturb, v, a):
    seen = {}

    def interceptor(next_fun, args, kwargs, context):
      if not (isinstance(context.module, VectorQuantizer) and context.method_name == "__call__"):
        return next_fun(*args, **kwargs)
      z = args[0]
      m = "video" if z.shape[1] == n_tokens["video"] else "audio"
      q = next_fun(z + perturb[f"{m}_z"], *args[1:], **kwargs)
      seen[m] = (z, jax.lax.stop_gradient(q.quantized))
      return q.replace(quantized=q.quantized + perturb[f"{m}_q"])

    with nn.intercept_methods(interceptor):
      out = tiny.apply({"params": p}, v, a, train=False, run_prior=False)
    loss = sum(jnp.mean(jnp.square(out[m]["recon"] - targets[m])) for m in targets)
    return loss, seen

  grad_fn = jax.jit(jax.grad(loss_fn, argnums=(0, 1), has_aux=True))
  (g_params, g_perturb), seen = grad_fn(
    _with_random_heads(params), perturb, batch["video"], batch["audio"]
  )
  for path, g in jax.tree_util.tree_flatten_with_path(g_params["encoder"])[0]:
    assert float(jnp.abs(g).max()) > 0, f"no gradient at encoder/{jax.tree_util.keystr(path)}"
  for name in ("quant_in", "video_embed", "audio_embed", "video_queries", "audio_queries"):
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_params[name])), name
  np.testing.assert_array_equal(g_params["quantizer"]["codebook"], 0.0)
  for m in targets:
    g_q = g_perturb[f"{m}_q"]
    assert float(jnp.abs(g_q).max()) > 0
    z_pre, q = seen[m]
    if gradient == "rotation":
      # R^T g = g - 2 r (r . g) + 2 z (q . g), z the unit input, r = (z + q) / |z + q|.
      z = l2_normalize(z_pre)
      r = l2_normalize(z + q)
      dot = lambda a, b: jnp.sum(a * b, axis=-1, keepdims=True)  # noqa: E731
      g_q = g_q - 2 * r * dot(r, g_q) + 2 * z * dot(q, g_q)
    _, vjp = jax.vjp(l2_normalize, z_pre)
    (expected,) = vjp(g_q)
    scale = float(jnp.abs(expected).max())
    np.testing.assert_allclose(g_perturb[f"{m}_z"], expected, rtol=1e-4, atol=1e-5 * scale)


# --- precision -----------------------------------------------------------------


def test_bfloat16_compute_keeps_float32_params_and_outputs(tiny, params, batch):
  model = _model("tiny", dtype="bfloat16")
  shapes = nn.unbox(
    jax.eval_shape(lambda: model.init(jax.random.key(0), **model.example_inputs(1), train=False))
  )
  for leaf in jax.tree.leaves(shapes):
    assert leaf.dtype == jnp.float32
  # The compute dtype does not change the tree: reuse the float32 model's params.
  assert jax.tree.structure(shapes["params"]) == jax.tree.structure(params)
  variables = {
    "params": _with_random_heads(params),
    "codebook_stats": {"quantizer": {"counts": jnp.zeros((model.codebook_size,))}},
  }

  def train_step(variables, v, a, key):
    return model.apply(
      variables,
      v,
      a,
      train=True,
      stochastic=True,
      prior_ss_ratio=0.5,
      rngs={"sample": key},
      mutable=["codebook_stats"],
    )

  args = (variables, batch["video_u8"], batch["audio"], jax.random.key(3))
  assert "bf16" in str(jax.make_jaxpr(train_step)(*args))  # the matmuls do run in bf16
  out, state = jax.jit(train_step)(*args)
  for m in ("video", "audio"):
    assert out[m]["recon"].dtype == jnp.float32
    assert bool(jnp.isfinite(out[m]["recon"]).all())
    q = out[m]["quantizer"]
    for value in (q.loss, q.commit_loss, q.codebook_loss, q.perplexity):
      assert value.dtype == jnp.float32 and bool(jnp.isfinite(value))
  assert len(out["prior_logits"]) == 2  # two scheduled-sampling rounds in training
  assert all(x.dtype == jnp.float32 for x in out["prior_logits"])
  counts = state["codebook_stats"]["quantizer"]["counts"]
  assert counts.dtype == jnp.float32
  assert float(counts.sum()) == BATCH * (model.num_video_tokens + model.num_audio_tokens)


# --- remat / scan ----------------------------------------------------------------


def _random_params(shapes, seed: int = 0):
  """Random values for a params shape tree (any values do for equivalence tests; no init compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: jnp.asarray(rng.normal(scale=0.1, size=x.shape).astype(np.float32)), shapes
  )


def test_remat_and_scan_match_the_plain_model(batch):
  """Same loss and gradients with remat, and with scan + remat (params restacked to its layout).

  The switches reach every transformer (encoder, decoder, prior); the prior's
  layout is checked, its numerics are the layers' tests' business.
  """
  depth = dict(encoder_depth=2, decoder_depth=2, prior_depth=2)
  plain = _model("tiny", **depth)
  remat = _model("tiny", remat=True, **depth)
  scan = _model("tiny", remat=True, scan=True, **depth)

  def shapes(model):
    return nn.unbox(
      jax.eval_shape(lambda: model.init(jax.random.key(0), **model.example_inputs(1), train=False))
    )["params"]

  params = _random_params(shapes(plain))
  scan_params = _stack_blocks(params)
  scan_shapes = shapes(scan)
  assert jax.tree.structure(scan_shapes) == jax.tree.structure(scan_params)
  assert jax.tree.map(lambda x: x.shape, scan_shapes) == jax.tree.map(
    lambda x: x.shape, scan_params
  )
  for tree in (scan_params["encoder"], scan_params["decoder"], scan_params["prior"]["transformer"]):
    assert "blocks" in tree and "block_0" not in tree
  assert jax.tree.structure(shapes(remat)) == jax.tree.structure(params)

  def value_and_grad(model):
    # One stream is enough here (and half the compile time): both share the code path.
    def loss_fn(p, v):
      out = model.apply({"params": p}, v, train=False, run_prior=False)
      return jnp.mean(jnp.abs(out["video"]["recon"] - v))

    return jax.jit(jax.value_and_grad(loss_fn))

  ref_loss, ref_grads = value_and_grad(plain)(params, batch["video"])
  for model, p, to_layout in (
    (remat, params, lambda t: t),
    (scan, scan_params, _stack_blocks),
  ):
    loss, grads = value_and_grad(model)(p, batch["video"])
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(
      lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6),
      grads,
      to_layout(ref_grads),
    )


# --- parameter counts and the CLI ------------------------------------------------


def _block_params(width: int, mlp: int) -> int:
  # q/k/v (no bias) + out proj + bias, fc1 + bias, fc2 + bias, two LayerNorms per modality.
  return 4 * width * width + width + 2 * width * mlp + mlp + width + 2 * 4 * width


def test_L_parameter_count_matches_larp_and_the_paper():
  params = models_main.param_shapes(config_lib.model_config("L"), config_lib.data_config("paper"))
  counts = models_main.count_by_module(params)
  block = _block_params(768, 3072)
  assert counts["encoder"] == 12 * block + 2 * 2 * 768  # + a final LayerNorm per modality
  assert counts["decoder"] == 12 * block  # the heads read the residual stream
  assert counts["quantizer"] == 8192 * 16
  s = models_main.summarize(params)
  # LARP-L is 173M [LARP]; the paper's 208.4M also holds the alignment projectors.
  assert abs(s["video_only"] / 173e6 - 1) < 0.01
  assert 0.9 < s["total"] / 208.4e6 < 1.0
  assert s["prior"] == pytest.approx(21.7e6, rel=0.01)


def test_main_prints_the_parameter_table(capsys):
  assert models_main.main(["avtok_jax.models", "--preset=tiny"]) == 0
  text = capsys.readouterr().out
  params = models_main.param_shapes(config_lib.model_config("tiny"), config_lib.data_config("tiny"))
  counts = models_main.count_by_module(params)
  for name, n in counts.items():
    assert re.search(rf"^{name}\s+{n:,}\s", text, re.MULTILINE), name
  s = models_main.summarize(params)
  assert re.search(rf"^total\s+{s['total']:,}$", text, re.MULTILINE)
  assert re.search(rf"^total without prior\s+{s['without_prior']:,}$", text, re.MULTILINE)
  assert re.search(rf"^video-only \(no prior\)\s+{s['video_only']:,}\s", text, re.MULTILINE)


# --- the paper size compiles -------------------------------------------------------


@pytest.mark.slow
def test_L_forward_backward_compiles_on_cpu():
  """One training step's forward + backward of the L preset, batch 1, compiled (not run)."""
  model = _model("L")
  variables = nn.unbox(
    jax.eval_shape(lambda: model.init(jax.random.key(0), **model.example_inputs(1), train=False))
  )
  inputs = jax.eval_shape(lambda: model.example_inputs(1, video_dtype=jnp.uint8))
  key = jax.eval_shape(lambda: jax.random.key(0))

  def step(params, stats, v, a, key):
    def loss_fn(params):
      out, state = model.apply(
        {"params": params, "codebook_stats": stats},
        v,
        a,
        train=True,
        stochastic=True,
        prior_ss_ratio=0.5,
        rngs={"sample": key},
        mutable=["codebook_stats"],
      )
      targets = {"video": v.astype(jnp.float32) / 127.5 - 1.0, "audio": a}
      loss = sum(jnp.mean(jnp.abs(out[m]["recon"] - targets[m])) for m in targets)
      loss += 0.1 * sum(out[m]["quantizer"].loss for m in targets)
      for logits in out["prior_logits"]:
        loss += (
          0.06 * optax.softmax_cross_entropy_with_integer_labels(logits, out["prior_codes"]).mean()
        )
      return loss, state

    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, grads, state

  start = time.perf_counter()
  compiled = (
    jax.jit(step)
    .lower(
      variables["params"],
      variables["codebook_stats"],
      inputs["video_patches"],
      inputs["audio_patches"],
      key,
    )
    .compile()
  )
  seconds = time.perf_counter() - start
  print(f"L preset forward+backward (batch 1) compiled on CPU in {seconds:.1f} s")
  loss, grads, _ = compiled.out_info
  assert loss.shape == ()
  assert jax.tree.map(lambda x: x.shape, grads) == jax.tree.map(
    lambda x: x.shape, variables["params"]
  )
  assert jax.tree.leaves(grads["encoder"]["blocks"])[0].shape[0] == 12  # scan: stacked blocks
