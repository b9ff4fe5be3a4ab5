"""The 'membership' evaluator: membership inference on a many-models workdir.

A many-models run (`config.num_models = K`, `config.data.membership =
'random_half'`, `certjax.training.many`) trains K models on random halves of
the train split and saves which example each model saw. Membership inference
is then measured the way LiRA's code measures it (Carlini et al. 2022): model
t is the target and the other K - 1 models are its shadow (reference)
models; every attack scores every train-split example, and the scores are
compared with the target's true membership. With `num_targets = T > 1`,
models 0..T-1 take the target's place in turn (each time with the other
K - 1 as shadows) and the scores of all T are pooled, which sharpens the
low-FPR figures the paper reports.

Steps:
  1. logits of every model on every selected train-split example under A
     augmented queries (`augmentations`: 'none'; 'flip'; 'shift': the image
     and its four one-pixel shifts; 'flip_shift': both), and on a population
     of `population_size` examples of `population_split` that no model
     trained on (RMIA's z samples), cached in `logits.npz` so a user can
     re-score them (`certjax.privacy.membership.score` takes them as they are);
  2. each attack of `attacks` (`certjax.privacy.membership`) per target;
  3. metrics: AUC, balanced accuracy, TPR at each FPR of `fprs`; the target's
     train (members) and test accuracy, which bound what any attack can see.
Writes `membership/results.{json,md,png}` (the PNG: the log-log ROC of every
attack on one chart, as in the LiRA paper) and `membership/logits.npz`.

References:
  N. Carlini, S. Chien, M. Nasr, S. Song, A. Terzis, F. Tramer. Membership
  Inference Attacks From First Principles. IEEE S&P 2022.
  S. Zarifzadeh, P. Liu, R. Shokri. Low-Cost High-Power Membership Inference
  Attacks. ICML 2024 (RMIA).
  R. Shokri, M. Stronati, C. Song, V. Shmatikov. Membership Inference
  Attacks Against Machine Learning Models. IEEE S&P 2017.
  S. Yeom, I. Giacomelli, M. Fredrikson, S. Jha. Privacy Risk in Machine
  Learning: Analyzing the Connection to Overfitting. CSF 2018.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from certjax import parallel
from certjax import validation
from certjax.evaluation import common
from certjax.evaluation import plots
from certjax.evaluation.registry import EvalContext, EvalData, EvalResult, EvalSetup
from certjax.evaluation.registry import register_evaluator
from certjax.privacy import extraction
from certjax.privacy import membership as membership_lib
from certjax.runs import files

NAME = "membership"
SECTION = "membership"
RESULTS_STEM = "results"
LOGITS_FILE = "logits.npz"
AUGMENTATIONS = ("none", "flip", "shift", "flip_shift")


def default_config() -> ml_collections.ConfigDict:
  """Defaults of `config.membership`.

  Fields:
    attacks: the attacks to run, names of `certjax.privacy.membership.ATTACKS`.
    num_targets: T: models 0..T-1 are the target in turn, the other K - 1
      models its shadows; scores are pooled over the T targets.
    num_shadows: how many of the other models serve as shadows (the first
      ones after the target, cyclically); 0 = all K - 1. For studying how an
      attack depends on the number of shadow models from one run.
    augmentations: the queries per example: 'none', 'flip', 'shift' (the
      image and its 4 one-pixel shifts, zero-filled) or 'flip_shift'.
    fprs: the false-positive rates at which TPR is reported, each in (0, 1).
    label_only_queries: > 0 adds the label-only attack (Choquette-Choo et al.
      2021): each candidate is queried this many times, perturbed, through a
      query interface that answers with labels only and counts the queries
      (`certjax.privacy.extraction.QueryInterface(output='label')`); 0 = off.
    label_only_noise_std, label_only_max_translation: its perturbation
      (Gaussian noise in pixel units, random shifts of up to this many pixels).
    population_split: RMIA's population (examples no model trained on); ''
      means config.data.eval_split.
    population_size: how many of its first examples to use.
    batch_size: examples per forward pass of all K models.
    save_logits: write logits.npz (target, shadow and population logits and
      the masks) for re-scoring elsewhere.
    seed: the seed of the attacks' own randomness (Shokri's attack models).
    checkpoint_step: checkpoint to restore; -1 = the newest.
    output_dir: '' = <workdir>/membership.
  """
  return ml_collections.ConfigDict({
      "attacks": tuple(membership_lib.ATTACKS),
      "num_targets": 1,
      "num_shadows": 0,
      "augmentations": "none",
      "fprs": (0.001, 0.01),
      "label_only_queries": 16,
      "label_only_noise_std": 0.1,
      "label_only_max_translation": 1,
      "population_split": "",
      "population_size": 1000,
      "batch_size": 500,
      "save_logits": True,
      "seed": 0,
      "checkpoint_step": -1,
      "output_dir": "",
  })


def validate_settings(settings: ml_collections.ConfigDict, setup: EvalSetup) -> None:
  for attack in settings.attacks:
    validation.check_choice(attack, "membership.attacks", tuple(membership_lib.ATTACKS))
  if not settings.attacks:
    raise ValueError("membership.attacks must name at least one attack of "
                     f"{tuple(membership_lib.ATTACKS)}.")
  validation.check_int_at_least(settings.num_targets, "membership.num_targets", 1)
  validation.check_int_at_least(settings.num_shadows, "membership.num_shadows", 0)
  needed = max(membership_lib.required_shadow_models(a) for a in settings.attacks)
  if 0 < settings.num_shadows < needed:
    raise ValueError(f"membership.num_shadows={settings.num_shadows} is fewer than the "
                     f"{needed} shadow models membership.attacks need.")
  validation.check_choice(settings.augmentations, "membership.augmentations", AUGMENTATIONS)
  for fpr in settings.fprs:
    validation.check_in_open_interval(fpr, "membership.fprs", 0.0, 1.0)
  validation.check_int_at_least(settings.population_size, "membership.population_size", 1)
  validation.check_int_at_least(settings.label_only_queries, "membership.label_only_queries", 0)
  validation.check_positive(settings.label_only_noise_std, "membership.label_only_noise_std",
                            allow_zero=True)
  validation.check_int_at_least(settings.label_only_max_translation,
                                "membership.label_only_max_translation", 0)
  validation.check_int_at_least(settings.batch_size, "membership.batch_size", 1)
  validation.check_int_at_least(settings.seed, "membership.seed", 0)
  validation.check_int_at_least(settings.checkpoint_step, "membership.checkpoint_step", -1)
  run_config = setup.run_config
  # Every config carries this section; only runs trained for membership
  # inference (random IN/OUT halves or shares) are checked against it here, so
  # an ensemble of 3 or a property-inference run is not refused for it.
  if run_config is not None and int(run_config.get("num_models", 1)) > 1 and (
      run_config.data.get("membership") in ("random_half", "fraction")):
    # The shadow models the attacks need are checked when the evaluator runs:
    # a run of 4 shadow models for the attacks that need few is legitimate.
    num_models = int(run_config.num_models)
    if settings.num_targets > num_models:
      raise ValueError(f"membership.num_targets={settings.num_targets} exceeds the "
                       f"{num_models} models of the run.")
    if settings.num_shadows > num_models - 1:
      raise ValueError(f"membership.num_shadows={settings.num_shadows} exceeds the "
                       f"{num_models - 1} other models of the run.")


def augmented_queries(x: np.ndarray, augmentations: str) -> np.ndarray:
  """[A, N, H, W, C]: the queries of each image (the first is the image itself)."""
  views = [x]
  if augmentations in ("shift", "flip_shift"):
    for axis, step in ((1, 1), (1, -1), (2, 1), (2, -1)):
      shifted = np.roll(x, step, axis=axis)
      edge = [slice(None)] * x.ndim
      edge[axis] = 0 if step > 0 else -1  # zero-fill what rolled around
      shifted[tuple(edge)] = 0
      views.append(shifted)
  if augmentations in ("flip", "flip_shift"):
    views += [v[:, :, ::-1] for v in views]
  return np.stack(views)


def all_model_logits(apply_fn, variables, images: np.ndarray, augmentations: str,
                     batch_size: int) -> np.ndarray:
  """float32 [K, N, A, C]: every model's logits on every query of `images` [N, ...]."""
  out = []
  for part in common.batches(len(images), batch_size):
    x = images[part]
    queries = augmented_queries(x, augmentations)            # [A, b, ...]
    num_views = queries.shape[0]
    logits = common.stacked_logits(apply_fn, variables,
                                   queries.reshape(num_views * len(x), *x.shape[1:]),
                                   batch_size)               # [K, A * b, C]
    out.append(logits.reshape(logits.shape[0], num_views, len(x), -1).transpose(0, 2, 1, 3))
  return np.concatenate(out, axis=1)


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(logits.argmax(-1) == labels)) if len(labels) else float("nan")


def score_targets(attacks, logits: np.ndarray, labels: np.ndarray, masks: np.ndarray,
                  num_targets: int, population_logits: np.ndarray | None,
                  population_labels: np.ndarray | None, seed: int, num_shadows: int = 0
                  ) -> tuple[dict[str, np.ndarray], np.ndarray, list[dict[str, float]]]:
  """Scores of every attack with models 0..T-1 as the target in turn.

  Args:
    attacks: attack names.
    logits: [K, N, A, C] of all models on the candidates.
    labels: [N].
    masks: bool [K, N].
    num_targets: T.
    population_logits: [K, Z, A, C] or None; population_labels: [Z] or None.
    seed: Shokri's attack-model seed (folded with the target index).
    num_shadows: shadows per target: models target+1, target+2, ... (mod K);
      0 = all K - 1.

  Returns:
    (attack -> pooled scores [T * N], pooled membership [T * N], per-target
    accuracies {train_accuracy, heldout_accuracy}).
  """
  scores: dict[str, list[np.ndarray]] = {a: [] for a in attacks}
  members, accuracies = [], []
  num_models = logits.shape[0]
  for target in range(num_targets):
    shadows = (target + 1 + np.arange(num_models - 1)) % num_models
    if num_shadows:
      shadows = shadows[:num_shadows]
    inputs = membership_lib.MembershipInputs(
        target_logits=logits[target], labels=labels, shadow_logits=logits[shadows],
        shadow_masks=masks[shadows],
        population_target_logits=None if population_logits is None
        else population_logits[target],
        population_shadow_logits=None if population_logits is None
        else population_logits[shadows],
        population_labels=population_labels)
    for attack in attacks:
      scores[attack].append(np.asarray(
          membership_lib.score(attack, inputs, **_attack_settings(attack, seed, target)),
          np.float64))
    members.append(masks[target])
    accuracies.append({
        "target": target,
        "train_accuracy": _accuracy(logits[target, masks[target], 0], labels[masks[target]]),
        "heldout_accuracy": _accuracy(logits[target, ~masks[target], 0],
                                      labels[~masks[target]])})
  return ({a: np.concatenate(s) for a, s in scores.items()}, np.concatenate(members),
          accuracies)


def _label_only(ctx: EvalContext, settings: ml_collections.ConfigDict, images: np.ndarray,
                labels: np.ndarray) -> tuple[np.ndarray, int]:
  """Label-only scores of targets 0..T-1, pooled, each through a counting label-only victim."""
  apply_fn = jax.jit(lambda v, x: ctx.apply_fn(v, x, train=False))
  scores, used = [], 0
  for target in range(int(settings.num_targets)):
    variables = jax.tree.map(lambda a, t=target: a[t], ctx.variables)

    def logits_fn(x, variables=variables):
      return np.concatenate([np.asarray(apply_fn(variables, x[p])) for p in
                             common.batches(len(x), int(settings.batch_size))])

    victim = extraction.QueryInterface(logits_fn, output="label")
    scores.append(membership_lib.label_only_scores(
        jax.random.fold_in(jax.random.key(int(settings.seed)), 1000 + target), victim.query,
        images, labels, num_queries=int(settings.label_only_queries),
        noise_std=float(settings.label_only_noise_std),
        max_translation=int(settings.label_only_max_translation)))
    used += victim.queries_used
  return np.concatenate(scores).astype(np.float64), used


def _attack_settings(attack: str, seed: int, target: int) -> dict[str, Any]:
  if attack == "shokri":
    return {"key": jax.random.fold_in(jax.random.key(seed), target)}
  return {}


def results_table(rows: list[dict[str, Any]], fprs, header: str) -> str:
  lines = [header, "",
           "| attack | AUC | balanced acc. | " + " | ".join(
               f"TPR@{100 * f:g}%FPR" for f in fprs) + " |",
           "|---|---|---|" + "---|" * len(fprs)]
  for row in rows:
    lines.append(f"| {row['attack']} | {row['auc']:.4f} | {row['balanced_accuracy']:.4f} | "
                 + " | ".join(f"{100 * row['tpr'][str(f)]:.2f}%" for f in fprs) + " |")
  return "\n".join(lines) + "\n"


@register_evaluator(NAME, section=SECTION, default_config=default_config,
                    validate=validate_settings, many_models=True,
                    summary="membership inference (LiRA, RMIA, Shokri, thresholds) on K models")
def build(settings: ml_collections.ConfigDict, setup: EvalSetup):
  """The 'membership' evaluator for validated `settings` (see `default_config`)."""
  validate_settings(settings, setup)
  attacks = list(dict.fromkeys(settings.attacks))
  fprs = [float(f) for f in settings.fprs]
  run_config = setup.run_config
  needs_population = any(a.startswith("rmia") for a in attacks)

  def evaluate(ctx: EvalContext) -> EvalResult:
    if ctx.members is None:
      raise ValueError("The 'membership' evaluator needs the models of a many-models run "
                       "and their masks (EvalContext.members); train with num_models > 1 "
                       "and data.membership='random_half'.")
    masks = np.asarray(ctx.members, bool)
    num_models = masks.shape[0]
    needed = max(membership_lib.required_shadow_models(a) for a in attacks)
    if num_models - 1 < needed:
      short = [a for a in attacks if membership_lib.required_shadow_models(a) > num_models - 1]
      raise ValueError(
          f"membership.attacks {tuple(short)} need more shadow models than the "
          f"{num_models - 1} this run of num_models={num_models} gives a target (at least "
          f"{needed}); remove them from membership.attacks or train more models.")
    if settings.num_targets > num_models:
      raise ValueError(f"membership.num_targets={settings.num_targets} exceeds the "
                       f"{num_models} models of the run.")
    common.report(ctx, f"membership: logits of {num_models} models on "
                  f"{len(ctx.data.indices)} examples ({settings.augmentations} queries)")
    # The candidates are read once: for the logits and for the label-only queries.
    images, labels = common.load_all(ctx.data)
    logits = all_model_logits(ctx.apply_fn, ctx.variables, images, settings.augmentations,
                              settings.batch_size)
    population_logits = population_labels = None
    if needs_population:
      if run_config is None:
        raise ValueError("RMIA needs a population split: evaluate through "
                         "evaluate_workdir (which knows the run's data config).")
      split = settings.population_split or run_config.data.eval_split
      population = EvalData.from_config(run_config.data, split, 1,
                                        int(settings.population_size) - 1)
      population_images, population_labels = population.load(population.indices)
      population_logits = all_model_logits(ctx.apply_fn, ctx.variables, population_images,
                                           settings.augmentations, settings.batch_size)
    scores, is_member, accuracies = score_targets(
        attacks, logits, labels, masks, int(settings.num_targets), population_logits,
        population_labels, int(settings.seed), int(settings.num_shadows))
    label_only_queries_used = 0
    if settings.label_only_queries:
      scores["label_only"], label_only_queries_used = _label_only(ctx, settings, images, labels)
    rows, curves = [], {}
    for attack in scores:
      summary = membership_lib.summarize(scores[attack], is_member, fprs=tuple(fprs))
      row = {"attack": attack, "auc": float(summary["auc"]),
             "balanced_accuracy": float(summary["balanced_accuracy"]),
             "tpr": {str(f): float(membership_lib.tpr_at_fpr(scores[attack], is_member, f))
                     for f in fprs}}
      rows.append(row)
      fpr, tpr, _ = membership_lib.roc_curve(scores[attack], is_member)
      curves[attack] = (np.asarray(fpr), np.asarray(tpr), row["auc"])
    train_acc = float(np.mean([a["train_accuracy"] for a in accuracies]))
    heldout_acc = float(np.mean([a["heldout_accuracy"] for a in accuracies]))
    metrics = {"train_accuracy": train_acc, "heldout_accuracy": heldout_acc}
    for row in rows:
      metrics[f"{row['attack']}/auc"] = row["auc"]
      for f in fprs:
        metrics[f"{row['attack']}/tpr@{f:g}"] = row["tpr"][str(f)]
    shadows_each = int(settings.num_shadows) or num_models - 1
    header = (f"Membership inference: {num_models} models ({settings.num_targets} target(s), "
              f"{shadows_each} shadows each), {len(ctx.data.indices)} candidates, "
              f"{logits.shape[2]} queries each (augmentations: {settings.augmentations}); target train accuracy {100 * train_acc:.2f}%, "
              f"held-out accuracy {100 * heldout_acc:.2f}%.")
    table = results_table(rows, fprs, header)
    if label_only_queries_used:
      table += (f"\nlabel_only: {label_only_queries_used} label-only queries "
                f"({settings.label_only_queries} per candidate and target).\n")
    payload = {"evaluator": NAME, "settings": settings.to_dict(),
               "label_only_queries_used": label_only_queries_used,
               "metadata": common.metadata_block(ctx, num_models=num_models),
               "targets": accuracies, "results": rows,
               "num_candidates": int(len(ctx.data.indices)),
               "num_scored": int(len(is_member)), "num_members": int(is_member.sum())}
    figure = plots.membership_roc_figure(curves, title=f"{ctx.metadata.get('data', '')} "
                                         f"{ctx.metadata.get('model', '')}, {num_models} models")
    artifacts = common.write_results(ctx.output_dir, RESULTS_STEM, payload, table, figure)
    if ctx.output_dir is not None and settings.save_logits and parallel.is_main_process():
      arrays = {"logits": logits.astype(np.float32), "labels": labels, "masks": masks,
                "indices": np.asarray(ctx.data.indices)}
      if population_logits is not None:
        arrays.update(population_logits=population_logits.astype(np.float32),
                      population_labels=population_labels)
      artifacts["logits"] = files.atomic_write_npz(os.path.join(ctx.output_dir, LOGITS_FILE),
                                                   **arrays)
    common.report(ctx, table)
    return EvalResult(NAME, metrics, artifacts, table, details={
        "rows": rows, "scores": scores, "is_member": is_member, "targets": accuracies})

  return evaluate


def read_results(path: str) -> dict[str, Any]:
  """The results.json of a membership evaluation (a workdir, its membership/, or the file)."""
  return common.read_results_json(path, SECTION, RESULTS_STEM)


def read_logits(path: str) -> dict[str, np.ndarray]:
  """The cached logits.npz (no pickle): logits [K, N, A, C], labels, masks, indices, ..."""
  if os.path.isdir(path):
    candidate = os.path.join(path, SECTION, LOGITS_FILE)
    path = candidate if os.path.exists(candidate) else os.path.join(path, LOGITS_FILE)
  with np.load(path, allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


__all__ = ["AUGMENTATIONS", "augmented_queries", "all_model_logits", "build", "default_config",
           "read_logits", "read_results", "score_targets"]
