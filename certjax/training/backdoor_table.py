"""The attack x defence table of BackdoorBench: every training and evaluation run it needs.

`run_table(table_config, root)` fills one table: for every attack and poison
rate of `table_config` it

  1. trains the poisoned run (`<root>/<attack>_<rate>`, from the run config
     file, e.g. `configs/backdoor.py:<data>,<attack>,<rate>`);
  2. evaluates it with the 'backdoor' evaluator and the defences that work on
     the trained model (Neural Cleanse with unlearning, STRIP with
     rejection, fine-tuning, fine-pruning) and the sanitisers (spectral
     signatures, activation clustering), which save what they remove;
  3. retrains from scratch without what each sanitiser removed
     (`<root>/<attack>_<rate>-retrain_<defence>`, `data.exclude_file`), as
     BackdoorBench scores them, and evaluates CA/ASR of the retrained model;
  4. trains ABL's isolation model (`<root>/<attack>_<rate>-abl`, objective
     'abl_isolation') and evaluates the 'abl' defence on it;

then writes `<root>/table.{json,md,png}`: CA and ASR of every attack and rate
under every defence. Every step is skipped when its result is already there
(a finished training run resumes at its last step; an evaluation of the
same checkpoint with the same settings and images is read back), so an
interrupted table continues where it stopped.

Poison rates are shares of the whole training set, as BackdoorBench's. The
attacks whose `poison.rate` is a share of one class (clean-label: of the
target class; pairwise label flips: of the source class) get the rate that
poisons the same number of examples, rounded to two significant digits and
capped at 1 (a 10% clean-label poison of MNIST is every target-class image).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from certjax import data as data_lib
from certjax import evaluation
from certjax import parallel
from certjax import runs
from certjax import validation
from certjax.evaluation import backdoor as backdoor_eval
from certjax.evaluation import common as eval_common
from certjax.evaluation import plots
from certjax.poisoning import triggers as triggers_lib
from certjax.runs import files
from certjax.runs import poison as poison_files
from certjax.training import objectives
from certjax.training import poison as poison_lib
from certjax.training import train as train_lib

RETRAINED = ("spectral", "activation_clustering")
# Defences scored on the poisoned model itself (the rest need other runs).
IN_PLACE = ("neural_cleanse", "strip", "fine_tuning", "fine_pruning")
DEFENCES = ("none",) + IN_PLACE + RETRAINED + ("abl",)
ATTACKS = tuple(a for a in poison_lib.ATTACKS if a)
CLASS_SHARE = {"clean_label": "target_class", "label_flip_pairwise": "source_class"}
TABLE_STEM = "table"


def default_config() -> ml_collections.ConfigDict:
  """The keys of a table config (`configs/backdoor_table.py` fills them).

  Fields:
    run_config: the config file of one poisoned run, called with
      '<data>,<attack>,<rate>[,smoke]'.
    data: the data set name that file takes.
    attacks: poison attacks (config.poison.attack names).
    rates: poison rates, shares of the training set, in (0, 1].
    defences: columns, from DEFENCES ('none' is always the first).
    surrogate_workdir: the model clean-label poisons are perturbed against;
      '' trains a clean run (`<root>/none`) and uses it.
    smoke: run every config at its smoke scale (tests).
    skip, max: the eval images (every skip-th, below index max).
    backdoor: overrides of the 'backdoor' evaluator's settings.
    overrides: dotted-key overrides of every run's config (e.g.
      {'num_epochs': 2.0}).
  """
  return ml_collections.ConfigDict({
      "run_config": "configs/backdoor.py",
      "data": "mnist",
      "attacks": ("badnets", "blended", "wanet", "clean_label", "label_flip_pairwise"),
      "rates": (0.01, 0.1),
      "defences": DEFENCES,
      "surrogate_workdir": "",
      "smoke": False,
      "skip": 10,
      "max": -1,
      "backdoor": ml_collections.ConfigDict(),
      "overrides": ml_collections.ConfigDict(),
  })


def validate(table: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming a bad field of a table config."""
  unknown = sorted(set(table.keys()) - set(default_config().keys()))
  if unknown:
    raise ValueError(f"Unknown table config key(s) {unknown}; accepted: "
                     f"{sorted(default_config().keys())}.")
  for name in ("attacks", "rates", "defences"):
    if isinstance(table[name], str) or not len(table[name]):
      raise ValueError(f"table.{name} must be a non-empty list; got {table[name]!r}.")
  for attack in table.attacks:
    validation.check_choice(attack, "table.attacks", ATTACKS)
  for rate in table.rates:
    validation.check_positive(rate, "table.rates")
    if rate > 1:
      raise ValueError(f"table.rates must lie in (0, 1]; got {rate}.")
  for defence in table.defences:
    validation.check_choice(defence, "table.defences", DEFENCES)
  validation.check_int_at_least(table.skip, "table.skip", 1)
  validation.check_int_at_least(table.max, "table.max", -1)
  if not os.path.isfile(str(table.run_config)):
    raise FileNotFoundError(f"table.run_config {table.run_config!r} is not a file (run from "
                            "the repository root, or give an absolute path).")


def load_config_file(path: str, arg: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file at `path` (as `--config=path:arg` does)."""
  spec = importlib.util.spec_from_file_location("certjax_table_run_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _set(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  *parents, last = dotted.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  node[last] = value


def setting_rate(attack: str, rate: float, train_labels: np.ndarray,
                 config: ml_collections.ConfigDict) -> float:
  """`poison.rate` that poisons about rate * N examples (see the module docstring)."""
  if attack not in CLASS_SHARE:
    return float(rate)
  size = int(np.sum(train_labels == int(config.poison[CLASS_SHARE[attack]])))
  share = min(1.0, rate * len(train_labels) / max(size, 1))
  return float(f"{share:.2g}")


def _run_name(attack: str, rate: float) -> str:
  return f"{attack}_{rate:g}"


class _Runner:
  """Trains and evaluates the runs of one table, skipping what is already done."""

  def __init__(self, table: ml_collections.ConfigDict, root: str):
    self.table = table
    self.root = root
    self.seconds: dict[str, float] = {}

  def config(self, arg: str) -> ml_collections.ConfigDict:
    config = load_config_file(str(self.table.run_config),
                              arg + (",smoke" if self.table.smoke else ""))
    for dotted, value in dict(self.table.overrides).items():
      _set(config, dotted, value)
    config.skip = int(self.table.skip)
    config.max = int(self.table.max)
    for key, value in dict(self.table.backdoor).items():
      config.backdoor[key] = value
    return config

  def train(self, config: ml_collections.ConfigDict, name: str) -> str:
    workdir = os.path.join(self.root, name)
    start = time.perf_counter()
    logging.info("table: training %s", workdir)
    train_lib.train_and_evaluate(config, workdir)
    self.seconds[f"train {name}"] = time.perf_counter() - start
    return workdir

  def evaluate(self, config: ml_collections.ConfigDict, workdir: str,
               defences: tuple[str, ...]) -> dict[str, Any]:
    """The backdoor results of `workdir` with `defences`, read back when already there."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.backdoor.defences = defences
    settings = evaluation.merged_settings("backdoor", config.backdoor).to_dict()
    # What the results depend on: the checkpoint evaluated, the settings and the images.
    step = runs.resolve_step(workdir, int(settings["checkpoint_step"]))
    key = json.loads(json.dumps({"settings": settings, "skip": int(config.skip),
                                 "max": int(config.max), "step": step}, default=str))
    marker = os.path.join(workdir, backdoor_eval.SECTION, "table_key.json")
    if os.path.isfile(marker):
      with open(marker) as f:
        if json.load(f) == key:
          return backdoor_eval.read_results(workdir)
    start = time.perf_counter()
    logging.info("table: evaluating %s with %s", workdir, defences)
    evaluation.evaluate_workdir(config, workdir, "backdoor", verbose=False)
    self.seconds[f"evaluate {os.path.basename(workdir)}"] = time.perf_counter() - start
    if parallel.is_main_process():
      files.atomic_write_text(marker, json.dumps(key))
    return backdoor_eval.read_results(workdir)


def run_table(table: ml_collections.ConfigDict, root: str) -> dict[str, Any]:
  """Trains and evaluates everything the table needs; writes and returns it.

  Returns:
    The table payload: {'rows': [{attack, rate, poison_rate_setting,
    workdir, cells: {defence: {clean_accuracy, asr, ...}}}], 'settings',
    'seconds'}.

  Raises:
    ValueError / FileNotFoundError: a bad table config (`validate`).
  """
  validate(table)
  os.makedirs(root, exist_ok=True)
  runner = _Runner(table, root)
  data_name = str(table.data)
  defences = tuple(table.defences)
  surrogate = str(table.surrogate_workdir)
  if "clean_label" in table.attacks and not surrogate:
    surrogate = runner.train(runner.config(f"{data_name},none"), "none")
  probe = runner.config(f"{data_name},none")
  train_images, train_labels = data_lib.load_split_uint8(probe.data, probe.data.train_split)
  in_place = tuple(d for d in IN_PLACE + RETRAINED if d in defences)
  rows = []
  for attack in table.attacks:
    for rate in table.rates:
      name = _run_name(attack, float(rate))
      arg_rate = setting_rate(attack, float(rate), train_labels, probe)
      config = runner.config(f"{data_name},{attack},{arg_rate:g}")
      if attack == "clean_label":
        config.poison.surrogate_workdir = surrogate
      workdir = runner.train(config, name)
      results = runner.evaluate(config, workdir, in_place)
      found = results["defences"]
      cells: dict[str, Any] = {"none": _cell(results["result"])}
      for defence, outcome in backdoor_eval.defence_outcomes(results["result"], found)[1:]:
        if defence in defences:
          cells[defence] = _cell(outcome)
      if "fine_pruning" in found:
        cells["fine_pruning"]["after_pruning"] = _cell(found["fine_pruning"]["after_pruning"])
      for defence in RETRAINED:
        if defence not in defences:
          continue
        if "skipped" in found[defence]:
          cells[defence] = {"clean_accuracy": None, "asr": None,
                            "skipped": found[defence]["skipped"]}
          continue
        removed = os.path.join(workdir, backdoor_eval.SECTION, f"removed_{defence}.npy")
        retrain = ml_collections.ConfigDict(config.to_dict())
        retrain.data.exclude_file = os.path.abspath(removed)
        retrained = runner.evaluate(retrain, runner.train(retrain, f"{name}-retrain_{defence}"),
                                    ())
        cells[defence] = {**_cell(retrained["result"]),
                          "precision": found[defence].get("precision"),
                          "recall": found[defence].get("recall"),
                          "removed": found[defence].get("num_removed")}
      if "abl" in defences:
        isolation = ml_collections.ConfigDict(config.to_dict())
        isolation.objective = objectives.objective_defaults("abl_isolation")
        ablated = runner.evaluate(isolation, runner.train(isolation, f"{name}-abl"), ("abl",))
        abl = ablated["defences"]["abl"]
        cells["abl"] = {**_cell(abl), "isolation_precision": abl["isolation_precision"],
                        "isolation_recall": abl["isolation_recall"],
                        "isolation_model": _cell(ablated["result"])}
      if "neural_cleanse" in cells:
        cells["neural_cleanse"]["flagged_classes"] = found["neural_cleanse"]["flagged_classes"]
      rows.append({"attack": attack, "rate": float(rate), "poison_rate_setting": arg_rate,
                   "num_poisoned": results["result"]["num_poisoned"], "workdir": workdir,
                   "cells": {d: cells[d] for d in defences if d in cells}})
  payload = {"settings": table.to_dict(), "rows": rows, "seconds": runner.seconds}
  if parallel.is_main_process():
    text = table_markdown(rows, defences, table)
    figure = plots.backdoor_table_figure(rows, defences)
    eval_common.write_results(root, TABLE_STEM, payload, text, figure)
    eval_common.save_figure(os.path.join(root, "poisons.png"), plots.poison_gallery_figure(
        poison_examples(rows, probe, train_images), title=f"The poisons of the table ({table.data})"))
    logging.info("table: wrote %s", os.path.join(root, TABLE_STEM + ".md"))
  return payload


def poison_examples(rows: list[dict[str, Any]], config: ml_collections.ConfigDict,
                    train_x: np.ndarray) -> list[dict[str, Any]]:
  """`plots.poison_gallery_figure`'s rows: each attack's first run of the table.

  `train_x`: the clean train split's uint8 images (the run config's data).
  """
  eval_x, eval_y = data_lib.load_split_uint8(config.data, config.data.eval_split)
  examples, seen = [], set()
  for row in rows:
    if row["attack"] in seen:
      continue
    seen.add(row["attack"])
    record = poison_files.read_record(row["workdir"])
    target = int(record.summary["settings"]["target_class"])
    shown = int(np.argmax(eval_y != target))
    clean = eval_x[shown].astype(np.float32) / 255.0
    triggered = None
    if record.trigger is not None:
      triggered = np.asarray(triggers_lib.apply_trigger(record.trigger, clean[None]))[0]
    first = int(np.argmax(record.poisoned)) if len(record.indices) else None
    examples.append({
        "name": f"{row['attack']} ({100 * row['rate']:g}%)", "clean": clean,
        "triggered": triggered,
        "original": None if first is None else
        train_x[record.indices[first]].astype(np.float32) / 255.0,
        "original_label": None if first is None else int(record.original_labels[first]),
        "poison": None if first is None else record.images[first].astype(np.float32) / 255.0,
        "poison_label": None if first is None else int(record.labels[first])})
  return examples


def _cell(result: dict[str, Any]) -> dict[str, Any]:
  return {"clean_accuracy": result.get("clean_accuracy"), "asr": result.get("asr")}


def _percent(value: Any) -> str:
  return "-" if value is None else f"{100 * value:.2f}"


def table_markdown(rows: list[dict[str, Any]], defences: tuple[str, ...],
                   table: ml_collections.ConfigDict) -> str:
  """The attack x defence table as Markdown, CA / ASR in % per cell."""
  lines = [f"Attack x defence on {table.data} ({table.run_config}), CA / ASR in %, "
           f"every {table.skip}-th test image. Poison rate = share of the training set.", "",
           "| attack | rate | " + " | ".join(defences) + " |",
           "|---|---|" + "---|" * len(defences)]
  for row in rows:
    cells = [f"{_percent(row['cells'][d]['clean_accuracy'])} / "
             f"{_percent(row['cells'][d]['asr'])}" if d in row["cells"] else "n/a"
             for d in defences]
    lines.append(f"| {row['attack']} | {row['rate']:g} | " + " | ".join(cells) + " |")
  skipped = [f"- {row['attack']} {row['rate']:g}, {d}: {cell['skipped']}."
             for row in rows for d, cell in row["cells"].items() if "skipped" in cell]
  if skipped:
    lines += ["", "Not run:"] + skipped
  return "\n".join(lines) + "\n"


def read_table(path: str) -> dict[str, Any]:
  """The table.json of a table root (or the file itself)."""
  if os.path.isdir(path):
    path = os.path.join(path, TABLE_STEM + ".json")
  with open(path) as f:
    return json.load(f)

