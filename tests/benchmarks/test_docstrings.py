"""The commands in the benchmarks' docstrings name runnable modules.

`python benchmarks/smoothing.py` puts benchmarks/ itself, not the repository
root, on sys.path, so the script's `from benchmarks import common` fails
with `No module named 'benchmarks'`; the docstrings give the
`python -m benchmarks.<name>` form, which works from the repository root.
"""

import ast
import pathlib
import re

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if p.name != "__init__.py")


def _docstring(path: pathlib.Path) -> str:
  return ast.get_docstring(ast.parse(path.read_text())) or ""


def test_every_benchmark_is_found():
  assert {"smoothing.py", "bounds.py", "scaling.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_docstring_commands_use_module_form(path):
  doc = _docstring(path)
  # A path to the script (`python benchmarks/x.py`, `python3 ./benchmarks/x.py`).
  by_path = re.findall(r"python3?\s+\S*benchmarks/\w+\.py[^\n]*", doc)
  assert not by_path, f"{path.name}: use `python -m benchmarks.{path.stem}`: {by_path}"
  for module in re.findall(r"python3?\s+-m\s+benchmarks\.(\w+)", doc):
    assert (BENCHMARKS / f"{module}.py").is_file(), f"{path.name}: no benchmarks.{module}"
