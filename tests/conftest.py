"""Shared pytest set-up: the JAX persistent compilation cache, and small runs.

Compile time dominates JAX tests on CPU, so every test process (pytest-xdist
workers and the subprocesses some tests start) shares one on-disk cache.
Small runs are the real config files at their 'smoke' scale
(`certjax.training.config.make_smoke`): `smoke_config` builds one,
`trained_run` trains it once per test process.
"""

import atexit
import functools
import importlib
import json
import shutil
import tempfile

from certjax.runs import environment

# $CERTJAX_JAX_CACHE (default ~/.cache/certjax/jax_cache), as launchers and notebooks use it.
environment.enable_compilation_cache()
environment.reuse_freed_host_memory()


def smoke_config(name: str = "mnist5k", arg: str = "", overrides=None):
  """`configs/<name>.py` at its smoke scale (`get_config('<arg>,smoke')`), then
  `overrides`, a dict of dotted keys ({'certify.n': 512, 'model.name': 'mlp'})."""
  module = importlib.import_module(f"configs.{name}")
  config = module.get_config(",".join(p for p in (arg, "smoke") if p))
  for key, value in (overrides or {}).items():
    node = config
    *parents, last = key.split(".")
    for parent in parents:
      node = node[parent]
    node[last] = value
  return config


def _freeze(overrides):
  # Values may be dicts (e.g. a whole objective): the cache key holds them as JSON.
  return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in (overrides or {}).items()))


@functools.lru_cache(maxsize=None)
def _trained(name, arg, frozen_overrides):
  from certjax.training import train as train_lib  # pylint: disable=import-outside-toplevel
  workdir = tempfile.mkdtemp(prefix=f"certjax_{name}_{arg or 'default'}_")
  atexit.register(shutil.rmtree, workdir, ignore_errors=True)
  config = smoke_config(name, arg, {k: json.loads(v) for k, v in frozen_overrides})
  return workdir, train_lib.train_and_evaluate(config, workdir)


def trained_run(name: str = "mnist5k", arg: str = "", overrides=None):
  """(workdir, TrainResult) of `smoke_config(name, arg, overrides)`, trained once
  per test process and shared by every test module that asks for the same run."""
  return _trained(name, arg, _freeze(overrides))
