"""What every evaluator shares: host split and gather, resumable logs, result files, progress.

One way for each, used by every evaluator:

  * Split and gather over hosts: host h takes the contiguous share
    `parallel.host_share` of the selected examples, loads only those, and
    computes on its own devices (`parallel.local_mesh`); per-example outcomes are
    gathered once with `gather_shares` (an all-gather of the padded shares,
    padding dropped), so every host holds the same full result and every
    example counts exactly once. Process 0 writes the files.
  * Resume: `ResumeLog` appends each finished unit of work (an image, a
    radius, a method at a radius) as a JSON line under a fingerprint of
    everything that determines the results; a restarted run skips the units
    already there. Process 0 reads it and broadcasts what it read.
  * Result files: `write_results` writes JSON, Markdown and an optional PNG
    atomically (process 0 only), so a reader never sees half a file and an
    interrupted run never destroys the previous one.
  * Progress: `progress(...)` lines with rate and ETA (`certjax.runs.Progress`).
  * Provenance: `metadata_block` gives every result file a `provenance` block
    (config hash, checkpoint verification, package versions, git commit,
    devices, and the sha256 of the images and labels evaluated, from the
    per-example digests each host took of what it loaded; see
    `certjax.runs.provenance`).
"""

from __future__ import annotations

import io
import json
import os
import weakref
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from certjax import models as models_lib
from certjax import parallel
from certjax import validation
from certjax.evaluation.registry import EvalContext, EvalData
from certjax.models.layers import Im2colConv
from certjax.runs import files
from certjax.runs import provenance
from certjax.runs.progress import Progress

# Examples per host that `data_provenance` reads again to hash when the
# evaluator did not load them (images a resumed run skipped). Beyond it the
# hash covers what was loaded and says how much that was.
MAX_REREAD_EXAMPLES = 20_000


def check_selection_settings(settings: Any, section: str) -> None:
  """Checks the settings every evaluator section shares: `split` and `checkpoint_step`.

  Raises:
    ValueError: naming `<section>.split` or `<section>.checkpoint_step`.
  """
  validation.check_int_at_least(settings.checkpoint_step, f"{section}.checkpoint_step", -1)
  if not isinstance(settings.split, str):
    raise ValueError(f"{section}.split must be a split name or '' (the data's eval split); "
                     f"got {settings.split!r}.")


def local_variables(variables: Any, mesh: Mesh) -> Any:
  """`variables` replicated on this host's devices.

  Variables restored onto the global mesh (every device of every process)
  are fully replicated, so each host can read them whole.
  """
  return parallel.replicate(jax.device_get(variables), mesh)


class HostShare:
  """This host's contiguous share of the selected examples, loaded.

  Attributes:
    indices: dataset indices of this host's examples (possibly empty).
    x, y: their images and labels.
    size: the padded share size every host uses for gathering.
    count: the number of examples over all hosts.
  """

  def __init__(self, data: EvalData):
    share, self.size = parallel.host_share(len(data.indices))
    self.count = int(len(data.indices))
    self.indices = np.asarray(data.indices[share], np.int64)
    if self.indices.size:
      self.x, self.y = data.load(self.indices)
      note_loaded(data, self.indices, self.x, self.y)
    else:
      self.x, self.y = None, np.zeros(0, np.int32)


# Per EvalData object (by identity; dropped with it): dataset index ->
# (per-example sha256, how it was obtained).
_DIGESTS: dict[int, tuple[Any, dict[int, tuple[bytes, int]]]] = {}
_LOADED_BY_EVALUATOR, _REREAD = 1, 2


def _digest_table(data: EvalData) -> dict[int, tuple[bytes, int]]:
  key = id(data)
  entry = _DIGESTS.get(key)
  if entry is None or entry[0]() is not data:
    table: dict[int, tuple[bytes, int]] = {}
    _DIGESTS[key] = (weakref.ref(data, lambda _, key=key: _DIGESTS.pop(key, None)), table)
    return table
  return entry[1]


def note_loaded(data: EvalData, indices: np.ndarray, x: Any, y: Any) -> None:
  """Hashes examples an evaluator loaded, for its result's data hash (`data_provenance`).

  Hashed from the arrays the evaluator computes on, so the hash names what
  was evaluated and needs no second read. `HostShare` calls it; an evaluator
  that loads its examples otherwise (in groups) calls it after each load.
  """
  _remember_digests(data, indices, x, y, _LOADED_BY_EVALUATOR)


def _remember_digests(data: EvalData, indices: np.ndarray, x: Any, y: Any, how: int) -> None:
  table = _digest_table(data)
  for index, digest in zip(np.asarray(indices).tolist(), provenance.example_digests(x, y)):
    table[int(index)] = (digest.tobytes(), how)


def data_provenance(data: EvalData) -> dict[str, Any]:
  """The data part of a result's provenance: name, split, and the sha256 of what was evaluated.

  A collective: every process calls it (as every process calls
  `metadata_block`). Each host contributes the per-example digests of its
  share (`parallel.host_share`): those `HostShare` took when it loaded them,
  else read again and hashed here (at most `MAX_REREAD_EXAMPLES` per host);
  the digests are gathered and hashed in selection order
  (`provenance.combine_digests`), so the hash is the same on any number of
  hosts and equals `provenance.examples_sha256(images, labels)` of the
  selection.
  """
  indices = np.asarray(data.indices, np.int64)
  count = int(indices.size)
  record = {"name": data.name, "split": data.split, "num_examples": count,
            "examples_hashed": 0, "examples_reread": 0, "sha256": None,
            "method": provenance.EVAL_DATA_METHOD}
  if count == 0:
    return record
  share, size = parallel.host_share(count)
  mine = indices[share]
  table = _digest_table(data)
  missing = np.asarray([i for i in mine.tolist() if i not in table], np.int64)
  if 0 < missing.size <= MAX_REREAD_EXAMPLES:
    for first in range(0, missing.size, 1024):  # bounded memory for large images
      part = missing[first:first + 1024]
      x, y = data.load(part)
      _remember_digests(data, part, x, y, _REREAD)
  local = np.zeros((mine.size, 32), np.uint8)
  how = np.zeros(mine.size, np.uint8)
  for row, index in enumerate(mine.tolist()):
    if index in table:
      digest, how[row] = table[index]
      local[row] = np.frombuffer(digest, np.uint8)
  digests, how = gather_shares((local, how), size, count)
  covered = how > 0
  record.update({"examples_hashed": int(covered.sum()),
                 "examples_reread": int(np.sum(how == _REREAD)),
                 "sha256": provenance.combine_digests(digests[covered]) if covered.any()
                 else None})
  if not covered.all():
    record["note"] = (f"{count - int(covered.sum())} examples were not loaded by the evaluator "
                      f"and not read again (more than {MAX_REREAD_EXAMPLES} per host): the "
                      "hash covers the others.")
  return record


def gather_shares(local: Any, size: int, count: int) -> Any:
  """Every host's per-example arrays, concatenated in host order, on every host.

  Args:
    local: a pytree of arrays whose leading axis is this host's share (at
      most `size` rows).
    size: the padded share size (`HostShare.size`).
    count: the total number of examples.

  Returns:
    The same pytree with leading axis `count`, identical on every host.
  """
  padded = jax.tree.map(lambda a: parallel.pad_rows(a, size), local)
  gathered = parallel.process_allgather(padded)
  return jax.tree.map(lambda g: parallel.unpad_shares(g, count), gathered)


def broadcast_json(value: Any) -> Any:
  """Process 0's JSON-serialisable `value` on every host (the others' is ignored)."""
  if jax.process_count() == 1:
    return value
  data = np.frombuffer(json.dumps(value).encode(), np.uint8) if parallel.is_main_process() \
      else np.zeros(0, np.uint8)
  length = int(parallel.broadcast_from_main(np.int64(data.size)))
  buffer = np.zeros(length, np.uint8)
  buffer[:data.size] = data[:length]
  return json.loads(parallel.broadcast_from_main(buffer).tobytes().decode())


class ResumeLog:
  """The finished units of an evaluation run, so that a restarted run skips them.

  JSON lines in `path`: first `{"fingerprint": ...}`, then one
  `{"unit": <key>, ...payload}` per finished unit. A log written under another
  fingerprint (other settings, checkpoint, images or library version of the
  results) is moved aside to `<path>.stale` and the run starts afresh.
  Appends are whole lines followed by fsync; a line cut short by a kill is
  ignored. Process 0 reads and writes; every host gets what it read.

  Args:
    path: the log file; None disables resuming (nothing is read or written).
    fingerprint: a JSON-serialisable description of everything that
      determines the results of a unit.
  """

  def __init__(self, path: str | None, fingerprint: Mapping[str, Any]):
    self.path = path
    self.fingerprint = json.loads(json.dumps(dict(fingerprint), default=str))
    self._main = parallel.is_main_process()
    done: dict[str, dict] = {}
    if path is not None and self._main:
      records = files.read_jsonl(path, repair=True)
      if records and records[0].get("fingerprint") == self.fingerprint:
        done = {str(r["unit"]): r for r in records[1:] if "unit" in r}
      else:
        if records:
          os.replace(path, path + ".stale")
          logging.warning("%s was written with other settings; moved it to %s.stale and "
                          "starting afresh.", path, path)
        files.rewrite_jsonl(path, [{"fingerprint": self.fingerprint}])
    self.completed: dict[str, dict] = broadcast_json(done) if path is not None else {}

  def record(self, unit: str, payload: Mapping[str, Any]) -> None:
    """Marks `unit` finished with `payload` (process 0 writes; every host remembers)."""
    self.record_many({unit: payload})

  def record_many(self, payloads: Mapping[str, Mapping[str, Any]]) -> None:
    """Marks several units finished, in one append."""
    records = [json.loads(json.dumps({"unit": str(unit), **dict(payload)}, default=float))
               for unit, payload in payloads.items()]
    for record in records:
      self.completed[record["unit"]] = record
    if self.path is not None and self._main:
      files.append_jsonl(self.path, records)


def write_results(output_dir: str | None, stem: str, payload: Mapping[str, Any], table: str,
                  figure: Any = None) -> dict[str, str]:
  """Writes `<stem>.json`, `<stem>.md` and `<stem>.png` under `output_dir` atomically.

  Only process 0 writes; every process returns the same paths.

  Args:
    output_dir: the directory; None writes nothing and returns {}.
    stem: the file name without extension.
    payload: the JSON content.
    table: the Markdown content.
    figure: a matplotlib `Figure` to save as PNG, or None.

  Returns:
    kind -> path of the files written ('json', 'md', and 'png' with a figure).
  """
  if output_dir is None:
    return {}
  paths = {"json": os.path.join(output_dir, f"{stem}.json"),
           "md": os.path.join(output_dir, f"{stem}.md")}
  if figure is not None:
    paths["png"] = os.path.join(output_dir, f"{stem}.png")
  if parallel.is_main_process():
    os.makedirs(output_dir, exist_ok=True)
    files.atomic_write_json(paths["json"], payload)
    files.atomic_write_text(paths["md"], table if table.endswith("\n") else table + "\n")
    if figure is not None:
      save_figure(paths["png"], figure)
  return paths


def save_figure(path: str, figure: Any) -> str:
  """Writes a matplotlib `Figure` as PNG atomically (call it on process 0)."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png")
  return files.atomic_write_bytes(path, buffer.getvalue())


def read_results_json(path: str, section: str, stem: str) -> dict[str, Any]:
  """Reads `<stem>.json` of an evaluator from a workdir (its `<section>/`), the
  directory holding it, or the file itself."""
  if os.path.isdir(path):
    candidate = os.path.join(path, section, f"{stem}.json")
    path = candidate if os.path.exists(candidate) else os.path.join(path, f"{stem}.json")
  return files.read_json(path)


def log_path(ctx: EvalContext, stem: str) -> str | None:
  """Where the resume log of a run named `stem` lives (None: do not resume)."""
  if ctx.output_dir is None or not ctx.resume:
    return None
  return os.path.join(ctx.output_dir, f"{stem}.log.jsonl")


def progress(total: int, unit: str, label: str) -> Progress:
  """A progress counter printing at most every 10 s (and at the end)."""
  return Progress(total, unit=unit, label=label, min_interval_s=10.0)


def report(ctx: EvalContext, line: str) -> None:
  """Logs a progress line (process 0 only when `ctx.verbose`)."""
  if ctx.verbose and parallel.is_main_process():
    logging.info("%s", line)


def metadata_block(ctx: EvalContext, **extra: Any) -> dict[str, Any]:
  """The run's identification for result files: metadata, step, data, provenance.

  `provenance` joins what the caller knew of the run (`ctx.metadata['provenance']`,
  from `evaluation.workdir.run_metadata`: config hash, checkpoint verification)
  with the code (package versions, git commit), the devices and the data
  evaluated (`data_provenance`). A collective: call it on every process.
  """
  metadata = dict(ctx.metadata)
  run = dict(metadata.pop("provenance", None) or {})
  return {**metadata, "checkpoint_step": int(ctx.step), "dataset": ctx.data.name,
          "split": ctx.data.split, "num_examples": int(len(ctx.data.indices)),
          "first_index": int(ctx.data.indices[0]) if len(ctx.data.indices) else None,
          "last_index": int(ctx.data.indices[-1]) if len(ctx.data.indices) else None,
          **extra,
          "provenance": {**run, **provenance.code_block(),
                         "environment": provenance.environment(),
                         "data": data_provenance(ctx.data)}}


def batches(count: int, batch_size: int) -> Iterable[slice]:
  """Slices of `batch_size` covering [0, count)."""
  for start in range(0, count, batch_size):
    yield slice(start, min(start + batch_size, count))


def load_all(data: EvalData, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """Every selected example of `data` in memory, loaded `chunk` at a time, in order."""
  parts = [data.load(data.indices[p]) for p in batches(len(data.indices), chunk)]
  if not parts:
    return np.zeros((0,), np.float32), np.zeros((0,), np.int32)
  return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def stacked_logits(apply_fn: Any, variables: Any, images: np.ndarray,
                   batch_size: int) -> np.ndarray:
  """float32 [K, N, C]: K stacked models' logits (variables with a leading axis K)
  on `images` [N, ...], `batch_size` at a time on this host's devices.

  One compiled program (`models.make_stacked_logits`): the last batch is
  padded to `batch_size`.
  """
  mesh = parallel.local_mesh()
  variables = jax.device_put(variables, parallel.replicated(mesh))
  logits_all = models_lib.make_stacked_logits(apply_fn)
  rows = []
  for part in batches(len(images), batch_size):
    chunk = images[part]
    padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]),
                                             chunk.dtype)])
    rows.append(np.asarray(jax.device_get(logits_all(variables, padded)))[:, :len(chunk)])
  return np.concatenate(rows, axis=1)


def penultimate_features(apply_fn: Any, variables: Any) -> Callable[[Any], Any]:
  """`x -> the input of the model's last Dense layer`, flattened to [batch, D] float32.

  The feature layer of Lee et al.'s Mahalanobis detector, of spectral
  signatures and of activation clustering. Found by intercepting every
  `flax.linen.Dense` call of `apply_fn(variables, x, train=False)`, so it
  works for any model whose head is a Dense layer.

  Raises:
    ValueError: (when called) the model has no Dense layer.
  """

  def features(x):
    seen = []

    def interceptor(next_fun, args, kwargs, context):
      if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
        seen.append(args[0])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      apply_fn(variables, x, train=False)
    if not seen:
      raise ValueError("The model has no Dense layer whose input could serve as features.")
    return seen[-1].reshape(seen[-1].shape[0], -1).astype(jnp.float32)

  return features


# Layers whose channels `layer_tap` reads and masks: the output of the last
# convolution (Liu et al.'s fine-pruning layer) or the input of the last Dense
# layer (the penultimate features).
TAPPED_LAYERS = ("last_conv", "penultimate")


class LayerTap(NamedTuple):
  """One layer of a Flax model, read and masked channel-wise (`layer_tap`).

  Attributes:
    layer: 'last_conv' or 'penultimate'.
    channels: the layer's channel count (its last axis).
    apply: (variables, x, mask, **apply_kwargs) -> (the model's output, the
      layer's activations [B, ..., channels]). The activations are those the
      layer passes on: ReLU of the last convolution's output (Liu et al.
      rank channels by their activation after the nonlinearity), or the last
      Dense layer's input. `mask` ([channels], 1 keeps, 0 prunes, or None)
      multiplies the convolution's output, or the Dense layer's input, so a
      pruned channel passes on exactly 0.
  """
  layer: str
  channels: int
  apply: Callable[..., tuple[Any, Any]]


def layer_tap(apply_fn: Any, variables: Any, example: Any, layer: str) -> LayerTap:
  """A `LayerTap` of `apply_fn`'s model at `layer` (see `TAPPED_LAYERS`).

  The layer is found by intercepting `nn.Conv` / `Im2colConv` (or `nn.Dense`)
  calls; the last one traced when the model runs on `example` (a [B, H, W, C]
  batch; only its shape is used) is the tapped one.

  Raises:
    ValueError: an unknown layer name, or a model without such a layer.
  """
  validation.check_choice(layer, "layer", TAPPED_LAYERS)
  kinds = (nn.Dense,) if layer == "penultimate" else (nn.Conv, Im2colConv)

  def is_tapped(context: Any) -> bool:
    return isinstance(context.module, kinds) and context.method_name == "__call__"

  calls = []

  def count(next_fun, args, kwargs, context):
    if is_tapped(context):
      calls.append(context.module)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(count):
    shapes = jax.eval_shape(lambda v, x: apply_fn(v, x, train=False), variables, example)
  del shapes
  if not calls:
    raise ValueError(f"layer={layer!r} needs a model with "
                     + ("a Dense layer" if layer == "penultimate" else "a convolution")
                     + f"; this one has none. Accepted layers: {TAPPED_LAYERS}.")
  last = len(calls)

  def apply(variables, x, mask, **apply_kwargs):
    seen, captured = [0], []

    def interceptor(next_fun, args, kwargs, context):
      if not is_tapped(context):
        return next_fun(*args, **kwargs)
      seen[0] += 1
      if seen[0] != last:
        return next_fun(*args, **kwargs)
      if layer == "penultimate":
        inputs = args[0]
        captured.append(inputs)
        if mask is not None:
          inputs = inputs * jnp.asarray(mask, inputs.dtype)
        return next_fun(inputs, *args[1:], **kwargs)
      out = next_fun(*args, **kwargs)
      captured.append(jax.nn.relu(out))
      return out if mask is None else out * jnp.asarray(mask, out.dtype)

    with nn.intercept_methods(interceptor):
      result = apply_fn(variables, x, **apply_kwargs)
    return result, captured[0]

  acts = jax.eval_shape(lambda v, x: apply(v, x, None, train=False)[1], variables, example)
  return LayerTap(layer=layer, channels=int(acts.shape[-1]), apply=apply)
