"""Data sanitisation from a model's features: find the poison in a training set.

The caller trains a model on the (possibly poisoned) training set, computes a
feature vector per training example (the penultimate layer, as both papers
do) and passes `features` [N, D] with the labels [N]. Each defence works class
by class, because a poisoned example sits among the examples of its (target)
label and differs from them in feature space:

  result = spectral_signatures(features, labels, num_classes=10, expected_rate=0.05)
  result.removed                                    # indices to drop; retrain without them
  detection_scores(result.removed, poison_indices, num_examples=n)   # precision, recall
  detection_scores(result.scores, poison_indices, num_examples=n)    # + AUC

* `spectral_signatures` (Tran, Li, Madry 2018): per class, the centred
  features' top right singular vector v; score_i = ((r_i - mean) . v)^2.
  The removal_factor * expected_rate * n_c highest scores of each class go.
  The paper's score is the squared projection of the centred features, which
  we follow; the authors' code projects the uncentred features and ranks the
  absolute value, which ranks the same only when the class mean is
  orthogonal to v. The scores are computed from the top eigenvector of each
  class's covariance in float32 at HIGHEST matmul precision: one jitted
  `lax.map` over the classes, so `spectral_signature_scores` runs under
  `jit`/`vmap` (e.g. over the features of several models).
* `activation_clustering` (Chen et al. 2019): per class, reduce the features
  to `num_components` dimensions (FastICA as in the paper and ART's
  `ActivationDefence`, or PCA), split them with 2-means, and flag the smaller
  cluster as poison when its relative size is <= `size_threshold` (0.35, the
  paper's and ART's default) and, with `silhouette_threshold` set, when the
  silhouette score of the split exceeds it (ART's 'silhouette-scores'
  analysis). The silhouette score is always reported. This one runs on the
  host in float64 NumPy: the classes have different sizes and k-means with
  restarts is a data-dependent loop; every random choice comes from `seed`.
* `detection_scores` measures a defence against the known poison indices:
  precision and recall of a removed set, and for scores also the AUC and the
  detection rate at a false-positive rate (`certjax.privacy.membership.auc`,
  `certjax.defences.detectors.detection_metrics`).

References:
  Tran, Li, Madry. Spectral Signatures in Backdoor Attacks. NeurIPS 2018
    (code: MadryLab/backdoor_data_poisoning).
  Chen, Carvalho, Baracaldo, Ludwig, Edwards, Lee, Molloy, Srivastava.
    Detecting Backdoor Attacks on Deep Neural Networks by Activation
    Clustering. AAAI Workshop on Artificial Intelligence Safety (SafeAI) 2019
    (code: IBM adversarial-robustness-toolbox, `ActivationDefence`).
  Hyvarinen, Oja. Independent component analysis: algorithms and
    applications. Neural Networks 2000 (FastICA).
  Rousseeuw. Silhouettes: a graphical aid to the interpretation and
    validation of cluster analysis. J. Comput. Appl. Math. 1987.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from certjax.defences import detectors
from certjax.privacy import membership
from certjax.types import Array, ArrayLike
from certjax.validation import (check_choice, check_in_open_interval, check_int_at_least,
                                check_labels, check_positive, is_concrete)

__all__ = [
    "REDUCTIONS", "ActivationClustering", "ClassClustering", "SpectralSignatures",
    "activation_clustering", "detection_scores", "spectral_signature_scores",
    "spectral_signatures",
]

REDUCTIONS = ("ica", "pca")

_HIGHEST = lax.Precision.HIGHEST
# Pairwise distances for the silhouette are computed this many rows at a time.
_SILHOUETTE_CHUNK = 1024


# ------------------------------------------------------------------ checks


def _check_features(features: Any, labels: Any, num_classes: int) -> None:
  """Static checks always; value checks (finite, label range) on concrete inputs."""
  check_int_at_least(num_classes, "num_classes", 1)
  shape = np.shape(features)
  if len(shape) != 2:
    raise ValueError(f"features must have rank 2 (examples, feature dims); got shape "
                     f"{tuple(shape)}. Flatten each example's features first.")
  dtype = features.dtype if hasattr(features, "dtype") else np.asarray(features).dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"features must be a floating-point array; got dtype {dtype}.")
  check_labels(labels, num_classes=num_classes, batch_size=shape[0], name="labels")
  if is_concrete(features) and not np.all(np.isfinite(np.asarray(features))):
    bad = int(np.sum(~np.isfinite(np.asarray(features))))
    raise ValueError(f"features contains {bad} NaN/Inf value(s); features must be finite.")


# --------------------------------------------------------- spectral signatures


def _top_direction(centred: Array) -> Array:
  """Top right singular vector of `centred` [N, D]: top eigenvector of its Gram matrix."""
  gram = jnp.matmul(centred.T, centred, precision=_HIGHEST)
  _, vectors = jnp.linalg.eigh(gram)  # ascending eigenvalues
  return vectors[:, -1]


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _spectral_scores(features: Array, labels: Array, num_classes: int) -> Array:
  features = features.astype(jnp.float32)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)          # [N, C]
  counts = onehot.sum(axis=0)
  means = jnp.matmul(onehot.T, features, precision=_HIGHEST) / jnp.maximum(counts, 1.0)[:, None]

  def direction(c):
    # Other classes' rows are zeroed, not dropped: one shape for every class,
    # and zero rows leave the right singular vectors unchanged.
    in_class = (labels == c)[:, None]
    return _top_direction(jnp.where(in_class, features - means[c], 0.0))

  # lax.map, not vmap: one [N, D] copy at a time instead of C of them.
  directions = lax.map(direction, jnp.arange(num_classes))                 # [C, D]
  projection = jnp.sum((features - means[labels]) * directions[labels], axis=-1)
  return jnp.square(projection)


def spectral_signature_scores(features: ArrayLike, labels: ArrayLike, num_classes: int) -> Array:
  """Spectral-signature outlier scores (Tran et al. 2018), higher = more likely poison.

  For each class c with examples R_c: the mean r_c, the top right singular
  vector v_c of the centred matrix [r_i - r_c]_{i in R_c}, and
  score_i = ((r_i - r_c) . v_c)^2. The sign of v_c does not matter. A class
  with a single example scores 0; a class with no example is skipped.

  Works under `jit` and `vmap` (`num_classes` static).

  Args:
    features: [N, D] floating features of the training examples.
    labels: [N] integer labels in [0, num_classes) (the poisoned labels, as
      trained on).
    num_classes: number of classes.

  Returns:
    [N] float32 scores.

  Raises:
    ValueError: features not a finite float [N, D] array, or labels of the
      wrong shape, dtype or range.
  """
  _check_features(features, labels, num_classes)
  return _spectral_scores(jnp.asarray(features), jnp.asarray(labels), num_classes)


class SpectralSignatures(NamedTuple):
  """What `spectral_signatures` removes.

  Attributes:
    removed: sorted int64 indices of the removed examples.
    is_removed: [N] bool, True for the removed examples.
    scores: [N] float32 spectral scores (`spectral_signature_scores`).
    num_removed_per_class: [num_classes] int64, floor(removal_factor *
      expected_rate * n_c) for each class c of n_c examples.
  """
  removed: np.ndarray
  is_removed: np.ndarray
  scores: np.ndarray
  num_removed_per_class: np.ndarray


def spectral_signatures(features: ArrayLike, labels: ArrayLike, *, num_classes: int,
                        expected_rate: float, removal_factor: float = 1.5) -> SpectralSignatures:
  """Spectral-signature sanitisation (Tran, Li, Madry 2018).

  Removes, in every class of n_c examples, the floor(removal_factor *
  expected_rate * n_c) examples of highest `spectral_signature_scores` (ties
  broken by index). The paper removes 1.5 eps n_c with eps an upper bound on
  the poisoned fraction of the target class; the model is then retrained on
  the rest by the caller.

  Args:
    features: [N, D] features of the training set under the model trained on it.
    labels: [N] labels as trained on.
    num_classes: number of classes.
    expected_rate: the assumed (upper bound on the) poisoned fraction per
      class, in (0, 1).
    removal_factor: multiple of expected_rate to remove, > 0 (1.5 in the
      paper). Counts are capped at the class size.

  Returns:
    A `SpectralSignatures`.

  Raises:
    ValueError: bad features or labels, expected_rate outside (0, 1), or
      removal_factor not > 0.
  """
  check_in_open_interval(expected_rate, "expected_rate", 0.0, 1.0)
  check_positive(removal_factor, "removal_factor")
  scores = np.asarray(spectral_signature_scores(features, labels, num_classes))
  labels_np = np.asarray(labels).astype(np.int64)
  counts = np.bincount(labels_np, minlength=num_classes)
  # The 1e-9 keeps e.g. 1.5 * 0.1 * 100 = 15.000000000000002 and
  # 0.29 * 100 = 28.999999999999996 on the count they stand for.
  fraction = float(removal_factor) * float(expected_rate)
  num_removed = np.minimum(np.floor(fraction * counts + 1e-9).astype(np.int64), counts)
  # Sort by class, then by decreasing score (stable: ties keep index order).
  order = np.lexsort((-scores.astype(np.float64), labels_np))
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  rank_in_class = np.arange(labels_np.size) - starts[labels_np[order]]
  is_removed = np.zeros(labels_np.size, bool)
  is_removed[order] = rank_in_class < num_removed[labels_np[order]]
  return SpectralSignatures(removed=np.flatnonzero(is_removed).astype(np.int64),
                            is_removed=is_removed, scores=scores,
                            num_removed_per_class=num_removed)


# -------------------------------------------------------- activation clustering


def _pca(x: np.ndarray, num_components: int) -> np.ndarray:
  """Scores of centred `x` [n, d] on its top principal components, [n, k]."""
  centred = x - x.mean(axis=0)
  u, s, _ = np.linalg.svd(centred, full_matrices=False)
  return u[:, :num_components] * s[:num_components]


def _symmetric_decorrelation(w: np.ndarray) -> np.ndarray:
  """(W W^T)^(-1/2) W: the closest matrix with orthonormal rows."""
  eigenvalues, vectors = np.linalg.eigh(w @ w.T)
  eigenvalues = np.maximum(eigenvalues, np.finfo(np.float64).tiny)
  return (vectors * (1.0 / np.sqrt(eigenvalues))) @ vectors.T @ w


def _fast_ica(x: np.ndarray, num_components: int, rng: np.random.Generator, *,
              max_iterations: int = 1000, tolerance: float = 5e-3) -> np.ndarray:
  """Independent components of `x` [n, d], [n, k] with unit variance.

  Parallel FastICA with the logcosh contrast (G(u) = log cosh u, g = tanh)
  and symmetric decorrelation, after PCA whitening to k dimensions: the
  algorithm of Hyvarinen & Oja as scikit-learn's `FastICA` runs it (ART calls
  that with max_iter=1000, tol=0.005, the defaults here).
  """
  n = x.shape[0]
  centred = x - x.mean(axis=0)
  u, s, _ = np.linalg.svd(centred, full_matrices=False)
  # Directions without variance cannot be whitened: drop them.
  k = min(num_components, int(np.sum(s > s[0] * 1e-10)) if s.size and s[0] > 0 else 0)
  if k == 0:
    return np.zeros((n, 1))
  white = (u[:, :k] * math.sqrt(n)).T                  # [k, n]: unit variance, uncorrelated
  w = _symmetric_decorrelation(rng.normal(size=(k, k)))
  for _ in range(max_iterations):
    g = np.tanh(w @ white)
    g_prime = (1.0 - g ** 2).mean(axis=1)
    w_new = _symmetric_decorrelation(g @ white.T / n - g_prime[:, None] * w)
    # Converged when every new row is (up to sign) the old one.
    change = np.max(np.abs(np.abs(np.einsum("ij,ij->i", w_new, w)) - 1.0))
    w = w_new
    if change < tolerance:
      break
  return (w @ white).T


def _kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
  """Greedy k-means++ seeds (Arthur & Vassilvitskii 2007), as scikit-learn draws them.

  Each new centre is the best, by the potential it leaves, of 2 + ln(k)
  candidates drawn with probability proportional to the squared distance to
  the closest centre so far.
  """
  num_trials = 2 + int(math.log(k))
  centres = [x[rng.integers(x.shape[0])]]
  closest = np.sum((x - centres[0]) ** 2, axis=1)
  for _ in range(1, k):
    total = closest.sum()
    if total <= 0:  # every point on a centre already: any point will do
      candidates = rng.integers(x.shape[0], size=num_trials)
    else:
      candidates = rng.choice(x.shape[0], size=num_trials, p=closest / total)
    potentials = [np.minimum(closest, np.sum((x - x[i]) ** 2, axis=1)) for i in candidates]
    best = int(np.argmin([p.sum() for p in potentials]))
    centres.append(x[candidates[best]])
    closest = potentials[best]
  return np.stack(centres)


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, *, num_inits: int,
            max_iterations: int) -> np.ndarray:
  """Cluster assignments [n] of the best (lowest inertia) of num_inits k-means runs.

  Lloyd's algorithm from k-means++ seeds, as scikit-learn's `KMeans` (ART's
  default clusterer) runs it; an emptied cluster keeps its old centre.
  """
  best_assignment, best_inertia = np.zeros(x.shape[0], np.int64), np.inf
  for _ in range(num_inits):
    centres = _kmeans_plus_plus(x, k, rng)
    assignment = None
    for _ in range(max_iterations):
      distances = np.sum((x[:, None, :] - centres[None]) ** 2, axis=-1)     # [n, k]
      new_assignment = np.argmin(distances, axis=1)
      if assignment is not None and np.array_equal(new_assignment, assignment):
        break
      assignment = new_assignment
      for j in range(k):
        members = x[assignment == j]
        if members.size:
          centres[j] = members.mean(axis=0)
    inertia = float(np.sum((x - centres[assignment]) ** 2))
    if inertia < best_inertia:
      best_assignment, best_inertia = assignment, inertia
  return best_assignment


def _silhouette(x: np.ndarray, assignment: np.ndarray) -> float:
  """Mean silhouette coefficient (Rousseeuw 1987) of a 2-cluster assignment.

  s_i = (b_i - a_i) / max(a_i, b_i), a_i the mean distance to the other
  members of i's cluster, b_i the mean distance to the other cluster; 0 for
  a member of a singleton cluster (scikit-learn's convention). NaN when
  everything is in one cluster (the score is undefined).
  """
  sizes = np.bincount(assignment, minlength=2)
  if np.count_nonzero(sizes) < 2:
    return float("nan")
  sums = np.zeros((x.shape[0], 2))
  squared = np.sum(x ** 2, axis=1)
  for start in range(0, x.shape[0], _SILHOUETTE_CHUNK):
    rows = slice(start, start + _SILHOUETTE_CHUNK)
    d2 = squared[rows, None] + squared[None, :] - 2.0 * x[rows] @ x.T
    distances = np.sqrt(np.maximum(d2, 0.0))
    sums[rows, 0] = distances[:, assignment == 0].sum(axis=1)
    sums[rows, 1] = distances[:, assignment == 1].sum(axis=1)
  own = sizes[assignment]
  # The distance to oneself is zero but counts no member: divide by n_own - 1.
  a = sums[np.arange(x.shape[0]), assignment] / np.maximum(own - 1, 1)
  b = sums[np.arange(x.shape[0]), 1 - assignment] / sizes[1 - assignment]
  s = np.where(own > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-300), 0.0)
  return float(s.mean())


class ClassClustering(NamedTuple):
  """Activation clustering's statistics of one class.

  Attributes:
    label: the class.
    num_examples: its number of examples n_c.
    cluster_sizes: (smaller, larger) cluster sizes of the 2-means split.
    relative_size: smaller / n_c, in [0, 0.5].
    silhouette: mean silhouette coefficient of the split in the reduced
      space (NaN if undefined: fewer than 2 examples or one cluster).
    flagged: whether the smaller cluster was judged poison and removed.
  """
  label: int
  num_examples: int
  cluster_sizes: tuple[int, int]
  relative_size: float
  silhouette: float
  flagged: bool


class ActivationClustering(NamedTuple):
  """What `activation_clustering` removes.

  Attributes:
    removed: sorted int64 indices of the removed examples (the smaller
      cluster of every flagged class).
    is_removed: [N] bool.
    in_smaller_cluster: [N] bool, True for every example in its class's
      smaller cluster, flagged or not (for inspection and ROC-free scoring).
    per_class: one `ClassClustering` per class, in label order.
  """
  removed: np.ndarray
  is_removed: np.ndarray
  in_smaller_cluster: np.ndarray
  per_class: tuple[ClassClustering, ...]


def activation_clustering(features: ArrayLike, labels: ArrayLike, *, num_classes: int,
                          num_components: int = 10, reduction: str = "ica",
                          size_threshold: float = 0.35,
                          silhouette_threshold: Optional[float] = None,
                          num_inits: int = 10, max_iterations: int = 300,
                          seed: int = 0) -> ActivationClustering:
  """Activation clustering (Chen et al. 2019).

  For every class c: reduce its examples' features to
  min(num_components, D, n_c - 1) dimensions (`reduction` 'ica': FastICA, as
  the paper and ART; 'pca': the top principal-component scores), cluster the
  reduced features into two with k-means (`num_inits` k-means++ starts, the
  lowest inertia kept), and flag the smaller cluster as poison when its
  relative size is <= size_threshold and, if `silhouette_threshold` is given,
  the split's silhouette score is > silhouette_threshold. A clean class has
  no natural split: 2-means cuts it near the middle (relative size near 0.5,
  low silhouette). A class with fewer than 2 examples is never flagged.

  Args:
    features: [N, D] features of the training set under the model trained on it.
    labels: [N] labels as trained on.
    num_classes: number of classes.
    num_components: reduced dimension (10 in the paper), >= 1.
    reduction: 'ica' or 'pca'.
    size_threshold: largest relative size of a poison cluster, in (0, 0.5].
    silhouette_threshold: if set, the silhouette score a split must exceed
      as well (ART's 'silhouette-scores' analysis uses 0.1).
    num_inits: k-means restarts, >= 1.
    max_iterations: Lloyd iterations per restart, >= 1.
    seed: seeds class c's generator with (seed, c): results do not depend on
      the other classes.

  Returns:
    An `ActivationClustering`.

  Raises:
    ValueError: bad features, labels or settings.
  """
  _check_features(features, labels, num_classes)
  check_int_at_least(num_components, "num_components", 1)
  check_choice(reduction, "reduction", REDUCTIONS)
  if not (isinstance(size_threshold, (int, float)) and 0.0 < size_threshold <= 0.5):
    raise ValueError(f"size_threshold must lie in (0, 0.5] (the smaller of two clusters "
                     f"holds at most half a class), got {size_threshold!r}.")
  if silhouette_threshold is not None and not (
      isinstance(silhouette_threshold, (int, float)) and -1.0 <= silhouette_threshold < 1.0):
    raise ValueError(f"silhouette_threshold must be None or lie in [-1, 1), got "
                     f"{silhouette_threshold!r}.")
  check_int_at_least(num_inits, "num_inits", 1)
  check_int_at_least(max_iterations, "max_iterations", 1)
  check_int_at_least(seed, "seed", 0)
  x = np.asarray(features, np.float64)
  y = np.asarray(labels).astype(np.int64)
  in_smaller = np.zeros(y.size, bool)
  is_removed = np.zeros(y.size, bool)
  per_class = []
  for c in range(num_classes):
    members = np.flatnonzero(y == c)
    n = members.size
    if n < 2:
      per_class.append(ClassClustering(c, n, (0, n), 0.0, float("nan"), False))
      continue
    rng = np.random.default_rng([seed, c])
    k = min(num_components, x.shape[1], n - 1)
    reduce = _fast_ica if reduction == "ica" else (lambda v, k, _: _pca(v, k))
    reduced = reduce(x[members], k, rng)
    assignment = _kmeans(reduced, 2, rng, num_inits=num_inits, max_iterations=max_iterations)
    sizes = np.bincount(assignment, minlength=2)
    smaller = int(np.argmin(sizes))  # a tie picks cluster 0, at relative size 0.5
    relative = float(sizes[smaller] / n)
    silhouette = _silhouette(reduced, assignment)
    # An empty cluster (identical features) is no split at all.
    flagged = 0 < sizes[smaller] and relative <= size_threshold and (
        silhouette_threshold is None or (not math.isnan(silhouette)
                                         and silhouette > silhouette_threshold))
    in_smaller[members[assignment == smaller]] = True
    if flagged:
      is_removed[members[assignment == smaller]] = True
    per_class.append(ClassClustering(c, n, (int(sizes[smaller]), int(sizes[1 - smaller])),
                                     relative, silhouette, bool(flagged)))
  return ActivationClustering(removed=np.flatnonzero(is_removed).astype(np.int64),
                              is_removed=is_removed, in_smaller_cluster=in_smaller,
                              per_class=tuple(per_class))


# ------------------------------------------------------------------- metrics


def _poison_mask(poison_indices: Any, num_examples: int) -> np.ndarray:
  indices = np.asarray(poison_indices)
  if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer) or indices.size == 0:
    raise ValueError(f"poison_indices must be a non-empty rank-1 integer array of example "
                     f"indices; got {indices.dtype} {indices.shape}.")
  if indices.min() < 0 or indices.max() >= num_examples:
    raise ValueError(f"poison_indices must lie in [0, {num_examples - 1}] for num_examples="
                     f"{num_examples}; got values in [{indices.min()}, {indices.max()}].")
  mask = np.zeros(num_examples, bool)
  mask[indices] = True
  return mask


def detection_scores(removed_or_scores: ArrayLike, poison_indices: ArrayLike,
                     num_examples: int, *, num_flagged: Optional[int] = None,
                     fpr: float = 0.05) -> dict[str, Any]:
  """Precision and recall of a sanitisation defence against the known poison.

  `removed_or_scores` is one of:
    * integer indices of the removed examples (e.g. `result.removed`);
    * a bool [num_examples] mask of the removed examples;
    * floating [num_examples] scores, higher = more suspicious (e.g.
      `result.scores`): the flagged set is then the `num_flagged` highest
      scores (default: as many as there are poisoned examples, where
      precision equals recall), and the AUC (Pr[poison score > clean score]
      + Pr[tie] / 2, `membership.auc`) and the detection rate at `fpr`
      (`detectors.detection_metrics`, the clean examples setting the
      threshold) are added.

  precision = |flagged & poison| / |flagged| (0 when nothing is flagged);
  recall = |flagged & poison| / |poison|.

  Args:
    removed_or_scores: see above.
    poison_indices: non-empty integer indices of the poisoned examples.
    num_examples: size of the training set, N.
    num_flagged: with scores, how many top scores are flagged; >= 0.
    fpr: with scores, the false-positive rate of the detection rate, in (0, 1).

  Returns:
    {'precision', 'recall', 'num_flagged', 'num_poison', 'true_positives',
     'false_positives'}; with scores also {'auc', 'detection_rate',
     'detection_fpr', 'threshold'}.

  Raises:
    ValueError: indices outside [0, num_examples), duplicated removed
      indices, scores or masks of the wrong length, non-finite scores, or
      no clean example left for the AUC.
  """
  check_int_at_least(num_examples, "num_examples", 1)
  poison = _poison_mask(poison_indices, num_examples)
  values = np.asarray(removed_or_scores)
  if values.ndim != 1:
    raise ValueError(f"removed_or_scores must be rank 1 (indices, a mask or scores); got "
                     f"shape {values.shape}.")
  extra: dict[str, Any] = {}
  if values.dtype == np.bool_ or np.issubdtype(values.dtype, np.floating):
    if values.size != num_examples:
      what = "mask" if values.dtype == np.bool_ else "scores"
      raise ValueError(f"removed_or_scores as a {what} needs one value per example "
                       f"({num_examples}); got {values.size}.")
  if values.dtype == np.bool_:
    flagged = values
  elif np.issubdtype(values.dtype, np.floating):
    if poison.all():
      raise ValueError("scores need at least one clean example besides the poison for "
                       "the AUC; every example is in poison_indices.")
    scores = np.asarray(values, np.float64)
    metrics = detectors.detection_metrics(scores[~poison], scores[poison], fpr=fpr)
    count = int(poison.sum()) if num_flagged is None else check_int_at_least(
        num_flagged, "num_flagged", 0)
    flagged = np.zeros(num_examples, bool)
    flagged[np.argsort(-scores, kind="stable")[:count]] = True
    extra = {"auc": membership.auc(scores, poison),
             "detection_rate": metrics["detection_rate"],
             "detection_fpr": metrics["fpr"], "threshold": metrics["threshold"]}
  elif np.issubdtype(values.dtype, np.integer):
    if values.size and (values.min() < 0 or values.max() >= num_examples):
      raise ValueError(f"removed indices must lie in [0, {num_examples - 1}]; got values in "
                       f"[{values.min()}, {values.max()}].")
    if np.unique(values).size != values.size:
      raise ValueError("removed indices must be distinct; got repeated indices.")
    flagged = np.zeros(num_examples, bool)
    flagged[values] = True
  else:
    raise ValueError(f"removed_or_scores must hold integer indices, a bool mask or float "
                     f"scores; got dtype {values.dtype}.")
  true_positives = int(np.sum(flagged & poison))
  num_flagged_total = int(flagged.sum())
  return {
      "precision": true_positives / num_flagged_total if num_flagged_total else 0.0,
      "recall": true_positives / int(poison.sum()),
      "num_flagged": num_flagged_total,
      "num_poison": int(poison.sum()),
      "true_positives": true_positives,
      "false_positives": num_flagged_total - true_positives,
      **extra,
  }
