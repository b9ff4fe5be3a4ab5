"""The `Interval` pytree: elementwise lower and upper bounds.

An `Interval` is an immutable NamedTuple, so it is a pytree that passes through
`jit`, `vmap`, `grad` and sharding unchanged; unlike jax_verify's bound objects
it is never mutated. Validation of concrete values happens in the public entry
points (`check_interval`, `linf_ball`), not in the constructor, because JAX
rebuilds pytrees with tracers and placeholder leaves.

References:
  Gowal et al. 2018, "On the Effectiveness of Interval Bound Propagation for
  Training Verifiably Robust Models", https://arxiv.org/abs/1810.12715.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from certjax import validation
from certjax.types import Array, ArrayLike


class Interval(NamedTuple):
  """Elementwise bounds `lower <= x <= upper` on an array `x`.

  Attributes:
    lower: array of lower bounds.
    upper: array of upper bounds, same shape as `lower`.
  """
  lower: Array
  upper: Array

  @property
  def center(self) -> Array:
    """Midpoint `(lower + upper) / 2`."""
    return (self.lower + self.upper) / 2

  @property
  def radius(self) -> Array:
    """Half width `(upper - lower) / 2` (non-negative for a valid interval)."""
    return (self.upper - self.lower) / 2

  @property
  def shape(self) -> tuple[int, ...]:
    return jnp.shape(self.lower)

  @property
  def dtype(self) -> Any:
    return jnp.result_type(self.lower)

  @classmethod
  def from_center_radius(cls, center: ArrayLike, radius: ArrayLike) -> "Interval":
    """The box `[center - radius, center + radius]` (radius broadcasts)."""
    center = jnp.asarray(center)
    radius = jnp.broadcast_to(jnp.asarray(radius, dtype=center.dtype), center.shape)
    return cls(center - radius, center + radius)

  @classmethod
  def point(cls, x: ArrayLike) -> "Interval":
    """The degenerate interval `[x, x]`."""
    x = jnp.asarray(x)
    return cls(x, x)


def check_interval(interval: Any, name: str = "interval") -> Interval:
  """Checks that `interval` is an `Interval` with matching shapes and lower <= upper.

  The order check needs concrete values and is skipped under tracing.

  Raises:
    TypeError: if `interval` is not an `Interval`.
    ValueError: naming the shapes or the number of elements with lower > upper.
  """
  if not isinstance(interval, Interval):
    raise TypeError(
        f"{name} must be a certjax.bounds.Interval(lower, upper); got "
        f"{type(interval).__name__}. Build one with Interval(lower, upper) or linf_ball(x, eps).")
  lower_shape, upper_shape = np.shape(interval.lower), np.shape(interval.upper)
  if lower_shape != upper_shape:
    raise ValueError(
        f"{name}.lower has shape {lower_shape} but {name}.upper has shape {upper_shape}; "
        "they must match.")
  if validation.is_concrete(interval.lower) and validation.is_concrete(interval.upper):
    lower, upper = np.asarray(interval.lower), np.asarray(interval.upper)
    bad = ~(lower <= upper)  # NaNs count as violations too
    if np.any(bad):
      raise ValueError(
          f"{name} has {int(np.sum(bad))} element(s) with lower > upper (or NaN); an Interval "
          "needs lower <= upper everywhere.")
  return interval


def linf_ball(x: ArrayLike, eps: ArrayLike,
              clip: tuple[float, float] | None = (0.0, 1.0), *,
              sound_rounding: bool = False) -> Interval:
  """The L-infinity ball of radius `eps` around `x`, intersected with the `clip` box.

  Args:
    x: centre, e.g. a batch of images in [0, 1] pixel space.
    eps: radius >= 0 (a scalar, or an array broadcastable to `x`, e.g. per example).
    clip: (low, high) box the ball is intersected with; `x` must lie inside it.
      None for no clipping (and no range check on `x`).
    sound_rounding: round outward: x - eps and x + eps are rounded to the
      nearest float, which can cut off the outermost float inputs of the
      ball; with True, eps is rounded up to the input's type and the ends
      moved one float outward (nextafter), so the box holds every float x'
      with |x' - x| <= eps.

  Returns:
    `Interval(max(x - eps, low), min(x + eps, high))`.

  Raises:
    ValueError: if `eps` is negative or not finite, or `x` holds NaN or Inf
      or lies outside `clip` (checked when `x` is concrete, not under `jit`).
  """
  validation.check_positive(eps, "eps", allow_zero=True)
  if clip is not None and not clip[0] <= clip[1]:
    raise ValueError(f"clip must be a (low, high) pair with low <= high, got {clip!r}.")
  if validation.is_concrete(x):
    values = np.asarray(x)
    # Before the range check: NaN passes every comparison, and the range
    # message would then print the finite values' range as if it were fine.
    # (ml_dtypes' bfloat16 is no np.inexact subtype, hence the test on integers.)
    bad = None if values.dtype.kind in "biu" else ~np.isfinite(values)
    if bad is not None and bad.any():
      first = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(
          f"x must be finite; got {int(np.isnan(values).sum())} NaN and "
          f"{int(np.isinf(values).sum())} Inf of its {values.size} values (the first at "
          f"index {first}: {values[first]}).")
    if clip is not None and values.size and (values.min() < clip[0] or values.max() > clip[1]):
      raise ValueError(
          f"x must lie in [{clip[0]}, {clip[1]}] (pixel space); got values in "
          f"[{float(values.min()):.4g}, {float(values.max()):.4g}]. "
          "Pass unnormalised images: models normalise internally.")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  eps = jnp.asarray(eps, dtype=x.dtype)
  if sound_rounding:
    eps = jnp.nextafter(eps, jnp.asarray(jnp.inf, x.dtype))
    lower = jnp.nextafter(x - eps, jnp.asarray(-jnp.inf, x.dtype))
    upper = jnp.nextafter(x + eps, jnp.asarray(jnp.inf, x.dtype))
  else:
    lower, upper = x - eps, x + eps
  if clip is not None:
    lower = jnp.maximum(lower, jnp.asarray(clip[0], x.dtype))
    upper = jnp.minimum(upper, jnp.asarray(clip[1], x.dtype))
  return Interval(lower, upper)
