"""Per-example attack objectives, all to be MAXIMISED by the attacker.

Each loss has the signature `loss(logits, labels, target=None) -> (batch,)`.
`labels` are the true classes. Without `target` the loss is untargeted (large
when the true class loses); with `target` (shape (batch,)) it is targeted
(large when the target class wins). The number of classes is read from
`logits.shape[-1]`; nothing is hard-coded.

References:
  Carlini, Wagner. Towards Evaluating the Robustness of Neural Networks.
    IEEE S&P 2017 (margin loss).
  Croce, Hein. Reliable Evaluation of Adversarial Robustness with an Ensemble
    of Diverse Parameter-free Attacks. ICML 2020 (DLR and targeted DLR).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

from certjax.types import Array, ArrayLike
from certjax.validation import check_choice

LossFn = Callable[..., Array]
# A loss by name ('ce', 'cw', 'dlr') or a callable (logits, labels, target=None) -> (batch,).
Loss = Union[str, LossFn]

_TINY = 1e-12


def _pick(logits: Array, labels: Array) -> Array:
  return jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def _max_other(logits: Array, labels: Array) -> Array:
  """Largest logit among the classes other than `labels`."""
  own = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  return jnp.max(jnp.where(own, -jnp.inf, logits), axis=-1)


def cross_entropy(logits: ArrayLike, labels: ArrayLike,
                  target: Optional[ArrayLike] = None) -> Array:
  """CE(logits, labels) untargeted; -CE(logits, target) targeted."""
  logits = jnp.asarray(logits)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  if target is None:
    return -_pick(log_probs, jnp.asarray(labels))
  return _pick(log_probs, jnp.asarray(target))


def cw_margin(logits: ArrayLike, labels: ArrayLike,
              target: Optional[ArrayLike] = None, *,
              confidence: float = jnp.inf) -> Array:
  """Carlini-Wagner margin: max_{j != y} z_j - z_y (targeted: z_t - max_{j != t} z_j).

  Positive exactly when the attack succeeds. `confidence` (kappa) caps the
  loss so an attacker stops pushing once the margin exceeds it.
  """
  logits = jnp.asarray(logits)
  if target is None:
    labels = jnp.asarray(labels)
    margin = _max_other(logits, labels) - _pick(logits, labels)
  else:
    target = jnp.asarray(target)
    margin = _pick(logits, target) - _max_other(logits, target)
  return jnp.minimum(margin, confidence)


def dlr(logits: ArrayLike, labels: ArrayLike,
        target: Optional[ArrayLike] = None) -> Array:
  """Difference of Logits Ratio loss (Croce & Hein 2020).

  Untargeted: -(z_y - max_{j != y} z_j) / (z_(1) - z_(3)), with z_(k) the k-th
  largest logit; needs at least 3 classes. Targeted:
  -(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2); needs at least 4 classes.
  Both are invariant to shifting and rescaling the logits.
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  num_classes = logits.shape[-1]
  needed = 3 if target is None else 4
  if num_classes < needed:
    kind = "untargeted" if target is None else "targeted"
    raise ValueError(
        f"The {kind} DLR loss needs at least {needed} classes; the logits have "
        f"{num_classes}. Use loss='ce' or 'cw' instead.")
  top = jax.lax.top_k(logits, needed)[0]
  true_logit = _pick(logits, labels)
  if target is None:
    return -(true_logit - _max_other(logits, labels)) / (top[:, 0] - top[:, 2] + _TINY)
  scale = top[:, 0] - 0.5 * (top[:, 2] + top[:, 3])
  return -(true_logit - _pick(logits, jnp.asarray(target))) / (scale + _TINY)


LOSSES = {"ce": cross_entropy, "cw": cw_margin, "dlr": dlr}


def get_loss(name: Loss) -> LossFn:
  """Looks a loss up by name ('ce', 'cw' or 'dlr'); a callable is returned as is.

  A custom loss must have the signature `loss(logits, labels, target=None) ->
  (batch,)` and be maximised by the attacker.
  """
  if callable(name):
    return name
  return LOSSES[check_choice(name, "loss", tuple(LOSSES))]


def loss_name(loss: Loss) -> str:
  """A short name for a loss, for attack names and result tables.

  A loss given by name is its own name; a callable gives its `__name__`
  ('custom' when it has none, e.g. a `functools.partial`).
  """
  return loss if isinstance(loss, str) else getattr(loss, "__name__", "custom")


def is_successful(logits: ArrayLike, labels: ArrayLike,
                  target: Optional[ArrayLike] = None) -> Array:
  """Per-example attack success: misclassified (untargeted) or predicted as target."""
  prediction = jnp.argmax(jnp.asarray(logits), axis=-1)
  if target is None:
    return prediction != jnp.asarray(labels)
  return prediction == jnp.asarray(target)
