"""Tests of the certified-training objectives (IBP, CROWN-IBP) and of the
CROWN-IBP >= IBP guarantee of the verification entry points."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from certjax import data as data_lib
from certjax.bounds import crown_ibp, ibp_margins, linf_ball, margin_lower_bounds, margin_spec
from certjax.bounds import certified_training as bt
from certjax.training import objectives
from certjax.training.objectives import certified as certified_objectives
from tests.bounds._util import init_variables, sample_box, uniform
from tests.conftest import smoke_config, trained_run

NUM_CLASSES = 4
TRAIN_STEPS = 200  # of each mnist5k run below


# ----------------------------------------------------------------------------
# Schedules.


GOWAL_MNIST = {"train_eps": 0.2, "warmup_steps": 2000, "ramp_steps": 10000,
               "kappa_start": 1.0, "kappa_end": 0.5, "beta_start": 1.0, "beta_end": 0.0}


def test_gowal_mnist_schedule_values():
  s = bt.make_schedules(GOWAL_MNIST, 60000)
  assert (s.warmup, s.ramp) == (2000, 10000)
  steps = np.array([0, 1999, 2000, 2001, 7000, 11999, 12000, 12001, 59999])
  np.testing.assert_allclose(
      s.eps(steps), [0, 0, 0, 0.2 / 10000, 0.1, 0.2 * 9999 / 10000, 0.2, 0.2, 0.2], rtol=1e-6)
  np.testing.assert_allclose(
      s.kappa(steps), [1, 1, 1, 1 - 0.5 / 10000, 0.75, 0.5 + 0.5 / 10000, 0.5, 0.5, 0.5],
      rtol=1e-6)
  np.testing.assert_allclose(np.asarray(s.beta(steps))[[0, 2, 4, 6, 8]], [1, 1, 0.5, 0, 0], atol=1e-7)
  # The same schedule as fractions of the run (how the configs give it).
  fractions = dict(GOWAL_MNIST, warmup_steps=2000 / 60000, ramp_steps=10000 / 60000)
  f = bt.make_schedules(fractions, 60000)
  assert (f.warmup, f.ramp) == (2000, 10000)
  np.testing.assert_array_equal(f.eps(steps), s.eps(steps))
  # ...which scale with a shorter run: 6000 steps -> 200 warm-up, 1000 ramp.
  short = bt.make_schedules(fractions, 6000)
  assert (short.warmup, short.ramp) == (200, 1000)


def test_zero_ramp_is_a_step_and_bad_values_are_rejected():
  s = bt.make_schedules(dict(GOWAL_MNIST, warmup_steps=5, ramp_steps=0), 10)
  np.testing.assert_allclose(s.eps(np.arange(7)), [0, 0, 0, 0, 0, 0.2, 0.2], rtol=1e-7)
  with pytest.raises(ValueError, match="exceed the 10 training steps"):
    bt.make_schedules(dict(GOWAL_MNIST, warmup_steps=4, ramp_steps=7), 10)
  with pytest.raises(ValueError, match="kappa_end"):
    bt.make_schedules(dict(GOWAL_MNIST, kappa_end=1.5), 100)
  with pytest.raises(ValueError, match="train_eps"):
    bt.make_schedules(dict(GOWAL_MNIST, train_eps=-0.1), 100)
  with pytest.raises(ValueError, match="whole number"):
    bt.make_schedules(dict(GOWAL_MNIST, warmup_steps=2.5), 100)


def test_objectives_are_registered_with_their_hyperparameters():
  assert {"ibp", "crown_ibp"} <= set(objectives.objective_names())
  assert objectives.objective_defaults("ibp").kappa_end == 0.5
  assert objectives.objective_defaults("crown_ibp").beta_start == 1.0
  ctx = objectives.ObjectiveContext(apply_fn=None, num_classes=10, total_steps=100,
                                    input_shape=(28, 28, 1))
  with pytest.raises(ValueError, match="train_eps"):
    objectives.get_objective({"name": "ibp", "eps": 0.1}, ctx)


# ----------------------------------------------------------------------------
# The loss functions on a tiny model, at chosen steps.


HPARAMS = {"train_eps": 0.3, "warmup_steps": 10, "ramp_steps": 40}
TOTAL = 100


class _SmallConvNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.relu(nn.Conv(3, (3, 3), strides=2, padding="VALID")(x))
    x = nn.relu(nn.Dense(12)(x.reshape((x.shape[0], -1))))
    return nn.Dense(NUM_CLASSES)(x)


class _BatchNormNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(4, (3, 3), strides=2)(x))
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(nn.Dense(8)(x.reshape((x.shape[0], -1))))
    return nn.Dense(NUM_CLASSES)(x)


@pytest.fixture(scope="module")
def tiny():
  model = _SmallConvNet()
  x = uniform(0, (8, 6, 6, 1))
  variables = init_variables(model, x, 1)
  ctx = objectives.ObjectiveContext(apply_fn=model.apply, num_classes=NUM_CLASSES,
                                    total_steps=TOTAL, input_shape=(6, 6, 1))
  batch = {"image": x, "label": np.arange(8, dtype=np.int32) % NUM_CLASSES}
  fns, loss_fns = {}, {}
  for name in ("ibp", "crown_ibp"):
    with pytest.MonkeyPatch.context() as patch:
      # The accelerator code path (lax.cond skipping CROWN-IBP once beta = 0);
      # test_a_few_training_steps_with_batchnorm runs the CPU one.
      patch.setattr(jax, "default_backend", lambda: "gpu")
      loss_fns[name] = objectives.get_objective({"name": name, **HPARAMS}, ctx)
    fns[name] = jax.jit(jax.value_and_grad(loss_fns[name], has_aux=True))
  return model, variables, batch, fns, loss_fns


def _evaluate(fn, variables, batch, step):
  (loss, (metrics, _)), grads = fn(variables["params"], {}, batch, jax.random.key(0),
                                   jnp.asarray(step, jnp.int32))
  return float(loss), jax.device_get(metrics), grads


def test_losses_follow_the_schedules(tiny):
  model, variables, batch, fns, _ = tiny
  s = bt.make_schedules(dict(certified_objectives.CROWN_IBP_DEFAULTS, **HPARAMS), TOTAL)
  logits_fn = functools.partial(model.apply, variables)
  results = {}
  for name, fn in fns.items():
    for step in (0, 10, 30, 50, 99):
      loss, m, grads = _evaluate(fn, variables, batch, step)
      results[name, step] = loss
      assert np.isfinite(loss)
      assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
      np.testing.assert_allclose([m["eps"], m["kappa"]], [s.eps(step), s.kappa(step)],
                                 rtol=1e-6)
      np.testing.assert_allclose(
          loss, m["kappa"] * m["nominal_loss"] + (1 - m["kappa"]) * m["verified_loss"],
          rtol=1e-5)
      if name == "crown_ibp":
        np.testing.assert_allclose(m["beta"], s.beta(step), rtol=1e-6)
      if step <= 10:
        # eps = 0: the elided bounds are the margins, the worst case is the point.
        np.testing.assert_allclose(m["verified_loss"], m["nominal_loss"], rtol=1e-4)
      else:
        assert m["verified_loss"] > m["nominal_loss"]
        assert m["verified_accuracy"] <= m["accuracy"]
  # At step 30 (eps 0.15, beta 0.5) the CROWN-IBP loss mixes the raw bounds.
  eps30 = float(s.eps(30))

  @jax.jit
  def reference_bounds(x, y):
    box = linf_ball(x, eps30)
    raw = crown_ibp(logits_fn, box, margin_spec(y, NUM_CLASSES), upper=False).lower
    return raw, ibp_margins(logits_fn, box, y).lower

  raw, ibp_lower = reference_bounds(batch["image"], batch["label"])
  _, m, _ = _evaluate(fns["crown_ibp"], variables, batch, 30)
  np.testing.assert_allclose(m["verified_loss"],
                             bt.worst_case_cross_entropy(0.5 * raw + 0.5 * ibp_lower), rtol=1e-5)
  _, m_ibp, _ = _evaluate(fns["ibp"], variables, batch, 30)
  np.testing.assert_allclose(m_ibp["verified_loss"], bt.worst_case_cross_entropy(ibp_lower),
                             rtol=1e-5)
  # After the ramp beta = 0: CROWN-IBP training is IBP training.
  np.testing.assert_allclose(results["crown_ibp", 99], results["ibp", 99], rtol=1e-6)


def test_fast_parameter_gradients_match_plain_autodiff(tiny, monkeypatch):
  # graph.pull_back differentiates through the parameters with forward maps
  # (a custom vjp); plain autodiff of the transposed maps is the reference.
  from certjax.bounds import graph  # pylint: disable=g-import-not-at-top
  _, variables, batch, fns, loss_fns = tiny
  fast = _evaluate(fns["crown_ibp"], variables, batch, 30)[2]
  monkeypatch.setattr(graph, "FAST_PARAMETER_GRADIENTS", False)
  plain = _evaluate(jax.jit(jax.value_and_grad(loss_fns["crown_ibp"], has_aux=True)),
                    variables, batch, 30)[2]
  for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(plain)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(b))))
  assert all(np.any(np.asarray(b) != 0) for b in jax.tree.leaves(plain))


def test_a_few_training_steps_with_batchnorm():
  # Bound pass in inference mode, nominal pass in train mode updating the
  # running statistics; gradients flow through both. CROWN-IBP inside the
  # ramp, on the CPU code path (no lax.cond).
  model = _BatchNormNet()
  x = uniform(2, (8, 6, 6, 1))
  variables = init_variables(model, x, 3)
  ctx = objectives.ObjectiveContext(apply_fn=model.apply, num_classes=NUM_CLASSES,
                                    total_steps=TOTAL, input_shape=(6, 6, 1))
  batch = {"image": x, "label": np.arange(8, dtype=np.int32) % NUM_CLASSES}
  loss_fn = objectives.get_objective({"name": "crown_ibp", **HPARAMS}, ctx)

  @jax.jit
  def step(params, state, i):
    (loss, (metrics, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, state, batch, jax.random.key(0), i)
    params = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
    return params, new_state, loss, metrics

  params, state = variables["params"], {"batch_stats": variables["batch_stats"]}
  losses = []
  for i in range(25, 30):  # inside the ramp: eps > 0
    params, new_state, loss, metrics = step(params, state, jnp.int32(i))
    assert not np.allclose(new_state["batch_stats"]["BatchNorm_0"]["mean"],
                           state["batch_stats"]["BatchNorm_0"]["mean"])
    state = new_state
    losses.append(float(loss))
    assert float(metrics["eps"]) > 0 and 0 < float(metrics["beta"]) < 1
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


# ----------------------------------------------------------------------------
# Certified vs standard training on the embedded MNIST digits.


def trained_runs(tmp_path_factory=None):
  """{'ibp' | 'standard': (TrainResult, config)} of configs/mnist5k_ibp.py:tiny,smoke
  (the tiny MLP, 200 steps), trained once per process (test_verify_launch.py uses
  them too)."""
  del tmp_path_factory
  runs = {}
  for name, overrides in (("ibp", {}), ("standard", {"objective": {"name": "standard"}})):
    _, result = trained_run("mnist5k_ibp", "tiny", overrides)
    runs[name] = (result, smoke_config("mnist5k_ibp", "tiny", overrides))
  return runs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  runs = trained_runs(tmp_path_factory)
  config = runs["ibp"][1]
  x, y = data_lib.load_arrays(config.data, "test")
  model = runs["ibp"][0].model

  @jax.jit
  def bounds(variables, x, y):
    logits_fn = functools.partial(model.apply, variables, train=False)
    box = linf_ball(x, 0.1)
    return {
        "ibp": margin_lower_bounds(logits_fn, x, y, 0.1, "ibp"),
        "crown_ibp": margin_lower_bounds(logits_fn, x, y, 0.1, "crown_ibp"),
        "raw": crown_ibp(logits_fn, box, margin_spec(y, 10), upper=False).lower,
        "correct": jnp.argmax(logits_fn(x), -1) == y,
    }

  out = {name: jax.device_get(bounds(run.state.variables, x, y))
         for name, (run, _) in runs.items()}
  return out, runs, x, y


def test_ibp_training_verifies_far_more_than_standard_training(trained):
  out, runs, _, _ = trained
  verified = {name: {m: float(np.mean(b["correct"] & np.all(b[m] > 0, -1)))
                     for m in ("ibp", "crown_ibp")} for name, b in out.items()}
  clean = {name: run.eval_metrics["accuracy"] for name, (run, _) in runs.items()}
  print(f"\nmnist5k, {TRAIN_STEPS} steps, eps 0.1: clean {clean}, verified {verified}")
  assert clean["standard"] > 0.85 and clean["ibp"] > 0.6
  assert verified["standard"]["ibp"] < 0.05
  assert verified["ibp"]["ibp"] > 0.25
  assert verified["ibp"]["ibp"] > verified["standard"]["crown_ibp"] + 0.2
  for name in out:
    assert verified[name]["crown_ibp"] >= verified[name]["ibp"]


def test_crown_ibp_is_never_looser_than_ibp_on_trained_nets(trained, record_property):
  out, _, _, _ = trained
  for name, b in out.items():
    assert np.all(b["crown_ibp"] >= b["ibp"])
    np.testing.assert_array_equal(b["crown_ibp"], np.maximum(b["raw"], b["ibp"]))
    tighter, looser = float(np.mean(b["raw"] > b["ibp"])), float(np.mean(b["raw"] < b["ibp"]))
    record_property(f"{name}_raw_crown_ibp_tighter_fraction", tighter)
    print(f"\n{name}-trained: raw CROWN-IBP strictly tighter than IBP on {tighter:.1%} of "
          f"the margins, looser on {looser:.1%}")
    if name == "standard":
      # Zhang et al.'s observation: on naturally trained networks CROWN-IBP
      # is much tighter than IBP.
      assert tighter > 0.8
    else:
      # ...but not on IBP-trained ones, which is why verification takes the max.
      assert looser > 0.05


def test_trained_net_bounds_are_sound(trained):
  out, runs, x, y = trained
  model = runs["ibp"][0].model
  apply = jax.jit(functools.partial(model.apply, train=False))
  for name, (run, _) in runs.items():
    for i in (0, 1, 2):
      samples = sample_box(10 + i, linf_ball(x[i:i + 1], 0.1), 2048)[:, 0]
      logits = np.asarray(apply(run.state.variables, samples))
      margins = logits[:, y[i]:y[i] + 1] - np.delete(logits, y[i], axis=1)
      lower = np.minimum(out[name]["crown_ibp"][i], out[name]["raw"][i])
      assert np.all(margins >= lower[None] - 1e-4 * (1 + np.abs(margins))), (name, i)


# ----------------------------------------------------------------------------
# CROWN-IBP >= IBP on random networks.


class _RandomCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), strides=2, padding="SAME")(x))
    x = nn.BatchNorm(use_running_average=True)(x)
    x = nn.relu(nn.Dense(16)(x.reshape((x.shape[0], -1))))
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(NUM_CLASSES)(x)


def test_crown_ibp_is_never_looser_than_ibp_on_random_nets():
  model = _RandomCNN()
  x = uniform(50, (4, 6, 6, 2))
  y = np.arange(4, dtype=np.int32) % NUM_CLASSES

  @jax.jit
  def bounds(variables, eps):
    logits_fn = functools.partial(model.apply, variables)
    raw = crown_ibp(logits_fn, linf_ball(x, eps), margin_spec(y, NUM_CLASSES), upper=False)
    return (margin_lower_bounds(logits_fn, x, y, eps, "ibp"),
            margin_lower_bounds(logits_fn, x, y, eps, "crown_ibp"), raw.lower)

  batched_logits = jax.jit(jax.vmap(model.apply, in_axes=(None, 0)))
  tighter, looser, total = 0, 0, 0
  for seed in range(3):
    variables = init_variables(model, x, 60 + seed)
    for eps in (0.01, 0.1, 0.3):
      ibp_b, best, raw = map(np.asarray, bounds(variables, jnp.float32(eps)))
      assert np.all(best >= ibp_b) and np.all(best >= raw)
      samples = sample_box(seed, linf_ball(x, eps), 1024)
      logits = np.asarray(batched_logits(variables, samples))
      margins = np.einsum("bkc,nbc->nbk", np.asarray(margin_spec(y, NUM_CLASSES)), logits)
      assert np.all(margins >= best[None] - 1e-4 * (1 + np.abs(margins)))
      tighter += int(np.sum(raw > ibp_b))
      looser += int(np.sum(raw < ibp_b))
      total += raw.size
  print(f"\nrandom nets: raw CROWN-IBP tighter than IBP on {tighter}/{total} margins, "
        f"looser on {looser}/{total}")
  assert tighter > total / 2
