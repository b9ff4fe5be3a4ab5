"""Adversarial training objectives: jit, eps warm-up, no gradient through the
attack, and PGD-AT on mnist5k beating standard training under PGD."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from certjax import attacks
from certjax.attacks import trades as trades_lib
from certjax.training import config as config_lib
from certjax.training import objectives
from certjax.training.objectives import adversarial as at
from tests.attacks.conftest import fast_jit, mlp_apply
from tests.conftest import trained_run

BATCH = 64


def apply_fn(variables, x, train=False):
  del train
  return mlp_apply(variables["params"], x)


def make_ctx(total_steps=100):
  return objectives.ObjectiveContext(apply_fn=apply_fn, num_classes=10,
                                     total_steps=total_steps, input_shape=(7, 7, 1))


def init_params():
  k1, k2 = jax.random.split(jax.random.key(3))
  return {"w1": jax.random.normal(k1, (49, 32)) / 7.0, "b1": jnp.zeros(32),
          "w2": jax.random.normal(k2, (32, 10)) / np.sqrt(32), "b2": jnp.zeros(10)}


def objective(name, ctx=None, **overrides):
  cfg = objectives.objective_defaults(name)
  cfg.update(overrides)
  return objectives.get_objective(cfg, ctx or make_ctx())


@pytest.fixture(scope="module")
def batch(mnist):
  return {"image": jnp.asarray(mnist["x_train"][:BATCH]),
          "label": jnp.asarray(mnist["y_train"][:BATCH])}


@pytest.mark.parametrize("name", ["pgd_at", "trades", "fast_at"])
def test_objective_trains_under_jit(name, batch):
  loss_fn = objective(name, eps=0.1, warmup_steps=2, **(
      {} if name == "fast_at" else {"num_steps": 3}))
  tx = optax.adam(0.01)
  chex.clear_trace_counter()

  @fast_jit
  @chex.assert_max_traces(n=1)
  def train_step(params, opt_state, step):
    (loss, (metrics, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, {}, batch, jax.random.fold_in(jax.random.key(0), step), step)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss, metrics

  params = init_params()
  opt_state = tx.init(params)
  losses, eps_seen = [], []
  for step in range(6):
    params, opt_state, loss, metrics = train_step(params, opt_state, jnp.int32(step))
    losses.append(float(loss))
    eps_seen.append(float(metrics["eps"]))
    assert 0.0 <= float(metrics["adv_accuracy"]) <= 1.0
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[2]  # same eps from step 2 on, same batch
  np.testing.assert_allclose(eps_seen, [0.0, 0.05, 0.1, 0.1, 0.1, 0.1], rtol=1e-6)


def test_eps_schedule_values():
  steps = jnp.array([0, 1, 5, 10, 11, 1000])
  np.testing.assert_allclose(at.eps_schedule(0.3, 10, steps),
                             [0.0, 0.03, 0.15, 0.3, 0.3, 0.3], rtol=1e-6)
  np.testing.assert_allclose(at.eps_schedule(0.3, 0, steps), 0.3, rtol=1e-6)
  hp = ml_collections.ConfigDict({"warmup_steps": 0, "warmup_fraction": 0.25})
  assert at.warmup_steps(hp, 1000) == 250
  hp.warmup_steps = 7
  with pytest.raises(ValueError, match="not both"):
    at.warmup_steps(hp, 1000)


def test_bad_hyperparameters_are_named():
  with pytest.raises(ValueError, match="attack_mode"):
    objective("pgd_at", attack_mode="training")
  with pytest.raises(ValueError, match="objective.eps"):
    objective("trades", eps=-0.1)
  with pytest.raises(ValueError, match="unknown hyperparameter"):
    objective("fast_at", num_steps=3)


@pytest.mark.parametrize("name", ["pgd_at", "trades"])
def test_no_gradient_through_the_attack(name, batch):
  """The parameter gradient equals that of the loss at the fixed adversarial point.

  With the L2 norm the attack's steps (normalised gradients) depend smoothly on
  the parameters, so a gradient leaking through the attack would change the
  result; the test checks that it would, too.
  """
  eps, steps, beta = 0.8, 3, 2.0
  extra = {"beta": beta} if name == "trades" else {}
  loss_fn = objective(name, eps=eps, norm="l2", num_steps=steps, **extra)
  params, key, x, y = init_params(), jax.random.key(5), batch["image"], batch["label"]

  def adversarial_point(p):
    logits_fn = lambda z: mlp_apply(p, z)
    alpha = 0.25 * eps
    if name == "pgd_at":
      return attacks.pgd(key, logits_fn, x, y, eps=eps, norm="l2", num_steps=steps,
                         step_size=alpha)
    return trades_lib.trades_attack(key, logits_fn, x, logits_fn(x), jnp.float32(eps), norm="l2",
                            num_steps=steps, step_size=jnp.float32(alpha))

  def loss_at(p, x_adv):
    adv = objectives.cross_entropy(mlp_apply(p, x_adv), y)
    if name == "pgd_at":
      return adv
    clean = mlp_apply(p, x)
    return (objectives.cross_entropy(clean, y)
            + beta * jnp.mean(trades_lib.kl_divergence(clean, mlp_apply(p, x_adv))))

  @fast_jit
  def grads(p):
    g_objective = jax.grad(lambda q: loss_fn(q, {}, batch, key, jnp.int32(0))[0])(p)
    x_fixed = jax.lax.stop_gradient(adversarial_point(p))
    g_fixed = jax.grad(lambda q: loss_at(q, x_fixed))(p)
    g_through = jax.grad(lambda q: loss_at(q, adversarial_point(q)))(p)
    return g_objective, g_fixed, g_through

  g_objective, g_fixed, g_through = grads(params)
  for k in params:
    np.testing.assert_allclose(g_objective[k], g_fixed[k], rtol=1e-4, atol=1e-6)
  leak = max(float(jnp.max(jnp.abs(g_through[k] - g_fixed[k]))) for k in params)
  assert leak > 1e-3, "the check cannot tell a leaking gradient apart"


class TinyBatchNormNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    h = nn.Dense(16)(x.reshape(x.shape[0], -1))
    h = nn.BatchNorm(use_running_average=not train, momentum=0.5)(h)
    return nn.Dense(10)(nn.relu(h))


def test_attack_in_train_mode_leaves_batchnorm_statistics_alone(batch):
  """Only the training forward pass on x_adv updates the running statistics."""
  model = TinyBatchNormNet()
  variables = model.init(jax.random.key(0), batch["image"][:1])
  params, state = variables["params"], {"batch_stats": variables["batch_stats"]}
  ctx = objectives.ObjectiveContext(apply_fn=model.apply, num_classes=10,
                                    total_steps=10, input_shape=(7, 7, 1))
  eps, key = 0.1, jax.random.key(2)
  loss_fn = objective("pgd_at", ctx, eps=eps, num_steps=2, attack_mode="train")

  @fast_jit
  def run():
    _, (metrics, new_state) = loss_fn(params, state, batch, key, jnp.int32(0))
    attack_model = ctx.logits_fn(params, state, train=True)
    x_adv = attacks.pgd(key, attack_model, batch["image"], batch["label"], eps=eps,
                        num_steps=2, step_size=0.25 * eps)
    _, expected = ctx.forward(params, state, x_adv, train=True)
    _, from_clean = ctx.forward(params, state, batch["image"], train=True)
    return metrics, new_state, expected, from_clean

  metrics, new_state, expected, from_clean = run()
  chex.assert_trees_all_close(new_state, expected, rtol=1e-5, atol=1e-6)
  mean = lambda s: s["batch_stats"]["BatchNorm_0"]["mean"]
  # ...and the check can tell statistics of x_adv from those of x.
  assert float(jnp.max(jnp.abs(mean(new_state) - mean(from_clean)))) > 1e-4
  assert 0.0 <= float(metrics["adv_accuracy"]) <= 1.0


# --- PGD-AT against standard training on mnist5k ------------------------------

EPS = 0.2


def trained(objective_name):
  """(workdir, TrainResult) of configs/mnist5k.py (standard) or mnist5k_pgd_at.py
  at smoke scale, 200 steps of the default MLP, trained once per process
  (test_attack_launch.py attacks the standard one through the launcher)."""
  if objective_name == "standard":
    return trained_run("mnist5k", overrides={"num_train_steps": 200})
  return trained_run("mnist5k_pgd_at", objective_name, overrides={
      "num_train_steps": 200, "objective.eps": EPS, "objective.num_steps": 5,
      "objective.rel_step_size": 0.5, "objective.warmup_fraction": 0.2})


@pytest.fixture(scope="module")
def mnist5k_test():
  from certjax import data as data_lib
  return data_lib.load_arrays(config_lib.base_config().data, "test", 0, 500)


def test_pgd_at_is_far_more_robust_than_standard_training(mnist5k_test):
  x, y = mnist5k_test
  pgd = attacks.make_pgd(norm="linf", num_steps=10)
  robust = {}
  for name in ("standard", "pgd_at"):
    _, result = trained(name)
    report = attacks.robust_accuracy(jax.random.key(0), result.logits_fn(), x, y,
                                     attacks=[("pgd10", pgd)], eps_list=[EPS],
                                     norm="linf", batch_size=500)
    robust[name] = report.per_eps[0].robust_accuracy
    assert report.clean_accuracy > 0.8, (name, report.clean_accuracy)
  assert robust["standard"] < 0.1, robust
  assert robust["pgd_at"] >= robust["standard"] + 0.3, robust
