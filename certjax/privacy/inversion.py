"""Model inversion and gradient inversion: reconstructing inputs from a model or its gradient.

Two threat models:

* Model inversion (`invert_classes`, Fredrikson et al. 2015, "MI-Face"): with
  white-box access to a classifier, recover a representative input of a class
  by gradient descent on the input, minimising the paper's cost
  1 - p_class(x) (or the cross-entropy -log p_class(x)) plus total-variation
  and L2 (prior) terms, each step projected to [0, 1] pixel space. The paper's
  stopping rules are kept: a budget of `num_steps` (alpha), stop once the cost
  fails to improve on the last `patience` costs (beta) or falls to
  `cost_threshold` (gamma), and return the iterate of lowest cost.

* Gradient inversion of one (Fed)SGD update. A client computes
  `fedsgd_gradient(apply_fn, params, x, y)`, the gradient of the mean softmax
  cross-entropy over its batch, and shares it. From it:
  - `recover_labels_idlg` reads the labels off the final dense layer's kernel
    gradient (iDLG for one example; the LLG count heuristic of Wainakh et al.
    or the unique-label rule of Yin et al. for a batch).
  - `dlg` (Zhu et al. 2019) fits dummy images and dummy soft labels whose
    gradient matches the shared one in squared L2 distance, with L-BFGS as in
    the paper (or Adam); known labels (e.g. from iDLG) replace the soft labels.
  - `inverting_gradients` (Geiping et al. 2020) minimises one minus the cosine
    similarity of the gradients plus a total-variation prior, with Adam on the
    signed gradient, the step size divided by 10 at 3/8, 5/8 and 7/8 of the
    budget, images boxed to [0, 1] after every step, and the best of several
    restarts; it works for batches > 1.

Metrics: `psnr` and `ssim` (Wang et al. 2004) per image, `label_recovery_rate`
over label multisets, and `match_reconstructions`, which pairs a batch
recovered up to permutation with the true images (Hungarian assignment) before
PSNR/SSIM are read.

Pixel space: every image here lies in [0, 1] (NHWC), the space certjax models
take; Geiping et al. optimise in the normalised space of their data, we box
[0, 1] directly.

The attacks are not jitted inside: wrap a call in `jax.jit` (closing over
`apply_fn`/`logits_fn` and the static settings, passing params and gradients
as arguments), e.g.
`jax.jit(lambda k, p, g: dlg(k, apply_fn, p, g, (1, 28, 28, 1)))(key, params, grads)`.
The metrics (`psnr`, `ssim`, `label_recovery_rate`) are jitted.

References:
  Fredrikson, Jha, Ristenpart. Model inversion attacks that exploit confidence
    information and basic countermeasures. CCS 2015.
  Zhu, Liu, Han. Deep leakage from gradients. NeurIPS 2019.
  Zhao, Mopuri, Bilen. iDLG: Improved deep leakage from gradients. arXiv
    2001.02610, 2020.
  Geiping, Bauermeister, Droege, Moeller. Inverting gradients: how easy is it
    to break privacy in federated learning? NeurIPS 2020.
  Yin, Mallya, Vahdat, Alvarez, Kautz, Molchanov. See through gradients: image
    batch recovery via GradInversion. CVPR 2021.
  Wainakh, Ventola, Muessig, Keim, Cordero, Zimmer, Grube, Kersting, Muehlhaeuser.
    User-level label leakage from gradients in federated learning. PETS 2022.
  Wang, Bovik, Sheikh, Simoncelli. Image quality assessment: from error
    visibility to structural similarity. IEEE TIP 2004.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize
from jax import lax

from certjax.types import Array, ArrayLike, LogitsFn, Params, PRNGKey
from certjax.validation import (
  check_choice,
  check_finite_scalar,
  check_images,
  check_int_at_least,
  check_labels,
  check_positive,
  is_concrete,
)

ApplyFn = Callable[[Params, Array], Array]

CLASS_INVERSION_LOSSES = ("probability", "cross_entropy")
CLASS_INVERSION_INITS = ("zeros", "uniform")
LABEL_RECOVERY_METHODS = ("idlg", "llg", "yin")
DLG_OPTIMIZERS = ("lbfgs", "adam")
MATCH_METRICS = ("mse", "psnr")
# Default step sizes of `dlg`: torch.optim.LBFGS's lr=1 as DLG's code uses it,
# and a usual Adam step.
_DLG_DEFAULT_STEP_SIZE = {"lbfgs": 1.0, "adam": 0.1}
# Fractions of the budget after which Geiping et al. divide the step size by 10
# (their MultiStepLR milestones max_iterations // 2.667, // 1.6, // 1.142).
_GEIPING_DECAY_FRACTIONS = (3 / 8, 5 / 8, 7 / 8)


# ------------------------------------------------------------------ priors


def total_variation(images: ArrayLike) -> Array:
  """Anisotropic total variation per image: mean |vertical| + mean |horizontal| difference.

  The mean-absolute form of Geiping et al. (`inversefed`'s `total_variation`),
  so the weight does not depend on the image size.

  Args:
    images: (batch, H, W, C).

  Returns:
    (batch,) total variation of each image.
  """
  x = jnp.asarray(images)
  if x.ndim != 4:
    raise ValueError(f"images must have rank 4 (batch, height, width, channels); "
                     f"got shape {x.shape}.")
  vertical = jnp.abs(x[:, 1:] - x[:, :-1]).mean(axis=(1, 2, 3)) if x.shape[1] > 1 else 0.0
  horizontal = jnp.abs(x[:, :, 1:] - x[:, :, :-1]).mean(axis=(1, 2, 3)) if x.shape[2] > 1 else 0.0
  return jnp.zeros(x.shape[0], x.dtype) + vertical + horizontal


# ------------------------------------------------------- class inversion (MI-Face)


class ClassInversionInfo(NamedTuple):
  """Per-class bookkeeping returned by `invert_classes(..., return_info=True)`."""
  cost: Array         # (K,) the cost of the returned image (data term + priors)
  probability: Array  # (K,) softmax probability of its class at the returned image
  num_steps: Array    # (K,) descent steps taken before a stopping rule fired


def _check_image_shape(image_shape: Any) -> tuple[int, int, int]:
  shape = tuple(image_shape) if isinstance(image_shape, (tuple, list)) else None
  if (shape is None or len(shape) != 3
      or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1 for d in shape)):
    raise ValueError(f"image_shape must be (height, width, channels) of positive integers; "
                     f"got {image_shape!r}.")
  return tuple(int(d) for d in shape)


def _num_classes(logits_shape: Any, name: str, what: str) -> int:
  if len(logits_shape.shape) != 2:
    raise ValueError(f"{name} must return logits of shape (batch, num_classes) for {what}; "
                     f"got shape {tuple(logits_shape.shape)}.")
  return int(logits_shape.shape[1])


def invert_classes(key: PRNGKey, logits_fn: LogitsFn, classes: ArrayLike,
                   image_shape: Sequence[int], *, num_steps: int = 5000,
                   step_size: float = 0.1, loss: str = "probability",
                   tv_weight: float = 0.0, l2_weight: float = 0.0,
                   prior: ArrayLike | None = None, init: str = "zeros",
                   patience: int | None = 100,
                   cost_threshold: float | None = None,
                   return_info: bool = False) -> Any:
  """Class-representative model inversion (Fredrikson et al. 2015, MI-Face).

  For each class c, from x_0 (zeros, as in the paper, or seeded uniform noise)
  iterates x_{i+1} = clip(x_i - step_size * grad cost(x_i), 0, 1) with

      cost(x) = 1 - softmax(logits_fn(x))_c            (loss='probability')
                or -log softmax(logits_fn(x))_c        (loss='cross_entropy')
              + tv_weight * TV(x) + l2_weight * mean((x - prior)^2),

  stops after `num_steps` steps, or when the cost fails to go below the
  largest of the previous `patience` costs (the paper's beta; None disables),
  or when it reaches `cost_threshold` (gamma; None disables), and returns the
  iterate of lowest cost. The paper's `Process` (denoising and sharpening of
  faces) is replaced by the projection to [0, 1] and the TV prior. The classes
  are inverted independently (`vmap`), each logits_fn call on one image, so a
  jitted caller may pass `classes` traced.

  Args:
    key: a `jax.random.key` (used by init='uniform').
    logits_fn: images (N, H, W, C) in [0, 1] -> logits (N, num_classes),
      differentiable.
    classes: (K,) integer classes to invert.
    image_shape: (H, W, C) of the model's inputs.
    num_steps: descent steps at most (the paper's alpha).
    step_size: gradient step (the paper's lambda).
    loss: 'probability' (the paper's 1 - p) or 'cross_entropy' (-log p, whose
      gradient does not vanish when p is near 0 or 1).
    tv_weight: weight of the total-variation prior (`total_variation`), >= 0.
    l2_weight: weight of the mean squared distance to `prior`, >= 0.
    prior: (H, W, C) image in [0, 1] the L2 term pulls towards (e.g. the mean
      training image); zeros when None.
    init: 'zeros' (the paper's x_0 = 0) or 'uniform' (seeded U[0, 1] noise).
    patience: the paper's beta (integer >= 1; 100 is IBM ART's MIFace
      `window_length` default), or None to run all steps.
    cost_threshold: the paper's gamma, or None.
    return_info: also return `ClassInversionInfo`.

  Returns:
    (K, H, W, C) images in [0, 1] (and `ClassInversionInfo` with return_info).

  Raises:
    ValueError: on invalid settings or classes out of range.
  """
  check_int_at_least(num_steps, "num_steps", 1)
  check_positive(step_size, "step_size")
  check_choice(loss, "loss", CLASS_INVERSION_LOSSES)
  check_positive(tv_weight, "tv_weight", allow_zero=True)
  check_positive(l2_weight, "l2_weight", allow_zero=True)
  check_choice(init, "init", CLASS_INVERSION_INITS)
  if patience is not None:
    check_int_at_least(patience, "patience", 1)
  if cost_threshold is not None:
    check_finite_scalar(cost_threshold, "cost_threshold")
  shape = _check_image_shape(image_shape)
  logits_shape = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct((1,) + shape, jnp.float32))
  num_classes = _num_classes(logits_shape, "logits_fn", f"images of shape {(1,) + shape}")
  check_labels(classes, num_classes=num_classes, name="classes")
  if prior is None:
    prior_image = jnp.zeros(shape, jnp.float32)
  else:
    if np.shape(prior) != shape:
      raise ValueError(f"prior must have image_shape {shape}; got shape {np.shape(prior)}.")
    check_images(jnp.asarray(prior)[None], name="prior")
    prior_image = jnp.asarray(prior, jnp.float32)
  classes = jnp.asarray(classes)
  if init == "zeros":
    starts = jnp.zeros((classes.shape[0],) + shape, jnp.float32)
  else:
    starts = jax.random.uniform(key, (classes.shape[0],) + shape, jnp.float32)

  def cost_fn(x, label):
    logits = logits_fn(x[None])[0]
    if loss == "probability":
      data_term = 1.0 - jax.nn.softmax(logits)[label]
    else:
      data_term = -jax.nn.log_softmax(logits)[label]
    return (data_term + tv_weight * total_variation(x[None])[0]
            + l2_weight * jnp.mean((x - prior_image) ** 2))

  value_and_grad = jax.value_and_grad(cost_fn)
  window = patience or 1

  def invert_one(label, x0):
    cost0, grad0 = value_and_grad(x0, label)
    # The last `window` costs, -inf where none was seen yet (max ignores them).
    history = jnp.full((window,), -jnp.inf, cost0.dtype).at[0].set(cost0)

    def cond(state):
      step, stopped = state[0], state[-1]
      return (step < num_steps) & ~stopped

    def body(state):
      step, x, grad, best_x, best_cost, history, _ = state
      x = jnp.clip(x - step_size * grad, 0.0, 1.0)
      cost, grad = value_and_grad(x, label)
      stopped = jnp.zeros((), bool)
      if patience is not None:
        stopped |= cost >= jnp.max(history)
      if cost_threshold is not None:
        stopped |= cost <= cost_threshold
      better = cost < best_cost
      best_x = jnp.where(better, x, best_x)
      best_cost = jnp.where(better, cost, best_cost)
      history = history.at[(step + 1) % window].set(cost)
      return step + 1, x, grad, best_x, best_cost, history, stopped

    state = (jnp.zeros((), jnp.int32), x0, grad0, x0, cost0, history, jnp.zeros((), bool))
    steps, _, _, best_x, best_cost, _, _ = lax.while_loop(cond, body, state)
    return best_x, best_cost, steps

  images, costs, steps = jax.vmap(invert_one)(classes, starts)
  if not return_info:
    return images
  probabilities = jnp.take_along_axis(jax.nn.softmax(logits_fn(images), axis=-1),
                                      classes[:, None], axis=1)[:, 0]
  return images, ClassInversionInfo(cost=costs, probability=probabilities, num_steps=steps)


# ------------------------------------------------------------- the victim's update


def _soft_cross_entropy_gradient(apply_fn: ApplyFn, params: Params, images: Array,
                                 targets: Array) -> Params:
  """Gradient in `params` of the batch-mean cross-entropy against target distributions."""
  def loss(p):
    log_probs = jax.nn.log_softmax(apply_fn(p, images), axis=-1)
    return -jnp.mean(jnp.sum(targets * log_probs, axis=-1))
  return jax.grad(loss)(params)


def fedsgd_gradient(apply_fn: ApplyFn, params: Params, images: ArrayLike,
                    labels: ArrayLike) -> Params:
  """The gradient a (Fed)SGD client shares: grad of the batch-mean softmax cross-entropy.

  The update every gradient-inversion attack here assumes (`dlg`,
  `inverting_gradients`, `recover_labels_idlg`).

  Args:
    apply_fn: (params, images) -> logits (batch, num_classes).
    params: the model's parameters (any pytree).
    images: (batch, H, W, C) in [0, 1].
    labels: (batch,) integer labels.

  Returns:
    A pytree shaped like `params`.
  """
  images = jnp.asarray(images)
  logits = jax.eval_shape(apply_fn, params, images)
  num_classes = _num_classes(logits, "apply_fn", f"images of shape {images.shape}")
  check_labels(labels, num_classes=num_classes, batch_size=images.shape[0], name="labels")
  targets = jax.nn.one_hot(jnp.asarray(labels), num_classes, dtype=images.dtype)
  return _soft_cross_entropy_gradient(apply_fn, params, images, targets)


# ---------------------------------------------------------------- label recovery


def _llg_labels(column_sums: Array, batch_size: int) -> Array:
  """LLG (Wainakh et al. 2022), the 'simple' variant, as a fixed-length loop."""
  num_classes = column_sums.shape[0]
  negative = column_sums < 0
  # The impact of one example on its class's column sum, estimated from the
  # negative sums as in the paper (and `breaching`'s 'wainakh-simple').
  impact = jnp.sum(jnp.where(negative, column_sums, 0.0)) * (1 + 1 / num_classes) / batch_size
  num_first = jnp.minimum(jnp.sum(negative), batch_size)
  order = jnp.argsort(column_sums)  # negative classes first, most negative first
  remaining = jnp.where(negative, column_sums - impact, column_sums)

  def body(i, state):
    labels, remaining = state
    # Stage 1: every class with a negative sum once. Stage 2: the most negative
    # remaining sum, which then pays one more example's impact.
    first_stage = i < num_first
    chosen = jnp.where(first_stage, order[i], jnp.argmin(remaining))
    remaining = jnp.where(first_stage, remaining, remaining.at[chosen].add(-impact))
    return labels.at[i].set(chosen), remaining

  labels = jnp.zeros((batch_size,), jnp.int32)
  labels, _ = lax.fori_loop(0, batch_size, body, (labels, remaining))
  return jnp.sort(labels)


def recover_labels_idlg(last_layer_kernel_grad: ArrayLike, batch_size: int = 1, *,
                        method: str | None = None) -> Array:
  """Labels of a batch read off the final dense layer's kernel gradient.

  With logits z = W^T h + b and the batch-mean cross-entropy, column c of the
  kernel gradient is (1/B) sum_n (p_nc - y_nc) h_n. When the penultimate
  activations h_n are non-negative (ReLU, sigmoid, or any non-negative
  feature map) every entry of a column is >= 0 for a class absent from the
  batch (p_nc >= 0) while a present class carries the negative terms
  (p_nc - 1) h_n. The methods:

  * 'idlg' (Zhao et al. 2020; batch_size 1 only): the class whose column sum
    is smallest, which is the only negative one.
  * 'llg' (Wainakh et al. 2022, 'LLG' simple variant; the default for
    batch_size > 1): every class with a negative column sum once, then the
    remaining B - #negative labels one by one as the class of smallest sum;
    every pick raises that class's sum by the estimated impact of one example,
    |m| with m = (1 + 1/C)/B * (sum of the negative column sums), so a class
    is picked again only while its sum stays the smallest. Its counts assume
    examples of similar activation size and predictions near uniform (an
    untrained or early-training model); it recovers repeated labels.
  * 'yin' (Yin et al. 2021): the B classes whose columns have the smallest
    minimum entry; exact when the labels are distinct, blind to repeats.

  Args:
    last_layer_kernel_grad: (H, C) gradient of the final dense kernel in
      Flax's (in, out) layout (pass a PyTorch (C, H) weight's transpose).
    batch_size: B, the number of labels to recover (integer >= 1).
    method: 'idlg', 'llg' or 'yin'; None picks 'idlg' for B = 1 and 'llg'
      otherwise.

  Returns:
    (B,) int32 labels, sorted (the order of a batch is not recoverable).

  Raises:
    ValueError: a gradient that is not (H, C), or 'idlg' for B > 1.
  """
  check_int_at_least(batch_size, "batch_size", 1)
  if method is None:
    method = "idlg" if batch_size == 1 else "llg"
  check_choice(method, "method", LABEL_RECOVERY_METHODS)
  grad = jnp.asarray(last_layer_kernel_grad)
  if grad.ndim != 2:
    raise ValueError(f"last_layer_kernel_grad must be the (hidden, num_classes) kernel gradient "
                     f"of the final dense layer; got shape {grad.shape}.")
  if method == "idlg" and batch_size != 1:
    raise ValueError(f"method 'idlg' recovers the label of one example (batch_size 1); got "
                     f"batch_size {batch_size}. Use 'llg' or 'yin' for batches.")
  if method == "yin" and batch_size > grad.shape[1]:
    raise ValueError(f"method 'yin' returns distinct labels, so batch_size must be <= "
                     f"num_classes {grad.shape[1]}; got {batch_size}. Use 'llg'.")
  if method == "idlg":
    return jnp.argmin(grad.sum(axis=0))[None].astype(jnp.int32)
  if method == "yin":
    return jnp.sort(jnp.argsort(grad.min(axis=0))[:batch_size]).astype(jnp.int32)
  return _llg_labels(grad.sum(axis=0), batch_size)


# ------------------------------------------------------------ gradient inversion


class GradientInversionResult(NamedTuple):
  """What `dlg` and `inverting_gradients` return."""
  images: Array         # (B, H, W, C) reconstructions in [0, 1], in no particular order
  labels: Array         # (B,) labels used: the given ones, or argmax of DLG's dummy soft labels
  matching_loss: Array  # scalar objective of the returned reconstruction (see each function)


def _check_gradient_problem(apply_fn: ApplyFn, params: Params, target_grads: Params,
                            batch_shape: Any) -> tuple[tuple[int, int, int, int], int]:
  """Checks the shapes of an inversion problem; returns (batch_shape, num_classes)."""
  shape = tuple(batch_shape) if isinstance(batch_shape, (tuple, list)) else None
  if (shape is None or len(shape) != 4
      or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1 for d in shape)):
    raise ValueError(f"batch_shape must be (batch, height, width, channels) of positive "
                     f"integers; got {batch_shape!r}.")
  shape = tuple(int(d) for d in shape)
  try:
    logits = jax.eval_shape(apply_fn, params, jax.ShapeDtypeStruct(shape, jnp.float32))
  except Exception as error:  # pylint: disable=broad-except
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    raise ValueError(f"apply_fn does not accept images of batch_shape {shape}: "
                     f"{type(error).__name__}: {first_line}") from error
  if len(logits.shape) != 2 or logits.shape[0] != shape[0]:
    raise ValueError(f"apply_fn must return logits of shape (batch, num_classes) = "
                     f"({shape[0]}, C) for batch_shape {shape}; got {tuple(logits.shape)}.")
  params_def = jax.tree.structure(params)
  grads_def = jax.tree.structure(target_grads)
  if params_def != grads_def:
    raise ValueError(f"target_grads must have the pytree structure of params; got "
                     f"{grads_def} for params {params_def}.")
  for p, g in zip(jax.tree.leaves(params), jax.tree.leaves(target_grads)):
    if np.shape(p) != np.shape(g):
      raise ValueError(f"target_grads must have the shapes of params; got a leaf of shape "
                       f"{np.shape(g)} for a parameter of shape {np.shape(p)}.")
    if is_concrete(g) and not np.all(np.isfinite(np.asarray(g))):
      raise ValueError("target_grads must be finite; got NaN or Inf entries.")
  return shape, int(logits.shape[1])


def _squared_distance(grads: Params, target_grads: Params) -> Array:
  return sum(jnp.sum((g - t) ** 2)
             for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(target_grads)))


def gradient_cosine_distance(grads: Params, target_grads: Params) -> Array:
  """1 - <g, t> / (||g|| ||t||) over the whole parameter vector (every leaf flattened).

  Inverting Gradients' matching loss (Geiping et al. 2020) and Witches'
  Brew's alignment loss (Geiping et al. 2021) are both this one cosine.
  """
  leaves = list(zip(jax.tree.leaves(grads), jax.tree.leaves(target_grads)))
  dot = sum(jnp.sum(g * t) for g, t in leaves)
  norm_grads = sum(jnp.sum(g * g) for g, _ in leaves)
  norm_target = sum(jnp.sum(t * t) for _, t in leaves)
  # The floor keeps a vanishing gradient (a saturated start or loss) from
  # dividing by 0 and returning NaN.
  return 1.0 - dot / jnp.sqrt(jnp.maximum(norm_grads * norm_target, 1e-30))


def dlg(key: PRNGKey, apply_fn: ApplyFn, params: Params, target_grads: Params,
        batch_shape: Sequence[int], *, labels: ArrayLike | None = None,
        num_steps: int = 300, optimizer: str = "lbfgs",
        step_size: float | None = None, memory_size: int = 100) -> GradientInversionResult:
  """Deep Leakage from Gradients (Zhu et al. 2019), with iDLG's known labels as an option.

  Optimises dummy images x' and dummy label logits l' (soft labels
  softmax(l'), as DLG's code does) to minimise the squared L2 distance
  sum_layers ||grad(x', softmax(l')) - target_grads||^2 between the dummy
  update and the shared one, where grad is `fedsgd_gradient`'s loss with soft
  targets. Given `labels` (e.g. from `recover_labels_idlg`, which is iDLG),
  only the images are optimised. DLG optimises with L-BFGS: here
  `optax.lbfgs` with its zoom line search, one iteration per step (PyTorch's
  LBFGS as DLG calls it runs up to 20 iterations per `step`); Adam is the
  alternative. The optimisation is unconstrained as in the paper, started
  from seeded U[0, 1] images and N(0, 1) label logits; the returned images
  are the iterate of lowest matching loss, clipped to [0, 1] (the loss
  reported is that of the unclipped iterate).

  Args:
    key: a `jax.random.key` for the dummy initialisation.
    apply_fn: (params, images) -> logits, twice differentiable.
    params: the parameters the victim's gradient was taken at.
    target_grads: the shared gradient, a pytree shaped like `params`.
    batch_shape: (B, H, W, C) of the victim's batch.
    labels: optional (B,) known integer labels.
    num_steps: optimiser iterations (integer >= 1; DLG ran 300 LBFGS steps).
    optimizer: 'lbfgs' (the paper's) or 'adam'.
    step_size: L-BFGS's learning rate (before its line search; default 1.0,
      PyTorch's and DLG's) or Adam's (default 0.1).
    memory_size: L-BFGS history length (PyTorch's default 100).

  Returns:
    `GradientInversionResult`: images (B, H, W, C), labels (the given ones or
    the argmax of the dummy soft labels) and the squared-distance loss.

  Raises:
    ValueError: on invalid settings, a batch_shape apply_fn does not accept,
      target_grads not shaped like params, or labels out of range.
  """
  check_int_at_least(num_steps, "num_steps", 1)
  check_choice(optimizer, "optimizer", DLG_OPTIMIZERS)
  if step_size is None:
    step_size = _DLG_DEFAULT_STEP_SIZE[optimizer]
  check_positive(step_size, "step_size")
  check_int_at_least(memory_size, "memory_size", 1)
  shape, num_classes = _check_gradient_problem(apply_fn, params, target_grads, batch_shape)
  if labels is not None:
    check_labels(labels, num_classes=num_classes, batch_size=shape[0], name="labels")
  key_images, key_labels = jax.random.split(key)
  variables = {"images": jax.random.uniform(key_images, shape, jnp.float32)}
  if labels is None:
    variables["label_logits"] = jax.random.normal(key_labels, (shape[0], num_classes), jnp.float32)
  else:
    known_targets = jax.nn.one_hot(jnp.asarray(labels), num_classes, dtype=jnp.float32)

  def matching_loss(v):
    targets = jax.nn.softmax(v["label_logits"]) if labels is None else known_targets
    grads = _soft_cross_entropy_gradient(apply_fn, params, v["images"], targets)
    return _squared_distance(grads, target_grads)

  if optimizer == "lbfgs":
    transform = optax.lbfgs(learning_rate=step_size, memory_size=memory_size)
    value_and_grad = optax.value_and_grad_from_state(matching_loss)
  else:
    transform = optax.with_extra_args_support(optax.adam(step_size))

    def value_and_grad(v, state):
      del state  # only L-BFGS's line search caches the value and gradient
      return jax.value_and_grad(matching_loss)(v)

  def body(_, state):
    v, opt_state, best_v, best_loss = state
    loss, grad = value_and_grad(v, state=opt_state)
    # A line search that diverged or stalled gives a NaN: keep the best iterate seen.
    better = loss < best_loss
    best_v = jax.tree.map(lambda new, old: jnp.where(better, new, old), v, best_v)
    best_loss = jnp.where(better, loss, best_loss)
    updates, opt_state = transform.update(grad, opt_state, v, value=loss, grad=grad,
                                          value_fn=matching_loss)
    return optax.apply_updates(v, updates), opt_state, best_v, best_loss

  state = (variables, transform.init(variables), variables, jnp.asarray(jnp.inf, jnp.float32))
  v, _, best_v, best_loss = lax.fori_loop(0, num_steps, body, state)
  final_loss = matching_loss(v)
  better = final_loss < best_loss
  best_v = jax.tree.map(lambda new, old: jnp.where(better, new, old), v, best_v)
  best_loss = jnp.where(better, final_loss, best_loss)
  if labels is None:
    found_labels = jnp.argmax(best_v["label_logits"], axis=-1).astype(jnp.int32)
  else:
    found_labels = jnp.asarray(labels).astype(jnp.int32)
  return GradientInversionResult(images=jnp.clip(best_v["images"], 0.0, 1.0),
                                 labels=found_labels, matching_loss=best_loss)


def inverting_gradients(key: PRNGKey, apply_fn: ApplyFn, params: Params,
                        target_grads: Params, labels: ArrayLike,
                        batch_shape: Sequence[int], *, num_steps: int = 4800,
                        step_size: float = 0.1, tv_weight: float = 1e-4,
                        restarts: int = 1, signed: bool = True,
                        step_size_decay: bool = True) -> GradientInversionResult:
  """Inverting Gradients (Geiping et al. 2020): cosine gradient matching with a TV prior.

  Minimises 1 - <grad(x'), g> / (||grad(x')|| ||g||) + tv_weight * TV(x')
  over images x' in [0, 1], where grad is `fedsgd_gradient` at the known
  labels and the inner product runs over all parameters, as the paper's
  'sim' cost with equal layer weights. As in the paper's code: Adam on the
  sign of the gradient, step size divided by 10 at 3/8, 5/8 and 7/8 of
  `num_steps`, images clipped to the box after every step, and the restart
  with the lowest final objective kept. Starts are seeded U[0, 1] images
  (the paper's N(0, 1) lives in its normalised space).

  Args:
    key: a `jax.random.key`; restart r starts from `fold_in(key, r)`.
    apply_fn: (params, images) -> logits, twice differentiable.
    params: the parameters the victim's gradient was taken at.
    target_grads: the shared gradient, a pytree shaped like `params`.
    labels: (B,) integer labels (known, or from `recover_labels_idlg`).
    batch_shape: (B, H, W, C) of the victim's batch.
    num_steps: Adam steps per restart (the paper: 4,800; 24,000 on ImageNet).
    step_size: Adam's initial step size (the paper's 0.1, in its normalised
      space: about 0.1 * std of the data in [0, 1] pixels).
    tv_weight: weight of `total_variation` (mean over the batch), >= 0.
    restarts: independent trials, integer >= 1 (run together with `vmap`).
    signed: Adam on sign(gradient), as the paper; False uses the gradient.
    step_size_decay: the paper's step-size schedule; False keeps it constant.

  Returns:
    `GradientInversionResult`: images (B, H, W, C) in [0, 1], the given
    labels and the objective (cosine distance + TV) of the returned images.

  Raises:
    ValueError: on invalid settings, a batch_shape apply_fn does not accept,
      target_grads not shaped like params, or labels missing or out of range.
  """
  check_int_at_least(num_steps, "num_steps", 1)
  check_positive(step_size, "step_size")
  check_positive(tv_weight, "tv_weight", allow_zero=True)
  check_int_at_least(restarts, "restarts", 1)
  for flag, name in ((signed, "signed"), (step_size_decay, "step_size_decay")):
    if not isinstance(flag, (bool, np.bool_)):
      raise ValueError(f"{name} must be True or False; got {flag!r}.")
  shape, num_classes = _check_gradient_problem(apply_fn, params, target_grads, batch_shape)
  if labels is None:
    raise ValueError("labels must be given: (batch,) integer labels, e.g. from "
                     "recover_labels_idlg.")
  check_labels(labels, num_classes=num_classes, batch_size=shape[0], name="labels")
  targets = jax.nn.one_hot(jnp.asarray(labels), num_classes, dtype=jnp.float32)

  def objective(images):
    grads = _soft_cross_entropy_gradient(apply_fn, params, images, targets)
    return (gradient_cosine_distance(grads, target_grads)
            + tv_weight * jnp.mean(total_variation(images)))

  if step_size_decay:
    schedule = optax.piecewise_constant_schedule(
        step_size, {int(num_steps * f): 0.1 for f in _GEIPING_DECAY_FRACTIONS})
  else:
    schedule = step_size
  transform = optax.adam(schedule)
  if signed:
    transform = optax.chain(optax.stateless(lambda g, _: jax.tree.map(jnp.sign, g)), transform)

  def trial(restart_key):
    images = jax.random.uniform(restart_key, shape, jnp.float32)

    def body(_, state):
      images, opt_state = state
      grad = jax.grad(objective)(images)
      updates, opt_state = transform.update(grad, opt_state, images)
      return jnp.clip(optax.apply_updates(images, updates), 0.0, 1.0), opt_state

    images, _ = lax.fori_loop(0, num_steps, body, (images, transform.init(images)))
    return images, objective(images)

  restart_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(restarts))
  images, losses = jax.vmap(trial)(restart_keys)
  # NaN never wins: argmin would return it.
  best = jnp.argmin(jnp.where(jnp.isnan(losses), jnp.inf, losses))
  return GradientInversionResult(images=images[best], labels=jnp.asarray(labels).astype(jnp.int32),
                                 matching_loss=losses[best])


# ------------------------------------------------------------------------ metrics


def _check_pair(x: Any, y: Any, names: tuple[str, str] = ("x", "y")) -> tuple[Array, Array]:
  if np.ndim(x) != 4 or np.shape(x) != np.shape(y):
    raise ValueError(f"{names[0]} and {names[1]} must be image batches (batch, H, W, C) of one "
                     f"shape; got {np.shape(x)} and {np.shape(y)}.")
  return jnp.asarray(x), jnp.asarray(y)


def psnr(x: ArrayLike, y: ArrayLike, max_value: float = 1.0) -> Array:
  """Peak signal-to-noise ratio per image: 10 log10(max_value^2 / MSE), in dB.

  Args:
    x, y: (batch, H, W, C) images.
    max_value: the largest pixel value (1.0 in [0, 1] space), > 0.

  Returns:
    (batch,) PSNR; +inf for identical images.
  """
  check_positive(max_value, "max_value")
  x, y = _check_pair(x, y)
  return _psnr(x, y, max_value)


@jax.jit
def _psnr(x: Array, y: Array, max_value: Any) -> Array:
  mse = jnp.mean((x - y) ** 2, axis=(1, 2, 3))
  return 10.0 * jnp.log10(max_value ** 2 / mse)


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
  offsets = np.arange(size) - (size - 1) / 2
  window = np.exp(-0.5 * (offsets / sigma) ** 2)
  return window / window.sum()


def ssim(x: ArrayLike, y: ArrayLike, max_value: float = 1.0, *, filter_size: int = 11,
         filter_sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> Array:
  """Structural similarity per image (Wang et al. 2004), channels averaged.

  Local means, variances and covariance under a normalised Gaussian window
  (11 x 11, sigma 1.5: the paper's), taken only where the window fits inside
  the image ('valid', as the authors' `ssim_index.m`); the SSIM map with
  C1 = (k1 L)^2, C2 = (k2 L)^2 is averaged over positions and channels.

  Args:
    x, y: (batch, H, W, C) images with H, W >= filter_size.
    max_value: the dynamic range L (1.0 in [0, 1] space).
    filter_size: odd window side (integer >= 1).
    filter_sigma: the window's standard deviation, > 0.
    k1, k2: the stabilising constants, > 0.

  Returns:
    (batch,) SSIM in [-1, 1]; 1 for identical images.
  """
  check_positive(max_value, "max_value")
  check_int_at_least(filter_size, "filter_size", 1)
  if filter_size % 2 == 0:
    raise ValueError(f"filter_size must be odd; got {filter_size}.")
  check_positive(filter_sigma, "filter_sigma")
  check_positive(k1, "k1")
  check_positive(k2, "k2")
  x, y = _check_pair(x, y)
  if min(x.shape[1], x.shape[2]) < filter_size:
    raise ValueError(f"ssim needs images at least filter_size = {filter_size} pixels on each "
                     f"side; got {x.shape[1]}x{x.shape[2]}. Pass a smaller filter_size.")
  return _ssim(x, y, max_value, k1, k2, filter_size=int(filter_size),
               filter_sigma=float(filter_sigma))


@functools.partial(jax.jit, static_argnames=("filter_size", "filter_sigma"))
def _ssim(x: Array, y: Array, max_value: Any, k1: Any, k2: Any, *, filter_size: int,
          filter_sigma: float) -> Array:
  window = jnp.asarray(_gaussian_window(filter_size, filter_sigma), x.dtype)

  def blur(image):
    # Separable 'valid' filtering: one sum of shifted slices per axis.
    rows = image.shape[1] - filter_size + 1
    cols = image.shape[2] - filter_size + 1
    image = sum(window[k] * image[:, k:k + rows] for k in range(filter_size))
    return sum(window[k] * image[:, :, k:k + cols] for k in range(filter_size))

  c1 = (k1 * max_value) ** 2
  c2 = (k2 * max_value) ** 2
  mu_x, mu_y = blur(x), blur(y)
  var_x = blur(x * x) - mu_x ** 2
  var_y = blur(y * y) - mu_y ** 2
  cov = blur(x * y) - mu_x * mu_y
  ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)
              / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)))
  return jnp.mean(ssim_map, axis=(1, 2, 3))


def label_recovery_rate(predicted: ArrayLike, true: ArrayLike) -> Array:
  """Fraction of the true labels recovered, comparing the batches as multisets.

  |predicted ∩ true| / B with multiplicities (order does not matter):
  predicted [1, 1, 2] against true [1, 2, 2] recovers 2 of 3.

  Args:
    predicted: (B,) or (N, B) integer labels (N batches).
    true: integer labels of the same shape.

  Returns:
    A scalar, or (N,) rates for N batches.
  """
  predicted, true = jnp.asarray(predicted), jnp.asarray(true)
  if predicted.shape != true.shape or predicted.ndim not in (1, 2) or predicted.shape[-1] < 1:
    raise ValueError(f"predicted and true must be (batch,) or (num_batches, batch) integer "
                     f"labels of one shape; got {predicted.shape} and {true.shape}.")
  for labels, name in ((predicted, "predicted"), (true, "true")):
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(f"{name} must hold integer labels; got dtype {labels.dtype}.")

  if predicted.ndim == 1:
    return _multiset_overlap(predicted, true)
  return jax.jit(jax.vmap(_multiset_overlap))(predicted, true)


@jax.jit
def _multiset_overlap(predicted: Array, true: Array) -> Array:
  count_true = jnp.sum(true[:, None] == true[None, :], axis=1)
  count_predicted = jnp.sum(true[:, None] == predicted[None, :], axis=1)
  # Each true label's share of min(count in predicted, count in true) of its class.
  return jnp.sum(jnp.minimum(count_predicted, count_true) / count_true) / true.shape[0]


def match_reconstructions(reconstructions: ArrayLike, true: ArrayLike, *,
                          metric: str = "mse") -> tuple[Array, Array]:
  """Pairs each reconstruction with a true image (a batch is recovered up to permutation).

  Solves the assignment that minimises the summed pairwise cost (MSE, or
  negative PSNR) with the Hungarian method (`scipy.optimize.linear_sum_assignment`),
  on the host: the inputs must be concrete arrays.

  Args:
    reconstructions: (B, H, W, C) images.
    true: (B, H, W, C) images.
    metric: 'mse' or 'psnr'.

  Returns:
    (matched, order): matched[i] = reconstructions[order[i]] is the
    reconstruction paired with true[i].
  """
  check_choice(metric, "metric", MATCH_METRICS)
  recon, target = _check_pair(reconstructions, true, ("reconstructions", "true"))
  if not (is_concrete(recon) and is_concrete(target)):
    raise ValueError("match_reconstructions runs on the host: pass concrete arrays, "
                     "not values traced under jit/vmap.")
  r = np.asarray(recon, np.float64).reshape(recon.shape[0], -1)
  t = np.asarray(target, np.float64).reshape(target.shape[0], -1)
  mse = np.mean((t[:, None, :] - r[None, :, :]) ** 2, axis=-1)  # [true, reconstruction]
  # -PSNR = 10 log10(MSE) up to a constant; the floor keeps exact matches finite.
  cost = mse if metric == "mse" else np.log10(np.maximum(mse, 1e-30))
  _, order = scipy.optimize.linear_sum_assignment(cost)
  order = jnp.asarray(order, jnp.int32)
  return recon[order], order
