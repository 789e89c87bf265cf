r"""Does the tokenizer learn? Held-out reconstruction against steps, next to simple baselines.

  python bench/learning.py --baselines                       # the linear / PCA / k-means levels
  python bench/learning.py --variants=chosen,old_design --steps=1500
  python bench/learning.py --variants=chosen --set=model.codebook_size=4096 --name=k4096

Trains the REAL train step (`train.make_train_step`, the trainer's own
optimizer, schedule, dead-code restarts and loss terms) of a `small` stage-1
config, changed by a variant's overrides, on a fixed set of built-in clips
held in memory (generator seed 0, centre crop, no augmentation: every
variant sees the same batches in the same order), and every `--eval_every`
steps scores the first `--eval_clips` clips of the held-out split (the
quickstart's test clips): video PSNR (dB on [-1, 1] pixels, per clip, then
averaged), the shipped classifier's accuracy on the reconstructions, and,
when the variant trains audio, mel L1 and the audio classifier's accuracy.
One JSON line per evaluation is appended to `--out`; `--table` turns that
file into the markdown table of docs/results/learning.md.

`--baselines` measures, on the same clips: each clip's mean colour, each
patch's mean colour, whole-clip PCA and per-patch PCA with the same number
of floats as the tokens, a linear per-patch autoencoder trained by Adam, and
per-patch k-means (a VQ with one code per patch and the small codebook's
size, fitted on the training patches): the levels a tokenizer has to beat.

Loss terms: the variant's `loss_weights` (default: video L1 + L2 + VQ, the
terms that shape reconstruction; `+prior`, `+alignment` variants add the
others). Everything else is the stage-1 config of `configs/vfal_stage1.py`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import time
from typing import Any

from absl import app, flags

# Variant name -> (what it tests, overrides of the stage-1 `small` config).
# Values are Python expressions. Later sections of docs/results/learning.md
# explain the rows; `chosen` is what configs/ now use.
VARIANTS: dict[str, tuple[str, dict[str, str]]] = {}


def variant(name: str, what: str, **overrides: Any) -> None:
  VARIANTS[name] = (what, {k.replace("__", "."): repr(v) for k, v in overrides.items()})


# ---------------------------------------------------------------- the old design, then one change at a time
# Every knob this issue touched is pinned, so the rows stay reproducible when defaults move.
_OLD = dict(
  model__norms="outside",
  model__head_norm=False,
  model__locality="none",
  model__num_video_tokens=64,
  model__num_audio_tokens=16,
  model__code_scale=1.0,
  model__codebook_init_std=1.0,
  model__codebook_size=1024,
  model__quantizer_gradient="straight_through",
  model__stochastic_quantization=True,
  restart_dead_codes_every=50,
  param_rules=(("^audio_", "frozen"), ("^prior/", 50.0)),
  optim__lr=1e-3,
)
variant("old_design", "before this issue: LN^m outside the blocks, 64 tokens, no locality", **_OLD)
_A = dict(_OLD, model__norms="inside")
variant("A_inside_norms", "old + per-modality LNs inside the shared blocks, none outside", **_A)
_B = dict(_A, model__locality="decoder")
variant("B_locality_decoder", "A + each patch query adds its region's latent", **_B)
_C = dict(_A, model__locality="both")
variant("C_locality_both", "A + locality in the decoder and the encoder", **_C)
_D = dict(_C, model__num_video_tokens=128)
variant("D_128_tokens", "C + one video token per patch (the paper's ratio)", **_D)
_E = dict(_D, model__code_scale=4.0)
variant("E_code_scale", "D + unit codes x4 into quant_out", **_E)
variant("E_head_norm", "E + a per-modality LN before the head", **dict(_E, model__head_norm=True))
variant("E_outside_norms", "E with the norms outside again", **dict(_E, model__norms="outside"))
variant(
  "E_continuous",
  "E without quantization (the l2-normalised z reach the decoder)",
  **dict(_E, bench__continuous=True),
)
variant("E_continuous_old", "old design without quantization", **dict(_OLD, bench__continuous=True))
_Q1 = dict(_E, model__stochastic_quantization=False)
variant("Q1_argmax", "E with argmax codes in training (no stochastic choice)", **_Q1)
_Q2 = dict(_Q1, model__codebook_init_std=0.25)
variant("Q2_unit_init", "Q1 + codebook rows of norm ~1 at init", **_Q2)
_Q3 = dict(_Q2, param_rules=(("^audio_", "frozen"), ("^prior/", 50.0), ("^quantizer/", 10.0)))
variant("Q3_codebook_lr10", "Q2 + codebook lr x10", **_Q3)
variant(
  "Q4_8192_codes",
  "Q3 with 8192 codes (the paper's codebook size)",
  **dict(_Q3, model__codebook_size=8192),
)
variant(
  "Q5_restart10",
  "Q3 with dead codes restarted every 10 steps",
  **dict(_Q3, restart_dead_codes_every=10),
)
_Q5 = dict(_Q3, restart_dead_codes_every=10)
variant(
  "R1_rotation",
  "Q5 + the rotation trick instead of straight-through",
  **dict(_Q5, model__quantizer_gradient="rotation"),
)
variant(
  "R2_vq_x10", "Q5 with the VQ loss weight 1.0 instead of 0.1", **dict(_Q5, loss_weights__vq=1.0)
)
variant("R3_code_dim32", "Q5 with 32-d codes", **dict(_Q5, model__code_dim=32))
variant("R4_code_dim8", "Q5 with 8-d codes", **dict(_Q5, model__code_dim=8))
_S = dict(_Q5, model__quantizer_gradient="rotation", model__codebook_size=8192)
variant("S1_combo", "Q5 + rotation + 8192 codes", **_S)
variant("S2_combo_lr2e-3", "S1 at lr 2e-3", **dict(_S, optim__lr=2e-3))
variant("S3_combo_lr5e-4", "S1 at lr 5e-4", **dict(_S, optim__lr=5e-4))
VARIANTS["chosen"] = ("the configs' design (every knob at its config default)", {})
variant(
  "chosen_full_losses",
  "chosen with the whole stage-1 loss: + AR prior + alignment",
  loss_weights=None,
)
VARIANTS["chosen_full_losses"][1]["loss_weights"] = (
  'config_lib.loss_weights("video_l1", "video_l2", "vq", "prior", "alignment")'
)
variant(
  "Q6_adam_09",
  "Q3 with Adam(0.9, 0.99) instead of LARP's (0.5, 0.9)",
  **dict(_Q3, optim__b1=0.9, optim__b2=0.99),
)

# ----------------------------------------------------------------------------- data


def _data_config(preset: str):
  from avtok_jax import config_lib

  c = config_lib.data_config(preset)
  c.source = "synthetic"
  c.num_workers = 0
  return c


DEFAULT_CACHE = "/tmp/avtok_learning_cache"
ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_clips(
  split: str, num: int, preset: str = "small", cache: str = DEFAULT_CACHE
) -> dict[str, Any]:
  """{video_patches uint8, mel_patches float32, label int32} of the first `num` clips of a split."""
  import numpy as np

  from avtok_jax.data import pipeline

  path = pathlib.Path(cache) / f"{preset}_{split}_{num}.npz"
  if path.exists():
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  c = _data_config(preset)
  source = pipeline.make_source(c, split)
  prep = pipeline.Preprocess(c, train=False)
  rng = np.random.default_rng(0)
  out: dict[str, list] = {"video_patches": [], "mel_patches": [], "label": []}
  start = time.perf_counter()
  for i in range(num):
    r = prep.random_map(source[i], rng)
    for k in out:
      out[k].append(r[k])
  arrays = {k: np.stack(v) for k, v in out.items()}
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, **arrays)
  print(f"built {num} {split} clips in {time.perf_counter() - start:.0f} s -> {path}")
  return arrays


def psnr_per_clip(x, y):
  """dB on [-1, 1] values, per clip (leading axis)."""
  import numpy as np

  err = (np.asarray(y, np.float64) - np.asarray(x, np.float64)).reshape(len(x), -1)
  return 10 * np.log10(4 / np.maximum(np.mean(err**2, 1), 1e-10))


def clip_mean_level(video_patches) -> float:
  """Held-out PSNR of predicting each clip's mean colour (patches [N, P, pt*ph*pw*3] in [-1, 1])."""
  import numpy as np

  n, p, d = video_patches.shape
  px = np.asarray(video_patches, np.float64).reshape(n, p, d // 3, 3)
  return float(psnr_per_clip(px, np.broadcast_to(px.mean((1, 2), keepdims=True), px.shape)).mean())


def patch_mean_level(video_patches) -> float:
  """Held-out PSNR of predicting each patch's mean colour (patches [N, P, pt*ph*pw*3] in [-1, 1])."""
  import numpy as np

  n, p, d = video_patches.shape
  px = np.asarray(video_patches, np.float64).reshape(n, p, d // 3, 3)
  pred = np.broadcast_to(px.mean(2, keepdims=True), px.shape)
  return float(psnr_per_clip(px, pred).mean())


# ----------------------------------------------------------------------------- baselines


def baselines(train, test, out, kmeans=(1024,)) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from avtok_jax.data import patches as patches_lib
  from avtok_jax.evaluation import classifier as classifier_lib

  to_f = lambda v: v.astype(np.float32) / 127.5 - 1  # noqa: E731
  xtr, xte = to_f(train["video_patches"]), to_f(test["video_patches"])
  n, p, d = xte.shape
  rows = []
  cls = classifier_lib.load_classifier("small")
  c = _data_config("small")
  shape = (c.num_frames, c.height, c.width, 3)

  def add(name, pred, **extra):
    video = patches_lib.unpatchify_video(np.asarray(pred, np.float32), shape, tuple(c.video_patch))
    acc = float(np.mean(np.argmax(cls.video(np.clip(video, -1, 1))[1], -1) == test["label"]))
    rows.append(
      dict(baseline=name, psnr=float(psnr_per_clip(xte, pred).mean()), video_acc=acc, **extra)
    )
    print(f"{name}: {rows[-1]['psnr']:.2f} dB, classifier accuracy {acc:.2f}")

  px = xte.reshape(n, p, d // 3, 3)
  add(
    "clip mean colour", np.broadcast_to(px.mean((1, 2), keepdims=True), px.shape).reshape(xte.shape)
  )
  add("patch mean colour", np.broadcast_to(px.mean(2, keepdims=True), px.shape).reshape(xte.shape))

  # Whole-clip PCA (fit on the training clips).
  flat_tr, flat_te = xtr.reshape(len(xtr), -1), xte.reshape(n, -1)
  mean = flat_tr.mean(0)
  _, _, vt = np.linalg.svd(flat_tr - mean, full_matrices=False)
  for k in (64, 1024):
    if k <= vt.shape[0]:
      v = vt[:k]
      add(f"whole-clip PCA, {k} components", ((flat_te - mean) @ v.T @ v + mean).reshape(xte.shape))

  # Per-patch PCA / linear AE / k-means: every patch coded on its own.
  ptr, pte = xtr.reshape(-1, d), xte.reshape(-1, d)
  pmean = ptr.mean(0)
  _, _, vt = np.linalg.svd(ptr[:: max(1, len(ptr) // 60000)] - pmean, full_matrices=False)
  for k in (8, 16):
    v = vt[:k]
    add(
      f"per-patch PCA, {k} components ({k * p} floats per clip)",
      ((pte - pmean) @ v.T @ v + pmean).reshape(xte.shape),
    )

  # Linear per-patch autoencoder 768 -> 8 -> 768, Adam 1e-3, batch 8 clips, 600 steps.
  key = jax.random.key(0)
  k1, k2 = jax.random.split(key)
  params = {
    "enc": jax.random.normal(k1, (d, 8)) * d**-0.5,
    "dec": jnp.zeros((8, d)),
    "b": jnp.zeros((d,)),
  }
  tx = optax.adam(1e-3)
  opt = tx.init(params)

  def recon(pr, x):
    return (x @ pr["enc"]) @ pr["dec"] + pr["b"]

  @jax.jit
  def step(pr, o, x):
    loss, g = jax.value_and_grad(lambda q: jnp.mean(jnp.square(recon(q, x) - x)))(pr)
    u, o = tx.update(g, o)
    return optax.apply_updates(pr, u), o

  rng = np.random.default_rng(0)
  for _ in range(600):
    idx = rng.integers(0, len(xtr), 8)
    params, opt = step(params, opt, jnp.asarray(xtr[idx].reshape(-1, d)))
  add(
    "linear per-patch AE 768->8->768, Adam, 600 steps",
    np.asarray(recon(params, jnp.asarray(pte))).reshape(xte.shape),
  )

  # Per-patch k-means on a sample of training patches.
  for k in kmeans:
    sample = ptr[rng.choice(len(ptr), min(len(ptr), 50_000), replace=False)]
    centres = kmeans_fit(sample, k, rng)
    add(
      f"per-patch k-means, {k} codes (one token per patch)",
      kmeans_apply(centres, pte).reshape(xte.shape),
    )

  rows += audio_baselines(train, test, kmeans=kmeans)
  with open(out, "a") as f:
    for r in rows:
      f.write(
        json.dumps(dict(r, train_clips=len(xtr), eval_clips=n, date=time.strftime("%Y-%m-%d")))
        + "\n"
      )


def audio_baselines(train, test, kmeans=(1024,)) -> list[dict[str, Any]]:
  """The audio twins of the video baselines: each mel patch's mean, per-patch k-means.

  Mel L1 in normalised log-mel units and the built-in audio classifier's accuracy,
  as `learning_curve` scores the tokenizer's audio.
  """
  import numpy as np

  from avtok_jax import config_lib
  from avtok_jax.data import patches as patches_lib
  from avtok_jax.evaluation import classifier as classifier_lib

  c = _data_config("small")
  cls = classifier_lib.load_classifier("small")
  mel_shape = (c.mel.n_mels, config_lib.num_mel_frames(c))
  xtr, xte = train["mel_patches"], test["mel_patches"]
  n, p, d = xte.shape
  rows = []

  def add(name, pred):
    pred = np.asarray(pred, np.float32).reshape(xte.shape)
    mel = patches_lib.unpatchify_mel(pred, mel_shape, tuple(c.mel_patch))
    acc = float(np.mean(np.argmax(cls.audio(np.clip(mel, -4, 4))[1], -1) == test["label"]))
    l1 = float(np.mean(np.abs(pred - xte)))
    rows.append(dict(baseline=name, mel_l1=l1, audio_acc=acc))
    print(f"{name}: mel L1 {l1:.3f}, classifier accuracy {acc:.2f}")

  add("input mel", xte)
  add("mel patch mean", np.broadcast_to(xte.mean(2, keepdims=True), xte.shape))
  rng = np.random.default_rng(0)
  ptr = xtr.reshape(-1, d)
  for k in kmeans:
    sample = ptr[rng.choice(len(ptr), min(len(ptr), 50_000), replace=False)]
    add(
      f"per mel patch k-means, {k} codes",
      kmeans_apply(kmeans_fit(sample, k, rng), xte.reshape(-1, d)),
    )
  return rows


def kmeans_fit(x, k: int, rng, iterations: int = 20):
  """Lloyd's k-means of rows x [N, D] from k random rows (squared Euclidean distance)."""
  import jax
  import jax.numpy as jnp

  xs = jnp.asarray(x)

  @jax.jit
  def lloyd(c):
    a = jnp.argmin(jnp.sum(xs**2, 1, keepdims=True) - 2 * xs @ c.T + jnp.sum(c**2, 1), 1)
    sums = jax.ops.segment_sum(xs, a, k)
    count = jax.ops.segment_sum(jnp.ones(len(xs)), a, k)
    return jnp.where(count[:, None] > 0, sums / jnp.maximum(count, 1)[:, None], c)

  centres = xs[rng.choice(len(x), k, replace=False)]
  for _ in range(iterations):
    centres = lloyd(centres)
  return centres


def kmeans_apply(centres, x):
  """Each row of x replaced by its nearest centre."""
  import jax.numpy as jnp
  import numpy as np

  xs = jnp.asarray(x)
  a = jnp.argmin(jnp.sum(xs**2, 1, keepdims=True) - 2 * xs @ centres.T + jnp.sum(centres**2, 1), 1)
  return np.asarray(centres)[np.asarray(a)]


# ----------------------------------------------------------------------------- training


def make_config(overrides: dict[str, str], steps: int, stage: str = "stage1", size: str = "small"):
  """The `size` config of `stage` ('stage1' | 'stage2' | 'stage3') with the bench's edits.

  Stage 1 keeps only the reconstruction and VQ terms unless a variant sets
  `loss_weights`; stages 2 and 3 keep their own terms. Overrides named
  `stage2.KEY` / `stage3.KEY` apply to that stage only; `model.*` to every
  stage; other keys to stage 1 only.
  """
  from avtok_jax import config_lib

  config = config_lib.load_config_file(str(ROOT / "configs" / f"vfal_{stage}.py:{size}"))
  config.total_steps = steps
  config.gan.enabled = False  # the GAN is measured by the quickstart, not here
  if stage == "stage1":
    config.loss_weights = config_lib.loss_weights("video_l1", "video_l2", "vq")
  else:
    config.init_from = "(bench: in memory)"
  config.data = _data_config(config.data.preset)
  config.data.batch_size = 8
  config.eval_batches = 0
  for key, value in overrides.items():
    prefix, _, rest = key.partition(".")
    if prefix == "bench" or (prefix in ("stage2", "stage3") and prefix != stage):
      continue
    if prefix == stage:
      key = rest
    elif stage != "stage1" and prefix != "model":
      continue
    node = config
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = eval(value, {"config_lib": config_lib})  # noqa: S307 (our own table)
  config_lib.check_train_config(config)
  return config


def train_variant(
  name: str,
  overrides: dict[str, str],
  train,
  test,
  out,
  *,
  steps,
  eval_every,
  seed,
  stage2_steps=0,
  stage3_steps=0,
  cache=DEFAULT_CACHE,
) -> None:
  """Stage 1 for `steps`, then VFAL stages 2 and 3 (when given steps), each from the last's params.

  Each stage's final parameters are kept in `cache` under the variant's name,
  overrides and steps, so that a later call with more stages starts from them.
  """
  import hashlib

  import flax.serialization

  continuous = eval(overrides.get("bench.continuous", "False"))  # noqa: S307
  with _continuous_quantizer(continuous):
    kw = dict(eval_every=eval_every, seed=seed, out=out, overrides=overrides)
    params = None
    key = ""
    for stage, n in (("stage1", steps), ("stage2", stage2_steps), ("stage3", stage3_steps)):
      if not n:
        break
      key += f"{stage}:{n};"
      # Only the overrides that reach this stage or an earlier one name its parameters.
      later = {"stage1": ("stage2.", "stage3."), "stage2": ("stage3.",), "stage3": ()}[stage]
      seen = {k: v for k, v in overrides.items() if not k.startswith(later)}
      digest = hashlib.sha256((key + json.dumps(seen, sort_keys=True) + str(seed)).encode())
      path = pathlib.Path(cache) / f"params_{digest.hexdigest()[:16]}.msgpack"
      config = make_config(overrides, n, stage)
      if path.exists():
        params = flax.serialization.msgpack_restore(path.read_bytes())
        print(f"{name}/{stage}: parameters from {path}")
        continue
      label = name if stage == "stage1" else f"{name}/{stage}"
      _, params = learning_curve(config, train, test, name=label, init_params=params, **kw)
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(flax.serialization.msgpack_serialize(jax_to_numpy(params)))


def _overlay(fresh, previous):
  """`fresh` with every leaf that `previous` also has replaced by previous's value."""
  if not isinstance(fresh, dict):
    return previous
  return {k: _overlay(v, previous[k]) if k in previous else v for k, v in fresh.items()}


def jax_to_numpy(tree):
  import jax
  import numpy as np

  return jax.tree.map(np.asarray, tree)


def learning_curve(
  config, train, test, *, eval_every, seed=0, name="", init_params=None, out=None, overrides=None
) -> tuple[list[dict[str, Any]], Any]:
  """Trains `config` on in-memory clips with the real train step, scoring held-out clips.

  `train` / `test`: `load_clips` dicts. Batches are drawn uniformly (seeded)
  from `train`; every `eval_every` steps and at the end the clips of `test`
  are reconstructed (eval mode) and scored. Returns (rows, final params);
  each row is also printed and, with `out`, appended there as JSON.
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from avtok_jax import optimizer, sharding
  from avtok_jax import train as trainer
  from avtok_jax.evaluation import classifier as classifier_lib

  overrides = overrides or {}
  modalities = tuple(config.modalities)
  models = trainer.Models(config)
  mesh = sharding.make_mesh(dict(config.mesh))
  rules = sharding.LOGICAL_AXIS_RULES
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = trainer._strip_boxes(jax.eval_shape(models.init, jax.random.key(0))["params"])
    trainable = optimizer.trainable_mask(abstract, config.param_rules)
    tx = optimizer.make_optimizer(config.optim, abstract, config.param_rules, config.total_steps)
    init_state = trainer.make_init_state(config, models, tx, None, trainable)
    rng_data = jax.random.key_data(jax.random.key(seed))
    state = jax.jit(lambda r: nn.unbox(init_state(r)))(rng_data)
    if init_params is not None:
      # The previous stage's values where the trees overlap (as `init_from` does).
      state["params"] = _overlay(state["params"], init_params)
    step_fn = jax.jit(
      trainer.make_train_step(config, models, tx, None, trainable), donate_argnums=(0,)
    )
    eval_fn = jax.jit(trainer.make_eval_fn(config, models))
    cls = classifier_lib.load_classifier(config.data.preset)
    keys = {"video": "video_patches", "audio": "mel_patches"}
    rows = []
    last: dict[str, float] = {}

    def evaluate(step: int, seconds: float) -> dict[str, Any]:
      psnr, acc_v, mel_l1, acc_a = [], [], [], []
      for i in range(0, len(test["label"]), 8):
        batch = {k: jnp.asarray(test[k][i : i + 8]) for k in keys.values()}
        pairs = jax.device_get(eval_fn(state["params"], state["codebook_stats"], batch))
        labels = test["label"][i : i + 8]
        if "video" in pairs:
          x, y = pairs["video"]
          psnr.append(psnr_per_clip(x, y))
          acc_v.append(np.argmax(cls.video(np.clip(y, -1, 1))[1], -1) == labels)
        if "audio" in pairs:
          x, y = pairs["audio"]
          mel_l1.append(np.mean(np.abs(y - x).reshape(len(x), -1), 1))
          acc_a.append(np.argmax(cls.audio(np.clip(y, -4, 4))[1], -1) == labels)
      row = dict(variant=name, step=step, seconds=round(seconds, 1))
      if psnr:
        row.update(
          psnr=float(np.concatenate(psnr).mean()), video_acc=float(np.concatenate(acc_v).mean())
        )
      if mel_l1:
        row.update(
          mel_l1=float(np.concatenate(mel_l1).mean()), audio_acc=float(np.concatenate(acc_a).mean())
        )
      for k in ("codebook_usage", "video_perplexity", "audio_perplexity", "video_psnr", "vq"):
        if k in last:
          row[k] = last[k]
      return row

    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    compile_s = None
    for step in range(1, config.total_steps + 1):
      idx = rng.integers(0, len(train["label"]), config.data.batch_size)
      batch = {keys[m]: jnp.asarray(train[keys[m]][idx]) for m in modalities}
      batch["label"] = jnp.asarray(train["label"][idx])
      state, metrics = step_fn(state, batch)
      if compile_s is None:
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
      if step % eval_every == 0 or step == config.total_steps:
        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not np.isfinite(last["loss"]):
          raise FloatingPointError(f"{name}: non-finite loss at step {step}")
        row = evaluate(step, time.perf_counter() - start)
        row.update(
          overrides=overrides, compile_s=round(compile_s, 1), train_clips=len(train["label"])
        )
        shown = {
          k: (round(v, 3) if isinstance(v, float) else v)
          for k, v in row.items()
          if k != "overrides"
        }
        print(json.dumps(shown), flush=True)
        rows.append(row)
        if out:
          with open(out, "a") as f:
            f.write(json.dumps(dict(row, date=time.strftime("%Y-%m-%d"))) + "\n")
  return rows, state["params"]


@contextlib.contextmanager
def _continuous_quantizer(enabled: bool = True):
  """Bench only, inside the block: the quantizer hands the decoder its l2-normalised z (no codes)."""
  from avtok_jax.models import quantizer as quantizer_lib

  if not enabled:
    yield
    return
  cls = quantizer_lib.VectorQuantizer
  original = cls.__call__

  def call(self, z, **kwargs):
    out = original(self, z, **kwargs)
    return out.replace(quantized=out.z)

  cls.__call__ = call
  try:
    yield
  finally:
    cls.__call__ = original


# ----------------------------------------------------------------------------- table


def table(path: str) -> str:
  rows = [json.loads(line) for line in open(path) if line.strip()]
  lines = ["| baseline | held-out PSNR | classifier accuracy |", "|---|---|---|"]
  lines += [
    f"| {r['baseline']} | {r['psnr']:.2f} dB | {r.get('video_acc', float('nan')):.2f} |"
    for r in rows
    if "baseline" in r and "psnr" in r
  ]
  lines += ["", "| audio baseline | mel L1 | classifier accuracy |", "|---|---|---|"]
  lines += [
    f"| {r['baseline']} | {r['mel_l1']:.3f} | {r['audio_acc']:.2f} |"
    for r in rows
    if "baseline" in r and "mel_l1" in r
  ]
  runs: dict[str, list] = {}
  for r in rows:
    if "variant" in r:
      runs.setdefault(r["variant"], []).append(r)
  lines += [
    "",
    "| variant | what it changes | step: PSNR dB / video acc (/ mel L1 / audio acc) |",
    "|---|---|---|",
  ]
  for name, rs in runs.items():
    cells = []
    for r in rs:
      cell = (
        f"{r['step']}: {r.get('psnr', float('nan')):.2f} / {r.get('video_acc', float('nan')):.2f}"
      )
      if "mel_l1" in r:
        cell += f" / {r['mel_l1']:.3f} / {r['audio_acc']:.2f}"
      cells.append(cell)
    base = name.split("+")[0].split("/")[0]
    what = VARIANTS[base][0] if base in VARIANTS else "(option since removed)"
    lines.append(f"| {name} | {what} | {'; '.join(cells)} |")
  return "\n".join(lines)


def _define_flags():
  """The CLI's flags: defined only when run, so that importing this module (tests) defines none."""
  global _VARIANTS, _SET, _NAME, _STEPS, _STAGE2_STEPS, _EVAL_EVERY, _TRAIN_CLIPS, _EVAL_CLIPS
  global _SEED, _BASELINES, _AUDIO_BASELINES, _OUT, _CACHE, _KMEANS, _TABLE, _STAGE3_STEPS
  _VARIANTS = flags.DEFINE_list("variants", [], "Variants to train (names in VARIANTS).")
  _SET = flags.DEFINE_multi_string("set", [], "Extra overrides KEY=PYTHON_VALUE for every variant.")
  _NAME = flags.DEFINE_string(
    "name", "", "Suffix for the variant names in the output (with --set)."
  )
  _STEPS = flags.DEFINE_integer("steps", 1200, "Training steps (the schedule's total_steps).")
  _STAGE2_STEPS = flags.DEFINE_integer("stage2_steps", 0, "Then VFAL stage 2 (audio) for N steps.")
  _STAGE3_STEPS = flags.DEFINE_integer(
    "stage3_steps", 0, "Then VFAL stage 3 (decoders) for N steps."
  )
  _EVAL_EVERY = flags.DEFINE_integer("eval_every", 300, "Evaluate every N steps.")
  _TRAIN_CLIPS = flags.DEFINE_integer("train_clips", 2048, "Training clips (generator seed 0).")
  _EVAL_CLIPS = flags.DEFINE_integer("eval_clips", 64, "Held-out clips scored.")
  _SEED = flags.DEFINE_integer("seed", 0, "Init and batch-order seed.")
  _BASELINES = flags.DEFINE_bool("baselines", False, "Measure the baselines (video and audio).")
  _AUDIO_BASELINES = flags.DEFINE_bool("audio_baselines", False, "Only the audio baselines.")
  _OUT = flags.DEFINE_string("out", "docs/results/learning.jsonl", "JSON lines appended here.")
  _CACHE = flags.DEFINE_string("cache", DEFAULT_CACHE, "Where the clip arrays are cached.")
  _KMEANS = flags.DEFINE_list(
    "kmeans", ["1024"], "Codebook sizes of the per-patch k-means baselines."
  )
  _TABLE = flags.DEFINE_bool("table", False, "Print the markdown table of --out and exit.")


def main(argv):
  del argv
  os.chdir(ROOT)
  if _TABLE.value:
    print(table(_OUT.value))
    return
  train = load_clips("train", _TRAIN_CLIPS.value, cache=_CACHE.value)
  test = load_clips("test", _EVAL_CLIPS.value, cache=_CACHE.value)
  print(
    f"held-out patch-mean-colour level: {patch_mean_level(test['video_patches'].astype('float32') / 127.5 - 1):.2f} dB"
  )
  kmeans = tuple(map(int, _KMEANS.value))
  if _BASELINES.value:
    baselines(train, test, _OUT.value, kmeans=kmeans)
  elif _AUDIO_BASELINES.value:
    with open(_OUT.value, "a") as f:
      for r in audio_baselines(train, test, kmeans=kmeans):
        extra = dict(train_clips=len(train["label"]), eval_clips=len(test["label"]))
        f.write(json.dumps(dict(r, **extra, date=time.strftime("%Y-%m-%d"))) + "\n")
  extra = dict(s.split("=", 1) for s in _SET.value)
  for name in _VARIANTS.value:
    if name not in VARIANTS:
      raise SystemExit(f"Unknown variant {name!r}; known: {sorted(VARIANTS)}")
    overrides = dict(VARIANTS[name][1], **extra)
    train_variant(
      name + (f"+{_NAME.value}" if _NAME.value else ""),
      overrides,
      train,
      test,
      _OUT.value,
      steps=_STEPS.value,
      eval_every=_EVAL_EVERY.value,
      seed=_SEED.value,
      stage2_steps=_STAGE2_STEPS.value,
      stage3_steps=_STAGE3_STEPS.value,
      cache=_CACHE.value,
    )


if __name__ == "__main__":
  _define_flags()
  app.run(main)
