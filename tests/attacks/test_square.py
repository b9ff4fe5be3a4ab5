"""Square attack: query budget, early termination, strength, L2 patterns, schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from certjax import attacks
from certjax.attacks.square import eta_pattern, window_fraction
from tests.attacks.conftest import IMAGE_SHAPE, fast_jit, linear_apply


def test_square_respects_the_budget_and_lowers_accuracy(mnist, compiled_attack, predict):
  x, y = mnist["x_test"], mnist["y_test"]
  clean = np.asarray(predict(x)) == y
  for norm, eps in (("linf", 0.1), ("l2", 1.0)):
    x_adv, info = compiled_attack("square", norm)(jax.random.key(0), x, y, np.float32(eps))
    queries, success = np.asarray(info.num_queries), np.asarray(info.success)
    robust = np.asarray(predict(x_adv)) == y
    assert queries.min() >= 1 and queries.max() <= 100
    # Reported success is real misclassification of the returned point.
    np.testing.assert_array_equal(success, ~robust)
    # Examples never fooled spent the whole budget; fooled ones stopped querying.
    assert np.all(queries[~success] == 100)
    assert np.all(queries[success] < 100) or success.sum() == 0
    assert np.mean(robust) < np.mean(clean) - 0.2


def test_square_stops_querying_once_every_example_is_fooled():
  # Count model evaluations from inside the compiled loop.
  calls = []
  w = jnp.asarray(np.random.default_rng(0).normal(size=(49, 3)), jnp.float32)

  def model(x):
    jax.debug.callback(lambda: calls.append(1))
    return linear_apply({"w": w, "b": jnp.zeros(3)}, x)

  x = np.random.default_rng(1).uniform(0.3, 0.7, (16,) + IMAGE_SHAPE).astype(np.float32)
  y = np.asarray(jnp.argmax(model(x), -1))
  calls.clear()
  run = fast_jit(lambda eps: attacks.square(jax.random.key(0), model, x, y, eps=eps,
                                            num_queries=300, return_info=True))
  x_adv, info = run(np.float32(0.3))
  jax.effects_barrier()
  assert np.all(np.asarray(info.success))
  # One batched evaluation per iteration, plus the initial one.
  assert len(calls) == int(np.max(info.num_queries)) < 300
  np.testing.assert_array_equal(np.argmax(model(x_adv), -1) != y, True)


def _reference_eta(side):
  """The nested-rectangle pattern built square by square, as described in the paper."""
  def rectangles(rows, cols):
    delta = np.zeros((rows, cols))
    if rows == 0:
      return delta
    r0, c0 = rows // 2, cols // 2
    for k in range(max(rows // 2 + 1, cols // 2 + 1)):
      delta[max(r0 - k, 0):min(r0 + k + 1, rows), max(c0 - k, 0):min(c0 + k + 1, cols)] += \
          1.0 / (k + 1) ** 2
    return delta / np.sqrt(np.sum(delta ** 2))

  delta = np.concatenate([rectangles(side // 2, side), -rectangles(side - side // 2, side)])
  return delta / np.sqrt(np.sum(delta ** 2))


def test_l2_eta_pattern_matches_the_square_by_square_construction():
  for side in range(1, 12):
    np.testing.assert_allclose(eta_pattern(side), _reference_eta(side), atol=1e-12)
    assert abs(np.linalg.norm(eta_pattern(side)) - 1.0) < 1e-12


def _reference_p_selection(p_init, it, n_queries, rescale_schedule):
  """p_selection of square.py in fra31/auto-attack, transcribed."""
  if rescale_schedule:
    it = int(it / n_queries * 10000)
  for p, (low, high) in enumerate(((10, 50), (50, 200), (200, 500), (500, 1000),
                                   (1000, 2000), (2000, 4000), (4000, 6000), (6000, 8000)),
                                  start=1):
    if low < it <= high:
      return p_init / 2 ** p
  return p_init / 512 if it > 8000 else p_init


def test_window_schedule_matches_the_reference_with_and_without_rescaling():
  # num_queries counts the initial query: num_queries = n + 1 runs the
  # reference's n_queries = n iterations (0 .. n - 1).
  for n in (37, 997, 1000, 5000, 10000):
    for rescale in (True, False):
      iterations = range(n) if n <= 1000 else range(0, n, 7)
      ours = [window_fraction(i, p_init=0.8, num_queries=n + 1, rescale_schedule=rescale)
              for i in iterations]
      ref = [_reference_p_selection(0.8, i, n, rescale) for i in iterations]
      assert ours == ref, (n, rescale)
  # AutoAttack's standard budget without rescaling stops part-way through the
  # schedule (p_init / 128 after iteration 4000); rescaled it reaches p_init / 512.
  assert window_fraction(4999, p_init=0.8, num_queries=5001, rescale_schedule=False) == 0.8 / 128
  assert window_fraction(4999, p_init=0.8, num_queries=5001, rescale_schedule=True) == 0.8 / 512
  # Rescaled to 10,000, iteration 6 of 5,000 counts as 12 (> 10): p halves sooner.
  assert window_fraction(6, p_init=0.8, num_queries=5001, rescale_schedule=False) == 0.8
  assert window_fraction(6, p_init=0.8, num_queries=5001, rescale_schedule=True) == 0.4


def test_square_without_rescaling_stays_in_the_ball(trained_mlp, mnist):
  model = trained_mlp[0]
  x, y = mnist["x_test"][:64], mnist["y_test"][:64]
  run = fast_jit(lambda rescale: attacks.square(jax.random.key(0), model, x, y, eps=0.05,
                                                num_queries=60, rescale_schedule=rescale),
                 static_argnums=0)
  fixed, rescaled = np.asarray(run(False)), np.asarray(run(True))
  for out in (fixed, rescaled):
    assert np.abs(out - x).max() <= 0.05 + 1e-6 and out.min() >= 0 and out.max() <= 1
  # 60 queries: rescaled, the window shrinks from iteration 1 on; fixed, only
  # after iteration 10, so the searches differ.
  assert np.any(fixed != rescaled)
  with pytest.raises(ValueError, match="rescale_schedule must be True or False"):
    attacks.make_square(rescale_schedule="no")
