"""The work of the distributed test: train, certify (twice, the second run
resuming the first), attack and verify a tiny model, and report the results.

test_two_process.py runs `run` in-process as the single-process reference and
starts this file as the two processes of a localhost cluster (CERTJAX_*
variables; the forced CPU device count and the compilation cache come from
the environment):

    python tests/distributed/_worker.py <workdir> <output.npz> [<foreign workdir>]

With a foreign workdir (the reference's, trained by one process), the
workers also certify it once it is trained: checkpoints written by one
process must restore onto two (`certify_foreign`).
"""

import json
import logging as py_logging
import os
import sys
import time

START = time.perf_counter()
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from certjax import parallel  # pylint: disable=g-import-not-at-top

if __name__ == "__main__":
  parallel.initialize_distributed()  # before any other JAX call

import jax  # pylint: disable=g-import-not-at-top,g-bad-import-order
from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top,g-bad-import-order
import numpy as np  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top

from certjax import evaluation  # pylint: disable=g-import-not-at-top
from certjax import runs  # pylint: disable=g-import-not-at-top
from certjax.training import train as train_lib  # pylint: disable=g-import-not-at-top
from tests.conftest import smoke_config  # pylint: disable=g-import-not-at-top

# 150 eval digits fill neither 3 batches of 64 nor the 4 devices evenly: the
# last batch is masked padding. The 7 selected images (0, 50, ..., 300) split
# 4 + 3 over two hosts and are padded to fill the devices; verification sees
# the 3 of them below the 150-image eval cap (2 + 1).
NUM_EVAL, SKIP, MAX = 150, 50, 350


def tiny_config():
  config = smoke_config("mnist5k_smoothing")
  config.model.kwargs = {"hidden": (32,)}
  config.batch_size = 32
  config.eval_batch_size = 64
  config.data.num_eval_examples = NUM_EVAL
  config.num_train_steps = 20
  config.log_every_steps = 10
  config.checkpoint_every_steps = 0
  config.skip, config.max = SKIP, MAX
  # n0 = n: selection and estimation share one compiled counting program.
  config.certify.update({"n0": 128, "n": 128, "alpha": 0.01, "batch_size": 64,
                         "images_per_call": 5})
  config.attack.update({"attacks": ("fgsm",), "eps_list": (0.02, 0.05), "batch_size": 4})
  config.verify.update({"methods": ("ibp",), "eps_list": (0.005, 0.02), "batch_size": 6})
  return config


class _Remember(py_logging.Handler):

  def __init__(self):
    super().__init__(py_logging.INFO)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def run(workdir):
  """Runs everything; returns (trained parameter leaves, results dict)."""
  seconds = {"start-up": round(time.perf_counter() - START, 2),
             "start-up cpu": round(time.process_time(), 2)}
  tic, cpu = time.perf_counter(), time.process_time()

  def lap(name):
    nonlocal tic, cpu
    seconds[name] = round(time.perf_counter() - tic, 2)
    seconds[name + " cpu"] = round(time.process_time() - cpu, 2)
    tic, cpu = time.perf_counter(), time.process_time()

  out = {"process_index": jax.process_index(), "process_count": jax.process_count(),
         "device_count": jax.device_count(), "seconds": seconds}
  remember = _Remember()
  absl_logger = logging.get_absl_logger()
  absl_logger.addHandler(remember)
  previous_level = absl_logger.level
  absl_logger.setLevel(py_logging.INFO)
  try:
    if jax.device_count() > 1:
      bad = tiny_config()
      bad.batch_size = 30
      try:
        train_lib.train_and_evaluate(bad, workdir + "_bad")
      except ValueError as e:
        out["batch_error"] = str(e)

    result = train_lib.train_and_evaluate(tiny_config(), workdir)
    params = [np.asarray(p) for p in jax.tree.leaves(jax.device_get(result.state.params))]
    out["eval"] = {k: float(v) for k, v in result.eval_metrics.items()}
    lap("train")

    # Groups of 5 and 2 images, the second appended to the TSV by process 0.
    # Run again, it resumes after the last image: nothing left to certify
    # (no recompilation), the rows are read back and shared with every host.
    evaluation.evaluate_workdir(tiny_config(), workdir, "certified")
    out["certify"] = certify(tiny_config(), workdir)
    lap("certify")

    attack = evaluation.evaluate_workdir(tiny_config(), workdir, "robust", verbose=False).details
    out["attack"] = {"num_examples": attack.num_examples,
                     "clean_accuracy": attack.clean_accuracy,
                     "correct": attack.correct.astype(int).tolist(),
                     "robust": [r.robust.astype(int).tolist() for r in attack.per_eps],
                     "robust_accuracy_after": [r.robust_accuracy_after for r in attack.per_eps]}
    lap("attack")

    verify = evaluation.evaluate_workdir(tiny_config(), workdir, "verified").details
    out["verify"] = {k: verify[k] for k in ("num_images", "clean_accuracy")}
    out["verify"]["num_verified"] = [r["num_verified"] for r in verify["results"]]
    lap("verify")
  finally:
    absl_logger.removeHandler(remember)
    absl_logger.setLevel(previous_level)
  out["resumed"] = [m for m in remember.messages if m.startswith("Resuming")]
  return params, json.loads(json.dumps(out))  # as the workers' output file holds it


def certify(config, workdir):
  """Certifies the images of `config` with the model in `workdir`; the results as lists."""
  result = evaluation.evaluate_workdir(config, workdir, "certified")
  # Process 0 writes the files; the others return at once. Without a barrier
  # another process could list the directory while process 0 still holds a
  # temporary file there (seen once in CI: 5 entries instead of 4).
  multihost_utils.sync_global_devices("certified files written")
  results = result.details.results
  return {"idx": results.idx.tolist(), "label": results.label.tolist(),
          "predict": results.predict.tolist(), "radius": results.radius.tolist(),
          "num_examples": result.details.summary.num_examples,
          "files": sorted(f for f in os.listdir(os.path.dirname(result.artifacts["tsv"]))
                          if not f.endswith(".log.jsonl"))}


def certify_foreign(workdir, output_dir, timeout_s=180):
  """Certifies a workdir trained elsewhere (once its last checkpoint is there)."""
  final = tiny_config().num_train_steps
  deadline = time.time() + timeout_s
  while final not in runs.checkpoint_steps(workdir) or not os.path.exists(
      os.path.join(workdir, runs.CONFIG_FILE)):
    if time.time() > deadline:
      raise TimeoutError(f"{workdir} has no checkpoint at step {final} after {timeout_s} s.")
    time.sleep(0.5)
  config = tiny_config()
  config.certify.output_dir = output_dir
  return certify(config, workdir)


def main(workdir, out_path, foreign=None):
  params, out = run(workdir)
  if foreign:
    out["certify_foreign"] = certify_foreign(foreign, workdir + "_foreign_certify")
  out["seconds"]["total"] = round(time.perf_counter() - START, 2)
  np.savez(out_path, *params, summary=json.dumps(out))


if __name__ == "__main__":
  main(*sys.argv[1:])
