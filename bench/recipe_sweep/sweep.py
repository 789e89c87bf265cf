r"""Which training recipe gets the `small` demo past the clips' mean colour? A sweep.

Trains the `small` preset's VFAL stage 1 (video) and stage 2 (audio) with the
real train step (`train.make_train_step`, prior, alignment and all) on a
fixed set of built-in clips held in memory: 512 train and 64 held-out clips,
generated once (`gen`), random crop + flip as the pipeline does. Each variant
(`variants.py`) runs in its own process and appends JSON lines with the
held-out video PSNR (dB on [-1, 1] pixels, per-clip mean), the ratio of the
reconstructions' within-clip spatial standard deviation to the inputs'
(`spatial_ratio`: 0 = flat colour, 1 = as much structure as the input), the
number of distinct codes on the held-out clips and mel L1.

  python bench/recipe_sweep/sweep.py gen bench/recipe_sweep/data    # ~40 MB
  DATA=bench/recipe_sweep/data/data.npz python bench/recipe_sweep/sweep.py \
      run OUTDIR NAME "$(python bench/recipe_sweep/variants.py NAME | cut -f2)"
  bash bench/recipe_sweep/run.sh   # every variant in parallel (a GPU machine)

It reads no Grain or TFDS data, so it also runs on a bare GPU image that has
JAX and Flax but not our data stack: the data-side modules that `train`
imports are stubbed there (and never called). `run.sh` installs wheels from
`.whl/` (ml-collections) when that folder exists. Environment: NTRAIN /
NTEST (clip counts, default 512 / 64), SMOKE=1 (3 steps per stage, a check).

Results (results_h100_2026-11-26.jsonl, one H100, jax 0.11.2 / flax 0.12.10;
the rows marked CPU on the 2-core VM), held-out video PSNR in dB / distinct codes:

| variant | steps | PSNR | codes | spatial_ratio |
|---|---|---|---|---|
| base (the old small recipe) | 1200 | 20.38 | 53 | - |
| base | 3600 | 20.82 | 35 | - |
| restart every 50 | 1200 | 20.46 | 409 | - |
| restart, argmax codes | 1200 | 20.86 | 882 | - |
| no restart, argmax codes | 1200 | 20.47 | 12 | - |
| codebook 256 x 8 | 1200 | 20.59 | 24 | - |
| restart, no prior / no alignment | 1200 | 20.64 / 20.34 | 623 / 427 | - |
| restart, lr 2e-3 / constant lr | 1200 | 20.39 / 20.24 | 573 / 551 | - |
| restart, 128 video tokens | 1200 | 20.69 | 821 | - |
| restart, argmax (ref) | 2400 / 4800 | 20.75 / 20.89 | 908 / 963 | 0.19 / 0.25 |
| no VQ at all (continuous) | 2400 | 21.18 | - | 0.19 |
| no VQ, 128 tokens (as many as patches) | 2400 | 20.99 | - | 0.19 |
| width 256, 4+4 blocks | 2400 | 20.39 | 840 | 0.02 |
| batch 32, lr 2e-3 | 2400 | 21.21 | 902 | 0.22 |
| L2 only (no L1) | 2400 | 20.76 | 925 | 0.12 |
| grid-aware sin-cos (CPU, restart, argmax) | 600 / 900 | 20.36 / 20.68 | 711 / 802 | 0.11 / 0.17 |
| codes x4 into quant_out (CPU, 1 thread) | 600 | 20.54 | 706 | 0.05 |
| grid-aware sin-cos + codes x4 (CPU, 1 thread) | 600 | 20.68 | 764 | 0.13 |
| + tokens as a 1x8x8 grid (query init and latent PE) | 600 | 20.45 | 705 | 0.13 |
| the same at lr 2e-3 | 600 | 20.13 | 553 | 0.06 |

CPU rows: results_cpu_2026-11-26.jsonl; compare them with `ref` (restart,
argmax): 20.16 dB / 0.07 at 600 steps, 20.64 / 0.17 at 1200.

Reading: dead-code restarts cure the codebook collapse (12-53 codes -> 400-960)
but no variant gets past ~21 dB, not even without any quantizer: the limit is
how slowly the 1D-token encoder/decoder learns spatial layout at this size,
not the VQ. The clips' mean colours are learnt (correlation 0.95 with the
input's), the layout is not (spatial_ratio <= 0.25).
"""

# The per-stage closures (evaluate, do_eval) are called within their own loop
# iteration only.
# ruff: noqa: B023

import copy
import functools
import json
import os
import sys
import time
from unittest import mock

# Stubs for the data stack on machines without it (see the docstring); on a
# machine with our requirements installed the real modules are imported.
for _name in ("grain", "tensorflow_datasets", "librosa", "soxr", "av", "soundfile"):
  try:
    __import__(_name)
  except ImportError:
    sys.modules[_name] = mock.MagicMock()

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from avtok_jax import config_lib  # noqa: E402

NUM_TRAIN, NUM_TEST = int(os.environ.get("NTRAIN", 512)), int(os.environ.get("NTEST", 64))


@functools.cache
def _cfg(stage):
  return config_lib.load_sibling_config(
    os.path.join(ROOT, "configs", "x.py"), f"vfal_stage{stage}"
  ).get_config("small")


def _one(args):
  from avtok_jax.data import audio as audio_lib
  from avtok_jax.data import patches
  from avtok_jax.data.tfds import synthetic_av

  split, i = args
  c = _cfg(1).data
  spec = synthetic_av.generator_spec(c)
  seed = synthetic_av.split_seed(c, split)
  from avtok_jax.data import synthetic

  clip = synthetic.generate(spec, seed, i)
  mel = audio_lib.mel_features(clip["audio"].astype(np.float32), audio_lib.MelSpec.from_config(c))
  return clip["video"], patches.patchify_mel(mel, tuple(c.mel_patch)).astype(np.float32)


def gen(out):
  import multiprocessing as mp

  jobs = [("train", i) for i in range(NUM_TRAIN)] + [("test", i) for i in range(NUM_TEST)]
  with mp.Pool(min(14, os.cpu_count())) as pool:
    res = pool.map(_one, jobs, chunksize=8)
  video = np.stack([r[0] for r in res])
  mel = np.stack([r[1] for r in res])
  np.savez_compressed(os.path.join(out, "data.npz"), video=video, mel=mel.astype(np.float16))
  print("data", video.shape, mel.shape, flush=True)


def set_path(c, key, value):
  parts = key.split(".")
  for p in parts[:-1]:
    c = c[p]
  c[parts[-1]] = type(c[parts[-1]])(value) if not isinstance(value, (list, tuple)) else tuple(value)


def run(out, name, spec):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from avtok_jax import optimizer, train
  from avtok_jax.data import patches
  from avtok_jax.models import tokenizer as tokenizer_lib

  spec = json.loads(spec)
  bs = int(spec.get("batch", 8))
  if spec.get("latent_scale"):
    from avtok_jax.models import tokenizer as tok_mod

    orig_decode = tok_mod.AVTok._decode_one

    def scaled_decode(self, modality, quantized):
      return orig_decode(self, modality, quantized * spec["latent_scale"])

    tok_mod.AVTok._decode_one = scaled_decode
  if spec.get("pe") == "grid":
    from avtok_jax.models import layers

    def s1(pos, dim, g):
      lo, hi = np.pi / g, np.pi
      om = hi * (lo / hi) ** (np.arange(dim // 2) / max(dim // 2 - 1, 1))
      a = np.asarray(pos, np.float64)[:, None] * om[None]
      return np.concatenate([np.sin(a), np.cos(a)], 1).astype(np.float32)

    def table(grid, dim):
      per = 2 * (dim // (2 * len(grid)))
      co = np.meshgrid(*[np.arange(g) for g in grid], indexing="ij")
      t = np.concatenate([s1(c.reshape(-1), per, g) for c, g in zip(co, grid, strict=True)], 1)
      return np.pad(t, ((0, 0), (0, dim - t.shape[1])))

    layers.sincos_table = table
    if spec.get("token_grid"):
      # Video tokens as a (1, 8, 8) grid at mid-clip: latent i's PE (decoder) and
      # holistic query i's init (encoder) are the grid PE of location i.
      from avtok_jax.models import tokenizer as tok_mod

      def token_table(dim):
        per = 2 * (dim // 6)
        yy, xx = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
        parts = [
          s1(np.full(64, 0.5), per, 2),
          s1(yy.reshape(-1), per, 8),
          s1(xx.reshape(-1), per, 8),
        ]
        t = np.concatenate(parts, 1)
        return np.pad(t, ((0, 0), (0, dim - t.shape[1]))).astype(np.float32)

      orig_table = tok_mod._position_table

      def position_table(grid, dim):
        return token_table(dim) if tuple(grid) == (64,) else orig_table(grid, dim)

      tok_mod._position_table = position_table
      token_queries = token_table(128)
  if spec.get("continuous"):
    from avtok_jax.models import quantizer as qlib

    orig = qlib.VectorQuantizer.__call__

    def passthrough(self, z, *, train, stochastic=False, mask=None):
      out = orig(self, z, train=train, stochastic=False, mask=mask)
      zn = qlib.l2_normalize(z)
      return out.replace(quantized=zn.astype(out.quantized.dtype), loss=0.0 * out.loss)

    qlib.VectorQuantizer.__call__ = passthrough
  d = np.load(os.environ.get("DATA", os.path.join(out, "data.npz")))
  video_all, mel_all = d["video"], d["mel"].astype(np.float32)
  log = open(os.path.join(out, f"{name}.jsonl"), "w")

  def emit(**kw):
    kw["name"] = name
    line = json.dumps(kw)
    print(line, flush=True)
    log.write(line + "\n")
    log.flush()

  c1 = _cfg(1).data
  size = c1.height
  margin = video_all.shape[2] - size
  vp = tuple(c1.video_patch)
  rng = np.random.default_rng(0)

  def batch_of(idx, train_mode):
    vids = []
    for i in idx:
      v = video_all[i]
      if train_mode:
        y0, x0 = rng.integers(0, margin + 1, 2)
      else:
        y0 = x0 = margin // 2
      v = v[:, y0 : y0 + size, x0 : x0 + size]
      if train_mode and rng.random() < 0.5:
        v = v[:, :, ::-1]
      vids.append(patches.patchify_video(np.ascontiguousarray(v), vp))
    return {"video_patches": np.stack(vids), "mel_patches": mel_all[idx]}

  params = None
  stats = None
  for stage in (1, 2):
    config = copy.deepcopy(_cfg(stage))
    config.init_from = "x"
    for k, v in spec.get("common", {}).items():
      set_path(config, k, v)
    for k, v in spec.get(f"s{stage}", {}).items():
      set_path(config, k, v)
    if os.environ.get("SMOKE"):
      config.total_steps = 3
      spec[f"eval{stage}"] = [2]
    steps = config.total_steps
    models = train.Models(config)
    variables = models.init(jax.random.key(0))
    abstract = train._strip_boxes(jax.eval_shape(lambda: variables["params"]))
    tx = optimizer.make_optimizer(config.optim, abstract, config.param_rules, steps)
    disc_tx = train._make_disc_optimizer(config) if config.gan.enabled else None
    if params is None:
      params = nn.unbox(variables["params"])
      if spec.get("token_grid"):
        params["video_queries"] = jnp.asarray(token_queries)
      stats = nn.unbox(variables["codebook_stats"])
    state = {
      "step": jnp.zeros((), jnp.int32),
      "rng": jax.random.key_data(jax.random.key(1)),
      "params": params,
      "codebook_stats": stats,
      "opt_state": tx.init(params),
    }
    trainable = optimizer.trainable_mask(abstract, config.param_rules)
    if train._restart_every(config, trainable):
      state["restart_counts"] = jnp.zeros_like(stats["quantizer"]["counts"])
    if config.gan.enabled:
      state["disc_params"] = nn.unbox(variables["disc_params"])
      state["disc_opt_state"] = disc_tx.init(state["disc_params"])
      state["lecam_ema"] = {
        m: {"real": jnp.zeros(()), "fake": jnp.zeros(())} for m in config.gan.modalities
      }
    step_fn = jax.jit(
      train.make_train_step(config, models, tx, disc_tx, trainable),
      donate_argnums=(0,),
    )
    mods = tuple(config.modalities)

    @jax.jit
    def evaluate(params, stats, batch):
      o = models.tokenizer.apply(
        {"params": train._tokenizer_params(params), "codebook_stats": stats},
        video_patches=batch["video_patches"] if "video" in mods else None,
        audio_patches=batch["mel_patches"] if "audio" in mods else None,
        train=False,
        run_prior=False,
      )
      res = {}
      if "video" in mods:
        t = tokenizer_lib.to_float_patches(batch["video_patches"])
        mse = jnp.mean(jnp.square(o["video"]["recon"] - t), axis=(1, 2))
        res["psnr"] = 10 * jnp.log10(4 / mse)
        res["sstd"] = jnp.mean(
          jnp.std(o["video"]["recon"].reshape(8, -1, 3), axis=1), -1
        ) / jnp.mean(jnp.std(t.reshape(8, -1, 3), axis=1), -1)
        res["vcodes"] = o["video"]["quantizer"].codes
        res["vrecon"] = o["video"]["recon"]
      if "audio" in mods:
        res["mel_l1"] = jnp.mean(jnp.abs(o["audio"]["recon"] - batch["mel_patches"]), axis=(1, 2))
        res["acodes"] = o["audio"]["quantizer"].codes
        res["arecon"] = o["audio"]["recon"]
      return res

    def do_eval(step, t0):
      outs = [
        jax.device_get(
          evaluate(
            state["params"],
            state["codebook_stats"],
            batch_of(np.arange(NUM_TRAIN + j, NUM_TRAIN + j + 8), False),
          )
        )
        for j in range(0, NUM_TEST, 8)
      ]
      r = {"stage": stage, "step": step, "sec": round(time.time() - t0, 1)}
      if "video" in mods:
        r["eval_psnr"] = round(float(np.mean(np.concatenate([o["psnr"] for o in outs]))), 3)
        r["spatial_ratio"] = round(float(np.mean(np.concatenate([o["sstd"] for o in outs]))), 3)
        r["eval_vcodes"] = int(len(np.unique(np.concatenate([o["vcodes"].ravel() for o in outs]))))
      if "audio" in mods:
        r["eval_mel_l1"] = round(float(np.mean(np.concatenate([o["mel_l1"] for o in outs]))), 4)
        r["eval_acodes"] = int(len(np.unique(np.concatenate([o["acodes"].ravel() for o in outs]))))
      return r, outs[0]

    evals = set(spec.get(f"eval{stage}", [])) | {steps}
    order = []
    t0 = time.time()
    tr = []
    for s in range(steps):
      if not order:
        order = list(rng.permutation(NUM_TRAIN))
      idx, order = order[:bs], order[bs:]
      if len(idx) < bs:
        need = bs - len(idx)
        order = list(rng.permutation(NUM_TRAIN))
        idx += order[:need]
        order = order[need:]
      state, m = step_fn(state, batch_of(np.array(idx), True))
      if (s + 1) % 50 == 0:
        m = jax.device_get(m)
        tr.append(
          {
            k: float(m[k])
            for k in (
              "video_psnr",
              "audio_l1",
              "codebook_usage",
              "video_batch_usage",
              "audio_batch_usage",
              "dead_codes_restarted",
            )
            if k in m
          }
        )
      if (s + 1) in evals:
        r, first = do_eval(s + 1, t0)
        r["train"] = tr[-1] if tr else {}
        emit(**r)
    params, stats = state["params"], state["codebook_stats"]
    if stage == 1:
      keep = {
        "vin": batch_of(np.arange(NUM_TRAIN, NUM_TRAIN + 2), False)["video_patches"],
        "vrecon": first["vrecon"][:2],
      }
    else:
      keep.update(min=mel_all[NUM_TRAIN : NUM_TRAIN + 2], arecon=first["arecon"][:2])
    if spec.get("stage1_only"):
      break
  np.savez(os.path.join(out, f"{name}.npz"), **keep)


if __name__ == "__main__":
  if sys.argv[1] == "gen":
    gen(sys.argv[2])
  else:
    run(sys.argv[2], sys.argv[3], sys.argv[4])
