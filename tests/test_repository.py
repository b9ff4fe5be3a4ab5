"""Repository-level promises: CI runs the README's test command, configs load."""

import importlib
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands():
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```bash\n(.*?)\n```", quickstart, flags=re.S)


def test_readme_quickstart_has_exactly_two_commands():
  commands = readme_commands()
  assert len(commands) == 2
  assert all("\n" not in c for c in commands)
  assert "launch.train" in commands[0] and "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_exactly():
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    lines = [line.strip() for line in f]
  assert readme_commands()[1] in lines


@pytest.mark.parametrize("name", sorted(
    f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
    if f.endswith(".py") and not f.startswith("_")))
def test_every_config_is_valid_and_documented(name):
  from certjax.training import config as config_lib
  module = importlib.import_module(f"configs.{name}")
  assert "python -m launch." in module.__doc__ and "Expected result" in module.__doc__
  config = module.get_config()
  if "run_config" in config:  # a sweep over run configs (configs/backdoor_table.py)
    from certjax.training import backdoor_table  # pylint: disable=import-outside-toplevel
    backdoor_table.validate(config)
    for data in module.DATA:
      backdoor_table.validate(module.get_config(data))
    return
  config_lib.validate_config(config)


@pytest.mark.parametrize("name, arg", [
    (name, arg) for name in ("membership", "property", "inversion", "extraction")
    for arg in sorted(importlib.import_module(f"configs.{name}").DATA)]
    + [("property", "fashion_mnist,rotated"), ("extraction", "mnist_deep")])
def test_every_data_set_of_the_privacy_configs_is_valid(name, arg):
  from certjax.training import config as config_lib
  config = importlib.import_module(f"configs.{name}").get_config(arg)
  config_lib.validate_config(config)
  if name in ("membership", "property"):
    assert config.num_models > 1 and config.data.membership != "all"
