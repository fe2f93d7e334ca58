"""The Colab notebook executes as documented (`jupyter nbconvert --to notebook --execute`, which
runs it from its own folder) at toy sizes, quietly, and installs from the one repository URL."""

import json
import os
import re
import tomllib

import pytest

from tests.experiments import helpers

NOTEBOOK = helpers.REPO / "notebooks" / "attn_jax_quickstart.ipynb"


def _code_cells():
  nb = json.loads(NOTEBOOK.read_text())
  assert nb["nbformat"] == 4 and nb["metadata"]["kernelspec"]["language"] == "python"
  for cell in nb["cells"]:
    assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["source"], list)
    if cell["cell_type"] == "code":
      # Committed without outputs: what a reader sees comes from running it.
      assert cell["outputs"] == [] and cell["execution_count"] is None
  return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_repository_url_is_written_in_one_place():
  url = tomllib.loads((helpers.REPO / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
  cells = _code_cells()
  assert sum(f'REPO_URL = "{url}"' in c for c in cells) == 1
  # Every mention of the project's own repository, in README and the notebook, is that URL.
  pattern = re.compile(r"https?://github\.com/[\w.-]+/attn[_-]jax[\w.-]*")
  for path in (helpers.REPO / "README.md", NOTEBOOK):
    for found in pattern.findall(path.read_text()):
      assert found == url, (path.name, found, url)
  assert not any(line.lstrip().startswith(("!", "%")) for c in cells for line in c.splitlines()), (
      "use subprocess instead of shell magics so that the cells are plain Python")


def test_notebook_executes_from_its_own_folder(tmp_path, monkeypatch):
  nbclient = pytest.importorskip("nbclient", reason="nbclient and ipykernel come with the test extra: "
                                 "pip install '.[test]'")
  pytest.importorskip("ipykernel", reason="pip install '.[test]'")
  import nbformat

  _code_cells()
  workdir = tmp_path / "benchmark_notebook"
  for key, value in helpers.env().items():
    if key.startswith(("JAX", "XLA")):
      monkeypatch.setenv(key, value)
  monkeypatch.setenv("ATTN_JAX_NOTEBOOK_CI", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("ATTN_JAX_NOTEBOOK_WORKDIR", str(workdir))
  # The notebook must find the checkout from its folder by itself, as it does under nbconvert.
  paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != str(helpers.REPO)]
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
  nb = nbformat.read(str(NOTEBOOK), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(NOTEBOOK.parent)}})
  client.execute()          # raises CellExecutionError naming the failing cell

  streams, shown = [], []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      assert out["output_type"] != "error", out
      if out["output_type"] == "stream":
        streams.append(out["text"])
      else:
        shown.append(out.get("data", {}).get("text/markdown", "") + out.get("data", {}).get("text/plain", ""))
  text = "".join(streams)
  assert "attn_jax checkout: " + str(helpers.REPO) in text
  assert "max |fast - reference| =" in text and "conv + window hybrid" in text
  assert "MQAR recall accuracy:" in text
  assert "## Recommendation: which attention for my pattern and length" in "".join(shown)
  assert (workdir / "quality_mqar.png").exists() and (workdir / "efficiency_fwd.png").exists()
  # Quiet: no progress-bar redraws, and only a screenful of lines in all.
  assert "\r" not in text
  assert len(text.splitlines()) < 60, text
