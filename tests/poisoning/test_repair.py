"""Fine-tuning, fine-pruning's pruning and anti-backdoor learning's losses, on hand examples."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from certjax.poisoning import repair

# ------------------------------------------------------------------ fine-tuning


def _linear_loss(params, state, x, y, key):
  """Softmax regression; the state counts steps (a stand-in for BatchNorm statistics)."""
  del key
  logits = x @ params["w"] + params["b"]
  loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
  return loss, {"count": state["count"] + 1}


def test_fine_tune_matches_a_python_loop_over_the_same_batches():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(23, 5)).astype(np.float32)
  y = rng.integers(0, 3, 23).astype(np.int32)
  params = {"w": jnp.zeros((5, 3)), "b": jnp.zeros(3)}
  optimizer = optax.sgd(0.1, momentum=0.9)
  key = jax.random.key(4)
  result = jax.jit(lambda k, p: repair.fine_tune(
      k, _linear_loss, p, x, y, optimizer=optimizer, num_epochs=3, batch_size=5,
      model_state={"count": jnp.zeros((), jnp.int32)}))(key, params)
  # The reference: an independent NumPy loop over the documented batch order
  # (a permutation per epoch from split(order_key, epochs), remainder dropped).
  order_key, _ = jax.random.split(key)
  w, b = np.zeros((5, 3)), np.zeros(3)
  vw, vb = np.zeros_like(w), np.zeros_like(b)
  losses = []
  for epoch_key in jax.random.split(order_key, 3):
    order = np.asarray(jax.random.permutation(epoch_key, 23))
    for i in range(4):
      idx = order[5 * i:5 * i + 5]
      logits = x[idx] @ w + b
      p = np.exp(logits - logits.max(1, keepdims=True))
      p /= p.sum(1, keepdims=True)
      losses.append(-np.mean(np.log(p[np.arange(5), y[idx]])))
      g = (p - np.eye(3)[y[idx]]) / 5
      vw, vb = 0.9 * vw + x[idx].T @ g, 0.9 * vb + g.sum(0)
      w, b = w - 0.1 * vw, b - 0.1 * vb
  np.testing.assert_allclose(result.losses, losses, rtol=1e-5)
  np.testing.assert_allclose(result.params["w"], w, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(result.params["b"], b, rtol=1e-4, atol=1e-6)
  assert int(result.model_state["count"]) == 12
  assert losses[-1] < losses[0]


def test_fine_tune_rejects_bad_settings():
  params = {"w": jnp.zeros((5, 3)), "b": jnp.zeros(3)}
  x, y = np.zeros((4, 5), np.float32), np.zeros(4, np.int32)
  kwargs = dict(optimizer=optax.sgd(0.1), num_epochs=1, model_state={"count": 0})
  with pytest.raises(ValueError, match="same N"):
    repair.fine_tune(jax.random.key(0), _linear_loss, params, x, y[:3], batch_size=2, **kwargs)
  with pytest.raises(ValueError, match="batch_size must be at most the 4"):
    repair.fine_tune(jax.random.key(0), _linear_loss, params, x, y, batch_size=5, **kwargs)
  with pytest.raises(ValueError, match="num_epochs"):
    repair.fine_tune(jax.random.key(0), _linear_loss, params, x, y, batch_size=2,
                     optimizer=optax.sgd(0.1), num_epochs=0)


# ------------------------------------------------------------------ fine-pruning


def test_pruning_order_sorts_channels_by_mean_clean_activation():
  # [examples, height, width, channels]: channel means 2.5, 0, 1, 0.25 (and a tie).
  acts = np.zeros((2, 1, 2, 5), np.float32)
  acts[..., 0] = [[[2.0, 3.0]], [[2.0, 3.0]]]
  acts[..., 2] = 1.0
  acts[0, 0, 0, 3] = 1.0
  np.testing.assert_array_equal(repair.pruning_order(acts), [1, 4, 3, 2, 0])
  np.testing.assert_array_equal(jax.jit(repair.pruning_order)(acts), [1, 4, 3, 2, 0])
  # Dense layers: [examples, units].
  np.testing.assert_array_equal(repair.pruning_order(np.array([[3.0, 1.0, 2.0]])), [1, 2, 0])
  with pytest.raises(ValueError, match="rank >= 2"):
    repair.pruning_order(np.ones(3, np.float32))


def test_pruning_mask_prunes_the_first_fraction_of_the_order():
  order = np.array([3, 0, 4, 1, 2])
  np.testing.assert_array_equal(repair.pruning_mask(order, 0.4), [0, 1, 1, 0, 1])
  np.testing.assert_array_equal(repair.pruning_mask(order, 0.0), np.ones(5))
  np.testing.assert_array_equal(repair.pruning_mask(order, 1.0), np.zeros(5))
  # 0.29 * 100 is 28.999999999999996 in floating point: still 29 channels.
  assert float(repair.pruning_mask(np.arange(100), 0.29).sum()) == 71
  with pytest.raises(ValueError, match=r"fraction must be a number in \[0, 1\]"):
    repair.pruning_mask(order, 1.2)


def test_prune_until_stops_before_the_accuracy_drop_exceeds_the_allowance():
  order = np.array([2, 0, 3, 1])
  seen = []

  def evaluate(mask):
    mask = np.asarray(mask)
    seen.append(mask)
    # Channel 2 and 0 are dormant; pruning 3 costs 3 points, pruning 1 costs 30.
    return 0.9 - 0.03 * (mask[3] == 0) - 0.3 * (mask[1] == 0)

  result = repair.prune_until(evaluate, order, max_accuracy_drop=0.04)
  assert result.num_pruned == 3 and result.baseline == 0.9
  np.testing.assert_array_equal(result.mask, [0, 1, 0, 0])
  np.testing.assert_allclose(result.accuracies, [0.9, 0.9, 0.9, 0.87])
  # A 2-point allowance keeps channel 3: the 3-point drop is the first too far.
  tight = repair.prune_until(evaluate, order, max_accuracy_drop=0.02)
  assert tight.num_pruned == 2
  np.testing.assert_array_equal(tight.mask, [0, 1, 0, 1])
  np.testing.assert_allclose(tight.accuracies, [0.9, 0.9, 0.9, 0.87])
  # Two channels a step, and never more than half of them.
  stepped = repair.prune_until(evaluate, order, max_accuracy_drop=1.0, step=2, max_fraction=0.5)
  assert stepped.num_pruned == 2 and len(stepped.accuracies) == 2
  with pytest.raises(ValueError, match="one finite accuracy"):
    repair.prune_until(lambda mask: np.nan, order, max_accuracy_drop=0.04)
  with pytest.raises(ValueError, match="max_accuracy_drop must be >= 0"):
    repair.prune_until(evaluate, order, max_accuracy_drop=-0.1)


# ----------------------------------------------------------- anti-backdoor learning


def test_lga_loss_ascends_below_gamma_and_descends_above():
  losses = jnp.array([0.1, 0.5, 2.0])
  # sign(l - 0.5) l: -0.1, 0, 2.0.
  assert float(repair.lga_loss(losses, 0.5)) == pytest.approx(1.9 / 3)
  grad = jax.grad(lambda l: repair.lga_loss(l, 0.5))(losses)
  np.testing.assert_allclose(grad, np.array([-1.0, 0.0, 1.0]) / 3)
  # The authors' code: the sign of the batch mean (0.8667 > 0.5) for the whole batch.
  assert float(repair.lga_loss(losses, 0.5, reduction="batch")) == pytest.approx(2.6 / 3)
  np.testing.assert_allclose(
      jax.grad(lambda l: repair.lga_loss(l, 0.5, reduction="batch"))(losses), np.ones(3) / 3)
  np.testing.assert_allclose(
      jax.grad(lambda l: repair.lga_loss(l, 1.0, reduction="batch"))(losses), -np.ones(3) / 3)
  # Traced gamma under jit.
  assert float(jax.jit(repair.lga_loss)(losses, 3.0)) == pytest.approx(-2.6 / 3)
  with pytest.raises(ValueError, match="Unknown reduction 'batches'"):
    repair.lga_loss(losses, 0.5, reduction="batches")


def test_isolate_lowest_loss_and_unlearning_loss():
  losses = jnp.array([0.9, 0.05, 0.4, 0.01, 0.05, 2.0, 0.3, 0.7, 0.6, 0.2])
  isolated = repair.isolate_lowest_loss(losses, 0.3)
  np.testing.assert_array_equal(isolated.indices, [3, 1, 4])  # ties keep index order
  np.testing.assert_array_equal(np.flatnonzero(isolated.is_isolated), [1, 3, 4])
  jitted = jax.jit(repair.isolate_lowest_loss, static_argnums=1)(losses, 0.3)
  np.testing.assert_array_equal(jitted.indices, [3, 1, 4])
  assert repair.isolate_lowest_loss(losses, 0.01).indices.size == 0
  # Descent on the clean batch, ascent on the isolated one.
  value = repair.unlearning_loss(jnp.array([0.1, 0.3]), jnp.array([1.0, 2.0, 3.0]))
  assert float(value) == pytest.approx(2.0 - 0.2)
  grad_b, grad_c = jax.grad(repair.unlearning_loss, argnums=(0, 1))(
      jnp.array([0.1, 0.3]), jnp.array([1.0, 2.0, 3.0]))
  np.testing.assert_allclose(grad_b, [-0.5, -0.5])
  np.testing.assert_allclose(grad_c, np.ones(3) / 3)
  assert float(repair.unlearning_loss(jnp.array([0.1, 0.3]))) == pytest.approx(-0.2)
  with pytest.raises(ValueError, match="rank-1 array of per-example losses"):
    repair.unlearning_loss(jnp.ones((2, 2)))
