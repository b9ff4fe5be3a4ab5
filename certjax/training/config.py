"""The run configuration: every accepted key, its default, and checks of the whole.

Experiment files in `configs/` start from `base_config()` and override; a key
that is not here (a typo such as `config.optimiser`) is rejected with the
accepted keys and a suggestion, instead of being silently ignored. Every
launcher validates the whole config before it starts, including the sections
it does not read itself, so a bad `certify.alpha` stops `launch.train` rather
than the certification run hours later.

Sections:
  data, model, objective, optimizer, and the training keys below;
  attack, verify, certify: the settings of the evaluators 'robust',
    'verified' and 'certified' (`certjax.evaluation`), read by
    `launch.evaluate` (and its aliases `launch.attack`, `launch.verify`,
    `launch.certify`) on a trained workdir;
  evals: evaluations run during training, as in big_vision: a mapping from a
    name of your choice to `{type, every_steps, ...}`, where `type` is an
    evaluator name, `every_steps` how often it runs (0: only at the end; it
    always runs at the end), and any other key overrides that evaluator's
    settings (plus `skip` / `max` for the images). For example
    `config.evals.pgd = dict(type='robust', every_steps=500, eps_list=(0.1,),
    attacks=('pgd',), num_steps=10)`. Results are logged with the training
    metrics (split `evals/<name>`) and written to `<workdir>/evals/<name>/<step>/`.
  signing: the key that signs checkpoints, the public keys trusted when
    restoring them, and whether a signature is required
    (`certjax.runs.signing`; environment variables CERTJAX_SIGNING_KEY,
    CERTJAX_TRUSTED_KEYS, CERTJAX_REQUIRE_SIGNED do the same for CI);
  provenance: how much of the training split `<workdir>/provenance.json`
    hashes (`certjax.runs.provenance`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import ml_collections

from certjax import data as data_lib
from certjax import evaluation
from certjax import validation
from certjax.models import layers as models_layers
from certjax.runs import provenance as provenance_lib
from certjax.runs import signing as signing_lib
from certjax.runs import checkpoints as runs_checkpoints
from certjax.runs.checkpoints import COMPUTE_DTYPES
from certjax.training import objectives, optim
from certjax.training import poison as poison_lib

# Sub-configurations whose keys are checked elsewhere: model kwargs by the
# model constructor, objective hyperparameters by the objective registry,
# evaluations during training by `validate_evals`.
_FREE_FORM = ("model.kwargs", "model.input_transform_kwargs", "poison.trigger_kwargs",
              "objective", "evals")
# Keys of a `config.evals` entry that are not evaluator settings.
EVAL_ENTRY_KEYS = ("type", "every_steps", "skip", "max")
# Evaluator settings that have no meaning during training.
_NOT_DURING_TRAINING = ("checkpoint_step", "output_dir")


def base_config() -> ml_collections.ConfigDict:
  """Every key `train_and_evaluate` and the evaluators read, with its default value."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = data_lib.default_data_config()
  # conv_impl: 'xla' (nn.Conv) or 'im2col' (the same convolution as one matrix
  # product; faster on CPU for small strided CNNs, slower for ResNets: see
  # certjax/models/layers.py). Checkpoints do not depend on it.
  # input_transform: '' or a deterministic transformation of
  # certjax.defences.transforms the model is trained and deployed behind
  # (e.g. 'thermometer' with input_transform_kwargs={'levels': 16}).
  c.model = ml_collections.ConfigDict({"name": "mlp", "kwargs": {}, "conv_impl": "xla",
                                       "input_transform": "",
                                       "input_transform_kwargs": {}})
  c.objective = objectives.objective_defaults("standard")
  c.optimizer = optim.default_optimizer_config()
  c.batch_size = 128            # global, over all devices and hosts
  c.num_epochs = 10.0
  c.num_train_steps = -1        # > 0 overrides num_epochs
  c.eval_batch_size = 500       # global; the last batch is padded and masked
  c.eval_every_steps = 0        # 0: evaluate only at the end
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000  # a checkpoint is always written at the end
  c.keep_checkpoints = 3
  c.compute_dtype = "float32"   # 'bfloat16': activations in bf16, params f32
  # K > 1 trains K models at once in one vmapped program (seeds folded with the
  # model index; training subsets from data.membership): shadow and reference
  # models, ensembles, clients (certjax.training.many).
  c.num_models = 1
  # Models per vmapped block of the K-model step (K a multiple of it; 0: 8 on
  # a one-device CPU, all K elsewhere). Measured on a 2-core CPU, 32 MLPs
  # train up to 1.4x faster as 4 blocks of 8 than as one vmap of 32.
  c.models_per_block = 0
  # Which eval images the evaluators use, as in Cohen et al.'s certify.py:
  # every `skip`-th image, stopping after index `max` (-1: all).
  c.skip = 1
  c.max = -1
  for name in evaluation.evaluator_names():
    spec = evaluation.get_spec(name)
    c[spec.section] = spec.default_config()
  c.evals = ml_collections.ConfigDict()
  # A recorded poisoning stage on the train split (certjax.training.poison).
  c.poison = poison_lib.default_config()
  c.signing = signing_lib.default_config()
  # Examples of the training split hashed into provenance.json, evenly spaced
  # when the split is larger (-1: all; 0: none). Decoding dominates the cost.
  c.provenance = ml_collections.ConfigDict(
      {"hash_train_examples": provenance_lib.DEFAULT_HASH_TRAIN_EXAMPLES})
  return c


def _unknown_keys(config: Any, reference: Any, prefix: str = "") -> list[str]:
  problems = []
  for key in config.keys():
    path = f"{prefix}{key}"
    if key not in reference:
      accepted = ", ".join(sorted(reference.keys()))
      close = validation.closest(key, reference.keys())
      hint = f" Did you mean {prefix}{close!r}?" if close else ""
      problems.append(f"unknown config key {path!r} (accepted at this level: {accepted}).{hint}")
    elif path not in _FREE_FORM and isinstance(reference[key], ml_collections.ConfigDict):
      if not isinstance(config[key], (ml_collections.ConfigDict, dict)):
        problems.append(f"config key {path!r} must be a ConfigDict, got {type(config[key])}.")
      else:
        problems.extend(_unknown_keys(config[key], reference[key], path + "."))
  return problems


class EvalEntry(NamedTuple):
  """One checked entry of `config.evals`."""
  kind: str                            # the evaluator's name
  every_steps: int                     # 0: only at the end
  settings: ml_collections.ConfigDict  # its settings, defaults filled in
  skip: int                            # the images: every skip-th ...
  max: int                             # ... below index max (-1: all)


def validate_evals(config: Any) -> dict[str, EvalEntry]:
  """Checks `config.evals`; returns name -> `EvalEntry`.

  Raises:
    ValueError: an entry that is not a mapping, lacks `type`, names an unknown
      evaluator or setting, or has a bad `every_steps`, `skip` or `max`.
  """
  evals = config.get("evals") or {}
  if not isinstance(evals, (ml_collections.ConfigDict, dict)):
    raise ValueError(f"config.evals must map names to {{type, every_steps, ...}}; got "
                     f"{type(evals).__name__}.")
  entries = {}
  for name in evals.keys():
    entry = evals[name]
    where = f"evals.{name}"
    if not isinstance(entry, (ml_collections.ConfigDict, dict)):
      raise ValueError(f"{where} must be a mapping {{type, every_steps, ...}}; got {entry!r}.")
    entry = dict(entry)
    if "type" not in entry:
      raise ValueError(f"{where} needs a 'type', one of {evaluation.evaluator_names()}.")
    kind = validation.check_choice(entry.pop("type"), f"{where}.type",
                                   evaluation.evaluator_names())
    every = validation.check_int_at_least(entry.pop("every_steps", 0), f"{where}.every_steps", 0)
    skip = validation.check_int_at_least(entry.pop("skip", config.get("skip", 1)),
                                         f"{where}.skip", 1)
    max_index = validation.check_int_at_least(entry.pop("max", config.get("max", -1)),
                                              f"{where}.max", -1)
    for key in _NOT_DURING_TRAINING:
      if key in entry:
        raise ValueError(f"{where}.{key} has no meaning during training (the evaluation runs "
                         f"on the current parameters and writes to <workdir>/evals/{name}/); "
                         "remove it.")
    if evaluation.get_spec(kind).many_models:
      raise ValueError(f"{where}: evaluator {kind!r} evaluates the models of a many-models "
                       "run together on a finished workdir; run it after training with "
                       f"python -m launch.evaluate --evaluator={kind}.")
    settings = evaluation.merged_settings(kind, entry, where)
    evaluation.validate_settings(kind, settings, run_config=config, where=where)
    entries[str(name)] = EvalEntry(kind, every, settings, skip, max_index)
  return entries


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError listing the problems of a whole run config.

  Checks every key against `base_config()`, the names (data set, model
  implementation, objective, optimizer, schedule, evaluators) and the values
  that can be checked without the data: training keys, every evaluator
  section (`attack`, `verify`, `certify`) and `config.evals`.
  """
  problems = _unknown_keys(config, base_config())
  if problems:
    raise ValueError("Invalid config:\n  " + "\n  ".join(problems))
  config = with_defaults(config)
  data_lib.validate_data_config(config.data)
  validation.check_choice(config.compute_dtype, "compute_dtype", tuple(COMPUTE_DTYPES))
  validation.check_choice(config.model.get("conv_impl", "xla"), "model.conv_impl",
                          models_layers.CONV_IMPLS)
  for key in ("batch_size", "eval_batch_size", "log_every_steps", "keep_checkpoints"):
    validation.check_int_at_least(config[key], key, 1)
  for key in ("eval_every_steps", "checkpoint_every_steps"):
    validation.check_int_at_least(config[key], key, 0)
  if config.num_train_steps <= 0:
    validation.check_positive(config.num_epochs, "num_epochs")
  validation.check_int_at_least(config.skip, "skip", 1)
  validation.check_int_at_least(config.max, "max", -1)
  validation.check_int_at_least(config.num_models, "num_models", 1)
  validation.check_int_at_least(config.get("models_per_block", 0), "models_per_block", 0)
  if config.get("models_per_block", 0) and config.num_models % config.models_per_block:
    raise ValueError(f"num_models={config.num_models} must be a multiple of models_per_block="
                     f"{config.models_per_block} (0 chooses for the device).")
  if is_many_models(config) and len(config.evals or {}):
    raise ValueError(
        f"config.evals runs evaluators on one model during training; a run of "
        f"num_models={config.num_models} (data.membership={config.data.membership!r}) trains "
        "several: clear config.evals and evaluate the workdir afterwards (python -m "
        "launch.evaluate).")
  runs_checkpoints.model_input_transform(config)
  poison_lib.validate(config.poison)
  objectives.check_objective_config(config.objective)
  validation.check_choice(config.optimizer.name, "optimizer.name", optim.OPTIMIZERS)
  validation.check_choice(config.optimizer.schedule, "optimizer.schedule", optim.SCHEDULES)
  validation.check_positive(config.optimizer.learning_rate, "optimizer.learning_rate")
  for name in evaluation.evaluator_names():
    spec = evaluation.get_spec(name)
    evaluation.validate_settings(name, config[spec.section], run_config=config)
  validate_evals(config)
  signing_lib.validate_config(config.signing)
  validation.check_int_at_least(config.provenance.hash_train_examples,
                                "provenance.hash_train_examples", -1)


def is_many_models(config: Any) -> bool:
  """Whether `config` trains with the many-models trainer (K models or a membership mask)."""
  data = config.get("data") or {}
  return int(config.get("num_models", 1)) > 1 or data.get("membership", "all") != "all"


SMOKE = "smoke"


def split_smoke_arg(arg: str | None) -> tuple[str, bool]:
  """Splits a config argument into its own part and the 'smoke' modifier.

  `get_config('trades,smoke')` -> ('trades', True); `get_config('smoke')` ->
  ('', True); `get_config('trades')` -> ('trades', False).
  """
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  smoke = SMOKE in parts
  return ",".join(p for p in parts if p != SMOKE), smoke


def make_smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config to seconds on a CPU, keeping its data, objective and sections.

  What big_vision's `runlocal` argument does: the tests, CI and the
  notebooks' smoke scale run the real configs this way instead of
  hand-built copies. The model becomes the default MLP, training 100 steps,
  and the evaluator sections cheap (3-step attacks, n = 256 draws at alpha
  0.01, small batches); the objective's hyperparameters stay.
  """
  config.model.name = "mlp"
  config.model.kwargs = ml_collections.ConfigDict()
  config.model.conv_impl = "xla"
  config.compute_dtype = "float32"
  config.batch_size = 100
  config.eval_batch_size = 500
  config.num_train_steps = 100
  config.log_every_steps = 50
  config.checkpoint_every_steps = 0
  config.attack.update({"num_steps": 3, "square_queries": 20, "batch_size": 64,
                        "num_target_classes": 3})
  config.verify.update({"batch_size": 100, "crown_batch_size": 4})
  config.certify.update({"n0": 32, "n": 256, "alpha": 0.01, "batch_size": 256,
                         "images_per_call": 5})
  return config


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with any key it lacks filled from `base_config()` (a copy)."""
  merged = base_config()
  merged.unlock()

  def fill(dst, src, prefix=""):
    for key in src.keys():
      path = prefix + key
      if (path not in _FREE_FORM and key in dst
          and isinstance(dst[key], ml_collections.ConfigDict)
          and isinstance(src[key], (ml_collections.ConfigDict, dict))):
        fill(dst[key], src[key], path + ".")
      else:
        dst[key] = src[key]

  fill(merged, config)
  return merged
