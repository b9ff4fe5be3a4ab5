"""The poisoning stage of the training pipeline: `config.poison` -> a recorded, edited train split.

`prepare(config, workdir)` runs before training: it builds the poisoned
examples with `certjax.poisoning` from the clean train split, writes them
under `<workdir>/poison/` (`certjax.runs.poison`) and returns the config with
`data.replace_file` pointing at the record, so the data pipeline (and every
later reader of the train split: evaluators, defences) sees exactly what the
model trained on. A resumed run reads the record back instead of drawing it
again, and refuses a record made with other settings.

Attacks (`config.poison.attack`):
  badnets, blended, wanet: a backdoor (Gu et al. 2017; Chen et al. 2017;
    Nguyen & Tran 2021) on a `rate` share of the train split, relabelled
    all-to-one (`target_class`) or all-to-all; WaNet adds `cross_ratio` *
    rate noise-warped examples that keep their labels (its "noise mode");
  clean_label: Turner et al. 2019: a `rate` share of the target class,
    perturbed by PGD against `surrogate_workdir`'s model (eps, num_steps) and
    stamped with the trigger (`trigger`, default four-corner BadNets);
    labels untouched;
  label_flip_random, label_flip_pairwise (source_class -> target_class, rate
    of the source class), label_flip_greedy (a budget of round(rate * N)
    most damaging flips against a logistic-regression surrogate on the
    pixels, or on `surrogate_workdir`'s penultimate features);
  feature_collision, gradient_matching: targeted clean-label poisons
    (Shafahi et al. 2018; Geiping et al. 2021): round(rate * N) training
    images of `target_class` (the adversarial class), perturbed within an
    L-infinity ball of radius eps against `surrogate_workdir`'s model so
    that the eval-split image `target_index` is classified as that class;
    labels untouched. Feature collision runs `craft_steps` forward-backward
    steps toward the target's penultimate features (the bounded variant);
    gradient matching `craft_steps` signed-Adam steps with `restarts`
    restarts. Success: the trained model's prediction on the target
    (the 'backdoor' evaluator's ASR, over that one image).
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from certjax import data as data_lib
from certjax import keys
from certjax import parallel
from certjax import runs
from certjax import validation
from certjax.evaluation import common as eval_common
from certjax.poisoning import clean_label as clean_label_lib
from certjax.poisoning import crafting as crafting_lib
from certjax.poisoning import labels as labels_lib
from certjax.poisoning import triggers as triggers_lib
from certjax.runs import poison as poison_files

ATTACKS = ("", "badnets", "blended", "wanet", "clean_label", "label_flip_random",
           "label_flip_pairwise", "label_flip_greedy", "feature_collision", "gradient_matching")
BACKDOORS = ("badnets", "blended", "wanet")
TARGETED = poison_files.TARGETED


def default_config() -> ml_collections.ConfigDict:
  """`config.poison` and its defaults.

  Fields:
    attack: '' (no poison) or one of ATTACKS.
    rate: the poisoned share, in [0, 1]: of the whole train split (backdoors,
      random flips, greedy flips' budget, the targeted poisons' budget), of
      the source class (pairwise flips) or of the target class (clean-label).
    mode: 'all_to_one' or 'all_to_all' (backdoors).
    target_class: the backdoor's (and pairwise flips', clean-label's) target.
    source_class: pairwise flips' source class.
    trigger: the trigger of a clean-label attack ('badnets', 'blended',
      'wanet'); a backdoor attack's trigger is the attack itself.
    trigger_kwargs: the trigger's settings (e.g. size, location, pattern,
      amplitude; alpha; grid_size, strength).
    cross_ratio: WaNet's noise-mode examples per backdoor example.
    surrogate_workdir: the trained model a clean-label or targeted attack
      perturbs against (required for them) and whose features greedy flips
      use ('' = pixels).
    eps, num_steps: the clean-label PGD's L-infinity radius and steps (eps
      also bounds the targeted poisons).
    target_index: the targeted attacks' target: an index into the eval split.
    craft_steps, restarts: the targeted attacks' optimisation steps, and
      gradient matching's restarts (the paper: 250 and 8).
    seed: the poison's seed (its own key stream).
  """
  return ml_collections.ConfigDict({
      "attack": "",
      "rate": 0.1,
      "mode": "all_to_one",
      "target_class": 0,
      "source_class": 1,
      "trigger": "badnets",
      "trigger_kwargs": ml_collections.ConfigDict(),
      "cross_ratio": 2.0,
      "surrogate_workdir": "",
      "eps": 0.3,
      "num_steps": 10,
      "target_index": 0,
      "craft_steps": 250,
      "restarts": 8,
      "seed": 0,
  })


def validate(poison: Any, num_classes: int | None = None) -> None:
  """Checks `config.poison` (class indices too when `num_classes` is known).

  Raises:
    ValueError: an unknown attack, mode or trigger, a rate outside [0, 1], a
      class that does not exist, a clean-label attack without a surrogate.
  """
  attack = validation.check_choice(poison.attack, "poison.attack", ATTACKS)
  if not attack:
    return
  triggers_lib.check_rate(poison.rate, "poison.rate")
  validation.check_choice(poison.mode, "poison.mode", triggers_lib.MODES)
  validation.check_choice(poison.trigger, "poison.trigger", triggers_lib.TRIGGER_NAMES)
  validation.check_positive(poison.cross_ratio, "poison.cross_ratio", allow_zero=True)
  validation.check_positive(poison.eps, "poison.eps")
  validation.check_int_at_least(poison.num_steps, "poison.num_steps", 1)
  validation.check_int_at_least(poison.seed, "poison.seed", 0)
  for name in ("target_class", "source_class"):
    triggers_lib.check_class(poison[name], f"poison.{name}", num_classes)
  if attack == "label_flip_pairwise" and poison.source_class == poison.target_class:
    raise ValueError("poison.source_class and poison.target_class must differ for "
                     "label_flip_pairwise.")
  if attack == "clean_label" and not poison.surrogate_workdir:
    raise ValueError("poison.attack='clean_label' perturbs the target-class images against a "
                     "trained model: set poison.surrogate_workdir (ideally adversarially "
                     "trained, as Turner et al.).")
  validation.check_int_at_least(poison.target_index, "poison.target_index", 0)
  validation.check_int_at_least(poison.craft_steps, "poison.craft_steps", 1)
  validation.check_int_at_least(poison.restarts, "poison.restarts", 1)
  if attack in TARGETED and not poison.surrogate_workdir:
    raise ValueError(f"poison.attack={attack!r} crafts poisons against a trained model: set "
                     "poison.surrogate_workdir (a clean run of the same data and model).")


def _settings(poison: Any) -> dict[str, Any]:
  return json.loads(json.dumps(poison.to_dict(), default=str))


def _trigger(poison: Any, name: str, image_shape: tuple[int, ...], key: Any):
  settings = dict(poison.trigger_kwargs or {})
  if poison.attack == "clean_label" and name == "badnets":
    settings.setdefault("location", "four_corners")
  trigger = triggers_lib.make_trigger(name, image_shape, key=key, **settings)
  triggers_lib.check_trigger_fits(trigger, image_shape)
  return trigger


def _to_uint8(images: Any) -> np.ndarray:
  """[0, 1] floats -> the uint8 images a data set stores (rounded, as a saved poison is)."""
  return np.clip(np.rint(np.asarray(images, np.float64) * 255.0), 0, 255).astype(np.uint8)


def build_record(poison: Any, images: np.ndarray, labels: np.ndarray,
                 num_classes: int) -> poison_files.PoisonRecord:
  """The poisoned examples of a clean train split (uint8 images, int labels)."""
  validate(poison, num_classes)
  attack = poison.attack
  key = keys.stream_key(int(poison.seed), keys.POISON)
  k_indices, k_trigger, k_cross, k_attack = jax.random.split(key, 4)
  x = images.astype(np.float32) / 255.0
  y = np.asarray(labels, np.int32)
  image_shape = tuple(images.shape[1:])
  trigger = None
  poisoned = None
  if attack in BACKDOORS:
    trigger = _trigger(poison, attack, image_shape, k_trigger)
    indices = np.asarray(triggers_lib.poison_indices(
        k_indices, y, rate=float(poison.rate), mode=poison.mode,
        target=int(poison.target_class), num_classes=num_classes), np.int64)
    new_x, new_y = triggers_lib.poison_examples(
        trigger, x, y, indices, mode=poison.mode, target=int(poison.target_class),
        num_classes=num_classes)
    new_x, new_y = np.asarray(new_x), np.asarray(new_y)
    poisoned = np.ones(len(indices), bool)
    if attack == "wanet" and float(poison.cross_ratio) > 0:
      # Noise-mode examples: warped by a perturbed grid, labels kept, so the
      # network learns the exact warp rather than any warp (Nguyen & Tran).
      others = np.setdiff1d(np.arange(len(y)), indices)
      count = min(len(others), int(round(float(poison.cross_ratio) * len(indices))))
      cross = np.sort(np.asarray(jax.random.choice(k_cross, others, (count,), replace=False)))
      grids = jax.vmap(lambda k: triggers_lib.wanet_noise_grid(k, trigger))(
          jax.random.split(k_cross, count))
      cross_x = np.asarray(jax.vmap(triggers_lib.apply_trigger)(grids, x[cross]))
      order = np.argsort(np.concatenate([indices, cross]), kind="stable")
      indices = np.concatenate([indices, cross])[order]
      new_x = np.concatenate([new_x, cross_x])[order]
      new_y = np.concatenate([new_y, y[cross]])[order]
      poisoned = np.concatenate([poisoned, np.zeros(count, bool)])[order]
  elif attack == "clean_label":
    trigger = _trigger(poison, poison.trigger, image_shape, k_trigger)
    indices = np.asarray(clean_label_lib.clean_label_indices(
        k_indices, y, rate=float(poison.rate), target=int(poison.target_class),
        num_classes=num_classes), np.int64)
    surrogate = runs.restore_model(str(poison.surrogate_workdir))
    new_x, new_y = clean_label_lib.clean_label_poison(
        k_attack, surrogate.logits_fn(), x, y, indices, trigger=trigger,
        eps=float(poison.eps), num_steps=int(poison.num_steps))
    new_x, new_y = np.asarray(new_x), np.asarray(new_y)
  elif attack in TARGETED:
    indices, new_x = _targeted_poisons(poison, k_indices, k_attack, x, y, num_classes)
    new_y = y[indices]
  else:
    if attack == "label_flip_random":
      indices, new_y = labels_lib.random_flips(k_indices, y, rate=float(poison.rate),
                                               num_classes=num_classes)
    elif attack == "label_flip_pairwise":
      indices, new_y = labels_lib.pairwise_flips(
          k_indices, y, rate=float(poison.rate), source=int(poison.source_class),
          target=int(poison.target_class), num_classes=num_classes)
    else:
      if poison.surrogate_workdir:
        surrogate = runs.restore_model(str(poison.surrogate_workdir))
        features_fn = jax.jit(eval_common.penultimate_features(surrogate.model.apply,
                                                               surrogate.variables))
        features = np.concatenate([np.asarray(features_fn(x[s]))
                                   for s in eval_common.batches(len(x), 1000)])
      else:
        features = x.reshape(len(x), -1)
      indices, new_y = labels_lib.greedy_flips(
          features, y, budget=int(round(float(poison.rate) * len(y))),
          num_classes=num_classes)
    indices = np.asarray(indices, np.int64)
    new_x = x[indices]
  indices = np.asarray(indices, np.int64)
  if poisoned is None:
    poisoned = np.ones(len(indices), bool)
  summary = {"attack": attack, "settings": _settings(poison),
             "num_train_examples": int(len(y)), "num_changed": int(len(indices)),
             "num_poisoned": int(poisoned.sum()), "image_shape": list(image_shape),
             "num_classes": int(num_classes)}
  # Label flips leave the pixels alone: keep the split's bytes.
  new_images = images[indices] if attack.startswith("label_flip") else _to_uint8(new_x)
  return poison_files.PoisonRecord(indices, new_images, np.asarray(new_y, np.int32),
                                   y[indices], poisoned, trigger, summary)


def _targeted_poisons(poison: Any, k_indices: Any, k_attack: Any, x: np.ndarray, y: np.ndarray,
                      num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """(indices, poisoned images) of feature collision or gradient matching."""
  adversarial = int(poison.target_class)
  members = np.nonzero(y == adversarial)[0]
  count = int(round(float(poison.rate) * len(y)))
  if not 1 <= count <= len(members):
    raise ValueError(f"poison.rate={poison.rate} asks for {count} poisons of class "
                     f"{adversarial}, which has {len(members)} training images (need >= 1).")
  indices = np.sort(np.asarray(jax.random.choice(k_indices, members, (count,), replace=False)))
  surrogate = runs.restore_model(str(poison.surrogate_workdir))
  if surrogate.info.num_classes != num_classes:
    raise ValueError(f"poison.surrogate_workdir has {surrogate.info.num_classes} classes; the "
                     f"data set has {num_classes}.")
  target, target_label = poison_files.target_image(surrogate.config.data,
                                                   int(poison.target_index))
  if target_label == adversarial:
    raise ValueError(f"poison.target_index={poison.target_index} is an image of class "
                     f"{adversarial} already; choose a target of another class than "
                     "poison.target_class.")
  eps = float(poison.eps)
  if poison.attack == "feature_collision":
    features_fn = eval_common.penultimate_features(surrogate.model.apply, surrogate.variables)
    result = crafting_lib.feature_collision(k_attack, features_fn, x[indices], target,
                                            num_steps=int(poison.craft_steps), eps=eps)
    return indices, np.asarray(result.poisons)
  params = surrogate.variables["params"]
  state = {k: v for k, v in surrogate.variables.items() if k != "params"}

  def loss_fn(p, images, labels):
    logits = surrogate.model.apply({"params": p, **state}, images, train=False)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels))

  result = crafting_lib.gradient_matching(
      k_attack, loss_fn, params, x[indices], y[indices], target[None],
      np.array([adversarial], np.int32), eps=eps, num_steps=int(poison.craft_steps),
      restarts=int(poison.restarts))
  return indices, np.clip(x[indices] + np.asarray(result.deltas), 0.0, 1.0)


def same_settings(recorded: dict[str, Any], current: dict[str, Any]) -> bool:
  """Whether a record made with `recorded` settings is the poison `current` asks for.

  A key the record lacks (added to `config.poison` after it was written)
  matches when the current value is that key's default.
  """
  defaults = _settings(default_config())
  return set(recorded) <= set(current) and all(
      recorded.get(k, defaults.get(k)) == v for k, v in current.items())


def prepare(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """The config to train with: `config` itself, or a copy reading the recorded poison.

  Raises:
    ValueError: bad `config.poison`, or a workdir whose record was made with
      other settings.
  """
  poison = config.get("poison")
  if poison is None or not poison.attack:
    return config
  if config.data.get("replace_file"):
    raise ValueError("config.poison and config.data.replace_file both edit the train split; "
                     "set one.")
  if poison_files.has_record(workdir):
    record = poison_files.read_record(workdir)
    if not same_settings(record.summary.get("settings") or {}, _settings(poison)):
      raise ValueError(
          f"{workdir} holds a poison record made with other settings "
          f"({record.summary.get('settings')}); use a fresh workdir for this poison.")
  else:
    clean = ml_collections.ConfigDict(config.data.to_dict())
    images, labels = data_lib.load_split_uint8(clean, clean.train_split)
    info = data_lib.get_info(clean)
    record = build_record(poison, images, labels, info.num_classes)
    if parallel.is_main_process():
      poison_files.write_record(workdir, record)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("certjax poison record written")
  edited = ml_collections.ConfigDict(config.to_dict())
  edited.data.replace_file = poison_files.record_path(workdir)
  return edited
