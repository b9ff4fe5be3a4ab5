"""Notebook glue: the checkout on sys.path, the scale, plot style, published figures.

The notebooks import this module (it sits beside them). It holds only what
is particular to notebooks; everything else is a library call the notebooks
make themselves:

  result files   certjax.evaluation.certified.read_results / certification_rows,
                 certjax.evaluation.verified.result_rows;
  plots          certjax.evaluation.plots (bare matplotlib Figures);
  process set-up certjax.runs.enable_compilation_cache / quiet_library_logs /
                 subprocess_env;
  benchmarks     benchmarks/reports.py (reports read back, tables and charts).

What stays here: finding the repository root, choosing the scale
($CERTJAX_NOTEBOOK_SCALE), matplotlib defaults, the published numbers drawn
beside ours with their citations (`Anchor.reference` is the `plots.Reference`
the library draws), and thin pandas wrappers that turn the library's rows
into displayed tables. Importing it imports neither certjax nor JAX (the
notebook puts the checkout on sys.path first). Tested in
tests/notebooks/test_helpers.py.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

SCALE_ENV = "CERTJAX_NOTEBOOK_SCALE"
DEFAULT_SCALE = "smoke"


# ----------------------------------------------------------------------------
# Set-up: repository root, scale, plot style.


def repo_root(start: str | None = None) -> str:
  """The certjax checkout containing `start` (default: the working directory).

  Raises:
    FileNotFoundError: when no parent directory holds both certjax/ and configs/.
  """
  path = os.path.abspath(start or os.getcwd())
  while True:
    if (os.path.isdir(os.path.join(path, "certjax"))
        and os.path.isdir(os.path.join(path, "configs"))):
      return path
    parent = os.path.dirname(path)
    if parent == path:
      raise FileNotFoundError(
          f"No certjax checkout (a directory holding certjax/ and configs/) contains "
          f"{start or os.getcwd()!r}; start the notebook from the repository or its "
          "notebooks/ directory.")
    path = parent


def add_root_to_path(root: str) -> None:
  """Makes `import certjax`, `configs` and `benchmarks` resolve to this checkout."""
  if root not in sys.path:
    sys.path.insert(0, root)


def select_scale(settings: Mapping[str, Mapping[str, Any]],
                 scale: str | None = None) -> tuple[str, dict[str, Any]]:
  """(name, settings) of the scale chosen by $CERTJAX_NOTEBOOK_SCALE (default 'smoke').

  Args:
    settings: scale name -> that scale's settings (the notebook's first cell).
    scale: the name; None or '' reads $CERTJAX_NOTEBOOK_SCALE.

  Raises:
    ValueError: for a scale the notebook does not define, naming the accepted ones.
  """
  name = scale or os.environ.get(SCALE_ENV, "") or DEFAULT_SCALE
  if name not in settings:
    raise ValueError(f"{SCALE_ENV}={name!r} is not a scale of this notebook; accepted: "
                     f"{', '.join(settings)}.")
  return name, dict(settings[name])


def plot_style() -> None:
  """Compact, readable matplotlib defaults for the notebooks.

  rcParams apply to pyplot figures and to the bare `Figure`s of
  certjax.evaluation.plots and benchmarks.reports alike.
  """
  import matplotlib as mpl  # pylint: disable=import-outside-toplevel
  mpl.rcParams.update({
      "figure.dpi": 80, "savefig.dpi": 80, "axes.grid": True, "grid.alpha": 0.3,
      "axes.spines.top": False, "axes.spines.right": False, "legend.fontsize": 8,
      "axes.titlesize": 10, "figure.titlesize": 11,
  })


# ----------------------------------------------------------------------------
# Published numbers drawn beside ours.


class Anchor(NamedTuple):
  """A published figure: what to draw, and where it comes from.

  Attributes:
    label: legend text.
    kind: 'smoothing' (L2 radius, certified accuracy) or 'verified' (L-inf
      eps, verified accuracy).
    x: radii or eps.
    accuracy: fractions in [0, 1], one per x.
    source: the citation, as stated where the number comes from.
    sigma: the noise level of a smoothing anchor (its panel); None for 'verified'.
    settings: what the publication states about its evaluation, shown in the
      certification table's columns (images, n, alpha); {} when unstated.
  """
  label: str
  kind: str
  x: tuple[float, ...]
  accuracy: tuple[float, ...]
  source: str
  sigma: float | None = None
  settings: Mapping[str, Any] = {}

  @property
  def reference(self):
    """The figure as a `certjax.evaluation.plots.Reference`, for the library's plots."""
    # Imported here: this module is imported before the notebook puts the
    # checkout on sys.path, and certjax.evaluation pulls in JAX.
    from certjax.evaluation.plots import Reference  # pylint: disable=import-outside-toplevel
    return Reference(self.label, self.x, self.accuracy, self.sigma)


SMOOTHING_ANCHORS = (
    Anchor(
        label="Gaussian aug., published (MNIST, full test set)", kind="smoothing",
        x=(0.0, 0.25, 0.5, 0.75), accuracy=(0.992, 0.985, 0.967, 0.931), sigma=0.25,
        settings={"images": 10_000, "n": 100_000, "alpha": 0.001},
        source=("MNIST Gaussian-augmentation baseline (Cohen et al. 2019 training) at "
                "sigma 0.25: 99.2 / 98.5 / 96.7 / 93.1 % certified at L2 radius "
                "0 / 0.25 / 0.5 / 0.75, full 10,000-image test set, N = 100,000, "
                "alpha = 0.001. Figures as quoted in certjax issue #6; they fit the "
                "Gaussian baselines reported beside consistency regularisation "
                "(Jeong & Shin, NeurIPS 2020), but the table was not re-checked here")),
)

VERIFY_ANCHORS = (
    # Both quoted from the config docstrings, which state the published figures.
    Anchor(
        label="IBP large CNN, published (Gowal et al. 2018)", kind="verified",
        x=(0.1,), accuracy=(1 - 0.0292,),
        source=("configs/mnist_ibp.py: 'Gowal et al. report IBP-verified test error "
                "2.92% at eps 0.1 (nominal error 1.06%) with the large model'")),
    Anchor(
        label="CROWN-IBP large CNN, published (Zhang et al. 2020)", kind="verified",
        x=(0.3,), accuracy=(1 - 0.0702,),
        source=("configs/mnist_crown_ibp.py: 'Zhang et al. report 7.02% IBP-verified "
                "test error at eps 0.3 with the large model'")),
)


def references(anchors: Iterable[Anchor]) -> list:
  """The `plots.Reference`s of `anchors`, for certjax.evaluation.plots."""
  return [a.reference for a in anchors]


def _percent(value: float) -> str:
  return f"{100 * value:.2f}".rstrip("0").rstrip(".")


def anchors_table(anchors: Iterable[Anchor]):
  """A DataFrame of the published numbers and their sources, one row per anchor."""
  import pandas as pd  # pylint: disable=import-outside-toplevel
  rows = [{"published": a.label,
           "at": ("L2 radius " if a.kind == "smoothing" else "L-inf eps ")
                 + " / ".join(f"{x:g}" for x in a.x),
           "accuracy %": " / ".join(_percent(acc) for acc in a.accuracy),
           "source": a.source} for a in anchors]
  return pd.DataFrame(rows, columns=["published", "at", "accuracy %", "source"])


# ----------------------------------------------------------------------------
# Tables of result files (the rows come from certjax.evaluation).

VERIFY_COLUMNS = ("run", "model", "objective", "method", "eps", "verified_accuracy",
                  "clean_accuracy", "images", "seconds", "workdir")


def certification_table(runs: Sequence[Any], radii: Sequence[float] = (
    0.0, 0.25, 0.5, 0.75, 1.0), anchors: Iterable[Anchor] = ()):
  """Certified accuracy (%) at `radii`, ACR and settings: one row per run, then per anchor.

  Args:
    runs: `certjax.evaluation.certified.CertifyRecord`s (`certified.read_results`).
    radii: the radii of the 'r=...' columns.
    anchors: published smoothing figures; each gets a row with the radii it
      states (NaN elsewhere) and its `settings`, and an empty ACR.

  Returns:
    A DataFrame with the columns of `certified.certification_rows`.
  """
  import pandas as pd  # pylint: disable=import-outside-toplevel
  from certjax.evaluation import certified  # pylint: disable=import-outside-toplevel
  rows = certified.certification_rows(runs, radii)
  for a in anchors:
    published = dict(zip(a.x, a.accuracy))
    row = {"run": a.label, "objective": "gaussian (published)", "sigma": a.sigma}
    row.update({f"r={r:g}": 100 * published[r] if r in published else float("nan")
                for r in radii})
    row.update({"ACR": float("nan"), "abstain %": float("nan"),
                "images": a.settings.get("images"), "n": a.settings.get("n"),
                "alpha": a.settings.get("alpha"), "s/image": float("nan"),
                "source": a.source})
    rows.append(row)
  return pd.DataFrame(rows)


def verification_frame(paths: Sequence[str] | str):
  """`certjax.evaluation.verified.result_rows(paths)` as a DataFrame (columns even when empty)."""
  import pandas as pd  # pylint: disable=import-outside-toplevel
  from certjax.evaluation import verified  # pylint: disable=import-outside-toplevel
  return pd.DataFrame(verified.result_rows(paths), columns=list(VERIFY_COLUMNS))
