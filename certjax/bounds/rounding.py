"""Floating-point error model for bound propagation (`sound_rounding=True`).

A bound computed in float32 can be wrong twice over: the bound computation
itself rounds (a lower bound rounded up is no lower bound), and the network it
certifies is evaluated in float32, not in the exact arithmetic the bound
reasons about (Jia & Rinard 2021 build inputs that verifiers certify and the
float network misclassifies). The sound mode covers both with one model:

  * an operation whose result is correctly rounded (+, -, *, /)
    is off by at most half an ulp, so every bound it produces is widened by
    `ARITHMETIC_ULPS` units of the bound's own magnitude (plus that many of
    the smallest normal number, which covers underflow and XLA's
    flush-to-zero of subnormal numbers), then stepped once more outward with
    `nextafter` so that the widening's own rounding goes the safe way;
  * a library function (exp, tanh, log, ...) is assumed accurate to a few
    ulps: `TRANSCENDENTAL_ULPS` units;
  * a sum of n terms (dot products, convolutions, reductions) evaluated in any
    order is off by at most gamma_n * sum |terms|, gamma_n = n u / (1 - n u)
    with u the unit roundoff (Higham 2002, Thm. 3.1 and Sec. 3.1): one ulp per
    output is not enough for a long dot product, so those outputs are widened
    by gamma times a sound bound of sum |terms| (see `gamma`).

References:
  Higham 2002, "Accuracy and Stability of Numerical Algorithms", 2nd ed.,
  SIAM, chapter 3 (error of summation and inner products).
  Jia & Rinard 2021, "Exploiting Verified Neural Networks via Floating Point
  Numerical Error", https://arxiv.org/abs/2003.03021.
  Mine 2004, "Relational Abstract Domains for the Detection of Floating-Point
  Run-Time Errors" (sound abstract domains over floats), ESOP 2004.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from certjax.bounds.interval import Interval
from certjax.types import Array

ARITHMETIC_ULPS = 4
"""Allowance, in units of eps * |bound|, for one correctly rounded operation.

A rule computes each endpoint with at most two roundings (e.g. a reciprocal
then a product) and the network rounds once more: 3 u = 1.5 eps relative; 4
leaves room for division that is not correctly rounded (TPUs compute it from a
reciprocal approximation)."""

TRANSCENDENTAL_ULPS = 16
"""Allowance for library functions (exp, tanh, log, erf, logistic, sqrt, ...).

XLA documents no accuracy for them; CUDA's libdevice documents at most 2-4
ulps for the float32 versions, and XLA's own approximations aim at a few ulps.
The rule evaluates the function once and the network once, so 16 assumes each
is within 8 ulps. This is an assumption about the backend, not a proof."""


def is_floating(x: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def unit_roundoff(dtype: Any) -> float:
  """u = eps / 2: the largest relative error of one correctly rounded result."""
  return float(jnp.finfo(dtype).eps) / 2


def gamma(units: float) -> float:
  """Higham's gamma_n = n u / (1 - n u) for a budget `units` = n u (inf if n u >= 1)."""
  return units / (1.0 - units) if units < 1.0 else float("inf")


def round_down(x: Array) -> Array:
  """The float below `x`: below the exact value of the expression `x` was rounded from.

  If `x = fl(v)` is v rounded to nearest, nextafter(x, -inf) <= v.
  """
  x = jnp.asarray(x)
  return jnp.nextafter(x, jnp.full_like(x, -jnp.inf))


def round_up(x: Array) -> Array:
  """The float above `x` (see `round_down`)."""
  x = jnp.asarray(x)
  return jnp.nextafter(x, jnp.full_like(x, jnp.inf))


def constant_up(value: float, dtype: Any) -> Array:
  """`value` (a Python float) as `dtype`, rounded up: never below the real value."""
  as_dtype = jnp.asarray(value, dtype)
  return as_dtype if not np.isfinite(value) else round_up(as_dtype)


def scaled_up(factor: float, x: Array) -> Array:
  """An upper bound of factor * x for x >= 0 (factor a Python float >= 0)."""
  x = jnp.asarray(x)
  return round_up(constant_up(factor, x.dtype) * x)


def outward(x: Interval, ulps: float, extra: Array | None = None) -> Interval:
  """`x` widened by `extra` (>= 0, optional) and `ulps` units of eps * |bound|, outward.

  Each end moves by ulps * (eps |end| + smallest normal), then one more float
  outward with nextafter, so the computed end is on the safe side of the
  exact widened value whatever the rounding of the widening itself. Infinite
  ends stay infinite (an infinite upper bound is sound; a lower bound of +inf
  becomes the largest float).
  """
  dtype = jnp.result_type(x.lower)
  info = jnp.finfo(dtype)
  relative = jnp.asarray(ulps * float(info.eps), dtype)
  absolute = jnp.asarray(ulps * float(info.tiny), dtype)

  def step(v, sign):
    if extra is not None:
      v = v + sign * extra
    delta = jnp.abs(v) * relative + absolute
    delta = jnp.where(jnp.isfinite(v), delta, jnp.zeros_like(delta))
    return jnp.nextafter(v + sign * delta, jnp.full_like(v, sign * jnp.inf))

  return Interval(step(x.lower, -1), step(x.upper, 1))


def sanitize(x: Interval) -> Interval:
  """NaN ends become infinite: lower -> -inf, upper -> +inf.

  A NaN end (inf - inf, 0 * inf, a NaN centre of [-inf, inf]) carries no
  information; left as NaN, a comparison would read it as "definitely false"
  (NaN > 0 is False) and prune a branch the network can take.
  """
  if not is_floating(x.lower):
    return x
  lower, upper = jnp.asarray(x.lower), jnp.asarray(x.upper)
  return Interval(jnp.where(jnp.isnan(lower), jnp.asarray(-jnp.inf, lower.dtype), lower),
                  jnp.where(jnp.isnan(upper), jnp.asarray(jnp.inf, upper.dtype), upper))


def magnitude(x: Any) -> Any:
  """A bound of |x| for x in an Interval (max(|lower|, |upper|)), or |x| of a float constant."""
  if isinstance(x, Interval):
    return jnp.maximum(jnp.abs(x.lower), jnp.abs(x.upper))
  return jnp.abs(x) if is_floating(x) else x
