"""Expectation over Transformation (EOT) for randomized models and defences.

Design: every attack in `certjax.attacks` reaches the model through a
*gradient oracle* (see `certjax.attacks.core`): an object with
`logits(key, x)` and `value_and_grad(key, x, loss_fn)`. A plain `logits_fn` is
wrapped as a deterministic oracle; the objects built here average over random
draws instead, so EOT composes with FGSM, PGD, MI-FGSM, APGD and Square without
any attack knowing about it:

    model = eot.eot(rand_logits_fn, num_samples=16)        # rand_logits_fn(key, x)
    model = eot.eot_transform(logits_fn, transform, 16)    # transform(key, x)
    x_adv = pgd(key, model, x, y, eps=8 / 255)

`value_and_grad` returns the mean over the samples of the per-example loss,
of the logits and of the gradient. Because differentiation is linear, the
mean gradient is the gradient of the mean loss, which is what Athalye et al.
optimise; it is NOT the gradient of the loss of the mean logits. Attack
success is judged on the mean logits. Samples are drawn with keys
`fold_in(key, i)` and accumulated in a `lax.scan`, so memory does not grow with
`num_samples`; `chunk_size` > 1 evaluates that many samples at once with
`vmap` (faster on accelerators, `chunk_size` times the memory).

Checks: the constructors check their settings (num_samples, chunk_size,
callables) when called. The oracles check nothing about the images they are
given: the attack using them does, eagerly, and under `jit`/`vmap` with its
`checked=True` (see `certjax.attacks.core`).

References:
  Athalye, Engstrom, Ilyas, Kwok. Synthesizing Robust Adversarial Examples.
    ICML 2018.
  Athalye, Carlini, Wagner. Obfuscated Gradients Give a False Sense of
    Security. ICML 2018.
"""

from __future__ import annotations

from typing import Callable, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from certjax.types import Array, ArrayLike, PRNGKey
from certjax.validation import check_int_at_least
from certjax.attacks.core import LossOfLogits, per_example_value_and_grad

RandomizedLogitsFn = Callable[[PRNGKey, Array], Array]
Transform = Callable[[PRNGKey, Array], Array]


class EOT:
  """Gradient oracle averaging a randomized logits function over samples.

  Attributes:
    rand_logits_fn: `(key, x) -> logits`, random in `key`.
    num_samples: number of draws averaged per call.
    chunk_size: draws evaluated together with `vmap`; must divide num_samples.
  """

  def __init__(self, rand_logits_fn: RandomizedLogitsFn, num_samples: int,
               chunk_size: int = 1):
    if not callable(rand_logits_fn):
      raise TypeError("rand_logits_fn must be a callable (key, x) -> logits.")
    self.rand_logits_fn = rand_logits_fn
    self.num_samples = check_int_at_least(num_samples, "num_samples", 1)
    self.chunk_size = check_int_at_least(chunk_size, "chunk_size", 1)
    if self.num_samples % self.chunk_size:
      raise ValueError(
          f"chunk_size ({chunk_size}) must divide num_samples ({num_samples}).")

  def _mean_over_samples(self, key: PRNGKey, one_sample: Callable[[PRNGKey], Tuple]):
    num_chunks = self.num_samples // self.chunk_size

    def chunk(i):
      keys = jax.vmap(lambda j: jax.random.fold_in(key, i * self.chunk_size + j))(
          jnp.arange(self.chunk_size))
      return jax.tree.map(lambda v: jnp.sum(v, axis=0), jax.vmap(one_sample)(keys))

    def body(total, i):
      return jax.tree.map(jnp.add, total, chunk(i)), None

    first = chunk(0)
    if num_chunks > 1:
      first, _ = lax.scan(body, first, jnp.arange(1, num_chunks))
    return jax.tree.map(lambda v: v / self.num_samples, first)

  def logits(self, key: PRNGKey, x: Array) -> Array:
    """Mean logits over `num_samples` draws."""
    return self._mean_over_samples(key, lambda k: self.rand_logits_fn(k, x))

  def value_and_grad(self, key: PRNGKey, x: Array,
                     loss_fn: LossOfLogits) -> Tuple[Array, Array, Array]:
    """Mean per-example loss, mean logits and mean gradient over the draws."""
    def one_sample(k):
      return per_example_value_and_grad(lambda inputs: self.rand_logits_fn(k, inputs),
                                        x, loss_fn)
    return self._mean_over_samples(key, one_sample)


def eot(rand_logits_fn: RandomizedLogitsFn, num_samples: int, *,
        chunk_size: int = 1) -> EOT:
  """EOT oracle for a randomized model `rand_logits_fn(key, x) -> logits`."""
  return EOT(rand_logits_fn, num_samples, chunk_size)


def eot_transform(logits_fn: Callable[[Array], Array], transform: Transform,
                  num_samples: int, *, chunk_size: int = 1) -> EOT:
  """EOT oracle for a deterministic model behind a random input transformation.

  Args:
    logits_fn: the model, x -> logits.
    transform: a differentiable random transformation `(key, x) -> x'`
      (noise, crops, JPEG approximations, ...).
    num_samples: draws averaged per gradient.
    chunk_size: draws evaluated together with `vmap`.
  """
  if not callable(transform):
    raise TypeError("transform must be a callable (key, x) -> transformed x.")
  return EOT(lambda key, x: logits_fn(transform(key, x)), num_samples, chunk_size)


def eot_gradient(key: PRNGKey, rand_logits_fn: RandomizedLogitsFn, x: ArrayLike,
                 loss_fn: LossOfLogits, num_samples: int) -> Array:
  """Expectation-over-Transformation gradient of a per-example loss.

  `x` is not checked (it need not be an image); `num_samples` is.

  Args:
    key: a `jax.random.key`.
    rand_logits_fn: `(key, x) -> logits`.
    x: batch of inputs.
    loss_fn: `logits -> (batch,)` per-example loss.
    num_samples: number of draws averaged.

  Returns:
    The mean over draws of d loss_i / d x_i, shaped like `x`.
  """
  return EOT(rand_logits_fn, num_samples).value_and_grad(key, jnp.asarray(x), loss_fn)[2]
