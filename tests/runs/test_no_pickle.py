"""Loading never unpickles: no library code reads pickles, and a checkpoint restore runs none.

A pickle executes code of the file's choosing when it is read; checkpoints
and result files come from other people's machines. orbax stores arrays
through tensorstore and metadata as JSON, results are JSON, and numpy's
`np.load` refuses object arrays unless `allow_pickle=True` is passed.
"""

import _pickle
import ast
import os
import pickle

import jax.numpy as jnp
import numpy as np
import pytest

from certjax import runs
from certjax.runs import signing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCANNED = ("certjax", "launch", "benchmarks", "scripts")
# Modules whose loaders execute code from the data they read.
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve",
                    "marshal"}
# `<name>.load(...)` / `<name>.loads(...)` on these reads a pickle (torch.load does by default).
PICKLING_LOADERS = PICKLING_MODULES | {"torch"}


def pickle_reads(source: str) -> list[str]:
  """Where `source` imports a pickling module or calls a loader that unpickles."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found += [f"line {node.lineno}: import {a.name}" for a in node.names
                if a.name.split(".")[0] in PICKLING_MODULES]
    elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLING_MODULES:
      found.append(f"line {node.lineno}: from {node.module} import ...")
    elif isinstance(node, ast.Call):
      func = node.func
      if isinstance(func, ast.Attribute):
        if func.attr == "read_pickle":
          found.append(f"line {node.lineno}: .read_pickle(...)")
        base = func.value
        if func.attr in ("load", "loads", "Unpickler") and isinstance(base, ast.Name) \
            and base.id in PICKLING_LOADERS:
          found.append(f"line {node.lineno}: {base.id}.{func.attr}(...)")
      for keyword in node.keywords:
        if keyword.arg == "allow_pickle" and not (
            isinstance(keyword.value, ast.Constant) and keyword.value.value is False):
          found.append(f"line {node.lineno}: allow_pickle={ast.unparse(keyword.value)}")
  return found


@pytest.mark.parametrize("snippet", [
    "import pickle", "import cloudpickle as cp", "from dill import loads", "import joblib",
    "torch.load(path)", "np.load(path, allow_pickle=True)", "numpy.load(p, allow_pickle=flag)",
    "pd.read_pickle(path)", "pickle.Unpickler(f).load()",
])
def test_the_scanner_catches_each_way_of_reading_a_pickle(snippet):
  assert pickle_reads(snippet), snippet


def test_no_library_code_reads_a_pickle():
  found = []
  for top in SCANNED:
    for root, _, names in os.walk(os.path.join(ROOT, top)):
      for name in names:
        if name.endswith(".py"):
          path = os.path.join(root, name)
          with open(path) as f:
            found += [f"{os.path.relpath(path, ROOT)}, {hit}" for hit in pickle_reads(f.read())]
  assert not found, "Code that reads pickles:\n  " + "\n  ".join(found)


def test_checkpoint_restores_run_no_unpickler(tmp_path, monkeypatch):
  for name in list(os.environ):
    if name.startswith("CERTJAX_") and name != "CERTJAX_JAX_CACHE":
      monkeypatch.delenv(name)
  monkeypatch.setenv(signing.ENV_TRUST_DIR, str(tmp_path / "trust"))
  workdir = str(tmp_path)
  state = {"step": jnp.int32(3), "params": {"w": jnp.ones((2, 3))}, "model_state": {},
           "opt_state": {"mu": jnp.zeros((2, 3))}}
  manager = runs.make_manager(workdir, keep=2)
  runs.save_checkpoint(manager, 3, state, runs.policy_from_config(None))
  calls = []

  def refuse(name):
    def fn(*args, **kwargs):
      calls.append(name)
      raise AssertionError(f"{name} called while restoring a checkpoint")
    return fn

  for module in (pickle, _pickle):
    for attr in ("load", "loads", "Unpickler"):
      monkeypatch.setattr(module, attr, refuse(f"{module.__name__}.{attr}"))
  np_load = np.load
  monkeypatch.setattr(np, "load", lambda *a, **k: refuse("np.load(allow_pickle=True)")()
                      if k.get("allow_pickle") else np_load(*a, **k))
  with pytest.raises(AssertionError):  # the patch is live: an unpickler would be caught
    pickle.loads(pickle.dumps(1))
  calls.clear()
  variables = runs.restore_variables(workdir, 3)  # what every evaluator's restore runs
  np.testing.assert_array_equal(variables["params"]["w"], np.ones((2, 3)))
  resumed = runs.resume(manager, state)  # what a training resume runs
  np.testing.assert_array_equal(resumed.state["opt_state"]["mu"], np.zeros((2, 3)))
  manager.close()
  assert calls == []
