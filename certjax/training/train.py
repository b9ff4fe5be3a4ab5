"""`train_and_evaluate(config, workdir)`: the data-parallel training loop.

The loop is generic: the data set, model, objective and optimizer all come from
the config by name. It runs data-parallel over every device of every host
(`certjax.parallel`), resumes from the newest checkpoint in the workdir, writes
metrics as JSON lines and TensorBoard events, and is reproducible from
`config.seed` (data order, augmentation, initialisation and per-step keys are
all derived from it, so a resumed run continues exactly where it stopped).

Evaluators run inside the loop as `config.evals` lists them (big_vision's
`train.py` does the same): e.g. verified accuracy every 500 steps of IBP
training, PGD robust accuracy during PGD-AT, certified accuracy at the end of
noise training. Their metrics are logged with the others (split
`evals/<name>`) and their files written to `<workdir>/evals/<name>/<step>/`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from certjax import data as data_lib
from certjax import evaluation
from certjax import keys
from certjax import models as models_lib
from certjax import parallel
from certjax import runs
from certjax.runs import checkpoints as ckpt_lib
from certjax.runs import provenance as provenance_lib
from certjax.training import config as config_lib
from certjax.training import metrics as metrics_lib
from certjax.training import many as many_lib
from certjax.training import poison as poison_lib
from certjax.training import state as state_lib
from certjax.training.state import TrainState, create_train_state, train_step_fn

# `load_trained` and `build_model` live below both training and evaluation;
# re-exported here for callers that know them from this module.
load_trained = runs.load_trained
build_model = runs.build_model


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


def make_train_step(loss_fn, tx, mesh):
  """The jitted, data-parallel training step (state donated)."""
  repl, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(train_step_fn(loss_fn, tx), in_shardings=(repl, sharded, repl),
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


@dataclasses.dataclass
class _PeriodicEval:
  """One entry of `config.evals`: an evaluator, how often, on which images."""
  name: str
  kind: str
  every_steps: int
  evaluate: evaluation.Evaluator
  data: evaluation.EvalData

  def due(self, step: int, total_steps: int) -> bool:
    return step == total_steps or bool(self.every_steps and step % self.every_steps == 0)


@dataclasses.dataclass
class PeriodicEvals:
  """The evaluators of `config.evals`, built (and so validated) before training starts.

  What every evaluation shares is made once: the result files' metadata and,
  when an evaluator must compute in float32 and the model does not, the
  float32 twin of the model (one module, so its compiled programs are reused
  from one evaluation to the next).
  """
  evals: list[_PeriodicEval]
  metadata: dict[str, Any]
  float32_apply_fn: Any

  @classmethod
  def build(cls, config: ml_collections.ConfigDict, info: data_lib.DatasetInfo,
            workdir: str) -> "PeriodicEvals":
    evals = []
    for name, entry in config_lib.validate_evals(config).items():
      split = entry.settings.split or config.data.eval_split
      data = evaluation.EvalData.from_config(config.data, split, entry.skip, entry.max)
      evaluate = evaluation.get_evaluator(entry.kind, entry.settings, info.num_classes,
                                          run_config=config, where=f"evals.{name}")
      evals.append(_PeriodicEval(name, entry.kind, entry.every_steps, evaluate, data))
    float32_apply_fn = None
    if config.compute_dtype != "float32" and any(
        evaluation.get_spec(ev.kind).float32 for ev in evals):
      float32_apply_fn = runs.build_model(config, info, compute_dtype="float32").apply
    return cls(evals, evaluation.workdir.run_metadata(config, workdir), float32_apply_fn)

  def run(self, step: int, total_steps: int, model: Any, variables: Any,
          info: data_lib.DatasetInfo, workdir: str,
          writer: metrics_lib.MetricWriter) -> dict[str, dict[str, float]]:
    """Runs the evaluators due at `step` on the current variables; logs their metrics."""
    results = {}
    for ev in self.evals:
      if not ev.due(step, total_steps):
        continue
      ctx = evaluation.EvalContext(
          apply_fn=model.apply, variables=variables, data=ev.data,
          num_classes=info.num_classes, step=step,
          output_dir=os.path.join(workdir, "evals", ev.name, str(step)),
          metadata=self.metadata, float32_apply_fn=self.float32_apply_fn, resume=False,
          verbose=False)
      tic = time.perf_counter()
      result = ev.evaluate(ctx)
      metrics = {**result.metrics, "seconds": time.perf_counter() - tic}
      writer.write(step, f"evals/{ev.name}", metrics)
      logging.info("evals/%s (%s) at step %d: %s", ev.name, ev.kind, step, ", ".join(
          f"{k} {v:.4g}" for k, v in result.metrics.items()))
      results[ev.name] = metrics
    return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
  """Trains the configured model, checkpointing to and resuming from `workdir`.

  Args:
    config: a training config (see `certjax.training.config.base_config` for
      every key); usually one of `configs/*.py`.
    workdir: directory for checkpoints, metrics and config.json. A workdir
      holding checkpoints of the same config resumes from the newest one.

  Returns:
    A `TrainResult` with the final state, model and clean eval metrics (and
    the last metrics of every `config.evals` entry, under 'evals/<name>/...').

  Raises:
    ValueError: for an invalid config (unknown keys or names, bad values).
    FloatingPointError: if the loss or parameters become NaN/Inf; no
      checkpoint is written from such a state.
  """
  config_lib.validate_config(config)
  config = config_lib.with_defaults(config)
  # A poisoned run trains on its recorded poison (config.data.replace_file).
  config = poison_lib.prepare(config, workdir)
  if config_lib.is_many_models(config):
    return many_lib.train_many(config, workdir)
  info = data_lib.get_info(config.data)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh, "batch_size")
  parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  if config.batch_size > info.num_train:
    raise ValueError(f"batch_size={config.batch_size} exceeds the {info.num_train} "
                     f"training examples of {info.name!r}.")
  total_steps = total_train_steps(config, info)
  model, tx, schedule, loss_fn = state_lib.model_and_objective(config, info, total_steps)
  periodic_evals = PeriodicEvals.build(config, info, workdir)

  # Named streams: no evaluator's key (certification noise, attacks) can
  # equal a training key, whatever the seeds (certjax.keys).
  init_key = keys.stream_key(int(config.seed), keys.TRAINING_INIT)
  train_key = keys.stream_key(int(config.seed), keys.TRAINING_STEPS)
  state = jax.jit(functools.partial(create_train_state, config, model, tx, info),
                  out_shardings=parallel.replicated(mesh))(init_key)

  # The signing key and the trusted keys (config.signing, the environment,
  # the trust store): a bad key file stops the run before anything is written.
  signer = state_lib.signing_policy(config)
  ckpt_lib.write_config(workdir, config)
  manager = ckpt_lib.make_manager(workdir, keep=config.keep_checkpoints)
  # The newest checkpoint is verified against its signature before it is read.
  resumed = ckpt_lib.resume(manager, state, signer)
  if resumed.state is not None:
    state = parallel.replicate(resumed.state, mesh)
    logging.info("Resumed from checkpoint at step %d in %s", int(state.step),
                 manager.directory)
  start_step = int(state.step)
  if jax.process_index() == 0:
    provenance_lib.append_training_entry(workdir, provenance_lib.training_entry(
        config, workdir, start_step=start_step, total_steps=total_steps,
        resumed_from=resumed.checkpoint, signing=signer.describe(),
        hash_train_examples=config.provenance.hash_train_examples))
  signed: dict[int, str] = {}  # step -> sha256 of the signed contents, for provenance.json

  train_step = make_train_step(loss_fn, tx, mesh)
  eval_step = make_eval_step(model, mesh)
  # Records a killed run logged after its last checkpoint are dropped: the
  # resumed run logs those steps again.
  writer = metrics_lib.MetricWriter(workdir, resume_step=start_step)
  progress = runs.Progress(total_steps, config.batch_size, start_step)
  batches: Iterator[dict] = data_lib.train_batches(
      config.data, batch_size=config.batch_size, seed=config.seed, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count())

  def save(state: TrainState, step: int) -> None:
    if not state_lib.all_finite(state.params):
      raise FloatingPointError(
          f"Parameters contain NaN/Inf at step {step}; not writing a checkpoint, the "
          "existing ones are kept. Lower optimizer.learning_rate or set "
          "optimizer.grad_clip_norm.")
    record = ckpt_lib.save_checkpoint(manager, step, state, signer)  # signed on process 0
    if record is not None:
      signed[step] = record["sha256"]

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
      metrics_lib.log_training_interval(writer, progress, step, history,
                                        float(schedule(step - 1)))
      history = []
    if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
      save(state, step)
    if (config.eval_every_steps and step % config.eval_every_steps == 0
        and step != total_steps):
      eval_metrics = evaluate(eval_step, state.variables, config, mesh)
      writer.write(step, "eval", eval_metrics)
      logging.info("eval at step %d: accuracy %.4f, loss %.4f", step,
                   eval_metrics["accuracy"], eval_metrics["loss"])
    if step != total_steps:
      periodic_evals.run(step, total_steps, model, state.variables, info, workdir, writer)

  if manager.latest_step() != total_steps:
    save(state, total_steps)
  manager.wait_until_finished()
  if jax.process_index() == 0:
    provenance_lib.finish_training_entry(workdir, end_step=total_steps, checkpoints=signed)
  eval_metrics = evaluate(eval_step, state.variables, config, mesh)
  writer.write(total_steps, "eval", eval_metrics)
  for name, metrics in periodic_evals.run(total_steps, total_steps, model, state.variables,
                                         info, workdir, writer).items():
    eval_metrics.update({f"evals/{name}/{k}": v for k, v in metrics.items()})
  writer.close()
  logging.info("Finished %d steps in %.1f s; eval accuracy %.4f on %d examples",
               total_steps - start_step, time.perf_counter() - start_time,
               eval_metrics["accuracy"], int(eval_metrics["num_examples"]))
  return TrainResult(state=state, model=model, info=info, eval_metrics=eval_metrics,
                     workdir=workdir)
