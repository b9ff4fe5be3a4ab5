"""Defensive distillation's loss and targets against a float64 NumPy transcription."""

import jax
import numpy as np
import pytest

from certjax.defences import distillation


def _log_softmax64(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_soft_labels_and_loss_match_numpy():
  rng = np.random.default_rng(0)
  teacher = rng.normal(size=(6, 5)) * 30
  student = rng.normal(size=(6, 5)) * 30
  for temperature in (1.0, 20.0, 100.0):
    targets = np.exp(_log_softmax64(teacher / temperature))
    np.testing.assert_allclose(distillation.soft_labels(teacher, temperature), targets,
                               rtol=1e-5, atol=1e-7)
    expected = -np.mean(np.sum(targets * _log_softmax64(student / temperature), -1))
    got = distillation.distillation_loss(student, targets, temperature)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_high_temperature_training_saturates_the_deployed_softmax():
  # The loss at T is invariant to scaling logits and T together: a student
  # that fits soft targets at T = 100 has logits ~100 times those at T = 1,
  # so its softmax at T = 1 saturates and the cross-entropy gradient vanishes.
  logits_at_1 = np.array([[2.0, 0.5, -1.0]])
  targets = np.exp(_log_softmax64(logits_at_1))
  assert float(distillation.distillation_loss(100 * logits_at_1, targets, 100.0)) == \
      pytest.approx(float(distillation.distillation_loss(logits_at_1, targets, 1.0)), rel=1e-5)
  grad = jax.grad(lambda z: -jax.nn.log_softmax(z)[0, 0])(np.float32(100) * logits_at_1)
  assert np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize("temperature", [0, -1, float("nan"), float("inf"), "hot"])
def test_bad_temperature(temperature):
  with pytest.raises(ValueError, match="temperature"):
    distillation.soft_labels(np.zeros((1, 3)), temperature)


def test_shape_mismatch():
  with pytest.raises(ValueError, match="same shape"):
    distillation.distillation_loss(np.zeros((2, 3)), np.zeros((2, 4)), 10.0)
