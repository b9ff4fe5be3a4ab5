"""Helpers shared by the launch scripts.

Every launcher starts with `start(argv)`, which calls
`certjax.parallel.initialize_distributed()`: the same command runs on one
device, on all devices of one host, or as one process per host (or per GPU)
of a multi-host GPU cluster or TPU pod slice. launch/README.md explains how
to start each, how batch sizes relate to the device count, and where results
land.
"""

from __future__ import annotations

import logging as py_logging
import os
import sys
from typing import Callable

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

flags.DEFINE_bool("traceback", False,
                  "Show the full Python traceback of an error instead of its message alone.")


def run_reporting_errors(fn: Callable[[], object]) -> object:
  """Runs `fn`; a certjax input error is printed as one clear line and exit code 1.

  certjax raises ValueError/FileNotFoundError (TimeoutError for an unreachable
  multi-host coordinator) with messages naming the problem and the accepted
  values; a traceback through JAX internals adds nothing to
  them. `--traceback` shows it anyway.
  """
  try:
    return fn()
  except (ValueError, FileNotFoundError, NotImplementedError, FloatingPointError,
          TimeoutError) as e:
    if flags.FLAGS.traceback:
      raise
    print(f"certjax error: {e}\n(run with --traceback for the full traceback)",
          file=sys.stderr)
    sys.exit(1)


class _OwnInfoOnly(py_logging.Filter):
  """Keeps INFO lines from certjax and launch; libraries' only from WARNING up.

  orbax alone logs a dozen INFO lines per checkpoint, which would bury the
  progress line.
  """

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      return True
    path = record.pathname.replace(os.sep, "/")
    return "/certjax/" in path or "/launch/" in path


def quiet_library_logs() -> None:
  logging.get_absl_handler().addFilter(_OwnInfoOnly())


def define_config_and_workdir(config_help: str, workdir_help: str) -> None:
  """The two flags every launcher takes: --config (locked) and --workdir."""
  config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
  flags.DEFINE_string("workdir", None, workdir_help)
  flags.mark_flags_as_required(["config", "workdir"])


def start(argv: list[str]) -> None:
  """Start-up shared by the launchers' main(): argument check, quiet library
  logs, and `jax.distributed.initialize()` on multi-host runs (bad CERTJAX_*
  variables or an unreachable coordinator end the run with one clear line)."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  quiet_library_logs()
  from certjax import parallel  # pylint: disable=g-import-not-at-top
  run_reporting_errors(parallel.initialize_distributed)
