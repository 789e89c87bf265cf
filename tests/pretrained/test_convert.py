"""The PyTorch-checkpoint converter (avtok_jax.pretrained.convert) and the loaders of its folders.

No public weights can be downloaded here: the checkpoints are random state
dicts with the public key names and shapes, written with `torch.save` as the
public `.pth` files are (tensors; numpy arrays for torchvggish's PCA file).
One test runs the CLI in a subprocess; the others call `convert.main` /
`convert.convert` in-process.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import torch_refs  # tests/pretrained/torch_refs.py

from avtok_jax.pretrained import convert, lpips, vggish, weights

H = W = 32


def _save_pth(path, state_dict, **kwargs) -> None:
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, path, **kwargs)


@pytest.fixture(scope="module")
def lpips_sd():
  return torch_refs.lpips_state_dict()


@pytest.fixture(scope="module")
def lpips_pths(lpips_sd, tmp_path_factory):
  """The two public files' layouts: torchvision VGG16 (with a classifier key) + lpips heads."""
  folder = tmp_path_factory.mktemp("lpips_src")
  vgg = {k: v for k, v in lpips_sd.items() if k.startswith("features.")}
  vgg["classifier.6.bias"] = np.zeros(1000, np.float32)  # ignored, as VGG16's classifier
  heads = {k: v for k, v in lpips_sd.items() if k.startswith("lin")}
  paths = folder / "vgg16-397923af.pth", folder / "vgg.pth"
  _save_pth(paths[0], vgg)
  _save_pth(paths[1], heads)
  return paths


@pytest.fixture(scope="module")
def lpips_dir(lpips_pths, tmp_path_factory):
  """The CLI end to end, in a subprocess (the only one in this file)."""
  dst = tmp_path_factory.mktemp("lpips_out") / "lpips"
  src = ",".join(os.fspath(p) for p in lpips_pths)
  cmd = [sys.executable, "-m", "avtok_jax.pretrained.convert", "--net=lpips", f"--src={src}"]
  proc = subprocess.run(
    [*cmd, f"--dst={dst}"], capture_output=True, text=True, timeout=120, check=False
  )
  assert proc.returncode == 0, proc.stderr
  assert f"wrote {dst / weights.CONVERTED_PARAMS}" in proc.stdout
  return dst


def _error_line(capsys) -> str:
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  return lines[0]


# ----------------------------------------------------------------------------
# LPIPS
# ----------------------------------------------------------------------------


def test_cli_lpips_matches_torch(lpips_dir, lpips_sd, lpips_pths):
  info = weights.load_converted(lpips_dir, "lpips")
  assert set(info) == {"params"}
  meta = (lpips_dir / weights.CONVERTED_INFO).read_text()
  assert '"net": "lpips"' in meta and "sha256" in meta and lpips_pths[1].name in meta
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (2, H, W, 3)).astype(np.float32)
  y = np.clip(x + 0.3 * np.sin(np.linspace(0, 6, W))[None, None, :, None], -1, 1)
  y = y.astype(np.float32)
  got = np.asarray(lpips.load_lpips(lpips_dir)(x, y))
  want = torch_refs.torch_lpips(lpips_sd, x, y)
  assert np.all(want > 1e-3)
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_safetensors_input_gives_the_same_folder(lpips_dir, lpips_sd, tmp_path):
  src = tmp_path / "lpips.safetensors"
  weights.save_state_dict(src, lpips_sd)
  assert convert.main(["--net=lpips", f"--src={src}", f"--dst={tmp_path / 'out'}"]) == 0
  a = weights.load_converted(tmp_path / "out", "lpips")
  b = weights.load_converted(lpips_dir, "lpips")
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_folder_of_another_net_is_refused(lpips_dir):
  with pytest.raises(ValueError, match=r"holds a converted 'lpips' network, not 'vggish'"):
    weights.load_converted(lpips_dir, "vggish")
  with pytest.raises(ValueError, match=r"not 'vggish'"):
    vggish.load_vggish(lpips_dir)
  with pytest.raises(ValueError, match="is not a converted checkpoint"):
    lpips.load_lpips(lpips_dir.parent)


# ----------------------------------------------------------------------------
# Bad inputs: exit code 2 and one line naming the file
# ----------------------------------------------------------------------------


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused_and_not_run(tmp_path, capsys):
  marker = tmp_path / "pwned"
  src = tmp_path / "evil.pth"
  torch.save({"features.0.weight": _Evil(marker)}, src)
  assert convert.main(["--net=lpips", f"--src={src}", f"--dst={tmp_path / 'out'}"]) == 2
  line = _error_line(capsys)
  assert str(src) in line and "weights_only" in line and "system" in line
  assert not marker.exists()
  assert not (tmp_path / "out").exists()
  # The same with a plain (non-torch) pickle under a .pth name.
  src.write_bytes(pickle.dumps({"features.0.weight": _Evil(marker)}))
  assert convert.main(["--net=lpips", f"--src={src}", f"--dst={tmp_path / 'out'}"]) == 2
  assert str(src) in _error_line(capsys)
  assert not marker.exists()


def test_bad_arguments_and_files_exit_2(lpips_pths, lpips_sd, tmp_path, capsys):
  dst = f"--dst={tmp_path / 'out'}"
  assert convert.main(["--net=resnet", f"--src={lpips_pths[0]}", dst]) == 2
  assert "Unknown --net='resnet'" in _error_line(capsys)

  missing = tmp_path / "absent.pth"
  assert convert.main(["--net=lpips", f"--src={missing}", dst]) == 2
  line = _error_line(capsys)
  assert str(missing) in line and "does not exist" in line

  noise = tmp_path / "noise.pth"
  noise.write_bytes(np.random.default_rng(0).bytes(4096))
  assert convert.main(["--net=lpips", f"--src={noise}", dst]) == 2
  assert str(noise) in _error_line(capsys)

  short = {k: v for k, v in lpips_sd.items() if k != "lin3.model.1.weight"}
  partial = tmp_path / "partial.pth"
  _save_pth(partial, short)
  assert convert.main(["--net=lpips", f"--src={partial}", dst]) == 2
  line = _error_line(capsys)
  assert str(partial) in line and "missing key 'lin3.model.1.weight'" in line
  assert not (tmp_path / "out").exists()


def test_read_state_dict_unwraps_and_reads_numpy_1_pickles(tmp_path):
  """{'state_dict': {'module.x': ...}} and numpy arrays pickled by numpy 1 (`numpy.core.*`)."""
  wrapped = tmp_path / "wrapped.pt"
  torch.save({"state_dict": {"module.a.weight": torch.ones(2, 3)}, "epoch": 7}, wrapped)
  sd = convert.read_state_dict(wrapped)
  assert set(sd) == {"a.weight"} and sd["a.weight"].shape == (2, 3)
  # torch's legacy (non-zip) format pickles with protocol 2, which names globals
  # in plain text: renaming numpy 2's module gives what numpy 1 wrote.
  old = tmp_path / "old.pth"
  arrays = {"pca_means": np.arange(3.0), "pca_eigen_vectors": np.eye(3, dtype=np.float32)}
  torch.save(arrays, old, _use_new_zipfile_serialization=False)
  blob = old.read_bytes()
  assert b"numpy._core.multiarray" in blob
  old.write_bytes(blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
  sd = convert.read_state_dict(old)
  np.testing.assert_array_equal(sd["pca_means"], arrays["pca_means"])
  np.testing.assert_array_equal(sd["pca_eigen_vectors"], arrays["pca_eigen_vectors"])


# ----------------------------------------------------------------------------
# VGGish (+ PCA file)
# ----------------------------------------------------------------------------


def test_vggish_with_pca_file(tmp_path):
  rng = np.random.default_rng(0)
  shapes = vggish.vggish_state_dict_shapes()
  sd = {k: rng.random(shape, dtype=np.float32) - 0.5 for k, shape in shapes.items()}
  model = tmp_path / "vggish-10086976.pth"
  _save_pth(model, sd)
  # torchvggish's PCA file holds numpy arrays (its Postprocessor applies torch.as_tensor).
  vectors = rng.standard_normal((128, 128)).astype(np.float64)
  means = rng.standard_normal(128).astype(np.float64)
  pca = tmp_path / "vggish_pca_params-970ea276.pth"
  torch.save({"pca_eigen_vectors": vectors, "pca_means": means}, pca)
  dst = tmp_path / "vggish"
  assert convert.main(["--net=vggish", f"--src={model},{pca}", f"--dst={dst}"]) == 0

  loaded = vggish.load_vggish(dst, batch_size=2)
  # The layouts (test_vggish.py checks these against PyTorch's output): OIHW -> HWIO, [out, in] -> [in, out].
  p = loaded.params
  np.testing.assert_array_equal(
    p["conv3_2"]["kernel"], sd["features.8.weight"].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(p["fc1_1"]["kernel"], sd["embeddings.0.weight"].T)
  np.testing.assert_array_equal(p["fc2"]["bias"], sd["embeddings.4.bias"])
  np.testing.assert_array_equal(loaded.pca[0], vectors.astype(np.float32))
  np.testing.assert_array_equal(loaded.pca[1], means.astype(np.float32))
  e = rng.standard_normal((3, 128)).astype(np.float32)
  projected = (e.astype(np.float64) - loaded.pca[1]) @ loaded.pca[0].T.astype(np.float64)
  want = np.round((np.clip(projected, -2, 2) + 2) * 255 / 4)
  np.testing.assert_array_equal(loaded.postprocess(e), want)

  # Without the PCA keys there is no 'pca' collection; with half of them, an error.
  assert set(vggish.convert_state_dict(sd)) == {"params"}
  with pytest.raises(ValueError, match=r"my\.pth.*missing key 'pca_means'"):
    vggish.convert_state_dict({**sd, "pca_eigen_vectors": vectors}, source="my.pth")
