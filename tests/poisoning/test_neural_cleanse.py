"""Neural Cleanse: reversed triggers of a backdoored model, the MAD outlier test, unlearning data.

The backdoored model is a 49-32-10 tanh MLP on real digits ('mnist5k',
average-pooled to 7x7), trained for 400 full-batch Adam steps on 4,000
training digits of which 20% carry a 2x2 white patch in the bottom-right
corner and are relabelled 0. A strong backdoor and a smooth model are needed
for the target to stand out on 7x7 digits (seen while writing this test):
a plain MLP is so fragile there that one- or two-pixel universal triggers
send every digit to some clean classes, below the 4-pixel backdoor; with 10%
poison the reversal often settled on a digit-shaped mask instead of the
corner. Trained with Gaussian noise (sigma 0.3) on the images, the clean
classes need masks of L1 6.1 to 9.7 and the target's reversed mask (2.4)
sits on the corner, anomaly index 3.9 (2.7 to 4.3 over Neural Cleanse keys
1 to 5; the test uses key 1).

Oracles: the backdoor's known target and corner, the same run with
`batching='loop'` and 'map', a hand-computed MAD example, and the trigger
formula for the unlearning set.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from certjax import data as data_lib
from certjax.poisoning import neural_cleanse as nc

TARGET = 0
NC_SETTINGS = {"num_classes": 10, "num_epochs": 60, "batch_size": 64}


def _pooled(split, stop):
  images, labels = data_lib.load_arrays({"name": "mnist5k"}, split, 0, stop)
  return images.reshape(-1, 7, 4, 7, 4, 1).mean(axis=(2, 4)).astype(np.float32), labels


def _stamp(images):
  stamped = images.copy()
  stamped[:, -2:, -2:, :] = 1.0
  return stamped


def _apply(params, x):
  h = jnp.tanh(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


@pytest.fixture(scope="module")
def backdoored():
  """(logits_fn, clean test digits [256], their labels) of the backdoored MLP."""
  x, y = _pooled("train", 4000)
  poison = np.random.default_rng(0).choice(x.shape[0], x.shape[0] // 5, replace=False)
  x[poison], y[poison] = _stamp(x[poison]), TARGET
  k1, k2, k_noise = jax.random.split(jax.random.key(0), 3)
  params = {"w1": jax.random.normal(k1, (49, 32)) / 7.0, "b1": jnp.zeros(32),
            "w2": jax.random.normal(k2, (32, 10)) / np.sqrt(32), "b2": jnp.zeros(10)}
  optimizer = optax.adam(0.02)

  @jax.jit
  def train(params):
    def step(i, carry):
      params, state = carry
      noisy = x + 0.3 * jax.random.normal(jax.random.fold_in(k_noise, i), x.shape)
      grads = jax.grad(lambda p: jnp.mean(
          optax.softmax_cross_entropy_with_integer_labels(_apply(p, noisy), y)))(params)
      updates, state = optimizer.update(grads, state, params)
      return optax.apply_updates(params, updates), state
    return jax.lax.fori_loop(0, 400, step, (params, optimizer.init(params)))[0]

  params = train(params)
  x_test, y_test = _pooled("test", 256)
  logits_fn = jax.tree_util.Partial(_apply, params)
  accuracy = np.mean(np.argmax(logits_fn(x_test), -1) == y_test)
  others = y_test != TARGET
  attack = np.mean(np.argmax(logits_fn(_stamp(x_test[others])), -1) == TARGET)
  assert accuracy > 0.75 and attack > 0.95, (accuracy, attack)
  return logits_fn, x_test, y_test


@pytest.fixture(scope="module")
def vmapped(backdoored):
  logits_fn, x, _ = backdoored
  return nc.neural_cleanse(jax.random.key(1), logits_fn, x, **NC_SETTINGS)


def test_the_backdoor_target_has_the_smallest_mask_and_is_the_only_outlier(vmapped):
  norms = np.asarray(vmapped.l1_norm)
  assert norms.shape == (10,) and int(np.argmin(norms)) == TARGET, norms
  anomaly = nc.anomaly_index(norms)
  assert float(anomaly.index[TARGET]) > 2.0 and float(anomaly.min_index) > 2.0, anomaly
  np.testing.assert_array_equal(anomaly.flagged, np.arange(10) == TARGET)
  # The reversed trigger sits in the backdoor's corner and works.
  mask = np.asarray(vmapped.mask[TARGET])
  assert mask[-2:, -2:].sum() > 0.5 * mask.sum(), np.round(mask, 2)
  assert float(vmapped.attack_success_rate[TARGET]) > 0.95
  assert np.all(np.asarray(vmapped.found))
  masks, patterns = np.asarray(vmapped.mask), np.asarray(vmapped.pattern)
  assert masks.min() >= 0 and masks.max() <= 1 and patterns.min() >= 0 and patterns.max() <= 1
  np.testing.assert_allclose(norms, masks.sum(axis=(1, 2)), rtol=1e-6)
  np.testing.assert_array_equal(vmapped.target, np.arange(10))


def test_vmapped_and_looped_classes_agree(backdoored, vmapped):
  logits_fn, x, _ = backdoored
  looped = nc.neural_cleanse(jax.random.key(1), logits_fn, x, batching="loop", **NC_SETTINGS)
  for name in ("num_epochs", "found", "target"):
    np.testing.assert_array_equal(getattr(looped, name), getattr(vmapped, name), err_msg=name)
  np.testing.assert_allclose(looped.cost, vmapped.cost, rtol=1e-6)
  np.testing.assert_allclose(looped.mask, vmapped.mask, atol=1e-4)
  np.testing.assert_allclose(looped.l1_norm, vmapped.l1_norm, rtol=1e-4)
  # The pattern only matters where the mask is on.
  np.testing.assert_allclose(looped.mask[..., None] * looped.pattern,
                             vmapped.mask[..., None] * vmapped.pattern, atol=1e-3)
  np.testing.assert_allclose(looped.attack_success_rate, vmapped.attack_success_rate, atol=0.01)


def test_map_batching_is_the_single_class_function_with_folded_keys():
  # ('vmap' against 'loop' is checked on the MLP above.)
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(16, 3)).astype(np.float32))
  logits_fn = jax.tree_util.Partial(lambda w, v: v.reshape(v.shape[0], -1) @ w, w)
  x = rng.uniform(size=(40, 4, 4, 1)).astype(np.float32)
  settings = {"num_epochs": 12, "batch_size": 8, "batches_per_epoch": 2, "patience": 2}
  key = jax.random.key(3)
  mapped = nc.neural_cleanse(key, logits_fn, x, num_classes=3, targets=[2, 0], batching="map",
                             **settings)
  np.testing.assert_array_equal(mapped.target, [2, 0])
  # Class t of neural_cleanse is the single-class function with key fold_in(key, t),
  # here jitted with a traced target.
  single = jax.jit(functools.partial(nc.reverse_engineer_trigger, logits_fn=logits_fn,
                                     x_clean=x, **settings))
  for row, target in enumerate([2, 0]):
    alone = single(jax.random.fold_in(key, target), target=target)
    np.testing.assert_allclose(alone.mask, mapped.mask[row], atol=1e-5)
    np.testing.assert_allclose(alone.pattern, mapped.pattern[row], atol=1e-4)
    assert int(alone.num_epochs) == int(mapped.num_epochs[row])
    assert int(alone.target) == target


def test_neural_cleanse_rejects_bad_settings():
  x = np.zeros((4, 4, 4, 1), np.float32)
  logits_fn = lambda v: v.reshape(v.shape[0], -1)[:, :3]  # noqa: E731
  with pytest.raises(ValueError, match="Unknown batching 'vmapp'.*Did you mean 'vmap'"):
    nc.neural_cleanse(jax.random.key(0), logits_fn, x, num_classes=3, batching="vmapp")
  with pytest.raises(ValueError, match="targets must be distinct"):
    nc.neural_cleanse(jax.random.key(0), logits_fn, x, num_classes=3, targets=[1, 1])
  with pytest.raises(ValueError, match=r"targets holds labels in \[0, 3\]"):
    nc.neural_cleanse(jax.random.key(0), logits_fn, x, num_classes=3, targets=[0, 3])
  with pytest.raises(ValueError, match="cost_multiplier must be a number > 1"):
    nc.neural_cleanse(jax.random.key(0), logits_fn, x, num_classes=3, cost_multiplier=1.0)
  with pytest.raises(ValueError, match=r"attack_success_threshold must lie in \(0, 1\]"):
    nc.neural_cleanse(jax.random.key(0), logits_fn, x, num_classes=3,
                      attack_success_threshold=1.5)
  with pytest.raises(ValueError, match=r"x_clean must lie in \[0.0, 1.0\]"):
    nc.neural_cleanse(jax.random.key(0), logits_fn, x + 2.0, num_classes=3)


# ------------------------------------------------------------------ outliers


def test_anomaly_index_hand_example():
  # Median 10; absolute deviations 9, 0, 1, 2, 1, 0 with median 1, so MAD = 1.4826.
  anomaly = nc.anomaly_index(np.array([1.0, 10.0, 11.0, 12.0, 9.0, 10.0]))
  np.testing.assert_allclose(anomaly.index, np.array([9, 0, 1, 2, 1, 0]) / 1.4826, rtol=1e-6)
  np.testing.assert_array_equal(anomaly.flagged, [True, False, False, False, False, False])
  assert float(anomaly.median) == 10.0
  np.testing.assert_allclose(anomaly.mad, 1.4826, rtol=1e-6)
  np.testing.assert_allclose(anomaly.min_index, 9 / 1.4826, rtol=1e-6)
  # A large norm is an outlier too, but never a backdoor target.
  large = nc.anomaly_index(np.array([10.0, 10.0, 11.0, 9.0, 30.0]))
  assert float(large.index[4]) > 2 and not np.any(large.flagged)
  # MAD 0: equal norms score 0, any other norm infinitely far.
  flat = nc.anomaly_index(np.array([5.0, 5.0, 5.0, 1.0]))
  np.testing.assert_array_equal(flat.index, [0, 0, 0, np.inf])
  np.testing.assert_array_equal(flat.flagged, [False, False, False, True])
  with pytest.raises(ValueError, match="at least 2 mask norms"):
    nc.anomaly_index(np.array([1.0]))


# ---------------------------------------------------------------- unlearning


def test_unlearning_set_stamps_a_fraction_and_keeps_the_true_labels():
  rng = np.random.default_rng(1)
  x = rng.uniform(size=(50, 5, 5, 2)).astype(np.float32)
  y = rng.integers(0, 10, 50).astype(np.int32)
  mask = rng.uniform(size=(5, 5)).astype(np.float32)
  pattern = rng.uniform(size=(5, 5, 2)).astype(np.float32)
  images, labels, stamped = jax.jit(nc.unlearning_set)(jax.random.key(0), x, y, mask, pattern)
  np.testing.assert_array_equal(labels, y)
  assert int(np.sum(stamped)) == 10
  expected = (1 - mask[..., None]) * x + mask[..., None] * pattern
  np.testing.assert_allclose(images[stamped], expected[np.asarray(stamped)], rtol=1e-6)
  np.testing.assert_array_equal(images[~stamped], x[~np.asarray(stamped)])
  _, _, none = nc.unlearning_set(jax.random.key(0), x, y, mask, pattern, fraction=0.0)
  assert not np.any(none)
  with pytest.raises(ValueError, match=r"mask must have shape \(5, 5\)"):
    nc.unlearning_set(jax.random.key(0), x, y, mask[:4], pattern)
  with pytest.raises(ValueError, match=r"fraction must be a number in \[0, 1\]"):
    nc.unlearning_set(jax.random.key(0), x, y, mask, pattern, fraction=1.5)
