"""`train_and_evaluate(config, workdir)`: the data-parallel training loop.

The loop is generic: the data set, model, objective and optimizer all come from
the config by name. It runs data-parallel over every device of every host
(`certjax.parallel`), resumes from the newest checkpoint in the workdir, writes
metrics as JSON lines and TensorBoard events, and is reproducible from
`config.seed` (data order, augmentation, initialisation and per-step keys are
all derived from it, so a resumed run continues exactly where it stopped).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Iterator, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from certjax import data as data_lib
from certjax import models as models_lib
from certjax import parallel
from certjax.training import checkpoints as ckpt_lib
from certjax.training import config as config_lib
from certjax.training import metrics as metrics_lib
from certjax.training import objectives as objectives_lib
from certjax.training import optim
from certjax.types import Array


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds; a pytree.

  Attributes:
    step: number of optimizer steps taken.
    params: the model's parameters.
    model_state: non-parameter variable collections (e.g. {'batch_stats': ...}).
    opt_state: the optax optimizer state.
  """
  step: Array
  params: Any
  model_state: Any
  opt_state: Any

  @property
  def variables(self) -> dict[str, Any]:
    return {"params": self.params, **self.model_state}


@dataclasses.dataclass
class TrainResult:
  """What `train_and_evaluate` returns, for notebooks and scripts."""
  state: TrainState
  model: Any
  info: data_lib.DatasetInfo
  eval_metrics: dict[str, float]
  workdir: str

  def logits_fn(self):
    return models_lib.make_logits_fn(self.model, jax.device_get(self.state.variables))


def total_train_steps(config: ml_collections.ConfigDict, info: data_lib.DatasetInfo) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return max(1, int(np.ceil(config.num_epochs * info.num_train / config.batch_size)))


def build_model(config: ml_collections.ConfigDict, info: data_lib.DatasetInfo):
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.compute_dtype]
  return models_lib.get_model(
      config.model.name, num_classes=info.num_classes, mean=info.mean, std=info.std,
      dtype=dtype, conv_impl=config.model.get("conv_impl", "xla"),
      **dict(config.model.kwargs))


def create_train_state(config, model, tx, info, key) -> TrainState:
  variables = models_lib.init_variables(model, key, (1, *info.image_shape))
  variables = dict(variables)
  params = variables.pop("params")
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    model_state=variables, opt_state=tx.init(params))


def make_train_step(loss_fn, tx, mesh):
  """The jitted, data-parallel training step (state donated)."""

  def train_step(state: TrainState, batch: Mapping[str, Array], key: Array):
    step_key = jax.random.fold_in(key, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (metrics, new_model_state)), grads = grad_fn(
        state.params, state.model_state, batch, step_key, state.step)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
    new_state = state.replace(step=state.step + 1, params=params,
                              model_state=new_model_state, opt_state=opt_state)
    return new_state, metrics

  repl, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(train_step, in_shardings=(repl, sharded, repl),
                 out_shardings=(repl, repl), donate_argnums=(0,))


def make_eval_step(model, mesh):
  """Sums of correct predictions, loss and count over the real (unpadded) examples."""

  def eval_step(variables, batch):
    logits = model.apply(variables, batch["image"], train=False).astype(jnp.float32)
    mask = batch["mask"].astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"correct": jnp.sum(correct * mask), "loss": jnp.sum(loss * mask),
            "count": jnp.sum(mask)}

  repl, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(eval_step, in_shardings=(repl, sharded), out_shardings=repl)


def evaluate(eval_step, variables, config, mesh) -> dict[str, float]:
  """Clean accuracy and loss over the whole eval split, each example once."""
  totals = {"correct": 0.0, "loss": 0.0, "count": 0.0}
  sums = []
  for batch in data_lib.eval_batches(
      config.data, batch_size=config.eval_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count()):
    sums.append(eval_step(variables, parallel.host_to_global(batch, mesh)))
  for s in jax.device_get(sums):
    for k in totals:
      totals[k] += float(s[k])
  count = max(totals["count"], 1.0)
  return {"accuracy": totals["correct"] / count, "loss": totals["loss"] / count,
          "num_examples": totals["count"]}


def _all_finite(tree) -> bool:
  leaves = jax.tree.leaves(tree)
  return bool(jax.device_get(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves
                                                if jnp.issubdtype(x.dtype, jnp.inexact)]))))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
  """Trains the configured model, checkpointing to and resuming from `workdir`.

  Args:
    config: a training config (see `certjax.training.config.base_config` for
      every key); usually one of `configs/*.py`.
    workdir: directory for checkpoints, metrics and config.json. A workdir
      holding checkpoints of the same config resumes from the newest one.

  Returns:
    A `TrainResult` with the final state, model and clean eval metrics.

  Raises:
    ValueError: for an invalid config (unknown keys or names, bad values).
    FloatingPointError: if the loss or parameters become NaN/Inf; no
      checkpoint is written from such a state.
  """
  config_lib.validate_config(config)
  config = config_lib.with_defaults(config)
  info = data_lib.get_info(config.data)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh, "batch_size")
  parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  if config.batch_size > info.num_train:
    raise ValueError(f"batch_size={config.batch_size} exceeds the {info.num_train} "
                     f"training examples of {info.name!r}.")
  total_steps = total_train_steps(config, info)
  model = build_model(config, info)
  tx, schedule = optim.make_optimizer(config.optimizer, total_steps)
  ctx = objectives_lib.ObjectiveContext(
      apply_fn=model.apply, num_classes=info.num_classes, total_steps=total_steps,
      input_shape=tuple(info.image_shape))
  loss_fn = objectives_lib.get_objective(config.objective, ctx)

  root_key = jax.random.key(config.seed)
  init_key, train_key = jax.random.split(root_key)
  state = jax.jit(functools.partial(create_train_state, config, model, tx, info),
                  out_shardings=parallel.replicated(mesh))(init_key)

  ckpt_lib.write_config(workdir, config)
  manager = ckpt_lib.make_manager(workdir, keep=config.keep_checkpoints)
  restored = ckpt_lib.restore_latest(manager, state)
  if restored is not None:
    state = parallel.replicate(restored, mesh)
    logging.info("Resumed from checkpoint at step %d in %s", int(state.step),
                 manager.directory)
  start_step = int(state.step)

  train_step = make_train_step(loss_fn, tx, mesh)
  eval_step = make_eval_step(model, mesh)
  writer = metrics_lib.MetricWriter(workdir)
  progress = metrics_lib.Progress(total_steps, config.batch_size, start_step)
  batches: Iterator[dict] = data_lib.train_batches(
      config.data, batch_size=config.batch_size, seed=config.seed, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count())

  def save(state: TrainState, step: int) -> None:
    if not _all_finite(state.params):
      raise FloatingPointError(
          f"Parameters contain NaN/Inf at step {step}; not writing a checkpoint, the "
          "existing ones are kept. Lower optimizer.learning_rate or set "
          "optimizer.grad_clip_norm.")
    manager.save(step, args=ocp.args.StandardSave(state))

  history = []
  eval_metrics: dict[str, float] = {}
  logging.info("Training %s on %s for %d steps (batch %d, %d device(s), %s)",
               config.model.name, info.name, total_steps, config.batch_size,
               mesh.devices.size, config.objective.name)
  start_time = time.perf_counter()
  for step in range(start_step + 1, total_steps + 1):
    batch = parallel.host_to_global(next(batches), mesh)
    state, step_metrics = train_step(state, batch, train_key)
    history.append(step_metrics)
    if step % config.log_every_steps == 0 or step == total_steps:
      train_metrics = metrics_lib.mean_metrics(history)
      history = []
      if not np.isfinite(train_metrics["loss"]):
        raise FloatingPointError(
            f"Training loss is {train_metrics['loss']} at step {step}; stopping without "
            "writing a checkpoint (existing ones are kept). Lower "
            "optimizer.learning_rate or set optimizer.grad_clip_norm.")
      train_metrics["learning_rate"] = float(schedule(step - 1))
      rates = progress.update(step)
      writer.write(step, "train", {**train_metrics, **rates})
      logging.info("%s", progress.line(step, rates, {
          "loss": train_metrics["loss"], "acc": train_metrics.get("accuracy", np.nan)}))
    if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
      save(state, step)
    if (config.eval_every_steps and step % config.eval_every_steps == 0
        and step != total_steps):
      eval_metrics = evaluate(eval_step, state.variables, config, mesh)
      writer.write(step, "eval", eval_metrics)
      logging.info("eval at step %d: accuracy %.4f, loss %.4f", step,
                   eval_metrics["accuracy"], eval_metrics["loss"])

  if manager.latest_step() != total_steps:
    save(state, total_steps)
  manager.wait_until_finished()
  eval_metrics = evaluate(eval_step, state.variables, config, mesh)
  writer.write(total_steps, "eval", eval_metrics)
  writer.close()
  logging.info("Finished %d steps in %.1f s; eval accuracy %.4f on %d examples",
               total_steps - start_step, time.perf_counter() - start_time,
               eval_metrics["accuracy"], int(eval_metrics["num_examples"]))
  return TrainResult(state=state, model=model, info=info, eval_metrics=eval_metrics,
                     workdir=workdir)


def load_trained(workdir: str, step: int | None = None,
                 config: ml_collections.ConfigDict | None = None):
  """Restores a trained model from a workdir written by `train_and_evaluate`.

  Args:
    workdir: the run's workdir (holds config.json and checkpoints/).
    step: checkpoint step to load; the newest when None.
    config: the config to build the model from (e.g. the launch script's
      --config with evaluation overrides); the workdir's config.json if None.

  Returns:
    (model, variables, config, info): `models.make_logits_fn(model, variables)`
    gives the pure logits function attacks, bounds and smoothing take.
  """
  if config is None:
    config = ckpt_lib.read_config(workdir)
  config = config_lib.with_defaults(config)
  info = data_lib.get_info(config.data)
  model = build_model(config, info)
  abstract = jax.eval_shape(
      functools.partial(models_lib.init_variables, model, input_shape=(1, *info.image_shape)),
      jax.random.key(0))
  manager = ckpt_lib.make_manager(workdir, keep=config.keep_checkpoints, read_only=True)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(
        f"No checkpoint in {manager.directory}: train first with "
        "python -m launch.train --config=... --workdir=<the same workdir>.")
  # Only the model's variables are needed: restoring the checkpoint as saved
  # (not into a TrainState) lets evaluation configs differ in the optimizer.
  saved = manager.restore(step, args=ocp.args.StandardRestore())
  variables = {"params": saved["params"], **saved["model_state"]}
  expected = jax.tree.map(lambda a: tuple(a.shape), dict(abstract))
  found = jax.tree.map(lambda a: tuple(a.shape), variables)
  if expected != found:
    raise ValueError(
        f"The checkpoint at step {step} in {manager.directory} holds variables that do "
        f"not fit model {config.model.name!r} built from this config (different model "
        "or model.kwargs?).")
  return model, variables, config, info
