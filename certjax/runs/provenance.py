"""Provenance: what a workdir and a result file were computed from, recorded beside them.

A reviewer holding a result file can tell which config, code, libraries, data
and checkpoint produced it:

  * config: the resolved config's sha256 over its canonical JSON
    (`config_sha256`: sorted keys, no spaces), reproducible from config.json
    with `config_sha256(json.load(open('config.json')))`;
  * code: the versions of jax, jaxlib, flax, optax, orbax-checkpoint, numpy,
    certjax and model-signing, and the git commit of the certjax checkout
    with whether tracked files differed from it (`git_state`; None outside a
    checkout);
  * where: device kind and platform, device and process counts;
  * data: the data set's name and split and a hash of the data read:
      - training (`split_digest`): sha256 over the split as `certjax.data`
        reads it from its source, before any transform: per example the
        uint8 image's shape and bytes and the label as int64, in source
        order, streamed in chunks. Splits larger than
        `config.provenance.hash_train_examples` (default 60,000: all of
        MNIST, Fashion-MNIST, CIFAR-10) are hashed on an evenly spaced
        sample of that many examples, and the record says so
        ('examples_hashed' < 'num_examples'); 0 turns it off. Decoding is
        what costs: ImageNet's 1.28M JPEGs would take the better part of an
        hour, so it is never hashed whole by default.
      - evaluation (`examples_sha256`): sha256 over the per-example sha256 of
        the float32 images and int64 labels the evaluator loaded, in
        selection order. Each host hashes the share it loaded
        (`certjax.evaluation.common.HostShare`) and the per-example digests
        are gathered, so the hash does not depend on the number of hosts; a
        reviewer recomputes it from the arrays with `examples_sha256(x, y)`.
  * checkpoint: its step, whether it was signed and verified, by which key,
    and the sha256 of its contents (`certjax.runs.signing.content_sha256`).

Training writes `<workdir>/provenance.json` (process 0, atomically): a
`history` with one entry per run in the workdir, so a resumed run appends
instead of overwriting what the first run recorded. Evaluators put a
`provenance` block in every result JSON (`certjax.evaluation.common.metadata_block`);
it holds no time stamps, so a re-run over the same inputs writes the same block.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
from typing import Any, Mapping

import numpy as np

from certjax.data import config as data_config_lib
from certjax.data import sources
from certjax.runs import files

FILE = "provenance.json"
FORMAT = "certjax.provenance/1"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "certjax",
            "model-signing")
DEFAULT_HASH_TRAIN_EXAMPLES = 60_000
_CHUNK_EXAMPLES = 2048
_EXAMPLE_TAG = b"certjax-example/1"
_SPLIT_TAG = b"certjax-split/1"
TRAIN_DATA_METHOD = ("sha256 over each example's uint8 image (shape as 4 int64, then bytes) "
                     "and int64 label, in source order, as certjax.data reads the split "
                     "before transforms")
EVAL_DATA_METHOD = ("sha256 over the concatenated per-example sha256 of the float32 image "
                    "(shape and bytes) and int64 label the evaluator loaded, in selection "
                    "order (provenance.examples_sha256)")


def _canonical(value: Any) -> bytes:
  return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()


def config_sha256(config: Any) -> str:
  """sha256 of a config's canonical JSON (a ConfigDict, or the dict config.json holds)."""
  if hasattr(config, "to_json_best_effort"):
    config = json.loads(config.to_json_best_effort())
  return hashlib.sha256(_canonical(json.loads(json.dumps(config, default=str)))).hexdigest()


def file_sha256(path: str) -> str | None:
  """sha256 of a file's bytes, or None when it does not exist."""
  if not os.path.exists(path):
    return None
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


@functools.lru_cache(maxsize=None)
def package_versions() -> dict[str, str | None]:
  """Installed versions of the packages results depend on (None: not installed)."""
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def _checkout_root() -> str:
  import certjax  # pylint: disable=g-import-not-at-top
  return os.path.dirname(os.path.dirname(os.path.abspath(certjax.__file__)))


def _git(root: str, *args: str) -> str | None:
  try:
    proc = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                          timeout=20, check=False)
  except (OSError, subprocess.TimeoutExpired):
    return None
  return proc.stdout if proc.returncode == 0 else None


@functools.lru_cache(maxsize=None)
def git_state() -> dict[str, Any] | None:
  """{'commit', 'dirty'} of the git checkout certjax is imported from; None outside one.

  'dirty': tracked files differ from the commit (untracked files are not
  counted: scratch files beside a checkout are common and change no code
  that ran). Computed once per process.
  """
  root = _checkout_root()
  # Only the checkout certjax itself lives in: an installed copy inside some
  # other repository must not report that repository's commit.
  if not os.path.exists(os.path.join(root, ".git")):
    return None
  commit = _git(root, "rev-parse", "HEAD")
  if not commit:
    return None
  status = _git(root, "status", "--porcelain", "--untracked-files=no")
  return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


def environment() -> dict[str, Any]:
  """Device kind and platform, device and process counts, host and Python."""
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  return {"device_kind": str(device.device_kind), "platform": device.platform,
          "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
          "process_count": jax.process_count(), "host": platform.platform(),
          "python": platform.python_version()}


def code_block() -> dict[str, Any]:
  """Package versions and the git state (cached per process)."""
  return {"packages": dict(package_versions()), "git": git_state()}


# --------------------------------------------------------------------------- data


def example_digests(images: Any, labels: Any) -> np.ndarray:
  """Per-example sha256 of images and labels: uint8 [N, 32].

  Each digest covers the image's dtype, shape and bytes and the label as
  int64; independent of how the examples are split over hosts or batches.
  """
  images = np.ascontiguousarray(np.asarray(images))
  labels = np.asarray(labels).astype("<i8").reshape(-1)
  if images.shape[:1] != labels.shape:
    raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels.")
  header = _EXAMPLE_TAG + images.dtype.str.encode() + np.asarray(
      images.shape[1:], "<i8").tobytes()
  out = np.zeros((len(labels), 32), np.uint8)
  for i in range(len(labels)):
    h = hashlib.sha256(header)
    h.update(images[i].tobytes())
    h.update(labels[i].tobytes())
    out[i] = np.frombuffer(h.digest(), np.uint8)
  return out


def combine_digests(digests: Any) -> str:
  """sha256 over per-example digests in order (`example_digests`' rows), hex."""
  return hashlib.sha256(np.ascontiguousarray(np.asarray(digests, np.uint8)).tobytes()).hexdigest()


def examples_sha256(images: Any, labels: Any) -> str:
  """The evaluation data hash of result files, from the images and labels themselves."""
  return combine_digests(example_digests(images, labels))


def _spread(n: int, limit: int) -> np.ndarray:
  """All of range(n) when it has at most `limit` entries, else `limit` evenly spaced ones."""
  if limit < 0 or n <= limit:
    return np.arange(n, dtype=np.int64)
  return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def split_digest(data_config: Any, split: str, max_examples: int = DEFAULT_HASH_TRAIN_EXAMPLES
                 ) -> dict[str, Any]:
  """The hash of a split as `certjax.data` reads it from its source (`TRAIN_DATA_METHOD`).

  Args:
    data_config: the data config (config.data).
    split: the split, e.g. config.data.train_split.
    max_examples: hash at most this many examples, evenly spaced over the
      split (-1: all; 0: nothing, the record says 'skipped').

  Returns:
    {'split', 'num_examples', 'examples_hashed', 'sha256', 'method'}.
  """
  cfg = data_config_lib.validate_data_config(data_config)
  source = sources.open_source(cfg, split)
  n = len(source)
  record = {"split": split, "num_examples": int(n), "examples_hashed": 0, "sha256": None,
            "method": TRAIN_DATA_METHOD}
  if max_examples == 0:
    return {**record, "method": "skipped (provenance.hash_train_examples=0)"}
  indices = _spread(n, int(max_examples))
  h = hashlib.sha256(_SPLIT_TAG)
  for first in range(0, len(indices), _CHUNK_EXAMPLES):
    # fetch_list: works for sources whose images vary in size, too.
    images, labels = source.fetch_list(indices[first:first + _CHUNK_EXAMPLES])
    for image, label in zip(images, np.asarray(labels).astype("<i8")):
      image = np.ascontiguousarray(image)
      h.update(np.asarray(image.shape + (0,) * (4 - image.ndim), "<i8").tobytes())
      h.update(image.tobytes())
      h.update(label.tobytes())
  return {**record, "examples_hashed": int(len(indices)), "sha256": h.hexdigest()}


# --------------------------------------------------------------------------- files


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read(workdir: str) -> dict[str, Any]:
  """`<workdir>/provenance.json`, or an empty history when there is none."""
  path = os.path.join(workdir, FILE)
  if not os.path.exists(path):
    return {"format": FORMAT, "history": []}
  record = files.read_json(path)
  if not isinstance(record, dict) or not isinstance(record.get("history"), list):
    raise ValueError(f"{path} is not a certjax provenance file (no 'history' list).")
  return record


def training_entry(config: Any, workdir: str, *, start_step: int, total_steps: int,
                   resumed_from: Mapping[str, Any] | None, signing: Mapping[str, Any],
                   hash_train_examples: int = DEFAULT_HASH_TRAIN_EXAMPLES) -> dict[str, Any]:
  """One run's entry of provenance.json (see the module docstring)."""
  data = config.data
  return {
      "started": _now(), "finished": None,
      "start_step": int(start_step), "end_step": None, "total_steps": int(total_steps),
      "resumed_from": dict(resumed_from) if resumed_from else None,
      "config_sha256": config_sha256(config),
      "config_json_sha256": file_sha256(os.path.join(workdir, "config.json")),
      **code_block(), "environment": environment(),
      "data": {"name": data.name, "train_split": data.train_split,
               "eval_split": data.eval_split,
               "train": split_digest(data, data.train_split, hash_train_examples)},
      "signing": dict(signing), "checkpoints": {},
  }


def append_training_entry(workdir: str, entry: Mapping[str, Any]) -> None:
  """Appends `entry` to `<workdir>/provenance.json`'s history (process 0, atomically)."""
  record = read(workdir)
  record["history"].append(dict(entry))
  files.atomic_write_json(os.path.join(workdir, FILE), record)


def finish_training_entry(workdir: str, *, end_step: int,
                          checkpoints: Mapping[str, Any]) -> None:
  """Completes the last history entry: end step, time, and the checkpoints written."""
  record = read(workdir)
  if not record["history"]:
    return
  record["history"][-1].update({"finished": _now(), "end_step": int(end_step),
                                "checkpoints": {str(k): v for k, v in checkpoints.items()}})
  files.atomic_write_json(os.path.join(workdir, FILE), record)
