"""Data config defaults and validation errors."""

import ml_collections
import pytest

from certjax import data


def test_default_config_fields_and_values():
  cfg = data.default_data_config()
  assert isinstance(cfg, ml_collections.ConfigDict)
  assert cfg.to_dict() == {
      "name": "mnist5k", "manual_dir": "", "data_dir": "", "download": False,
      "train_split": "train", "eval_split": "test", "augment": "none",
      "image_size": 0, "num_eval_examples": -1, "split_seed": 0, "membership": "all",
      "membership_fraction": 0.5, "membership_file": "", "property_class": -1,
      "property_fractions": (0.8, 0.2), "property_subset_size": 0,
      "property_kind": "class_share", "property_rotation": 90, "replace_file": "",
      "exclude_file": ""}
  assert tuple(cfg.keys()) == tuple(sorted(data.ACCEPTED_FIELDS))


def test_partial_config_gets_defaults():
  cfg = data.validate_data_config(ml_collections.ConfigDict({"name": "cifar10"}))
  assert cfg.name == "cifar10" and cfg.eval_split == "test" and cfg.augment == "none"
  assert hash(cfg) == hash(data.validate_data_config({"name": "cifar10"}))


def test_unknown_field_lists_accepted_fields():
  cfg = data.default_data_config()
  cfg.num_eval_example = 10  # typo
  with pytest.raises(ValueError) as e:
    data.validate_data_config(cfg)
  msg = str(e.value)
  assert "'num_eval_example'" in msg
  assert "Did you mean 'num_eval_examples'" in msg
  for field in data.ACCEPTED_FIELDS:
    assert field in msg
  # Every public entry point validates.
  with pytest.raises(ValueError, match="Unknown field"):
    data.get_info(cfg)
  with pytest.raises(ValueError, match="Unknown field"):
    data.train_batches(cfg, batch_size=4, seed=0)


def test_bad_augment_value():
  with pytest.raises(ValueError) as e:
    data.validate_data_config({"augment": "crop-flip"})
  assert "'none', 'crop_flip'" in str(e.value)
  assert "Did you mean 'crop_flip'" in str(e.value)


def test_manual_dir_for_unsupported_dataset():
  with pytest.raises(ValueError) as e:
    data.validate_data_config({"name": "cifar10", "manual_dir": "/tmp/x"})
  msg = str(e.value)
  assert "manual_dir" in msg and "'mnist', 'fashion_mnist'" in msg and "'cifar10'" in msg


@pytest.mark.parametrize("field,value,fragment", [
    ("num_eval_examples", 0, "positive integer, or -1"),
    ("num_eval_examples", 2.5, "positive integer, or -1"),
    ("split_seed", -1, "split_seed must be an integer >= 0"),
    ("download", "yes", "download must be True or False"),
    ("name", "", "Accepted names"),
    ("train_split", "", "must name a split"),
    ("data_dir", 3, "data_dir must be a string"),
    ("image_size", -1, "image_size must be an integer >= 0"),
    ("image_size", 22.5, "image_size must be an integer >= 0"),
    ("image_size", True, "image_size must be an integer >= 0"),
])
def test_bad_field_values(field, value, fragment):
  with pytest.raises(ValueError, match=fragment):
    data.validate_data_config({field: value})


def test_not_a_config():
  with pytest.raises(TypeError, match="ConfigDict"):
    data.validate_data_config("mnist")


def test_unknown_name_hint_names_each_data_set_once(monkeypatch):
  from certjax.data import sources  # pylint: disable=g-import-not-at-top
  # TFDS knows 'mnist' too: offered once, not "'mnist' or 'mnist' or 'kmnist'".
  monkeypatch.setattr(sources, "import_tfds", lambda: None)  # saves a second of import
  monkeypatch.setattr(sources, "_tfds_names", lambda tfds: ["mnist", "kmnist", "cifar10"])
  msg = str(sources.unknown_name_error("mnsit"))
  hint = msg.split("Did you mean ", 1)[1].rstrip("?")
  offered = hint.split(" or ")
  assert offered[0] == "'mnist'" and "'kmnist'" in offered
  assert len(offered) == len(set(offered)), msg
