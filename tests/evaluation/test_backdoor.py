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


# ------------------------------------------------------------------ model repairs


@pytest.mark.parametrize("conv_impl", ["xla", "im2col"])
def test_layer_tap_masks_the_last_convolution_channel_wise(conv_impl):
  import jax  # pylint: disable=import-outside-toplevel
  from certjax import models as models_lib  # pylint: disable=import-outside-toplevel
  model = models_lib.IBPConvNet(num_classes=3, mean=(0.5,), std=(0.25,),
                                convs=(models_lib.ConvSpec(4, 3, 1, "SAME"),
                                       models_lib.ConvSpec(5, 3, 2, "SAME")),
                                hidden=(6,), conv_impl=conv_impl)
  variables = models_lib.init_variables(model, jax.random.key(0), (1, 6, 6, 1))
  x = np.random.default_rng(1).random((3, 6, 6, 1)).astype(np.float32)
  tap = common.layer_tap(model.apply, variables, x[:1], "last_conv")
  assert tap.channels == 5
  logits, acts = tap.apply(variables, x, None, train=False)
  np.testing.assert_allclose(logits, model.apply(variables, x), rtol=1e-6)
  assert acts.shape == (3, 3, 3, 5) and float(np.min(acts)) >= 0.0
  # Pruning channels 1 and 3 is the same as zeroing their kernels and biases.
  mask = np.array([1, 0, 1, 0, 1], np.float32)
  masked, masked_acts = tap.apply(variables, x, mask, train=False)
  params = jax.tree.map(np.array, variables["params"])
  last = sorted(k for k in params if "kernel" in params[k] and params[k]["kernel"].ndim == 4)[-1]
  params[last]["kernel"][..., mask == 0] = 0.0
  params[last]["bias"][mask == 0] = 0.0
  np.testing.assert_allclose(masked, model.apply({"params": params}, x), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(masked_acts, acts)  # the activations read are before the mask


def test_layer_tap_of_the_penultimate_features_and_bad_layers():
  from certjax import models as models_lib  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  model = models_lib.get_model("mlp", num_classes=3, mean=(0.5,), std=(0.25,), hidden=(5,))
  variables = models_lib.init_variables(model, jax.random.key(0), (1, 4, 4, 1))
  x = np.random.default_rng(0).random((2, 4, 4, 1)).astype(np.float32)
  tap = common.layer_tap(model.apply, variables, x, "penultimate")
  features = common.penultimate_features(model.apply, variables)(x)
  np.testing.assert_allclose(tap.apply(variables, x, None, train=False)[1], features)
  mask = np.array([0, 1, 1, 1, 0], np.float32)
  dense = [variables["params"][k] for k in sorted(variables["params"])][-1]
  np.testing.assert_allclose(tap.apply(variables, x, mask, train=False)[0],
                             (features * mask) @ dense["kernel"] + dense["bias"], rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError, match="needs a model with a convolution"):
    common.layer_tap(model.apply, variables, x, "last_conv")
  with pytest.raises(ValueError, match="layer"):
    common.layer_tap(model.apply, variables, x, "first_conv")


def _repair_config(defences, **settings):
  config = smoke_config("backdoor", "badnets")
  config.backdoor.defences = defences
  config.backdoor.nc_epochs = 2
  config.backdoor.nc_batches_per_epoch = 2
  config.backdoor.repair_epochs = 2
  for key, value in settings.items():
    config.backdoor[key] = value
  return config


def test_repairs_report_ca_and_asr_of_the_repaired_model():
  workdir, _ = trained_run("backdoor", "badnets")
  config = _repair_config(("neural_cleanse", "fine_tuning", "fine_pruning"))
  result = evaluation.evaluate_workdir(config, workdir, "backdoor", verbose=False)
  found = result.details["defences"]
  tuned = found["fine_tuning"]
  assert tuned["defender_examples"] == round(0.05 * 4000)
  assert tuned["fine_tuning"]["steps"] == 2 * (200 // 128)
  pruned = found["fine_pruning"]
  # The smoke model is an MLP: 'auto' prunes its penultimate features.
  assert pruned["layer"] == "penultimate" and pruned["channels"] == 32
  accuracies = pruned["defender_accuracies"]
  assert 0 <= pruned["num_pruned"] < 32 and accuracies[0] == pruned["defender_accuracy_unpruned"]
  # Every pruning kept stays within prune_max_drop; the one after it (if any) does not.
  kept = accuracies[:pruned["num_pruned"] + 1]
  assert min(kept) >= accuracies[0] - 0.04
  if len(accuracies) > len(kept):
    assert accuracies[-1] < accuracies[0] - 0.04
  assert "unlearning" in found["neural_cleanse"]
  for name in ("fine_tuning", "fine_pruning", "neural_cleanse"):
    assert 0.0 <= result.metrics[f"{name}/clean_accuracy"] <= 1.0
    assert 0.0 <= result.metrics[f"{name}/asr"] <= 1.0
  assert "| fine_pruning |" in result.table and "| pruning_only |" in result.table


def test_a_repair_that_cannot_move_the_weights_scores_the_unrepaired_model():
  # A vanishing learning rate leaves the model as it was: the repaired model's
  # CA and ASR must then be the evaluated model's, computed the same way.
  workdir, _ = trained_run("backdoor", "badnets")
  config = _repair_config(("fine_tuning",), repair_learning_rate=1e-12)
  result = evaluation.evaluate_workdir(config, workdir, "backdoor", verbose=False)
  assert result.metrics["fine_tuning/clean_accuracy"] == result.metrics["clean_accuracy"]
  assert result.metrics["fine_tuning/asr"] == result.metrics["asr"]
  tuned = result.details["defences"]["fine_tuning"]["fine_tuning"]
  assert tuned["first_loss"] > 0.0


def test_defender_set_is_clean_and_abl_needs_its_isolation_model():
  from certjax.evaluation import backdoor_repair  # pylint: disable=import-outside-toplevel
  workdir, _ = trained_run("backdoor", "badnets")
  config = smoke_config("backdoor", "badnets")
  record = poison_files.read_record(workdir)
  x, y = backdoor_repair.defender_set(config, record, 0.25, seed=0)
  clean_x, clean_y = data_lib.load_split_uint8(config.data, "train")
  assert len(y) == 1000 and x.dtype == np.float32
  # Every defender example is a clean training example that the poison left untouched.
  untouched = np.setdiff1d(np.arange(len(clean_y)), record.indices)
  flat = {row.tobytes(): label for row, label in zip(clean_x[untouched], clean_y[untouched])}
  assert all(flat.get((row * 255).round().astype(np.uint8).tobytes()) == label
             for row, label in zip(x, y))
  with pytest.raises(ValueError, match="repair_fraction"):
    backdoor_repair.defender_set(config, record, 0.99, seed=0)
  with pytest.raises(ValueError, match="abl_isolation"):
    evaluation.evaluate_workdir(_repair_config(("abl",)), workdir, "backdoor", verbose=False)


@pytest.mark.parametrize("key, value, match", [
    ("prune_layer", "first_conv", "backdoor.prune_layer"),
    ("repair_fraction", 1.0, "backdoor.repair_fraction"),
    ("prune_max_drop", 0.0, "backdoor.prune_max_drop"),
    ("repair_epochs", 0, "backdoor.repair_epochs"),
    ("abl_isolation_fraction", 0.0, "backdoor.abl_isolation_fraction"),
])
def test_bad_repair_settings(key, value, match):
  config = smoke_config("backdoor", "badnets")
  config.backdoor[key] = value
  with pytest.raises(ValueError, match=match):
    backdoor_eval.validate_settings(config.backdoor, None)


@pytest.mark.parametrize("attack", ["feature_collision", "gradient_matching"])
def test_targeted_poisons_are_recorded_clean_label_and_scored_on_their_target(attack, tmp_path):
  surrogate, _ = trained_run("backdoor", "none")
  config = smoke_config("backdoor", attack, {"poison.surrogate_workdir": surrogate,
                                             "poison.target_index": 3,
                                             "num_train_steps": 2})
  train_lib.train_and_evaluate(config, str(tmp_path))
  record = poison_files.read_record(str(tmp_path))
  clean_x, clean_y = data_lib.load_split_uint8(config.data, "train")
  # 1% of the 4,000 training digits, all of the adversarial class, labels kept.
  assert len(record.indices) == 40 and (clean_y[record.indices] == 0).all()
  np.testing.assert_array_equal(record.labels, clean_y[record.indices])
  change = np.abs(record.images.astype(int) - clean_x[record.indices].astype(int))
  assert change.max() <= round(0.3 * 255) + 1 and change.max() > 0
  config.backdoor.defences = ()
  result = evaluation.evaluate_workdir(config, str(tmp_path), "backdoor", verbose=False)
  target_x, target_label = poison_files.target_image(config.data, 3)
  prediction = int(np.argmax(runs.restore_model(str(tmp_path)).logits_fn()(target_x[None])))
  row = result.details["result"]
  assert row["target_prediction"] == prediction and row["target_label"] == target_label != 0
  assert result.metrics["asr"] == float(prediction == 0)


def test_targeted_poison_settings_are_checked(tmp_path):
  surrogate, _ = trained_run("backdoor", "none")
  with pytest.raises(ValueError, match="surrogate_workdir"):
    train_lib.train_and_evaluate(smoke_config("backdoor", "gradient_matching"), str(tmp_path))
  with pytest.raises(ValueError, match="target_index=100000 lies outside"):
    train_lib.train_and_evaluate(smoke_config("backdoor", "gradient_matching", {
        "poison.surrogate_workdir": surrogate, "poison.target_index": 100000}), str(tmp_path))


def test_a_record_from_before_a_new_poison_setting_still_matches_its_defaults():
  from certjax.training import poison as poison_lib  # pylint: disable=import-outside-toplevel
  current = poison_lib._settings(poison_lib.default_config())  # pylint: disable=protected-access
  older = {k: v for k, v in current.items() if k != "craft_steps"}
  assert poison_lib.same_settings(older, current)
  assert not poison_lib.same_settings(older, {**current, "craft_steps": 3})
  assert not poison_lib.same_settings({**current, "rate": 0.2}, current)
  assert not poison_lib.same_settings({**current, "unknown": 1}, current)


def test_spectral_signatures_skip_a_class_that_is_all_poison(tmp_path):
  # A clean-label poison of every target-class image leaves spectral
  # signatures no clean example of that class to separate it from.
  surrogate, _ = trained_run("backdoor", "none")
  config = smoke_config("backdoor", "clean_label", {"poison.surrogate_workdir": surrogate,
                                                    "poison.rate": 1.0,
                                                    "num_train_steps": 2})
  train_lib.train_and_evaluate(config, str(tmp_path))
  config.backdoor.defences = ("spectral", "activation_clustering")
  result = evaluation.evaluate_workdir(config, str(tmp_path), "backdoor", verbose=False)
  found = result.details["defences"]
  assert "every training example of a class is poisoned" in found["spectral"]["skipped"]
  assert "recall" in found["activation_clustering"]
  assert "skipped: expected_rate 1" in result.table
