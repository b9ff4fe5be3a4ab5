"""Tests for the Interval pytree, linf_ball and input validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from certjax.bounds import Interval, check_interval, ibp, linf_ball


def test_interval_is_an_immutable_pytree_with_helpers():
  box = Interval.from_center_radius(jnp.array([1.0, -2.0]), 0.5)
  np.testing.assert_allclose(box.lower, [0.5, -2.5])
  np.testing.assert_allclose(box.upper, [1.5, -1.5])
  np.testing.assert_allclose(box.center, [1.0, -2.0])
  np.testing.assert_allclose(box.radius, [0.5, 0.5])
  assert box.shape == (2,)
  leaves, treedef = jax.tree.flatten(box)
  assert len(leaves) == 2 and isinstance(jax.tree.unflatten(treedef, leaves), Interval)
  doubled = jax.tree.map(lambda a: 2 * a, box)
  assert isinstance(doubled, Interval)
  np.testing.assert_allclose(doubled.upper, [3.0, -3.0])
  with pytest.raises(AttributeError):
    box.lower = jnp.zeros(2)


def test_linf_ball_clips_to_pixel_range():
  x = jnp.array([[0.0, 0.5, 0.98]])
  box = linf_ball(x, 0.1)
  np.testing.assert_allclose(box.lower, [[0.0, 0.4, 0.88]], atol=1e-6)
  np.testing.assert_allclose(box.upper, [[0.1, 0.6, 1.0]], atol=1e-6)
  unclipped = linf_ball(jnp.array([-3.0]), 1.0, clip=None)
  np.testing.assert_allclose([unclipped.lower[0], unclipped.upper[0]], [-4.0, -2.0])
  zero = linf_ball(x, 0.0)
  np.testing.assert_array_equal(zero.lower, zero.upper)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_non_finite_centre_is_reported_as_such(dtype):
  # NaN passes every comparison: it used to be reported as out of [0, 1]
  # with a range of finite values, "got values in [0, 1]".
  x = jnp.array([[0.0, jnp.nan, 1.0, 0.5]], dtype)
  with pytest.raises(ValueError, match=r"x must be finite; got 1 NaN and 0 Inf of its 4 "
                     r"values \(the first at index \(0, 1\): nan\)"):
    linf_ball(x, 0.1)
  with pytest.raises(ValueError, match="got 1 NaN and 2 Inf"):
    linf_ball(x.at[0, 2:].set(jnp.inf), 0.1, clip=None)
  with pytest.raises(ValueError, match="got 0 NaN and 1 Inf"):
    linf_ball(jnp.array([-jnp.inf, 0.5], dtype), 0.1)


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
    linf_ball(jnp.zeros(3), -0.1)
  with pytest.raises(ValueError, match=r"x must lie in \[0.0, 1.0\]"):
    linf_ball(jnp.array([1.5]), 0.1)
  with pytest.raises(ValueError, match="lower > upper"):
    check_interval(Interval(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])))
  with pytest.raises(ValueError, match="shape"):
    check_interval(Interval(jnp.zeros(2), jnp.zeros(3)))
  with pytest.raises(TypeError, match="Interval"):
    check_interval((jnp.zeros(2), jnp.ones(2)))
  with pytest.raises(ValueError, match="lower > upper"):
    ibp(lambda v: 2 * v, Interval(jnp.ones(2), jnp.zeros(2)))
