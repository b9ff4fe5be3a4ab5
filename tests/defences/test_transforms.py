"""Input-transformation defences and BPDA: oracles (Pillow, scipy, by hand), jit/vmap, errors."""

import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import scipy.ndimage

from certjax import attacks
from certjax import data as data_lib
from certjax.attacks import eot
from certjax.defences import bpda
from certjax.defences import transforms

# Tiny programs run for milliseconds: skip XLA's backend optimisations.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

SHAPE = (2, 8, 8, 3)
# Settings small enough for 8x8 images and few steps.
SMALL = {"tvm": {"num_steps": 10}, "resize_pad": {"min_size": 4}, "thermometer": {"levels": 4}}


def _images(shape=SHAPE, seed=0):
  return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _compiled(name):
  """The transform `name` at the test settings, with its forward pass jitted and
  vmapped-and-jitted once for all tests."""
  t = transforms.get_transform(name, **SMALL.get(name, {}))
  return t, fast_jit(t.forward), fast_jit(jax.vmap(t.forward))


@functools.lru_cache(maxsize=None)
def _digits(n=64):
  """Real MNIST test digits (the embedded set), byte-valued floats in [0, 1]."""
  return data_lib.load_arrays({"name": "mnist5k"}, "test", 0, n)[0]


def _pillow_round_trip(image, quality, **options):
  """The JPEG round trip done directly with Pillow, independently of certjax."""
  pixels = np.round(image * 255).astype(np.uint8)
  buffer = io.BytesIO()
  PIL.Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(
      buffer, format="JPEG", quality=quality, **options)
  buffer.seek(0)
  return np.asarray(PIL.Image.open(buffer), np.float32).reshape(image.shape) / 255


# ----------------------------------------------------------------------------
# Every transform: shapes, dtypes, range, jit and vmap.


@pytest.mark.parametrize("name", transforms.TRANSFORM_NAMES)
def test_shape_dtype_range_jit_and_vmap(name):
  t, forward, vmapped = _compiled(name)
  x = _images()
  key = jax.random.key(0)
  out = np.asarray(forward(key, x))
  channels = SHAPE[-1] * t.output_channels_factor
  assert out.shape == SHAPE[:3] + (channels,) and out.dtype == np.float32
  assert 0 <= out.min() <= out.max() <= 1
  approx = jax.eval_shape(t.approximation, key, x)
  assert approx.shape == out.shape and approx.dtype == np.float32
  # vmap over stacked batches and keys equals one call per batch.
  xs = np.stack([x, _images(seed=1)])
  keys = jax.random.split(key, 2)
  stacked = np.asarray(vmapped(keys, xs))
  for i in range(2):
    np.testing.assert_allclose(stacked[i], forward(keys[i], xs[i]), atol=1e-6)


def test_identity_and_defended_logits_fn():
  x = _images()
  t = transforms.get_transform("identity")
  np.testing.assert_array_equal(t.forward(jax.random.key(0), x), x)
  model = lambda inputs: inputs.reshape(inputs.shape[0], -1)[:, :3] * 2
  defended = transforms.defended_logits_fn(model, transforms.get_transform("bit_depth", bits=1))
  np.testing.assert_array_equal(defended(jax.random.key(0), x), model(np.round(x)))


# ----------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("call, message", [
    (lambda: transforms.get_transform("jepg"), r"Unknown transform 'jepg'.*Did you mean 'jpeg'"),
    (lambda: transforms.get_transform("jpeg", qualty=75),
     r"Unknown setting 'qualty' of transform 'jpeg'.*quality, approximation.*'quality'"),
    (lambda: transforms.get_transform("jpeg", quality=0),
     r"quality must be an integer in \[1, 100\]"),
    (lambda: transforms.get_transform("jpeg", quality=101), r"got 101"),
    (lambda: transforms.jpeg(_images(), 75.5), r"quality must be an integer"),
    (lambda: transforms.get_transform("jpeg", approximation="bpda"), r"Unknown approximation"),
    (lambda: transforms.jpeg(_images((1, 8, 8, 2)), 75), r"1 channel\) or RGB.*got 2 channels"),
    (lambda: transforms.get_transform("bit_depth", bits=0), r"bits must be an integer >= 1"),
    (lambda: transforms.get_transform("median", size=0), r"size must be an integer >= 1"),
    (lambda: transforms.get_transform("thermometer", levels=1), r"levels must be an integer >= 2"),
    (lambda: transforms.get_transform("resize_pad", min_size=9).forward(
        jax.random.key(0), _images()), r"min_size must be an integer in \[1, 8\], got 9"),
    (lambda: transforms.get_transform("resize_pad", method="cubic"), r"Unknown method 'cubic'"),
    (lambda: transforms.get_transform("tvm", drop_probability=1.0), r"drop_probability.*\[0, 1\)"),
    (lambda: transforms.get_transform("tvm", drop_probability=-0.1), r"got -0.1"),
    (lambda: transforms.get_transform("tvm", weight=-1.0), r"weight must be a finite number >= 0"),
    (lambda: transforms.bit_depth(np.zeros((8, 8, 1), np.float32), 1), r"rank 4"),
    (lambda: transforms.median_filter(_images() * 2, 3), r"must lie in \[0.0, 1.0\]"),
])
def test_bad_input_raises_a_clear_error(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_compose_and_bpda_reject_non_transforms():
  with pytest.raises(TypeError, match="InputTransforms"):
    transforms.compose(lambda key, x: x)
  with pytest.raises(TypeError, match="InputTransform"):
    bpda.bpda_transform(lambda key, x: x)


# ----------------------------------------------------------------------------
# Oracles.


@pytest.mark.parametrize("quality", [10, 75, 95])
def test_jpeg_is_the_pillow_codec_bit_exactly(quality):
  digits = _digits()[:8]  # grayscale, Pillow mode 'L'
  rgb = _images((2, 12, 12, 3), seed=3)  # RGB, 4:2:0 subsampled, padded to 16x16
  for x in (digits, rgb):
    out = np.asarray(transforms.jpeg(x, quality))
    expected = np.stack([_pillow_round_trip(image, quality) for image in x])
    np.testing.assert_array_equal(out, expected)
  assert not np.array_equal(out, rgb)


def test_jpeg_gradient_as_written_is_zero_and_its_bpda_gradient_is_not():
  x = jnp.asarray(_digits()[:4])
  t = transforms.get_transform("jpeg")
  loss = lambda f: lambda inputs: jnp.sum(f(jax.random.key(0), inputs) * x)
  np.testing.assert_array_equal(jax.grad(loss(t.forward))(x), 0)
  # Identity approximation: the BPDA gradient of sum(f(x) * c) is c.
  np.testing.assert_allclose(jax.grad(loss(bpda.bpda_transform(t).forward))(x), x)


def test_differentiable_jpeg_is_close_to_pillow_and_has_gradients():
  digits = _digits()
  exact = np.asarray(transforms.jpeg(digits, 75))
  approx = np.asarray(transforms.jpeg_differentiable(digits, 75))
  # Measured on these 64 digits: mean 0.0017 (0.43 / 255), max 0.056, while
  # the codec itself moves the digits by 0.0095 on average.
  assert np.abs(approx - exact).mean() < 0.003
  assert np.abs(approx - exact).max() < 0.1
  assert np.abs(approx - exact).mean() < 0.25 * np.abs(exact - digits).mean()
  # RGB against Pillow without chroma subsampling (4:4:4), as approximated.
  rgb = scipy.ndimage.gaussian_filter(_images((2, 20, 20, 3), seed=4), (0, 2, 2, 0))
  rgb = (rgb - rgb.min()) / (rgb.max() - rgb.min())
  expected = np.stack([_pillow_round_trip(image, 75, subsampling=0) for image in rgb])
  # Measured: mean 0.0041.
  assert np.abs(np.asarray(transforms.jpeg_differentiable(rgb, 75)) - expected).mean() < 0.008
  grad = jax.grad(lambda v: jnp.sum(transforms.jpeg_differentiable(v, 75) ** 2))(digits[:4])
  assert np.all(np.isfinite(grad)) and np.mean(np.asarray(grad) != 0) > 0.5
  t = transforms.get_transform("jpeg", approximation="differentiable")
  np.testing.assert_array_equal(t.approximation(None, digits[:4]),
                                transforms.jpeg_differentiable(digits[:4], 75))


def test_quantization_tables_follow_libjpeg_scaling():
  tables = transforms.jpeg_quantization_tables(50)  # scale 100: Annex K itself
  assert tables[0, 0, 0] == 16 and tables[0, 7, 7] == 99 and tables[1, 0, 0] == 17
  assert transforms.jpeg_quantization_tables(100).max() == 1
  assert transforms.jpeg_quantization_tables(1).max() == 255  # baseline clamp
  assert transforms.jpeg_quantization_tables(75)[0, 0, 0] == 8  # (16 * 50 + 50) // 100


@pytest.mark.parametrize("size", [1, 2, 3, 4, 6])  # 6: the jnp.sort path
def test_median_matches_scipy(size):
  x = _images((2, 7, 7, 2), seed=size)
  expected = scipy.ndimage.median_filter(x, size=(1, size, size, 1), mode="reflect")
  np.testing.assert_array_equal(transforms.median_filter(x, size), expected)


def test_bit_depth_rounds_to_the_grid():
  x = np.array([0.0, 0.1, 0.49, 0.51, 0.7, 1.0], np.float32).reshape(1, 1, 6, 1)
  np.testing.assert_array_equal(transforms.bit_depth(x, 1).ravel(), [0, 0, 0, 1, 1, 1])
  np.testing.assert_allclose(transforms.bit_depth(x, 2).ravel(),
                             [0, 0, 1 / 3, 2 / 3, 2 / 3, 1], rtol=1e-6)


def test_thermometer_against_a_hand_computed_example():
  # levels 4: thresholds 0, 1/4, 1/2, 3/4, channel c * 4 + k = [x_c > k / 4].
  x = np.array([[0.0, 0.9], [0.2, 0.5], [0.25, 0.6], [1.0, 0.75]], np.float32)
  x = x.reshape(1, 1, 4, 2)
  expected = [[0, 0, 0, 0, 1, 1, 1, 1],
              [1, 0, 0, 0, 1, 1, 0, 0],
              [1, 0, 0, 0, 1, 1, 1, 0],
              [1, 1, 1, 1, 1, 1, 1, 0]]
  out = transforms.thermometer_encode(x, 4)
  np.testing.assert_array_equal(out.reshape(4, 8), expected)
  np.testing.assert_array_equal(jax.grad(lambda v: transforms.thermometer_encode(v, 4).sum())(x),
                                0)
  soft_grad = jax.grad(lambda v: transforms.soft_thermometer(v, 4).sum())(x)
  # Inside (0, 1) the soft code's channels sum to 4 x: gradient 4 (a kink aside).
  np.testing.assert_allclose(np.asarray(soft_grad).ravel()[[1, 2, 5]], 4.0)


@pytest.mark.parametrize("levels", [2, 5, 16])
def test_soft_thermometer_equals_the_hard_one_at_grid_points(levels):
  grid = (np.arange(levels + 1, dtype=np.float32) / levels).reshape(1, 1, -1, 1)
  hard = transforms.thermometer_encode(grid, levels)
  np.testing.assert_allclose(transforms.soft_thermometer(grid, levels), hard, atol=1e-6)
  # And differs from it between grid points.
  middle = grid[:, :, :-1] + 0.5 / levels
  assert np.abs(np.asarray(transforms.soft_thermometer(middle, levels))
                - np.asarray(transforms.thermometer_encode(middle, levels))).max() == 0.5


@pytest.mark.parametrize("name", ["tvm", "resize_pad"])
def test_randomized_transforms_depend_on_the_key_only(name):
  t, forward, _ = _compiled(name)
  assert t.randomized
  x = _images()
  a, b = (np.asarray(forward(jax.random.key(k), x)) for k in (1, 1))
  c = np.asarray(forward(jax.random.key(2), x))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  for fixed in ("bit_depth", "median", "jpeg", "thermometer"):
    t = transforms.get_transform(fixed)
    assert not t.randomized
    np.testing.assert_array_equal(t.forward(jax.random.key(1), x), t.forward(jax.random.key(2), x))


def test_tvm_reduces_total_variation_and_keeps_the_kept_pixels():
  x = _digits()[:8, 4:20, 4:20]
  key = jax.random.key(0)
  out = np.asarray(transforms.tv_minimization(key, x, drop_probability=0.5, weight=0.05,
                                              num_steps=40))
  keep = fast_jit(lambda k: jax.random.bernoulli(k, 0.5, x.shape[:3] + (1,)))(key)
  keep = np.broadcast_to(np.asarray(keep), x.shape)
  assert 0.4 < keep.mean() < 0.6
  tv_out, tv_x = np.asarray(transforms.total_variation(out)), np.asarray(
      transforms.total_variation(x))
  assert np.all(tv_out < 0.95 * tv_x)
  kept_error = np.abs(out - x)[keep].mean()
  dropped_error = np.abs(out - x)[~keep].mean()
  # Measured: 0.02 on kept pixels, 0.10 on dropped ones (filled in by TV alone).
  assert kept_error < 0.04 and kept_error < 0.5 * dropped_error
  # Without dropout and TV weight the solution is x itself.
  same = transforms.tv_minimization(key, x, drop_probability=0.0, weight=0.0, num_steps=40)
  np.testing.assert_allclose(same, x, atol=1e-6)


def test_resize_pad_places_an_r_by_r_image_with_r_in_range():
  ones = np.ones((64, 8, 8, 1), np.float32)
  for method in transforms.RESIZE_METHODS:
    out = np.asarray(transforms.random_resize_pad(jax.random.key(0), ones, min_size=5,
                                                  method=method))
    rows, cols = (out[..., 0] > 0.5).any(axis=2).sum(1), (out[..., 0] > 0.5).any(axis=1).sum(1)
    np.testing.assert_array_equal(rows, cols)
    np.testing.assert_allclose(out.sum(axis=(1, 2, 3)), rows ** 2, atol=1e-4)
    assert set(rows.tolist()) == {5, 6, 7, 8}
  # Nearest neighbour at full size and offset 0 is the identity.
  x = _images((64, 8, 8, 1))
  np.testing.assert_array_equal(transforms.random_resize_pad(jax.random.key(0), x, min_size=8), x)


def test_compose_runs_left_to_right_with_folded_keys():
  x = _images()
  key = jax.random.key(3)
  tvm = transforms.get_transform("tvm", num_steps=5)
  therm = transforms.get_transform("thermometer", levels=3)
  both = transforms.compose(tvm, therm)
  assert both.name == "tvm+thermometer" and both.randomized and both.output_channels_factor == 3
  expected = therm.forward(None, tvm.forward(jax.random.fold_in(key, 0), x))
  np.testing.assert_array_equal(both.forward(key, x), expected)
  np.testing.assert_allclose(both.approximation(key, x), transforms.soft_thermometer(x, 3))
  np.testing.assert_array_equal(transforms.compose().forward(key, x), x)


# ----------------------------------------------------------------------------
# BPDA.


def _tiny_model():
  rng = np.random.default_rng(0)
  w1 = jnp.asarray(rng.normal(size=(7 * 7, 16)) / 7, jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(16, 10)) / 4, jnp.float32)
  return lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ w2


def test_bpda_gradient_of_bit_depth_is_the_model_gradient_at_the_squeezed_point():
  model = _tiny_model()
  t = transforms.get_transform("bit_depth", bits=2)
  x = jnp.asarray(_images((4, 7, 7, 1)))
  y = jnp.arange(4)
  key = jax.random.key(0)
  loss = lambda f: lambda inputs: jnp.sum(attacks.cross_entropy(f(inputs), y))
  adaptive_fn = bpda.bpda_logits_fn(model, t)

  @fast_jit
  def run(x):
    squeezed = transforms.bit_depth(x, 2)
    naive = jax.grad(loss(lambda v: transforms.defended_logits_fn(model, t)(key, v)))(x)
    adaptive = jax.grad(loss(lambda v: adaptive_fn(key, v)))(x)
    # Forward mode too: the tangent is the approximation's (the identity).
    value, tangent = jax.jvp(lambda v: bpda.bpda(t.forward, t.approximation)(key, v), (x,),
                             (x,))
    return (squeezed, naive, adaptive, jax.grad(loss(model))(squeezed), adaptive_fn(key, x),
            bpda.bpda_transform(t).forward(key, x), value, tangent)

  squeezed, naive, adaptive, at_squeezed, logits, forward, value, tangent = run(x)
  np.testing.assert_array_equal(naive, 0)
  assert np.abs(np.asarray(at_squeezed)).min() > 0
  np.testing.assert_allclose(adaptive, at_squeezed, rtol=1e-6)
  # Values: exactly the defence's.
  np.testing.assert_array_equal(squeezed, transforms.bit_depth(x, 2))
  np.testing.assert_array_equal(logits, model(squeezed))
  np.testing.assert_array_equal(forward, squeezed)
  np.testing.assert_array_equal(value, squeezed)
  np.testing.assert_array_equal(tangent, x)
  assert bpda.bpda_transform(t)._replace(forward=None) == t._replace(name="bpda(bit_depth)",
                                                                     forward=None)


def test_bpda_and_eot_compose_with_pgd():
  model = _tiny_model()
  x = jnp.asarray(_images((8, 7, 7, 1), seed=5))
  y = jnp.argmax(model(transforms.bit_depth(x, 3)), -1)
  margin = lambda logits: attacks.cw_margin(logits, y)
  key = jax.random.key(0)
  squeeze = transforms.get_transform("bit_depth", bits=3)

  @fast_jit
  def run(x):
    naive = lambda v: transforms.defended_logits_fn(model, squeeze)(key, v)
    adaptive = lambda v: bpda.bpda_logits_fn(model, squeeze)(key, v)
    x_naive = attacks.pgd(key, naive, x, y, eps=0.1, num_steps=3, random_start=False,
                          loss="cw")
    x_bpda = attacks.pgd(key, adaptive, x, y, eps=0.1, num_steps=3, random_start=False,
                         loss="cw")
    randomized = eot.eot(bpda.bpda_logits_fn(
        model, transforms.get_transform("tvm", num_steps=5)), num_samples=2)
    x_eot = attacks.pgd(key, randomized, x, y, eps=0.1, num_steps=3, random_start=False,
                        loss="cw")
    return x_naive, x_bpda, x_eot, adaptive(x_bpda), randomized.logits(key, x_eot), \
        randomized.logits(key, x)

  x_naive, x_bpda, x_eot, logits_bpda, logits_eot, logits_clean = run(x)
  # Zero gradients: naive PGD never moves. BPDA and EOT+BPDA do, and raise the loss.
  np.testing.assert_array_equal(x_naive, x)
  for x_adv in (x_bpda, x_eot):
    assert np.abs(np.asarray(x_adv) - x).max() <= 0.1 + 1e-6
  assert np.abs(np.asarray(x_bpda) - x).max() > 0.05
  assert np.mean(margin(logits_bpda)) > np.mean(margin(model(transforms.bit_depth(x, 3)))) + 0.05
  assert np.mean(margin(logits_eot)) > np.mean(margin(logits_clean)) + 0.05
