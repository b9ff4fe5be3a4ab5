"""train_batches / eval_batches: determinism, exact resume, epochs, hosts, masks."""

import itertools

import numpy as np
import pytest

from certjax import data

# tiny_idx: 23 train examples whose pixel [0, 0] is the example id, 13 test
# examples with ids 100..112; labels are id % 10.


@pytest.fixture()
def cfg(tiny_idx):
  directory, _ = tiny_idx
  c = data.default_data_config()
  c.name, c.manual_dir = "mnist", str(directory)
  return c


def ids(batch, base=0):
  return (np.round(batch["image"][:, 0, 0, 0] * 255).astype(int) - base).tolist()


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def test_batch_format(cfg, tiny_idx):
  batch = next(data.train_batches(cfg, batch_size=5, seed=0))
  assert batch["image"].shape == (5, 6, 6, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (5,) and batch["label"].dtype == np.int32
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  images, labels = tiny_idx[1]["train"]
  np.testing.assert_array_equal(batch["label"], labels[ids(batch)])
  np.testing.assert_array_equal(batch["image"][..., 0], images[ids(batch)] / np.float32(255))


def test_deterministic_in_seed(cfg):
  a = take(data.train_batches(cfg, batch_size=5, seed=3), 6)
  b = take(data.train_batches(cfg, batch_size=5, seed=3), 6)
  c = take(data.train_batches(cfg, batch_size=5, seed=4), 6)
  assert [ids(x) for x in a] == [ids(x) for x in b]
  assert [ids(x) for x in a] != [ids(x) for x in c]


@pytest.mark.parametrize("augment", ["none", "crop_flip"])
def test_exact_resume(cfg, augment):
  cfg.augment = augment
  stream = take(data.train_batches(cfg, batch_size=5, seed=1), 14)
  resumed = take(data.train_batches(cfg, batch_size=5, seed=1, start_step=9), 5)
  for x, y in zip(stream[9:], resumed):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  # The random-access dataset agrees with the iterator.
  ds = data.train_dataset(cfg, batch_size=5, seed=1)
  np.testing.assert_array_equal(ds[13]["image"], stream[13]["image"])


def test_epochs_are_fresh_permutations_without_drops(cfg):
  # 23 examples, batch 5: batches straddle epoch boundaries.
  batches = take(data.train_batches(cfg, batch_size=5, seed=0), 14)  # 70 positions
  stream = [i for b in batches for i in ids(b)]
  epochs = [stream[k * 23:(k + 1) * 23] for k in range(3)]
  for epoch in epochs:
    assert sorted(epoch) == list(range(23))
  assert epochs[0] != epochs[1] != epochs[2]
  assert stream[:23] != list(range(23))  # shuffled


@pytest.mark.parametrize("augment", ["none", "crop_flip"])
def test_hosts_slice_the_global_batch(cfg, augment):
  cfg.augment = augment
  whole = take(data.train_batches(cfg, batch_size=6, seed=2, start_step=3), 4)
  hosts = [take(data.train_batches(cfg, batch_size=6, seed=2, start_step=3, process_index=h,
                                   process_count=2), 4) for h in range(2)]
  for step, global_batch in enumerate(whole):
    assert hosts[0][step]["image"].shape == (3, 6, 6, 1)
    for key in ("image", "label"):
      np.testing.assert_array_equal(
          np.concatenate([hosts[0][step][key], hosts[1][step][key]]), global_batch[key])


def test_crop_flip_matches_reference():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(7, 5, 6, 2), dtype=np.uint8)
  offsets = rng.integers(0, 9, size=(7, 2))
  flips = rng.random(7) < 0.5
  out = data.crop_flip(images, offsets, flips)
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  for i in range(7):
    crop = padded[i, offsets[i, 0]:offsets[i, 0] + 5, offsets[i, 1]:offsets[i, 1] + 6]
    np.testing.assert_array_equal(out[i], crop[:, ::-1] if flips[i] else crop)


def test_crop_flip_augments_training_batches(cfg):
  plain = take(data.train_batches(cfg, batch_size=5, seed=0), 4)
  cfg.augment = "crop_flip"
  augmented = take(data.train_batches(cfg, batch_size=5, seed=0), 4)
  changed = 0
  for p, a in zip(plain, augmented):
    np.testing.assert_array_equal(p["label"], a["label"])  # same examples, same order
    changed += int(np.sum(np.any(p["image"] != a["image"], axis=(1, 2, 3))))
    for x, y in zip(p["image"], a["image"]):
      assert any(np.array_equal(data.crop_flip(x[None], np.array([[oy, ox]]), np.array([f]))[0], y)
                 for oy in range(9) for ox in range(9) for f in (False, True))
  assert changed >= 15  # 81 * 2 - 1 of 162 draws change an image


@pytest.mark.parametrize("batch_size,process_count,cap", [(4, 2, -1), (6, 3, -1), (4, 1, 5),
                                                          (20, 2, -1)])
def test_eval_counts_every_example_once(cfg, batch_size, process_count, cap):
  cfg.num_eval_examples = cap
  n = 13 if cap == -1 else cap
  per_host = [list(data.eval_batches(cfg, batch_size=batch_size, process_index=h,
                                     process_count=process_count))
              for h in range(process_count)]
  num_batches = -(-n // batch_size)
  assert all(len(batches) == num_batches for batches in per_host)
  seen = []
  for batches in per_host:
    for b in batches:
      assert b["image"].shape == (batch_size // process_count, 6, 6, 1)
      assert b["mask"].dtype == bool
      seen += [i for i, m in zip(ids(b, base=100), b["mask"]) if m]
      assert not np.any(b["image"][~b["mask"]])  # padding is zeros
      np.testing.assert_array_equal(b["label"][b["mask"]],
                                    np.array(ids(b, 100))[b["mask"]] % 10)
  assert sorted(seen) == list(range(n))
  # Host h holds the h-th contiguous slice of each global batch.
  first = per_host[0][0]
  assert ids(first, 100)[:int(first["mask"].sum())] == list(range(int(first["mask"].sum())))
  assert data.get_info(cfg).num_eval == n


def test_eval_other_split(cfg):
  batches = list(data.eval_batches(cfg, batch_size=10, split="train[5:]"))
  assert sum(int(b["mask"].sum()) for b in batches) == 18
  assert ids(batches[0])[:3] == [5, 6, 7]


def test_batch_size_errors(cfg):
  with pytest.raises(ValueError, match="divisible by process_count 2"):
    data.train_batches(cfg, batch_size=5, seed=0, process_count=2)
  with pytest.raises(ValueError, match="divisible by process_count 4"):
    data.eval_batches(cfg, batch_size=6, process_count=4)
  with pytest.raises(ValueError, match="larger than the 23 examples"):
    data.train_batches(cfg, batch_size=24, seed=0)
  with pytest.raises(ValueError, match=r"process_index must lie in .* = \[0, 1\], got 2"):
    data.train_batches(cfg, batch_size=4, seed=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
    data.train_batches(cfg, batch_size=0, seed=0)
  with pytest.raises(ValueError, match="seed must be an integer >= 0"):
    data.train_batches(cfg, batch_size=4, seed=-1)
  with pytest.raises(ValueError, match="start_step must be an integer >= 0"):
    data.train_batches(cfg, batch_size=4, seed=0, start_step=-3)


def test_crop_flip_argument_errors():
  images = np.zeros((2, 4, 4, 1), np.uint8)
  with pytest.raises(ValueError, match=r"offsets must lie in \[0, 8\]"):
    data.crop_flip(images, np.array([[0, 9], [0, 0]]), np.array([False, True]))
  with pytest.raises(ValueError, match=r"offsets must have shape \(2, 2\)"):
    data.crop_flip(images, np.zeros((3, 2), int), np.array([False, True]))


def test_select_indices_follows_cohen_skip_max():
  np.testing.assert_array_equal(data.select_indices(10, 3, -1), [0, 3, 6, 9])
  np.testing.assert_array_equal(data.select_indices(10, 3, 7), [0, 3, 6])
  np.testing.assert_array_equal(data.select_indices(10, 3, 9), [0, 3, 6])
  np.testing.assert_array_equal(data.select_indices(10, 1, 100), np.arange(10))
  with pytest.raises(ValueError, match="skip"):
    data.select_indices(10, 0, -1)
  with pytest.raises(ValueError, match="max must be an integer"):
    data.select_indices(10, 1, 2.5)
  with pytest.raises(ValueError, match="select no image of split 'test'"):
    data.select_indices(10, 1, 0, "test")


def test_launcher_selection_indexes_the_whole_split(cfg):
  # The eval split has 13 examples; the training-eval cap must not shrink the
  # skip/max selection of the attack / verify / certify launchers.
  cfg.num_eval_examples = 5
  np.testing.assert_array_equal(data.select_split_indices(cfg, "test", 4, -1), [0, 4, 8, 12])
  np.testing.assert_array_equal(data.select_split_indices(cfg, "test", 4, 9), [0, 4, 8])


def test_load_examples_in_the_order_given(cfg):
  x, y = data.load_examples(cfg, "test", [12, 0, 5])
  assert x.dtype == np.float32 and y.dtype == np.int32
  assert ids({"image": x}, 100) == [12, 0, 5]
  np.testing.assert_array_equal(y, [2, 0, 5])  # labels are id % 10
  x_all, y_all = data.load_arrays(cfg, "test")
  np.testing.assert_array_equal(x, x_all[[12, 0, 5]])
  with pytest.raises(ValueError, match=r"indices must lie in \[0, 12\]"):
    data.load_examples(cfg, "test", [13])
