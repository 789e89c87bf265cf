"""Generation: load a trained generator and its tokenizer, sample clips, score them.

Used by `python -m avtok_jax.generate` (single clips and `--eval_clips`) and
the generator trainer's periodic samples.

Scores on the built-in data, where the ground truth is known (issue 6,
AVTOK.md section 6's generation columns as far as they can be computed
offline), each next to the same figure for the real clips and for the
tokenizer's reconstructions of them:

* class accuracy of the generated modality by the shipped classifier
  (`classifier.py`; a2v: video, v2a: audio, joint: both) against the class
  of the conditioning clip (a2v, v2a) or the requested class (joint);
* Frechet distance to the real clips in the classifier's feature space
  (video and/or audio), like gFVD / gFAD but in a space trained on this data;
* the audio-video event offset (`sync.desync`: visual events vs audio
  onsets, mean absolute offset in seconds; the paper's DeSync column is a
  learned synchronisation model's offset, this one is computed), with
  randomly re-paired real clips as the "no synchronisation" reference.

Audio is scored on the normalised log-mel (the tokenizer's own output), so
the vocoder's errors never enter these figures; mp4 files carry the sound of
the TOKENIZER run's vocoder (`pretrained.configured.wave_maker` of its
config: the HiFi-GAN of `config.vocoder.weights`, else Griffin-Lim), named
by metrics.json's `vocoder`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from avtok_jax import checkpointing, config_lib, reporting
from avtok_jax.data import patches as patches_lib
from avtok_jax.data import tokens as tokens_lib
from avtok_jax.evaluation import classifier as classifier_lib
from avtok_jax.evaluation import evaluate as evaluate_lib
from avtok_jax.evaluation import metrics as metrics_lib
from avtok_jax.evaluation import sync
from avtok_jax.models import tokenizer as tokenizer_lib


class Codec:
  """A trained tokenizer (`tokenize.load_tokenizer`) as a batch encoder/decoder of clips.

  `encode(video_patches, mel_patches)` -> {m: int32 codes [B, n_m]};
  `decode(codes)` -> {'video': float [B, T, H, W, 3] in [-1, 1], 'audio':
  normalised mel [B, F, L]} for the modalities given; `vocode(mel)` ->
  waveforms [B, S] by the tokenizer run's vocoder (`Tokenizer.vocode`:
  HiFi-GAN when its config names one, else Griffin-Lim; built once, on first
  use; `vocoder` names it); `write_clip(path, video, wave)` writes an mp4
  with sound at the data preset's frame and sample rates.
  """

  def __init__(self, workdir: str, step: int | None = None):
    from avtok_jax import tokenize

    self.tok = tokenize.load_tokenizer(workdir, step)
    self.config = self.tok.config
    self.data_config = dc = self.tok.data_config
    self.mel_spec = self.tok.mel_spec
    self.video_shape = (dc.num_frames, dc.height, dc.width, 3)
    self.mel_shape = (dc.mel.n_mels, config_lib.num_mel_frames(dc))
    self.fps = config_lib.fps(dc)
    self.sample_rate = int(dc.sample_rate)

  def encode(self, video_patches: Any, mel_patches: Any) -> dict[str, np.ndarray]:
    codes = self.tok.encode_fn(
      self.tok.variables, jnp.asarray(video_patches), jnp.asarray(mel_patches)
    )
    return {m: np.asarray(c) for m, c in jax.device_get(codes).items()}

  def decode(self, codes: Mapping[str, Any]) -> dict[str, np.ndarray]:
    from avtok_jax import tokenize

    video, audio = tokenize.check_codes(self.tok, codes["video"], codes["audio"])
    out = self.tok.decode_fn(self.tok.variables, {"video": video, "audio": audio})
    return {m: np.asarray(x) for m, x in jax.device_get(out).items()}

  @property
  def vocoder(self) -> str:
    """'hifigan: PATH' or 'griffin_lim'."""
    return self.tok.vocoder

  def vocode(self, mel: Any) -> np.ndarray:
    """Normalised mels [B, F, L] -> float32 waveforms [B, S]."""
    return self.tok.vocode(np.asarray(mel, np.float32).reshape((-1, *np.shape(mel)[-2:])))

  def write_clip(self, path: str, video: Any, wave: Any) -> str:
    from avtok_jax import tokenize

    tokenize.write_clip(path, reporting.to_uint8_video(video), wave, self.data_config)
    return path


def load_generator(generator_dir: str, step: int | None = None, tokens_dir: str = ""):
  """(config, train_ar.Task, params, step) of a trained generator workdir."""
  from avtok_jax import train_ar

  config = evaluate_lib.load_run_config(generator_dir)
  if config.get("trainer") != train_ar.TRAINER:
    raise ValueError(f"{generator_dir} is not a generator run (its config has no trainer='ar').")
  if tokens_dir:
    config.tokens_dir = tokens_dir
  meta = tokens_lib.read_metadata(config.tokens_dir)
  task = train_ar.Task(config, meta)
  directory, step = checkpointing.saved_step(generator_dir, step)
  abstract = jax.eval_shape(task.init, jax.random.key(0))["params"]
  params = checkpointing.restore_complete(
    directory, abstract, step=step, item_path=("params",), what="generator params"
  )
  return config, task, params, int(step)


@dataclasses.dataclass
class SamplingOptions:
  """Sampling knobs (None = the generator config's `sampling` value)."""

  temperature: float | None = None
  top_k: int | None = None
  top_p: float | None = None
  cfg_scale: float | None = None
  seed: int = 0

  def resolve(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
    s = config.sampling
    pick = lambda v, d: d if v is None else v  # noqa: E731
    return dict(
      temperature=float(pick(self.temperature, s.temperature)),
      top_k=int(pick(self.top_k, s.top_k)),
      top_p=float(pick(self.top_p, s.top_p)),
      cfg_scale=float(pick(self.cfg_scale, s.cfg_scale)),
    )


def generate(task, params, batch: Mapping[str, Any], rng: jax.Array, sampling: Mapping[str, Any]):
  """{modality: int32 codes [B, n_m]} generated from the conditions in `batch`."""
  from avtok_jax import train_ar

  prompt, uncond = task.prompts(batch)
  return train_ar.sample_codes(
    task,
    params,
    prompt,
    uncond,
    rng,
    sampling["temperature"],
    sampling["top_k"],
    sampling["top_p"],
    sampling["cfg_scale"],
  )


class TokenProbe:
  """A linear class probe on bag-of-codes histograms: does a token sequence carry its class?

  Softmax regression on the normalised code histogram of each modality's
  tokens (video and audio histograms concatenated), trained by full-batch
  gradient descent on the token set's train split. It separates what the
  generator gets right from what the tokenizer can show: decoded clips can
  only be as recognisable as the tokenizer's reconstructions, while the
  probe reads the generated tokens themselves. Its accuracy on real held-out
  tokens is the ceiling to compare generated tokens with [ours].
  """

  def __init__(
    self,
    codes: Mapping[str, np.ndarray],
    labels: np.ndarray,
    codebook_size: int,
    num_classes: int,
    *,
    steps: int = 300,
    lr: float = 20.0,
  ):
    """Fits the probe on {modality: int codes [N, n_m]} and int labels [N]."""
    self.codebook_size = int(codebook_size)
    self.modalities = tuple(codes)
    x = self.features(codes)
    y = np.asarray(labels, np.int64)
    w = np.zeros((x.shape[1], num_classes), np.float64)
    b = np.zeros(num_classes, np.float64)
    for _ in range(steps):
      z = x @ w + b
      p = np.exp(z - z.max(1, keepdims=True))
      p /= p.sum(1, keepdims=True)
      p[np.arange(len(y)), y] -= 1.0  # d(cross-entropy)/d(logits)
      w -= lr * x.T @ p / len(y)
      b -= lr * p.mean(0)
    self.w, self.b = w, b
    self.train_accuracy = self.accuracy(codes, y)

  @classmethod
  def from_token_dir(cls, token_dir: str, modalities: tuple[str, ...]) -> TokenProbe:
    """The probe fitted on the train split of a token folder."""
    source = tokens_lib.TokenSource(token_dir, "train")
    meta = tokens_lib.read_metadata(token_dir)
    records = [source[i] for i in range(len(source))]
    codes = {m: np.stack([r[f"{m}_codes"] for r in records]) for m in modalities}
    labels = np.array([int(r["label"]) for r in records])
    num_classes = max(int(meta.get("num_classes", 0)), int(labels.max()) + 1)
    return cls(codes, labels, int(meta["codebook_size"]), num_classes)

  def features(self, codes: Mapping[str, np.ndarray]) -> np.ndarray:
    parts = []
    for m in self.modalities:
      c = np.asarray(codes[m])
      h = np.zeros((len(c), self.codebook_size))
      np.add.at(h, (np.repeat(np.arange(len(c)), c.shape[1]), c.reshape(-1)), 1.0)
      parts.append(h / c.shape[1])
    return np.concatenate(parts, axis=1)

  def accuracy(self, codes: Mapping[str, np.ndarray], labels: np.ndarray) -> float:
    return float(np.mean((self.features(codes) @ self.w + self.b).argmax(1) == np.asarray(labels)))


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(np.argmax(logits, -1) == labels))


def evaluate_generation(
  generator_dir: str,
  *,
  num_clips: int = 64,
  batch_size: int = 16,
  sampling: SamplingOptions | None = None,
  tokenizer_dir: str = "",
  out_dir: str = "",
  num_sample_clips: int = 4,
  step: int | None = None,
) -> dict[str, Any]:
  """Generates from `num_clips` held-out built-in clips and scores them (module docstring).

  Writes `metrics.json`, `report.md`, `generated.png` and a few
  `clip{i}_{real,generated}.mp4` into `out_dir` (default
  GENERATOR_DIR/generation_eval/<step>) and returns the metrics.
  """
  sampling = sampling or SamplingOptions()
  config, task, params, step = load_generator(generator_dir, step)
  codec = Codec(tokenizer_dir or task.meta["tokenizer_workdir"])
  knobs = sampling.resolve(config)
  out_dir = out_dir or os.path.join(generator_dir, "generation_eval", str(step))
  os.makedirs(out_dir, exist_ok=True)
  preset = codec.data_config.preset
  classifier = classifier_lib.load_classifier(preset)
  layout = task.layout

  sets: dict[str, dict[str, list[np.ndarray]]] = {
    k: {"video": [], "mel": []} for k in ("real", "recon", "generated")
  }
  labels: list[np.ndarray] = []
  real_codes: dict[str, list[np.ndarray]] = {"video": [], "audio": []}
  gen_codes: dict[str, list[np.ndarray]] = {m: [] for m in layout.generates}
  samples: dict[str, list[np.ndarray]] = {}
  t_sample = 0.0
  with tempfile.TemporaryDirectory(prefix="avtok_gen_data_") as scratch:
    data_config, split, _ = evaluate_lib.eval_data(codec.config, "synthetic", num_clips, scratch)
    data_config.batch_size = batch_size
    batches = evaluate_lib._batches(data_config, split, num_clips, sampling.seed)
    total = -(-num_clips // batch_size)
    for i, batch in enumerate(tqdm.tqdm(batches, total=total, desc="generate", unit="batch")):
      mask = np.asarray(batch["mask"], bool)
      codes = codec.encode(batch["video_patches"], batch["mel_patches"])
      recon = codec.decode(codes)
      label = np.asarray(batch["label"], np.int32)
      cond = {"video_codes": codes["video"], "audio_codes": codes["audio"], "label": label}
      t0 = time.perf_counter()
      generated = generate(
        task, params, cond, jax.random.fold_in(jax.random.key(sampling.seed), i), knobs
      )
      t_sample += time.perf_counter() - t0
      gen = codec.decode(dict(codes, **generated))
      video_in = patches_lib.unpatchify_video(
        np.asarray(tokenizer_lib.to_float_patches(jnp.asarray(batch["video_patches"]))),
        codec.video_shape,
        data_config.video_patch,
      )
      mel_in = patches_lib.unpatchify_mel(
        np.asarray(batch["mel_patches"]), codec.mel_shape, data_config.mel_patch
      )
      # What each set pairs: the generated modality replaces the real one.
      gen_video = gen["video"] if "video" in layout.generates else video_in
      gen_mel = gen["audio"] if "audio" in layout.generates else mel_in
      for name, video, mel in (
        ("real", video_in, mel_in),
        ("recon", recon["video"], recon["audio"]),
        ("generated", gen_video, gen_mel),
      ):
        sets[name]["video"].append(np.asarray(video)[mask])
        sets[name]["mel"].append(np.asarray(mel)[mask])
      labels.append(label[mask])
      for m in real_codes:
        real_codes[m].append(np.asarray(codes[m])[mask])
      for m in gen_codes:
        gen_codes[m].append(np.asarray(generated[m])[mask])
      have = sum(len(x) for x in samples.get("label", []))
      if have < num_sample_clips:
        take = slice(0, num_sample_clips - have)
        for k, v in (
          ("video_in", video_in),
          ("wave_in", np.asarray(batch["audio"], np.float32)),
          ("gen_video", gen_video),
          ("gen_mel", gen_mel),
          ("label", label),
        ):
          samples.setdefault(k, []).append(np.asarray(v)[mask][take])

  labels_all = np.concatenate(labels)
  data = {k: {m: np.concatenate(v) for m, v in d.items()} for k, d in sets.items()}
  n = len(labels_all)
  metrics: dict[str, Any] = {
    "task": config.task,
    "step": step,
    "num_clips": n,
    "chance_accuracy": 1.0 / classifier.arch.num_classes,
    "sampling": knobs,
    "generated_tokens_per_s": n * layout.num_generated / max(t_sample, 1e-9),
    "vocoder": codec.vocoder,
  }
  feats: dict[str, dict[str, np.ndarray]] = {}
  for name, d in data.items():
    feats[name] = {}
    # The generated set's other modality is the real one: scored once, under 'real'.
    for m in layout.generates if name == "generated" else ("video", "audio"):
      if m == "video":
        f, logits = classifier.video(d["video"])
      else:
        # An untrained decoder may leave the normalised range, which the
        # classifier refuses beyond +-4 (evaluate.py does the same).
        f, logits = classifier.audio(np.clip(d["mel"], -4.0, 4.0))
      feats[name][m] = f
      metrics[f"{name}/class_accuracy_{m}"] = _accuracy(logits, labels_all)
      if name != "real":
        metrics[f"{name}/fd_{m}"] = float(
          metrics_lib.frechet_distance_from_features(feats["real"][m], f)
        )
    ds = sync.desync(d["video"], d["mel"], codec.fps, codec.sample_rate, mel_spec=codec.mel_spec)
    metrics[f"{name}/desync_s"] = ds["desync"]
    metrics[f"{name}/desync_scored_clips"] = ds["num_scored"]
  # No synchronisation at all: real video with the real audio of another clip.
  shuffled = sync.desync(
    data["real"]["video"], np.roll(data["real"]["mel"], 1, axis=0), codec.fps, codec.sample_rate,
    mel_spec=codec.mel_spec,
  )  # fmt: skip
  metrics["shuffled_real/desync_s"] = shuffled["desync"]
  metrics["shuffled_real/desync_scored_clips"] = shuffled["num_scored"]

  probe = TokenProbe.from_token_dir(config.tokens_dir, layout.generates)
  real_c = {m: np.concatenate(v) for m, v in real_codes.items()}
  gen_c = {m: np.concatenate(v) for m, v in gen_codes.items()}
  metrics["real/token_probe_accuracy"] = probe.accuracy(real_c, labels_all)
  metrics["generated/token_probe_accuracy"] = probe.accuracy(gen_c, labels_all)
  metrics["token_probe_train_accuracy"] = probe.train_accuracy

  _write_outputs(out_dir, metrics, samples, codec, task)
  return metrics


def _write_outputs(out_dir, metrics, samples, codec: Codec, task) -> None:
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=2, sort_keys=True)
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(report_markdown(metrics, task.layout.generates))
  s = {k: np.concatenate(v) for k, v in samples.items()}
  if not s:
    return
  reporting.save_png(
    os.path.join(out_dir, "generated.png"), reporting.video_grid(s["video_in"], s["gen_video"])
  )
  reporting.save_png(os.path.join(out_dir, "generated_mel.png"), reporting.mel_grid(s["gen_mel"]))
  gen_wave = codec.vocode(s["gen_mel"])
  for i in range(len(s["label"])):
    codec.write_clip(os.path.join(out_dir, f"clip{i}_real.mp4"), s["video_in"][i], s["wave_in"][i])
    codec.write_clip(
      os.path.join(out_dir, f"clip{i}_generated.mp4"), s["gen_video"][i], gen_wave[i]
    )


def report_markdown(metrics: Mapping[str, Any], generates: tuple[str, ...]) -> str:
  """A markdown table: real / reconstruction / generated (/ shuffled) per figure."""

  def fmt(v):
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

  rows = []
  for label, key in (
    ("class accuracy, video", "class_accuracy_video"),
    ("class accuracy, audio", "class_accuracy_audio"),
    ("FD to real, video (classifier features)", "fd_video"),
    ("FD to real, audio (classifier features)", "fd_audio"),
    ("event offset, s (lower is better)", "desync_s"),
    ("clips with events on both sides (offset scored)", "desync_scored_clips"),
    ("class probe on the generated modality's tokens", "token_probe_accuracy"),
  ):
    row = [metrics.get(f"{name}/{key}") for name in ("real", "recon", "generated")]
    if key == "token_probe_accuracy":
      row[1] = None  # reconstructions have the real clips' tokens
    shuffled = metrics.get(f"shuffled_real/{key}")
    rows.append(f"| {label} | " + " | ".join(fmt(v) for v in row + [shuffled]) + " |")
  head = (
    f"Task {metrics['task']} (generates {' + '.join(generates)}), step {metrics['step']}, "
    f"{metrics['num_clips']} held-out built-in clips; chance accuracy "
    f"{metrics['chance_accuracy']:.3f}; sampling {metrics['sampling']}"
    + (f"; mp4 sound by {metrics['vocoder']}" if "vocoder" in metrics else "")
    + ".\n\n"
    "| figure | real clips | tokenizer reconstructions | generated | real, randomly re-paired |\n"
    "|---|---|---|---|---|\n"
  )
  return head + "\n".join(rows) + "\n"
