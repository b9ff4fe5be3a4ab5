"""Randomized smoothing: noisy class counts on the accelerator, certificates on the host.

Typical use::

  cert = smoothing.certify(jax.random.key(0), logits_fn, images, sigma=0.25,
                           n0=100, n=100_000, alpha=0.001, batch_size=1000)
  acc = smoothing.certified_accuracy(cert.radius, cert.prediction == labels,
                                     [0.0, 0.25, 0.5])

Training objectives 'gaussian', 'smoothadv', 'macer' and 'consistency' are in
`certjax.smoothing.training` (registered with the training registry, selected
by `config.objective.name`); `run_certification(config, workdir)` certifies a
trained model and writes Cohen-format results (`launch/certify.py`). Both are
loaded on first use, so importing the core does not import the training stack.

References:
  Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via Randomized
  Smoothing", ICML 2019.
  Salman et al., "Provably Robust Deep Learning via Adversarially Trained
  Smoothed Classifiers", NeurIPS 2019 (SmoothAdv).
  Zhai et al., "MACER", ICLR 2020.
  Jeong & Shin, "Consistency Regularization for Certified Robustness of
  Smoothed Classifiers", NeurIPS 2020.
  Yang et al., "Randomized Smoothing of All Shapes and Sizes", ICML 2020.
"""

import importlib
from typing import Any

from certjax.smoothing import analysis
from certjax.smoothing.core import ABSTAIN
from certjax.smoothing.core import Certificate
from certjax.smoothing.core import certificate_from_counts
from certjax.smoothing.core import certify
from certjax.smoothing.core import predict
from certjax.smoothing.core import prediction_from_counts
from certjax.smoothing.sampling import NOISE_TYPES
from certjax.smoothing.sampling import input_keys
from certjax.smoothing.sampling import keys_for_indices
from certjax.smoothing.sampling import sample_counts
from certjax.smoothing.sampling import sample_noise
from certjax.smoothing.stats import average_certified_radius
from certjax.smoothing.stats import binomial_test_pvalue
from certjax.smoothing.stats import certified_accuracy
from certjax.smoothing.stats import clopper_pearson_lower
from certjax.smoothing.stats import gaussian_l2_radius
from certjax.smoothing.stats import linf_radius_from_l2
from certjax.smoothing.stats import min_samples_to_certify
from certjax.smoothing.stats import radius_from_p_lower
from certjax.smoothing.stats import uniform_l1_radius

# name -> module, imported on first access (they import certjax.training).
_LAZY = {
    "CertificationRun": "certjax.smoothing.certify_run",
    "run_certification": "certjax.smoothing.certify_run",
    "smoothadv_pgd": "certjax.smoothing.training",
}


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'certjax.smoothing' has no attribute {name!r}")


__all__ = [
    "ABSTAIN",
    "Certificate",
    "CertificationRun",
    "NOISE_TYPES",
    "analysis",
    "average_certified_radius",
    "binomial_test_pvalue",
    "certificate_from_counts",
    "certified_accuracy",
    "certify",
    "clopper_pearson_lower",
    "gaussian_l2_radius",
    "input_keys",
    "keys_for_indices",
    "linf_radius_from_l2",
    "min_samples_to_certify",
    "predict",
    "prediction_from_counts",
    "radius_from_p_lower",
    "run_certification",
    "sample_counts",
    "sample_noise",
    "smoothadv_pgd",
    "uniform_l1_radius",
]
