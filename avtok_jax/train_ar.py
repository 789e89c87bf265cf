"""The AR generator trainer: `run(config, workdir)` for A2V, V2A and joint generation.

`python -m avtok_jax.main --config=configs/ar_a2v.py:small --workdir=DIR
--config.tokens_dir=TOKENS` calls this (main dispatches on
`config.trainer == 'ar'`). It trains `models.generator.Generator` on a token
data set written by `python -m avtok_jax.tokenize_dataset` (AVTOK.md section
5), with the same mesh, checkpointing, resume, progress line, TensorBoard
logs and NaN stop as the tokenizer trainer (`train.py`):

* data: Grain over the token array_record (`data/tokens.py`), checkpointed
  with the model, so a resumed run continues the same data order;
* step: sequences by `ar_tasks` (condition dropout for CFG, token dropout),
  cross-entropy on the generated positions only, AdamW [LARP: (0.9, 0.95),
  lr 6e-4, wd 0.05] with warmup + cosine, global-norm clipping;
* every `sample_every` steps: `num_sample_clips` clips generated with the KV
  cache from held-out conditions, decoded by the tokenizer the token set was
  made with and written as PNG + mp4 with sound to `samples/step_N/`;
* at the end: held-out loss and next-token accuracy on `eval_batches`
  batches of the token set's test split.

State: step, rng (key data), params, opt_state.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from avtok_jax import ar_tasks, checkpointing, config_lib, optimizer, reporting, sharding
from avtok_jax.data import tokens as tokens_lib
from avtok_jax.models import generator as generator_lib

TRAINER = "ar"
# Token data sets are read at these batch sizes per preset; the generator's
# size preset follows the tokenizer preset the tokens come from [ours].
_BATCH = {"tiny": 4, "small": 32, "L": 256}  # L: LARP's generator batch is not public [ours]
_STEPS = {"tiny": 4, "small": 3000, "L": 200_000}
_LR = {"tiny": 1e-3, "small": 1e-3, "L": 6e-4}  # L: [LARP]; small/tiny: [ours] short CPU runs
_PERIODS = {
  "tiny": dict(log_every=1, sample_every=2, checkpoint_every=2),
  "small": dict(log_every=50, sample_every=1000, checkpoint_every=500),
  "L": dict(log_every=100, sample_every=5000, checkpoint_every=2000),
}


def base_config(size: str, task: str) -> ml_collections.ConfigDict:
  """Every field of a generator training config, for a size preset and a task."""
  if task not in ar_tasks.TASKS:
    raise ValueError(f"Unknown generation task {task!r}; choose one of {ar_tasks.TASKS}.")
  c = ml_collections.ConfigDict()
  c.trainer = TRAINER
  c.task = task
  c.size = size
  c.stage = f"ar_{task}"
  c.generator = generator_lib.generator_config(size)
  # Written by `python -m avtok_jax.tokenize_dataset --out=...`; holds
  # tokens.json with the codebook size, code counts, classes and the
  # tokenizer's workdir (used to decode samples).
  c.tokens_dir = ""
  c.train_split, c.eval_split = "train", "test"
  c.batch_size = _BATCH[size]
  c.seed = 0
  c.total_steps = _STEPS[size]
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = _LR[size]
  c.optim.b1, c.optim.b2 = 0.9, 0.95  # AdamW [LARP]
  c.optim.weight_decay = 0.05  # [LARP], on kernels only (optimizer.py)
  c.optim.warmup_steps = c.get_ref("total_steps") // 20  # [ours]
  c.optim.schedule = "cosine"  # [LARP]
  c.optim.min_lr_ratio = 0.1  # [ours]
  c.optim.grad_clip = 1.0  # [ours]
  c.param_rules = ()

  c.token_dropout = 0.1  # [LARP]
  c.condition_dropout = 0.1  # class / condition dropout for CFG [LARP]

  # Sampling of the periodic samples (and the defaults of avtok_jax.generate).
  c.sampling = ml_collections.ConfigDict(
    dict(temperature=1.0, top_k=0, top_p=1.0, cfg_scale=1.0)  # [ours]: plain sampling
  )
  for key, value in _PERIODS[size].items():
    c[key] = value
  c.keep_checkpoints = 3
  c.keep_every = 0
  c.num_sample_clips = 2
  c.eval_batches = 4
  return c


def check_config(config: ml_collections.ConfigDict, meta: Mapping[str, Any]) -> None:
  """One-line errors for generator configs that do not fit the devices or the token set."""
  if not config.tokens_dir:
    raise ValueError(
      "config.tokens_dir is empty: make a token set with `python -m avtok_jax.tokenize_dataset "
      "--workdir=TOKENIZER_DIR --out=DIR` and pass --config.tokens_dir=DIR."
    )
  if config.task not in ar_tasks.TASKS:
    raise ValueError(f"config.task={config.task!r}: choose one of {ar_tasks.TASKS}.")
  if config.task == "joint" and int(meta["num_classes"]) < 1:
    raise ValueError(f"config.task='joint' needs class labels; {config.tokens_dir} has none.")
  for name in ("token_dropout", "condition_dropout"):
    if not 0.0 <= float(config[name]) < 1.0:
      raise ValueError(f"config.{name}={config[name]} must be in [0, 1).")
  check_mesh_fit(config, sharding.make_mesh(dict(config.mesh)), jax.device_count())


def check_mesh_fit(config: ml_collections.ConfigDict, mesh, devices: int) -> None:
  """One-line errors when the batch or the heads do not fit `mesh` (also the memory planner's)."""
  shards = int(mesh.shape["data"]) * int(mesh.shape["fsdp"])
  if config.batch_size % shards:
    raise ValueError(
      f"config.batch_size={config.batch_size} is not divisible by the data-parallel size "
      f"data*fsdp={shards} of config.mesh={dict(config.mesh)} ({devices} devices)."
    )
  if config.generator.width % config.generator.num_heads:
    raise ValueError(
      f"config.generator.width={config.generator.width} is not divisible by "
      f"config.generator.num_heads={config.generator.num_heads}."
    )


class Task:
  """The pieces one task needs, built from the config and the token set's metadata."""

  def __init__(self, config: ml_collections.ConfigDict, meta: Mapping[str, Any]):
    self.config = config
    self.meta = dict(meta)
    self.vocab = generator_lib.Vocab(int(meta["codebook_size"]), int(meta["num_classes"]))
    self.layout = ar_tasks.Layout(
      config.task, int(meta["num_video_tokens"]), int(meta["num_audio_tokens"])
    )
    self.model = generator_lib.build_generator(config.generator, self.vocab, self.layout.length)
    self.loss_mask = ar_tasks.loss_mask(self.layout)

  def init(self, rng: jax.Array) -> dict[str, Any]:
    tokens = jnp.zeros((1, self.layout.length - 1), jnp.int32)
    return self.model.init(rng, tokens)

  def sequences(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    return ar_tasks.build_sequences(
      self.layout, self.vocab, batch["video_codes"], batch["audio_codes"], batch["label"]
    )

  def prompts(self, batch: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
    """(prompts, unconditional prompts) [B, prefix_length] for a batch of conditions."""
    p = ar_tasks.prompts(
      self.layout,
      self.vocab,
      video_codes=batch.get("video_codes"),
      audio_codes=batch.get("audio_codes"),
      label=batch.get("label"),
    )
    return p, ar_tasks.unconditional_prompt(self.layout, self.vocab, p)


def make_train_step(
  config: ml_collections.ConfigDict, task: Task, tx: optax.GradientTransformation
):
  """(state, batch) -> (state, metrics): one AdamW step on the masked next-token loss."""

  def train_step(state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    seq = task.sequences(batch)
    inputs = ar_tasks.corrupt_inputs(
      task.layout,
      task.vocab,
      seq,
      rng,
      token_dropout=float(config.token_dropout),
      condition_dropout=float(config.condition_dropout),
    )
    targets = seq[:, 1:]

    def loss_fn(params):
      logits = task.model.apply({"params": params}, inputs)
      return ar_tasks.cross_entropy(logits, targets, task.loss_mask)

    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {
      "loss": loss,
      "accuracy": accuracy,
      "perplexity": jnp.exp(loss),
      "grad_norm": optax.tree.norm(grads),
      "param_norm": optax.tree.norm(params),
      "update_norm": optax.tree.norm(updates),
      "lr": optimizer.make_schedule(config.optim, config.total_steps)(state["step"]),
    }
    # A non-finite loss leaves the state unchanged (the run stops on the host).
    finite = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    new_state = dict(
      state,
      step=state["step"] + 1,
      params=keep(params, state["params"]),
      opt_state=keep(opt_state, state["opt_state"]),
    )
    return new_state, metrics

  return train_step


def make_eval_step(task: Task):
  """(params, batch) -> (CE, accuracy) on clean sequences (no dropout)."""

  def eval_step(params, batch):
    seq = task.sequences(batch)
    logits = task.model.apply({"params": params}, seq[:, :-1])
    return ar_tasks.cross_entropy(logits, seq[:, 1:], task.loss_mask)

  return eval_step


def _strip_boxes(tree: Any) -> Any:
  return jax.tree.map(
    lambda x: x.value if isinstance(x, nn.Partitioned) else x,
    tree,
    is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )


def make_init_state(task, tx):
  """`init_state(rng_data) -> state`: the generator trainer's train state (boxed params).

  Shared by `run` and the memory planner (`avtok_jax/plan.py`).
  """

  def init_state(rng_data):
    rng = jax.random.wrap_key_data(rng_data)
    params = task.init(rng)["params"]
    return {
      "step": jnp.zeros((), jnp.int32),
      "rng": jax.random.key_data(jax.random.fold_in(rng, 1)),
      "params": params,
      "opt_state": tx.init(params),
    }

  return init_state


def run(
  config: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  *,
  stop_after: int | None = None,
) -> dict[str, float]:
  """Trains a generator in `workdir`; resumes from its latest checkpoint. Returns the last metrics.

  `stop_after`: end this invocation after that step with a checkpoint (as `train.run`).
  """
  workdir = os.fspath(workdir)
  meta = tokens_lib.read_metadata(config.tokens_dir) if config.tokens_dir else {}
  check_config(config, meta)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    config_lib.save_config(config, os.path.join(workdir, config_lib.RUN_CONFIG_FILE))

  mesh = sharding.make_mesh(dict(config.mesh))
  rules = sharding.LOGICAL_AXIS_RULES
  batch_sharding = jax.sharding.NamedSharding(mesh, sharding.logical_spec(("batch",)))
  task = Task(config, meta)
  logging.info(
    "Task %s: sequences of %d tokens (%d given, %d generated), vocabulary %d, mesh %s.",
    config.task,
    task.layout.length,
    task.layout.prefix_length,
    task.layout.num_generated,
    task.vocab.size,
    dict(mesh.shape),
  )
  train_iter = tokens_lib.make_token_iterator(
    config.tokens_dir, config.train_split, config.batch_size, seed=config.seed, shuffle=True
  )

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract_params = _strip_boxes(jax.eval_shape(task.init, jax.random.key(0))["params"])
  tx = optimizer.make_optimizer(
    config.optim, abstract_params, config.param_rules, config.total_steps
  )

  init_state = make_init_state(task, tx)
  rng_data = jax.random.key_data(jax.random.key(config.seed))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract_state = jax.eval_shape(init_state, rng_data)
    state_shardings = sharding.state_shardings(mesh, abstract_state, rules)
    target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      _strip_boxes(abstract_state),
      state_shardings,
    )

  ckpt = checkpointing.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    keep=config.keep_checkpoints,
    keep_every=config.keep_every or None,
  )
  writer = reporting.MetricWriter(workdir)
  start_step = ckpt.latest_step()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    if start_step is not None:
      state, data_state = ckpt.restore(target, step=start_step)
      if data_state is not None:
        train_iter.set_state(data_state)
      logging.info("Resumed from %s at step %d.", ckpt.directory, start_step)
    else:
      state = jax.jit(lambda r: nn.unbox(init_state(r)), out_shardings=state_shardings)(rng_data)
  start = int(state["step"])
  if is_main:
    overview = reporting.parameter_overview(state["params"])
    print(overview)
    writer.write_text(start, {"parameters": overview, "config": str(config)})

  train_step = jax.jit(
    make_train_step(config, task, tx),
    in_shardings=(state_shardings, batch_sharding),
    out_shardings=(state_shardings, None),
    donate_argnums=(0,),
  )
  samples = SampleWriter(config, task, workdir) if is_main and config.num_sample_clips > 0 else None

  progress = reporting.Progress(
    config.total_steps, start_step=start, every=config.log_every, enabled=is_main
  )
  metrics: dict[str, float] = {}
  reporting.compile_count()  # start counting: logged as `compiles`
  timer = time.perf_counter()
  with (
    checkpointing.PreemptionHandler() as preemption,
    jax.set_mesh(mesh),
    nn.logical_axis_rules(rules),
  ):
    for step in range(start, config.total_steps):
      batch = _to_device(next(train_iter), batch_sharding)
      state, device_metrics = train_step(state, batch)
      done = step + 1
      last = done == config.total_steps
      stop = preemption.should_stop(sync=done % config.log_every == 0) or done == stop_after
      if done % config.log_every == 0 or last or stop:
        metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        bad = sorted(k for k, v in metrics.items() if not np.isfinite(v))
        if bad:
          raise FloatingPointError(
            f"Non-finite {bad} at step {done} (that step was not applied); lower config.optim.lr."
          )
        metrics["seconds_per_log_interval"] = time.perf_counter() - timer
        metrics["compiles"] = reporting.compile_count()
        timer = time.perf_counter()
        if last and config.eval_batches > 0:
          metrics.update(evaluate_held_out(config, task, state["params"], batch_sharding))
        writer.write_scalars(done, metrics)
      progress.update(
        done,
        {k: metrics[k] for k in ("loss", "accuracy") if k in metrics}
        if done % config.log_every == 0 or last
        else None,
      )
      if samples is not None and (done % config.sample_every == 0 or last):
        samples.write(state["params"], done)
      if done % config.checkpoint_every == 0 or last or stop:
        ckpt.save(done, state, data_state=train_iter.get_state(), force=True)
      if stop and not last:
        reason = "stop_after" if done == stop_after else "Preemption requested"
        logging.warning("%s: saved step %d, exiting.", reason, done)
        break
  ckpt.close()
  writer.close()
  if is_main:
    scores = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith("eval/"))
    if scores:
      print(f"Held-out next-token figures ({config.eval_split} split): {scores}.")
    print(
      f"Done: {config.stage} at step {int(state['step'])}. Samples in "
      f"{os.path.join(workdir, 'samples')}, TensorBoard logs and metrics.jsonl in {workdir}, "
      f"checkpoints in {ckpt.directory}."
    )
  return metrics


def _to_device(batch: Mapping[str, np.ndarray], batch_sharding) -> dict[str, jax.Array]:
  keep = {k: np.asarray(batch[k]) for k in ("video_codes", "audio_codes", "label")}
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sharding, x), keep)


def evaluate_held_out(config, task: Task, params, batch_sharding) -> dict[str, float]:
  """Mean CE / accuracy / perplexity over `eval_batches` batches of the eval split."""
  it = tokens_lib.make_token_iterator(
    config.tokens_dir, config.eval_split, config.batch_size, seed=0, shuffle=False, num_epochs=1
  )
  eval_step = jax.jit(make_eval_step(task))
  losses, accs = [], []
  for i, batch in enumerate(it):
    if i >= config.eval_batches:
      break
    loss, acc = eval_step(params, _to_device(batch, batch_sharding))
    losses.append(float(loss))
    accs.append(float(acc))
  if not losses:
    return {}
  loss = float(np.mean(losses))
  return {"eval/loss": loss, "eval/accuracy": float(np.mean(accs)), "eval/perplexity": np.exp(loss)}


class SampleWriter:
  """Generates clips from held-out conditions and writes PNG + mp4 (with sound) per step.

  Needs the tokenizer the token set was made with (its workdir is in
  tokens.json); without it (moved or deleted) samples are skipped with one
  warning, training goes on.
  """

  def __init__(self, config, task: Task, workdir: str):
    self.config, self.task = config, task
    self.out_dir = os.path.join(workdir, "samples")
    self.codec = None
    it = tokens_lib.make_token_iterator(
      config.tokens_dir,
      config.eval_split,
      config.num_sample_clips,
      seed=0,
      shuffle=False,
      num_epochs=1,
    )
    self.batch = next(iter(it), None)
    try:
      from avtok_jax.evaluation import generation

      self.codec = generation.Codec(task.meta["tokenizer_workdir"])
    except (FileNotFoundError, ValueError, KeyError) as e:
      logging.warning(
        "Samples skipped: cannot load the tokenizer of %s (%s).", config.tokens_dir, e
      )

  def write(self, params, step: int) -> None:
    if self.codec is None or self.batch is None:
      return
    s = self.config.sampling
    prompt, uncond = self.task.prompts(self.batch)
    generated = sample_codes(
      self.task, params, prompt, uncond, jax.random.key(step), s.temperature, s.top_k, s.top_p,
      s.cfg_scale,
    )  # fmt: skip
    write_generated(
      os.path.join(self.out_dir, f"step_{int(step):07d}"),
      self.task,
      self.codec,
      self.batch,
      generated,
    )


def sample_codes(task: Task, params, prompt, uncond, rng, temperature, top_k, top_p, cfg_scale):
  """{modality: int32 codes} generated after `prompt` (CFG when cfg_scale != 1)."""
  from avtok_jax import sampling

  out = sampling.sample(
    task.model,
    params,
    prompt,
    task.layout.num_generated,
    rng,
    temperature=float(temperature),
    top_k=int(top_k),
    top_p=float(top_p),
    cfg_scale=float(cfg_scale),
    uncond_prompt=uncond if float(cfg_scale) != 1.0 else None,
    allowed=task.vocab.codes,
  )
  return task.layout.split_generated(np.asarray(out))


def write_generated(folder: str, task: Task, codec, batch, generated) -> list[str]:
  """Decodes generated codes into `generated.png` and mp4 files with sound.

  a2v: the generated video with the conditioning clip's sound (decoded from
  its audio codes); v2a: the conditioning video (decoded) with the generated
  sound; joint: both generated. `codec` is an `evaluation.generation.Codec`;
  its `vocode` uses the tokenizer run's vocoder (HiFi-GAN or Griffin-Lim).
  The conditioning clips (decoded) go to `clip{i}_condition.mp4` (a2v, v2a).
  """
  codes = {"video": np.asarray(batch["video_codes"]), "audio": np.asarray(batch["audio_codes"])}
  out = codec.decode(dict(codes, **generated))
  os.makedirs(folder, exist_ok=True)
  reporting.save_png(os.path.join(folder, "generated.png"), reporting.video_grid(out["video"]))
  reporting.save_png(os.path.join(folder, "generated_mel.png"), reporting.mel_grid(out["audio"]))
  waves = codec.vocode(out["audio"])
  paths = []
  if task.layout.task != "joint":
    cond = codec.decode(codes)
    cond_waves = codec.vocode(cond["audio"])
  for i in range(out["video"].shape[0]):
    paths.append(
      codec.write_clip(os.path.join(folder, f"clip{i}_generated.mp4"), out["video"][i], waves[i])
    )
    if task.layout.task != "joint":
      codec.write_clip(
        os.path.join(folder, f"clip{i}_condition.mp4"), cond["video"][i], cond_waves[i]
      )
  return paths
