"""Gradient attacks: FGSM / FGM, PGD with restarts and schedules, MI-FGSM.

Every attack has the form `attack(key, logits_fn, x, y, *, eps, ...) -> x_adv`:
batch-first NHWC images in [0, 1], integer labels, a radius `eps` (a scalar or
one value per example; it may be traced, so one compiled attack serves every
radius). Configuration that shapes the computation (norm, number of steps,
restarts, loss, schedule) is static Python; `eps`, step sizes and the momentum
decay may be traced. Loops are `lax.fori_loop`s with per-example state, so the
attacks run under `jit`, `vmap` and on batches sharded over a mesh. `logits_fn`
may also be a gradient oracle such as `certjax.attacks.eot.eot(...)`.

The `make_*` factories validate a configuration once and return an
`AttackFn`, `attack_fn(key, logits_fn, x, y, eps) -> x_adv`, the form
`certjax.attacks.runner.robust_accuracy` takes.

Input checks follow `certjax.attacks.core`: everything on eager calls; under
`jit`/`vmap` the shapes, dtypes and settings, plus the values when
`checked=True` (raised through `certjax.attacks.checked`).

Wrap calls in `jax.jit` for repeated use; to avoid baking model weights into
the compiled program as constants, pass the weights as arguments, e.g.
`jax.tree_util.Partial(apply_fn, variables)` as `logits_fn`.

References:
  Goodfellow, Shlens, Szegedy. Explaining and Harnessing Adversarial
    Examples. ICLR 2015 (FGSM).
  Kurakin, Goodfellow, Bengio. Adversarial examples in the physical world.
    2016 (iterative FGSM).
  Madry, Makelov, Schmidt, Tsipras, Vladu. Towards Deep Learning Models
    Resistant to Adversarial Attacks. ICLR 2018 (PGD).
  Dong, Liao, Pang, Su, Zhu, Hu, Li. Boosting Adversarial Attacks with
    Momentum. CVPR 2018 (MI-FGSM).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
from jax import lax

from certjax.types import Array, ArrayLike, PRNGKey
from certjax.validation import check_choice, check_int_at_least
from certjax.attacks import losses as losses_lib
from certjax.attacks.losses import Loss
from certjax.attacks import norms
from certjax.attacks.core import (AttackFn, GradientOracle, as_oracle, bind_attack,
                                  check_positive_arg, check_step_size, validate_inputs)

Schedule = Union[str, Callable[[Array], Array]]

SCHEDULES = ("constant", "cosine", "step")
KEEP = ("success", "loss")
# Key salt for evaluating a finished restart (randomized oracles only).
_EVAL_KEY = 0x7FFFFFFF


def schedule_multiplier(schedule: Schedule, num_steps: int) -> Callable[[Array], Array]:
  """Step-size multiplier as a function of the (traced) step index.

  'constant': 1. 'cosine': 0.5 (1 + cos(pi i / num_steps)). 'step': 1, then
  0.1 from half the steps and 0.01 from three quarters. A callable is used as
  is (it receives the step index as an int32 array).
  """
  if callable(schedule):
    return schedule
  check_choice(schedule, "schedule", SCHEDULES)
  if schedule == "constant":
    return lambda i: jnp.ones((), jnp.float32)
  if schedule == "cosine":
    return lambda i: 0.5 * (1.0 + jnp.cos(jnp.pi * i / num_steps))
  half, three_quarters = num_steps // 2, (3 * num_steps) // 4
  return lambda i: jnp.where(i < half, 1.0, jnp.where(i < three_quarters, 0.1, 0.01))


def _absolute_step(eps: Array, step_size: Optional[ArrayLike],
                   rel_step_size: Optional[ArrayLike], default_rel: float) -> Array:
  if step_size is not None:
    return jnp.asarray(step_size, jnp.float32)
  rel = default_rel if rel_step_size is None else rel_step_size
  return jnp.asarray(rel, jnp.float32) * eps


def _objective(loss: Loss, y: Array, target: Optional[Array]):
  loss_fn = losses_lib.get_loss(loss)
  return lambda logits: loss_fn(logits, y, target)


def iterative_attack(oracle: GradientOracle, key: PRNGKey, x: Array, y: Array,
                     target: Optional[Array], eps: Array, *, norm: str,
                     num_steps: int, step_size: Array,
                     schedule: Callable[[Array], Array], loss: Loss,
                     random_start: bool, decay: Optional[ArrayLike],
                     l1_sparsity: Optional[ArrayLike]) -> Array:
  """One run of (momentum) projected steepest ascent; no validation.

  Shared by PGD, MI-FGSM and FGM. Each step costs one forward and one backward
  pass; the final iterate is returned (Madry et al.).
  """
  objective = _objective(loss, y, target)
  k_init, k_steps = jax.random.split(key)
  x_adv = norms.random_init(k_init, x, eps, norm) if random_start else x
  alpha = norms.broadcast_per_example(step_size, x)

  def body(i, carry):
    x_adv, velocity = carry
    _, _, grad = oracle.value_and_grad(jax.random.fold_in(k_steps, i), x_adv, objective)
    if decay is not None:
      l1 = norms.broadcast_per_example(norms.lp_norm(grad, "l1"), grad)
      velocity = decay * velocity + grad / (l1 + 1e-12)
      grad = velocity
    direction = norms.steepest_direction(grad, norm, l1_sparsity=l1_sparsity)
    step = (alpha * schedule(i)).astype(x.dtype)  # keep low-precision inputs' dtype
    x_adv = norms.project(x_adv + step * direction, x, eps, norm)
    return x_adv, velocity

  x_adv, _ = lax.fori_loop(0, num_steps, body, (x_adv, jnp.zeros_like(x)))
  return x_adv


def best_of_restarts(run: Callable[[PRNGKey], Array], oracle: GradientOracle,
                     key: PRNGKey, x: Array, y: Array, target: Optional[Array],
                     loss: Loss, num_restarts: int, keep: str) -> Array:
  """Runs `run(key_r)` num_restarts times and keeps the best output per example.

  keep='loss': the restart with the highest final loss. keep='success': the
  first successful restart, or the highest loss if none succeeded. Restart r
  uses `fold_in(key, r)`, so a single run is restart 0 of any longer series.
  """
  if num_restarts == 1:
    return run(jax.random.fold_in(key, 0))
  objective = _objective(loss, y, target)
  batch = x.shape[0]

  def body(r, best):
    best_x, best_loss, best_success = best
    k_run = jax.random.fold_in(key, r)
    x_r = run(k_run)
    logits = oracle.logits(jax.random.fold_in(k_run, _EVAL_KEY), x_r)
    loss_r = objective(logits)
    success_r = losses_lib.is_successful(logits, y, target)
    if keep == "loss":
      better = loss_r > best_loss
    else:
      better = ~best_success & (success_r | (loss_r > best_loss))
    pick = better.reshape((-1,) + (1,) * (x.ndim - 1))
    return (jnp.where(pick, x_r, best_x), jnp.where(better, loss_r, best_loss),
            jnp.where(better, success_r, best_success))

  init = (x, jnp.full((batch,), -jnp.inf, x.dtype), jnp.zeros((batch,), bool))
  best_x, _, _ = lax.fori_loop(0, num_restarts, body, init)
  return best_x


def _check_common(norm: str, loss: Any) -> None:
  check_choice(norm, "norm", norms.NORMS)
  losses_lib.get_loss(loss)


def _check_pgd_config(norm, num_steps, step_size, rel_step_size, schedule,
                      num_restarts, keep, loss, l1_sparsity, checked=False) -> None:
  _check_common(norm, loss)
  check_int_at_least(num_steps, "num_steps", 1)
  check_int_at_least(num_restarts, "num_restarts", 1)
  check_step_size(step_size, rel_step_size, checked=checked)
  if not callable(schedule):
    check_choice(schedule, "schedule", SCHEDULES)
  check_choice(keep, "keep", KEEP)
  if l1_sparsity is not None:
    check_positive_arg(l1_sparsity, "l1_sparsity", checked=checked)


def fgm(key: PRNGKey, logits_fn: Any, x: ArrayLike, y: ArrayLike, *,
        eps: ArrayLike, norm: str = "linf", loss: Loss = "ce",
        target: Optional[ArrayLike] = None,
        l1_sparsity: Optional[ArrayLike] = None, checked: bool = False) -> Array:
  """Fast Gradient Method: one steepest-ascent step of size eps.

  x_adv = clip(x + eps * u), u the unit steepest-ascent direction of the loss
  for the norm (sign of the gradient for 'linf' = FGSM, normalised gradient
  for 'l2', see `norms.steepest_direction` for 'l1'), then projected onto the
  ball ∩ [0, 1].

  Checks: eager calls check shapes, dtypes, settings and values (x finite and
  in [0, 1], eps finite and >= 0, y and target in [0, num_classes),
  l1_sparsity > 0). Under `jit`/`vmap` the values are traced and only
  shapes, dtypes and settings are checked, unless `checked=True`, which
  checks the values in the compiled program (see `certjax.attacks.core`).

  Args:
    key: a `jax.random.key` (used by randomized oracles only).
    logits_fn: x -> logits, or a gradient oracle (e.g. EOT).
    x: clean images (batch, H, W, C) in [0, 1].
    y: true labels (batch,).
    eps: radius, scalar or (batch,).
    norm: 'linf', 'l2' or 'l1'.
    loss: 'ce', 'cw', 'dlr' (see `losses`) or a callable
      `loss(logits, labels, target=None) -> (batch,)` to maximise.
    target: optional target labels (batch,) for a targeted attack.
    l1_sparsity: fraction of coordinates moved for 'l1' (None: the single
      steepest coordinate).
    checked: check traced values too, as `checkify` checks; the call must
      then run under `certjax.attacks.checked` (or `checkify.checkify`).
      False adds nothing to the program.

  Returns:
    Adversarial images shaped like `x`.

  Raises:
    ValueError: on invalid input, naming the problem and the accepted values.
  """
  oracle = as_oracle(logits_fn)
  _check_common(norm, loss)
  if l1_sparsity is not None:
    check_positive_arg(l1_sparsity, "l1_sparsity", checked=checked)
  validate_inputs(oracle, x, y, eps=eps, norm=norm, target=target, name="fgm",
                  checked=checked)
  x, y = jnp.asarray(x), jnp.asarray(y)
  target = None if target is None else jnp.asarray(target)
  eps = jnp.asarray(eps, x.dtype)
  return iterative_attack(oracle, key, x, y, target, eps, norm=norm, num_steps=1,
                          step_size=eps, schedule=schedule_multiplier("constant", 1),
                          loss=loss, random_start=False, decay=None,
                          l1_sparsity=l1_sparsity)


def fgsm(key: PRNGKey, logits_fn: Any, x: ArrayLike, y: ArrayLike, *,
         eps: ArrayLike, loss: Loss = "ce",
         target: Optional[ArrayLike] = None, checked: bool = False) -> Array:
  """FGSM (Goodfellow et al. 2015): `fgm` with the L-infinity norm.

  Checks as in `fgm`: everything eagerly; under `jit`/`vmap` the values only
  with `checked=True`.
  """
  return fgm(key, logits_fn, x, y, eps=eps, norm="linf", loss=loss, target=target,
             checked=checked)


def pgd(key: PRNGKey, logits_fn: Any, x: ArrayLike, y: ArrayLike, *,
        eps: ArrayLike, norm: str = "linf", num_steps: int = 10,
        step_size: Optional[ArrayLike] = None,
        rel_step_size: Optional[ArrayLike] = None,
        schedule: Schedule = "constant", num_restarts: int = 1,
        keep: str = "success", random_start: bool = True, loss: Loss = "ce",
        target: Optional[ArrayLike] = None,
        l1_sparsity: ArrayLike = 0.05, checked: bool = False) -> Array:
  """Projected Gradient Descent (Madry et al. 2018) with restarts.

  A fixed number of steps (no early stopping), each
  x <- Proj(x + alpha_i * u(grad)), with u the norm's steepest-ascent
  direction and alpha_i = step_size * schedule(i). The final iterate of each
  restart is returned, the best restart per example chosen by `keep`.

  Checks: eager calls check shapes, dtypes, settings and values (x finite and
  in [0, 1], eps finite and >= 0, y and target in [0, num_classes),
  step_size, rel_step_size and l1_sparsity > 0). Under `jit`/`vmap` the
  values are traced and only shapes, dtypes and settings are checked, unless
  `checked=True`, which checks the values in the compiled program (see
  `certjax.attacks.core`).

  Args:
    key: a `jax.random.key`.
    logits_fn: x -> logits, or a gradient oracle (e.g. EOT).
    x: clean images (batch, H, W, C) in [0, 1].
    y: true labels (batch,).
    eps: radius, scalar or (batch,).
    norm: 'linf', 'l2' or 'l1'.
    num_steps: gradient steps per restart.
    step_size: absolute step size (pixel units).
    rel_step_size: step size as a fraction of eps. Default (neither given):
      2.5 / num_steps, so the steps can cross the ball (Madry et al.).
    schedule: 'constant', 'cosine', 'step' or a callable step -> multiplier.
    num_restarts: independent random restarts.
    keep: 'success' (first successful restart, else highest loss) or 'loss'
      (highest final loss).
    random_start: start uniformly in the ball (else at x).
    loss: 'ce', 'cw', 'dlr' or a callable `loss(logits, labels, target=None)`.
    target: optional target labels (batch,) for a targeted attack.
    l1_sparsity: fraction of coordinates moved per step for 'l1'.
    checked: check traced values too, as `checkify` checks; the call must
      then run under `certjax.attacks.checked` (or `checkify.checkify`).
      False adds nothing to the program.

  Returns:
    Adversarial images shaped like `x`, inside the eps-ball and [0, 1].

  Raises:
    ValueError: on invalid input, naming the problem and the accepted values.
  """
  oracle = as_oracle(logits_fn)
  _check_pgd_config(norm, num_steps, step_size, rel_step_size, schedule,
                    num_restarts, keep, loss, l1_sparsity, checked)
  validate_inputs(oracle, x, y, eps=eps, norm=norm, target=target, name="pgd",
                  checked=checked)
  x, y = jnp.asarray(x), jnp.asarray(y)
  target = None if target is None else jnp.asarray(target)
  eps = jnp.asarray(eps, x.dtype)
  alpha = _absolute_step(eps, step_size, rel_step_size, 2.5 / num_steps)
  run = functools.partial(
      iterative_attack, oracle, x=x, y=y, target=target, eps=eps, norm=norm,
      num_steps=num_steps, step_size=alpha,
      schedule=schedule_multiplier(schedule, num_steps), loss=loss,
      random_start=random_start, decay=None, l1_sparsity=l1_sparsity)
  return best_of_restarts(lambda k: run(key=k), oracle, key, x, y, target, loss,
                          num_restarts, keep)


def mi_fgsm(key: PRNGKey, logits_fn: Any, x: ArrayLike, y: ArrayLike, *,
            eps: ArrayLike, norm: str = "linf", num_steps: int = 10,
            decay: ArrayLike = 1.0, step_size: Optional[ArrayLike] = None,
            rel_step_size: Optional[ArrayLike] = None,
            random_start: bool = False, loss: Loss = "ce",
            target: Optional[ArrayLike] = None,
            l1_sparsity: ArrayLike = 0.05, checked: bool = False) -> Array:
  """Momentum Iterative FGSM (Dong et al. 2018).

  g <- decay * g + grad / ||grad||_1; x <- Proj(x + alpha * u(g)), with u the
  norm's steepest-ascent direction (sign for 'linf' as in the paper).

  Checks: eager calls check shapes, dtypes, settings and values (x finite and
  in [0, 1], eps and decay finite and >= 0, y and target in
  [0, num_classes), step sizes and l1_sparsity > 0). Under `jit`/`vmap` the
  values are traced and only shapes, dtypes and settings are checked, unless
  `checked=True`, which checks the values in the compiled program (see
  `certjax.attacks.core`).

  Args:
    key: a `jax.random.key`.
    logits_fn: x -> logits, or a gradient oracle.
    x: clean images (batch, H, W, C) in [0, 1].
    y: true labels (batch,).
    eps: radius, scalar or (batch,).
    norm: 'linf', 'l2' or 'l1'.
    num_steps: iterations T.
    decay: momentum decay mu (1.0 in the paper).
    step_size: absolute step size. Default: eps / num_steps (the paper's).
    rel_step_size: step size as a fraction of eps.
    random_start: start uniformly in the ball (the paper starts at x).
    loss: 'ce', 'cw' or 'dlr'.
    target: optional target labels for a targeted attack.
    l1_sparsity: fraction of coordinates moved per step for 'l1'.
    checked: check traced values too, as `checkify` checks; the call must
      then run under `certjax.attacks.checked` (or `checkify.checkify`).
      False adds nothing to the program.

  Returns:
    Adversarial images shaped like `x`.

  Raises:
    ValueError: on invalid input, naming the problem and the accepted values.
  """
  oracle = as_oracle(logits_fn)
  _check_pgd_config(norm, num_steps, step_size, rel_step_size, "constant", 1,
                    "success", loss, l1_sparsity, checked)
  check_positive_arg(decay, "decay", allow_zero=True, checked=checked)
  validate_inputs(oracle, x, y, eps=eps, norm=norm, target=target, name="mi_fgsm",
                  checked=checked)
  x, y = jnp.asarray(x), jnp.asarray(y)
  target = None if target is None else jnp.asarray(target)
  eps = jnp.asarray(eps, x.dtype)
  alpha = _absolute_step(eps, step_size, rel_step_size, 1.0 / num_steps)
  return iterative_attack(oracle, key, x, y, target, eps, norm=norm,
                          num_steps=num_steps, step_size=alpha,
                          schedule=schedule_multiplier("constant", num_steps),
                          loss=loss, random_start=random_start,
                          decay=jnp.asarray(decay, x.dtype), l1_sparsity=l1_sparsity)


def make_fgm(*, norm: str = "linf", loss: Loss = "ce",
             l1_sparsity: Optional[ArrayLike] = None) -> AttackFn:
  """`attack_fn(key, logits_fn, x, y, eps)` running `fgm` with this configuration."""
  _check_common(norm, loss)
  if l1_sparsity is not None:
    check_positive_arg(l1_sparsity, "l1_sparsity")
  return bind_attack(fgm, f"fgm-{norm}", norm=norm, loss=loss, l1_sparsity=l1_sparsity)


def make_pgd(*, norm: str = "linf", num_steps: int = 10,
             step_size: Optional[ArrayLike] = None,
             rel_step_size: Optional[ArrayLike] = None,
             schedule: Schedule = "constant", num_restarts: int = 1,
             keep: str = "success", random_start: bool = True, loss: Loss = "ce",
             l1_sparsity: ArrayLike = 0.05) -> AttackFn:
  """`attack_fn(key, logits_fn, x, y, eps)` running `pgd` with this configuration."""
  _check_pgd_config(norm, num_steps, step_size, rel_step_size, schedule,
                    num_restarts, keep, loss, l1_sparsity)
  return bind_attack(pgd, f"pgd{num_steps}-{losses_lib.loss_name(loss)}", norm=norm,
                     num_steps=num_steps, step_size=step_size,
                     rel_step_size=rel_step_size, schedule=schedule,
                     num_restarts=num_restarts, keep=keep, random_start=random_start,
                     loss=loss, l1_sparsity=l1_sparsity)


def make_mi_fgsm(*, norm: str = "linf", num_steps: int = 10, decay: float = 1.0,
                 step_size: Optional[ArrayLike] = None,
                 rel_step_size: Optional[ArrayLike] = None,
                 random_start: bool = False, loss: Loss = "ce",
                 l1_sparsity: ArrayLike = 0.05) -> AttackFn:
  """`attack_fn(key, logits_fn, x, y, eps)` running `mi_fgsm` with this configuration."""
  _check_pgd_config(norm, num_steps, step_size, rel_step_size, "constant", 1,
                    "success", loss, l1_sparsity)
  check_positive_arg(decay, "decay", allow_zero=True)
  return bind_attack(mi_fgsm, f"mi-fgsm{num_steps}", norm=norm, num_steps=num_steps,
                     decay=decay, step_size=step_size, rel_step_size=rel_step_size,
                     random_start=random_start, loss=loss, l1_sparsity=l1_sparsity)
