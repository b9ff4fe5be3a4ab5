"""The accelerator suite cannot rot while no GPU is around: its smoke run executes every
part, writes what the readers expect, and imports only what the lent machine has or
the wheel step carries."""

import importlib.metadata
import json
import os
import subprocess
import sys
import zipfile

from benchmarks import accelerator_suite
from benchmarks import accelerator_wheels
from benchmarks import reports

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = """
import json, sys
from benchmarks import accelerator_suite
accelerator_suite.main(["--smoke", "--out", sys.argv[1]])
print("IMPORTED " + json.dumps(sorted({m.split(".")[0] for m in sys.modules
                                       if not m.startswith("_")})))
"""


def test_smoke_run_measures_every_family_within_the_machines_packages(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ.get("CERTJAX_JAX_CACHE", ""))
  proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  files = sorted(os.listdir(tmp_path))
  assert files == ["attacks.json", "bounds.json", "smoothing_bfloat16.json",
                   "smoothing_float32.json", "summary.md", "training.json"]
  assert len(files) <= 8  # all of them come back from a lease
  found, notes = reports.load_benchmarks({"accelerator": str(tmp_path)})
  assert notes == [] and {r.kind for r in found} == {"training", "attacks", "bounds",
                                                     "smoothing"}
  for report in found:
    assert report.data["environment"]["device_kind"] and report.data["skipped"] == []
    assert report.data["errors"] == [], report.data["errors"]
  by_name = {os.path.basename(r.path): r.data for r in found}
  for dtype in ("float32", "bfloat16"):
    smoothing = by_name[f"smoothing_{dtype}.json"]
    assert smoothing["dtype"] == dtype and smoothing["certify_seconds_per_image"] > 0
    assert 0 < smoothing["ratio_smoothing_to_forward"]
  assert {(r["case"], r["compute_dtype"]) for r in by_name["training.json"]["results"]} == {
      ("quickstart_ibp_small", "float32"), ("quickstart_ibp_small", "bfloat16")}
  assert set(by_name["attacks.json"]["certjax"]["mlp_mnist"]["ratio_to_fwd_bwd_x10"]) == {
      "pgd10", "apgd10"}
  # Every figure appears in the summary, and what certjax cannot measure yet is said.
  summary = (tmp_path / "summary.md").read_text()
  assert summary.count("\n* ") == 6 and "DP-SGD" in summary
  # Imports: only what the lent machine has, the wheels carried to it, and certjax.
  imported = json.loads(proc.stdout.split("IMPORTED ", 1)[1].splitlines()[0])
  distributions = importlib.metadata.packages_distributions()
  allowed = (accelerator_wheels.DEVICE_PACKAGES
             | {accelerator_wheels.normalize(r) for r in accelerator_wheels.ROOTS}
             | {"certjax"})
  outside = {}
  for module in imported:
    owners = {accelerator_wheels.normalize(d) for d in distributions.get(module, [])}
    if owners and not owners & allowed:
      outside[module] = sorted(owners)
  assert not outside, f"the suite imports packages the lent machine lacks: {outside}"


def test_no_budget_skips_every_figure_and_says_why(tmp_path):
  written = accelerator_suite.run(str(tmp_path), accelerator_suite.SMOKE, "smoke", 0.0)
  assert written == {}
  summary = (tmp_path / "summary.md").read_text()
  assert "Skipped (budget):" in summary
  # smoothing x 2 dtypes, training 1 case x 2 dtypes, attacks 1, bounds 1.
  assert summary.count("the whole budget of 0 s was spent") == 6


def test_wheel_check_names_what_is_missing(tmp_path):
  assert accelerator_wheels.check(str(tmp_path)) == [
      f"no wheels in {tmp_path}: run python -m benchmarks.accelerator_wheels"]
  # A wheel for another Python, a requirement nobody provides, a root missing.
  with zipfile.ZipFile(tmp_path / "grain-0.2.18-cp311-cp311-manylinux_2_28_x86_64.whl",
                       "w") as wheel:
    wheel.writestr("grain-0.2.18.dist-info/METADATA",
                   "Name: grain\nRequires-Dist: absl-py\nRequires-Dist: nosuchthing>=1\n"
                   "Requires-Dist: pywin32; sys_platform == 'win32'\n")
  problems = accelerator_wheels.check(str(tmp_path))
  assert any("is not for CPython 3.12" in p for p in problems)
  assert "ml_collections is missing" in problems
  needs = [p for p in problems if " needs " in p]
  # absl-py is on the machine; pywin32's marker does not apply on Linux.
  assert needs == ["grain-0.2.18-cp311-cp311-manylinux_2_28_x86_64.whl needs nosuchthing, "
                   "neither carried nor on the machine"]
