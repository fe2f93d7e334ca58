"""The documentation (mkdocs.yml, docs/, the docstrings it renders) builds with warnings as errors."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _missing_tools():
  missing = []
  for module in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python"):
    try:
      found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package is missing
      found = False
    if not found:
      missing.append(module)
  return missing


def test_docs_build_strict(tmp_path):
  """About 3 s: mkdocstrings reads the docstrings statically (griffe), nothing is imported."""
  missing = _missing_tools()
  if missing:
    message = f"the docs extra is not installed (missing {missing}); pip install '.[docs]'"
    if os.environ.get("CI"):
      pytest.fail(message)  # CI installs .[test], which includes the docs tools.
    pytest.skip(message)
  result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  assert (tmp_path / "api" / "attention" / "index.html").exists()
  assert "linear_attention" in (tmp_path / "api" / "linear" / "index.html").read_text()
