"""The rendered copies in notebooks/rendered/ are of the notebooks as they are now.

notebooks/render.py executes each notebook at the `small` scale into
notebooks/rendered/<name>.md (+ <name>_files/*.png). A notebook edited
without re-rendering fails here: its code cells differ from the copy's, or
(for any other edit) the digest of its cells does. Nothing is executed.
"""

from __future__ import annotations

import importlib.util
import os
import re

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
RERENDER = "re-render with `.venv/bin/python notebooks/render.py {}`"


def _load_render():
  spec = importlib.util.spec_from_file_location("notebook_render",
                                                os.path.join(NOTEBOOK_DIR, "render.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


render = _load_render()
NAMES = render.notebook_names()


def _notebook(name):
  return nbformat.read(os.path.join(NOTEBOOK_DIR, f"{name}.ipynb"), as_version=4)


def _rendered(name) -> str:
  path = os.path.join(render.RENDERED_DIR, f"{name}.md")
  if not os.path.exists(path):
    pytest.fail(f"notebooks/rendered/{name}.md is missing: {RERENDER.format(name)}")
  with open(path) as f:
    return f.read()


def test_every_notebook_is_rendered():
  assert NAMES == ["01_tour", "02_certified_accuracy", "03_throughput"]
  copies = sorted(os.path.splitext(p)[0] for p in os.listdir(render.RENDERED_DIR)
                  if p.endswith(".md"))
  assert copies == NAMES, "a rendered copy without its notebook, or the other way round"


@pytest.mark.parametrize("name", NAMES)
def test_rendered_code_cells_are_the_notebooks(name):
  nb, text = _notebook(name), _rendered(name)
  expected = [(c.id, c.source) for c in nb.cells if c.cell_type == "code"]
  found = render.code_blocks(text)
  assert [i for i, _ in found] == [i for i, _ in expected], (
      f"{name}: the rendered copy has other code cells; {RERENDER.format(name)}")
  for (cell_id, source), (_, rendered) in zip(expected, found):
    assert rendered == source, f"{name}: cell {cell_id} was edited; {RERENDER.format(name)}"


@pytest.mark.parametrize("name", NAMES)
def test_rendered_copy_is_of_the_current_cells_at_the_small_scale(name):
  nb, text = _notebook(name), _rendered(name)
  (digest,) = re.findall(rf"{render.DIGEST_MARK} ([0-9a-f]{{64}})", text)
  assert digest == render.cells_digest(nb), (
      f"{name}: the notebook changed since it was rendered; {RERENDER.format(name)}")
  assert f"at scale `{render.RENDER_SCALE}`" in text
  # Executed: every code cell of the committed notebook has none of these.
  assert "![output of cell" in text


@pytest.mark.parametrize("name", NAMES)
def test_rendered_images_are_all_there_and_nothing_else(name):
  text = _rendered(name)
  linked = re.findall(rf"\]\({re.escape(name)}_files/([^)]+)\)", text)
  image_dir = os.path.join(render.RENDERED_DIR, f"{name}_files")
  present = sorted(os.listdir(image_dir)) if os.path.isdir(image_dir) else []
  assert sorted(linked) == present


def test_a_notebook_edit_is_detected():
  # The check above must be able to fail: change one character of a cell.
  nb = _notebook(NAMES[0])
  text, _ = render.to_markdown(nb, NAMES[0])
  code = next(c for c in nb.cells if c.cell_type == "code")
  code.source += " "
  assert render.cells_digest(nb) not in text
  assert render.code_blocks(text)[0][1] != code.source


def test_to_markdown_writes_outputs_and_hides_scratch_paths():
  nb = nbformat.v4.new_notebook()
  cell = nbformat.v4.new_code_cell("print(1)\n```inner```", id="c1")
  cell.outputs = [
      nbformat.v4.new_output("stream", name="stdout", text="wrote /tmp/x/a.json\n"),
      nbformat.v4.new_output("stream", name="stdout", text="second line\n"),
      nbformat.v4.new_output("display_data", data={
          "text/html": "<div>\n<style scoped>\n.x {}\n</style>\n\n<table><tr><td>/tmp/x</td>"
                       "</tr></table>\n</div>", "text/plain": "frame"}),
      nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo=",
                                                   "text/plain": "<Figure>"}),
  ]
  nb.cells = [nbformat.v4.new_markdown_cell("# Title", id="m1"), cell]
  text, images = render.to_markdown(nb, "demo", [("/tmp/x", "<workdir>")])
  assert render.code_blocks(text) == [("c1", "print(1)\n```inner```")]
  assert "```text\nwrote <workdir>/a.json\nsecond line\n```" in text
  assert "<style" not in text and "<td>&lt;workdir&gt;</td>" in text
  assert "\n\n<table>" not in text  # one HTML block, no blank line inside
  assert list(images) == ["c1-1.png"] and "](demo_files/c1-1.png)" in text
  assert text.index("# Title") < text.index("<!-- code cell c1 -->")
