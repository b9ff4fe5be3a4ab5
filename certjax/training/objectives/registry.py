"""The registry of training objectives (`config.objective.name` -> loss function).

An objective is the loss that one training step minimises. The training loop
knows nothing of what happens inside; adversarial, certified and smoothing
objectives plug in here without touching the loop.

Writing one: a factory decorated with `register_objective`, which receives the
objective's hyperparameters (a `ConfigDict` filled from the defaults given at
registration, overridden by `config.objective`) and an `ObjectiveContext`, and
returns a `LossFn`:

    @register_objective("my_loss", defaults={"beta": 1.0})
    def my_loss(hparams, ctx):
      def loss_fn(params, model_state, batch, key, step):
        logits, new_state = ctx.forward(params, model_state, batch["image"], train=True)
        loss = ...
        return loss, (metrics_dict, new_state)
      return loss_fn

`loss_fn` is differentiated with respect to `params` inside a jitted step; it
must be pure and traceable. `metrics_dict` maps names to scalar batch means
(the loop averages them over the logging interval).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

from certjax import validation
from certjax.types import Array, LogitsFn, PRNGKey

# (params, model_state, batch, key, step) -> (loss, (metrics, new_model_state))
LossFn = Callable[[Any, Any, Mapping[str, Array], PRNGKey, Array],
                  tuple[Array, tuple[dict[str, Array], Any]]]
Factory = Callable[[ml_collections.ConfigDict, "ObjectiveContext"], LossFn]


@dataclasses.dataclass(frozen=True)
class ObjectiveContext:
  """What an objective may know about the model and the run.

  Attributes:
    apply_fn: the Flax `model.apply`.
    num_classes: number of classes of the data set.
    total_steps: number of training steps of the whole run (for schedules).
    input_shape: (H, W, C) of one image.
  """
  apply_fn: Callable[..., Any]
  num_classes: int
  total_steps: int
  input_shape: tuple[int, ...]

  def forward(self, params: Any, model_state: Any, x: Array, train: bool
              ) -> tuple[Array, Any]:
    """Logits of the model and its updated non-parameter state (BatchNorm)."""
    variables = {"params": params, **model_state}
    if train and model_state:
      logits, new_state = self.apply_fn(variables, x, train=True,
                                        mutable=list(model_state.keys()))
      return logits, dict(new_state)
    return self.apply_fn(variables, x, train=train), model_state

  def logits_fn(self, params: Any, model_state: Any, train: bool = False) -> LogitsFn:
    """A pure `logits_fn(x)` of the current parameters, e.g. for an attack
    inside the training step. BatchNorm statistics are not updated by it."""
    variables = {"params": params, **model_state}
    if train and model_state:
      return lambda x: self.apply_fn(variables, x, train=True,
                                     mutable=list(model_state.keys()))[0]
    return lambda x: self.apply_fn(variables, x, train=train)


@dataclasses.dataclass(frozen=True)
class _Entry:
  factory: Factory
  defaults: Mapping[str, Any]


_REGISTRY: dict[str, _Entry] = {}


def register_objective(name: str, defaults: Mapping[str, Any] | None = None
                       ) -> Callable[[Factory], Factory]:
  """Decorator registering an objective factory under `name`.

  Args:
    name: the value of `config.objective.name` that selects it.
    defaults: its hyperparameters and their default values; `config.objective`
      may override these and nothing else.
  """
  def decorate(factory: Factory) -> Factory:
    if name in _REGISTRY and _REGISTRY[name].factory is not factory:
      raise ValueError(f"An objective named {name!r} is already registered.")
    _REGISTRY[name] = _Entry(factory, dict(defaults or {}))
    return factory
  return decorate


def objective_names() -> tuple[str, ...]:
  """Names of every registered objective, sorted."""
  return tuple(sorted(_REGISTRY))


def objective_defaults(name: str) -> ml_collections.ConfigDict:
  """The hyperparameters of objective `name` with their defaults (and `name`)."""
  validation.check_choice(name, "objective", objective_names())
  return ml_collections.ConfigDict({"name": name, **_REGISTRY[name].defaults})


def check_objective_config(objective_config: ml_collections.ConfigDict | Mapping[str, Any]
                           ) -> None:
  """Checks the name and hyperparameter keys of `config.objective` (values are
  checked when the objective is built, which needs the run's length).

  Raises:
    ValueError: an unknown objective name or hyperparameter.
  """
  cfg = dict(objective_config)
  name = cfg.pop("name", None)
  validation.check_choice(name, "objective", objective_names())
  defaults = _REGISTRY[name].defaults
  unknown = sorted(set(cfg) - set(defaults))
  if unknown:
    accepted = ", ".join(sorted(defaults)) or "(none)"
    raise ValueError(
        f"Objective {name!r} got unknown hyperparameter(s) {unknown}. "
        f"Accepted: {accepted}.")


def get_objective(objective_config: ml_collections.ConfigDict | Mapping[str, Any],
                  ctx: ObjectiveContext) -> LossFn:
  """Builds the loss function selected by `config.objective`.

  Raises:
    ValueError: for an unknown objective name or a hyperparameter the
      objective does not take (naming the accepted ones).
  """
  check_objective_config(objective_config)
  cfg = dict(objective_config)
  entry = _REGISTRY[cfg.pop("name")]
  hparams = ml_collections.ConfigDict({**entry.defaults, **cfg})
  return entry.factory(hparams, ctx)


def accuracy(logits: Array, labels: Array) -> Array:
  """Fraction of rows whose argmax logit is the label."""
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def cross_entropy(logits: Array, labels: Array, label_smoothing: float = 0.0) -> Array:
  """Mean softmax cross-entropy with optional label smoothing."""
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))
