"""Label-consistent (clean-label) backdoors: Turner, Tsipras & Madry (2019).

A plain backdoor relabels its poisoned images, which an inspector spots (a
"9" labelled "3"). Turner et al. poison only images that already belong to the
target class and keep their labels. On its own that teaches nothing: the
image's content explains its label, so the model ignores the trigger. They
first make the content hard to learn from, with an adversarial perturbation
within a small Lp ball that pushes the image away from its own (true) class
under a surrogate model, then add the trigger; the model can fit these
examples only through the trigger, and learns it.

  clean_label_indices  which target-class examples to poison (a rate of that class)
  clean_label_poison   PGD against the true labels on a surrogate, then the trigger

Turner et al. found the perturbation works far better from an ADVERSARIALLY
TRAINED surrogate (its adversarial examples change what the image looks like,
not just imperceptible features) than from a standard one, and made the
trigger harder to spot with the reduced-amplitude four-corner pattern
(`badnets(image_shape, location='four_corners', amplitude=16 / 255)`, which
also survives random crops and flips).

Images are NHWC float in [0, 1]; eps is in pixel units (8/255 in Linf or 300/255
per 32x32x3 image in L2 on CIFAR-10 in the paper).

References:
  Turner, Tsipras, Madry. Label-Consistent Backdoor Attacks. 2019
    (arXiv:1912.02771).
  Madry, Makelov, Schmidt, Tsipras, Vladu. Towards Deep Learning Models
    Resistant to Adversarial Attacks. ICLR 2018 (PGD, adversarial training).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from certjax.types import Array, ArrayLike, PRNGKey
from certjax.validation import check_images, check_labels, is_concrete
from certjax.attacks.pgd import pgd
from certjax.poisoning.triggers import (Trigger, apply_trigger, check_class, check_rate,
                                       check_trigger_fits, choose)

__all__ = ["clean_label_indices", "clean_label_poison"]


def clean_label_indices(key: PRNGKey, labels: ArrayLike, *, rate: float, target: int,
                        num_classes: Optional[int] = None) -> Array:
  """Which examples of the target class a clean-label attack poisons.

  round(rate * N_target) of the N_target target-class examples (a share of
  that class, as Turner et al. report it), drawn uniformly without
  replacement.

  Args:
    key: a `jax.random.key`.
    labels: the training labels (N,), concrete (the count depends on them).
    rate: the share of the target class poisoned, in [0, 1].
    target: the target class.
    num_classes: the number of classes, to check target and labels against
      (optional).

  Returns:
    Sorted int32 indices.

  Raises:
    ValueError: on rate outside [0, 1], a target outside [0, num_classes - 1]
      or traced labels.
  """
  rate = check_rate(rate, meaning=" (the share of the target class poisoned)")
  target = check_class(target, "target", num_classes)
  check_labels(labels, num_classes=num_classes, name="labels")
  if not is_concrete(labels):
    raise ValueError("clean_label_indices needs concrete labels (not traced under jit/vmap): "
                     "the count depends on the size of the target class.")
  members = np.asarray(labels) == target
  return choose(key, jnp.asarray(members), round(rate * int(np.sum(members))))


def clean_label_poison(key: PRNGKey, logits_fn: Any, images: ArrayLike, labels: ArrayLike,
                       indices: ArrayLike, *, trigger: Optional[Trigger], eps: ArrayLike,
                       num_steps: int, norm: str = "linf",
                       step_size: Optional[ArrayLike] = None) -> Tuple[Array, Array]:
  """Turner et al.'s poisoned copies of `images[indices]`, with their TRUE labels.

  Each chosen image is perturbed by untargeted PGD (`certjax.attacks.pgd`,
  cross-entropy loss, random start, `num_steps` steps) against its true label
  under the surrogate `logits_fn`, inside the eps-ball of `norm` and [0, 1],
  and then the trigger is applied on top (so trigger pixels may leave the
  ball: the trigger is part of the attack, the perturbation is what must stay
  inconspicuous). Labels are not changed; they are returned to make that
  explicit.

  Use an adversarially trained surrogate if you can: Turner et al. found its
  perturbations (which change the image's visible content) make the backdoor
  far more effective than a standard model's.

  Args:
    key: a `jax.random.key` (PGD's random start).
    logits_fn: the surrogate, x -> logits (or a gradient oracle).
    images: training images (N, H, W, C) in [0, 1].
    labels: training labels (N,).
    indices: the examples to poison, normally of the target class only (from
      `clean_label_indices`).
    trigger: the `Trigger` added after the perturbation (e.g.
      `badnets(..., location='four_corners', amplitude=16 / 255)`), or None
      for the perturbation alone.
    eps: the perturbation radius in pixel units (scalar).
    num_steps: PGD steps.
    norm: 'linf', 'l2' or 'l1'.
    step_size: PGD's absolute step size (default 2.5 eps / num_steps, Madry et
      al.'s).

  Returns:
    (poisoned images (len(indices), H, W, C), labels[indices] unchanged).
    Works under `jit` with the settings static.

  Raises:
    ValueError: on invalid images, labels, indices, trigger or PGD settings.
  """
  check_images(images, name="images")
  images = jnp.asarray(images)
  check_labels(labels, batch_size=images.shape[0], name="labels")
  indices = jnp.asarray(indices)
  if indices.ndim != 1 or not jnp.issubdtype(indices.dtype, jnp.integer):
    raise ValueError(f"indices must be a rank-1 integer array; got shape {indices.shape} and "
                     f"dtype {indices.dtype}.")
  if is_concrete(indices) and indices.size and (int(indices.min()) < 0
                                                or int(indices.max()) >= images.shape[0]):
    raise ValueError(f"indices must lie in [0, {images.shape[0] - 1}]; got values in "
                     f"[{int(indices.min())}, {int(indices.max())}].")
  x, y = images[indices], jnp.asarray(labels)[indices]
  if trigger is not None:
    check_trigger_fits(trigger, x.shape)  # before the attack's cost, not after
  if x.shape[0] == 0:
    return x, y
  x_adv = pgd(key, logits_fn, x, y, eps=eps, norm=norm, num_steps=num_steps,
              step_size=step_size, loss="ce")
  if trigger is not None:
    x_adv = apply_trigger(trigger, x_adv)
  return x_adv, y
