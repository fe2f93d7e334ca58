"""``python -m tests.mutation``: run the mutant catalogue and report killed / survived.

Examples::

    python -m tests.mutation                              # the whole catalogue, 2 workers
    python -m tests.mutation --quick                      # the CI subset
    python -m tests.mutation --changed main               # mutants of the files changed vs main
    python -m tests.mutation --only tpu-dkv-skips-last-tile,nb-stride-leader
    python -m tests.mutation --out benchmarks/mutation    # also write report.md and results.json
    python -m tests.mutation --list

The exit status is 0 when every selected mutant is killed, 1 when one survives, 2 on errors.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

from tests.mutation import catalogue
from tests.mutation import runner


def _environment(root):
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                            text=True, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    commit = "unknown"
  import jax  # Imported here: listing the catalogue does not need jax.
  return dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              jax_version=jax.__version__, python=platform.python_version(), host=platform.platform(),
              cpu_count=os.cpu_count(), commit=commit)


def _report(results, env, total_seconds, args, jobs) -> str:
  killed = sum(r.status == "killed" for r in results)
  survived = [r for r in results if r.status == "survived"]
  errors = [r for r in results if r.status == "error"]
  lines = ["# Mutation testing: deliberate bugs the test suite must catch", "",
           f"- date: {env['date']}; commit {env['commit']}",
           f"- device: CPU only ({env['cpu_count']} cores, {env['host']}); kernels in Pallas interpret mode",
           f"- jax {env['jax_version']}, Python {env['python']}",
           f"- command: `python -m tests.mutation {' '.join(args)}`".rstrip(),
           f"- {len(results)} mutants: {killed} killed, {len(survived)} survived, {len(errors)} errors; "
           f"{total_seconds / 60:.1f} min wall with {jobs} parallel worker(s)",
           "- time: wall seconds per mutant (copy, patch, pytest start-up and the tests up to the first "
           "failure), on a machine shared with other jobs", "",
           runner.markdown_table(results), ""]
  if catalogue.EQUIVALENT:
    lines += ["Equivalent patches (no result changes, so no test can catch them; documented in the catalogue, "
              "not run):", ""]
    lines += [f"- `{name}` ({path}): {why}" for name, path, why in catalogue.EQUIVALENT] + [""]
  for r in survived + errors:
    lines += [f"## {r.status}: {r.mutant.name}", "", "```", r.detail[-2000:], "```", ""]
  return "\n".join(lines)


def _parse(argv):
  p = argparse.ArgumentParser(prog="python -m tests.mutation", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", default="", help="comma-separated mutant names")
  p.add_argument("--quick", action="store_true", help="only the CI subset")
  p.add_argument("--changed", metavar="BASE", help="only mutants of files that differ from git ref BASE")
  p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel mutants (default 2)")
  p.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant")
  p.add_argument("--no-baseline", action="store_true",
                 help="skip the run of the selected tests on the unmutated tree")
  p.add_argument("--out", help="directory for report.md and results.json")
  p.add_argument("--list", action="store_true", help="list the selected mutants and exit")
  return p.parse_args(argv)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args = _parse(argv)
  root = runner.REPO
  changed = runner.changed_files(args.changed, root) if args.changed else None
  names = [n for n in args.only.split(",") if n]
  mutants = runner.select(catalogue.MUTANTS, names, args.quick, changed)
  for m in mutants:
    runner.check_applies(m, root)
    runner.check_tests_exist(m, root)
  if args.list:
    for m in mutants:
      print(f"{m.name:48s} {m.family:16s} {'quick ' if m.quick else ''}{m.description}")
    return 0
  if not mutants:
    print("no mutants selected")
    return 0
  start = time.perf_counter()
  if not args.no_baseline:
    print(f"baseline: the {len({n for m in mutants for n in m.tests})} test selections on the unmutated tree ...",
          flush=True)
    failure = runner.run_baseline(mutants, root, workers=args.jobs)
    if failure:
      print(failure)
      print("baseline failed: the selected tests fail without any mutant; fix that first", file=sys.stderr)
      return 2
  print(f"running {len(mutants)} mutants on {args.jobs} worker(s) ...", flush=True)

  def progress(r):
    info = r.killed_by or (r.detail.splitlines()[0] if r.detail else "")
    print(f"  {r.status:9s} {r.seconds:6.0f} s  {r.mutant.name}  {info}", flush=True)

  results = runner.run_all(mutants, root, jobs=args.jobs, timeout=args.timeout, progress=progress)
  total = time.perf_counter() - start
  env = _environment(root)
  text = _report(results, env, total, argv, args.jobs)
  print()
  print(text)
  if args.out:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    payload = dict(environment=env, total_seconds=total, command=argv,
                   results=[dict(name=r.mutant.name, family=r.mutant.family, files=[p for p, _, _ in r.mutant.edits],
                                 description=r.mutant.description, tests=list(r.mutant.tests), quick=r.mutant.quick,
                                 status=r.status, killed_by=r.killed_by, seconds=round(r.seconds, 1),
                                 detail=r.detail[-2000:] if r.status != "killed" else "")
                              for r in results])
    (out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
  if any(r.status == "error" for r in results):
    return 2
  return 1 if any(r.status == "survived" for r in results) else 0


if __name__ == "__main__":
  sys.exit(main())
