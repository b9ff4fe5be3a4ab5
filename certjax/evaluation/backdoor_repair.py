"""The 'backdoor' evaluator's model-repair defences: each fine-tunes the evaluated model.

A repair changes the model, so the evaluator scores it by the clean accuracy
(CA) and attack success rate (ASR) of the repaired model, BackdoorBench's
convention. Every repair fine-tunes with `certjax.poisoning.repair.fine_tune`
(SGD with momentum 0.9, the same epochs and learning rate for every repair,
as BackdoorBench gives its defences one budget) on data the defender holds:

  * the defender's clean set (`defender_set`): a `repair_fraction` share of
    the clean training split drawn without the poisoned indices
    (BackdoorBench's 5% of clean training data);
  * for anti-backdoor learning, the poisoned training split the model was
    trained on (the defence trains on poisoned data by design).

Repairs:
  fine_tuning: plain fine-tuning on the clean set (BackdoorBench's "ft").
  fine_pruning (Liu et al. 2018): rank the channels of the last convolution
    (or the penultimate features, `prune_layer`; 'auto' takes the last
    convolution, or the penultimate features of a model without one, and
    the result names the layer used) by mean activation on the
    clean set, prune least-active first while clean accuracy on it stays
    within `prune_max_drop` of the unpruned model, then fine-tune with the
    pruning mask kept in place. CA/ASR are reported after pruning alone and
    after fine-tuning.
  Neural Cleanse's unlearning (Wang et al. 2019; `nc_unlearning`): when
    Neural Cleanse flags classes, fine-tune on the clean set with 20% of it
    stamped with a flagged class's reversed trigger and labels left true; a
    model with no flagged class is left as it is.
  abl (Li et al. 2021): the model must be ABL's isolation model, trained
    with objective 'abl_isolation' (local gradient ascent). Isolate the
    `abl_isolation_fraction` lowest-loss training examples (scored against
    the poison record), fine-tune on the rest for `abl_clean_epochs`, then
    ascend the loss on the isolated set for `abl_unlearning_epochs` at
    `abl_unlearning_learning_rate` (the authors' code: 5 epochs at 5e-4).

References:
  Liu, Dolan-Gavitt, Garg. Fine-Pruning: Defending Against Backdooring
    Attacks on Deep Neural Networks. RAID 2018.
  Wang et al. Neural Cleanse: Identifying and Mitigating Backdoor Attacks in
    Neural Networks. IEEE S&P 2019.
  Li, Lyu, Koren, Lyu, Li, Ma. Anti-Backdoor Learning: Training Clean Models
    on Poisoned Data. NeurIPS 2021.
  Wu et al. BackdoorBench. NeurIPS 2022 Datasets and Benchmarks.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from certjax import data as data_lib
from certjax.evaluation import common
from certjax.poisoning import neural_cleanse as nc_lib
from certjax.poisoning import repair
from certjax.poisoning import sanitize
from certjax.runs import poison as poison_files

REPAIRS = ("fine_tuning", "fine_pruning", "abl")
# The objective that trains ABL's isolation model (certjax.training.objectives.abl).
ABL_OBJECTIVE = "abl_isolation"

# logits_fn -> {'clean_accuracy': ..., 'asr': ...} on the evaluator's images.
Score = Callable[[Any], dict[str, Any]]


def defender_set(run_config: ml_collections.ConfigDict, record: poison_files.PoisonRecord,
                 fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """The defender's clean data: round(fraction * N) clean training examples, none poisoned.

  Drawn uniformly (seeded) from the clean training split without the
  record's indices, so no example the attacker edited is among them.

  Returns:
    (float32 images in [0, 1], int32 labels).

  Raises:
    ValueError: fewer clean examples than asked for, or none at all.
  """
  clean = ml_collections.ConfigDict(run_config.data.to_dict())
  clean.replace_file = ""
  clean.exclude_file = ""
  x, y = data_lib.load_split_uint8(clean, clean.train_split)
  untouched = np.ones(len(y), bool)
  untouched[record.indices] = False
  candidates = np.nonzero(untouched)[0]
  count = int(round(fraction * len(y)))
  if not 1 <= count <= len(candidates):
    raise ValueError(f"backdoor.repair_fraction={fraction} asks for {count} clean training "
                     f"examples; {len(candidates)} are untouched by the poison (need >= 1).")
  chosen = np.sort(np.random.default_rng(seed).choice(candidates, count, replace=False))
  return x[chosen].astype(np.float32) / 255.0, y[chosen]


def _split_variables(variables: Any) -> tuple[Any, dict[str, Any]]:
  variables = dict(variables)
  return variables.pop("params"), variables


def _loss(apply_fn: Any, sign: float = 1.0) -> Any:
  """`fine_tune`'s loss: `sign` * mean cross-entropy, BatchNorm statistics updated."""

  def loss_fn(params, state, x, y, key):
    del key
    variables = {"params": params, **state}
    if state:
      logits, new_state = apply_fn(variables, x, train=True, mutable=list(state))
      new_state = dict(new_state)
    else:
      logits, new_state = apply_fn(variables, x, train=True), state
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
    return sign * jnp.mean(ce), new_state

  return loss_fn


def _fine_tune(key: Any, apply_fn: Any, variables: Any, x: np.ndarray, y: np.ndarray,
               settings: ml_collections.ConfigDict, *, epochs: int | None = None,
               learning_rate: float | None = None, sign: float = 1.0) -> tuple[Any, dict]:
  """`variables` fine-tuned on (x, y); returns them and what ran."""
  params, state = _split_variables(variables)
  epochs = int(settings.repair_epochs if epochs is None else epochs)
  lr = float(settings.repair_learning_rate if learning_rate is None else learning_rate)
  batch_size = min(int(settings.repair_batch_size), len(y))
  optimizer = optax.sgd(lr, momentum=0.9)
  start = time.perf_counter()
  result = jax.jit(lambda k, p, s, xs, ys: repair.fine_tune(
      k, _loss(apply_fn, sign), p, xs, ys, optimizer=optimizer, num_epochs=epochs,
      batch_size=batch_size, model_state=s))(key, params, state, x, y)
  losses = np.asarray(result.losses)
  if not np.all(np.isfinite(losses)):
    raise FloatingPointError(f"The repair's fine-tuning diverged (loss {losses[-1]}); lower "
                             "backdoor.repair_learning_rate.")
  return ({"params": result.params, **result.model_state},
          {"epochs": epochs, "steps": int(losses.size), "batch_size": batch_size,
           "learning_rate": lr, "first_loss": float(sign * losses[0]),
           "last_loss": float(sign * losses[-1]), "seconds": time.perf_counter() - start})


def _logits_fn(apply_fn: Any, variables: Any) -> Any:
  return lambda x: apply_fn(variables, x, train=False)


def fine_tuning(key: Any, apply_fn: Any, variables: Any, defender: tuple[np.ndarray, np.ndarray],
                settings: ml_collections.ConfigDict, score: Score) -> dict[str, Any]:
  """BackdoorBench's fine-tuning defence; its CA/ASR and what it ran."""
  tuned, run = _fine_tune(key, apply_fn, variables, *defender, settings)
  return {**score(_logits_fn(apply_fn, tuned)), "fine_tuning": run,
          "defender_examples": int(len(defender[1]))}


def fine_pruning(key: Any, apply_fn: Any, variables: Any, defender: tuple[np.ndarray, np.ndarray],
                 settings: ml_collections.ConfigDict, score: Score) -> dict[str, Any]:
  """Liu et al.'s fine-pruning; CA/ASR after pruning and after fine-tuning."""
  x, y = defender
  batch_size = int(settings.batch_size)
  layer = str(settings.prune_layer)
  if layer == "auto":
    try:
      tap = common.layer_tap(apply_fn, variables, x[:1], "last_conv")
    except ValueError:  # no convolution: prune the penultimate features
      tap = common.layer_tap(apply_fn, variables, x[:1], "penultimate")
  else:
    tap = common.layer_tap(apply_fn, variables, x[:1], layer)
  activations = jax.jit(lambda v, xb: tap.apply(v, xb, None, train=False)[1])
  order = repair.pruning_order(np.concatenate([
      np.asarray(activations(variables, x[s])) for s in common.batches(len(y), batch_size)]))
  correct = jax.jit(lambda v, m, xb, yb: jnp.sum(
      jnp.argmax(tap.apply(v, xb, m, train=False)[0], -1) == yb))

  def accuracy(mask):
    return sum(int(correct(variables, mask, x[s], y[s]))
               for s in common.batches(len(y), batch_size)) / len(y)

  start = time.perf_counter()
  pruned = repair.prune_until(accuracy, order, max_accuracy_drop=float(settings.prune_max_drop),
                              step=max(1, tap.channels // 64))
  prune_seconds = time.perf_counter() - start
  mask = pruned.mask

  def masked_apply(v, xb, **kwargs):
    return tap.apply(v, xb, mask, **kwargs)[0]

  after_pruning = score(lambda xb: masked_apply(variables, xb, train=False))
  tuned, run = _fine_tune(key, masked_apply, variables, x, y, settings)
  return {**score(lambda xb: masked_apply(tuned, xb, train=False)),
          "after_pruning": after_pruning, "layer": tap.layer, "channels": tap.channels,
          "num_pruned": int(pruned.num_pruned),
          "defender_accuracy_unpruned": float(pruned.baseline),
          "defender_accuracies": [float(a) for a in pruned.accuracies],
          "prune_seconds": prune_seconds, "fine_tuning": run,
          "defender_examples": int(len(y))}


def nc_unlearning(key: Any, apply_fn: Any, variables: Any,
                  defender: tuple[np.ndarray, np.ndarray], reversed_: Any, flagged: list[int],
                  settings: ml_collections.ConfigDict, score: Score,
                  unrepaired: dict[str, Any]) -> dict[str, Any]:
  """Neural Cleanse's unlearning; with no flagged class the model stays as it is.

  The stamped 20% of the clean set is split evenly over the flagged classes,
  each share carrying its class's reversed trigger.
  """
  if not flagged:
    return {**unrepaired, "unchanged": "Neural Cleanse flagged no class"}
  x, y = defender
  parts = np.array_split(np.random.default_rng(int(settings.seed)).permutation(len(y)),
                         len(flagged))
  images, stamped = [], 0
  for c, part in zip(flagged, parts):
    xs, _, marks = nc_lib.unlearning_set(jax.random.fold_in(key, c), x[part], y[part],
                                         reversed_.mask[c], reversed_.pattern[c], fraction=0.2)
    images.append(np.asarray(xs))
    stamped += int(np.sum(np.asarray(marks)))
  x_unlearn = np.empty_like(x)
  x_unlearn[np.concatenate(parts)] = np.concatenate(images)
  tuned, run = _fine_tune(jax.random.fold_in(key, 10_000), apply_fn, variables, x_unlearn, y,
                          settings)
  return {**score(_logits_fn(apply_fn, tuned)), "unlearned_classes": flagged,
          "stamped_examples": stamped, "fine_tuning": run, "defender_examples": int(len(y))}


def per_example_losses(apply_fn: Any, variables: Any, x: np.ndarray, y: np.ndarray,
                       batch_size: int) -> np.ndarray:
  """Cross-entropy of every example (uint8 or float images), in eval mode."""
  loss = jax.jit(lambda xb, yb: optax.softmax_cross_entropy_with_integer_labels(
      apply_fn(variables, xb, train=False).astype(jnp.float32), yb))
  scale = 255.0 if x.dtype == np.uint8 else 1.0
  return np.concatenate([np.asarray(loss(x[s].astype(np.float32) / scale, y[s]))
                         for s in common.batches(len(y), batch_size)])


def abl(key: Any, apply_fn: Any, variables: Any, train: tuple[np.ndarray, np.ndarray],
        record: poison_files.PoisonRecord, settings: ml_collections.ConfigDict,
        score: Score, objective: str) -> dict[str, Any]:
  """Anti-backdoor learning from its isolation model; CA/ASR and the isolation's scores.

  Raises:
    ValueError: the model was not trained with the isolation objective.
  """
  if objective != ABL_OBJECTIVE:
    raise ValueError(f"backdoor.defences 'abl' starts from ABL's isolation model: train the "
                     f"poisoned run with objective {ABL_OBJECTIVE!r} (local gradient ascent; "
                     f"configs/backdoor.py:<data>,<attack>,<rate>,abl); this run was trained "
                     f"with objective {objective!r}.")
  train_x, train_y = train
  start = time.perf_counter()
  losses = per_example_losses(apply_fn, variables, train_x, train_y, int(settings.batch_size))
  isolation = repair.isolate_lowest_loss(losses, float(settings.abl_isolation_fraction))
  isolated = np.asarray(isolation.is_isolated)
  poisoned = record.indices[record.poisoned]
  found = sanitize.detection_scores(np.asarray(isolation.indices), poisoned, len(train_y))
  auc = sanitize.detection_scores(-losses, poisoned, len(train_y))["auc"]
  isolate_seconds = time.perf_counter() - start
  rest_x = train_x[~isolated].astype(np.float32) / 255.0
  tuned, clean_run = _fine_tune(key, apply_fn, variables, rest_x, train_y[~isolated], settings,
                                epochs=int(settings.abl_clean_epochs))
  del rest_x
  isolated_x = train_x[isolated].astype(np.float32) / 255.0
  unlearned, ascent_run = _fine_tune(
      jax.random.fold_in(key, 1), apply_fn, tuned, isolated_x, train_y[isolated], settings,
      epochs=int(settings.abl_unlearning_epochs),
      learning_rate=float(settings.abl_unlearning_learning_rate), sign=-1.0)
  return {**score(_logits_fn(apply_fn, unlearned)),
          "after_clean_fine_tuning": score(_logits_fn(apply_fn, tuned)),
          "isolated": int(isolated.sum()),
          "isolation_precision": float(found["precision"]),
          "isolation_recall": float(found["recall"]), "isolation_auc": float(auc),
          "isolate_seconds": isolate_seconds, "clean_fine_tuning": clean_run,
          "unlearning": ascent_run}
