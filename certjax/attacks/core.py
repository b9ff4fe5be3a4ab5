"""Shared plumbing of the attacks: gradient oracles, input checks, attack binding.

Gradient oracles. Attacks never call a model directly. They go through a
*gradient oracle*, an object with two methods:

  oracle.logits(key, x) -> logits                      (batch, classes)
  oracle.value_and_grad(key, x, loss_fn) -> (loss, logits, grad)

where `loss_fn(logits) -> (batch,)` is the per-example objective the attack
maximises and `grad` is d(loss_i)/d(x_i) for every example. A plain
`logits_fn` (x -> logits) is wrapped as a deterministic oracle that ignores the
key. `certjax.attacks.eot` provides Expectation-over-Transformation oracles
for randomized models; anything with the same two methods (BPDA, a
straight-through estimator, a finite-difference estimator) composes with every
attack in this package in the same way.

Input checks. Every public attack calls `validate_inputs` before any work:

* always (eager or traced): shapes and dtypes of x, y, target and eps, the
  logits' shape, and the static settings (norm, loss, step counts, ...);
* eager calls only: the values (x finite and in [0, 1], eps finite and >= 0,
  labels in range, step sizes > 0), read with NumPy;
* under `jit`/`vmap` with `checked=True`: the same value checks inside the
  compiled program, as `jax.experimental.checkify` checks. Run the
  transformed function through `checked` (or `checkify.checkify`) to raise a
  failed one:

      run = jax.jit(lambda key, x, y, eps: pgd(key, model, x, y, eps=eps,
                                               checked=True))
      x_adv = checked(run)(key, x, y, eps)   # ValueError on NaN, eps < 0, ...

  With `checked=False` (the default) no check is added to the program, so the
  unchecked path costs nothing; calling a `checked=True` attack under `jit`
  without `checkify` fails at trace time.

Attack binding. The `make_*` factories validate a configuration once and
return an `AttackFn`, `attack_fn(key, logits_fn, x, y, eps) -> x_adv`, built
with `bind_attack`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from certjax.types import Array, ArrayLike, PRNGKey
from certjax.validation import (check_choice, check_images, check_labels, check_positive,
                                checked, checkify_images, checkify_labels,
                                checkify_positive)
from certjax.attacks.norms import NORMS

__all__ = [
    "AttackFn", "DeterministicOracle", "GradientOracle", "LossOfLogits", "as_oracle",
    "bind_attack", "check_positive_arg", "check_step_size", "checked", "logits_shape",
    "per_example_value_and_grad", "validate_inputs",
]

LossOfLogits = Callable[[Array], Array]
# attack_fn(key, logits_fn, x, y, eps) -> x_adv, the form robust_accuracy takes.
AttackFn = Callable[[PRNGKey, Any, ArrayLike, ArrayLike, ArrayLike], Array]


class GradientOracle(Protocol):
  """What attacks need from a model; see the module docstring."""

  def logits(self, key: PRNGKey, x: Array) -> Array:
    ...

  def value_and_grad(self, key: PRNGKey, x: Array,
                     loss_fn: LossOfLogits) -> Tuple[Array, Array, Array]:
    ...


def per_example_value_and_grad(logits_fn: Callable[[Array], Array], x: Array,
                               loss_fn: LossOfLogits) -> Tuple[Array, Array, Array]:
  """(loss, logits, d loss_i / d x_i) through one forward and one backward pass.

  The gradient of the summed loss equals the per-example gradients as long as
  the model treats examples independently (true for inference-mode models;
  false for batch norm in training mode).

  Args:
    logits_fn: x -> logits.
    x: batch of inputs.
    loss_fn: logits -> (batch,) per-example loss.

  Returns:
    (loss (batch,), logits, gradient shaped like `x`).
  """
  def total(inputs):
    logits = logits_fn(inputs)
    loss = loss_fn(logits)
    return jnp.sum(loss), (loss, logits)

  grad, (loss, logits) = jax.grad(total, has_aux=True)(x)
  return loss, logits, grad


class DeterministicOracle:
  """Gradient oracle of a plain `logits_fn`; the key is ignored."""

  def __init__(self, logits_fn: Callable[[Array], Array]):
    self.logits_fn = logits_fn

  def logits(self, key: PRNGKey, x: Array) -> Array:
    del key
    return self.logits_fn(x)

  def value_and_grad(self, key: PRNGKey, x: Array, loss_fn: LossOfLogits):
    del key
    return per_example_value_and_grad(self.logits_fn, x, loss_fn)


def as_oracle(model: Any) -> GradientOracle:
  """A gradient oracle for `model`: returned as is if it already is one.

  Raises:
    TypeError: if `model` is neither an oracle nor callable.
  """
  if hasattr(model, "value_and_grad") and hasattr(model, "logits"):
    return model
  if not callable(model):
    raise TypeError(
        "logits_fn must be a callable mapping a batch of images to logits, or a "
        f"gradient oracle such as certjax.attacks.eot.eot(...); got {type(model).__name__}.")
  return DeterministicOracle(model)


def logits_shape(oracle: GradientOracle, x: Any) -> Tuple[int, ...]:
  """Shape of the logits for `x` without running the model (abstract evaluation)."""
  spec = jax.ShapeDtypeStruct(np.shape(x), getattr(x, "dtype", jnp.float32))
  out = jax.eval_shape(lambda inputs: oracle.logits(jax.random.key(0), inputs), spec)
  return tuple(out.shape)


def check_positive_arg(value: Any, name: str, *, allow_zero: bool = False,
                       checked: bool = False) -> None:
  """`check_positive` eagerly; with `checked`, also as a checkify check when traced."""
  check_positive(value, name, allow_zero=allow_zero)
  if checked:
    checkify_positive(value, name, allow_zero=allow_zero)


def validate_inputs(oracle: GradientOracle, x: Any, y: Any, *, eps: Any = None,
                    norm: Optional[str] = None, target: Any = None,
                    name: str = "attack", checked: bool = False) -> int:
  """Validates a public attack call and returns the number of classes.

  Shape and dtype checks always run; value checks (NaN/Inf, [0, 1] range,
  label range, eps >= 0) run on concrete inputs, and on traced ones as
  `checkify` checks when `checked` (see the module docstring).

  Args:
    oracle: the model's gradient oracle.
    x: clean images (batch, H, W, C).
    y: true labels (batch,).
    eps: radius, scalar or (batch,), or None if the attack has none.
    norm: the norm, checked against `NORMS`, or None.
    target: optional target labels (batch,).
    name: the attack's name, used in error messages.
    checked: also check traced values with `checkify`.

  Returns:
    The number of classes of the model.

  Raises:
    ValueError: naming the argument, the problem and the accepted values.
  """
  if norm is not None:
    check_choice(norm, "norm", NORMS)
  if eps is not None:
    check_positive_arg(eps, "eps", allow_zero=True, checked=checked)
    eps_shape = np.shape(eps)
    if eps_shape not in ((), (np.shape(x)[0],)):
      raise ValueError(
          f"eps must be a scalar or have one value per example (shape "
          f"({np.shape(x)[0]},)); got shape {eps_shape}.")
  check_images(x)
  if checked:
    checkify_images(x)
  batch = np.shape(x)[0]
  out_shape = logits_shape(oracle, x)
  if len(out_shape) != 2 or out_shape[0] != batch:
    raise ValueError(
        f"{name}: logits_fn must map a batch of {batch} images to logits of shape "
        f"({batch}, num_classes); got {out_shape}.")
  num_classes = out_shape[1]
  if num_classes < 2:
    raise ValueError(f"{name}: the model must have at least 2 classes; got {num_classes}.")
  for labels, label_name in ((y, "y"), (target, "target")):
    if labels is None:
      continue
    check_labels(labels, num_classes=num_classes, batch_size=batch, name=label_name)
    if checked:
      checkify_labels(labels, num_classes=num_classes, name=label_name)
  return num_classes


def check_step_size(step_size: Any, rel_step_size: Any, *, checked: bool = False) -> None:
  """Checks that at most one of step_size / rel_step_size is given, and is > 0.

  Args:
    step_size: absolute step size, or None.
    rel_step_size: step size as a fraction of eps, or None.
    checked: also check traced values with `checkify`.

  Raises:
    ValueError: if both are given or one is not a finite number > 0.
  """
  if step_size is not None and rel_step_size is not None:
    raise ValueError(
        "Give either step_size (absolute, in pixel units) or rel_step_size "
        f"(a fraction of eps), not both; got step_size={step_size!r}, "
        f"rel_step_size={rel_step_size!r}.")
  if step_size is not None:
    check_positive_arg(step_size, "step_size", checked=checked)
  if rel_step_size is not None:
    check_positive_arg(rel_step_size, "rel_step_size", checked=checked)


def bind_attack(attack: Callable[..., Array], name: str, **config: Any) -> AttackFn:
  """Binds an attack's keyword configuration into an `AttackFn`.

  Args:
    attack: `attack(key, logits_fn, x, y, *, eps, **config) -> x_adv`.
    name: the returned function's `__name__` (shown in result tables).
    **config: keyword arguments passed to every call.

  Returns:
    `attack_fn(key, logits_fn, x, y, eps)`, with the configuration readable
    as `attack_fn.config` (a dict).
  """
  def attack_fn(key, logits_fn, x, y, eps):
    return attack(key, logits_fn, x, y, eps=eps, **config)
  attack_fn.__name__ = name
  attack_fn.__qualname__ = name
  attack_fn.config = dict(config)
  return attack_fn
