"""The 'membership' evaluator on a many-models workdir: files, re-scoring from the
cached logits, augmented queries, and bad input."""

import numpy as np
import pytest

from certjax import evaluation
from certjax.evaluation import membership as membership_eval
from certjax.privacy import membership as membership_lib
from certjax.training import train as train_lib
from tests.conftest import smoke_config, trained_run


@pytest.fixture(scope="module")
def evaluated():
  workdir, _ = trained_run("membership")
  config = smoke_config("membership")
  return workdir, evaluation.evaluate_workdir(config, workdir, "membership", verbose=False)


def test_results_files_and_metrics(evaluated):
  workdir, result = evaluated
  assert set(result.artifacts) == {"json", "md", "png", "logits"}
  saved = membership_eval.read_results(workdir)
  attacks = [row["attack"] for row in saved["results"]]
  assert attacks == [*membership_lib.ATTACKS, "label_only"]
  # Label-only: 4 counted label queries per candidate and target.
  assert saved["label_only_queries_used"] == 4 * 1000 * 2
  # 2 targets in turn, 1,000 candidates each: every score pooled once.
  assert saved["num_scored"] == 2000 and 0 < saved["num_members"] < 2000
  for row in saved["results"]:
    assert 0.0 <= row["auc"] <= 1.0 and set(row["tpr"]) == {"0.001", "0.01"}
  # An overfit target: members are fit better than held-out examples, and the
  # best attack sees it.
  assert result.metrics["train_accuracy"] > result.metrics["heldout_accuracy"]
  assert max(row["auc"] for row in saved["results"]) > 0.55
  assert "| lira_online_fixed |" in result.table


def test_cached_logits_rescore_to_the_same_numbers(evaluated):
  # What a user does with logits.npz: score them elsewhere, through the same
  # interface, and get the evaluator's scores for target 0.
  workdir, result = evaluated
  cached = membership_eval.read_logits(workdir)
  logits, masks, labels = cached["logits"], cached["masks"], cached["labels"]
  assert logits.shape[:2] == masks.shape and logits.shape[1] == len(labels)
  inputs = membership_lib.MembershipInputs(
      target_logits=logits[0], labels=labels, shadow_logits=logits[1:], shadow_masks=masks[1:])
  for attack in ("loss", "lira_online_fixed"):
    np.testing.assert_allclose(membership_lib.score(attack, inputs),
                               result.details["scores"][attack][:len(labels)], rtol=1e-12)
  np.testing.assert_array_equal(result.details["is_member"][:len(labels)], masks[0])


def test_augmented_queries():
  x = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 1) + 1
  shift = membership_eval.augmented_queries(x, "shift")
  assert shift.shape == (5, 2, 3, 3, 1)
  np.testing.assert_array_equal(shift[0], x)
  np.testing.assert_array_equal(shift[1][:, 1:], x[:, :-1])   # down one row ...
  assert (shift[1][:, 0] == 0).all()                           # ... zero-filled
  both = membership_eval.augmented_queries(x, "flip_shift")
  assert both.shape == (10, 2, 3, 3, 1)
  np.testing.assert_array_equal(both[5], x[:, :, ::-1])


@pytest.mark.parametrize("overrides, message", [
    ({"membership.num_targets": 9}, "exceeds the 8 models"),
    ({"membership.num_shadows": 8}, "exceeds the 7 other models"),
    ({"membership.num_shadows": 2}, "fewer than the 4 shadow models"),
    ({"membership.fprs": (1.5,)}, r"membership.fprs"),
    ({"membership.attacks": ("lira",)}, "membership.attacks"),
])
def test_bad_settings_are_clear_errors(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    train_lib.train_and_evaluate(smoke_config("membership", overrides=overrides),
                                 str(tmp_path))


def test_membership_is_not_an_evaluation_during_training(tmp_path):
  with pytest.raises(ValueError, match="evaluates the models of a many-models run"):
    train_lib.train_and_evaluate(
        smoke_config("mnist5k", overrides={"evals": {"mia": {"type": "membership"}}}),
        str(tmp_path))


def test_single_model_workdir_is_refused():
  workdir, _ = trained_run("mnist5k")
  with pytest.raises(FileNotFoundError, match="num_models > 1"):
    evaluation.evaluate_workdir(smoke_config("membership"), workdir, "membership",
                                verbose=False)
