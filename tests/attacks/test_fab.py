"""FAB / FAB-T: exact projections, a float64 transcription of the reference
loop, closed-form minimal perturbations of linear models, and strength."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from certjax import attacks
from certjax.attacks.fab import project_hyperplane_box
from tests.attacks.conftest import BATCH, IMAGE_SHAPE, fast_jit, linear_apply, mlp_apply

NORMS = ("linf", "l2", "l1")


def _np_norm(v, norm):
  flat = np.asarray(v, np.float64).reshape(len(v), -1)
  return {"linf": np.abs(flat).max(1), "l2": np.sqrt((flat ** 2).sum(1)),
          "l1": np.abs(flat).sum(1)}[norm]


# ----------------------------------------------------------------------------
# Float64 NumPy transcriptions of fab_projections.py of fra31/auto-attack
# (projection_linf, projection_l2, projection_l1), line by line, bisections
# included. Only the reference's 0/0 (a zero weight at a pixel on the box
# boundary, NaN in torch too and then overwritten) is silenced. The L1
# bisection runs ceil(log2 d) steps over d + 2 candidates, which converges
# unless d is a power of 2: the tests use d = 6 and 49.


def ref_projection_linf(t, w, b):
  t, w, b = t.copy(), w.copy(), b.copy()
  n, dim = w.shape
  rows = np.arange(n)
  sign = 2 * ((w * t).sum(1) - b >= 0) - 1
  w *= sign[:, None]
  b *= sign
  a = (w < 0).astype(float)
  d = (a - t) * (w != 0)
  p = a - t * (2 * a - 1)
  indp = np.argsort(p, axis=1, kind="stable")
  b = b - (w * t).sum(1)
  b0 = (w * d).sum(1)
  indp2 = indp[:, ::-1]
  ws = np.take_along_axis(w, indp2, 1)
  bs2 = -ws * np.take_along_axis(d, indp2, 1)
  s = np.cumsum(np.abs(ws), axis=1)
  sb = np.cumsum(bs2, axis=1) + b0[:, None]
  b2 = sb[:, -1] - s[:, -1] * p[rows, indp[:, 0]]
  c_l = b - b2 > 0
  c2 = (b - b0 > 0) & (b - b2 <= 0)
  lb = np.zeros(c2.sum())
  ub = np.full(c2.sum(), dim - 1.0)
  sub = np.arange(c2.sum())
  indp_, sb_, s_, p_, b_ = indp[c2], sb[c2], s[c2], p[c2], b[c2]
  for _ in range(math.ceil(math.log2(dim))):
    counter4 = np.floor((lb + ub) / 2)
    counter2 = counter4.astype(int)
    indcurr = indp_[sub, dim - 1 - counter2]
    b2 = sb_[sub, counter2] - s_[sub, counter2] * p_[sub, indcurr]
    c = b_ - b2 > 0
    lb = np.where(c, counter4, lb)
    ub = np.where(c, ub, counter4)
  lb = lb.astype(int)
  if c_l.any():
    lmbd = np.maximum((b[c_l] - sb[c_l, -1]) / (-s[c_l, -1]), 0)[:, None]
    d[c_l] = (2 * a[c_l] - 1) * lmbd
  lmbd = np.maximum((b[c2] - sb[c2][sub, lb]) / (-s[c2][sub, lb]), 0)[:, None]
  d[c2] = np.minimum(lmbd, d[c2]) * a[c2] + np.maximum(-lmbd, d[c2]) * (1 - a[c2])
  return d * (w != 0)


def ref_projection_l2(t, w, b):
  t, w = t.copy(), w.copy()
  n, dim = w.shape
  c = (w * t).sum(1) - b
  ind2 = c < 0
  w[ind2] *= -1
  c[ind2] *= -1
  with np.errstate(divide="ignore", invalid="ignore"):
    r = np.clip(np.maximum(t / w, (t - 1) / w), -1e12, 1e12)
  r[np.abs(w) < 1e-8] = 1e12
  r[r == -1e12] *= -1
  indr = np.argsort(r, axis=1, kind="stable")
  rs = np.take_along_axis(r, indr, 1)
  rs2 = np.concatenate([rs[:, 1:], np.zeros((n, 1))], axis=1)
  rs[rs == 1e12] = 0
  rs2[rs2 == 1e12] = 0
  w3s = np.take_along_axis(w ** 2, indr, 1)
  w5 = w3s.sum(1, keepdims=True)
  ws = w5 - np.cumsum(w3s, axis=1)
  d = -(r * w) * (np.abs(w) > 1e-8)
  s = np.concatenate([-w5 * rs[:, :1], np.cumsum((-rs2 + rs) * ws, axis=1) - w5 * rs[:, :1]],
                     axis=1)
  c4 = s[:, 0] + c < 0
  c3 = (d * w).sum(1) + c > 0
  c2 = ~c4 & ~c3
  lb = np.zeros(c2.sum())
  ub = np.full(c2.sum(), dim - 1.0)
  sub = np.arange(c2.sum())
  s_, c_ = s[c2], c[c2]
  for _ in range(math.ceil(math.log2(dim))):
    counter4 = np.floor((lb + ub) / 2)
    c3 = s_[sub, counter4.astype(int)] + c_ > 0
    lb = np.where(c3, counter4, lb)
    ub = np.where(c3, ub, counter4)
  lb = lb.astype(int)
  if c4.any():
    alpha = c[c4] / w5[c4, 0]
    d[c4] = -alpha[:, None] * w[c4]
  if c2.any():
    alpha = (s[c2][sub, lb] + c[c2]) / ws[c2][sub, lb] + rs[c2][sub, lb]
    alpha[ws[c2][sub, lb] == 0] = 0
    c5 = (alpha[:, None] > r[c2]).astype(float)
    d[c2] = d[c2] * c5 - alpha[:, None] * w[c2] * (1 - c5)
  return d * (np.abs(w) > 1e-8)


def ref_projection_l1(t, w, b):
  t, w = t.copy(), w.copy()
  n, dim = w.shape
  c = (w * t).sum(1) - b
  ind2 = c < 0
  w[ind2] *= -1
  c[ind2] *= -1
  with np.errstate(divide="ignore"):
    r = np.minimum(np.maximum(1 / w, -1 / w), 1e12)
  indr = np.argsort(r, axis=1, kind="stable")
  indr_rev = np.argsort(indr, axis=1, kind="stable")
  c6 = (w < 0).astype(float)
  d = (-t + c6) * (w != 0)
  ds = np.take_along_axis(np.minimum(-w * t, w * (1 - t)), indr, 1)
  s = np.cumsum(np.concatenate([c[:, None], ds], axis=1), axis=1)
  c2 = s[:, -1] < 0
  lb = np.zeros(c2.sum())
  ub = np.full(c2.sum(), float(s.shape[1]))
  sub = np.arange(c2.sum())
  s_ = s[c2]
  for _ in range(math.ceil(math.log2(dim))):
    counter4 = np.floor((lb + ub) / 2)
    c3 = s_[sub, counter4.astype(int)] > 0
    lb = np.where(c3, counter4, lb)
    ub = np.where(c3, ub, counter4)
  lb2 = lb.astype(int)
  if c2.any():
    alpha = -s[c2][sub, lb2] / w[c2][sub, indr[c2][sub, lb2]]
    c5 = np.arange(dim)[None, :] < lb[:, None]
    u3 = np.take_along_axis(c5, indr_rev[c2], 1)
    dc = d[c2] * u3
    dc[sub, indr[c2][sub, lb2]] = alpha
    d[c2] = dc
  return d * (np.abs(w) > 1e-8)


REFERENCE = {"linf": ref_projection_linf, "l2": ref_projection_l2, "l1": ref_projection_l1}


def _hyperplane_cases(rng, n, dim):
  """Points in the box (some coordinates on its faces), normals (some zero
  entries) and offsets: reachable ones, the current side and unreachable ones."""
  t = rng.uniform(size=(n, dim))
  t[rng.uniform(size=(n, dim)) < 0.2] = 0.0
  t[rng.uniform(size=(n, dim)) < 0.1] = 1.0
  w = rng.normal(size=(n, dim))
  w[rng.uniform(size=(n, dim)) < 0.15] = 0.0
  # <w, t> plus a move that the box allows for most rows (scale < 1) and
  # does not allow for some (scale > 1); a few rows already on the plane.
  lo = np.sum(np.minimum(w * (0 - t), w * (1 - t)), axis=1)
  hi = np.sum(np.maximum(w * (0 - t), w * (1 - t)), axis=1)
  scale = rng.choice([0.05, 0.3, 0.7, 0.99, 1.5], size=n)
  towards = np.where(rng.uniform(size=n) < 0.5, lo, hi)
  b = np.sum(w * t, axis=1) + scale * towards
  b[:3] = np.sum(w * t, axis=1)[:3]
  reachable = scale <= 1
  reachable[:3] = True
  return t, w, b, reachable


@pytest.mark.parametrize("norm", NORMS)
def test_projections_match_a_transcription_of_the_reference(norm):
  rng = np.random.default_rng(11)
  t, w, b, _ = _hyperplane_cases(rng, 300, 49)
  with jax.enable_x64(True):
    ours = np.asarray(jax.jit(lambda t, w, b: project_hyperplane_box(t, w, b, norm))(t, w, b))
  expected = REFERENCE[norm](t, w, b)
  assert ours.dtype == np.float64
  np.testing.assert_allclose(ours, expected, atol=1e-9, rtol=0)


def _scipy_minimum(t, w, b, norm):
  """min ||d||_p s.t. <w, t + d> = b, 0 <= t + d <= 1, by an LP (linf, l1) or SLSQP (l2)."""
  dim = len(t)
  bounds = list(zip(-t, 1 - t))
  if norm == "l2":
    res = optimize.minimize(lambda d: d @ d, np.zeros(dim), jac=lambda d: 2 * d,
                            bounds=bounds, method="SLSQP", options={"ftol": 1e-14},
                            constraints={"type": "eq", "fun": lambda d: w @ (t + d) - b,
                                         "jac": lambda d: w})
    return np.sqrt(res.fun)
  if norm == "linf":  # variables (d, s): min s, -s <= d_i <= s
    c = np.r_[np.zeros(dim), 1.0]
    a_ub = np.block([[np.eye(dim), -np.ones((dim, 1))], [-np.eye(dim), -np.ones((dim, 1))]])
    res = optimize.linprog(c, A_ub=a_ub, b_ub=np.zeros(2 * dim), A_eq=np.r_[w, 0.0][None],
                           b_eq=[b - w @ t], bounds=bounds + [(0, None)], method="highs")
  else:  # d = u - v, u, v >= 0, min sum(u + v)
    c = np.ones(2 * dim)
    a_ub = np.block([[np.eye(dim), -np.eye(dim)], [-np.eye(dim), np.eye(dim)]])
    res = optimize.linprog(c, A_ub=a_ub, b_ub=np.r_[1 - t, t], A_eq=np.r_[w, -w][None],
                           b_eq=[b - w @ t], bounds=[(0, None)] * (2 * dim), method="highs")
  assert res.status == 0, res.message
  return res.fun


@pytest.mark.parametrize("norm", NORMS)
def test_projections_are_the_closest_point_of_hyperplane_and_box(norm):
  rng = np.random.default_rng(5)
  t, w, b, reachable = _hyperplane_cases(rng, 40, 6)
  with jax.enable_x64(True):
    d = np.asarray(project_hyperplane_box(t, w, b, norm))
  z = t + d
  assert np.all(z >= -1e-12) and np.all(z <= 1 + 1e-12)  # in the box
  assert np.all(d[w == 0] == 0)  # coordinates that cannot help never move
  on_plane = np.abs(np.sum(w * z, axis=1) - b) < 1e-9
  np.testing.assert_array_equal(on_plane, reachable)
  for i in np.nonzero(reachable)[0]:
    best = _scipy_minimum(t[i], w[i], b[i], norm)
    size = _np_norm(d[i:i + 1], norm)[0]
    assert size <= best * (1 + 1e-6) + 1e-9, (i, size, best)
    assert size >= best * (1 - 1e-6) - 1e-9, (i, size, best)
  # Unreachable: every helpful coordinate at its bound (the closest corner).
  for i in np.nonzero(~reachable)[0]:
    side = np.sign(b[i] - w[i] @ t[i]) * np.sign(w[i])
    np.testing.assert_allclose(z[i], np.where(side > 0, 1.0, np.where(side < 0, 0.0, t[i])))


# ----------------------------------------------------------------------------
# The whole FAB-T loop, transcribed from fab_base.py (attack_single_run with
# is_targeted, and perturb's loop over target classes) in float64 NumPy, on
# the tanh MLP of `mlp_apply`.


def _fab_t_reference(params, x, y, eps, norm, num_steps, num_targets,
                     alpha_max=0.1, eta=1.05, beta=0.9):
  w1, b1, w2, b2 = (np.asarray(params[k], np.float64) for k in ("w1", "b1", "w2", "b2"))
  flat = lambda v: v.reshape(len(v), -1)

  def logits_of(v):
    return np.tanh(flat(v) @ w1 + b1) @ w2 + b2

  def diff_and_grad(v, la, target):
    hidden = np.tanh(flat(v) @ w1 + b1)
    logits = hidden @ w2 + b2
    rows = np.arange(len(v))
    df = logits[rows, target] - logits[rows, la]
    out = np.zeros_like(logits)
    out[rows, target], out[rows, la] = 1.0, -1.0
    dg = ((out @ w2.T) * (1 - hidden ** 2)) @ w1.T
    return df, dg.reshape(v.shape)

  size = lambda v: _np_norm(v, norm)
  project = REFERENCE[norm]
  clean = logits_of(x)
  acc = clean.argmax(1) == y
  adv = x.copy()
  order = np.argsort(clean, axis=1, kind="stable")
  for target_class in range(2, num_targets + 2):
    idx = np.nonzero(acc)[0]
    if not len(idx):
      break
    im2, la2 = x[idx], y[idx]
    la_target = order[idx, -target_class]
    x1, x0 = im2.copy(), flat(im2)
    res2 = np.full(len(idx), 1e10)
    best = im2.copy()
    for _ in range(num_steps):
      df, dg = diff_and_grad(x1, la2, la_target)
      w = flat(dg)
      b = -df + np.sum(w * flat(x1), axis=1)
      d3 = project(np.concatenate([flat(x1), x0]), np.concatenate([w, w]),
                   np.concatenate([b, b]))
      d1, d2 = d3[:len(idx)].reshape(x1.shape), d3[len(idx):].reshape(x1.shape)
      a0 = np.maximum(size(d3), 1e-8)
      a1, a2 = a0[:len(idx)], a0[len(idx):]
      alpha = np.minimum(np.maximum(a1 / (a1 + a2), 0), alpha_max).reshape(-1, 1, 1, 1)
      x1 = np.clip((x1 + eta * d1) * (1 - alpha) + (im2 + d2 * eta) * alpha, 0, 1)
      is_adv = logits_of(x1).argmax(1) != la2
      t = size(x1 - im2)
      closer = is_adv & (t < res2)
      best[closer], res2[closer] = x1[closer], t[closer]
      x1[is_adv] = im2[is_adv] + (x1[is_adv] - im2[is_adv]) * beta
    found = res2 < 1e10
    out = np.where(found.reshape(-1, 1, 1, 1), best, im2)
    broken = (logits_of(out).argmax(1) != la2) & (size(out - im2) <= eps)
    acc[idx[broken]] = False
    adv[idx[broken]] = out[broken]
  return adv


@pytest.mark.parametrize("norm,eps", [("linf", 0.03), ("l2", 0.25), ("l1", 1.0)])
def test_fab_t_matches_a_transcription_of_the_reference_loop(norm, eps):
  # A random tanh MLP with large weights (curved boundaries, so the steps,
  # the bias towards x and the backward steps all matter); FAB-T with one
  # restart starts at x and draws no random numbers, so both sides must
  # agree point by point.
  rng = np.random.default_rng(4)
  shapes = {"w1": (49, 16), "b1": (16,), "w2": (16, 10), "b2": (10,)}
  params = {k: 2.0 * rng.normal(size=v) / np.sqrt(v[0]) for k, v in shapes.items()}
  x = rng.uniform(size=(32,) + IMAGE_SHAPE)
  x[:, :2] = 0.0  # pixels on the box boundary
  with jax.enable_x64(True):
    model = jax.tree_util.Partial(mlp_apply, jax.tree.map(jnp.asarray, params))
    y = np.array(jnp.argmax(model(x), -1))
    y[:4] = (y[:4] + 1) % 10  # misclassified at x: returned unchanged
    x_adv = np.asarray(fast_jit(lambda x, y: attacks.fab_targeted(
        jax.random.key(0), model, x, y, eps=eps, norm=norm, num_steps=15,
        num_target_classes=3))(x, y))
  assert x_adv.dtype == np.float64
  expected = _fab_t_reference(params, x, y, eps, norm, 15, 3)
  moved = _np_norm(expected - x, norm) > 0
  assert 0 < moved.sum() < len(x) - 4, moved.sum()  # some broken, some not
  np.testing.assert_array_equal(x_adv[:4], x[:4])
  np.testing.assert_allclose(x_adv, expected, atol=1e-9, rtol=0)


# ----------------------------------------------------------------------------
# Linear models: the minimal perturbation has a closed form.


def _binary_linear_case(norm, rng):
  """A 2-class linear model and points of class 0 whose minimal perturbation
  (the margin over the dual norm of w_1 - w_0) stays inside the box."""
  w = rng.normal(size=(49, 2))
  dual = {"linf": np.abs(w[:, 1] - w[:, 0]).sum(), "l2": np.linalg.norm(w[:, 1] - w[:, 0]),
          "l1": np.abs(w[:, 1] - w[:, 0]).max()}[norm]
  x = rng.uniform(0.4, 0.6, (64,) + IMAGE_SHAPE)
  margin = (x.reshape(64, -1) @ w) @ np.array([1.0, -1.0])  # z_0 - z_1 without bias
  bias = np.array([0.05 * dual - np.median(margin), 0.0])
  distance = (margin + bias[0]) / dual
  # Linf and L2 minimisers move coordinates by at most the distance, L1 one
  # coordinate by it: below 0.35 none reaches the box.
  keep = (distance > 1e-3) & (distance < 0.35)
  return {"w": w, "b": bias}, x[keep], distance[keep]


@pytest.mark.parametrize("norm", NORMS)
def test_fab_finds_the_minimal_perturbation_of_a_linear_model(norm):
  rng = np.random.default_rng(7)
  params, x, distance = _binary_linear_case(norm, rng)
  assert len(x) >= 16
  y = np.zeros(len(x), np.int32)
  with jax.enable_x64(True):
    model = jax.tree_util.Partial(linear_apply, jax.tree.map(jnp.asarray, params))
    assert np.all(np.asarray(jnp.argmax(model(x), -1)) == 0)
    big = {"linf": 1.0, "l2": 10.0, "l1": 50.0}[norm]  # the ball never binds
    for attack in (attacks.fab, attacks.fab_targeted):
      run = fast_jit(lambda x, y, e: attack(  # pylint: disable=cell-var-from-loop
          jax.random.key(0), model, x, y, eps=e, norm=norm, num_steps=30))
      x_adv = np.asarray(run(x, y, np.full(len(x), big)))
      found = _np_norm(x_adv - x, norm)
      assert np.all(np.asarray(jnp.argmax(model(x_adv), -1)) == 1)
      # Never below the optimum (a check of the closed form), and close to it.
      assert np.all(found >= distance * (1 - 1e-9)), (found / distance).min()
      assert np.all(found <= distance * 1.01), (found / distance).max()
      # At a radius just below the minimum nothing is adversarial: x comes back.
      np.testing.assert_array_equal(np.asarray(run(x, y, 0.999 * distance)), x)


def test_untargeted_fab_picks_the_closest_class_of_a_linear_model(linear_model):
  # Ten classes: the minimal L2 perturbation is min_k (z_y - z_k) / ||w_y - w_k||.
  model, params = linear_model
  w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
  rng = np.random.default_rng(9)
  x = rng.uniform(0.45, 0.55, (32,) + IMAGE_SHAPE).astype(np.float32)
  z = x.reshape(32, -1).astype(np.float64) @ w + b
  y = z.argmax(1)
  gaps = z[np.arange(32), y][:, None] - z
  with np.errstate(invalid="ignore"):  # 0 / 0 at k = y, replaced below
    dists = gaps / np.linalg.norm(w[:, y].T[:, :, None] - w[None], axis=1)
  dists[np.arange(32), y] = np.inf
  distance = dists.min(1)
  x_adv = np.asarray(fast_jit(lambda x, y: attacks.fab(
      jax.random.key(0), model, x, y, eps=10.0, norm="l2", num_steps=50))(x, y))
  found = _np_norm(x_adv - x, "l2")
  assert np.all(np.argmax(model(x_adv), -1) != y)
  assert np.all(found >= distance * (1 - 1e-4)) and np.all(found <= distance * 1.02), (
      (found / distance).min(), (found / distance).max())


# ----------------------------------------------------------------------------
# Strength and feasibility on the trained MLP.


def test_fab_t_breaks_the_trained_mlp_as_often_as_pgd_and_ignores_logit_scale(
    mnist, trained_mlp, predict):
  # Same budget: FAB-T with 9 targets x 10 steps makes 90 forward and
  # backward passes (and 90 forward passes); PGD gets 90 steps. On the
  # trained MLP the two break about as many digits (PGD's count moves by a
  # few with its random start: 343-353 over seeds 0-2 here, FAB-T 348, which
  # draws no random numbers); on the same classifier with its logits scaled
  # by 1024, where the softmax saturates and the cross-entropy gradient
  # underflows to zero, PGD collapses and FAB-T, which only uses logit
  # differences, returns exactly the same points.
  # The scale is a leaf of the model, so both models share one compilation.
  def scaled_apply(params, scale, v):
    return scale * mlp_apply(params, v)

  model = jax.tree_util.Partial(scaled_apply, trained_mlp[1], jnp.float32(1.0))
  scaled = jax.tree_util.Partial(scaled_apply, trained_mlp[1], jnp.float32(1024.0))
  # The three radii as one batch with per-example eps: one call per attack.
  radii = (0.01, 0.02, 0.03)
  x = np.concatenate([mnist["x_test"]] * len(radii))
  y = np.concatenate([mnist["y_test"]] * len(radii))
  eps = np.repeat(np.float32(radii), len(mnist["y_test"]))
  # Compute-bound (90 steps of 768 rows): worth XLA's optimisations.
  fab_t = jax.jit(lambda m, x, y, eps: attacks.fab_targeted(
      jax.random.key(0), m, x, y, eps=eps, num_steps=10, num_target_classes=9))
  pgd = jax.jit(lambda m, x, y, eps: attacks.pgd(
      jax.random.key(0), m, x, y, eps=eps, num_steps=90))
  clean = np.asarray(predict(x)) == y
  x_fab = np.asarray(fab_t(model, x, y, eps))
  sizes = _np_norm(x_fab - x, "linf")
  assert np.all(sizes <= eps * (1 + 1e-5) + 1e-7) and x_fab.min() >= 0 and x_fab.max() <= 1
  broken = np.asarray(predict(x_fab)) != y
  assert np.all(sizes[~broken] == 0)  # FAB-T moves only the points it breaks
  np.testing.assert_array_equal(np.asarray(fab_t(scaled, x, y, eps)), x_fab)
  fooled = {"fab_t": int(np.sum(broken & clean))}
  fooled["fab_t_scaled"] = fooled["fab_t"]
  for name, m in (("pgd", model), ("pgd_scaled", scaled)):
    fooled[name] = int(np.sum((np.asarray(predict(pgd(m, x, y, eps))) != y) & clean))
  assert fooled["fab_t"] >= 0.97 * fooled["pgd"] > 0, fooled
  assert fooled["pgd_scaled"] < fooled["pgd"] / 2, fooled
  assert fooled["fab_t_scaled"] > fooled["pgd_scaled"], fooled


def test_fab_under_vmap_with_per_example_eps(trained_mlp, mnist):
  model = trained_mlp[0]
  x, y = mnist["x_test"][:16], mnist["y_test"][:16]
  eps = np.linspace(0.0, 0.1, 16).astype(np.float32)
  one = fast_jit(lambda x, y, e: attacks.fab_targeted(
      jax.random.key(1), model, x, y, eps=e, num_steps=5, num_target_classes=2,
      num_restarts=2))
  out = np.asarray(one(x, y, eps))
  sizes = _np_norm(out - x, "linf")
  assert np.all(sizes <= eps * (1 + 1e-5) + 1e-7) and sizes[0] == 0 and sizes.max() > 0
  batched = fast_jit(jax.vmap(lambda x, y, e: attacks.fab_targeted(
      jax.random.key(1), model, x, y, eps=e, num_steps=5, num_target_classes=2,
      num_restarts=2)))(x.reshape(2, 8, *IMAGE_SHAPE), y.reshape(2, 8), eps.reshape(2, 8))
  np.testing.assert_allclose(np.asarray(batched).reshape(out.shape), out, atol=1e-6)


def test_fab_restarts_start_at_the_references_random_point():
  # Restart r > 0 starts at x + eps / 2 * u / ||u||_p (clipped to the box),
  # u uniform in the cube (linf) or standard normal (l2, l1).
  from certjax.attacks.fab import _restart_start
  x = np.full((64,) + IMAGE_SHAPE, 0.5, np.float32)
  for norm in NORMS:
    start = np.asarray(_restart_start(jax.random.key(0), x, np.float32(0.2), norm))
    np.testing.assert_allclose(_np_norm(start - x, norm), 0.1, rtol=1e-5)
    if norm == "linf":  # u uniform in the cube: every coordinate moves
      assert np.all(np.abs(start - x) > 0)
    else:  # Gaussian directions: distinct per example
      assert len({row.tobytes() for row in start}) == 64


def test_fab_settings_are_validated():
  x, y = np.full((2,) + IMAGE_SHAPE, 0.5, np.float32), np.zeros(2, np.int32)
  model = lambda v: v.reshape(2, -1)[:, :3]
  with pytest.raises(ValueError, match=r"alpha_max must lie in \[0, 1\]"):
    attacks.fab_targeted(jax.random.key(0), model, x, y, eps=0.1, alpha_max=1.5)
  with pytest.raises(ValueError, match=r"beta must lie in \(0, 1\]"):
    attacks.make_fab(beta=0.0)
  with pytest.raises(ValueError, match="eta must be a finite number > 0"):
    attacks.make_fab_targeted(eta=-1.0)
  with pytest.raises(ValueError, match="num_target_classes must be an integer >= 1"):
    attacks.make_fab_targeted(num_target_classes=0)
  with pytest.raises(ValueError, match="final_search_steps must be an integer >= 0"):
    attacks.fab(jax.random.key(0), model, x, y, eps=0.1, final_search_steps=-1)


def test_final_search_keeps_points_adversarial_and_never_moves_them_away(trained_mlp, mnist):
  model = trained_mlp[0]
  x, y = mnist["x_test"][:BATCH], mnist["y_test"][:BATCH]
  run = fast_jit(lambda x, y, steps: attacks.fab_targeted(
      jax.random.key(0), model, x, y, eps=0.2, num_steps=3, num_target_classes=2,
      final_search_steps=steps), static_argnums=2)
  plain, searched = np.asarray(run(x, y, 0)), np.asarray(run(x, y, 3))
  before, after = _np_norm(plain - x, "linf"), _np_norm(searched - x, "linf")
  def margin(v):  # z_y - max_{k != y} z_k: < 0 where misclassified
    z = np.asarray(model(v), np.float64)
    own = z[np.arange(len(z)), y]
    z[np.arange(len(z)), y] = -np.inf
    return own - z.max(1)

  broken = (margin(plain) < 0) & (before > 0)
  assert broken.sum() > BATCH // 2
  # The search ends on the boundary: adversarial up to float rounding (a
  # re-evaluation compiled differently may see a margin of +1e-6).
  scale = np.abs(np.asarray(model(x))).max()
  assert np.all(margin(searched)[broken] <= 1e-5 * scale), margin(searched)[broken].max()
  assert np.all(after[broken] <= before[broken] + 1e-6)
  assert np.mean(after[broken] < before[broken] * (1 - 1e-4)) > 0.5
