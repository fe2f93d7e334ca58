"""Applies mutants to scratch copies of the tree, runs the tests that should catch them, reports.

A mutant is *killed* when its tests fail (pytest exit status 1) on the mutated copy, *survives*
when they pass (status 0), and is an *error* otherwise: a patch that does not apply, tests that
are not found or do not collect, a timeout. Only a kill counts; an error names the mutant so
that a catalogue entry that rotted (the code moved, a test was renamed) cannot pass silently.

The working tree is never modified: each mutant runs in its own copy (the files git tracks plus
untracked, non-ignored ones; the whole tree minus caches outside a git checkout), in a temporary
directory removed afterwards. Tests run in a fresh ``python -m pytest`` process whose working
directory and ``PYTHONPATH`` are the copy, so the copy's ``attn_jax`` is imported even when the
package is also installed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

from tests.mutation import catalogue

REPO = pathlib.Path(__file__).resolve().parents[2]
_IGNORED = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", ".hypothesis", "*.egg-info",
                                  ".venv", "build", "dist", "benchmark_out")


class MutantError(ValueError):
  """A catalogue entry that cannot be applied or run as written."""


@dataclasses.dataclass
class Result:
  """Outcome of one mutant: ``status`` is "killed", "survived" or "error"."""

  mutant: catalogue.Mutant
  status: str
  seconds: float
  killed_by: str = ""
  detail: str = ""


def apply(mutant: catalogue.Mutant, root: pathlib.Path) -> None:
  """Applies every edit of ``mutant`` to the tree at ``root`` (in place).

  Raises:
    MutantError: a file is missing, or an old string does not occur exactly once.
  """
  for path, old, new in mutant.edits:
    file = root / path
    if not file.is_file():
      raise MutantError(f"mutant {mutant.name!r}: file {path} does not exist")
    text = file.read_text()
    count = text.count(old)
    if count != 1:
      raise MutantError(f"mutant {mutant.name!r}: the old string must occur exactly once in {path}, "
                        f"found {count} times (re-anchor the patch): {old!r}")
    file.write_text(text.replace(old, new))


def check_applies(mutant: catalogue.Mutant, root: pathlib.Path = REPO) -> None:
  """Raises MutantError unless ``mutant`` applies to the tree at ``root`` (read only)."""
  for path, old, new in mutant.edits:
    file = root / path
    if not file.is_file():
      raise MutantError(f"mutant {mutant.name!r}: file {path} does not exist")
    count = file.read_text().count(old)
    if count != 1:
      raise MutantError(f"mutant {mutant.name!r}: the old string must occur exactly once in {path}, "
                        f"found {count} times (re-anchor the patch): {old!r}")
    if old == new:
      raise MutantError(f"mutant {mutant.name!r}: an edit of {path} changes nothing")


def check_tests_exist(mutant: catalogue.Mutant, root: pathlib.Path = REPO) -> None:
  """Raises MutantError unless every test node of ``mutant`` names an existing file and function.

  Parameter ids are checked when the tests run (pytest reports an unknown id as an error).
  """
  if not mutant.tests:
    raise MutantError(f"mutant {mutant.name!r} names no tests")
  for node in mutant.tests:
    path, _, rest = node.partition("::")
    file = root / path
    if not file.is_file():
      raise MutantError(f"mutant {mutant.name!r}: test file {path} does not exist")
    if rest:
      func = rest.split("[")[0].split("::")[-1]
      if not re.search(rf"^\s*def {re.escape(func)}\(", file.read_text(), re.M):
        raise MutantError(f"mutant {mutant.name!r}: no test function {func} in {path}")


def _tree_files(root: pathlib.Path):
  """The files of the tree: git's tracked + untracked non-ignored files, or None outside git."""
  try:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True, timeout=60).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  return [p for p in out.decode().split("\0") if p]


def scratch_copy(root: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
  """Copies the tree at ``root`` into the new directory ``dest``."""
  files = _tree_files(root)
  if files is None:
    shutil.copytree(root, dest, ignore=_IGNORED)
    return dest
  dest.mkdir(parents=True)
  for rel in files:
    src = root / rel
    if not src.is_file():  # deleted but still tracked
      continue
    target = dest / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, target)
  return dest


def _env(copy: pathlib.Path):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
  env["PYTHONPATH"] = str(copy)
  env["PYTHONDONTWRITEBYTECODE"] = "1"
  return env


def _pytest(copy: pathlib.Path, nodes, timeout: float, extra=()):
  cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-rf", "-p", "no:cacheprovider", *extra, *nodes]
  return subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=timeout)


def _first_failure(output: str) -> str:
  m = re.search(r"^FAILED (\S+)", output, re.M)
  return m.group(1) if m else ""


def run_mutant(mutant: catalogue.Mutant, root: pathlib.Path = REPO, timeout: float = 900.0) -> Result:
  """Applies ``mutant`` to a scratch copy of ``root`` and runs its tests there."""
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
    copy = scratch_copy(root, pathlib.Path(tmp) / "tree")
    try:
      apply(mutant, copy)
    except MutantError as e:
      return Result(mutant, "error", time.perf_counter() - start, detail=str(e))
    try:
      proc = _pytest(copy, mutant.tests, timeout)
    except subprocess.TimeoutExpired:
      return Result(mutant, "error", time.perf_counter() - start, detail=f"timed out after {timeout:.0f} s")
  seconds = time.perf_counter() - start
  output = proc.stdout + proc.stderr
  if proc.returncode == 1:
    failed = _first_failure(output)
    if failed:
      return Result(mutant, "killed", seconds, killed_by=failed)
    # Status 1 without a failed test is an error during collection or setup.
    return Result(mutant, "error", seconds, detail="pytest status 1 without a failed test:\n" + output[-3000:])
  if proc.returncode == 0:
    return Result(mutant, "survived", seconds, detail=output.strip().splitlines()[-1] if output.strip() else "")
  return Result(mutant, "error", seconds, detail=f"pytest exit status {proc.returncode}:\n" + output[-3000:])


def run_baseline(mutants, root: pathlib.Path = REPO, timeout: float = 3600.0, workers: int = 2) -> str:
  """Runs the union of the mutants' tests on an unmutated copy; returns "" or the failure output.

  A kill only means something if the same tests pass on the unmutated tree.
  """
  nodes = list(dict.fromkeys(n for m in mutants for n in m.tests))
  with tempfile.TemporaryDirectory(prefix="mutant-baseline-") as tmp:
    copy = scratch_copy(root, pathlib.Path(tmp) / "tree")
    extra = ("-n", str(workers)) if workers > 1 else ()
    proc = _pytest(copy, nodes, timeout, extra)
  if proc.returncode != 0:
    return (proc.stdout + proc.stderr)[-6000:]
  return ""


def run_all(mutants, root: pathlib.Path = REPO, jobs: int = 2, timeout: float = 900.0, progress=None):
  """Runs ``mutants`` on ``jobs`` parallel workers; results in catalogue order."""
  results = {}
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
    futures = {pool.submit(run_mutant, m, root, timeout): m for m in mutants}
    for future in concurrent.futures.as_completed(futures):
      result = future.result()
      results[result.mutant.name] = result
      if progress is not None:
        progress(result)
  return [results[m.name] for m in mutants]


def _cell(text: str) -> str:
  return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(results) -> str:
  """``| mutant | family | file | bug | result | killed by | time |`` rows, one per mutant."""
  lines = ["| mutant | family | file | bug | result | killed by | time (s) |",
           "|---|---|---|---|---|---|---|"]
  for r in results:
    m = r.mutant
    files = ", ".join(dict.fromkeys(p for p, _, _ in m.edits))
    by = f"`{r.killed_by}`" if r.killed_by else _cell(r.detail.splitlines()[0] if r.detail else "")
    lines.append(f"| `{m.name}` | {m.family} | {files} | {_cell(m.description)} | {r.status} | {by} | "
                 f"{r.seconds:.0f} |")
  return "\n".join(lines)


def changed_files(base: str, root: pathlib.Path = REPO) -> set[str]:
  """Files that differ from ``base`` (committed on this branch since the merge base, or not yet
  committed)."""
  def names(*args):
    out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout
    return {line for line in out.splitlines() if line}
  return names("diff", "--name-only", f"{base}...HEAD") | names("diff", "--name-only", "HEAD")


def select(mutants, names=(), quick=False, changed=None):
  """Filters the catalogue: by name, the quick CI subset, or the files changed (``changed``)."""
  out = list(mutants)
  if names:
    known = {m.name for m in out}
    unknown = sorted(set(names) - known)
    if unknown:
      raise MutantError(f"unknown mutants {unknown}; known: {sorted(known)}")
    out = [m for m in out if m.name in set(names)]
  if quick:
    out = [m for m in out if m.quick]
  if changed is not None:
    out = [m for m in out if any(p in changed for p, _, _ in m.edits)]
  return out
