"""The 'inversion' evaluator on the smoke mnist5k workdir: files, metrics, oracles, bad input.

Oracles: the evaluation classifier is a copy of the target's workdir, so its
accuracy and confidence on the class inversions must equal the target's own;
iDLG reads the label of one example exactly off a ReLU network's head
gradient; the reported PSNR is recomputed in float64 NumPy from the saved
images.
"""

import os
import shutil

import numpy as np
import pytest

from certjax import evaluation
from certjax.evaluation import inversion as inversion_eval
from certjax.training import config as config_lib
from configs import inversion as inversion_config
from tests.conftest import smoke_config, trained_run

TINY = {"inversion.classes": (0, 1), "inversion.num_steps": 5,
        "inversion.gradient_batch_sizes": (1,), "inversion.num_batches": 1,
        "inversion.dlg_num_steps": 3, "inversion.ig_num_steps": 5,
        # The first 100 test digits are enough to classify.
        "max": 99}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
  workdir, _ = trained_run("mnist5k")
  # The same model in another workdir: an 'independent' classifier whose
  # answers must be the target's.
  twin = str(tmp_path_factory.mktemp("inversion") / "twin")
  shutil.copytree(workdir, twin)
  config = smoke_config("mnist5k", overrides={**TINY, "inversion.evaluation_workdir": twin})
  return workdir, evaluation.evaluate_workdir(config, workdir, "inversion", verbose=False)


def test_files_and_metrics(evaluated):
  workdir, result = evaluated
  assert set(result.artifacts) == {"json", "md", "png", "images"}
  with open(result.artifacts["png"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert result.artifacts["json"] == os.path.join(workdir, "inversion", "results.json")
  saved = inversion_eval.read_results(workdir)
  assert saved["metrics"] == pytest.approx(result.metrics)
  assert set(result.metrics) == {
      "target/accuracy", "class_inversion/target_confidence", "class_inversion/target_accuracy",
      "class_inversion/eval_accuracy", "class_inversion/eval_confidence",
      "eval_classifier/accuracy", "labels/b1/recovery_rate", "dlg/b1/psnr", "dlg/b1/ssim",
      "inverting_gradients/b1/psnr", "inverting_gradients/b1/ssim"}
  for name, value in result.metrics.items():
    low, high = (-1.0, 1.0) if name.endswith("ssim") else (0.0, 1.0)
    if name.endswith("psnr"):
      assert 0.0 < value < 100.0, name
    else:
      assert low <= value <= high, name
  assert [row["class"] for row in saved["class_inversion"]["classes"]] == [0, 1]
  assert "| inverting_gradients |" in result.table and "| dlg |" in result.table


def test_twin_classifier_agrees_with_the_target(evaluated):
  _, result = evaluated
  m = result.metrics
  assert m["class_inversion/eval_accuracy"] == m["class_inversion/target_accuracy"]
  assert m["class_inversion/eval_confidence"] == pytest.approx(
      m["class_inversion/target_confidence"], rel=1e-5)
  assert m["eval_classifier/accuracy"] == m["target/accuracy"]


def test_idlg_and_reported_psnr(evaluated):
  workdir, result = evaluated
  # One example, ReLU features: its class is the only negative column sum.
  assert result.metrics["labels/b1/recovery_rate"] == 1.0
  images = inversion_eval.read_images(workdir)
  assert images["class_inversions"].shape == (2, 28, 28, 1)
  original = images["b1/originals"].astype(np.float64)
  for attack in ("dlg", "inverting_gradients"):
    recon = images[f"b1/{attack}"].astype(np.float64)
    assert recon.shape == original.shape == (1, 1, 28, 28, 1)
    mse = np.mean((recon - original) ** 2, axis=(2, 3, 4))
    np.testing.assert_allclose(result.metrics[f"{attack}/b1/psnr"],
                               np.mean(10 * np.log10(1.0 / mse)), rtol=1e-4)


def test_without_an_evaluation_classifier_says_so(tmp_path):
  workdir, _ = trained_run("mnist5k")
  config = smoke_config("mnist5k", overrides={
      **TINY, "inversion.gradient_attacks": (), "inversion.output_dir": str(tmp_path)})
  result = evaluation.evaluate_workdir(config, workdir, "inversion", verbose=False)
  assert "NOT an independent measure" in result.table
  assert not any(k.startswith("eval") or "/eval_" in k for k in result.metrics)
  assert os.path.exists(tmp_path / "results.png")


def test_evaluation_workdir_must_exist_and_differ(tmp_path):
  workdir, _ = trained_run("mnist5k")
  missing = str(tmp_path / "nowhere")
  config = smoke_config("mnist5k", overrides={**TINY, "inversion.evaluation_workdir": missing})
  with pytest.raises(ValueError, match="evaluation_workdir .*nowhere.* does not exist"):
    evaluation.evaluate_workdir(config, workdir, "inversion", verbose=False)
  config = smoke_config("mnist5k", overrides={**TINY, "inversion.evaluation_workdir": workdir})
  with pytest.raises(ValueError, match="is the workdir under evaluation"):
    evaluation.evaluate_workdir(config, workdir, "inversion", verbose=False)


@pytest.mark.parametrize("settings, message", [
    ({"gradient_attacks": ("dgl",)}, r"Unknown inversion.gradient_attacks 'dgl'.*'dlg'"),
    ({"label_method": "idlg"}, r"'idlg' recovers one label.*\(1, 4\)"),
    ({"label_method": "yin", "gradient_batch_sizes": (12,)}, r"<= 10 classes"),
    ({"classes": (3, 10)}, r"inversion.classes holds class 10.*10 classes"),
    ({"num_batches": 0}, r"inversion.num_batches must be an integer >= 1"),
    ({"class_inversion": False, "gradient_attacks": ()}, r"nothing to do"),
    ({"loss": "ce"}, r"Unknown inversion.loss 'ce'"),
    ({"num_step": 3}, r"Unknown setting 'num_step'.*Did you mean 'num_steps'"),
])
def test_bad_settings_are_one_line_errors(settings, message):
  with pytest.raises(ValueError, match=message) as error:
    evaluation.validate_settings("inversion", settings, num_classes=10)
  assert "\n" not in str(error.value)



@pytest.mark.parametrize("arg", ["", "mnist5k,evaluator", "mnist", "fashion_mnist,smoke"])
def test_config_file_is_valid(arg):
  config = inversion_config.get_config(arg)
  config_lib.validate_config(config)
  assert config.inversion.gradient_attacks == ("dlg", "dlg_joint", "inverting_gradients")
  assert (config.model.name == "mlp") == ("evaluator" in arg or "smoke" in arg)
  with pytest.raises(ValueError, match="configs/inversion.py takes one of"):
    inversion_config.get_config("svhn")
