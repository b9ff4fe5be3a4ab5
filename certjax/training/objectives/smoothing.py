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

The pure pieces (noisy copies, the soft smoothed classifier's
log-probabilities, the SmoothAdv attack `smoothadv_pgd`) are in
`certjax.smoothing.soft_smoothing`.

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

import jax
import jax.numpy as jnp
import ml_collections

from certjax import validation
from certjax.smoothing import soft_smoothing
from certjax.training.objectives.registry import (LossFn, ObjectiveContext, accuracy,
                                                  register_objective)

def _check_sigma_and_copies(hparams: ml_collections.ConfigDict, min_copies: int = 1) -> None:
  validation.check_positive(hparams.sigma, "objective.sigma")
  validation.check_int_at_least(hparams.num_noise, "objective.num_noise", min_copies)


# ----------------------------------------------------------------------- gaussian


@register_objective("gaussian", defaults={"sigma": 0.25, "num_noise": 1})
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
    x = soft_smoothing.repeat_examples(batch["image"], m)
    labels = soft_smoothing.repeat_examples(batch["label"], m)
    noisy = x + soft_smoothing.gaussian_noise(key, x.shape, sigma)
    logits, new_state = ctx.forward(params, model_state, noisy, train=True)
    loss = soft_smoothing.noisy_cross_entropy(logits, labels)
    return loss, ({"loss": loss, "accuracy": accuracy(logits, labels)}, new_state)

  return loss_fn


def eps_warmup_steps(hparams: ml_collections.ConfigDict, total_steps: int) -> int:
  """SmoothAdv's eps warm-up length: `eps_warmup_steps` if >= 0, else a fraction of the run."""
  if hparams.eps_warmup_steps >= 0:
    return int(hparams.eps_warmup_steps)
  return int(round(float(hparams.eps_warmup_fraction) * total_steps))


@register_objective("smoothadv", defaults={
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
  warmup = eps_warmup_steps(hparams, ctx.total_steps)
  fixed_step_size = float(hparams.step_size) if hparams.step_size > 0 else None

  def loss_fn(params, model_state, batch, key, step):
    x, labels = batch["image"], batch["label"]
    noise_key, attack_key = jax.random.split(key)
    if warmup > 0:
      eps = eps_max * jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / warmup)
    else:
      eps = jnp.float32(eps_max)
    step_size = 2.0 * eps / num_steps if fixed_step_size is None else fixed_step_size
    noise = soft_smoothing.gaussian_noise(noise_key, (x.shape[0], m) + x.shape[1:], sigma)
    attacked_fn = ctx.logits_fn(jax.lax.stop_gradient(params), model_state, train=False)
    x_adv = soft_smoothing.pgd_on_soft_smoothed(attack_key, attacked_fn, x, labels,
                                                lambda i: noise, eps, num_steps,
                                                jnp.asarray(step_size, jnp.float32))
    noisy = (x_adv[:, None] + noise).reshape((x.shape[0] * m,) + x.shape[1:])
    copy_labels = soft_smoothing.repeat_examples(labels, m)
    logits, new_state = ctx.forward(params, model_state, noisy, train=True)
    loss = soft_smoothing.noisy_cross_entropy(logits, copy_labels)
    metrics = {"loss": loss, "accuracy": accuracy(logits, copy_labels),
               "eps": eps}
    return loss, (metrics, new_state)

  return loss_fn


# -------------------------------------------------------------------------- macer


@register_objective("macer", defaults={
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
    noisy = soft_smoothing.noisy_copies(key, x, m, sigma)
    logits, new_state = ctx.forward(params, model_state, noisy, train=True)
    logits = logits.astype(jnp.float32)
    smoothed_log_probs = soft_smoothing.soft_smoothed_log_probs(logits, m)
    classification = jnp.sum(soft_smoothing.nll(smoothed_log_probs, labels))

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


@register_objective("consistency", defaults={
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
    noisy = soft_smoothing.noisy_copies(key, x, m, sigma)
    copy_labels = soft_smoothing.repeat_examples(labels, m)
    logits, new_state = ctx.forward(params, model_state, noisy, train=True)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    cross_entropy = jnp.mean(soft_smoothing.nll(log_probs, copy_labels))
    log_probs = log_probs.reshape(batch_size, m, -1)
    mean_probs = jnp.exp(log_probs).mean(axis=1)
    log_mean = jnp.log(jnp.maximum(mean_probs, soft_smoothing.LOG_FLOOR))
    # KL(q_bar || q_j) summed over classes, averaged over copies and examples.
    kl = jnp.mean(jnp.sum(mean_probs[:, None] * (log_mean[:, None] - log_probs), axis=-1))
    entropy = jnp.mean(-jnp.sum(mean_probs * log_mean, axis=-1))
    loss = cross_entropy + lbd * kl + eta * entropy
    metrics = {"loss": loss, "accuracy": accuracy(logits, copy_labels),
               "cross_entropy": cross_entropy, "consistency_kl": kl, "entropy": entropy}
    return loss, (metrics, new_state)

  return loss_fn


__all__ = ["consistency", "gaussian", "macer", "smoothadv"]
