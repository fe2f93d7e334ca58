"""Every ```python block of README.md and docs/*.md runs, and its attention calls match the reference.

The blocks of one file run in order in one namespace, as a reader pastes them into one session
(later blocks may use earlier imports and arrays). While they run, ``attn_jax.attention``,
``attn_jax.linear_attention`` and ``attn_jax.neighborhood_attention`` are wrapped: each eager
call is repeated with ``implementation="reference"`` and the two results are compared with the
per-dtype tolerances of the test suite. Calls traced inside a ``jit`` (layers, models) run
unchanged.
"""

import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax
from tests import tolerances

ROOT = pathlib.Path(__file__).resolve().parents[1]
_PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_TOP_LEVEL_CALL = re.compile(r"^[^\s#].*attn_jax\.(?:attention|linear_attention|neighborhood_attention)\(", re.M)


def python_blocks(path):
  """``[(first line number, source)]`` of the ```python blocks of a Markdown file."""
  text = path.read_text()
  return [(text[:m.start()].count("\n") + 2, m.group(1)) for m in _BLOCK.finditer(text)]


# Pages without a python block have nothing to run (they are not collected, rather than skipped).
FILES = [p for p in _PAGES if python_blocks(p)]


def _concrete(tree):
  return all(not isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


def _checked(fn, compared):
  @functools.wraps(fn)  # attn_jax.explain unwraps it to the function it explains
  def call(*args, **kwargs):
    out = fn(*args, **kwargs)
    if not _concrete((args, kwargs, out)) or kwargs.get("implementation") == "reference":
      return out
    reference = fn(*args, **{**kwargs, "implementation": "reference", "config": None})
    for got, want in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(reference)):
      dtype = got.dtype if jnp.dtype(got.dtype) in tolerances.TOLERANCES else jnp.float32
      tolerances.assert_close(got, want, dtype, f"{fn.__name__} vs reference")
    compared.append(fn.__name__)
    return out
  return call


def test_the_block_extractor_finds_the_examples():
  # README's quick start, and the guides' examples.
  assert any("attn_jax.attention(" in source for _, source in python_blocks(ROOT / "README.md"))
  assert sum(len(python_blocks(p)) for p in _PAGES if p.parent.name == "docs") >= 10
  assert {"README.md", "attention.md", "linear.md", "neighborhood.md"} <= {p.name for p in FILES}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_blocks_run_and_match_the_reference(path, monkeypatch):
  blocks = python_blocks(path)
  compared = []
  for name in ("attention", "linear_attention", "neighborhood_attention"):
    monkeypatch.setattr(attn_jax, name, _checked(getattr(attn_jax, name), compared))
  namespace = {"__name__": f"docs_example_{path.stem}"}
  for line, source in blocks:
    code = compile(source, f"{path.relative_to(ROOT)}:{line}", "exec")
    exec(code, namespace)  # noqa: S102 - the documentation's own examples
  # Calls at the top level of a block run eagerly (those inside a function may run under jit).
  calls = sum(len(_TOP_LEVEL_CALL.findall(source)) for _, source in blocks)
  if calls:
    assert compared, f"{path.name} calls attention eagerly but no call was compared with the reference"
