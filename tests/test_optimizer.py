"""Freezing rules, learning-rate multipliers, schedule and checksum (avtok_jax/optimizer.py).

Also checks each VFAL stage config's rules on the real tiny parameter tree
against the AVTOK.md section 4 table.
"""

import functools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from avtok_jax import config_lib, optimizer
from avtok_jax.models import build_tokenizer

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _config(name: str, arg: str = "tiny") -> ml_collections.ConfigDict:
  return config_lib.load_sibling_config(str(CONFIG_DIR / "x.py"), name).get_config(arg)


def _optim(**overrides) -> ml_collections.ConfigDict:
  c = _config("vfal_stage1").optim
  c.warmup_steps = 0
  c.update(overrides)
  return c


@functools.lru_cache(maxsize=1)
def _tiny_tree():
  """Abstract tiny tokenizer params + fake alignment projectors (the trainer's tree)."""
  c = _config("vfal_stage1")
  model = build_tokenizer(c.model, c.data)
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), **model.example_inputs(), train=False)
  )
  params = dict(nn.meta.unbox(variables["params"]))
  for m in ("video", "audio"):
    params[f"{m}_projector"] = {
      "dense_0": {
        "kernel": jax.ShapeDtypeStruct((48, 64), jnp.float32),
        "bias": jax.ShapeDtypeStruct((64,), jnp.float32),
      }
    }
  return params


def _labels_by_path(params, rules) -> dict[str, str]:
  paths = jax.tree.leaves(optimizer.param_paths(params))
  labels = jax.tree.leaves(optimizer.param_labels(params, rules))
  return dict(zip(paths, labels, strict=True))


def _fake_tree(seed: int = 0):
  rng = np.random.default_rng(seed)

  def a(*shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)

  return {
    "encoder": {"block_0": {"kernel": a(4, 3), "bias": a(3)}},
    "decoder": {"kernel": a(3, 4)},
    "prior": {"kernel": a(3, 3)},
    "audio_head": {"kernel": a(2, 2)},
  }


# ----------------------------------------------------------------------------- paths and labels


def test_paths_of_boxed_and_unboxed_trees_agree():
  boxed = {"enc": {"kernel": nn.Partitioned(jnp.zeros((2, 2)), names=("a", "b"))}, "q": [1.0, 2.0]}
  paths = optimizer.param_paths(boxed)
  assert jax.tree.leaves(paths) == ["enc/kernel", "q/0", "q/1"]
  assert jax.tree.leaves(optimizer.param_paths(nn.meta.unbox(boxed))) == jax.tree.leaves(paths)


def test_first_match_wins_and_unmatched_trains_at_x1():
  rules = ((r"^prior/", 50.0), (r"kernel$", "frozen"), (r"^prior/", "frozen"))
  labels = _labels_by_path(_fake_tree(), rules)
  assert labels == {
    "audio_head/kernel": "frozen",
    "decoder/kernel": "frozen",
    "encoder/block_0/bias": "lr_x1",
    "encoder/block_0/kernel": "frozen",
    "prior/kernel": "lr_x50",
  }
  mask = optimizer.trainable_mask(_fake_tree(), rules)
  assert mask["prior"]["kernel"] and not mask["decoder"]["kernel"]


@pytest.mark.parametrize(
  "rules,message",
  [
    (((r"^encoder/", "frozen"), (r"^encodr/", "frozen")), "'\\^encodr/' matches no parameter"),
    (((r"^(prior", 2.0),), "'\\^\\(prior' does not compile"),
    (((r"^prior/", "freeze"),), "'freeze' must be 'frozen'"),
    (((r"^prior/", 0.0),), "multiplier 0.0 must be finite and > 0"),
    (((r"^prior/",),), "is not a \\(regex, value\\) pair"),
  ],
)
def test_bad_rules_are_named(rules, message):
  with pytest.raises(ValueError, match=message):
    optimizer.param_labels(_fake_tree(), rules)


def test_summarize_counts_tensors_and_params():
  text = optimizer.summarize(_fake_tree(), ((r"^prior/", 50.0), (r"^audio_", "frozen")))
  lines = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
  assert lines["lr_x1"][1:3] == ["3", "27"]  # 4x3 + 3 + 3x4
  assert lines["lr_x50"][1:3] == ["1", "9"]
  assert lines["frozen"][1:3] == ["1", "4"]
  assert lines["total"][1:3] == ["5", "40"]
  assert lines["audio_head"][-1] == "frozen"


# ----------------------------------------------------------------------------- the optimizer


def _run_steps(params, rules, optim, steps=3, apply=optimizer.apply_updates):
  tx = optimizer.make_optimizer(optim, params, rules, total_steps=10)
  state = tx.init(params)
  mask = optimizer.trainable_mask(params, rules)
  key = jax.random.key(1)
  for i in range(steps):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(key, i), len(leaves))
    grads = treedef.unflatten(
      [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )
    updates, state = jax.jit(tx.update)(grads, state, params)
    params = (
      apply(params, updates, mask) if apply is optimizer.apply_updates else apply(params, updates)
    )
  return params, state


@pytest.mark.parametrize(
  "apply", [optimizer.apply_updates, optax.apply_updates], ids=["ours", "optax"]
)
def test_frozen_leaves_are_bit_identical_and_trainable_ones_move(apply):
  params = _fake_tree()
  # A -0.0 in a frozen leaf: adding a zero update would flip it to +0.0.
  params["decoder"]["kernel"] = params["decoder"]["kernel"].at[0, 0].set(-0.0)
  rules = ((r"^(decoder|audio_)", "frozen"), (r"^prior/", 50.0))
  new, state = _run_steps(params, rules, _optim(weight_decay=0.01), apply=apply)
  for name in ("decoder", "audio_head"):
    assert np.array_equal(new[name]["kernel"], params[name]["kernel"])
  if apply is optimizer.apply_updates:
    # Bit level, not just ==: the -0.0 survives and the checksum agrees.
    assert np.signbit(new["decoder"]["kernel"][0, 0])
    assert float(optimizer.frozen_checksum(new, rules)) == float(
      optimizer.frozen_checksum(params, rules)
    )
  for leaf in ("encoder", "prior"):
    for before, after in zip(
      jax.tree.leaves(params[leaf]), jax.tree.leaves(new[leaf]), strict=True
    ):
      assert not np.any(np.asarray(before) == np.asarray(after))
  # No Adam moments are kept for frozen parameters.
  moments = [x for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) > 0]
  assert sum(x.size for x in moments) == 2 * (12 + 3 + 9)  # mu and nu of encoder + prior


def test_multiplier_scales_the_first_adam_update():
  # Adam's first bias-corrected update is ~sign(g) * lr: the x50 leaf moves 50x further.
  params = {"a": {"w": jnp.zeros((5,))}, "prior": {"w": jnp.zeros((5,))}}
  grads = {"a": {"w": jnp.full((5,), 0.3)}, "prior": {"w": jnp.full((5,), -0.02)}}
  optim = _optim(lr=1e-3, grad_clip=0.0)
  tx = optimizer.make_optimizer(optim, params, ((r"^prior/", 50.0),), total_steps=100)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["a"]["w"], -1e-3, rtol=1e-4)
  np.testing.assert_allclose(updates["prior"]["w"], 50 * 1e-3, rtol=1e-4)


def test_global_clip_ignores_frozen_gradients():
  # A huge gradient on a frozen leaf must not shrink the trainable update.
  params = {"enc": {"w": jnp.zeros((3,))}, "head": {"w": jnp.zeros((3,))}}
  grads = {"enc": {"w": jnp.full((3,), 1e6)}, "head": {"w": jnp.full((3,), 0.1)}}
  optim = _optim(lr=1.0, b1=0.0, b2=0.0, grad_clip=1.0)
  tx = optimizer.make_optimizer(optim, params, ((r"^enc/", "frozen"),), total_steps=10)
  # With b1 = b2 = 0, Adam's update is g / (|g| + eps): ~1 unless g was clipped to ~0.
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["head"]["w"], -1.0, rtol=1e-4)
  np.testing.assert_array_equal(updates["enc"]["w"], 0.0)


# ----------------------------------------------------------------------------- schedule


def test_schedule_warmup_peak_and_end():
  optim = _optim(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
  s = optimizer.make_schedule(optim, total_steps=110)
  np.testing.assert_allclose(float(s(0)), 1e-4, rtol=1e-6)  # lr / warmup: step 0 learns
  np.testing.assert_allclose(float(s(4)), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(s(9)), 1e-3, rtol=1e-6)  # peak at the end of warmup
  np.testing.assert_allclose(float(s(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(s(60)), 1e-4 + 0.5 * 9e-4, rtol=1e-5)  # cosine midpoint
  np.testing.assert_allclose(float(s(110)), 1e-4, rtol=1e-5)  # min_lr_ratio * lr
  np.testing.assert_allclose(float(s(500)), 1e-4, rtol=1e-5)
  assert all(float(s(i + 1)) <= float(s(i)) + 1e-12 for i in range(10, 110))
  const = optimizer.make_schedule(_optim(lr=2e-4, warmup_steps=0, schedule="constant"), 50)
  assert float(const(0)) == float(const(49)) == pytest.approx(2e-4)
  with pytest.raises(ValueError, match="optim.schedule='linear'"):
    optimizer.make_schedule(_optim(schedule="linear"), 10)


# ----------------------------------------------------------------------------- checksum


def test_frozen_checksum_sees_one_ulp_and_ignores_trainable():
  params = _fake_tree()
  rules = ((r"^(decoder|audio_)", "frozen"),)
  checksum = jax.jit(lambda p: optimizer.frozen_checksum(p, rules))
  base = float(checksum(params))
  assert base == float(optimizer.frozen_checksum(params, rules))

  def edited(leaf, fn):
    p = jax.tree.map(lambda x: x, params)
    p[leaf]["kernel"] = p[leaf]["kernel"].at[1, 1].set(fn(p[leaf]["kernel"][1, 1]))
    return p

  up = edited("decoder", lambda x: np.nextafter(np.float32(x), np.float32(np.inf)))
  down = edited("audio_head", lambda x: np.nextafter(np.float32(x), np.float32(-np.inf)))
  sign = edited("decoder", lambda x: -x)
  for changed in (up, down, sign):
    assert float(checksum(changed)) != base
  # Trainable values do not enter the checksum.
  assert float(checksum(edited("prior", lambda x: x + 1.0))) == base
  # Nothing frozen -> 0.
  assert float(optimizer.frozen_checksum(params, ((r"^prior/", 50.0),))) == 0.0
  # Exactly representable: an integer below 2^24.
  assert base == int(base) and 0 <= base < 2**24


# ----------------------------------------------------------------------------- stage rules on the real tree


# Representative paths per stage: (path, expected label) [AVTOK.md section 4].
_STAGE_TABLE = {
  "vfal_stage1": [
    ("encoder/block_0/attn/query/kernel", "lr_x1"),
    ("decoder/block_0/mlp/fc1/kernel", "lr_x1"),
    ("quant_in/kernel", "lr_x1"),
    ("quantizer/codebook", "lr_x10"),
    ("quant_out/kernel", "lr_x1"),
    ("video_embed/kernel", "lr_x1"),
    ("video_queries", "lr_x1"),
    ("video_head/kernel", "lr_x1"),
    ("encoder/block_0/video_norm1/scale", "lr_x1"),
    ("decoder/block_0/video_norm2/bias", "lr_x1"),
    ("video_projector/dense_0/kernel", "lr_x1"),
    ("prior/transformer/block_0/mlp/fc1/kernel", "lr_x50"),
    ("encoder/block_0/audio_norm1/scale", "frozen"),
    ("encoder/audio_norm/bias", "frozen"),
    ("audio_embed/kernel", "frozen"),
    ("audio_patch_queries", "frozen"),
    ("audio_projector/dense_0/kernel", "frozen"),
  ],
  "vfal_stage2": [
    ("audio_embed/kernel", "lr_x1"),
    ("encoder/block_0/audio_norm1/scale", "lr_x1"),
    ("encoder/audio_norm/bias", "lr_x1"),
    ("audio_queries", "lr_x1"),
    ("audio_patch_queries", "lr_x1"),
    ("decoder/block_0/audio_norm2/scale", "lr_x1"),
    ("audio_head/kernel", "lr_x1"),
    ("audio_projector/dense_0/kernel", "lr_x1"),
    ("prior/in_proj/kernel", "lr_x50"),
    ("encoder/block_0/mlp/fc2/kernel", "frozen"),
    ("encoder/block_0/video_norm1/scale", "frozen"),
    ("decoder/block_0/attn/out/kernel", "frozen"),
    ("decoder/block_0/video_norm2/bias", "frozen"),
    ("quant_in/kernel", "frozen"),
    ("quantizer/codebook", "frozen"),
    ("quant_out/bias", "frozen"),
    ("video_embed/kernel", "frozen"),
    ("video_head/kernel", "frozen"),
    ("video_projector/dense_0/kernel", "frozen"),
  ],
  "vfal_stage3": [
    ("decoder/block_0/attn/query/kernel", "lr_x1"),
    ("quant_out/kernel", "lr_x1"),
    ("video_patch_queries", "lr_x1"),
    ("audio_patch_queries", "lr_x1"),
    ("decoder/block_0/video_norm1/scale", "lr_x1"),
    ("decoder/block_0/audio_norm2/bias", "lr_x1"),
    ("video_head/kernel", "lr_x1"),
    ("audio_head/bias", "lr_x1"),
    ("encoder/video_norm/scale", "frozen"),
    ("encoder/block_0/video_norm1/scale", "frozen"),
    ("quant_in/kernel", "frozen"),
    ("quantizer/codebook", "frozen"),
    ("video_embed/kernel", "frozen"),
    ("encoder/block_0/audio_norm2/bias", "frozen"),
    ("video_queries", "frozen"),
    ("audio_queries", "frozen"),
    ("prior/pos_embed", "frozen"),
    ("video_projector/dense_0/kernel", "frozen"),
    ("audio_projector/dense_0/bias", "frozen"),
  ],
  "vanilla": [
    ("encoder/block_0/attn/query/kernel", "lr_x1"),
    ("audio_embed/kernel", "lr_x1"),
    ("video_head/kernel", "lr_x1"),
    ("encoder/block_0/audio_norm1/scale", "lr_x1"),
    ("quantizer/codebook", "lr_x10"),
    ("audio_projector/dense_0/kernel", "lr_x1"),
    ("prior/start_token", "lr_x50"),
  ],
}


@pytest.mark.parametrize("name", sorted(_STAGE_TABLE))
def test_stage_rules_follow_the_vfal_table(name):
  config = _config(name)
  labels = _labels_by_path(_tiny_tree(), config.param_rules)
  for path, expected in _STAGE_TABLE[name]:
    assert labels[path] == expected, (name, path)
  # Every top-level module is either wholly frozen or wholly trainable in every
  # stage, except that a shared stack's per-modality LayerNorms follow their
  # modality: group by (module, modality of a nested m_* name or None).
  by_part: dict[tuple[str, str | None], set[bool]] = {}
  for path, label in labels.items():
    top, *rest = path.split("/")
    modality = next((p.split("_")[0] for p in rest if p.startswith(("video_", "audio_"))), None)
    by_part.setdefault((top, modality), set()).add(label == "frozen")
  assert all(len(v) == 1 for v in by_part.values()), by_part
  # The optimizer builds on the abstract tree (what the trainer does before init).
  optimizer.make_optimizer(config.optim, _tiny_tree(), config.param_rules, config.total_steps)


def test_stage_rules_match_scanned_trees():
  # B/L scan their blocks ('encoder/blocks/...'); the rules are top-level, so they still apply.
  params = {
    "encoder": {"blocks": {"mlp": {"fc1": {"kernel": jnp.zeros((2, 3, 3))}}}},
    "decoder": {"blocks": {"mlp": {"fc1": {"kernel": jnp.zeros((2, 3, 3))}}}},
    "quant_out": {"kernel": jnp.zeros((2, 3))},
    "video_head": {"kernel": jnp.zeros((3, 2))},
    "audio_head": {"kernel": jnp.zeros((3, 2))},
    "audio_queries": jnp.zeros((2, 3)),
  }
  labels = _labels_by_path(params, _config("vfal_stage3").param_rules)
  assert labels["decoder/blocks/mlp/fc1/kernel"] == "lr_x1"
  assert labels["encoder/blocks/mlp/fc1/kernel"] == "frozen"
  assert labels["audio_queries"] == "frozen"
