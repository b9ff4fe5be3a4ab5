"""Inference-time defences: input transformations, BPDA, ensembles, detectors, distillation.

Each defence is a transformation of a `logits_fn` (or of a training
objective's targets), so it composes with every attack, certifier and
trainer in certjax; beside each one sits what an adaptive attacker needs to
evaluate it honestly (a differentiable approximation for BPDA, a randomised
forward pass for EOT, a joint loss over classifier and detector).

Modules:
  transforms: JPEG (the exact Pillow codec and a differentiable
    approximation), bit-depth reduction, median smoothing, total-variance
    minimisation, random resize-and-pad, thermometer encoding, as
    `InputTransform`s (forward pass, BPDA approximation, randomised or not);
    `defended_logits_fn(logits_fn, transform)`.
  bpda: Backward Pass Differentiable Approximation (`bpda`,
    `bpda_logits_fn`).
  oracles: the naive and the adaptive attacker's gradient oracles of a
    deployed defence (`naive_oracle`, `adaptive_oracle`).
  ensemble: logit / probability averaging and majority vote over K members
    (a list of logits functions or stacked models).
  detectors: feature squeezing, Mahalanobis, STRIP-like detectors, a reject
    option and the joint margin that attacks classifier and detector at once.
  distillation: defensive distillation's temperature-T targets and loss (the
    'distillation' training objective uses them).

`certjax.evaluation.defences` ('defences') measures them all under the naive
and the adaptive attack, with `certjax.attacks.diagnostics`' gradient-masking
checks.
"""

from certjax.defences import bpda, detectors, distillation, ensemble, oracles, transforms
from certjax.defences.bpda import bpda_logits_fn, bpda_transform
from certjax.defences.detectors import (Detector, detection_metrics, feature_squeezing,
                                        fit_mahalanobis, joint_margin, mahalanobis, strip,
                                        threshold_at_fpr, with_reject)
from certjax.defences.ensemble import (ENSEMBLE_METHODS, ensemble_logits_fn,
                                       stacked_ensemble_logits_fn)
from certjax.defences.oracles import DefenceOracle, adaptive_oracle, naive_oracle
from certjax.defences.transforms import (TRANSFORM_NAMES, InputTransform, compose,
                                         defended_logits_fn, get_transform)

__all__ = [
    "DefenceOracle", "Detector", "ENSEMBLE_METHODS", "InputTransform", "TRANSFORM_NAMES",
    "adaptive_oracle", "bpda", "bpda_logits_fn", "bpda_transform", "compose",
    "defended_logits_fn", "detection_metrics", "detectors", "distillation", "ensemble",
    "ensemble_logits_fn", "feature_squeezing", "fit_mahalanobis", "get_transform",
    "joint_margin", "mahalanobis", "naive_oracle", "oracles", "stacked_ensemble_logits_fn",
    "strip", "threshold_at_fpr", "transforms", "with_reject",
]
