"""Anti-backdoor learning's isolation objective and the attack x defence table sweep."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from certjax.training import backdoor_table
from certjax.training import objectives
from tests.conftest import smoke_config


def _linear_ctx():
  def apply_fn(variables, x, train=False):
    del train
    return x.reshape(x.shape[0], -1) @ variables["params"]["w"]
  return objectives.ObjectiveContext(apply_fn=apply_fn, num_classes=2, total_steps=1,
                                     input_shape=(1, 2, 1))


@pytest.mark.parametrize("reduction", ["batch", "example"])
def test_abl_isolation_descends_above_gamma_and_ascends_below(reduction):
  loss_fn = objectives.get_objective({"name": "abl_isolation", "gamma": 0.5,
                                      "reduction": reduction}, _linear_ctx())
  x = jnp.array([[[[1.0], [0.0]]], [[[0.0], [1.0]]]])
  batch = {"image": x, "label": jnp.array([0, 1])}

  def cross_entropy(w):
    logits = x.reshape(2, -1) @ w
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), batch["label"]])

  for scale, sign in ((0.1, 1.0), (5.0, -1.0)):  # loss ~0.64 > 0.5, then ~0.007 < 0.5
    w = scale * jnp.eye(2)
    (loss, (metrics, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        {"w": w}, {}, batch, jax.random.key(0), 0)
    np.testing.assert_allclose(loss, sign * cross_entropy(w), rtol=1e-5)
    np.testing.assert_allclose(metrics["cross_entropy"], cross_entropy(w), rtol=1e-5)
    np.testing.assert_allclose(grads["w"], sign * jax.grad(cross_entropy)(w), rtol=1e-5,
                               atol=1e-9)


def test_abl_isolation_rejects_bad_settings():
  with pytest.raises(ValueError, match="objective.gamma"):
    objectives.get_objective({"name": "abl_isolation", "gamma": 0.0}, _linear_ctx())
  with pytest.raises(ValueError, match="objective.reduction"):
    objectives.get_objective({"name": "abl_isolation", "reduction": "mean"}, _linear_ctx())


def test_the_table_sweep_trains_evaluates_and_writes_the_table(tmp_path):
  table = smoke_config("backdoor_table", "mnist5k")
  table.attacks = ("badnets",)
  table.defences = ("none", "fine_tuning", "spectral", "abl")
  root = str(tmp_path)
  payload = backdoor_table.run_table(table, root)
  assert {os.path.basename(p) for p in os.listdir(root)} >= {
      "badnets_0.1", "badnets_0.1-retrain_spectral", "badnets_0.1-abl", "table.md", "poisons.png",
      "table.json", "table.png"}
  (row,) = payload["rows"]
  assert list(row["cells"]) == ["none", "fine_tuning", "spectral", "abl"]
  for cell in row["cells"].values():
    assert 0.0 <= cell["clean_accuracy"] <= 1.0 and 0.0 <= cell["asr"] <= 1.0
  # The spectral column is the model retrained without what spectral signatures removed.
  from certjax.evaluation import backdoor as backdoor_eval  # pylint: disable=import-outside-toplevel
  from certjax import runs  # pylint: disable=import-outside-toplevel
  retrained = os.path.join(root, "badnets_0.1-retrain_spectral")
  assert row["cells"]["spectral"]["clean_accuracy"] == (
      backdoor_eval.read_results(retrained)["result"]["clean_accuracy"])
  removed = np.load(os.path.join(root, "badnets_0.1", "backdoor", "removed_spectral.npy"))
  assert runs.read_config(retrained).data.exclude_file.endswith("removed_spectral.npy")
  assert row["cells"]["spectral"]["removed"] == len(removed)
  assert runs.read_config(os.path.join(root, "badnets_0.1-abl")).objective.name == (
      "abl_isolation")
  assert backdoor_table.read_table(root)["rows"][0]["cells"] == row["cells"]
  assert "| badnets | 0.1 |" in open(os.path.join(root, "table.md")).read()
  # A second call finds everything done: no training or evaluation runs again.
  again = backdoor_table.run_table(table, root)
  assert not any(k.startswith("evaluate") for k in again["seconds"])
  assert again["rows"][0]["cells"] == row["cells"]


@pytest.mark.parametrize("key, value, match", [
    ("attacks", ("sleeper",), "table.attacks"),
    ("rates", (0.0,), "table.rates"),
    ("defences", ("neural",), "table.defences"),
    ("run_config", "configs/nope.py", "not a file"),
])
def test_bad_table_settings(key, value, match, tmp_path):
  table = smoke_config("backdoor_table", "mnist5k")
  table[key] = value
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    backdoor_table.run_table(table, str(tmp_path))


def test_class_share_rates_poison_the_same_number_of_examples():
  config = smoke_config("backdoor", "clean_label", {"poison.surrogate_workdir": "x"})
  labels = np.repeat(np.arange(10), 100)  # 100 per class, 1,000 in all
  assert backdoor_table.setting_rate("badnets", 0.01, labels, config) == 0.01
  assert backdoor_table.setting_rate("clean_label", 0.01, labels, config) == 0.1
  assert backdoor_table.setting_rate("clean_label", 0.2, labels, config) == 1.0
  assert backdoor_table.setting_rate("label_flip_pairwise", 0.0123, labels, config) == 0.12
