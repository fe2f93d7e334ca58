"""The Colab notebook is a valid notebook and its code cells run headlessly at toy sizes."""

import json
import subprocess
import sys

from tests.experiments import helpers

NOTEBOOK = helpers.REPO / "notebooks" / "attn_jax_quickstart.ipynb"


def _cells():
  nb = json.loads(NOTEBOOK.read_text())
  assert nb["nbformat"] == 4 and nb["metadata"]["kernelspec"]["language"] == "python"
  for cell in nb["cells"]:
    assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["source"], list)
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None
  return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebook_executes(tmp_path):
  cells = _cells()
  assert not any(line.lstrip().startswith(("!", "%")) for c in cells for line in c.splitlines()), (
      "use subprocess instead of shell magics so the cells run as plain Python")
  script = tmp_path / "notebook.py"
  script.write_text("\n\n".join(cells))
  env = dict(helpers.env(), ATTN_JAX_NOTEBOOK_CI="1", MPLBACKEND="Agg",
             ATTN_JAX_NOTEBOOK_WORKDIR=str(tmp_path / "benchmark_notebook"))
  result = subprocess.run([sys.executable, str(script)], cwd=helpers.REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
  out = result.stdout
  assert "max |fast - reference| =" in out and "conv + window hybrid" in out
  assert "MQAR recall accuracy:" in out and "# attn_jax attention benchmark" in out
  assert (tmp_path / "benchmark_notebook" / "quality_mqar.png").exists()
