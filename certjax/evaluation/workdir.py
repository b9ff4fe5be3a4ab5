"""Run an evaluator on a trained workdir: `evaluate_workdir(config, workdir, 'robust')`.

The library call behind `launch/evaluate.py` (and its aliases `launch.attack`,
`launch.verify`, `launch.certify`), usable from a notebook. It builds the
evaluator from the config's section first (so a bad setting is reported before
anything is restored), resolves the checkpoint (`<section>.checkpoint_step`,
-1 = the newest), restores the model onto the current mesh
(`certjax.runs.restore_model`: a workdir trained by one process evaluates on
two and the other way round), selects the images as Cohen et al.'s
certify.py does (every `config.skip`-th image of the split, below index
`config.max`; -1 = all) and runs the evaluator, which writes its files under
`<workdir>/<results_dir>/` (`attack/`, `verify/`, `certify/`).

The checkpoint is verified against its signature as it is restored
(`config.signing`, the environment and the trust store decide which keys are
trusted and whether a signature is required; `certjax.runs.signing`), and
what that found goes into every result file's `provenance` block with the
config's hash (`run_metadata`).
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
from absl import logging

from certjax import data as data_lib
from certjax import runs
from certjax.runs import provenance
from certjax.evaluation import registry
from certjax.evaluation.registry import EvalContext, EvalData, EvalResult


def run_metadata(config: Any, workdir: str | None,
                 checkpoint: dict[str, Any] | None = None) -> dict[str, Any]:
  """The names result files carry: workdir, model, data, objective, selection, provenance.

  Args:
    config: the run's config.
    workdir: the workdir, or None.
    checkpoint: the restored checkpoint's verification record
      (`runs.TrainedModel.checkpoint`); None for parameters that were not
      read from a checkpoint (evaluations inside the training loop).

  `provenance` holds the config's sha256 (`provenance.config_sha256`), the
  sha256 of the workdir's config.json (the training config) and the
  checkpoint record; `common.metadata_block` adds code, devices and data.
  """
  objective = config.get("objective") if hasattr(config, "get") else None
  config_json = None if workdir is None else os.path.join(workdir, runs.CONFIG_FILE)
  return {
      "workdir": None if workdir is None else os.path.abspath(workdir),
      "model": config.model.name,
      "data": config.data.name,
      "objective": None if objective is None else objective.get("name"),
      "skip": int(config.get("skip", 1)),
      "max": int(config.get("max", -1)),
      "provenance": {
          "config_sha256": provenance.config_sha256(config),
          "workdir_config_sha256": None if config_json is None
          else provenance.file_sha256(config_json),
          "checkpoint": None if checkpoint is None else dict(checkpoint),
      },
  }


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str, evaluator: str, *,
                     verbose: bool = True) -> EvalResult:
  """Runs evaluator `evaluator` on the model trained in `workdir`.

  Args:
    config: the run's config (usually the training config file, with
      overrides); the evaluator's settings are its section (e.g.
      `config.attack` for 'robust'), the images `config.skip` / `config.max`.
    workdir: the training workdir (config.json, checkpoints/).
    evaluator: a registered evaluator name ('robust', 'verified', 'certified', ...).
    verbose: log progress lines.

  Returns:
    The `EvalResult` (metrics, the files written, the printable table).

  Raises:
    ValueError: a bad setting, an empty selection or a checkpoint that does not
      fit the config's model.
    FileNotFoundError: no checkpoint in the workdir.
    runs.CheckpointVerificationError: the checkpoint fails verification
      (tampered, signed by an untrusted key, or unsigned where required).
  """
  spec = registry.get_spec(evaluator)
  if spec.section not in config:
    raise ValueError(f"The config has no {spec.section!r} section, which evaluator "
                     f"{evaluator!r} reads; start it from certjax.training.base_config().")
  settings = registry.merged_settings(evaluator, config[spec.section])
  info = data_lib.get_info(config.data)
  evaluate = registry.get_evaluator(evaluator, settings, info.num_classes, run_config=config)
  step = runs.resolve_step(workdir, settings.checkpoint_step)
  float32_apply_fn = members = None
  if spec.many_models:
    # Every model of a many-models run, on the train-split examples their
    # masks refer to.
    trained = runs.restore_models(workdir, step, config)
    split = config.data.train_split
  else:
    trained = runs.restore_model(workdir, step, config)
    split = settings.split or config.data.eval_split
    if spec.float32 and config.get("compute_dtype", "float32") != "float32":
      # Bounds computed in bfloat16 can be unsound by rounding: evaluate the
      # same parameters through the float32 model.
      logging.info("%s: computing in float32 (the model was configured with "
                   "compute_dtype=%s).", evaluator, config.compute_dtype)
      float32_apply_fn = runs.build_model(config, info, compute_dtype="float32").apply
  data = EvalData.from_config(config.data, split, int(config.get("skip", 1)),
                              int(config.get("max", -1)))
  what = config.model.name
  if spec.many_models:
    if trained.masks.shape[1] <= int(data.indices.max(initial=-1)):
      raise ValueError(
          f"The membership masks of {workdir} cover {trained.masks.shape[1]} examples, but "
          f"the train split {split!r} has more: evaluate with the data config the models "
          "were trained with.")
    members = trained.masks[:, data.indices]
    what = f"{trained.num_models} x {what}"
  output_dir = settings.get("output_dir") or os.path.join(workdir, spec.results_dir)
  logging.info("Evaluating %s (%s) of %s on %d %s %s images, checkpoint step %d",
               evaluator, spec.summary, what, len(data.indices), info.name, split, step)
  ctx = EvalContext(apply_fn=trained.model.apply, variables=trained.variables, data=data,
                    num_classes=info.num_classes, step=step, output_dir=output_dir,
                    metadata=run_metadata(config, workdir, trained.checkpoint),
                    float32_apply_fn=float32_apply_fn, verbose=verbose, members=members)
  return evaluate(ctx)
