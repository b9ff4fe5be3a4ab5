"""launch/attack.py (the 'robust' evaluator) end to end on a briefly trained
mnist5k MLP, and the config section behind it."""

import json
import os
import subprocess
import sys

import pytest

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
  cfg.attacks = ("fgsm", "pgd", "autoattack")
  cfg.num_steps = 5
  names = [n for n, _ in attack_config.build_attacks(cfg, num_classes=10)]
  assert names == ["fgsm", "pgd5", "apgd-ce", "apgd-t", "square"]
  cfg.attacks = ("apgd_ce", "autoattack")
  with pytest.raises(ValueError, match="twice"):
    attack_config.build_attacks(cfg, num_classes=10)
  cfg.attacks = ("pgd", "cw")
  with pytest.raises(ValueError, match="'autoattack'"):
    attack_config.build_attacks(cfg, num_classes=10)
  cfg.attacks = ("square",)
  cfg.norm = "l1"
  with pytest.raises(ValueError, match="square"):
    attack_config.build_attacks(cfg, num_classes=10)


def test_run_attacks_without_checkpoint_says_so(tmp_path):
  from configs import mnist5k
  with pytest.raises(FileNotFoundError, match="train first"):
    evaluation.evaluate_workdir(mnist5k.get_config(), str(tmp_path), "robust")
