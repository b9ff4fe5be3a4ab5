"""Workdirs and processes of certjax runs: below both training and evaluation.

  checkpoints: config.json, orbax checkpoints, `restore_model(workdir)` onto
    the current mesh, `build_model(config, info)`, `resolve_step`.
  files: atomic JSON/text writes and JSON-lines logs, with their readers.
  progress: progress lines with rate and ETA.
  environment: the persistent compilation cache and quiet library logs.

The training loop writes workdirs and may call evaluators; evaluators restore
models from workdirs. Both import this package, and it imports neither.
"""

from certjax.runs.checkpoints import CHECKPOINT_DIR
from certjax.runs.checkpoints import CONFIG_FILE
from certjax.runs.checkpoints import TrainedModel
from certjax.runs.checkpoints import build_model
from certjax.runs.checkpoints import checkpoint_steps
from certjax.runs.checkpoints import config_to_dict
from certjax.runs.checkpoints import load_trained
from certjax.runs.checkpoints import make_manager
from certjax.runs.checkpoints import read_config
from certjax.runs.checkpoints import resolve_step
from certjax.runs.checkpoints import restore_latest
from certjax.runs.checkpoints import restore_model
from certjax.runs.checkpoints import restore_variables
from certjax.runs.checkpoints import write_config
from certjax.runs.environment import enable_compilation_cache
from certjax.runs.environment import quiet_library_logs
from certjax.runs.environment import subprocess_env
from certjax.runs.files import append_jsonl
from certjax.runs.files import atomic_write_json
from certjax.runs.files import atomic_write_text
from certjax.runs.files import read_json
from certjax.runs.files import read_jsonl
from certjax.runs.progress import Progress

__all__ = [
    "CHECKPOINT_DIR", "CONFIG_FILE", "Progress", "TrainedModel", "append_jsonl",
    "atomic_write_json", "atomic_write_text", "build_model", "checkpoint_steps",
    "config_to_dict", "enable_compilation_cache", "load_trained", "make_manager",
    "quiet_library_logs", "read_config", "read_json", "read_jsonl", "resolve_step",
    "restore_latest", "restore_model", "restore_variables", "subprocess_env", "write_config",
]
