r"""Command line: generate clips with a trained AR generator, or score it on held-out clips.

  python -m avtok_jax.generate --generator=workdir/ar_a2v --input=clip.mp4 --out=DIR
  python -m avtok_jax.generate --generator=workdir/ar_v2a --input=clip.mp4 --out=DIR
  python -m avtok_jax.generate --generator=workdir/ar_joint --class_name=red_ball_bell --out=DIR
  python -m avtok_jax.generate --generator=workdir/ar_joint --eval_clips=64 --out=DIR

The task (a2v, v2a, joint) is the generator's; `--task` may repeat it as a
check. The tokenizer is the one its token set was made with (tokens.json),
or `--tokenizer=DIR`. Writes `DIR/sample{i}.mp4` (with sound; a2v keeps the
input's sound, v2a its frames) and `DIR/samples.png`. Generated mels are
vocoded by the tokenizer run's vocoder (its `config.vocoder.weights`: a
HiFi-GAN, else Griffin-Lim; `pretrained.configured.wave_maker`). `--num_samples` clips
per call as one batch (KV cache, one compiled program); the same `--seed`
gives the same clips. `--cfg_scale`, `--temperature`, `--top_k`, `--top_p`
override the generator config's `sampling` values.

`--eval_clips=N` instead generates from N held-out built-in clips and writes
metrics.json / report.md (`evaluation/generation.py`: class accuracy by the
shipped classifier, Frechet distances in its feature space, audio-video event
offset; next to real clips and tokenizer reconstructions).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags

from avtok_jax import reporting

_GENERATOR = flags.DEFINE_string(
  "generator", None, "Generator workdir (trained by avtok_jax.main)."
)
_TASK = flags.DEFINE_enum("task", None, ["a2v", "v2a", "joint"], "Checked against the generator's.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "Tokenizer workdir ('' = the token set's).")
_TOKENS = flags.DEFINE_string("tokens_dir", "", "Token set ('' = the generator config's).")
_INPUT = flags.DEFINE_string("input", "", "Conditioning mp4 (a2v, v2a).")
_CLASS = flags.DEFINE_string("class_name", "", "Class to generate (joint); see --list_classes.")
_LIST = flags.DEFINE_bool("list_classes", False, "Print the class names and exit.")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_NUM = flags.DEFINE_integer("num_samples", 4, "Clips to generate.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed of the first clip.")
_STEP = flags.DEFINE_integer("step", None, "Generator checkpoint step (default: latest).")
_TEMP = flags.DEFINE_float("temperature", None, "Softmax temperature (0 = greedy).")
_TOP_K = flags.DEFINE_integer("top_k", None, "Top-k filter (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus filter (1 = off).")
_CFG = flags.DEFINE_float("cfg_scale", None, "Classifier-free guidance scale (1 = off).")
_EVAL = flags.DEFINE_integer("eval_clips", 0, "Score on N held-out built-in clips instead.")


def generate_files(
  generator_dir: str,
  out_dir: str,
  *,
  input_path: str = "",
  class_name: str = "",
  num_samples: int = 4,
  sampling=None,
  tokenizer_dir: str = "",
  tokens_dir: str = "",
  step: int | None = None,
  task_name: str | None = None,
) -> list[str]:
  """Generates `num_samples` clips and writes them as mp4 (with sound) + PNG; returns the paths."""
  from avtok_jax.evaluation import generation

  sampling = sampling or generation.SamplingOptions()
  config, task, params, _ = generation.load_generator(generator_dir, step, tokens_dir)
  if task_name and task_name != config.task:
    raise ValueError(f"--task={task_name}, but {generator_dir} was trained for {config.task}.")
  if num_samples < 1:
    raise ValueError(f"--num_samples={num_samples} must be >= 1.")
  codec = generation.Codec(tokenizer_dir or task.meta["tokenizer_workdir"])
  knobs = sampling.resolve(config)
  n = num_samples
  if config.task == "joint":
    if input_path:
      raise ValueError("joint generation takes --class_name, not --input.")
    names = list(task.meta.get("class_names") or [])
    if class_name not in names:
      raise ValueError(
        f"--class_name={class_name!r} is not one of the token set's classes: {names}."
      )
    batch = {"label": np.full((n,), names.index(class_name), np.int32)}
    cond_video = cond_wave = None
  else:
    if not input_path:
      raise ValueError(f"{config.task} generation needs --input=clip.mp4.")
    if class_name:
      raise ValueError(f"--class_name is for joint generation, not {config.task}.")
    from avtok_jax import tokenize
    from avtok_jax.data import patches as patches_lib
    from avtok_jax.models import tokenizer as tokenizer_lib

    dc = codec.data_config
    video, wave = tokenize.read_input(input_path, dc)
    clip = tokenize.preprocess_clip(dc, video, wave)
    codes = codec.encode(clip["video_patches"][None], clip["mel_patches"][None])
    batch = {
      "video_codes": np.repeat(codes["video"], n, 0),
      "audio_codes": np.repeat(codes["audio"], n, 0),
    }
    # The conditioning stream as the tokenizer sees it (centre-cropped frames).
    cond_video = patches_lib.unpatchify_video(
      np.asarray(tokenizer_lib.to_float_patches(clip["video_patches"])),
      codec.video_shape,
      tuple(dc.video_patch),
    )
    cond_wave = wave
  # One batch of n clips (each row draws its own tokens); the same seed gives the same clips.
  generated = generation.generate(task, params, batch, jax.random.key(sampling.seed), knobs)
  full = dict(generated)
  if config.task == "a2v":
    full["audio"] = batch["audio_codes"]
  elif config.task == "v2a":
    full["video"] = batch["video_codes"]
  out = codec.decode(full)
  os.makedirs(out_dir, exist_ok=True)
  video = out["video"] if "video" in task.layout.generates else np.repeat(cond_video[None], n, 0)
  if "audio" in task.layout.generates:
    waves = codec.vocode(out["audio"])
  else:
    waves = np.repeat(np.asarray(cond_wave, np.float32)[None], n, 0)
  paths = [
    codec.write_clip(os.path.join(out_dir, f"sample{i}.mp4"), video[i], waves[i]) for i in range(n)
  ]
  reporting.save_png(os.path.join(out_dir, "samples.png"), reporting.video_grid(video))
  if "audio" in out:
    reporting.save_png(os.path.join(out_dir, "samples_mel.png"), reporting.mel_grid(out["audio"]))
  np.savez(
    os.path.join(out_dir, "codes.npz"), **{f"{m}_codes": np.asarray(c) for m, c in full.items()}
  )
  return paths


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  reporting.quiet_library_logs()
  from avtok_jax.evaluation import generation

  if not _GENERATOR.value:
    raise app.UsageError("--generator=DIR is required.")
  if _LIST.value:
    _, task, _, _ = generation.load_generator(_GENERATOR.value, _STEP.value, _TOKENS.value)
    print("\n".join(task.meta.get("class_names") or []))
    return
  if not _OUT.value:
    raise app.UsageError("--out=DIR is required.")
  sampling = generation.SamplingOptions(
    temperature=_TEMP.value,
    top_k=_TOP_K.value,
    top_p=_TOP_P.value,
    cfg_scale=_CFG.value,
    seed=_SEED.value,
  )
  try:
    if _EVAL.value:
      metrics = generation.evaluate_generation(
        _GENERATOR.value,
        num_clips=_EVAL.value,
        sampling=sampling,
        tokenizer_dir=_TOKENIZER.value,
        out_dir=_OUT.value,
        step=_STEP.value,
      )
      print(open(os.path.join(_OUT.value, "report.md")).read())
      print(f"Metrics in {os.path.join(_OUT.value, 'metrics.json')}.")
      del metrics
      return
    paths = generate_files(
      _GENERATOR.value,
      _OUT.value,
      input_path=_INPUT.value,
      class_name=_CLASS.value,
      num_samples=_NUM.value,
      sampling=sampling,
      tokenizer_dir=_TOKENIZER.value,
      tokens_dir=_TOKENS.value,
      step=_STEP.value,
      task_name=_TASK.value,
    )
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"generate: {e}") from None
  print(
    f"Wrote {len(paths)} clips with sound to {_OUT.value} ({', '.join(os.path.basename(p) for p in paths)})."
  )


if __name__ == "__main__":
  app.run(main)
