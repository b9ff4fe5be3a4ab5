"""The architecture is enforced: import-linter's contracts in pyproject.toml hold,
and a wrong arrow breaks them."""

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lint_imports(root: str) -> subprocess.CompletedProcess:
  """`lint-imports` on the checkout at `root`, with its packages first on the path."""
  env = dict(os.environ, PYTHONPATH=root)
  script = "import sys; from importlinter.cli import lint_imports_command; " \
           "sys.exit(lint_imports_command())"
  return subprocess.run([sys.executable, "-c", script, "--no-cache"], cwd=root, env=env,
                        capture_output=True, text=True, timeout=120)


def test_contracts_hold():
  proc = lint_imports(ROOT)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  assert "Contracts: 2 kept, 0 broken." in proc.stdout


def test_an_algorithm_importing_training_breaks_both_contracts(tmp_path):
  for part in ("certjax", "launch", "pyproject.toml"):
    source = os.path.join(ROOT, part)
    if os.path.isdir(source):
      shutil.copytree(source, tmp_path / part,
                      ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
      shutil.copy(source, tmp_path / part)
  norms = tmp_path / "certjax" / "attacks" / "norms.py"
  norms.write_text(norms.read_text() + "\nfrom certjax.training import objectives  # wrong\n")
  proc = lint_imports(str(tmp_path))
  assert proc.returncode != 0
  assert "Contracts: 0 kept, 2 broken." in proc.stdout, proc.stdout[-3000:]
  assert "certjax.attacks.norms -> certjax.training.objectives" in proc.stdout
