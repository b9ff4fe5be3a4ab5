"""Lp-ball geometry for attacks: norms, random starts, steepest steps, projections.

Every function works on a batch (NHWC or any rank >= 1 with the batch first)
and is per-example: the radius `eps` may be a scalar or an array of shape
(batch,), and nothing mixes examples, so the functions work under `jit`, `vmap`
and with the batch sharded over a mesh.

The feasible set of an attack on images is the intersection of the Lp ball of
radius `eps` around the clean point `x` with the pixel box [0, 1]^d. How each
norm handles that intersection:

* `linf`: clipping to the ball then to the box is the exact Euclidean
  projection onto the intersection (both are boxes).
* `l2`: the default (`exact=False`) rescales the perturbation onto the ball and
  then clips to the box, as Madry et al. and AutoAttack do. The result is always
  feasible (clipping towards `x` never increases a norm) but is not the nearest
  feasible point. `exact=True` computes the exact projection onto the
  intersection: its KKT conditions give delta = clip(t * z, -x, 1 - x) for a
  scalar t in (0, 1], found by bisection (monotone in t).
* `l1`: the default (`exact=True`) is the exact projection onto the
  intersection of the L1 ball and the box (Croce & Hein 2021), computed by
  sorting the 2d breakpoints of the piecewise-linear function
  lambda -> || clip(soft_threshold(z, lambda), box) ||_1. `exact=False` projects
  onto the L1 ball (Duchi et al. 2008, sorting) and then clips, which wastes
  much of the budget on coordinates the box cuts off.

Random starts are uniform in the ball (then clipped to the box): for `l2`, a
Gaussian direction with radius eps * U^(1/d); for `l1`, exponential spacings
(the normalised vector of d+1 i.i.d. Exp(1) variables, dropping the last, is
uniform in the simplex) with random signs. In high dimension both concentrate
near the sphere.

References:
  Madry, Makelov, Schmidt, Tsipras, Vladu. Towards Deep Learning Models
    Resistant to Adversarial Attacks. ICLR 2018.
  Duchi, Shalev-Shwartz, Singer, Chandra. Efficient Projections onto the
    l1-Ball for Learning in High Dimensions. ICML 2008.
  Tramer, Boneh. Adversarial Training and Robustness for Multiple
    Perturbations (SLIDE, sparse L1 steps). NeurIPS 2019.
  Croce, Hein. Mind the Box: l1-APGD for Sparse Adversarial Attacks on Image
    Classifiers. ICML 2021.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from certjax.types import Array, ArrayLike, PRNGKey
from certjax.validation import check_choice

NORMS = ("linf", "l2", "l1")

_TINY = 1e-12
# Bisection steps for the exact L2 projection: 2^-40 is below float32 resolution.
_L2_BISECTION_STEPS = 40


def flatten_batch(v: ArrayLike) -> Array:
  """A batch as a (batch, d) matrix: one row per example, d its other dimensions.

  Args:
    v: array of rank >= 1, the batch first.

  Returns:
    `v` reshaped to (batch, -1).
  """
  v = jnp.asarray(v)
  return v.reshape(v.shape[0], -1)


def broadcast_per_example(value: ArrayLike, like: Array) -> Array:
  """Shapes a scalar or per-example value to broadcast against a batch.

  A radius, step size or norm given per example (shape (batch,)) becomes
  (batch, 1, ..., 1) with the rank of `like`; a scalar stays a scalar. Either
  is cast to `like.dtype`, so low-precision batches keep their dtype.

  Args:
    value: scalar or (batch,) array.
    like: the batch it will be combined with.

  Returns:
    `value` as an array of shape () or (batch,) + (1,) * (like.ndim - 1).
  """
  value = jnp.asarray(value, dtype=like.dtype)
  if value.ndim == 0:
    return value
  return value.reshape((-1,) + (1,) * (like.ndim - 1))


def lp_norm(v: ArrayLike, norm: str) -> Array:
  """Per-example Lp norm of a batch: shape (batch,)."""
  check_choice(norm, "norm", NORMS)
  v = flatten_batch(v)
  if norm == "linf":
    return jnp.max(jnp.abs(v), axis=1)
  if norm == "l2":
    return jnp.sqrt(jnp.sum(v * v, axis=1))
  return jnp.sum(jnp.abs(v), axis=1)


def random_init(key: PRNGKey, x: ArrayLike, eps: ArrayLike, norm: str) -> Array:
  """A random point of the eps-ball around `x`, clipped to the [0, 1] box.

  Args:
    key: a `jax.random.key`.
    x: clean batch.
    eps: radius, scalar or per example (batch,).
    norm: 'linf', 'l2' or 'l1'.

  Returns:
    x + delta with delta uniform in the ball (see module docstring), clipped
    to [0, 1].
  """
  check_choice(norm, "norm", NORMS)
  x = jnp.asarray(x)
  batch, dim = x.shape[0], x[0].size
  if norm == "linf":
    delta = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
  elif norm == "l2":
    k_dir, k_rad = jax.random.split(key)
    direction = jax.random.normal(k_dir, (batch, dim), x.dtype)
    direction /= jnp.linalg.norm(direction, axis=1, keepdims=True) + _TINY
    radius = jax.random.uniform(k_rad, (batch, 1), x.dtype) ** (1.0 / dim)
    delta = (direction * radius).reshape(x.shape)
  else:
    k_exp, k_sign = jax.random.split(key)
    spacings = jax.random.exponential(k_exp, (batch, dim + 1), x.dtype)
    point = spacings[:, :dim] / jnp.sum(spacings, axis=1, keepdims=True)
    signs = jax.random.rademacher(k_sign, (batch, dim), x.dtype)
    delta = (point * signs).reshape(x.shape)
  return jnp.clip(x + broadcast_per_example(eps, x) * delta, 0.0, 1.0)


def l1_topk_direction(grad: ArrayLike, sparsity: ArrayLike) -> Array:
  """Sparse L1 steepest-ascent direction (SLIDE / APGD-L1).

  Keeps the signs of the `ceil(sparsity * d)` largest-magnitude gradient
  coordinates (at least one, ties included) and spreads unit L1 mass evenly
  over them, so ||direction||_1 = 1 (0 for a zero gradient).

  Args:
    grad: batch of gradients.
    sparsity: fraction in (0, 1] of coordinates to move, scalar or (batch,).

  Returns:
    The direction, shaped like `grad`.
  """
  grad = jnp.asarray(grad)
  flat = flatten_batch(grad)
  dim = flat.shape[1]
  magnitude = jnp.abs(flat)
  keep = jnp.clip(jnp.ceil(jnp.asarray(sparsity, flat.dtype) * dim), 1, dim).astype(jnp.int32)
  keep = jnp.broadcast_to(keep, (flat.shape[0],))
  ascending = jnp.sort(magnitude, axis=1)
  threshold = jnp.take_along_axis(ascending, (dim - keep)[:, None], axis=1)
  mask = (magnitude >= threshold) & (magnitude > 0)
  count = jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1)
  return (jnp.sign(flat) * mask / count).reshape(grad.shape)


def steepest_direction(grad: ArrayLike, norm: str, *,
                       l1_sparsity: Optional[ArrayLike] = None) -> Array:
  """Unit-norm direction of steepest ascent for the given norm.

  The maximiser of <grad, u> over ||u||_p <= 1: sign(grad) for 'linf',
  grad / ||grad||_2 for 'l2'. For 'l1' the exact maximiser moves a single
  coordinate, which makes L1 attacks slow; with `l1_sparsity` the sparse
  top-k step of Tramer & Boneh / Croce & Hein is used instead
  (`l1_topk_direction`); `l1_sparsity=None` gives the exact single-coordinate
  step (ties share the mass).

  Args:
    grad: batch of gradients.
    norm: 'linf', 'l2' or 'l1'.
    l1_sparsity: for 'l1' only, the fraction of coordinates to move.

  Returns:
    Direction shaped like `grad`; zero where the gradient is zero.
  """
  check_choice(norm, "norm", NORMS)
  grad = jnp.asarray(grad)
  if norm == "linf":
    return jnp.sign(grad)
  if norm == "l2":
    return grad / (broadcast_per_example(lp_norm(grad, "l2"), grad) + _TINY)
  return l1_topk_direction(grad, 0.0 if l1_sparsity is None else l1_sparsity)


def project_l1_ball(v: ArrayLike, eps: ArrayLike) -> Array:
  """Euclidean projection of each example onto the L1 ball of radius eps.

  Sorting algorithm of Duchi et al. (2008); points already inside are kept.
  """
  v = jnp.asarray(v)
  flat = flatten_batch(v)
  dim = flat.shape[1]
  radius = jnp.broadcast_to(jnp.asarray(eps, flat.dtype), (flat.shape[0],))[:, None]
  magnitude = jnp.abs(flat)
  descending = -jnp.sort(-magnitude, axis=1)
  cumulative = jnp.cumsum(descending, axis=1)
  ranks = jnp.arange(1, dim + 1, dtype=flat.dtype)
  support = jnp.sum(descending * ranks > cumulative - radius, axis=1, keepdims=True)
  support = jnp.maximum(support, 1)
  theta = (jnp.take_along_axis(cumulative, support - 1, axis=1) - radius) / support
  projected = jnp.sign(flat) * jnp.maximum(magnitude - jnp.maximum(theta, 0.0), 0.0)
  inside = jnp.sum(magnitude, axis=1, keepdims=True) <= radius
  return jnp.where(inside, flat, projected).reshape(v.shape)


def _project_l1_box(delta: Array, lower: Array, upper: Array, eps: Array) -> Array:
  """Exact projection of delta onto {||d||_1 <= eps} ∩ [lower, upper] (lower <= 0 <= upper).

  The minimiser is d_i(lam) = sign(z_i) min(max(|z_i| - lam, 0), cap_i) with
  cap_i the box bound on the side of z_i, and lam >= 0 the smallest value with
  f(lam) = sum_i |d_i(lam)| <= eps. f is continuous, non-increasing and linear
  between the breakpoints |z_i| (a coordinate reaches 0) and |z_i| - cap_i (it
  leaves the box bound); sorting the 2d breakpoints gives f at each of them and
  lam by linear interpolation.
  """
  z, lo, hi = flatten_batch(delta), flatten_batch(lower), flatten_batch(upper)
  dim = z.shape[1]
  radius = jnp.broadcast_to(jnp.asarray(eps, z.dtype), (z.shape[0],))[:, None]
  magnitude = jnp.abs(z)
  cap = jnp.where(z >= 0, hi, -lo)
  clipped = jnp.sign(z) * jnp.minimum(magnitude, cap)
  breakpoints = jnp.concatenate([magnitude, magnitude - cap], axis=1)
  slopes = jnp.concatenate([jnp.ones_like(z), -jnp.ones_like(z)], axis=1)
  order = jnp.argsort(-breakpoints, axis=1)
  t = jnp.take_along_axis(breakpoints, order, axis=1)
  # Number of coordinates with slope -1 on the interval just below t[k].
  active = jnp.cumsum(jnp.take_along_axis(slopes, order, axis=1), axis=1)
  # f(t[0]) = 0; walking down the sorted breakpoints f grows by active * gap.
  f_at_t = jnp.concatenate(
      [jnp.zeros_like(radius), jnp.cumsum(active[:, :-1] * (t[:, :-1] - t[:, 1:]), axis=1)],
      axis=1)
  # First breakpoint at which f reaches eps; lam lies just above it.
  k = jnp.sum(f_at_t < radius, axis=1, keepdims=True)
  k = jnp.clip(k, 1, 2 * dim - 1)
  t_hi = jnp.take_along_axis(t, k - 1, axis=1)
  f_hi = jnp.take_along_axis(f_at_t, k - 1, axis=1)
  slope = jnp.maximum(jnp.take_along_axis(active, k - 1, axis=1), 1.0)
  lam = jnp.maximum(t_hi - (radius - f_hi) / slope, 0.0)
  projected = jnp.sign(z) * jnp.clip(magnitude - lam, 0.0, cap)
  inside = jnp.sum(jnp.abs(clipped), axis=1, keepdims=True) <= radius
  result = jnp.where(inside, clipped, projected)
  result = jnp.where(radius > 0, result, 0.0)
  return result.reshape(delta.shape)


def _project_l2_box(delta: Array, lower: Array, upper: Array, eps: Array) -> Array:
  """Exact projection onto {||d||_2 <= eps} ∩ [lower, upper] by bisection on t."""
  z, lo, hi = flatten_batch(delta), flatten_batch(lower), flatten_batch(upper)
  radius = jnp.broadcast_to(jnp.asarray(eps, z.dtype), (z.shape[0],))

  def norm_at(t):
    return jnp.linalg.norm(jnp.clip(t[:, None] * z, lo, hi), axis=1)

  def bisect(_, bounds):
    t_lo, t_hi = bounds
    mid = 0.5 * (t_lo + t_hi)
    feasible = norm_at(mid) <= radius
    return jnp.where(feasible, mid, t_lo), jnp.where(feasible, t_hi, mid)

  ones = jnp.ones_like(radius)
  t_lo, _ = lax.fori_loop(0, _L2_BISECTION_STEPS, bisect, (0.0 * ones, ones))
  t = jnp.where(norm_at(ones) <= radius, ones, t_lo)
  return jnp.clip(t[:, None] * z, lo, hi).reshape(delta.shape)


def project(x_adv: ArrayLike, x: ArrayLike, eps: ArrayLike, norm: str, *,
            exact: Optional[bool] = None) -> Array:
  """Projects `x_adv` onto the eps-ball around `x` intersected with [0, 1].

  Args:
    x_adv: batch to project.
    x: clean batch (the centres), in [0, 1].
    eps: radius, scalar or per example (batch,).
    norm: 'linf', 'l2' or 'l1'.
    exact: exact projection onto the intersection (True) or ball-then-clip
      (False). Default None: exact for 'linf' (always) and 'l1', ball-then-clip
      for 'l2' (see module docstring).

  Returns:
    A feasible batch shaped like `x_adv`.
  """
  check_choice(norm, "norm", NORMS)
  x_adv, x = jnp.asarray(x_adv), jnp.asarray(x)
  delta = x_adv - x
  if norm == "linf":
    radius = broadcast_per_example(eps, x)
    return jnp.clip(x + jnp.clip(delta, -radius, radius), 0.0, 1.0)
  if exact is None:
    exact = norm == "l1"
  if exact:
    project_box = _project_l2_box if norm == "l2" else _project_l1_box
    return jnp.clip(x + project_box(delta, -x, 1.0 - x, eps), 0.0, 1.0)
  if norm == "l2":
    size = broadcast_per_example(lp_norm(delta, "l2"), x)
    delta = delta * jnp.minimum(1.0, broadcast_per_example(eps, x) / (size + _TINY))
  else:
    delta = project_l1_ball(delta, eps)
  return jnp.clip(x + delta, 0.0, 1.0)
