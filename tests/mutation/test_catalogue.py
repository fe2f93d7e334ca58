"""The mutation catalogue in CI: every patch still applies, and the quick subset is killed.

A patch that no longer applies (the code it targets moved) fails here with the mutant's name, so
the catalogue cannot rot silently. The quick subset runs each of its mutants in a scratch copy
of the tree (about 15 s each: a pytest start-up and a few small tests); the whole catalogue runs
on demand with ``python -m tests.mutation`` (see README).
"""

import pathlib
import subprocess
import sys

import pytest

from tests.mutation import catalogue
from tests.mutation import runner

# Every kernel and backend family has mutants (issue 18); a new family adds its name here.
FAMILIES = {"pallas_tpu", "pallas_gpu", "pallas_adapter", "xla", "cudnn", "block_mask", "masks", "linear_xla",
            "linear_kernels", "neighborhood", "mechanisms", "dynamic_sparse", "decoding", "sharding", "benchmark"}
QUICK = [m.name for m in catalogue.MUTANTS if m.quick]
_BY_NAME = {m.name: m for m in catalogue.MUTANTS}


def test_catalogue_is_well_formed_and_applies_to_this_tree():
  names = [m.name for m in catalogue.MUTANTS]
  assert len(names) == len(set(names)), "mutant names must be unique"
  assert len(names) >= 20
  assert {m.family for m in catalogue.MUTANTS} == FAMILIES
  assert {_BY_NAME[n].family for n in QUICK} >= {"pallas_gpu", "xla", "block_mask", "masks", "linear_xla",
                                                 "neighborhood", "decoding"}
  for m in catalogue.MUTANTS:
    assert m.description and m.tests, m.name
    runner.check_applies(m)
    runner.check_tests_exist(m)


def test_every_test_id_of_the_catalogue_is_collected():
  """A renamed test or parameter id would make a mutant's run (and the baseline) collect nothing."""
  nodes = list(dict.fromkeys(n for m in catalogue.MUTANTS for n in m.tests))
  proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *nodes],
                        cwd=runner.REPO, env=runner._env(runner.REPO), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


def test_a_patch_that_no_longer_applies_names_the_mutant(tmp_path):
  (tmp_path / "a.py").write_text("x = 1\nx = 1\n")
  twice = catalogue.Mutant("demo-twice", "masks", "a.py", "x = 1", "x = 2", "d", ("a.py",))
  with pytest.raises(runner.MutantError, match=r"mutant 'demo-twice': .* found 2 times"):
    runner.check_applies(twice, tmp_path)
  gone = catalogue.Mutant("demo-gone", "masks", "a.py", "y = 1", "y = 2", "d", ("a.py",))
  with pytest.raises(runner.MutantError, match=r"mutant 'demo-gone': .* found 0 times"):
    runner.apply(gone, tmp_path)
  assert (tmp_path / "a.py").read_text() == "x = 1\nx = 1\n"
  missing = catalogue.Mutant("demo-test", "masks", "a.py", "x", "y", "d", ("a.py::test_nothing",))
  with pytest.raises(runner.MutantError, match=r"mutant 'demo-test': no test function test_nothing"):
    runner.check_tests_exist(missing, tmp_path)


def test_scratch_copy_runs_its_own_code(tmp_path):
  """The mutated copy's packages are the ones imported, even if attn_jax is also installed."""
  copy = runner.scratch_copy(runner.REPO, tmp_path / "tree")
  out = subprocess.run([sys.executable, "-c", "import attn_jax, pallas_kernels, tests.mutation; "
                        "print(attn_jax.__file__); print(pallas_kernels.__file__)"],
                       cwd=copy, env=runner._env(copy), capture_output=True, text=True, check=True).stdout
  for line in out.split():
    assert pathlib.Path(line).resolve().is_relative_to(copy.resolve()), line
  assert not (runner.REPO / "attn_jax" / "__init__.py").samefile(copy / "attn_jax" / "__init__.py")


@pytest.mark.parametrize("name", QUICK)
def test_quick_mutant_is_killed(name):
  result = runner.run_mutant(_BY_NAME[name], timeout=600)
  assert result.status == "killed", f"{name}: {result.status}\n{result.detail}"
