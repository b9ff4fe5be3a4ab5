"""Backward Pass Differentiable Approximation (BPDA) of Athalye et al.

A defence that breaks gradients (a codec, rounding, a thermometer code) is
attacked by running it unchanged on the forward pass and differentiating a
smooth stand-in g with g(x) ~ f(x) on the backward pass. `bpda(f, g)` is that
function: the value of f, the derivatives of g. `bpda_transform` applies it
to an `InputTransform` (forward and approximation), and `bpda_logits_fn`
puts the result in front of a model, giving the adaptive attacker's
`(key, x) -> logits`. They compose with every attack in `certjax.attacks`:

    t = transforms.get_transform('bit_depth', bits=1)
    model = lambda x: bpda_logits_fn(logits_fn, t)(jax.random.key(0), x)
    x_adv = attacks.pgd(key, model, x, y, eps=0.3)       # deterministic t

    t = transforms.get_transform('tvm')
    model = eot.eot(bpda_logits_fn(logits_fn, t), num_samples=16)
    x_adv = attacks.pgd(key, model, x, y, eps=0.3)       # EOT + BPDA

the second being how Athalye et al. broke Guo et al.'s transformations and
Xie et al.'s randomisation.

Implementation: a `jax.custom_jvp` whose primal output is `forward(*args)`
and whose tangent is `jvp(backward)(*args)`. The straight-through form
`backward(x) + stop_gradient(forward(x) - backward(x))` has the same
gradient but its value is forward's only up to floating-point rounding (b +
(f - b) need not equal f: a bit-depth reduced pixel would move off its
grid), and a `custom_vjp` would leave the function without forward-mode
derivatives; the custom JVP gives forward's exact value and BPDA
derivatives in both modes (JAX transposes the JVP for `grad`).

References:
  Athalye, Carlini, Wagner. Obfuscated Gradients Give a False Sense of
    Security: Circumventing Defenses to Adversarial Examples. ICML 2018.
  Bengio, Leonard, Courville. Estimating or Propagating Gradients Through
    Stochastic Neurons for Conditional Computation. 2013 (straight-through).
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from certjax.types import Array, PRNGKey
from certjax.defences.transforms import InputTransform

__all__ = ["bpda", "bpda_logits_fn", "bpda_transform"]


def bpda(forward: Callable[..., Any], backward: Callable[..., Any]) -> Callable[..., Any]:
  """The value of `forward`, the derivatives of `backward`.

  Args:
    forward: the function as deployed (possibly non-differentiable).
    backward: a differentiable approximation with the same signature and
      output structure (shapes and dtypes).

  Returns:
    A function of the same arguments returning exactly `forward(*args)`, whose
    JVPs and VJPs are those of `backward` at `args`. Arguments without
    derivatives (PRNG keys, integers) get float0 tangents as usual.
  """
  if not callable(forward) or not callable(backward):
    raise TypeError("bpda takes two callables: forward and backward.")

  @jax.custom_jvp
  def approximated(*args):
    return forward(*args)

  @approximated.defjvp
  def approximated_jvp(primals, tangents):
    _, tangent = jax.jvp(backward, primals, tangents)
    return forward(*primals), tangent

  return approximated


def bpda_transform(transform: InputTransform) -> InputTransform:
  """`transform` with its forward values and its approximation's derivatives.

  The name becomes 'bpda(<name>)'; `randomized` and the channel factor are
  kept (a randomized transform still needs EOT). Forward and approximation
  receive the same key.
  """
  if not isinstance(transform, InputTransform):
    raise TypeError(f"bpda_transform takes an InputTransform (see "
                    f"certjax.defences.transforms.get_transform); got "
                    f"{type(transform).__name__}.")
  return transform._replace(name=f"bpda({transform.name})",
                            forward=bpda(transform.forward, transform.approximation))


def bpda_logits_fn(logits_fn: Callable[[Array], Array], transform: InputTransform
                   ) -> Callable[[PRNGKey, Array], Array]:
  """The adaptive attacker's view of a defended model: `(key, x) -> logits`.

  Values are those of `logits_fn(transform.forward(key, x))`; gradients pass
  through `transform.approximation` at x. For a deterministic transform fix
  the key (`lambda x: f(key, x)`) to get a plain `logits_fn`; for a
  randomized one average over keys with `certjax.attacks.eot.eot`.
  """
  if not callable(logits_fn):
    raise TypeError("logits_fn must be a callable x -> logits.")
  forward = bpda_transform(transform).forward

  def defended(key: PRNGKey, x: Array) -> Array:
    return logits_fn(forward(key, x))

  return defended
