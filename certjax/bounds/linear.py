"""Backward linear bounds: CROWN, CROWN-IBP and IBP with spec elision.

All three bound a specification `C @ fn(x)` (one row per property, e.g. the
margins z_y - z_j) over an input box, for `fn` a pure function of one batched
array. Linear coefficients travel backwards through the affine parts with
`jax.vjp` (see `graph.AffineGraph`), so convolutions are never turned into
matrices; only ReLU nodes are relaxed.

ReLU relaxation for pre-activation bounds [l, u] (Zhang et al. 2018):
  * stably active (l >= 0): h = z; stably inactive (u <= 0): h = 0;
  * unstable: upper line through (l, 0) and (u, u), h <= u (z - l) / (u - l);
    lower line h >= a z with the adaptive slope a = 1 if u > -l else 0.

Batch convention: axis 0 of the input and the output is the batch, and the
function treats examples independently (inference-mode BatchNorm), so a
coefficient array of shape (K, batch, ...) holds K functionals per example.

Floating-point soundness (`sound_rounding=True` on every entry point): the
backward pass rests on identities such as C (W h + b) = (C W) h + C b that
hold in exact arithmetic only, and the network it certifies runs in float32.
In the sound mode each step subtracts a bound of what rounding can change:
  * pulling coefficients L back through the affine map z = A(x, h) from its
    parents: gamma(2 n_fwd + n_bwd + n) * <|L|, S>, where S = |A|(|x|, |h|)
    is the map on absolute values (`AffineGraph.magnitude`, from bounds of
    |x| and |h|), n_fwd and n_bwd count the roundings of the map and of its
    transpose along the worst path (each sum of n terms counting n, Higham
    2002, ch. 3; `AffineGraph.rounding`), and n is the length of the final
    sum. This covers the float coefficients C W, the float bias C b, and the
    network's own float evaluation of z (in any summation order);
  * the ReLU relaxation: the upper line's intercept is rounded up so that the
    line lies above relu at both ends of the computed slope (relu is convex),
    and the rounding of the relaxed coefficients and of the intercept sums is
    subtracted;
  * sums of coefficients from several paths, and the final concretisation
    over the box (computed from the box's ends, minus Higham's bound).
Every subtraction and sum of the bias is rounded down with nextafter. Pre-
activation bounds come from IBP in its sound mode (`ibp.ibp`). Not covered,
besides what `ibp` lists: underflow amplified by later layers in the linear
error terms (values below 1.2e-38 in float32).

References:
  Zhang et al. 2018, "Efficient Neural Network Robustness Certification with
  General Activation Functions" (CROWN), https://arxiv.org/abs/1811.00866.
  Zhang et al. 2020, "Towards Stable and Efficient Training of Verifiably
  Robust Neural Networks" (CROWN-IBP), https://arxiv.org/abs/1906.06316.
  Gowal et al. 2018, "On the Effectiveness of Interval Bound Propagation for
  Training Verifiably Robust Models" (elision of the last layer),
  https://arxiv.org/abs/1810.12715.
  Higham 2002, "Accuracy and Stability of Numerical Algorithms", ch. 3.
  Jia & Rinard 2021, "Exploiting Verified Neural Networks via Floating Point
  Numerical Error", https://arxiv.org/abs/2003.03021.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from certjax.bounds import graph as graph_lib
from certjax.bounds import rounding
from certjax.bounds.ibp import ibp
from certjax.bounds.interval import Interval, check_interval
from certjax.types import Array, ArrayLike


class _Relaxation(NamedTuple):
  lower_slope: Array
  upper_slope: Array
  upper_intercept: Array


def relu_relaxation(bounds: Interval, *, sound_rounding: bool = False) -> _Relaxation:
  """CROWN's linear relaxation of relu(z) for z in `bounds` (see module doc).

  With `sound_rounding`, the upper line's intercept is max(-s l, u - s u)
  rounded up: the line then lies above relu at both ends for the computed
  slope s, hence (relu being convex) on all of [l, u].
  """
  l, u = bounds.lower, bounds.upper
  active, inactive = l >= 0, u <= 0
  unstable = ~(active | inactive)
  width = jnp.where(unstable, u - l, 1)
  upper_slope = jnp.where(active, 1.0, jnp.where(unstable, u / width, 0.0)).astype(l.dtype)
  if sound_rounding:
    intercept = jnp.maximum(rounding.round_up(-(upper_slope * l)),
                            rounding.round_up(u - rounding.round_down(upper_slope * u)))
  else:
    intercept = -upper_slope * l
  upper_intercept = jnp.where(unstable, intercept, 0.0).astype(l.dtype)
  lower_slope = jnp.where(active | (unstable & (u > -l)), 1.0, 0.0).astype(l.dtype)
  return _Relaxation(lower_slope, upper_slope, upper_intercept)


def _sum_axes(coef: Array) -> tuple[int, ...]:
  return tuple(range(2, jnp.ndim(coef)))


def _error(units: float, terms: Array) -> Array:
  """An upper bound of gamma(units) * (exact sum of `terms` >= 0 over the coefficient axes).

  The float sum of n non-negative terms (and terms themselves computed in
  float with a budget below `units`) is at most gamma(units) below the exact
  one: dividing by 1 - gamma(units) covers it; the product is rounded up.
  """
  factor = rounding.gamma(units)
  factor = factor / (1.0 - factor) if factor < 1.0 else float("inf")
  return rounding.scaled_up(factor, jnp.sum(terms, axis=_sum_axes(terms)))


def _per_example(coef: Array) -> int:
  return math.prod(jnp.shape(coef)[2:])


def _concretize(coef: Array, box: Interval, sound_rounding: bool = False) -> Array:
  """min over the box of <coef, x> per (K, batch): c.x - |coef|.r.

  With `sound_rounding`, from the box's ends (sum of coef+ l + coef- u)
  minus Higham's bound gamma_{n+2} sum |coef| max(|l|, |u|), rounded down.
  """
  axes = _sum_axes(coef)
  if not sound_rounding:
    return jnp.sum(coef * box.center, axis=axes) - jnp.sum(jnp.abs(coef) * box.radius, axis=axes)
  value = jnp.sum(jnp.maximum(coef, 0) * box.lower + jnp.minimum(coef, 0) * box.upper, axis=axes)
  u = rounding.unit_roundoff(coef.dtype)
  error = _error((_per_example(coef) + 3) * u, jnp.abs(coef) * rounding.magnitude(box))
  return rounding.round_down(value - error)


class _Sound:
  """Error terms of the sound mode (module doc) for one graph and input box.

  Holds bounds of |x| and of |h| for the nodes bounded so far (relu nodes:
  max(u, 0) of their pre-activation bounds) and of |z| for relu
  pre-activations; a target's sum of |terms| is computed once, when first
  needed, after all its parents are bounded.
  """

  def __init__(self, g: graph_lib.AffineGraph, x_box: Interval):
    self.g = g
    self.x_magnitude = rounding.magnitude(x_box)
    self.node_magnitudes: dict[int, Array] = {}
    self.pre_magnitudes: dict[int, Array] = {}
    self._terms: dict[int | None, Array] = {}

  def add_relu_bounds(self, bounds: Mapping[int, Interval]) -> _Sound:
    for index, b in bounds.items():
      self.pre_magnitudes[index] = rounding.magnitude(b)
      self.node_magnitudes[index] = jnp.maximum(b.upper, 0)
    return self

  def magnitude(self, parent: int) -> Array:
    return self.x_magnitude if parent == graph_lib.INPUT else self.node_magnitudes[parent]

  def pull_back(self, target: int | None, coefficients: Array) -> Array:
    """Bound (K, batch) of what rounding changes in `g.pull_back(target, coefficients)`."""
    if target not in self._terms:
      self._terms[target] = self.g.magnitude(target, self.x_magnitude, self.node_magnitudes)
    u = rounding.unit_roundoff(coefficients.dtype)
    units = self.g.rounding[target] + (_per_example(coefficients) + 4) * u
    return _error(units, jnp.abs(coefficients) * self._terms[target][None])

  def relaxation(self, index: int, coef_z: Array, intercept_terms: Array) -> Array:
    """Bound of the rounding of coef_z = L+ a + L- s and of the sum of L- t."""
    u = rounding.unit_roundoff(coef_z.dtype)
    return _error((_per_example(coef_z) + 4) * u,
                  jnp.abs(coef_z) * self.pre_magnitudes[index][None] + jnp.abs(intercept_terms))

  def accumulation(self, parent: int, a: Array, b: Array) -> Array:
    """Bound of the rounding of a + b, coefficients of the same parent from two paths."""
    u = rounding.unit_roundoff(a.dtype)
    return _error((_per_example(a) + 4) * u,
                  (jnp.abs(a) + jnp.abs(b)) * self.magnitude(parent)[None])


def _add_down(a: Array, b: Array, sound: _Sound | None) -> Array:
  """a + b, rounded down in the sound mode (never above the exact sum)."""
  return a + b if sound is None else rounding.round_down(a + b)


def _subtract_error(value: Array, error: Array) -> Array:
  return rounding.round_down(value - error)


def _backward_lower(g: graph_lib.AffineGraph, target: int | None, coefficients: Array,
                    x_box: Interval, relaxations: Mapping[int, _Relaxation],
                    sound: _Sound | None = None) -> Array:
  """Lower bound of each functional in `coefficients` (K, *target_shape), shape (K, batch)."""
  coef_x, pending, bias = g.pull_back(target, coefficients)
  if sound is not None:
    bias = _subtract_error(bias, sound.pull_back(target, coefficients))
  while pending:
    index = max(pending)  # parents have smaller indices: reverse topological order
    coef_h = pending.pop(index)
    node = g.nodes[index]
    if node.kind != "relu":
      raise NotImplementedError(
          f"Linear (CROWN) bounds support affine operations and ReLU only; the network "
          f"applies '{node.primitive}' to a value that depends on the input. Use ibp() for "
          "general activations.")
    relax = relaxations[index]
    positive, negative = jnp.maximum(coef_h, 0), jnp.minimum(coef_h, 0)
    coef_z = positive * relax.lower_slope + negative * relax.upper_slope
    intercept_terms = negative * relax.upper_intercept
    bias = _add_down(bias, jnp.sum(intercept_terms, axis=_sum_axes(coef_h)), sound)
    more_x, more_h, more_bias = g.pull_back(index, coef_z)
    if sound is not None:
      bias = _subtract_error(bias, sound.relaxation(index, coef_z, intercept_terms))
      more_bias = _subtract_error(more_bias, sound.pull_back(index, coef_z))
    bias = _add_down(bias, more_bias, sound)
    if more_x is not None:
      if coef_x is not None and sound is not None:
        bias = _subtract_error(bias, sound.accumulation(graph_lib.INPUT, coef_x, more_x))
      coef_x = more_x if coef_x is None else coef_x + more_x
    for parent, coef in more_h.items():
      if parent in pending and sound is not None:
        bias = _subtract_error(bias, sound.accumulation(parent, pending[parent], coef))
      pending[parent] = pending[parent] + coef if parent in pending else coef
  if coef_x is not None:
    bias = _add_down(bias, _concretize(coef_x, x_box, sound is not None), sound)
  return bias


def _spec_coefficients(spec: ArrayLike, output_shape: tuple[int, ...]) -> Array:
  """(K, batch, *output_shape[1:]) coefficients from a (batch, K, ...) or (K, ...) spec."""
  spec = jnp.asarray(spec)
  batch, out_rest = output_shape[0], tuple(output_shape[1:])
  if spec.ndim == len(out_rest) + 1 and spec.shape[1:] == out_rest:
    spec = jnp.broadcast_to(spec[None], (batch,) + spec.shape)
  if spec.ndim != len(out_rest) + 2 or spec.shape[0] != batch or spec.shape[2:] != out_rest:
    raise ValueError(
        f"spec must have shape (batch, K, {', '.join(map(str, out_rest))}) or "
        f"(K, {', '.join(map(str, out_rest))}) for an output of shape {output_shape}; "
        f"got {tuple(spec.shape)}.")
  if not jnp.issubdtype(spec.dtype, jnp.floating):
    spec = spec.astype(jnp.float32)
  return jnp.moveaxis(spec, 1, 0)


def _bound_spec(g, coefficients, x_box, relaxations, upper: bool,
                sound: _Sound | None = None) -> Interval:
  """Interval (batch, K) of the functionals: lower from C, upper from -C in one pass.

  Without `upper` only the lower bounds are computed (half the cost) and the
  upper bounds are +inf. NaN ends (infinite pre-activation bounds give NaN
  slopes) become infinite.
  """
  k = coefficients.shape[0]
  if not upper:
    lower = _backward_lower(g, None, coefficients, x_box, relaxations, sound).T
    return rounding.sanitize(Interval(lower, jnp.full_like(lower, jnp.inf)))
  lowers = _backward_lower(g, None, jnp.concatenate([coefficients, -coefficients]), x_box,
                           relaxations, sound)
  return rounding.sanitize(Interval(lowers[:k].T, -lowers[k:].T))


def _prepare(fn, x_box):
  return graph_lib.AffineGraph(fn, x_box.lower), x_box


def _public(impl):
  """Validates the box, then runs `impl(fn, box, spec, upper)` under jit, `fn` static.

  Tracing the graph and the vjps op by op is slow in eager mode (seconds for a
  small CNN), so the public functions compile. Inside an outer jit/grad this
  simply nests. An unhashable `fn` is wrapped in a partial (compiled per call).
  """
  jitted = jax.jit(impl, static_argnums=(0, 3, 4))

  @functools.wraps(impl)
  def wrapper(fn, x_interval, spec, *, upper: bool = True, sound_rounding: bool = False):
    check_interval(x_interval, "x_interval")
    if jnp.ndim(x_interval.lower) < 1:
      raise ValueError("x_interval must have a leading batch axis; got a scalar interval.")
    x_box = Interval(jnp.asarray(x_interval.lower), jnp.asarray(x_interval.upper))
    try:
      hash(fn)
    except TypeError:  # a static argument must be hashable; a partial is (by identity)
      fn = functools.partial(fn)
    return jitted(fn, x_box, spec, bool(upper), bool(sound_rounding))
  return wrapper


def _ibp_pre_activations(g, x_box, sound_rounding: bool = False) -> dict[int, Interval]:
  return ibp(lambda x: g.evaluate(x).pre_activations, x_box, sound_rounding=sound_rounding)


@_public
def crown_ibp(fn: Callable[[Array], Array], x_interval: Interval, spec: ArrayLike,
              upper: bool = True, sound_rounding: bool = False) -> Interval:
  """CROWN-IBP bounds on `spec @ fn(x)` for x in the box `x_interval`.

  Pre-activation bounds of every ReLU come from IBP; one backward linear pass
  from the specification then bounds the output. Usually much tighter than
  IBP on untrained or naturally trained networks, but not always (the linear
  relaxation of an unstable ReLU can be looser than its interval, notably on
  IBP-trained networks): `verify.margin_lower_bounds` and
  `verified_accuracy` return the elementwise max with `ibp_margins`, the
  best sound bound of the two; this function returns the raw bound, which
  certified training mixes with IBP (Zhang et al.). Costs about 2K backward
  passes (K spec rows; K with `upper=False`).

  Args:
    fn: pure function of one batched array; affine operations and ReLUs
      (max/min with a constant) only on the path from input to output.
    x_interval: `Interval` on the input, batch axis first.
    spec: (batch, K, *out) or (K, *out) array of K linear functionals of the
      output per example, e.g. `margin_spec(labels, num_classes)`.
    upper: keyword-only; False skips the upper bounds (returned as +inf),
      halving the backward pass when only lower bounds (margins) matter.
    sound_rounding: keyword-only; True rounds every step outward so that the
      bounds also hold for the float32 evaluation of `fn` (module doc; not
      differentiable).

  Returns:
    `Interval` of shape (batch, K) bounding each functional.

  References:
    Zhang et al. 2020, https://arxiv.org/abs/1906.06316.
    Jia & Rinard 2021, https://arxiv.org/abs/2003.03021 (sound_rounding).
  """
  g, x_box = _prepare(fn, x_interval)
  coefficients = _spec_coefficients(spec, g.output_shape)
  pre = _ibp_pre_activations(g, x_box, sound_rounding)
  relaxations = {i: relu_relaxation(b, sound_rounding=sound_rounding) for i, b in pre.items()}
  sound = _Sound(g, x_box).add_relu_bounds(pre) if sound_rounding else None
  return _bound_spec(g, coefficients, x_box, relaxations, upper, sound)


def crown_pre_activation_bounds(fn: Callable[[Array], Array], x_interval: Interval, *,
                                sound_rounding: bool = False) -> dict[int, Interval]:
  """Full-CROWN bounds of every ReLU pre-activation, keyed by node index.

  Each layer is bounded by a backward pass from all its neurons (cost grows
  with the number of neurons: meant for small networks), using the CROWN
  bounds of earlier layers, and intersected with the IBP bounds (both sound).
  `sound_rounding`: as in `crown_ibp`.
  """
  return _crown_pre_activations_public(fn, x_interval, None, sound_rounding=sound_rounding)


@_public
def _crown_pre_activations_public(fn, x_interval, spec, upper=True, sound_rounding=False):
  del spec, upper
  return _crown_pre_activations(*_prepare(fn, x_interval), sound_rounding)


def _crown_pre_activations(g, x_box, sound_rounding: bool = False,
                           sound: _Sound | None = None) -> dict[int, Interval]:
  """Full-CROWN pre-activation bounds; in the sound mode, `sound` (if given) learns them."""
  ibp_pre = _ibp_pre_activations(g, x_box, sound_rounding)
  if sound_rounding and sound is None:
    sound = _Sound(g, x_box)
  bounds: dict[int, Interval] = {}
  relaxations: dict[int, _Relaxation] = {}
  for index in g.relu_indices():
    shape = g.nodes[index].shape
    batch, per_example = shape[0], math.prod(shape[1:])
    eye = jnp.eye(per_example, dtype=x_box.lower.dtype).reshape((per_example, 1) + shape[1:])
    eye = jnp.broadcast_to(eye, (per_example, batch) + shape[1:])
    lowers = _backward_lower(g, index, jnp.concatenate([eye, -eye]), x_box, relaxations, sound)
    lower = lowers[:per_example].T.reshape(shape)
    upper = -lowers[per_example:].T.reshape(shape)
    ibp_b = ibp_pre[index]
    # fmax/fmin: a NaN linear bound (infinite IBP bounds upstream) defers to IBP.
    bounds[index] = Interval(jnp.fmax(lower, ibp_b.lower), jnp.fmin(upper, ibp_b.upper))
    relaxations[index] = relu_relaxation(bounds[index], sound_rounding=sound_rounding)
    if sound is not None:
      sound.add_relu_bounds({index: bounds[index]})
  return bounds


@_public
def crown(fn: Callable[[Array], Array], x_interval: Interval, spec: ArrayLike,
          upper: bool = True, sound_rounding: bool = False) -> Interval:
  """Full CROWN bounds on `spec @ fn(x)` for x in the box `x_interval`.

  Every ReLU layer's pre-activation bounds come from their own backward pass
  (`crown_pre_activation_bounds`), then one backward pass from the spec.
  Costs O(number of neurons) backward passes: meant for small networks.

  Args/Returns: as `crown_ibp`.

  References:
    Zhang et al. 2018, https://arxiv.org/abs/1811.00866.
  """
  g, x_box = _prepare(fn, x_interval)
  coefficients = _spec_coefficients(spec, g.output_shape)
  # One _Sound for the layers and the spec: it caches each target's sum of |terms|.
  sound = _Sound(g, x_box) if sound_rounding else None
  pre = _crown_pre_activations(g, x_box, sound_rounding, sound)
  relaxations = {i: relu_relaxation(b, sound_rounding=sound_rounding) for i, b in pre.items()}
  return _bound_spec(g, coefficients, x_box, relaxations, upper, sound)


@_public
def ibp_spec(fn: Callable[[Array], Array], x_interval: Interval, spec: ArrayLike,
             upper: bool = True, sound_rounding: bool = False) -> Interval:
  """IBP bounds on `spec @ fn(x)` with the spec merged into the last affine map.

  The last nonlinear values (any activation, not only ReLU) are bounded by
  IBP; the affine tail from them to the output is composed with the spec and
  bounded exactly over that box: C W h + C b rather than C applied to bounds
  of W h + b (elision, Gowal et al. 2018). Works for any function IBP
  supports; without an affine tail it reduces to bounding C @ logits.

  Args/Returns: as `crown_ibp`.
  """
  del upper  # the elided upper bounds cost next to nothing
  g, x_box = _prepare(fn, x_interval)
  coefficients = _spec_coefficients(spec, g.output_shape)
  coefficients = jnp.concatenate([coefficients, -coefficients])
  frontier = sorted(p for p in g.output_parents if p != graph_lib.INPUT)
  node_bounds = ibp(lambda x: {i: g.evaluate(x).node_outputs[i] for i in frontier}, x_box,
                    sound_rounding=sound_rounding)
  coef_x, coef_h, lowers = g.pull_back(None, coefficients)
  sound = None
  if sound_rounding:
    sound = _Sound(g, x_box)
    sound.node_magnitudes = {i: rounding.magnitude(b) for i, b in node_bounds.items()}
    lowers = _subtract_error(lowers, sound.pull_back(None, coefficients))
  for index, coef in coef_h.items():
    lowers = _add_down(lowers, _concretize(coef, node_bounds[index], sound_rounding), sound)
  if coef_x is not None:
    lowers = _add_down(lowers, _concretize(coef_x, x_box, sound_rounding), sound)
  k = coefficients.shape[0] // 2
  return rounding.sanitize(Interval(lowers[:k].T, -lowers[k:].T))


def margin_spec(labels: ArrayLike, num_classes: int) -> Array:
  """Rows e_y - e_j for every j != y: bounds on z_y - z_j come out directly.

  Args:
    labels: integer labels of shape (batch,).
    num_classes: number of classes (>= 2).

  Returns:
    float32 array of shape (batch, num_classes - 1, num_classes); row j of
    example b is e_{y_b} - e_{j'} with j' running over the other classes in
    increasing order.
  """
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
      or num_classes < 2:
    raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
  labels = jnp.asarray(labels)
  others = jnp.arange(num_classes - 1)[None, :]
  others = others + (others >= labels[:, None])  # skip the true class
  eye = jnp.eye(num_classes, dtype=jnp.float32)
  return eye[labels][:, None, :] - eye[others]


def ibp_margins(fn: Callable[[Array], Array], x_interval: Interval, labels: ArrayLike, *,
                sound_rounding: bool = False) -> Interval:
  """IBP bounds of the margins z_y - z_j (j != y), last layer elided.

  `sound_rounding`: as in `crown_ibp`.

  Returns:
    `Interval` of shape (batch, num_classes - 1); see `ibp_spec`, `margin_spec`.
  """
  num_classes = jax.eval_shape(fn, jax.ShapeDtypeStruct(
      jnp.shape(x_interval.lower), jnp.result_type(x_interval.lower))).shape[-1]
  return ibp_spec(fn, x_interval, margin_spec(labels, num_classes),
                  sound_rounding=sound_rounding)
