"""FGSM / FGM, PGD, MI-FGSM and APGD: geometry, strength, jit / vmap / sharding."""

import textwrap
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from certjax import attacks
from certjax.attacks.apgd import checkpoints, random_start
from certjax.attacks import norms
from certjax.attacks.pgd import schedule_multiplier
from tests._subprocess import run_on_cpu_devices
from tests.attacks.conftest import (BATCH, EPS, IMAGE_SHAPE, SUITE, fast_jit, linear_apply,
                                    mlp_apply)

ALL_ATTACKS = [(name, norm) for name in SUITE for norm in norms.NORMS
               if not (name == "square" and norm == "l1")]


def _np_norm(v, norm):
  flat = np.asarray(v, np.float64).reshape(len(v), -1)
  return {"linf": np.abs(flat).max(1), "l2": np.sqrt((flat ** 2).sum(1)),
          "l1": np.abs(flat).sum(1)}[norm]


def _assert_feasible(x_adv, x, eps, norm):
  x_adv = np.asarray(x_adv)
  assert np.all(np.isfinite(x_adv))
  sizes = _np_norm(x_adv - x, norm)
  assert np.all(sizes <= eps * (1 + 1e-5) + 1e-6), (sizes.max(), eps)
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


@pytest.mark.parametrize("name,norm", ALL_ATTACKS)
def test_every_attack_stays_in_the_ball_and_the_box(compiled_attack, predict, name, norm):
  # Seeded random inputs (the property-test loop), with a third of the pixels
  # exactly on the box boundary; labels are the model's predictions so every
  # example is attacked. One compiled function serves every draw (eps traced).
  attack = compiled_attack(name, norm)
  rng = np.random.default_rng(zlib.crc32(f"{name}-{norm}".encode()))
  moved = 0
  for trial in range(3):
    x = rng.uniform(0, 1, (BATCH,) + IMAGE_SHAPE).astype(np.float32)
    x[:, ::3] = rng.integers(0, 2, x[:, ::3].shape)
    y = np.asarray(predict(x))
    eps = np.float32(EPS[norm] * rng.uniform(0.2, 3.0))
    x_adv = attack(jax.random.key(trial), x, y, eps)
    if isinstance(x_adv, tuple):
      x_adv = x_adv[0]
    _assert_feasible(x_adv, x, eps, norm)
    moved += int(np.sum(_np_norm(np.asarray(x_adv) - x, norm) > 0))
  assert moved > 0


@pytest.fixture(scope="module")
def binary_linear():
  w = np.random.default_rng(0).normal(size=(49, 2)).astype(np.float32)
  params = {"w": jnp.asarray(w), "b": jnp.zeros(2)}
  return jax.tree_util.Partial(linear_apply, params), w[:, 1] - w[:, 0]


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.3), ("l1", 0.4)])
def test_one_step_equals_closed_form_optimum_on_a_linear_model(binary_linear, norm, eps):
  # For f(x) = W x + b and label 0, the margin z_1 - z_0 = <w, x> + c with
  # w = w_1 - w_0 is maximised over the ball by eps sign(w) (linf),
  # eps w / ||w||_2 (l2) and eps sign(w_k) e_k at k = argmax |w_k| (l1).
  model, w = binary_linear
  rng = np.random.default_rng(1)
  x = rng.uniform(0.4, 0.6, (8,) + IMAGE_SHAPE).astype(np.float32)
  y = np.zeros(8, np.int32)
  if norm == "linf":
    expected = eps * np.sign(w)
  elif norm == "l2":
    expected = eps * w / np.linalg.norm(w)
  else:
    expected = np.zeros_like(w)
    k = np.argmax(np.abs(w))
    expected[k] = eps * np.sign(w[k])
  fgm = fast_jit(lambda x, y: attacks.fgm(jax.random.key(0), model, x, y, eps=eps,
                                         norm=norm, loss="cw"))
  delta = (np.asarray(fgm(x, y)) - x).reshape(8, -1)
  np.testing.assert_allclose(delta, np.broadcast_to(expected, delta.shape), atol=2e-6)
  if norm != "l1":
    # The same optimum through a custom loss callable.
    margin = lambda logits, labels, target=None: logits[:, 1] - logits[:, 0]
    one_step = fast_jit(lambda x, y: attacks.pgd(
        jax.random.key(0), model, x, y, eps=eps, norm=norm, num_steps=1,
        rel_step_size=1.0, random_start=False, loss=margin))
    delta = (np.asarray(one_step(x, y)) - x).reshape(8, -1)
    np.testing.assert_allclose(delta, np.broadcast_to(expected, delta.shape), atol=2e-6)


def test_fgsm_and_pgd_lower_accuracy_of_a_trained_model(mnist, compiled_attack, predict):
  x, y = mnist["x_test"], mnist["y_test"]
  clean = np.mean(np.asarray(predict(x)) == y)
  assert clean > 0.9
  key = jax.random.key(0)
  linf, l2 = np.float32(0.05), np.float32(0.5)
  fgsm = np.mean(np.asarray(predict(compiled_attack("fgm", "linf")(key, x, y, linf))) == y)
  pgd = np.mean(np.asarray(predict(compiled_attack("pgd", "linf")(key, x, y, linf))) == y)
  pgd_l2 = np.mean(np.asarray(predict(compiled_attack("pgd", "l2")(key, x, y, l2))) == y)
  assert fgsm < clean - 0.3
  assert pgd <= fgsm
  assert pgd_l2 < clean - 0.3


def test_apgd_finds_at_least_as_many_adversarial_examples_as_pgd(mnist, trained_mlp,
                                                                  compiled_attack):
  # Same budget: APGD with 10 steps makes 11 gradient evaluations (one at the
  # random start), so PGD gets 11 steps.
  model = trained_mlp[0]
  pgd11 = fast_jit(lambda key, x, y, eps: attacks.pgd(key, model, x, y, eps=eps,
                                                     num_steps=11))
  apgd10 = compiled_attack("apgd", "linf")
  x, y = mnist["x_test"], mnist["y_test"]
  fooled = {"pgd": 0, "apgd": 0}
  for eps in (0.015, 0.02, 0.03):
    for seed in range(2):
      key = jax.random.key(seed)
      for name, attack in (("pgd", pgd11), ("apgd", apgd10)):
        logits = model(attack(key, x, y, np.float32(eps)))
        fooled[name] += int(np.sum(np.argmax(logits, -1) != y))
  assert fooled["apgd"] >= fooled["pgd"] > 0, fooled


def test_restarts_never_decrease_the_loss(mnist, trained_mlp, compiled_attack):
  model = trained_mlp[0]
  three = fast_jit(lambda key, x, y, eps: attacks.pgd(
      key, model, x, y, eps=eps, num_steps=10, num_restarts=3, keep="loss"))
  one = compiled_attack("pgd", "linf")  # restart 0 of the same series
  x, y = mnist["x_test"], mnist["y_test"]
  loss = fast_jit(lambda x: attacks.cross_entropy(model(x), y))
  key = jax.random.key(5)
  eps = np.float32(0.02)
  single, best = loss(one(key, x, y, eps)), loss(three(key, x, y, eps))
  assert np.all(np.asarray(best) >= np.asarray(single) - 1e-5)
  assert np.any(np.asarray(best) > np.asarray(single) + 1e-3)


@pytest.fixture(scope="module")
def linear10(linear_model):
  model, _ = linear_model
  rng = np.random.default_rng(3)
  x = rng.uniform(0.3, 0.7, (32,) + IMAGE_SHAPE).astype(np.float32)
  y = np.asarray(jnp.argmax(model(x), -1))
  return model, x, y, ((y + 1 + np.arange(32) % 9) % 10).astype(np.int32)


@pytest.mark.parametrize("name", ["pgd", "mi_fgsm", "apgd", "square"])
def test_targeted_attacks_reach_the_target_on_an_easy_model(linear10, name):
  model, x, y, target = linear10
  attack, config = SUITE[name]
  if name == "square":
    config = dict(config, num_queries=500, return_info=False)
  norm, eps = ("l2", 3.0) if name == "apgd" else ("linf", 0.4)
  run = fast_jit(lambda key, x, y, t: attack(key, model, x, y, eps=eps, norm=norm,
                                            target=t, **config))
  x_adv = run(jax.random.key(0), x, y, target)
  _assert_feasible(x_adv, x, eps, norm)
  np.testing.assert_array_equal(np.argmax(model(x_adv), -1), target)


def test_mi_fgsm_without_momentum_is_iterative_fgsm(linear10, trained_mlp):
  model = trained_mlp[0]
  _, x, _, _ = linear10
  y = np.asarray(jnp.argmax(model(x), -1))
  mi = fast_jit(lambda decay: attacks.mi_fgsm(jax.random.key(0), model, x, y, eps=0.05,
                                             num_steps=5, decay=decay))
  ifgsm = fast_jit(lambda: attacks.pgd(jax.random.key(0), model, x, y, eps=0.05,
                                        num_steps=5, rel_step_size=0.2,
                                        random_start=False))()
  np.testing.assert_allclose(mi(0.0), ifgsm, atol=1e-6)
  assert np.any(np.abs(np.asarray(mi(1.0)) - np.asarray(ifgsm)) > 1e-3)


def test_vmap_over_radii_and_one_trace_for_every_eps(mnist, trained_mlp):
  model = trained_mlp[0]
  x, y = mnist["x_test"][:32], mnist["y_test"][:32]

  def attack(eps):
    return attacks.pgd(jax.random.key(0), model, x, y, eps=eps, num_steps=5)

  radii = np.array([0.0, 0.02, 0.05, 0.1], np.float32)
  batched = np.asarray(fast_jit(jax.vmap(attack))(radii))
  single = fast_jit(chex.assert_max_traces(attack, n=1))
  accuracy = []
  for eps, x_adv in zip(radii, batched):
    _assert_feasible(x_adv, x, eps, "linf")
    np.testing.assert_allclose(x_adv, single(eps), atol=1e-6)  # one trace, any eps
    accuracy.append(np.mean(np.argmax(model(x_adv), -1) == y))
  assert accuracy[0] == np.mean(np.argmax(model(x), -1) == y)
  assert accuracy[-1] < accuracy[0] - 0.3
  assert all(b <= a + 1 / 32 for a, b in zip(accuracy, accuracy[1:])), accuracy


def test_per_example_eps():
  w = np.random.default_rng(0).normal(size=(49, 3)).astype(np.float32)
  model = jax.tree_util.Partial(linear_apply, {"w": jnp.asarray(w), "b": jnp.zeros(3)})
  x = np.full((4,) + IMAGE_SHAPE, 0.5, np.float32)
  eps = np.array([0.0, 0.01, 0.05, 0.1], np.float32)
  x_adv = fast_jit(lambda: attacks.fgm(jax.random.key(0), model, x, np.zeros(4, np.int32),
                                       eps=eps, norm="l2"))()
  np.testing.assert_allclose(_np_norm(np.asarray(x_adv) - x, "l2"), eps, atol=1e-6)


def test_step_size_schedules():
  cosine = schedule_multiplier("cosine", 10)
  step = schedule_multiplier("step", 8)
  np.testing.assert_allclose([cosine(0), cosine(5)], [1.0, 0.5], atol=1e-6)
  np.testing.assert_allclose([step(i) for i in (0, 3, 4, 5, 6, 7)],
                             [1, 1, 0.1, 0.1, 0.01, 0.01], rtol=1e-6)
  assert schedule_multiplier(lambda i: 2.0 * i, 3)(4) == 8.0


def test_apgd_checkpoints_follow_the_paper():
  # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06).
  p = [0.0, 0.22]
  while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.0:
    p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
  is_check, window = checkpoints(100)
  steps_done = np.nonzero(is_check)[0] + 1
  np.testing.assert_array_equal(steps_done, np.ceil(np.round(np.array(p[1:]) * 100, 6)))
  np.testing.assert_array_equal(window[is_check], np.diff(np.concatenate([[0], steps_done])))
  is_check, _ = checkpoints(100, "l1")
  np.testing.assert_array_equal(np.nonzero(is_check)[0] + 1, np.arange(4, 101, 4))


def test_attacks_run_on_a_batch_sharded_over_two_devices():
  # XLA's device count is fixed at start-up: run in a fresh process.
  script = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from certjax import attacks
      assert jax.device_count() == 2
      mesh = Mesh(np.array(jax.devices()), ('data',))
      w = jnp.asarray(np.random.default_rng(0).normal(size=(16, 4)), jnp.float32)
      model = lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ w)
      x = np.random.default_rng(1).uniform(size=(8, 4, 4, 1)).astype(np.float32)
      y = np.arange(8) % 4
      run = jax.jit(lambda x, y: attacks.apgd(jax.random.key(0), model, x, y,
                                              eps=0.1, num_steps=5),
                    compiler_options={'xla_backend_optimization_level': 0})
      sharded = run(jax.device_put(x, NamedSharding(mesh, P('data'))),
                    jax.device_put(y, NamedSharding(mesh, P('data'))))
      assert sharded.sharding.spec == P('data'), sharded.sharding
      np.testing.assert_allclose(sharded, run(x, y), atol=1e-6)
      print('ok')
  """)
  result = run_on_cpu_devices(script, 2, timeout=120)
  assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def _apgd_linf_ce_reference(params, x, y, x0, eps, num_steps, rho=0.75):
  """APGD-CE (L-inf) on the tanh MLP of `mlp_apply`, in float64 NumPy.

  A line-by-line transcription of attack_single_run in Croce & Hein's
  autopgd_base.py (integer checkpoint windows, momentum 0.75, restarts from
  the best point with its gradient), with certjax's documented choices: the
  first increase counted against the random start and never-fooled examples
  returned at their highest-loss point.

  Returns:
    (x_out, number of restarts, fragile): fragile marks the examples where a
    loss comparison between two different points was decided by less than
    1e-10, which rounding may decide either way in another implementation.
  """
  batch = len(x)
  flat = lambda v: v.reshape(batch, -1)

  w1, b1, w2, b2 = (np.asarray(params[k], np.float64) for k in ("w1", "b1", "w2", "b2"))

  def loss_and_grad(v):
    hidden = np.tanh(flat(v) @ w1 + b1)
    logits = hidden @ w2 + b2
    logits = logits - logits.max(1, keepdims=True)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    loss = -np.log(p[np.arange(batch), y])
    d_logits = p - np.eye(w2.shape[1])[y]
    grad = ((d_logits @ w2.T) * (1.0 - hidden ** 2)) @ w1.T
    return loss, logits.argmax(1) != y, grad.reshape(v.shape)

  project = lambda v: np.clip(x + np.clip(v - x, -eps, eps), 0.0, 1.0)
  fragile = np.zeros(batch, bool)

  def close(loss_a, loss_b, point_a, point_b):
    moved = np.any(flat(point_a) != flat(point_b), axis=1)
    return moved & (np.abs(loss_a - loss_b) < 1e-10)

  expand = lambda m: m.reshape((-1,) + (1,) * (x.ndim - 1))
  x_adv = x0.copy()
  loss, fooled, grad = loss_and_grad(x_adv)
  x_evaluated = x_adv.copy()
  x_best, x_best_adv, grad_best, loss_best = x_adv.copy(), x_adv.copy(), grad.copy(), loss.copy()
  step = np.full(batch, 2.0 * eps)
  x_adv_old = x_adv.copy()
  loss_steps = [loss]  # loss_steps[j + 1] = loss at iterate j
  k = max(int(0.22 * num_steps), 1)
  size_decr, n_iter_min = max(int(0.03 * num_steps), 1), max(int(0.06 * num_steps), 1)
  counter3, restarts = 0, 0
  loss_best_last_check, reduced_last_check = loss_best.copy(), np.ones(batch, bool)
  for i in range(num_steps):
    grad2 = x_adv - x_adv_old
    x_adv_old = x_adv.copy()
    a = 0.75 if i > 0 else 1.0
    x_adv_1 = project(x_adv + expand(step) * np.sign(grad))
    x_adv = project(x_adv + (x_adv_1 - x_adv) * a + grad2 * (1 - a))
    loss, wrong, grad = loss_and_grad(x_adv)
    fooled |= wrong
    x_best_adv[wrong] = x_adv[wrong]
    fragile |= (close(loss, loss_steps[-1], x_adv, x_evaluated)
                | close(loss, loss_best, x_adv, x_best)
                | np.any(np.abs(flat(grad)) < 1e-12, axis=1))  # sign of ~0
    x_evaluated = x_adv.copy()
    loss_steps.append(loss)
    improved = loss > loss_best
    x_best[improved], grad_best[improved] = x_adv[improved], grad[improved]
    loss_best[improved] = loss[improved]
    counter3 += 1
    if counter3 == k:
      increases = sum(loss_steps[i + 1 - c] > loss_steps[i - c] for c in range(k))
      oscillation = increases <= k * rho
      no_improvement = ~reduced_last_check & (loss_best_last_check >= loss_best)
      restart = oscillation | no_improvement
      reduced_last_check, loss_best_last_check = restart, loss_best.copy()
      step[restart] /= 2.0
      x_adv[restart], grad[restart] = x_best[restart], grad_best[restart]
      restarts += int(restart.sum())
      k, counter3 = max(k - size_decr, n_iter_min), 0
  return np.where(expand(fooled), x_best_adv, x_best), restarts, fragile


@pytest.mark.parametrize("init", ["uniform", "autoattack"])
def test_apgd_matches_a_transcription_of_the_reference_loop(init):
  # A random tanh MLP with large weights, whose gradient signs change inside
  # the ball, so that the momentum, the step halving and the restarts all
  # change the result (each was checked by mutating it). Both sides run in
  # float64; examples where a decision was closer than rounding can be
  # trusted with are left out (`fragile`).
  rng = np.random.default_rng(3)
  shapes = {"w1": (49, 16), "b1": (16,), "w2": (16, 10), "b2": (10,)}
  params = {k: 2.0 * rng.normal(size=v) / np.sqrt(v[0]) for k, v in shapes.items()}
  x = rng.uniform(size=(64,) + IMAGE_SHAPE)
  eps, num_steps, key = 0.1, 20, jax.random.key(5)
  with jax.enable_x64(True):
    model = jax.tree_util.Partial(mlp_apply, jax.tree.map(jnp.asarray, params))
    y = np.asarray(jnp.argmax(model(x), -1))
    x_adv = np.asarray(fast_jit(lambda key, x, y: attacks.apgd(
        key, model, x, y, eps=eps, num_steps=num_steps, init=init))(key, x, y))
    # The random start certjax draws for restart 0 (see apgd_run); with
    # init='autoattack' the reference's, x + eps u / max |u| (checked in
    # test_autoattack.py).
    k_init, _ = jax.random.split(jax.random.fold_in(key, 0))
    x0 = np.asarray(random_start(k_init, x, eps, "linf", init))
    fooled = np.asarray(jnp.argmax(model(x_adv), -1)) != y
  assert x_adv.dtype == np.float64
  expected, restarts, fragile = _apgd_linf_ce_reference(params, x, y, x0, eps, num_steps)
  assert restarts > 0 and 0 < fooled.sum() < len(y), (restarts, fooled.sum())
  assert fragile.sum() <= len(y) // 4, fragile.sum()
  np.testing.assert_allclose(x_adv[~fragile], expected[~fragile], atol=1e-9)
