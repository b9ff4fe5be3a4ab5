"""Verified accuracy: the fraction of inputs certified robust in an L-inf ball.

Bounds are computed with float32 products (`Precision.HIGHEST`) whatever the
default precision, and so is the clean prediction. `sound_rounding=True`
makes the certificate hold for the float32 network itself, not only in exact
arithmetic: the ball is rounded outward and every bound with it (see
`ibp.ibp` and `linear` for what is and is not covered).

References:
  Gowal et al. 2018, https://arxiv.org/abs/1810.12715 (IBP verified accuracy).
  Zhang et al. 2020, https://arxiv.org/abs/1906.06316 (CROWN-IBP).
  Jia & Rinard 2021, "Exploiting Verified Neural Networks via Floating Point
  Numerical Error", https://arxiv.org/abs/2003.03021 (why sound_rounding).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from certjax import validation
from certjax.bounds import linear
from certjax.bounds.interval import linf_ball
from certjax.types import Array, ArrayLike

METHODS = ("ibp", "crown_ibp", "crown")


class VerifiedAccuracy(NamedTuple):
  """Result of `verified_accuracy`.

  Attributes:
    accuracy: scalar, fraction of examples verified.
    verified: (batch,) bool, correctly classified at x and every margin lower
      bound z_y - z_j > 0 over the ball.
    margin_lower: (batch, num_classes - 1) lower bounds of the margins.
  """
  accuracy: Array
  verified: Array
  margin_lower: Array


def margin_lower_bounds(logits_fn: Callable[[Array], Array], x: Array, y: Array, eps,
                        method: str = "ibp", sound_rounding: bool = False) -> Array:
  """Lower bounds of z_y - z_j (j != y) over the eps L-inf ball (no input checks).

  'ibp' is IBP with the last layer elided. 'crown_ibp' and 'crown' return the
  elementwise max of their linear bound and the elided IBP bound: both are
  sound, so the max is sound, and it is never looser than IBP. (The raw
  linear bound can be looser than IBP on some networks, notably IBP-trained
  ones, because the linear relaxation of an unstable ReLU is not always
  tighter than its interval; the raw bounds stay available as
  `linear.crown_ibp` / `linear.crown`, and certified training mixes the raw
  CROWN-IBP bound in as Zhang et al. do.) Works under jit/grad/vmap, except
  that `sound_rounding=True` (bounds that hold for the float32 network, see
  the module doc) is not differentiable.
  """
  validation.check_choice(method, "method", METHODS)
  sound_rounding = bool(sound_rounding)
  box = linf_ball(x, eps, sound_rounding=sound_rounding)
  ibp_lower = linear.ibp_margins(logits_fn, box, y, sound_rounding=sound_rounding).lower
  if method == "ibp":
    return ibp_lower
  num_classes = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(x.shape, x.dtype)).shape[-1]
  spec = linear.margin_spec(y, num_classes)
  bound = linear.crown_ibp if method == "crown_ibp" else linear.crown
  return jnp.maximum(bound(logits_fn, box, spec, upper=False,
                           sound_rounding=sound_rounding).lower, ibp_lower)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _verified(logits_fn, x, y, eps, method, sound_rounding):
  lower = margin_lower_bounds(logits_fn, x, y, eps, method, sound_rounding)
  with jax.default_matmul_precision("float32"):  # the prediction the bounds are about
    correct = jnp.argmax(logits_fn(x), axis=-1) == y
  verified = correct & jnp.all(lower > 0, axis=-1)
  return VerifiedAccuracy(jnp.mean(verified), verified, lower)


def verified_accuracy(logits_fn: Callable[[Array], Array], x: ArrayLike, y: ArrayLike,
                      eps: float, method: str = "ibp",
                      sound_rounding: bool = False) -> VerifiedAccuracy:
  """Fraction of examples whose prediction is provably constant on the eps-ball.

  An example counts as verified when it is correctly classified at `x` and the
  lower bound of every margin z_y - z_j (j != y) over
  {x' : |x' - x|_inf <= eps} intersected with [0, 1] is positive.

  Args:
    logits_fn: pure function from a batch of NHWC images in [0, 1] to logits.
    x: (batch, height, width, channels) float images in [0, 1].
    y: (batch,) integer labels.
    eps: L-inf radius in [0, 1] pixel space, >= 0.
    method: 'ibp' (last layer elided), 'crown_ibp' or 'crown' (full CROWN:
      small networks only); the last two are combined with IBP by an
      elementwise max, so they never verify fewer examples than 'ibp'
      (see `margin_lower_bounds`).
    sound_rounding: True rounds the ball and every bound outward, so that a
      verified example is robust for the float32 network (evaluated at full
      precision) and not only in exact arithmetic; see `ibp.ibp` for what
      is covered. Slower (see benchmarks/bounds.py) and not differentiable.

  Returns:
    `VerifiedAccuracy(accuracy, verified, margin_lower)`.

  Raises:
    ValueError: bad shapes or values, negative eps, unknown method.

  References:
    Gowal et al. 2018, https://arxiv.org/abs/1810.12715;
    Zhang et al. 2020, https://arxiv.org/abs/1906.06316;
    Jia & Rinard 2021, https://arxiv.org/abs/2003.03021 (sound_rounding).
  """
  validation.check_choice(method, "method", METHODS)
  validation.check_positive(eps, "eps", allow_zero=True)
  validation.check_images(x, name="x")
  x = jnp.asarray(x)
  logits = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(x.shape, x.dtype))
  if len(logits.shape) != 2 or logits.shape[0] != x.shape[0]:
    raise ValueError(f"logits_fn must map a batch of {x.shape[0]} images to logits of shape "
                     f"({x.shape[0]}, num_classes); got {logits.shape}.")
  validation.check_labels(y, num_classes=logits.shape[1], batch_size=x.shape[0], name="y")
  args = (x, jnp.asarray(y), jnp.asarray(eps, x.dtype))
  try:
    hash(logits_fn)
  except TypeError:  # a static argument must be hashable; a partial is (by identity)
    logits_fn = functools.partial(logits_fn)
  return _verified(logits_fn, *args, method, bool(sound_rounding))
