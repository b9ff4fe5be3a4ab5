"""The training configuration: every accepted key, its default, and checks.

Experiment files in `configs/` start from `base_config()` and override; a key
that is not here (a typo such as `config.optimiser`) is rejected with the
accepted keys and a suggestion, instead of being silently ignored.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

import ml_collections

from certjax import data as data_lib
from certjax import validation
from certjax.models import layers as models_layers
from certjax.training import objectives, optim

COMPUTE_DTYPES = ("float32", "bfloat16")

# Sub-configurations whose keys are checked elsewhere: model kwargs by the
# model constructor, objective hyperparameters by the objective registry.
_FREE_FORM = ("model.kwargs", "objective")

# Evaluation sections read by the launch scripts (attack, verify, certify),
# each owned by its algorithm package as `<module>.default_config()`. A missing
# module leaves its section out.
_EVALUATION_SECTIONS = {
    "attack": "certjax.attacks.config",
    "verify": "certjax.bounds.config",
    "certify": "certjax.smoothing.config",
}


def base_config() -> ml_collections.ConfigDict:
  """Every key `train_and_evaluate` reads, with its default value."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = data_lib.default_data_config()
  # conv_impl: 'xla' (nn.Conv) or 'im2col' (the same convolution as one matrix
  # product; faster on CPU for small strided CNNs, slower for ResNets: see
  # certjax/models/layers.py). Checkpoints do not depend on it.
  c.model = ml_collections.ConfigDict({"name": "mlp", "kwargs": {}, "conv_impl": "xla"})
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
  # Which eval images the attack/verify/certify launchers use, as in Cohen et
  # al.'s certify.py: every `skip`-th image, stopping after index `max` (-1: all).
  c.skip = 1
  c.max = -1
  for section, module_name in _EVALUATION_SECTIONS.items():
    try:
      module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
      if e.name is None or not module_name.startswith(e.name):
        raise
      continue
    c[section] = module.default_config()
  return c


def _unknown_keys(config: Any, reference: Any, prefix: str = "") -> list[str]:
  problems = []
  for key in config.keys():
    path = f"{prefix}{key}"
    if key not in reference:
      accepted = ", ".join(sorted(reference.keys()))
      close = difflib.get_close_matches(key, list(reference.keys()), n=1)
      hint = f" Did you mean {prefix}{close[0]!r}?" if close else ""
      problems.append(f"unknown config key {path!r} (accepted at this level: {accepted}).{hint}")
    elif path not in _FREE_FORM and isinstance(reference[key], ml_collections.ConfigDict):
      if not isinstance(config[key], (ml_collections.ConfigDict, dict)):
        problems.append(f"config key {path!r} must be a ConfigDict, got {type(config[key])}.")
      else:
        problems.extend(_unknown_keys(config[key], reference[key], path + "."))
  return problems


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError listing every problem found in a training config."""
  problems = _unknown_keys(config, base_config())
  if problems:
    raise ValueError("Invalid config:\n  " + "\n  ".join(problems))
  validation.check_choice(config.compute_dtype, "compute_dtype", COMPUTE_DTYPES)
  validation.check_choice(config.model.get("conv_impl", "xla"), "model.conv_impl",
                          models_layers.CONV_IMPLS)
  for key in ("batch_size", "eval_batch_size", "log_every_steps", "keep_checkpoints"):
    validation.check_int_at_least(config[key], key, 1)
  for key in ("eval_every_steps", "checkpoint_every_steps"):
    validation.check_int_at_least(config[key], key, 0)
  if config.num_train_steps <= 0:
    validation.check_positive(config.num_epochs, "num_epochs")


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
