"""The 'property' evaluator on a many-models workdir trained with data.membership='property'."""

import numpy as np
import pytest

from certjax import data as data_lib
from certjax import evaluation
from certjax.data import membership as membership_data
from certjax.evaluation import property as property_eval
from certjax.training import many as many_lib
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


def test_rotated_share_property_trains_on_rotated_copies_and_is_evaluated():
  workdir, _ = trained_run("property", "rotated")
  config = smoke_config("property", "rotated")
  masks = membership_data.read_workdir_masks(workdir)
  rotated = membership_data.read_rotated_file(
      f"{workdir}/{membership_data.ROTATED_FILE}", masks)
  np.testing.assert_array_equal(rotated.sum(1), [80, 20] * 8)  # 20% / 5% of 400
  # What the trainer feeds: model k's rotated members become their copies' slots.
  images, labels = data_lib.load_split_uint8(config.data, "train")
  extended, _, slot = membership_data.rotated_copies(images, labels, rotated, 90)
  order = many_lib.MemberOrder(masks, config.batch_size, config.seed, rotated, slot)
  plain = many_lib.MemberOrder(masks, config.batch_size, config.seed)
  batch, original = order.indices(0)[0], plain.indices(0)[0]
  flags = rotated[0, original]
  assert flags.any() and not flags.all()
  np.testing.assert_array_equal(batch[~flags], original[~flags])
  np.testing.assert_array_equal(extended[batch[flags]], np.rot90(images[original[flags]], 1,
                                                                 axes=(1, 2)))
  config.property.kinds = ("outputs",)
  evaluation.evaluate_workdir(config, workdir, "property", verbose=False)
  saved = property_eval.read_results(workdir)
  assert saved["property"]["kind"] == "rotated_share"
  assert saved["property"]["rotation_degrees"] == 90
  assert saved["property"]["labels"] == [1, 0] * 8
  assert saved["results"][0]["kind"] == "outputs" and saved["results"][0]["num_test"] == 8


@pytest.mark.parametrize("overrides, message", [
    ({"data.property_class": -1}, "needs data_config.property_class"),
    ({"data.property_fractions": (0.2, 0.2)}, "two different shares"),
    ({"data.property_class": 12}, "does not occur in the labels"),
    ({"num_models": 9}, "num_models must be even"),
    ({"num_models": 6}, "needs >= 4 and >= 2"),
    ({"data.property_kind": "rotation"}, "property_kind must be one of"),
    ({"data.property_kind": "rotated_share"}, "applies to property_kind='class_share' only"),
    ({"data.property_kind": "rotated_share", "data.property_class": -1,
      "data.property_rotation": 45}, "property_rotation must be one of"),
])
def test_bad_property_configs(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    train_lib.train_and_evaluate(smoke_config("property", overrides=overrides), str(tmp_path))
