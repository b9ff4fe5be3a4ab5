"""Im2colConv computes what nn.Conv computes, on the same variables.

Shapes are tiny: every case compiles a forward and two gradients twice (once
per implementation), and compile time is the cost here.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from certjax import bounds, models
from certjax.models.layers import CONV_IMPLS, Im2colConv
from certjax.training import config as config_lib


def _uniform(seed, shape):
  return np.random.default_rng(seed).uniform(0, 1, shape).astype(np.float32)


# (input HxW, C_in, C_out, kernel, stride, padding, bias): every padding form
# nn.Conv takes that certjax models use, odd sizes so that 'SAME' pads
# asymmetrically and strided slices leave a remainder.
CASES = [
    (7, 2, 3, 3, 1, "SAME", True),
    (7, 2, 3, 3, 2, "SAME", False),
    (8, 1, 4, 4, 2, "VALID", True),
    (9, 3, 2, 3, 2, 1, True),
    (6, 2, 3, 1, 2, 0, False),
    (7, 2, 2, 3, 1, ((1, 0), (2, 1)), True),
]


@pytest.mark.parametrize("size,c_in,c_out,kernel,stride,padding,bias", CASES)
def test_matches_nn_conv_values_and_gradients(size, c_in, c_out, kernel, stride, padding, bias):
  kwargs = dict(features=c_out, kernel_size=(kernel, kernel), strides=(stride, stride),
                padding=padding, use_bias=bias)
  reference, im2col = nn.Conv(**kwargs), Im2colConv(**kwargs)
  x = _uniform(0, (2, size, size, c_in))
  variables = reference.init(jax.random.key(0), x)
  # The same parameter tree: checkpoints are interchangeable.
  assert (jax.tree_util.tree_structure(im2col.init(jax.random.key(0), x))
          == jax.tree_util.tree_structure(variables))
  assert jax.tree_util.tree_map(jnp.shape, im2col.init(jax.random.key(0), x)) == \
      jax.tree_util.tree_map(jnp.shape, variables)
  weights = _uniform(1, reference.apply(variables, x).shape)

  def outputs(module):
    # One jit per module: eager ops would each compile a program.
    @jax.jit
    def run(v, x):
      apply = lambda v, x: module.apply(v, x)
      loss = lambda v, x: jnp.sum(jnp.sin(apply(v, x)) * weights)
      grad_v, grad_x = jax.grad(loss, argnums=(0, 1))(v, x)
      return apply(v, x), grad_x, grad_v
    return run(variables, x)

  expected, got = outputs(reference), outputs(im2col)
  assert got[0].shape == expected[0].shape
  for e, g in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(got)):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_get_model_option_same_logits_and_bounds():
  stats = dict(num_classes=5, mean=(0.5,), std=(0.25,))
  xla_model = models.get_model("ibp_small", **stats)
  im2col_model = models.get_model("ibp_small", conv_impl="im2col", **stats)
  x = _uniform(2, (3, 16, 16, 1))
  variables = models.init_variables(xla_model, jax.random.key(3, impl="rbg"), x.shape)
  xla_fn = models.make_logits_fn(xla_model, variables)
  im2col_fn = models.make_logits_fn(im2col_model, variables)
  np.testing.assert_allclose(im2col_fn(x), xla_fn(x), rtol=1e-5, atol=1e-5)
  # IBP meets pad / slice / concatenate / dot_general instead of a convolution
  # and gives the same interval.
  box = bounds.linf_ball(x, 0.02)
  expected, got = bounds.ibp(xla_fn, box), bounds.ibp(im2col_fn, box)
  np.testing.assert_allclose(got.lower, expected.lower, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got.upper, expected.upper, rtol=1e-5, atol=1e-5)
  assert np.all(got.lower <= im2col_fn(x) + 1e-5) and np.all(im2col_fn(x) <= got.upper + 1e-5)
  # CROWN-IBP's backward pass goes through the transposes of those ops.
  spec = bounds.margin_spec(np.array([0, 1, 2]), 5)
  np.testing.assert_allclose(bounds.crown_ibp(im2col_fn, box, spec),
                             bounds.crown_ibp(xla_fn, box, spec), rtol=1e-5, atol=1e-4)


def test_bad_conv_impl_is_an_error():
  assert CONV_IMPLS == ("xla", "im2col")
  with pytest.raises(ValueError, match="conv_impl.*'xla', 'im2col'"):
    models.get_model("ibp_small", num_classes=10, mean=(0.5,), std=(0.25,), conv_impl="fast")
  config = config_lib.base_config()
  assert config.model.conv_impl == "xla"
  config.model.conv_impl = "auto"
  with pytest.raises(ValueError, match="model.conv_impl.*'xla', 'im2col'"):
    config_lib.validate_config(config)
