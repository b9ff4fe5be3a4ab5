"""Adversarial patch (Brown et al. 2017): a universal, physically placeable patch.

A square patch of P x P pixels is trained to make a classifier predict a target
class (or anything but the true class) wherever it is pasted. Training
maximises the expected objective over random placements and scales
(Expectation over Transformation), with any optax optimiser, projecting the
patch back to [0, 1] after each update.

Placement (`apply_patch`): each image gets an independent scale s drawn
uniformly from `scale_range`, the fraction of the image AREA the patch covers
(Brown et al.'s convention), so the side is sqrt(s H W) pixels (at most
min(H, W)); the top-left corner is uniform over the positions keeping the patch
inside the image. The patch is resampled to that side by BILINEAR
interpolation (pixel centres mapped onto the patch grid, edges clamped), which
is differentiable in the patch and works with a traced side, so one compiled
function covers every scale. Rotations are not applied.

Checks: `train_patch` and `patch_success_rate` check shapes, settings and
values (x finite and in [0, 1], labels in range) on eager calls; under
`jit`/`vmap` the values only with `checked=True` (see
`certjax.attacks.core`). `apply_patch`, the differentiable building block,
checks shapes and `scale_range` only.

References:
  Brown, Mane, Roy, Abadi, Gilmer. Adversarial Patch. 2017.
  Athalye, Engstrom, Ilyas, Kwok. Synthesizing Robust Adversarial Examples.
    ICML 2018 (EOT).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from certjax.types import Array, ArrayLike, PRNGKey
from certjax.validation import (check_images, check_int_at_least, check_labels,
                                checkify_images, checkify_labels)
from certjax.attacks import losses as losses_lib
from certjax.attacks.core import as_oracle, logits_shape


def _check_scale_range(scale_range: Sequence[float]) -> Tuple[float, float]:
  try:
    low, high = (float(v) for v in scale_range)
  except (TypeError, ValueError):
    raise ValueError(
        f"scale_range must be a pair (low, high) of area fractions; got {scale_range!r}.")
  if not 0.0 < low <= high <= 1.0:
    raise ValueError(
        "scale_range must satisfy 0 < low <= high <= 1 (fractions of the image "
        f"area covered by the patch); got {scale_range!r}.")
  return low, high


def _check_patch(patch: Any, channels: int) -> None:
  shape = np.shape(patch)
  if len(shape) != 3 or shape[0] != shape[1] or shape[2] != channels:
    raise ValueError(
        f"patch must have shape (P, P, {channels}) (square, same channels as the "
        f"images); got {tuple(shape)}.")


def apply_patch(key: PRNGKey, x: ArrayLike, patch: ArrayLike,
                scale_range: Sequence[float] = (0.1, 0.25)) -> Array:
  """Pastes `patch` on every image at a random position and scale.

  Args:
    key: a `jax.random.key`.
    x: images (batch, H, W, C) in [0, 1].
    patch: (P, P, C) patch in [0, 1].
    scale_range: (low, high) fraction of the image area the patch covers.

  Returns:
    Patched images shaped like `x` (differentiable in `x` and `patch`).
  """
  low, high = _check_scale_range(scale_range)
  x, patch = jnp.asarray(x), jnp.asarray(patch)
  _check_patch(patch, x.shape[-1])
  batch, height, width, _ = x.shape
  size = patch.shape[0]
  k_scale, k_pos = jax.random.split(key)
  scale = jax.random.uniform(k_scale, (batch,), minval=low, maxval=high)
  side = jnp.clip(jnp.sqrt(scale * height * width), 1.0, float(min(height, width)))
  corner = jax.random.uniform(k_pos, (batch, 2))
  top = corner[:, 0] * (height - side)
  left = corner[:, 1] * (width - side)
  # Pixel centres relative to the patch square, in patch-grid coordinates.
  rows = (jnp.arange(height)[None, :] + 0.5 - top[:, None]) / side[:, None]
  cols = (jnp.arange(width)[None, :] + 0.5 - left[:, None]) / side[:, None]
  inside = (((rows >= 0) & (rows < 1))[:, :, None]
            & ((cols >= 0) & (cols < 1))[:, None, :])
  u = jnp.clip(rows * size - 0.5, 0.0, size - 1.0)  # (B, H)
  v = jnp.clip(cols * size - 0.5, 0.0, size - 1.0)  # (B, W)
  u0 = jnp.floor(u).astype(jnp.int32)
  v0 = jnp.floor(v).astype(jnp.int32)
  u1, v1 = jnp.minimum(u0 + 1, size - 1), jnp.minimum(v0 + 1, size - 1)
  wu, wv = (u - u0)[:, :, None, None], (v - v0)[:, None, :, None]

  def gather(r, c):
    return patch[r[:, :, None], c[:, None, :]]  # (B, H, W, C)

  sampled = ((1 - wu) * (1 - wv) * gather(u0, v0) + (1 - wu) * wv * gather(u0, v1)
             + wu * (1 - wv) * gather(u1, v0) + wu * wv * gather(u1, v1))
  return jnp.where(inside[..., None], sampled.astype(x.dtype), x)


def _patch_objective(logits: Array, y: Optional[Array], target_class: Optional[int]) -> Array:
  if target_class is None:
    return losses_lib.cross_entropy(logits, y)
  target = jnp.full((logits.shape[0],), target_class, jnp.int32)
  return losses_lib.cross_entropy(logits, target, target)


def train_patch(key: PRNGKey, logits_fn: Any, x: ArrayLike, *, patch_size: int,
                target_class: Optional[int] = None, y: Optional[ArrayLike] = None,
                scale_range: Sequence[float] = (0.1, 0.25), num_steps: int = 500,
                batch_size: Optional[int] = None,
                optimizer: Optional[optax.GradientTransformation] = None,
                init_patch: Optional[ArrayLike] = None, checked: bool = False) -> Array:
  """Trains a universal adversarial patch over random placements and scales.

  Maximises the mean over a minibatch and random placements of
  log p(target_class | patched x) (targeted) or of the cross-entropy of the
  true labels `y` (untargeted), with `optimizer` (default `optax.adam(0.05)`)
  and projection to [0, 1] after every update, in a `lax.fori_loop`.

  Args:
    key: a `jax.random.key`.
    logits_fn: x -> logits, or a gradient oracle (e.g. EOT for a randomized
      model).
    x: training images (N, H, W, C) in [0, 1].
    patch_size: side P of the square patch in pixels.
    target_class: class to force; None for an untargeted patch (needs y).
    y: true labels (N,) for the untargeted objective.
    scale_range: (low, high) area fraction of the patch, see `apply_patch`.
    num_steps: optimisation steps.
    batch_size: images per step, drawn uniformly with replacement (default:
      all N every step).
    optimizer: an optax optimiser (it minimises the negated objective).
    init_patch: starting patch (P, P, C); default uniform random.
    checked: check traced x and y too, as `checkify` checks; the call must
      then run under `certjax.attacks.checked` (or `checkify.checkify`).
      False adds nothing to the program.

  Returns:
    The trained patch, shape (P, P, C), in [0, 1].

  Raises:
    ValueError: on invalid input, naming the problem and the accepted values.
  """
  oracle = as_oracle(logits_fn)
  check_images(x)
  if checked:
    checkify_images(x)
  num_examples, channels = np.shape(x)[0], np.shape(x)[-1]
  check_int_at_least(patch_size, "patch_size", 1)
  check_int_at_least(num_steps, "num_steps", 1)
  _check_scale_range(scale_range)
  batch_size = num_examples if batch_size is None else check_int_at_least(
      batch_size, "batch_size", 1)
  num_classes = logits_shape(oracle, x)[-1]
  if target_class is None:
    if y is None:
      raise ValueError("An untargeted patch needs the true labels y; or give target_class.")
    check_labels(y, num_classes=num_classes, batch_size=num_examples)
    if checked:
      checkify_labels(y, num_classes=num_classes)
    y = jnp.asarray(y)
  elif not (isinstance(target_class, (int, np.integer)) and 0 <= target_class < num_classes):
    raise ValueError(
        f"target_class must be an integer in [0, {num_classes - 1}]; got {target_class!r}.")
  optimizer = optax.adam(0.05) if optimizer is None else optimizer
  x = jnp.asarray(x)
  k_init, k_steps = jax.random.split(key)
  if init_patch is None:
    patch = jax.random.uniform(k_init, (patch_size, patch_size, channels), x.dtype)
  else:
    _check_patch(init_patch, channels)
    patch = jnp.asarray(init_patch, x.dtype)

  def negated_objective_with_grad(patch, k, indices):
    k_place, k_model = jax.random.split(k)
    batch_x = x[indices]
    batch_y = None if y is None else y[indices]
    # The oracle gives d loss / d patched image (averaged over draws for EOT
    # oracles); the placement's VJP carries it back to the patch.
    patched, placement_vjp = jax.vjp(
        lambda p: apply_patch(k_place, batch_x, p, scale_range), patch)
    loss, _, grad_x = oracle.value_and_grad(
        k_model, patched, lambda logits: _patch_objective(logits, batch_y, target_class))
    return -jnp.mean(loss), -placement_vjp(grad_x)[0] / batch_x.shape[0]

  def body(step, carry):
    patch, opt_state = carry
    k = jax.random.fold_in(k_steps, step)
    k_batch, k_obj = jax.random.split(k)
    if batch_size == num_examples:
      indices = jnp.arange(num_examples)
    else:
      indices = jax.random.randint(k_batch, (batch_size,), 0, num_examples)
    _, grad = negated_objective_with_grad(patch, k_obj, indices)
    updates, opt_state = optimizer.update(grad, opt_state, patch)
    patch = jnp.clip(optax.apply_updates(patch, updates), 0.0, 1.0)
    return patch, opt_state

  patch, _ = lax.fori_loop(0, num_steps, body, (patch, optimizer.init(patch)))
  return patch


def patch_success_rate(key: PRNGKey, logits_fn: Any, x: ArrayLike, patch: ArrayLike, *,
                       target_class: Optional[int] = None, y: Optional[ArrayLike] = None,
                       scale_range: Sequence[float] = (0.1, 0.25),
                       num_placements: int = 8, checked: bool = False) -> Array:
  """Attack success rate of a patch over random placements and scales.

  Targeted: the fraction of (image, placement) pairs classified as
  `target_class`, over images whose true label (when `y` is given) is not the
  target. Untargeted: the fraction misclassified.

  Args:
    key: a `jax.random.key`.
    logits_fn: x -> logits, or an oracle (mean logits).
    x: images (N, H, W, C) in [0, 1].
    patch: (P, P, C) patch.
    target_class: class the patch forces; None for untargeted (needs y).
    y: true labels (N,).
    scale_range: (low, high) area fraction, see `apply_patch`.
    num_placements: random placements per image.
    checked: check traced x and y too, as `checkify` checks; the call must
      then run under `certjax.attacks.checked` (or `checkify.checkify`).
      False adds nothing to the program.

  Returns:
    Scalar success rate in [0, 1].

  Raises:
    ValueError: on invalid input, naming the problem and the accepted values.
  """
  oracle = as_oracle(logits_fn)
  check_images(x)
  if checked:
    checkify_images(x)
  check_int_at_least(num_placements, "num_placements", 1)
  _check_patch(patch, np.shape(x)[-1])
  if target_class is None and y is None:
    raise ValueError("An untargeted success rate needs the true labels y.")
  x, patch = jnp.asarray(x), jnp.asarray(patch)
  if y is not None:
    num_classes = logits_shape(oracle, x)[-1]
    check_labels(y, num_classes=num_classes, batch_size=x.shape[0])
    if checked:
      checkify_labels(y, num_classes=num_classes)
    y = jnp.asarray(y)

  def one_placement(k):
    k_place, k_model = jax.random.split(k)
    logits = oracle.logits(k_model, apply_patch(k_place, x, patch, scale_range))
    prediction = jnp.argmax(logits, axis=-1)
    return prediction != y if target_class is None else prediction == target_class

  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_placements))
  hits = lax.map(one_placement, keys).astype(jnp.float32)  # (placements, N)
  if target_class is None or y is None:
    return jnp.mean(hits)
  weight = (y != target_class).astype(jnp.float32)
  return jnp.sum(hits * weight) / jnp.maximum(num_placements * jnp.sum(weight), 1.0)
