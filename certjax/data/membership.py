"""Membership masks: which training examples each of K models trains on.

Shadow models (membership inference), reference models (RMIA), bagged
ensembles and federated clients all train K models on K subsets of one
training pool. The subsets are a bool mask `[K, N]` over the train split,
drawn from the run's seed, saved in the workdir (`MASK_FILE`) and read back
by every evaluator, so a membership evaluation scores exactly the examples
each model saw.

Designs (`config.data.membership`):
  'all': every model trains on every example (models differ by seed only).
  'random_half': each example is in exactly half of the models, the design of
    the LiRA code (Carlini et al. 2022): per example, a uniformly random half
    of the K models. Every example then has K/2 IN and K/2 OUT models, which
    online attacks need.
  'fraction': the same with a share `membership_fraction` of the models
    (round(f * K) per example).
  'disjoint': a random partition into K near-equal shards (federated
    clients, bagging without overlap).
  'file': a bool [K, N] `.npy` written elsewhere.

References:
  N. Carlini, S. Chien, M. Nasr, S. Song, A. Terzis, F. Tramer. Membership
  Inference Attacks From First Principles. IEEE S&P 2022 (the `keep` masks of
  their train.py: `order = uniform(K, N).argsort(0); keep = order < pkeep * K`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from certjax.validation import check_int_at_least

MASK_FILE = "membership.npy"
_MASK_TAG = 0x6D65_6D62  # keeps this generator apart from the shuffles'


def membership_masks(design: str, num_models: int, num_examples: int, seed: int, *,
                     fraction: float = 0.5, path: str = "") -> np.ndarray:
  """The bool [num_models, num_examples] training masks of a design (module docstring).

  Args:
    design: 'all', 'random_half', 'fraction', 'disjoint' or 'file'.
    num_models: K >= 1.
    num_examples: N, the size of the train split.
    seed: the run's seed; the masks are a pure function of (design, K, N, seed).
    fraction: the share of models per example, for 'fraction'.
    path: the .npy file, for 'file'.

  Raises:
    ValueError: an unknown design, a mask file of the wrong shape or dtype, or
      a design that leaves some model without examples.
  """
  check_int_at_least(num_models, "num_models", 1)
  check_int_at_least(num_examples, "the number of training examples", 1)
  rng = np.random.default_rng([int(seed), _MASK_TAG])
  if design == "all":
    masks = np.ones((num_models, num_examples), bool)
  elif design in ("random_half", "fraction"):
    share = 0.5 if design == "random_half" else float(fraction)
    per_example = int(round(share * num_models))
    if not 0 < per_example < num_models:
      raise ValueError(
          f"data_config.membership={design!r} with {num_models} models puts each example in "
          f"{per_example} models, so no example has both IN and OUT models; use num_models "
          f">= 2 (and a membership_fraction with 0 < round(fraction * K) < K).")
    order = rng.uniform(size=(num_models, num_examples)).argsort(axis=0)
    masks = order < per_example
  elif design == "disjoint":
    if num_models > num_examples:
      raise ValueError(f"data_config.membership='disjoint' needs num_models <= the "
                       f"{num_examples} training examples; got {num_models}.")
    shard = np.empty(num_examples, np.int64)
    shard[rng.permutation(num_examples)] = np.arange(num_examples) % num_models
    masks = shard[None, :] == np.arange(num_models)[:, None]
  elif design == "file":
    masks = read_masks_file(path)
    if masks.shape != (num_models, num_examples):
      raise ValueError(
          f"data_config.membership_file {path} holds masks of shape {masks.shape}; this run "
          f"needs [num_models, train examples] = ({num_models}, {num_examples}).")
  else:
    raise ValueError(f"data_config.membership must be one of 'all', 'random_half', "
                     f"'fraction', 'disjoint', 'file'; got {design!r}.")
  empty = np.flatnonzero(masks.sum(axis=1) == 0)
  if empty.size:
    raise ValueError(f"Model(s) {empty.tolist()[:10]} of the membership masks have no "
                     "training example.")
  return masks


def read_masks_file(path: str) -> np.ndarray:
  """A bool [K, N] mask from a .npy file (no pickle), checked."""
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f"No membership mask file at {path!r}.")
  masks = np.load(path, allow_pickle=False)
  if masks.dtype != np.bool_ or masks.ndim != 2:
    raise ValueError(f"The membership mask file {path} must hold a bool [K, N] array; found "
                     f"{masks.dtype} of shape {masks.shape}.")
  return masks


def masks_path(workdir: str) -> str:
  return os.path.join(workdir, MASK_FILE)


def read_workdir_masks(workdir: str) -> np.ndarray:
  """The [K, N] masks a many-models run saved in `workdir`."""
  path = masks_path(workdir)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{workdir} has no {MASK_FILE}: it was not trained with num_models > 1 or a "
        "membership design (python -m launch.train with config.num_models / "
        "config.data.membership writes it).")
  return read_masks_file(path)


def describe(masks: Any) -> dict[str, Any]:
  """Counts for logs and result files: models, examples, per-model and per-example sizes."""
  masks = np.asarray(masks, bool)
  per_model, per_example = masks.sum(1), masks.sum(0)
  return {"num_models": int(masks.shape[0]), "num_examples": int(masks.shape[1]),
          "examples_per_model": [int(per_model.min()), int(per_model.max())],
          "models_per_example": [int(per_example.min()), int(per_example.max())]}
