"""The 'property' evaluator on a many-models workdir trained with data.membership='property'."""

import numpy as np
import pytest

from certjax import data as data_lib
from certjax import evaluation
from certjax.data import membership as membership_data
from certjax.evaluation import property as property_eval
from certjax.training import train as train_lib
from tests.conftest import smoke_config, trained_run


def test_property_masks_become_training_subsets_and_evaluator_reports():
  workdir, result = trained_run("property")
  config = smoke_config("property")
  masks = membership_data.read_workdir_masks(workdir)
  labels = data_lib.load_split_uint8(config.data, "train")[1]
  share = (masks & (labels == 0)).sum(1) / masks.sum(1)
  np.testing.assert_allclose(share[0::2], 0.2)   # even models: the property
  np.testing.assert_allclose(share[1::2], 0.05)
  assert (masks.sum(1) == 400).all()
  evaluated = evaluation.evaluate_workdir(config, workdir, "property", verbose=False)
  saved = property_eval.read_results(workdir)
  assert saved["property"]["labels"] == [1, 0] * 8
  assert [row["kind"] for row in saved["results"]] == ["deepsets", "sorted", "outputs"]
  for row in saved["results"]:
    assert row["num_train"] == 8 and row["num_test"] == 8 and row["chance"] == 0.5
    assert 0.0 <= row["accuracy"] <= 1.0
  assert set(evaluated.artifacts) == {"json", "md", "png"}
  assert "| outputs |" in evaluated.table


@pytest.mark.parametrize("overrides, message", [
    ({"data.property_class": -1}, "needs data_config.property_class"),
    ({"data.property_fractions": (0.2, 0.2)}, "two different shares"),
    ({"data.property_class": 12}, "does not occur in the labels"),
    ({"num_models": 9}, "num_models must be even"),
    ({"num_models": 6}, "needs >= 4 and >= 2"),
])
def test_bad_property_configs(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    train_lib.train_and_evaluate(smoke_config("property", overrides=overrides), str(tmp_path))
