"""The soft smoothed classifier: noisy copies, its log-probabilities, SmoothAdv's attack.

Pure pieces shared by the smoothing training objectives
(`certjax.training.objectives.smoothing`: 'gaussian', 'smoothadv', 'macer',
'consistency') and usable on their own. `m` noisy copies of an example are
laid out example-major (rows `b * m .. b * m + m - 1` are example `b`'s
copies). Noise is Gaussian with standard deviation `sigma` in [0, 1] pixel
space, added without clipping (the model normalises internally, as in Cohen
et al.).

`smoothadv_pgd` (the SmoothAdv attack) also attacks a smoothed classifier with
expectation over transformation (EOT) over the noise (`resample_noise=True`).

References:
  Salman, Yang, Li, Zhang, Zhang, Razenshteyn & Bubeck, "Provably Robust Deep
  Learning via Adversarially Trained Smoothed Classifiers", NeurIPS 2019
  (Hadisalman/smoothing-adversarial `code/attacks.py`, `code/train_pgd.py`).
  Zhai et al., "MACER", ICLR 2020 (the soft smoothed classifier's loss).
  Athalye, Carlini & Wagner, ICML 2018 (EOT).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from certjax import validation
from certjax.types import Array, ArrayLike, LogitsFn, PRNGKey

# Probabilities are floored here before a log (Salman et al. clamp at 1e-20).
LOG_FLOOR = 1e-20
# PGD loops up to this many steps are unrolled (see pgd_on_soft_smoothed).
_MAX_UNROLLED_STEPS = 10


def repeat_examples(x: Array, m: int) -> Array:
  """[B, ...] -> [B * m, ...], example-major (each example's copies adjacent)."""
  return jnp.repeat(x, m, axis=0)


def gaussian_noise(key: PRNGKey, shape, sigma) -> Array:
  """`sigma * N(0, I)` of `shape`, float32."""
  return sigma * jax.random.normal(key, shape, jnp.float32)


def noisy_copies(key: PRNGKey, x: Array, m: int, sigma) -> Array:
  """m copies of each example with fresh Gaussian noise: [B, ...] -> [B * m, ...]."""
  return repeat_examples(x, m) + gaussian_noise(key, (x.shape[0] * m,) + x.shape[1:], sigma)


def soft_smoothed_log_probs(logits: Array, m: int) -> Array:
  """log of the softmax averaged over each example's m noisy copies: [B*m, K] -> [B, K]."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  mean = probs.reshape(-1, m, probs.shape[-1]).mean(axis=1)
  return jnp.log(jnp.maximum(mean, LOG_FLOOR))


def nll(log_probs: Array, labels: Array) -> Array:
  """Per-example negative log-likelihood of integer labels."""
  return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def noisy_cross_entropy(logits: Array, labels: Array) -> Array:
  """Mean cross-entropy of the base classifier on noisy copies."""
  return jnp.mean(nll(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), labels))


def renorm_l2(delta: Array, max_norm: Array) -> Array:
  """Scales each example's delta down to L2 norm <= max_norm (torch.renorm)."""
  norms = jnp.sqrt(jnp.sum(jnp.square(delta), axis=tuple(range(1, delta.ndim)), keepdims=True))
  scale = jnp.minimum(1.0, max_norm / jnp.maximum(norms, 1e-12))
  return delta * scale


def pgd_on_soft_smoothed(key: PRNGKey, logits_fn: LogitsFn, x: Array, labels: Array,
                         noise_at: Callable[[Array], Array], eps: Array, num_steps: int,
                         step_size: Array) -> Array:
  """Salman et al.'s multi-noise L2 PGD, unchecked; `noise_at(i)` is the [B, m, ...] noise of step i.

  The loop behind `smoothadv_pgd`, for callers that already hold the noise
  (the SmoothAdv objective attacks the noise it then trains on). `key` seeds
  the random directions taken where the gradient vanishes; `eps` and
  `step_size` broadcast against `x`.
  """
  x = jnp.asarray(x, jnp.float32)
  batch = x.shape[0]
  feature_axes = tuple(range(1, x.ndim))

  def loss(delta, noise):
    m = noise.shape[1]
    noisy = (x + delta)[:, None] + noise
    logits = logits_fn(noisy.reshape((batch * m,) + x.shape[1:]))
    return jnp.sum(nll(soft_smoothed_log_probs(logits, m), labels))

  grad_fn = jax.grad(loss)

  def body(i, delta):
    grad = grad_fn(delta, noise_at(i))
    norms = jnp.sqrt(jnp.sum(jnp.square(grad), axis=feature_axes, keepdims=True))
    # A zero gradient (saturated softmax) would stall the attack; the
    # reference replaces it by a random direction.
    random_direction = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
    random_norms = jnp.sqrt(jnp.sum(jnp.square(random_direction), axis=feature_axes,
                                    keepdims=True))
    direction = jnp.where(norms > 0, grad / jnp.where(norms > 0, norms, 1.0),
                          random_direction / random_norms)
    delta = delta + step_size * direction
    delta = jnp.clip(x + delta, 0.0, 1.0) - x
    return renorm_l2(delta, eps)

  # Fully unrolled for the few steps SmoothAdv takes: XLA on CPU runs the
  # input-gradient (transposed) convolution on a slow generic path inside a
  # while loop, 5-8x slower than unrolled (measured, ibp_small, jax 0.10).
  unroll = num_steps <= _MAX_UNROLLED_STEPS
  delta = jax.lax.fori_loop(0, num_steps, body, jnp.zeros_like(x), unroll=unroll)
  return jax.lax.stop_gradient(x + delta)


def smoothadv_pgd(key: PRNGKey, logits_fn: LogitsFn, x: ArrayLike, labels: ArrayLike, *,
                  eps: ArrayLike, num_steps: int, sigma: float | None = None,
                  num_noise: int | None = None, noise: ArrayLike | None = None,
                  step_size: ArrayLike | None = None, resample_noise: bool = False) -> Array:
  """L2 PGD against the soft smoothed classifier (SmoothAdv-PGD).

  Maximises the cross-entropy of the soft smoothed classifier,
  `-log(mean_j softmax(f(x' + noise_j))[y])`, over `x'` in the L2 ball of
  radius `eps` around `x` intersected with [0, 1]: starting from `x' = x`,
  each step moves by `step_size` along the normalised gradient (a random
  direction where the gradient is zero), clips to [0, 1] and projects onto the
  ball, as in Salman et al.'s `PGD_L2._attack_mutlinoise`.

  Noise: either `noise` ([B, m, H, W, C], already scaled by sigma) used at
  every step (SmoothAdv training attacks the same noise the model is then
  trained on), or `num_noise` draws of `sigma * N(0, I)` per example from
  `key`; with `resample_noise=True` fresh draws at every step, i.e. an
  expectation-over-transformation (EOT) attack on the smoothed classifier
  rather than on one Monte Carlo estimate of it.

  Pure and jittable with `num_steps`, `num_noise` and `resample_noise` static.

  Args:
    key: PRNG key (noise draws and random directions).
    logits_fn: pure function from images [N, H, W, C] to logits; attacked
      through `jax.grad`, so wrap parameters in `lax.stop_gradient` when
      calling this inside a loss.
    x: clean images [B, H, W, C] in [0, 1].
    labels: int labels [B] whose smoothed probability the attack lowers.
    eps: L2 radius (>= 0): a scalar or one radius per image [B].
    num_steps: PGD steps (>= 1).
    sigma: noise standard deviation; needed unless `noise` is given.
    num_noise: noise draws m per example; needed unless `noise` is given.
    noise: optional fixed noise [B, m, H, W, C].
    step_size: L2 length of each step (scalar or [B]); default
      `2 * eps / num_steps` (Salman et al.).
    resample_noise: draw new noise at every step (needs sigma, num_noise).

  Returns:
    Adversarial images [B, H, W, C] in [0, 1] (gradient stopped).

  References:
    Salman et al., "Provably Robust Deep Learning via Adversarially Trained
    Smoothed Classifiers", NeurIPS 2019 (Sec. 3, `code/attacks.py`).
    Athalye, Carlini & Wagner, ICML 2018 (EOT).
  """
  num_steps = validation.check_int_at_least(num_steps, "num_steps", 1)
  validation.check_positive(eps, "eps", allow_zero=True)
  x = jnp.asarray(x)
  validation.check_images(x, name="x")
  labels = jnp.asarray(labels)
  validation.check_labels(labels, batch_size=x.shape[0], name="labels")
  eps = jnp.asarray(eps, jnp.float32)
  if eps.ndim not in (0, 1) or (eps.ndim == 1 and eps.shape[0] != x.shape[0]):
    raise ValueError(f"eps must be a scalar or one radius per image (shape ({x.shape[0]},)); "
                     f"got shape {eps.shape}.")
  step_size = 2.0 * eps / num_steps if step_size is None else jnp.asarray(step_size, jnp.float32)
  # Per-image radii and step sizes broadcast against [B, H, W, C].
  per_image = (-1,) + (1,) * (x.ndim - 1)
  eps = eps.reshape(per_image) if eps.ndim else eps
  step_size = step_size.reshape(per_image) if step_size.ndim else step_size
  noise_key, direction_key = jax.random.split(key)
  if noise is not None:
    if resample_noise:
      raise ValueError("resample_noise=True draws its own noise; do not also pass noise.")
    noise = jnp.asarray(noise, jnp.float32)
    if noise.ndim != x.ndim + 1 or noise.shape[0] != x.shape[0] or noise.shape[2:] != x.shape[1:]:
      raise ValueError(f"noise must have shape [B, m, {', '.join(map(str, x.shape[1:]))}] "
                       f"with B={x.shape[0]}; got {noise.shape}.")
    noise_at = lambda i: noise  # noqa: E731
  else:
    if sigma is None or num_noise is None:
      raise ValueError("Pass either noise ([B, m, H, W, C]) or both sigma and num_noise.")
    validation.check_positive(sigma, "sigma")
    num_noise = validation.check_int_at_least(num_noise, "num_noise", 1)
    shape = (x.shape[0], num_noise) + x.shape[1:]
    if resample_noise:
      def noise_at(i):
        return gaussian_noise(jax.random.fold_in(noise_key, i), shape, sigma)
    else:
      fixed = gaussian_noise(noise_key, shape, sigma)
      noise_at = lambda i: fixed  # noqa: E731
  return pgd_on_soft_smoothed(direction_key, logits_fn, x, labels, noise_at, eps, num_steps,
                               step_size)


__all__ = [
    "LOG_FLOOR", "gaussian_noise", "nll", "noisy_copies", "noisy_cross_entropy",
    "pgd_on_soft_smoothed", "renorm_l2", "repeat_examples", "smoothadv_pgd",
    "soft_smoothed_log_probs",
]
