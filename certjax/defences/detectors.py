"""Adversarial-example detectors with a reject option, and the attack that evaluates them.

A detector scores inputs, higher = more likely adversarial:

  detector = feature_squeezing(logits_fn, [squeeze_bits, median_filter])
  scores = detector.score_fn(key, x)                     # (batch,)

A deployed system rejects an input when its score exceeds a threshold chosen
on clean data for a false-positive rate (`threshold_at_fpr`), and is measured
with `detection_metrics` (AUC, detection rate at that FPR) and
`accuracy_with_reject` (an adversarial input counts as defended when it is
classified correctly or rejected).

Carlini & Wagner's lesson is that a detector must be evaluated by an attacker
who knows it. `with_reject` turns classifier + detector into one logits
function with an extra "reject" class C that wins exactly when the detector
fires, and `joint_margin` is the loss whose maximisation fools both at once,
in the signature of `certjax.attacks.losses`, so every attack applies:

  defended = with_reject(logits_fn, detector, threshold)   # (key, x) -> (batch, C + 1)
  x_adv = attacks.pgd(key, lambda x: defended(fixed_key, x), x, y, eps=eps,
                      loss=joint_margin)
  # randomized detector (STRIP): average gradients over its randomness (EOT)
  x_adv = attacks.pgd(key, attacks.eot.eot(defended, 16), x, y, eps=eps,
                      loss=joint_margin)

`pgd` accepts any callable loss (a `__name__` is not needed: unnamed losses
are reported as 'custom'). With `num_restarts > 1` pass `keep='loss'`: pgd's
'success' rule counts a rejected input (argmax = C != y) as a success.

Detectors:
  feature_squeezing: L1 distance between the predictions on x and on squeezed
    copies of x (Xu et al.).
  fit_mahalanobis / mahalanobis: distance of a feature vector to the closest
    class-conditional Gaussian with tied covariance (Lee et al.). One feature
    layer; the paper's weighted ensemble over layers (a logistic regression
    on the per-layer scores) is an extension: fit one `MahalanobisStats` per
    layer and combine the scores.
  strip: low prediction entropy under superimposition with random clean
    images (Gao et al.), randomized in the key.

References:
  Carlini, Wagner. Adversarial Examples Are Not Easily Detected: Bypassing
    Ten Detection Methods. AISec 2017.
  Xu, Evans, Qi. Feature Squeezing: Detecting Adversarial Examples in Deep
    Neural Networks. NDSS 2018.
  Lee, Lee, Lee, Shin. A Simple Unified Framework for Detecting
    Out-of-Distribution Samples and Adversarial Attacks. NeurIPS 2018.
  Gao, Xu, Wang, Chen, Ranasinghe, Nepal. STRIP: A Defence Against Trojan
    Attacks on Deep Neural Networks. ACSAC 2019.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from certjax.privacy import membership
from certjax.types import Array, ArrayLike, LogitsFn, PRNGKey
from certjax.validation import (check_finite_scalar, check_images, check_in_open_interval,
                                check_int_at_least, check_labels, check_positive, is_concrete)

__all__ = [
    "Detector", "MahalanobisStats", "accuracy_with_reject", "detection_metrics",
    "feature_squeezing", "fit_mahalanobis", "is_rejected", "joint_margin", "mahalanobis",
    "mahalanobis_distances", "strip", "threshold_at_fpr", "with_reject",
]

ScoreFn = Callable[[PRNGKey, Array], Array]
FeaturesFn = Callable[[Array], Array]


class Detector(NamedTuple):
  """An adversarial-example detector.

  Attributes:
    name: short name for result tables.
    score_fn: `(key, x) -> (batch,)` scores, higher = more likely adversarial;
      differentiable in `x` where the method is. Deterministic detectors
      ignore the key.
    randomized: whether the score depends on the key (attack it with EOT).
  """
  name: str
  score_fn: ScoreFn
  randomized: bool


def _check_callable(value: Any, name: str, signature: str) -> None:
  if not callable(value):
    raise TypeError(f"{name} must be a callable {signature}; got {type(value).__name__}.")


# ------------------------------------------------------------ feature squeezing


def feature_squeezing(logits_fn: LogitsFn, squeezers: Sequence[Callable[[Array], Array]], *,
                      straight_through: bool = False) -> Detector:
  """Feature-squeezing detector (Xu et al. 2018).

  score(x) = max_k || softmax(f(x)) - softmax(f(s_k(x))) ||_1 over the
  squeezers s_k (bit-depth reduction, median filters, ...): a squeezer
  removes the fine detail adversarial perturbations live in, so the
  prediction moves far on adversarial inputs and little on clean ones. The
  score lies in [0, 2].

  The score is differentiable through f and through differentiable
  squeezers; rounding and median filters have zero or uninformative
  gradients. `straight_through=True` evaluates each squeezer as
  `x + stop_gradient(s(x) - x)`: the same values, with the identity as the
  squeezer's backward pass (BPDA, Athalye et al. 2018), which is how an
  adaptive attacker differentiates through non-differentiable squeezers.

  The input and all squeezed copies go through `logits_fn` as one batch of
  `(len(squeezers) + 1) * batch` images: one forward program, more memory.

  Args:
    logits_fn: x -> logits, the classifier being protected.
    squeezers: non-empty sequence of callables x -> squeezed x (same shape),
      e.g. `lambda x: jnp.round(x * 7) / 7` (3-bit depth).
    straight_through: give the squeezers an identity gradient.

  Returns:
    A deterministic `Detector`.

  Raises:
    ValueError: no squeezers. TypeError: a non-callable model or squeezer.
  """
  _check_callable(logits_fn, "logits_fn", "x -> logits")
  squeezers = tuple(squeezers)
  if not squeezers:
    raise ValueError("squeezers must hold at least one callable x -> squeezed x; got none.")
  for i, squeezer in enumerate(squeezers):
    _check_callable(squeezer, f"squeezers[{i}]", "x -> squeezed x")

  def squeeze(squeezer, x):
    out = squeezer(x)
    if out.shape != x.shape:
      raise ValueError(f"Each squeezer must return an array shaped like its input "
                       f"{x.shape}; got {out.shape}.")
    return x + lax.stop_gradient(out - x) if straight_through else out

  def score_fn(key: PRNGKey, x: Array) -> Array:
    del key
    x = jnp.asarray(x)
    views = [x] + [squeeze(s, x) for s in squeezers]
    logits = logits_fn(jnp.concatenate(views, axis=0))
    probs = jax.nn.softmax(logits, axis=-1).reshape(len(views), x.shape[0], -1)
    distances = jnp.sum(jnp.abs(probs[1:] - probs[0]), axis=-1)
    return jnp.max(distances, axis=0)

  return Detector("feature_squeezing", score_fn, False)


# ------------------------------------------------------------------ Mahalanobis


class MahalanobisStats(NamedTuple):
  """Class-conditional Gaussians with a tied covariance, as host float64 arrays.

  Attributes:
    means: [num_classes, D] class means of the features.
    covariance: [D, D] tied covariance, (1 / N) sum_i (f_i - mu_{y_i})(...)^T
      (the maximum-likelihood estimate, as sklearn's EmpiricalCovariance in
      Lee et al.'s code).
    precision: [D, D] its pseudo-inverse.
    counts: [num_classes] examples per class.
  """
  means: np.ndarray
  covariance: np.ndarray
  precision: np.ndarray
  counts: np.ndarray


def fit_mahalanobis(features_fn: FeaturesFn, x: ArrayLike, y: ArrayLike, num_classes: int, *,
                    batch_size: int = 256) -> MahalanobisStats:
  """Fits class means and a tied covariance of `features_fn` (Lee et al. 2018).

  Features are computed in batches of `batch_size` (the last one padded, so
  the jitted `features_fn` compiles once) and accumulated on the host in
  float64, shifted by the first batch's mean so that the one-pass second
  moments do not cancel catastrophically. The precision is the Hermitian
  pseudo-inverse (`numpy.linalg.pinv(..., hermitian=True)`, sklearn's
  `pinvh`), so a singular covariance (fewer examples than dimensions) is
  fine.

  Args:
    features_fn: x -> (batch, D) features, e.g. the penultimate layer (pool
      convolutional features over height and width first, as Lee et al. do).
    x: [N, ...] clean training inputs.
    y: [N] integer labels in [0, num_classes).
    num_classes: number of classes; each must have at least one example.
    batch_size: inputs per `features_fn` call.

  Returns:
    `MahalanobisStats` (float64 NumPy arrays).

  Raises:
    ValueError: mismatched or bad x / y, a class without examples, features
      that are not finite or not of rank 2.
  """
  _check_callable(features_fn, "features_fn", "x -> (batch, features)")
  num_classes = check_int_at_least(num_classes, "num_classes", 1)
  batch_size = check_int_at_least(batch_size, "batch_size", 1)
  x = np.asarray(x)
  if x.ndim < 1 or x.shape[0] == 0:
    raise ValueError(f"x must be a non-empty batch of inputs (N, ...); got shape {x.shape}.")
  check_labels(y, num_classes=num_classes, batch_size=x.shape[0])
  y = np.asarray(y)
  counts = np.bincount(y, minlength=num_classes)
  if np.any(counts == 0):
    missing = np.flatnonzero(counts == 0).tolist()
    raise ValueError(f"Every class needs at least one example to fit its mean; classes "
                     f"{missing} have none among the {x.shape[0]} given.")

  forward = jax.jit(features_fn)
  shift = None
  sums = None
  scatter = None
  for start in range(0, x.shape[0], batch_size):
    stop = min(start + batch_size, x.shape[0])
    batch = x[start:stop]
    if stop - start < batch_size and start > 0:
      pad = np.repeat(batch[-1:], batch_size - (stop - start), axis=0)
      batch = np.concatenate([batch, pad])
    features = np.asarray(forward(batch), np.float64)[:stop - start]
    if features.ndim != 2:
      raise ValueError(f"features_fn must return (batch, D) features; got shape "
                       f"{features.shape}. Flatten or pool the feature map first.")
    if not np.all(np.isfinite(features)):
      raise ValueError(f"features_fn returned non-finite features for inputs {start} to "
                       f"{stop - 1}; the features must be finite.")
    if shift is None:
      shift = features.mean(axis=0)
      sums = np.zeros((num_classes, features.shape[1]))
      scatter = np.zeros((features.shape[1],) * 2)
    centred = features - shift
    np.add.at(sums, y[start:stop], centred)
    scatter += centred.T @ centred

  shifted_means = sums / counts[:, None]
  # sum_i (f_i - mu_y)(f_i - mu_y)^T = sum_i g_i g_i^T - sum_c n_c m_c m_c^T with g = f - shift.
  covariance = (scatter - (shifted_means.T * counts) @ shifted_means) / x.shape[0]
  covariance = (covariance + covariance.T) / 2.0
  precision = np.linalg.pinv(covariance, hermitian=True)
  return MahalanobisStats(shifted_means + shift, covariance, precision, counts)


def _check_stats(stats: Any) -> None:
  if not isinstance(stats, MahalanobisStats):
    raise TypeError(f"stats must be the MahalanobisStats from fit_mahalanobis; got "
                    f"{type(stats).__name__}.")
  means, precision = np.shape(stats.means), np.shape(stats.precision)
  if len(means) != 2 or precision != (means[1], means[1]):
    raise ValueError(f"stats must hold means (C, D) and a (D, D) precision; got means "
                     f"{means} and precision {precision}.")


def mahalanobis_distances(features: Array, stats: MahalanobisStats) -> Array:
  """(batch, C) squared Mahalanobis distances of features to each class mean."""
  means = jnp.asarray(stats.means, features.dtype)
  precision = jnp.asarray(stats.precision, features.dtype)
  # Direct (f - mu) P (f - mu), not f P f - 2 f P mu + mu P mu, which cancels in float32.
  diff = features[:, None, :] - means[None]
  return jnp.einsum("bcd,de,bce->bc", diff, precision, diff)


def mahalanobis(features_fn: FeaturesFn, stats: MahalanobisStats, *,
                noise_magnitude: float = 0.0) -> Detector:
  """Mahalanobis-distance detector (Lee et al. 2018), one feature layer.

  score(x) = min_c (f(x) - mu_c)^T Sigma^+ (f(x) - mu_c) = -M(x), with M the
  paper's confidence score max_c -(f - mu_c)^T Sigma^+ (f - mu_c).

  With `noise_magnitude` eps > 0, the paper's input pre-processing first
  moves x a signed-gradient step towards its closest class,
  x' = x - eps * sign(grad_x d_closest(x)), and scores x'. In-distribution
  inputs gain more from this step than out-of-distribution or adversarial
  ones, which widens the gap between them. As in the paper the step is not
  clipped to [0, 1]; the gradient is per example (the sum over the batch of
  per-example distances), and inputs with zero gradient are not moved
  (`jnp.sign`, where the paper's code moves them by -eps). The sign is a
  constant to differentiation (stop_gradient), so the score stays
  differentiable in x.

  The multi-layer variant (per-layer scores combined by a logistic
  regression trained on validation data) is left to the caller: one
  `mahalanobis` detector per layer.

  Args:
    features_fn: x -> (batch, D), the same features the stats were fitted on.
    stats: from `fit_mahalanobis`.
    noise_magnitude: eps >= 0 of the pre-processing step, in input units.

  Returns:
    A deterministic `Detector`.
  """
  _check_callable(features_fn, "features_fn", "x -> (batch, features)")
  _check_stats(stats)
  check_positive(noise_magnitude, "noise_magnitude", allow_zero=True)
  noise_magnitude = float(noise_magnitude)

  def closest_distance(x):
    return jnp.min(mahalanobis_distances(features_fn(x), stats), axis=-1)

  def score_fn(key: PRNGKey, x: Array) -> Array:
    del key
    x = jnp.asarray(x)
    if noise_magnitude > 0.0:
      grad = jax.grad(lambda inputs: jnp.sum(closest_distance(inputs)))(x)
      x = x - noise_magnitude * lax.stop_gradient(jnp.sign(grad)).astype(x.dtype)
    return closest_distance(x)

  return Detector("mahalanobis", score_fn, False)


# ------------------------------------------------------------------------ STRIP


def strip(logits_fn: LogitsFn, overlay_images: ArrayLike, *, num_overlays: int = 16,
          alpha: float = 0.5) -> Detector:
  """STRIP-like randomized detector (Gao et al. 2019).

  Each input is blended with `num_overlays` clean images drawn at random
  (without replacement, independently per input) from `overlay_images`,
  x' = alpha * x + (1 - alpha) * overlay, and
  score(x) = -(1 / N) sum_n H(softmax(f(x'_n))), with H the Shannon entropy
  in nats. A clean input blended with another clean image gets an uncertain
  prediction (high entropy); an input whose prediction is forced by a trigger
  or a strong perturbation keeps its class (low entropy), so low entropy is
  suspicious. STRIP was designed against trojans; applied to adversarial
  examples, a perturbation tuned to x rarely survives the blend, which is why
  this is "STRIP-like" and one to evaluate adaptively (EOT over the key).

  The overlays are evaluated one at a time in a `lax.scan`, so memory does
  not grow with `num_overlays`; the overlay set is a constant of the
  returned function.

  Args:
    logits_fn: x -> logits.
    overlay_images: [M, H, W, C] held-out clean images in [0, 1], shaped like
      the inputs to score.
    num_overlays: N, overlays per input, 1 <= N <= M.
    alpha: weight of the input in the blend, in (0, 1) (Gao et al. add the
      two images with equal weight).

  Returns:
    A randomized `Detector`.
  """
  _check_callable(logits_fn, "logits_fn", "x -> logits")
  check_images(overlay_images, name="overlay_images")
  overlays = jnp.asarray(overlay_images)
  num_available = overlays.shape[0]
  num_overlays = check_int_at_least(num_overlays, "num_overlays", 1)
  if num_overlays > num_available:
    raise ValueError(f"num_overlays ({num_overlays}) must be at most the number of "
                     f"overlay_images ({num_available}): overlays are drawn without "
                     "replacement.")
  alpha = check_in_open_interval(alpha, "alpha", 0.0, 1.0)

  def score_fn(key: PRNGKey, x: Array) -> Array:
    x = jnp.asarray(x)
    if x.shape[1:] != overlays.shape[1:]:
      raise ValueError(f"x has images of shape {x.shape[1:]} but the overlay images are "
                       f"{overlays.shape[1:]}; they must match.")
    keys = jax.random.split(key, x.shape[0])
    picks = jax.vmap(lambda k: jax.random.choice(k, num_available, (num_overlays,),
                                                 replace=False))(keys)

    def body(total, index):
      blended = alpha * x + (1.0 - alpha) * overlays[index].astype(x.dtype)
      log_probs = jax.nn.log_softmax(logits_fn(blended), axis=-1)
      return total - jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1), None

    total = jnp.zeros((x.shape[0],), jnp.result_type(x.dtype, jnp.float32))
    total, _ = lax.scan(body, total, picks.T)
    return -total / num_overlays

  return Detector("strip", score_fn, True)


# --------------------------------------------------------------------- metrics


def _check_score_array(scores: Any, name: str) -> np.ndarray:
  values = np.asarray(scores)
  if values.ndim != 1 or values.size == 0 or not (
      np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
    raise ValueError(f"{name} must be a non-empty rank-1 numeric array; got {values.dtype} "
                     f"{values.shape}.")
  if not np.all(np.isfinite(values)):
    first = int(np.argmax(~np.isfinite(values)))
    raise ValueError(f"{name} must be finite; score {first} is {values[first]}.")
  return values.astype(np.float64)


def threshold_at_fpr(clean_scores: ArrayLike, fpr: float) -> float:
  """The smallest threshold t with at most a fraction `fpr` of clean scores > t.

  With the n clean scores sorted in decreasing order, t is the (k + 1)-th,
  k = floor(fpr * n): at most k clean scores exceed it, and any smaller t
  lets at least k + 1 through. Rejecting when score > t (as `with_reject`
  does) therefore has a false-positive rate <= fpr on these scores.

  Args:
    clean_scores: [n] finite detector scores of clean inputs.
    fpr: target false-positive rate in (0, 1).

  Returns:
    The threshold, one of the clean scores.

  Raises:
    ValueError: fpr outside (0, 1), or scores not finite / not rank 1.
  """
  check_in_open_interval(fpr, "fpr", 0.0, 1.0)
  values = np.sort(_check_score_array(clean_scores, "clean_scores"))[::-1]
  allowed = int(math.floor(fpr * values.size + 1e-9))
  while allowed > 0 and allowed / values.size > fpr:  # the 1e-9 must not overshoot
    allowed -= 1
  return float(values[allowed])


def detection_metrics(clean_scores: ArrayLike, adversarial_scores: ArrayLike, *,
                      fpr: float = 0.05) -> dict[str, float | int]:
  """AUC and detection rate at a false-positive rate of a detector.

  The threshold is `threshold_at_fpr(clean_scores, fpr)`; an input is flagged
  when its score exceeds it. The detection rate at that threshold equals
  `certjax.privacy.membership.tpr_at_fpr` with adversarial inputs as the
  positives (the best TPR at FPR <= fpr), and it is the rate `with_reject`
  achieves with the same threshold. The AUC is membership's: Pr[adversarial
  score > clean score] + Pr[tie] / 2.

  Args:
    clean_scores: [n] scores of clean inputs.
    adversarial_scores: [m] scores of adversarial inputs.
    fpr: target false-positive rate in (0, 1).

  Returns:
    {'auc', 'detection_rate' (TPR at the threshold), 'threshold',
     'fpr' (achieved on clean_scores, <= the target), 'num_clean',
     'num_adversarial'}.
  """
  clean = _check_score_array(clean_scores, "clean_scores")
  adversarial = _check_score_array(adversarial_scores, "adversarial_scores")
  threshold = threshold_at_fpr(clean, fpr)
  is_adversarial = np.concatenate([np.zeros(clean.size, bool), np.ones(adversarial.size, bool)])
  return {
      "auc": membership.auc(np.concatenate([clean, adversarial]), is_adversarial),
      "detection_rate": float(np.mean(adversarial > threshold)),
      "threshold": threshold,
      "fpr": float(np.mean(clean > threshold)),
      "num_clean": int(clean.size),
      "num_adversarial": int(adversarial.size),
  }


# ------------------------------------------------- reject option and the attack


def with_reject(logits_fn: LogitsFn, detector: Detector, threshold: ArrayLike, *,
                scale: float = 1.0) -> Callable[[PRNGKey, Array], Array]:
  """Classifier + detector as one logits function with a reject class.

  G = [Z_0, ..., Z_{C-1}, G_C] with G_C = max_j Z_j + scale * (score - threshold):
  argmax G = C (reject) exactly when score > threshold, else the classifier's
  prediction (ties at score == threshold are not rejected, since argmax takes
  the first maximum). When scale * (score - threshold) is too small to change
  max_j Z_j in floating point, G_C is raised to the next representable value
  so the rule stays exact. G is differentiable in x wherever the logits and
  the score are, which is what makes the joint attack (Carlini & Wagner
  2017) possible; `scale` sets how the detector's gradient is weighed
  against the classifier's.

  Args:
    logits_fn: x -> (batch, C) logits.
    detector: a `Detector`; its key is the returned function's key.
    threshold: reject when score > threshold (e.g. from `threshold_at_fpr`).
    scale: > 0, logits per unit of score.

  Returns:
    `(key, x) -> (batch, C + 1)` logits. For a deterministic detector the
    key is ignored; attack it as `lambda x: defended(key, x)`. For a
    randomized one, attack `certjax.attacks.eot.eot(defended, n)`.
  """
  _check_callable(logits_fn, "logits_fn", "x -> logits")
  if not isinstance(detector, Detector):
    raise TypeError(f"detector must be a Detector (name, score_fn, randomized); got "
                    f"{type(detector).__name__}.")
  if is_concrete(threshold):
    if np.ndim(threshold) != 0:
      raise ValueError(f"threshold must be a scalar; got shape {np.shape(threshold)}.")
    threshold = check_finite_scalar(np.asarray(threshold).item(), "threshold")
  check_positive(scale, "scale")

  def defended(key: PRNGKey, x: Array) -> Array:
    logits = logits_fn(x)
    score = detector.score_fn(key, x).astype(logits.dtype)
    top = jnp.max(logits, axis=-1)
    reject = top + scale * (score - threshold)
    # nextafter has no derivative: the raised value carries the gradient of `top`.
    fixed_top = lax.stop_gradient(top)
    just_above = top + (jnp.nextafter(fixed_top, jnp.inf) - fixed_top)
    reject = jnp.where(score > threshold, jnp.maximum(reject, just_above), reject)
    return jnp.concatenate([logits, reject[:, None]], axis=-1)

  return defended


def is_rejected(logits_with_reject: ArrayLike) -> Array:
  """(batch,) bool: the reject class (the last one) wins."""
  logits = jnp.asarray(logits_with_reject)
  return jnp.argmax(logits, axis=-1) == logits.shape[-1] - 1


def _check_reject_logits(logits: Array) -> None:
  if logits.ndim != 2 or logits.shape[-1] < 3:
    raise ValueError(f"logits_with_reject must be (batch, C + 1) with C >= 2 classes and the "
                     f"reject class last (from with_reject); got shape {logits.shape}.")


def joint_margin(logits_with_reject: ArrayLike, labels: ArrayLike,
                 target: Optional[ArrayLike] = None) -> Array:
  """Margin loss that fools a classifier and its detector at once (to maximise).

  Untargeted: max_{j not in {y, C}} G_j - max(G_y, G_C), positive exactly
  when the prediction is neither the true class nor reject. Targeted:
  G_t - max_{j != t} G_j, positive exactly when t wins (t must be a real
  class, < C). This is Carlini & Wagner's (2017) loss over the detector-
  augmented logits G of `with_reject`; its signature is that of
  `certjax.attacks.losses`, so `pgd(..., loss=joint_margin)` attacks both.

  Args:
    logits_with_reject: (batch, C + 1), reject class last.
    labels: (batch,) true classes.
    target: optional (batch,) target classes.

  Returns:
    (batch,) margins.
  """
  logits = jnp.asarray(logits_with_reject)
  _check_reject_logits(logits)
  num = logits.shape[-1]
  pick = lambda c: jnp.take_along_axis(logits, c[:, None].astype(jnp.int32), axis=-1)[:, 0]
  if target is not None:
    target = jnp.asarray(target)
    others = jax.nn.one_hot(target, num, dtype=bool)
    return pick(target) - jnp.max(jnp.where(others, -jnp.inf, logits), axis=-1)
  labels = jnp.asarray(labels)
  excluded = jax.nn.one_hot(labels, num, dtype=bool) | (jnp.arange(num) == num - 1)
  best_wrong = jnp.max(jnp.where(excluded, -jnp.inf, logits), axis=-1)
  return best_wrong - jnp.maximum(pick(labels), logits[:, -1])


def accuracy_with_reject(logits_with_reject: ArrayLike, labels: ArrayLike, *,
                         adversarial: bool) -> Array:
  """Accuracy of a classifier with a reject option.

  adversarial=True: the fraction of (adversarial) inputs that are classified
  correctly or rejected, i.e. on which the attack failed. adversarial=False:
  clean accuracy, where a rejected clean input is an error.

  Args:
    logits_with_reject: (batch, C + 1) from `with_reject`, reject class last.
    labels: (batch,) true classes in [0, C).
    adversarial: which of the two accuracies.

  Returns:
    A scalar in [0, 1].
  """
  logits = jnp.asarray(logits_with_reject)
  _check_reject_logits(logits)
  check_labels(labels, num_classes=logits.shape[-1] - 1, batch_size=logits.shape[0],
               name="labels")
  prediction = jnp.argmax(logits, axis=-1)
  correct = prediction == jnp.asarray(labels)
  if adversarial:
    correct = correct | (prediction == logits.shape[-1] - 1)
  return jnp.mean(correct.astype(jnp.float32))
