"""Adversarial training objectives: PGD-AT, TRADES and fast FGSM-AT.

Registered in the training objectives registry and chosen by
`config.objective.name`:

  'pgd_at'   Madry et al. 2018: minimise the cross-entropy at the PGD point.
  'trades'   Zhang et al. 2019: CE(f(x), y) + beta * KL(f(x) || f(x')), x' the
             maximiser of the KL term found by projected sign-gradient ascent
             from x + 0.001 * N(0, I).
  'fast_at'  Wong et al. 2020 ("Fast is better than free"): CE at one FGSM
             step of size alpha = 1.25 eps from a uniform random start in the
             eps ball, clipped to [0, 1].

All three take an epsilon warm-up: eps_t = eps * min(1, t / W) for training
step t (0-based) and W warm-up steps (`warmup_steps`, or `warmup_fraction`
of the run), a linear ramp from 0 that avoids the collapse large-eps training
of small models is prone to early on. W = 0 trains at eps from the start.

Model mode of the inner attack (`attack_mode`): the reference PyTorch code of
Madry et al. (CIFAR) runs the attack with the model in train mode, TRADES'
reference code switches to eval mode for it, and in PyTorch train-mode attack
passes also update the BatchNorm running statistics with perturbed batches, a
known nuisance. Here the default, 'eval', attacks the model with BatchNorm
using its running statistics; 'train' attacks it with batch statistics but
still never updates the running statistics from attack passes (only the one
training forward pass per batch, two for TRADES as in its reference code,
updates them). For models without BatchNorm or dropout the two are identical.

The attack never carries gradients into the parameters: it runs on
`stop_gradient(params)` and its output is `stop_gradient`-ed, so the
parameter gradient is that of the loss at the (fixed) adversarial point, as
in Danskin's theorem.

Metrics per batch: 'accuracy' (clean, model in attack mode), 'adv_accuracy'
(at the training adversarial point), 'eps' (the current warm-up radius), and
for TRADES 'natural_loss' and 'robust_loss'.

References:
  Madry, Makelov, Schmidt, Tsipras, Vladu. Towards Deep Learning Models
    Resistant to Adversarial Attacks. ICLR 2018 (PGD-AT).
  Zhang, Yu, Jiao, Xing, El Ghaoui, Jordan. Theoretically Principled
    Trade-off between Robustness and Accuracy. ICML 2019 (TRADES).
  Wong, Rice, Kolter. Fast is better than free: Revisiting adversarial
    training. ICLR 2020 (FGSM with random start).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections
from jax import lax

from certjax import validation
from certjax.attacks import norms
from certjax.attacks.pgd import pgd
from certjax.attacks.trades import kl_divergence, trades_attack
from certjax.training.objectives.registry import (LossFn, ObjectiveContext, accuracy,
                                                  cross_entropy, register_objective)
from certjax.types import Array, ArrayLike

ATTACK_MODES = ("eval", "train")
# The adversarial-training objectives this module registers.
OBJECTIVE_NAMES = ("pgd_at", "trades", "fast_at")

_COMMON = {
    "eps": 0.3,
    "norm": "linf",
    "warmup_steps": 0,
    "warmup_fraction": 0.0,
    "attack_mode": "eval",
}


def warmup_steps(hparams: Any, total_steps: int) -> int:
  """Number of eps warm-up steps: `warmup_steps`, else `warmup_fraction` of the run."""
  steps = validation.check_int_at_least(hparams.warmup_steps, "objective.warmup_steps", 0)
  fraction = float(hparams.warmup_fraction)
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"objective.warmup_fraction must lie in [0, 1], got {fraction!r}.")
  if steps and fraction:
    raise ValueError(
        "Give either objective.warmup_steps or objective.warmup_fraction, not both; got "
        f"warmup_steps={steps}, warmup_fraction={fraction}.")
  return steps if steps else int(round(fraction * total_steps))


def eps_schedule(eps: ArrayLike, num_warmup_steps: int, step: ArrayLike) -> Array:
  """eps * min(1, step / num_warmup_steps): a linear ramp from 0 (no ramp if 0 steps)."""
  eps = jnp.asarray(eps, jnp.float32)
  if num_warmup_steps <= 0:
    return eps
  ramp = jnp.asarray(step, jnp.float32) / float(num_warmup_steps)
  return eps * jnp.clip(ramp, 0.0, 1.0)


def _check_common(hparams: Any, ctx: ObjectiveContext) -> int:
  validation.check_positive(hparams.eps, "objective.eps")
  validation.check_choice(hparams.norm, "objective.norm", norms.NORMS)
  validation.check_choice(hparams.attack_mode, "objective.attack_mode", ATTACK_MODES)
  return warmup_steps(hparams, ctx.total_steps)


def _step_size(hparams: Any, eps: Array) -> Array:
  """Absolute `step_size` when > 0, else `rel_step_size` * current eps."""
  if float(hparams.step_size) > 0:
    return jnp.asarray(hparams.step_size, jnp.float32)
  return jnp.asarray(hparams.rel_step_size, jnp.float32) * eps


def _check_step_size(hparams: Any) -> None:
  validation.check_positive(hparams.step_size, "objective.step_size", allow_zero=True)
  validation.check_positive(hparams.rel_step_size, "objective.rel_step_size", allow_zero=True)
  if float(hparams.step_size) <= 0 and float(hparams.rel_step_size) <= 0:
    raise ValueError("One of objective.step_size (absolute) or objective.rel_step_size "
                     "(fraction of eps) must be > 0.")


def _attack_model(ctx: ObjectiveContext, params: Any, model_state: Any, mode: str):
  """The model the inner attack sees: parameters cut from the gradient."""
  params = lax.stop_gradient(params)
  model_state = lax.stop_gradient(model_state)
  return ctx.logits_fn(params, model_state, train=(mode == "train"))


def _adversarial_ce_loss(ctx: ObjectiveContext, hparams: Any, num_warmup: int,
                         make_x_adv) -> LossFn:
  """CE at `make_x_adv(key, attack_logits_fn, x, y, eps)` (PGD-AT, fast AT)."""

  def loss_fn(params, model_state, batch, key, step):
    x, y = batch["image"], batch["label"]
    eps = eps_schedule(hparams.eps, num_warmup, step)
    attack_logits = _attack_model(ctx, params, model_state, hparams.attack_mode)
    x_adv = lax.stop_gradient(make_x_adv(key, attack_logits, x, y, eps))
    clean_accuracy = accuracy(lax.stop_gradient(attack_logits(x)), y)
    logits, new_state = ctx.forward(params, model_state, x_adv, train=True)
    loss = cross_entropy(logits, y)
    metrics = {"loss": loss, "accuracy": clean_accuracy,
               "adv_accuracy": accuracy(logits, y), "eps": eps}
    return loss, (metrics, new_state)

  return loss_fn


@register_objective("pgd_at", defaults={
    **_COMMON, "num_steps": 10, "step_size": 0.0, "rel_step_size": 0.25,
    "random_start": True})
def pgd_at(hparams: ml_collections.ConfigDict, ctx: ObjectiveContext) -> LossFn:
  """PGD adversarial training (Madry et al. 2018).

  Hyperparameters: eps, norm ('linf', 'l2', 'l1'), num_steps, step_size
  (absolute; 0 = use rel_step_size), rel_step_size (fraction of the current
  eps; the default 0.25 is 2.5 / num_steps for 10 steps), random_start,
  warmup_steps / warmup_fraction, attack_mode ('eval' or 'train').
  """
  num_warmup = _check_common(hparams, ctx)
  validation.check_int_at_least(hparams.num_steps, "objective.num_steps", 1)
  _check_step_size(hparams)

  def make_x_adv(key, logits_fn, x, y, eps):
    return pgd(key, logits_fn, x, y, eps=eps, norm=hparams.norm,
               num_steps=int(hparams.num_steps), step_size=_step_size(hparams, eps),
               random_start=bool(hparams.random_start))

  return _adversarial_ce_loss(ctx, hparams, num_warmup, make_x_adv)


@register_objective("fast_at", defaults={**_COMMON, "rel_step_size": 1.25})
def fast_at(hparams: ml_collections.ConfigDict, ctx: ObjectiveContext) -> LossFn:
  """FGSM adversarial training with a random start (Wong et al. 2020).

  One signed-gradient step (for 'linf'; the norm's steepest step otherwise) of
  size alpha = rel_step_size * eps (1.25 in the paper) from a uniform point in
  the eps ball, projected onto the ball and clipped to [0, 1].
  """
  num_warmup = _check_common(hparams, ctx)
  validation.check_positive(hparams.rel_step_size, "objective.rel_step_size")

  def make_x_adv(key, logits_fn, x, y, eps):
    return pgd(key, logits_fn, x, y, eps=eps, norm=hparams.norm, num_steps=1,
               step_size=jnp.asarray(hparams.rel_step_size, jnp.float32) * eps,
               random_start=True)

  return _adversarial_ce_loss(ctx, hparams, num_warmup, make_x_adv)


@register_objective("trades", defaults={
    **_COMMON, "beta": 6.0, "num_steps": 10, "step_size": 0.0, "rel_step_size": 0.25})
def trades(hparams: ml_collections.ConfigDict, ctx: ObjectiveContext) -> LossFn:
  """TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(f(x) || f(x')).

  Hyperparameters: eps, beta (6 in the paper's CIFAR runs, 1/lambda), norm,
  num_steps, step_size / rel_step_size (the paper: eps 0.031, 10 steps of
  0.007 on CIFAR-10; eps 0.3, 40 steps of 0.01 on MNIST), warm-up, attack_mode.
  The KL is averaged over the batch ('batchmean').
  """
  num_warmup = _check_common(hparams, ctx)
  validation.check_positive(hparams.beta, "objective.beta", allow_zero=True)
  validation.check_int_at_least(hparams.num_steps, "objective.num_steps", 1)
  _check_step_size(hparams)

  def loss_fn(params, model_state, batch, key, step):
    x, y = batch["image"], batch["label"]
    eps = eps_schedule(hparams.eps, num_warmup, step)
    attack_logits = _attack_model(ctx, params, model_state, hparams.attack_mode)
    attack_clean_logits = attack_logits(x)
    x_adv = lax.stop_gradient(trades_attack(
        key, attack_logits, x, attack_clean_logits, eps, norm=hparams.norm,
        num_steps=int(hparams.num_steps), step_size=_step_size(hparams, eps)))
    # Two train-mode passes, as in the reference code (each updates BatchNorm).
    logits, state = ctx.forward(params, model_state, x, train=True)
    adv_logits, new_state = ctx.forward(params, state, x_adv, train=True)
    natural = cross_entropy(logits, y)
    robust = jnp.mean(kl_divergence(logits, adv_logits))
    loss = natural + hparams.beta * robust
    metrics = {"loss": loss, "natural_loss": natural, "robust_loss": robust,
               "accuracy": accuracy(logits, y), "adv_accuracy": accuracy(adv_logits, y),
               "eps": eps}
    return loss, (metrics, new_state)

  return loss_fn
