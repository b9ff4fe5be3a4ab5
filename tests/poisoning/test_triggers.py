"""Backdoor triggers, label maps, poisoned-example choice and clean-label poisoning.

Oracles: NumPy stamps and blends, Turner et al.'s four-corner table, NumPy
transcriptions of PyTorch's bicubic upsampling and `grid_sample` (the
operations WaNet's reference code calls).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from certjax import data as data_lib
from certjax.poisoning import clean_label, labels as labels_lib, triggers

SHAPE = (8, 8, 3)


def _images(shape=(4,) + SHAPE, seed=0):
  return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _all_digits():
  return data_lib.load_arrays({"name": "mnist5k"}, "train", 0, 500)


def _digits(n=500):
  """The first n real MNIST training digits (the embedded set), 28x28x1 in [0, 1]."""
  x, y = _all_digits()
  return x[:n], y[:n]


# ----------------------------------------------------------------------------
# BadNets and Turner et al.'s four corners.


@pytest.mark.parametrize("location, corner", [
    ("bottom_right", (5, 5)), ("top_left", (0, 0)), ("top_right", (0, 5)),
    ("bottom_left", (5, 0)), ((2, 4), (2, 4))])
def test_badnets_stamps_exactly_the_patch(location, corner):
  x = _images()
  trigger = triggers.badnets(SHAPE, size=3, location=location)
  checker = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]], np.float32)
  expected = x.copy()
  expected[:, corner[0]:corner[0] + 3, corner[1]:corner[1] + 3, :] = checker[:, :, None]
  np.testing.assert_array_equal(np.asarray(triggers.apply_trigger(trigger, x)), expected)


def test_badnets_patterns():
  x = _images()
  white = np.asarray(triggers.apply_trigger(triggers.badnets(SHAPE, size=2, pattern="white"),
                                            x))
  assert np.all(white[:, 6:, 6:] == 1) and np.array_equal(white[:, :6], x[:, :6])
  given = np.random.default_rng(1).uniform(size=(2, 2)).astype(np.float32)
  out = np.asarray(triggers.apply_trigger(
      triggers.badnets(SHAPE, size=2, location="top_left", pattern=given), x))
  np.testing.assert_array_equal(out[:, :2, :2], np.broadcast_to(given[:, :, None], (4, 2, 2, 3)))
  one = triggers.badnets(SHAPE, pattern="random", key=jax.random.key(0))
  again = triggers.badnets(SHAPE, pattern="random", key=jax.random.key(0))
  other = triggers.badnets(SHAPE, pattern="random", key=jax.random.key(1))
  np.testing.assert_array_equal(one.pattern, again.pattern)
  assert not np.array_equal(one.pattern, other.pattern)
  patch = np.asarray(one.pattern)[5:, 5:]
  assert patch.min() >= 0 and patch.max() <= 1 and np.unique(patch).size == 27


# Turner et al.'s four-corner trigger as their code lists it (row, col with
# negative indices from the far edge, +1 = towards white, -1 = towards black).
_TURNER_CORNERS = {
    (0, 0): [[1, -1, -1], [-1, 1, -1], [1, -1, 1]],
    (-3, 0): [[1, -1, -1], [-1, 1, -1], [1, -1, 1]],
    (0, -3): [[-1, -1, 1], [-1, 1, -1], [1, -1, 1]],
    (-3, -3): [[-1, -1, 1], [-1, 1, -1], [1, -1, 1]],
}


@pytest.mark.parametrize("amplitude", [1.0, 16 / 255, 0.25])
def test_four_corners_matches_turner_et_al(amplitude):
  x = _images()
  signs = np.zeros(SHAPE[:2], np.float32)
  for (row, col), block in _TURNER_CORNERS.items():
    for i in range(3):
      for j in range(3):
        signs[row + i if row >= 0 else SHAPE[0] + row + i,
              col + j if col >= 0 else SHAPE[1] + col + j] = block[i][j]
  expected = np.clip(x + amplitude * signs[None, :, :, None], 0, 1)
  trigger = triggers.badnets(SHAPE, location="four_corners", amplitude=amplitude)
  out = np.asarray(triggers.apply_trigger(trigger, x))
  np.testing.assert_allclose(out, expected, atol=1e-6)
  assert trigger.kind == ("blend" if amplitude == 1 else "add")
  if amplitude == 1:  # the full trigger is exact black and white
    np.testing.assert_array_equal(out[:, signs != 0], (signs[signs != 0] > 0)[None, :, None]
                                  * np.ones((4, 1, 3)))


# ----------------------------------------------------------------------------
# Blended.


def test_blended_equals_the_numpy_blend():
  x = _images()
  trigger = triggers.blended(SHAPE, key=jax.random.key(0), alpha=0.2)
  pattern = np.asarray(trigger.pattern, np.float64)
  assert pattern.shape == SHAPE and 0 <= pattern.min() and pattern.max() <= 1
  np.testing.assert_allclose(np.asarray(triggers.apply_trigger(trigger, x)),
                             0.8 * x + 0.2 * pattern, atol=1e-6)
  image = np.random.default_rng(2).uniform(size=SHAPE[:2]).astype(np.float32)
  given = triggers.blended(SHAPE, key=None, alpha=0.1, pattern=image)
  np.testing.assert_allclose(np.asarray(triggers.apply_trigger(given, x)),
                             0.9 * x + 0.1 * image[None, :, :, None], atol=1e-6)
  assert not np.array_equal(triggers.blended(SHAPE, key=jax.random.key(1)).pattern,
                            trigger.pattern)


# ----------------------------------------------------------------------------
# WaNet.


def _torch_bicubic(source, out_h, out_w, a=-0.75):
  """PyTorch's upsample_bicubic2d (align_corners=True), pixel by pixel: 4x4 taps
  clamped to the edge, Keys' kernel with a = -0.75."""
  def near(t):
    return ((a + 2) * t - (a + 3)) * t * t + 1

  def far(t):
    return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

  def taps(t):
    return [far(t + 1), near(t), near(1 - t), far(2 - t)]

  in_h, in_w = source.shape[:2]
  out = np.zeros((out_h, out_w) + source.shape[2:])
  for i in range(out_h):
    real_y = i * (in_h - 1) / (out_h - 1)
    y0 = math.floor(real_y)
    for j in range(out_w):
      real_x = j * (in_w - 1) / (out_w - 1)
      x0 = math.floor(real_x)
      for dy, wy in enumerate(taps(real_y - y0)):
        for dx, wx in enumerate(taps(real_x - x0)):
          yy = min(max(y0 - 1 + dy, 0), in_h - 1)
          xx = min(max(x0 - 1 + dx, 0), in_w - 1)
          out[i, j] += wy * wx * source[yy, xx]
  return out


def _torch_grid_sample(image, grid):
  """PyTorch's grid_sampler_2d, bilinear, zeros padding, align_corners=True."""
  height, width, _ = image.shape
  out = np.zeros(grid.shape[:2] + image.shape[2:])
  for i in range(grid.shape[0]):
    for j in range(grid.shape[1]):
      ix = (grid[i, j, 0] + 1) / 2 * (width - 1)
      iy = (grid[i, j, 1] + 1) / 2 * (height - 1)
      x0, y0 = math.floor(ix), math.floor(iy)
      for yy, xx, weight in ((y0, x0, (x0 + 1 - ix) * (y0 + 1 - iy)),
                             (y0, x0 + 1, (ix - x0) * (y0 + 1 - iy)),
                             (y0 + 1, x0, (x0 + 1 - ix) * (iy - y0)),
                             (y0 + 1, x0 + 1, (ix - x0) * (iy - y0))):
        if 0 <= yy < height and 0 <= xx < width:
          out[i, j] += weight * image[yy, xx]
  return out


@pytest.mark.parametrize("grid_size, strength, rescale", [(4, 0.5, 1.0), (3, 2.0, 0.9)])
def test_wanet_grid_is_the_reference_construction(grid_size, strength, rescale):
  key = jax.random.key(7)
  trigger = triggers.wanet(SHAPE, key=key, grid_size=grid_size, strength=strength,
                           grid_rescale=rescale)
  # The same draw as the reference's torch.rand(1, 2, k, k) * 2 - 1, normalised
  # by its mean absolute value.
  noise = np.asarray(jax.random.uniform(key, (grid_size, grid_size, 2), jnp.float32, -1, 1),
                     np.float64)
  noise /= np.abs(noise).mean()
  line = np.linspace(-1, 1, SHAPE[0])
  identity = np.stack(np.meshgrid(line, line, indexing="xy"), axis=-1)
  expected = np.clip((identity + strength * _torch_bicubic(noise, 8, 8) / 8) * rescale, -1, 1)
  np.testing.assert_allclose(np.asarray(trigger.grid), expected, atol=2e-6)
  np.testing.assert_allclose(triggers.bicubic_matrix(8, grid_size).sum(1), 1.0, atol=1e-12)


def test_wanet_warp_is_grid_sample():
  x = _images((2, 7, 9, 3))
  trigger = triggers.wanet((7, 9, 3), key=jax.random.key(0), strength=3.0)
  # A grid reaching past the border checks the zero padding as well.
  wide = np.random.default_rng(3).uniform(-1.2, 1.2, (7, 9, 2)).astype(np.float32)
  for grid in (np.asarray(trigger.grid), wide):
    out = np.asarray(triggers.apply_trigger(triggers.Trigger("wanet", "warp", grid=grid), x))
    expected = np.stack([_torch_grid_sample(image.astype(np.float64), grid.astype(np.float64))
                         for image in x])
    np.testing.assert_allclose(out, expected, atol=2e-6)


def test_wanet_is_the_identity_at_strength_zero_and_nearly_invisible_at_half():
  x = _digits(64)[0]
  still = triggers.wanet((28, 28, 1), key=jax.random.key(0), strength=0.0)
  np.testing.assert_allclose(np.asarray(triggers.apply_trigger(still, x)), x, atol=1e-5)
  trigger = triggers.wanet((28, 28, 1), key=jax.random.key(0))
  change = np.abs(np.asarray(triggers.apply_trigger(trigger, x)) - x)
  line = np.linspace(-1, 1, 28)
  identity = np.stack(np.meshgrid(line, line, indexing="xy"), axis=-1)
  shift = np.abs(np.asarray(trigger.grid) - identity).max() * 27 / 2
  print(f"WaNet k=4 s=0.5 on 28x28 digits: mean |x' - x| = {change.mean():.4f}, "
        f"max {change.max():.3f}, largest pixel shift {shift:.3f} px")
  assert 0.005 < change.mean() < 0.05 and shift < 1.0


def test_wanet_noise_mode():
  trigger = triggers.wanet(SHAPE, key=jax.random.key(0))
  keys = jax.random.split(jax.random.key(1), 4)
  crosses = jax.vmap(triggers.wanet_noise_grid, (0, None))(keys, trigger)
  assert crosses.grid.shape == (4,) + SHAPE[:2] + (2,)
  assert jax.tree_util.tree_structure(crosses) == jax.tree_util.tree_structure(trigger)
  delta = np.asarray(crosses.grid) - np.asarray(trigger.grid)[None]
  assert np.abs(delta).max() <= 1 / 8 + 1e-6 and np.abs(delta).max() > 0.05
  assert np.abs(np.asarray(crosses.grid)).max() <= 1
  assert not np.allclose(delta[0], delta[1])
  x = _images()
  out = np.asarray(jax.vmap(triggers.apply_trigger)(crosses, x))
  for i in range(4):
    single = triggers.Trigger("wanet", "warp", grid=crosses.grid[i])
    np.testing.assert_allclose(out[i], np.asarray(triggers.apply_trigger(single, x[i])),
                               atol=1e-6)


# ----------------------------------------------------------------------------
# apply_trigger under transformations.


@pytest.mark.parametrize("name", triggers.TRIGGER_NAMES)
def test_apply_trigger_under_jit_and_vmap(name):
  x = _images()
  trigger = triggers.make_trigger(name, SHAPE, key=jax.random.key(0))
  eager = np.asarray(triggers.apply_trigger(trigger, x))
  assert eager.shape == x.shape and eager.dtype == np.float32
  assert eager.min() >= 0 and eager.max() <= 1 and not np.array_equal(eager, x)
  np.testing.assert_allclose(jax.jit(triggers.apply_trigger)(trigger, x), eager, atol=1e-6)
  np.testing.assert_allclose(jax.vmap(triggers.apply_trigger, (None, 0))(trigger, x), eager,
                             atol=1e-6)
  np.testing.assert_allclose(triggers.apply_trigger(trigger, x.reshape((2, 2) + SHAPE)),
                             eager.reshape((2, 2) + SHAPE), atol=1e-6)
  np.testing.assert_allclose(triggers.apply_trigger(trigger, x[0]), eager[0], atol=1e-6)


def test_one_compilation_serves_every_trigger_of_a_kind():
  traces = []

  @jax.jit
  def run(trigger, x):
    traces.append(trigger.name)
    return triggers.apply_trigger(trigger, x)

  x = _images()
  for location in ("top_left", "bottom_right", (1, 2)):
    out = run(triggers.badnets(SHAPE, location=location), x)
    np.testing.assert_array_equal(
        out, triggers.apply_trigger(triggers.badnets(SHAPE, location=location), x))
  assert traces == ["badnets"]


# ----------------------------------------------------------------------------
# Label maps and the choice of poisoned examples.


def test_target_labels():
  y = np.arange(10, dtype=np.int32).repeat(3)
  np.testing.assert_array_equal(
      triggers.target_labels(y, "all_to_all", num_classes=10), (y + 1) % 10)
  np.testing.assert_array_equal(
      triggers.target_labels(y, "all_to_one", target=4, num_classes=10), np.full(30, 4))
  np.testing.assert_array_equal(
      jax.jit(lambda y: triggers.target_labels(y, "all_to_all", num_classes=10))(y),
      (y + 1) % 10)


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.101, 0.3])
def test_poison_indices(rate):
  y = _digits()[1]
  target = 7
  indices = np.asarray(triggers.poison_indices(jax.random.key(0), y, rate=rate,
                                               mode="all_to_one", target=target,
                                               num_classes=10))
  assert len(indices) == round(rate * len(y))
  assert np.all(np.diff(indices) > 0) and indices.dtype == np.int32
  assert not np.any(y[indices] == target)
  again = triggers.poison_indices(jax.random.key(0), y, rate=rate, mode="all_to_one",
                                  target=target, num_classes=10)
  np.testing.assert_array_equal(again, indices)
  if rate > 0:
    other = triggers.poison_indices(jax.random.key(1), y, rate=rate, mode="all_to_one",
                                    target=target, num_classes=10)
    assert not np.array_equal(other, indices)
  everything = np.asarray(triggers.poison_indices(jax.random.key(0), y, rate=rate,
                                                  mode="all_to_all", num_classes=10))
  assert len(everything) == round(rate * len(y)) and len(set(everything)) == len(everything)


def test_all_to_one_draws_uniformly_from_the_non_target_classes():
  y = _digits()[1]
  counts = np.zeros(len(y))
  for seed in range(200):
    counts[np.asarray(triggers.poison_indices(jax.random.key(seed), y, rate=0.5,
                                              mode="all_to_one", target=0,
                                              num_classes=10))] += 1
  assert counts[y == 0].sum() == 0
  # Each of the 451 non-target examples is drawn with probability 250 / 451.
  share = counts[y != 0] / 200
  assert abs(share.mean() - 250 / 451) < 1e-9 and share.std() < 0.06


def test_poison_examples():
  x, y = _digits(40)
  trigger = triggers.badnets((28, 28, 1))
  indices = triggers.poison_indices(jax.random.key(0), y, rate=0.25, mode="all_to_all",
                                    num_classes=10)
  images, new = triggers.poison_examples(trigger, x, y, indices, mode="all_to_all",
                                         num_classes=10)
  np.testing.assert_array_equal(images, triggers.apply_trigger(trigger, x[indices]))
  np.testing.assert_array_equal(new, (y[indices] + 1) % 10)
  _, new = triggers.poison_examples(trigger, x, y, indices, mode="all_to_one", target=2,
                                    num_classes=10)
  np.testing.assert_array_equal(new, np.full(10, 2))


# ----------------------------------------------------------------------------
# Clean-label poisoning (Turner et al.).


def _surrogate():
  """A nearest-class-mean linear classifier on 7x7 average-pooled digits (closed
  form, nothing to compile), and those digits."""
  x, y = _digits(300)
  x = x.reshape(-1, 7, 4, 7, 4, 1).mean(axis=(2, 4))
  means = np.stack([x[y == c].reshape(-1, 49).mean(0) for c in range(10)])
  # logits = -10 ||x - mu_c||^2 up to a per-example constant.
  model = labels_lib.LogisticRegression(jnp.asarray(20 * means.T),
                                        jnp.asarray(-10 * np.sum(means ** 2, 1)))
  assert np.mean(np.argmax(model.logits(x), 1) == y) > 0.7
  return model, x, y


def test_clean_label_poison():
  surrogate, x, y = _surrogate()
  target, eps = 3, 0.1
  indices = clean_label.clean_label_indices(jax.random.key(0), y, rate=0.5, target=target)
  assert len(indices) == round(0.5 * np.sum(y == target)) and np.all(y[indices] == target)
  key = jax.random.key(1)
  perturbed, kept = clean_label.clean_label_poison(
      key, surrogate.logits, x, y, indices, trigger=None, eps=eps, num_steps=10)
  np.testing.assert_array_equal(kept, y[indices])
  clean = x[np.asarray(indices)]
  assert np.abs(np.asarray(perturbed) - clean).max() <= eps + 1e-6

  def loss(images):
    logits = surrogate.logits(images)
    return np.asarray(jax.nn.logsumexp(logits, 1) - logits[:, target])

  before, after = loss(clean), loss(perturbed)
  print(f"clean-label PGD: surrogate CE on the true label {before.mean():.3f} -> "
        f"{after.mean():.3f}")
  assert np.all(after > before) and after.mean() > before.mean() + 1.0
  trigger = triggers.badnets((7, 7, 1), location="four_corners", amplitude=32 / 255)
  poisoned, kept = clean_label.clean_label_poison(
      key, surrogate.logits, x, y, indices, trigger=trigger, eps=eps, num_steps=10)
  np.testing.assert_array_equal(kept, y[indices])
  np.testing.assert_allclose(poisoned, triggers.apply_trigger(trigger, perturbed), atol=1e-6)


# ----------------------------------------------------------------------------
# Errors.


def test_errors():
  y = _digits(100)[1]
  key = jax.random.key(0)
  for rate in (-0.1, 1.5):
    with pytest.raises(ValueError, match=r"rate must be a number in \[0, 1\]"):
      triggers.poison_indices(key, y, rate=rate, mode="all_to_one", target=0, num_classes=10)
    with pytest.raises(ValueError, match=r"rate must be a number in \[0, 1\]"):
      clean_label.clean_label_indices(key, y, rate=rate, target=0)
  with pytest.raises(ValueError, match=r"target must be an integer class in \[0, 9\]"):
    triggers.poison_indices(key, y, rate=0.1, mode="all_to_one", target=10, num_classes=10)
  with pytest.raises(ValueError, match=r"target must be an integer class in \[0, 9\]"):
    triggers.target_labels(y, "all_to_all", target=10, num_classes=10)
  with pytest.raises(ValueError, match="needs a target class"):
    triggers.target_labels(y, "all_to_one", num_classes=10)
  with pytest.raises(ValueError, match="Unknown mode 'all_to_two'"):
    triggers.poison_indices(key, y, rate=0.1, mode="all_to_two", target=0, num_classes=10)
  available = int(np.sum(y != 0))
  with pytest.raises(ValueError, match=f"only {available} are not of the target class 0"):
    triggers.poison_indices(key, y, rate=1.0, mode="all_to_one", target=0, num_classes=10)
  with pytest.raises(ValueError, match=r"larger than the image: size must be <= min\(H, W\)"):
    triggers.badnets(SHAPE, size=9)
  with pytest.raises(ValueError, match=r"larger than the image: 2 \* size"):
    triggers.badnets(SHAPE, size=5, location="four_corners")
  with pytest.raises(ValueError, match=r"does not fit 8x8 images"):
    triggers.badnets(SHAPE, size=3, location=(6, 0))
  with pytest.raises(ValueError, match="control grid .* is larger than the image"):
    triggers.wanet(SHAPE, key=key, grid_size=9)
  with pytest.raises(ValueError, match=r"larger than the images \(8x8x3\)"):
    triggers.apply_trigger(triggers.badnets((28, 28, 3)), _images())
  with pytest.raises(ValueError, match="made for 8x8x3 images, not 28x28x3"):
    triggers.check_trigger_fits(triggers.badnets(SHAPE), (5, 28, 28, 3))
  with pytest.raises(ValueError, match="made for 8x8x3 images, not 8x8x1"):
    triggers.apply_trigger(triggers.badnets(SHAPE), _images((2, 8, 8, 1)))
  with pytest.raises(ValueError, match="Unknown trigger name 'badnet'.*Did you mean 'badnets'"):
    triggers.make_trigger("badnet", SHAPE, key=key)
  with pytest.raises(ValueError, match="Unknown setting 'sise' for trigger 'badnets'"):
    triggers.make_trigger("badnets", SHAPE, key=key, sise=3)
  with pytest.raises(ValueError, match="Unknown location 'centre'"):
    triggers.badnets(SHAPE, location="centre")
  with pytest.raises(ValueError, match="Unknown pattern 'stripes'"):
    triggers.badnets(SHAPE, pattern="stripes")
  with pytest.raises(ValueError, match="pattern='random' needs a key"):
    triggers.badnets(SHAPE, pattern="random")
  with pytest.raises(ValueError, match=r"amplitude must be a number in \(0, 1\]"):
    triggers.badnets(SHAPE, amplitude=0.0)
  with pytest.raises(ValueError, match=r"alpha must be a number in \(0, 1\]"):
    triggers.blended(SHAPE, key=key, alpha=1.5)
  with pytest.raises(ValueError, match="strength must be a finite number >= 0"):
    triggers.wanet(SHAPE, key=key, strength=-1.0)
  with pytest.raises(ValueError, match=r"image_shape must be \(height, width, channels\)"):
    triggers.badnets((8, 8))
  with pytest.raises(ValueError, match="x must have rank 3 or 4"):
    triggers.apply_trigger(triggers.badnets(SHAPE), np.zeros((8, 8), np.float32))
  with pytest.raises(ValueError, match="must lie in"):
    triggers.apply_trigger(triggers.badnets(SHAPE), _images() * 2)
  with pytest.raises(ValueError, match="needs a warp trigger"):
    triggers.wanet_noise_grid(key, triggers.badnets(SHAPE))
  with pytest.raises(ValueError, match="trigger must be a certjax.poisoning Trigger"):
    triggers.apply_trigger("badnets", _images())
  with pytest.raises(ValueError, match="needs concrete labels"):
    jax.jit(lambda y: clean_label.clean_label_indices(key, y, rate=0.5, target=1))(y)
