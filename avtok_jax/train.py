"""The VFAL trainer: `run(config, workdir)`, read top to bottom like a recipe.

One function serves every phase (AVTOK.md section 4): the config says which
streams run (`config.modalities`), which loss terms count
(`config.loss_weights`), which parameters train, freeze or get a learning-rate
multiplier (`config.param_rules`), and where to start (`config.init_from`).

Sections: config checks / mesh / data / model + optimizer / shard / step /
checkpoint / loop. The CLI (`avtok_jax.main`), the tests and the Colab all call
`run`.

State (one pytree, checkpointed whole with the data iterator's state):
  step                int32 scalar
  rng                 uint32 key data (folded with the step inside the step)
  params              tokenizer params + 'video_projector' / 'audio_projector'
  codebook_stats      the quantizer's usage counts (outside `params`)
  opt_state           optax state (frozen parameters have none)
  disc_params, disc_opt_state, lecam_ema   (when config.gan.enabled)
"""

from __future__ import annotations

import functools
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
from jax.experimental import multihost_utils

from avtok_jax import checkpointing, config_lib, losses, optimizer, reporting, sharding
from avtok_jax.data import audio as audio_lib
from avtok_jax.data import patches as patches_lib
from avtok_jax.data import pipeline
from avtok_jax.models import alignment, build_tokenizer, discriminator
from avtok_jax.models import prior as prior_lib
from avtok_jax.models import quantizer as quantizer_lib
from avtok_jax.models import tokenizer as tokenizer_lib
from avtok_jax.pretrained import configured, lpips

PROJECTOR = "{}_projector"


class TrainingError(RuntimeError):
  """Raised when training cannot go on (non-finite loss, bad checkpoint)."""


# ----------------------------------------------------------------------------- config checks


def check_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """One-line errors for config values that do not fit the devices.

  Everything that does not depend on the devices is checked by
  `config_lib.check_train_config`, which `run` calls first.
  """
  devices = num_devices or jax.device_count()
  mesh = dict(config.mesh)
  known = int(np.prod([v for v in mesh.values() if v != -1]))
  if devices % known:
    raise ValueError(f"config.mesh={mesh} does not fit {devices} devices.")
  sizes = {k: (devices // known if v == -1 else v) for k, v in mesh.items()}
  batch_shards = sizes.get("data", 1) * sizes.get("fsdp", 1)
  if config.data.batch_size % batch_shards:
    raise ValueError(
      f"config.data.batch_size={config.data.batch_size} is not divisible by the data-parallel "
      f"size data*fsdp={batch_shards} of config.mesh={mesh}."
    )
  model_shards = sizes.get("model", 1)
  if config.model.codebook_size % model_shards:
    raise ValueError(
      f"config.model.codebook_size={config.model.codebook_size} is not divisible by the "
      f"model axis size {model_shards} of config.mesh={mesh} (the codebook shards over it)."
    )


# ----------------------------------------------------------------------------- model pieces


class Models:
  """The modules of one phase, built from the config (modules never see the config)."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.tokenizer = build_tokenizer(config.model, config.data)
    # Pretrained networks by config alone (`pretrained.configured`): the L_rep
    # teacher ('random' or 'cav_mae') and LPIPS for the perceptual term.
    self.teacher = configured.build_teacher(config)
    self.lpips = configured.load_lpips(config)
    # The projector maps patch-wise tokens into the teacher's feature space [REPA].
    self.projectors = {
      m: alignment.Projector(
        hidden_dim=config.model.align_hidden_dim,
        out_dim=self.teacher.feature_dim,
        dtype=jnp.dtype(config.model.dtype),
      )
      for m in tokenizer_lib.MODALITIES
    }
    channels = tuple(config.gan.channels)
    groups = min(32, channels[0])
    self.discriminators = {
      "video": discriminator.VideoDiscriminator(channels=channels, num_groups=groups),
      "audio": discriminator.MelDiscriminator(channels=channels, num_groups=groups),
    }
    c = config.data
    self.video_shape = (c.num_frames, c.height, c.width, 3)
    self.mel_shape = (c.mel.n_mels, config_lib.num_mel_frames(c))

  @functools.cached_property
  def wave_fn(self):
    """Normalised mel -> waveform for the samples: the configured vocoder, else Griffin-Lim.

    Built on first use, so runs that write no samples (and the planner) never load a vocoder.
    """
    return configured.wave_maker(self.config)

  def unpatchify(self, modality: str, x: jax.Array) -> jax.Array:
    if modality == "video":
      return patches_lib.unpatchify_video(x, self.video_shape, tuple(self.config.data.video_patch))
    return patches_lib.unpatchify_mel(x, self.mel_shape, tuple(self.config.data.mel_patch))

  def init(self, rng: jax.Array) -> dict[str, Any]:
    """Boxed (logically partitioned) variables of every module; no optimizer state."""
    k_tok, k_proj, k_disc = jax.random.split(rng, 3)
    tok = self.tokenizer.init(k_tok, **self.tokenizer.example_inputs(1), train=False)
    params = dict(tok["params"])
    for i, m in enumerate(tokenizer_lib.MODALITIES):
      tokens = jnp.zeros((1, self.tokenizer.num_patches(m), self.config.model.width))
      params[PROJECTOR.format(m)] = self.projectors[m].init(jax.random.fold_in(k_proj, i), tokens)[
        "params"
      ]
    out = {"params": params, "codebook_stats": tok["codebook_stats"]}
    if self.config.gan.enabled:
      out["disc_params"] = {}
      for i, m in enumerate(self.config.gan.modalities):
        shape = self.video_shape if m == "video" else self.mel_shape
        x = jnp.zeros((1, *shape))
        out["disc_params"][m] = self.discriminators[m].init(jax.random.fold_in(k_disc, i), x)[
          "params"
        ]
    return out


def _tokenizer_params(params: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in params.items() if not k.endswith("_projector")}


def _make_disc_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  # Adam(0.5, 0.9) at 3e-5, constant [LARP].
  return optax.adam(config.gan.lr, b1=config.gan.b1, b2=config.gan.b2)


def _strip_boxes(tree: Any) -> Any:
  """Removes Flax partitioning boxes without adding sharding constraints (for abstract trees)."""
  return jax.tree.map(
    lambda x: (
      x.unbox(apply_constraint=False)
      if isinstance(x, nn.Partitioned)
      else x.unbox()
      if isinstance(x, nn.meta.AxisMetadata)
      else x
    ),
    tree,
    is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
  )


def _global_norm(tree: Any) -> jax.Array:
  leaves = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)]
  return jnp.sqrt(sum(leaves)) if leaves else jnp.zeros((), jnp.float32)


# ----------------------------------------------------------------------------- the step


def make_train_step(config, models: Models, tx, disc_tx, trainable):
  """The jitted-to-be train step: (state, batch) -> (state, metrics).

  `trainable` is the static bool tree of `optimizer.trainable_mask`.
  """
  weights = dict(config.loss_weights)
  modalities = tuple(config.modalities)
  gan_modalities = tuple(config.gan.modalities) if config.gan.enabled else ()
  tokenizer = models.tokenizer
  grids = {m: tokenizer.grid(m) for m in modalities}
  stochastic = bool(config.model.stochastic_quantization)
  use_prior = config.model.prior_depth > 0 and weights.get("prior", 0.0) > 0
  use_alignment = weights.get("alignment", 0.0) > 0
  restart_every = _restart_every(config, trainable)

  def inputs_of(batch):
    return {
      "video": batch["video_patches"] if "video" in modalities else None,
      "audio": batch["mel_patches"] if "audio" in modalities else None,
    }

  def targets_of(batch):
    out = {}
    if "video" in modalities:
      out["video"] = tokenizer_lib.to_float_patches(batch["video_patches"])
    if "audio" in modalities:
      out["audio"] = batch["mel_patches"].astype(jnp.float32)
    return out

  def train_step(state, batch):
    step = state["step"]
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    k_sample, k_disc = jax.random.split(rng)
    ss_ratio = prior_lib.scheduled_sampling_ratio(
      step,
      config.total_steps,
      max_ratio=config.prior.ss_max_ratio,
      peak_fraction=config.prior.ss_peak_fraction,
    )
    gan_on = (step >= config.gan.start_step) if gan_modalities else jnp.bool_(False)
    inputs, targets = inputs_of(batch), targets_of(batch)

    def loss_fn(params):
      # Frozen parameters are constants to autodiff, so XLA drops their weight
      # gradients (and whole backward passes: stage 3 never differentiates
      # through the frozen encoder). Their gradient is an exact zero.
      params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)
      outputs, new_vars = tokenizer.apply(
        {"params": _tokenizer_params(params), "codebook_stats": state["codebook_stats"]},
        video_patches=inputs["video"],
        audio_patches=inputs["audio"],
        train=True,
        stochastic=stochastic,
        prior_ss_ratio=ss_ratio,
        run_prior=use_prior,
        rngs={"sample": k_sample},
        mutable=["codebook_stats"],
      )
      terms: dict[str, jax.Array | None] = {}
      fakes = {}
      for m in modalities:
        terms.update(losses.reconstruction(outputs[m]["recon"], targets[m], prefix=m))
      terms["vq"] = losses.vq([outputs[m]["quantizer"] for m in modalities])
      if use_prior:
        terms["prior"] = losses.prior_loss(outputs["prior_logits"], outputs["prior_codes"])
      if use_alignment:
        aligned = []
        for m in modalities:
          pred = models.projectors[m].apply(
            {"params": params[PROJECTOR.format(m)]}, outputs[m]["patch_tokens"]
          )
          raw = models.unpatchify(m, targets[m])
          target = alignment.teacher_targets(models.teacher, m, raw, grids[m])
          aligned.append(losses.alignment(pred, target))
        terms["alignment"] = sum(aligned) / len(aligned)
      if gan_modalities:
        adv = []
        for m in gan_modalities:
          fakes[m] = models.unpatchify(m, outputs[m]["recon"])
          logits = models.discriminators[m].apply({"params": state["disc_params"][m]}, fakes[m])
          adv.append(losses.generator_adversarial(logits))
        # Before gan.start_step the term is computed but weighted 0 (one program).
        terms["gan"] = jnp.where(gan_on, sum(adv) / len(adv), 0.0)
      if "video" in modalities and weights.get("perceptual"):
        # LPIPS(VGG16) on the frames when `config.lpips.weights` is set; without
        # it the term is skipped with a warning (never faked).
        lpips_fn = None
        if models.lpips is not None:
          lpips_fn = functools.partial(lpips.lpips_apply, models.lpips.params)
        terms["perceptual"] = losses.perceptual(
          lpips_fn,
          models.unpatchify("video", outputs["video"]["recon"]),
          models.unpatchify("video", targets["video"]),
        )
      total, logged = losses.combine(terms, weights)
      return total, (logged, new_vars["codebook_stats"], outputs, fakes)

    (_, (logged, codebook_stats, outputs, fakes)), grads = jax.value_and_grad(
      loss_fn, has_aux=True
    )(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optimizer.apply_updates(state["params"], updates, trainable)

    metrics = dict(logged)
    metrics["grad_norm"] = _global_norm(grads)
    metrics["update_norm"] = _global_norm(updates)
    metrics["param_norm"] = _global_norm(params)
    metrics["prior_ss_ratio"] = jnp.asarray(ss_ratio, jnp.float32)
    for m in modalities:
      q = outputs[m]["quantizer"]
      metrics[f"{m}_perplexity"] = q.perplexity
      metrics[f"{m}_batch_usage"] = q.usage
      if m == "video":
        # PSNR of [-1, 1] pixels: peak-to-peak 2, so MAX^2 = 4.
        mse = jnp.mean(jnp.square(outputs[m]["recon"] - targets[m]))
        metrics["video_psnr"] = 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))
    metrics.update(quantizer_lib.usage_metrics(codebook_stats["quantizer"]["counts"]))

    new_state = dict(
      state, step=step + 1, params=params, opt_state=opt_state, codebook_stats=codebook_stats
    )
    if restart_every:
      z = [outputs[m]["quantizer"].z for m in modalities]
      new_state["params"], new_state["restart_counts"], metrics["dead_codes_restarted"] = (
        restart_dead_codes(
          params,
          codebook_stats["quantizer"]["counts"],
          state["restart_counts"],
          jnp.concatenate([x.reshape(-1, x.shape[-1]) for x in z]),
          jax.random.fold_in(rng, 2),
          (step + 1) % restart_every == 0,
        )
      )

    if gan_modalities:

      def disc_loss_fn(disc_params):
        d_terms, lecam_terms, reals, fks = [], [], {}, {}
        for m in gan_modalities:
          d = models.discriminators[m]
          real = d.apply({"params": disc_params[m]}, models.unpatchify(m, targets[m]))
          fake = d.apply({"params": disc_params[m]}, jax.lax.stop_gradient(fakes[m]))
          d_terms.append(losses.discriminator_loss(real, fake))
          ema = state["lecam_ema"][m]
          lecam_terms.append(losses.lecam(real, fake, ema["real"], ema["fake"]))
          reals[m], fks[m] = real, fake
        d_loss = sum(d_terms) / len(d_terms)
        lecam = sum(lecam_terms) / len(lecam_terms)
        return d_loss + weights.get("lecam", 0.0) * lecam, (d_loss, lecam, reals, fks)

      (_, (d_loss, lecam, reals, fks)), d_grads = jax.value_and_grad(disc_loss_fn, has_aux=True)(
        state["disc_params"]
      )
      d_updates, d_opt_state = disc_tx.update(
        d_grads, state["disc_opt_state"], state["disc_params"]
      )
      # The discriminator trains from gan.start_step, every gan.disc_every steps.
      d_on = jnp.logical_and(gan_on, step % config.gan.disc_every == 0)
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(d_on, a, b), new, old)  # noqa: E731
      new_state["disc_params"] = keep(
        optax.apply_updates(state["disc_params"], d_updates), state["disc_params"]
      )
      new_state["disc_opt_state"] = keep(d_opt_state, state["disc_opt_state"])
      new_state["lecam_ema"] = keep(
        {
          m: {
            "real": losses.update_ema(
              state["lecam_ema"][m]["real"], reals[m], config.gan.lecam_decay
            ),
            "fake": losses.update_ema(
              state["lecam_ema"][m]["fake"], fks[m], config.gan.lecam_decay
            ),
          }
          for m in gan_modalities
        },
        state["lecam_ema"],
      )
      metrics["discriminator"] = d_loss
      metrics["lecam"] = lecam

    # A non-finite term must not corrupt the state: keep the old state and
    # report which terms went bad (checked on the host at logging time, so the
    # loop never waits for the device otherwise).
    finite = jnp.all(jnp.stack([jnp.isfinite(v) for v in metrics.values()]))
    new_state = jax.tree.map(
      lambda a, b: jnp.where(finite, a, b), new_state, dict(state, step=step + 1)
    )
    return new_state, metrics

  return train_step


def _restart_every(config, trainable) -> int:
  """Steps between dead-code restarts; 0 where the codebook does not train (stages 2, 3)."""
  return int(config.restart_dead_codes_every) if trainable["quantizer"]["codebook"] else 0


def restart_dead_codes(params, counts, counts_at_last, z, rng, now):
  """Moves the codebook entries unused since the last restart onto encoder outputs.

  The dead-code restart of Jukebox and SoundStream: an entry that no token
  picked in the window gets the value of a random (l2-normalised) encoder
  output `z` [N, code_dim] of this batch, so it is in play again. `counts` is
  the cumulative code histogram, `counts_at_last` its value at the last
  restart; nothing changes unless `now`. Returns (params, counts_at_last, the
  number of entries moved). The Adam moments of moved rows are left as they
  are (their gradient was zero while unused).
  """
  codebook = params["quantizer"]["codebook"]
  dead = jnp.logical_and(now, counts - counts_at_last <= 0)
  pick = jax.random.randint(rng, (codebook.shape[0],), 0, z.shape[0])
  fresh = jnp.take(z, pick, axis=0).astype(codebook.dtype)
  codebook = jnp.where(dead[:, None], fresh, codebook)
  params = dict(params, quantizer=dict(params["quantizer"], codebook=codebook))
  return params, jnp.where(now, counts, counts_at_last), jnp.sum(dead).astype(jnp.float32)


def make_eval_fn(config, models: Models):
  """Eval-mode reconstruction of a batch: {m: (input, recon)} in normalised units."""
  modalities = tuple(config.modalities)

  def eval_fn(params, codebook_stats, batch):
    outputs = models.tokenizer.apply(
      {"params": _tokenizer_params(params), "codebook_stats": codebook_stats},
      video_patches=batch["video_patches"] if "video" in modalities else None,
      audio_patches=batch["mel_patches"] if "audio" in modalities else None,
      train=False,
      run_prior=False,
    )
    out = {}
    if "video" in modalities:
      out["video"] = (
        models.unpatchify("video", tokenizer_lib.to_float_patches(batch["video_patches"])),
        models.unpatchify("video", outputs["video"]["recon"]),
      )
    if "audio" in modalities:
      out["audio"] = (
        models.unpatchify("audio", batch["mel_patches"].astype(jnp.float32)),
        models.unpatchify("audio", outputs["audio"]["recon"]),
      )
    return out

  return eval_fn


# ----------------------------------------------------------------------------- run


def make_init_state(config, models, tx, disc_tx, trainable):
  """`init_state(rng_data) -> state`: the tokenizer trainer's train state from a key's data.

  Boxed (logically named) params and optimizer states, so that `jax.eval_shape`
  of it gives the shardings (`sharding.state_shardings`); `run` and the memory
  planner (`avtok_jax/plan.py`) build the state through this one function.
  """
  restart = _restart_every(config, trainable)

  def init_state(rng_data):
    rng = jax.random.wrap_key_data(rng_data)
    variables = models.init(rng)
    # Optimizer states of boxed params stay boxed, so they shard like the params.
    state = {
      "step": jnp.zeros((), jnp.int32),
      "rng": jax.random.key_data(jax.random.fold_in(rng, 1)),
      "params": variables["params"],
      "codebook_stats": variables["codebook_stats"],
      "opt_state": tx.init(variables["params"]),
    }
    if restart:
      state["restart_counts"] = jnp.zeros_like(
        nn.unbox(variables["codebook_stats"])["quantizer"]["counts"]
      )
    if config.gan.enabled:
      state["disc_params"] = variables["disc_params"]
      state["disc_opt_state"] = disc_tx.init(variables["disc_params"])
      state["lecam_ema"] = {
        m: {"real": jnp.zeros(()), "fake": jnp.zeros(())} for m in config.gan.modalities
      }
    return state

  return init_state


def run(
  config: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  *,
  stop_after: int | None = None,
) -> dict[str, float]:
  """Trains one phase in `workdir`; resumes from its latest checkpoint if there is one.

  `stop_after`: end this invocation after that step with a checkpoint (the
  schedule still runs to `config.total_steps`; rerun to continue), e.g. for a
  queue's time limit. Returns the last logged metrics (floats).
  """
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  config_lib.check_train_config(config)
  check_config(config)
  is_main = jax.process_index() == 0
  if is_main:
    # What `avtok_jax.evaluate` (and a human) reads back: the exact config of the run.
    config_lib.save_config(config, os.path.join(workdir, config_lib.RUN_CONFIG_FILE))

  # --- mesh -------------------------------------------------------------------
  mesh = sharding.make_mesh(dict(config.mesh))
  rules = sharding.LOGICAL_AXIS_RULES
  logging.info(
    "Mesh %s over %d devices (%s).", dict(mesh.shape), mesh.size, jax.devices()[0].platform
  )

  # --- data -------------------------------------------------------------------
  # Only what the stage reads is computed (stage 1: no log-mel).
  train_iter = pipeline.make_iterator(
    config.data,
    config.data.train_split,
    train=True,
    seed=config.seed,
    keys=pipeline.train_keys(config.modalities),
  )
  batch_sharding = jax.sharding.NamedSharding(mesh, sharding.logical_spec(("batch",)))

  # --- model + optimizer --------------------------------------------------------
  models = Models(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract_vars = jax.eval_shape(models.init, jax.random.key(config.seed))
  abstract_params = _strip_boxes(abstract_vars["params"])
  trainable = optimizer.trainable_mask(abstract_params, config.param_rules)
  tx = optimizer.make_optimizer(
    config.optim, abstract_params, config.param_rules, config.total_steps
  )
  disc_tx = _make_disc_optimizer(config) if config.gan.enabled else None

  init_state = make_init_state(config, models, tx, disc_tx, trainable)

  # --- shard --------------------------------------------------------------------
  rng_data = jax.random.key_data(jax.random.key(config.seed))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract_state = jax.eval_shape(init_state, rng_data)
    state_shardings = sharding.state_shardings(mesh, abstract_state, rules)
    abstract_state = _strip_boxes(abstract_state)
    target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state,
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
      if config.init_from:
        state = _init_from_previous_stage(config, state)
  start = int(state["step"])

  reporting.compile_count()  # start counting: logged as `compiles` at every log step
  frozen_checksum = jax.jit(functools.partial(optimizer.frozen_checksum, rules=config.param_rules))
  checksum0 = float(frozen_checksum(state["params"]))
  if is_main:
    overview = reporting.parameter_overview(state["params"])
    print(overview)
    print(optimizer.summarize(state["params"], config.param_rules))
    writer.write_text(start, {"parameters": overview, "config": str(config)})
    logging.info("Frozen-parameter checksum at start: %.9g", checksum0)

  # --- step ---------------------------------------------------------------------
  train_step = jax.jit(
    make_train_step(config, models, tx, disc_tx, trainable),
    in_shardings=(state_shardings, batch_sharding),
    out_shardings=(state_shardings, None),
    donate_argnums=(0,),
  )
  eval_fn = jax.jit(make_eval_fn(config, models))

  # --- loop ---------------------------------------------------------------------
  progress = reporting.Progress(
    config.total_steps, start_step=start, every=config.log_every, enabled=is_main
  )
  metrics: dict[str, float] = {}
  sample_batch = None
  timer = time.perf_counter()
  with (
    checkpointing.PreemptionHandler() as preemption,
    jax.set_mesh(mesh),
    nn.logical_axis_rules(rules),
  ):
    for step in range(start, config.total_steps):
      local = next(train_iter)
      batch = pipeline.to_global_array(local, batch_sharding)
      state, device_metrics = train_step(state, batch)
      done = step + 1
      last = done == config.total_steps
      stop = preemption.should_stop(sync=done % config.log_every == 0) or done == stop_after
      if done % config.log_every == 0 or last or stop:
        metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        _stop_if_not_finite(metrics, done)
        metrics["frozen_checksum"] = float(frozen_checksum(state["params"]))
        elapsed = time.perf_counter() - timer
        timer = time.perf_counter()
        metrics["seconds_per_log_interval"] = elapsed
        metrics["compiles"] = reporting.compile_count()
        if last and config.eval_batches > 0:
          # Logged with the last step's metrics (one record per step).
          metrics.update(evaluate_held_out(config, eval_fn, state, batch_sharding))
        writer.write_scalars(done, metrics)
      progress.update(done, _headline(metrics) if done % config.log_every == 0 or last else None)
      if done % config.sample_every == 0 or last:
        if sample_batch is None:
          sample_batch = _sample_batch(config, batch_sharding)
        _write_samples(config, models, eval_fn, state, sample_batch, workdir, done)
      if done % config.checkpoint_every == 0 or last or stop:
        ckpt.save(done, state, data_state=train_iter.get_state(), force=True)
      if stop and not last:
        reason = "stop_after" if done == stop_after else "Preemption requested"
        logging.warning("%s: saved step %d, exiting.", reason, done)
        break
  ckpt.close()
  writer.close()
  checksum1 = float(frozen_checksum(state["params"]))
  if checksum1 != checksum0:
    raise TrainingError(
      f"Frozen parameters changed during training (checksum {checksum0!r} -> {checksum1!r}); "
      "check config.param_rules."
    )
  if is_main:
    scores = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith("eval/"))
    if scores:
      print(f"Held-out reconstruction ({config.data.eval_split} split): {scores}.")
    print(
      f"Done: {config.stage} at step {int(state['step'])}. Samples in {os.path.join(workdir, 'samples')}, "
      f"TensorBoard logs and metrics.jsonl in {workdir}, checkpoints in {ckpt.directory}."
    )
  return metrics


_HEADLINE = ("loss", "video_l1", "video_psnr", "audio_l1", "prior", "gan", "codebook_usage")


def _headline(metrics: Mapping[str, float]) -> dict[str, float]:
  """The few metrics the progress line shows (all of them go to TensorBoard)."""
  return {k: metrics[k] for k in _HEADLINE if k in metrics}


def _stop_if_not_finite(metrics: Mapping[str, float], step: int) -> None:
  bad = sorted(k for k, v in metrics.items() if not np.isfinite(v))
  if bad:
    raise TrainingError(
      f"Non-finite values at step {step} in {bad} (the step that produced them was not applied). "
      "Lower the learning rate or check the inputs."
    )


def _init_from_previous_stage(config, state):
  """Partial restore of params, codebook statistics and the discriminator from `init_from`."""
  directory = os.path.join(config.init_from, "checkpoints")
  state = dict(state)
  state["params"], restored, fresh = checkpointing.restore_params_partial(
    directory, state["params"]
  )
  if not restored:
    raise TrainingError(
      f"config.init_from={config.init_from!r}: no parameter matched the checkpoint in {directory}."
    )
  state["codebook_stats"], _, _ = checkpointing.restore_params_partial(
    directory, state["codebook_stats"], item_path=("codebook_stats",)
  )
  if "disc_params" in state:
    try:
      state["disc_params"], _, _ = checkpointing.restore_params_partial(
        directory, state["disc_params"], item_path=("disc_params",)
      )
    except (KeyError, ValueError) as e:  # the previous stage had no discriminator
      logging.info("Discriminator starts fresh (%s).", e)
  logging.info(
    "Initialised from %s: %d tensors restored, %d fresh (%s).",
    directory,
    len(restored),
    len(fresh),
    ", ".join(sorted({p.split("/")[0] for p in fresh})) or "none",
  )
  return state


def _fetch_global(tree: Any) -> Any:
  """Host copies of global arrays (and per-process host arrays), gathered over hosts.

  With several processes a global batch spans hosts; process order is the
  global batch order, so a tiled all-gather reassembles it.
  """
  if jax.process_count() > 1:
    tree = multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def evaluate_held_out(config, eval_fn, state, batch_sharding) -> dict[str, float]:
  """Reconstruction quality on up to `config.eval_batches` batches of the eval split.

  Eval mode (argmax codes, no prior). Returns 'eval/video_psnr' (dB on [-1, 1]
  pixels, peak-to-peak 2, so 10 log10(4 / MSE) per clip, averaged over
  clips), 'eval/video_l1' and 'eval/mel_l1' (mean absolute error in the
  normalised [-1, 1] units of the pixels and the log-mel) for the modalities
  the stage runs, and 'eval/clips'. Padding clips of the last batch (mask
  False) are left out. Call inside the mesh and logical-rules context.
  """
  it = pipeline.make_iterator(config.data, config.data.eval_split, train=False, seed=config.seed)
  sums: dict[str, float] = {}
  clips = 0.0
  for _ in range(config.eval_batches):
    try:
      local = next(it)
    except StopIteration:
      break
    batch = pipeline.to_global_array(local, batch_sharding)
    pairs, mask = _fetch_global(
      (eval_fn(state["params"], state["codebook_stats"], batch), np.asarray(local["mask"]))
    )
    mask = np.asarray(mask, np.float64)
    per_clip = {}
    if "video" in pairs:
      x, y = (np.asarray(a, np.float64) for a in pairs["video"])
      err = (y - x).reshape(len(x), -1)
      per_clip["eval/video_psnr"] = 10.0 * np.log10(4.0 / np.maximum(np.mean(err**2, 1), 1e-10))
      per_clip["eval/video_l1"] = np.mean(np.abs(err), 1)
    if "audio" in pairs:
      x, y = (np.asarray(a, np.float64) for a in pairs["audio"])
      per_clip["eval/mel_l1"] = np.mean(np.abs(y - x).reshape(len(x), -1), 1)
    for k, v in per_clip.items():
      sums[k] = sums.get(k, 0.0) + float(np.sum(v * mask))
    clips += float(mask.sum())
  out = {k: v / max(clips, 1.0) for k, v in sums.items()}
  out["eval/clips"] = clips
  return out


def _sample_batch(config, batch_sharding):
  """The first batch of the eval split as a global array: the clips `_write_samples` shows.

  Held out, and the same clips at every sample step, so that the pictures of
  different steps compare. It has the log-mel whatever the stage trains (its
  input clips carry their sound), which a video-only stage's training batches
  do not (`pipeline.train_keys`). Read in this process (num_workers=0): one
  batch, no worker start-up.
  """
  data = config.data.copy_and_resolve_references()
  data.num_workers = 0
  it = pipeline.make_iterator(data, data.eval_split, train=False, seed=config.seed)
  local = next(it)
  return pipeline.to_global_array({k: local[k] for k in pipeline.TRAIN_KEYS}, batch_sharding)


def _write_samples(config, models, eval_fn, state, batch, workdir, step):
  """Input vs reconstruction pictures and mp4 files with sound (written by process 0).

  `batch`: `_sample_batch`. Every process runs the eval step (the batch is a
  global array); only process 0 writes. The input clips carry the input
  mel's sound even in stage 1, where the model reconstructs video only.
  """
  n = min(config.num_sample_clips, config.data.batch_size)
  small = jax.tree.map(lambda x: x[:n], batch)
  pairs = eval_fn(state["params"], state["codebook_stats"], small)
  mel_in = models.unpatchify("audio", small["mel_patches"].astype(jnp.float32))
  pairs, mel_in = _fetch_global((pairs, mel_in))
  kwargs = {"mel_in": mel_in, "mel_spec": audio_lib.MelSpec.from_config(config.data)}
  if "video" in pairs:
    kwargs["video_in"], kwargs["video_out"] = pairs["video"]
  if "audio" in pairs:
    kwargs["mel_out"] = pairs["audio"][1]
  reporting.write_samples(
    os.path.join(workdir, "samples"),
    step,
    fps=config_lib.fps(config.data),
    sample_rate=config.data.sample_rate,
    enabled=jax.process_index() == 0,
    wave_fn=models.wave_fn,
    **kwargs,
  )
