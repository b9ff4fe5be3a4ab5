"""Tests of certjax.privacy.membership against independent oracles.

Oracles: the Mann-Whitney U statistic (scipy, and a pairwise count) for AUC;
hand-built ROCs for TPR at FPR and balanced accuracy; a float64 NumPy
transcription of the scaled logit; float64 SciPy transcriptions of the
official LiRA `plot.py` (`generate_ours`, `generate_ours_offline`) and of
`ml_privacy_meter`'s RMIA; and synthetic logits with a planted membership
signal (and without one).
"""

import jax
import numpy as np
import pytest
import scipy.stats

from certjax.privacy import membership as mia

# ------------------------------------------------------------------ metrics

# Scores in decreasing order; members at 0.9, 0.8, 0.6, 0.3 (4 members, 6 non-members).
HAND_SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
HAND_MEMBERS = np.array([1, 1, 0, 1, 0, 0, 1, 0, 0, 0], bool)


def test_roc_hand_case_and_endpoints():
  fpr, tpr, thresholds = mia.roc_curve(HAND_SCORES, HAND_MEMBERS)
  np.testing.assert_allclose(fpr, np.array([0, 0, 0, 1, 1, 2, 3, 3, 4, 5, 6]) / 6)
  np.testing.assert_allclose(tpr, np.array([0, 1, 2, 2, 3, 3, 3, 4, 4, 4, 4]) / 4)
  assert thresholds[0] == np.inf and thresholds[-1] == 0.0


def test_tpr_at_fpr_hand_case():
  assert mia.tpr_at_fpr(HAND_SCORES, HAND_MEMBERS, 0.1) == 0.5
  # FPR 1/6 is reached exactly: <= takes that point, plot.py's < does not.
  assert mia.tpr_at_fpr(HAND_SCORES, HAND_MEMBERS, 1 / 6) == 0.75
  assert mia.tpr_at_fpr(HAND_SCORES, HAND_MEMBERS, 1 / 6, strict=True) == 0.5
  assert mia.tpr_at_fpr(HAND_SCORES, HAND_MEMBERS, 0.5) == 1.0


def test_balanced_accuracy_and_auc_hand_case():
  # Best threshold 0.6: TPR 3/4, FPR 1/6 -> (3/4 + 5/6) / 2 = 19/24.
  assert mia.balanced_accuracy(HAND_SCORES, HAND_MEMBERS) == pytest.approx(19 / 24)
  # Non-members below each member: 6 + 6 + 5 + 3 = 20 of 24 pairs.
  assert mia.auc(HAND_SCORES, HAND_MEMBERS) == pytest.approx(20 / 24)


def test_auc_equals_mann_whitney_with_ties():
  rng = np.random.default_rng(0)
  is_member = rng.random(300) < 0.4
  # Few distinct values: many ties within and across the two groups.
  scores = rng.integers(0, 12, 300) + 2 * is_member
  members, others = scores[is_member], scores[~is_member]
  u = scipy.stats.mannwhitneyu(members, others, alternative="two-sided").statistic
  pairwise = (np.sum(members[:, None] > others[None])
              + 0.5 * np.sum(members[:, None] == others[None]))
  expected = u / (members.size * others.size)
  assert pairwise / (members.size * others.size) == pytest.approx(expected)
  assert mia.auc(scores.astype(float), is_member) == pytest.approx(expected, abs=1e-12)
  fpr, tpr, _ = mia.roc_curve(scores, is_member)
  assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
  assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
  assert fpr.size == np.unique(scores).size + 1  # one point per distinct score


def test_summarize_keys_and_counts():
  summary = mia.summarize(HAND_SCORES, HAND_MEMBERS)
  assert summary["num_members"] == 4 and summary["num_nonmembers"] == 6
  assert summary["tpr_at_fpr_0.001"] == 0.5 and summary["tpr_at_fpr_0.01"] == 0.5
  assert summary["auc"] == pytest.approx(20 / 24)


@pytest.mark.parametrize("fpr", [0.0, 1.0, -0.1, 1.5])
def test_fpr_outside_open_interval(fpr):
  with pytest.raises(ValueError, match=r"fpr must lie in the open interval \(0.0, 1.0\)"):
    mia.tpr_at_fpr(HAND_SCORES, HAND_MEMBERS, fpr)
  with pytest.raises(ValueError, match="open interval"):
    mia.summarize(HAND_SCORES, HAND_MEMBERS, fprs=(0.01, fpr))


def test_metric_input_errors():
  with pytest.raises(ValueError, match="both members and non-members"):
    mia.auc(HAND_SCORES, np.ones(10, bool))
  with pytest.raises(ValueError, match="is_member must be a bool array"):
    mia.auc(HAND_SCORES, HAND_MEMBERS.astype(int))
  with pytest.raises(ValueError, match="scores must be finite"):
    mia.auc(np.where(HAND_MEMBERS, np.nan, 0.0), HAND_MEMBERS)


# ------------------------------------------------------------- scaled logit


def _scaled_logit_oracle(logits, labels):
  """float64: z_y - log(sum_{y' != y} exp z_y') by np.logaddexp.reduce over the others."""
  logits = np.asarray(logits, np.float64)
  out = np.empty(logits.shape[:-1])
  for index in np.ndindex(*logits.shape[:-1]):
    row = logits[index]
    y = labels[index[0]]
    out[index] = row[y] - np.logaddexp.reduce(np.delete(row, y))
  return out


def test_scaled_logit_matches_float64_transcription_with_extreme_logits():
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 5, (6, 3, 4))
  logits[0, 0] = [1000.0, -1000.0, 0.0, 3.0]     # p_y -> 1: 1 - p_y underflows in float64
  logits[1, 0] = [-1000.0, 1000.0, 999.0, -5.0]  # p_y -> 0
  logits[2, 1] = [80.0, 80.0, 80.0, 80.0]        # ties
  labels = np.array([0, 2, 1, 3, 0, 1])
  expected = _scaled_logit_oracle(logits, labels)
  assert np.all(np.isfinite(expected))
  got64 = mia._scaled_logit_host(logits, labels[:, None])  # the float64 path score() uses
  np.testing.assert_allclose(got64, expected, rtol=1e-12, atol=1e-9)
  got32 = np.asarray(mia.scaled_logit(logits.astype(np.float32), labels[:, None]))
  assert np.all(np.isfinite(got32))
  np.testing.assert_allclose(got32, expected, rtol=1e-5, atol=1e-3)
  # The official score.py formula (float64 probabilities, 1e-45 floor) agrees on moderate logits.
  moderate = logits[3:]
  p = np.exp(moderate - moderate.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  index = np.broadcast_to(labels[3:, None, None], p.shape[:-1] + (1,))
  y_true = np.take_along_axis(p, index, -1)[..., 0]
  official = np.log(y_true + 1e-45) - np.log(p.sum(-1) - y_true + 1e-45)
  np.testing.assert_allclose(got64[3:], official, rtol=1e-9, atol=1e-9)


def test_scaled_logit_under_jit_and_shape_errors():
  logits = np.random.default_rng(2).normal(size=(5, 2, 3)).astype(np.float32)
  labels = np.array([0, 1, 2, 0, 1])
  jitted = jax.jit(mia.scaled_logit)(logits, labels[:, None])
  np.testing.assert_allclose(jitted, _scaled_logit_oracle(logits, labels), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="do not broadcast"):
    mia.scaled_logit(logits, labels[:4, None])
  with pytest.raises(ValueError, match=">= 2 classes"):
    mia.scaled_logit(logits[..., :1], labels[:, None])


# -------------------------------------------------------------------- LiRA


def _official_online(keep, scores, check_scores, fix_variance):
  """plot.py generate_ours (in_size = out_size = the smallest count), minus its sign flip."""
  dat_in = [scores[keep[:, j], j, :] for j in range(scores.shape[1])]
  dat_out = [scores[~keep[:, j], j, :] for j in range(scores.shape[1])]
  in_size = min(map(len, dat_in))
  out_size = min(map(len, dat_out))
  dat_in = np.array([x[:in_size] for x in dat_in])
  dat_out = np.array([x[:out_size] for x in dat_out])
  mean_in, mean_out = np.median(dat_in, 1), np.median(dat_out, 1)
  if fix_variance:
    std_in = std_out = np.std(dat_in)
  else:
    std_in, std_out = np.std(dat_in, 1), np.std(dat_out, 1)
  pr_in = -scipy.stats.norm.logpdf(check_scores, mean_in, std_in + 1e-30)
  pr_out = -scipy.stats.norm.logpdf(check_scores, mean_out, std_out + 1e-30)
  return -(pr_in - pr_out).mean(1)  # sweep() ranks by -prediction


def _official_offline(keep, scores, check_scores, fix_variance):
  dat_out = [scores[~keep[:, j], j, :] for j in range(scores.shape[1])]
  out_size = min(map(len, dat_out))
  dat_out = np.array([x[:out_size] for x in dat_out])
  mean_out = np.median(dat_out, 1)
  std_out = np.std(dat_out) if fix_variance else np.std(dat_out, 1)
  return -scipy.stats.norm.logpdf(check_scores, mean_out, std_out + 1e-30).mean(1)


def _per_example_online(keep, scores, check_scores, fix_variance):
  """All IN/OUT models of each example (no truncation), one example at a time."""
  all_in = scores.transpose(1, 0, 2)[keep.T]
  out = []
  for j in range(scores.shape[1]):
    sin, sout = scores[keep[:, j], j], scores[~keep[:, j], j]
    std_in = np.std(all_in) if fix_variance else np.std(sin, 0)
    std_out = std_in if fix_variance else np.std(sout, 0)
    log_in = scipy.stats.norm.logpdf(check_scores[j], np.median(sin, 0), std_in + 1e-30)
    log_out = scipy.stats.norm.logpdf(check_scores[j], np.median(sout, 0), std_out + 1e-30)
    out.append(np.mean(log_in - log_out))
  return np.array(out)


@pytest.fixture(scope="module")
def random_stats():
  rng = np.random.default_rng(3)
  k, n, a = 9, 40, 3
  keep = rng.random((k, n)) < 0.5
  keep[:3] = True  # every example has >= 3 IN and >= 3 OUT models
  keep[3:6] = False
  scores = rng.normal(0, 2, (k, n, a)) + 3 * keep[..., None]
  target = rng.normal(1, 2, (n, a))
  return keep, scores, target


@pytest.mark.parametrize("fixed", [False, True])
def test_lira_equals_official_plot_py(random_stats, fixed):
  keep, scores, target = random_stats
  online = mia.lira_online_scores(target, scores, keep, fixed_variance=fixed, equal_counts=True)
  np.testing.assert_allclose(online, _official_online(keep, scores, target, fixed), rtol=1e-10)
  offline = mia.lira_offline_scores(target, scores, keep, fixed_variance=fixed, equal_counts=True)
  np.testing.assert_allclose(offline, _official_offline(keep, scores, target, fixed), rtol=1e-10)
  # Without truncation: every example's own models.
  untruncated = mia.lira_online_scores(target, scores, keep, fixed_variance=fixed)
  np.testing.assert_allclose(untruncated, _per_example_online(keep, scores, target, fixed),
                             rtol=1e-10)


def test_lira_offline_one_sided(random_stats):
  keep, scores, target = random_stats
  got = mia.lira_offline_scores(target, scores, keep, offline_test="one_sided")
  expected = [np.mean(-scipy.stats.norm.logsf(target[j], np.median(scores[~keep[:, j], j], 0),
                                              np.std(scores[~keep[:, j], j], 0) + 1e-30))
              for j in range(target.shape[0])]
  np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_lira_equal_counts_is_a_no_op_on_balanced_masks():
  # LiRA's train.py masks: every example in exactly half the models.
  rng = np.random.default_rng(4)
  keep = rng.random((8, 30)).argsort(0) < 4
  scores, target = rng.normal(size=(8, 30, 2)), rng.normal(size=(30, 2))
  for fixed in (False, True):
    np.testing.assert_allclose(
        mia.lira_online_scores(target, scores, keep, fixed_variance=fixed),
        mia.lira_online_scores(target, scores, keep, fixed_variance=fixed, equal_counts=True))


# -------------------------------------------------------------------- RMIA


def test_rmia_equals_ml_privacy_meter_transcription():
  rng = np.random.default_rng(5)
  k, n, z = 4, 50, 80
  p_target, p_ref = rng.uniform(0.05, 1, n), rng.uniform(0.05, 1, (n, k))
  pz_target, pz_ref = rng.uniform(0.05, 1, z), rng.uniform(0.05, 1, (z, k))
  # Population copies of ten candidates: LR exactly 1, which "> gamma = 1" must not count.
  pz_target[:10], pz_ref[:10] = p_target[:10], p_ref[:10]
  for a in (0.0, 0.3, 1.0):
    # ml_privacy_meter run_rmia with every reference model OUT for every x.
    mean_x = (1 + a) / 2 * p_ref.mean(1) + (1 - a) / 2
    mean_z = (1 + a) / 2 * pz_ref.mean(1) + (1 - a) / 2
    ratios = (p_target / mean_x)[:, None] / (pz_target / mean_z)
    for gamma in (1.0, 2.0):
      expected = np.average(ratios > gamma, axis=1)
      got = mia.rmia_scores(np.log(p_target)[:, None], np.log(p_ref.T)[..., None],
                            np.log(pz_target)[:, None], np.log(pz_ref.T)[..., None], online=False,
                            reference_masks=np.zeros((k, n), bool), gamma=gamma, offline_a=a)
      np.testing.assert_array_equal(got, expected)
  # Online: Pr(x) and Pr(z) the plain mean over the reference models (the paper; LeakPro).
  ratios = (p_target / p_ref.mean(1))[:, None] / (pz_target / pz_ref.mean(1))
  got = mia.rmia_scores(np.log(p_target)[:, None], np.log(p_ref.T)[..., None],
                        np.log(pz_target)[:, None], np.log(pz_ref.T)[..., None], online=True)
  np.testing.assert_array_equal(got, np.average(ratios > 1.0, axis=1))


def test_rmia_offline_uses_out_models_only_and_averages_queries():
  rng = np.random.default_rng(6)
  k, n, z, a_queries = 3, 20, 30, 2
  masks = rng.random((k, n)) < 0.4
  masks[0] = False
  log_p = np.log(rng.uniform(0.05, 1, (n, a_queries)))
  log_ref = np.log(rng.uniform(0.05, 1, (k, n, a_queries)))
  log_pz = np.log(rng.uniform(0.05, 1, (z, a_queries)))
  log_ref_z = np.log(rng.uniform(0.05, 1, (k, z, a_queries)))
  got = mia.rmia_scores(log_p, log_ref, log_pz, log_ref_z, online=False, reference_masks=masks,
                        offline_a=0.5, gamma=1.5)
  for j in range(n):
    per_query = []
    for q in range(a_queries):
      mean_out = np.exp(log_ref[~masks[:, j], j, q]).mean()
      px = (1.5 * mean_out + 0.5) / 2
      pz = (1.5 * np.exp(log_ref_z[:, :, q]).mean(0) + 0.5) / 2
      lr = (np.exp(log_p[j, q]) / px) / (np.exp(log_pz[:, q]) / pz)
      per_query.append(np.mean(lr > 1.5))
    assert got[j] == pytest.approx(np.mean(per_query))


# ------------------------------------------------------- planted signal


def _synthetic(seed, shift, k=16, n=1000, z=400, a=2, c=10, class_spread=0.0):
  """Logits whose true-class logit is a per-example difficulty, + `shift` where trained on.

  With class_spread > 0 the difficulty is mostly the class's (class_spread * label).
  """
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, c, n)
  population_labels = rng.integers(0, c, z)
  spread = 0.3 if class_spread else 2.0
  difficulty = rng.normal(2.0, spread, n) + class_spread * labels
  population_difficulty = rng.normal(2.0, spread, z) + class_spread * population_labels
  masks = rng.random((k + 1, n)) < 0.5  # row 0 is the target model

  def logits(trained, difficulty, labels):
    out = rng.normal(0, 1, trained.shape + (a, c))
    boost = difficulty[None, :, None] + shift * trained[..., None] + 0.3 * rng.normal(
        size=trained.shape + (a,))
    out += boost[..., None] * (np.arange(c) == labels[None, :, None, None])
    return out.astype(np.float32)

  all_logits = logits(masks, difficulty, labels)
  population = logits(np.zeros((k + 1, z), bool), population_difficulty, population_labels)
  inputs = mia.MembershipInputs(
      target_logits=all_logits[0], labels=labels, shadow_logits=all_logits[1:],
      shadow_masks=masks[1:], population_target_logits=population[0],
      population_shadow_logits=population[1:], population_labels=population_labels)
  return inputs, masks[0]


@pytest.fixture(scope="module")
def planted():
  return _synthetic(seed=7, shift=1.5)


@pytest.mark.parametrize("attack", ["lira_online", "lira_online_fixed", "lira_offline",
                                    "lira_offline_fixed", "rmia_online", "rmia_offline"])
def test_planted_signal_is_found(planted, attack):
  inputs, is_member = planted
  scores = mia.score(attack, inputs)
  assert scores.shape == (inputs.num_examples,) and np.all(np.isfinite(scores))
  assert mia.auc(scores, is_member) > 0.75, attack


def test_planted_signal_shokri(planted):
  inputs, is_member = planted
  scores = mia.score("shokri", inputs, key=jax.random.key(0), num_steps=300)
  assert mia.auc(scores, is_member) > 0.6


@pytest.mark.parametrize("calibration", ["best_accuracy", "member_mean"])
def test_classwise_thresholds_remove_class_difficulty(calibration):
  inputs, is_member = _synthetic(seed=9, shift=1.0, k=2, class_spread=1.5)
  global_auc = mia.auc(mia.score("loss", inputs), is_member)
  classwise = mia.score("loss_classwise", inputs, calibration=calibration)
  assert mia.auc(classwise, is_member) > global_auc + 0.1


def test_calibrated_attacks_beat_the_global_threshold(planted):
  # The per-example difficulty hides the shift from one global threshold; LiRA calibrates it away.
  inputs, is_member = planted
  global_auc = mia.auc(mia.score("loss", inputs), is_member)
  assert 0.55 < global_auc < mia.auc(mia.score("lira_online", inputs), is_member) - 0.1
  # loss, confidence and the mean scaled logit rank (nearly) alike on one query.
  assert mia.auc(mia.score("confidence", inputs), is_member) == pytest.approx(global_auc)


def test_null_input_gives_chance_auc():
  inputs, is_member = _synthetic(seed=8, shift=0.0, k=1, n=4000, z=10, a=1)
  # The AUC's null std is sqrt((n + 1) / (12 n1 n0)) ~ 0.009 here.
  assert abs(mia.auc(mia.score("loss", inputs), is_member) - 0.5) < 0.04
  assert abs(mia.auc(mia.score("global_threshold", inputs), is_member) - 0.5) < 0.04


# ------------------------------------------------------------- label-only


def test_label_only_scores_count_correct_queries():
  images = np.full((4, 6, 6, 1), 0.5, np.float32)
  images[:2, 2:4, 2:4] = 1.0  # a bright centre: labelled 1 while the centre survives
  labels = np.array([1, 0, 0, 1])

  def label_fn(x):
    return (np.asarray(x)[:, 2:4, 2:4, 0].mean(axis=(1, 2)) > 0.75).astype(np.int32)

  scores = mia.label_only_scores(jax.random.key(0), label_fn, images, labels, num_queries=20,
                                 noise_std=0.02)
  np.testing.assert_array_equal(scores, [1.0, 0.0, 1.0, 0.0])
  shifted = mia.label_only_scores(jax.random.key(1), label_fn, images, labels, num_queries=50,
                                  noise_std=0.0, max_translation=2)
  assert 0.0 < shifted[0] < 1.0 and shifted[2] == 1.0  # shifts move the centre out, sometimes


def test_label_only_errors():
  images = np.zeros((2, 4, 4, 1), np.float32)
  labels = np.array([0, 1])
  with pytest.raises(ValueError, match="needs a perturbation"):
    mia.label_only_scores(jax.random.key(0), lambda x: labels, images, labels, num_queries=2,
                          noise_std=0.0)
  with pytest.raises(ValueError, match="label_fn must return 2 integer labels"):
    mia.label_only_scores(jax.random.key(0), lambda x: np.zeros(3, int), images, labels,
                          num_queries=1)


# ------------------------------------------------------------------ errors


def test_wrong_mask_shape_and_dtype(planted):
  inputs, _ = planted
  fields = {"target_logits": inputs.target_logits, "labels": inputs.labels,
            "shadow_logits": inputs.shadow_logits}
  with pytest.raises(ValueError, match=r"shadow_masks must have shape \(K, N\) = \(16, 1000\)"):
    mia.MembershipInputs(**fields, shadow_masks=np.asarray(inputs.shadow_masks).T)
  with pytest.raises(ValueError, match="shadow_masks must be a bool array"):
    mia.MembershipInputs(**fields, shadow_masks=np.asarray(inputs.shadow_masks).astype(int))
  with pytest.raises(ValueError, match="labels holds labels in"):
    mia.MembershipInputs(inputs.target_logits, np.full(1000, 10))
  with pytest.raises(ValueError, match=r"shadow_logits must have shape \(K >= 1, 1000, 2, 10\)"):
    mia.MembershipInputs(inputs.target_logits, inputs.labels, inputs.shadow_logits[:, :, :1])


def test_too_few_shadow_models(planted):
  inputs, _ = planted
  few = mia.MembershipInputs(inputs.target_logits, inputs.labels, inputs.shadow_logits[:3],
                             inputs.shadow_masks[:3])
  assert mia.required_shadow_models("lira_online") == 4
  with pytest.raises(ValueError, match="'lira_online' needs >= 4 shadow models.*_fixed"):
    mia.score("lira_online", few)
  with pytest.raises(ValueError, match="'lira_offline_fixed' needs shadow_masks"):
    mia.score("lira_offline_fixed", mia.MembershipInputs(inputs.target_logits, inputs.labels,
                                                         inputs.shadow_logits[:3]))
  with pytest.raises(ValueError, match="population"):
    mia.score("rmia_offline", few)
  # Enough models in all, but one example never OUT of them: a clear per-example error.
  masks = np.asarray(inputs.shadow_masks).copy()
  masks[:, 5] = True
  one_sided = mia.MembershipInputs(inputs.target_logits, inputs.labels, inputs.shadow_logits, masks)
  with pytest.raises(ValueError, match="example 5 has 0"):
    mia.score("lira_offline", one_sided)


def test_unknown_attack_and_settings(planted):
  inputs, _ = planted
  with pytest.raises(ValueError, match="Unknown attack 'lira'"):
    mia.score("lira", inputs)
  with pytest.raises(ValueError, match="Did you mean 'gamma'"):
    mia.score("rmia_online", inputs, gama=2.0)
  with pytest.raises(ValueError, match="pass key="):
    mia.score("shokri", inputs)
  with pytest.raises(ValueError, match="key must be a JAX PRNG key"):
    mia.score("shokri", inputs, key=0)
  with pytest.raises(ValueError, match="offline_a must be a number in"):
    mia.score("rmia_offline", inputs, offline_a=1.5)
