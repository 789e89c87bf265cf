"""bench/torch_reference.py is the JAX train step (GAN off) written again in PyTorch.

The check that makes it a reference: the JAX parameters of the tiny preset,
copied into the torch module, give the same loss terms, the same total, the
same gradient norm and the same norm of the gradients upstream of the
quantizer (`UPSTREAM`) as `train.make_train_step` on the same batch, for VFAL
stage 1 (video) and vanilla (video + audio) with the config's model defaults
and for vanilla with non-default tokenizer options (`CASES`: the norms,
head_norm, locality, code_scale and quantizer_gradient choices), and the same
codes and reconstructions from encode/decode. Every JAX step and encode/decode
runs in ONE jitted function (a module fixture), so the cases cost one compile.
Codes are argmax on both sides (`stochastic_quantization=False`): sampled
codes would draw different noise. The parameters are random draws in the JAX
tree's shapes (no zero-init heads, which would hide the decoder from the loss
and the gradients).
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from avtok_jax import optimizer, train
from avtok_jax.models import alignment, quantizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
  "torch_reference", ROOT / "bench" / "torch_reference.py"
)
tr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tr)

STAGES = ("stage1", "vanilla")
# case -> (stage, config.model overrides). 'stage1' / 'vanilla' run whatever the config's
# defaults are; the variants spell out every option, so they stay non-default combinations
# when the defaults move (between them and the defaults: both norms placements, head_norm,
# every locality in use, three code scales and both quantizer gradients).
CASES = {
  "stage1": ("stage1", {}),
  "vanilla": ("vanilla", {}),
  "outside": (
    "vanilla",
    dict(
      norms="outside",
      head_norm=False,
      locality="none",
      code_scale=1.0,
      quantizer_gradient="straight_through",
    ),
  ),
  "inside_rotation": (
    "vanilla",
    dict(
      norms="inside",
      head_norm=True,
      locality="decoder",
      code_scale=2.0,
      quantizer_gradient="rotation",
    ),
  ),
}
# Cases with both modalities: encode/decode is checked on these.
TWO_STREAM = tuple(c for c, (stage, _) in CASES.items() if stage == "vanilla")
BATCH = 4
# Tighter than the 1e-4 the reference has to meet: measured agreement is <= 1.5e-6 (relative,
# float32), while the nearest wrong variants move some term by more: GELU erf instead of tanh
# 9e-5 (alignment), LayerNorm eps 1e-5 instead of 1e-6 3e-5 (vq). Reconstructions agree to
# 1.2e-6 absolute (values up to ~3); those variants move them by 5e-4 and 4e-5.
RTOL = 1e-5
RECON_ATOL = 1e-5
# The parameters upstream of the quantizer, the only ones whose gradient depends on
# `quantizer_gradient` (the gradient reaches them through z): the shared encoder, quant_in and
# per modality embed, queries and region_in.
UPSTREAM = re.compile(r"^(encoder|quant_in|(video|audio)_(embed|queries|region_in))(/|$)")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
  # Tiny ops on 2 threads spend their time waiting for each other when the CPU
  # is shared (measured: 2.2 s vs 0.03 s per tiny train step); results are the same.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def _config(stage: str, preset: str = "tiny", **model_overrides):
  config = tr.load_config(stage, preset)
  config.model.stochastic_quantization = False
  config.model.update(model_overrides)
  return config


def _case_config(case: str, preset: str = "tiny"):
  stage, overrides = CASES[case]
  return _config(stage, preset, **overrides)


def _jax_step(config, models, params, codebook_stats):
  """The JAX train step and its state. The optimizer passes the gradients of the `UPSTREAM`
  parameters and zeroes the rest, so that the step's `update_norm` is their gradient norm; the
  other metrics compared here (loss terms, gradient norm) are computed before it, and Adam would
  only add compile time."""
  trainable = optimizer.trainable_mask(params, config.param_rules)
  downstream = jax.tree.map(lambda path: not UPSTREAM.search(path), optimizer.param_paths(params))
  tx = optax.masked(optax.set_to_zero(), downstream)
  state = {
    "step": jnp.zeros((), jnp.int32),
    "rng": jax.random.key_data(jax.random.key(1)),
    "params": params,
    "codebook_stats": codebook_stats,
    "opt_state": tx.init(params),
  }
  if train._restart_every(config, trainable):
    state["restart_counts"] = jnp.zeros_like(codebook_stats["quantizer"]["counts"])
  return state, train.make_train_step(config, models, tx, None, trainable)


def _random_params(models):
  """Parameters in the JAX tree's shapes: N(0, 0.1) everywhere, LayerNorm scales 1 + N(0, 0.1),
  codebook N(0, 1) (no zero-init heads, so the decoder shows in the loss and the gradients)."""
  abstract = train._strip_boxes(jax.eval_shape(models.init, jax.random.key(0)))
  rng = np.random.default_rng(0)

  def draw(path, x):
    name = jax.tree_util.keystr(path)
    z = rng.standard_normal(x.shape).astype(np.float32)
    if "codebook" in name:
      return jnp.asarray(z)
    return jnp.asarray((1.0 if name.endswith("['scale']") else 0.0) + 0.1 * z)

  params = jax.tree_util.tree_map_with_path(draw, abstract["params"])
  return params, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract["codebook_stats"])


@pytest.fixture(scope="module")
def reference():
  configs = {c: _case_config(c) for c in CASES}
  models = {c: train.Models(cfg) for c, cfg in configs.items()}
  # Cases with the same model options share one set of parameters (stage 1 and vanilla have the
  # same tree on tiny).
  drawn, params, states, steps = {}, {}, {}, {}
  for c, (_, overrides) in CASES.items():
    key = tuple(sorted(overrides.items()))
    if key not in drawn:
      drawn[key] = _random_params(models[c])
    params[c], codebook_stats = drawn[key]
    states[c], steps[c] = _jax_step(configs[c], models[c], params[c], codebook_stats)
  batch = tr.random_batch(tr.build(configs["vanilla"]), BATCH, seed=0)
  jax_batch = {k: jnp.asarray(v.numpy()) for k, v in batch.items()}

  def encode_decode(case, batch):
    tokenizer = models[case].tokenizer
    tok_params = {k: v for k, v in params[case].items() if not k.endswith("_projector")}
    encoded = tokenizer.apply(
      {"params": tok_params},
      batch["video_patches"],
      batch["mel_patches"],
      method=tokenizer.encode,
    )
    codes = {m: encoded[m]["codes"] for m in encoded}
    recon = tokenizer.apply({"params": tok_params}, codes, method=tokenizer.decode)
    return codes, recon

  @jax.jit
  def run(states, batch):
    metrics = {c: steps[c](states[c], batch)[1] for c in CASES}
    return metrics, {c: encode_decode(c, batch) for c in TWO_STREAM}

  metrics, decoded = jax.device_get(run(states, jax_batch))
  return dict(configs=configs, params=params, batch=batch, metrics=metrics, decoded=decoded)


def _torch_model(reference, case, config=None):
  model = tr.build(reference["configs"][case] if config is None else config)
  tr.load_jax_params(model, reference["params"][case])
  return model


def _loss_and_grad_norm(model, batch):
  """(loss, metrics, global gradient norm, gradient norm of the `UPSTREAM` parameters)."""
  loss, metrics = model(batch, 0.0)  # step 0: scheduled-sampling ratio 0
  loss.backward()
  # Frozen / unused parameters count 0, as in JAX.
  paths = model.jax_paths()
  grads = {paths[n]: p.grad for n, p in model.named_parameters() if p.grad is not None}
  upstream = [g for path, g in grads.items() if UPSTREAM.search(path)]
  assert upstream
  grad_norm = torch.sqrt(sum(g.square().sum() for g in grads.values()))
  upstream_norm = torch.sqrt(sum(g.square().sum() for g in upstream))
  return loss, metrics, float(grad_norm), float(upstream_norm)


@pytest.mark.parametrize("case", list(CASES))
def test_losses_and_gradient_norm_match_jax(reference, case):
  model = _torch_model(reference, case)
  jax_metrics = reference["metrics"][case]
  loss, metrics, grad_norm, upstream_norm = _loss_and_grad_norm(model, reference["batch"])
  expected = {"video_l1", "video_l2", "vq", "prior", "alignment", "loss"}
  if CASES[case][0] == "vanilla":
    expected |= {"audio_l1", "audio_l2"}
  assert set(metrics) == expected
  for name, value in metrics.items():
    np.testing.assert_allclose(float(value), jax_metrics[name], rtol=RTOL, err_msg=name)
  assert float(loss.detach()) == float(metrics["loss"])
  # Same backward (`update_norm`: the JAX step's gradient norm of the UPSTREAM parameters).
  np.testing.assert_allclose(grad_norm, jax_metrics["grad_norm"], rtol=RTOL)
  np.testing.assert_allclose(upstream_norm, jax_metrics["update_norm"], rtol=RTOL)
  if reference["configs"][case].model.quantizer_gradient == "rotation":
    # The check sees the gradient option: straight-through gives the same losses (the
    # forward values are identical) and upstream gradient norms off by 1.7e-3 to 6.6e-2
    # (measured per case; R^T g keeps |g| per token, so only directions change), >= 170x
    # RTOL. The global norm, diluted by the rest of the model, moves by as little as 6.3e-5
    # (inside_rotation), too close to RTOL to tell the options apart with a margin.
    config = _case_config(case)
    config.model.quantizer_gradient = "straight_through"
    _, st_metrics, _, st_upstream = _loss_and_grad_norm(
      _torch_model(reference, case, config), reference["batch"]
    )
    assert float(st_metrics["loss"]) == float(metrics["loss"])
    assert abs(st_upstream / jax_metrics["update_norm"] - 1) > 10 * RTOL


@pytest.mark.parametrize("case", TWO_STREAM)
def test_encode_decode_match_jax(reference, case):
  model = _torch_model(reference, case)
  jax_codes, jax_recon = reference["decoded"][case]
  codes = model.encode(reference["batch"])
  for m in ("video", "audio"):
    np.testing.assert_array_equal(codes[m].numpy(), jax_codes[m])
  recon = model.decode(codes)
  for m in ("video", "audio"):
    np.testing.assert_allclose(recon[m].numpy(), jax_recon[m], rtol=0, atol=RECON_ATOL)
  assert set(model.reconstruct(reference["batch"])) == {"video", "audio"}


def test_rotation_matches_jax_value_and_gradient():
  """tr._rotate_onto against quantizer._rotate_onto: value q, vector-Jacobian product R^T g."""
  rng = np.random.default_rng(0)
  z, q, g = (rng.standard_normal((6, 16)).astype(np.float32) for _ in range(3))
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  q /= np.linalg.norm(q, axis=-1, keepdims=True)
  want, vjp = jax.vjp(lambda z: quantizer._rotate_onto(z, jnp.asarray(q)), jnp.asarray(z))
  (want_grad,) = vjp(jnp.asarray(g))
  zt = torch.from_numpy(z).requires_grad_(True)
  got = tr._rotate_onto(zt, torch.from_numpy(q))
  got.backward(torch.from_numpy(g))
  np.testing.assert_array_equal(got.detach().numpy(), q)
  np.testing.assert_allclose(got.detach().numpy(), np.asarray(want), rtol=0, atol=1e-6)
  np.testing.assert_allclose(zt.grad.numpy(), np.asarray(want_grad), rtol=1e-5, atol=1e-6)
  # R is a rotation taking z onto q: |R^T g| = |g|, and R^T g != g.
  np.testing.assert_allclose(
    np.linalg.norm(zt.grad.numpy(), axis=-1), np.linalg.norm(g, axis=-1), rtol=1e-5
  )
  assert not np.allclose(zt.grad.numpy(), g, atol=1e-2)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_parameter_counts_match_jax(reference, preset):
  for case in CASES if preset == "tiny" else STAGES:
    config = _case_config(case, preset)
    if preset == "tiny":
      tree = reference["params"][case]
    else:
      tree = jax.eval_shape(train.Models(config).init, jax.random.key(0))["params"]
      tree = train._strip_boxes(tree)
    jax_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    assert tr.num_params(tr.build(config)) == jax_count


def test_teacher_matches_jax_with_resampling():
  """The small preset's video teacher grid (4, 8, 8) is resampled to (2, 8, 8): covers the resize."""
  config = _config("stage1", "small")
  model = tr.build(config)
  assert model.teacher.resize["video"]  # the time axis shrinks
  teacher = alignment.RandomFeatureTeacher(
    seed=config.alignment.teacher_seed, feature_dim=config.alignment.feature_dim
  )
  rng = np.random.default_rng(0)
  video = rng.uniform(-1, 1, (1, *model.video_shape, 3)).astype(np.float32)
  mel = rng.uniform(-1, 1, (1, *model.mel_shape)).astype(np.float32)
  for m, raw in (("video", video), ("audio", mel)):
    want = alignment.teacher_targets(teacher, m, jnp.asarray(raw), model.grids[m])
    got = model.teacher(m, torch.from_numpy(raw))
    np.testing.assert_allclose(got.numpy(), np.asarray(want), rtol=1e-4, atol=1e-5, err_msg=m)


def test_resize_matrix_matches_jax_image_resize():
  x = np.random.default_rng(0).standard_normal((7, 3)).astype(np.float32)
  for n_out in (2, 3, 5, 11):
    want = jax.image.resize(jnp.asarray(x), (n_out, 3), method="linear")
    np.testing.assert_allclose(tr._resize_matrix(7, n_out).T @ x, want, rtol=1e-5, atol=1e-6)


def test_load_jax_params_handles_scan_stacked_blocks():
  """B/L use nn.scan: blocks stacked on a leading axis under 'blocks' (per-modality norms
  included, e.g. encoder/blocks/video_norm1) load as block_i; the final per-modality norms
  (encoder/video_norm, decoder/audio_norm with head_norm) are not stacked."""
  overrides = dict(norms="inside", head_norm=True, encoder_depth=2, decoder_depth=2)
  scanned = _config("vanilla", scan=True, **overrides)
  abstract = jax.eval_shape(train.Models(scanned).init, jax.random.key(0))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda x: rng.standard_normal(x.shape).astype(np.float32), train._strip_boxes(abstract)
  )
  stacked = params["encoder"]["blocks"]["video_norm1"]["scale"]
  assert stacked.shape == (2, scanned.model.width)
  assert "video_norm" in params["encoder"] and "audio_norm" in params["decoder"]
  model = tr.build(_config("vanilla", **overrides))
  tr.load_jax_params(model, params)  # strict: every name on both sides
  for i in range(2):
    np.testing.assert_array_equal(
      model.encoder.get_submodule(f"block_{i}.video_norm1").weight.detach().numpy(), stacked[i]
    )
  # The same tree unstacked by hand loads the same values.
  unstacked = dict(params)
  for stack in ("encoder", "decoder"):
    tree = dict(unstacked[stack])
    blocks = tree.pop("blocks")
    for i in range(2):
      tree[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], blocks)
    unstacked[stack] = tree
  other = tr.build(_config("vanilla", **overrides))
  tr.load_jax_params(other, unstacked)
  for (name, x), (_, y) in zip(model.state_dict().items(), other.state_dict().items(), strict=True):
    assert torch.equal(x, y), name


def test_train_step_freezes_audio_in_stage1_and_runs_the_cli():
  torch.manual_seed(0)
  config = _config("stage1")
  model = tr.build(config)
  step = tr.make_train_step(model)
  before = {k: v.clone() for k, v in model.state_dict().items()}
  lrs = sorted(g["lr"] for g in step.optimizer.param_groups)
  # One group per multiplier of the config's rules, plus x1 for the rest (stage 1: the
  # prior's x50 [LARP], the codebook's x10); 'frozen' makes no group.
  mults = {1.0} | {float(v) for _, v in config.param_rules if v != optimizer.FROZEN}
  assert lrs == sorted(m * config.optim.lr for m in mults)
  lr_of = {id(p): g["lr"] for g in step.optimizer.param_groups for p in g["params"]}
  assert lr_of[id(model.prior.start_token)] == 50 * config.optim.lr  # the prior's x50 [LARP]
  batch = tr.random_batch(model, 2)
  losses = [float(step(batch)["loss"]) for _ in range(3)]
  assert all(np.isfinite(losses))
  after = model.state_dict()
  for name in before:
    changed = not torch.equal(before[name], after[name])
    if name.startswith("audio_"):
      assert not changed, name  # frozen in stage 1
  assert not torch.equal(
    before["encoder.block_0.mlp.fc1.weight"], after["encoder.block_0.mlp.fc1.weight"]
  )
  # Two prior rounds [LARP]: identical inputs at ratio 0, sampled replacements at ratio 1.
  quantized = model._encode_one("video", tr._to_float_patches(batch["video_patches"]), False)
  codebook = model.quantizer.normalized_codebook()
  with torch.no_grad():
    same = model.prior(quantized["quantized"], codebook, 0.0)
    mixed = model.prior(quantized["quantized"], codebook, 1.0)
  assert len(same) == 2 and torch.equal(same[0], same[1])
  assert torch.equal(same[0], mixed[0]) and not torch.equal(mixed[0], mixed[1])
  result = tr.main(
    ["--preset=tiny", "--stage=vanilla", "--batch_size=2", "--steps=2", "--warmup=1", "--threads=1"]
  )
  assert result["train_step_s"] > 0 and result["threads"] >= 1 and result["codes"] == "argmax"


def test_codebook_init_std_follows_config():
  for std in (0.25, 1.0):
    model = tr.build(_config("vanilla", codebook_init_std=std))
    np.testing.assert_allclose(float(model.quantizer.codebook.detach().std()), std, rtol=0.1)
