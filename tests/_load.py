"""Loads a Python file of the repository that is not a package module (scripts, notebooks' glue)."""

import importlib.util
import os
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_file(relative_path: str, name: str) -> types.ModuleType:
  """Executes `<repository>/<relative_path>` as a fresh module named `name`."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relative_path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
