"""Training objectives for randomized smoothing, registered in the training registry.

Selected with `config.objective.name`:

  'gaussian'     Gaussian noise augmentation (Cohen et al. 2019).
  'smoothadv'    SmoothAdv-PGD: adversarial training of the soft smoothed
                 classifier (Salman et al. 2019).
  'macer'        MACER: soft smoothed cross-entropy plus a hinge on the
                 certified radius (Zhai et al. 2020).
  'consistency'  noisy cross-entropy plus consistency regularisation across
                 noisy copies (Jeong & Shin 2020).

Conventions shared by all four: noise is Gaussian with standard deviation
`sigma` in [0, 1] pixel space and added without clipping (the model normalises
internally, as in Cohen et al.); every step draws fresh noise from the step key
the training loop passes (`fold_in(train_key, step)`); `num_noise` copies of an
example are laid out example-major (rows `b * m .. b * m + m - 1` are example
`b`'s copies), one forward pass of `B * m` images per step, so BatchNorm
statistics are updated once per step. The loss functions are pure and
jittable; hyperparameters are checked when the objective is built.

`smoothadv_pgd` (the SmoothAdv attack) is also usable on its own, e.g. to
attack a smoothed classifier with expectation over transformation (EOT) over
the noise (`resample_noise=True`).

References:
  Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via Randomized
  Smoothing", ICML 2019 (locuslab/smoothing `code/train.py`).
  Salman, Yang, Li, Zhang, Zhang, Razenshteyn & Bubeck, "Provably Robust Deep
  Learning via Adversarially Trained Smoothed Classifiers", NeurIPS 2019
  (Hadisalman/smoothing-adversarial `code/attacks.py`, `code/train_pgd.py`).
  Zhai, Dan, He, Zhang, Gong, Hu, Wang & Wang, "MACER: Attack-free and Scalable
  Robust Training via Maximizing Certified Radius", ICLR 2020
  (RuntianZ/macer `macer.py`).
  Jeong & Shin, "Consistency Regularization for Certified Robustness of
  Smoothed Classifiers", NeurIPS 2020 (jh-jeong/smoothing-consistency
  `code/train_consistency.py`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from certjax import validation
from certjax.training import objectives
from certjax.training.objectives import LossFn, ObjectiveContext
from certjax.types import Array, ArrayLike, LogitsFn, PRNGKey

# Probabilities are floored here before a log (Salman et al. clamp at 1e-20).
_LOG_FLOOR = 1e-20
# PGD loops up to this many steps are unrolled (see _pgd_on_soft_smoothed).
_MAX_UNROLLED_STEPS = 10


def _check_sigma_and_copies(hparams: ml_collections.ConfigDict, min_copies: int = 1) -> None:
  validation.check_positive(hparams.sigma, "objective.sigma")
  validation.check_int_at_least(hparams.num_noise, "objective.num_noise", min_copies)


def _repeat_examples(x: Array, m: int) -> Array:
  """[B, ...] -> [B * m, ...], example-major (each example's copies adjacent)."""
  return jnp.repeat(x, m, axis=0)


def _gaussian_noise(key: PRNGKey, shape, sigma) -> Array:
  return sigma * jax.random.normal(key, shape, jnp.float32)


def _noisy_copies(key: PRNGKey, x: Array, m: int, sigma) -> Array:
  """m copies of each example with fresh Gaussian noise: [B, ...] -> [B * m, ...]."""
  return _repeat_examples(x, m) + _gaussian_noise(key, (x.shape[0] * m,) + x.shape[1:], sigma)


def _soft_smoothed_log_probs(logits: Array, m: int) -> Array:
  """log of the softmax averaged over each example's m noisy copies: [B*m, K] -> [B, K]."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  mean = probs.reshape(-1, m, probs.shape[-1]).mean(axis=1)
  return jnp.log(jnp.maximum(mean, _LOG_FLOOR))


def _nll(log_probs: Array, labels: Array) -> Array:
  """Per-example negative log-likelihood of integer labels."""
  return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def _noisy_cross_entropy(logits: Array, labels: Array) -> Array:
  return jnp.mean(_nll(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), labels))


# ----------------------------------------------------------------------- gaussian


@objectives.register_objective("gaussian", defaults={"sigma": 0.25, "num_noise": 1})
def gaussian(hparams: ml_collections.ConfigDict, ctx: ObjectiveContext) -> LossFn:
  """Cross-entropy of the base classifier on Gaussian-noise-augmented inputs.

  Each step classifies `x + sigma * N(0, I)` (`num_noise` independent copies of
  every example; Cohen et al. use one) and minimises the mean cross-entropy,
  which trains the base classifier to be accurate under the noise the smoothed
  classifier adds.

  Hyperparameters:
    sigma: noise standard deviation (> 0), [0, 1] pixel units; certify with
      the same sigma.
    num_noise: noisy copies per example per step (>= 1).

  References:
    Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via
    Randomized Smoothing", ICML 2019 (Sec. 3.4 and `code/train.py`).
  """
  _check_sigma_and_copies(hparams)
  sigma, m = float(hparams.sigma), int(hparams.num_noise)

  def loss_fn(params, model_state, batch, key, step):
    del step
    x = _repeat_examples(batch["image"], m)
    labels = _repeat_examples(batch["label"], m)
    noisy = x + _gaussian_noise(key, x.shape, sigma)
    logits, new_state = ctx.forward(params, model_state, noisy, train=True)
    loss = _noisy_cross_entropy(logits, labels)
    return loss, ({"loss": loss, "accuracy": objectives.accuracy(logits, labels)}, new_state)

  return loss_fn


# ---------------------------------------------------------------------- smoothadv


def _renorm_l2(delta: Array, max_norm: Array) -> Array:
  """Scales each example's delta down to L2 norm <= max_norm (torch.renorm)."""
  norms = jnp.sqrt(jnp.sum(jnp.square(delta), axis=tuple(range(1, delta.ndim)), keepdims=True))
  scale = jnp.minimum(1.0, max_norm / jnp.maximum(norms, 1e-12))
  return delta * scale


def _pgd_on_soft_smoothed(key: PRNGKey, logits_fn: LogitsFn, x: Array, labels: Array,
                          noise_at: Callable[[Array], Array], eps: Array, num_steps: int,
                          step_size: Array) -> Array:
  """Salman et al.'s multi-noise L2 PGD; `noise_at(i)` is the [B, m, ...] noise of step i."""
  x = jnp.asarray(x, jnp.float32)
  batch = x.shape[0]
  feature_axes = tuple(range(1, x.ndim))

  def loss(delta, noise):
    m = noise.shape[1]
    noisy = (x + delta)[:, None] + noise
    logits = logits_fn(noisy.reshape((batch * m,) + x.shape[1:]))
    return jnp.sum(_nll(_soft_smoothed_log_probs(logits, m), labels))

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
    return _renorm_l2(delta, eps)

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
        return _gaussian_noise(jax.random.fold_in(noise_key, i), shape, sigma)
    else:
      fixed = _gaussian_noise(noise_key, shape, sigma)
      noise_at = lambda i: fixed  # noqa: E731
  return _pgd_on_soft_smoothed(direction_key, logits_fn, x, labels, noise_at, eps, num_steps,
                               step_size)


def _warmup_steps(hparams: ml_collections.ConfigDict, total_steps: int) -> int:
  if hparams.eps_warmup_steps >= 0:
    return int(hparams.eps_warmup_steps)
  return int(round(float(hparams.eps_warmup_fraction) * total_steps))


@objectives.register_objective("smoothadv", defaults={
    "sigma": 0.25, "eps": 0.5, "num_steps": 2, "num_noise": 2, "step_size": -1.0,
    "eps_warmup_fraction": 0.1, "eps_warmup_steps": -1})
def smoothadv(hparams: ml_collections.ConfigDict, ctx: ObjectiveContext) -> LossFn:
  """SmoothAdv-PGD: train on adversarial examples of the soft smoothed classifier.

  Each step draws `num_noise` (m) noise vectors per example, finds with
  `num_steps` of L2 PGD (the model in eval mode, parameters held fixed) the
  point `x'` within `eps` of `x` that maximises the cross-entropy of the soft
  smoothed classifier averaged over those m draws, and minimises the mean
  cross-entropy of the base classifier on the m noisy copies `x' + noise_j`
  (the same noise the attack saw). `eps` grows linearly from 0 over the first
  warm-up steps, as Salman et al. warm it up over the first epochs.

  Hyperparameters:
    sigma: noise standard deviation (> 0).
    eps: L2 attack radius (>= 0) in [0, 1] pixel units.
    num_steps: PGD steps (>= 1).
    num_noise: noise draws m per example (>= 1).
    step_size: PGD step length; <= 0 means `2 * eps / num_steps`.
    eps_warmup_fraction: fraction of the run over which eps rises linearly
      (used when eps_warmup_steps < 0).
    eps_warmup_steps: steps of the eps ramp (>= 0 overrides the fraction;
      0 disables the warm-up).

  References:
    Salman et al., "Provably Robust Deep Learning via Adversarially Trained
    Smoothed Classifiers", NeurIPS 2019 (SmoothAdv-PGD, `code/train_pgd.py`).
  """
  _check_sigma_and_copies(hparams)
  validation.check_positive(hparams.eps, "objective.eps", allow_zero=True)
  validation.check_int_at_least(hparams.num_steps, "objective.num_steps", 1)
  if not 0.0 <= float(hparams.eps_warmup_fraction) <= 1.0:
    raise ValueError("objective.eps_warmup_fraction must lie in [0, 1], got "
                     f"{hparams.eps_warmup_fraction!r}.")
  validation.check_int_at_least(hparams.eps_warmup_steps, "objective.eps_warmup_steps", -1)
  sigma, m, num_steps = float(hparams.sigma), int(hparams.num_noise), int(hparams.num_steps)
  eps_max = float(hparams.eps)
  warmup = _warmup_steps(hparams, ctx.total_steps)
  fixed_step_size = float(hparams.step_size) if hparams.step_size > 0 else None

  def loss_fn(params, model_state, batch, key, step):
    x, labels = batch["image"], batch["label"]
    noise_key, attack_key = jax.random.split(key)
    if warmup > 0:
      eps = eps_max * jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / warmup)
    else:
      eps = jnp.float32(eps_max)
    step_size = 2.0 * eps / num_steps if fixed_step_size is None else fixed_step_size
    noise = _gaussian_noise(noise_key, (x.shape[0], m) + x.shape[1:], sigma)
    attacked_fn = ctx.logits_fn(jax.lax.stop_gradient(params), model_state, train=False)
    x_adv = _pgd_on_soft_smoothed(attack_key, attacked_fn, x, labels, lambda i: noise, eps,
                                  num_steps, jnp.asarray(step_size, jnp.float32))
    noisy = (x_adv[:, None] + noise).reshape((x.shape[0] * m,) + x.shape[1:])
    copy_labels = _repeat_examples(labels, m)
    logits, new_state = ctx.forward(params, model_state, noisy, train=True)
    loss = _noisy_cross_entropy(logits, copy_labels)
    metrics = {"loss": loss, "accuracy": objectives.accuracy(logits, copy_labels),
               "eps": eps}
    return loss, (metrics, new_state)

  return loss_fn


# -------------------------------------------------------------------------- macer


@objectives.register_objective("macer", defaults={
    "sigma": 0.25, "num_noise": 16, "lbd": 12.0, "gamma": 8.0, "beta": 16.0})
def macer(hparams: ml_collections.ConfigDict, ctx: ObjectiveContext) -> LossFn:
  """MACER: maximise the certified radius of the soft smoothed classifier.

  With `m` noisy copies per example, the loss is

      CE(mean_j softmax(f(x + noise_j)), y)
        + lbd * sigma / 2 * max(0, gamma - (Phi^-1(p1) - Phi^-1(p2)))

  where p1 >= p2 are the two largest entries of the beta-tempered soft
  smoothed classifier `mean_j softmax(beta * f(x + noise_j))`. The hinge term
  (a surrogate of the certified radius sigma/2 (Phi^-1(pA) - Phi^-1(pB))) is
  counted only for examples whose tempered top class is the label and whose
  surrogate radius is finite and at most gamma, and both terms are summed over
  examples and divided by the batch size, as in the reference code.

  Hyperparameters:
    sigma: noise standard deviation (> 0).
    num_noise: noisy copies m per example (>= 1; the paper uses 16).
    lbd: weight of the radius term (>= 0).
    gamma: hinge margin (> 0).
    beta: inverse temperature of the softmax in the radius term (> 0).

  References:
    Zhai et al., "MACER: Attack-free and Scalable Robust Training via
    Maximizing Certified Radius", ICLR 2020 (Algorithm 1, `macer.py`).
  """
  _check_sigma_and_copies(hparams)
  validation.check_positive(hparams.lbd, "objective.lbd", allow_zero=True)
  validation.check_positive(hparams.gamma, "objective.gamma")
  validation.check_positive(hparams.beta, "objective.beta")
  sigma, m = float(hparams.sigma), int(hparams.num_noise)
  lbd, gamma, beta = float(hparams.lbd), float(hparams.gamma), float(hparams.beta)
  if ctx.num_classes < 2:
    raise ValueError("MACER compares the top two classes and needs num_classes >= 2.")

  def loss_fn(params, model_state, batch, key, step):
    del step
    x, labels = batch["image"], batch["label"]
    batch_size = x.shape[0]
    noisy = _noisy_copies(key, x, m, sigma)
    logits, new_state = ctx.forward(params, model_state, noisy, train=True)
    logits = logits.astype(jnp.float32)
    smoothed_log_probs = _soft_smoothed_log_probs(logits, m)
    classification = jnp.sum(_nll(smoothed_log_probs, labels))

    tempered = jax.nn.softmax(beta * logits, axis=-1)
    tempered = tempered.reshape(batch_size, m, -1).mean(axis=1)
    top2, top2_index = jax.lax.top_k(tempered, 2)
    correct = top2_index[:, 0] == labels
    # ndtri(0) and ndtri(1) are infinite; those examples are excluded (as the
    # reference does with isinf), so evaluate on a safe value there to keep
    # the gradient free of NaN.
    valid_probs = (top2[:, 1] > 0) & (top2[:, 0] < 1)
    p1 = jnp.where(valid_probs, top2[:, 0], 0.75)
    p2 = jnp.where(valid_probs, top2[:, 1], 0.25)
    margin = jax.scipy.special.ndtri(p1) - jax.scipy.special.ndtri(p2)
    in_hinge = correct & valid_probs & jnp.isfinite(margin) & (margin <= gamma)
    robustness = jnp.sum(jnp.where(in_hinge, gamma - margin, 0.0)) * sigma / 2.0

    loss = (classification + lbd * robustness) / batch_size
    smoothed_correct = jnp.argmax(smoothed_log_probs, axis=-1) == labels
    metrics = {"loss": loss, "accuracy": jnp.mean(smoothed_correct),
               "classification_loss": classification / batch_size,
               "robustness_loss": robustness / batch_size,
               "fraction_in_hinge": jnp.mean(in_hinge)}
    return loss, (metrics, new_state)

  return loss_fn


# -------------------------------------------------------------------- consistency


@objectives.register_objective("consistency", defaults={
    "sigma": 0.25, "num_noise": 2, "lbd": 10.0, "eta": 0.5})
def consistency(hparams: ml_collections.ConfigDict, ctx: ObjectiveContext) -> LossFn:
  """Gaussian augmentation plus consistency regularisation over noisy copies.

  With `m` noisy copies per example, softmax outputs `q_j` and their mean
  `q_bar`, the loss is

      mean_j CE(f(x + noise_j), y)
        + lbd * mean_j KL(q_bar || q_j) + eta * H(q_bar),

  each term averaged over the batch; the gradient flows through `q_bar` too,
  as in the reference code.

  Hyperparameters:
    sigma: noise standard deviation (> 0).
    num_noise: noisy copies m per example (>= 2; the paper uses 2).
    lbd: weight of the KL consistency term (>= 0).
    eta: weight of the entropy of the mean prediction (>= 0).

  References:
    Jeong & Shin, "Consistency Regularization for Certified Robustness of
    Smoothed Classifiers", NeurIPS 2020 (Eq. 7, `code/train_consistency.py`).
  """
  _check_sigma_and_copies(hparams, min_copies=2)
  validation.check_positive(hparams.lbd, "objective.lbd", allow_zero=True)
  validation.check_positive(hparams.eta, "objective.eta", allow_zero=True)
  sigma, m = float(hparams.sigma), int(hparams.num_noise)
  lbd, eta = float(hparams.lbd), float(hparams.eta)

  def loss_fn(params, model_state, batch, key, step):
    del step
    x, labels = batch["image"], batch["label"]
    batch_size = x.shape[0]
    noisy = _noisy_copies(key, x, m, sigma)
    copy_labels = _repeat_examples(labels, m)
    logits, new_state = ctx.forward(params, model_state, noisy, train=True)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    cross_entropy = jnp.mean(_nll(log_probs, copy_labels))
    log_probs = log_probs.reshape(batch_size, m, -1)
    mean_probs = jnp.exp(log_probs).mean(axis=1)
    log_mean = jnp.log(jnp.maximum(mean_probs, _LOG_FLOOR))
    # KL(q_bar || q_j) summed over classes, averaged over copies and examples.
    kl = jnp.mean(jnp.sum(mean_probs[:, None] * (log_mean[:, None] - log_probs), axis=-1))
    entropy = jnp.mean(-jnp.sum(mean_probs * log_mean, axis=-1))
    loss = cross_entropy + lbd * kl + eta * entropy
    metrics = {"loss": loss, "accuracy": objectives.accuracy(logits, copy_labels),
               "cross_entropy": cross_entropy, "consistency_kl": kl, "entropy": entropy}
    return loss, (metrics, new_state)

  return loss_fn


__all__ = ["consistency", "gaussian", "macer", "smoothadv", "smoothadv_pgd"]
