"""Targeted clean-label poison crafting: feature collision and gradient matching.

Both attacks perturb a few training images of the adversarial class, keep
their (correct) labels, and aim to make a model trained on the poisoned set
classify one chosen target image as that class.

* `feature_collision` (Shafahi et al. 2018, "Poison Frogs!"): for each base
  image b, find a poison p close to b in input space whose features f(p)
  collide with the target's f(t), by forward-backward splitting on
  ||f(p) - f(t)||^2 + beta ||p - b||^2. Meant for transfer learning, where
  the feature extractor f is frozen and only the last layer is retrained.
  Optionally bounded to an L-infinity ball around each base.

* `gradient_matching` (Geiping et al. 2021, "Witches' Brew"): perturbations
  delta (||delta||_inf <= eps) of the poison images such that the surrogate's
  parameter gradient of the training loss on the poisons points the way of
  the gradient of the adversarial loss on the target: minimise
  1 - cos(grad_theta L(x_p + delta, y_p), grad_theta L(x_t, y_adv)). Training
  from scratch on the poisons then also descends the target's adversarial
  loss. Signed Adam with the paper's step schedule, several random restarts in
  parallel (`vmap`), the one with the lowest alignment loss kept.

Images are NHWC in [0, 1] (certjax's pixel space); eps is in pixels. The
functions are pure, loop with `lax.fori_loop` and run under `jit` (wrap the
call, closing over `features_fn`/`loss_fn` and static settings and passing
arrays and params as arguments), e.g.
`jax.jit(lambda k, p, x, y, xt, ya: gradient_matching(k, loss_fn, p, x, y, xt, ya, eps=0.1))`.
`gradient_matching` and `gradient_alignment_loss` also compile themselves,
once per `loss_fn` object and settings, so eager calls in a loop over targets
reuse one program (pass the same `loss_fn`, not a fresh lambda per call).
Eager calls check the values of their inputs (range, shapes); under `jit`
only shapes and dtypes are checked.

On CPU, XLA (jaxlib 0.10.2) runs convolutions inside a loop about 10x slower
than outside one, which makes crafting on convolutional models slow there;
build them with `conv_impl='im2col'` (see benchmarks/poison_crafting.py).

References:
  Shafahi, Huang, Najibi, Suciu, Studer, Dumitras, Goldstein. Poison Frogs!
    Targeted Clean-Label Poisoning Attacks on Neural Networks. NeurIPS 2018.
  Geiping, Fowl, Huang, Czaja, Taylor, Moeller, Goldstein. Witches' Brew:
    Industrial Scale Data Poisoning via Gradient Matching. ICLR 2021.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from certjax.privacy.inversion import gradient_cosine_distance
from certjax.types import Array, ArrayLike, Params, PRNGKey
from certjax.validation import (
  check_images,
  check_in_open_interval,
  check_int_at_least,
  check_labels,
  check_positive,
)

FeaturesFn = Callable[[Array], Array]
LossFn = Callable[[Params, Array, Array], Array]
Augment = Callable[[PRNGKey, Array], Array]

# Shafahi et al.'s beta0 in beta = beta0 * (dim_features / dim_input)^2.
POISON_FROGS_BETA0 = 0.25
# Fractions of the budget after which Witches' Brew divides the step size by
# 10 (its MultiStepLR milestones attackiter // 2.667, // 1.6, // 1.142).
_DECAY_FRACTIONS = (3 / 8, 5 / 8, 7 / 8)


def _check_flag(flag: Any, name: str) -> bool:
  if not isinstance(flag, (bool, np.bool_)):
    raise ValueError(f"{name} must be True or False; got {flag!r}.")
  return bool(flag)


def _check_scalar(value: Any, name: str) -> None:
  if np.ndim(value) != 0:
    raise ValueError(f"{name} must be a scalar; got shape {np.shape(value)}.")


# ------------------------------------------------------------ feature collision


class FeatureCollisionResult(NamedTuple):
  """What `feature_collision` returns."""
  poisons: Array           # (N, H, W, C) in [0, 1]
  feature_distance: Array  # (N,) ||f(p) - f(t)||_2 of each returned poison
  beta: Array              # () the beta used (the default or the one given)


def poison_frogs_beta(dim_features: int, dim_input: int,
                      beta0: float = POISON_FROGS_BETA0) -> float:
  """Shafahi et al.'s scaling of the similarity weight: beta0 * (dim_features / dim_input)^2.

  The paper sets beta = 0.25 * (2048 / dim_b)^2 for InceptionV3's 2,048
  features and base images of dim_b pixel values, so that the weight does not
  depend on the sizes of the two spaces.

  Args:
    dim_features: number of feature values per example (f's output).
    dim_input: number of pixel values per example (H * W * C).
    beta0: the size-free weight (0.25 in the paper), >= 0.

  Returns:
    beta as a Python float.
  """
  check_int_at_least(dim_features, "dim_features", 1)
  check_int_at_least(dim_input, "dim_input", 1)
  check_positive(beta0, "beta0", allow_zero=True)
  return float(beta0) * (dim_features / dim_input) ** 2


def feature_collision(key: PRNGKey, features_fn: FeaturesFn, base_images: ArrayLike,
                      target_image: ArrayLike, *, beta: ArrayLike | None = None,
                      beta0: float = POISON_FROGS_BETA0, num_steps: int = 1000,
                      learning_rate: ArrayLike = 0.01, eps: ArrayLike | None = None,
                      random_start: bool = False, decay: float | None = None,
                      watermark: float = 0.0) -> FeatureCollisionResult:
  """Poison Frogs! feature collision (Shafahi et al. 2018), one poison per base image.

  From p_0 = b (each base image), Algorithm 1 of the paper:

      forward:  p_hat = p - lr * grad_p ||f(p) - f(t)||^2
      backward: p     = (p_hat + lr * beta * b) / (1 + lr * beta)

  then p is clipped to [0, 1] (and, with `eps`, to the L-infinity ball of
  radius eps around b). The backward step is the proximal step of
  (beta / 2) ||p - b||^2, so the iteration's fixed points minimise
  ||f(p) - f(t)||^2 + (beta / 2) ||p - b||^2: the paper's eq. (1) with beta
  halved (we keep the algorithm's step, as ART's FeatureCollisionAttack does;
  ART descends the unsquared feature distance, we the paper's squared one).
  Clipping after the proximal step is the exact proximal step of that term
  plus the box (and ball) constraint, since both are separable per pixel.
  The poisons are independent: every base image is optimised at once, one
  `features_fn` call on the whole batch per step.

  beta defaults to the paper's beta0 * (dim_features / dim_input)^2 with
  beta0 = 0.25 (`poison_frogs_beta`), dim_features the size of one example's
  `features_fn` output and dim_input = H * W * C. Unbounded (`eps=None`) is
  the paper's attack; a finite eps gives the L-infinity-bounded variant used
  by later clean-label benchmarks.

  With `decay`, a step that does not lower a poison's objective (the squared
  distance plus the proximity term) below that of its last accepted iterate
  is discarded and that poison's learning rate multiplied by `decay` (ART
  discards the step and halves its rate against the mean of its recent
  objectives); the paper's Algorithm 1 keeps lr fixed (decay=None).
  `watermark` > 0 blends the target into each base first,
  b <- (1 - w) b + w t (the paper's end-to-end setting uses w = 0.3); the
  blend is the start and the centre of the proximity term, while the eps-ball
  stays around the original base (ART adds w t after crafting instead).

  Args:
    key: a `jax.random.key`; used only by random_start.
    features_fn: images (N, H, W, C) in [0, 1] -> features (N, ...), e.g. the
      penultimate layer of the victim's frozen feature extractor. Must treat
      examples independently (no batch statistics).
    base_images: (N, H, W, C) images of the poison (adversarial) class.
    target_image: (H, W, C) the target.
    beta: weight of the proximity term, >= 0; None for the paper's default.
    beta0: the size-free weight of the default beta (0.25 in the paper).
    num_steps: forward-backward iterations, integer >= 1.
    learning_rate: the forward step lr, > 0 (scale it to the features: the
      gradient of the squared feature distance grows with it).
    eps: L-infinity radius around each base image, >= 0, or None for the
      paper's unbounded attack.
    random_start: start uniformly in the eps-ball (needs eps).
    decay: in (0, 1) to back off the learning rate per poison when a step
      fails to lower its objective; None keeps it fixed (the paper).
    watermark: target opacity w in [0, 1) blended into the bases first.

  Returns:
    `FeatureCollisionResult`: poisons (N, H, W, C) in [0, 1], each poison's
    L2 feature distance to the target and the beta used.

  Raises:
    ValueError: on invalid settings, images of the wrong shape or outside
      [0, 1], or a features_fn without a leading batch dimension.
  """
  check_int_at_least(num_steps, "num_steps", 1)
  for value, name in ((beta, "beta"), (eps, "eps")):
    if value is not None:
      _check_scalar(value, name)
      check_positive(value, name, allow_zero=True)
  _check_scalar(learning_rate, "learning_rate")
  check_positive(learning_rate, "learning_rate")
  if decay is not None:
    check_in_open_interval(decay, "decay", 0.0, 1.0)
  if not (isinstance(watermark, (int, float, np.integer, np.floating))
          and 0.0 <= float(watermark) < 1.0):
    raise ValueError(f"watermark must be an opacity in [0, 1); got {watermark!r}.")
  if _check_flag(random_start, "random_start") and eps is None:
    raise ValueError("random_start=True needs eps (a random start in the eps-ball); "
                     "pass eps or random_start=False.")
  check_images(base_images, name="base_images")
  check_images(target_image, name="target_image", ranks=(3,))
  if np.shape(target_image) != np.shape(base_images)[1:]:
    raise ValueError(f"target_image must have the shape of one base image "
                     f"{tuple(np.shape(base_images)[1:])}; got {tuple(np.shape(target_image))}.")
  base = jnp.asarray(base_images)
  n = base.shape[0]
  out = jax.eval_shape(features_fn, base)
  if not hasattr(out, "shape") or len(out.shape) < 1 or out.shape[0] != n:
    raise ValueError(f"features_fn must map (N, H, W, C) images to (N, ...) features; for "
                     f"N = {n} it returned {getattr(out, 'shape', type(out).__name__)}.")
  dim_features = math.prod(out.shape[1:])
  if beta is None:
    beta = poison_frogs_beta(dim_features, math.prod(base.shape[1:]), beta0)
  beta = jnp.asarray(beta, base.dtype)
  lr = jnp.asarray(learning_rate, base.dtype)
  target = jnp.asarray(target_image, base.dtype)[None]
  target_features = lax.stop_gradient(features_fn(target)).reshape(1, -1)
  centre = base if watermark == 0 else (1.0 - watermark) * base + watermark * target
  if eps is None:
    low, high = jnp.zeros_like(base), jnp.ones_like(base)
  else:
    eps = jnp.asarray(eps, base.dtype)
    low, high = jnp.maximum(base - eps, 0.0), jnp.minimum(base + eps, 1.0)
  start = centre
  if random_start:
    start = centre + eps * jax.random.uniform(key, base.shape, base.dtype, -1.0, 1.0)
  start = jnp.clip(start, low, high)
  per_example = (slice(None),) + (None,) * (base.ndim - 1)

  def distances(p):
    features = features_fn(p).reshape(n, -1)
    return jnp.sum((features - target_features) ** 2, axis=1)

  def objective(p):
    # Summed over the poisons, whose terms are independent: the gradient of
    # the sum is each poison's own gradient.
    dist2 = distances(p)
    prox = 0.5 * beta * jnp.sum((p - centre) ** 2, axis=tuple(range(1, p.ndim)))
    return jnp.sum(dist2), dist2 + prox

  value_and_grad = jax.value_and_grad(objective, has_aux=True)

  def step(p, grad, rate):
    rate = rate[per_example]
    p_hat = p - rate * grad
    p = (p_hat + rate * beta * centre) / (1.0 + rate * beta)
    return jnp.clip(p, low, high)

  def body(_, state):
    candidate, accepted, accepted_obj, accepted_grad, rate = state
    (_, obj), grad = value_and_grad(candidate)
    if decay is None:
      accept = jnp.ones((n,), bool)
    else:
      accept = obj < accepted_obj
      rate = jnp.where(accept, rate, rate * decay)
    accepted = jnp.where(accept[per_example], candidate, accepted)
    accepted_obj = jnp.where(accept, obj, accepted_obj)
    accepted_grad = jnp.where(accept[per_example], grad, accepted_grad)
    return step(accepted, accepted_grad, rate), accepted, accepted_obj, accepted_grad, rate

  init = (start, start, jnp.full((n,), jnp.inf, base.dtype), jnp.zeros_like(base),
          jnp.full((n,), lr, base.dtype))
  candidate, accepted, accepted_obj, _, _ = lax.fori_loop(0, num_steps, body, init)
  if decay is None:
    poisons = candidate
  else:
    _, obj = objective(candidate)
    poisons = jnp.where((obj < accepted_obj)[per_example], candidate, accepted)
  return FeatureCollisionResult(poisons=poisons, feature_distance=jnp.sqrt(distances(poisons)),
                                beta=beta)


# ------------------------------------------------------------- gradient matching


class GradientMatchingResult(NamedTuple):
  """What `gradient_matching` returns."""
  deltas: Array          # (P, H, W, C): the poisons are poison_images + deltas
  alignment_loss: Array  # () 1 - cos of the kept restart at its deltas
  restart_losses: Array  # (R,) final 1 - cos of every restart
  loss_history: Array    # (R, num_steps) the loss at each step's iterate, before the step


def _check_loss_fn(loss_fn: LossFn, params: Params, images: Array, labels: Array,
                   name: str) -> None:
  out = jax.eval_shape(loss_fn, params, images, labels)
  if not hasattr(out, "shape") or out.shape != ():
    raise ValueError(f"loss_fn(params, x, y) must return a scalar (the batch-mean loss); on "
                     f"the {name} it returned {getattr(out, 'shape', type(out).__name__)}.")


def _check_matching_problem(loss_fn, params, poison_images, poison_labels, target_images,
                            adversarial_labels) -> None:
  check_images(poison_images, name="poison_images")
  check_images(target_images, name="target_images")
  if np.shape(target_images)[1:] != np.shape(poison_images)[1:]:
    raise ValueError(f"target_images must be images of the poisons' shape "
                     f"{tuple(np.shape(poison_images)[1:])}; got "
                     f"{tuple(np.shape(target_images)[1:])}.")
  check_labels(poison_labels, batch_size=np.shape(poison_images)[0], name="poison_labels")
  check_labels(adversarial_labels, batch_size=np.shape(target_images)[0],
               name="adversarial_labels")
  _check_loss_fn(loss_fn, params, poison_images, poison_labels, "poisons")
  _check_loss_fn(loss_fn, params, target_images, adversarial_labels, "targets")


def gradient_alignment_loss(loss_fn: LossFn, params: Params, poison_images: ArrayLike,
                            poison_labels: ArrayLike, target_images: ArrayLike,
                            adversarial_labels: ArrayLike) -> Array:
  """Witches' Brew's alignment loss: 1 - cos(grad L(poisons), grad L(targets, adversarial)).

  Both gradients are of `loss_fn` (the batch-mean training loss) in all of
  `params`, flattened into one vector; 0 when they point the same way, 1 when
  orthogonal, 2 when opposite. `gradient_matching` minimises it over the
  poisons' perturbations.

  Args:
    loss_fn: (params, images, labels) -> scalar batch-mean loss.
    params: the (surrogate) model's parameters.
    poison_images: (P, H, W, C) poisons in [0, 1] (perturbed or not).
    poison_labels: (P,) their integer labels.
    target_images: (T, H, W, C) targets in [0, 1].
    adversarial_labels: (T,) the labels the attacker wants for them.

  Returns:
    A scalar in [0, 2].

  Raises:
    ValueError: on images of the wrong shape or outside [0, 1], label
      arrays not matching their images, or a non-scalar loss_fn.
  """
  _check_matching_problem(loss_fn, params, poison_images, poison_labels, target_images,
                          adversarial_labels)
  return _alignment_loss(params, jnp.asarray(poison_images), jnp.asarray(poison_labels),
                         jnp.asarray(target_images), jnp.asarray(adversarial_labels),
                         loss_fn=loss_fn)


@functools.partial(jax.jit, static_argnames="loss_fn")
def _alignment_loss(params, poison_images, poison_labels, target_images, adversarial_labels, *,
                    loss_fn):
  target_grads = jax.grad(loss_fn)(params, target_images, adversarial_labels)
  poison_grads = jax.grad(loss_fn)(params, poison_images, poison_labels)
  return gradient_cosine_distance(poison_grads, target_grads)


def random_shift_flip(key: PRNGKey, images: ArrayLike, *, max_shift: int = 4,
                      flip: bool = True) -> Array:
  """Differentiable random translation (zero padding) and horizontal flip, per image.

  Each image is shifted by integers drawn uniformly in [-max_shift,
  max_shift] on each axis, the vacated pixels zero, and mirrored left-right
  with probability 1/2 when `flip`. Linear in the pixels, so gradients flow
  through it: the augmentation `gradient_matching` can apply to the poisons
  at each step (Witches' Brew's differentiable augmentation translates by up
  to 1/4 of the image with bilinear sampling and flips; this is its
  integer-shift form). Pass it as
  `augment=functools.partial(random_shift_flip, max_shift=2, flip=False)`.

  Args:
    key: a `jax.random.key`.
    images: (N, H, W, C).
    max_shift: the largest shift in pixels, integer >= 0.
    flip: mirror half the images left-right (leave False for digits).

  Returns:
    Augmented images shaped like `images`.
  """
  check_int_at_least(max_shift, "max_shift", 0)
  _check_flag(flip, "flip")
  x = jnp.asarray(images)
  if x.ndim != 4:
    raise ValueError(f"images must have rank 4 (batch, height, width, channels); "
                     f"got shape {x.shape}.")
  n, h, w, c = x.shape
  k_shift, k_flip = jax.random.split(key)
  if max_shift:
    offsets = jax.random.randint(k_shift, (n, 2), 0, 2 * max_shift + 1)
    padded = jnp.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    x = jax.vmap(lambda im, o: lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(
        padded, offsets)
  if flip:
    mirror = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
    x = jnp.where(mirror, x[:, :, ::-1], x)
  return x


def gradient_matching(key: PRNGKey, loss_fn: LossFn, params: Params,
                      poison_images: ArrayLike, poison_labels: ArrayLike,
                      target_images: ArrayLike, adversarial_labels: ArrayLike, *,
                      eps: ArrayLike, num_steps: int = 250, restarts: int = 8,
                      learning_rate: ArrayLike = 0.1, signed: bool = True,
                      step_size_decay: bool = True,
                      augment: Augment | None = None) -> GradientMatchingResult:
  """Witches' Brew gradient matching (Geiping et al. 2021): clean-label poisons from scratch.

  Finds perturbations delta of the poison images, ||delta_i||_inf <= eps and
  x_i + delta_i in [0, 1], minimising the paper's eq. (3)

      1 - <grad_theta L(x_t, y_adv), grad_theta L(x_p + delta, y_p)>
          / (||grad_theta L(x_t, y_adv)|| ||grad_theta L(x_p + delta, y_p)||)

  with L = `loss_fn` (the batch mean, so the poison gradient is the paper's
  sum over poisons up to a scale the cosine ignores), theta all of `params`
  (the surrogate: in the paper a model trained on the clean data), and the
  inner product and norms over the whole parameter vector: the per-layer
  inner products are summed and divided by the global norms, as the
  reference code's 'similarity' loss, not a sum of per-layer cosines. The
  poison labels y_p stay unchanged (clean label); the target gradient is
  computed once, without augmentation.

  Optimisation as the reference code's 'signAdam': Adam (optax defaults, as
  torch's) on the sign of the gradient in delta, step size divided by 10
  after 3/8, 5/8 and 7/8 of `num_steps`, delta projected to the eps-ball and
  the image box after every step. Each restart starts uniformly in the ball
  (clipped to the box); the `restarts` trials run at once under `vmap` and
  the one with the lowest final alignment loss (unaugmented) is kept. Each
  step costs a double backward pass: `jax.grad` in delta of a function that
  calls `jax.grad` in params. Compiled once per `loss_fn` object, `augment`
  and settings (num_steps, restarts, signed, step_size_decay); eps and
  learning_rate are traced.

  Args:
    key: a `jax.random.key`; restart r uses `fold_in(key, r)`, so restarts=1
      runs restart 0 of any longer series.
    loss_fn: (params, images, labels) -> scalar batch-mean training loss of
      the victim, twice differentiable.
    params: the surrogate's parameters (a pytree).
    poison_images: (P, H, W, C) clean images of the adversarial class in [0, 1].
    poison_labels: (P,) their (true, unchanged) integer labels.
    target_images: (T, H, W, C) the target(s) in [0, 1].
    adversarial_labels: (T,) the labels the attacker wants for the targets.
    eps: L-infinity radius in pixels, a scalar >= 0 (the paper's CIFAR-10
      setting: 16/255); may be traced.
    num_steps: optimisation steps per restart (the paper's M = 250).
    restarts: independent random starts R, integer >= 1 (the paper's 8).
    learning_rate: Adam's initial step size, > 0 (the paper's tau = 0.1,
      which it applies in normalised coordinates, about 0.1 * std pixels; in
      [0, 1] pixels 0.1 makes the first steps cross the ball and the decayed
      ones refine).
    signed: Adam on sign(gradient) as the paper; False uses the gradient.
    step_size_decay: the paper's schedule; False keeps the step size.
    augment: None (default), or a differentiable (key, images) -> images
      applied to the poisons at every step with a fresh key, e.g.
      `functools.partial(random_shift_flip, max_shift=2, flip=False)`.

  Returns:
    `GradientMatchingResult`: deltas (P, H, W, C) of the kept restart (the
    poisons are poison_images + deltas), its alignment loss, every restart's
    final loss and every restart's loss at each step.

  Raises:
    ValueError: on eps < 0, num_steps or restarts < 1, images of the wrong
      shape or outside [0, 1], label arrays not matching their images, or a
      loss_fn that does not return a scalar.
  """
  _check_scalar(eps, "eps")
  check_positive(eps, "eps", allow_zero=True)
  check_int_at_least(num_steps, "num_steps", 1)
  check_int_at_least(restarts, "restarts", 1)
  _check_scalar(learning_rate, "learning_rate")
  check_positive(learning_rate, "learning_rate")
  signed = _check_flag(signed, "signed")
  step_size_decay = _check_flag(step_size_decay, "step_size_decay")
  if augment is not None and not callable(augment):
    raise ValueError(f"augment must be None or a function (key, images) -> images; "
                     f"got {augment!r}.")
  _check_matching_problem(loss_fn, params, poison_images, poison_labels, target_images,
                          adversarial_labels)
  deltas, losses, histories = _gradient_matching_run(
      key, params, jnp.asarray(poison_images), jnp.asarray(poison_labels),
      jnp.asarray(target_images), jnp.asarray(adversarial_labels), eps, learning_rate,
      loss_fn=loss_fn, augment=augment, num_steps=num_steps, restarts=restarts, signed=signed,
      step_size_decay=step_size_decay)
  # NaN never wins: argmin would return it.
  best = jnp.argmin(jnp.where(jnp.isnan(losses), jnp.inf, losses))
  return GradientMatchingResult(deltas=deltas[best], alignment_loss=losses[best],
                                restart_losses=losses, loss_history=histories)


@functools.partial(jax.jit, static_argnames=("loss_fn", "augment", "num_steps", "restarts",
                                             "signed", "step_size_decay"))
def _gradient_matching_run(key, params, x, y, target_images, adversarial_labels, eps,
                           learning_rate, *, loss_fn, augment, num_steps, restarts, signed,
                           step_size_decay):
  """Every restart of `gradient_matching`, compiled as one program; no validation.

  Jitted here, keyed on the loss and the settings, so that eager calls with
  the same ones (a loop over targets) reuse one compiled program.
  """
  eps = jnp.asarray(eps, x.dtype)
  target_grads = lax.stop_gradient(jax.grad(loss_fn)(params, target_images, adversarial_labels))

  def alignment(delta, augment_key):
    images = x + delta
    if augment is not None and augment_key is not None:
      images = augment(augment_key, images)
    return gradient_cosine_distance(jax.grad(loss_fn)(params, images, y), target_grads)

  lr = jnp.asarray(learning_rate, jnp.float32)
  if step_size_decay:
    milestones = tuple(int(num_steps * f) for f in _DECAY_FRACTIONS)
    schedule = lambda count: lr * 0.1 ** sum((count >= m).astype(jnp.float32)
                                             for m in milestones)
  else:
    schedule = lambda count: lr
  transform = optax.adam(schedule)
  if signed:
    transform = optax.chain(optax.stateless(lambda g, _: jax.tree.map(jnp.sign, g)), transform)
  # The box x + delta in [0, 1] intersected with the ball, per pixel.
  low, high = jnp.maximum(-eps, -x), jnp.minimum(eps, 1.0 - x)

  def trial(restart_key):
    k_init, k_steps = jax.random.split(restart_key)
    delta = jnp.clip(eps * jax.random.uniform(k_init, x.shape, x.dtype, -1.0, 1.0), low, high)

    def body(i, state):
      delta, opt_state, history = state
      loss, grad = jax.value_and_grad(alignment)(delta, jax.random.fold_in(k_steps, i))
      updates, opt_state = transform.update(grad, opt_state, delta)
      delta = jnp.clip(optax.apply_updates(delta, updates), low, high)
      return delta, opt_state, history.at[i].set(loss)

    init = (delta, transform.init(delta), jnp.zeros((num_steps,), jnp.float32))
    delta, _, history = lax.fori_loop(0, num_steps, body, init)
    return delta, alignment(delta, None), history

  restart_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(restarts))
  deltas, losses, histories = jax.vmap(trial)(restart_keys)
  return deltas, losses, histories
