"""launch/attack.py (the 'robust' evaluator) end to end on a briefly trained
mnist5k MLP, and the config section behind it."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from certjax import attacks
from certjax import evaluation
from certjax.evaluation import robust as attack_config
from tests.attacks import test_training

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def workdir():
  """A standard mnist5k MLP trained by configs/mnist5k.py (model mlp), shared
  with test_training.py when both run in one process."""
  return test_training.trained("standard")[0]


def test_launch_attack_writes_json_and_table(workdir):
  args = ["-m", "launch.attack", "--config=configs/mnist5k.py", "--config.model.name=mlp",
          "--config.attack.attacks=('fgsm','pgd')",
          "--config.attack.eps_list=(0.05,0.2)", "--config.attack.num_steps=3",
          "--config.attack.square_queries=20", "--config.attack.batch_size=16",
          "--config.skip=7", "--config.max=200", f"--workdir={workdir}"]
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "attack", "results.json")) as f:
    results = json.load(f)
  # skip=7, max=200: indices 0, 7, ..., 196.
  assert results["num_examples"] == 29
  assert (results["first_index"], results["last_index"]) == (0, 196)
  assert results["attacks"] == ["fgsm", "pgd3"]
  assert [r["eps"] for r in results["results"]] == [0.05, 0.2]
  clean = results["clean_accuracy"]
  assert clean > 0.8
  for r in results["results"]:
    after = [r["robust_accuracy_after"][a] for a in results["attacks"]]
    assert all(b <= a for a, b in zip([clean] + after, after))
    assert r["robust_accuracy"] == after[-1] <= clean
    assert r["max_perturbation"] <= r["eps"] * (1 + 1e-4) + 1e-6
  # A briefly trained MLP is not robust at eps 0.2: the attacks must show it.
  assert results["results"][1]["robust_accuracy"] < clean
  with open(os.path.join(workdir, "attack", "results.md")) as f:
    table = f.read()
  for text in ("fgsm", "pgd3", "0.05", "0.2", "on 29 examples"):
    assert text in table and text in proc.stdout


def test_build_attacks_names_and_errors():
  cfg = attack_config.default_config()
  assert cfg.suite == ""
  cfg.attacks = ("fgsm", "pgd", "autoattack_custom")
  cfg.num_steps = 5
  sequence = attack_config.build_attacks(cfg, num_classes=10)
  assert [n for n, _ in sequence] == ["fgsm", "pgd5", "apgd-ce", "apgd-t", "fab-t", "square"]
  # 'autoattack_custom' takes the section's settings.
  configs = dict(sequence)
  assert configs["apgd-t"].config["num_steps"] == configs["fab-t"].config["num_steps"] == 5
  assert configs["square"].config["num_queries"] == cfg.square_queries
  cfg.attacks = ("apgd_ce", "autoattack_custom")
  with pytest.raises(ValueError, match="twice"):
    attack_config.build_attacks(cfg, num_classes=10)
  # The old name of the configurable sequence points to both replacements.
  cfg.attacks = ("pgd", "autoattack")
  with pytest.raises(ValueError, match="no longer accepts 'autoattack'.*attack.suite='autoattack'"
                                       ".*'autoattack_custom'"):
    attack_config.build_attacks(cfg, num_classes=10)
  cfg.attacks = ("pgd", "cw")
  with pytest.raises(ValueError, match="'autoattack_custom'"):
    attack_config.build_attacks(cfg, num_classes=10)
  cfg.attacks = ("square",)
  cfg.norm = "l1"
  with pytest.raises(ValueError, match="square"):
    attack_config.build_attacks(cfg, num_classes=10)
  cfg.attacks = ("fab_t",)
  assert [n for n, _ in attack_config.build_attacks(cfg, num_classes=10)] == ["fab-t"]


def test_suite_autoattack_is_the_standard_version_whatever_the_section_says():
  cfg = attack_config.default_config()
  cfg.suite = "autoattack"
  cfg.update({"attacks": ("fgsm",), "num_steps": 3, "restarts": 4, "num_target_classes": 2,
              "square_queries": 10})
  sequence = attack_config.build_attacks(cfg, num_classes=10)
  reference = attacks.standard_attacks("linf", num_classes=10)
  assert [n for n, _ in sequence] == ["apgd-ce", "apgd-t", "fab-t", "square"]
  assert [f.config for _, f in sequence] == [f.config for _, f in reference]
  note = attack_config.suite_note(cfg)
  assert "autoattack-standard (Croce & Hein 2020)" in note and "attack.num_steps" in note
  cfg.suite = "AutoAttack"
  with pytest.raises(ValueError, match="Unknown attack.suite 'AutoAttack'.*'autoattack'"):
    attack_config.validate_settings(cfg)


def test_suite_is_named_in_results_json_and_table(workdir, tmp_path, monkeypatch):
  # The evaluator with attack.suite='autoattack' on the trained MLP. The
  # standard sequence is swapped for a cheap one (its budgets are tested in
  # tests/attacks/test_autoattack.py): this checks what reaches the files.
  from configs import mnist5k
  cheap = [("apgd-ce", attacks.make_apgd(num_steps=2)),
           ("fab-t", attacks.make_fab_targeted(num_steps=2, num_target_classes=2))]
  asked = []

  def standard(norm, num_classes=None):
    asked.append((norm, num_classes))
    return cheap

  monkeypatch.setattr(attack_config, "standard_attacks", standard)
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("attack"))
  config = mnist5k.get_config()
  config.model.name = "mlp"
  config.attack.update({"suite": "autoattack", "eps_list": (0.1,), "batch_size": 16})
  config.update({"skip": 10, "max": 100})
  evaluation.evaluate_workdir(config, copy, "robust", verbose=False)
  assert asked and asked[0] == ("linf", 10)
  results = attack_config.read_results(copy)
  assert results["suite"] == "autoattack-standard (Croce & Hein 2020)"
  assert results["attacks"] == ["apgd-ce", "fab-t"]
  assert "attack.num_steps" in results["suite_note"]
  assert results["attack_config"]["suite"] == "autoattack"
  with open(os.path.join(copy, "attack", "results.md")) as f:
    table = f.read()
  assert "Suite: autoattack-standard (Croce & Hein 2020)" in table
  assert "Attacks: autoattack-standard (Croce & Hein 2020)" in table


def test_run_attacks_without_checkpoint_says_so(tmp_path):
  from configs import mnist5k
  with pytest.raises(FileNotFoundError, match="train first"):
    evaluation.evaluate_workdir(mnist5k.get_config(), str(tmp_path), "robust")


def test_l1_autoattack_without_square_does_not_carry_the_standard_name():
  from certjax.attacks import AUTOATTACK_STANDARD  # pylint: disable=import-outside-toplevel
  cfg = attack_config.default_config()
  cfg.suite = "autoattack"
  assert attack_config.suite_name(cfg) == AUTOATTACK_STANDARD
  cfg.norm = "l1"
  assert attack_config.suite_name(cfg) != AUTOATTACK_STANDARD
  assert "without-square" in attack_config.suite_note(cfg)
