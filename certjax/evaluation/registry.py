"""Evaluators looked up by name: the protocol every evaluation family implements.

An evaluator measures one property of a trained model on a selection of
examples (robust accuracy under attacks, verified accuracy under bounds,
certified accuracy under randomized smoothing, and the families to come:
membership inference, backdoor success rate, extraction fidelity, ...). It
is registered once with its settings and their defaults:

    @register_evaluator("robust", section="attack", default_config=default_config)
    def build(settings, setup):            # validates settings, up front
      def evaluate(ctx: EvalContext) -> EvalResult:
        ...
      return evaluate

and run three ways, all through this registry (big_vision's
`evaluators/common.py` is the model):

  * alone on a trained workdir: `python -m launch.evaluate --evaluator=robust`
    (`certjax.evaluation.evaluate_workdir`), or its aliases `launch.attack`,
    `launch.verify`, `launch.certify`; the settings are the config's section
    (`config.attack`, ...);
  * periodically inside `train_and_evaluate`: `config.evals` lists
    `{type, every_steps, ...settings}`;
  * from a notebook on any `logits_fn` and arrays (`EvalContext.from_arrays`).

Evaluators never import the training loop: what they need from a workdir
(restoring a model onto the current mesh) lives in `certjax.runs`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Protocol

import ml_collections
import numpy as np

from certjax import data as data_lib
from certjax import validation
from certjax.types import LogitsFn


@dataclasses.dataclass(frozen=True)
class EvalData:
  """The examples an evaluator runs on.

  Attributes:
    indices: dataset indices of the selected examples, in order (the keys of
      randomised evaluators and the rows of result files derive from them).
    load: `load(dataset_indices) -> (images [N, H, W, C] float32 in [0, 1],
      labels int32 [N])` for any subset of `indices`; each host loads only its
      share.
    name: the data set's name (for result files).
    split: the split's name.
  """
  indices: np.ndarray
  load: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
  name: str = "arrays"
  split: str = ""

  @classmethod
  def from_arrays(cls, x: Any, y: Any, indices: Any = None, *, name: str = "arrays",
                  split: str = "") -> "EvalData":
    """Examples held in memory; `indices` (default 0..N-1) are their dataset indices."""
    x, y = np.asarray(x), np.asarray(y)
    if x.shape[:1] != y.shape[:1]:
      raise ValueError(f"x and y must hold the same number of examples; got {x.shape[0]} "
                       f"images and {y.shape[0]} labels.")
    indices = np.arange(len(y)) if indices is None else np.asarray(indices, np.int64)
    if indices.shape != (len(y),):
      raise ValueError(f"indices must have one entry per example ({len(y)}); got shape "
                       f"{indices.shape}.")
    position = {int(i): p for p, i in enumerate(indices)}

    def load(subset):
      rows = np.asarray([position[int(i)] for i in np.asarray(subset).reshape(-1)], np.int64)
      return x[rows], y[rows]

    return cls(indices, load, name, split)

  @classmethod
  def from_config(cls, data_config: Any, split: str, skip: int = 1,
                  max_index: int = -1) -> "EvalData":
    """Every `skip`-th example of a split below index `max_index` (-1: all), as
    Cohen et al.'s certify.py selects them; loaded through `certjax.data`."""
    validation.check_int_at_least(skip, "skip", 1)
    validation.check_int_at_least(max_index, "max", -1)
    indices = data_lib.select_split_indices(data_config, split, int(skip), int(max_index))
    name = data_config.get("name", "?") if hasattr(data_config, "get") else "?"
    return cls(indices, functools.partial(data_lib.load_examples, data_config, split),
               str(name), split)


@dataclasses.dataclass(frozen=True)
class EvalContext:
  """Everything an evaluator may know about the model and the run.

  Attributes:
    apply_fn: `apply_fn(variables, x, train=False) -> logits` (a Flax
      `model.apply`); with `variables` it is the model under evaluation.
      Evaluators pass `variables` to their compiled functions as arguments,
      so repeated evaluations during training compile once.
    variables: the model's variables (host or device arrays).
    data: the examples (`EvalData`).
    num_classes: number of classes.
    step: the training step (checkpoint) evaluated.
    output_dir: where the evaluator writes its files; None writes nothing.
    metadata: names written into result files (model, dataset, objective,
      workdir, ...).
    float32_apply_fn: the same model computing in float32, for evaluators
      whose answers must not suffer bfloat16 rounding (bound propagation);
      None when `apply_fn` already computes in float32.
    resume: continue an interrupted run from its log in `output_dir`.
    verbose: print progress lines.
    members: for evaluators of many-models runs (`EvaluatorSpec.many_models`):
      bool [K, len(data.indices)], whether model k trained on each example
      of `data`; `variables` then has a leading model axis K. None otherwise.
  """
  apply_fn: Callable[..., Any]
  variables: Any
  data: EvalData
  num_classes: int
  step: int = 0
  output_dir: str | None = None
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  float32_apply_fn: Callable[..., Any] | None = None
  resume: bool = True
  verbose: bool = True
  members: Any = None

  def logits_fn(self, float32: bool = False) -> LogitsFn:
    """The pure `logits_fn(x)` of the evaluated model."""
    apply_fn = self.float32_apply_fn if float32 and self.float32_apply_fn else self.apply_fn
    return functools.partial(apply_fn, self.variables, train=False)

  @classmethod
  def from_logits_fn(cls, logits_fn: LogitsFn, data: EvalData, num_classes: int,
                     **kwargs: Any) -> "EvalContext":
    """A context for a plain `logits_fn` (no Flax model): its weights, if any,
    are compiled in as constants."""
    if not callable(logits_fn):
      raise ValueError(f"logits_fn must be callable; got {type(logits_fn).__name__}.")

    def apply_fn(variables, x, train=False):
      del variables, train
      return logits_fn(x)

    return cls(apply_fn=apply_fn, variables={}, data=data, num_classes=num_classes, **kwargs)


@dataclasses.dataclass
class EvalResult:
  """What an evaluator returns.

  Attributes:
    name: the evaluator ('robust', 'verified', 'certified', ...).
    metrics: flat scalar metrics (logged during training like other metrics),
      e.g. {'clean_accuracy': 0.97, 'robust_accuracy@0.1': 0.88}.
    artifacts: kind -> path of every file written ('json', 'md', 'png', ...);
      empty when nothing was written.
    table: the human-readable summary (what a launcher prints).
    details: the family's own result object (e.g. a `RobustAccuracyResult`).
  """
  name: str
  metrics: dict[str, float]
  artifacts: dict[str, str]
  table: str
  details: Any = None


class Evaluator(Protocol):
  """`evaluate(ctx) -> EvalResult`, built by a registered factory from validated settings."""

  def __call__(self, ctx: EvalContext) -> EvalResult:
    ...


@dataclasses.dataclass(frozen=True)
class EvalSetup:
  """What an evaluator factory may know before any model is restored.

  Attributes:
    num_classes: number of classes of the data set (None when validating a
      config without opening its data).
    run_config: the run's whole config when there is one (e.g. the smoothing
      evaluator certifies at the training objective's sigma by default), else
      None.
  """
  num_classes: int | None
  run_config: Any = None


Factory = Callable[[ml_collections.ConfigDict, EvalSetup], Evaluator]


@dataclasses.dataclass(frozen=True)
class EvaluatorSpec:
  """A registered evaluator.

  Attributes:
    name: the name `config.evals[i].type` and `launch.evaluate --evaluator` use.
    section: the config section holding its settings for stand-alone runs
      (e.g. 'attack' for 'robust').
    default_config: its settings and their defaults.
    factory: `factory(settings, setup: EvalSetup) -> Evaluator`; raises
      ValueError on bad settings (before any model is restored).
    validate: `validate(settings, setup)` raises ValueError on bad settings;
      `setup.num_classes` may be None (checked again by the factory).
    results_dir: the workdir subdirectory its stand-alone results go to.
    float32: whether it must compute in float32 (bound propagation).
    summary: one line saying what it measures.
    many_models: whether it evaluates the K models of a many-models run
      together (membership inference: a target and its shadow models) on the
      train split their masks refer to, rather than one model on eval images.
  """
  name: str
  section: str
  default_config: Callable[[], ml_collections.ConfigDict]
  factory: Factory
  validate: Callable[[ml_collections.ConfigDict, EvalSetup], Any]
  results_dir: str
  float32: bool = False
  summary: str = ""
  many_models: bool = False


_REGISTRY: dict[str, EvaluatorSpec] = {}


def register_evaluator(name: str, *, section: str, default_config: Callable[[], Any],
                       validate: Callable[[Any, EvalSetup], Any],
                       results_dir: str | None = None, float32: bool = False,
                       summary: str = "", many_models: bool = False
                       ) -> Callable[[Factory], Factory]:
  """Decorator registering an evaluator factory under `name` (see `EvaluatorSpec`)."""

  def decorate(factory: Factory) -> Factory:
    if name in _REGISTRY and _REGISTRY[name].factory is not factory:
      raise ValueError(f"An evaluator named {name!r} is already registered.")
    _REGISTRY[name] = EvaluatorSpec(name, section, default_config, factory, validate,
                                    results_dir or section, float32, summary, many_models)
    return factory

  return decorate


def evaluator_names() -> tuple[str, ...]:
  """Names of every registered evaluator, sorted."""
  return tuple(sorted(_REGISTRY))


def get_spec(name: str) -> EvaluatorSpec:
  validation.check_choice(name, "evaluator", evaluator_names())
  return _REGISTRY[name]


def spec_for_section(section: str) -> EvaluatorSpec:
  for spec in _REGISTRY.values():
    if spec.section == section:
      return spec
  raise ValueError(f"No evaluator reads config section {section!r}; sections: "
                   f"{sorted(s.section for s in _REGISTRY.values())}.")


def evaluator_defaults(name: str) -> ml_collections.ConfigDict:
  """The settings of evaluator `name` with their defaults."""
  return get_spec(name).default_config()


def merged_settings(name: str, overrides: Mapping[str, Any] | None = None,
                    where: str | None = None) -> ml_collections.ConfigDict:
  """The defaults of `name` overridden by `overrides`; an unknown key is an error.

  Args:
    name: the evaluator.
    overrides: settings to override.
    where: how to name the settings in errors (default: the config section).
  """
  spec = get_spec(name)
  settings = spec.default_config()
  where = where or spec.section
  for key, value in dict(overrides or {}).items():
    if key not in settings:
      close = validation.closest(key, settings.keys())
      hint = f" Did you mean {close!r}?" if close else ""
      raise ValueError(f"Unknown setting {key!r} of evaluator {name!r} in {where} "
                       f"(accepted: {', '.join(sorted(settings.keys()))}).{hint}")
    settings[key] = value
  return settings


def validate_settings(name: str, settings: Mapping[str, Any] | None, run_config: Any = None,
                      num_classes: int | None = None, where: str | None = None) -> None:
  """Checks the settings of evaluator `name` without building it (no data needed).

  Raises:
    ValueError: an unknown evaluator or setting, or a bad setting value.
  """
  spec = get_spec(name)
  spec.validate(merged_settings(name, settings, where), EvalSetup(num_classes, run_config))


def get_evaluator(name: str, settings: Mapping[str, Any] | None, num_classes: int,
                  run_config: Any = None, where: str | None = None) -> Evaluator:
  """Builds evaluator `name` from `settings` (defaults filled in), validating them.

  Args:
    name: a registered evaluator.
    settings: overrides of its defaults (e.g. `config.attack`).
    num_classes: number of classes of the data set.
    run_config: the run's whole config, if any (see `EvalSetup`).
    where: how to name the settings in errors (default: the config section).

  Raises:
    ValueError: an unknown evaluator or setting, or a bad setting value.
  """
  spec = get_spec(name)
  return spec.factory(merged_settings(name, settings, where),
                      EvalSetup(int(num_classes), run_config))
