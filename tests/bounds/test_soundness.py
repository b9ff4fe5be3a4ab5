"""Certificates a reviewer can trust (issue #16): precision, infinities, booleans, rounding.

Each section pins one way bound propagation used to return a wrong certificate:
  1. matrix products and convolutions at the caller's (or JAX's) default
     precision, which is TF32 or bfloat16 on accelerators;
  2. NaN bounds (an infinite end times a constant) that comparisons read as
     "definitely false";
  3. non-monotone boolean and integer operations treated as monotone;
  4. rounding: bounds that hold in exact arithmetic but miss the float32
     network (and the opt-in `sound_rounding` mode that fixes it).
"""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.extend import core as jex_core

from certjax.bounds import (Interval, UnsupportedPrimitiveError, crown, crown_ibp,
                            crown_pre_activation_bounds, ibp, ibp_margins, ibp_spec, linf_ball,
                            margin_lower_bounds, margin_spec, verified_accuracy)
from tests.bounds._util import init_variables, max_violation, normal, sample_box, uniform

MATMULS = ("dot_general", "conv_general_dilated")
HIGHEST = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
F32_UNIT_ROUNDOFF = 2.0 ** -24


class _TinyCNN(nn.Module):
  """Conv, BatchNorm, Dense: every kind of product the bound rules emit."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.relu(nn.Conv(3, (3, 3), strides=2, padding="SAME")(x))
    x = nn.BatchNorm(use_running_average=True)(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(6)(x))
    return nn.Dense(3)(x)


@pytest.fixture(scope="module")
def tiny_cnn():
  model = _TinyCNN()
  x = uniform(60, (2, 4, 4, 1))
  variables = init_variables(model, x, 61)
  return model, variables, x, jnp.array([0, 2])


# ----------------------------------------------------------------------------
# 1. Full float32 precision for every product, whatever the default.


def _sub_jaxprs(value):
  if isinstance(value, jex_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex_core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _sub_jaxprs(item)


def _matmul_precisions(jaxpr) -> list:
  """(primitive, precision) of every dot_general / conv in `jaxpr` and its sub-jaxprs."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in MATMULS:
      found.append((eqn.primitive.name, eqn.params.get("precision")))
    for value in eqn.params.values():
      for sub in _sub_jaxprs(value):
        found.extend(_matmul_precisions(sub))
  return found


def _bound_programs(model, variables, x, y):
  """Bound computations (including gradients and the evaluator's step) as (fn, args)."""
  from certjax.evaluation import verified as verified_evaluator

  box = linf_ball(x, 0.05)
  spec = margin_spec(y, 3)
  logits = lambda v: functools.partial(model.apply, v)

  def crown_ibp_loss(v):
    return jnp.sum(crown_ibp(logits(v), box, spec, upper=False).lower)

  def ibp_loss(v):
    return jnp.sum(ibp_margins(logits(v), box, y).lower)

  programs = {
      "ibp": (lambda b: ibp(logits(variables), b), (box,)),
      "crown_ibp": (lambda b: crown_ibp(logits(variables), b, spec), (box,)),
      "crown": (lambda b: crown(logits(variables), b, spec), (box,)),
      "grad_crown_ibp": (jax.grad(crown_ibp_loss), (variables,)),
      "grad_ibp": (jax.grad(ibp_loss), (variables,)),
      "verified_step": (verified_evaluator._compiled_steps(model.apply, "crown_ibp"),
                        (variables, x, y, jnp.ones(2, bool), jnp.float32(0.05))),
  }
  for method in ("ibp", "crown_ibp", "crown"):
    programs[f"margin_lower_bounds_{method}"] = (
        functools.partial(margin_lower_bounds, logits(variables), method=method),
        (x, y, jnp.float32(0.05)))
  return programs


def test_products_run_at_highest_precision_under_a_lower_default(tiny_cnn):
  # TF32 (GPUs) and one-pass bfloat16 (TPUs) are the defaults on accelerators;
  # a user may also set them globally. Bound rules must not inherit them.
  model, variables, x, y = tiny_cnn
  programs = _bound_programs(model, variables, x, y)
  for name, (fn, args) in programs.items():
    with jax.default_matmul_precision("bfloat16"):
      closed = jax.make_jaxpr(fn)(*args)
    precisions = _matmul_precisions(closed.jaxpr)
    assert precisions, name
    wrong = [(prim, p) for prim, p in precisions if p != HIGHEST]
    assert not wrong, f"{name}: {len(wrong)} of {len(precisions)} products not HIGHEST: {wrong[:3]}"
  for name in ("ibp", "crown_ibp", "verified_step"):
    # The same seen by XLA: every dot / convolution carries HIGHEST.
    fn, args = programs[name]
    with jax.default_matmul_precision("bfloat16"):
      lowered = jax.jit(fn).lower(*args).as_text()
    ops = [line for line in lowered.splitlines()
           if "stablehlo.dot_general" in line or "stablehlo.convolution" in line]
    assert ops and all("HIGHEST" in line for line in ops), name
  # And the numbers: bounds under a bfloat16 default equal the float32 ones
  # (on CPU XLA ignores the setting; on GPU/TPU this is the check that bites).
  for name in ("ibp", "crown_ibp"):
    fn, args = programs[name]
    with jax.default_matmul_precision("bfloat16"):
      low = jax.jit(fn)(*args)
    with jax.default_matmul_precision("float32"):
      full = jax.jit(fn)(*args)
    np.testing.assert_array_equal(low.lower, full.lower, err_msg=name)
    np.testing.assert_array_equal(low.upper, full.upper, err_msg=name)


# ----------------------------------------------------------------------------
# 2. Infinite ends never turn into "definitely false".


def _issue_reproduction(x):
  return jnp.where((0.5 / (x * x - x + 1)) * 2 > 0, 1.0, -1.0)


INFINITE_CASES = {
    # (function, lower, upper) with an unbounded intermediate value.
    "issue_mul_compare_select": (_issue_reproduction, -1.0, 1.0),
    "div_by_constant": (lambda x: jnp.where((1 / x) / 4.0 < 0, 1.0, 2.0), -1.0, 1.0),
    "constant_times_unbounded": (lambda x: jnp.where(3.0 * (1 / x) >= 0, x + 2, -x), -1.0, 1.0),
    # exp overflows to [inf, inf] on both sides: inf - inf is NaN (the
    # network's outputs are NaN too, so only the NaN-free check applies).
    "unbounded_minus_unbounded": (lambda x: jnp.exp(60 * x) - jnp.exp(60 * x + 1), 2.0, 3.0),
    "equality_with_unbounded": (lambda x: jnp.where(2.0 * (1 / x) == 4.0, 1.0, 0.0), -1.0, 1.0),
    "max_min_of_unbounded": (lambda x: jnp.minimum(jnp.maximum((1 / x) * 2, -3.0), 3.0), -1.0,
                             1.0),
    "dot_and_sum": (lambda x: jnp.sum(((1 / x) * 2) * jnp.array([1.0, 0.0, -1.0]))
                    + jnp.array([0.0, 1.0, 0.0]) @ x, -1.0, 1.0),
}


@pytest.mark.parametrize("case", sorted(INFINITE_CASES))
def test_infinite_intermediate_bounds_stay_sound(case):
  fn, low, high = INFINITE_CASES[case]
  box = Interval(jnp.full(3, low), jnp.full(3, high))
  bounds = ibp(fn, box)
  assert not np.any(np.isnan(bounds.lower)) and not np.any(np.isnan(bounds.upper))
  grid = np.linspace(low, high, 2001, dtype=np.float32)[:, None] * np.ones(3, np.float32)
  outputs = np.asarray(jax.jit(jax.vmap(fn))(grid))
  finite = np.isfinite(outputs).all(axis=tuple(range(1, outputs.ndim)))
  if finite.any():
    assert max_violation(bounds, outputs[finite]) <= 0.0


def test_issue_reproduction_is_not_definitely_false():
  bounds = ibp(_issue_reproduction, Interval(jnp.array([-1.0]), jnp.array([1.0])))
  assert float(bounds.lower[0]) <= -1.0 and float(bounds.upper[0]) >= 1.0


def test_comparison_with_nan_is_unknown():
  # x > NaN is False for every x, yet "possibly true" must not be decided
  # from a NaN: a NaN reaching a comparison means nothing is known.
  out = ibp(lambda x, c: x > c, Interval(jnp.array([0.0]), jnp.array([1.0])),
            jnp.array([jnp.nan]))
  assert not bool(out.lower[0]) and bool(out.upper[0])


def test_linear_bounds_over_an_unbounded_box_are_infinite_not_nan():
  fn = lambda x: jax.nn.relu(x @ jnp.array([[1.0, -1.0], [2.0, 1.0]])) @ jnp.array(
      [[1.0], [-1.0]])
  box = Interval(jnp.array([[-jnp.inf, 0.0]]), jnp.array([[jnp.inf, 1.0]]))
  spec = jnp.ones((1, 1))
  for name, method in (("crown_ibp", crown_ibp), ("crown", crown), ("ibp_spec", ibp_spec)):
    out = method(fn, box, spec)
    assert not np.any(np.isnan(out.lower)) and not np.any(np.isnan(out.upper)), name
    assert np.all(np.isneginf(out.lower)) and np.all(np.isposinf(out.upper)), name


# ----------------------------------------------------------------------------
# 3. Boolean conversions and bitwise operations.


def test_conversion_to_bool_is_three_valued():
  lower = jnp.array([-1.0, 0.5, 0.0, -2.0, 0.0, -1.0])
  upper = jnp.array([1.0, 1.0, 0.0, -1.0, 1.0, 0.0])
  out = ibp(lambda x: x.astype(bool), Interval(lower, upper))
  # certainly True where 0 is excluded; possibly True unless x == 0 everywhere.
  np.testing.assert_array_equal(out.lower, [False, True, False, True, False, False])
  np.testing.assert_array_equal(out.upper, [True, True, False, True, True, True])
  ints = ibp(lambda x: x.astype(jnp.int32).astype(bool), Interval(lower, upper))
  np.testing.assert_array_equal(ints.lower, [False, False, False, True, False, False])
  np.testing.assert_array_equal(ints.upper, [True, True, False, True, True, True])
  # ...so that a select on it keeps both branches where 0 is in the box.
  select = ibp(lambda x: jnp.where(x.astype(bool), 1.0, -1.0), Interval(lower, upper))
  np.testing.assert_array_equal(select.lower, [-1, 1, -1, 1, -1, -1])
  np.testing.assert_array_equal(select.upper, [1, 1, -1, 1, 1, 1])


@pytest.mark.parametrize("op", ["and", "or", "xor"])
def test_integer_bitwise_operations_are_refused(op):
  fn = {"and": lambda x: x.astype(jnp.int32) & 1, "or": lambda x: x.astype(jnp.int32) | 1,
        "xor": lambda x: x.astype(jnp.int32) ^ 1}[op]
  with pytest.raises(UnsupportedPrimitiveError, match="not monotone"):
    ibp(fn, Interval(jnp.array([0.0]), jnp.array([3.0])))


def test_boolean_logic_is_sound_and_exact():
  fns = {
      "and": lambda x: (x > 0) & (x < 1),
      "or": lambda x: (x < 0) | (x > 1),
      "xor": lambda x: (x > 0) ^ (x > 0.5),
      "not": lambda x: ~(x > 0),
      "any_all": lambda x: jnp.stack([jnp.any(x > 0.5), jnp.all(x > -0.5)]),
  }
  lowers = [-1.0, 0.2, 0.6, -0.2, 0.7, 2.0]
  uppers = [-0.5, 0.4, 0.9, 0.3, 1.5, 3.0]
  for name, fn in fns.items():
    for low, high in zip(lowers, uppers):
      out = ibp(fn, Interval(jnp.array([low]), jnp.array([high])))
      grid = np.linspace(low, high, 201, dtype=np.float32)[:, None]
      values = np.asarray(jax.vmap(fn)(grid))
      # lower = certainly True, upper = possibly True: the exact three-valued answer.
      np.testing.assert_array_equal(out.lower, values.all(0), err_msg=f"{name} [{low}, {high}]")
      np.testing.assert_array_equal(out.upper, values.any(0), err_msg=f"{name} [{low}, {high}]")


def test_integer_not_and_wrapping_conversions_are_sound():
  cases = {
      "not": (lambda x: ~x, jnp.int32, (-3, 2)),
      "to_int8": (lambda x: x.astype(jnp.int8), jnp.int32, (100, 200)),
      "to_uint32": (lambda x: x.astype(jnp.uint32), jnp.int32, (-2, 3)),
      "uint_to_int32": (lambda x: x.astype(jnp.int32), jnp.uint32, (2 ** 31 - 2, 2 ** 31 + 2)),
      "float_to_int8": (lambda x: x.astype(jnp.int8), jnp.float32, (100.0, 300.0)),
  }
  for name, (fn, dtype, (low, high)) in cases.items():
    box = Interval(jnp.array([low], dtype), jnp.array([high], dtype))
    out = ibp(fn, box)
    values = np.asarray(fn(jnp.asarray(np.arange(low, high + 1).astype(dtype))))
    assert np.all(np.asarray(out.lower) <= values) and np.all(values <= np.asarray(out.upper)), (
        name, out, values.min(), values.max())


# ----------------------------------------------------------------------------
# 4. Floating-point soundness (sound_rounding).

# x @ W1 + b1 with cancellation: 1e4 + x2 rounds to 1e4 in float32 when
# x2 < half an ulp of 1e4 (2^-11), and to 1e4 + 2^-10 above it. Centre-radius
# IBP sees x2 in [0, 0.75 ulp] through its midpoint 0.375 ulp, so both ends
# of the first layer round to 1e4 and the bounds collapse to [0, 0] -- wrong
# in exact arithmetic (up to 0.73 after the x1000 layer) and in float32
# (0.977 at the vertex x2 = 0.75 ulp).
CANCEL_X2 = 0.75 * 2.0 ** -10
CANCEL_BOX = Interval(jnp.array([[1.0, 0.0]]), jnp.array([[1.0, CANCEL_X2]]))


def _cancelling_net(x):
  w1 = jnp.array([[1e4], [1.0]], jnp.float32)
  h = jax.nn.relu(x @ w1 - 1e4)
  return h @ jnp.array([[1000.0]], jnp.float32)


def _cancelling_net_float64(x):
  x = np.asarray(x, np.float64)
  return np.maximum(x @ np.array([[1e4], [1.0]]) - 1e4, 0) @ np.array([[1000.0]])


def test_sound_rounding_contains_the_float32_network_where_plain_ibp_misses_it():
  vertex = jnp.array([[1.0, CANCEL_X2]])
  f32_value = float(jax.jit(_cancelling_net)(vertex)[0, 0])
  f64_value = float(_cancelling_net_float64(vertex)[0, 0])
  assert f32_value == pytest.approx(1000 * 2.0 ** -10) and f64_value == pytest.approx(
      1000 * CANCEL_X2)
  plain = jax.jit(lambda b: ibp(_cancelling_net, b))(CANCEL_BOX)
  assert float(plain.upper[0, 0]) < f64_value  # the plain bound is wrong, even in exact arithmetic
  sound = jax.jit(lambda b: ibp(_cancelling_net, b, sound_rounding=True))(CANCEL_BOX)
  samples = sample_box(70, CANCEL_BOX, 512)
  for outputs in (jax.vmap(_cancelling_net)(samples), _cancelling_net_float64(samples)):
    assert max_violation(sound, outputs, rtol=0.0) <= 0.0
  assert float(sound.upper[0, 0]) >= f32_value
  # Linear bounds: the same collapse, the same repair.
  spec = jnp.ones((1, 1))
  for method in (crown_ibp, crown):
    assert float(method(_cancelling_net, CANCEL_BOX, spec).upper[0, 0]) < f64_value
    sound_linear = method(_cancelling_net, CANCEL_BOX, spec, sound_rounding=True)
    assert float(sound_linear.upper[0, 0]) >= f32_value, method.__name__
    assert float(sound_linear.lower[0, 0]) <= 0.0, method.__name__
  assert float(ibp_spec(_cancelling_net, CANCEL_BOX, spec,
                        sound_rounding=True).upper[0, 0]) >= f32_value


def _wide_range_mlp(seed):
  """8-16-16-4 ReLU MLP with weights and biases spread over 4-5 decades (cancellation)."""
  r = np.random.default_rng(seed)
  sizes = [8, 16, 16, 4]
  return [((r.standard_normal((m, n)) * 10 ** r.uniform(-1, 3, (m, n))).astype(np.float32),
           (r.standard_normal(n) * 10 ** r.uniform(-1, 4, n)).astype(np.float32))
          for m, n in itertools.pairwise(sizes)]


def _mlp_relu(params, x, xp=jnp):
  for w, b in params[:-1]:
    x = xp.maximum(x @ w + b, 0)
  w, b = params[-1]
  return x @ w + b


@functools.partial(jax.jit, static_argnums=2)
def _wide_range_bounds(params, box, sound):
  fn = functools.partial(_mlp_relu, params)
  spec = jnp.eye(4)[None]
  return {"ibp": ibp(fn, box, sound_rounding=sound),
          "ibp_spec": ibp_spec(fn, box, spec, sound_rounding=sound),
          "crown_ibp": crown_ibp(fn, box, spec, sound_rounding=sound),
          "crown": crown(fn, box, spec, sound_rounding=sound)}


def test_sound_bounds_hold_where_plain_ones_fail_on_wide_range_networks():
  # With weights over several decades, tiny boxes and cancellation, the plain
  # linear bounds miss float32 (and exact) outputs on most such networks; the
  # sound ones never may.
  missed = {}
  for seed in range(3):
    params = _wide_range_mlp(seed)
    r = np.random.default_rng(100 + seed)
    box = linf_ball(r.uniform(0, 1, (1, 8)).astype(np.float32), float(10 ** r.uniform(-7, -3)),
                    clip=None)
    samples = sample_box(101 + seed, box, 2048)
    out32 = np.asarray(jax.jit(jax.vmap(functools.partial(_mlp_relu, params)))(samples))
    params64 = [(np.float64(w), np.float64(b)) for w, b in params]
    out64 = _mlp_relu(params64, np.asarray(samples, np.float64), np)
    for sound in (False, True):
      for name, bounds in _wide_range_bounds(params, box, sound).items():
        for outputs in (out32, out64):
          if max_violation(bounds, outputs, rtol=0.0) > 0.0:
            missed.setdefault((name, sound), []).append(seed)
  assert not [key for key in missed if key[1]], missed
  assert ("crown_ibp", False) in missed and ("crown", False) in missed  # the test bites


def test_sound_widening_of_a_dot_product_is_at_least_highams_bound():
  n = 64
  w = normal(71, (n, 8), 3.0)
  center = normal(72, (4, n))
  box = Interval.from_center_radius(center, 0.25)
  plain, sound = jax.jit(lambda b: (ibp(lambda x: x @ w, b),
                                    ibp(lambda x: x @ w, b, sound_rounding=True)))(box)
  # |fl(sum) - sum| <= gamma_n sum |terms| (Higham 2002, Thm 3.1), gamma_n = n u / (1 - n u).
  gamma = n * F32_UNIT_ROUNDOFF / (1 - n * F32_UNIT_ROUNDOFF)
  magnitude = np.maximum(np.abs(np.asarray(box.lower, np.float64)),
                         np.abs(np.asarray(box.upper, np.float64)))
  higham = gamma * magnitude @ np.abs(np.asarray(w, np.float64))
  assert np.all(np.asarray(sound.lower, np.float64) <= np.asarray(plain.lower) - higham)
  assert np.all(np.asarray(sound.upper, np.float64) >= np.asarray(plain.upper) + higham)
  # ...and not absurdly more (a widening that hides everything is no bound).
  assert np.all(np.asarray(plain.lower) - np.asarray(sound.lower) <= 100 * higham + 1e-30)


def _mlp(params, x, xp):
  """Affine, tanh, division, exp, mean: written for jnp (float32) and numpy (float64)."""
  (w1, b1), (w2, b2) = params
  h = xp.tanh(x @ w1 + b1)
  h = h / (1.5 + h * h) + xp.exp(0.5 * h)
  h = h - xp.mean(h, axis=-1, keepdims=True)
  return xp.maximum(h, 0.1 * h) @ w2 + b2


def test_sound_ibp_contains_plain_ibp_and_float32_and_float64_evaluations():
  params = [(normal(73, (6, 16), 2.0), normal(74, (16,))), (normal(75, (16, 3), 2.0),
                                                             normal(76, (3,)))]
  box = linf_ball(uniform(77, (2, 6), -1.0, 1.0), 0.05, clip=None)
  fn = functools.partial(_mlp, params, xp=jnp)
  plain, sound = jax.jit(lambda b: (ibp(fn, b), ibp(fn, b, sound_rounding=True)))(box)
  assert np.all(sound.lower < plain.lower) and np.all(sound.upper > plain.upper)
  np.testing.assert_allclose(sound.lower, plain.lower, rtol=1e-3, atol=1e-3)
  samples = sample_box(78, box, 2048)
  f32 = jax.jit(jax.vmap(fn))(samples)
  params64 = [(np.float64(w), np.float64(b)) for w, b in params]
  f64 = _mlp(params64, np.asarray(samples, np.float64), np)
  for outputs in (f32, f64):
    assert max_violation(sound, outputs, rtol=0.0) <= 0.0


@pytest.mark.parametrize("act_name", ["relu", "tanh", "gelu", "silu", "elu"])
def test_sound_ibp_on_every_layer_type(act_name):
  # Grouped/strided/dilated convolutions, BatchNorm, a residual, average and
  # max pooling, dense layers and several activations, in the sound mode.
  from tests.bounds.test_ibp import ACTIVATIONS, INPUT_SHAPE, _KitchenSink
  model = _KitchenSink(ACTIVATIONS[act_name])
  x = uniform(81, INPUT_SHAPE)
  logits_fn = functools.partial(model.apply, init_variables(model, x, 82))
  box = linf_ball(x, 0.1)
  plain, sound = jax.jit(lambda b: (ibp(logits_fn, b), ibp(logits_fn, b, sound_rounding=True)))(
      box)
  assert np.all(sound.lower < plain.lower) and np.all(sound.upper > plain.upper)
  np.testing.assert_allclose(sound.upper, plain.upper, rtol=1e-3, atol=1e-3)
  outputs = jax.jit(jax.vmap(logits_fn))(sample_box(83, box, 1024))
  assert max_violation(sound, outputs, rtol=0.0) <= 0.0


class _ResidualMLP(nn.Module):
  """A value used twice (the residual): its cotangents are summed."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = x.reshape((x.shape[0], -1))
    h = nn.relu(nn.Dense(8)(x))
    h = h + nn.relu(nn.Dense(8)(h))
    return nn.Dense(3)(nn.relu(nn.Dense(8)(h)))


@pytest.fixture(scope="module", params=["cnn", "residual"])
def sound_and_plain(request, tiny_cnn):
  model, variables, x, y = tiny_cnn
  if request.param == "residual":
    model = _ResidualMLP()
    variables = init_variables(model, x, 62)
  logits_fn = functools.partial(model.apply, variables)
  box = linf_ball(x, 0.05)
  spec = margin_spec(y, 3)

  @jax.jit
  def both(box):
    out = {}
    for sound in (False, True):
      out[sound] = {
          "crown_ibp": crown_ibp(logits_fn, box, spec, sound_rounding=sound),
          "crown": crown(logits_fn, box, spec, sound_rounding=sound),
          "ibp_spec": ibp_spec(logits_fn, box, spec, sound_rounding=sound),
          "ibp_margins": ibp_margins(logits_fn, box, y, sound_rounding=sound),
      }
      pre = crown_pre_activation_bounds(logits_fn, box, sound_rounding=sound)
      out[sound]["pre"] = Interval(jnp.concatenate([b.lower.ravel() for b in pre.values()]),
                                   jnp.concatenate([b.upper.ravel() for b in pre.values()]))
    return out

  samples = sample_box(79, box, 2048)
  margins = jnp.einsum("bkc,nbc->nbk", spec, jax.jit(jax.vmap(logits_fn))(samples))
  return both(box), margins, (logits_fn, x, y)


def test_sound_linear_bounds_contain_the_plain_ones(sound_and_plain):
  bounds, margins, _ = sound_and_plain
  for name in bounds[False]:
    plain, sound = bounds[False][name], bounds[True][name]
    assert np.all(sound.lower < plain.lower), name
    assert np.all(sound.upper > plain.upper), name
    # Rounding costs digits, not the certificate.
    np.testing.assert_allclose(sound.lower, plain.lower, rtol=1e-3, atol=1e-4, err_msg=name)
    if name != "pre":
      assert max_violation(sound, margins, rtol=0.0) <= 0.0, name


def test_sound_verified_accuracy_and_margins(sound_and_plain):
  _, _, (logits_fn, x, y) = sound_and_plain
  for method in ("ibp", "crown_ibp", "crown"):
    plain = margin_lower_bounds(logits_fn, x, y, 0.01, method)
    sound = margin_lower_bounds(logits_fn, x, y, 0.01, method, sound_rounding=True)
    assert np.all(sound < plain), method
    np.testing.assert_allclose(sound, plain, rtol=1e-3, atol=1e-4)
    if method == "crown_ibp":  # verified_accuracy passes the option through (one method:
      # every call compiles, and compile time dominates this file)
      result = verified_accuracy(logits_fn, x, y, 0.01, method, sound_rounding=True)
      np.testing.assert_array_equal(result.margin_lower, sound)
      assert result.accuracy <= verified_accuracy(logits_fn, x, y, 0.01, method).accuracy


def test_sound_ball_is_rounded_outward():
  x = uniform(80, (4096,))
  eps = 0.1  # not a float32 number: the ball must hold the real radius too
  plain, sound = linf_ball(x, eps, clip=None), linf_ball(x, eps, clip=None, sound_rounding=True)
  x64 = np.asarray(x, np.float64)
  assert np.all(np.asarray(sound.lower, np.float64) <= x64 - eps)
  assert np.all(np.asarray(sound.upper, np.float64) >= x64 + eps)
  assert np.all(sound.lower <= plain.lower) and np.all(sound.upper >= plain.upper)


def test_sound_rounding_refuses_operations_without_an_error_model():
  box = Interval(jnp.zeros(4), jnp.ones(4))
  fn = lambda x: jax.lax.cumlogsumexp(x)
  ibp(fn, box)  # fine without the mode
  with pytest.raises(UnsupportedPrimitiveError, match="sound_rounding.*cumlogsumexp"):
    ibp(fn, box, sound_rounding=True)


def test_verify_config_has_sound_rounding_off_by_default():
  from certjax.evaluation import verified as verified_evaluator
  config = verified_evaluator.default_config()
  assert config.sound_rounding is False
  verified_evaluator.validate_settings(config)
  config.sound_rounding = True
  verified_evaluator.validate_settings(config)
  bad = ml_collections.ConfigDict(dict(config.to_dict(), sound_rounding="yes"))
  with pytest.raises(ValueError, match="verify.sound_rounding"):
    verified_evaluator.validate_settings(bad)
