"""Data sanitisation: spectral signatures, activation clustering and their detection scores.

Oracles: a float64 NumPy SVD transcription of the spectral scores (Tran et
al.), a brute-force silhouette, synthetic features whose poison is known
(a shifted slice of one class), and hand-computed precision, recall and AUC.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from certjax.poisoning import sanitize


def _features(seed, n=1200, d=16, num_classes=3, poison_fraction=0.05, shift=4.0):
  """Gaussian features per class; `poison_fraction` of class 0 shifted along a direction."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, n).astype(np.int32)
  features = rng.normal(size=(n, d)) + 3.0 * rng.normal(size=(num_classes, d))[labels]
  class0 = np.flatnonzero(labels == 0)
  poison = class0[:int(round(poison_fraction * class0.size))]
  direction = rng.normal(size=d)
  features[poison] += shift * direction / np.linalg.norm(direction)
  return features.astype(np.float32), labels, poison


def _numpy_spectral_scores(features, labels, num_classes):
  scores = np.zeros(labels.size)
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if members.size == 0:
      continue
    centred = features[members].astype(np.float64) - features[members].mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    scores[members] = (centred @ vt[0]) ** 2
  return scores


# -------------------------------------------------------- spectral signatures


def test_spectral_scores_match_a_numpy_svd_transcription():
  features, labels, _ = _features(0, n=300, d=8)
  labels[7] = 3  # a class with a single example scores 0; class 4 is empty
  expected = _numpy_spectral_scores(features, labels, 5)
  scores = np.asarray(sanitize.spectral_signature_scores(features, labels, 5))
  assert scores[7] == 0.0
  np.testing.assert_allclose(scores, expected, rtol=2e-3, atol=1e-3 * expected.max())
  # Under jit and vmap (two models' features at once) too.
  jitted = jax.jit(sanitize.spectral_signature_scores, static_argnums=2)
  np.testing.assert_allclose(jitted(features, labels, 5), scores, rtol=1e-5, atol=1e-5)
  stacked = jax.vmap(sanitize.spectral_signature_scores, in_axes=(0, None, None))(
      jnp.stack([features, 2.0 * features]), labels, 5)
  np.testing.assert_allclose(stacked[1], 4.0 * scores, rtol=1e-3, atol=1e-3 * scores.max())


def test_spectral_signatures_remove_the_shifted_examples():
  features, labels, poison = _features(1)
  result = sanitize.spectral_signatures(features, labels, num_classes=3, expected_rate=0.05)
  counts = np.bincount(labels, minlength=3)
  np.testing.assert_array_equal(result.num_removed_per_class,
                                np.floor(1.5 * 0.05 * counts + 1e-9).astype(int))
  np.testing.assert_array_equal(np.bincount(labels[result.removed], minlength=3),
                                result.num_removed_per_class)
  np.testing.assert_array_equal(np.flatnonzero(result.is_removed), result.removed)
  metrics = sanitize.detection_scores(result.removed, poison, labels.size)
  assert metrics["recall"] > 0.8, metrics
  by_score = sanitize.detection_scores(result.scores, poison, labels.size)
  assert by_score["auc"] > 0.95, by_score
  # Within a class the removed are the highest scores.
  class0 = labels == 0
  kept_max = result.scores[class0 & ~result.is_removed].max()
  assert result.scores[class0 & result.is_removed].min() >= kept_max


def test_spectral_signatures_reject_bad_inputs():
  features, labels, _ = _features(2, n=60)
  with pytest.raises(ValueError, match="expected_rate must lie in the open interval"):
    sanitize.spectral_signatures(features, labels, num_classes=3, expected_rate=1.5)
  with pytest.raises(ValueError, match="features must have rank 2"):
    sanitize.spectral_signature_scores(features[:, :, None], labels, 3)
  with pytest.raises(ValueError, match=r"labels holds labels in \[0, 2\] but must lie in \[0, 1\]"):
    sanitize.spectral_signature_scores(features, labels, 2)
  bad = features.copy()
  bad[3, 1] = np.nan
  with pytest.raises(ValueError, match="1 NaN/Inf"):
    sanitize.spectral_signature_scores(bad, labels, 3)


# ------------------------------------------------------ activation clustering


def test_activation_clustering_flags_a_two_cluster_class_and_spares_a_gaussian_one():
  features, labels, poison = _features(3, n=900, d=12, num_classes=2, poison_fraction=0.15,
                                       shift=12.0)
  for reduction in sanitize.REDUCTIONS:
    result = sanitize.activation_clustering(features, labels, num_classes=2, reduction=reduction)
    poisoned, clean = result.per_class
    assert poisoned.flagged and not clean.flagged, result.per_class
    assert poisoned.relative_size <= 0.35 < clean.relative_size
    assert poisoned.silhouette > clean.silhouette
    assert sum(poisoned.cluster_sizes) == poisoned.num_examples == np.sum(labels == 0)
    metrics = sanitize.detection_scores(result.removed, poison, labels.size)
    assert metrics["precision"] > 0.95 and metrics["recall"] > 0.95, (reduction, metrics)
    assert not result.is_removed[labels == 1].any()
  # Deterministic in the seed.
  again = sanitize.activation_clustering(features, labels, num_classes=2)
  first = sanitize.activation_clustering(features, labels, num_classes=2)
  np.testing.assert_array_equal(again.removed, first.removed)
  # Demanding a silhouette above the poisoned class's own un-flags it.
  strict = sanitize.activation_clustering(
      features, labels, num_classes=2, silhouette_threshold=first.per_class[0].silhouette + 0.01)
  assert not strict.per_class[0].flagged and strict.removed.size == 0


def test_activation_clustering_reports_the_silhouette_of_its_split():
  # With PCA kept at full dimension the reduced space is a rotation of the
  # centred features: distances, hence the silhouette, are those of the features.
  rng = np.random.default_rng(4)
  features = np.concatenate([rng.normal(size=(40, 2)), rng.normal(size=(15, 2)) + [6.0, 0.0]])
  labels = np.zeros(55, np.int32)
  result = sanitize.activation_clustering(features.astype(np.float32), labels, num_classes=1,
                                          reduction="pca", num_components=2)
  (stats,) = result.per_class
  assigned = result.in_smaller_cluster
  assert stats.cluster_sizes == (15, 40) and assigned[40:].all() and not assigned[:40].any()
  distances = np.linalg.norm(features[:, None] - features[None], axis=-1)
  silhouettes = []
  for i in range(55):
    same = assigned == assigned[i]
    a = distances[i, same].sum() / (same.sum() - 1)
    b = distances[i, ~same].mean()
    silhouettes.append((b - a) / max(a, b))
  np.testing.assert_allclose(stats.silhouette, np.mean(silhouettes), rtol=1e-6)


def test_activation_clustering_rejects_bad_settings():
  features, labels, _ = _features(5, n=60)
  with pytest.raises(ValueError, match="Unknown reduction 'ika'.*Did you mean 'ica'"):
    sanitize.activation_clustering(features, labels, num_classes=3, reduction="ika")
  with pytest.raises(ValueError, match=r"size_threshold must lie in \(0, 0.5\]"):
    sanitize.activation_clustering(features, labels, num_classes=3, size_threshold=0.7)


# ------------------------------------------------------------------ metrics


def test_detection_scores_hand_example():
  poison = np.array([1, 3, 5])
  by_indices = sanitize.detection_scores(np.array([1, 2, 3]), poison, 10)
  assert by_indices == {"precision": 2 / 3, "recall": 2 / 3, "num_flagged": 3, "num_poison": 3,
                        "true_positives": 2, "false_positives": 1}
  mask = np.zeros(10, bool)
  mask[[1, 3, 5, 7]] = True
  by_mask = sanitize.detection_scores(mask, poison, 10)
  assert (by_mask["precision"], by_mask["recall"]) == (0.75, 1.0)
  assert sanitize.detection_scores(np.array([], np.int64), poison, 10)["precision"] == 0.0
  # Scores: poison 1, 3, 5 score 0.9, 0.5, 0.2; clean 0.8, 0.3 and five 0.1.
  scores = np.full(10, 0.1)
  scores[[1, 3, 5, 0, 2]] = [0.9, 0.5, 0.2, 0.8, 0.3]
  by_scores = sanitize.detection_scores(scores, poison, 10)
  # The top 3 are 0.9 (poison), 0.8 (clean), 0.5 (poison).
  assert (by_scores["precision"], by_scores["recall"]) == (2 / 3, 2 / 3)
  # Poison beats clean in 7 + 6 + 5 of the 3 x 7 pairs.
  assert by_scores["auc"] == pytest.approx(18 / 21)
  top5 = sanitize.detection_scores(scores, poison, 10, num_flagged=5)
  assert (top5["precision"], top5["recall"]) == (0.6, 1.0)


def test_detection_scores_reject_bad_inputs():
  with pytest.raises(ValueError, match=r"poison_indices must lie in \[0, 9\]"):
    sanitize.detection_scores(np.array([1]), np.array([10]), 10)
  with pytest.raises(ValueError, match="removed indices must be distinct"):
    sanitize.detection_scores(np.array([1, 1]), np.array([1]), 10)
  with pytest.raises(ValueError, match=r"needs one value per example \(10\); got 4"):
    sanitize.detection_scores(np.zeros(4), np.array([1]), 10)
  with pytest.raises(ValueError, match="non-empty rank-1 integer array"):
    sanitize.detection_scores(np.array([1]), np.array([], np.int64), 10)
