"""Creates ./.venv and installs certjax into it, using only the standard library.

    python3 scripts/bootstrap.py                 # certjax and its dependencies
    python3 scripts/bootstrap.py --extras test   # plus the test tools

Works on a fresh Debian machine that has only `python3` (3.11+): Debian ships
Python without `ensurepip` unless `python3-venv` is installed, so when
`venv` cannot provide pip, the environment is created without it and pip is
installed from its wheel, fetched from the package index (PyPI, or
$PIP_INDEX_URL) and checked against the sha256 the index gives for it.
Re-running reuses the environment and only installs what is missing.

It prints one line per step and, while pip works, pip's progress: on a
terminal pip's own output, elsewhere (CI logs) one line per package.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import venv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# pip's output lines worth a line in a log that is not a terminal (CI): one per
# package fetched (from an index, or a local file or wheel directory), the
# summary, and problems; the rest is shown only if pip fails.
PIP_LOG_PREFIXES = ("Collecting ", "Processing ", "Installing collected packages",
                    "Successfully installed", "ERROR", "WARNING")
# Except pip's notes on index directories that lack a package, one per package
# and extra index: they would outnumber every other line.
PIP_LOG_SKIPPED = ("WARNING: Location ",)


def say(message: str) -> None:
  print(f"bootstrap: {message}", flush=True)


def _venv_python(path: str) -> str:
  return os.path.join(path, "bin", "python")


def _has_pip(python: str) -> bool:
  return subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode == 0


def _pip_json_url() -> str:
  index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
  return index[: -len("/simple")] + "/pypi/pip/json" if index.endswith("/simple") \
      else "https://pypi.org/pypi/pip/json"


def download_verified(url: str, sha256: str, path: str) -> None:
  """Downloads `url` to `path`; exits (removing the file) unless its sha256 matches.

  Args:
    url: what to download.
    sha256: the expected hex digest, as the index's JSON gives it.
    path: where to write the file.
  """
  digest = hashlib.sha256()
  with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as f:
    while chunk := response.read(1 << 20):
      digest.update(chunk)
      f.write(chunk)
  if digest.hexdigest() != sha256.lower():
    os.remove(path)
    sys.exit(f"bootstrap: the file downloaded from {url} does not match the sha256 the "
             f"package index gives for it (expected {sha256}, got {digest.hexdigest()}): "
             "a corrupted download or a tampered mirror. Nothing was installed; try again, "
             "or install pip another way (Debian: apt-get install python3-venv).")


def install_pip_from_wheel(python: str) -> None:
  """Installs pip into the venv from the newest pip wheel on the index.

  The wheel's sha256 is checked against the index's JSON before pip runs.
  """
  json_url = _pip_json_url()
  say(f"the environment has no pip (Debian's Python without python3-venv); looking up "
      f"pip's wheel at {json_url}")
  with urllib.request.urlopen(json_url, timeout=60) as response:
    release = json.load(response)
  wheel = next(u for u in release["urls"] if u["filename"].endswith("-py3-none-any.whl"))
  sha256 = (wheel.get("digests") or {}).get("sha256")
  if not sha256:
    sys.exit(f"bootstrap: the package index gives no sha256 for {wheel['filename']} "
             f"({json_url}), so the download cannot be checked. Nothing was installed; "
             "install pip another way (Debian: apt-get install python3-venv).")
  # Mirrors may answer with URLs relative to the JSON document.
  url = urllib.parse.urljoin(json_url, wheel["url"])
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, wheel["filename"])
    size = f" ({wheel['size'] / 1e6:.1f} MB)" if wheel.get("size") else ""
    say(f"downloading {wheel['filename']}{size}")
    download_verified(url, sha256, path)
    say(f"sha256 verified ({sha256[:16]}...); installing pip into the environment")
    # A pip wheel is importable as a zip: run pip from it to install itself.
    subprocess.run([python, os.path.join(path, "pip"), "install", "--quiet", path], check=True)


def run_pip(command: list[str], interactive: bool | None = None) -> int:
  """Runs a pip command so that progress shows without flooding a CI log.

  On a terminal pip's own output (progress bars included) goes straight
  through. Elsewhere only the lines starting with `PIP_LOG_PREFIXES` (and not
  `PIP_LOG_SKIPPED`) are printed, about one per package, and the end of pip's
  output if it fails.

  Args:
    command: the pip command line.
    interactive: whether stdout is a terminal (default: asks sys.stdout).

  Returns:
    pip's exit code.
  """
  if interactive is None:
    interactive = sys.stdout.isatty()
  if interactive:
    return subprocess.run(command).returncode
  proc = subprocess.Popen([*command, "--progress-bar=off"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith(PIP_LOG_PREFIXES) and not line.startswith(PIP_LOG_SKIPPED):
      print(f"  {line.rstrip()}", flush=True)
  code = proc.wait()
  if code:
    print("".join(lines[-200:]), end="", flush=True)
  return code


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--extras", default="", help="comma-separated extras, e.g. 'test'")
  parser.add_argument("--venv", default=os.path.join(ROOT, ".venv"))
  parser.add_argument("--no-ensurepip", action="store_true",
                      help="behave as on Debian without python3-venv (for testing)")
  args = parser.parse_args()

  if sys.version_info < (3, 11):
    sys.exit(f"certjax needs Python >= 3.11; this is {sys.version.split()[0]}.")
  start = time.time()
  python = _venv_python(args.venv)
  if not os.path.exists(python):
    say(f"creating the environment {args.venv} (Python {sys.version.split()[0]})")
    try:
      if args.no_ensurepip:
        raise ImportError("ensurepip disabled by --no-ensurepip")
      import ensurepip  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
      venv.create(args.venv, with_pip=True)
    except (ImportError, subprocess.CalledProcessError):
      venv.create(args.venv, with_pip=False, clear=True)
  else:
    say(f"reusing the environment {args.venv}")
  if not _has_pip(python):
    install_pip_from_wheel(python)
  target = ROOT + (f"[{args.extras}]" if args.extras else "")
  say(f"installing {target} and its dependencies into {args.venv} with pip (a few minutes "
      "on a fresh machine, seconds when they are installed already)")
  code = run_pip([python, "-m", "pip", "install", "--disable-pip-version-check", "-e", target])
  if code:
    sys.exit(f"bootstrap: pip failed (exit code {code}); its output is above.")
  say(f"done in {time.time() - start:.0f} s; run certjax with {python}")


if __name__ == "__main__":
  main()
