"""Process set-up shared by the launchers, the notebooks and the tests.

* `enable_compilation_cache()`: JAX's persistent compilation cache in
  $CERTJAX_JAX_CACHE (default ~/.cache/certjax/jax_cache). Compilation
  dominates short JAX runs on CPU; a re-run skips most of it.
* `quiet_library_logs()`: keeps INFO lines of certjax and the launchers, and
  only warnings and errors of every other library (orbax alone logs a dozen
  INFO lines per checkpoint, which would bury the progress line).
* `reuse_freed_host_memory()`: tells glibc's malloc to keep freed memory for
  the next allocation instead of returning it to the kernel, which on a CPU
  backend made every jitted step pay page faults on its large temporaries.
"""

from __future__ import annotations

import functools
import logging as py_logging
import os

CACHE_ENV = "CERTJAX_JAX_CACHE"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "certjax", "jax_cache")
# Loggers whose INFO lines are ours. absl's own logger ('absl') carries what
# certjax code logs through `absl.logging`; library code logging through absl
# (orbax does) is told apart by the file the record comes from.
OWN_LOGGER_PREFIXES = ("certjax", "launch", "benchmarks", "__main__")


# glibc mallopt parameters (malloc.h) and the values set: blocks up to 1 GiB
# come from the heap, and up to 1 GiB of free memory at its top is kept.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 1 << 30
HOST_MEMORY_ENV = "CERTJAX_RETURN_FREED_MEMORY"


@functools.cache
def reuse_freed_host_memory() -> bool:
  """Makes freed host memory reusable without page faults (glibc only); True if done.

  XLA:CPU allocates each jitted call's temporaries and outputs with malloc.
  glibc serves any block above its mmap threshold (at most 32 MiB) with a
  fresh mmap and unmaps it on free, and trims the heap's free top back to
  the kernel, so a step whose buffers are tens of MiB (K stacked models'
  gradients and optimizer state, a batch of many models' inputs) faults
  every page of them in again on every call: converting a [128, 100, 784]
  uint8 batch to float32 took 18 ms instead of 1.4-2.4 ms, and a
  32-model MLP training step ran 2.4x slower (measured on the 2-core
  machine, benchmarks/many_models.py). Raising both thresholds to 1 GiB
  keeps that memory in the process for the next step; peak memory is
  unchanged, the process just returns less of it between steps.

  Does nothing (returns False) where malloc is not glibc's, or when
  $CERTJAX_RETURN_FREED_MEMORY=1 asks for the default behaviour. Idempotent.
  """
  if os.environ.get(HOST_MEMORY_ENV, "0") == "1":
    return False
  try:
    import ctypes  # pylint: disable=import-outside-toplevel
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
    return False
  return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES) and mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))


def cache_directory() -> str:
  """$CERTJAX_JAX_CACHE, or ~/.cache/certjax/jax_cache (also stored in the environment)."""
  return os.environ.setdefault(CACHE_ENV, os.path.expanduser(DEFAULT_CACHE_DIR))


def enable_compilation_cache(directory: str | None = None) -> str:
  """Turns on JAX's persistent compilation cache; returns its directory.

  Child processes started afterwards inherit it through JAX's environment
  variables (`subprocess_env`).
  """
  import jax  # pylint: disable=import-outside-toplevel
  directory = directory or cache_directory()
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory


def subprocess_env(root: str | None = None, environ: dict[str, str] | None = None
                   ) -> dict[str, str]:
  """Environment for a child process: `root` first on PYTHONPATH, the same compilation cache."""
  env = dict(os.environ if environ is None else environ)
  if root:
    env["PYTHONPATH"] = os.pathsep.join(
        [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root])
  cache = env.setdefault(CACHE_ENV, os.path.expanduser(DEFAULT_CACHE_DIR))
  env.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  return env


def _module_of(record: py_logging.LogRecord) -> str:
  """The dotted module a record was logged from, as found on sys.modules, else ''."""
  import sys  # pylint: disable=import-outside-toplevel
  path = os.path.abspath(record.pathname)
  for name, module in list(sys.modules.items()):
    if getattr(module, "__file__", None) and os.path.abspath(module.__file__) == path:
      return name
  return ""


class OwnInfoOnly(py_logging.Filter):
  """Passes WARNING and above from anyone, INFO and below only from certjax's code.

  Whose a record is comes from its logger name, or for records logged through
  absl's shared 'absl' logger, from the module that logged it, never from its
  file path: a checkout named `certjax` holds a `.venv` whose libraries would
  otherwise all pass.
  """

  def __init__(self):
    super().__init__()
    self._cache: dict[str, bool] = {}

  def _own(self, name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in OWN_LOGGER_PREFIXES)

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      return True
    if record.name != "absl":
      return self._own(record.name)
    key = record.pathname
    if key not in self._cache:
      self._cache[key] = self._own(_module_of(record))
    return self._cache[key]


def quiet_library_logs() -> None:
  """Installs `OwnInfoOnly` on absl's handler and the root logger's handlers (once)."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  handlers = [absl_logging.get_absl_handler(), *py_logging.getLogger().handlers]
  for handler in handlers:
    if not any(isinstance(f, OwnInfoOnly) for f in handler.filters):
      handler.addFilter(OwnInfoOnly())
