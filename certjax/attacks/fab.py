"""FAB: the Fast Adaptive Boundary attack (Croce & Hein 2020), untargeted and FAB-T.

FAB looks for the smallest adversarial perturbation. At the current point x_k
it linearises the decision boundary between the true class y and a class t,

  f_t(z) - f_y(z) ~ df + <w, z - x_k> = 0,  df = f_t(x_k) - f_y(x_k), w = grad df,

projects both x_k and the clean point x onto that hyperplane intersected
with the box [0, 1]^d (the exact minimum-Lp-norm displacements d_k and d_0,
`project_hyperplane_box`), and steps to a convex combination biased towards
the original point

  x_{k+1} = clip((1 - a)(x_k + eta d_k) + a (x + eta d_0), 0, 1),
  a = min(||d_k|| / (||d_k|| + ||d_0||), alpha_max),

with the extrapolation eta (1.05) overshooting the linearised boundary. When
x_{k+1} is misclassified it is recorded if it is closer to x than the best so
far, and the iterate moves back towards x, x_{k+1} <- x + beta (x_{k+1} - x)
(beta 0.9), so the search goes on from the non-adversarial side. The targeted
version FAB-T uses, for t = 1 .. num_target_classes, the (t+1)-th most likely
class at the clean point (one gradient of f_t - f_y per step); untargeted FAB
takes at every step the class whose linearised boundary is closest,
|df_k| / ||w_k||_q with q the dual norm (the gradients of all logit
differences, a Jacobian computed as one batched backward pass per class).

Restarts and the radius. FAB minimises the norm; a point counts as
adversarial (and is returned) only if it is misclassified AND within `eps`
of x, as in AutoAttack, and every other example is returned unchanged, so
the output always lies in the eps-ball. The first run of every target class
starts at x itself (AutoAttack's FAB-T, with one restart, is deterministic);
restart r > 0 starts at x + eps / 2 * u / ||u||_p clipped to the box, with u
uniform in [-1, 1]^d ('linf') or standard normal ('l2', 'l1'), the
reference's restart scheme. As in the reference, target classes and restarts
run one after the other and each only on the examples not yet broken (here
masked: shapes stay static); every example keeps its first success.

Cost per step: one forward and backward pass (FAB-T; untargeted: one
backward pass per class), one forward pass to test the new point, and two
projections, each a sort of d values per example. On a CPU the sorts can
dominate for small models (XLA:CPU sorts slowly: about 0.2 s for 1,000 rows
of 784 values on the 2-core reference machine, where FAB-T then costs about
15 times APGD-T's time on an MNIST MLP); on accelerators they are cheap. The
optional final search of the original FAB paper (`final_search_steps`,
off in AutoAttack) moves each found point along the segment towards x by
linear interpolation of the logit margins, keeping it adversarial.

Projections. For the hyperplane <w, z> = b and a point t of the box, the
minimum-norm displacement d with <w, t + d> = b and t + d in [0, 1]^d moves
every coordinate only in the direction that helps (sign(r) sign(w_i), with r
= b - <w, t>) and never further than the room p_i it has there:

* 'linf': d_i = sign(r w_i) min(lambda, p_i), lambda the smallest value with
  sum_i |w_i| min(lambda, p_i) >= |r|;
* 'l2':   d_i = sign(r w_i) min(lambda |w_i|, p_i) (KKT: d = clip(mu w, box)),
  lambda the smallest with sum_i |w_i| min(lambda |w_i|, p_i) >= |r|;
* 'l1':   the coordinates by decreasing |w_i| are moved to their box bound
  until the next one, moved part of the way, closes the gap (a greedy
  linear program).

Each is the exact solution, found by sorting (O(d log d)), the same
solutions as the reference's `projection_linf`, `projection_l2` and
`projection_l1` (which locate the sorted breakpoint by bisection). Where the
hyperplane cannot be reached inside the box every coordinate moves to its
bound on the helpful side, as in the reference.

References:
  Croce, Hein. Minimally distorted Adversarial Examples with a Fast Adaptive
    Boundary Attack. ICML 2020.
  Croce, Hein. Reliable Evaluation of Adversarial Robustness with an Ensemble
    of Diverse Parameter-free Attacks. ICML 2020 (FAB-T in AutoAttack).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from certjax.types import Array, ArrayLike, PRNGKey
from certjax.validation import (check_choice, check_int_at_least, check_positive,
                                is_concrete)
from certjax.attacks import norms
from certjax.attacks.core import (AttackFn, GradientOracle, as_oracle, bind_attack,
                                  validate_inputs)

# The reference floors both projection norms at 1e-8 before forming alpha,
# so alpha stays defined when x_k or x already lies on the hyperplane.
_NORM_FLOOR = 1e-8
# Added to the dual norm of a gradient when picking the closest boundary
# (untargeted FAB), as in the reference.
_DIST_FLOOR = 1e-12


def _expand(v: Array, like: Array) -> Array:
  return v.reshape((-1,) + (1,) * (like.ndim - 1))


def _min_threshold(breaks: Array, weights: Array, need: Array) -> Array:
  """Smallest lam >= 0 with sum_i weights_i min(lam, breaks_i) >= need, per row.

  g(lam) = sum_i w_i min(lam, r_i) is continuous, non-decreasing and linear
  between the sorted breakpoints r_i; g at the k-th sorted breakpoint is
  sum_{j <= k} w_j r_j + r_(k) sum_{j > k} w_j. Rows where g never reaches
  `need` get +inf. Breakpoints may be +inf where the weight is 0.

  Args:
    breaks: (n, d) breakpoints >= 0 (+inf allowed where weights are 0).
    weights: (n, d) weights >= 0.
    need: (n,) targets >= 0.

  Returns:
    (n,) thresholds (+inf where unreachable).
  """
  # One sort carrying the weights along (cheaper than argsort and gathers).
  r, u = lax.sort((breaks, weights), dimension=1, num_keys=1)
  used = jnp.where(u > 0, u * r, 0.0)  # u r with 0 * inf = 0
  below = jnp.cumsum(used, axis=1)  # sum_{j <= k} u_j r_j
  above = jnp.sum(u, axis=1, keepdims=True) - jnp.cumsum(u, axis=1)  # sum_{j > k} u_j
  at_breaks = below + jnp.where(above > 0, r * above, 0.0)
  # Breakpoints passed before g reaches the target; lam lies after them.
  passed = jnp.sum(at_breaks < need[:, None], axis=1)
  dim = breaks.shape[1]
  k = jnp.clip(passed - 1, 0, dim - 1)[:, None]
  done = jnp.where(passed > 0, jnp.take_along_axis(below, k, axis=1)[:, 0], 0.0)
  slope = jnp.where(passed > 0, jnp.take_along_axis(above, k, axis=1)[:, 0],
                    jnp.sum(u, axis=1))
  lam = (need - done) / jnp.where(slope > 0, slope, 1.0)
  reachable = (passed < dim) & (slope > 0)
  return jnp.where(need <= 0, 0.0, jnp.where(reachable, jnp.maximum(lam, 0.0), jnp.inf))


def _hyperplane_step(t: Array, w: Array, r: Array, norm: str) -> Array:
  """Minimum-norm d with <w, d> = r and t + d in [0, 1]^d; rows of (n, d).

  See the module docstring; where the hyperplane is out of reach every
  coordinate with w_i != 0 moves to its bound on the helpful side.
  """
  direction = jnp.sign(r)[:, None] * jnp.sign(w)  # +1: up, -1: down, 0: stays
  room = jnp.where(direction > 0, 1.0 - t, jnp.where(direction < 0, t, 0.0))
  room = jnp.maximum(room, 0.0)
  need = jnp.abs(r)
  magnitude = jnp.abs(w)
  if norm == "linf":
    lam = _min_threshold(room, magnitude, need)
    step = jnp.minimum(lam[:, None], room)
  elif norm == "l2":
    breaks = jnp.where(magnitude > 0, room / jnp.where(magnitude > 0, magnitude, 1.0),
                       jnp.inf)
    lam = _min_threshold(breaks, magnitude * magnitude, need)
    step = jnp.where(magnitude > 0, jnp.minimum(lam[:, None] * magnitude, room), 0.0)
  else:
    # Greedy: cheapest progress per unit of L1 norm first (a stable sort:
    # ties in |w_i| are taken in coordinate order, as the reference's argsort).
    columns = lax.broadcasted_iota(jnp.int32, t.shape, 1)
    neg_m, p, order = lax.sort((-magnitude, room, columns), dimension=1, num_keys=1,
                               is_stable=True)
    m = -neg_m
    cumulative = jnp.cumsum(m * p, axis=1)
    full = cumulative < need[:, None]  # a prefix: moved to their bound
    num_full = jnp.sum(full, axis=1)
    dim = t.shape[1]
    partial_at = jnp.minimum(num_full, dim - 1)[:, None]
    before = jnp.where(num_full > 0, jnp.take_along_axis(
        cumulative, jnp.maximum(num_full - 1, 0)[:, None], axis=1)[:, 0], 0.0)
    m_partial = jnp.take_along_axis(m, partial_at, axis=1)[:, 0]
    reachable = (num_full < dim) & (m_partial > 0)
    amount = (need - before) / jnp.where(m_partial > 0, m_partial, 1.0)
    positions = jnp.arange(dim)[None, :]
    sorted_step = jnp.where(full, p, jnp.where(positions == partial_at, amount[:, None], 0.0))
    sorted_step = jnp.where(reachable[:, None], sorted_step, p)
    sorted_step = jnp.where(m > 0, sorted_step, 0.0)
    rows = lax.broadcasted_iota(jnp.int32, t.shape, 0)
    step = jnp.zeros_like(sorted_step).at[rows, order].set(sorted_step, unique_indices=True)
  return direction * step


def project_hyperplane_box(points: ArrayLike, w: ArrayLike, b: ArrayLike,
                           norm: str) -> Array:
  """Minimum-Lp-norm displacement onto {z : <w, z> = b} ∩ [0, 1]^d, per row.

  The exact solution of min ||d||_p s.t. <w, t + d> = b, 0 <= t + d <= 1 for
  every row t of `points` (see the module docstring); where no such d exists,
  the displacement to the box corner that gets closest to the hyperplane.

  Args:
    points: (n, d) points in [0, 1].
    w: (n, d) normals.
    b: (n,) offsets.
    norm: 'linf', 'l2' or 'l1'.

  Returns:
    (n, d) displacements d (t + d is the projection).
  """
  check_choice(norm, "norm", norms.NORMS)
  t, w = jnp.asarray(points), jnp.asarray(w)
  b = jnp.asarray(b, t.dtype)
  return _hyperplane_step(t, w, b - jnp.sum(w * t, axis=1), norm)


def _restart_start(key: PRNGKey, x: Array, eps: Array, norm: str) -> Array:
  """The reference's random start of restarts r > 0: x + eps/2 u/||u||_p, clipped."""
  if norm == "linf":
    u = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
  else:
    u = jax.random.normal(key, x.shape, x.dtype)
  size = _expand(norms.lp_norm(u, norm), x)
  return jnp.clip(x + 0.5 * norms.broadcast_per_example(eps, x) * u / size, 0.0, 1.0)


class _Run(NamedTuple):
  x_k: Array       # current iterate
  best: Array      # closest adversarial point found (x where none)
  best_norm: Array  # its distance to x (+inf where none)


def _logit_differences(oracle: GradientOracle, key: PRNGKey, x_k: Array, y: Array,
                       target: Optional[Array], num_classes: int,
                       norm: str) -> Tuple[Array, Array]:
  """(df, w): the boundary to linearise at x_k, shapes (batch,) and like x_k.

  Targeted: df = f_t - f_y and its gradient. Untargeted: the class k != y
  minimising |df_k| / ||grad df_k||_q, q the dual norm.
  """
  if target is not None:
    def loss(logits):
      return (jnp.take_along_axis(logits, target[:, None], axis=1)
              - jnp.take_along_axis(logits, y[:, None], axis=1))[:, 0]
    df, _, w = oracle.value_and_grad(key, x_k, loss)
    return df, w

  def class_gradient(k):
    return oracle.value_and_grad(key, x_k, lambda logits: logits[:, k])

  # vmap over the class: the forward pass does not depend on k, so it is
  # computed once and only the backward pass is batched (a Jacobian).
  values, _, grads = jax.vmap(class_gradient)(jnp.arange(num_classes))
  values = jnp.moveaxis(values, 0, 1)  # (batch, classes)
  grads = jnp.moveaxis(grads, 0, 1)    # (batch, classes, ...)
  own = jnp.take_along_axis(values, y[:, None], axis=1)
  df = values - own
  dg = grads - jnp.take_along_axis(grads, _expand(y, grads), axis=1)
  flat = dg.reshape(dg.shape[0], num_classes, -1)
  dual = {"linf": lambda g: jnp.sum(jnp.abs(g), axis=-1),
          "l2": lambda g: jnp.sqrt(jnp.sum(g * g, axis=-1)),
          "l1": lambda g: jnp.max(jnp.abs(g), axis=-1)}[norm](flat)
  dist = jnp.abs(df) / (_DIST_FLOOR + dual)
  dist = jnp.where(jax.nn.one_hot(y, num_classes, dtype=bool), jnp.inf, dist)
  closest = jnp.argmin(dist, axis=1)
  df = jnp.take_along_axis(df, closest[:, None], axis=1)[:, 0]
  w = jnp.take_along_axis(dg, _expand(closest, dg), axis=1)[:, 0]
  return df, w


def _final_search(oracle: GradientOracle, key: PRNGKey, x: Array, y: Array,
                  x_adv: Array, found: Array, num_steps: int) -> Array:
  """The original FAB's final search: shrinks found points towards x, staying adversarial.

  Keeps a non-adversarial end a1 (starting at x) and an adversarial end a2
  (the found point) and replaces one of them by the point where the linear
  interpolation of the logit margin y vs. the adversarial class crosses zero.
  """
  def margin(logits, label):
    return (jnp.take_along_axis(logits, y[:, None], axis=1)
            - jnp.take_along_axis(logits, label[:, None], axis=1))[:, 0]

  logits1 = oracle.logits(jax.random.fold_in(key, 0), x)
  logits2 = oracle.logits(jax.random.fold_in(key, 1), x_adv)
  state = (x, logits1, x_adv, logits2, jnp.argmax(logits2, axis=-1))

  def body(i, s):
    a1, l1, a2, l2, label = s
    t1 = margin(l1, label)
    t2 = -margin(l2, label)
    t3 = t1 / (t1 + t2 + 1e-10)
    t3 = jnp.where((t3 >= 0) & (t3 <= 1), t3, 1.0)
    a3 = a1 * (1 - _expand(t3, x)) + a2 * _expand(t3, x)
    l3 = oracle.logits(jax.random.fold_in(key, i + 2), a3)
    label3 = jnp.argmax(l3, axis=-1)
    robust = label3 == y
    keep = _expand(robust, x)
    return (jnp.where(keep, a3, a1), jnp.where(robust[:, None], l3, l1),
            jnp.where(keep, a2, a3), jnp.where(robust[:, None], l2, l3),
            jnp.where(robust, label, label3))

  a2 = lax.fori_loop(0, num_steps, body, state)[2]
  return jnp.where(_expand(found, x), a2, x_adv)


def fab_run(oracle: GradientOracle, key: PRNGKey, x: Array, y: Array, eps: Array, *,
            target: Optional[Array], num_classes: int, norm: str, num_steps: int,
            random_start: Array, alpha_max: float, eta: float, beta: float,
            final_search_steps: int = 0) -> Tuple[Array, Array]:
  """One FAB run (one target class, one restart); no validation.

  Args:
    oracle: gradient oracle.
    key: a `jax.random.key`.
    x: clean batch.
    y: true labels.
    eps: radius, scalar or (batch,): the random start's scale and the
      acceptance radius.
    target: target labels (FAB-T) or None (untargeted).
    num_classes: number of classes.
    norm: 'linf', 'l2' or 'l1'.
    num_steps: iterations.
    random_start: bool scalar (may be traced): start at the reference's
      random point instead of x.
    alpha_max: cap of the bias towards x.
    eta: extrapolation factor.
    beta: backward step after a success.
    final_search_steps: steps of the final search (0: none).

  Returns:
    (x_adv, success): the closest adversarial point found where it lies
    within eps of x, else x; and where that is the case.
  """
  batch = x.shape[0]
  k_start, k_steps, k_search = jax.random.split(key, 3)
  x_k = jnp.where(random_start, _restart_start(k_start, x, eps, norm), x)
  flat_x = norms.flatten_batch(x)
  state = _Run(x_k=x_k, best=x, best_norm=jnp.full((batch,), jnp.inf, x.dtype))
  lp = lambda v: norms.lp_norm(v, norm)  # pylint: disable=unnecessary-lambda-assignment

  def body(i, s: _Run) -> _Run:
    k_grad, k_test = jax.random.split(jax.random.fold_in(k_steps, i))
    df, w = _logit_differences(oracle, k_grad, s.x_k, y, target, num_classes, norm)
    w = norms.flatten_batch(w)
    flat_k = norms.flatten_batch(s.x_k)
    # <w, z> = b with b = <w, x_k> - df; the changes needed from x_k and x,
    # formed without the cancellation in b - <w, t>.
    d_k = _hyperplane_step(flat_k, w, -df, norm)
    d_0 = _hyperplane_step(flat_x, w, -df + jnp.sum(w * (flat_k - flat_x), axis=1), norm)
    a_k = jnp.maximum(lp(d_k), _NORM_FLOOR)
    a_0 = jnp.maximum(lp(d_0), _NORM_FLOOR)
    alpha = _expand(jnp.clip(a_k / (a_k + a_0), 0.0, alpha_max), x)
    step_k = (flat_k + eta * d_k).reshape(x.shape)
    step_0 = (flat_x + eta * d_0).reshape(x.shape)
    x_new = jnp.clip(step_k * (1.0 - alpha) + step_0 * alpha, 0.0, 1.0)
    fooled = jnp.argmax(oracle.logits(k_test, x_new), axis=-1) != y
    size = lp(x_new - x)
    closer = fooled & (size < s.best_norm)
    return _Run(x_k=jnp.where(_expand(fooled, x), x + beta * (x_new - x), x_new),
                best=jnp.where(_expand(closer, x), x_new, s.best),
                best_norm=jnp.where(closer, size, s.best_norm))

  s = lax.fori_loop(0, num_steps, body, state)
  found = jnp.isfinite(s.best_norm)
  best = s.best
  if final_search_steps > 0:
    best = _final_search(oracle, k_search, x, y, best, found, final_search_steps)
  # Counted only when misclassified AND within eps (AutoAttack's test).
  fooled = jnp.argmax(oracle.logits(k_search, best), axis=-1) != y
  inside = lp(best - x) <= jnp.broadcast_to(jnp.asarray(eps, x.dtype), (batch,))
  success = found & fooled & inside
  return jnp.where(_expand(success, x), best, x), success


def _check_config(norm: str, num_steps: int, num_restarts: int, alpha_max: Any,
                  eta: Any, beta: Any, final_search_steps: int) -> None:
  check_choice(norm, "norm", norms.NORMS)
  check_int_at_least(num_steps, "num_steps", 1)
  check_int_at_least(num_restarts, "num_restarts", 1)
  check_int_at_least(final_search_steps, "final_search_steps", 0)
  for value, name in ((alpha_max, "alpha_max"), (eta, "eta"), (beta, "beta")):
    if not is_concrete(value):
      raise ValueError(f"{name} must be a Python or NumPy number (a static setting); "
                       f"got a traced value.")
  if not 0.0 <= float(alpha_max) <= 1.0:
    raise ValueError(f"alpha_max must lie in [0, 1]; got {alpha_max!r}.")
  check_positive(eta, "eta")
  if not 0.0 < float(beta) <= 1.0:
    raise ValueError(f"beta must lie in (0, 1]; got {beta!r}.")


def _attack(key: PRNGKey, logits_fn: Any, x: ArrayLike, y: ArrayLike, *, eps: ArrayLike,
            norm: str, num_steps: int, num_restarts: int, num_target_classes: Optional[int],
            alpha_max: float, eta: float, beta: float, final_search_steps: int,
            checked: bool, name: str) -> Array:
  oracle = as_oracle(logits_fn)
  _check_config(norm, num_steps, num_restarts, alpha_max, eta, beta, final_search_steps)
  if num_target_classes is not None:
    check_int_at_least(num_target_classes, "num_target_classes", 1)
  num_classes = validate_inputs(oracle, x, y, eps=eps, norm=norm, name=name,
                                checked=checked)
  x, y = jnp.asarray(x), jnp.asarray(y)
  eps = jnp.asarray(eps, x.dtype)
  clean_logits = oracle.logits(key, x)
  # Examples misclassified at x are returned as they are (already adversarial).
  done = jnp.argmax(clean_logits, axis=-1) != y
  targeted = num_target_classes is not None
  num_targets = min(num_target_classes, num_classes - 1) if targeted else 1
  ranking = lax.top_k(clean_logits, num_targets + 1)[1] if targeted else None
  settings = dict(num_classes=num_classes, norm=norm, num_steps=num_steps,
                  alpha_max=float(alpha_max), eta=float(eta), beta=float(beta),
                  final_search_steps=final_search_steps)

  def body(r, best):
    x_best, done = best
    target = None
    if targeted:
      target = lax.dynamic_index_in_dim(ranking, r // num_restarts + 1, axis=1,
                                        keepdims=False)
    x_run, success = fab_run(oracle, jax.random.fold_in(key, r), x, y, eps, target=target,
                             random_start=(r % num_restarts) > 0, **settings)
    take = ~done & success
    return jnp.where(_expand(take, x), x_run, x_best), done | success

  return lax.fori_loop(0, num_targets * num_restarts, body, (x, done))[0]


def fab_targeted(key: PRNGKey, logits_fn: Any, x: ArrayLike, y: ArrayLike, *,
                 eps: ArrayLike, norm: str = "linf", num_steps: int = 100,
                 num_target_classes: int = 9, num_restarts: int = 1,
                 alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
                 final_search_steps: int = 0, checked: bool = False) -> Array:
  """FAB-T (Croce & Hein 2020), as AutoAttack runs it: targeted FAB over the top classes.

  For t = 1 .. num_target_classes the target of each example is its (t+1)-th
  most likely class at the clean point, and `num_restarts` FAB runs (the
  first from x, the others from the reference's random start) follow the
  linearised boundary between y and the target. An example counts as broken
  by the first run that finds a misclassified point within eps of x; that
  point is returned, and every other example is returned unchanged.

  Checks: eager calls check shapes, dtypes, settings and values (x finite and
  in [0, 1], eps finite and >= 0, y in [0, num_classes)). Under `jit`/`vmap`
  the values are traced and only shapes, dtypes and settings are checked,
  unless `checked=True`, which checks the values in the compiled program
  (see `certjax.attacks.core`).

  Args:
    key: a `jax.random.key`.
    logits_fn: x -> logits, or a gradient oracle (e.g. EOT).
    x: clean images (batch, H, W, C) in [0, 1].
    y: true labels (batch,).
    eps: radius, scalar or (batch,).
    norm: 'linf', 'l2' or 'l1'.
    num_steps: iterations per run (100 in AutoAttack).
    num_target_classes: target classes tried, capped at num_classes - 1 (9).
    num_restarts: runs per target class (1 in AutoAttack's standard version).
    alpha_max: largest weight of the step from the original point (0.1).
    eta: extrapolation beyond the linearised boundary (1.05).
    beta: backward step towards x after a success (0.9).
    final_search_steps: steps of the original FAB's final search towards x
      (0, as in AutoAttack).
    checked: check traced values too, as `checkify` checks; the call must
      then run under `certjax.attacks.checked` (or `checkify.checkify`).
      False adds nothing to the program.

  Returns:
    Images shaped like `x`: a misclassified point within eps where one was
    found, else x.

  Raises:
    ValueError: on invalid input, naming the problem and the accepted values.
  """
  return _attack(key, logits_fn, x, y, eps=eps, norm=norm, num_steps=num_steps,
                 num_restarts=num_restarts, num_target_classes=num_target_classes,
                 alpha_max=alpha_max, eta=eta, beta=beta,
                 final_search_steps=final_search_steps, checked=checked,
                 name="fab_targeted")


def fab(key: PRNGKey, logits_fn: Any, x: ArrayLike, y: ArrayLike, *,
        eps: ArrayLike, norm: str = "linf", num_steps: int = 100, num_restarts: int = 1,
        alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
        final_search_steps: int = 0, checked: bool = False) -> Array:
  """Untargeted FAB (Croce & Hein 2020): the closest linearised boundary at every step.

  As `fab_targeted`, but every step linearises the boundary of the class
  k != y closest to the current point (|f_k - f_y| / ||grad (f_k - f_y)||_q,
  q the dual norm), which needs the gradients of all logits: one backward
  pass per class and step. AutoAttack's 'plus' version runs it with 5
  restarts; its standard version uses FAB-T instead.

  Args:
    key: a `jax.random.key`.
    logits_fn: x -> logits, or a gradient oracle.
    x: clean images (batch, H, W, C) in [0, 1].
    y: true labels (batch,).
    eps: radius, scalar or (batch,).
    norm: 'linf', 'l2' or 'l1'.
    num_steps: iterations per run.
    num_restarts: runs (the first from x, the others from random starts).
    alpha_max: largest weight of the step from the original point.
    eta: extrapolation beyond the linearised boundary.
    beta: backward step towards x after a success.
    final_search_steps: steps of the final search towards x (0: none).
    checked: check traced values too (see `fab_targeted`).

  Returns:
    Images shaped like `x`: a misclassified point within eps where one was
    found, else x.

  Raises:
    ValueError: on invalid input, naming the problem and the accepted values.
  """
  return _attack(key, logits_fn, x, y, eps=eps, norm=norm, num_steps=num_steps,
                 num_restarts=num_restarts, num_target_classes=None,
                 alpha_max=alpha_max, eta=eta, beta=beta,
                 final_search_steps=final_search_steps, checked=checked, name="fab")


def make_fab_targeted(*, norm: str = "linf", num_steps: int = 100,
                      num_target_classes: int = 9, num_restarts: int = 1,
                      alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
                      final_search_steps: int = 0) -> AttackFn:
  """`attack_fn(key, logits_fn, x, y, eps)` running `fab_targeted` (FAB-T)."""
  _check_config(norm, num_steps, num_restarts, alpha_max, eta, beta, final_search_steps)
  check_int_at_least(num_target_classes, "num_target_classes", 1)
  return bind_attack(fab_targeted, "fab-t", norm=norm, num_steps=num_steps,
                     num_target_classes=num_target_classes, num_restarts=num_restarts,
                     alpha_max=alpha_max, eta=eta, beta=beta,
                     final_search_steps=final_search_steps)


def make_fab(*, norm: str = "linf", num_steps: int = 100, num_restarts: int = 1,
             alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
             final_search_steps: int = 0) -> AttackFn:
  """`attack_fn(key, logits_fn, x, y, eps)` running untargeted `fab`."""
  _check_config(norm, num_steps, num_restarts, alpha_max, eta, beta, final_search_steps)
  return bind_attack(fab, "fab", norm=norm, num_steps=num_steps, num_restarts=num_restarts,
                     alpha_max=alpha_max, eta=eta, beta=beta,
                     final_search_steps=final_search_steps)
