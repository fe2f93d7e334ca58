"""``python -m attn_jax.compile_check``: compile the Pallas kernels for real TPUs and GPUs, no device.

    python -m attn_jax.compile_check                       # full matrix, default targets
    python -m attn_jax.compile_check --quick --targets v5e,h100,a100
    python -m attn_jax.compile_check --kernels linear --targets h100 --match d128
    python -m attn_jax.compile_check --list

Exit status 0 when every compile succeeded and no project kernel spills registers at head dim
<= 128 on H100 / A100; 1 otherwise (the problems are printed); 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys

from attn_jax.compile_check import cases as cases_lib
from attn_jax.compile_check import report
from attn_jax.compile_check import runner
from attn_jax.compile_check import targets as targets_lib


def _parser():
  p = argparse.ArgumentParser(prog="python -m attn_jax.compile_check", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--targets", default=",".join(targets_lib.DEFAULT),
                 help=f"comma-separated, among {', '.join(targets_lib.TARGETS)}, or 'all' "
                      f"(default: %(default)s)")
  p.add_argument("--kernels", default=None,
                 help=f"kernel families, comma-separated, among {', '.join(cases_lib.families())} (default: all)")
  p.add_argument("--match", default=None, help="only cases whose id contains this, e.g. 'd128-bf16'")
  p.add_argument("--modes", default=None, help="fwd and/or fwd+bwd (default: each case's own)")
  p.add_argument("--quick", action="store_true", help="the CI subset only")
  p.add_argument("--jobs", type=int, default=1, help="targets compiled at once (default 1)")
  p.add_argument("--out", default="benchmark_out/compile_check",
                 help="folder for compile_check.md and compile_check.json (default: %(default)s)")
  p.add_argument("--home", default=None,
                 help="folder of the cached compiler venvs (default: $ATTN_JAX_COMPILE_CHECK_HOME, "
                      "else .compile_check/ in a source checkout)")
  p.add_argument("--tpu-python", default=None, help="use this interpreter (with jax[tpu]) for TPU targets")
  p.add_argument("--gpu-python", default=None,
                 help="use this interpreter (with jax-cuda12-plugin and nvidia-cuda-nvcc-cu12) for GPU targets")
  p.add_argument("--cases-module", action="append", default=[],
                 help="import this module first (it registers more kernel families); repeatable")
  p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                 help="write one table from the compile_check.json files of earlier runs, then exit")
  p.add_argument("--list", action="store_true", help="print the selected cases and exit")
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  if args.merge:
    run = report.merge(args.merge)
    md, js = report.write(run, args.out)
    print("\n".join(report.headline(run)) + f"\n\nwrote {md} and {js}")
    return 1 if runner.violations(run) else 0
  try:
    cases_lib.load_modules(args.cases_module)
    if args.list:
      targets_lib.resolve(args.targets)
      for c in cases_lib.select(args.kernels, match=args.match, quick=args.quick):
        print(f"{c.id:45s} {','.join(c.modes):12s} {','.join(c.platforms):8s} {c.note}")
      return 0
    run = runner.run(args.targets, args.kernels, match=args.match, quick=args.quick, modes=args.modes,
                     jobs=args.jobs, home=args.home, tpu_python=args.tpu_python, gpu_python=args.gpu_python,
                     cases_modules=args.cases_module,
                     partial_path=os.path.join(args.out, "compile_check.partial.json"))
  except (ValueError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except RuntimeError as e:  # A compiler environment could not be created.
    print(f"error: {e}", file=sys.stderr)
    return 1
  md, js = report.write(run, args.out)
  print("\n".join(report.headline(run)))
  problems = runner.violations(run)
  print(f"\nwrote {md} and {js}")
  if problems:
    print(f"\n{len(problems)} problems:", file=sys.stderr)
    for p in problems:
      print(f"- {p}", file=sys.stderr)
    return 1
  print("every compile succeeded; no project kernel spills at head dim <= 128 on H100 / A100")
  return 0


if __name__ == "__main__":
  sys.exit(main())
