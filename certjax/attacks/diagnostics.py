"""Gradient-masking diagnostics: the checks that catch a defence which only hides gradients.

Athalye, Carlini & Wagner list the signs that an evaluation was fooled by
obfuscated gradients rather than measuring robustness; Carlini et al.'s
evaluation checklist repeats them. Each check here takes per-example
outcomes the evaluator already has and returns a `MaskingWarning` (a named
finding with its evidence) or None:

  black_box_beats_white_box   a score-based black-box attack (Square) breaks
                              examples the white-box gradient attack could
                              not, more often than the reverse;
  one_step_beats_iterative    a one-step attack (FGSM) breaks examples the
                              iterative one (PGD) could not, more often than
                              the reverse;
  accuracy_not_zero_at_large_eps  accuracy stays above a small level at a
                              radius where every image can be turned into
                              any other (an unbounded attack must win);
  randomness_across_evaluations  the defended model predicts differently for
                              the same input on two evaluations: its accuracy
                              must be measured with EOT, and one draw's
                              gradients are noise;
  zero_gradients              the loss gradient is exactly zero on many
                              inputs (shattered or vanishing gradients, e.g.
                              a quantising transform or a saturated softmax).

Paired comparisons use an exact one-sided sign test (McNemar's test on the
discordant pairs, `scipy.stats.binomtest`) and a minimum effect size, so
sampling noise alone rarely raises a warning and a real gap on a few hundred
examples does. A model trained with PGD (Madry et al.) raises none.

References:
  Athalye, Carlini, Wagner. Obfuscated Gradients Give a False Sense of
    Security: Circumventing Defenses to Adversarial Examples. ICML 2018
    (Section 3.1, "Identifying obfuscated & masked gradients").
  Carlini, Athalye, Papernot, Brendel, Rauber, Tsipras, Goodfellow, Madry,
    Kurakin. On Evaluating Adversarial Robustness. 2019 (the checklist).
  Tramer, Carlini, Brendel, Madry. On Adaptive Attacks to Adversarial
    Example Defenses. NeurIPS 2020.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import scipy.stats

from certjax.types import ArrayLike
from certjax.validation import check_in_open_interval

__all__ = [
    "CHECKS", "GradientMaskingWarning", "MaskingWarning", "accuracy_not_zero_at_large_eps",
    "black_box_beats_white_box", "diagnose", "one_step_beats_iterative",
    "randomness_across_evaluations", "warn", "zero_gradients",
]

CHECKS = ("black_box_beats_white_box", "one_step_beats_iterative",
          "accuracy_not_zero_at_large_eps", "randomness_across_evaluations",
          "zero_gradients")


class GradientMaskingWarning(UserWarning):
  """Warning category of every finding `warn` issues."""


class MaskingWarning(NamedTuple):
  """One finding of a diagnostic.

  Attributes:
    name: the check (one of CHECKS).
    message: one line for a person, with the figures.
    evidence: the figures, for JSON.
  """
  name: str
  message: str
  evidence: dict[str, Any]


def _bool_vector(value: ArrayLike, name: str, size: Optional[int] = None) -> np.ndarray:
  array = np.asarray(value)
  if array.ndim != 1 or array.size == 0:
    raise ValueError(f"{name} must be a non-empty 1-D per-example array; got shape "
                     f"{array.shape}.")
  if size is not None and array.size != size:
    raise ValueError(f"{name} has {array.size} entries; the other outcomes have {size}.")
  if array.dtype != bool and not np.all((array == 0) | (array == 1)):
    raise ValueError(f"{name} must hold booleans (robust or not per example).")
  return array.astype(bool)


def _paired_gap(strong_robust: ArrayLike, weak_robust: ArrayLike, *, strong: str, weak: str,
                name: str, min_gap: float, alpha: float) -> Optional[MaskingWarning]:
  """A warning when `weak` breaks significantly more examples that `strong` missed than
  the reverse; both are per-example 'still robust after the attack' masks."""
  strong_robust = _bool_vector(strong_robust, f"{strong} outcomes")
  weak_robust = _bool_vector(weak_robust, f"{weak} outcomes", strong_robust.size)
  check_in_open_interval(alpha, "alpha", 0.0, 1.0)
  n = strong_robust.size
  only_weak_wins = int(np.sum(strong_robust & ~weak_robust))
  only_strong_wins = int(np.sum(~strong_robust & weak_robust))
  discordant = only_weak_wins + only_strong_wins
  p_value = 1.0
  if discordant:
    p_value = float(scipy.stats.binomtest(only_weak_wins, discordant, 0.5,
                                          alternative="greater").pvalue)
  gap = (only_weak_wins - only_strong_wins) / n
  evidence = {f"robust_accuracy_{strong}": float(np.mean(strong_robust)),
              f"robust_accuracy_{weak}": float(np.mean(weak_robust)),
              f"broken_only_by_{weak}": only_weak_wins,
              f"broken_only_by_{strong}": only_strong_wins,
              "num_examples": n, "p_value": p_value}
  if gap < min_gap or p_value >= alpha:
    return None
  message = (f"{weak} breaks {only_weak_wins} of {n} examples that {strong} could not "
             f"({only_strong_wins} the other way; robust accuracy "
             f"{100 * np.mean(weak_robust):.1f}% vs {100 * np.mean(strong_robust):.1f}%, "
             f"sign test p={p_value:.2g}): the "
             f"gradients {strong} follows are masked; attack adaptively (BPDA, EOT, another "
             "loss).")
  return MaskingWarning(name, message, evidence)


def black_box_beats_white_box(white_box_robust: ArrayLike, black_box_robust: ArrayLike, *,
                              min_gap: float = 0.02, alpha: float = 0.01
                              ) -> Optional[MaskingWarning]:
  """Warns when a black-box attack beats the white-box one on the same examples and radius.

  Args:
    white_box_robust: bool [N], still robust after the gradient attack.
    black_box_robust: bool [N], still robust after the black-box attack.
    min_gap: the smallest net fraction of examples the black-box attack must
      win by.
    alpha: the sign test's significance level.
  """
  return _paired_gap(white_box_robust, black_box_robust, strong="white_box",
                     weak="black_box", name="black_box_beats_white_box", min_gap=min_gap,
                     alpha=alpha)


def one_step_beats_iterative(iterative_robust: ArrayLike, one_step_robust: ArrayLike, *,
                             min_gap: float = 0.02, alpha: float = 0.01
                             ) -> Optional[MaskingWarning]:
  """Warns when a one-step attack (FGSM) beats an iterative one (PGD) at the same radius."""
  return _paired_gap(iterative_robust, one_step_robust, strong="iterative",
                     weak="one_step", name="one_step_beats_iterative", min_gap=min_gap,
                     alpha=alpha)


def accuracy_not_zero_at_large_eps(robust_at_large_eps: ArrayLike, eps: float, *,
                                   max_accuracy: float = 0.05) -> Optional[MaskingWarning]:
  """Warns when accuracy stays above `max_accuracy` at a radius where it must fall to ~0.

  Args:
    robust_at_large_eps: bool [N], still robust at `eps`.
    eps: the radius (for the message); choose one where any image can be
      changed into a different class's (e.g. 0.5 in L-infinity on [0, 1]
      images: every image can be made uniform gray).
    max_accuracy: the accuracy above which the attack is deemed to have
      failed for a reason other than robustness.
  """
  robust = _bool_vector(robust_at_large_eps, "robust_at_large_eps")
  check_in_open_interval(max_accuracy, "max_accuracy", 0.0, 1.0)
  accuracy = float(np.mean(robust))
  if accuracy <= max_accuracy:
    return None
  return MaskingWarning(
      "accuracy_not_zero_at_large_eps",
      f"robust accuracy is {100 * accuracy:.1f}% at eps={eps:g}, where an attack that follows "
      "useful gradients reaches about 0%: the attack is not optimising the defended model.",
      {"eps": float(eps), "robust_accuracy": accuracy, "max_accuracy": float(max_accuracy),
       "num_examples": int(robust.size)})


def randomness_across_evaluations(predictions: ArrayLike) -> Optional[MaskingWarning]:
  """Warns when repeated evaluations of the same inputs give different predictions.

  Args:
    predictions: int [R, N], the predicted class of each of N inputs on R >= 2
      evaluations with different keys.
  """
  predictions = np.asarray(predictions)
  if predictions.ndim != 2 or predictions.shape[0] < 2 or predictions.shape[1] == 0:
    raise ValueError("predictions must be [R, N] with R >= 2 evaluations of N >= 1 inputs; "
                     f"got shape {predictions.shape}.")
  changed = np.any(predictions != predictions[:1], axis=0)
  fraction = float(np.mean(changed))
  if fraction == 0.0:
    return None
  return MaskingWarning(
      "randomness_across_evaluations",
      f"predictions change between {predictions.shape[0]} evaluations on {100 * fraction:.1f}% "
      "of the inputs: the defence is randomised; attack its expectation (EOT) and report "
      "accuracy over draws.",
      {"fraction_changed": fraction, "num_evaluations": int(predictions.shape[0]),
       "num_examples": int(predictions.shape[1])})


def zero_gradients(gradient_norms: ArrayLike, *, max_fraction: float = 0.05,
                   tolerance: float = 0.0) -> Optional[MaskingWarning]:
  """Warns when the attack loss's input gradient vanishes on more than `max_fraction` inputs.

  Args:
    gradient_norms: float [N], the norm of d loss / d x per example (through
      the defence as the naive attacker differentiates it).
    max_fraction: the fraction of zero gradients tolerated.
    tolerance: norms at or below it count as zero (0: exactly zero, as
      float32 underflow and zero-derivative operations give).
  """
  norms = np.asarray(gradient_norms, np.float64)
  if norms.ndim != 1 or norms.size == 0:
    raise ValueError(f"gradient_norms must be a non-empty 1-D array; got shape {norms.shape}.")
  if not np.all(np.isfinite(norms)):
    raise ValueError("gradient_norms must be finite.")
  check_in_open_interval(max_fraction, "max_fraction", 0.0, 1.0)
  fraction = float(np.mean(norms <= tolerance))
  if fraction <= max_fraction:
    return None
  return MaskingWarning(
      "zero_gradients",
      f"the attack loss has a zero input gradient on {100 * fraction:.1f}% of the inputs "
      "(shattered or vanishing gradients): a gradient attack cannot move them; use BPDA or a "
      "loss on the logits (CW margin).",
      {"fraction_zero": fraction, "num_examples": int(norms.size),
       "tolerance": float(tolerance)})


def diagnose(outcomes: Mapping[str, Any], *, min_gap: float = 0.02, alpha: float = 0.01,
             max_accuracy: float = 0.05, max_zero_fraction: float = 0.05
             ) -> list[MaskingWarning]:
  """Runs every check whose inputs `outcomes` holds; returns the warnings raised.

  Args:
    outcomes: any of
      'white_box_robust', 'black_box_robust' (bool [N] each, same radius);
      'iterative_robust', 'one_step_robust' (bool [N] each, same radius);
      'large_eps_robust' (bool [N]) with 'large_eps' (float);
      'predictions' (int [R, N]);
      'gradient_norms' (float [N]).
    min_gap, alpha: of the paired checks.
    max_accuracy: of `accuracy_not_zero_at_large_eps`.
    max_zero_fraction: of `zero_gradients`.

  Raises:
    ValueError: an unknown key, or one of a pair without the other.
  """
  known = {"white_box_robust", "black_box_robust", "iterative_robust", "one_step_robust",
           "large_eps_robust", "large_eps", "predictions", "gradient_norms"}
  unknown = sorted(set(outcomes) - known)
  if unknown:
    raise ValueError(f"Unknown outcome(s) {unknown}; accepted: {sorted(known)}.")
  for pair in (("white_box_robust", "black_box_robust"),
               ("iterative_robust", "one_step_robust"), ("large_eps_robust", "large_eps")):
    if (pair[0] in outcomes) != (pair[1] in outcomes):
      raise ValueError(f"outcomes must hold both {pair[0]!r} and {pair[1]!r}, or neither.")
  found: list[Optional[MaskingWarning]] = []
  if "white_box_robust" in outcomes:
    found.append(black_box_beats_white_box(outcomes["white_box_robust"],
                                           outcomes["black_box_robust"], min_gap=min_gap,
                                           alpha=alpha))
  if "iterative_robust" in outcomes:
    found.append(one_step_beats_iterative(outcomes["iterative_robust"],
                                          outcomes["one_step_robust"], min_gap=min_gap,
                                          alpha=alpha))
  if "large_eps_robust" in outcomes:
    found.append(accuracy_not_zero_at_large_eps(outcomes["large_eps_robust"],
                                                outcomes["large_eps"],
                                                max_accuracy=max_accuracy))
  if "predictions" in outcomes:
    found.append(randomness_across_evaluations(outcomes["predictions"]))
  if "gradient_norms" in outcomes:
    found.append(zero_gradients(outcomes["gradient_norms"], max_fraction=max_zero_fraction))
  return [w for w in found if w is not None]


def warn(findings: Sequence[MaskingWarning], subject: str = "") -> None:
  """Issues each finding as a `GradientMaskingWarning` named by its check."""
  prefix = f"{subject}: " if subject else ""
  for finding in findings:
    warnings.warn(f"[{finding.name}] {prefix}{finding.message}", GradientMaskingWarning,
                  stacklevel=2)
