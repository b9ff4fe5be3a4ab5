"""Lp-ball geometry: norms, random starts, steepest directions, projections."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.attacks.conftest import fast_jit
from certjax.attacks import norms

# Jitted once per static configuration: eager op-by-op dispatch compiles every
# primitive separately and dominates the run time on CPU.
project = fast_jit(norms.project, static_argnames=("norm", "exact"))
random_init = fast_jit(norms.random_init, static_argnames=("norm",))
steepest_direction = fast_jit(norms.steepest_direction, static_argnames=("norm",))
l1_topk_direction = fast_jit(norms.l1_topk_direction)
project_l1_ball = fast_jit(norms.project_l1_ball)


def _batch(seed, shape=(32, 4, 4, 2), low=0.0, high=1.0):
  return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


def _np_norm(v, norm):
  flat = np.asarray(v, np.float64).reshape(len(v), -1)
  return {"linf": np.abs(flat).max(1), "l2": np.sqrt((flat ** 2).sum(1)),
          "l1": np.abs(flat).sum(1)}[norm]


@pytest.mark.parametrize("norm", norms.NORMS)
def test_lp_norm_is_per_example_on_nhwc(norm):
  v = _batch(0, low=-1.0)
  np.testing.assert_allclose(norms.lp_norm(v, norm), _np_norm(v, norm), rtol=1e-5)


@pytest.mark.parametrize("norm", norms.NORMS)
def test_random_init_inside_ball_and_box_with_per_example_eps(norm):
  x = _batch(1)
  eps = np.linspace(0.01, {"linf": 0.3, "l2": 2.0, "l1": 8.0}[norm], len(x)).astype(np.float32)
  x0 = random_init(jax.random.key(0), x, eps, norm)
  assert np.all(_np_norm(x0 - x, norm) <= eps * (1 + 1e-5))
  assert float(jnp.min(x0)) >= 0.0 and float(jnp.max(x0)) <= 1.0
  assert np.all(_np_norm(x0 - x, norm) > 0)


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_random_init_is_uniform_in_the_ball(norm):
  # In d = 2, a uniform point of the ball lies within half the radius with
  # probability (1/2)^2 = 1/4 for any norm; mass on the sphere would give 0.
  x = np.full((20000, 1, 1, 2), 0.5, np.float32)
  delta = np.asarray(random_init(jax.random.key(3), x, 0.1, norm)) - x
  inner = np.mean(_np_norm(delta, norm) < 0.05)
  assert abs(inner - 0.25) < 0.02, inner
  # Both signs of each coordinate appear equally often.
  assert abs(np.mean(delta[..., 0] > 0) - 0.5) < 0.02


def test_steepest_direction_maximises_inner_product_over_the_unit_ball():
  rng = np.random.default_rng(2)
  g = rng.normal(size=(8, 3, 3, 2)).astype(np.float32)
  for norm, dual in [("linf", "l1"), ("l2", "l2"), ("l1", "linf")]:
    u = np.asarray(steepest_direction(g, norm))
    np.testing.assert_allclose(_np_norm(u, norm), 1.0, rtol=1e-5)
    best = np.sum((g * u).reshape(8, -1), 1)
    # <g, u> equals the dual norm of g: the maximum over the unit ball.
    np.testing.assert_allclose(best, _np_norm(g, dual), rtol=1e-5)
    for _ in range(20):
      v = rng.normal(size=g.shape)
      v /= _np_norm(v, norm)[:, None, None, None]
      assert np.all(np.sum((g * v).reshape(8, -1), 1) <= best + 1e-5)


def test_l1_topk_direction_moves_the_requested_fraction():
  g = np.random.default_rng(3).normal(size=(4, 10, 10, 1)).astype(np.float32)
  u = np.asarray(l1_topk_direction(g, np.array([0.01, 0.1, 0.5, 1.0])))
  np.testing.assert_array_equal(np.count_nonzero(u.reshape(4, -1), 1), [1, 10, 50, 100])
  np.testing.assert_allclose(_np_norm(u, "l1"), 1.0, rtol=1e-6)
  kept = np.abs(g.reshape(4, -1))[1][u.reshape(4, -1)[1] != 0]
  assert kept.min() >= np.sort(np.abs(g.reshape(4, -1))[1])[-10]
  assert np.all(np.sign(u) * np.sign(g) >= 0)
  assert np.all(np.asarray(l1_topk_direction(np.zeros((2, 3)), 0.5)) == 0)


@pytest.mark.parametrize("norm,exact", [("linf", None), ("l2", False), ("l2", True),
                                        ("l1", False), ("l1", True)])
def test_projection_is_feasible_idempotent_and_keeps_feasible_points(norm, exact):
  x = _batch(4)
  z = x + _batch(5, low=-0.6, high=0.6)
  eps = {"linf": 0.1, "l2": 1.0, "l1": 3.0}[norm]
  p = np.asarray(project(z, x, eps, norm, exact=exact))
  assert np.all(_np_norm(p - x, norm) <= eps * (1 + 1e-5) + 1e-6)
  assert p.min() >= 0.0 and p.max() <= 1.0
  again = np.asarray(project(p, x, eps, norm, exact=exact))
  np.testing.assert_allclose(again, p, atol=2e-6)
  inside = np.asarray(random_init(jax.random.key(1), x, eps, norm))
  np.testing.assert_allclose(project(inside, x, eps, norm, exact=exact), inside,
                             atol=1e-6)


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_exact_projection_onto_ball_and_box_is_optimal(norm):
  # p is the Euclidean projection of z onto a convex set C iff
  # <z - p, q - p> <= 0 for every q in C; check it against many feasible q,
  # and that p is at least as close to z as ball-then-clip.
  rng = np.random.default_rng(6)
  x = rng.uniform(0, 1, (32, 4, 4, 2)).astype(np.float32)
  x[:, 0] = 0.0  # pixels on the box boundary, where the box binds
  x[:, 1] = 1.0
  z = x + rng.normal(0, 0.6, x.shape).astype(np.float32)
  eps = {"l2": 1.0, "l1": 3.0}[norm]
  p = np.asarray(project(z, x, eps, norm, exact=True), np.float64)
  approx = np.asarray(project(z, x, eps, norm, exact=False), np.float64)
  assert np.all(_np_norm(z - p, "l2") <= _np_norm(z - approx, "l2") + 1e-5)
  assert np.any(_np_norm(z - p, "l2") < _np_norm(z - approx, "l2") - 1e-3)
  for seed in range(30):
    q = np.asarray(random_init(jax.random.key(seed), x, eps, norm), np.float64)
    inner = np.sum(((z - p) * (q - p)).reshape(32, -1), 1)
    assert np.all(inner <= 1e-4), inner.max()
  # The budget is used up exactly where z was outside the set.
  outside = _np_norm(np.clip(z, 0, 1) - x, norm) > eps
  np.testing.assert_allclose(_np_norm(p - x, norm)[outside], eps, rtol=1e-4)


def test_project_l1_ball_matches_brute_force_bisection():
  v = np.random.default_rng(7).normal(size=(6, 20)).astype(np.float64)
  eps = np.array([0.5, 1.0, 2.0, 5.0, 50.0, 0.0])
  p = np.asarray(project_l1_ball(v.astype(np.float32), eps.astype(np.float32)))
  for row, radius, got in zip(v, eps, p):
    lo, hi = 0.0, np.abs(row).max()
    if np.abs(row).sum() <= radius:
      expected = row
    else:
      for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if np.maximum(np.abs(row) - mid, 0).sum() <= radius else (mid, hi)
      expected = np.sign(row) * np.maximum(np.abs(row) - hi, 0)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_projection_with_zero_eps_returns_the_clean_point():
  x = _batch(8)
  z = _batch(9)
  for norm in norms.NORMS:
    for exact in (False, True):
      np.testing.assert_allclose(project(z, x, 0.0, norm, exact=exact), x, atol=1e-7)


def test_unknown_norm_lists_the_accepted_ones():
  with pytest.raises(ValueError, match="'linf', 'l2', 'l1'.*Did you mean 'linf'"):
    norms.lp_norm(np.zeros((1, 2)), "linfty")


def test_batch_helpers_broadcast_and_flatten_per_example():
  like = jnp.zeros((3, 4, 4, 2), jnp.bfloat16)
  scalar = norms.broadcast_per_example(0.5, like)
  per_example = norms.broadcast_per_example(np.array([1.0, 2.0, 3.0]), like)
  assert scalar.shape == () and scalar.dtype == jnp.bfloat16
  assert per_example.shape == (3, 1, 1, 1) and per_example.dtype == jnp.bfloat16
  np.testing.assert_array_equal((per_example * jnp.ones_like(like))[:, 3, 2, 1], [1, 2, 3])
  v = np.arange(3 * 32, dtype=np.float32).reshape(3, 4, 4, 2)
  np.testing.assert_array_equal(norms.flatten_batch(v), v.reshape(3, 32))
