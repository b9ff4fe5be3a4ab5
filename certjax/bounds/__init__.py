"""Bound propagation for any pure JAX function: IBP, CROWN-IBP and CROWN.

`ibp(fn, *args)` interprets the jaxpr of any JAX function with one rule per
primitive; `crown_ibp`, `crown` and `ibp_spec`/`ibp_margins` bound linear
specifications such as the margins from `margin_spec`; `verified_accuracy`
is the usual certification metric.

Every product and convolution of the bound computations runs in float32
(`Precision.HIGHEST`) whatever `jax.default_matmul_precision` says, and NaN
ends never reach a comparison. `sound_rounding=True` on `ibp`, `crown_ibp`,
`crown`, `ibp_spec`, `ibp_margins`, `margin_lower_bounds` and
`verified_accuracy` rounds every bound outward so that certificates hold for
the float32 network, not only in exact arithmetic (`rounding` has the error
model; Jia & Rinard 2021, https://arxiv.org/abs/2003.03021).

`certified_training` holds the pure pieces of IBP / CROWN-IBP certified
training (schedules, worst-case cross-entropy) that the training objectives
'ibp' and 'crown_ibp' (`certjax.training.objectives.certified`) are built
from. Verifying a trained workdir is the 'verified' evaluator
(`certjax.evaluation.verified`, `launch/verify.py`).
"""

from certjax.bounds import certified_training
from certjax.bounds import rounding
from certjax.bounds.graph import AffineGraph
from certjax.bounds.ibp import (IBP_RULES, NAMED_CALL_RULES, UnsupportedPrimitiveError, ibp,
                                supported_primitives)
from certjax.bounds.interval import Interval, check_interval, linf_ball
from certjax.bounds.linear import (crown, crown_ibp, crown_pre_activation_bounds, ibp_margins,
                                   ibp_spec, margin_spec, relu_relaxation)
from certjax.bounds.verify import METHODS, VerifiedAccuracy, margin_lower_bounds, verified_accuracy

__all__ = [
    "AffineGraph", "IBP_RULES", "certified_training", "Interval", "METHODS", "NAMED_CALL_RULES",
    "rounding",
    "UnsupportedPrimitiveError", "VerifiedAccuracy", "check_interval", "crown", "crown_ibp",
    "crown_pre_activation_bounds", "ibp", "ibp_margins", "ibp_spec", "linf_ball",
    "margin_lower_bounds", "margin_spec", "relu_relaxation", "supported_primitives",
    "verified_accuracy",
]
