r"""Encode one sounding video into tokens, or decode tokens into a sounding video.

  python -m avtok_jax.tokenize encode --workdir=TOKENIZER_DIR --input=clip.mp4 --output=codes.npz
  python -m avtok_jax.tokenize decode --workdir=TOKENIZER_DIR --codes=codes.npz --output=clip.mp4

`encode` reads the file's first clip window at the tokenizer's data preset
(frame count, fps, sample rate; `--start` moves the window) exactly as the
`av_folder` data set builder reads it: frames at the stored size (target +
crop margin), audio as 16-bit PCM. It then preprocesses it as evaluation does
(`pipeline.Preprocess`, eval mode: centre crop, log-mel, patchify) and writes
the argmax codes with their provenance to an .npz file:

| key                 | value                                        |
|---------------------|----------------------------------------------|
| `video_codes`       | int32 [n_v]                                  |
| `audio_codes`       | int32 [n_a]                                  |
| `codebook_size`     | int                                          |
| `tokenizer_workdir` | str (absolute path)                          |
| `step`              | int (checkpoint step)                        |
| `tokenizer_digest`  | str (`tokens.tokenizer_digest` of its config)|
| `source`            | str (the input file)                         |

`decode` turns codes back into frames and a mel, vocodes the mel with the
vocoder of the TOKENIZER run's config, as evaluation does
(`pretrained.configured.wave_maker`: the HiFi-GAN of `config.vocoder.weights`,
else Griffin-Lim) and writes an mp4 with sound. A codes file with other shapes or another codebook
size is refused; one from another step or config of a tokenizer with the same
shapes decodes with a warning.

The library functions (`load_tokenizer`, `read_input`, `load_clip`,
`encode_clip`, `decode_codes`, `write_clip`, `save_codes`, `load_codes`) are
what a generation CLI reuses.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from avtok_jax import checkpointing, config_lib, reporting
from avtok_jax.data import audio as audio_lib
from avtok_jax.data import pipeline, tokens, video_io
from avtok_jax.data.tfds import common
from avtok_jax.pretrained import configured

CODES_KEYS = ("video_codes", "audio_codes")
_SHORT_CLIP = ("pad", "error")


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """A trained tokenizer restored from its workdir, with its jitted codec.

  Attributes:
    workdir: absolute path of the training workdir.
    step: checkpoint step restored.
    config: the run's config (`workdir/config.json`).
    module: the `AVTok` module.
    variables: {'params', 'codebook_stats'}.
    digest: `tokens.tokenizer_digest(config)`.
    encode_fn: jitted (variables, video_patches [B, N_v, P_v], mel_patches
      [B, N_a, P_a]) -> {'video': int32 [B, n_v], 'audio': int32 [B, n_a]}.
    decode_fn: jitted (variables, codes) -> {'video': float32 [B, T, H, W, 3]
      in [-1, 1], 'audio': normalised mel float32 [B, F, L]}.
  """

  workdir: str
  step: int
  config: ml_collections.ConfigDict
  module: Any
  variables: dict[str, Any]
  digest: str
  encode_fn: Callable[..., dict[str, jax.Array]]
  decode_fn: Callable[..., dict[str, jax.Array]]

  @property
  def data_config(self) -> ml_collections.ConfigDict:
    return self.config.data

  @property
  def codebook_size(self) -> int:
    return int(self.config.model.codebook_size)

  @property
  def num_video_tokens(self) -> int:
    return int(self.config.model.num_video_tokens)

  @property
  def num_audio_tokens(self) -> int:
    return int(self.config.model.num_audio_tokens)

  @property
  def mel_spec(self) -> audio_lib.MelSpec:
    return audio_lib.MelSpec.from_config(self.data_config)

  @functools.cached_property
  def wave_fn(self) -> Callable[[np.ndarray], np.ndarray]:
    """Normalised mel [F, L] -> float32 waveform by this run's vocoder; built on first use, once.

    `pretrained.configured.wave_maker(config)`: the HiFi-GAN of
    `config.vocoder.weights`, or Griffin-Lim when it is '' (or the config
    predates the key).
    """
    return configured.wave_maker(self.config)

  @property
  def vocoder(self) -> str:
    """What `wave_fn` vocodes with: 'hifigan: PATH' or 'griffin_lim'."""
    return configured.vocoder_name(self.config)

  def vocode(self, mel: Any) -> np.ndarray:
    """Normalised mel [F, L] or [B, F, L] -> float32 waveform [L * hop] or [B, L * hop]."""
    mel = np.asarray(mel, np.float32)
    if mel.ndim == 2:
      return np.asarray(self.wave_fn(mel), np.float32)
    return np.stack([np.asarray(self.wave_fn(m), np.float32) for m in mel])


def load_tokenizer(workdir: str | os.PathLike, step: int | None = None) -> Tokenizer:
  """Restores the tokenizer of a training workdir (config.json + checkpoints/).

  The variables come from `evaluation.evaluate.load_tokenizer` (every
  tokenizer parameter from the checkpoint, restored into `jax.eval_shape`
  shapes; projectors and discriminators ignored); this adds the modality
  check and the jitted codec.

  Raises:
    FileNotFoundError: no such workdir, no checkpoint or no config.json in it.
    ValueError: no checkpoint of `step`, a checkpoint without the tokenizer's
      parameters, or a run that did not train both modalities.
  """
  # Imported here: evaluation pulls in metrics and plotting, which the data
  # side of this module (e.g. `write_clip`) does not need.
  from avtok_jax.evaluation import evaluate

  workdir = os.path.abspath(os.fspath(workdir))
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"Tokenizer workdir {workdir} does not exist.")
  # The checkpoint first: an empty workdir is named as such, not as a missing config.
  checkpointing.saved_step(workdir, step)
  config = evaluate.load_run_config(workdir)
  modalities = tuple(config.get("modalities", ()))
  if set(modalities) != {"video", "audio"}:
    raise ValueError(
      f"The tokenizer in {workdir} was trained on {modalities} only (stage "
      f"{config.get('stage', '?')}); tokens need one trained on video and audio "
      "(VFAL stage 3 or vanilla)."
    )
  module, variables, step = evaluate.load_tokenizer(config, workdir, step)
  c = config.data
  video_shape = (c.num_frames, c.height, c.width, 3)
  mel_shape = (c.mel.n_mels, config_lib.num_mel_frames(c))
  encode_fn, decode_fn = evaluate.make_codec(module, ("video", "audio"), video_shape, mel_shape, c)
  return Tokenizer(
    workdir=workdir,
    step=int(step),
    config=config,
    module=module,
    variables=variables,
    digest=tokens.tokenizer_digest(config),
    encode_fn=encode_fn,
    decode_fn=decode_fn,
  )


# ----------------------------------------------------------------------------- encode


def preprocess_clip(
  data_config: ml_collections.ConfigDict, video: np.ndarray, audio: np.ndarray
) -> dict[str, np.ndarray]:
  """One clip -> eval-mode model inputs, through `pipeline.Preprocess(train=False)`.

  Args:
    data_config: the tokenizer's `config.data`.
    video: uint8 [T, H, W, 3] at the stored size (height + crop_margin,
      width + crop_margin; centre-cropped as evaluation crops it) or at the
      target size (height, width; used as is).
    audio: [num_samples] waveform, float in [-1, 1] (stored as the data sets
      store it: 16-bit PCM) or int16.

  Returns:
    {'video_patches': uint8 [N_v, P_v] (float32 in [-1, 1] when
    video_dtype='float32'), 'mel_patches': float32 [N_a, P_a]}.
  """
  c = ml_collections.ConfigDict(data_config.to_dict())
  video = np.asarray(video)
  stored = (c.num_frames, *config_lib.stored_frame_size(c), 3)
  target = (c.num_frames, c.height, c.width, 3)
  audio = np.asarray(audio)
  if video.dtype != np.uint8 or video.shape not in (stored, target):
    raise ValueError(
      f"video must be uint8 {list(stored)} (stored size) or {list(target)}, got "
      f"{video.dtype} {list(video.shape)}."
    )
  if audio.shape != (c.num_samples,):
    raise ValueError(f"audio must have shape [{c.num_samples}], got {list(audio.shape)}.")
  if video.shape == target:
    c.crop_margin = 0
  if audio.dtype != np.int16:
    audio = common.audio_to_int16(audio)
  record = {"video": video, "audio": audio, "label": 0, "source": b"clip"}
  # Eval mode draws nothing from the generator (centre crop, no flip).
  out = pipeline.Preprocess(c, train=False).random_map(record, np.random.default_rng(0))
  return {"video_patches": out["video_patches"], "mel_patches": out["mel_patches"]}


def encode_clip(tok: Tokenizer, video: np.ndarray, audio: np.ndarray) -> dict[str, np.ndarray]:
  """One clip -> argmax codes: {'video_codes': int32 [n_v], 'audio_codes': int32 [n_a]}.

  `video` and `audio` as in `preprocess_clip`.
  """
  x = preprocess_clip(tok.data_config, video, audio)
  codes = tok.encode_fn(tok.variables, x["video_patches"][None], x["mel_patches"][None])
  codes = jax.device_get(codes)
  return {
    "video_codes": np.asarray(codes["video"][0], np.int32),
    "audio_codes": np.asarray(codes["audio"][0], np.int32),
  }


def read_input(
  path: str | os.PathLike,
  data_config: ml_collections.ConfigDict,
  *,
  start: float = 0.0,
  short_clip: str | None = None,
  missing_audio: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """The clip window [start, start + duration) of a video file, as the av_folder builder reads it.

  Args:
    path: a video file FFmpeg can read.
    data_config: the tokenizer's `config.data` (frames, size, fps and rate).
    start: window start in seconds.
    short_clip: 'pad' (repeat the last frame, silence) or 'error'; default:
      the data config's ('skip' there means 'error' for one file).
    missing_audio: 'error' or 'silence'; default: the data config's.

  Returns:
    (uint8 [T, height + crop_margin, width + crop_margin, 3], float32 [num_samples]).

  Raises:
    FileNotFoundError: no such file.
    video_io.MediaError (a ValueError naming the file): unreadable, corrupt,
    too short (with 'error') or without audio (with 'error').
  """
  c = data_config
  if short_clip is None:
    short_clip = "pad" if c.short_clip == "pad" else "error"
  if short_clip not in _SHORT_CLIP:
    raise ValueError(f"short_clip={short_clip!r} must be one of {_SHORT_CLIP}.")
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No input file {path}.")
  hs, ws = config_lib.stored_frame_size(c)
  return video_io.read_clip(
    path,
    start=float(start),
    num_frames=int(c.num_frames),
    fps=config_lib.fps(c),
    height=hs,
    width=ws,
    sample_rate=int(c.sample_rate),
    num_samples=int(c.num_samples),
    missing_audio=missing_audio or c.missing_audio,
    short_clip=short_clip,
  )


def load_clip(
  path: str | os.PathLike, data_config: ml_collections.ConfigDict, **read_options: Any
) -> dict[str, np.ndarray]:
  """`read_input` + `preprocess_clip`: a video file -> {'video_patches', 'mel_patches'} of one clip.

  `read_options` are those of `read_input` (start, short_clip, missing_audio).
  """
  return preprocess_clip(data_config, *read_input(path, data_config, **read_options))


# ----------------------------------------------------------------------------- decode


def check_codes(
  tok: Tokenizer, video_codes: Any, audio_codes: Any, where: str = "codes"
) -> tuple[np.ndarray, np.ndarray]:
  """Codes as int32 [B, n_v], [B, n_a] (a single clip's [n] gets B = 1); ValueError otherwise."""
  out = []
  for name, codes, n in (
    ("video_codes", video_codes, tok.num_video_tokens),
    ("audio_codes", audio_codes, tok.num_audio_tokens),
  ):
    codes = np.asarray(codes)
    given = tuple(codes.shape)
    if not np.issubdtype(codes.dtype, np.integer):
      raise ValueError(f"{where}: {name} must be integers, got {codes.dtype}.")
    if codes.ndim == 1:
      codes = codes[None]
    if codes.ndim != 2 or codes.shape[1] != n:
      raise ValueError(
        f"{where}: {name} has shape {given}, but the tokenizer in "
        f"{tok.workdir} uses {n} {name.split('_')[0]} tokens per clip ([{n}] or [B, {n}])."
      )
    if codes.size and (codes.min() < 0 or codes.max() >= tok.codebook_size):
      raise ValueError(
        f"{where}: {name} holds codes in [{codes.min()}, {codes.max()}], outside the "
        f"tokenizer's codebook [0, {tok.codebook_size})."
      )
    out.append(codes.astype(np.int32))
  if out[0].shape[0] != out[1].shape[0]:
    raise ValueError(
      f"{where}: {out[0].shape[0]} clips of video codes but {out[1].shape[0]} of audio codes."
    )
  return out[0], out[1]


def vocode(mel: np.ndarray, spec: audio_lib.MelSpec) -> np.ndarray:
  """Normalised mel float [F, L] -> float32 waveform [L * hop] by Griffin-Lim
  (`audio.normalized_mel_to_wave`); `Tokenizer.vocode` uses the run's vocoder instead."""
  return audio_lib.normalized_mel_to_wave(mel, spec)


def decode_codes(
  tok: Tokenizer, video_codes: Any, audio_codes: Any
) -> tuple[np.ndarray, np.ndarray]:
  """Codes -> (video uint8 [T, H, W, 3], waveform float32 [num_samples]).

  Batched codes ([B, n_v], [B, n_a]) give ([B, T, H, W, 3], [B, num_samples]).
  The waveform is the decoded mel vocoded by the tokenizer run's vocoder
  (`Tokenizer.vocode`: HiFi-GAN or Griffin-Lim), not clipped.
  """
  single = np.ndim(video_codes) == 1
  v, a = check_codes(tok, video_codes, audio_codes)
  recon = jax.device_get(tok.decode_fn(tok.variables, {"video": v, "audio": a}))
  video = reporting.to_uint8_video(np.asarray(recon["video"]))
  wave = tok.vocode(np.asarray(recon["audio"]))
  return (video[0], wave[0]) if single else (video, wave)


def write_clip(
  path: str | os.PathLike,
  video: np.ndarray,
  audio: np.ndarray,
  data_config: ml_collections.ConfigDict,
) -> None:
  """Writes one clip as a video file with sound at the data preset's fps and sample rate.

  Args:
    path: output file (.mp4, .mkv, .webm, ...; the suffix picks the codecs).
    video: uint8 [T, H, W, 3] (or float in [-1, 1]).
    audio: float [S] waveform; NaN becomes 0 and values are clipped to [-1, 1]
      (AAC would clip them anyway).
    data_config: the tokenizer's `config.data` (fps = T * sample_rate / num_samples).
  """
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  wave = np.clip(np.nan_to_num(np.asarray(audio, np.float32)), -1.0, 1.0)
  video_io.write_mp4(
    path,
    reporting.to_uint8_video(video),
    wave,
    fps=config_lib.fps(data_config),
    sample_rate=int(data_config.sample_rate),
  )


# ----------------------------------------------------------------------------- codes files


def save_codes(
  path: str | os.PathLike, codes: dict[str, np.ndarray], tok: Tokenizer, source: str = ""
) -> None:
  """Writes codes and their provenance as .npz (the table of the module docstring)."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    np.savez(
      f,
      video_codes=np.asarray(codes["video_codes"], np.int32),
      audio_codes=np.asarray(codes["audio_codes"], np.int32),
      codebook_size=np.int64(tok.codebook_size),
      tokenizer_workdir=np.str_(tok.workdir),
      step=np.int64(tok.step),
      tokenizer_digest=np.str_(tok.digest),
      source=np.str_(source),
    )


def load_codes(path: str | os.PathLike, tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """Reads a codes .npz and checks it against `tok`: (int32 [B, n_v], int32 [B, n_a]).

  Raises ValueError naming the file for a wrong shape, codebook size or
  range; warns (logging) when it came from another step or config.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No codes file {path}.")
  try:
    with np.load(path, allow_pickle=False) as f:
      data = {k: f[k] for k in f.files}
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is not a codes .npz file ({e}).") from e
  missing = [k for k in CODES_KEYS if k not in data]
  if missing:
    raise ValueError(f"{path} lacks {missing}; write it with `avtok_jax.tokenize encode`.")
  if "codebook_size" in data and int(data["codebook_size"]) != tok.codebook_size:
    raise ValueError(
      f"{path} holds codes of a codebook of {int(data['codebook_size'])} entries, but the "
      f"tokenizer in {tok.workdir} has {tok.codebook_size}."
    )
  if "tokenizer_digest" in data and str(data["tokenizer_digest"]) != tok.digest:
    logging.warning(
      "%s was encoded by a tokenizer with another config (%s, digest %s); decoding with %s "
      "(digest %s).",
      path,
      data.get("tokenizer_workdir", "?"),
      data["tokenizer_digest"],
      tok.workdir,
      tok.digest,
    )
  elif "step" in data and int(data["step"]) != tok.step:
    logging.warning(
      "%s was encoded at step %d; decoding with step %d.", path, int(data["step"]), tok.step
    )
  return check_codes(tok, data["video_codes"], data["audio_codes"], where=path)


# ----------------------------------------------------------------------------- command line


def _flag_values(command: str):
  # A private FlagValues per call: `main` can run several times in one process (tests).
  from absl import flags

  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "Tokenizer training workdir.", flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.", flag_values=fv)
  flags.DEFINE_string(
    "output", None, "Output file (.npz for encode, .mp4 for decode).", flag_values=fv
  )
  if command == "encode":
    flags.DEFINE_string("input", None, "Video file with sound to encode.", flag_values=fv)
    flags.DEFINE_float("start", 0.0, "Clip window start in seconds.", flag_values=fv)
    flags.DEFINE_enum(
      "short_clip", None, list(_SHORT_CLIP), "Default: the run's data config.", flag_values=fv
    )
    flags.DEFINE_enum(
      "missing_audio", None, ["error", "silence"], "Default: the run's data config.", flag_values=fv
    )
  else:
    flags.DEFINE_string("codes", None, "Codes .npz written by `encode`.", flag_values=fv)
  return fv


_USAGE = (
  "usage: python -m avtok_jax.tokenize encode --workdir=DIR --input=clip.mp4 --output=codes.npz\n"
  "       python -m avtok_jax.tokenize decode --workdir=DIR --codes=codes.npz --output=clip.mp4"
)


def main(argv: list[str] | None = None) -> int:
  """The command line; errors become one line on stderr and exit status 1 (SystemExit)."""
  from absl import flags

  argv = list(sys.argv if argv is None else argv)
  command = argv[1] if len(argv) > 1 else ""
  if command not in ("encode", "decode"):
    raise SystemExit(f"avtok_jax.tokenize: give a command, encode or decode.\n{_USAGE}")
  fv = _flag_values(command)
  try:
    rest = fv([argv[0], *argv[2:]])
  except flags.Error as e:
    raise SystemExit(f"avtok_jax.tokenize {command}: {e}\n{_USAGE}") from e
  if len(rest) > 1:
    raise SystemExit(f"avtok_jax.tokenize {command}: unexpected arguments {rest[1:]}.\n{_USAGE}")
  needed = ["workdir", "output", "input" if command == "encode" else "codes"]
  absent = [f"--{k}" for k in needed if not fv[k].value]
  if absent:
    raise SystemExit(f"avtok_jax.tokenize {command}: give {', '.join(absent)}.\n{_USAGE}")
  reporting.quiet_library_logs()
  try:
    tok = load_tokenizer(fv.workdir, fv.step)
    if command == "encode":
      video, audio = read_input(
        fv.input,
        tok.data_config,
        start=fv.start,
        short_clip=fv.short_clip,
        missing_audio=fv.missing_audio,
      )
      codes = encode_clip(tok, video, audio)
      save_codes(fv.output, codes, tok, source=os.path.abspath(fv.input))
      print(
        f"Encoded {fv.input} with {tok.workdir} step {tok.step}: "
        f"{tok.num_video_tokens} video + {tok.num_audio_tokens} audio tokens -> {fv.output}"
      )
    else:
      video_codes, audio_codes = load_codes(fv.codes, tok)
      if video_codes.shape[0] != 1:
        raise ValueError(
          f"{fv.codes} holds {video_codes.shape[0]} clips; the CLI decodes one "
          "(decode_codes takes batches)."
        )
      video, wave = decode_codes(tok, video_codes[0], audio_codes[0])
      write_clip(fv.output, video, wave, tok.data_config)
      print(
        f"Decoded {fv.codes} with {tok.workdir} step {tok.step}: {video.shape[0]} frames "
        f"{video.shape[1]}x{video.shape[2]}, {wave.shape[0] / tok.data_config.sample_rate:.3f} s "
        f"of audio ({tok.vocoder}) -> {fv.output}"
      )
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"avtok_jax.tokenize {command}: {e}") from e
  return 0


if __name__ == "__main__":
  sys.exit(main())
