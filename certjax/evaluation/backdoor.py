"""'backdoor': clean accuracy, attack success, and the defences on a poisoned run.

Settings: the `backdoor` section of a config (`default_config`). The workdir
must hold a poison record (`certjax.runs.poison`, written when the run was
trained with `config.poison`); without one the evaluator says so. It reports:

  * CA: clean accuracy on the selected eval images;
  * ASR: for a backdoor, the share of the selected eval images NOT of the
    target class (all-to-one; every image for all-to-all) that the model
    sends to the backdoor's label once the recorded trigger is applied; for
    pairwise label flips, the share of source-class images predicted as the
    target; for a targeted poison (feature collision, gradient matching),
    1 if the model sends its target image (poison.target_index of the eval
    split) to the adversarial class, else 0; none for random or greedy
    flips (they aim at CA);
  * each defence of `defences` that finds poison, scored against the
    record's poisoned indices:
      spectral (Tran et al. 2018) and activation_clustering (Chen et al.
        2019) on the penultimate features of the poisoned train split:
        precision, recall and (spectral) AUC of what they remove;
      neural_cleanse (Wang et al. 2019): the reversed trigger of every class
        (one vmapped program), its mask norm and anomaly index, the flagged
        classes and whether the true target is among them; with
        `nc_unlearning`, CA/ASR after unlearning the flagged triggers;
      strip (Gao et al. 2019): the false-acceptance rate (FAR) of triggered
        eval images at the threshold giving `strip_frr` false rejections of
        clean ones, the AUC, and CA/ASR with the rejection (a rejected image
        counts as neither correct nor a backdoor success);
  * each model repair of `defences` (`certjax.evaluation.backdoor_repair`):
    fine_tuning, fine_pruning (CA/ASR after pruning alone and after
    fine-tuning) and abl (on ABL's isolation model), with CA/ASR of the
    repaired model.
Writes `<workdir>/backdoor/results.{json,md,png}` (the MD: CA/ASR under every
defence, then what each found or did; the PNG: a clean image, its triggered
copy and the trigger, then the reversed trigger of every class with its
anomaly index).

Retraining from scratch on what spectral signatures or activation clustering
keep is a training run: train with `config.data.exclude_file` set to the
removed indices this evaluator saves (`<output>/removed_<defence>.npy`);
`launch.backdoor_table` does this for every attack of its table.

References:
  Gu, Dolan-Gavitt, Garg. BadNets. 2017. Chen, Liu, Li, Lu, Song. Targeted
    Backdoor Attacks on Deep Learning Systems Using Data Poisoning. 2017.
  Nguyen, Tran. WaNet - Imperceptible Warping-based Backdoor Attack. ICLR 2021.
  Tran, Li, Madry. Spectral Signatures in Backdoor Attacks. NeurIPS 2018.
  Chen et al. Detecting Backdoor Attacks on Deep Neural Networks by
    Activation Clustering. AAAI SafeAI 2019.
  Wang et al. Neural Cleanse: Identifying and Mitigating Backdoor Attacks in
    Neural Networks. IEEE S&P 2019.
  Gao et al. STRIP: A Defence Against Trojan Attacks on Deep Neural
    Networks. ACSAC 2019.
  Liu, Dolan-Gavitt, Garg. Fine-Pruning. RAID 2018. Li et al. Anti-Backdoor
    Learning. NeurIPS 2021.
  Wu et al. BackdoorBench. NeurIPS 2022 Datasets and Benchmarks (the CA /
    ASR convention).
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from certjax import data as data_lib
from certjax import parallel
from certjax import validation
from certjax.defences import detectors as detectors_lib
from certjax.evaluation import backdoor_repair as repair_lib
from certjax.evaluation import common
from certjax.evaluation import plots
from certjax.evaluation.registry import EvalContext, EvalData, EvalResult, EvalSetup
from certjax.evaluation.registry import register_evaluator
from certjax.poisoning import neural_cleanse as nc_lib
from certjax.poisoning import sanitize
from certjax.poisoning import triggers as triggers_lib
from certjax.runs import files
from certjax.runs import poison as poison_files

NAME = "backdoor"
SECTION = "backdoor"
RESULTS_STEM = "results"
DEFENCES = ("spectral", "activation_clustering", "neural_cleanse", "strip", "fine_tuning",
            "fine_pruning", "abl")
# 'abl' needs a model trained with ABL's isolation objective, so it is not a default.
DEFAULT_DEFENCES = DEFENCES[:-1]


def default_config() -> ml_collections.ConfigDict:
  """Defaults of `config.backdoor`.

  Fields:
    defences: defences of DEFENCES to run ('' none): the detection defences
      and the model repairs of `certjax.evaluation.backdoor_repair`
      (fine_tuning, fine_pruning, abl; Neural Cleanse also unlearns when
      `nc_unlearning`).
    expected_rate: spectral signatures' upper bound eps on the poisoned
      share of a class (they remove 1.5 eps of every class); 0 = the exact
      largest share in the record (`largest_class_share`).
    clean_size: clean eval-split images the defender holds (Neural Cleanse's
      optimisation set, STRIP's overlays); taken from the start of the split.
    nc_epochs, nc_batches_per_epoch, nc_batch_size, nc_learning_rate: Neural
      Cleanse's optimisation (Wang et al.'s defaults: up to 1000 epochs,
      early stopping; fewer fit a CPU).
    strip_overlays: STRIP's superimposed images per input.
    strip_frr: STRIP's false-rejection rate on clean images that sets its
      threshold.
    nc_unlearning: after Neural Cleanse flags classes, fine-tune with their
      reversed triggers (the paper's mitigation) and report CA/ASR.
    repair_fraction: the defender's clean training data for the repairs, as
      a share of the train split (BackdoorBench: 0.05).
    repair_epochs, repair_batch_size, repair_learning_rate: every repair's
      fine-tuning (SGD, momentum 0.9).
    prune_layer: fine-pruning's layer: 'last_conv' (the paper),
      'penultimate' (the input of the last Dense layer) or 'auto' (the last
      convolution; the penultimate features of a model without one).
    prune_max_drop: fine-pruning prunes while the defender's clean accuracy
      stays within this of the unpruned model's (0.04 in the paper).
    abl_isolation_fraction: ABL's isolated share of the training set (0.01).
    abl_clean_epochs: ABL's fine-tuning epochs on the rest.
    abl_unlearning_epochs, abl_unlearning_learning_rate: ABL's gradient
      ascent on the isolated set (5 epochs at 5e-4 in the authors' code).
    batch_size: examples per compiled call.
    split: split to evaluate; '' = config.data.eval_split.
    seed: the defences' randomness.
    checkpoint_step: checkpoint to restore; -1 = the newest.
    output_dir: '' = <workdir>/backdoor.
  """
  return ml_collections.ConfigDict({
      "defences": DEFAULT_DEFENCES,
      "expected_rate": 0.0,
      "clean_size": 500,
      "nc_epochs": 30,
      "nc_batches_per_epoch": 10,
      "nc_batch_size": 32,
      "nc_learning_rate": 0.1,
      "strip_overlays": 16,
      "strip_frr": 0.01,
      "nc_unlearning": True,
      "repair_fraction": 0.05,
      "repair_epochs": 10,
      "repair_batch_size": 128,
      "repair_learning_rate": 0.01,
      "prune_layer": "auto",
      "prune_max_drop": 0.04,
      "abl_isolation_fraction": 0.01,
      "abl_clean_epochs": 1,
      "abl_unlearning_epochs": 5,
      "abl_unlearning_learning_rate": 5e-4,
      "batch_size": 500,
      "split": "",
      "seed": 0,
      "checkpoint_step": -1,
      "output_dir": "",
  })


def validate_settings(settings: ml_collections.ConfigDict, setup: EvalSetup) -> None:
  del setup
  names = settings.defences
  if isinstance(names, str):
    raise ValueError(f"backdoor.defences must be a list of names from {DEFENCES}; got the "
                     f"string {names!r}.")
  for name in names or ():
    validation.check_choice(name, "backdoor.defences", DEFENCES)
  validation.check_positive(settings.expected_rate, "backdoor.expected_rate", allow_zero=True)
  if settings.expected_rate > 1:
    raise ValueError(f"backdoor.expected_rate must lie in [0, 1]; got {settings.expected_rate}.")
  validation.check_int_at_least(settings.clean_size, "backdoor.clean_size", 2)
  for key in ("nc_epochs", "nc_batches_per_epoch", "nc_batch_size", "strip_overlays",
              "batch_size"):
    validation.check_int_at_least(settings[key], f"backdoor.{key}", 1)
  validation.check_positive(settings.nc_learning_rate, "backdoor.nc_learning_rate")
  validation.check_in_open_interval(settings.strip_frr, "backdoor.strip_frr", 0.0, 1.0)
  validation.check_in_open_interval(settings.repair_fraction, "backdoor.repair_fraction", 0.0,
                                    1.0)
  for key in ("repair_epochs", "repair_batch_size", "abl_clean_epochs",
              "abl_unlearning_epochs"):
    validation.check_int_at_least(settings[key], f"backdoor.{key}", 1)
  for key in ("repair_learning_rate", "abl_unlearning_learning_rate"):
    validation.check_positive(settings[key], f"backdoor.{key}")
  validation.check_choice(settings.prune_layer, "backdoor.prune_layer",
                          ("auto",) + common.TAPPED_LAYERS)
  validation.check_in_open_interval(settings.prune_max_drop, "backdoor.prune_max_drop", 0.0,
                                    1.0)
  validation.check_in_open_interval(settings.abl_isolation_fraction,
                                    "backdoor.abl_isolation_fraction", 0.0, 1.0)
  if not isinstance(settings.nc_unlearning, bool):
    raise ValueError(f"backdoor.nc_unlearning must be True or False; got "
                     f"{settings.nc_unlearning!r}.")
  validation.check_int_at_least(settings.seed, "backdoor.seed", 0)
  validation.check_int_at_least(settings.checkpoint_step, "backdoor.checkpoint_step", -1)


def _predict(logits_fn: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
  predict = jax.jit(lambda xb: jnp.argmax(logits_fn(xb), -1))
  return np.concatenate([np.asarray(predict(x[s])) for s in common.batches(len(x), batch_size)])


def with_trigger(trigger: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
  """`x` with the recorded trigger applied, `batch_size` images per compiled call."""
  apply = jax.jit(lambda xb: triggers_lib.apply_trigger(trigger, xb))
  return np.concatenate([np.asarray(apply(x[s])) for s in common.batches(len(x), batch_size)])


def trigger_targets(record: poison_files.PoisonRecord, y: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Which eval images (labels `y`) count for ASR, and the labels the backdoor sends them to.

  All-to-one (and clean-label): the images outside the target class, sent to
  it; all-to-all: every image, sent to the next class.
  """
  settings = record.summary["settings"]
  mode = settings["mode"] if record.summary["attack"] != "clean_label" else "all_to_one"
  target = int(settings["target_class"])
  chosen = y != target if mode == "all_to_one" else np.ones(len(y), bool)
  wanted = np.asarray(triggers_lib.target_labels(y[chosen], mode, target=target,
                                                 num_classes=int(record.summary["num_classes"])))
  return chosen, wanted


def attack_success(logits_fn: Any, x: np.ndarray, y: np.ndarray,
                   record: poison_files.PoisonRecord, batch_size: int,
                   triggered: np.ndarray | None = None,
                   target_example: tuple[np.ndarray, int] | None = None) -> dict[str, Any]:
  """ASR of the recorded attack on eval images `x, y` (see the module docstring).

  `triggered`: `with_trigger(record.trigger, x, ...)` when the caller has it.
  `target_example`: a targeted poison's target (`poison_files.target_image`);
  its ASR is 1 when the model sends it to the adversarial class, else 0.
  """
  settings = record.summary["settings"]
  attack = record.summary["attack"]
  target = int(settings["target_class"])
  if attack in poison_files.TARGETED:
    if target_example is None:
      raise ValueError(f"The ASR of a {attack} poison needs its target image: pass "
                       "target_example=poison_files.target_image(data_config, target_index).")
    prediction = int(_predict(logits_fn, target_example[0][None], 1)[0])
    return {"asr": float(prediction == target), "asr_examples": 1,
            "target_index": int(settings["target_index"]),
            "target_label": int(target_example[1]), "target_prediction": prediction}
  if record.trigger is not None:
    chosen, wanted = trigger_targets(record, y)
    if not chosen.any():
      return {"asr": None, "asr_examples": 0, "asr_note": "no eval image outside the target"}
    if triggered is None:
      triggered = with_trigger(record.trigger, x, batch_size)
    hits = _predict(logits_fn, triggered[chosen], batch_size) == wanted
    return {"asr": float(np.mean(hits)), "asr_examples": int(chosen.sum())}
  if attack == "label_flip_pairwise":
    source = y == int(settings["source_class"])
    if not source.any():
      return {"asr": None, "asr_examples": 0, "asr_note": "no source-class eval image"}
    hits = _predict(logits_fn, x[source], batch_size) == target
    return {"asr": float(np.mean(hits)), "asr_examples": int(source.sum())}
  return {"asr": None, "asr_examples": 0,
          "asr_note": f"{attack} aims at clean accuracy; it has no attack success rate"}


@register_evaluator(NAME, section=SECTION, default_config=default_config,
                    validate=validate_settings,
                    summary="backdoor CA/ASR, poison detection and model repairs")
def build(settings: ml_collections.ConfigDict, setup: EvalSetup):
  """The 'backdoor' evaluator for validated `settings` (see `default_config`)."""
  validate_settings(settings, setup)
  run_config = setup.run_config

  def evaluate(ctx: EvalContext) -> EvalResult:
    workdir = ctx.metadata.get("workdir") if ctx.metadata else None
    if not workdir or run_config is None:
      raise ValueError("The 'backdoor' evaluator reads the poison record of a workdir: run it "
                       "with launch.evaluate on a run trained with config.poison.")
    record = poison_files.read_record(str(workdir))
    key = jax.random.key(int(settings.seed))
    batch_size = int(settings.batch_size)
    logits_fn = ctx.logits_fn()
    x, y = common.load_all(ctx.data)
    clean_correct = _predict(logits_fn, x, batch_size) == y
    clean_accuracy = float(np.mean(clean_correct))
    # Every eval image with the recorded trigger, once: ASR, STRIP and the figure use them.
    triggered = (with_trigger(record.trigger, x, batch_size)
                 if record.trigger is not None else None)
    target_example = (poison_files.target_image(
        run_config.data, int(record.summary["settings"]["target_index"]))
        if record.summary["attack"] in poison_files.TARGETED else None)
    row: dict[str, Any] = {"attack": record.summary["attack"],
                           "rate": record.summary["settings"]["rate"],
                           "num_poisoned": record.summary["num_poisoned"],
                           "clean_accuracy": clean_accuracy,
                           **attack_success(logits_fn, x, y, record, batch_size, triggered,
                                            target_example)}
    common.report(ctx, f"backdoor: CA {100 * clean_accuracy:.2f}%, ASR "
                  + ("n/a" if row["asr"] is None else f"{100 * row['asr']:.2f}%"))

    def score(repaired_logits_fn: Any) -> dict[str, Any]:
      """CA and ASR of a repaired model on the same eval images."""
      result = attack_success(repaired_logits_fn, x, y, record, batch_size, triggered,
                              target_example)
      return {"clean_accuracy": float(np.mean(
          _predict(repaired_logits_fn, x, batch_size) == y)), "asr": result["asr"]}

    unrepaired = {"clean_accuracy": clean_accuracy, "asr": row["asr"]}
    defender_cache: list[Any] = []

    def defender() -> tuple[np.ndarray, np.ndarray]:
      if not defender_cache:
        defender_cache.append(repair_lib.defender_set(
            run_config, record, float(settings.repair_fraction), int(settings.seed)))
      return defender_cache[0]
    defences: dict[str, Any] = {}
    names = tuple(settings.defences or ())
    poisoned = record.indices[record.poisoned]
    clean_set = EvalData.from_config(run_config.data, ctx.data.split or
                                     run_config.data.eval_split, 1,
                                     int(settings.clean_size) - 1)
    x_clean, _ = common.load_all(clean_set)
    figure_rows = {}
    if {"spectral", "activation_clustering", "abl"} & set(names):
      # The train split as the model saw it: the clean split with the record.
      trained_on = ml_collections.ConfigDict(run_config.data.to_dict())
      trained_on.replace_file = poison_files.record_path(str(workdir))
      trained_on.exclude_file = ""
      train_x, train_y = data_lib.load_split_uint8(trained_on, trained_on.train_split)
    if {"spectral", "activation_clustering"} & set(names):
      features_fn = jax.jit(common.penultimate_features(ctx.apply_fn, ctx.variables))
      features = np.concatenate([
          np.asarray(features_fn(train_x[s].astype(np.float32) / 255.0))
          for s in common.batches(len(train_y), batch_size)])
      num_train = len(train_y)
      rate = float(settings.expected_rate) or largest_class_share(record, train_y)
      if "spectral" in names and rate >= 1.0:
        # Tran et al. separate poison from the clean examples of a class; a
        # class that is all poison (a clean-label attack on every target
        # image) leaves nothing to separate, and eps = 1 removes everything.
        defences["spectral"] = {
            "skipped": f"expected_rate {rate:g}: every training example of a class is "
                       "poisoned, so spectral signatures have no clean examples to separate "
                       "the poison from"}
      elif "spectral" in names:
        start = time.perf_counter()
        result = sanitize.spectral_signatures(features, train_y, num_classes=ctx.num_classes,
                                              expected_rate=rate)
        defences["spectral"] = {
            **_scores(sanitize.detection_scores(result.removed, poisoned, num_train)),
            "auc": float(sanitize.detection_scores(result.scores, poisoned,
                                                   num_train)["auc"]),
            "num_removed": int(len(result.removed)), "seconds": time.perf_counter() - start}
        _save_removed(ctx, "spectral", result.removed)
      if "activation_clustering" in names:
        start = time.perf_counter()
        result = sanitize.activation_clustering(features, train_y,
                                                num_classes=ctx.num_classes,
                                                seed=int(settings.seed))
        defences["activation_clustering"] = {
            **_scores(sanitize.detection_scores(result.removed, poisoned, num_train)),
            "num_removed": int(len(result.removed)),
            "flagged_classes": [c for c, stats in enumerate(result.per_class)
                                if getattr(stats, "flagged", False)],
            "seconds": time.perf_counter() - start}
        _save_removed(ctx, "activation_clustering", result.removed)
    target = int(record.summary["settings"]["target_class"])
    if "neural_cleanse" in names:
      start = time.perf_counter()
      reversed_ = nc_lib.neural_cleanse(
          jax.random.fold_in(key, 1), logits_fn, x_clean, num_classes=ctx.num_classes,
          num_epochs=int(settings.nc_epochs),
          batches_per_epoch=int(settings.nc_batches_per_epoch),
          batch_size=int(settings.nc_batch_size), learning_rate=float(settings.nc_learning_rate))
      anomaly = nc_lib.anomaly_index(reversed_.l1_norm)
      flagged = [int(c) for c in np.nonzero(np.asarray(anomaly.flagged))[0]]
      defences["neural_cleanse"] = {
          "l1_norms": np.asarray(reversed_.l1_norm).tolist(),
          "anomaly_index": np.asarray(anomaly.index).tolist(),
          "attack_success_rates": np.asarray(reversed_.attack_success_rate).tolist(),
          "flagged_classes": flagged, "target_flagged": target in flagged,
          "target_anomaly_index": float(np.asarray(anomaly.index)[target]),
          "seconds": time.perf_counter() - start}
      if settings.nc_unlearning:
        defences["neural_cleanse"]["unlearning"] = repair_lib.nc_unlearning(
            jax.random.fold_in(key, 2), ctx.apply_fn, ctx.variables, defender(), reversed_,
            flagged, settings, score, unrepaired)
      figure_rows["neural_cleanse"] = (np.asarray(reversed_.mask),
                                       np.asarray(anomaly.index))
    if "strip" in names and record.trigger is not None:
      start = time.perf_counter()
      detector = detectors_lib.strip(logits_fn, x_clean,
                                     num_overlays=int(settings.strip_overlays))
      strip_score = jax.jit(detector.score_fn)
      chosen, wanted = trigger_targets(record, y)
      trojaned = triggered[chosen]
      clean_scores = np.concatenate([np.asarray(strip_score(jax.random.fold_in(key, 10 + i), x[s]))
                                     for i, s in enumerate(common.batches(len(x), batch_size))])
      trojan_scores = np.concatenate([
          np.asarray(strip_score(jax.random.fold_in(key, 100_000 + i), trojaned[s]))
          for i, s in enumerate(common.batches(len(trojaned), batch_size))])
      metrics = detectors_lib.detection_metrics(clean_scores, trojan_scores,
                                                fpr=float(settings.strip_frr))
      # With rejection: a clean image counts for CA when accepted and right, a
      # triggered one for ASR when accepted and sent to the backdoor's label.
      threshold = float(metrics["threshold"])
      clean_kept = (clean_scores <= threshold) & clean_correct
      trojan_kept = (trojan_scores <= threshold) & (
          _predict(logits_fn, trojaned, batch_size) == wanted)
      defences["strip"] = {"frr": float(metrics["fpr"]),
                           "far": 1.0 - float(metrics["detection_rate"]),
                           "auc": float(metrics["auc"]), "threshold": threshold,
                           "clean_accuracy": float(np.mean(clean_kept)),
                           "asr": float(np.mean(trojan_kept)) if len(trojaned) else None,
                           "seconds": time.perf_counter() - start}
    elif "strip" in names:
      defences["strip"] = {"skipped": "no trigger: STRIP detects triggered inputs"}
    if "fine_tuning" in names:
      defences["fine_tuning"] = repair_lib.fine_tuning(
          jax.random.fold_in(key, 3), ctx.apply_fn, ctx.variables, defender(), settings, score)
    if "fine_pruning" in names:
      defences["fine_pruning"] = repair_lib.fine_pruning(
          jax.random.fold_in(key, 4), ctx.apply_fn, ctx.variables, defender(), settings, score)
    if "abl" in names:
      defences["abl"] = repair_lib.abl(
          jax.random.fold_in(key, 5), ctx.apply_fn, ctx.variables, (train_x, train_y), record,
          settings, score, str(run_config.objective.name))
    table = results_table(row, defences, record, len(y))
    metrics_out = {"clean_accuracy": clean_accuracy}
    if row["asr"] is not None:
      metrics_out["asr"] = row["asr"]
    for name, result in defences.items():
      for k in ("precision", "recall", "auc", "far", "target_anomaly_index"):
        if k in result:
          metrics_out[f"{name}/{k}"] = float(result[k])
    for name, result in defence_outcomes(row, defences)[1:]:
      for k in ("clean_accuracy", "asr"):
        if result.get(k) is not None:
          metrics_out[f"{name}/{k}"] = float(result[k])
    payload = {"evaluator": NAME, "settings": settings.to_dict(),
               "metadata": common.metadata_block(ctx), "poison": record.summary,
               "result": row, "defences": defences}
    shown = int(np.argmax(y != target))  # the first image outside the target class
    figure = plots.backdoor_figure(x[shown], None if triggered is None else triggered[shown],
                                   figure_rows.get("neural_cleanse"),
                                   title=f"{record.summary['attack']} at rate "
                                   f"{record.summary['settings']['rate']:g}: CA "
                                   f"{100 * clean_accuracy:.1f}%"
                                   + ("" if row["asr"] is None else
                                      f", ASR {100 * row['asr']:.1f}%"), target=target)
    artifacts = common.write_results(ctx.output_dir, RESULTS_STEM, payload, table, figure)
    common.report(ctx, table)
    return EvalResult(NAME, metrics_out, artifacts, table, details={"result": row,
                                                                    "defences": defences})

  return evaluate


def largest_class_share(record: poison_files.PoisonRecord, labels: np.ndarray) -> float:
  """The largest poisoned share of any class (by the labels trained on): Tran et al.'s eps.

  The paper assumes the defender knows an upper bound eps on the poisoned
  fraction of the target class; this is the exact one, so spectral
  signatures are scored at their best setting. A 10% all-to-one poison is
  about half of its target class, not 10% of it.
  """
  poisoned = record.indices[record.poisoned]
  counts = np.bincount(labels, minlength=int(labels.max()) + 1)
  hits = np.bincount(labels[poisoned], minlength=len(counts))
  return float(np.max(hits / np.maximum(counts, 1)))


def _scores(scores: dict[str, Any]) -> dict[str, Any]:
  return {k: float(v) for k, v in scores.items() if isinstance(v, (int, float, np.floating,
                                                                  np.integer))}


def _save_removed(ctx: EvalContext, name: str, removed: np.ndarray) -> None:
  """The removed indices as a data.exclude_file for retraining on the rest."""
  if ctx.output_dir is None:
    return
  if parallel.is_main_process():
    files.atomic_write_npy(os.path.join(ctx.output_dir, f"removed_{name}.npy"),
                           np.asarray(removed, np.int64))


def _percent(value: Any) -> str:
  return "n/a" if value is None else f"{100 * value:.2f}%"


def defence_outcomes(row: dict[str, Any], defences: dict[str, Any]
                     ) -> list[tuple[str, dict[str, Any]]]:
  """(row name, {'clean_accuracy', 'asr'}) of the model with no defence and after each
  defence that changes what the deployed model answers: STRIP with its rejection,
  Neural Cleanse's unlearning, fine-tuning, fine-pruning (pruned alone, then
  fine-tuned) and ABL."""
  rows = [("none", {"clean_accuracy": row["clean_accuracy"], "asr": row["asr"]})]
  for name, result in defences.items():
    if name == "neural_cleanse" and "unlearning" in result:
      rows.append(("neural_cleanse", result["unlearning"]))
    elif name == "fine_pruning":
      rows.append(("pruning_only", result["after_pruning"]))
      rows.append((name, result))
    elif "clean_accuracy" in result:
      rows.append((name, result))
  return rows


def results_table(row: dict[str, Any], defences: dict[str, Any],
                  record: poison_files.PoisonRecord, num_examples: int) -> str:
  """The Markdown summary of one poisoned run."""
  lines = [f"Backdoor evaluation of a run poisoned by {row['attack']} (rate {row['rate']:g}, "
           f"{row['num_poisoned']} poisoned training examples), on {num_examples} eval images.",
           "", "| defence | CA | ASR |", "|---|---|---|"]
  for name, result in defence_outcomes(row, defences):
    lines.append(f"| {name} | {_percent(result['clean_accuracy'])} | "
                 f"{_percent(result['asr'])} |")
  if defences:
    lines += ["", "| defence | what it found or did |", "|---|---|"]
    for name, result in defences.items():
      if "skipped" in result:
        text = f"skipped: {result['skipped']}"
      elif name in ("spectral", "activation_clustering"):
        text = (f"removed {result['num_removed']}: precision {result.get('precision', 0):.3f}, "
                f"recall {result.get('recall', 0):.3f}"
                + (f", AUC {result['auc']:.3f}" if "auc" in result else "")
                + " (retrain on the rest with data.exclude_file)")
      elif name == "neural_cleanse":
        text = (f"flagged classes {result['flagged_classes']} (target "
                f"{int(record.summary['settings']['target_class'])} anomaly index "
                f"{result['target_anomaly_index']:.2f})")
        unlearning = result.get("unlearning", {})
        if "unlearned_classes" in unlearning:
          text += (f"; unlearned with {unlearning['stamped_examples']} stamped of "
                   f"{unlearning['defender_examples']} clean images")
      elif name == "strip":
        text = (f"FAR {100 * result['far']:.2f}% at FRR {100 * result['frr']:.2f}%, AUC "
                f"{result['auc']:.3f}")
      elif name == "fine_pruning":
        text = (f"pruned {result['num_pruned']} of {result['channels']} channels of "
                f"{result['layer']}, then {result['fine_tuning']['steps']} fine-tuning steps "
                f"on {result['defender_examples']} clean images")
      elif name == "fine_tuning":
        text = (f"{result['fine_tuning']['steps']} steps on {result['defender_examples']} "
                "clean images")
      else:
        text = (f"isolated {result['isolated']} lowest-loss examples: precision "
                f"{result['isolation_precision']:.3f}, recall {result['isolation_recall']:.3f}, "
                f"AUC {result['isolation_auc']:.3f}; then {result['clean_fine_tuning']['steps']} "
                f"steps on the rest and {result['unlearning']['steps']} ascent steps")
      lines.append(f"| {name} | {text} |")
  return "\n".join(lines) + "\n"


def read_results(path: str) -> dict[str, Any]:
  """The results.json of a backdoor evaluation (a workdir, its backdoor/, or the file)."""
  return common.read_results_json(path, SECTION, RESULTS_STEM)
