"""Carlini & Wagner attacks: the minimum-norm L2 attack and a fixed-radius L-infinity one.

`cw_l2` is the paper's L2 attack as its reference code runs it
(nn_robust_attacks, `l2_attack.py`):

* change of variables x' = (tanh(w) + 1) / 2, so every iterate lies in the
  [0, 1] box; w starts at arctanh((2 x - 1) * 0.999999) (the reference's
  clamp, which keeps arctanh finite at x = 0 and x = 1);
* per example the loss ||x' - x0||_2^2 + c * max(Z_y - max_{j != y} Z_j +
  kappa, 0) (targeted: max(max_{j != t} Z_j - Z_t + kappa, 0)), x0 = (tanh(w0)
  + 1) / 2 the clamped clean point and Z the logits. Up to the constant c *
  kappa this is the paper's ||delta||^2 + c * max(-margin, -kappa); the
  reference's non-negative form is kept because early abort compares values;
* Adam (lr, beta1 0.9, beta2 0.999, epsilon 1e-8, TensorFlow 1's update
  lr_t = lr sqrt(1 - beta2^t) / (1 - beta1^t), w -= lr_t m / (sqrt(v) + eps)),
  written inline: it is elementwise, so per-example state and the reference's
  one optimiser over the batch coincide. Its moments are reset, and w
  restarts from the clean point, at every binary-search step;
* binary search over c per example: a step that found an adversarial sets the
  upper bound to min(upper, c); one that did not raises the lower bound to c;
  then c = (lower + upper) / 2 once an upper bound exists, else c *= 10. With
  10 or more search steps the last one uses the upper bound (the reference's
  `repeat`);
* early abort: every max(num_steps // 10, 1) iterations an example stops if
  its loss exceeds 0.9999 times its loss at the previous check (the reference
  checks the loss summed over the batch and stops the batch; here each
  example stops on its own, so results do not depend on batch-mates);
* the best adversarial: over all search steps, the evaluated iterate of
  smallest L2 distance whose logits satisfy the confidence margin (margin >
  kappa, the reference's `compare`). Each iteration evaluates the current
  iterate and then takes the Adam step, as the reference's `sess.run` does,
  so one iteration costs one forward and one backward pass.

Examples for which no iterate succeeded are returned unchanged (x itself).

`cw_linf` is the fixed-radius L-infinity variant that robust-accuracy
evaluations use (older ART releases' `CarliniLInfMethod(eps=...)` among
them): the same change of variables onto the box [max(0, x - eps),
min(1, x + eps)] (the eps-ball intersected with the pixel box, so every
iterate is feasible and nothing is projected), and Adam on the CW margin loss
max(-margin, -kappa) alone, with no distance penalty and so no constant to
search for. It is not the paper's L-infinity attack, which shrinks a
threshold tau on the perturbation over repeated L2-style solves to find a
small L-infinity norm: defence tables report robust accuracy at a given eps,
which needs the strongest point inside that ball, not the smallest
perturbation. The first run starts at the centre of the box (w = 0), which is
x wherever the ball lies inside [0, 1]: started at x, pixels at 0 or 1 (most
of an MNIST image) would sit where tanh is saturated (w = +-7.25) and take
tens of iterations to move. Further restarts start uniformly in the box; the
evaluated iterate of largest margin is returned.

Saturation matters for `cw_l2` too, which must start at x: with the
reference's learning rate 0.01 a pixel at 0 or 1 needs hundreds of
iterations to leave the saturated region, so short runs (100 iterations)
find far larger perturbations on MNIST than long ones unless the learning
rate is raised (0.1 there gives about the L2 norms of 1,000 iterations at
0.01 on the 7x7 test MLP).

Both are `lax` loops with per-example state, one compiled program that runs
under `jit`, `vmap` and on batches sharded over a mesh: `cw_l2` a
`fori_loop` over the search steps around a `while_loop` over the iterations
(which exits early once every example has aborted), `cw_linf` a `fori_loop`
over the restarts around a `while_loop` that exits once every example's
margin exceeds kappa. `logits_fn` may be a gradient oracle (e.g.
`certjax.attacks.eot`): the attacks use its `value_and_grad` for the margin
and add the distance term's gradient themselves.

The `make_*` factories return `attack_fn(key, logits_fn, x, y, eps)` for
`certjax.attacks.robust_accuracy`. For `make_cw_l2` the adversarial counts
only if its L2 norm is at most eps, else x is returned, so the runner's
perturbation check (||x_adv - x||_2 <= eps, x_adv in [0, 1]) always holds.

References:
  Carlini, Wagner. Towards Evaluating the Robustness of Neural Networks.
    IEEE S&P 2017 (and its code, github.com/carlini/nn_robust_attacks).
  Kingma, Ba. Adam: A Method for Stochastic Optimization. ICLR 2015.
  Nicolae et al. Adversarial Robustness Toolbox v1.0.0. 2018
    (`CarliniLInfMethod`'s fixed-eps box).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax

from certjax.types import Array, ArrayLike, PRNGKey
from certjax.validation import check_int_at_least
from certjax.attacks import losses as losses_lib
from certjax.attacks import norms
from certjax.attacks.core import (AttackFn, GradientOracle, as_oracle, bind_attack,
                                  check_positive_arg, validate_inputs)

__all__ = ["CWInfo", "cw_l2", "cw_linf", "make_cw_l2", "make_cw_linf"]

# arctanh's argument is scaled by this (the reference's 0.999999) so that
# pixels at 0 or 1 map to finite w.
TANH_SMOOTHER = 0.999999
# Adam's constants (TensorFlow's defaults, which the reference uses).
ADAM_BETA1, ADAM_BETA2, ADAM_EPS = 0.9, 0.999, 1e-8
# The reference's threshold for "no upper bound yet" and its start value.
_NO_UPPER_BOUND = 1e9
_UPPER_BOUND_INIT = 1e10
# Early abort: stop when the loss exceeds this fraction of the last check's.
_ABORT_RATIO = 0.9999


class CWInfo(NamedTuple):
  """Per-example outcome of `cw_l2` (with `return_info=True`).

  Attributes:
    l2_norm: ||x_adv - x||_2 of the returned point (0 where none was found).
    success: an iterate satisfied the confidence margin (x_adv is it).
    const: the constant c of the search step that found x_adv; where none
      was found, the constant of the last search step.
  """
  l2_norm: Array
  success: Array
  const: Array


def _expand(v: Array, like: Array) -> Array:
  return v.reshape((-1,) + (1,) * (like.ndim - 1))


def _to_tanh_space(unit: Array) -> Array:
  """w with tanh(w) = unit * TANH_SMOOTHER, for unit in [-1, 1]."""
  return jnp.arctanh(unit * TANH_SMOOTHER)


def _adam(w: Array, grad: Array, m: Array, v: Array, t: Array,
          learning_rate: Array) -> Tuple[Array, Array, Array]:
  """One Adam step (TensorFlow 1's form, epsilon after the bias correction)."""
  m = ADAM_BETA1 * m + (1.0 - ADAM_BETA1) * grad
  v = ADAM_BETA2 * v + (1.0 - ADAM_BETA2) * grad * grad
  t = t.astype(w.dtype)
  lr_t = learning_rate * jnp.sqrt(1.0 - ADAM_BETA2 ** t) / (1.0 - ADAM_BETA1 ** t)
  return w - lr_t * m / (jnp.sqrt(v) + ADAM_EPS), m, v


def _margin(logits: Array, y: Array, target: Optional[Array]) -> Array:
  """Uncapped CW margin, positive exactly when the attack succeeds."""
  return losses_lib.cw_margin(logits, y, target)


class _SearchState(NamedTuple):
  const: Array        # (batch,) c of the next search step
  lower: Array        # (batch,)
  upper: Array        # (batch,)
  best_l2: Array      # (batch,) squared L2 of the best adversarial (inf: none)
  best_x: Array       # like x
  best_const: Array   # (batch,)
  last_const: Array   # (batch,)


class _StepState(NamedTuple):
  i: Array            # iteration (scalar)
  w: Array            # like x, in tanh space
  m: Array            # Adam's first moment
  v: Array            # Adam's second moment
  active: Array       # (batch,) not aborted
  prev: Array         # (batch,) loss at the last abort check
  found: Array        # (batch,) success in this search step
  best_l2: Array
  best_x: Array
  best_const: Array


def _cw_l2_core(oracle: GradientOracle, key: PRNGKey, x: Array, y: Array,
                target: Optional[Array], *, confidence: Array, initial_const: Array,
                binary_search_steps: int, num_steps: int, learning_rate: Array,
                abort_early: bool) -> Tuple[Array, CWInfo]:
  """The L2 attack on validated inputs; see the module docstring."""
  batch = x.shape[0]
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  xf = x.astype(dtype)
  w0 = _to_tanh_space(2.0 * xf - 1.0)
  x0 = (jnp.tanh(w0) + 1.0) / 2.0
  kappa = jnp.asarray(confidence, dtype)
  lr = jnp.asarray(learning_rate, dtype)
  check_every = max(num_steps // 10, 1)
  repeat = binary_search_steps >= 10

  def search_step(s, state: _SearchState) -> _SearchState:
    const = state.const
    if repeat:
      const = jnp.where(s == binary_search_steps - 1, state.upper, const)
    k_step = jax.random.fold_in(key, s)

    def objective(logits):
      return const * jnp.minimum(_margin(logits, y, target), kappa)

    def cond(t: _StepState):
      return (t.i < num_steps) & jnp.any(t.active)

    def body(t: _StepState) -> _StepState:
      x_new = (jnp.tanh(t.w) + 1.0) / 2.0
      _, logits, grad_margin = oracle.value_and_grad(
          jax.random.fold_in(k_step, t.i), x_new.astype(x.dtype), objective)
      margin = _margin(logits, y, target).astype(dtype)
      l2 = jnp.sum(norms.flatten_batch((x_new - x0) ** 2), axis=1)
      loss = l2 + const * jnp.maximum(kappa - margin, 0.0)
      active, prev = t.active, t.prev
      if abort_early:
        check = t.i % check_every == 0
        stop = active & check & (loss > prev * _ABORT_RATIO)
        prev = jnp.where(active & check & ~stop, loss, prev)
        active = active & ~stop
      success = active & (margin > kappa)
      better = success & (l2 < t.best_l2)
      grad_x = 2.0 * (x_new - x0) - grad_margin.astype(dtype)
      grad_w = grad_x * (1.0 - jnp.tanh(t.w) ** 2) / 2.0
      w, m, v = _adam(t.w, grad_w, t.m, t.v, t.i + 1, lr)
      if abort_early:  # aborted examples keep their iterate (without aborts all move)
        move = _expand(active, xf)
        w, m, v = jnp.where(move, w, t.w), jnp.where(move, m, t.m), jnp.where(move, v, t.v)
      pick = _expand(better, xf)
      return _StepState(
          i=t.i + 1, w=w, m=m, v=v, active=active, prev=prev, found=t.found | success,
          best_l2=jnp.where(better, l2, t.best_l2),
          best_x=jnp.where(pick, x_new, t.best_x),
          best_const=jnp.where(better, const, t.best_const))

    zeros = jnp.zeros_like(xf)
    start = _StepState(i=jnp.zeros((), jnp.int32), w=w0, m=zeros, v=zeros,
                       active=jnp.ones((batch,), bool),
                       prev=jnp.full((batch,), jnp.inf, dtype),
                       found=jnp.zeros((batch,), bool), best_l2=state.best_l2,
                       best_x=state.best_x, best_const=state.best_const)
    t = lax.while_loop(cond, body, start)
    upper = jnp.where(t.found, jnp.minimum(state.upper, const), state.upper)
    lower = jnp.where(t.found, state.lower, jnp.maximum(state.lower, const))
    bounded = upper < _NO_UPPER_BOUND
    next_const = jnp.where(bounded, (lower + upper) / 2.0,
                           jnp.where(t.found, const, const * 10.0))
    return _SearchState(const=next_const, lower=lower, upper=upper, best_l2=t.best_l2,
                        best_x=t.best_x, best_const=t.best_const, last_const=const)

  init_const = jnp.broadcast_to(jnp.asarray(initial_const, dtype), (batch,))
  state = _SearchState(const=init_const, lower=jnp.zeros((batch,), dtype),
                       upper=jnp.full((batch,), _UPPER_BOUND_INIT, dtype),
                       best_l2=jnp.full((batch,), jnp.inf, dtype), best_x=xf,
                       best_const=init_const, last_const=init_const)
  state = lax.fori_loop(0, binary_search_steps, search_step, state)
  success = jnp.isfinite(state.best_l2)
  x_adv = jnp.where(_expand(success, xf), state.best_x, xf).astype(x.dtype)
  l2_norm = norms.lp_norm((x_adv - x).astype(dtype), "l2")
  const = jnp.where(success, state.best_const, state.last_const)
  return x_adv, CWInfo(l2_norm=l2_norm, success=success, const=const)


def _check_l2_config(confidence: Any, initial_const: Any, binary_search_steps: int,
                     num_steps: int, learning_rate: Any, abort_early: Any,
                     checked: bool = False) -> None:
  check_positive_arg(confidence, "confidence", allow_zero=True, checked=checked)
  check_positive_arg(initial_const, "initial_const", checked=checked)
  check_int_at_least(binary_search_steps, "binary_search_steps", 1)
  check_int_at_least(num_steps, "num_steps", 1)
  check_positive_arg(learning_rate, "learning_rate", checked=checked)
  if not isinstance(abort_early, bool):
    raise ValueError(f"abort_early must be True or False; got {abort_early!r}.")


def cw_l2(key: PRNGKey, logits_fn: Any, x: ArrayLike, y: ArrayLike, *,
          target: Optional[ArrayLike] = None, confidence: ArrayLike = 0.0,
          initial_const: ArrayLike = 1e-3, binary_search_steps: int = 9,
          num_steps: int = 1000, learning_rate: ArrayLike = 1e-2,
          abort_early: bool = True, return_info: bool = False,
          checked: bool = False) -> Union[Array, Tuple[Array, CWInfo]]:
  """Carlini & Wagner's L2 attack (2017), as their reference code runs it.

  Minimises ||x' - x||_2^2 + c * max(-margin(x'), -kappa) over x' =
  (tanh(w) + 1) / 2 with Adam, searching c per example by bisection (see the
  module docstring for every detail), and returns per example the closest
  iterate, over all search steps, whose margin exceeds kappa. A minimum-norm
  attack: there is no radius (see `make_cw_l2` for one).

  Cost: at most binary_search_steps * num_steps iterations of one forward
  and one backward pass; the iteration loop exits once every example has
  aborted (abort_early).

  Checks: eager calls check shapes, dtypes, settings and values (x finite and
  in [0, 1], y and target in [0, num_classes), confidence >= 0,
  initial_const and learning_rate > 0). Under `jit`/`vmap` the values are
  traced and only shapes, dtypes and settings are checked, unless
  `checked=True`, which checks the values in the compiled program (see
  `certjax.attacks.core`).

  Args:
    key: a `jax.random.key` (used by randomized oracles only; the attack
      itself is deterministic).
    logits_fn: x -> logits, or a gradient oracle (e.g. EOT).
    x: clean images (batch, H, W, C) in [0, 1].
    y: true labels (batch,).
    target: optional target labels (batch,) for a targeted attack.
    confidence: kappa >= 0, the margin (in logits) an adversarial must
      exceed; may be traced.
    initial_const: the first c (1e-3 in the reference); may be traced.
    binary_search_steps: search steps over c (9 in the reference).
    num_steps: Adam iterations per search step (the reference's
      `MAX_ITERATIONS`; 10,000 in the paper's code, 1,000 here).
    learning_rate: Adam's learning rate in tanh space (1e-2); may be traced.
      Raise it for short runs on images with many pixels at 0 or 1 (see the
      module docstring).
    abort_early: stop an example's search step once its loss stalls.
    return_info: also return a `CWInfo` (L2 norms, success, constants).
    checked: check traced values too, as `checkify` checks; the call must
      then run under `certjax.attacks.checked` (or `checkify.checkify`).
      False adds nothing to the program.

  Returns:
    Images shaped like `x`: the closest adversarial found, else x (and a
    `CWInfo` with return_info).

  Raises:
    ValueError: on invalid input, naming the problem and the accepted values.
  """
  oracle = as_oracle(logits_fn)
  _check_l2_config(confidence, initial_const, binary_search_steps, num_steps,
                   learning_rate, abort_early, checked)
  validate_inputs(oracle, x, y, target=target, name="cw_l2", checked=checked)
  x, y = jnp.asarray(x), jnp.asarray(y)
  target = None if target is None else jnp.asarray(target)
  x_adv, info = _cw_l2_core(oracle, key, x, y, target, confidence=confidence,
                            initial_const=initial_const,
                            binary_search_steps=binary_search_steps, num_steps=num_steps,
                            learning_rate=learning_rate, abort_early=abort_early)
  return (x_adv, info) if return_info else x_adv


def _cw_l2_within(key: PRNGKey, logits_fn: Any, x: ArrayLike, y: ArrayLike, *,
                  eps: ArrayLike, checked: bool = False, **config: Any) -> Array:
  """`cw_l2`, keeping its adversarial only where ||x_adv - x||_2 <= eps."""
  validate_inputs(as_oracle(logits_fn), x, y, eps=eps, norm="l2", name="cw_l2",
                  checked=checked)
  x_adv, info = cw_l2(key, logits_fn, x, y, return_info=True, checked=checked, **config)
  x = jnp.asarray(x)
  inside = info.l2_norm <= jnp.broadcast_to(jnp.asarray(eps, info.l2_norm.dtype),
                                            info.l2_norm.shape)
  return jnp.where(_expand(inside, x), x_adv, x)


def _cw_linf_core(oracle: GradientOracle, key: PRNGKey, x: Array, y: Array,
                  target: Optional[Array], eps: Array, *, confidence: Array,
                  num_steps: int, learning_rate: Array, num_restarts: int) -> Array:
  """The fixed-radius L-infinity attack on validated inputs."""
  batch = x.shape[0]
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  xf = x.astype(dtype)
  radius = norms.broadcast_per_example(jnp.asarray(eps, dtype), xf)
  lower = jnp.clip(xf - radius, 0.0, 1.0)
  upper = jnp.clip(xf + radius, 0.0, 1.0)
  width = upper - lower
  kappa = jnp.asarray(confidence, dtype)
  lr = jnp.asarray(learning_rate, dtype)

  def to_box(w):
    return jnp.clip(lower + width * (jnp.tanh(w) + 1.0) / 2.0, lower, upper)


  def objective(logits):
    return jnp.minimum(_margin(logits, y, target), kappa)

  def run(r, best):
    best_x, best_margin = best
    k_run = jax.random.fold_in(key, r)
    k_start, k_steps = jax.random.split(k_run)
    random_w = _to_tanh_space(jax.random.uniform(k_start, xf.shape, dtype, -1.0, 1.0))
    w = jnp.where(r == 0, jnp.zeros_like(xf), random_w)

    def cond(t):
      i, _, _, _, best_x, best_margin = t
      del best_x
      return (i < num_steps) & ~jnp.all(best_margin > kappa)

    def body(t):
      i, w, m, v, best_x, best_margin = t
      x_new = to_box(w)
      _, logits, grad = oracle.value_and_grad(jax.random.fold_in(k_steps, i),
                                              x_new.astype(x.dtype), objective)
      margin = _margin(logits, y, target).astype(dtype)
      better = margin > best_margin
      # Descend on -min(margin, kappa); d x' / d w = width (1 - tanh^2) / 2.
      grad_w = -grad.astype(dtype) * width * (1.0 - jnp.tanh(w) ** 2) / 2.0
      w, m, v = _adam(w, grad_w, m, v, i + 1, lr)
      return (i + 1, w, m, v, jnp.where(_expand(better, xf), x_new, best_x),
              jnp.where(better, margin, best_margin))

    zeros = jnp.zeros_like(xf)
    out = lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), w, zeros, zeros,
                                      best_x, best_margin))
    return out[4], out[5]

  init = (xf, jnp.full((batch,), -jnp.inf, dtype))
  best_x, _ = lax.fori_loop(0, num_restarts, run, init)
  return best_x.astype(x.dtype)


def _check_linf_config(confidence: Any, num_steps: int, learning_rate: Any,
                       num_restarts: int, checked: bool = False) -> None:
  check_positive_arg(confidence, "confidence", allow_zero=True, checked=checked)
  check_int_at_least(num_steps, "num_steps", 1)
  check_positive_arg(learning_rate, "learning_rate", checked=checked)
  check_int_at_least(num_restarts, "num_restarts", 1)


def cw_linf(key: PRNGKey, logits_fn: Any, x: ArrayLike, y: ArrayLike, *,
            eps: ArrayLike, target: Optional[ArrayLike] = None,
            confidence: ArrayLike = 0.0, num_steps: int = 100,
            learning_rate: ArrayLike = 0.1, num_restarts: int = 1,
            checked: bool = False) -> Array:
  """Fixed-radius CW L-infinity attack: Adam on the CW margin inside the eps-box.

  Maximises min(margin(x'), kappa) over x' = l + (u - l) (tanh(w) + 1) / 2,
  l = max(0, x - eps), u = min(1, x + eps), with Adam on w (no distance
  penalty, no search over a constant; see the module docstring for why this
  and not the paper's iterative-tau attack). Restart 0 starts at x, the
  others uniformly in the box; every evaluated iterate is feasible and the
  one of largest margin over all restarts is returned. An example stops
  changing once its margin exceeds kappa; the loop exits when all have.

  Cost: at most num_restarts * num_steps forward and backward passes.

  Checks: eager calls check shapes, dtypes, settings and values (x finite and
  in [0, 1], eps finite and >= 0, y and target in [0, num_classes),
  confidence >= 0, learning_rate > 0). Under `jit`/`vmap` the values are
  traced and only shapes, dtypes and settings are checked, unless
  `checked=True` (see `certjax.attacks.core`).

  Args:
    key: a `jax.random.key` (random starts; randomized oracles).
    logits_fn: x -> logits, or a gradient oracle (e.g. EOT).
    x: clean images (batch, H, W, C) in [0, 1].
    y: true labels (batch,).
    eps: L-infinity radius, scalar or (batch,); may be traced.
    target: optional target labels (batch,) for a targeted attack.
    confidence: kappa >= 0: the margin at which the loss stops rewarding.
    num_steps: Adam iterations per restart.
    learning_rate: Adam's learning rate in tanh space (0.1: about 25 steps
      take a pixel from the centre of the box to 99% of its edge).
    num_restarts: runs (the first from x, the others from random points).
    checked: check traced values too, as `checkify` checks; the call must
      then run under `certjax.attacks.checked` (or `checkify.checkify`).
      False adds nothing to the program.

  Returns:
    Images shaped like `x`, inside the eps-ball and [0, 1].

  Raises:
    ValueError: on invalid input, naming the problem and the accepted values.
  """
  oracle = as_oracle(logits_fn)
  _check_linf_config(confidence, num_steps, learning_rate, num_restarts, checked)
  validate_inputs(oracle, x, y, eps=eps, norm="linf", target=target, name="cw_linf",
                  checked=checked)
  x, y = jnp.asarray(x), jnp.asarray(y)
  target = None if target is None else jnp.asarray(target)
  return _cw_linf_core(oracle, key, x, y, target, jnp.asarray(eps), confidence=confidence,
                       num_steps=num_steps, learning_rate=learning_rate,
                       num_restarts=num_restarts)


def make_cw_l2(*, confidence: float = 0.0, initial_const: float = 1e-3,
               binary_search_steps: int = 9, num_steps: int = 1000,
               learning_rate: float = 1e-2, abort_early: bool = True) -> AttackFn:
  """`attack_fn(key, logits_fn, x, y, eps)`: `cw_l2`, its result kept where within eps.

  An example counts as broken at radius eps only if the closest adversarial
  CW found has ||x_adv - x||_2 <= eps; elsewhere x is returned. The search
  itself does not depend on eps, so one run would serve every radius; the
  runner calls the attack once per radius.
  """
  _check_l2_config(confidence, initial_const, binary_search_steps, num_steps,
                   learning_rate, abort_early)
  attack_fn = bind_attack(_cw_l2_within, "cw-l2", confidence=confidence,
                          initial_const=initial_const,
                          binary_search_steps=binary_search_steps, num_steps=num_steps,
                          learning_rate=learning_rate, abort_early=abort_early)
  attack_fn.config["norm"] = "l2"  # for readers of the configuration; not an argument
  return attack_fn


def make_cw_linf(*, confidence: float = 0.0, num_steps: int = 100,
                 learning_rate: float = 0.1, num_restarts: int = 1) -> AttackFn:
  """`attack_fn(key, logits_fn, x, y, eps)` running `cw_linf` with this configuration."""
  _check_linf_config(confidence, num_steps, learning_rate, num_restarts)
  attack_fn = bind_attack(cw_linf, "cw-linf", confidence=confidence, num_steps=num_steps,
                          learning_rate=learning_rate, num_restarts=num_restarts)
  attack_fn.config["norm"] = "linf"  # for readers of the configuration; not an argument
  return attack_fn
