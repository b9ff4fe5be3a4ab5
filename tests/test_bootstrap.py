"""scripts/bootstrap.py: the pip wheel's sha256 check and the progress output.

The package index is a directory served through file:// URLs (the layout of
PyPI's JSON API), so nothing is downloaded; pip itself is never run.
"""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests._load import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEEL = "pip-99.0-py3-none-any.whl"


@pytest.fixture
def bootstrap():
  return load_file(os.path.join("scripts", "bootstrap.py"), "bootstrap_under_test")


@pytest.fixture
def index(tmp_path, monkeypatch):
  """Writes a fake index under tmp_path; returns a function setting pip's digest."""
  content = b"not really a wheel"
  (tmp_path / "packages").mkdir()
  (tmp_path / "packages" / WHEEL).write_bytes(content)
  (tmp_path / "pypi" / "pip").mkdir(parents=True)
  monkeypatch.setenv("PIP_INDEX_URL", f"file://{tmp_path}/simple/")

  def publish(sha256):
    entry = {"filename": WHEEL, "url": f"../../packages/{WHEEL}", "size": len(content)}
    if sha256 is not None:
      entry["digests"] = {"sha256": sha256}
    other = {"filename": "pip-99.0.tar.gz", "url": "../../packages/pip-99.0.tar.gz"}
    (tmp_path / "pypi" / "pip" / "json").write_text(json.dumps({"urls": [other, entry]}))

  publish.sha256 = hashlib.sha256(content).hexdigest()
  publish.content = content
  return publish


@pytest.fixture
def pip_runs(bootstrap, monkeypatch):
  """The commands bootstrap runs (none is run), with the wheel's bytes at that time."""
  runs = []

  def run(command, **kwargs):
    wheel = pathlib.Path(command[-1])
    runs.append((command, wheel.read_bytes() if wheel.is_file() else None))
    return subprocess.CompletedProcess(command, 0)

  monkeypatch.setattr(bootstrap.subprocess, "run", run)
  return runs


def test_pip_wheel_with_matching_sha256_is_installed(bootstrap, index, pip_runs, capsys):
  index(index.sha256)
  bootstrap.install_pip_from_wheel("/venv/bin/python")
  [(command, wheel_bytes)] = pip_runs
  assert command[:2] == ["/venv/bin/python", os.path.join(command[-1], "pip")]
  assert command[-1].endswith(WHEEL) and wheel_bytes == index.content
  out = capsys.readouterr().out
  assert f"bootstrap: downloading {WHEEL} (0.0 MB)" in out
  assert f"bootstrap: sha256 verified ({index.sha256[:16]}...)" in out


@pytest.mark.parametrize("published, message", [
    ("0" * 64, "does not match the sha256 the package index gives"),
    (None, f"the package index gives no sha256 for {WHEEL}"),
])
def test_pip_wheel_without_matching_sha256_installs_nothing(bootstrap, index, pip_runs,
                                                           published, message):
  index(published)
  with pytest.raises(SystemExit) as e:
    bootstrap.install_pip_from_wheel("/venv/bin/python")
  assert message in str(e.value) and "Nothing was installed" in str(e.value)
  if published:
    assert f"expected {published}, got {index.sha256}" in str(e.value)
  assert not pip_runs


FAKE_PIP = """
import sys
assert sys.argv[-1] == "--progress-bar=off", sys.argv
for line in ("Obtaining file:///repo", "Collecting jax>=0.6", "  Downloading jax.whl (2 MB)",
             "Requirement already satisfied: numpy", "Processing /wheels/six.whl",
             "WARNING: Location 'file:///mirror/simple/six/' is ignored: it is neither a "
             "file nor a directory.", "WARNING: certjax does not provide the extra 'tset'",
             "Installing collected packages: jax", "Successfully installed jax-0.10"):
  print(line)
sys.exit(int(sys.argv[1]))
"""


def test_pip_progress_in_a_log_is_one_line_per_package(bootstrap, capsys):
  assert bootstrap.run_pip([sys.executable, "-c", FAKE_PIP, "0"], interactive=False) == 0
  out = capsys.readouterr().out
  assert out.splitlines() == [
      "  Collecting jax>=0.6", "  Processing /wheels/six.whl",
      "  WARNING: certjax does not provide the extra 'tset'",
      "  Installing collected packages: jax", "  Successfully installed jax-0.10"]


def test_pip_failure_shows_all_of_its_output(bootstrap, capsys):
  assert bootstrap.run_pip([sys.executable, "-c", FAKE_PIP, "3"], interactive=False) == 3
  out = capsys.readouterr().out
  assert "Requirement already satisfied: numpy" in out and "Downloading jax.whl" in out


def test_main_says_what_it_does(bootstrap, tmp_path, monkeypatch, capsys):
  # An existing environment whose python answers `-m pip --version`.
  python = tmp_path / "venv" / "bin" / "python"
  python.parent.mkdir(parents=True)
  python.write_text("#!/bin/sh\nexit 0\n")
  python.chmod(0o755)
  commands = []
  monkeypatch.setattr(bootstrap, "run_pip", lambda command: commands.append(command) or 0)
  monkeypatch.setattr(sys, "argv", ["bootstrap.py", "--venv", str(tmp_path / "venv"),
                                    "--extras", "test"])
  bootstrap.main()
  assert commands == [[str(python), "-m", "pip", "install", "--disable-pip-version-check",
                       "-e", f"{bootstrap.ROOT}[test]"]]
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == f"bootstrap: reusing the environment {tmp_path / 'venv'}"
  assert lines[1].startswith(f"bootstrap: installing {bootstrap.ROOT}[test] and its "
                             "dependencies")
  assert lines[2].startswith("bootstrap: done in ") and len(lines) == 3
