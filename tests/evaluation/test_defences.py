"""The 'defences' evaluator on smoke-scale workdirs of configs/defences.py."""

import numpy as np
import pytest

from certjax import evaluation
from certjax import models as models_lib
from certjax import runs
from certjax.defences import transforms
from certjax.evaluation import common
from certjax.evaluation import defences as defences_eval
from certjax.evaluation.registry import EvalData
from certjax.training import config as config_lib
from tests.conftest import smoke_config, trained_run


def _images(config):
  data = EvalData.from_config(config.data, config.data.eval_split, int(config.skip),
                              int(config.max))
  return common.load_all(data)


def test_rows_clean_accuracy_and_masking_warnings():
  workdir, _ = trained_run("defences")
  config = smoke_config("defences", overrides={
      "defence.transforms": ("bit_depth",), "defence.detectors": ("feature_squeezing",)})
  result = evaluation.evaluate_workdir(config, workdir, "defences", verbose=False)
  saved = defences_eval.read_results(workdir)
  assert set(result.artifacts) == {"json", "md", "png"}
  rows = {row["defence"]: row for row in saved["rows"]}
  assert list(rows) == ["workdir model", "bit_depth", "feature_squeezing (detector)"]
  # Clean accuracy of each row is the deployed system's, computed here independently.
  x, y = _images(config)
  logits_fn = runs.restore_model(workdir).logits_fn()
  assert rows["workdir model"]["clean_accuracy"] == np.mean(
      np.argmax(logits_fn(x), -1) == y)
  squeezed = transforms.bit_depth(x, 1)
  assert rows["bit_depth"]["clean_accuracy"] == np.mean(
      np.argmax(logits_fn(squeezed), -1) == y)
  # A 1-bit quantiser has a zero derivative everywhere: the naive attacker's
  # gradient vanishes on every input, and the diagnostics must say so.
  names = {d["name"] for d in rows["bit_depth"]["diagnostics"]}
  assert "zero_gradients" in names
  assert rows["bit_depth"]["diagnostics"][0]["evidence"]
  assert "zero_gradients" not in {d["name"] for d in rows["workdir model"]["diagnostics"]}
  for row in rows.values():
    for kind in ("naive", "adaptive"):
      assert set(row[kind]) == {"0.1"} and 0.0 <= row[kind]["0.1"] <= row["clean_accuracy"]
  detector = rows["feature_squeezing (detector)"]
  assert 0.0 <= detector["clean_rejection_rate"] <= 1.0
  assert "| bit_depth |" in result.table and "zero_gradients" in result.table


def test_distilled_thermometer_and_ensemble_rows(tmp_path):
  teacher, _ = trained_run("defences", "teacher")
  student, _ = trained_run("defences", "student", {"objective.teacher_workdir": teacher})
  thermometer, _ = trained_run("defences", "thermometer")
  ensemble, _ = trained_run("defences", "ensemble")
  base, _ = trained_run("defences")
  # The thermometer model holds its encoding: callers pass images in [0, 1].
  trained = runs.restore_model(thermometer)
  assert isinstance(trained.model, models_lib.InputTransformed)
  x, _ = _images(smoke_config("defences"))
  encoded = transforms.thermometer_encode(x, 16)
  np.testing.assert_allclose(
      trained.model.apply(trained.variables, x),
      trained.model.apply(trained.variables, encoded, transformed=True), rtol=1e-6)
  config = smoke_config("defences", overrides={
      "defence.transforms": (), "defence.detectors": (), "defence.diagnostics": False,
      "defence.include_model": False, "defence.adaptive_attacks": ("pgd_cw",),
      "defence.ensemble_methods": ("vote",),
      "defence.models": (f"distilled={student},thermo={thermometer},ens={ensemble},"
                         f"pair={base}+{teacher}"),
      "defence.output_dir": str(tmp_path)})
  result = evaluation.evaluate_workdir(config, base, "defences", verbose=False)
  labels = [row["defence"] for row in result.details["rows"]]
  assert labels == ["distilled (distillation, T=100)", "thermo (thermometer-trained)",
                    "ens (ensemble of 2, vote)", "pair (ensemble of 2, vote)"]
  by_label = dict(zip(labels, result.details["rows"]))
  assert by_label["thermo (thermometer-trained)"]["adaptive_view"].startswith(
      "BPDA through thermometer")
  assert by_label["ens (ensemble of 2, vote)"]["adaptive_view"].startswith("BPDA")


@pytest.mark.parametrize("overrides, message", [
    ({"defence.transforms": ("blur",)}, "defence.transforms"),
    ({"defence.transform_kwargs.jpeg": {"quality": 0}}, "quality"),
    ({"defence.transform_kwargs.bit_depth": {"bits": 0}}, "bits"),
    ({"defence.models": "nolabel"}, "label=workdir"),
    ({"defence.detector_fpr": 1.5}, "detector_fpr"),
    ({"defence.adaptive_attacks": ()}, "adaptive_attacks"),
    ({"defence.squeezers": ("resize_pad",)}, "deterministic"),
])
def test_bad_settings(overrides, message):
  config = smoke_config("defences", overrides=overrides)
  with pytest.raises(ValueError, match=message):
    config_lib.validate_config(config)


def test_randomised_input_transform_cannot_be_trained_into_a_model():
  config = smoke_config("defences", overrides={"model.input_transform": "resize_pad",
                                               "model.input_transform_kwargs": {}})
  with pytest.raises(ValueError, match="randomised"):
    config_lib.validate_config(config)


@pytest.mark.parametrize("temperature", [0.0, -5.0])
def test_distillation_temperature_must_be_positive(tmp_path, temperature):
  from certjax.training import train as train_lib  # pylint: disable=import-outside-toplevel
  config = smoke_config("defences", "teacher", {"objective.temperature": temperature})
  with pytest.raises(ValueError, match="objective.temperature must be a finite number > 0"):
    train_lib.train_and_evaluate(config, str(tmp_path))


def test_student_without_a_trained_teacher_is_a_clear_error(tmp_path):
  from certjax.training import train as train_lib  # pylint: disable=import-outside-toplevel
  config = smoke_config("defences", "student",
                        {"objective.teacher_workdir": str(tmp_path / "no_teacher")})
  with pytest.raises(FileNotFoundError):
    train_lib.train_and_evaluate(config, str(tmp_path / "student"))


def test_penultimate_features_are_the_input_of_the_last_dense_layer():
  import jax  # pylint: disable=import-outside-toplevel
  model = models_lib.get_model("mlp", num_classes=3, mean=(0.5,), std=(0.25,), hidden=(5,))
  variables = models_lib.init_variables(model, jax.random.key(0), (1, 4, 4, 1))
  x = np.random.default_rng(0).random((6, 4, 4, 1)).astype(np.float32)
  features = common.penultimate_features(model.apply, variables)(x)
  params = variables["params"]
  dense = [params[k] for k in sorted(params) if "kernel" in params[k]]
  hidden = np.maximum(((x - 0.5) / 0.25).reshape(6, -1) @ dense[0]["kernel"] + dense[0]["bias"],
                      0.0)
  np.testing.assert_allclose(features, hidden, rtol=1e-5, atol=1e-6)
  logits = model.apply(variables, x)
  np.testing.assert_allclose(features @ dense[1]["kernel"] + dense[1]["bias"], logits,
                             rtol=1e-5, atol=1e-5)
