"""Helpers shared by the launch scripts.

Every launcher starts with `start(argv)`, which calls
`certjax.parallel.initialize_distributed()`: the same command runs on one
device, on all devices of one host, or as one process per host (or per GPU)
of a multi-host GPU cluster or TPU pod slice. launch/README.md explains how
to start each, how batch sizes relate to the device count, and where results
land.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import traceback
from typing import Any, Callable, Mapping, Sequence

import ml_collections
from absl import app
from absl import flags
from ml_collections import config_flags

flags.DEFINE_bool("traceback", False,
                  "Show the full Python traceback of an error instead of its message alone.")

# absl's --help lists the key flags of the main module only, and a flag is key
# to the module that defines it: without this, the flags defined below on the
# launchers' behalf would be listed by --helpfull alone. Disclaimed, they are
# key to the launcher that calls define_config_and_workdir.
flags.disclaim_key_flags()

# The errors certjax raises for bad input, with messages that name the problem
# and the accepted values.
_INPUT_ERRORS = (ValueError, FileNotFoundError, NotImplementedError, FloatingPointError,
                 TimeoutError)


def _is_multi_process() -> bool:
  # certjax.parallel is imported by start(); without it there are no peers.
  parallel = sys.modules.get("certjax.parallel")
  return parallel is not None and parallel.is_multi_process()


def _end_run(message: str) -> None:
  """Exits with code 1; in a multi-process run, after telling the peers `message`.

  The peers would otherwise wait in a collective or in jax.distributed's
  shutdown barrier for minutes; `os._exit` skips that barrier here, for the
  same reason.
  """
  if _is_multi_process() and sys.modules["certjax.parallel"].report_failure(message):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access
  sys.exit(1)


def run_reporting_errors(fn: Callable[[], object]) -> object:
  """Runs `fn`; a certjax input error is printed as one clear line and exit code 1.

  certjax raises ValueError/FileNotFoundError (TimeoutError for an unreachable
  multi-host coordinator) with messages naming the problem and the accepted
  values; a traceback through JAX internals adds nothing to
  them. `--traceback` shows it anyway.

  In a multi-process run any error (also one with a traceback) is sent to the
  other processes, which print `certjax error on process <k>: <message>` and
  stop as well (`certjax.parallel.report_failure`), instead of waiting for
  this process until a timeout.
  """
  try:
    return fn()
  except _INPUT_ERRORS as e:
    if flags.FLAGS.traceback:
      if not _is_multi_process():
        raise
      traceback.print_exc()
    else:
      print(f"certjax error: {e}\n(run with --traceback for the full traceback)",
            file=sys.stderr)
    _end_run(str(e))
  except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
    if not _is_multi_process():
      raise
    traceback.print_exc()
    _end_run(f"{type(e).__name__}: {e}")
  return None  # not reached: _end_run exits


# --------------------------------------------------------------- config flag


def _override_paths(argv: Sequence[str], name: str) -> list[str]:
  """The config paths overridden on the command line (`--config.a.b=1` -> 'a.b').

  The same pattern as ml_collections' config_flags, which defines one flag
  per override while parsing the config flag.
  """
  paths = []
  for arg in argv:
    if arg == "--":
      break
    if re.match(rf"-{{1,2}}(no)?{re.escape(name)}\.", arg):
      paths.append(arg.split("=", 1)[0].split(".", 1)[1])
  return paths


def _close_keys(key: str, keys: Sequence[str]) -> list[str]:
  """Keys that `key` may be a typo or an abbreviation of, best first."""
  close = difflib.get_close_matches(key, keys, n=1)
  # difflib misses abbreviations ('eps' for 'eps_list', 'rate' for 'learning_rate').
  close += [k for k in keys
            if key and k not in close and (k.startswith(key) or key in k.split("_"))]
  return close[:3]


def override_error(config: Any, path: str, name: str = "config") -> str | None:
  """Why the override `--<name>.<path>` names no key of `config`, or None.

  Args:
    config: the loaded config (a ConfigDict).
    path: the dotted path after `<name>.`, e.g. 'optimizer.learnig_rate'.
    name: the config flag's name.

  Returns:
    One line naming the missing key, the accepted keys at that level and the
    closest ones; None when every key on the path exists (paths through list
    indices or non-dict values are left to ml_collections).
  """
  node, where = config, name
  for part in path.split("."):
    key = part.split("[", 1)[0]
    if not isinstance(node, (ml_collections.ConfigDict, Mapping)):
      if node is None:
        return None  # may be a ConfigDict-typed placeholder, which ml_collections fills
      return (f"--{name}.{path}: {where} is {node!r} ({type(node).__name__}), not a "
              f"group of keys, so it has no key {key!r}.")
    keys = [str(k) for k in node.keys()]
    if key not in keys:
      close = _close_keys(key, keys)
      hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
      accepted = ", ".join(keys) if keys else "(none)"
      return (f"--{name}.{path}: {where} has no key {key!r}.{hint} "
              f"Accepted keys of {where}: {accepted}.")
    if key != part:
      return None  # an index into a list or tuple: ml_collections checks it
    node, where = node[key], f"{where}.{key}"
  return None


class CheckedConfigParser(flags.ArgumentParser):
  """Wraps the config flag's parser: the same config, then a check of the overrides.

  ml_collections resolves `--config.a.b=...` while absl parses the flags,
  before main, and a key that does not exist ends there with a long
  traceback (or a bare `AttributeError: "'b'"`). This parser checks every
  override's keys right after loading the file and stops the program with
  one line (`certjax error: ...`, exit code 1) naming the key, the accepted
  keys and the closest match; the same for a config file that does not exist.

  Args:
    inner: the parser ml_collections gave the flag (loads the file).
    name: the flag's name ('config').
    argv: returns the command line to read the overrides from (default:
      sys.argv with --flagfile expanded, as ml_collections reads it).
  """

  def __init__(self, inner: flags.ArgumentParser, name: str,
               argv: Callable[[], Sequence[str]] | None = None):
    self._inner = inner
    self._name = name
    self._argv = argv or (lambda: flags.FLAGS.read_flags_from_files(sys.argv, force_gnu=False))

  def parse(self, argument):
    filename = argument.split(":", 1)[0] if isinstance(argument, str) else ""
    if filename and not os.path.isfile(filename):
      _exit_with(f"--{self._name}={argument}: no config file {filename!r} (from "
                 f"{os.getcwd()}).{_close_file_hint(filename)}")
    config = self._inner.parse(argument)
    for override in _override_paths(self._argv(), self._name):
      error = override_error(config, override, self._name)
      if error:
        _exit_with(error)
    return config

  def flag_type(self) -> str:
    return self._inner.flag_type()


def _close_file_hint(filename: str) -> str:
  directory = os.path.dirname(filename)
  names = sorted(f for f in os.listdir(directory or ".") if f.endswith(".py")) \
      if os.path.isdir(directory or ".") else []
  close = difflib.get_close_matches(os.path.basename(filename), names, n=1)
  return f" Did you mean {os.path.join(directory, close[0])!r}?" if close else ""


def _exit_with(message: str) -> None:
  # SystemExit with a message: one line on stderr and exit code 1. An absl
  # flags error would add a usage line, any other exception a traceback.
  raise SystemExit(f"certjax error: {message}")


def quiet_library_logs() -> None:
  """INFO lines of certjax and the launchers only; libraries' from WARNING up
  (orbax alone logs a dozen INFO lines per checkpoint, which would bury the
  progress line). Told apart by logger and module, never by file path
  (`certjax.runs.environment.OwnInfoOnly`)."""
  from certjax.runs import environment  # pylint: disable=g-import-not-at-top
  environment.quiet_library_logs()


def define_config_and_workdir(config_help: str, workdir_help: str, *,
                              required: bool = True) -> None:
  """The two flags every launcher takes: --config (locked) and --workdir.

  A mistyped override key (`--config.optimizer.learnig_rate=...`) or a
  missing config file stops the program while flags are parsed, with one
  line naming the accepted keys (`CheckedConfigParser`). The flags, and
  --traceback, are key flags of the calling launcher, so its `--help` lists
  them. `required=False` for launchers with commands that need neither
  (`launch.sign keygen`).
  """
  holder = config_flags.DEFINE_config_file(
      "config", None,
      f"{config_help} Override any of its keys with --config.<key>=<value>, e.g. "
      "--config.optimizer.learning_rate=0.01.", lock_config=True)
  # DEFINE_config_file takes no parser; `parser` is the attribute of absl's
  # Flag that parsing calls, and the override flags are made after it returns.
  flag = flags.FLAGS[holder.name]
  flag.parser = CheckedConfigParser(flag.parser, holder.name)
  flags.DEFINE_string("workdir", None, workdir_help)
  if required:
    flags.mark_flags_as_required(["config", "workdir"])
  for name in ("config", "workdir", "traceback"):
    flags.declare_key_flag(name)


def start(argv: list[str]) -> None:
  """Start-up shared by the launchers' main(): argument check, quiet library
  logs, freed host memory kept for reuse (`certjax.runs.environment`), and
  `jax.distributed.initialize()` on multi-host runs (bad CERTJAX_* variables
  or an unreachable coordinator end the run with one clear line)."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  quiet_library_logs()
  from certjax.runs import environment  # pylint: disable=g-import-not-at-top
  environment.reuse_freed_host_memory()
  from certjax import parallel  # pylint: disable=g-import-not-at-top
  run_reporting_errors(parallel.initialize_distributed)
