"""`run_certification(config, workdir)`: certify a trained model's test images.

The library half of `launch/certify.py`, callable from a notebook. It restores
the model trained in `workdir`, selects images of the split as Cohen et al.'s
`certify.py` does (`config.skip`, `config.max`), runs CERTIFY on them in
groups of `config.certify.images_per_call`, and writes to
`<workdir>/certify/` (or `config.certify.output_dir`):

  <run>.tsv       Cohen's format `idx label predict radius correct time`,
                  readable by their `analyze.py`; `time` is the group's wall
                  time divided by its size (the first group includes
                  compilation);
  <run>.md        the summary table: certified accuracy at `certify.radii`,
                  average certified radius (ACR), abstention rate;
  <run>.json      the same figures with the settings, for notebooks;
  <run>.png       certified accuracy against radius.

`<run>` names every setting that changes the certificates (noise, sigma, n0, n,
alpha, seed, checkpoint step, split), so runs with different settings never
overwrite each other. Image `i` of the split is certified with the key
`fold_in(key(certify.seed), i)`, so its certificate does not depend on skip,
max, the grouping or the devices; an interrupted run resumes where its TSV
stops.

Multi-host: every host certifies a contiguous share of each group
(`parallel.host_share`), reading only those images, on all of its local
devices (the counting needs no communication between devices); the
predictions and radii of the group are then gathered once with
`multihost_utils.process_allgather`, padding dropped, and process 0 appends
them to the TSV and writes the summary and plot. Process 0 decides where a
resumed run starts and every host returns the same `CertificationRun`.
`certify.images_per_call` is the global group size: keep it at least the
number of devices (ideally a multiple) so that no device idles.

References:
  Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via Randomized
  Smoothing", ICML 2019 (locuslab/smoothing `code/certify.py`, `analyze.py`).
"""

from __future__ import annotations

import json
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from certjax import models as models_lib
from certjax import parallel
from certjax.data import pipeline as data_pipeline
from certjax.smoothing import analysis
from certjax.smoothing import config as smoothing_config
from certjax.smoothing import core
from certjax.smoothing import sampling
from certjax.smoothing import stats
from certjax.training import checkpoints as ckpt_lib
from certjax.training import config as config_lib
from certjax.training import train as train_lib

CERTIFY_DIR = "certify"


class CertificationRun(NamedTuple):
  """What `run_certification` returns.

  Attributes:
    results: the TSV's columns (`analysis.CertifyResults`), all images.
    summary: certified accuracy per radius, ACR, abstention rate.
    table: the summary as a Markdown table (what the launcher prints).
    sigma: the noise level certified at.
    tsv_path, summary_path, json_path, plot_path: the files written.
  """
  results: analysis.CertifyResults
  summary: analysis.Summary
  table: str
  sigma: float
  tsv_path: str
  summary_path: str
  json_path: str
  plot_path: str


def run_name(sigma: float, cfg: ml_collections.ConfigDict, step: int, split: str) -> str:
  noise = "" if cfg.noise == "gaussian" else f"{cfg.noise}_"
  split = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in split)
  return (f"{noise}sigma{sigma:g}_n0{cfg.n0}_n{cfg.n}_alpha{cfg.alpha:g}_seed{cfg.seed}"
          f"_step{step}_{split}")


def _latest_step(workdir: str) -> int | None:
  # Finished orbax checkpoints are directories named by their step; one being
  # written has a temporary suffix. None lets load_trained report "no checkpoint".
  directory = os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return None
  steps = [int(d) for d in os.listdir(directory) if d.isdigit()]
  return max(steps) if steps else None


def _existing_prefix(path: str, indices: np.ndarray) -> int:
  """Rows already certified in `path` when they are a prefix of `indices`, else 0."""
  if not os.path.exists(path):
    return 0
  try:
    done = analysis.read_tsv(path).idx
  except ValueError:
    return 0
  if done.size <= indices.size and np.array_equal(done, indices[:done.size]):
    return int(done.size)
  logging.warning("%s holds other images than this selection (skip/max changed?); "
                  "certifying again from the start.", path)
  return 0


def _append_rows(path: str, results: analysis.CertifyResults, fresh: bool) -> None:
  # Written group by group so that an interrupted run keeps what it finished.
  tmp = path + ".part"
  analysis.write_tsv(tmp, results)
  with open(tmp) as f:
    lines = f.readlines()
  os.remove(tmp)
  with open(path, "w" if fresh else "a") as f:
    f.writelines(lines if fresh else lines[1:])


def _certify_group(keys, logits_fn, x, sigma, cfg, num_classes, mesh) -> core.Certificate:
  count = x.shape[0]
  if mesh is not None:
    # Every device gets the same number of images: pad with copies of the
    # last one (their certificates are dropped).
    devices = mesh.devices.size
    padded = -(-count // devices) * devices
    if padded != count:
      x = np.concatenate([x, np.repeat(x[-1:], padded - count, axis=0)])
      keys = jnp.concatenate([keys, jnp.repeat(keys[-1:], padded - count, axis=0)])
    x = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
  cert = core.certify(keys, logits_fn, x, sigma, cfg.n0, cfg.n, cfg.alpha, cfg.batch_size,
                      num_classes=num_classes, noise=cfg.noise, mesh=mesh)
  return core.Certificate(*(np.asarray(field)[:count] for field in cert))


def _certify_share(key, idx, logits_fn, sigma, cfg, config, split, num_classes, mesh):
  """Certifies this host's share of the group `idx`; returns the whole group's
  (labels, predictions, radii) on every host, in the order of `idx`."""
  share, size = parallel.host_share(idx.size)
  mine = idx[share]
  labels = np.zeros(size, np.int32)
  prediction = np.zeros(size, np.int32)
  radius = np.zeros(size, np.float32)
  if mine.size:
    x, y = data_pipeline.load_examples(config.data, split, mine)
    keys = sampling.keys_for_indices(key, mine)
    cert = _certify_group(keys, logits_fn, x, sigma, cfg, num_classes, mesh)
    labels[:mine.size], prediction[:mine.size] = y, cert.prediction
    radius[:mine.size] = cert.radius
  gathered = parallel.process_allgather((labels, prediction, radius))
  return tuple(parallel.unpad_shares(g, idx.size) for g in gathered)


def _write_summary(paths, name, sigma, cfg, config, summary, table, results, step) -> None:
  settings = {
      "data": config.data.name, "split": paths["split"], "model": config.model.name,
      "objective": config.objective.name, "checkpoint_step": step, "noise": cfg.noise,
      "sigma": sigma, "n0": cfg.n0, "n": cfg.n, "alpha": cfg.alpha, "seed": cfg.seed,
      "skip": config.skip, "max": config.max, "batch_size": cfg.batch_size,
  }
  norm = stats.NOISE_NORMS[cfg.noise].upper()
  header = [f"# Certification: {name}", "",
            ", ".join(f"{k}={v}" for k, v in settings.items()), "",
            f"Certified accuracy ({norm} radius) on {summary.num_examples} images; "
            f"ACR = average certified radius; {summary.mean_time:.3f} s per image.", "", ""]
  with open(paths["summary"], "w") as f:
    f.write("\n".join(header) + table + "\n")
  record = {
      "settings": settings,
      "radii": [float(t) for t in summary.thresholds],
      "certified_accuracy": [float(a) for a in summary.certified_accuracy],
      "average_certified_radius": summary.average_certified_radius,
      "abstain_rate": summary.abstain_rate,
      "num_examples": summary.num_examples,
      "mean_seconds_per_image": summary.mean_time,
      "total_seconds": float(np.sum(results.time)),
      "norm": norm.lower(),
      "tsv": paths["tsv"],
      "devices": {"platform": jax.devices()[0].platform, "count": jax.device_count()},
  }
  with open(paths["json"], "w") as f:
    json.dump(record, f, indent=2)


def run_certification(config: ml_collections.ConfigDict, workdir: str) -> CertificationRun:
  """Certifies the model trained in `workdir` on the images `config` selects.

  Args:
    config: a training config with a `certify` section (see
      `certjax.smoothing.config.default_config`), usually the one the model
      was trained with, plus evaluation overrides; `config.skip` and
      `config.max` select the images.
    workdir: the training run's workdir (holds checkpoints/).

  Returns:
    A `CertificationRun` with the results, summary and the paths written.

  Raises:
    ValueError: on bad certify settings (naming the field), a checkpoint that
      does not fit the config's model, or an empty selection.
    FileNotFoundError: when the workdir holds no checkpoint.
  """
  config_lib.validate_config(config)
  config = config_lib.with_defaults(config)
  smoothing_config.validate(config)
  cfg = config.certify
  sigma = smoothing_config.resolve_sigma(config)

  step = _latest_step(workdir) if cfg.step < 0 else int(cfg.step)
  model, variables, config, info = train_lib.load_trained(workdir, step=step, config=config)
  # Certification runs on this host's devices only, so the weights are placed
  # there once (the checkpoint may have been restored onto other devices).
  mesh = parallel.local_mesh() if jax.local_device_count() > 1 else None
  variables = jax.device_get(variables)
  variables = (parallel.replicate(variables, mesh) if mesh is not None
               else jax.device_put(variables, jax.local_devices()[0]))
  logits_fn = models_lib.make_logits_fn(model, variables)

  split = cfg.split or config.data.eval_split
  indices = data_pipeline.select_split_indices(config.data, split, int(config.skip),
                                              int(config.max))

  out_dir = cfg.output_dir or os.path.join(workdir, CERTIFY_DIR)
  main = parallel.is_main_process()
  if main:
    os.makedirs(out_dir, exist_ok=True)
  name = run_name(sigma, cfg, int(step), split)
  paths = {ext: os.path.join(out_dir, f"{name}.{ext}") for ext in ("tsv", "md", "json", "png")}
  paths = {"tsv": paths["tsv"], "summary": paths["md"], "json": paths["json"],
           "plot": paths["png"], "split": split}

  # Process 0 owns the TSV; the other hosts start where it says.
  done = _existing_prefix(paths["tsv"], indices) if main else 0
  done = int(parallel.broadcast_from_main(np.int64(done)))
  if done:
    logging.info("Resuming %s: %d of %d images already certified.", paths["tsv"], done,
                 indices.size)
  key = jax.random.key(cfg.seed)
  group = int(cfg.images_per_call)
  if group % jax.device_count():
    logging.info("certify.images_per_call=%d is not a multiple of the %d devices: some "
                 "devices certify padding in each group.", group, jax.device_count())
  logging.info("Certifying %d %s images of %s (sigma=%g, n0=%d, n=%d, alpha=%g) with %s "
               "from step %d on %d device(s) of %d host(s)", indices.size - done, split,
               info.name, sigma, cfg.n0, cfg.n, cfg.alpha, config.model.name, step,
               jax.device_count(), jax.process_count())
  start_time = time.perf_counter()
  certified = 0
  for first in range(done, indices.size, group):
    idx = indices[first:first + group]
    tic = time.perf_counter()
    labels, prediction, radius = _certify_share(key, idx, logits_fn, sigma, cfg, config,
                                                split, info.num_classes, mesh)
    seconds = time.perf_counter() - tic
    if main:
      rows = analysis.make_results(labels, prediction, radius, idx=idx,
                                   time=seconds / idx.size)
      _append_rows(paths["tsv"], rows, fresh=(first == 0))
    certified += idx.size
    elapsed = time.perf_counter() - start_time
    remaining = indices.size - first - idx.size
    logging.info("certified %d/%d images, %.2f s/image, ETA %.0f s", first + idx.size,
                 indices.size, elapsed / certified, remaining * elapsed / certified)

  results = _shared_results(paths["tsv"], indices.size, main)
  summary = analysis.summarize(results, thresholds=tuple(cfg.radii))
  table = analysis.format_summary({f"sigma={sigma:g}": summary})
  if main:
    _write_summary(paths, name, sigma, cfg, config, summary, table, results, int(step))
    norm = stats.NOISE_NORMS[cfg.noise].upper()
    analysis.plot_certified_accuracy(
        {f"sigma={sigma:g}": results}, paths["plot"], norm=norm,
        max_radius=max(float(np.max(cfg.radii)), float(results.radius.max(initial=0.0)),
                       0.1) * 1.05,
        title=f"{info.name} {config.model.name} ({config.objective.name}), n={cfg.n}")
  return CertificationRun(results=results, summary=summary, table=table, sigma=sigma,
                          tsv_path=paths["tsv"], summary_path=paths["summary"],
                          json_path=paths["json"], plot_path=paths["plot"])


def _shared_results(tsv_path: str, count: int, main: bool) -> analysis.CertifyResults:
  """The TSV's rows as read by process 0, on every host (it alone may see the file)."""
  if main:
    results = analysis.read_tsv(tsv_path)
  else:
    results = analysis.CertifyResults(
        idx=np.zeros(count, np.int64), label=np.zeros(count, np.int64),
        predict=np.zeros(count, np.int64), radius=np.zeros(count, np.float64),
        correct=np.zeros(count, bool), time=np.zeros(count, np.float64))
  if jax.process_count() == 1:
    return results
  rows = int(parallel.broadcast_from_main(np.int64(results.idx.size)))
  if rows != count:  # raised on every host, so none waits in the broadcast below
    raise ValueError(f"{tsv_path} holds {rows} rows, expected {count}; was it changed "
                     "while certifying?")
  return analysis.CertifyResults(*parallel.broadcast_from_main(tuple(results)))
