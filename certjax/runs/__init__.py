"""Workdirs and processes of certjax runs: below both training and evaluation.

  checkpoints: config.json, orbax checkpoints, `restore_model(workdir)` onto
    the current mesh, `restore_models(workdir)` for the K models of a
    many-models run, `build_model(config, info)` (behind
    `model_input_transform(config)` when it has one), `resolve_step`; every
    restore verifies the checkpoint first.
  signing: signed checkpoints (a manifest of file hashes signed with an EC
    key through sigstore's model-signing), keys, trust store, policy.
  provenance: config hash, package versions, git commit, data hashes,
    devices; `<workdir>/provenance.json`.
  files: atomic JSON/text writes and JSON-lines logs, with their readers.
  progress: progress lines with rate and ETA.
  environment: the persistent compilation cache and quiet library logs.

The training loop writes workdirs and may call evaluators; evaluators restore
models from workdirs. Both import this package, and it imports neither.
"""

from certjax.runs.checkpoints import CHECKPOINT_DIR
from certjax.runs.checkpoints import CONFIG_FILE
from certjax.runs.checkpoints import Resumed
from certjax.runs.checkpoints import TrainedModel
from certjax.runs.checkpoints import TrainedModels
from certjax.runs.checkpoints import build_model
from certjax.runs.checkpoints import checkpoint_steps
from certjax.runs.checkpoints import config_to_dict
from certjax.runs.checkpoints import load_trained
from certjax.runs.checkpoints import make_manager
from certjax.runs.checkpoints import model_input_transform
from certjax.runs.checkpoints import read_config
from certjax.runs.checkpoints import resolve_step
from certjax.runs.checkpoints import restore_latest
from certjax.runs.checkpoints import restore_model
from certjax.runs.checkpoints import restore_models
from certjax.runs.checkpoints import restore_variables
from certjax.runs.checkpoints import resume
from certjax.runs.checkpoints import save_checkpoint
from certjax.runs.checkpoints import sign_step
from certjax.runs.checkpoints import step_directory
from certjax.runs.checkpoints import verify_checkpoint
from certjax.runs.checkpoints import verify_step
from certjax.runs.checkpoints import write_config
from certjax.runs.environment import enable_compilation_cache
from certjax.runs.environment import quiet_library_logs
from certjax.runs.environment import reuse_freed_host_memory
from certjax.runs.environment import subprocess_env
from certjax.runs.files import append_jsonl
from certjax.runs.files import atomic_write_json
from certjax.runs.files import atomic_write_text
from certjax.runs.files import read_json
from certjax.runs.files import read_jsonl
from certjax.runs.progress import Progress
from certjax.runs.signing import CheckpointVerificationError
from certjax.runs.signing import SigningPolicy
from certjax.runs.signing import policy_from_config

__all__ = [
    "CHECKPOINT_DIR", "CONFIG_FILE", "CheckpointVerificationError", "Progress", "Resumed",
    "SigningPolicy", "TrainedModel", "TrainedModels", "append_jsonl", "atomic_write_json", "atomic_write_text",
    "build_model", "checkpoint_steps", "config_to_dict", "enable_compilation_cache",
    "load_trained", "make_manager", "model_input_transform", "policy_from_config",
    "quiet_library_logs", "read_config", "reuse_freed_host_memory",
    "read_json", "read_jsonl", "resolve_step", "restore_latest", "restore_model", "restore_models",
    "restore_variables", "resume", "save_checkpoint", "sign_step", "step_directory",
    "subprocess_env", "verify_checkpoint", "verify_step", "write_config",
]
