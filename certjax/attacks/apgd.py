"""Auto-PGD: APGD-CE, APGD-DLR and the targeted APGD-T (Croce & Hein 2020).

APGD is PGD with momentum and a step size that adapts per example, so it has
no step size to tune. Per example it keeps the best point so far (highest
loss) and, at checkpoints w_j = ceil(p_j N) with p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), halves its step size and
restarts from the best point when either

  1. the loss increased in at most a fraction rho (0.75) of the steps since
     the last checkpoint, or
  2. the step size was not reduced at the last checkpoint and the best loss
     has not improved since.

Steps use momentum 0.75:
  z = P(x_k + eta * u(grad)),  x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k - x_{k-1})),
with u the steepest-ascent direction (sign for 'linf', normalised gradient for
'l2') and the initial step size eta = 2 eps.

For 'l1' the L1-APGD variant of Croce & Hein (2021) is used: sparse steps
moving the top `topk` fraction of coordinates, the exact projection onto the
L1 ball ∩ [0, 1], no momentum, initial step eps, and a checkpoint every 4% of
the iterations that sets topk from the sparsity of the best point and either
resets the step (when the sparsity dropped by more than 5%) or divides it by
1.5 (clamped to [eps / 10, eps]).

Random starts. `init='uniform'` (the default) draws the start uniformly in
the ball (`norms.random_init`). `init='autoattack'` draws it as the
reference code does: x + eps u / ||u||_inf with u uniform in [-1, 1]^d
('linf', a point of the sphere), x + eps g / ||g||_2 with g standard normal
('l2'), and for 'l1' the projection of x + g onto the L1 ball ∩ box; then
clipped to [0, 1]. In high dimension the two nearly coincide (a uniform
point of the ball lies near its sphere); AutoAttack's standard version uses
the reference's.

Large radii first (`large_reps=True`, 'l1' only; AutoAttack's standard L1
version, `use_largereps` of the reference): every run is three APGD runs of
ceil(0.3 N), ceil(0.3 N) and the remaining iterations at radii 3 eps, 2 eps
and eps, each starting from the previous run's highest-loss point projected
onto the next ball (the first from the reference's start: a standard normal
g, x + g projected as a perturbation onto the 3 eps L1 ball ∩ box and then
onto the ball around x; a quirk of the reference, reproduced), with the
L1 sparsity (topk) initialised from that start. Only the last run, at eps,
decides success.

Integer checkpoint windows follow the reference implementation
(first window int(0.22 N), shrinking by int(0.03 N) down to int(0.06 N), each
at least 1), which gives the same checkpoints as ceil(p_j N) above for N = 100.
Condition 1 counts increases with respect to the previous iterate, the first
one with respect to the random start. Everything is per example in
`lax.fori_loop`s: restarts and target classes are masked rather than
gathered, so shapes are static. Within a run an example keeps its latest
misclassified iterate (as the reference does); across restarts and target
classes it keeps the run in which it was first fooled; examples never fooled
return the point of highest loss.

References:
  Croce, Hein. Reliable Evaluation of Adversarial Robustness with an Ensemble
    of Diverse Parameter-free Attacks. ICML 2020.
  Croce, Hein. Mind the Box: l1-APGD for Sparse Adversarial Attacks on Image
    Classifiers. ICML 2021.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from certjax.types import Array, ArrayLike, PRNGKey
from certjax.validation import (check_choice, check_in_open_interval, check_int_at_least,
                                checkify_in_open_interval, is_concrete)
from certjax.attacks import losses as losses_lib
from certjax.attacks.losses import Loss
from certjax.attacks import norms
from certjax.attacks.core import (AttackFn, GradientOracle, as_oracle, bind_attack,
                                  validate_inputs)

APGD_LOSSES = ("ce", "dlr", "cw")
APGD_INITS = ("uniform", "autoattack")
# use_largereps of the reference: radius factors and fractions of the iterations.
_LARGE_REPS_FACTORS = (3.0, 2.0, 1.0)


def checkpoints(num_steps: int, norm: str = "linf") -> Tuple[np.ndarray, np.ndarray]:
  """Static step-size checkpoints of APGD.

  Returns:
    (is_checkpoint, window): boolean and int arrays of length num_steps; the
    check happens after step i (0-based) when is_checkpoint[i], looking back
    over the window[i] steps since the previous checkpoint.
  """
  is_checkpoint = np.zeros(num_steps, bool)
  window = np.zeros(num_steps, np.int32)
  if norm == "l1":
    first, shrink, minimum = max(int(0.04 * num_steps), 1), 0, 1
  else:
    first = max(int(0.22 * num_steps), 1)
    shrink = max(int(0.03 * num_steps), 1)
    minimum = max(int(0.06 * num_steps), 1)
  length, since = first, 0
  for i in range(num_steps):
    since += 1
    if since == length:
      is_checkpoint[i], window[i] = True, length
      since = 0
      length = max(length - shrink, minimum)
  return is_checkpoint, window


class _RunState(NamedTuple):
  x_eval: Array          # the next iterate, proposed but not yet evaluated
  x_base: Array          # the iterate x_eval was proposed from (after restarts)
  loss_prev: Array
  x_best: Array
  grad_best: Array
  loss_best: Array
  x_best_adv: Array
  fooled: Array
  step: Array
  increases: Array
  loss_best_last_check: Array
  reduced_last_check: Array
  topk: Array
  sparsity_old: Array


def _expand(mask: Array, like: Array) -> Array:
  return mask.reshape((-1,) + (1,) * (like.ndim - 1))


def random_start(key: PRNGKey, x: Array, eps: ArrayLike, norm: str, init: str) -> Array:
  """APGD's random start: 'uniform' in the ball or the 'autoattack' reference's.

  See the module docstring.
  """
  if init == "uniform":
    return norms.random_init(key, x, eps, norm)
  radius = norms.broadcast_per_example(eps, x)
  if norm == "linf":
    u = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
    start = x + radius * u / (_expand(norms.lp_norm(u, "linf"), x) + 1e-12)
  elif norm == "l2":
    g = jax.random.normal(key, x.shape, x.dtype)
    start = x + radius * g / (_expand(norms.lp_norm(g, "l2"), x) + 1e-12)
  else:
    start = norms.project(x + jax.random.normal(key, x.shape, x.dtype), x, eps, "l1")
  return jnp.clip(start, 0.0, 1.0)


def large_reps_steps(num_steps: int) -> Tuple[int, int, int]:
  """Iterations of the three runs of `large_reps` (the reference's rounding)."""
  first = math.ceil(0.3 * num_steps)
  return first, first, num_steps - 2 * first


def apgd_run(oracle: GradientOracle, key: PRNGKey, x: Array, eps: Array, *,
             objective: Callable[[Array], Array],
             success: Callable[[Array], Array], norm: str, num_steps: int,
             rho: ArrayLike, init: str = "uniform", x_init: Optional[Array] = None,
             with_best: bool = False) -> Tuple[Array, ...]:
  """One APGD run from a random start; no validation.

  Cost: one `oracle.value_and_grad` call per iterate (the random start and
  the N steps), whose loss and logits also serve the best-point tracking and
  the success test. The gradient at the last iterate is never used, so the
  last evaluation sits outside the loop where XLA drops its backward pass (for
  a deterministic oracle): N + 1 forward and N backward passes in all.

  The loop carries the iterate to evaluate next rather than the current one:
  each iteration evaluates it, updates the best points, applies the
  checkpoint rule and proposes the next iterate from the (possibly restarted)
  current one. The restart selects then fuse into the step and the gradient
  leaves the loop state, one image-sized buffer (and its copy) fewer per
  iteration. Same arithmetic as the straightforward loop, in the same order.

  Args:
    oracle: gradient oracle.
    key: a `jax.random.key`.
    x: clean batch.
    eps: radius, scalar or (batch,).
    objective: logits -> (batch,) loss to maximise.
    success: logits -> (batch,) bool, whether an example is adversarial.
    norm: 'linf', 'l2' or 'l1'.
    num_steps: iterations N.
    rho: condition-1 threshold.
    init: random start, 'uniform' or 'autoattack' (`random_start`).
    x_init: start here instead of a random point (in the ball and box); for
      'l1' the sparsity of the first steps is then set from it, as the
      reference does.
    with_best: also return the highest-loss point.

  Returns:
    (x_out, fooled, loss_best): the first-found adversarial point where fooled,
    else the highest-loss point; whether any iterate succeeded; best loss;
    and with `with_best` the highest-loss point as a fourth entry.
  """
  batch, dim = x.shape[0], x[0].size
  is_check_np, window_np = checkpoints(num_steps, norm)
  is_check, window = jnp.asarray(is_check_np), jnp.asarray(window_np, x.dtype)
  alpha = 1.0 if norm == "l1" else 2.0
  max_step = jnp.broadcast_to(alpha * jnp.asarray(eps, x.dtype), (batch,))
  k_init, k_steps = jax.random.split(key)

  def propose(i, x_adv, x_prev, grad, step, topk) -> Array:
    """Iterate i + 1 from iterate i (x_adv), i - 1 (x_prev) and the gradient at x_adv."""
    eta = norms.broadcast_per_example(step, x)
    if norm == "l1":
      direction = norms.l1_topk_direction(grad, topk)
      return norms.project(x_adv + eta * direction, x, eps, norm)
    momentum = jnp.where(i > 0, 0.75, 1.0).astype(x.dtype)
    direction = norms.steepest_direction(grad, norm)
    z = norms.project(x_adv + eta * direction, x, eps, norm)
    return norms.project(
        x_adv + momentum * (z - x_adv) + (1.0 - momentum) * (x_adv - x_prev), x, eps, norm)

  def evaluate(i, x_new):
    return oracle.value_and_grad(jax.random.fold_in(k_steps, i), x_new, objective)

  if x_init is None:
    x0 = random_start(k_init, x, eps, norm, init)
    topk0 = jnp.full((batch,), 0.2, x.dtype)
    sparsity0 = jnp.full((batch,), float(dim), x.dtype)
  else:
    x0 = jnp.clip(x_init, 0.0, 1.0)
    sparsity0 = jnp.sum(norms.flatten_batch(x0 - x) != 0, axis=1).astype(x.dtype)
    topk0 = sparsity0 / dim / 1.5
  loss0, logits0, grad0 = evaluate(num_steps, x0)
  state = _RunState(
      x_eval=propose(0, x0, x0, grad0, max_step, topk0), x_base=x0, loss_prev=loss0,
      x_best=x0, grad_best=grad0, loss_best=loss0, x_best_adv=x0, fooled=success(logits0),
      step=max_step, increases=jnp.zeros((batch,), x.dtype),
      loss_best_last_check=loss0, reduced_last_check=jnp.ones((batch,), bool),
      topk=topk0, sparsity_old=sparsity0)

  def track_best(s: _RunState, loss, logits, grad):
    """Best points after evaluating s.x_eval (loss, logits, grad at it)."""
    wrong = success(logits)
    x_best_adv = jnp.where(_expand(wrong, x), s.x_eval, s.x_best_adv)
    improved = loss > s.loss_best
    x_best = jnp.where(_expand(improved, x), s.x_eval, s.x_best)
    grad_best = (None if grad is None else
                 jnp.where(_expand(improved, x), grad, s.grad_best))
    loss_best = jnp.where(improved, loss, s.loss_best)
    return x_best_adv, s.fooled | wrong, x_best, grad_best, loss_best

  def body(i, s: _RunState) -> _RunState:
    loss, logits, grad = evaluate(i, s.x_eval)
    x_best_adv, fooled, x_best, grad_best, loss_best = track_best(s, loss, logits, grad)
    increases = s.increases + (loss > s.loss_prev)
    check = is_check[i]

    if norm == "l1":
      sparsity = jnp.sum(norms.flatten_batch(x_best - x) != 0, axis=1).astype(x.dtype)
      fresh = check & (sparsity / s.sparsity_old < 0.95)
      topk = jnp.where(check, sparsity / dim / 1.5, s.topk)
      shrunk = jnp.clip(s.step / 1.5, max_step / 10.0, max_step)
      step = jnp.where(check, jnp.where(fresh, max_step, shrunk), s.step)
      sparsity_old = jnp.where(check, sparsity, s.sparsity_old)
      restart = fresh
      reduced_last_check, loss_best_last_check = s.reduced_last_check, s.loss_best_last_check
    else:
      few_increases = increases <= window[i] * rho
      stalled = ~s.reduced_last_check & (s.loss_best_last_check >= loss_best)
      restart = check & (few_increases | stalled)
      step = jnp.where(restart, s.step / 2.0, s.step)
      reduced_last_check = jnp.where(check, restart, s.reduced_last_check)
      loss_best_last_check = jnp.where(check, loss_best, s.loss_best_last_check)
      topk, sparsity_old = s.topk, s.sparsity_old
    # A restart continues from the best point with the gradient there.
    x_adv = jnp.where(_expand(restart, x), x_best, s.x_eval)
    grad = jnp.where(_expand(restart, x), grad_best, grad)
    return _RunState(
        x_eval=propose(i + 1, x_adv, s.x_base, grad, step, topk), x_base=x_adv,
        loss_prev=loss, x_best=x_best, grad_best=grad_best, loss_best=loss_best,
        x_best_adv=x_best_adv, fooled=fooled, step=step,
        increases=jnp.where(check, 0.0, increases),
        loss_best_last_check=loss_best_last_check,
        reduced_last_check=reduced_last_check, topk=topk, sparsity_old=sparsity_old)

  s = lax.fori_loop(0, num_steps - 1, body, state)
  # The last iterate only updates the best points: a checkpoint after it
  # could only change steps that never come.
  loss, logits, _ = evaluate(num_steps - 1, s.x_eval)
  x_best_adv, fooled, x_best, _, loss_best = track_best(s, loss, logits, None)
  out = (jnp.where(_expand(fooled, x), x_best_adv, x_best), fooled, loss_best)
  return out + (x_best,) if with_best else out


def _one_run(oracle: GradientOracle, key: PRNGKey, x: Array, eps: Array, *,
             large_reps: bool, num_steps: int, **settings: Any) -> Tuple[Array, Array, Array]:
  """One APGD run, or with `large_reps` the reference's three runs at 3, 2, 1 eps."""
  if not large_reps:
    return apgd_run(oracle, key, x, eps, num_steps=num_steps, **settings)
  k_start, k_runs = jax.random.split(key)
  # The reference projects the point x + g itself (not the perturbation g)
  # onto the 3 eps L1 ball ∩ [-x, 1 - x], then that onto the ball around x.
  v = x + jax.random.normal(k_start, x.shape, x.dtype)
  v = norms.project(x + v, x, _LARGE_REPS_FACTORS[0] * eps, "l1") - x
  for stage, (factor, steps) in enumerate(zip(_LARGE_REPS_FACTORS,
                                              large_reps_steps(num_steps))):
    v = norms.project(v, x, factor * eps, "l1")
    x_out, fooled, loss_best, v = apgd_run(
        oracle, jax.random.fold_in(k_runs, stage), x, factor * eps, num_steps=steps,
        x_init=v, with_best=True, **settings)
  return x_out, fooled, loss_best


def _merge(best: Tuple[Array, Array, Array], new: Tuple[Array, Array, Array]):
  """Keeps an example's first success; otherwise the higher best loss."""
  best_x, best_fooled, best_loss = best
  new_x, new_fooled, new_loss = new
  take = ~best_fooled & (new_fooled | (new_loss > best_loss))
  return (jnp.where(_expand(take, best_x), new_x, best_x), best_fooled | new_fooled,
          jnp.where(take, new_loss, best_loss))


def _check_config(norm: str, loss: Loss, num_steps: int, num_restarts: int, rho: Any,
                  checked: bool = False, init: str = "uniform", large_reps: bool = False):
  check_choice(norm, "norm", norms.NORMS)
  if not callable(loss):
    check_choice(loss, "loss", APGD_LOSSES)
  check_int_at_least(num_steps, "num_steps", 1)
  check_int_at_least(num_restarts, "num_restarts", 1)
  check_choice(init, "init", APGD_INITS)
  if large_reps:
    if norm != "l1":
      raise ValueError(f"large_reps (the reference's use_largereps) is defined for "
                       f"norm='l1' only; got norm={norm!r}.")
    if min(large_reps_steps(num_steps)) < 1:
      raise ValueError(
          f"large_reps splits num_steps into runs of {large_reps_steps(num_steps)} "
          f"iterations; num_steps={num_steps} leaves one empty. Use num_steps=3 or >= 5.")
  if is_concrete(rho):
    check_in_open_interval(rho, "rho", 0.0, 1.0)
  elif checked:
    checkify_in_open_interval(rho, "rho", 0.0, 1.0)


def apgd(key: PRNGKey, logits_fn: Any, x: ArrayLike, y: ArrayLike, *,
         eps: ArrayLike, norm: str = "linf", loss: Loss = "ce",
         num_steps: int = 100, num_restarts: int = 1, rho: ArrayLike = 0.75,
         target: Optional[ArrayLike] = None, init: str = "uniform",
         large_reps: bool = False, checked: bool = False) -> Array:
  """APGD (Croce & Hein 2020): APGD-CE with loss='ce', APGD-DLR with loss='dlr'.

  Checks: eager calls check shapes, dtypes, settings and values (x finite and
  in [0, 1], eps finite and >= 0, y and target in [0, num_classes), rho in
  (0, 1)). Under `jit`/`vmap` the values are traced and only shapes, dtypes
  and settings are checked, unless `checked=True`, which checks the values
  in the compiled program (see `certjax.attacks.core`).

  Args:
    key: a `jax.random.key`.
    logits_fn: x -> logits, or a gradient oracle (e.g. EOT).
    x: clean images (batch, H, W, C) in [0, 1].
    y: true labels (batch,).
    eps: radius, scalar or (batch,).
    norm: 'linf', 'l2' or 'l1'.
    loss: 'ce', 'dlr' (needs >= 3 classes; >= 4 with `target`), 'cw' or a
      callable `loss(logits, labels, target=None) -> (batch,)` to maximise.
    num_steps: iterations per restart (100 in AutoAttack).
    num_restarts: random restarts; each example keeps its first success.
    rho: condition-1 threshold (0.75).
    target: optional target labels for a targeted attack (success means
      predicting the target).
    init: random start, 'uniform' in the ball or 'autoattack' (the reference
      code's; see the module docstring).
    large_reps: for 'l1', every run is the reference's three runs at radii
      3 eps, 2 eps, eps (`use_largereps`; see the module docstring).
    checked: check traced values too, as `checkify` checks; the call must
      then run under `certjax.attacks.checked` (or `checkify.checkify`).
      False adds nothing to the program.

  Returns:
    Adversarial images shaped like `x`: the first adversarial point found, or
    the highest-loss point for examples never fooled (x itself for examples
    misclassified to begin with).

  Raises:
    ValueError: on invalid input, naming the problem and the accepted values.
  """
  oracle = as_oracle(logits_fn)
  _check_config(norm, loss, num_steps, num_restarts, rho, checked, init, large_reps)
  num_classes = validate_inputs(oracle, x, y, eps=eps, norm=norm, target=target, name="apgd",
                                checked=checked)
  _check_dlr_classes(loss, num_classes, targeted=target is not None)
  x, y = jnp.asarray(x), jnp.asarray(y)
  target = None if target is None else jnp.asarray(target)
  eps = jnp.asarray(eps, x.dtype)
  loss_fn = losses_lib.get_loss(loss)
  objective = lambda logits: loss_fn(logits, y, target)
  success = lambda logits: losses_lib.is_successful(logits, y, target)

  clean_logits = oracle.logits(key, x)
  best = (x, success(clean_logits), jnp.full((x.shape[0],), -jnp.inf, x.dtype))

  def body(r, best):
    run = _one_run(oracle, jax.random.fold_in(key, r), x, eps, objective=objective,
                   success=success, norm=norm, num_steps=num_steps, rho=rho, init=init,
                   large_reps=large_reps)
    return _merge(best, run)

  return lax.fori_loop(0, num_restarts, body, best)[0]


def apgd_targeted(key: PRNGKey, logits_fn: Any, x: ArrayLike, y: ArrayLike, *,
                  eps: ArrayLike, norm: str = "linf", num_steps: int = 100,
                  num_target_classes: int = 9, num_restarts: int = 1,
                  rho: ArrayLike = 0.75, loss: Loss = "dlr", init: str = "uniform",
                  large_reps: bool = False, checked: bool = False) -> Array:
  """APGD-T (Croce & Hein 2020): APGD on the targeted loss over the top classes.

  For t = 1 .. num_target_classes the target of each example is its (t+1)-th
  most likely class at the clean point, and `num_restarts` APGD runs maximise
  the targeted loss (targeted DLR by default) towards it. Success means
  misclassification (any class other than y), and every example keeps its
  first success across all targets and restarts.

  Checks: eager calls check shapes, dtypes, settings and values (x finite and
  in [0, 1], eps finite and >= 0, y in [0, num_classes), rho in
  (0, 1)). Under `jit`/`vmap` the values are traced and only shapes, dtypes
  and settings are checked, unless `checked=True`, which checks the values
  in the compiled program (see `certjax.attacks.core`).

  Args:
    key: a `jax.random.key`.
    logits_fn: x -> logits, or a gradient oracle.
    x: clean images (batch, H, W, C) in [0, 1].
    y: true labels (batch,).
    eps: radius, scalar or (batch,).
    norm: 'linf', 'l2' or 'l1'.
    num_steps: iterations per run.
    num_target_classes: target classes tried, capped at num_classes - 1.
    num_restarts: runs per target class.
    rho: condition-1 threshold.
    loss: targeted loss, 'dlr' (needs >= 4 classes), 'ce' or 'cw'.
    init: random start, 'uniform' or 'autoattack' (see `apgd`).
    large_reps: for 'l1', the reference's runs at 3 eps, 2 eps, eps (see `apgd`).
    checked: check traced values too, as `checkify` checks; the call must
      then run under `certjax.attacks.checked` (or `checkify.checkify`).
      False adds nothing to the program.

  Returns:
    Adversarial images shaped like `x`.

  Raises:
    ValueError: on invalid input, naming the problem and the accepted values.
  """
  oracle = as_oracle(logits_fn)
  _check_config(norm, loss, num_steps, num_restarts, rho, checked, init, large_reps)
  check_int_at_least(num_target_classes, "num_target_classes", 1)
  num_classes = validate_inputs(oracle, x, y, eps=eps, norm=norm, name="apgd_targeted",
                                checked=checked)
  _check_dlr_classes(loss, num_classes, targeted=True)
  num_targets = min(num_target_classes, num_classes - 1)
  x, y = jnp.asarray(x), jnp.asarray(y)
  eps = jnp.asarray(eps, x.dtype)
  loss_fn = losses_lib.get_loss(loss)
  success = lambda logits: losses_lib.is_successful(logits, y)

  clean_logits = oracle.logits(key, x)
  ranking = lax.top_k(clean_logits, num_targets + 1)[1]
  best = (x, success(clean_logits), jnp.full((x.shape[0],), -jnp.inf, x.dtype))

  def body(r, best):
    target = lax.dynamic_index_in_dim(ranking, r // num_restarts + 1, axis=1,
                                      keepdims=False)
    run = _one_run(oracle, jax.random.fold_in(key, r), x, eps,
                   objective=lambda logits: loss_fn(logits, y, target),
                   success=success, norm=norm, num_steps=num_steps, rho=rho, init=init,
                   large_reps=large_reps)
    return _merge(best, run)

  return lax.fori_loop(0, num_targets * num_restarts, body, best)[0]


def _check_dlr_classes(loss: Loss, num_classes: int, *, targeted: bool) -> None:
  needed = 4 if targeted else 3
  if loss == "dlr" and num_classes < needed:
    kind = "targeted" if targeted else "untargeted"
    raise ValueError(
        f"The {kind} DLR loss needs at least {needed} classes; the model has "
        f"{num_classes}. Use loss='ce' or 'cw'.")


def make_apgd(*, norm: str = "linf", loss: Loss = "ce", num_steps: int = 100,
              num_restarts: int = 1, rho: float = 0.75, init: str = "uniform",
              large_reps: bool = False) -> AttackFn:
  """`attack_fn(key, logits_fn, x, y, eps)` running `apgd` with this configuration."""
  _check_config(norm, loss, num_steps, num_restarts, rho, init=init, large_reps=large_reps)
  return bind_attack(apgd, f"apgd-{losses_lib.loss_name(loss)}", norm=norm, loss=loss,
                     num_steps=num_steps, num_restarts=num_restarts, rho=rho, init=init,
                     large_reps=large_reps)


def make_apgd_targeted(*, norm: str = "linf", num_steps: int = 100,
                       num_target_classes: int = 9, num_restarts: int = 1,
                       rho: float = 0.75, loss: Loss = "dlr", init: str = "uniform",
                       large_reps: bool = False) -> AttackFn:
  """`attack_fn(key, logits_fn, x, y, eps)` running `apgd_targeted`."""
  _check_config(norm, loss, num_steps, num_restarts, rho, init=init, large_reps=large_reps)
  check_int_at_least(num_target_classes, "num_target_classes", 1)
  return bind_attack(apgd_targeted, "apgd-t", norm=norm, num_steps=num_steps,
                     num_target_classes=num_target_classes, num_restarts=num_restarts,
                     rho=rho, loss=loss, init=init, large_reps=large_reps)
