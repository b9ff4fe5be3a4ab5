"""The poisoning stage of training (config.poison) and the 'backdoor' evaluator."""

import os

import numpy as np
import pytest

from certjax import data as data_lib
from certjax import evaluation
from certjax import runs
from certjax.evaluation import backdoor as backdoor_eval
from certjax.evaluation import common
from certjax.evaluation.registry import EvalData
from certjax.poisoning import triggers
from certjax.runs import poison as poison_files
from certjax.training import train as train_lib
from tests.conftest import smoke_config, trained_run


def test_the_recorded_poison_is_what_the_model_trained_on_and_is_evaluated():
  workdir, _ = trained_run("backdoor", "badnets")
  config = smoke_config("backdoor", "badnets")
  record = poison_files.read_record(workdir)
  clean_x, clean_y = data_lib.load_split_uint8(config.data, "train")
  assert len(record.indices) == round(0.1 * len(clean_y)) and record.poisoned.all()
  assert (clean_y[record.indices] != 0).all() and (record.labels == 0).all()
  np.testing.assert_array_equal(record.original_labels, clean_y[record.indices])
  # The trigger stamps the bottom-right corner and nothing else.
  changed = np.any(record.images != clean_x[record.indices], axis=(0, 3))
  assert changed[-3:, -3:].any() and not changed[:-3].any() and not changed[:, :-3].any()
  # The workdir's config trains on the record.
  trained_config = runs.read_config(workdir)
  x_seen, y_seen = data_lib.load_split_uint8(trained_config.data, "train")
  np.testing.assert_array_equal(x_seen[record.indices], record.images)
  np.testing.assert_array_equal(y_seen[record.indices], record.labels)
  # CA and ASR against a direct computation with the recorded trigger.
  config.backdoor.defences = ("spectral", "strip")
  result = evaluation.evaluate_workdir(config, workdir, "backdoor", verbose=False)
  logits_fn = runs.restore_model(workdir).logits_fn()
  data = EvalData.from_config(config.data, "test", int(config.skip), int(config.max))
  x, y = common.load_all(data)
  assert result.metrics["clean_accuracy"] == np.mean(np.argmax(logits_fn(x), -1) == y)
  others = x[y != 0]
  expected_asr = np.mean(np.argmax(logits_fn(triggers.apply_trigger(record.trigger, others)),
                                   -1) == 0)
  assert result.metrics["asr"] == pytest.approx(expected_asr)
  spectral = result.details["defences"]["spectral"]
  assert 0.0 <= spectral["precision"] <= 1.0 and 0.0 <= spectral["auc"] <= 1.0
  assert 0.0 <= result.details["defences"]["strip"]["far"] <= 1.0
  assert set(result.artifacts) == {"json", "md", "png"}
  # What spectral signatures removed is a data.exclude_file for retraining.
  removed = np.load(os.path.join(workdir, "backdoor", "removed_spectral.npy"))
  assert len(removed) == spectral["num_removed"]
  kept = data_lib.load_split_uint8({**trained_config.data.to_dict(),
                                    "exclude_file": os.path.join(workdir, "backdoor",
                                                                 "removed_spectral.npy")},
                                   "train")[1]
  assert len(kept) == len(clean_y) - len(removed)
  assert backdoor_eval.read_results(workdir)["result"]["attack"] == "badnets"


def test_a_resumed_run_reads_its_record_and_refuses_other_settings():
  workdir, _ = trained_run("backdoor", "badnets")
  before = poison_files.read_record(workdir).summary["record_sha256"]
  train_lib.train_and_evaluate(smoke_config("backdoor", "badnets"), workdir)
  assert poison_files.read_record(workdir).summary["record_sha256"] == before
  with pytest.raises(ValueError, match="other settings"):
    train_lib.train_and_evaluate(smoke_config("backdoor", "badnets",
                                              {"poison.rate": 0.2}), workdir)


@pytest.mark.parametrize("overrides, error, match", [
    ({"poison.rate": 1.5}, ValueError, "rate"),
    ({"poison.target_class": 10}, ValueError, "target_class"),
    ({"poison.trigger_kwargs": {"size": 40}}, ValueError, "larger|fit|size"),
    ({"poison.attack": "clean_label"}, ValueError, "surrogate_workdir"),
    ({"poison.attack": "sleeper"}, ValueError, "poison.attack"),
])
def test_bad_poison_settings(tmp_path, overrides, error, match):
  with pytest.raises(error, match=match):
    train_lib.train_and_evaluate(smoke_config("backdoor", "badnets", overrides), str(tmp_path))


def test_backdoor_evaluation_of_a_clean_run_is_a_clear_error():
  workdir, _ = trained_run("backdoor", "none")
  with pytest.raises(FileNotFoundError, match="no poison record"):
    evaluation.evaluate_workdir(smoke_config("backdoor", "none"), workdir, "backdoor",
                                verbose=False)


def test_label_flips_record_the_labels_and_keep_the_pixels(tmp_path):
  config = smoke_config("backdoor", "label_flip_pairwise", {"num_train_steps": 2})
  train_lib.train_and_evaluate(config, str(tmp_path))
  record = poison_files.read_record(str(tmp_path))
  clean_x, clean_y = data_lib.load_split_uint8(config.data, "train")
  assert (record.original_labels == 1).all() and (record.labels == 0).all()
  assert len(record.indices) == round(0.1 * np.sum(clean_y == 1))
  np.testing.assert_array_equal(record.images, clean_x[record.indices])
  assert record.trigger is None
