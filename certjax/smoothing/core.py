"""Cohen et al.'s CERTIFY and PREDICT for a whole batch of inputs.

The counting (all inputs, all draws) runs jitted on the accelerator; the
statistics (Clopper-Pearson bound, binomial test, radius) run vectorised on the
host with SciPy, exactly as in the reference implementation.

Keys: input `i` uses the per-input key `k_i` (`fold_in(key, i)`, or `key[i]`
for a key array; see `noise`). CERTIFY draws its selection sample from
`fold_in(k_i, 0)` and its estimation sample from `fold_in(k_i, 1)`, so the two
are independent and certifying input `i` alone with key `k_i` gives the same
certificate. PREDICT counts with `k_i` itself.

References:
  Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via Randomized
  Smoothing", ICML 2019 (Pseudocode for CERTIFY and PREDICT; reference code
  locuslab/smoothing `code/core.py`).
  Yang et al., "Randomized Smoothing of All Shapes and Sizes", ICML 2020
  (uniform noise, L1 certificates).
"""

from __future__ import annotations

from typing import Hashable, NamedTuple

import numpy as np
from jax.sharding import Mesh

from certjax import validation
from certjax.smoothing import noise as noise_lib
from certjax.smoothing import sampling
from certjax.smoothing import stats
from certjax.types import ArrayLike, LogitsFn, PRNGKey

ABSTAIN = stats.ABSTAIN
SELECTION_STREAM = 0
ESTIMATION_STREAM = 1


class Certificate(NamedTuple):
  """Result of CERTIFY for a batch (host NumPy arrays).

  Attributes:
    prediction: int32 [B], the smoothed classifier's class, or -1 (ABSTAIN).
    radius: float32 [B], certified radius (L2 for Gaussian noise, L1 for
      uniform noise) in [0, 1] pixel units; 0 when abstaining.
    p_a_lower: float64 [B], Clopper-Pearson lower bound on pA.
    top_class: int32 [B], class with most selection votes (cA), also when
      abstaining.
    counts_selection: int64 [B, K], the n0 selection counts.
    counts_estimation: int64 [B, K], the n estimation counts.
  """
  prediction: np.ndarray
  radius: np.ndarray
  p_a_lower: np.ndarray
  top_class: np.ndarray
  counts_selection: np.ndarray
  counts_estimation: np.ndarray


def _check_counts_matrix(counts, name: str) -> np.ndarray:
  counts = np.asarray(counts)
  if counts.ndim != 2 or counts.shape[1] < 1:
    raise ValueError(f"{name} must have shape [batch, num_classes]; got {counts.shape}.")
  if counts.dtype.kind not in "iu":
    raise ValueError(f"{name} must hold integer counts; got dtype {counts.dtype}.")
  if counts.size and counts.min() < 0:
    raise ValueError(f"{name} must be non-negative.")
  return counts.astype(np.int64)


def certificate_from_counts(counts_selection: ArrayLike, counts_estimation: ArrayLike,
                            sigma: float, alpha: float, *,
                            noise: str = "gaussian") -> Certificate:
  """The statistics half of CERTIFY: counts -> prediction, radius.

  cA is the selection argmax (lowest class index on ties, as `np.argmax` in
  the reference code); `pA_lower = clopper_pearson_lower(nA, n, alpha)` with
  nA = estimation count of cA and n the estimation row total; abstain when
  `pA_lower < 1/2`, else radius `sigma * Phi^-1(pA_lower)` (Gaussian, L2) or
  `2 sqrt(3) sigma (pA_lower - 1/2)` (uniform, L1).

  Args:
    counts_selection: integer [B, K] counts from the selection draws.
    counts_estimation: integer [B, K] counts from the estimation draws.
    sigma: noise standard deviation (> 0).
    alpha: failure probability in (0, 1).
    noise: 'gaussian' or 'uniform'.

  Returns:
    A `Certificate`.
  """
  validation.check_choice(noise, "noise", sampling.NOISE_TYPES)
  validation.check_positive(sigma, "sigma")
  counts_selection = _check_counts_matrix(counts_selection, "counts_selection")
  counts_estimation = _check_counts_matrix(counts_estimation, "counts_estimation")
  if counts_selection.shape != counts_estimation.shape:
    raise ValueError(
        f"counts_selection {counts_selection.shape} and counts_estimation "
        f"{counts_estimation.shape} must have the same shape.")
  top_class = np.argmax(counts_selection, axis=1)
  n = counts_estimation.sum(axis=1)
  n_a = np.take_along_axis(counts_estimation, top_class[:, None], axis=1)[:, 0]
  p_a_lower = stats.clopper_pearson_lower(n_a, n, alpha)
  abstain = p_a_lower < 0.5
  radius = stats.radius_from_p_lower(p_a_lower, float(sigma), noise)
  return Certificate(
      prediction=np.where(abstain, ABSTAIN, top_class).astype(np.int32),
      radius=np.where(abstain, 0.0, radius).astype(np.float32),
      p_a_lower=p_a_lower,
      top_class=top_class.astype(np.int32),
      counts_selection=counts_selection,
      counts_estimation=counts_estimation)


def prediction_from_counts(counts: ArrayLike, alpha: float) -> np.ndarray:
  """The statistics half of PREDICT: abstain unless the top two counts differ significantly.

  Returns the argmax class when `binomtest(nA, nA + nB, 1/2).pvalue <= alpha`
  (nA, nB the two largest counts), else -1.

  Args:
    counts: integer [B, K] counts, K >= 2.
    alpha: significance level in (0, 1).

  Returns:
    int32 [B] predictions, -1 for abstentions.
  """
  validation.check_in_open_interval(alpha, "alpha", 0.0, 1.0)
  counts = _check_counts_matrix(counts, "counts")
  if counts.shape[1] < 2:
    raise ValueError("PREDICT needs at least 2 classes to compare the top two counts.")
  top_two = -np.partition(-counts, 1, axis=1)[:, :2]
  p_value = stats.binomial_test_pvalue(top_two[:, 0], top_two[:, 1])
  return np.where(p_value > alpha, ABSTAIN, np.argmax(counts, axis=1)).astype(np.int32)


def _check_alpha_and_n(alpha: float, n: int) -> None:
  validation.check_in_open_interval(alpha, "alpha", 0.0, 1.0)
  smallest = stats.min_samples_to_certify(alpha)
  if n < smallest:
    raise ValueError(
        f"n={n} noise draws can never certify at alpha={alpha}: even if every draw votes "
        f"for the top class the Clopper-Pearson bound alpha**(1/n) stays below 1/2, so "
        f"every input would abstain. Use n >= {smallest} (min_samples_to_certify(alpha)).")


def certify(key: PRNGKey, logits_fn: LogitsFn, x: ArrayLike, sigma: float, n0: int, n: int,
            alpha: float, batch_size: int, *, num_classes: int | None = None,
            noise: str = "gaussian", mesh: Mesh | None = None,
            data_axis: Hashable = "data") -> Certificate:
  """Cohen et al.'s CERTIFY for every input of a batch.

  Guesses the top class cA from `n0` noisy predictions, then lower-bounds its
  probability pA from `n` fresh ones; with probability >= 1 - alpha (per
  input) the returned class is the smoothed classifier's prediction and it is
  constant within the returned radius.

  Args:
    key: a single PRNG key or one key per input (shape [B]); see module doc.
    logits_fn: pure function from images [N, H, W, C] in [0, 1] to logits.
    x: inputs [B, H, W, C] in [0, 1].
    sigma: noise standard deviation (> 0) in [0, 1] pixel units.
    n0: selection draws per input (>= 1).
    n: estimation draws per input; must be >= min_samples_to_certify(alpha).
    alpha: failure probability in (0, 1).
    batch_size: noisy copies per forward pass on each device.
    num_classes: inferred from logits_fn when None.
    noise: 'gaussian' (L2 radius) or 'uniform' (L1 radius; uniform noise of
      standard deviation sigma, half-width sqrt(3) sigma).
    mesh, data_axis: see `sample_counts`.

  Returns:
    A `Certificate` of host arrays; `prediction` is -1 and `radius` 0 on abstention.

  Raises:
    ValueError: on bad arguments, including an `n` too small to ever certify
      at this `alpha` (which would silently abstain on every input).

  References:
    Cohen, Rosenfeld & Kolter, ICML 2019, CERTIFY; Yang et al., ICML 2020.
  """
  n0 = validation.check_int_at_least(n0, "n0", 1)
  n = validation.check_int_at_least(n, "n", 1)
  _check_alpha_and_n(alpha, n)
  prepared = sampling.prepare(logits_fn, x, sigma, batch_size, num_classes, noise, mesh,
                              data_axis)
  keys = noise_lib.per_input_keys(key, prepared.x.shape[0])
  counts_selection = sampling.counts_for_keys(
      noise_lib.fold_in_all(keys, SELECTION_STREAM), prepared, n0, int(batch_size), noise)
  counts_estimation = sampling.counts_for_keys(
      noise_lib.fold_in_all(keys, ESTIMATION_STREAM), prepared, n, int(batch_size), noise)
  return certificate_from_counts(
      np.asarray(counts_selection), np.asarray(counts_estimation), float(sigma), alpha,
      noise=noise)


def predict(key: PRNGKey, logits_fn: LogitsFn, x: ArrayLike, sigma: float, n: int,
            alpha: float, batch_size: int, *, num_classes: int | None = None,
            noise: str = "gaussian", mesh: Mesh | None = None,
            data_axis: Hashable = "data") -> np.ndarray:
  """Cohen et al.'s PREDICT for every input of a batch.

  Counts `n` noisy predictions per input and returns the top class when a
  two-sided binomial test rejects "the top two classes are equally likely"
  at level alpha, else -1; the returned class differs from the smoothed
  classifier's with probability at most alpha.

  Args:
    key, logits_fn, x, sigma, batch_size, num_classes, noise, mesh, data_axis:
      as in `certify`.
    n: noise draws per input (>= 1).
    alpha: significance level in (0, 1).

  Returns:
    int32 [B] NumPy array of classes, -1 for abstentions.

  References:
    Cohen, Rosenfeld & Kolter, ICML 2019, PREDICT (after Hung & Fithian 2019).
  """
  n = validation.check_int_at_least(n, "n", 1)
  validation.check_in_open_interval(alpha, "alpha", 0.0, 1.0)
  counts = sampling.sample_counts(key, logits_fn, x, sigma, n, batch_size,
                                  num_classes=num_classes, noise=noise, mesh=mesh,
                                  data_axis=data_axis)
  return prediction_from_counts(np.asarray(counts), alpha)
