"""The 'extraction' evaluator: Knockoff, exact extraction and Square per output defence."""

import jax
import numpy as np
import pytest

from certjax import evaluation
from certjax import models
from certjax.evaluation import extraction as extraction_eval
from tests.conftest import smoke_config, trained_run


def test_extraction_evaluator_on_a_trained_one_hidden_layer_mlp():
  workdir, _ = trained_run("extraction")
  config = smoke_config("extraction")
  settings = config.extraction
  evaluated = evaluation.evaluate_workdir(config, workdir, "extraction", verbose=False)
  saved = extraction_eval.read_results(workdir)
  assert set(evaluated.artifacts) == {"json", "md", "png"}
  outputs = list(settings.outputs)
  assert outputs == ["probabilities", "rounded", "top_k", "label"]
  assert saved["metadata"]["num_examples"] == 200
  assert 0.5 < saved["victim_accuracy"] <= 1.0

  # Defence costs, against closed forms: top-1 keeps p_max and drops the
  # rest (L1 = 1 - p_max), the label is one-hot (L1 = 2 (1 - p_max)),
  # rounding to 2 decimals moves each of 10 entries by at most 0.005.
  costs = saved["defence_costs"]
  assert costs["probabilities"]["answer_distortion"] < 1e-12
  np.testing.assert_allclose(costs["label"]["answer_distortion"],
                             2 * costs["top_k"]["answer_distortion"], rtol=1e-9)
  assert 0 < costs["rounded"]["answer_distortion"] <= 10 * 0.005
  for output in ("probabilities", "top_k", "label"):
    assert costs[output]["answer_agreement"] == 1.0  # argmax kept
    assert costs[output]["answer_accuracy"] == saved["victim_accuracy"]

  # Knockoff: the victim answered budgets[-1] queries per output mode.
  for output in outputs:
    row = saved["knockoff"][output]
    assert row["queries_used"] == settings.budgets[-1]
    assert row["budgets"] == list(settings.budgets)
    assert all(0.0 <= v <= 1.0 for v in row["fidelity"] + row["accuracy"])

  # Exact extraction of the 784-8-10 victim through full probabilities: every
  # neuron, logits equal to the float64 twin's up to a per-image shift.
  exact = saved["exact"]
  assert exact["victim"] == "float64 twin" and exact["hidden_width"] == 8
  assert exact["twin_max_logit_difference"] < 1e-4
  row = exact["by_output"]["probabilities"]
  assert row["num_neurons_found"] == 8 and row["up_to_shift"]
  assert row["max_logit_difference"] < 1e-7
  assert row["fidelity"] >= 0.995 and row["queries_used"] > 784
  for output in ("rounded", "top_k", "label"):
    assert "must be 'logits' or 'probabilities'" in exact["by_output"][output]["refused"]
    assert exact["by_output"][output]["queries_used"] == 0

  # Square through the interface: each iteration asks the whole batch.
  square = saved["square"]
  assert square["num_images"] == settings.square_images
  for output in outputs:
    row = square["by_output"][output]
    assert 0.0 <= row["robust_accuracy"] <= square["clean_accuracy"]
    assert row["queries_used"] % settings.square_images == 0
    assert 0 < row["queries_used"] <= settings.square_images * settings.square_queries
    assert row["max_perturbation"] <= settings.square_eps + 1e-6

  metrics = evaluated.metrics
  assert metrics["exact/probabilities/max_logit_difference"] == \
      exact["by_output"]["probabilities"]["max_logit_difference"]
  assert metrics[f"knockoff/label/fidelity@{settings.budgets[-1]}"] == \
      saved["knockoff"]["label"]["fidelity"][-1]
  assert all(isinstance(v, float) for v in metrics.values())
  assert "| label | " in evaluated.table and "refused" in evaluated.table


def _hand_mlp(hidden):
  """A certjax MLP on 4x4 images with random weights, and 20 images for it."""
  model = models.get_model("mlp", num_classes=3, mean=(0.2,), std=(0.4,), hidden=hidden)
  variables = models.init_variables(model, jax.random.key(3), (1, 4, 4, 1))
  # Random biases: Flax initialises them to 0, which puts every critical
  # hyperplane through one point (not the generic network the attack assumes).
  rng = np.random.default_rng(1)
  variables = jax.tree_util.tree_map_with_path(
      lambda path, v: rng.normal(0, 0.5, v.shape).astype(np.float32)
      if path[-1].key == "bias" else v, variables)
  x = np.random.default_rng(0).uniform(0, 1, (20, 4, 4, 1)).astype(np.float32)
  return model, variables, x


def test_exact_extraction_of_a_hand_built_mlp_and_skips_of_other_models():
  model, variables, x = _hand_mlp((6,))
  logits = np.asarray(model.apply(variables, x))
  data = evaluation.EvalData.from_arrays(x, logits.argmax(-1))
  evaluate = evaluation.get_evaluator("extraction", {"attacks": ("exact",),
                                                     "outputs": ("logits", "label")}, 3)
  ctx = evaluation.EvalContext(apply_fn=model.apply, variables=variables, data=data,
                               num_classes=3, verbose=False)
  exact = evaluate(ctx).details["exact"]
  row = exact["by_output"]["logits"]
  assert row["num_neurons_found"] == 6 and not row["up_to_shift"]
  assert row["max_logit_difference"] < 1e-9 and row["fidelity"] == 1.0
  assert "refused" in exact["by_output"]["label"]

  # Two hidden layers (contractive first layer): extract_two_hidden_layers.
  two_layers, variables2, _ = _hand_mlp((6, 5))
  logits2 = np.asarray(two_layers.apply(variables2, x))
  data2 = evaluation.EvalData.from_arrays(x, logits2.argmax(-1))
  ctx2 = evaluation.EvalContext(apply_fn=two_layers.apply, variables=variables2, data=data2,
                                num_classes=3, verbose=False)
  result2 = evaluate(ctx2)
  exact2 = result2.details["exact"]
  row = exact2["by_output"]["logits"]
  assert exact2["hidden_widths"] == [6, 5] and exact2["hidden_width"] == 11
  assert row["neurons_found_per_layer"] == [6, 5] and row["num_neurons_found"] == 11
  assert row["max_logit_difference"] < 1e-9 and row["fidelity"] == 1.0
  assert sum(row["queries_per_layer"]) == row["queries_used"]
  assert result2.metrics["exact/logits/neurons_found_layer2"] == 5.0
  assert "| 6/6, 5/5 |" in result2.table

  three_layers, variables3, _ = _hand_mlp((4, 4, 4))
  ctx3 = evaluation.EvalContext(apply_fn=three_layers.apply, variables=variables3, data=data,
                                num_classes=3, verbose=False)
  assert "this MLP has 3" in evaluate(ctx3).details["exact"]["skipped"]
  plain = evaluation.EvalContext.from_logits_fn(lambda v: model.apply(variables, v), data, 3,
                                                verbose=False)
  assert "a plain function" in evaluate(plain).details["exact"]["skipped"]


def test_too_few_surrogate_images_is_one_line(tmp_path):
  workdir, _ = trained_run("extraction")
  config = smoke_config("extraction", overrides={
      "extraction.surrogate_split": "train[:50]", "extraction.attacks": ("knockoff",),
      "extraction.output_dir": str(tmp_path)})
  with pytest.raises(ValueError, match=r"budgets\[-1\]=60 exceeds the 50 surrogate images"):
    evaluation.evaluate_workdir(config, workdir, "extraction", verbose=False)


@pytest.mark.parametrize("settings, message", [
    ({"outputs": ("probs",)}, "Unknown extraction.outputs 'probs'"),
    ({"outputs": ()}, "extraction.outputs must be a non-empty list"),
    ({"attacks": ("knockoff", "knockoff")}, "names an entry twice"),
    ({"budgets": (100, 50)}, "extraction.budgets must increase"),
    ({"budgets": (0,)}, r"extraction.budgets\[i\] must be an integer >= 1"),
    ({"k": 10}, "which is no defence"),
    ({"decimals": -1}, "extraction.decimals must be an integer >= 0"),
    ({"surrogate_manual_dir": "/data"}, "set the data set name too"),
    ({"student_hidden": (128, 0)}, r"extraction.student_hidden\[i\] must be an integer >= 1"),
    ({"square_norm": "l1"}, "Unknown extraction.square_norm 'l1'"),
    ({"square_images": 0}, "extraction.square_images must be an integer >= 1"),
    ({"knockoff_learning_rate": -1.0}, "extraction.knockoff_learning_rate must be a finite"),
    ({"square_eps": 0.0}, "extraction.square_eps must be a finite number > 0"),
])
def test_bad_settings_are_one_line_errors(settings, message):
  with pytest.raises(ValueError, match=message) as error:
    evaluation.validate_settings("extraction", settings, num_classes=10)
  assert "\n" not in str(error.value)
