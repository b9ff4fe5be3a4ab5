"""Attack objectives: hand-computed values, class count from the logits."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from tests.attacks.conftest import fast_jit
from certjax.attacks import losses

cross_entropy = fast_jit(losses.cross_entropy)
cw_margin = fast_jit(losses.cw_margin)
dlr = fast_jit(losses.dlr)


def test_cross_entropy_untargeted_and_targeted():
  logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]], np.float32)
  y, t = np.array([0, 2]), np.array([1, 0])
  log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  np.testing.assert_allclose(cross_entropy(logits, y), -log_p[[0, 1], y], rtol=1e-5)
  np.testing.assert_allclose(cross_entropy(logits, y, t), log_p[[0, 1], t], rtol=1e-5)


def test_cw_margin_by_hand():
  logits = np.array([[1.0, 3.0, 2.0], [5.0, 1.0, 0.0]], np.float32)
  np.testing.assert_allclose(cw_margin(logits, np.array([0, 0])), [2.0, -4.0])
  np.testing.assert_allclose(cw_margin(logits, np.array([0, 0]), np.array([2, 1])),
                             [-1.0, -4.0])
  np.testing.assert_allclose(cw_margin(logits, np.array([0, 0]), confidence=1.0),
                             [1.0, -4.0])


def test_dlr_by_hand_and_invariances():
  logits = np.array([[4.0, 1.0, 2.0, 0.0]], np.float32)
  # Untargeted, y = 1: -(z_y - max_other) / (z_(1) - z_(3)) = -(1 - 4) / (4 - 1).
  np.testing.assert_allclose(dlr(logits, np.array([1])), [1.0], rtol=1e-6)
  # Targeted, y = 0, t = 2: -(4 - 2) / (4 - (1 + 0) / 2).
  np.testing.assert_allclose(dlr(logits, np.array([0]), np.array([2])), [-2 / 3.5],
                             rtol=1e-6)
  z = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
  y, t = np.arange(5) % 7, (np.arange(5) + 3) % 7
  for target in (None, t):
    base = dlr(z, y, target)
    np.testing.assert_allclose(dlr(3.0 * z + 2.0, y, target), base, rtol=1e-4)


@fast_jit
def _all_losses(z, y, t):
  return [loss(z, y, target) for loss in losses.LOSSES.values() for target in (None, t)]


@pytest.mark.parametrize("num_classes", [5, 100])
def test_number_of_classes_comes_from_the_logits(num_classes):
  z = np.random.default_rng(num_classes).normal(size=(3, num_classes)).astype(np.float32)
  y = np.array([0, num_classes - 1, num_classes // 2])
  t = (y + 1) % num_classes
  values = _all_losses(z, y, t)
  assert all(v.shape == (3,) and np.all(np.isfinite(v)) for v in values)
  margin, targeted_margin = np.asarray(values[2]), np.asarray(values[3])
  expected = np.array([np.max(np.delete(z[i], y[i])) - z[i, y[i]] for i in range(3)])
  np.testing.assert_allclose(margin, expected, rtol=1e-6)
  expected = np.array([z[i, t[i]] - np.max(np.delete(z[i], t[i])) for i in range(3)])
  np.testing.assert_allclose(targeted_margin, expected, rtol=1e-6)


def test_dlr_needs_enough_classes():
  with pytest.raises(ValueError, match="at least 3 classes; the logits have 2"):
    losses.dlr(jnp.zeros((1, 2)), jnp.zeros(1, int))
  with pytest.raises(ValueError, match="targeted DLR loss needs at least 4 classes"):
    losses.dlr(jnp.zeros((1, 3)), jnp.zeros(1, int), jnp.ones(1, int))


def test_is_successful_and_get_loss():
  logits = np.array([[0.0, 1.0, 0.5], [2.0, 1.0, 0.0]])
  np.testing.assert_array_equal(losses.is_successful(logits, np.array([1, 1])), [False, True])
  np.testing.assert_array_equal(losses.is_successful(logits, np.array([1, 1]), np.array([1, 0])),
                                [True, True])
  assert losses.get_loss("dlr") is losses.dlr
  with pytest.raises(ValueError, match="Unknown loss 'xent'.*'ce', 'cw', 'dlr'"):
    losses.get_loss("xent")


def test_loss_name():
  def my_margin(logits, labels, target=None):
    return losses.cw_margin(logits, labels, target)

  assert losses.loss_name("dlr") == "dlr"
  assert losses.loss_name(my_margin) == "my_margin"
  assert losses.loss_name(functools.partial(losses.cw_margin, confidence=1.0)) == "custom"
