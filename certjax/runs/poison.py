"""The poison record of a run: which training examples were changed, how, and with what trigger.

A run with `config.poison.attack` set (`certjax.training.poison`) writes, under
`<workdir>/poison/`:

  record.npz    `indices` (sorted train-split indices), `images` (the uint8
                images the model trained on at those indices), `labels` (the
                labels it trained on), `original_labels` and `poisoned` (which
                of them carry the attack);
  trigger.npz   the backdoor trigger's arrays, name and kind (backdoor
                attacks only), so the test-time trigger is the training one;
  poison.json   the attack, its settings, counts and the record's sha256.

The training set is the unedited split with `record.npz` substituted through
`config.data.replace_file`, so the record is what the model saw, byte for
byte, and every defence is scored against its indices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from typing import Any

import numpy as np

from certjax import data as data_lib
from certjax.poisoning.triggers import Trigger
from certjax.runs import files

POISON_DIR = "poison"
RECORD_FILE = "record.npz"
TRIGGER_FILE = "trigger.npz"
SUMMARY_FILE = "poison.json"


@dataclasses.dataclass(frozen=True)
class PoisonRecord:
  """A run's poison.

  Attributes:
    indices: sorted int64 train-split indices of the changed examples.
    images: uint8 [n, H, W, C], what the model trained on at those indices.
    labels: int32 [n], the labels it trained on.
    original_labels: int32 [n], the split's labels before poisoning.
    poisoned: bool [n], the examples that carry the attack (False for
      WaNet's noise-mode examples, which keep their labels): what a defence
      should find.
    trigger: the backdoor trigger (None for label flipping).
    summary: poison.json (attack, settings, counts).
  """
  indices: np.ndarray
  images: np.ndarray
  labels: np.ndarray
  original_labels: np.ndarray
  poisoned: np.ndarray
  trigger: Trigger | None
  summary: dict[str, Any]


def poison_dir(workdir: str) -> str:
  return os.path.join(workdir, POISON_DIR)


def record_path(workdir: str) -> str:
  return os.path.join(poison_dir(workdir), RECORD_FILE)


def write_record(workdir: str, record: PoisonRecord) -> str:
  """Writes the record atomically (process 0's job); returns record.npz's path."""
  directory = poison_dir(workdir)
  os.makedirs(directory, exist_ok=True)
  data = files.npz_bytes(indices=record.indices, images=record.images, labels=record.labels,
                    original_labels=record.original_labels, poisoned=record.poisoned)
  files.atomic_write_bytes(os.path.join(directory, RECORD_FILE), data)
  if record.trigger is not None:
    t = record.trigger
    arrays = {k: np.asarray(getattr(t, k)) for k in ("mask", "pattern", "grid")
              if getattr(t, k) is not None}
    files.atomic_write_npz(os.path.join(directory, TRIGGER_FILE), name=np.asarray(t.name),
                           kind=np.asarray(t.kind), **arrays)
  summary = {**record.summary, "record_sha256": hashlib.sha256(data).hexdigest()}
  files.atomic_write_json(os.path.join(directory, SUMMARY_FILE), summary)
  return os.path.join(directory, RECORD_FILE)


def has_record(workdir: str) -> bool:
  return os.path.exists(os.path.join(poison_dir(workdir), SUMMARY_FILE))


def read_record(workdir: str) -> PoisonRecord:
  """The poison record of `workdir`.

  Raises:
    FileNotFoundError: the run was not poisoned (no poison/poison.json): a
      defence or backdoor evaluation needs a run trained with config.poison.
    ValueError: a record whose hash differs from the one poison.json holds.
  """
  directory = poison_dir(workdir)
  summary_path = os.path.join(directory, SUMMARY_FILE)
  if not os.path.exists(summary_path):
    raise FileNotFoundError(
        f"{workdir} has no poison record ({POISON_DIR}/{SUMMARY_FILE}): backdoor evaluations "
        "and poison defences need a run trained with config.poison.attack set.")
  summary = files.read_json(summary_path)
  with open(os.path.join(directory, RECORD_FILE), "rb") as f:
    data = f.read()
  if hashlib.sha256(data).hexdigest() != summary.get("record_sha256"):
    raise ValueError(f"{directory}/{RECORD_FILE} does not match the sha256 in {SUMMARY_FILE}: "
                     "the record was changed after training.")
  with np.load(io.BytesIO(data)) as arrays:
    indices, images = arrays["indices"], arrays["images"]
    labels, original = arrays["labels"], arrays["original_labels"]
    poisoned = arrays["poisoned"]
  trigger = None
  trigger_path = os.path.join(directory, TRIGGER_FILE)
  if os.path.exists(trigger_path):
    with np.load(trigger_path) as arrays:
      trigger = Trigger(name=str(arrays["name"]), kind=str(arrays["kind"]),
                        **{k: np.asarray(arrays[k]) for k in ("mask", "pattern", "grid")
                           if k in arrays})
  return PoisonRecord(np.asarray(indices, np.int64), np.asarray(images),
                      np.asarray(labels, np.int32), np.asarray(original, np.int32),
                      np.asarray(poisoned, bool), trigger, summary)


# Targeted clean-label poisons (config.poison.attack): one eval-split target image per run.
TARGETED = ("feature_collision", "gradient_matching")


def target_image(data_config: Any, index: int) -> tuple[np.ndarray, int]:
  """The targeted attacks' target: eval-split image `index` (float in [0, 1]) and its label.

  Raises:
    ValueError: an index outside the eval split.
  """
  x, y = data_lib.load_split_uint8(data_config, data_config.eval_split)
  if not 0 <= index < len(y):
    raise ValueError(f"poison.target_index={index} lies outside the {len(y)} images of the "
                     f"eval split {data_config.eval_split!r}.")
  return x[index].astype(np.float32) / 255.0, int(y[index])
