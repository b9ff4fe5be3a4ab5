"""Model extraction: the query interface, Square through it, Knockoff, exact ReLU recovery."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from certjax import attacks
from certjax.privacy import extraction as ex

# Tiny programs run for milliseconds: XLA's backend optimisations would only
# add compile time.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

# Probabilities chosen so each output mode changes them visibly.
PROBABILITIES = np.array([[0.62, 0.27, 0.11], [0.05, 0.14, 0.81]])


def _hand_logits(x):
  """Logits log(p) + 3 for the two rows of PROBABILITIES (the input selects the row)."""
  rows = np.asarray(x).reshape(len(x), -1)[:, 0].astype(int)
  return np.log(PROBABILITIES[rows]) + 3.0


def _rows(*indices):
  return np.asarray(indices, np.float64).reshape(-1, 1)


def test_queries_are_counted_and_the_budget_refuses_whole_batches():
  victim = ex.QueryInterface(_hand_logits, budget=5)
  victim.query(_rows(0, 1, 0))
  assert victim.queries_used == 3 and victim.queries_left == 2
  with pytest.raises(ex.QueryBudgetExceeded, match="3 of 5 queries used, a batch of 3"):
    victim.query(_rows(0, 1, 1))
  assert victim.queries_used == 3  # the refused batch was neither answered nor counted
  victim.query(_rows(1, 1))
  assert victim.queries_used == 5
  assert isinstance(ex.QueryBudgetExceeded("x"), ValueError)


def test_each_output_mode_answers_as_documented():
  x = _rows(0, 1)
  answer = lambda **kw: ex.QueryInterface(_hand_logits, **kw).query(x)
  np.testing.assert_allclose(answer(output="logits"), np.log(PROBABILITIES) + 3.0)
  np.testing.assert_allclose(answer(output="probabilities"), PROBABILITIES, atol=1e-15)
  np.testing.assert_allclose(answer(output="rounded", decimals=1),
                             [[0.6, 0.3, 0.1], [0.0, 0.1, 0.8]], atol=1e-15)
  np.testing.assert_allclose(answer(output="top_k", k=2),
                             [[0.62, 0.27, 0.0], [0.0, 0.14, 0.81]], atol=1e-15)
  np.testing.assert_allclose(answer(output="top_k", k=1), [[0.62, 0, 0], [0, 0, 0.81]],
                             atol=1e-15)
  np.testing.assert_array_equal(answer(output="label"), [0, 2])


@pytest.mark.parametrize("kwargs, message", [
    ({"output": "probs"}, "Unknown output 'probs'"),
    ({"output": "rounded"}, "needs decimals"),
    ({"output": "rounded", "decimals": -1}, "decimals must be an integer >= 0"),
    ({"output": "probabilities", "decimals": 2}, "applies only to output='rounded'"),
    ({"output": "top_k"}, "needs k"),
    ({"output": "label", "k": 1}, "applies only to output='top_k'"),
    ({"budget": 2.5}, "budget must be an integer"),
])
def test_bad_settings_are_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    ex.QueryInterface(_hand_logits, **kwargs)


def test_as_logits_fn_and_label_fn_run_under_jit_and_vmap_and_count():
  w = jnp.asarray(np.log(PROBABILITIES))  # one-hot rows select a row of PROBABILITIES
  model = lambda x: x @ w
  x = jnp.eye(2, dtype=jnp.float32)
  victim = ex.QueryInterface(model, output="top_k", k=2)
  scores = jax.jit(victim.as_logits_fn(floor=1e-6))(x)
  np.testing.assert_allclose(scores, np.log(np.maximum([[0.62, 0.27, 0], [0, 0.14, 0.81]],
                                                       1e-6)), rtol=1e-6)
  assert victim.queries_used == 2
  jax.vmap(victim.as_logits_fn())(jnp.stack([x, x, x]))  # 3 batches of 2 inputs
  assert victim.queries_used == 8
  labels = jax.jit(victim.label_fn())(x)
  np.testing.assert_array_equal(labels, [0, 2])
  assert labels.dtype == jnp.int32 and victim.queries_used == 10

  label_only = ex.QueryInterface(model, output="label", budget=3)
  np.testing.assert_allclose(jax.jit(label_only.as_logits_fn(floor=1e-4))(x),
                             [[0, np.log(1e-4), np.log(1e-4)],
                              [np.log(1e-4), np.log(1e-4), 0]], rtol=1e-6)
  # Inside compiled code the refusal surfaces as the error JAX raises for a
  # failed callback, carrying the QueryBudgetExceeded message.
  with pytest.raises((ValueError, jax.errors.JaxRuntimeError),
                     match="Query budget exceeded: 2 of 3"):
    jax.block_until_ready(jax.jit(label_only.label_fn())(x))


def test_square_through_the_interface_is_square_and_every_query_is_counted():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  model = lambda x: x.reshape(x.shape[0], -1) @ w
  x = rng.uniform(0.3, 0.7, (8, 4, 4, 1)).astype(np.float32)
  y = np.asarray(jnp.argmax(model(x), -1))
  run = lambda fn: fast_jit(lambda: attacks.square(
      jax.random.key(1), fn, x, y, eps=0.15, num_queries=40, return_info=True))()
  x_direct, info_direct = run(model)
  victim = ex.QueryInterface(model, output="logits")
  x_victim, info = run(victim.as_logits_fn())
  # Same scores, same random search: the same adversarial images.
  np.testing.assert_array_equal(x_victim, x_direct)
  np.testing.assert_array_equal(info.num_queries, info_direct.num_queries)
  # Square evaluates the whole batch every iteration (fooled examples are
  # masked, not removed), so the victim answers batch x (iterations + 1)
  # images: the batch times the largest per-example count Square reports.
  # Its own count (sum of per-example counts) covers only the unfooled ones.
  queries = np.asarray(info.num_queries)
  assert 0 < queries.sum() <= victim.queries_used == len(x) * queries.max()


def _relu_net(d, h, m, seed):
  rng = np.random.default_rng(seed)
  a1 = rng.normal(size=(d, h)) / np.sqrt(d)
  b1 = rng.normal(size=h) * 0.5
  a2 = rng.normal(size=(h, m)) / np.sqrt(h)
  b2 = rng.normal(size=m)
  logits = lambda x: np.maximum(np.asarray(x, np.float64).reshape(len(x), -1) @ a1 + b1,
                                0.0) @ a2 + b2
  return logits, a1, b1


@pytest.mark.parametrize("output", ["logits", "probabilities"])
def test_functionally_equivalent_extraction_recovers_a_relu_network(output):
  victim_fn, a1, b1 = _relu_net(20, 8, 3, seed=0)
  victim = ex.QueryInterface(victim_fn, output=output)
  copy = ex.extract_one_hidden_layer(jax.random.key(0), victim, (20,))
  assert copy.num_neurons_found == 8
  assert copy.queries_used == victim.queries_used > 0
  assert copy.up_to_shift == (output == "probabilities")
  # Each true neuron appears among the recovered ones up to positive
  # scaling: unit weight row and offset equal, sign included.
  scale = np.linalg.norm(a1, axis=0)
  best = np.argmax((a1 / scale).T @ copy.w1, axis=1)
  np.testing.assert_allclose(copy.w1[:, best], a1 / scale, atol=1e-6)
  np.testing.assert_allclose(copy.b1[best], b1 / scale, atol=1e-6)
  x = np.random.default_rng(1).uniform(0.0, 1.0, (1000, 20))
  error = ex.max_logit_difference(copy.logits, victim_fn, x, up_to_shift=copy.up_to_shift)
  assert error < 1e-6 * np.max(np.abs(victim_fn(x)))
  assert ex.agreement(copy.logits(x), victim_fn(x)) == 1.0
  np.testing.assert_allclose(jax.jit(copy.as_logits_fn())(x.astype(np.float32)),
                             copy.logits(x), rtol=1e-4, atol=1e-5)
  # Far from the data too: the copy is the same function, not a local fit.
  far = np.random.default_rng(2).normal(0.0, 10.0, (1000, 20))
  assert ex.max_logit_difference(copy.logits, victim_fn, far, up_to_shift=copy.up_to_shift) \
      < 1e-6 * np.max(np.abs(victim_fn(far)))


def test_extraction_fails_when_a_neuron_is_missed():
  # Stopping after 5 of 8 neurons: the copy must be measurably wrong, so
  # the test above can fail.
  victim_fn, _, _ = _relu_net(20, 8, 3, seed=0)
  copy = ex.extract_one_hidden_layer(jax.random.key(0), ex.QueryInterface(victim_fn,
                                                                          output="logits"),
                                     (20,), num_hidden=5)
  assert copy.num_neurons_found == 5 and copy.fit_residual > 1e-4
  x = np.random.default_rng(1).uniform(0.0, 1.0, (1000, 20))
  assert ex.max_logit_difference(copy.logits, victim_fn, x) > 1e-3


def test_extraction_refuses_defended_outputs_and_respects_the_budget():
  victim_fn, _, _ = _relu_net(20, 8, 3, seed=0)
  for kwargs in ({"output": "rounded", "decimals": 3}, {"output": "label"}):
    with pytest.raises(ValueError, match="must be 'logits' or 'probabilities'"):
      ex.extract_one_hidden_layer(jax.random.key(0), ex.QueryInterface(victim_fn, **kwargs),
                                  (20,))
  with pytest.raises(ex.QueryBudgetExceeded):
    ex.extract_one_hidden_layer(jax.random.key(0),
                                ex.QueryInterface(victim_fn, output="logits", budget=100), (20,))


def test_knockoff_fidelity_grows_with_budget_and_defences_cost_fidelity():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(8, 4)).astype(np.float32) * 2
  b = rng.normal(size=4).astype(np.float32)
  victim_fn = jax.jit(lambda x: x @ w + b)
  apply_fn = lambda p, x: x @ p["w"] + p["b"]
  init = {"w": jnp.zeros((8, 4)), "b": jnp.zeros(4)}
  surrogate = rng.normal(size=(600, 8)).astype(np.float32)
  x_test = rng.normal(size=(1000, 8)).astype(np.float32)
  y_test = np.asarray(jnp.argmax(victim_fn(x_test), -1))
  settings = {"budgets": (16, 512), "test_images": x_test, "test_labels": y_test,
              "batch_size": 32, "num_epochs": 20, "learning_rate": 0.05}
  curves = {}
  for name, kwargs in {"probabilities": {}, "rounded": {"decimals": 1},
                       "top_k": {"k": 1}, "label": {}}.items():
    victim = ex.QueryInterface(victim_fn, output=name, **kwargs)
    curves[name] = ex.budget_curve(jax.random.key(0), victim, surrogate, apply_fn, init,
                                   **settings)
    assert curves[name].queries_used == victim.queries_used == 512
  soft, label = curves["probabilities"], curves["label"]
  assert soft.fidelity[0] < soft.fidelity[1] and soft.fidelity[1] >= 0.99
  assert label.fidelity[0] < label.fidelity[1]
  # Measured (seed 0): soft 0.666 -> 1.0, rounded 0.646 -> 0.988, label
  # 0.55 -> 0.965. Label-only answers cost fidelity at both budgets.
  assert np.all(label.fidelity < soft.fidelity)
  assert np.all(curves["rounded"].fidelity <= soft.fidelity)
  # Top-1 probabilities renormalise to the one-hot labels: the same copy.
  np.testing.assert_array_equal(curves["top_k"].fidelity, label.fidelity)
  assert soft.victim_accuracy == 1.0

  # knockoff itself: spends exactly its budget, and checks it before
  # querying (budget 500 pads to the 512 above: the same compiled trainer).
  victim = ex.QueryInterface(victim_fn, output="probabilities", budget=520)
  result = ex.knockoff(jax.random.key(0), victim, surrogate, apply_fn, init, budget=500,
                       batch_size=32, num_epochs=20, learning_rate=0.05)
  assert result.queries_used == victim.queries_used == 500
  assert len(set(result.indices.tolist())) == 500
  metrics = ex.evaluate_copy(lambda x: apply_fn(result.params, x), victim_fn, x_test, y_test)
  assert metrics.fidelity == metrics.accuracy >= 0.99
  with pytest.raises(ex.QueryBudgetExceeded, match="needs 500 queries but the victim has 20"):
    ex.knockoff(jax.random.key(0), victim, surrogate, apply_fn, init, budget=500)
  assert victim.queries_used == 500


def _relu_net2(d, h1, h2, m, seed):
  """A random float64 f(x) = relu(relu(x a1 + b1) a2 + b2) a3 + b3 (the independent oracle)."""
  rng = np.random.default_rng(seed)
  a1 = rng.normal(size=(d, h1)) / np.sqrt(d)
  b1 = rng.normal(size=h1) * 0.5
  a2 = rng.normal(size=(h1, h2)) / np.sqrt(h1)
  b2 = rng.normal(size=h2) * 0.5
  a3 = rng.normal(size=(h2, m)) / np.sqrt(h2)
  b3 = rng.normal(size=m)

  def logits(x):
    hidden = np.maximum(np.asarray(x, np.float64).reshape(len(x), -1) @ a1 + b1, 0.0)
    return np.maximum(hidden @ a2 + b2, 0.0) @ a3 + b3

  return logits, a1, b1


@pytest.mark.parametrize("output, num_hidden", [("logits", None), ("probabilities", (10, 8))])
def test_functionally_equivalent_extraction_recovers_a_two_hidden_layer_network(output,
                                                                               num_hidden):
  victim_fn, a1, b1 = _relu_net2(20, 10, 8, 3, seed=0)
  victim = ex.QueryInterface(victim_fn, output=output)
  copy = ex.extract_two_hidden_layers(jax.random.key(0), victim, (20,), num_hidden=num_hidden)
  assert copy.num_neurons_found == (10, 8)
  assert copy.queries_used == sum(copy.queries_per_layer) == victim.queries_used > 0
  assert copy.up_to_shift == (output == "probabilities")
  assert max(copy.sign_residual) < 1e-9 and copy.fit_residual < 1e-9
  # The first layer is the victim's up to permutation and positive scaling.
  scale = np.linalg.norm(a1, axis=0)
  best = np.argmax((a1 / scale).T @ copy.w1, axis=1)
  assert sorted(best) == list(range(10))
  np.testing.assert_allclose(copy.w1[:, best], a1 / scale, atol=1e-6)
  np.testing.assert_allclose(copy.b1[best], b1 / scale, atol=1e-6)
  x = np.random.default_rng(1).uniform(0.0, 1.0, (1000, 20))
  error = ex.max_logit_difference(copy, victim_fn, x)  # up_to_shift from the copy
  assert error < 1e-6
  assert ex.agreement(copy.logits(x), victim_fn(x)) == 1.0
  np.testing.assert_allclose(jax.jit(copy.as_logits_fn())(x.astype(np.float32)),
                             copy.logits(x), rtol=1e-4, atol=1e-4)
  # Far from the data, where other first-layer patterns hold: the same function.
  far = np.random.default_rng(2).normal(0.0, 10.0, (1000, 20))
  assert ex.max_logit_difference(copy, victim_fn, far) < 1e-6 * np.max(np.abs(victim_fn(far)))


def test_two_layer_extraction_fails_loudly_when_neurons_are_missed():
  victim_fn, _, _ = _relu_net2(20, 10, 8, 3, seed=0)
  x = np.random.default_rng(1).uniform(0.0, 1.0, (1000, 20))
  # A first layer stopped at 7 of 10: its sign test and the copy are wrong.
  copy = ex.extract_two_hidden_layers(jax.random.key(0),
                                      ex.QueryInterface(victim_fn, output="logits"), (20,),
                                      num_hidden=(7, 8), max_lines=4)
  assert copy.num_neurons_found[0] == 7 and copy.sign_residual[0] > 1e-3
  assert ex.max_logit_difference(copy, victim_fn, x) > 1e-3
  # A second layer stopped at 5 of 8: the copy is wrong. Where depends on
  # which neurons came first: those left out may never switch on [0, 1]^20
  # (then the queries, and so the residuals, need not show it), but they
  # switch somewhere, so inputs spread far and wide see the error.
  copy = ex.extract_two_hidden_layers(jax.random.key(0),
                                      ex.QueryInterface(victim_fn, output="logits"), (20,),
                                      num_hidden=(10, 5))
  assert copy.num_neurons_found == (10, 5)
  far = np.random.default_rng(2).normal(0.0, 10.0, (1000, 20))
  assert ex.max_logit_difference(copy, victim_fn, far) > 1e-3


def test_two_layer_extraction_refuses_bad_inputs_and_respects_the_budget():
  victim_fn, _, _ = _relu_net2(20, 10, 8, 3, seed=0)
  extract = lambda victim, **kw: ex.extract_two_hidden_layers(jax.random.key(0), victim,
                                                              (20,), **kw)
  with pytest.raises(ValueError, match="contractive first layer"):
    extract(ex.QueryInterface(victim_fn, output="logits"), num_hidden=(20, 8))
  with pytest.raises(ValueError, match=r"the two hidden widths \(h1, h2\)"):
    extract(ex.QueryInterface(victim_fn, output="logits"), num_hidden=10)
  for kwargs in ({"output": "rounded", "decimals": 3}, {"output": "label"}):
    with pytest.raises(ValueError, match="must be 'logits' or 'probabilities'"):
      extract(ex.QueryInterface(victim_fn, **kwargs))
  victim = ex.QueryInterface(victim_fn, output="logits", budget=500)
  with pytest.raises(ex.QueryBudgetExceeded):
    extract(victim)
  assert victim.queries_used <= 500
