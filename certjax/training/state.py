"""The training state and one optimizer step, shared by the single- and many-models trainers."""

from __future__ import annotations

from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import optax
from absl import logging

from certjax import models as models_lib
from certjax import runs
from certjax.runs import signing as signing_lib
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


def create_train_state(config, model, tx, info, key) -> TrainState:
  variables = models_lib.init_variables(model, key, (1, *info.image_shape))
  variables = dict(variables)
  params = variables.pop("params")
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    model_state=variables, opt_state=tx.init(params))


def train_step_fn(loss_fn, tx):
  """`train_step(state, batch, key) -> (state, metrics)`, not jitted (the
  many-models trainer vmaps it over models); the step key is
  `fold_in(key, state.step)`."""

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

  return train_step


def all_finite(tree) -> bool:
  """Whether every floating leaf of `tree` is finite (fetched as one boolean)."""
  leaves = jax.tree.leaves(tree)
  return bool(jax.device_get(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves
                                                if jnp.issubdtype(x.dtype, jnp.inexact)]))))


def signing_policy(config: Any) -> signing_lib.SigningPolicy:
  """The signing policy of a training run; a required signature without a key is an error."""
  signer = signing_lib.policy_from_config(config, sign=True)
  if signer.require and not signer.key:
    raise ValueError(
        "signing.require (or $CERTJAX_REQUIRE_SIGNED) is set but there is no signing key: "
        "this run's checkpoints could not be restored. Set signing.key or "
        "$CERTJAX_SIGNING_KEY (python -m launch.sign keygen makes a key).")
  if not signer.key:
    logging.info("Checkpoints of this run are written unsigned (no signing.key or "
                 "$CERTJAX_SIGNING_KEY; python -m launch.sign keygen makes a key).")
  return signer


def model_and_objective(config: Any, info: Any, total_steps: int):
  """(model, optax transformation, learning-rate schedule, loss_fn) of a run's config."""
  model = runs.build_model(config, info)
  tx, schedule = optim.make_optimizer(config.optimizer, total_steps)
  ctx = objectives_lib.ObjectiveContext(
      apply_fn=model.apply, num_classes=info.num_classes, total_steps=total_steps,
      input_shape=tuple(info.image_shape))
  return model, tx, schedule, objectives_lib.get_objective(config.objective, ctx)
