"""The body shared by `launch.evaluate` and its aliases `attack`, `verify`, `certify`.

Validates the whole config up front (every section, not only the one the
evaluator reads: a bad `certify.alpha` is reported by `launch.train` too),
runs `certjax.evaluation.evaluate_workdir` and prints the evaluator's table
and the paths of the files it wrote.
"""

from __future__ import annotations

from typing import Callable

from absl import flags, logging

from launch import common

FLAGS = flags.FLAGS
_LABELS = (("tsv", "TSV:    "), ("md", "Summary:"), ("json", "JSON:   "), ("png", "Plot:   "))


def report_lines(result) -> list[str]:
  """The launcher's output: the table, then one line per file written."""
  lines = [result.table.rstrip("\n")]
  for kind, label in _LABELS:
    if kind in result.artifacts:
      lines.append(f"{label} {result.artifacts[kind]}")
  for kind, path in result.artifacts.items():
    if kind not in dict(_LABELS):
      lines.append(f"{kind}: {path}")
  return lines


def main_for(evaluator: str | None) -> Callable[[list[str]], None]:
  """`main(argv)` running `evaluator` (None: the one `--evaluator` names)."""

  def main(argv: list[str]) -> None:
    common.start(argv)
    from certjax import evaluation  # pylint: disable=g-import-not-at-top
    from certjax.training import config as config_lib  # pylint: disable=g-import-not-at-top

    name = evaluator or FLAGS.evaluator

    def run():
      evaluation.get_spec(name)  # an unknown name: one line naming the registered ones
      config_lib.validate_config(FLAGS.config)
      config = config_lib.with_defaults(FLAGS.config)
      return evaluation.evaluate_workdir(config, FLAGS.workdir, name)

    result = common.run_reporting_errors(run)
    logging.info("%s: wrote %s", name, ", ".join(result.artifacts.values()) or "nothing")
    print("\n".join(report_lines(result)), flush=True)

  return main
