"""AutoAttack's standard version: the sequence `standard_attacks` builds, the
reference's random starts and L1 schedule in APGD, and a full run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from certjax import attacks
from certjax.attacks.apgd import large_reps_steps, random_start
from tests.attacks.conftest import IMAGE_SHAPE, fast_jit, linear_apply

FAST = {"xla_backend_optimization_level": 0}


def _np_norm(v, norm):
  flat = np.asarray(v, np.float64).reshape(len(v), -1)
  return {"linf": np.abs(flat).max(1), "l2": np.sqrt((flat ** 2).sum(1)),
          "l1": np.abs(flat).sum(1)}[norm]


def _configs(sequence):
  return {name: fn.config for name, fn in sequence}


def test_standard_sequence_has_the_reference_settings():
  linf = _configs(attacks.standard_attacks("linf"))
  assert list(linf) == ["apgd-ce", "apgd-t", "fab-t", "square"]
  assert linf["apgd-ce"] == {"norm": "linf", "loss": "ce", "num_steps": 100, "num_restarts": 1,
                             "rho": 0.75, "init": "autoattack", "large_reps": False}
  assert linf["apgd-t"] == {"norm": "linf", "num_steps": 100, "num_target_classes": 9,
                            "num_restarts": 1, "rho": 0.75, "loss": "dlr",
                            "init": "autoattack", "large_reps": False}
  assert linf["fab-t"] == {"norm": "linf", "num_steps": 100, "num_target_classes": 9,
                           "num_restarts": 1, "alpha_max": 0.1, "eta": 1.05, "beta": 0.9,
                           "final_search_steps": 0}
  # 5,000 iterations after the initial query; the schedule not rescaled.
  assert linf["square"] == {"norm": "linf", "num_queries": 5001, "p_init": 0.8,
                            "loss": "margin", "rescale_schedule": False}
  l2 = _configs(attacks.standard_attacks("l2"))
  assert list(l2) == ["apgd-ce", "apgd-t", "fab-t", "square"]
  assert {c["norm"] for c in l2.values()} == {"l2"}
  # L1: L1-APGD with 5 restarts / 5 target classes and the 3-2-1 eps schedule,
  # FAB-T in L1; no Square (certjax has no L1 Square).
  l1 = _configs(attacks.standard_attacks("l1"))
  assert list(l1) == ["apgd-ce", "apgd-t", "fab-t"]
  assert (l1["apgd-ce"]["num_restarts"], l1["apgd-ce"]["large_reps"]) == (5, True)
  assert (l1["apgd-t"]["num_target_classes"], l1["apgd-t"]["num_restarts"],
          l1["apgd-t"]["large_reps"]) == (5, 1, True)
  assert (l1["fab-t"]["norm"], l1["fab-t"]["num_target_classes"]) == ("l1", 9)
  # Fewer classes: targets capped; below 4 classes no targeted DLR.
  five = _configs(attacks.standard_attacks("linf", num_classes=5))
  assert five["apgd-t"]["num_target_classes"] == five["fab-t"]["num_target_classes"] == 4
  assert list(_configs(attacks.standard_attacks("l2", num_classes=3))) == [
      "apgd-ce", "apgd-dlr", "fab-t", "square"]
  # What the arguments change.
  custom = _configs(attacks.standard_attacks("linf", num_steps=7, num_restarts=2,
                                             num_target_classes=3, square_queries=50,
                                             fab_t=False))
  assert list(custom) == ["apgd-ce", "apgd-t", "square"]
  assert custom["apgd-t"]["num_target_classes"] == 3 and custom["apgd-ce"]["num_steps"] == 7
  assert custom["square"]["num_queries"] == 50


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_apgd_reference_start_lies_on_the_sphere(norm):
  # AutoAttack starts on the sphere (linf: a uniform draw of the cube scaled
  # to norm eps; l2: a Gaussian direction) and for l1 projects a Gaussian
  # point onto the L1 ball and box, which lands on its boundary too; the
  # uniform start lies inside the ball.
  x = np.full((256,) + IMAGE_SHAPE, 0.5, np.float32)
  eps = {"linf": 0.1, "l2": 0.5, "l1": 3.0}[norm]
  key = jax.random.key(0)
  draw = fast_jit(random_start, static_argnums=(3, 4))
  start = np.asarray(draw(key, x, eps, norm, "autoattack"))
  np.testing.assert_allclose(_np_norm(start - x, norm), eps, rtol=1e-5)
  assert start.min() >= 0 and start.max() <= 1
  uniform = _np_norm(np.asarray(draw(key, x, eps, norm, "uniform")) - x, norm)
  assert np.all(uniform <= eps * (1 + 1e-6)) and np.any(uniform < eps * 0.999)
  if norm == "linf":  # the cube draw's direction, stretched by eps / max |u|
    u = np.asarray(jax.random.uniform(key, x.shape, jnp.float32, -1.0, 1.0))
    expected = x + eps * u / np.abs(u.reshape(256, -1)).max(1).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(start, expected, atol=1e-6)


def test_large_reps_runs_at_three_two_and_one_eps():
  # Record the L1 size of every point APGD evaluates: with large_reps and 10
  # steps the runs have 3, 3 and 4 steps (plus their starts) at radii 3 eps,
  # 2 eps and eps, as the reference's decr_eps_pgd.
  assert large_reps_steps(100) == (30, 30, 40) and large_reps_steps(10) == (3, 3, 4)
  w = jnp.asarray(np.random.default_rng(0).normal(size=(49, 10)), jnp.float32)
  x = np.random.default_rng(1).uniform(0.2, 0.8, (8,) + IMAGE_SHAPE).astype(np.float32)
  sizes = []

  def model(v):
    jax.debug.callback(lambda d: sizes.append(np.abs(d.reshape(8, -1)).sum(1).max()), v - x)
    return jnp.tanh(linear_apply({"w": w, "b": jnp.zeros(10)}, v))

  y = np.asarray(jnp.argmax(model(x), -1))
  eps = 0.5
  sizes.clear()
  out = fast_jit(lambda: attacks.apgd(jax.random.key(0), model, x, y, eps=eps, norm="l1",
                                      num_steps=10, large_reps=True))()
  jax.effects_barrier()
  assert _np_norm(np.asarray(out) - x, "l1").max() <= eps * (1 + 1e-5)
  runs = np.asarray(sizes[1:])  # sizes[0]: the clean point
  assert len(runs) == 4 + 4 + 5, len(runs)
  first, second, last = runs[:4], runs[4:8], runs[8:]
  assert np.all(first <= 3 * eps * (1 + 1e-5)) and first.max() > 2 * eps
  assert np.all(second <= 2 * eps * (1 + 1e-5)) and second.max() > eps
  assert np.all(last <= eps * (1 + 1e-5))
  with pytest.raises(ValueError, match="large_reps .* norm='l1' only"):
    attacks.make_apgd(norm="linf", large_reps=True)
  with pytest.raises(ValueError, match=r"num_steps=4 leaves one empty"):
    attacks.make_apgd_targeted(norm="l1", num_steps=4, large_reps=True)
  with pytest.raises(ValueError, match="Unknown init 'gaussian'"):
    attacks.apgd(jax.random.key(0), model, x, y, eps=eps, init="gaussian")


@pytest.mark.slow
def test_the_standard_version_end_to_end(trained_mlp, mnist):
  # The full budgets (100 iterations, 9 targets, 5,000 Square iterations) on
  # 64 digits at one radius: the sequence runs in order on the points still
  # robust, stays in the ball, and the result names the version.
  model = trained_mlp[0]
  x, y = mnist["x_test"][:64], mnist["y_test"][:64]
  result = attacks.robust_accuracy(
      jax.random.key(0), model, x, y, attacks=attacks.standard_attacks("linf", num_classes=10),
      eps_list=[0.03], norm="linf", batch_size=64, compiler_options=FAST,
      suite=attacks.AUTOATTACK_STANDARD)
  (r,) = result.per_eps
  after = [a for _, a in r.robust_accuracy_after]
  assert [n for n, _ in r.robust_accuracy_after] == ["apgd-ce", "apgd-t", "fab-t", "square"]
  assert after == sorted(after, reverse=True) and after[-1] < result.clean_accuracy - 0.3
  assert r.max_perturbation <= 0.03 * (1 + 1e-4) + 1e-6
  report = result.to_dict()
  assert report["suite"] == "autoattack-standard (Croce & Hein 2020)"
  assert "Suite: autoattack-standard (Croce & Hein 2020)" in result.table()
