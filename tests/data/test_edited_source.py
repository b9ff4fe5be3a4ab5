"""Poisoned and sanitised training sets: `data.replace_file` and `data.exclude_file`."""

import os

import numpy as np
import pytest

from certjax import data


def _record(tmp_path, indices, images, labels, name="replace.npz"):
  path = os.path.join(tmp_path, name)
  np.savez(path, indices=np.asarray(indices), images=images, labels=np.asarray(labels))
  return path


def test_replacements_and_exclusions_edit_the_train_split_only(tmp_path):
  x, y = data.load_split_uint8({"name": "mnist5k"}, "train")
  replaced = np.array([7, 1, 5])  # unsorted on purpose: the record is sorted on load
  images = np.stack([np.full((28, 28, 1), v, np.uint8) for v in (70, 10, 50)])
  excluded = os.path.join(tmp_path, "exclude.npy")
  np.save(excluded, np.array([0, 5]))
  cfg = {"name": "mnist5k", "replace_file": _record(tmp_path, replaced, images, [3, 1, 2]),
         "exclude_file": excluded}
  x_edit, y_edit = data.load_split_uint8(cfg, "train")
  keep = np.setdiff1d(np.arange(len(y)), [0, 5])
  assert len(y_edit) == len(y) - 2
  expected_x, expected_y = x[keep].copy(), y[keep].copy()
  for index, value, label in ((7, 70, 3), (1, 10, 1)):   # 5 is both replaced and excluded
    row = int(np.nonzero(keep == index)[0][0])
    expected_x[row], expected_y[row] = value, label
  np.testing.assert_array_equal(x_edit, expected_x)
  np.testing.assert_array_equal(y_edit, expected_y)
  # Training batches read the same edited examples.
  batch = next(data.train_batches({**cfg}, batch_size=len(y_edit), seed=0))
  assert sorted(batch["label"].tolist()) == sorted(expected_y.tolist())
  x_test, _ = data.load_split_uint8(cfg, "test")
  np.testing.assert_array_equal(x_test, data.load_split_uint8({"name": "mnist5k"}, "test")[0])


@pytest.mark.parametrize("indices, images, labels, match", [
    ([4000], np.zeros((1, 28, 28, 1), np.uint8), [0], "outside 0..3999"),
    ([1, 1], np.zeros((2, 28, 28, 1), np.uint8), [0, 0], "repeats"),
    ([1], np.zeros((1, 28, 28, 1), np.float32), [0], "uint8 image"),
    ([1, 2], np.zeros((1, 28, 28, 1), np.uint8), [0, 0], "one label per index"),
])
def test_bad_replacement_records(tmp_path, indices, images, labels, match):
  cfg = {"name": "mnist5k", "replace_file": _record(tmp_path, indices, images, labels)}
  with pytest.raises(ValueError, match=match):
    data.load_split_uint8(cfg, "train")


def test_bad_exclusions(tmp_path):
  path = os.path.join(tmp_path, "all.npy")
  np.save(path, np.arange(4000))
  with pytest.raises(ValueError, match="leaves out every example"):
    data.load_split_uint8({"name": "mnist5k", "exclude_file": path}, "train")
  with pytest.raises(ValueError, match="cannot be read"):
    data.load_split_uint8({"name": "mnist5k", "exclude_file": str(tmp_path / "none.npy")},
                          "train")
