"""Checkpoints: round trips, keep policy, sharded restores, partial init, preemption."""

import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from avtok_jax import checkpointing

_CHECK = Path(__file__).with_name("checkpointing_sharded_check.py")


def _state(seed: int = 0) -> dict:
  """A small train state with every kind of leaf the trainer saves."""
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  params = {
    "encoder": {"kernel": jax.random.normal(k1, (4, 6)), "bias": jnp.arange(6.0)},
    "codebook": jax.random.normal(k2, (8, 3), jnp.bfloat16),
  }
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
  opt_state = tx.init(params)
  # One real update so the moments and the count are not all zeros.
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)
  return {
    "params": params,
    "opt_state": opt_state,
    "codebook_stats": {"counts": jnp.arange(8, dtype=jnp.int32)},
    "step": jnp.asarray(17, jnp.int32),
    "rng": k3,  # A typed key: supported as is.
    "rng_data": jax.random.key_data(k3),  # The raw uint32 alternative.
  }


def _assert_identical(restored, expected):
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  for (path, a), b in zip(
    jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(expected), strict=True
  ):
    name = jax.tree_util.keystr(path)
    assert isinstance(a, jax.Array), name
    assert a.dtype == b.dtype and a.shape == b.shape, name
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_round_trip_is_bit_identical_with_async_save(tmp_path):
  state = _state()
  to_save = _state()  # Same values; deleted below while the save may be in flight.
  data_state = {"next_index": 12, "epoch": 0, "nested": {"seed": [1, 2]}}
  ckpt = checkpointing.Checkpointer(tmp_path / "ckpt")
  assert ckpt.latest_step() is None and ckpt.all_steps() == []
  assert ckpt.save(17, to_save, data_state=data_state)
  # The train step donates its input buffers right after `save` returns: the
  # asynchronous write must already own a copy.
  for x in jax.tree.leaves(to_save):
    x.delete()
  ckpt.wait_until_finished()
  assert ckpt.latest_step() == 17
  assert (tmp_path / "ckpt" / "17" / "data_state" / "process_0-of-1.json").exists()

  # Into an abstract target (the trainer's path: eval_shape + shardings).
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), jax.eval_shape(_state)
  )
  restored, restored_data = ckpt.restore(abstract)
  _assert_identical(restored, state)
  assert isinstance(restored["opt_state"][1][0], optax.ScaleByAdamState)
  assert restored_data == data_state
  # Into concrete arrays of another state (values replaced, not mixed).
  restored, _ = ckpt.restore(_state(seed=1), step=17)
  _assert_identical(restored, state)
  ckpt.close()

  # A fresh Checkpointer (a resumed run) sees the same checkpoint.
  reopened = checkpointing.Checkpointer(tmp_path / "ckpt")
  assert reopened.latest_step() == 17
  _assert_identical(reopened.restore(abstract)[0], state)
  reopened.close()


def test_keep_last_n_plus_every_k(tmp_path):
  state = {"w": jnp.zeros(3), "step": jnp.int32(0)}
  ckpt = checkpointing.Checkpointer(tmp_path, keep=2, keep_every=4)
  for step in range(1, 10):
    assert ckpt.save(step, {"w": state["w"] + step, "step": jnp.int32(step)})
  ckpt.wait_until_finished()
  assert ckpt.all_steps() == [4, 8, 9]
  assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [4, 8, 9]
  assert ckpt.latest_step() == 9
  # A preemption save on a step already written is a no-op, not an error.
  assert not ckpt.save(9, state, force=True)
  restored, data_state = ckpt.restore(state, step=4)
  assert data_state is None  # Saved without one.
  np.testing.assert_array_equal(restored["w"], np.full(3, 4.0))
  assert int(restored["step"]) == 4
  ckpt.close()

  only_latest = checkpointing.Checkpointer(tmp_path / "latest", keep=1, async_save=False)
  for step in (1, 2, 3):
    only_latest.save(step, state)
  assert only_latest.all_steps() == [3]
  only_latest.close()


def test_restore_errors_are_clear(tmp_path):
  state = {"params": {"w": jnp.zeros((2, 3))}, "step": jnp.int32(0)}
  empty = checkpointing.Checkpointer(tmp_path / "empty")
  assert (tmp_path / "empty").is_dir()  # Created if missing.
  with pytest.raises(FileNotFoundError, match=f"No checkpoint found in {tmp_path / 'empty'}"):
    empty.restore(state)
  empty.close()

  ckpt = checkpointing.Checkpointer(tmp_path / "ckpt", async_save=False)
  ckpt.save(5, state)
  with pytest.raises(FileNotFoundError, match=r"step 6 .* available steps: \[5\]"):
    ckpt.restore(state, step=6)
  wrong_shape = {"params": {"w": jnp.zeros((2, 4))}, "step": jnp.int32(0)}
  with pytest.raises(ValueError, match=r"params/w \(checkpoint \(2, 3\), target \(2, 4\)\)") as e:
    ckpt.restore(wrong_shape)
  assert str(tmp_path / "ckpt") in str(e.value)
  extra = {"params": {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}, "step": jnp.int32(0)}
  with pytest.raises(ValueError, match="missing from the checkpoint: params/b"):
    ckpt.restore(extra)
  with pytest.raises(ValueError, match="in the checkpoint but not in the target: step"):
    ckpt.restore({"params": state["params"]})
  ckpt.close()

  with pytest.raises(ValueError, match="keep=0"):
    checkpointing.Checkpointer(tmp_path / "bad", keep=0)


def test_restore_params_partial(tmp_path):
  old = _state()
  ckpt = checkpointing.Checkpointer(tmp_path, async_save=False)
  ckpt.save(3, old)
  ckpt.save(8, jax.tree.map(lambda x: x, old) | {"params": {"encoder": old["params"]["encoder"]}})
  ckpt.close()

  # Stage 2: the encoder is shared, an audio module is new, the codebook grew.
  fresh = {
    "encoder": {"kernel": jnp.zeros((4, 6)), "bias": jnp.zeros(6)},
    "audio": {"kernel": jnp.full((2, 2), 5.0)},
  }
  merged, restored, fresh_paths = checkpointing.restore_params_partial(tmp_path, fresh)
  assert restored == ["encoder/bias", "encoder/kernel"]
  assert fresh_paths == ["audio/kernel"]
  np.testing.assert_array_equal(merged["encoder"]["kernel"], old["params"]["encoder"]["kernel"])
  np.testing.assert_array_equal(merged["encoder"]["bias"], old["params"]["encoder"]["bias"])
  np.testing.assert_array_equal(merged["audio"]["kernel"], fresh["audio"]["kernel"])
  assert merged["encoder"]["kernel"].sharding == fresh["encoder"]["kernel"].sharding

  # Step 3 still has the codebook; its shape no longer fits.
  grown = fresh | {"codebook": jnp.zeros((16, 3), jnp.bfloat16)}
  with pytest.raises(ValueError, match=r"'codebook'.*\(8, 3\) != target shape \(16, 3\)"):
    checkpointing.restore_params_partial(tmp_path, grown, step=3)
  # The latest step (8) has no codebook: it stays fresh.
  _, restored, fresh_paths = checkpointing.restore_params_partial(tmp_path, grown)
  assert fresh_paths == ["audio/kernel", "codebook"]
  # Another subtree of the state, e.g. the codebook statistics.
  stats, restored, _ = checkpointing.restore_params_partial(
    tmp_path, {"counts": jnp.zeros(8, jnp.int32)}, item_path=("codebook_stats",)
  )
  assert restored == ["counts"]
  np.testing.assert_array_equal(stats["counts"], np.arange(8))

  with pytest.raises(FileNotFoundError, match="No checkpoint directory .*missing"):
    checkpointing.restore_params_partial(tmp_path / "missing", fresh)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="No checkpoint found in .*empty"):
    checkpointing.restore_params_partial(tmp_path / "empty", fresh)
  with pytest.raises(KeyError, match="no state/ema"):
    checkpointing.restore_params_partial(tmp_path, fresh, item_path=("ema",))


def _wait_for(predicate, timeout: float = 2.0) -> bool:
  deadline = time.monotonic() + timeout
  while not predicate() and time.monotonic() < deadline:
    time.sleep(0.01)
  return predicate()


def test_preemption_handler_sets_flag_and_restores_handlers():
  seen = []

  def previous(signum, frame):
    seen.append(signum)

  old_term = signal.signal(signal.SIGTERM, previous)
  old_int = signal.getsignal(signal.SIGINT)
  try:
    with checkpointing.PreemptionHandler() as preemption:
      assert not preemption.requested
      assert signal.getsignal(signal.SIGINT) is old_int  # SIGINT untouched by default.
      os.kill(os.getpid(), signal.SIGTERM)
      assert _wait_for(lambda: preemption.requested)
      assert preemption.signum == signal.SIGTERM
      assert seen == []  # Only the flag: the step is never interrupted.
    assert signal.getsignal(signal.SIGTERM) is previous
    os.kill(os.getpid(), signal.SIGTERM)
    assert _wait_for(lambda: seen == [signal.SIGTERM])

    with checkpointing.PreemptionHandler(sigint=True) as preemption:
      os.kill(os.getpid(), signal.SIGINT)
      assert _wait_for(lambda: preemption.requested)
      assert preemption.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is old_int
  finally:
    signal.signal(signal.SIGTERM, old_term)


def test_sharded_save_restores_onto_other_shardings(tmp_path, run_on_8_cpu_devices):
  facts = run_on_8_cpu_devices(_CHECK, tmp_path, timeout=300)

  saved = facts["saved"]
  assert saved["mesh_shapes"] == ["{'data': 2, 'fsdp': 1, 'model': 4}"]
  assert saved["specs"]["['params']['kernel']"] == "P('data', 'model')"
  assert saved["shard_shapes"]["['params']['kernel']"] == [4, 4]
  assert facts["data_state"] == {"index": 3}

  replicated = facts["replicated"]
  assert replicated["equal"]
  assert replicated["mesh_shapes"] == ["{'data': 4, 'fsdp': 1, 'model': 2}"]
  assert set(replicated["specs"].values()) == {"P()"}
  assert replicated["shard_shapes"]["['params']['kernel']"] == [8, 16]

  resharded = facts["resharded"]
  assert resharded["equal"]
  assert resharded["mesh_shapes"] == ["{'data': 4, 'fsdp': 1, 'model': 2}"]
  assert resharded["specs"]["['params']['kernel']"] == "P('model', 'data')"
  assert resharded["specs"]["['opt_state'][0].mu['codebook']"] == "P('data', None)"
  assert resharded["shard_shapes"]["['params']['kernel']"] == [4, 4]
  assert resharded["shard_shapes"]["['params']['codebook']"] == [4, 4]

  partial = facts["partial"]
  assert partial["restored_paths"] == ["kernel"] and partial["fresh_paths"] == ["new"]
  assert partial["kernel_equal"] and partial["new_equal"]
  assert partial["kernel_spec"] == "P('model', 'data')"
  assert partial["kernel_mesh"] == "{'data': 4, 'fsdp': 1, 'model': 2}"
  assert partial["new_spec"] == "P('data', None)"


def test_grain_iterator_state_resumes_the_same_batches(tmp_path):
  from avtok_jax import config_lib
  from avtok_jax.data import pipeline

  c = config_lib.data_config("tiny")
  c.num_train_examples, c.batch_size, c.num_workers = 8, 2, 0

  def make():
    return pipeline.make_iterator(c, "train", train=True, seed=3, process_index=0, process_count=1)

  it = make()
  for _ in range(3):
    next(it)
  ckpt = checkpointing.Checkpointer(tmp_path)
  ckpt.save(3, {"step": jnp.int32(3)}, data_state=it.get_state())
  expected = [next(it) for _ in range(3)]  # Crosses the 4-batch epoch boundary.
  ckpt.close()

  reopened = checkpointing.Checkpointer(tmp_path)
  _, data_state = reopened.restore({"step": jnp.int32(0)})
  reopened.close()
  resumed = make()
  resumed.set_state(data_state)
  for a, b in zip([next(resumed) for _ in range(3)], expected, strict=True):
    assert sorted(a) == sorted(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
