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
  'property': shadow models for property inference (Ganju et al. 2018):
    even-numbered models get subsets of `property_subset_size` examples of
    which a share `property_fractions[0]` is of class `property_class`,
    odd-numbered ones a share `property_fractions[1]` (`property_masks`);
    with `property_kind='rotated_share'` the subsets are uniform and the
    shares are of examples the model sees rotated (`rotated_property_masks`,
    whose [K, N] rotation flags the trainer saves as `ROTATED_FILE`).

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
# Which examples each model of a property_kind='rotated_share' run sees rotated.
ROTATED_FILE = "property_rotated.npy"
_MASK_TAG = 0x6D65_6D62  # keeps this generator apart from the shuffles'
_PROPERTY_TAG = 0x7072_6F70
_ROTATED_TAG = 0x726F_7461


def membership_masks(design: str, num_models: int, num_examples: int, seed: int, *,
                     fraction: float = 0.5, path: str = "", labels: Any = None,
                     property_class: int = -1, property_fractions: Any = (0.8, 0.2),
                     property_subset_size: int = 0,
                     property_kind: str = "class_share") -> np.ndarray:
  """The bool [num_models, num_examples] training masks of a design (module docstring).

  Args:
    design: 'all', 'random_half', 'fraction', 'disjoint' or 'file'.
    num_models: K >= 1.
    num_examples: N, the size of the train split.
    seed: the run's seed; the masks are a pure function of (design, K, N, seed).
    fraction: the share of models per example, for 'fraction'.
    path: the .npy file, for 'file'.
    labels: [N] labels of the train split, for 'property'.
    property_class, property_fractions, property_subset_size, property_kind:
      for 'property' (`property_masks`, or `rotated_property_masks` for
      property_kind='rotated_share'; a subset size 0 means half the split).

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
  elif design == "property" and property_kind == "rotated_share":
    masks, _ = rotated_share_design(num_examples, num_models, seed, property_fractions,
                                    property_subset_size)
  elif design == "property":
    if property_kind != "class_share":
      raise ValueError(f"property_kind must be 'class_share' or 'rotated_share'; got "
                       f"{property_kind!r}.")
    if labels is None or len(labels) != num_examples:
      raise ValueError("membership='property' needs the train split's labels.")
    fraction_with, fraction_without = tuple(property_fractions)
    masks, _ = property_masks(labels, num_models, seed, property_class=property_class,
                              fraction_with=fraction_with, fraction_without=fraction_without,
                              subset_size=property_subset_size or num_examples // 2)
  else:
    raise ValueError(f"data_config.membership must be one of 'all', 'random_half', "
                     f"'fraction', 'disjoint', 'file', 'property'; got {design!r}.")
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


def _check_fraction(value: Any, name: str) -> float:
  if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
      or not 0.0 <= float(value) <= 1.0):
    raise ValueError(f"{name} must be a number in the closed interval [0, 1], got {value!r}.")
  return float(value)


def _whole_count(fraction: float, subset_size: int, name: str) -> int:
  count = fraction * subset_size
  if abs(count - round(count)) > 1e-6:
    raise ValueError(
        f"{name} * subset_size must be a whole number of examples; got {fraction!r} * "
        f"{subset_size} = {count:g}. Choose a fraction that is a multiple of 1/subset_size.")
  return int(round(count))


def _check_property_design(num_models: Any, fraction_with: Any, fraction_without: Any,
                           subset_size: Any, pool_size: int) -> tuple[int, float, float, int]:
  """(K, fraction_with, fraction_without, subset_size) of a property design, checked."""
  num_models = check_int_at_least(num_models, "num_models", 2)
  if num_models % 2:
    raise ValueError(
        f"num_models must be even (half with, half without the property); got {num_models}.")
  fraction_with = _check_fraction(fraction_with, "fraction_with")
  fraction_without = _check_fraction(fraction_without, "fraction_without")
  if fraction_with == fraction_without:
    raise ValueError(f"fraction_with and fraction_without must differ for the property to "
                     f"be observable; both are {fraction_with!r}.")
  subset_size = check_int_at_least(subset_size, "subset_size", 1)
  if subset_size > pool_size:
    raise ValueError(f"subset_size {subset_size} is larger than the pool of {pool_size} examples.")
  return num_models, fraction_with, fraction_without, subset_size


def property_masks(labels: Any, num_models: int, seed: int, *, property_class: int,
                   fraction_with: float, fraction_without: float, subset_size: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Training subsets for shadow models with and without a class-fraction property.

  Models 0, 2, 4, ... get the property: exactly `fraction_with * subset_size`
  examples of `property_class` and the rest from the other classes; models
  1, 3, 5, ... get `fraction_without * subset_size`. Each model samples both
  parts without replacement from the pool, independently of the others, from
  a generator seeded by (seed, model index). Alternating labels mean that
  splitting the models at any even index keeps (with, without) pairs
  together and both halves balanced.

  Args:
    labels: [N] integer class labels of the pool.
    num_models: K, even and >= 2.
    seed: the run's seed.
    property_class: the class whose fraction is the property.
    fraction_with: fraction of `property_class` in a subset with the
      property, in [0, 1].
    fraction_without: the fraction in a subset without it, in [0, 1],
      different from `fraction_with`.
    subset_size: examples per model; both fractions times it must be whole
      numbers.

  Returns:
    masks: [K, N] bool, the many-models trainer's membership masks.
    property_labels: [K] int32, 1 for models with the property.

  Raises:
    ValueError: fractions outside [0, 1] or equal, fractions that do not give
      whole counts, an odd or too small num_models, or a subset needing more
      examples of a class (or of the other classes) than the pool has.

  References:
    K. Ganju, Q. Wang, W. Yang, C. Gunter, N. Borisov. Property Inference
    Attacks on Fully Connected Neural Networks using Permutation Invariant
    Representations. CCS 2018.
  """
  shape = np.shape(labels)
  if len(shape) != 1:
    raise ValueError(f"labels must be a rank-1 array of class labels; got shape {tuple(shape)}.")
  pool = np.asarray(labels)
  if not np.issubdtype(pool.dtype, np.integer):
    raise ValueError(f"labels must hold integer class labels; got dtype {pool.dtype}.")
  if isinstance(property_class, bool) or not isinstance(property_class, (int, np.integer)) or (
      property_class < 0):
    raise ValueError(f"property_class must be a class label >= 0; got {property_class!r}.")
  if property_class not in set(pool.tolist()):
    raise ValueError(f"property_class {property_class} does not occur in the labels "
                     f"(classes {sorted(set(pool.tolist()))[:20]}).")
  num_models, fraction_with, fraction_without, subset_size = _check_property_design(
      num_models, fraction_with, fraction_without, subset_size, pool.size)
  in_class = np.flatnonzero(pool == property_class)
  out_class = np.flatnonzero(pool != property_class)
  groups = []
  for name, fraction in (("fraction_with", fraction_with), ("fraction_without", fraction_without)):
    num_in = _whole_count(fraction, subset_size, name)
    num_out = subset_size - num_in
    if num_in > in_class.size:
      raise ValueError(
          f"A subset with {name}={fraction!r} needs {num_in} examples of class "
          f"{property_class} but the pool has only {in_class.size}; lower subset_size or {name}.")
    if num_out > out_class.size:
      raise ValueError(
          f"A subset with {name}={fraction!r} needs {num_out} examples of other classes "
          f"but the pool has only {out_class.size}; lower subset_size or raise {name}.")
    groups.append((num_in, num_out))
  masks = np.zeros((num_models, pool.size), bool)
  for model in range(num_models):
    num_in, num_out = groups[model % 2]
    rng = np.random.default_rng([int(seed), _MASK_TAG, _PROPERTY_TAG, model])
    masks[model, rng.choice(in_class, num_in, replace=False)] = True
    masks[model, rng.choice(out_class, num_out, replace=False)] = True
  property_labels = (np.arange(num_models) % 2 == 0).astype(np.int32)
  return masks, property_labels


def rotated_property_masks(num_examples: int, num_models: int, seed: int, *,
                           fraction_with: float, fraction_without: float, subset_size: int
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Shadow-model subsets with and without a share of rotated training images.

  A property of the training set that no label shows (Ganju et al.'s
  properties are of this kind): every model trains on a uniform random
  subset of `subset_size` examples of the pool, of which exactly
  `fraction_with * subset_size` (models 0, 2, 4, ...) or `fraction_without *
  subset_size` (models 1, 3, 5, ...) are seen rotated. Each model draws both
  from a generator seeded by (seed, model index), independently of the
  others.

  Args:
    num_examples: N, the pool's size.
    num_models: K, even and >= 2.
    seed: the run's seed.
    fraction_with, fraction_without: the rotated shares, different, in [0, 1].
    subset_size: examples per model; both shares times it must be whole numbers.

  Returns:
    masks: [K, N] bool, the many-models trainer's membership masks.
    rotated: [K, N] bool, the examples model k sees rotated (within masks[k]).
    property_labels: [K] int32, 1 for models with the share `fraction_with`.

  Raises:
    ValueError: fractions outside [0, 1] or equal, shares that are not whole
      counts, an odd or too small num_models, or a subset larger than the pool.
  """
  num_examples = check_int_at_least(num_examples, "the number of training examples", 1)
  num_models, fraction_with, fraction_without, subset_size = _check_property_design(
      num_models, fraction_with, fraction_without, subset_size, num_examples)
  counts = [_whole_count(f, subset_size, name) for name, f in
            (("fraction_with", fraction_with), ("fraction_without", fraction_without))]
  masks = np.zeros((num_models, num_examples), bool)
  rotated = np.zeros((num_models, num_examples), bool)
  for model in range(num_models):
    rng = np.random.default_rng([int(seed), _MASK_TAG, _ROTATED_TAG, model])
    subset = rng.choice(num_examples, subset_size, replace=False)
    masks[model, subset] = True
    rotated[model, rng.choice(subset, counts[model % 2], replace=False)] = True
  property_labels = (np.arange(num_models) % 2 == 0).astype(np.int32)
  return masks, rotated, property_labels


def rotated_share_design(num_examples: int, num_models: int, seed: int,
                         property_fractions: Any, property_subset_size: int
                         ) -> tuple[np.ndarray, np.ndarray]:
  """(masks, rotation flags) of a property_kind='rotated_share' run, from its data
  config's fields (`rotated_property_masks`; a subset size 0 means half the split).
  """
  fraction_with, fraction_without = tuple(property_fractions)
  masks, rotated, _ = rotated_property_masks(
      num_examples, num_models, seed, fraction_with=float(fraction_with),
      fraction_without=float(fraction_without),
      subset_size=int(property_subset_size) or num_examples // 2)
  return masks, rotated


def rotate_images(images: np.ndarray, degrees: int) -> np.ndarray:
  """[N, H, W, C] images rotated counter-clockwise by `degrees` (a multiple of 90)."""
  return np.rot90(images, degrees // 90, axes=(1, 2))


def rotated_copies(images: np.ndarray, labels: np.ndarray, rotated: np.ndarray,
                   degrees: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The pool extended by rotated copies of the examples some model sees rotated.

  The many-models trainer gathers every batch on the device from one image
  array; a model's rotated examples become indices into the appended copies,
  so the jitted step is the same as without the property and the rotation
  is exact (`np.rot90` on the host, before training).

  Args:
    images: [N, H, W, C] training images.
    labels: [N] their labels.
    rotated: [K, N] bool rotation flags (`rotated_property_masks`).
    degrees: 90, 180 or 270, counter-clockwise.

  Returns:
    (images [N + R, H, W, C], labels [N + R], slot [N] int64: the index of
    example i's rotated copy, or -1 where no model rotates it).

  Raises:
    ValueError: flags of the wrong shape, an angle not a multiple of 90 in
      (0, 360), or a quarter turn of non-square images.
  """
  rotated = np.asarray(rotated, bool)
  if rotated.ndim != 2 or rotated.shape[1] != len(images) or len(labels) != len(images):
    raise ValueError(f"rotated must be [K, N] flags over the {len(images)} images (with "
                     f"{len(labels)} labels); got shape {rotated.shape}.")
  if isinstance(degrees, bool) or degrees not in (90, 180, 270):
    raise ValueError(f"degrees must be 90, 180 or 270; got {degrees!r}.")
  if degrees != 180 and images.shape[1] != images.shape[2]:
    raise ValueError(f"A {degrees} degree rotation needs square images; these are "
                     f"{images.shape[1]}x{images.shape[2]} (use property_rotation=180).")
  needed = np.flatnonzero(rotated.any(0))
  slot = np.full(len(images), -1, np.int64)
  slot[needed] = len(images) + np.arange(needed.size)
  copies = rotate_images(images[needed], degrees)
  return (np.concatenate([images, copies]), np.concatenate([labels, labels[needed]]), slot)


def read_rotated_file(path: str, masks: np.ndarray) -> np.ndarray:
  """The bool [K, N] rotation flags a rotated_share run saved, checked against its masks."""
  rotated = read_masks_file(path)
  if rotated.shape != np.shape(masks) or np.any(rotated & ~np.asarray(masks, bool)):
    raise ValueError(f"{path} must hold [K, N] rotation flags within the membership masks "
                     f"{np.shape(masks)}; found shape {rotated.shape}.")
  return rotated


def rotated_labels_of(masks: Any, rotated: Any, fraction_with: float,
                      fraction_without: float) -> np.ndarray:
  """[K] int32: 1 where model k's rotated share is nearer `fraction_with`."""
  return _nearer_share(masks, np.asarray(rotated, bool), fraction_with, fraction_without)


def _nearer_share(masks: Any, marked: np.ndarray, fraction_with: float,
                  fraction_without: float) -> np.ndarray:
  """[K] int32: 1 where the share of `marked` ([N] or [K, N]) examples among model
  k's members is nearer `fraction_with` than `fraction_without`."""
  masks = np.asarray(masks, bool)
  share = (masks & marked).sum(1) / masks.sum(1)
  return (np.abs(share - fraction_with) < np.abs(share - fraction_without)).astype(np.int32)


def property_labels_of(masks: Any, labels: Any, property_class: int,
                       fraction_with: float, fraction_without: float) -> np.ndarray:
  """[K] int32: 1 where model k's subset is nearer `fraction_with` of `property_class`."""
  return _nearer_share(masks, np.asarray(labels)[None] == property_class, fraction_with,
                       fraction_without)
