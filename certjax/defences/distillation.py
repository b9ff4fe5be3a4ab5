"""Defensive distillation: the targets and the loss of training at temperature T.

Papernot et al. train a teacher with a softmax at temperature T
(`softmax(z / T)`) on the hard labels, label the training set with the
teacher's temperature-T probabilities, train a student of the same
architecture at the same T on those soft labels, and deploy the student at
T = 1. The deployed logits are then about T times larger than a normally
trained network's: its softmax saturates, so the cross-entropy gradient an
attacker computes in float32 is exactly zero on most inputs. That is gradient
masking, not robustness: Carlini & Wagner's margin loss on the logits
(`certjax.attacks.cw_linf`, or PGD with `loss='cw'`) ignores the softmax and
succeeds as often as on an undefended network.

The training objective that uses these pieces is
`certjax.training.objectives.distillation` ('distillation'): without a
teacher workdir it trains a teacher at T on hard labels; with one it trains
the student on the teacher's soft labels of each batch.

References:
  Papernot, McDaniel, Wu, Jha, Swami. Distillation as a Defense to
    Adversarial Perturbations against Deep Neural Networks. IEEE S&P 2016.
  Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. 2015.
  Carlini, Wagner. Defensive Distillation is Not Robust to Adversarial
    Examples. 2016; Towards Evaluating the Robustness of Neural Networks.
    IEEE S&P 2017.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from certjax.types import Array, ArrayLike


def check_temperature(temperature: Any, name: str = "temperature") -> float:
  """`temperature` as a float; a non-finite or non-positive one is an error."""
  try:
    value = float(temperature)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number > 0; got {temperature!r}.") from None
  if not math.isfinite(value) or value <= 0:
    raise ValueError(f"{name} must be a finite number > 0; got {temperature!r}.")
  return value


def soft_labels(teacher_logits: ArrayLike, temperature: float) -> Array:
  """The teacher's probabilities at temperature T, `softmax(z / T)` (float32)."""
  temperature = check_temperature(temperature)
  return jax.nn.softmax(jnp.asarray(teacher_logits, jnp.float32) / temperature, axis=-1)


def distillation_loss(student_logits: ArrayLike, targets: ArrayLike,
                      temperature: float) -> Array:
  """Mean cross-entropy of `softmax(student_logits / T)` against target probabilities.

  With one-hot targets this is the teacher's training loss at temperature T;
  with `soft_labels(teacher_logits, T)` the student's. Papernot et al. use
  no T^2 factor (Hinton et al.'s factor balances a soft and a hard term,
  and distillation here has only the soft one).

  Args:
    student_logits: [B, C] logits.
    targets: [B, C] probabilities (rows summing to 1).
    temperature: T > 0.

  Returns:
    The scalar mean loss.
  """
  temperature = check_temperature(temperature)
  student_logits = jnp.asarray(student_logits, jnp.float32)
  targets = jnp.asarray(targets, jnp.float32)
  if student_logits.shape != targets.shape:
    raise ValueError(f"student_logits {student_logits.shape} and targets {targets.shape} "
                     "must have the same shape [batch, classes].")
  log_probs = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  return -jnp.mean(jnp.sum(targets * log_probs, axis=-1))
