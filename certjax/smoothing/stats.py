"""Host-side statistics of randomized smoothing (NumPy/SciPy, vectorised).

Counting noisy predictions is the accelerator's job (`sampling.py`); turning
counts into a certificate is a handful of special-function evaluations per
input, which SciPy does exactly and quickly on the host for a whole batch.

References:
  Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via Randomized
  Smoothing", ICML 2019 (CERTIFY / PREDICT, Clopper-Pearson bound, L2 radius
  sigma * Phi^-1(pA_lower)).
  Yang, Duan, Hu, Salman, Razenshteyn & Li, "Randomized Smoothing of All
  Shapes and Sizes", ICML 2020 (uniform noise, L1 radius 2 lambda (pA - 1/2)).
  Zhai et al., "MACER: Attack-free and Scalable Robust Training via Maximizing
  Certified Radius", ICLR 2020 (average certified radius).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from certjax import validation

#: Class returned when the smoothed classifier abstains.
ABSTAIN = -1

#: Accepted noise distributions and the norm their radius is certified in.
NOISE_NORMS = {"gaussian": "l2", "uniform": "l1"}


def _check_alpha(alpha: float) -> float:
  return float(validation.check_in_open_interval(alpha, "alpha", 0.0, 1.0))


def _as_counts(value, name: str) -> np.ndarray:
  arr = np.asarray(value)
  if arr.dtype.kind not in "iub":
    if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
      arr = arr.astype(np.int64)
    else:
      raise ValueError(f"{name} must hold integer counts; got dtype {arr.dtype}.")
  if arr.size and arr.min() < 0:
    raise ValueError(f"{name} must be >= 0; got minimum {arr.min()}.")
  return arr.astype(np.int64)


def clopper_pearson_lower(n_a, n, alpha: float) -> np.ndarray:
  """One-sided (1 - alpha) Clopper-Pearson lower confidence bound on a proportion.

  This is `Beta(alpha; n_a, n - n_a + 1)` quantile, i.e. the lower end of
  statsmodels' `proportion_confint(n_a, n, alpha=2 * alpha, method="beta")`,
  which Cohen et al.'s reference code uses; it is 0 when `n_a == 0`.

  Args:
    n_a: number of successes, integer array-like (broadcast against `n`).
    n: number of trials, integer array-like >= 1.
    alpha: failure probability in (0, 1).

  Returns:
    float64 array of lower bounds in [0, 1), broadcast shape of the inputs.

  Raises:
    ValueError: if alpha is outside (0, 1), counts are negative or not integers,
      n < 1 or n_a > n.

  References:
    Clopper & Pearson, Biometrika 1934; Cohen et al., ICML 2019, Sec. 3.2.
  """
  alpha = _check_alpha(alpha)
  n_a = _as_counts(n_a, "n_a")
  n = _as_counts(n, "n")
  if n.size and n.min() < 1:
    raise ValueError(f"n (number of noise draws) must be >= 1; got minimum {n.min()}.")
  n_a, n = np.broadcast_arrays(n_a, n)
  if n_a.size and np.any(n_a > n):
    raise ValueError("n_a must not exceed n (more successes than draws).")
  # beta.ppf is NaN for a shape parameter of 0; the bound is exactly 0 there.
  bound = stats.beta.ppf(alpha, np.maximum(n_a, 1), n - n_a + 1)
  return np.where(n_a > 0, bound, 0.0).astype(np.float64)


def min_samples_to_certify(alpha: float) -> int:
  """Smallest number of draws `n` for which any input can be certified.

  With every draw voting for the top class (`n_a == n`) the Clopper-Pearson
  bound is `alpha ** (1 / n)`; CERTIFY abstains unless it reaches 1/2, so any
  `n < log2(1 / alpha)` abstains on every input whatever the classifier.

  Args:
    alpha: failure probability in (0, 1).

  Returns:
    The smallest integer n with `clopper_pearson_lower(n, n, alpha) >= 0.5`.
  """
  alpha = _check_alpha(alpha)
  n = max(1, math.ceil(math.log(alpha) / math.log(0.5)))
  # Guard the closed form against rounding by checking with the bound itself.
  while clopper_pearson_lower(n, n, alpha) < 0.5:
    n += 1
  while n > 1 and clopper_pearson_lower(n - 1, n - 1, alpha) >= 0.5:
    n -= 1
  return n


def binomial_test_pvalue(n_a, n_b) -> np.ndarray:
  """Two-sided exact binomial test of `n_a` successes in `n_a + n_b`, p = 1/2.

  Vectorised equivalent of `scipy.stats.binomtest(n_a, n_a + n_b, 0.5).pvalue`
  (the successor of the `binom_test` Cohen et al. call): with p = 1/2 the
  binomial pmf is symmetric, so the two-sided p-value is
  `min(1, 2 * BinomCDF(min(n_a, n_b); n_a + n_b, 1/2))`.

  Args:
    n_a, n_b: non-negative integer array-likes with `n_a + n_b >= 1`.

  Returns:
    float64 p-values in (0, 1].
  """
  n_a = _as_counts(n_a, "n_a")
  n_b = _as_counts(n_b, "n_b")
  total = n_a + n_b
  if total.size and total.min() < 1:
    raise ValueError("the binomial test needs n_a + n_b >= 1 trials.")
  smaller = np.minimum(n_a, n_b)
  return np.minimum(1.0, 2.0 * stats.binom.cdf(smaller, total, 0.5))


def gaussian_l2_radius(p_a_lower, sigma: float) -> np.ndarray:
  """L2 radius `sigma * Phi^-1(pA_lower)` of Gaussian smoothing (0 if pA_lower < 1/2)."""
  p = np.asarray(p_a_lower, dtype=np.float64)
  return np.where(p >= 0.5, sigma * stats.norm.ppf(np.clip(p, 0.5, 1.0)), 0.0)


def uniform_l1_radius(p_a_lower, sigma: float) -> np.ndarray:
  """L1 radius `2 lambda (pA_lower - 1/2)` of uniform smoothing, lambda = sqrt(3) sigma.

  `sigma` is the noise's standard deviation, as in Yang et al.'s code: the
  noise is uniform on `[-lambda, lambda]^d` with `lambda = sqrt(3) * sigma`.
  """
  p = np.asarray(p_a_lower, dtype=np.float64)
  half_width = math.sqrt(3.0) * sigma
  return np.where(p >= 0.5, 2.0 * half_width * (p - 0.5), 0.0)


def radius_from_p_lower(p_a_lower, sigma: float, noise: str = "gaussian") -> np.ndarray:
  """Certified radius for `noise` ('gaussian': L2, 'uniform': L1) from pA_lower."""
  validation.check_choice(noise, "noise", tuple(NOISE_NORMS))
  if noise == "gaussian":
    return gaussian_l2_radius(p_a_lower, sigma)
  return uniform_l1_radius(p_a_lower, sigma)


def max_certifiable_radius(sigma: float, n: int, alpha: float, noise: str = "gaussian") -> float:
  """The largest radius CERTIFY can return with `n` estimation draws.

  Reached when all `n` draws vote for the top class: then the Clopper-Pearson
  bound is `alpha ** (1 / n)`, and for Gaussian noise the radius is
  `sigma * Phi^-1(alpha ** (1 / n))` (Cohen et al. 2019). No certificate of
  that run can exceed it, whatever the classifier.
  """
  n = validation.check_int_at_least(n, "n", 1)
  p_lower = clopper_pearson_lower(n, n, alpha)
  return float(radius_from_p_lower(p_lower, sigma, noise))


def linf_radius_from_l2(radius, input_dim: int) -> np.ndarray:
  """L-infinity radius implied by an L2 certificate in `input_dim` dimensions.

  The L-infinity ball of radius r / sqrt(d) lies inside the L2 ball of radius r.
  """
  input_dim = validation.check_int_at_least(input_dim, "input_dim", 1)
  return np.asarray(radius, dtype=np.float64) / math.sqrt(input_dim)


def _radii_and_correct(radii, correct, caller: str) -> tuple[np.ndarray, np.ndarray]:
  """Flat float64 radii and bool correctness of equal, non-zero length."""
  radii = np.asarray(radii, dtype=np.float64).reshape(-1)
  correct = np.asarray(correct).reshape(-1).astype(bool)
  if radii.shape != correct.shape:
    raise ValueError(
        f"radii and correct must have the same length; got {radii.shape[0]} and "
        f"{correct.shape[0]}.")
  if radii.size == 0:
    raise ValueError(f"{caller} needs at least one input.")
  return radii, correct


def certified_accuracy(radii, correct, thresholds) -> np.ndarray:
  """Fraction of inputs predicted correctly with radius >= each threshold.

  Abstentions must carry `correct=False` (their prediction, -1, never equals a
  label), as in Cohen et al.'s analysis scripts.

  Args:
    radii: [N] certified radii.
    correct: [N] booleans, prediction == label.
    thresholds: [T] radii at which to evaluate.

  Returns:
    float64 array [T].
  """
  radii, correct = _radii_and_correct(radii, correct, "certified_accuracy")
  thresholds = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
  return np.mean(correct[None, :] & (radii[None, :] >= thresholds[:, None]), axis=1)


def average_certified_radius(radii, correct) -> float:
  """Mean over all inputs of the radius where correct and 0 otherwise (ACR, MACER)."""
  radii, correct = _radii_and_correct(radii, correct, "average_certified_radius")
  return float(np.mean(np.where(correct, radii, 0.0)))
