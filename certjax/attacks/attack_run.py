"""`run_attacks(config, workdir)`: robust accuracy of a trained checkpoint.

The library side of `launch/attack.py`, callable from notebooks. It restores
the model trained by `launch/train.py` in `workdir`, takes every
`config.skip`-th image of the attack split with index below `config.max`
(-1: all; Cohen et al.'s certify.py convention), runs the attacks of
`config.attack` in sequence for every radius of `config.attack.eps_list`
(`certjax.attacks.robust_accuracy`), and writes

  <workdir>/attack/results.json   the results, the attack settings, which
                                  checkpoint and which images
  <workdir>/attack/results.md     a readable table (robust accuracy in % after
                                  each attack in sequence, per eps)

Multi-host: each host reads and attacks only its contiguous share of the
selected images (`parallel.host_share`); the per-example outcomes, the
per-attack robust counts, wall times and largest perturbations are gathered
once with `multihost_utils.process_allgather` and merged (`merge_results`),
so every image counts exactly once and every host returns the same result;
process 0 writes the files. Every host attacks with the same `attack.seed`,
so deterministic attacks (FGSM, PGD without random start) give exactly the
single-process result, and randomised ones the same distribution. Within a
host, `robust_accuracy` splits every batch over the host's devices
(`parallel.local_mesh()`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from certjax import data as data_lib
from certjax import models as models_lib
from certjax import parallel
from certjax import validation
from certjax.attacks import config as attack_config_lib
from certjax.attacks.runner import EpsResult, RobustAccuracyResult, robust_accuracy
from certjax.training import checkpoints as ckpt_lib
from certjax.training import config as config_lib

RESULTS_DIR = "attack"


def run_attacks(config: ml_collections.ConfigDict, workdir: str, *,
                verbose: bool = True) -> RobustAccuracyResult:
  """Attacks the checkpoint in `workdir` as `config.attack` says; writes the results.

  Args:
    config: the run's config (e.g. the training config file used with
      launch/train.py, with `attack.*`, `skip`, `max` overrides).
    workdir: the training workdir holding config.json and checkpoints/.
    verbose: print progress after each attack and radius.

  Returns:
    The `RobustAccuracyResult` (also written to <workdir>/attack/).

  Raises:
    FileNotFoundError: no checkpoint in the workdir.
    ValueError: a bad attack setting, or a checkpoint that does not fit the
      model of `config`.
  """
  from certjax.training import train as train_lib  # pylint: disable=g-import-not-at-top

  config_lib.validate_config(config)
  config = config_lib.with_defaults(config)
  acfg = config.attack
  # Bad attack settings are reported before the checkpoint is restored.
  attacks = attack_config_lib.build_attacks(acfg, data_lib.get_info(config.data).num_classes)
  step = int(acfg.checkpoint_step)
  if step < 0:
    manager = ckpt_lib.make_manager(workdir, keep=config.keep_checkpoints, read_only=True)
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(
          f"No checkpoint in {manager.directory}: train first with python -m launch.train "
          "--config=... --workdir=<the same workdir>.")
  model, variables, config, info = train_lib.load_trained(workdir, step=step, config=config)
  split = acfg.split or config.data.eval_split
  indices = data_lib.select_split_indices(config.data, split, config.skip, config.max)
  share, share_size = parallel.host_share(indices.size)
  x, y = data_lib.load_examples(config.data, split, indices[share])
  # Attacks run data-parallel on this host's devices (robust_accuracy
  # replicates the weights there); hosts split the images between them. The
  # weights are fetched first since the checkpoint may have been restored onto
  # other hosts' devices too.
  variables = jax.device_get(variables)
  logits_fn = models_lib.make_logits_fn(model, variables)
  logging.info("Attacking %d %s %s images (checkpoint step %d, %d on this host of %d) "
               "with %s at eps %s", len(indices), info.name, split, step, len(x),
               jax.process_count(), [n for n, _ in attacks], list(acfg.eps_list))
  batch_size = validation.check_int_at_least(acfg.batch_size, "attack.batch_size", 1)
  key = jax.random.key(int(acfg.seed))
  eps_list = list(acfg.eps_list)
  part = None
  if len(x):
    # Progress lines of a multi-host run would show one host's share only.
    part = robust_accuracy(key, logits_fn, x, y, attacks=attacks, eps_list=eps_list,
                           norm=acfg.norm, batch_size=batch_size,
                           verbose=verbose and jax.process_count() == 1,
                           mesh=parallel.local_mesh())
  if jax.process_count() == 1:
    result = part
  else:
    result = merge_results(_gather_parts(part, share_size, len(x),
                                         [n for n, _ in attacks], eps_list, acfg.norm))
  if parallel.is_main_process():
    write_results(result, workdir, {
        "workdir": os.path.abspath(workdir),
        "checkpoint_step": step,
        "dataset": info.name,
        "split": split,
        "model": config.model.name,
        "skip": int(config.skip),
        "max": int(config.max),
        "first_index": int(indices[0]),
        "last_index": int(indices[-1]),
        "attack_config": ckpt_lib.config_to_dict(acfg),
    })
  return result


def write_results(result: RobustAccuracyResult, workdir: str, metadata: dict[str, Any]
                  ) -> tuple[str, str]:
  """Writes results.json and results.md under <workdir>/attack/; returns their paths."""
  out_dir = os.path.join(workdir, RESULTS_DIR)
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, "results.json")
  md_path = os.path.join(out_dir, "results.md")
  payload = {**metadata, **result.to_dict()}
  with open(json_path + ".tmp", "w") as f:
    json.dump(payload, f, indent=2)
  os.replace(json_path + ".tmp", json_path)
  lines = [
      f"# Robust accuracy: {metadata.get('model')} on {metadata.get('dataset')} "
      f"({metadata.get('split')})",
      "",
      f"Checkpoint step {metadata.get('checkpoint_step')} in `{metadata.get('workdir')}`; "
      f"images skip={metadata.get('skip')}, max={metadata.get('max')}.",
      "",
      "```",
      result.table(),
      "```",
      "",
  ]
  with open(md_path, "w") as f:
    f.write("\n".join(lines))
  return json_path, md_path


def merge_results(parts: Sequence[RobustAccuracyResult | None]) -> RobustAccuracyResult:
  """One result over the union of disjoint parts, in the order given.

  Robust accuracies are pooled by example count (each example counts once);
  wall times and the largest perturbation are the maxima over parts, as the
  parts ran side by side. None stands for a part without examples.

  Args:
    parts: `robust_accuracy` results on disjoint example sets, all with the
      same attacks, radii and norm.

  Returns:
    A `RobustAccuracyResult` whose per-example masks are the parts' in order.

  Raises:
    ValueError: no non-empty part, or parts with different attacks/radii/norm.
  """
  parts = [p for p in parts if p is not None and p.num_examples]
  if not parts:
    raise ValueError("merge_results needs at least one non-empty result.")
  first = parts[0]
  for p in parts[1:]:
    if (p.norm, p.attack_names, [r.eps for r in p.per_eps]) != (
        first.norm, first.attack_names, [r.eps for r in first.per_eps]):
      raise ValueError("merge_results needs results of the same attacks, radii and norm.")
  sizes = np.array([p.num_examples for p in parts])
  total = int(sizes.sum())
  correct = np.concatenate([p.correct for p in parts])
  per_eps = []
  for e, r in enumerate(first.per_eps):
    after = []
    for a, name in enumerate(first.attack_names):
      # Each part's fraction is (its robust count) / (its size): recover the counts.
      robust = sum(round(p.per_eps[e].robust_accuracy_after[a][1] * n)
                   for p, n in zip(parts, sizes))
      after.append((name, robust / total))
    seconds = tuple((name, max(p.per_eps[e].seconds[a][1] for p in parts))
                    for a, name in enumerate(first.attack_names))
    robust_mask = np.concatenate([p.per_eps[e].robust for p in parts])
    per_eps.append(EpsResult(
        eps=r.eps, robust_accuracy=float(np.mean(robust_mask)),
        robust_accuracy_after=tuple(after), seconds=seconds,
        max_perturbation=max(p.per_eps[e].max_perturbation for p in parts),
        robust=robust_mask))
  return RobustAccuracyResult(norm=first.norm, num_examples=total,
                              clean_accuracy=float(np.mean(correct)),
                              attack_names=first.attack_names, per_eps=tuple(per_eps),
                              correct=correct)


def _gather_parts(part: RobustAccuracyResult | None, share_size: int, count: int,
                  attack_names: list[str], eps_list: list[float], norm: str
                  ) -> list[RobustAccuracyResult | None]:
  """Every host's part, rebuilt from one `process_allgather` of fixed-shape arrays."""
  num_eps, num_attacks = len(eps_list), len(attack_names)
  local = {
      "count": np.int64(count),
      "correct": parallel.pad_rows(np.zeros(0, bool) if part is None else part.correct,
                                   share_size),
      "robust": np.zeros((num_eps, share_size), bool),
      "after": np.zeros((num_eps, num_attacks), np.int64),
      "seconds": np.zeros((num_eps, num_attacks), np.float64),
      "max_perturbation": np.zeros(num_eps, np.float64),
  }
  if part is not None:
    for e, r in enumerate(part.per_eps):
      local["robust"][e, :count] = r.robust
      local["after"][e] = [round(acc * count) for _, acc in r.robust_accuracy_after]
      local["seconds"][e] = [s for _, s in r.seconds]
      local["max_perturbation"][e] = r.max_perturbation
  gathered = parallel.process_allgather(local)
  parts = []
  for h in range(jax.process_count()):
    n = int(gathered["count"][h])
    if not n:
      parts.append(None)
      continue
    per_eps = tuple(EpsResult(
        eps=float(eps),
        robust_accuracy=float(np.mean(gathered["robust"][h, e, :n])),
        robust_accuracy_after=tuple(
            (name, float(gathered["after"][h, e, a]) / n)
            for a, name in enumerate(attack_names)),
        seconds=tuple((name, float(gathered["seconds"][h, e, a]))
                      for a, name in enumerate(attack_names)),
        max_perturbation=float(gathered["max_perturbation"][h, e]),
        robust=gathered["robust"][h, e, :n].copy()) for e, eps in enumerate(eps_list))
    parts.append(RobustAccuracyResult(
        norm=norm, num_examples=n, clean_accuracy=float(np.mean(gathered["correct"][h, :n])),
        attack_names=tuple(attack_names), per_eps=per_eps,
        correct=gathered["correct"][h, :n].copy()))
  return parts
