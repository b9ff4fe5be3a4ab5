r"""Executes the notebooks at the `small` scale into Markdown copies a reader can open.

The notebooks are committed without outputs; notebooks/rendered/ holds an
executed copy of each, so that anyone browsing the repository sees the
tables and plots without running anything:

    notebooks/rendered/<name>.md          the notebook's cells and outputs
    notebooks/rendered/<name>_files/*.png its plots, one file per image output

Regenerate all of them, from the repository root, after editing a notebook
(tests/notebooks/test_rendered.py fails until you do):

    .venv/bin/python notebooks/render.py

`notebooks/render.py 02_certified_accuracy` renders one; `--scale smoke`
renders at CI's scale (quick, for trying the renderer itself; the test
accepts only `small` copies).

Why Markdown and PNG files rather than an executed .ipynb: GitHub renders
Markdown reliably and at once, while its notebook viewer fails on larger
notebooks now and then; the copies diff as text in a review (an executed
notebook embeds every plot as base64 in JSON, beside volatile metadata); and
they read in any editor. DataFrames keep pandas' HTML tables (GitHub renders
HTML tables in Markdown; the `<style>` blocks it would drop are removed).

Each code cell is written after an HTML comment naming its cell id, and
each copy records a SHA-256 of the notebook's cells: the test compares both
with the notebooks as they are now. Paths of the scratch directory and of
the checkout are replaced by `<workdir>` and `<repo>`, so that re-rendering
only changes what the notebook computed.

Execution is what tests/notebooks/test_notebooks.py does at `smoke`: a fresh
python3 kernel (nbclient) per notebook, started in notebooks/, with a
scratch $CERTJAX_NOTEBOOK_WORKDIR; a cell that raises stops the render and
leaves the previous copy of that notebook in place.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import glob
import hashlib
import importlib.metadata
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any, Iterable

import nbformat

NOTEBOOK_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(NOTEBOOK_DIR)
RENDERED_DIR = os.path.join(NOTEBOOK_DIR, "rendered")
RENDER_SCALE = "small"
CELL_TIMEOUT_S = 3600
DIGEST_MARK = "notebook-cells-sha256:"
CELL_MARK = "<!-- code cell {} -->"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_STYLE = re.compile(r"<style[^>]*>.*?</style>\s*", re.DOTALL)


def notebook_names() -> list[str]:
  """The stems of notebooks/*.ipynb, sorted."""
  return sorted(os.path.splitext(os.path.basename(p))[0]
                for p in glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))


def cells_digest(nb: Any) -> str:
  """SHA-256 over every cell's id, type and source: changes with any edit of the notebook."""
  h = hashlib.sha256()
  for cell in nb.cells:
    for part in (cell.get("id", ""), cell.cell_type, cell.source):
      h.update(part.encode())
      h.update(b"\0")
  return h.hexdigest()


def code_blocks(markdown: str) -> list[tuple[str, str]]:
  """(cell id, source) of every code cell written into a rendered copy, in order."""
  pattern = re.compile(r"^<!-- code cell (\S+) -->\n(`{3,})python\n(.*?)\n\2$",
                       re.MULTILINE | re.DOTALL)
  return [(m.group(1), m.group(3)) for m in pattern.finditer(markdown)]


def _fence(text: str) -> str:
  """A backtick fence longer than any backtick run inside `text`."""
  longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
  return "`" * max(3, longest + 1)


def _fenced(text: str, info: str = "text") -> str:
  text = text.rstrip("\n")
  fence = _fence(text)
  return f"{fence}{info}\n{text}\n{fence}"


def _replace(text: str, replacements: Iterable[tuple[str, str]]) -> str:
  for old, new in replacements:
    text = text.replace(old, new)
  return text


def _html(html: str, replacements: Iterable[tuple[str, str]]) -> str:
  html = _STYLE.sub("", html)
  html = _replace(html, [(old, new.replace("<", "&lt;").replace(">", "&gt;"))
                         for old, new in replacements])
  # A blank line would end the Markdown HTML block and show the rest as text.
  return "\n".join(line for line in html.splitlines() if line.strip())


def to_markdown(nb: Any, name: str, replacements: Iterable[tuple[str, str]] = (),
                header: str = "") -> tuple[str, dict[str, bytes]]:
  """An executed notebook as Markdown, and its images.

  Args:
    nb: the executed notebook.
    name: its stem; images are linked as `<name>_files/<cell id>-<k>.png`.
    replacements: (text, placeholder) pairs applied to every output.
    header: Markdown put first, after the marker comments.

  Returns:
    (markdown, images): the text, and file name -> PNG bytes.
  """
  replacements = list(replacements)
  parts = [f"<!-- Rendered by notebooks/render.py from notebooks/{name}.ipynb: do not edit. -->",
           f"<!-- {DIGEST_MARK} {cells_digest(nb)} -->", ""]
  if header:
    parts += [header, ""]
  images = {}
  for cell in nb.cells:
    if cell.cell_type == "markdown":
      parts += [cell.source, ""]
      continue
    if cell.cell_type != "code":
      continue
    fence = _fence(cell.source)
    parts += [CELL_MARK.format(cell.id), f"{fence}python\n{cell.source}\n{fence}", ""]
    streams: list[list[str]] = []  # consecutive writes to one stream become one block
    last_stream = None
    for output in cell.get("outputs", []):
      kind = output.output_type
      if kind == "stream":
        text = _replace(_ANSI.sub("", output.text), replacements)
        if last_stream == output.name:
          streams[-1].append(text)
        else:
          streams.append([text])
        last_stream = output.name
        continue
      if streams:
        parts += [_fenced("".join(s)) for s in streams] + [""]
        streams, last_stream = [], None
      if kind in ("display_data", "execute_result"):
        data = output.get("data", {})
        if "image/png" in data:
          file = f"{cell.id}-{sum(f.startswith(cell.id + '-') for f in images) + 1}.png"
          images[file] = base64.b64decode(data["image/png"])
          parts += [f"![output of cell {cell.id}]({name}_files/{file})", ""]
        elif "text/html" in data:
          parts += [_html(data["text/html"], replacements), ""]
        elif "text/markdown" in data:
          parts += [_replace(data["text/markdown"], replacements), ""]
        elif "text/plain" in data:
          parts += [_fenced(_replace(_ANSI.sub("", data["text/plain"]), replacements)), ""]
      elif kind == "error":
        parts += [_fenced(_ANSI.sub("", "\n".join(output.get("traceback", [])))), ""]
    if streams:
      parts += [_fenced("".join(s)) for s in streams] + [""]
  return "\n".join(parts).rstrip("\n") + "\n", images


def execute(name: str, scale: str, workdir: str) -> tuple[Any, float]:
  """Runs notebooks/<name>.ipynb top to bottom at `scale`; returns (notebook, seconds)."""
  import nbclient  # pylint: disable=import-outside-toplevel
  nb = nbformat.read(os.path.join(NOTEBOOK_DIR, f"{name}.ipynb"), as_version=4)
  # The kernel inherits this environment: the scale, a scratch workdir, and
  # nothing that points the notebooks at results other than their own.
  saved = dict(os.environ)
  os.environ.update({"CERTJAX_NOTEBOOK_SCALE": scale, "CERTJAX_NOTEBOOK_WORKDIR": workdir,
                     "MPLBACKEND": "module://matplotlib_inline.backend_inline"})
  for variable in ("CERTJAX_RESULT_WORKDIRS", "CERTJAX_BENCHMARK_RESULTS"):
    os.environ.pop(variable, None)
  start = time.perf_counter()
  try:
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": NOTEBOOK_DIR}}).execute()
  finally:
    os.environ.clear()
    os.environ.update(saved)
  return nb, time.perf_counter() - start


def _header(name: str, scale: str, seconds: float) -> str:
  try:
    jax_version = importlib.metadata.version("jax")
  except importlib.metadata.PackageNotFoundError:
    jax_version = "?"
  date = datetime.date.today().isoformat()
  return (f"> **Executed copy** of [`{name}.ipynb`](../{name}.ipynb) at scale `{scale}`, "
          f"{date}, jax {jax_version}, {os.cpu_count()} CPU cores, {seconds:.0f} s "
          f"including kernel start. Regenerate with `.venv/bin/python notebooks/render.py` "
          f"(notebooks/README.md); the notebook itself is committed without outputs.")


def render(name: str, scale: str = RENDER_SCALE) -> float:
  """Executes one notebook and writes its rendered copy; returns the execution seconds."""
  workdir = tempfile.mkdtemp(prefix="certjax_render_")
  try:
    nb, seconds = execute(name, scale, workdir)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  replacements = [(os.path.realpath(workdir), "<workdir>"), (workdir, "<workdir>"),
                  (ROOT, "<repo>")]
  text, images = to_markdown(nb, name, replacements, _header(name, scale, seconds))
  os.makedirs(RENDERED_DIR, exist_ok=True)
  image_dir = os.path.join(RENDERED_DIR, f"{name}_files")
  shutil.rmtree(image_dir, ignore_errors=True)  # no image of an earlier render stays behind
  if images:
    os.makedirs(image_dir)
  for file, data in images.items():
    with open(os.path.join(image_dir, file), "wb") as f:
      f.write(data)
  with open(os.path.join(RENDERED_DIR, f"{name}.md"), "w") as f:
    f.write(text)
  return seconds


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("names", nargs="*", help="notebook stems (default: every notebook)")
  parser.add_argument("--scale", default=RENDER_SCALE,
                      help=f"CERTJAX_NOTEBOOK_SCALE to execute at (default {RENDER_SCALE!r})")
  args = parser.parse_args(argv)
  names = args.names or notebook_names()
  unknown = sorted(set(names) - set(notebook_names()))
  if unknown:
    parser.error(f"no notebook {', '.join(unknown)}; have {', '.join(notebook_names())}")
  total = time.perf_counter()
  for name in names:
    print(f"rendering {name} at {args.scale!r} ...", flush=True)
    seconds = render(name, args.scale)
    print(f"  {seconds:.0f} s -> {os.path.relpath(RENDERED_DIR, ROOT)}/{name}.md", flush=True)
  print(f"done in {time.perf_counter() - total:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
