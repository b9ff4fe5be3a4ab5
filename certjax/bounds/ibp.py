"""Interval bound propagation (IBP) through any pure JAX function.

`ibp(fn, *args)` traces `fn` with `jax.make_jaxpr` and interprets the jaxpr
with one rule per primitive (the `IBP_RULES` table). Values are either
`Interval`s (bounded) or plain arrays (constants); an equation whose inputs are
all constant is simply evaluated, so weights, BatchNorm statistics and
`rsqrt(var + eps)` stay concrete. The interpretation happens while JAX traces,
so `ibp` itself works inside `jit`, `vmap` and `grad`.

Rule families:
  * affine in one bounded argument (dot_general, conv, mul/div by constants):
    centre/radius form c' = W c, r' = |W| r, which is tight for a single
    affine layer and costs two linear ops;
  * monotone non-decreasing in every bounded argument (add, max, min, reshape,
    pooling, slicing, tanh, exp, ...): apply the primitive to the lower and to
    the upper bounds;
  * decreasing (erfc, rsqrt): swap the endpoints;
  * valley-shaped (abs, square, even powers, cosh, silu): minimum inside the
    interval when it contains the argmin;
  * products and quotients of two intervals, comparisons (three-valued
    booleans) and `select_n` on them (hull of both branches when undecided).

Every matrix product and convolution runs at `Precision.HIGHEST` whatever the
caller's or JAX's default (`jax.default_matmul_precision`): TF32 on GPUs and
one-pass bfloat16 on TPUs are the defaults there, and their error is far
larger than anything the bounds allow for. NaN ends (an infinite end times a
constant, inf - inf) are replaced by infinite ones after every operation, so
that no comparison reads "unknown" as "false". With `sound_rounding=True`
every bound is also rounded outward (see `rounding` and `ibp`).

Calls (`jit`, `custom_jvp_call`, `remat`, ...) are entered recursively, except
a few `jax.nn` wrappers recognised by name whose monotonicity gives tighter
bounds than their decomposition (softplus, logaddexp, elu family, silu); see
`NAMED_CALL_RULES`.

References:
  Gowal et al. 2018, "On the Effectiveness of Interval Bound Propagation for
  Training Verifiably Robust Models", https://arxiv.org/abs/1810.12715.
  Rump 1999, "Fast and parallel interval arithmetic" (midpoint-radius products).
  jax_verify `src/ibp.py` (DeepMind) for the rule-table design.
  Higham 2002, "Accuracy and Stability of Numerical Algorithms", ch. 3
  (rounding error of sums and inner products, used by `sound_rounding`).
  Jia & Rinard 2021, "Exploiting Verified Neural Networks via Floating Point
  Numerical Error", https://arxiv.org/abs/2003.03021.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from certjax import validation
from certjax.bounds import interpreter
from certjax.bounds import rounding
from certjax.bounds.interval import Interval, check_interval

Rule = Callable[..., Any]


class UnsupportedPrimitiveError(NotImplementedError):
  """Raised when a bounded value reaches a primitive that has no IBP rule."""


def _is_iv(x: Any) -> bool:
  return isinstance(x, Interval)


def _lo(x: Any) -> Any:
  return x.lower if _is_iv(x) else x


def _hi(x: Any) -> Any:
  return x.upper if _is_iv(x) else x


def _pack(prim, lower, upper):
  if prim.multiple_results:
    return [Interval(l, u) for l, u in zip(lower, upper)]
  return Interval(lower, upper)


# ----------------------------------------------------------------------------
# Rule families.


def _increasing(prim, *args, **params):
  """Monotone non-decreasing in every bounded argument."""
  lower = prim.bind(*[_lo(a) for a in args], **params)
  upper = prim.bind(*[_hi(a) for a in args], **params)
  return _pack(prim, lower, upper)


def _decreasing(prim, x, **params):
  return Interval(prim.bind(x.upper, **params), prim.bind(x.lower, **params))


def _constant_positions(*positions: int, start: int | None = None) -> Callable[[Rule], Rule]:
  """Wraps a rule so that index-like arguments must be constants."""

  def wrap(rule):
    @functools.wraps(rule)
    def checked(prim, *args, **params):
      idx = set(positions) | (set(range(start, len(args))) if start is not None else set())
      for i in sorted(idx):
        if i < len(args) and _is_iv(args[i]):
          raise UnsupportedPrimitiveError(
              f"IBP through {prim.name} needs constant indices, but argument {i} is bounded "
              "(it depends on the input). Only the data operand may be bounded.")
      return rule(prim, *args, **params)
    return checked
  return wrap


def _valley(argmin: float) -> Rule:
  """Rule for f decreasing up to `argmin` and increasing after it."""

  def rule(prim, x, **params):
    f_lower, f_upper = prim.bind(x.lower, **params), prim.bind(x.upper, **params)
    at_min = prim.bind(jnp.full_like(x.lower, argmin), **params)
    contains = (x.lower <= argmin) & (argmin <= x.upper)
    return Interval(jnp.where(contains, at_min, jnp.minimum(f_lower, f_upper)),
                    jnp.maximum(f_lower, f_upper))
  return rule


def _neg(prim, x, **params):
  del prim, params
  return Interval(-x.upper, -x.lower)


def _sub(prim, a, b, **params):
  return Interval(prim.bind(_lo(a), _hi(b), **params), prim.bind(_hi(a), _lo(b), **params))


def _mul_intervals(a: Interval, b: Interval) -> Interval:
  products = (a.lower * b.lower, a.lower * b.upper, a.upper * b.lower, a.upper * b.upper)
  return Interval(functools.reduce(jnp.minimum, products), functools.reduce(jnp.maximum, products))


def _ordered(p, q) -> Interval:
  return Interval(jnp.minimum(p, q), jnp.maximum(p, q))


def _mul(prim, a, b, **params):
  if _is_iv(a) and _is_iv(b):
    return _mul_intervals(a, b)
  # Endpoint products rather than centre/radius: the centre of [-inf, inf] is
  # NaN, and NaN > 0 would read as "definitely false" downstream.
  if _is_iv(a):
    return _ordered(prim.bind(a.lower, b, **params), prim.bind(a.upper, b, **params))
  return _ordered(prim.bind(a, b.lower, **params), prim.bind(a, b.upper, **params))


def _reciprocal(x: Interval) -> Interval:
  # 1/x is decreasing on each side of 0; an interval containing 0 maps to
  # everything (the function is unbounded there).
  excludes_zero = (x.lower > 0) | (x.upper < 0)
  inf = jnp.asarray(jnp.inf, x.lower.dtype)
  return Interval(jnp.where(excludes_zero, 1 / x.upper, -inf),
                  jnp.where(excludes_zero, 1 / x.lower, inf))


def _div(prim, a, b, **params):
  if not _is_iv(b):  # endpoints, not centre/radius: see _mul
    return _ordered(prim.bind(a.lower, b, **params), prim.bind(a.upper, b, **params))
  recip = _reciprocal(b)
  if _is_iv(a):
    return _mul_intervals(a, recip)
  return _mul_intervals(Interval(jnp.asarray(a), jnp.asarray(a)), recip)


def _bilinear(prim, lhs, rhs, **params):
  """dot_general / conv: affine in each argument when the other is constant."""
  if _is_iv(lhs) and _is_iv(rhs):
    # Midpoint-radius interval product (Rump 1999): sound for any bilinear map
    # whose coefficients are +-1 sums, as matmul and convolution are.
    c = prim.bind(lhs.center, rhs.center, **params)
    r = (prim.bind(jnp.abs(lhs.center), rhs.radius, **params)
         + prim.bind(lhs.radius, jnp.abs(rhs.center), **params)
         + prim.bind(lhs.radius, rhs.radius, **params))
    return Interval(c - r, c + r)
  if _is_iv(lhs):
    c = prim.bind(lhs.center, rhs, **params)
    r = prim.bind(lhs.radius, jnp.abs(rhs), **params)
  else:
    c = prim.bind(lhs, rhs.center, **params)
    r = prim.bind(jnp.abs(lhs), rhs.radius, **params)
  return Interval(c - r, c + r)


def _integer_pow(prim, x, *, y: int):
  if y == 0:
    return jnp.ones_like(x.lower)
  if y > 0 and y % 2 == 1:
    return _increasing(prim, x, y=y)
  if y > 0:
    return _valley(0.0)(prim, x, y=y)
  f_lower, f_upper = prim.bind(x.lower, y=y), prim.bind(x.upper, y=y)
  contains_zero = (x.lower <= 0) & (x.upper >= 0)
  inf = jnp.asarray(jnp.inf, x.lower.dtype)
  low, high = jnp.minimum(f_lower, f_upper), jnp.maximum(f_lower, f_upper)
  if y % 2 == 0:  # 1/x^2k: positive, unbounded above near 0
    return Interval(low, jnp.where(contains_zero, inf, high))
  return Interval(jnp.where(contains_zero, -inf, low), jnp.where(contains_zero, inf, high))


def _compare(prim, a, b, **params):
  """Three-valued comparison: Interval(definitely true, possibly true) of bools."""
  del params
  name = prim.name
  if name in ("lt", "le"):
    a, b, name = b, a, {"lt": "gt", "le": "ge"}[name]
  al, au, bl, bu = _lo(a), _hi(a), _lo(b), _hi(b)
  # "Possibly" is written as "not certainly not" so that a NaN (a constant,
  # or an end the rules could not bound) leaves both outcomes open: every
  # comparison with NaN is False, which would otherwise exclude the True one.
  if name == "gt":
    return Interval(al > bu, ~(au <= bl))
  if name == "ge":
    return Interval(al >= bu, ~(au < bl))
  possibly_equal = ~((al > bu) | (bl > au))
  surely_equal = (al == au) & (bl == bu) & (al == bl)
  if name == "eq":
    return Interval(surely_equal, possibly_equal)
  return Interval(~possibly_equal, ~surely_equal)  # ne


def _not(prim, x, **params):
  # Decreasing for booleans (not) and for integers too: ~x = -x - 1 (signed)
  # and MAX - x (unsigned).
  return Interval(prim.bind(x.upper, **params), prim.bind(x.lower, **params))


def _check_boolean(prim, args) -> None:
  for arg in args:
    if _is_iv(arg) and jnp.result_type(arg.lower) != jnp.bool_:
      raise UnsupportedPrimitiveError(
          f"IBP through '{prim.name}' on {jnp.result_type(arg.lower)} values is not supported: "
          "bitwise operations on integers are not monotone (1 & 1 = 1 but 2 & 1 = 0), so "
          "bounds on the operands say nothing about the result. Only boolean operands "
          "(comparisons of bounded values) may depend on the input.")


def _boolean_monotone(prim, *args, **params):
  """and / or / any / all: monotone on booleans (False < True), refused on integers."""
  _check_boolean(prim, args)
  return _increasing(prim, *args, **params)


def _xor(prim, a, b, **params):
  del params
  _check_boolean(prim, (a, b))
  al, au, bl, bu = _lo(a), _hi(a), _lo(b), _hi(b)
  # Certainly different: one certainly True, the other certainly False;
  # possibly different: one can be True while the other can be False.
  return Interval((al & ~bu) | (~au & bl), (au & ~bl) | (~al & bu))


def _convert_element_type(prim, x, *, new_dtype, **params):
  """Conversions: monotone, except to bool (x != 0) and integer wrap-around."""
  source, target = np.dtype(jnp.result_type(x.lower)), np.dtype(new_dtype)
  if target == np.bool_ and source != np.bool_:
    lower, upper = x.lower, x.upper
    # x != 0 holds certainly when 0 is outside [l, u], possibly unless l = u = 0.
    return Interval((lower > 0) | (upper < 0), ~((lower >= 0) & (upper <= 0)))
  out = _increasing(prim, x, new_dtype=new_dtype, **params)
  if not jnp.issubdtype(target, jnp.integer) or source == np.bool_:
    return out
  # Integer targets: narrowing and signedness changes wrap around, and float
  # values outside the target's range convert in a backend-defined way
  # (saturating on CPU). Only bounds inside the range convert monotonically;
  # elsewhere any value of the target type is possible.
  info = jnp.iinfo(target)
  if jnp.issubdtype(source, jnp.integer):
    source_info = jnp.iinfo(source)
    if source_info.min >= info.min and source_info.max <= info.max:
      return out  # widening: never wraps
    low, high = max(info.min, source_info.min), min(info.max, source_info.max)
    in_range = (x.lower >= jnp.asarray(low, source)) & (x.upper <= jnp.asarray(high, source))
  else:
    # Truncation toward zero maps [min, max + 1) into range; both ends are
    # powers of two (or 0), exact in every float format that can reach them.
    in_range = ((x.lower >= jnp.asarray(float(info.min), source))
                & (x.upper < jnp.asarray(float(info.max) + 1.0, source)))
  return Interval(jnp.where(in_range, out.lower, jnp.asarray(info.min, target)),
                  jnp.where(in_range, out.upper, jnp.asarray(info.max, target)))


def _select_n(prim, pred, *cases, **params):
  if not _is_iv(pred):
    return _increasing(prim, pred, *cases, **params)
  if len(cases) != 2 or jnp.result_type(pred.lower) != jnp.bool_:
    raise UnsupportedPrimitiveError(
        "select_n with a bounded integer selector is not supported; only boolean "
        "predicates derived from comparisons may depend on the input.")
  # pred.lower: the true branch is certain; ~pred.upper: the false branch is.
  false_case, true_case = cases
  fl, fu, tl, tu = _lo(false_case), _hi(false_case), _lo(true_case), _hi(true_case)
  lower = jnp.where(pred.lower, tl, jnp.where(pred.upper, jnp.minimum(fl, tl), fl))
  upper = jnp.where(pred.lower, tu, jnp.where(pred.upper, jnp.maximum(fu, tu), fu))
  shape = jnp.broadcast_shapes(jnp.shape(lower), jnp.shape(upper))
  return Interval(jnp.broadcast_to(lower, shape), jnp.broadcast_to(upper, shape))


def _sort(prim, *args, **params):
  # Order statistics are monotone in every input; with several operands
  # (argsort, sort by key) the outputs are permutations chosen by the data.
  if len(args) != 1:
    raise UnsupportedPrimitiveError(
        "IBP through sort with several operands (argsort / sort by key) is not supported.")
  return _increasing(prim, *args, **params)


_INCREASING = (
    "add", "add_any", "max", "min", "clamp", "reshape", "transpose", "broadcast_in_dim",
    "squeeze", "expand_dims", "concatenate", "stack", "slice", "rev", "pad", "copy", "copy_p",
    "reduce_precision", "reduce_sum", "reduce_max", "reduce_min",
    "reduce_window_sum", "reduce_window_max", "reduce_window_min",
    "cumsum", "cummax", "cummin", "cumlogsumexp", "sharding_constraint", "optimization_barrier",
    "split", "stop_gradient",
    # Monotone non-decreasing elementwise functions.
    "exp", "exp2", "expm1", "log", "log1p", "tanh", "logistic", "sqrt", "cbrt", "erf",
    "erf_inv", "atan", "asin", "asinh", "atanh", "acosh", "sinh", "sign", "floor", "ceil",
    "round",
)

IBP_RULES: dict[str, Rule] = {name: _increasing for name in _INCREASING}
IBP_RULES.update({
    "neg": _neg,
    "sub": _sub,
    "mul": _mul,
    "div": _div,
    "dot_general": _bilinear,
    "conv_general_dilated": _bilinear,
    "integer_pow": _integer_pow,
    "square": _valley(0.0),
    "abs": _valley(0.0),
    "cosh": _valley(0.0),
    "erfc": _decreasing,
    "rsqrt": _decreasing,
    "acos": _decreasing,
    "not": _not,
    "and": _boolean_monotone, "or": _boolean_monotone, "reduce_and": _boolean_monotone,
    "reduce_or": _boolean_monotone, "xor": _xor,
    "convert_element_type": _convert_element_type,
    "eq": _compare, "ne": _compare, "gt": _compare, "ge": _compare, "lt": _compare,
    "le": _compare,
    "select_n": _select_n,
    "sort": _sort,
    "gather": _constant_positions(1)(_increasing),
    "dynamic_slice": _constant_positions(start=1)(_increasing),
    "dynamic_update_slice": _constant_positions(start=2)(_increasing),
    "scatter-add": _constant_positions(1)(_increasing),
    "scatter_add": _constant_positions(1)(_increasing),
})
"""Per-primitive IBP rules, keyed by primitive name.

A rule is called as `rule(primitive, *invals, **params)` where each inval is an
`Interval` (bounded) or an array (constant) and at least one is bounded; it
returns an `Interval` (or a list of them for multiple-result primitives; a
constant array is allowed where the output does not depend on the bounds).
"""

# Silu's minimum: the root of 1 + x + e^x... i.e. sigmoid(x)(1 + x(1 - sigmoid(x))) = 0.
_SILU_ARGMIN = -1.2784645427610738

# jax.nn wrappers recognised by call name. 'increasing' means non-decreasing in
# every argument for every parameter value jax.nn accepts (elu is absent: it is
# not monotone for negative alpha). leaky_relu is increasing for a slope >= 0
# and valley-shaped around 0 for a negative slope; the slope is read off the
# function itself (f(-1) = -slope), so a traced slope works too.
NAMED_CALL_RULES: dict[str, str] = {
    "relu": "increasing", "relu6": "increasing", "softplus": "increasing",
    "logaddexp": "increasing", "log_sigmoid": "increasing", "sigmoid": "increasing",
    "hard_tanh": "increasing", "hard_sigmoid": "increasing", "celu": "increasing",
    "selu": "increasing", "soft_sign": "increasing", "silu": "silu", "swish": "silu",
    "leaky_relu": "leaky_relu",
}


# ----------------------------------------------------------------------------
# Rounding model of each primitive, for sound_rounding (see `rounding`).

# Results that are exactly representable (selections, data movement, max/min,
# sign changes, rounding to integers), and explicit roundings (conversions,
# reduce_precision), which are part of the function itself: monotone and
# deterministic, so the rule computes exactly the values the network does.
# Nothing to widen.
_EXACT_RESULTS = frozenset({
    "max", "min", "clamp", "reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims",
    "concatenate", "stack", "slice", "rev", "pad", "copy", "copy_p", "reduce_max", "reduce_min",
    "reduce_window_max", "reduce_window_min", "cummax", "cummin", "sharding_constraint",
    "optimization_barrier", "split", "stop_gradient", "neg", "abs", "sign", "floor", "ceil",
    "round", "select_n", "sort", "gather", "dynamic_slice", "dynamic_update_slice",
    "convert_element_type", "reduce_precision",
})
# Correctly rounded arithmetic (IEEE 754): rounding.ARITHMETIC_ULPS.
_ARITHMETIC = frozenset({"add", "add_any", "sub", "mul", "div", "square"})
# Library functions: rounding.TRANSCENDENTAL_ULPS (an assumption on the backend).
_TRANSCENDENTAL = frozenset({
    "exp", "exp2", "expm1", "log", "log1p", "tanh", "logistic", "sqrt", "rsqrt", "cbrt", "erf",
    "erfc", "erf_inv", "atan", "asin", "acos", "asinh", "atanh", "acosh", "sinh", "cosh",
})
# jax.nn wrappers whose named rule only selects (max/min): exact.
_EXACT_CALLS = frozenset({"relu", "relu6", "hard_tanh"})


def _shape(x) -> tuple[int, ...]:
  return tuple(jnp.shape(_lo(x)))


def _dot_terms(args, params) -> int:
  (lhs_contracting, _), _ = params["dimension_numbers"]
  shape = _shape(args[0])
  return math.prod(shape[d] for d in lhs_contracting)


def _conv_terms(args, params) -> int:
  # Each output sums (input features per group) x (window) products: the
  # kernel's size divided by its output-feature dimension.
  kernel = _shape(args[1])
  return math.prod(kernel) // max(kernel[params["dimension_numbers"].rhs_spec[0]], 1)


# Sums of n terms, by primitive: n as a function of (args, params).
_SUM_TERMS: dict[str, Callable[[list, dict], int]] = {
    "dot_general": _dot_terms,
    "conv_general_dilated": _conv_terms,
    "reduce_sum": lambda args, params: math.prod(_shape(args[0])[a] for a in params["axes"]),
    "reduce_window_sum": lambda args, params: math.prod(params["window_dimensions"]),
    "cumsum": lambda args, params: _shape(args[0])[params["axis"]],
    # Repeated indices add several updates into one element: at most all of them.
    "scatter-add": lambda args, params: math.prod(_shape(args[2])) + 1,
    "scatter_add": lambda args, params: math.prod(_shape(args[2])) + 1,
}


def _round_outward(name: str, prim, out: Interval, args: list, params: dict) -> Interval:
  """`out`, the rule's result for primitive `name`, widened for rounding (sound_rounding)."""
  if name in _EXACT_RESULTS:
    return out
  if name in _SUM_TERMS:
    # Higham: a float sum of n terms in any order is within gamma_n sum |terms|
    # of the exact sum. Both the rule's own sums (centre and radius, or the
    # endpoints) and the network's are that far off, and the rule's centre
    # and radius are rounded too: gamma_{2n + 8} covers them. The magnitude
    # sum is itself a float sum of non-negative terms, at most gamma_n below
    # its exact value, hence the division by 1 - gamma_n; 2n smallest-normal
    # numbers cover underflow.
    n = _SUM_TERMS[name](args, params)
    dtype = jnp.result_type(out.lower)
    u = rounding.unit_roundoff(dtype)
    terms = prim.bind(*[rounding.magnitude(a) for a in args], **params)
    denominator = 1.0 - rounding.gamma(n * u)
    factor = rounding.gamma((2 * n + 8) * u) / denominator if denominator > 0 else float("inf")
    extra = (rounding.scaled_up(factor, terms)
             + jnp.asarray(2 * n * float(jnp.finfo(dtype).tiny), dtype))
    return rounding.outward(out, rounding.ARITHMETIC_ULPS, extra)
  if name == "integer_pow":  # |y| multiplications (and a reciprocal when y < 0)
    return rounding.outward(out, rounding.ARITHMETIC_ULPS * (abs(params["y"]) + 1))
  if name in _ARITHMETIC:
    return rounding.outward(out, rounding.ARITHMETIC_ULPS)
  if name in _TRANSCENDENTAL:
    return rounding.outward(out, rounding.TRANSCENDENTAL_ULPS)
  raise UnsupportedPrimitiveError(
      f"sound_rounding has no rounding-error model for primitive '{name}', so its bounds "
      "could miss the float32 result; run without sound_rounding, or rewrite the function "
      "with modelled operations (see certjax.bounds.ibp._round_outward).")


def supported_primitives(rules: Mapping[str, Rule] | None = None) -> list[str]:
  """Sorted names of the primitives IBP can propagate bounds through."""
  table = dict(IBP_RULES, **(rules or {}))
  return sorted(set(table) | set(interpreter.CALL_PRIMITIVES) | {"cond"})


def _hull(values: list) -> Any:
  lowers = [_lo(v) for v in values]
  uppers = [_hi(v) for v in values]
  return Interval(functools.reduce(jnp.minimum, lowers), functools.reduce(jnp.maximum, uppers))


class _IbpEvaluator:
  """Evaluates one equation on Intervals / constants; see `interpreter.eval_jaxpr`."""

  def __init__(self, rules: Mapping[str, Rule], sound_rounding: bool = False):
    self.rules = rules
    self.sound_rounding = sound_rounding

  def _finish(self, name: str, prim, out: Any, invals: list, params: dict) -> Any:
    """Rounds a rule's floating-point result outward (sound mode) and replaces NaN ends."""
    if not _is_iv(out) or not rounding.is_floating(out.lower):
      return out
    if self.sound_rounding:
      out = _round_outward(name, prim, out, invals, params)
    return rounding.sanitize(out)

  def _finish_call(self, call: str, out: Interval) -> Interval:
    if self.sound_rounding and call not in _EXACT_CALLS and rounding.is_floating(out.lower):
      out = rounding.outward(out, rounding.TRANSCENDENTAL_ULPS)
    return rounding.sanitize(out)

  def __call__(self, eqn, invals: list) -> list:
    if not any(_is_iv(v) for v in invals):
      return interpreter.bind_eqn(eqn, invals)
    name = eqn.primitive.name
    if name in ("eq", "ne", "ge", "le", "gt", "lt") and eqn.invars[0] is eqn.invars[1]:
      # x op x (e.g. the NaN test `x != x` inside logaddexp) is decided without
      # looking at the bounds: bounded values are assumed not to be NaN.
      value = name in ("eq", "ge", "le")
      return [jnp.full(jnp.shape(invals[0].lower), value)]
    if name in interpreter.CALL_PRIMITIVES:
      return self._call(eqn, invals)
    if name == "cond":
      return self._cond(eqn, invals)
    rule = self.rules.get(name)
    if rule is None:
      raise UnsupportedPrimitiveError(
          f"No IBP rule for primitive '{name}' (it receives a value that depends on the "
          f"bounded input). Supported primitives: {', '.join(supported_primitives(self.rules))}.")
    params = interpreter.full_precision(name, eqn.primitive.get_bind_params(eqn.params))
    out = rule(eqn.primitive, *invals, **params)
    outs = list(out) if eqn.primitive.multiple_results else [out]
    return [self._finish(name, eqn.primitive, o, invals, params) for o in outs]

  def _call(self, eqn, invals):
    inner = interpreter.inner_jaxpr(eqn)
    if inner is None:
      raise UnsupportedPrimitiveError(f"Call primitive '{eqn.primitive.name}' has no inner jaxpr.")
    jaxpr, consts = inner
    call = interpreter.call_name(eqn) or ""
    kind = NAMED_CALL_RULES.get(call)
    elementwise = (len(jaxpr.outvars) == 1 and all(
        v.aval.shape in (jaxpr.outvars[0].aval.shape, ())
        for v in jaxpr.invars))
    if kind is not None and elementwise:
      run = functools.partial(interpreter.eval_jaxpr, jaxpr, consts,
                              eval_eqn=interpreter.concrete_eval_eqn)
      if kind == "increasing":
        lower = run([_lo(v) for v in invals])[0]
        upper = run([_hi(v) for v in invals])[0]
        return [self._finish_call(call, Interval(lower, upper))]
      if kind == "leaky_relu" and _is_iv(invals[0]) and not any(map(_is_iv, invals[1:])):
        x, rest = invals[0], list(invals[1:])
        f_lower, f_upper = run([x.lower] + rest)[0], run([x.upper] + rest)[0]
        increasing = run([-jnp.ones_like(x.lower)] + rest)[0] <= 0
        contains = (x.lower <= 0) & (0 <= x.upper)
        valley_lower = jnp.where(contains, 0, jnp.minimum(f_lower, f_upper))
        return [self._finish_call(call, Interval(
            jnp.where(increasing, f_lower, valley_lower).astype(f_lower.dtype),
            jnp.maximum(f_lower, f_upper)))]
      if kind == "silu" and len(invals) == 1:
        x = invals[0]
        f_lower, f_upper = run([x.lower])[0], run([x.upper])[0]
        at_min = run([jnp.full_like(x.lower, _SILU_ARGMIN)])[0]
        contains = (x.lower <= _SILU_ARGMIN) & (_SILU_ARGMIN <= x.upper)
        return [self._finish_call(call, Interval(
            jnp.where(contains, at_min, jnp.minimum(f_lower, f_upper)),
            jnp.maximum(f_lower, f_upper)))]
    return interpreter.eval_jaxpr(jaxpr, consts, invals, self)

  def _cond(self, eqn, invals):
    index, operands = invals[0], invals[1:]
    branches = eqn.params["branches"]
    if not _is_iv(index) and validation.is_concrete(index):
      # A concrete index: interpret only the branch taken (cond clamps it).
      chosen = int(np.asarray(index))
      branch = branches[min(max(chosen, 0), len(branches) - 1)]
      return interpreter.eval_jaxpr(branch.jaxpr, branch.consts, operands, self)
    # Unknown branch: every branch may run, so take the hull of their outputs.
    results = [interpreter.eval_jaxpr(b.jaxpr, b.consts, operands, self) for b in branches]
    return [rounding.sanitize(_hull(list(outs))) for outs in zip(*results)]


def ibp(fn: Callable[..., Any], *args: Any, rules: Mapping[str, Rule] | None = None,
        sound_rounding: bool = False) -> Any:
  """Interval bounds on the outputs of `fn` given bounds on its inputs.

  Products and convolutions run at `Precision.HIGHEST` whatever the default.
  Ends that the arithmetic cannot bound (inf - inf, an infinite end times 0,
  ...) become infinite rather than NaN.

  Floating-point soundness (`sound_rounding=True`): in exact arithmetic the
  bounds contain f(x) for every x in the box, but they are computed in
  float32 and the network runs in float32, and either rounding can put the
  network's output outside bounds computed naively (Jia & Rinard 2021). The
  sound mode rounds every bound outward: after each correctly rounded
  operation by `rounding.ARITHMETIC_ULPS` ulps (nextafter-based), after each
  library function (exp, tanh, ...) by `rounding.TRANSCENDENTAL_ULPS`, and
  after each sum of n terms (dot_general, convolution, reduce_sum, average
  pooling, cumsum) by gamma_{2n+8} * sum |terms| (Higham's bound for a sum
  evaluated in any order, gamma_n = n u / (1 - n u)), with sum |terms| itself
  bounded by the same product on max(|lower|, |upper|) and |constants|.
  Covered: the bounds then contain both the exact value of `fn` and its
  float evaluation in any summation order (any XLA fusion, tiling or FMA
  contraction of the same operations, any device), including underflow and
  flush-to-zero of subnormals. Not covered: an evaluation at a lower
  precision (run the network with `jax.default_matmul_precision("float32")`
  to get the values certified), convolution algorithms that are not sums of
  products (Winograd, FFT; cuDNN may choose them on GPUs), math-library
  functions less accurate than `rounding.TRANSCENDENTAL_ULPS` / 2 ulps, and
  subexpressions of constants only (computed as the network computes them).
  Primitives without an error model (e.g. cumlogsumexp) raise. Not
  differentiable (nextafter has no derivative): meant for verification.

  Args:
    fn: a pure JAX function of positional array arguments (close over
      non-array configuration with `functools.partial`).
    *args: for each argument of `fn`, an `Interval` (a bounded input) or an
      array (a constant); pytrees mixing both are accepted.
    rules: extra or replacement per-primitive rules, keyed by primitive name,
      merged over `IBP_RULES`.
    sound_rounding: True rounds every bound outward as above, so that the
      bounds hold for the float computation too.

  Returns:
    A pytree with the structure of `fn`'s output whose leaves are `Interval`s
    (outputs that do not depend on a bounded input are degenerate intervals;
    boolean outputs are three-valued: lower = certainly True, upper =
    possibly True).

  Raises:
    UnsupportedPrimitiveError (a NotImplementedError): a bounded value reaches a
      primitive without a rule; the message names it and lists supported ones.
      Also: a bounded operand of a bitwise integer operation (not monotone),
      and, with sound_rounding, a primitive without a rounding-error model.
    ValueError: an input interval has mismatched shapes or lower > upper.

  References:
    Gowal et al. 2018, https://arxiv.org/abs/1810.12715.
    Higham 2002, "Accuracy and Stability of Numerical Algorithms", Thm. 3.1.
    Jia & Rinard 2021, https://arxiv.org/abs/2003.03021.
  """
  leaves, treedef = jax.tree.flatten(args, is_leaf=_is_iv)
  for i, leaf in enumerate(leaves):
    if _is_iv(leaf):
      check_interval(leaf, name=f"interval argument {i}")
  leaves = [Interval(jnp.asarray(l.lower), jnp.asarray(l.upper)) if _is_iv(l) else l
            for l in leaves]
  templates = [l.lower if _is_iv(l) else l for l in leaves]

  def flat_fn(*flat):
    return fn(*jax.tree.unflatten(treedef, flat))

  closed, out_shapes = jax.make_jaxpr(flat_fn, return_shape=True)(*templates)
  table = dict(IBP_RULES, **(rules or {}))
  outs = interpreter.eval_jaxpr(closed.jaxpr, closed.consts, leaves,
                               _IbpEvaluator(table, bool(sound_rounding)))
  outs = [o if _is_iv(o) else Interval.point(o) for o in outs]
  return jax.tree.unflatten(jax.tree.structure(out_shapes), outs)
