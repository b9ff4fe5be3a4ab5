"""Workdirs of training runs: config.json, orbax checkpoints, models restored from them.

This sits below both the training loop and the evaluators: the loop writes a
workdir and resumes from it; evaluators (and notebooks) restore a trained
model from it. Neither imports the other for that.

Layout of a workdir:
  config.json          the config of the latest run (earlier differing ones are
                       kept as config.<n>.json)
  checkpoints/<step>/  orbax checkpoints of the `TrainState` pytree (written
                       atomically: a run killed while saving leaves only a
                       temporary directory, which is ignored)
  metrics.jsonl        one JSON object per logged step and split
  tensorboard/         TensorBoard event files

Checkpoints restore onto whatever topology reads them: `restore_model` lays
the parameters out replicated on the current mesh (all devices of all
processes), so a workdir trained by one process is evaluated by two and the
other way round. Only the model's variables are read (an orbax partial
restore), so an evaluation config may differ from the training one in the
optimizer, and the optimizer state never costs memory at evaluation.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.sharding import Mesh

from certjax import data as data_lib
from certjax import models as models_lib
from certjax import parallel
from certjax.runs import files

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The collections of a saved TrainState that hold the model's variables.
_VARIABLE_FIELDS = ("params", "model_state")


def checkpoint_directory(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))


def make_manager(workdir: str, *, keep: int) -> ocp.CheckpointManager:
  """A CheckpointManager that writes `workdir/checkpoints`, keeping the latest `keep`."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, save_interval_steps=1,
      # Saving is synchronous so that a step that returned is on disk: a run
      # killed right after never loses a checkpoint it reported.
      enable_async_checkpointing=False)
  return ocp.CheckpointManager(checkpoint_directory(workdir), options=options)


def _item_directory(workdir: str, step: int) -> str:
  """The directory of the saved TrainState of checkpoint `step`.

  A CheckpointManager with one item stores it in `<step>/default`.
  """
  step_dir = os.path.join(checkpoint_directory(workdir), str(int(step)))
  item = os.path.join(step_dir, "default")
  return item if os.path.isdir(item) else step_dir


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the finished checkpoints in `workdir`, ascending.

  Finished orbax checkpoints are directories named by their step; one being
  written carries a temporary suffix and is not listed.
  """
  directory = checkpoint_directory(workdir)
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def resolve_step(workdir: str, step: int | None = None) -> int:
  """The checkpoint step to use: `step`, or the newest when None or negative.

  Raises:
    FileNotFoundError: the workdir holds no checkpoint.
    ValueError: `step` is not one of its checkpoints (naming the ones there).
  """
  steps = checkpoint_steps(workdir)
  if not steps:
    raise FileNotFoundError(
        f"No checkpoint in {checkpoint_directory(workdir)}: train first with "
        "python -m launch.train --config=... --workdir=<the same workdir>.")
  if step is None or int(step) < 0:
    return steps[-1]
  if int(step) not in steps:
    raise ValueError(f"No checkpoint at step {int(step)} in {checkpoint_directory(workdir)}; "
                     f"the steps there are {steps} (or -1 for the newest).")
  return int(step)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> Any | None:
  """Restores the newest checkpoint into the structure of `abstract_state`.

  Returns:
    The restored state, or None when the directory holds no checkpoint.

  Raises:
    ValueError: if the checkpoint does not match the state this config builds
      (a different model, optimizer or objective in the same workdir). The
      checkpoint is left untouched.
  """
  step = manager.latest_step()
  if step is None:
    return None
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except Exception as e:  # orbax raises several types for structure mismatches.
    raise ValueError(
        f"The checkpoint at step {step} in {manager.directory} does not match the "
        "model/optimizer built from this config (did the model, optimizer or "
        "objective change?). It was left untouched; use a new --workdir, or the "
        f"config the checkpoint was written with ({CONFIG_FILE} in the workdir). "
        f"Details: {type(e).__name__}: {str(e)[:500]}") from e


def config_to_dict(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
  if isinstance(config, dict):
    return json.loads(json.dumps(config, default=str))
  return json.loads(config.to_json_best_effort())


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes config.json (process 0 only); a differing earlier one is kept as config.<n>.json."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  new = config_to_dict(config)
  if os.path.exists(path):
    try:
      old = files.read_json(path)
    except ValueError:
      old = None
    if old == new:
      return
    n = 1
    while os.path.exists(os.path.join(workdir, f"config.{n}.json")):
      n += 1
    os.replace(path, os.path.join(workdir, f"config.{n}.json"))
    logging.info("Config differs from the workdir's earlier run; kept that as config.%d.json", n)
  files.atomic_write_json(path, new, sort_keys=True)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"No {CONFIG_FILE} in workdir {workdir!r}: is it the --workdir of a run of "
        "launch/train.py?")
  return ml_collections.ConfigDict(files.read_json(path))


def build_model(config: Any, info: data_lib.DatasetInfo, *, compute_dtype: str | None = None):
  """The Flax model `config.model` names, for the data set `info` describes.

  Args:
    config: a run config (its `model` section and `compute_dtype`).
    info: the data set's `DatasetInfo` (classes and normalisation).
    compute_dtype: overrides `config.compute_dtype` ('float32' or 'bfloat16').
  """
  dtype_name = compute_dtype or config.get("compute_dtype", "float32")
  if dtype_name not in COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype must be one of {tuple(COMPUTE_DTYPES)}; got {dtype_name!r}.")
  return models_lib.get_model(
      config.model.name, num_classes=info.num_classes, mean=info.mean, std=info.std,
      dtype=COMPUTE_DTYPES[dtype_name], conv_impl=config.model.get("conv_impl", "xla"),
      **dict(config.model.get("kwargs", {}) or {}))


class TrainedModel(NamedTuple):
  """A model restored from a workdir.

  Attributes:
    model: the Flax module.
    variables: {'params': ..., **model_state}, replicated on the mesh it was
      restored onto.
    config: the config the model was built from.
    info: the data set's `DatasetInfo`.
    step: the checkpoint step restored.
  """
  model: Any
  variables: Any
  config: ml_collections.ConfigDict
  info: data_lib.DatasetInfo
  step: int

  def logits_fn(self):
    """The pure `logits_fn` of the restored model (see `models.make_logits_fn`)."""
    return models_lib.make_logits_fn(self.model, self.variables)


def restore_variables(workdir: str, step: int, mesh: Mesh | None = None) -> dict[str, Any]:
  """The model variables of checkpoint `step`, replicated on `mesh`.

  Reads only the parameters and model state of the saved `TrainState`, laid
  out against an abstract target on `mesh` (default: every device of every
  process), whatever the topology that wrote them.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  directory = _item_directory(workdir, step)
  # PyTreeCheckpointer reads what StandardSave wrote and, unlike the standard
  # handler, restores a part of the tree (partial_restore): the optimizer
  # state is never read.
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(directory))
  tree = getattr(metadata, "tree", metadata)
  if not isinstance(tree, dict) or any(k not in tree for k in _VARIABLE_FIELDS):
    raise ValueError(
        f"The checkpoint at step {step} in {directory} is not a certjax TrainState "
        f"(expected the fields {_VARIABLE_FIELDS}; found "
        f"{sorted(tree) if isinstance(tree, dict) else type(tree).__name__}).")
  sharding = parallel.replicated(mesh)
  target = {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                            tree[k]) for k in _VARIABLE_FIELDS}
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  saved = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
      item=target, restore_args=restore_args, partial_restore=True))
  return {"params": saved["params"], **(saved.get("model_state") or {})}


def restore_model(workdir: str, step: int | None = None,
                  config: ml_collections.ConfigDict | None = None, *,
                  mesh: Mesh | None = None, compute_dtype: str | None = None) -> TrainedModel:
  """Restores a trained model from a workdir written by `train_and_evaluate`.

  Args:
    workdir: the run's workdir (holds config.json and checkpoints/).
    step: checkpoint step to load; the newest when None or negative.
    config: the config to build the model from (e.g. the launch script's
      --config with evaluation overrides); the workdir's config.json if None.
    mesh: where to place the variables (replicated); default all devices.
    compute_dtype: overrides the config's (bounds are computed in float32).

  Returns:
    A `TrainedModel`; `.logits_fn()` is the pure logits function attacks,
    bounds and smoothing take.

  Raises:
    FileNotFoundError: no checkpoint (or no config.json when config is None).
    ValueError: no checkpoint at `step`, or variables that do not fit the
      model the config builds.
  """
  if config is None:
    config = read_config(workdir)
  step = resolve_step(workdir, step)
  info = data_lib.get_info(config.data)
  model = build_model(config, info, compute_dtype=compute_dtype)
  abstract = jax.eval_shape(
      lambda key: models_lib.init_variables(model, key, (1, *info.image_shape)),
      jax.random.key(0))
  variables = restore_variables(workdir, step, mesh)
  expected = jax.tree.map(lambda a: tuple(a.shape), dict(abstract))
  found = jax.tree.map(lambda a: tuple(a.shape), variables)
  if expected != found:
    raise ValueError(
        f"The checkpoint at step {step} in {checkpoint_directory(workdir)} holds variables "
        f"that do not fit model {config.model.name!r} built from this config (different "
        "model or model.kwargs?).")
  return TrainedModel(model, variables, config, info, step)


def load_trained(workdir: str, step: int | None = None,
                 config: ml_collections.ConfigDict | None = None):
  """`(model, variables, config, info)` of a trained workdir (see `restore_model`)."""
  trained = restore_model(workdir, step, config)
  return trained.model, trained.variables, trained.config, trained.info
