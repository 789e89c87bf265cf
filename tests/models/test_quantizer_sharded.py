"""The vocab-sharded quantizer on 8 forced CPU devices equals the 1-device quantizer.

The work happens in `quantizer_sharded_check.py`, run in a subprocess because
the forced device count must be set before JAX starts.
"""

from pathlib import Path

import numpy as np
import pytest

_CHECK = Path(__file__).with_name("quantizer_sharded_check.py")
K, D, B, L = 64, 8, 4, 6  # As in the check script.


@pytest.fixture(scope="module")
def run(tmp_path_factory, run_on_8_cpu_devices):
  out = tmp_path_factory.mktemp("quantizer_sharded")
  facts = run_on_8_cpu_devices(_CHECK, out)
  return dict(np.load(out / "results.npz")), facts


def test_each_device_holds_a_quarter_of_the_codebook(run):
  _, facts = run
  assert facts["vocab_axes"] == ["model"]
  assert facts["codebook_spec"] == "P('model', None)"
  assert facts["codebook_shard_shapes"] == [[K // 4, D]]
  assert facts["counts_shard_shapes"] == [[K // 4]]
  assert facts["grad_codebook_shard_shapes"] == [[K // 4, D]]
  assert "not divisible" in facts["indivisible_error"]
  # Mesh without a vocab split, or rules without 'vocab': plain jnp path.
  assert facts["vocab_axes_data_only_mesh"] == []
  assert facts["vocab_axes_unmapped"] == []


@pytest.mark.parametrize("mode", ["deterministic", "stochastic", "odd"])
def test_sharded_equals_single_device(run, mode):
  results, _ = run
  np.testing.assert_array_equal(results["sharded/params"], results["single/params"])
  keys = sorted(k.split("/", 2)[2] for k in results if k.startswith(f"single/{mode}/"))
  assert keys
  for key in keys:
    single, sharded = results[f"single/{mode}/{key}"], results[f"sharded/{mode}/{key}"]
    assert single.shape == sharded.shape, key
    if single.dtype.kind in "iu":
      np.testing.assert_array_equal(sharded, single, err_msg=key)
    else:
      np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5, err_msg=key)
  if mode != "odd":
    assert results[f"single/{mode}/codes"].shape == (B, L)
    np.testing.assert_array_equal(
      results[f"sharded/{mode}/quantized"], results[f"sharded/{mode}/lookup"]
    )
    assert np.abs(results[f"single/{mode}/grad_codebook"]).max() > 0
    assert np.abs(results[f"single/{mode}/grad_z"]).max() > 0


def test_sampling_is_layout_independent_and_really_samples(run):
  results, _ = run
  for prefix in ("single", "sharded"):
    det, sto = results[f"{prefix}/deterministic/codes"], results[f"{prefix}/stochastic/codes"]
    assert np.mean(det != sto) > 0.25  # T = 0.5 on 64 codes: most samples are not the argmax.
  np.testing.assert_array_equal(
    results["sharded/stochastic/codes"], results["single/stochastic/codes"]
  )


def test_compiled_program_never_holds_full_codebook_or_similarity_matrix(run):
  _, facts = run
  for mode, shapes in facts["hlo_shapes"].items():
    dims = [[int(d) for d in s.split(",") if d] for s in shapes]
    # Per-device programs: no dimension is the codebook size K, and the tokens
    # are never gathered (B * L = 24 would appear), so neither [24, 64] nor
    # [12, 64] similarity matrices exist, only [12, 16] blocks.
    assert not any(K in d for d in dims), (mode, shapes)
    assert not any(B * L in d for d in dims), (mode, shapes)
    assert [B * L // 2, K // 4] in dims, (mode, shapes)


def test_batch_only_mesh_draws_noise_per_device(run):
  results, facts = run
  np.testing.assert_array_equal(
    results["sharded/data_only/sampled"], results["single/data_only/sampled"]
  )
  dims = [[int(d) for d in s.split(",") if d] for s in facts["data_only_hlo_shapes"]]
  # Each of the 8 devices scores and draws noise for its 3 tokens only: no
  # [24, 64] array, no gather of the tokens.
  assert [B * L // 8, K] in dims, dims
  assert [B * L, K] not in dims, dims
  assert facts["data_only_collectives"] == [], facts["data_only_collectives"]
