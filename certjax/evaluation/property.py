"""The 'property' evaluator: property inference on a many-models workdir of shadow models.

A run with `config.data.membership = 'property'` (`certjax.data.membership`)
trains K shadow models, the even-numbered ones on subsets where a share
`property_fractions[0]` of the examples is of class `property_class`, the
odd-numbered ones with `property_fractions[1]` (Ganju et al. 2018). The
attacker's question: given one model, which kind of training set did it
have? This evaluator splits the models into meta-training shadows (the first
`train_fraction`, an even number, so with/without pairs stay together) and
held-out ones, trains a meta-classifier of each `kinds` on the first and
reports its accuracy on the second against chance (the majority rate):
  * 'deepsets': Ganju et al.'s permutation-invariant representation of the
    fully connected layers' parameters (MLPs only);
  * 'sorted': every parameter after sorting each hidden layer's neurons
    (MLPs only);
  * 'outputs': the models' softmax outputs on `num_queries` fixed images of
    the eval split (any model; the black-box variant).
The property labels are read back from the saved masks (each model's share
of `property_class`), not assumed from the model order. With
`data.property_kind='rotated_share'` the property is the share of a model's
training images it saw rotated (a property no label shows); the labels come
from the rotation flags the run's config draws, checked against the saved
masks, and every second query image is rotated the same way (the attacker
knows which property it tests for).
Writes `property/results.{json,md,png}` (the PNG: held-out accuracy per kind
beside chance).

References:
  K. Ganju, Q. Wang, W. Yang, C. Gunter, N. Borisov. Property Inference
  Attacks on Fully Connected Neural Networks using Permutation Invariant
  Representations. CCS 2018.
  G. Ateniese, L. Mancini, A. Spognardi, A. Villani, D. Vitali, G. Felici.
  Hacking Smart Machines with Smarter Ones. IJSEC 2015.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from certjax import validation
from certjax.data import membership as membership_data
from certjax.evaluation import common
from certjax.evaluation import membership as membership_eval
from certjax.evaluation import plots
from certjax.evaluation.registry import EvalContext, EvalData, EvalResult, EvalSetup
from certjax.evaluation.registry import register_evaluator
from certjax.privacy import property as property_lib

NAME = "property"
SECTION = "property"
RESULTS_STEM = "results"


def default_config() -> ml_collections.ConfigDict:
  """Defaults of `config.property`.

  Fields:
    kinds: meta-classifiers to train, of `certjax.privacy.property.META_KINDS`.
    train_fraction: the share of the K models used to train the
      meta-classifier (rounded down to an even number); the rest are held out.
    num_queries: fixed eval-split images whose outputs the 'outputs'
      meta-classifier reads.
    num_steps, learning_rate, weight_decay: the meta-classifier's AdamW training.
    seed: the meta-classifier's key.
    checkpoint_step: checkpoint to restore; -1 = the newest.
    output_dir: '' = <workdir>/property.
  """
  return ml_collections.ConfigDict({
      "kinds": tuple(property_lib.META_KINDS),
      "train_fraction": 0.5,
      "num_queries": 100,
      "num_steps": 500,
      "learning_rate": 1e-3,
      "weight_decay": 1e-4,
      "seed": 0,
      "checkpoint_step": -1,
      "output_dir": "",
  })


def validate_settings(settings: ml_collections.ConfigDict, setup: EvalSetup) -> None:
  if not settings.kinds:
    raise ValueError(f"property.kinds must name at least one of {property_lib.META_KINDS}.")
  for kind in settings.kinds:
    validation.check_choice(kind, "property.kinds", tuple(property_lib.META_KINDS))
  validation.check_in_open_interval(settings.train_fraction, "property.train_fraction", 0.0, 1.0)
  validation.check_int_at_least(settings.num_queries, "property.num_queries", 1)
  validation.check_int_at_least(settings.num_steps, "property.num_steps", 1)
  validation.check_positive(settings.learning_rate, "property.learning_rate")
  validation.check_positive(settings.weight_decay, "property.weight_decay", allow_zero=True)
  validation.check_int_at_least(settings.seed, "property.seed", 0)
  validation.check_int_at_least(settings.checkpoint_step, "property.checkpoint_step", -1)
  run_config = setup.run_config
  if run_config is not None and int(run_config.get("num_models", 1)) > 1 and (
      run_config.data.get("membership") == "property"):
    num_train = _num_train_models(int(run_config.num_models), settings.train_fraction)
    if num_train < 4 or int(run_config.num_models) - num_train < 2:
      raise ValueError(
          f"property inference with num_models={run_config.num_models} and "
          f"train_fraction={settings.train_fraction} leaves {num_train} meta-training and "
          f"{int(run_config.num_models) - num_train} held-out models; it needs >= 4 and >= 2.")


def _num_train_models(num_models: int, train_fraction: float) -> int:
  return 2 * int(num_models * train_fraction // 2)


def accuracy_table(rows: list[dict[str, Any]], header: str) -> str:
  lines = [header, "", "| meta-classifier | held-out accuracy | chance | AUC | train accuracy |",
           "|---|---|---|---|---|"]
  for row in rows:
    if "skipped" in row:
      lines.append(f"| {row['kind']} | skipped: {row['skipped']} | | | |")
      continue
    lines.append(f"| {row['kind']} | {100 * row['accuracy']:.1f}% | {100 * row['chance']:.1f}% "
                 f"| {row['auc']:.3f} | {100 * row['train_accuracy']:.1f}% |")
  return "\n".join(lines) + "\n"


@register_evaluator(NAME, section=SECTION, default_config=default_config,
                    validate=validate_settings, many_models=True,
                    summary="property inference (Ganju et al.) over K shadow models")
def build(settings: ml_collections.ConfigDict, setup: EvalSetup):
  """The 'property' evaluator for validated `settings` (see `default_config`)."""
  validate_settings(settings, setup)
  run_config = setup.run_config
  kinds = list(dict.fromkeys(settings.kinds))

  def evaluate(ctx: EvalContext) -> EvalResult:
    if ctx.members is None or run_config is None:
      raise ValueError("The 'property' evaluator needs the shadow models of a many-models run "
                       "(evaluate_workdir on a workdir trained with data.membership='property').")
    data_config = run_config.data
    if data_config.membership != "property":
      raise ValueError("The 'property' evaluator reads the property from the training masks: "
                       "train with data.membership='property' (and data.property_class, "
                       f"data.property_fractions); this run used {data_config.membership!r}.")
    masks = np.asarray(ctx.members, bool)
    fraction_with, fraction_without = tuple(data_config.property_fractions)
    rotation = _rotation(data_config)
    if rotation:
      property_labels = _rotated_labels(run_config, masks)
      question = (f"Is a share {fraction_with:g} or {fraction_without:g} of a model's "
                  f"training images rotated by {rotation} degrees?")
    else:
      labels = common.load_all(ctx.data)[1]
      property_labels = membership_data.property_labels_of(
          masks, labels, int(data_config.property_class), fraction_with, fraction_without)
      question = (f"Is class {data_config.property_class} a share {fraction_with:g} or "
                  f"{fraction_without:g} of a model's training set?")
    num_models = masks.shape[0]
    num_train = _num_train_models(num_models, settings.train_fraction)
    train, held_out = np.arange(num_train), np.arange(num_train, num_models)

    inputs: dict[str, Any] = {}
    notes = {}
    try:
      layers = property_lib.dense_layers_from_params(ctx.variables["params"])
      layers = [(np.asarray(k), np.asarray(b)) for k, b in jax.device_get(layers)]
    except ValueError as e:
      layers = None
      notes["parameters"] = str(e)
    if "outputs" in kinds:
      queries = EvalData.from_config(data_config, data_config.eval_split, 1,
                                     int(settings.num_queries) - 1)
      query_images = queries.load(queries.indices)[0]
      if rotation:
        query_images = np.array(query_images)
        query_images[1::2] = membership_data.rotate_images(query_images[1::2], rotation)
      logits = membership_eval.all_model_logits(
          ctx.apply_fn, ctx.variables, query_images, "none", 500)
      inputs["outputs"] = logits[:, :, 0]
    rows = []
    key = jax.random.key(int(settings.seed))
    for i, kind in enumerate(kinds):
      if kind in ("deepsets", "sorted"):
        if layers is None:
          rows.append({"kind": kind, "skipped": "the model is not a plain MLP: "
                       + notes["parameters"]})
          continue
        features = layers
        subset = lambda rows_, f=features: [(k[rows_], b[rows_]) for k, b in f]  # noqa: E731
      else:
        subset = lambda rows_, f=inputs["outputs"]: f[rows_]  # noqa: E731
      result = property_lib.evaluate_property_inference(
          jax.random.fold_in(key, i), (subset(train), property_labels[train]),
          (subset(held_out), property_labels[held_out]), kind=kind,
          num_steps=int(settings.num_steps), learning_rate=float(settings.learning_rate),
          weight_decay=float(settings.weight_decay))
      rows.append({k: (float(v) if isinstance(v, (float, np.floating)) else v)
                   for k, v in result.items()})
      common.report(ctx, f"property: {kind} held-out accuracy {result['accuracy']:.3f} "
                    f"(chance {result['chance']:.3f})")
    header = (f"Property inference: {question[0].lower()}{question[1:]} "
              f"{num_models} shadow models, {num_train} for meta-training, "
              f"{num_models - num_train} held out.")
    table = accuracy_table(rows, header)
    metrics = {}
    for row in rows:
      if "accuracy" in row:
        metrics[f"{row['kind']}/accuracy"] = row["accuracy"]
        metrics[f"{row['kind']}/chance"] = row["chance"]
    payload = {"evaluator": NAME, "settings": settings.to_dict(),
               "metadata": common.metadata_block(ctx, num_models=num_models),
               "property": {"kind": "rotated_share" if rotation else "class_share",
                            "class": int(data_config.property_class),
                            "rotation_degrees": rotation,
                            "fractions": [fraction_with, fraction_without],
                            "labels": property_labels.tolist()},
               "results": rows, "notes": notes}
    figure = plots.property_inference_figure(rows, title=header.split("?")[0] + "?")
    artifacts = common.write_results(ctx.output_dir, RESULTS_STEM, payload, table, figure)
    common.report(ctx, table)
    return EvalResult(NAME, metrics, artifacts, table, details={"rows": rows})

  return evaluate


def _rotation(data_config: Any) -> int:
  """Degrees of a rotated_share property, or 0 for a class share (older configs too)."""
  if data_config.get("property_kind", "class_share") != "rotated_share":
    return 0
  return int(data_config.property_rotation)


def _rotated_labels(run_config: Any, masks: np.ndarray) -> np.ndarray:
  """[K] property labels of a rotated_share run, from the flags its config draws.

  The flags are a pure function of the config (`rotated_share_design`); the
  masks they come with must be the ones the run saved, or the workdir was
  trained with other settings than its config says.
  """
  data_config = run_config.data
  num_models, num_examples = masks.shape
  drawn, rotated = membership_data.rotated_share_design(
      num_examples, num_models, int(run_config.seed), data_config.property_fractions,
      data_config.property_subset_size)
  if not np.array_equal(drawn, masks):
    raise ValueError("The saved membership masks differ from those the run's config draws "
                     "for property_kind='rotated_share': the workdir's config.json does not "
                     "describe the run that trained it.")
  return membership_data.rotated_labels_of(masks, rotated, *data_config.property_fractions)


def read_results(path: str) -> dict[str, Any]:
  """The results.json of a property evaluation (a workdir, its property/, or the file)."""
  return common.read_results_json(path, SECTION, RESULTS_STEM)
