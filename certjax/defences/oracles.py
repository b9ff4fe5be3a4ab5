"""Gradient oracles of a deployed defence: the naive attacker's and the adaptive attacker's.

Every attack in `certjax.attacks` reaches a model through a gradient oracle
(`logits(key, x)`, `value_and_grad(key, x, loss_fn)`; see
`certjax.attacks.core`). A defence is judged by what the *deployed* system
predicts, whatever gradients the attacker follows, so a `DefenceOracle`
keeps the two apart: its predictions are one forward pass of the defence as
deployed, its gradients come from another oracle:

  naive_oracle     the defence as written: autodiff through its forward pass
                   (zero through a codec or a quantiser; one random draw per
                   step for a randomised defence);
  adaptive_oracle  BPDA's differentiable stand-in for the backward pass and,
                   for a randomised defence, the mean gradient over
                   `num_samples` draws (EOT), as Athalye et al. attack Guo et
                   al.'s and Xie et al.'s defences.

References:
  Athalye, Carlini, Wagner. Obfuscated Gradients Give a False Sense of
    Security: Circumventing Defenses to Adversarial Examples. ICML 2018.
"""

from __future__ import annotations

from typing import Callable, Tuple

import jax

from certjax.attacks.core import GradientOracle, LossOfLogits, per_example_value_and_grad
from certjax.attacks.eot import EOT
from certjax.types import Array, PRNGKey
from certjax.validation import check_int_at_least

RandomizedLogitsFn = Callable[[PRNGKey, Array], Array]


class DefenceOracle:
  """Predictions of the deployed defence, gradients of another oracle.

  Attributes:
    predict: `(key, x) -> logits` of the deployed system (one draw of a
      randomised defence).
    gradient: the oracle whose `value_and_grad` the attacker follows.
  """

  def __init__(self, predict: RandomizedLogitsFn, gradient: GradientOracle):
    if not callable(predict):
      raise TypeError("predict must be a callable (key, x) -> logits.")
    if not (hasattr(gradient, "logits") and hasattr(gradient, "value_and_grad")):
      raise TypeError("gradient must be a gradient oracle (logits and value_and_grad).")
    self.predict = predict
    self.gradient = gradient

  def logits(self, key: PRNGKey, x: Array) -> Array:
    return self.predict(key, x)

  def value_and_grad(self, key: PRNGKey, x: Array,
                     loss_fn: LossOfLogits) -> Tuple[Array, Array, Array]:
    return self.gradient.value_and_grad(key, x, loss_fn)


class _OneDraw:
  """The gradient oracle of one draw of a randomised logits function per call."""

  def __init__(self, rand_logits_fn: RandomizedLogitsFn):
    self.rand_logits_fn = rand_logits_fn

  def logits(self, key: PRNGKey, x: Array) -> Array:
    return self.rand_logits_fn(key, x)

  def value_and_grad(self, key: PRNGKey, x: Array, loss_fn: LossOfLogits):
    return per_example_value_and_grad(lambda inputs: self.rand_logits_fn(key, inputs), x,
                                      loss_fn)


def naive_oracle(deployed: RandomizedLogitsFn) -> DefenceOracle:
  """The defence as written: predictions and gradients of the same forward pass.

  Args:
    deployed: `(key, x) -> logits` of the defended model; the key draws a
      randomised defence's randomness (ignored by a deterministic one).
  """
  return DefenceOracle(deployed, _OneDraw(deployed))


def adaptive_oracle(deployed: RandomizedLogitsFn, approximated: RandomizedLogitsFn, *,
                    randomized: bool, num_samples: int = 1, chunk_size: int = 1
                    ) -> DefenceOracle:
  """Predictions of `deployed`, gradients of `approximated` (BPDA), averaged over draws (EOT).

  Args:
    deployed: `(key, x) -> logits` of the defended model.
    approximated: `(key, x) -> logits` with the same values where it matters
      and a useful gradient (e.g. `certjax.defences.bpda.bpda_logits_fn`).
    randomized: whether the defence draws randomness; then `num_samples`
      draws are averaged per gradient (EOT).
    num_samples: EOT draws (must be 1 for a deterministic defence).
    chunk_size: draws evaluated together with `vmap`.
  """
  num_samples = check_int_at_least(num_samples, "num_samples", 1)
  if not randomized:
    return DefenceOracle(deployed, _OneDraw(approximated))
  return DefenceOracle(deployed, EOT(approximated, num_samples, chunk_size))


def fixed_key(rand_logits_fn: RandomizedLogitsFn, seed: int = 0) -> Callable[[Array], Array]:
  """A plain `logits_fn(x)` of a deterministic `(key, x) -> logits` (the key is fixed)."""
  key = jax.random.key(seed)
  return lambda x: rand_logits_fn(key, x)
