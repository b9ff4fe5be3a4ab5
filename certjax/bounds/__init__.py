"""Bound propagation for any pure JAX function: IBP, CROWN-IBP and CROWN.

`ibp(fn, *args)` interprets the jaxpr of any JAX function with one rule per
primitive; `crown_ibp`, `crown` and `ibp_spec`/`ibp_margins` bound linear
specifications such as the margins from `margin_spec`; `verified_accuracy`
is the usual certification metric.

`certified_training` holds the pure pieces of IBP / CROWN-IBP certified
training (schedules, worst-case cross-entropy) that the training objectives
'ibp' and 'crown_ibp' (`certjax.training.objectives.certified`) are built
from. Verifying a trained workdir is the 'verified' evaluator
(`certjax.evaluation.verified`, `launch/verify.py`).
"""

from certjax.bounds import certified_training
from certjax.bounds.graph import AffineGraph
from certjax.bounds.ibp import (IBP_RULES, NAMED_CALL_RULES, UnsupportedPrimitiveError, ibp,
                                supported_primitives)
from certjax.bounds.interval import Interval, check_interval, linf_ball
from certjax.bounds.linear import (crown, crown_ibp, crown_pre_activation_bounds, ibp_margins,
                                   ibp_spec, margin_spec, relu_relaxation)
from certjax.bounds.verify import METHODS, VerifiedAccuracy, margin_lower_bounds, verified_accuracy

__all__ = [
    "AffineGraph", "IBP_RULES", "certified_training", "Interval", "METHODS", "NAMED_CALL_RULES",
    "UnsupportedPrimitiveError", "VerifiedAccuracy", "check_interval", "crown", "crown_ibp",
    "crown_pre_activation_bounds", "ibp", "ibp_margins", "ibp_spec", "linf_ball",
    "margin_lower_bounds", "margin_spec", "relu_relaxation", "supported_primitives",
    "verified_accuracy",
]
