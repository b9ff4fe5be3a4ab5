"""Every picture of an evaluation result: drawn on a bare matplotlib `Figure`.

The evaluators save these next to their JSON and Markdown files; the
notebooks display the same figures. A bare `Figure` renders with Agg without
touching pyplot's global backend (which would hijack a notebook's inline
display); a notebook shows it by returning it from a cell.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from certjax.smoothing import stats


class Reference(NamedTuple):
  """Published (or otherwise external) figures drawn beside ours.

  Attributes:
    label: legend text.
    x: radii or eps.
    accuracy: fractions in [0, 1], one per x.
    sigma: the noise level of a smoothing reference (its panel), else None.
  """
  label: str
  x: Sequence[float]
  accuracy: Sequence[float]
  sigma: float | None = None


def _figure(width: float, height: float):
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  return Figure(figsize=(width, height), dpi=100)


def _draw_references_and_caps(ax, references: Iterable[Reference],
                              caps: Mapping[str, float]) -> None:
  """Published curves dashed black; the largest certifiable radii dotted grey."""
  for ref in references:
    ax.plot(ref.x, ref.accuracy, "k--o", markersize=4, linewidth=1, label=ref.label)
  for label, cap in caps.items():
    ax.axvline(cap, color="gray", linestyle=":", linewidth=1, label=label)


def _radius_axes(ax, norm: str, right: float, legend_size: int) -> None:
  ax.set_xlabel(f"{norm} radius (pixels in [0, 1])")
  ax.set_xlim(0.0, right)
  ax.set_ylim(0.0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower left", fontsize=legend_size)


def certified_accuracy_figure(curves: Mapping[str, Any], *, norm: str = "L2",
                              max_radius: float | None = None,
                              radius_caps: Mapping[str, float] | None = None,
                              references: Iterable[Reference] = (),
                              title: str | None = None):
  """Certified accuracy against radius, one line per run.

  Args:
    curves: run name -> results with `.radius` and `.correct`
      (`certjax.smoothing.analysis.CertifyResults`).
    norm: axis label of the radius ('L2', 'L1', ...).
    max_radius: right end of the x axis (default: largest radius + 5%).
    radius_caps: label -> the largest radius a run's n can certify, drawn as a
      dotted vertical line (`stats.max_certifiable_radius`).
    references: published curves, dashed black.
    title: the plot title.

  Returns:
    The `Figure`.
  """
  if not curves:
    raise ValueError("certified_accuracy_figure needs at least one curve.")
  caps = dict(radius_caps or {})
  references = list(references)
  largest = max([float(r.radius.max(initial=0.0)) for r in curves.values()]
                + [max(r.x) for r in references] + list(caps.values()))
  right = max_radius if max_radius is not None else max(largest * 1.05, 0.1)
  grid = np.linspace(0.0, right, 400)
  fig = _figure(6, 4)
  ax = fig.add_subplot()
  for name, results in curves.items():
    ax.plot(grid, stats.certified_accuracy(results.radius, results.correct, grid), label=name)
  _draw_references_and_caps(ax, references, caps)
  _radius_axes(ax, norm, right, legend_size=8)
  ax.set_ylabel("certified accuracy")
  if title:
    ax.set_title(title, fontsize=10)
  fig.tight_layout()
  return fig


def certified_accuracy_panels(runs: Sequence[Any], references: Iterable[Reference] = (),
                              max_radius: float | None = None):
  """Certified accuracy against L2 radius, one panel per sigma, one colour per objective.

  Args:
    runs: `certjax.evaluation.certified.CertifyRecord`s (`read_results`).
    references: published curves, drawn in the panel of their sigma.
    max_radius: right end of the x axes.

  Returns:
    The `Figure`.
  """
  references = list(references)
  sigmas = sorted({r.sigma for r in runs} | {r.sigma for r in references
                                             if r.sigma is not None})
  if not sigmas:
    raise ValueError("certified_accuracy_panels needs at least one run or reference.")
  largest = max([float(r.results.radius.max(initial=0.0)) for r in runs]
                + [max(r.x) for r in references] + [0.1])
  right = max_radius or 1.05 * largest
  grid = np.linspace(0.0, right, 300)
  fig = _figure(4.2 * len(sigmas), 3.4)
  axes = fig.subplots(1, len(sigmas), sharey=True, squeeze=False)[0]
  objectives = sorted({r.objective for r in runs})
  colors = {o: f"C{i}" for i, o in enumerate(objectives)}
  for ax, sigma in zip(axes, sigmas):
    caps = set()
    for run in (r for r in runs if r.sigma == sigma):
      settings = run.record.get("settings", {})
      ax.plot(grid, stats.certified_accuracy(run.results.radius, run.results.correct, grid),
              color=colors[run.objective],
              label=f"{run.label} ({run.results.radius.size} img, n={settings.get('n', '?')})")
      if settings.get("n") and settings.get("alpha"):
        caps.add((int(settings["n"]), float(settings["alpha"]),
                  str(settings.get("noise", "gaussian"))))
    _draw_references_and_caps(
        ax, [r for r in references if r.sigma == sigma],
        {f"largest radius n={n:,} can certify": stats.max_certifiable_radius(sigma, n, alpha,
                                                                            noise)
         for n, alpha, noise in sorted(caps)})
    ax.set_title(f"sigma = {sigma:g}")
    _radius_axes(ax, "L2", right, legend_size=7)
  axes[0].set_ylabel("certified accuracy")
  fig.tight_layout()
  return fig


def robust_accuracy_figure(result: Any, title: str | None = None):
  """Robust accuracy against eps after each attack of the sequence (a `RobustAccuracyResult`).

  Each line is the accuracy left after that attack and all before it, so the
  lowest line is the reported robust accuracy; eps = 0 starts at the clean
  accuracy.
  """
  fig = _figure(6, 4)
  ax = fig.add_subplot()
  eps = [r.eps for r in result.per_eps]
  for a, name in enumerate(result.attack_names):
    ax.plot(eps, [r.robust_accuracy_after[a][1] for r in result.per_eps], "-o", markersize=4,
            label=f"after {name}")
  ax.axhline(result.clean_accuracy, color="k", linestyle="--", linewidth=1,
             label=f"clean {100 * result.clean_accuracy:.1f}%")
  ax.set_xlabel(f"{result.norm} eps (pixels in [0, 1])")
  ax.set_ylabel("robust accuracy")
  ax.set_ylim(0.0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(title or f"Robust accuracy on {result.num_examples} examples", fontsize=10)
  fig.tight_layout()
  return fig


def verified_accuracy_figure(summary: Mapping[str, Any]):
  """Verified accuracy against L-inf eps, one line per method (a 'verified' summary)."""
  fig = _figure(6, 4)
  ax = fig.add_subplot()
  styles = {"ibp": "-o", "crown_ibp": "--s", "crown": ":^"}
  clean = float(summary["clean_accuracy"])
  for method in summary["methods"]:
    rows = sorted((r for r in summary["results"] if r["method"] == method),
                  key=lambda r: r["eps"])
    if rows:
      ax.plot([0.0] + [r["eps"] for r in rows], [clean] + [r["verified_accuracy"] for r in rows],
              styles.get(method, "-x"), markersize=4, label=method)
  ax.set_xlabel("L-inf eps (pixels in [0, 1])")
  ax.set_ylabel("verified accuracy")
  ax.set_ylim(0.0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(f"{summary.get('model')} on {summary.get('num_images')} {summary.get('dataset')} "
               f"images, checkpoint {summary.get('checkpoint_step')}", fontsize=10)
  fig.tight_layout()
  return fig


def verified_accuracy_comparison(rows: Sequence[Mapping[str, Any]],
                                 references: Iterable[Reference] = ()):
  """Verified accuracy against eps for several runs: a colour per run, a style per method.

  Args:
    rows: dicts with 'run', 'method', 'eps', 'verified_accuracy' and
      'clean_accuracy' (`certjax.evaluation.verified.result_rows`).
    references: published figures, black markers.
  """
  fig = _figure(8.5, 3.8)
  ax = fig.add_subplot()
  styles = {"ibp": "-o", "crown_ibp": "--s", "crown": ":^"}
  runs = list(dict.fromkeys(r["run"] for r in rows))
  for i, run in enumerate(runs):
    mine = [r for r in rows if r["run"] == run]
    clean = float(mine[0]["clean_accuracy"])
    for method in dict.fromkeys(r["method"] for r in mine):
      part = sorted((r for r in mine if r["method"] == method), key=lambda r: r["eps"])
      ax.plot([0.0] + [r["eps"] for r in part], [clean] + [r["verified_accuracy"] for r in part],
              styles.get(method, "-x"), color=f"C{i}", markersize=4, label=f"{run}: {method}")
  for marker, ref in zip("*Dvp", references):
    ax.plot(ref.x, ref.accuracy, marker, color="k", markersize=9, linestyle="none",
            label=ref.label)
  ax.set_xlabel("L-inf eps (pixels in [0, 1])")
  ax.set_ylabel("verified accuracy")
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
  fig.tight_layout()
  return fig


def _tab20() -> list[Any]:
  from matplotlib import colormaps  # pylint: disable=import-outside-toplevel
  return [colormaps["tab20"](i) for i in range(20)]


def membership_roc_figure(curves: Mapping[str, Any], *, title: str = ""):
  """The log-log ROC of membership attacks on one chart, as in the LiRA paper.

  Args:
    curves: attack name -> (fpr, tpr, auc).
    title: the chart's title.
  """
  fig = _figure(6.0, 5.0)
  ax = fig.add_subplot(1, 1, 1)
  floor = 1e-5
  # Up to 20 distinguishable colours (tab20), then dashes: 11 attacks by default.
  colours = [f"C{i}" for i in range(10)] if len(curves) <= 10 else [
      plt_colour for plt_colour in _tab20()]
  for i, (name, (fpr, tpr, auc)) in enumerate(curves.items()):
    ax.plot(np.maximum(fpr, floor), np.maximum(tpr, floor), linewidth=1.3,
            color=colours[i % len(colours)], linestyle="-" if i < len(colours) else "--",
            label=f"{name} (AUC {auc:.3f})")
  ax.plot([floor, 1], [floor, 1], color="gray", linestyle="--", linewidth=1, label="chance")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlim(1e-4, 1)
  ax.set_ylim(1e-4, 1)
  ax.set_xlabel("false positive rate")
  ax.set_ylabel("true positive rate")
  ax.set_title(title or "membership inference")
  ax.grid(True, which="major", alpha=0.3)
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  return fig


def property_inference_figure(rows: Sequence[Mapping[str, Any]], *, title: str = ""):
  """Held-out accuracy of each property meta-classifier beside chance (bars)."""
  fig = _figure(5.5, 3.6)
  ax = fig.add_subplot(1, 1, 1)
  done = [r for r in rows if "accuracy" in r]
  names = [r["kind"] for r in done]
  ax.bar(names, [r["accuracy"] for r in done], color="C0", label="held-out accuracy")
  for i, r in enumerate(done):
    ax.hlines(r["chance"], i - 0.4, i + 0.4, colors="k", linestyles="--",
              label="chance" if i == 0 else None)
    ax.text(i, r["accuracy"] + 0.02, f"{100 * r['accuracy']:.0f}%", ha="center", fontsize=8)
  ax.set_ylim(0, 1.08)
  ax.set_ylabel("accuracy")
  ax.set_title(title or "property inference", fontsize=9)
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  return fig


def inversion_grid_figure(rows: Sequence[tuple[str, Any, Sequence[str]]], *, title: str = "",
                          max_columns: int = 16):
  """Images in labelled rows: class inversions, and reconstructions below their originals.

  Args:
    rows: (label, images [n, H, W, C] in [0, 1], one caption per image) per
      row, drawn top to bottom; a row shows its first `max_columns` images.
      One channel is drawn in grey, three as RGB.
    title: the figure's title.
    max_columns: the most images drawn per row.

  Returns:
    The `Figure`.
  """
  if not rows:
    raise ValueError("inversion_grid_figure needs at least one row of images.")
  columns = min(max(len(images) for _, images, _ in rows), max_columns)
  fig = _figure(1.1 * columns + 1.4, 1.25 * len(rows) + 0.5)
  axes = fig.subplots(len(rows), columns, squeeze=False)
  for r, (label, images, captions) in enumerate(rows):
    images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)  # display only
    for c in range(columns):
      ax = axes[r, c]
      ax.set_xticks([])
      ax.set_yticks([])
      if c >= min(len(images), max_columns):
        ax.axis("off")
        continue
      image = images[c]
      if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
      else:
        ax.imshow(image)
      if c < len(captions):
        ax.set_title(captions[c], fontsize=7)
    axes[r, 0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return fig


def extraction_figure(curves: Mapping[str, tuple[Sequence[int], Sequence[float], Sequence[float]]],
                      square: Mapping[str, float], *, victim_accuracy: float,
                      square_clean_accuracy: float | None = None, square_label: str = "",
                      title: str = ""):
  """Model extraction per output mode: Knockoff fidelity and accuracy against budget, Square.

  Args:
    curves: output mode -> (budgets, copy accuracy, copy fidelity), one line
      each in the fidelity and accuracy panels (log budget axis); {} omits them.
    square: output mode -> Square's robust accuracy through that mode (bars);
      {} omits the panel.
    victim_accuracy: the victim's test accuracy (dashed in the accuracy panel).
    square_clean_accuracy: the attacked images' clean accuracy (dashed).
    square_label: the Square panel's title (norm, eps, queries).
    title: the figure's title.

  Returns:
    The `Figure`.
  """
  panels = (2 if curves else 0) + (1 if square else 0)
  if not panels:
    raise ValueError("extraction_figure needs Knockoff curves or Square results.")
  fig = _figure(4.2 * panels + 0.4, 3.8)
  axes = fig.subplots(1, panels, squeeze=False)[0]
  if curves:
    for which, ax in zip(("fidelity", "accuracy"), axes[:2]):
      for i, (name, (budgets, accuracy, fidelity)) in enumerate(curves.items()):
        # Dashes and markers differ too: modes that answer alike (top-1 and
        # label give Knockoff the same one-hot targets) draw the same line.
        ax.plot(budgets, fidelity if which == "fidelity" else accuracy,
                marker="os^vD"[i % 5], markersize=4, fillstyle="none",
                linestyle=("-", "--", "-.", ":")[i % 4], color=f"C{i % 10}", label=name)
      if which == "accuracy":
        ax.axhline(victim_accuracy, color="k", linestyle="--", linewidth=1,
                   label=f"victim ({100 * victim_accuracy:.1f}%)")
      ax.set_xscale("log")
      ax.set_ylim(0.0, 1.02)
      ax.set_xlabel("victim queries (Knockoff budget)")
      ax.set_ylabel(f"copy {which}" + (" (agreement with the victim)"
                                       if which == "fidelity" else " (true labels)"))
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7, loc="lower right")
  if square:
    ax = axes[-1]
    names = list(square)
    values = [square[n] for n in names]
    ax.bar(range(len(names)), values, color=[f"C{i % 10}" for i in range(len(names))])
    for i, value in enumerate(values):
      ax.text(i, value + 0.02, f"{100 * value:.0f}%", ha="center", fontsize=8)
    if square_clean_accuracy is not None:
      ax.axhline(square_clean_accuracy, color="k", linestyle="--", linewidth=1,
                 label=f"clean ({100 * square_clean_accuracy:.0f}%)")
      ax.legend(fontsize=7, loc="upper left")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, fontsize=7, rotation=20)
    ax.set_ylim(0.0, 1.1)
    ax.set_ylabel("robust accuracy through the interface")
    ax.set_title(square_label or "Square Attack", fontsize=8)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return fig


def defence_accuracy_figure(rows: Sequence[Mapping[str, Any]], eps_list: Sequence[float], *,
                            norm: str = "linf", title: str = ""):
  """Accuracy against eps per defence: the naive attack dashed, the adaptive one solid.

  Each row starts at its clean accuracy (eps 0). A wide gap between a row's
  dashed and solid lines is the accuracy the defence owed to obfuscated
  gradients (Athalye et al. 2018).

  Args:
    rows: the 'defences' evaluator's rows (clean_accuracy, naive, adaptive).
    eps_list: the radii.
    norm: for the axis label.
    title: the chart's title.
  """
  fig = _figure(7.5, 4.8)
  ax = fig.add_subplot(1, 1, 1)
  colours = [f"C{i}" for i in range(10)] if len(rows) <= 10 else _tab20()
  xs = [0.0] + [float(e) for e in eps_list]
  for i, row in enumerate(rows):
    colour = colours[i % len(colours)]
    for kind, style in (("naive", "--"), ("adaptive", "-")):
      ys = [row["clean_accuracy"]] + [row[kind][f"{float(e):g}"] for e in eps_list]
      ax.plot(xs, ys, linestyle=style, marker="o", markersize=3, color=colour,
              label=row["defence"] if kind == "adaptive" else None)
  ax.plot([], [], "k--", label="naive attack")
  ax.plot([], [], "k-", label="adaptive attack")
  ax.set_xlabel(f"{norm} eps (pixels in [0, 1])")
  ax.set_ylabel("accuracy")
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
  ax.set_title(title or "defences under naive and adaptive attacks", fontsize=9)
  fig.tight_layout()
  return fig


def backdoor_figure(clean: Any, triggered: Any, reversed_triggers: Any = None, *,
                    title: str = "", target: int | None = None):
  """A clean image, its triggered copy and their difference; then Neural Cleanse's masks.

  Args:
    clean: [H, W, C] image in [0, 1].
    triggered: the same image with the trigger (None for label flipping).
    reversed_triggers: (masks [K, H, W], anomaly indices [K]) of Neural
      Cleanse, or None.
    title: the figure's title.
    target: the backdoor's target class (its mask is framed in red).
  """
  num_classes = 0 if reversed_triggers is None else len(reversed_triggers[0])
  columns = max(3, num_classes)
  rows = 1 + (num_classes > 0)
  fig = _figure(1.3 * columns, 1.6 * rows + 0.4)

  def show(position, image, label, cmap="gray", frame=None):
    ax = fig.add_subplot(rows, columns, position)
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    ax.imshow(np.clip(image, 0, 1), cmap=cmap, vmin=0, vmax=1)
    ax.set_title(label, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    if frame:
      for spine in ax.spines.values():
        spine.set_edgecolor(frame)
        spine.set_linewidth(2)

  show(1, clean, "clean")
  if triggered is not None:
    show(2, triggered, "triggered")
    show(3, np.abs(np.asarray(triggered) - np.asarray(clean)) * 4, "|difference| x 4")
  if num_classes:
    masks, index = reversed_triggers
    for k in range(num_classes):
      show(columns + k + 1, masks[k], f"class {k}\nanomaly {float(index[k]):.2f}",
           cmap="magma", frame="red" if target == k else None)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return fig


def backdoor_table_figure(rows: Sequence[Mapping[str, Any]], defences: Sequence[str]):
  """BackdoorBench's attack x defence table as two heat maps: ASR and CA, in %.

  Args:
    rows: the table's rows, each {'attack', 'rate', 'cells': {defence:
      {'clean_accuracy', 'asr'}}} (`certjax.training.backdoor_table`).
    defences: the columns, in order.
  """
  labels = [f"{row['attack']} {100 * row['rate']:g}%" for row in rows]
  fig = _figure(2.0 + 1.2 * len(defences), 1.6 + 0.45 * len(rows))
  for panel, (key, title, cmap) in enumerate((("asr", "attack success rate (%)", "Reds"),
                                               ("clean_accuracy", "clean accuracy (%)",
                                                "Greens"))):
    values = np.full((len(rows), len(defences)), np.nan)
    for i, row in enumerate(rows):
      for j, defence in enumerate(defences):
        value = row["cells"].get(defence, {}).get(key)
        if value is not None:
          values[i, j] = 100 * value
    ax = fig.add_subplot(1, 2, panel + 1)
    ax.imshow(values, cmap=cmap, vmin=0, vmax=100, aspect="auto")
    for i in range(len(rows)):
      for j in range(len(defences)):
        text = "n/a" if np.isnan(values[i, j]) else f"{values[i, j]:.1f}"
        ax.text(j, i, text, ha="center", va="center", fontsize=6,
                color="white" if values[i, j] > 60 else "black")
    ax.set_xticks(range(len(defences)))
    ax.set_xticklabels(defences, rotation=40, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels if panel == 0 else [], fontsize=7)
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  return fig


def poison_gallery_figure(examples: Sequence[Mapping[str, Any]], *, title: str = ""):
  """One row per attack: a clean eval image, the same with the attack's trigger, and
  one recorded poisoned training example beside its clean original.

  Args:
    examples: per attack {'name', 'clean' [H, W, C], 'triggered' (or None),
      'poison' and 'original' [H, W, C] (or None), 'poison_label',
      'original_label'}, images in [0, 1].
    title: the figure's title.
  """
  fig = _figure(6.5, 1.7 * len(examples) + 0.5)
  columns = 4

  def show(row, column, image, label):
    ax = fig.add_subplot(len(examples), columns, row * columns + column + 1)
    ax.set_xticks([])
    ax.set_yticks([])
    if column == 0:
      ax.set_ylabel(examples[row]["name"], fontsize=8)
    if image is None:
      for spine in ax.spines.values():
        spine.set_visible(False)
      ax.set_title(label, fontsize=7)
      return
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    ax.imshow(np.clip(image, 0, 1), cmap="gray", vmin=0, vmax=1)
    ax.set_title(label, fontsize=7)

  for row, example in enumerate(examples):
    show(row, 0, example["clean"], "clean test image")
    show(row, 1, example["triggered"],
         "with the trigger" if example["triggered"] is not None else "no trigger")
    show(row, 2, example["original"],
         "" if example["original"] is None else f"training image, label {example['original_label']}")
    show(row, 3, example["poison"],
         "" if example["poison"] is None else f"as poisoned, label {example['poison_label']}")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return fig
