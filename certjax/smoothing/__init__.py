"""Randomized smoothing: noisy class counts on the accelerator, certificates on the host.

Typical use::

  cert = smoothing.certify(jax.random.key(0), logits_fn, images, sigma=0.25,
                           n0=100, n=100_000, alpha=0.001, batch_size=1000)
  acc = smoothing.certified_accuracy(cert.radius, cert.prediction == labels,
                                     [0.0, 0.25, 0.5])

Modules: `noise` (the noise stream), `sampling` (the counting loop), `core`
(CERTIFY, PREDICT), `stats` (Clopper-Pearson, radii, certified accuracy),
`analysis` (result columns and summaries), `soft_smoothing` (the soft
smoothed classifier and SmoothAdv's attack, used by the training objectives
'gaussian', 'smoothadv', 'macer' and 'consistency' in
`certjax.training.objectives.smoothing`). Certifying a trained workdir and
writing Cohen-format files is the 'certified' evaluator
(`certjax.evaluation.certified`, `launch/certify.py`).

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

from certjax.smoothing import analysis
from certjax.smoothing import soft_smoothing
from certjax.smoothing.core import ABSTAIN
from certjax.smoothing.core import Certificate
from certjax.smoothing.core import certificate_from_counts
from certjax.smoothing.core import certify
from certjax.smoothing.core import predict
from certjax.smoothing.core import prediction_from_counts
from certjax.smoothing import noise
from certjax.smoothing import sampling
from certjax.smoothing.noise import NOISE_TYPES
from certjax.smoothing.noise import input_keys
from certjax.smoothing.noise import keys_for_indices
from certjax.smoothing.noise import sample_noise
from certjax.smoothing.sampling import sample_counts
from certjax.smoothing.stats import average_certified_radius
from certjax.smoothing.stats import binomial_test_pvalue
from certjax.smoothing.stats import certified_accuracy
from certjax.smoothing.stats import clopper_pearson_lower
from certjax.smoothing.stats import gaussian_l2_radius
from certjax.smoothing.stats import linf_radius_from_l2
from certjax.smoothing.stats import max_certifiable_radius
from certjax.smoothing.stats import min_samples_to_certify
from certjax.smoothing.stats import radius_from_p_lower
from certjax.smoothing.stats import uniform_l1_radius
from certjax.smoothing.soft_smoothing import smoothadv_pgd


__all__ = [
    "ABSTAIN",
    "Certificate",
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
    "max_certifiable_radius",
    "min_samples_to_certify",
    "noise",
    "predict",
    "prediction_from_counts",
    "radius_from_p_lower",
    "sample_counts",
    "sampling",
    "sample_noise",
    "smoothadv_pgd",
    "soft_smoothing",
    "uniform_l1_radius",
]
