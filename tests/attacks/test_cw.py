"""Carlini & Wagner attacks: closed-form minimal distances of linear models,
strength against PGD on the 7x7 MLP, confidence, targets, the fixed-radius
L-infinity variant, transformations and input errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from certjax import attacks
from certjax.evaluation import robust as robust_eval
from tests.attacks.conftest import BATCH, fast_jit, linear_apply

# Short runs for the MLP: 4 x 100 Adam iterations. The learning rate is raised
# from the reference's 0.01 so that pixels at 0 (tanh-saturated) move within
# 100 iterations (see the module docstring of certjax.attacks.cw).
CW = {"num_steps": 100, "binary_search_steps": 4, "learning_rate": 0.1,
      "initial_const": 1e-2}
KEY = jax.random.key(0)


def _margin(logits, labels):
  """max_{j != label} z_j - z_label, in float64."""
  logits = np.asarray(logits, np.float64)
  own = np.eye(logits.shape[1], dtype=bool)[np.asarray(labels)]
  return np.max(np.where(own, -np.inf, logits), axis=1) - logits[own]


def _l2(v):
  return np.sqrt(np.sum(np.asarray(v, np.float64).reshape(len(v), -1) ** 2, axis=1))


@pytest.fixture(scope="module")
def cw_mlp(trained_mlp):
  """cw_l2 on the MLP, jitted once: (key, x, y, confidence) -> (x_adv, CWInfo)."""
  jitted = fast_jit(lambda model, key, x, y, kappa: attacks.cw_l2(
      key, model, x, y, confidence=kappa, return_info=True, **CW))
  return functools.partial(jitted, trained_mlp[0])


@pytest.fixture(scope="module")
def mlp_run(mnist, cw_mlp, predict):
  """The untargeted kappa = 0 run on the BATCH test digits, shared by the tests."""
  x, y = mnist["x_test"], mnist["y_test"]
  x_adv, info = cw_mlp(KEY, x, y, 0.0)
  return {"x_adv": np.asarray(x_adv), "l2": np.asarray(info.l2_norm),
          "success": np.asarray(info.success), "const": np.asarray(info.const),
          "correct": np.asarray(predict(x)) == y}


@pytest.mark.parametrize("kappa", [0.0, 1.0])
def test_linear_model_l2_matches_the_closed_form_distance(kappa):
  # Two classes, logits z = x w + b: the closest point with z_j - z_y >= kappa
  # lies at distance (|z_y - z_j| + kappa) / ||w_y - w_j||, straight along
  # w_j - w_y. The points are chosen so that this step stays inside the box.
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(49, 2)), jnp.float32),
            "b": jnp.asarray([0.1, -0.1], jnp.float32)}
  model = jax.tree_util.Partial(linear_apply, params)
  x = rng.uniform(0.35, 0.65, size=(32, 7, 7, 1)).astype(np.float32)
  logits = np.asarray(model(x), np.float64)
  y = logits.argmax(1)
  direction = np.asarray(params["w"], np.float64)[:, 1] - np.asarray(params["w"],
                                                                      np.float64)[:, 0]
  distance = (np.abs(logits[:, 1] - logits[:, 0]) + kappa) / np.linalg.norm(direction)
  step = distance[:, None] * direction / np.linalg.norm(direction)
  assert np.all(np.abs(step).max(1) < 0.3)  # away from the box: the closed form holds
  run = fast_jit(lambda model, x, y, kappa: attacks.cw_l2(
      KEY, model, x, y, confidence=kappa, num_steps=200, binary_search_steps=5,
      initial_const=1e-2, return_info=True))
  x_adv, info = run(model, x, y, kappa)
  assert np.all(np.asarray(info.success))
  ratio = np.asarray(info.l2_norm) / distance
  # Never below the minimum (up to float32), at most 3% above it (about 0.5%
  # in practice).
  assert ratio.min() > 1 - 1e-4 and ratio.max() < 1.03, ratio
  np.testing.assert_allclose(info.l2_norm, _l2(np.asarray(x_adv) - x), rtol=1e-5)
  assert np.all(_margin(model(x_adv), y) >= kappa - 1e-4)
  # The search bisected c: every example ended below the 10x ladder's last rung.
  assert np.all(np.asarray(info.const) < 1e-2 * 10 ** 4)


def test_mlp_every_correct_point_broken_closer_than_pgd(mnist, mlp_run, compiled_attack,
                                                        predict):
  x, y = mnist["x_test"], mnist["y_test"]
  correct, success, l2 = mlp_run["correct"], mlp_run["success"], mlp_run["l2"]
  assert correct.mean() > 0.9
  assert success[correct].mean() >= 0.99
  fooled = np.asarray(predict(mlp_run["x_adv"])) != y
  assert np.all(fooled[success])
  # Nothing found: x itself; every output in the box.
  np.testing.assert_array_equal(mlp_run["x_adv"][~success], x[~success])
  assert mlp_run["x_adv"].min() >= 0.0 and mlp_run["x_adv"].max() <= 1.0
  # PGD-L2 (10 steps) at eps = 0.3 returns points at distance about eps; CW
  # breaks the same points, much closer.
  eps = 0.3
  x_pgd = np.asarray(compiled_attack("pgd", "l2")(KEY, x, y, eps))
  broken = correct & (np.asarray(predict(x_pgd)) != y)
  assert broken.sum() > 0.8 * BATCH
  pgd_l2 = _l2(x_pgd - x)
  assert (success & (l2 <= eps))[broken].mean() >= 0.97
  assert (l2 < pgd_l2)[broken].mean() >= 0.95
  assert np.median(l2[broken]) < 0.5 * eps


def test_confidence_gives_margins_of_at_least_kappa(mnist, cw_mlp, mlp_run, trained_mlp):
  x, y = mnist["x_test"], mnist["y_test"]
  kappa = 2.0
  x_adv, info = cw_mlp(KEY, x, y, kappa)
  success, correct = np.asarray(info.success), mlp_run["correct"]
  assert success[correct].mean() >= 0.95
  margins = _margin(trained_mlp[0](x_adv), y)
  assert np.all(margins[success] >= kappa - 1e-3), margins[success].min()
  # A larger margin costs distance.
  both = success & mlp_run["success"]
  assert np.median(np.asarray(info.l2_norm)[both]) > 1.1 * np.median(mlp_run["l2"][both])


def test_targeted_reaches_the_target(mnist, trained_mlp, predict):
  x, y = mnist["x_test"], mnist["y_test"]
  target = (y + 1) % 10
  run = fast_jit(lambda model, key, x, y, target: attacks.cw_l2(
      key, model, x, y, target=target, return_info=True, **CW))
  x_adv, info = run(trained_mlp[0], KEY, x, y, target)
  success = np.asarray(info.success)
  assert success.mean() >= 0.8
  np.testing.assert_array_equal(np.asarray(predict(x_adv))[success], target[success])
  # The targeted margin z_t - max_{j != t} z_j is positive where it succeeded.
  logits = np.asarray(trained_mlp[0](x_adv), np.float64)
  own = np.eye(10, dtype=bool)[target]
  targeted_margin = logits[own] - np.max(np.where(own, -np.inf, logits), axis=1)
  assert np.all(targeted_margin[success] > 0)


def test_cw_linf_stays_in_the_ball_and_matches_pgd(mnist, trained_mlp, compiled_attack,
                                                   predict):
  x, y = mnist["x_test"], mnist["y_test"]
  eps = 0.03
  attack_fn = attacks.make_cw_linf(num_steps=100)
  assert attack_fn.__name__ == "cw-linf" and attack_fn.config["norm"] == "linf"
  x_adv = np.asarray(fast_jit(attack_fn)(KEY, trained_mlp[0], x, y, eps))
  sizes = attacks.check_perturbation(x, x_adv, eps, "linf", name="cw-linf")
  assert sizes.max() > 0.9 * eps
  x_pgd = compiled_attack("pgd", "linf")(KEY, x, y, eps)
  robust_cw = np.mean(np.asarray(predict(x_adv)) == y)
  robust_pgd = np.mean(np.asarray(predict(x_pgd)) == y)
  assert 0.05 < robust_pgd < 0.5  # a moderate radius
  assert robust_cw <= robust_pgd + 0.01, (robust_cw, robust_pgd)


def test_make_cw_l2_in_robust_accuracy(mnist, trained_mlp, mlp_run):
  x, y = mnist["x_test"], mnist["y_test"]
  attack_fn = attacks.make_cw_l2(**CW)
  assert attack_fn.__name__ == "cw-l2" and attack_fn.config["norm"] == "l2"
  eps_list = (0.05, 0.1, 0.3)
  result = attacks.robust_accuracy(
      KEY, trained_mlp[0], x, y, attacks=[("cw-l2", attack_fn)], eps_list=eps_list,
      norm="l2", compiler_options={"xla_backend_optimization_level": 0})
  robust = [r.robust_accuracy for r in result.per_eps]
  assert robust[0] > robust[1] > robust[2]
  for eps, r in zip(eps_list, result.per_eps):
    assert r.max_perturbation <= eps * (1 + 1e-5)
    # What the direct run found within eps (the runner attacks other batches:
    # allow a couple of examples of float noise).
    expected = np.mean(mlp_run["correct"] & ~(mlp_run["success"] & (mlp_run["l2"] <= eps)))
    assert abs(r.robust_accuracy - expected) <= 2 / BATCH, (eps, r.robust_accuracy, expected)


def test_jit_vmap_and_per_example_independence(linear_model, mnist):
  model = linear_model[0]
  x, y = mnist["x_test"][:16], np.asarray(jnp.argmax(model(mnist["x_test"][:16]), -1))
  settings = {"num_steps": 20, "binary_search_steps": 3, "learning_rate": 0.05}
  jitted = fast_jit(lambda x, y: attacks.cw_l2(KEY, model, x, y, **settings))
  alone = np.asarray(jitted(x[:8], y[:8]))
  # The first four examples do not notice their batch-mates (per-example
  # state and early abort).
  mixed = np.asarray(jitted(np.concatenate([x[:4], x[8:12]]),
                            np.concatenate([y[:4], y[8:12]])))
  np.testing.assert_allclose(mixed[:4], alone[:4], atol=1e-6)
  batched = fast_jit(jax.vmap(lambda x, y: attacks.cw_l2(KEY, model, x, y, **settings)))
  out = np.asarray(batched(x.reshape(2, 8, 7, 7, 1), y.reshape(2, 8)))
  np.testing.assert_allclose(out[0], alone, atol=1e-6)
  np.testing.assert_allclose(out[1], np.asarray(jitted(x[8:], y[8:])), atol=1e-6)
  assert np.any(_l2(alone - x[:8]) > 0)
  eps = np.linspace(0.01, 0.05, 16, dtype=np.float32).reshape(2, 8)
  linf = fast_jit(jax.vmap(lambda x, y, eps: attacks.cw_linf(KEY, model, x, y, eps=eps,
                                                             num_steps=5)))
  out = np.asarray(linf(x.reshape(2, 8, 7, 7, 1), y.reshape(2, 8), eps))
  for i in range(2):
    attacks.check_perturbation(x[8 * i:8 * i + 8], out[i], float(eps[i].max()), "linf")
    sizes = np.abs(out[i] - x[8 * i:8 * i + 8]).reshape(8, -1).max(1)
    assert np.all(sizes <= eps[i] * (1 + 1e-5) + 1e-6)


def test_checked_values_under_jit(linear_model):
  model = linear_model[0]
  x = np.full((4, 7, 7, 1), 0.5, np.float32)
  y = np.array([0, 1, 2, 3], np.int32)
  run = attacks.checked(jax.jit(lambda x, y, kappa, lr: attacks.cw_l2(
      KEY, model, x, y, confidence=kappa, learning_rate=lr, num_steps=2,
      binary_search_steps=1, checked=True)))
  assert run(x, y, 0.0, 0.01).shape == x.shape
  with pytest.raises(ValueError, match="confidence must be a finite number >= 0"):
    run(x, y, -1.0, 0.01)
  with pytest.raises(ValueError, match="learning_rate must be a finite number > 0"):
    run(x, y, 0.0, 0.0)
  bad = x.copy()
  bad[1, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    run(bad, y, 0.0, 0.01)


def test_input_errors(linear_model):
  model = linear_model[0]
  x = np.full((4, 7, 7, 1), 0.5, np.float32)
  y = np.array([0, 1, 2, 3], np.int32)

  def l2(**kwargs):
    return attacks.cw_l2(KEY, model, x, y, **{"num_steps": 1, **kwargs})

  def linf(**kwargs):
    return attacks.cw_linf(KEY, model, x, y, **{"eps": 0.1, "num_steps": 1, **kwargs})

  cases = [
      (dict(confidence=-1.0), "confidence must be a finite number >= 0, got -1.0"),
      (dict(binary_search_steps=0), "binary_search_steps must be an integer >= 1, got 0"),
      (dict(learning_rate=0.0), "learning_rate must be a finite number > 0, got 0.0"),
      (dict(learning_rate=-0.1), "learning_rate must be a finite number > 0"),
      (dict(initial_const=0.0), "initial_const must be a finite number > 0"),
      (dict(num_steps=0), "num_steps must be an integer >= 1, got 0"),
      (dict(abort_early="yes"), "abort_early must be True or False"),
  ]
  for kwargs, message in cases:
    with pytest.raises(ValueError, match=message):
      l2(**kwargs)
    with pytest.raises(ValueError, match=message):
      attacks.make_cw_l2(**kwargs)
  with pytest.raises(ValueError, match=r"labels in \[0, 10\] but must lie in \[0, 9\]"):
    l2(target=np.array([0, 1, 2, 10]))
  with pytest.raises(ValueError, match="must have rank 4"):
    attacks.cw_l2(KEY, model, x[0], y)
  for kwargs, message in [
      (dict(eps=-0.1), "eps must be a finite number >= 0, got -0.1"),
      (dict(confidence=-1.0), "confidence must be a finite number >= 0"),
      (dict(learning_rate=0.0), "learning_rate must be a finite number > 0"),
      (dict(num_restarts=0), "num_restarts must be an integer >= 1, got 0")]:
    with pytest.raises(ValueError, match=message):
      linf(**kwargs)
  with pytest.raises(ValueError, match="learning_rate must be a finite number > 0"):
    attacks.make_cw_linf(learning_rate=-1.0)


def test_robust_evaluator_builds_the_cw_attacks():
  cfg = robust_eval.default_config()
  cfg.norm = "l2"
  cfg.attacks = ("pgd", "cw_l2")
  sequence = robust_eval.build_attacks(cfg, num_classes=10)
  assert [n for n, _ in sequence] == ["pgd20", "cw-l2"]
  config = dict(sequence)["cw-l2"].config
  assert (config["num_steps"], config["learning_rate"], config["binary_search_steps"],
          config["initial_const"], config["confidence"]) == (1000, 1e-2, 9, 1e-3, 0.0)
  cfg.update({"cw_num_steps": 50, "cw_learning_rate": 0.1, "cw_confidence": 1.5,
              "cw_binary_search_steps": 3})
  config = dict(robust_eval.build_attacks(cfg, num_classes=10))["cw-l2"].config
  assert (config["num_steps"], config["learning_rate"], config["binary_search_steps"],
          config["confidence"]) == (50, 0.1, 3, 1.5)
  cfg.attacks = ("cw_linf",)
  with pytest.raises(ValueError, match="'cw_linf' is an attack in the 'linf' norm"):
    robust_eval.build_attacks(cfg, num_classes=10)
  cfg.norm = "linf"
  cfg.restarts = 2
  config = dict(robust_eval.build_attacks(cfg, num_classes=10))["cw-linf"].config
  assert (config["num_steps"], config["num_restarts"], config["confidence"]) == (50, 2, 1.5)
  cfg.cw_learning_rate = -1.0
  with pytest.raises(ValueError, match="attack.cw_learning_rate must be a finite number >= 0"):
    robust_eval.build_attacks(cfg, num_classes=10)
