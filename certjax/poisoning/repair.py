"""Repairing a backdoored model: fine-tuning, fine-pruning's pruning, anti-backdoor learning.

`fine_tune` is the defender's short training on a small clean (or
unlearning) set held in memory, one jitted `lax.scan`: the fine-tuning step
that fine-pruning, Neural Cleanse's unlearning, anti-backdoor learning and
plain fine-tuning (BackdoorBench's "ft" row) all end with. Training from
scratch stays with the caller's trainer.

Fine-pruning (Liu, Dolan-Gavitt, Garg 2018). Backdoor behaviour tends to
live in neurons that clean inputs leave dormant, so the defence prunes the
channels of one layer (the last convolutional layer in the paper) in
increasing order of their mean activation on clean data, stops before clean
accuracy falls too far, then fine-tunes:

  acts = features_fn(x_clean_val)                  # [N, ..., channels] of the chosen layer
  order = pruning_order(acts)                      # least active first
  pruned = prune_until(evaluate, order, max_accuracy_drop=0.04)
  # evaluate(mask) = clean validation accuracy of the model whose layer
  # output is multiplied by mask [channels] (1 keeps, 0 prunes); jit it once
  # with the mask as an argument. Keep pruned.mask in the model (a fixed
  # multiplier, or zeroed weights) and fine-tune on clean data.

Anti-backdoor learning (ABL; Li et al. 2021). Poisoned examples are learnt
much faster than clean ones, so their loss drops first:

  1. Isolation (the first T_te epochs, 20 in the paper): train on the whole
     (poisoned) training set with `lga_loss(per_example_loss, gamma)`, local
     gradient ascent that holds every example's loss near gamma (0.5 in the
     paper), so clean examples do not fall below it while the
     fast-learnt poison still does.
  2. `isolate_lowest_loss(losses_of_every_training_example, fraction)`: the
     lowest-loss fraction (1% in the paper) is the isolated, likely poisoned
     set D_b; the rest is D_c.
  3. Unlearning: train with `unlearning_loss(loss on a batch of D_b,
     loss on a batch of D_c)` = mean(D_c loss) - mean(D_b loss): ordinary
     descent on D_c, gradient ascent on D_b. The authors' code first trains
     on D_c alone (clean_per_example_loss only, a plain mean) and then runs a
     few epochs of ascent on D_b alone (`unlearning_loss(loss_b)`, learning
     rate 5e-4), which this function also covers.

References:
  Liu, Dolan-Gavitt, Garg. Fine-Pruning: Defending Against Backdooring
    Attacks on Deep Neural Networks. RAID 2018.
  Li, Lyu, Koren, Lyu, Li, Ma. Anti-Backdoor Learning: Training Clean
    Models on Poisoned Data. NeurIPS 2021 (code: bboylyg/ABL).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from certjax.types import Array, ArrayLike, PRNGKey
from certjax.validation import check_choice, check_finite_scalar, check_int_at_least

__all__ = [
    "FineTuneResult", "LGA_REDUCTIONS", "Isolation", "PruneResult", "fine_tune",
    "isolate_lowest_loss", "lga_loss",
    "pruning_mask", "pruning_order", "prune_until", "unlearning_loss",
]

LGA_REDUCTIONS = ("example", "batch")


def _check_fraction(fraction: object, name: str = "fraction") -> float:
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer,
                                                              np.floating)) or not (
      0.0 <= float(fraction) <= 1.0):
    raise ValueError(f"{name} must be a number in [0, 1], got {fraction!r}.")
  return float(fraction)


def _count(fraction: float, total: int) -> int:
  # The 1e-9 keeps 0.3 * 10 = 3.0000000000000004 (and 0.29 * 100) on the
  # count they stand for.
  return min(total, int(math.floor(fraction * total + 1e-9)))


# ------------------------------------------------------------------ fine-tuning

# (params, model_state, images [B, ...], labels [B], key) -> (loss, new model_state)
RepairLoss = Callable[[Any, Any, Array, Array, PRNGKey], tuple[Array, Any]]


class FineTuneResult(NamedTuple):
  """What `fine_tune` returns.

  Attributes:
    params: the fine-tuned parameters.
    model_state: the updated non-parameter state (BatchNorm statistics; {}
      when the model has none).
    losses: [num_steps] the loss of every step's batch, before its update.
  """
  params: Any
  model_state: Any
  losses: Array


def fine_tune(key: PRNGKey, loss_fn: RepairLoss, params: Any, x: ArrayLike, y: ArrayLike, *,
              optimizer: optax.GradientTransformation, num_epochs: int, batch_size: int,
              model_state: Any = None) -> FineTuneResult:
  """Minimises `loss_fn` over an in-memory set for a few epochs: one jitted `lax.scan`.

  Every epoch visits a fresh permutation of the N examples in floor(N /
  batch_size) batches (the remainder is dropped, as in the defences'
  reference code with `drop_last`); step s uses key fold_in(key, s). To
  ascend instead (ABL's unlearning of the isolated set), return the negated
  loss. Works under `jit` (the settings are static) and `vmap` over keys,
  parameters or data of equal shapes.

  Args:
    key: PRNG key: the permutations and the per-step keys given to loss_fn.
    loss_fn: (params, model_state, images, labels, key) -> (scalar loss,
      new model_state); differentiated with respect to params.
    params: the parameters to start from.
    x: [N, ...] images (or any per-example arrays).
    y: [N] labels.
    optimizer: an optax transformation (e.g. optax.sgd(0.01, momentum=0.9)).
    num_epochs: passes over the set, >= 1.
    batch_size: examples per step, in [1, N].
    model_state: the model's non-parameter state (None or {} when none).

  Returns:
    A `FineTuneResult`.

  Raises:
    ValueError: x and y of different lengths, y not rank 1, bad epochs or
      batch size.
  """
  num_examples = np.shape(x)[0] if np.ndim(x) else 0
  if np.ndim(y) != 1 or np.shape(y)[0] != num_examples or num_examples == 0:
    raise ValueError(f"x and y must hold the same N >= 1 examples, with y of shape [N]; got "
                     f"shapes {tuple(np.shape(x))} and {tuple(np.shape(y))}.")
  check_int_at_least(num_epochs, "num_epochs", 1)
  check_int_at_least(batch_size, "batch_size", 1)
  if batch_size > num_examples:
    raise ValueError(f"batch_size must be at most the {num_examples} examples; got "
                     f"{batch_size}.")
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be callable; got {type(loss_fn).__name__}.")
  batches = num_examples // batch_size
  x, y = jnp.asarray(x), jnp.asarray(y)
  order_key, step_key = jax.random.split(key)
  # [epochs * batches, batch_size] example indices, one permutation per epoch.
  orders = jax.vmap(lambda k: jax.random.permutation(k, num_examples)[:batches * batch_size])(
      jax.random.split(order_key, num_epochs)).reshape(num_epochs * batches, batch_size)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(carry, inputs):
    params, opt_state, state = carry
    index, step_number = inputs
    (loss, new_state), grads = grad_fn(params, state, x[index], y[index],
                                       jax.random.fold_in(step_key, step_number))
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, new_state), loss

  state = {} if model_state is None else model_state
  (params, _, state), losses = jax.lax.scan(
      step, (params, optimizer.init(params), state),
      (orders, jnp.arange(orders.shape[0], dtype=jnp.int32)))
  return FineTuneResult(params=params, model_state=state, losses=losses)


# ------------------------------------------------------------------ fine-pruning


def pruning_order(activations_clean: ArrayLike) -> Array:
  """Channels of a layer by increasing mean activation on clean data (Liu et al. 2018).

  The mean runs over every axis but the last (examples, and the spatial
  positions of a convolutional layer); ties keep channel order. Works under
  `jit` and `vmap`.

  Args:
    activations_clean: [N, ..., channels] activations of the layer to prune
      on clean (validation) inputs, after the nonlinearity as in the paper.

  Returns:
    [channels] int32 channel indices, least active first.

  Raises:
    ValueError: activations of rank < 2 or not floating point.
  """
  shape = np.shape(activations_clean)
  if len(shape) < 2:
    raise ValueError(f"activations_clean must have rank >= 2 (examples, ..., channels); got "
                     f"shape {tuple(shape)}.")
  acts = jnp.asarray(activations_clean)
  if not jnp.issubdtype(acts.dtype, jnp.floating):
    raise ValueError(f"activations_clean must be floating point; got dtype {acts.dtype}.")
  means = jnp.mean(acts.astype(jnp.float32), axis=tuple(range(acts.ndim - 1)))
  return jnp.argsort(means, stable=True).astype(jnp.int32)


def _mask_for_count(order: Array, num_pruned: ArrayLike) -> Array:
  rank = jnp.zeros(order.shape, jnp.int32).at[order].set(jnp.arange(order.size, dtype=jnp.int32))
  return (rank >= num_pruned).astype(jnp.float32)


def _check_order(order: object) -> Array:
  shape = np.shape(order)
  if len(shape) != 1 or shape[0] == 0:
    raise ValueError(f"order must be a non-empty rank-1 array of channel indices (from "
                     f"pruning_order); got shape {tuple(shape)}.")
  order = jnp.asarray(order)
  if not jnp.issubdtype(order.dtype, jnp.integer):
    raise ValueError(f"order must hold integer channel indices; got dtype {order.dtype}.")
  return order


def pruning_mask(order: ArrayLike, fraction: float) -> Array:
  """Keep-mask of a layer with the first floor(fraction * channels) of `order` pruned.

  Args:
    order: [channels] a permutation of the channels, the first pruned first
      (`pruning_order`).
    fraction: share of channels to prune, in [0, 1].

  Returns:
    [channels] float32 mask: 0 for pruned channels, 1 for kept ones, to
    multiply the layer's output by.

  Raises:
    ValueError: order not a non-empty rank-1 integer array, or fraction
      outside [0, 1].
  """
  order = _check_order(order)
  fraction = _check_fraction(fraction)
  return _mask_for_count(order, _count(fraction, order.size))


class PruneResult(NamedTuple):
  """What `prune_until` chose.

  Attributes:
    mask: [channels] float32 keep-mask of the chosen pruning.
    num_pruned: channels pruned in it.
    accuracies: clean accuracy after pruning 0, step, 2 step, ... channels,
      up to and including the first pruning that dropped too far (if any).
    baseline: the accuracy with nothing pruned (accuracies[0]).
  """
  mask: Array
  num_pruned: int
  accuracies: tuple[float, ...]
  baseline: float


def prune_until(evaluate_fn: Callable[[Array], ArrayLike], order: ArrayLike, *,
                max_accuracy_drop: float, step: int = 1,
                max_fraction: Optional[float] = None) -> PruneResult:
  """Fine-pruning's pruning phase: prune least-active channels while accuracy holds.

  Prunes channels in `order`, `step` at a time, evaluating clean validation
  accuracy after each step; stops at the first pruning whose accuracy is
  more than `max_accuracy_drop` below the unpruned baseline and returns the
  last pruning before it (the paper prunes until validation accuracy falls
  by 4%). Nothing is pruned if even the first step drops too far.

  A host loop: `evaluate_fn` is any callable, typically a jitted function of
  the mask (one compilation for every step).

  Args:
    evaluate_fn: mask [channels] float32 -> scalar clean accuracy.
    order: [channels] pruning order (`pruning_order`).
    max_accuracy_drop: largest allowed drop below the baseline, in the
      units of evaluate_fn's accuracy (0.04 for 4 points on a [0, 1] scale); >= 0.
    step: channels pruned per evaluation, >= 1.
    max_fraction: never prune more than this share of channels (default:
      all but one channel).

  Returns:
    A `PruneResult`.

  Raises:
    ValueError: bad order or settings, or evaluate_fn not returning a
      finite number.
  """
  order = _check_order(order)
  drop = check_finite_scalar(max_accuracy_drop, "max_accuracy_drop")
  if drop < 0:
    raise ValueError(f"max_accuracy_drop must be >= 0, got {max_accuracy_drop!r}.")
  check_int_at_least(step, "step", 1)
  if not callable(evaluate_fn):
    raise TypeError(f"evaluate_fn must be a callable mask -> accuracy; got "
                    f"{type(evaluate_fn).__name__}.")
  channels = order.size
  limit = channels - 1 if max_fraction is None else _count(
      _check_fraction(max_fraction, "max_fraction"), channels)

  def evaluate(num_pruned: int) -> float:
    value = np.asarray(evaluate_fn(_mask_for_count(order, num_pruned)))
    if value.size != 1 or not np.isfinite(value).all():
      raise ValueError(f"evaluate_fn must return one finite accuracy; got {value!r} with "
                       f"{num_pruned} channels pruned.")
    return float(value.reshape(()))

  baseline = evaluate(0)
  accuracies, chosen = [baseline], 0
  for num_pruned in range(step, limit + 1, step):
    accuracy = evaluate(num_pruned)
    accuracies.append(accuracy)
    if baseline - accuracy > drop:
      break
    chosen = num_pruned
  return PruneResult(mask=_mask_for_count(order, chosen), num_pruned=chosen,
                     accuracies=tuple(accuracies), baseline=baseline)


# ----------------------------------------------------------- anti-backdoor learning


def _check_losses(losses: object, name: str) -> Array:
  shape = np.shape(losses)
  if len(shape) != 1:
    raise ValueError(f"{name} must be a rank-1 array of per-example losses; got shape "
                     f"{tuple(shape)}.")
  return jnp.asarray(losses)


def lga_loss(per_example_loss: ArrayLike, gamma: ArrayLike = 0.5, *,
             reduction: str = "example") -> Array:
  """ABL's local gradient ascent (LGA) loss for the isolation phase.

  With reduction='example' (the paper's Eq. 3): mean_i sign(l_i - gamma) l_i,
  so examples whose loss fell below gamma are pushed back up (gradient
  ascent) and the others down: clean examples hover around gamma while
  backdoor examples, learnt much faster, keep falling below it. With
  reduction='batch' (the authors' code, on the batch-mean loss L):
  sign(L - gamma) L. The sign is a constant for differentiation (its
  gradient is 0), so the gradient is +-dl/dtheta. Works under `jit`, `grad`
  and `vmap`; gamma may be traced.

  Args:
    per_example_loss: [B] per-example losses (e.g. cross-entropy).
    gamma: the loss threshold (0.5 in the paper).
    reduction: 'example' or 'batch'.

  Returns:
    The scalar loss to minimise.

  Raises:
    ValueError: losses not rank 1, or an unknown reduction.
  """
  losses = _check_losses(per_example_loss, "per_example_loss")
  check_choice(reduction, "reduction", LGA_REDUCTIONS)
  if reduction == "batch":
    mean = jnp.mean(losses)
    return jax.lax.stop_gradient(jnp.sign(mean - gamma)) * mean
  return jnp.mean(jax.lax.stop_gradient(jnp.sign(losses - gamma)) * losses)


class Isolation(NamedTuple):
  """ABL's isolated set (`isolate_lowest_loss`).

  Attributes:
    indices: [k] int32 indices of the k lowest losses, lowest first.
    is_isolated: [N] bool.
  """
  indices: Array
  is_isolated: Array


def isolate_lowest_loss(per_example_loss: ArrayLike, fraction: float) -> Isolation:
  """The ABL isolation set: the floor(fraction * N) examples of lowest loss.

  Pass the losses of every training example under the model after the LGA
  phase; the paper isolates 1% (fraction=0.01). Ties keep index order. (The
  authors' `backdoor_isolation.py` sorts the losses in decreasing order
  before taking the first fraction; we follow the paper: the lowest.)
  Works under `jit` and `vmap` (fraction is static: it sets the size).

  Args:
    per_example_loss: [N] losses.
    fraction: share to isolate, in [0, 1].

  Returns:
    An `Isolation`.

  Raises:
    ValueError: losses not rank 1, or fraction outside [0, 1].
  """
  losses = _check_losses(per_example_loss, "per_example_loss")
  fraction = _check_fraction(fraction)
  count = _count(fraction, losses.shape[0])
  indices = jnp.argsort(losses, stable=True)[:count].astype(jnp.int32)
  return Isolation(indices=indices,
                   is_isolated=jnp.zeros(losses.shape[0], bool).at[indices].set(True))


def unlearning_loss(isolated_per_example_loss: ArrayLike,
                    clean_per_example_loss: Optional[ArrayLike] = None) -> Array:
  """ABL's unlearning objective: descend on the clean set, ascend on the isolated one.

  mean(clean losses) - mean(isolated losses) (the paper's L_ABL after
  isolation); with no clean losses, -mean(isolated losses), the authors'
  code's pure gradient-ascent epochs on the isolated set. An empty batch
  contributes 0.

  Args:
    isolated_per_example_loss: [B_b] losses on examples of the isolated set.
    clean_per_example_loss: [B_c] losses on examples of the rest, or None.

  Returns:
    The scalar loss to minimise.

  Raises:
    ValueError: losses not rank 1.
  """
  isolated = _check_losses(isolated_per_example_loss, "isolated_per_example_loss")
  ascent = -jnp.mean(isolated) if isolated.size else jnp.zeros((), isolated.dtype)
  if clean_per_example_loss is None:
    return ascent
  clean = _check_losses(clean_per_example_loss, "clean_per_example_loss")
  return ascent + (jnp.mean(clean) if clean.size else jnp.zeros((), clean.dtype))
