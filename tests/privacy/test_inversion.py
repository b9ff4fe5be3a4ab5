"""Tests of certjax.privacy.inversion on tiny MLPs over 8x8x1 images.

Oracles: a float64 NumPy/SciPy transcription of PSNR and SSIM written here
(scipy.ndimage.gaussian_filter, truncated to the 11-wide window), the
closed-form first MI-Face step on a linear model, planted labels and images
for label recovery and matching, and the true images for the gradient
inversions (with the victim gradient computed here from optax's
cross-entropy, not from the module).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.ndimage

from certjax.privacy import inversion

# Tiny programs that run for milliseconds: XLA's backend optimisations would
# only add compile time.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

SHAPE = (8, 8, 1)


def init_mlp(seed, sizes):
  rng = np.random.default_rng(seed)
  return [{"w": jnp.asarray(rng.normal(0, 1 / np.sqrt(a), (a, b)), jnp.float32),
           "b": jnp.full((b,), 0.1, jnp.float32)}
          for a, b in itertools.pairwise(sizes)]


def make_apply(activation):
  def apply(params, x):
    h = x.reshape(x.shape[0], -1)
    for layer in params[:-1]:
      h = activation(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]
  return apply


sigmoid_mlp = make_apply(jax.nn.sigmoid)  # DLG's smooth activation
relu_mlp = make_apply(jax.nn.relu)


def victim_gradient(apply_fn, params, x, y):
  """The shared update, written independently of the module."""
  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y).mean()
  return jax.grad(loss)(params)


victim_gradient_jit = fast_jit(victim_gradient, static_argnums=0)


def relu_last_layer_gradients(params, x, y):
  """Float64 NumPy gradient of the mean cross-entropy in the last layer of `relu_mlp`."""
  h = np.asarray(x, np.float64).reshape(len(x), -1)
  for layer in params[:-1]:
    h = np.maximum(h @ np.asarray(layer["w"], np.float64) + np.asarray(layer["b"], np.float64), 0)
  z = h @ np.asarray(params[-1]["w"], np.float64) + np.asarray(params[-1]["b"], np.float64)
  p = np.exp(z - z.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  delta = (p - np.eye(z.shape[1])[np.asarray(y)]) / len(x)
  return h.T @ delta, delta.sum(axis=0)


def smooth_images(seed, batch):
  """Images with structure (4x4 noise upsampled linearly to 8x8) in [0, 1]."""
  small = np.random.default_rng(seed).uniform(0, 1, (batch, 4, 4, 1))
  return jnp.asarray(np.clip(scipy.ndimage.zoom(small, (1, 2, 2, 1), order=1), 0, 1), jnp.float32)


@pytest.fixture(scope="module")
def mlp_params():
  return init_mlp(0, [64, 32, 10])


# ----------------------------------------------------------------------- metrics


def psnr_oracle(x, y, max_value=1.0):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  mse = ((x - y) ** 2).reshape(len(x), -1).mean(axis=1)
  return 10 * np.log10(max_value ** 2 / mse)


def ssim_oracle(x, y, max_value=1.0):
  """Wang et al.'s SSIM: Gaussian sigma 1.5 truncated at radius 5 (11 taps), valid region."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  c1, c2 = (0.01 * max_value) ** 2, (0.03 * max_value) ** 2
  blur = lambda a: scipy.ndimage.gaussian_filter(a, 1.5, truncate=3.5)[5:-5, 5:-5]
  scores = []
  for xi, yi in zip(x, y):
    per_channel = []
    for c in range(x.shape[-1]):
      a, b = xi[..., c], yi[..., c]
      mu_a, mu_b = blur(a), blur(b)
      var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
      cov = blur(a * b) - mu_a * mu_b
      s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)
           / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
      per_channel.append(s.mean())
    scores.append(np.mean(per_channel))
  return np.asarray(scores)


def test_psnr_matches_oracle_and_known_mse():
  rng = np.random.default_rng(0)
  x = rng.uniform(0.1, 0.8, (3,) + SHAPE).astype(np.float32)
  y = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1).astype(np.float32)
  np.testing.assert_allclose(inversion.psnr(x, y), psnr_oracle(x, y), rtol=1e-5)
  # A constant offset of 0.1 is an MSE of 0.01: 20 dB at max 1, 20 + 20 log10(2) at max 2.
  np.testing.assert_allclose(inversion.psnr(x, x + 0.1), 20.0, rtol=1e-4)
  np.testing.assert_allclose(inversion.psnr(x, x + 0.1, max_value=2.0),
                             20 + 20 * np.log10(2), rtol=1e-4)


def test_ssim_matches_oracle():
  rng = np.random.default_rng(1)
  base = scipy.ndimage.gaussian_filter(rng.uniform(0, 1, (2, 16, 14, 3)), (0, 2, 2, 0))
  x = base.astype(np.float32)
  y = np.clip(base + rng.normal(0, 0.1, base.shape), 0, 1).astype(np.float32)
  np.testing.assert_allclose(inversion.ssim(x, x), 1.0, rtol=1e-5)
  np.testing.assert_allclose(inversion.ssim(x, y), ssim_oracle(x, y), atol=2e-4)
  assert np.all(np.asarray(inversion.ssim(x, y)) < 0.95)
  with pytest.raises(ValueError, match="at least filter_size"):
    inversion.ssim(x[:, :8, :8], y[:, :8, :8])


def test_label_recovery_rate_is_multiset_overlap():
  assert float(inversion.label_recovery_rate(jnp.array([2, 1, 1]), jnp.array([1, 2, 2]))) == \
      pytest.approx(2 / 3)
  assert float(inversion.label_recovery_rate(jnp.array([3, 1, 2]), jnp.array([1, 2, 3]))) == 1.0
  rates = inversion.label_recovery_rate(jnp.array([[0, 0], [0, 1]]), jnp.array([[0, 1], [5, 6]]))
  np.testing.assert_allclose(rates, [0.5, 0.0])


def test_match_reconstructions_undoes_a_permutation():
  rng = np.random.default_rng(2)
  true = rng.uniform(0, 1, (4,) + SHAPE).astype(np.float32)
  permutation = np.array([2, 0, 3, 1])
  noisy = true[permutation] + rng.normal(0, 0.01, true.shape).astype(np.float32)
  for metric in ("mse", "psnr"):
    matched, order = inversion.match_reconstructions(noisy, true, metric=metric)
    np.testing.assert_array_equal(permutation[np.asarray(order)], np.arange(4))
    np.testing.assert_allclose(matched, noisy[np.asarray(order)])


# ----------------------------------------------------------------- label recovery


def test_fedsgd_gradient_is_the_mean_cross_entropy_gradient(mlp_params):
  x = smooth_images(1, 3)
  y = jnp.array([4, 0, 4])
  grads = fast_jit(inversion.fedsgd_gradient, static_argnums=0)(relu_mlp, mlp_params, x, y)
  kernel, bias = relu_last_layer_gradients(mlp_params, x, y)
  np.testing.assert_allclose(grads[-1]["w"], kernel, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(grads[-1]["b"], bias, rtol=1e-4, atol=1e-7)


def test_idlg_recovers_the_label_of_one_example(mlp_params):
  rng = np.random.default_rng(3)
  for label in range(10):
    x = rng.uniform(0, 1, (1,) + SHAPE)
    kernel, _ = relu_last_layer_gradients(mlp_params, x, [label])
    np.testing.assert_array_equal(inversion.recover_labels_idlg(kernel), [label])


def test_batch_label_recovery_llg_counts_repeats_and_yin_finds_distinct(mlp_params):
  x = np.random.default_rng(4).uniform(0, 1, (5,) + SHAPE)
  kernel, _ = relu_last_layer_gradients(mlp_params, x, [7, 2, 7, 7, 5])
  np.testing.assert_array_equal(inversion.recover_labels_idlg(kernel, 5), [2, 5, 7, 7, 7])
  kernel, _ = relu_last_layer_gradients(mlp_params, x, [9, 0, 3, 4, 6])
  np.testing.assert_array_equal(inversion.recover_labels_idlg(kernel, 5, method="yin"),
                                [0, 3, 4, 6, 9])


def llg_oracle(column_sums, batch_size):
  """Wainakh et al.'s LLG (simple variant) as a plain loop over a list."""
  sums = [float(v) for v in column_sums]
  impact = sum(v for v in sums if v < 0) * (1 + 1 / len(sums)) / batch_size
  labels = []
  for c in sorted(range(len(sums)), key=lambda c: sums[c]):
    if sums[c] < 0 and len(labels) < batch_size:
      labels.append(c)
      sums[c] -= impact
  while len(labels) < batch_size:
    c = min(range(len(sums)), key=lambda c: sums[c])
    labels.append(c)
    sums[c] -= impact
  return sorted(labels)


def test_llg_matches_a_transcription_of_the_paper():
  rng = np.random.default_rng(5)
  for _ in range(20):
    kernel = rng.normal(0, 1, (3, 10)) + rng.uniform(0, 0.8)
    np.testing.assert_array_equal(inversion.recover_labels_idlg(kernel, 6, method="llg"),
                                  llg_oracle(kernel.sum(axis=0), 6))


# ------------------------------------------------------------- gradient inversion


def test_dlg_reconstructs_one_image_and_its_label(mlp_params):
  x = smooth_images(5, 1)
  y = jnp.array([3])
  target = victim_gradient_jit(sigmoid_mlp, mlp_params, x, y)
  run = fast_jit(lambda key, params, grads: inversion.dlg(
      key, sigmoid_mlp, params, grads, (1,) + SHAPE, num_steps=40))
  result = run(jax.random.key(6), mlp_params, target)
  start = jax.random.uniform(jax.random.split(jax.random.key(6))[0], x.shape)
  assert float(inversion.psnr(start, x)[0]) < 15  # what a broken optimiser leaves
  assert float(inversion.psnr(result.images, x)[0]) > 40
  np.testing.assert_array_equal(result.labels, y)
  assert float(result.matching_loss) < 1e-8


def test_inverting_gradients_improves_a_batch_of_two(mlp_params):
  x = smooth_images(7, 2)
  y = jnp.array([1, 8])
  target = victim_gradient_jit(sigmoid_mlp, mlp_params, x, y)
  run = fast_jit(lambda key, params, grads: inversion.inverting_gradients(
      key, sigmoid_mlp, params, grads, y, (2,) + SHAPE, num_steps=100, step_size=0.05,
      restarts=2))
  result = run(jax.random.key(8), mlp_params, target)
  start = jax.random.uniform(jax.random.fold_in(jax.random.key(8), 0), x.shape)
  start_psnr = inversion.psnr(inversion.match_reconstructions(start, x)[0], x)
  matched, _ = inversion.match_reconstructions(result.images, x)
  final_psnr = inversion.psnr(matched, x)
  assert np.all(np.asarray(start_psnr) < 15)
  assert np.all(np.asarray(final_psnr) > 30), final_psnr
  assert np.all((np.asarray(result.images) >= 0) & (np.asarray(result.images) <= 1))
  assert float(result.matching_loss) < 1e-2


# ---------------------------------------------------------------- class inversion


def _linear_model():
  w = jax.random.normal(jax.random.key(9), (64, 2))
  b = jnp.array([0.3, -0.3])
  return w, b, lambda x: x.reshape(x.shape[0], -1) @ w + b


def test_first_mi_face_step_matches_closed_form():
  w, b, logits_fn = _linear_model()
  images = fast_jit(lambda: inversion.invert_classes(
      jax.random.key(0), logits_fn, jnp.array([0, 1]), SHAPE, num_steps=1, step_size=0.5,
      patience=None))()
  # At x = 0: p = softmax(b); grad of 1 - p_c is -p_c (w_c - sum_k p_k w_k).
  p = np.exp(np.float64(b)) / np.exp(np.float64(b)).sum()
  w64 = np.asarray(w, np.float64)
  for c in range(2):
    expected = np.clip(0.5 * p[c] * (w64[:, c] - w64 @ p), 0, 1).reshape(SHAPE)
    np.testing.assert_allclose(images[c], expected, rtol=1e-5, atol=1e-7)


def test_class_inversion_is_classified_as_its_class_and_tv_smooths():
  _, _, logits_fn = _linear_model()
  classes = jnp.array([0, 1])
  invert = fast_jit(lambda tv_weight: inversion.invert_classes(
      jax.random.key(0), logits_fn, classes, SHAPE, num_steps=100, step_size=0.1,
      tv_weight=tv_weight, return_info=True))
  plain, info = invert(0.0)
  smooth, smooth_info = invert(1.0)
  for images, details in ((plain, info), (smooth, smooth_info)):
    probabilities = jax.nn.softmax(logits_fn(images))
    assert np.all(np.asarray(probabilities[jnp.arange(2), classes]) > 0.95)
    np.testing.assert_allclose(details.probability, probabilities[jnp.arange(2), classes],
                               rtol=1e-5)
  assert np.all(np.asarray(inversion.total_variation(smooth))
                < 0.5 * np.asarray(inversion.total_variation(plain)))
  stopped = fast_jit(lambda: inversion.invert_classes(
      jax.random.key(0), logits_fn, classes, SHAPE, num_steps=100, step_size=0.1,
      cost_threshold=0.2, return_info=True))()[1]
  assert np.all(np.asarray(stopped.num_steps) < 100)
  assert np.all(np.asarray(stopped.cost) <= 0.2)


# ---------------------------------------------------------------------- bad input


def test_bad_input_gets_clear_errors(mlp_params):
  _, _, logits_fn = _linear_model()
  target = victim_gradient_jit(sigmoid_mlp, mlp_params, jnp.zeros((1,) + SHAPE), jnp.array([0]))
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
    inversion.dlg(key, sigmoid_mlp, mlp_params, target, (1,) + SHAPE, num_steps=0)
  with pytest.raises(ValueError, match="does not accept images of batch_shape"):
    inversion.dlg(key, sigmoid_mlp, mlp_params, target, (1, 7, 7, 1))
  with pytest.raises(ValueError, match="batch_shape must be"):
    inversion.dlg(key, sigmoid_mlp, mlp_params, target, (8, 8, 1))
  with pytest.raises(ValueError, match="structure of params"):
    inversion.dlg(key, sigmoid_mlp, mlp_params, target[:1], (1,) + SHAPE)
  with pytest.raises(ValueError, match=r"must lie in \[0, 9\]"):
    inversion.dlg(key, sigmoid_mlp, mlp_params, target, (1,) + SHAPE, labels=jnp.array([10]))
  with pytest.raises(ValueError, match="2 labels but the batch has 1"):
    inversion.inverting_gradients(key, sigmoid_mlp, mlp_params, target, jnp.array([0, 1]),
                                  (1,) + SHAPE)
  with pytest.raises(ValueError, match="step_size must be a finite number > 0"):
    inversion.dlg(key, sigmoid_mlp, mlp_params, target, (1,) + SHAPE, step_size=0.0)
  with pytest.raises(ValueError, match="step_size must be a finite number > 0"):
    inversion.inverting_gradients(key, sigmoid_mlp, mlp_params, target, jnp.array([0]),
                                  (1,) + SHAPE, step_size=-1.0)
  with pytest.raises(ValueError, match="Unknown optimizer 'sgd'"):
    inversion.dlg(key, sigmoid_mlp, mlp_params, target, (1,) + SHAPE, optimizer="sgd")
  with pytest.raises(ValueError, match="step_size must be a finite number > 0"):
    inversion.invert_classes(key, logits_fn, jnp.array([0]), SHAPE, step_size=0.0)
  with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
    inversion.invert_classes(key, logits_fn, jnp.array([0]), SHAPE, num_steps=0)
  with pytest.raises(ValueError, match=r"classes holds labels in \[0, 2\] but must lie in"):
    inversion.invert_classes(key, logits_fn, jnp.array([0, 2]), SHAPE)
  with pytest.raises(ValueError, match="Unknown loss"):
    inversion.invert_classes(key, logits_fn, jnp.array([0]), SHAPE, loss="hinge")
  with pytest.raises(ValueError, match="'idlg' recovers the label of one example"):
    inversion.recover_labels_idlg(target[-1]["w"], 2, method="idlg")
  with pytest.raises(ValueError, match="one shape"):
    inversion.psnr(jnp.zeros((1,) + SHAPE), jnp.zeros((2,) + SHAPE))
