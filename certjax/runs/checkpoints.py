"""Workdirs of training runs: config.json, orbax checkpoints, models restored from them.

This sits below both the training loop and the evaluators: the loop writes a
workdir and resumes from it; evaluators (and notebooks) restore a trained
model from it. Neither imports the other for that.

Layout of a workdir:
  config.json          the config of the latest run (earlier differing ones are
                       kept as config.<n>.json)
  checkpoints/<step>/  orbax checkpoints of the `TrainState` pytree (written
                       atomically: a run killed while saving leaves only a
                       temporary directory, which is ignored), each with
                       `certjax.sig` when the run had a signing key
  provenance.json      who trained it with what (`certjax.runs.provenance`)
  metrics.jsonl        one JSON object per logged step and split
  tensorboard/         TensorBoard event files

Checkpoints restore onto whatever topology reads them: `restore_model` lays
the parameters out replicated on the current mesh (all devices of all
processes), so a workdir trained by one process is evaluated by two and the
other way round. Only the model's variables are read (an orbax partial
restore), so an evaluation config may differ from the training one in the
optimizer, and the optimizer state never costs memory at evaluation.

Every restore (training resume, `restore_model`, `restore_variables`) first
verifies the step directory against its signature (`certjax.runs.signing`):
a tampered, untrusted, or (where required) unsigned checkpoint stops with one
`CheckpointVerificationError` naming the file. Nothing is unpickled: orbax
reads arrays through tensorstore and metadata as JSON.
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
from certjax.defences import transforms as transforms_lib
from certjax.runs import files
from certjax.runs import signing

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


def step_directory(workdir: str, step: int) -> str:
  """`<workdir>/checkpoints/<step>`: what orbax writes and the signature covers."""
  return os.path.join(checkpoint_directory(workdir), str(int(step)))


def _label(directory: str, step: int) -> str:
  return f"checkpoint step {int(step)} in {directory}"


def verify_step(directory: str, step: int, policy: signing.SigningPolicy | None = None
                ) -> dict[str, Any]:
  """Verifies checkpoint `step` of the checkpoint directory `directory` (see `signing`).

  Args:
    directory: the checkpoints directory (`<workdir>/checkpoints`).
    step: the step.
    policy: trusted keys and `require`; default: the environment and the
      trust store (`signing.policy_from_config(None)`).

  Returns:
    The record result files and provenance keep (step, signed, verified,
    key_fingerprint, sha256 of the contents, files).

  Raises:
    signing.CheckpointVerificationError: naming the step, the directory and the file.
  """
  policy = signing.policy_from_config(None) if policy is None else policy
  directory = os.path.abspath(os.fspath(directory))
  record = signing.verify_directory(os.path.join(directory, str(int(step))), policy,
                                    expected_name=str(int(step)),
                                    label=_label(directory, step))
  if not record["signed"]:
    logging.info("%s is not signed; restoring it unverified (signing.require or $%s=1 refuses "
                 "unsigned checkpoints).", _label(directory, step), signing.ENV_REQUIRE)
  return {"step": int(step), **record}


def verify_checkpoint(workdir: str, step: int, policy: signing.SigningPolicy | None = None
                      ) -> dict[str, Any]:
  """`verify_step` for checkpoint `step` of `workdir`."""
  return verify_step(checkpoint_directory(workdir), step, policy)


def sign_step(directory: str, step: int, policy: signing.SigningPolicy) -> dict[str, Any] | None:
  """Signs checkpoint `step` of the checkpoint directory `directory`, on process 0 only.

  Call it after orbax has finished the step (saving is synchronous in
  `make_manager`). The other processes return None at once: one writer, no
  race; they never read the signature before a later restore.
  """
  if jax.process_index() != 0:
    return None
  return {"step": int(step), **signing.sign_directory(
      os.path.join(os.fspath(directory), str(int(step))), policy)}


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state: Any,
                    policy: signing.SigningPolicy) -> dict[str, Any] | None:
  """Saves `state` as checkpoint `step`, then signs it when `policy` has a key.

  Returns:
    The signature record on process 0 of a signed save, else None.
  """
  manager.save(step, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()  # a no-op for synchronous managers; signing needs the files
  if not policy.key:
    return None
  return sign_step(manager.directory, step, policy)


def _item_directory(workdir: str, step: int) -> str:
  """The directory of the saved TrainState of checkpoint `step`.

  A CheckpointManager with one item stores it in `<step>/default`.
  """
  step_dir = step_directory(workdir, step)
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


class Resumed(NamedTuple):
  """What `resume` found: the restored state (None: nothing to resume) and its verification."""
  state: Any
  checkpoint: dict[str, Any] | None


def resume(manager: ocp.CheckpointManager, abstract_state: Any,
           policy: signing.SigningPolicy | None = None) -> Resumed:
  """Verifies the newest checkpoint (`verify_step`), then restores it like `restore_latest`."""
  step = manager.latest_step()
  if step is None:
    return Resumed(None, None)
  record = verify_step(manager.directory, step, policy)
  return Resumed(_restore_state(manager, step, abstract_state), record)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   policy: signing.SigningPolicy | None = None) -> Any | None:
  """Restores the newest checkpoint into the structure of `abstract_state`, verified first.

  Args:
    manager: the workdir's CheckpointManager.
    abstract_state: the structure to restore into.
    policy: see `verify_step`.

  Returns:
    The restored state, or None when the directory holds no checkpoint.

  Raises:
    signing.CheckpointVerificationError: the checkpoint fails verification.
    ValueError: if the checkpoint does not match the state this config builds
      (a different model, optimizer or objective in the same workdir). The
      checkpoint is left untouched.
  """
  step = manager.latest_step()
  if step is None:
    return None
  verify_step(manager.directory, step, policy)
  return _restore_state(manager, step, abstract_state)


def _restore_state(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
  """Checkpoint `step` restored into `abstract_state` (verified by the caller)."""
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
  transform = model_input_transform(config)
  factor = 1 if transform is None else transform.output_channels_factor
  # Channel c of the image becomes channels c*factor .. c*factor+factor-1 of
  # the transformed input (thermometer encoding), which keep its statistics.
  model = models_lib.get_model(
      config.model.name, num_classes=info.num_classes,
      mean=tuple(float(m) for m in info.mean for _ in range(factor)),
      std=tuple(float(s) for s in info.std for _ in range(factor)),
      dtype=COMPUTE_DTYPES[dtype_name], conv_impl=config.model.get("conv_impl", "xla"),
      **dict(config.model.get("kwargs", {}) or {}))
  if transform is None:
    return model
  fixed_key = jax.random.key(0)  # the transform is deterministic: the key is unused
  return models_lib.InputTransformed(model, lambda x: transform.forward(fixed_key, x))


def model_input_transform(config: Any):
  """The `InputTransform` of `config.model.input_transform`, or None when there is none.

  A model trained behind an input transformation (thermometer encoding,
  Buckman et al. 2018) holds it inside (`models.InputTransformed`), so every
  evaluator sees a model of images in [0, 1].

  Raises:
    ValueError: an unknown transformation or setting, or a randomised one (a
      checkpoint's model must be a deterministic function of its input).
  """
  name = config.model.get("input_transform", "")
  if not name:
    return None
  transform = transforms_lib.get_transform(
      str(name), **dict(config.model.get("input_transform_kwargs", {}) or {}))
  if transform.randomized:
    raise ValueError(f"model.input_transform={name!r} is randomised; a model can be trained "
                     "behind a deterministic transformation only (e.g. 'thermometer', "
                     "'bit_depth', 'jpeg').")
  return transform


class TrainedModel(NamedTuple):
  """A model restored from a workdir.

  Attributes:
    model: the Flax module.
    variables: {'params': ..., **model_state}, replicated on the mesh it was
      restored onto.
    config: the config the model was built from.
    info: the data set's `DatasetInfo`.
    step: the checkpoint step restored.
    checkpoint: how it was verified (`verify_step`'s record), for provenance.
  """
  model: Any
  variables: Any
  config: ml_collections.ConfigDict
  info: data_lib.DatasetInfo
  step: int
  checkpoint: dict[str, Any] | None = None

  def logits_fn(self):
    """The pure `logits_fn` of the restored model (see `models.make_logits_fn`)."""
    return models_lib.make_logits_fn(self.model, self.variables)


def restore_variables(workdir: str, step: int, mesh: Mesh | None = None,
                      policy: signing.SigningPolicy | None = None) -> dict[str, Any]:
  """The model variables of checkpoint `step`, replicated on `mesh`, verified first.

  Reads only the parameters and model state of the saved `TrainState`, laid
  out against an abstract target on `mesh` (default: every device of every
  process), whatever the topology that wrote them. Every process verifies
  the step directory it reads (`verify_step`, with `policy`).

  Raises:
    signing.CheckpointVerificationError: the checkpoint fails verification.
  """
  verify_checkpoint(workdir, step, policy)
  return _read_variables(workdir, step, mesh)


def _read_variables(workdir: str, step: int, mesh: Mesh | None) -> dict[str, Any]:
  """The variables of checkpoint `step` on `mesh` (verified by the caller)."""
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
                  mesh: Mesh | None = None, compute_dtype: str | None = None,
                  policy: signing.SigningPolicy | None = None) -> TrainedModel:
  """Restores a trained model from a workdir written by `train_and_evaluate`.

  Args:
    workdir: the run's workdir (holds config.json and checkpoints/).
    step: checkpoint step to load; the newest when None or negative.
    config: the config to build the model from (e.g. the launch script's
      --config with evaluation overrides); the workdir's config.json if None.
    mesh: where to place the variables (replicated); default all devices.
    compute_dtype: overrides the config's (bounds are computed in float32).
    policy: how the checkpoint is verified; default: `config.signing` of the
      config given here, the environment and the trust store. A config read
      from the workdir itself contributes no trust (`signing` module docstring).

  Returns:
    A `TrainedModel`; `.logits_fn()` is the pure logits function attacks,
    bounds and smoothing take.

  Raises:
    FileNotFoundError: no checkpoint (or no config.json when config is None).
    signing.CheckpointVerificationError: the checkpoint fails verification.
    ValueError: no checkpoint at `step`, or variables that do not fit the
      model the config builds.
  """
  if policy is None:
    policy = signing.policy_from_config(config)
  if config is None:
    config = read_config(workdir)
  if os.path.exists(os.path.join(workdir, data_lib.membership.MASK_FILE)):
    raise ValueError(
        f"{workdir} holds the models of a many-models run ({data_lib.membership.MASK_FILE}); "
        "restore them with certjax.runs.restore_models(workdir) and pick one with "
        ".member(k).")
  step = resolve_step(workdir, step)
  record = verify_checkpoint(workdir, step, policy)
  info = data_lib.get_info(config.data)
  model = build_model(config, info, compute_dtype=compute_dtype)
  variables = _read_variables(workdir, step, mesh)
  _check_fits(workdir, step, config, model, info, variables, ())
  return TrainedModel(model, variables, config, info, step, record)


def _check_fits(workdir: str, step: int, config: Any, model: Any, info: Any, variables: Any,
                leading: tuple[int, ...]) -> None:
  """Raises ValueError unless `variables` have the shapes `model` builds (after `leading`)."""
  abstract = jax.eval_shape(
      lambda key: models_lib.init_variables(model, key, (1, *info.image_shape)),
      jax.random.key(0))
  expected = jax.tree.map(lambda a: leading + tuple(a.shape), dict(abstract))
  found = jax.tree.map(lambda a: tuple(a.shape), variables)
  if expected != found:
    what = f"{leading[0]} stacked models" if leading else "one model"
    raise ValueError(
        f"The checkpoint at step {step} in {checkpoint_directory(workdir)} holds variables "
        f"that do not fit {what} of {config.model.name!r} built from this config (different "
        "model, model.kwargs or num_models?).")


class TrainedModels(NamedTuple):
  """The K models of a many-models run (`certjax.training.many`), restored together.

  Attributes:
    model: the Flax module all K share.
    variables: {'params': ..., **model_state}, every leaf with a leading axis K.
    masks: bool [K, N]: which train-split examples model k trained on.
    config, info, step, checkpoint: as in `TrainedModel`.
  """
  model: Any
  variables: Any
  masks: Any
  config: ml_collections.ConfigDict
  info: data_lib.DatasetInfo
  step: int
  checkpoint: dict[str, Any] | None = None

  @property
  def num_models(self) -> int:
    return int(self.masks.shape[0])

  def member(self, k: int) -> TrainedModel:
    """Model k as an ordinary `TrainedModel` (its `logits_fn()` for any attack)."""
    if not 0 <= int(k) < self.num_models:
      raise ValueError(f"Model index {k} out of range: this run has {self.num_models} models "
                       f"(0..{self.num_models - 1}).")
    variables = jax.tree.map(lambda a: a[int(k)], self.variables)
    return TrainedModel(self.model, variables, self.config, self.info, self.step,
                        self.checkpoint)


def restore_models(workdir: str, step: int | None = None,
                   config: ml_collections.ConfigDict | None = None, *,
                   mesh: Mesh | None = None,
                   policy: signing.SigningPolicy | None = None) -> TrainedModels:
  """Restores the K models of a many-models workdir, verified first (as `restore_model`).

  Raises:
    FileNotFoundError: no checkpoint, or no membership masks (not a many-models run).
    signing.CheckpointVerificationError: the checkpoint fails verification.
    ValueError: variables that do not fit K models of the config's model.
  """
  if policy is None:
    policy = signing.policy_from_config(config)
  if config is None:
    config = read_config(workdir)
  masks = data_lib.membership.read_workdir_masks(workdir)
  step = resolve_step(workdir, step)
  record = verify_checkpoint(workdir, step, policy)
  info = data_lib.get_info(config.data)
  model = build_model(config, info)
  variables = _read_variables(workdir, step, mesh)
  _check_fits(workdir, step, config, model, info, variables, (int(masks.shape[0]),))
  return TrainedModels(model, variables, masks, config, info, step, record)


def load_trained(workdir: str, step: int | None = None,
                 config: ml_collections.ConfigDict | None = None):
  """`(model, variables, config, info)` of a trained workdir (see `restore_model`)."""
  trained = restore_model(workdir, step, config)
  return trained.model, trained.variables, trained.config, trained.info
