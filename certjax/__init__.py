"""certjax: train, attack and certify neural networks in JAX.

Import the subpackage you need (`import certjax` alone imports nothing else,
so it stays light); layers from the top, each importing only those below it
(import-linter checks this, see pyproject.toml):

  training: `train_and_evaluate(config, workdir)`, objectives, the run config.
  evaluation: evaluators by name (robust, verified, certified accuracy),
    `evaluate_workdir`, result readers and plots.
  runs: workdirs (config.json, checkpoints restored onto the current mesh),
    atomic result files, progress lines.
  attacks, bounds, smoothing: the algorithms, pure functions of a `logits_fn`.
  models, data: Flax models and data sets by name;
    `models.make_logits_fn(model, variables)` gives the pure `logits_fn`.
  parallel: the device mesh, shardings, multi-host start-up.
  validation, types: input checks with clear errors, type aliases.
"""

__version__ = "0.1.0"
