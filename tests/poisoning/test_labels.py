"""Label flipping: counts, classes, reproducibility, the surrogate, greedy beats random."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from certjax import data as data_lib
from certjax.poisoning import labels as labels_lib


@functools.lru_cache(maxsize=None)
def _digits():
  """500 real MNIST training digits average-pooled to 7x7 (49 features), split
  300 training / 200 validation."""
  x, y = data_lib.load_arrays({"name": "mnist5k"}, "train", 0, 500)
  x = x.reshape(-1, 7, 4, 7, 4).mean(axis=(2, 4)).reshape(500, 49)
  return x[:300], y[:300], x[300:], y[300:]


def _synthetic_labels(n=1000, num_classes=10, seed=0):
  return np.random.default_rng(seed).integers(0, num_classes, n).astype(np.int32)


@pytest.mark.parametrize("rate", [0.0, 0.2505, 1.0])
def test_random_flips(rate):
  y = _synthetic_labels()
  indices, new = labels_lib.random_flips(jax.random.key(0), y, rate=rate, num_classes=10)
  indices, new = np.asarray(indices), np.asarray(new)
  assert len(indices) == len(new) == round(rate * len(y))
  assert np.all(np.diff(indices) > 0) and indices.dtype == new.dtype == np.int32
  assert np.all(new != y[indices]) and new.min(initial=0) >= 0 and new.max(initial=0) < 10
  again = labels_lib.random_flips(jax.random.key(0), y, rate=rate, num_classes=10)
  np.testing.assert_array_equal(again[0], indices)
  np.testing.assert_array_equal(again[1], new)
  jitted = jax.jit(lambda key, y: labels_lib.random_flips(key, y, rate=rate, num_classes=10))(
      jax.random.key(0), y)
  np.testing.assert_array_equal(jitted[1], new)


def test_random_flips_pick_the_other_classes_uniformly():
  y = _synthetic_labels(9000)
  indices, new = labels_lib.random_flips(jax.random.key(1), y, rate=1.0, num_classes=10)
  offsets = (np.asarray(new) - y[np.asarray(indices)]) % 10
  counts = np.bincount(offsets, minlength=10)
  # 9000 draws over 9 offsets: 1000 each, standard deviation ~31.
  assert counts[0] == 0 and np.all(np.abs(counts[1:] - 1000) < 150), counts


@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
def test_pairwise_flips_only_from_the_source(rate):
  y = _synthetic_labels()
  source, target = 2, 5
  indices, new = labels_lib.pairwise_flips(jax.random.key(0), y, rate=rate, source=source,
                                           target=target, num_classes=10)
  indices = np.asarray(indices)
  # The rate is a share of the source class, not of the training set.
  assert len(indices) == round(rate * np.sum(y == source))
  assert np.all(y[indices] == source) and np.all(np.asarray(new) == target)
  assert np.all(np.diff(indices) > 0)
  if rate == 1.0:
    np.testing.assert_array_equal(indices, np.flatnonzero(y == source))


def _objective(theta, x, y, l2):
  """The surrogate's objective and its gradient in float64 NumPy, theta = [W (49 x 10),
  b (10)] flat."""
  weights, bias = theta[:-10].reshape(-1, 10), theta[-10:]
  logits = x @ weights + bias
  shifted = logits - logits.max(1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
  value = -log_probs[np.arange(len(y)), y].mean() + 0.5 * l2 * np.sum(theta ** 2)
  residual = (np.exp(log_probs) - np.eye(10)[y]) / len(y)
  grad = np.concatenate([(x.T @ residual).ravel(), residual.sum(0)]) + l2 * theta
  return value, grad


def test_fit_surrogate_reaches_the_scipy_optimum():
  x, y, x_val, _ = _digits()
  model = labels_lib.fit_surrogate(x, y, num_classes=10, l2=1e-3)
  x64 = x.astype(np.float64)
  oracle = scipy.optimize.minimize(_objective, np.zeros(50 * 10), args=(x64, y, 1e-3),
                                   jac=True, method="L-BFGS-B",
                                   options={"maxiter": 2000, "gtol": 1e-9})
  theta = np.concatenate([np.asarray(model.weights, np.float64).ravel(),
                          np.asarray(model.bias, np.float64)])
  value = _objective(theta, x64, y, 1e-3)[0]
  assert oracle.success and value - oracle.fun < 1e-5, (value, oracle.fun)
  # Near-ties aside, the two fits predict alike on held-out digits.
  weights = oracle.x[:-10].reshape(49, 10)
  agree = np.mean(np.argmax(model.logits(x_val), 1)
                  == np.argmax(x_val @ weights + oracle.x[-10:], 1))
  assert agree >= 0.97, agree


def test_greedy_flips_hurt_more_than_random_flips():
  x, y, x_val, y_val = _digits()
  budget = 30  # 10% of the training set

  def validation_accuracy(labels):
    model = labels_lib.fit_surrogate(x, labels, num_classes=10, num_steps=50)
    return float(np.mean(np.argmax(model.logits(x_val), 1) == y_val))

  indices, new = labels_lib.greedy_flips(x, y, budget=budget, num_classes=10,
                                         validation=(x_val, y_val))
  indices, new = np.asarray(indices), np.asarray(new)
  assert len(indices) == len(new) == budget and np.all(np.diff(indices) > 0)
  assert np.all(new != y[indices]) and new.min() >= 0 and new.max() < 10
  clean = validation_accuracy(y)
  greedy = validation_accuracy(jnp.asarray(y).at[indices].set(new))
  random = []
  for seed in range(4):
    i, n = labels_lib.random_flips(jax.random.key(seed), y, rate=budget / len(y),
                                   num_classes=10)
    random.append(validation_accuracy(jnp.asarray(y).at[i].set(n)))
  print(f"surrogate validation accuracy: clean {clean:.3f}, {budget} random flips "
        f"{np.mean(random):.3f} (worst of 4: {min(random):.3f}), {budget} greedy flips "
        f"{greedy:.3f}")
  assert greedy < min(random) - 0.05
  assert clean - greedy > 2 * (clean - np.mean(random))


def test_errors():
  y = _synthetic_labels(50)
  key = jax.random.key(0)
  x = np.zeros((50, 4), np.float32)
  for rate in (-0.1, 1.5):
    with pytest.raises(ValueError, match=r"rate must be a number in \[0, 1\]"):
      labels_lib.random_flips(key, y, rate=rate, num_classes=10)
    with pytest.raises(ValueError, match=r"rate must be a number in \[0, 1\]"):
      labels_lib.pairwise_flips(key, y, rate=rate, source=0, target=1)
  for budget in (-1, 51, 2.0):
    with pytest.raises(ValueError, match=r"budget must be an integer number of flips in "
                                         r"\[0, 50\]"):
      labels_lib.greedy_flips(x, y, budget=budget, num_classes=10)
  with pytest.raises(ValueError, match=r"target must be an integer class in \[0, 9\]"):
    labels_lib.pairwise_flips(key, y, rate=0.1, source=0, target=10, num_classes=10)
  with pytest.raises(ValueError, match="source and target must be different"):
    labels_lib.pairwise_flips(key, y, rate=0.1, source=3, target=3)
  with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
    labels_lib.random_flips(key, y, rate=0.1, num_classes=1)
  with pytest.raises(ValueError, match=r"labels holds labels in \[0, 9\] but must lie in "
                                       r"\[0, 4\]"):
    labels_lib.random_flips(key, y, rate=0.1, num_classes=5)
  with pytest.raises(ValueError, match="needs concrete labels"):
    jax.jit(lambda y: labels_lib.pairwise_flips(key, y, rate=0.5, source=0, target=1))(y)
  with pytest.raises(ValueError, match="features has 49 rows but there are 50 labels"):
    labels_lib.greedy_flips(x[:49], y, budget=3, num_classes=10)
  with pytest.raises(ValueError, match="l2 must be a finite number > 0"):
    labels_lib.fit_surrogate(x, y, num_classes=10, l2=0.0)
  with pytest.raises(ValueError, match="validation features have 3 dimensions"):
    labels_lib.greedy_flips(x, y, budget=3, num_classes=10, validation=(x[:, :3], y))
  empty = labels_lib.greedy_flips(x, y, budget=0, num_classes=10)
  assert empty[0].shape == empty[1].shape == (0,)
