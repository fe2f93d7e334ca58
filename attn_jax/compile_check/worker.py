"""Compiles cases for one target; runs inside that target's compiler environment.

    python -m attn_jax.compile_check.worker --target h100 --jobs jobs.json --out results.jsonl

``jobs.json`` is a list of ``[case id, mode]``. For each job the worker writes one JSON line
``{"start": job}`` before compiling and one result line after, so that the orchestrator can tell
which job a crashed compiler was on. Each compile gets its own XLA dump folder and its own
capture of file descriptor 2, where XLA (C++) logs the ptxas reports.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import pathlib
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec

from attn_jax.compile_check import cases as cases_lib
from attn_jax.compile_check import parse
from attn_jax.compile_check import targets as targets_lib


def _versions(platform: str) -> dict[str, str | None]:
  names = ["jax", "jaxlib"] + (["libtpu"] if platform == "tpu" else
                               ["jax-cuda12-plugin", "jax-cuda12-pjrt", "nvidia-cuda-nvcc-cu12"])
  out = {}
  for n in names:
    try:
      out[n] = importlib.metadata.version(n)
    except importlib.metadata.PackageNotFoundError:
      out[n] = None
  return out


def _mesh(target: targets_lib.Target):
  if target.platform == "tpu":
    topo = topologies.get_topology_desc(topology_name=target.topology, platform="tpu")
  else:
    topo = topologies.get_topology_desc(platform="cuda", topology_name="",
                                        target_config=target.gpu_config_text(), topology="1x1x1")
  return jax.sharding.Mesh(topo.devices[:1], ("x",)), topo.devices[0].device_kind


def _function(case: cases_lib.Case, platform: str, mode: str):
  names = [i.name for i in case.inputs]

  def forward(*arrays):
    return case.call(platform, dict(zip(names, arrays)))

  if mode == cases_lib.FWD:
    return forward

  def loss(*arrays):
    out = forward(*arrays)
    leaves = jax.tree.leaves(out)
    return sum(jnp.sum(x.astype(jnp.float32)) for x in leaves)

  # The loss value keeps the forward kernels in the program even where the gradient alone would
  # not need their outputs (XLA would drop them).
  return jax.value_and_grad(loss, argnums=tuple(names.index(n) for n in case.grad))


@contextlib.contextmanager
def _capture_fd2(path: pathlib.Path):
  """Redirects file descriptor 2 (where XLA's C++ logging writes) to ``path``."""
  sys.stderr.flush()
  saved = os.dup(2)
  with open(path, "wb") as f:
    os.dup2(f.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)


def _kernels(target, dump: pathlib.Path, log: str) -> tuple[list[dict], list[dict]]:
  """Per pallas kernel figures, and the XLA (non-project) kernels that spilled."""
  names = parse.pallas_names(dump)
  kernels = []
  if target.platform == "tpu":
    vmem = parse.tpu_scoped_vmem(dump)
    for n in names:
      kernels.append(dict(name=n, vmem_bytes=vmem.get(n)))
    return kernels, []
  reports = parse.ptxas_reports(log)
  smem = parse.gpu_shared_memory(dump)
  used = set()
  for n in names:
    mine = [r for r in reports if parse.match_kernel(n, [r["name"]])]
    launches = [s for s in smem if parse.match_kernel(n, [s])]
    used.update(r["name"] for r in mine)
    kernels.append(dict(
        name=n,
        registers=max((r["registers"] for r in mine), default=None),
        spill_stores=max((r["spill_stores"] for r in mine), default=None),
        spill_loads=max((r["spill_loads"] for r in mine), default=None),
        smem_bytes=max((smem[s] for s in launches), default=None)))
  others = [dict(name=r["name"], spill_stores=r["spill_stores"], spill_loads=r["spill_loads"])
            for r in reports if r["name"] not in used and (r["spill_stores"] or r["spill_loads"])]
  return kernels, others


def compile_one(target, mesh, case: cases_lib.Case, mode: str, scratch: pathlib.Path) -> dict:
  """Compiles one (case, mode) for ``target``; the result record (never raises)."""
  result = dict(target=target.name, case=case.id, family=case.family, mode=mode,
                head_dim=case.head_dim, dtype=case.dtype)
  dump = pathlib.Path(tempfile.mkdtemp(dir=scratch))
  log_path = dump / "compiler.log"
  specs = [jax.ShapeDtypeStruct(i.shape, jnp.dtype(i.dtype), sharding=NamedSharding(mesh, PartitionSpec()))
           for i in case.inputs]
  fn = _function(case, target.platform, mode)
  stage = "lower"
  start = time.time()
  try:
    lowered = jax.jit(fn).lower(*specs)
    result["lower_s"] = round(time.time() - start, 2)
    stage = "compile"
    start = time.time()
    with _capture_fd2(log_path):
      lowered.compile(compiler_options={"xla_dump_to": str(dump)})
    result["compile_s"] = round(time.time() - start, 2)
    result["status"] = "compiled"
  except Exception as e:  # The compiler's message is the result; the run goes on.
    result["status"] = "failed"
    result["stage"] = stage
    result["error_type"] = type(e).__name__
    result["error"] = parse.error_summary(str(e) or traceback.format_exc())
    result["compile_s"] = round(time.time() - start, 2)
  log = log_path.read_text(errors="replace") if log_path.exists() else ""
  if result["status"] == "compiled" or stage == "compile":
    result["kernels"], result["xla_spills"] = _kernels(target, dump, log)
  if target.platform == "gpu":
    result["cuda_tools"] = parse.cuda_tools(log)
  for f in sorted(dump.rglob("*"), reverse=True):
    f.unlink() if f.is_file() else f.rmdir()
  dump.rmdir()
  return result


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--target", required=True, choices=sorted(targets_lib.TARGETS))
  p.add_argument("--jobs", required=True, help="JSON file: list of [case id, mode]")
  p.add_argument("--out", required=True, help="JSON-lines file to append results to")
  p.add_argument("--cases-module", action="append", default=[], help="module registering more cases")
  args = p.parse_args(argv)
  cases_lib.load_modules(args.cases_module)
  target = targets_lib.TARGETS[args.target]
  if target.platform == "tpu":
    # No TPU here to detect: the kernels take this target's default tiling (VMEM differs: v4's
    # 16-32 MiB against 95-128 MiB on later generations).
    os.environ["ATTN_JAX_TPU_GENERATION"] = target.name
  jobs = json.loads(pathlib.Path(args.jobs).read_text())
  cases = cases_lib.all_cases()
  with open(args.out, "a") as out:
    def emit(record):
      out.write(json.dumps(record) + "\n")
      out.flush()

    try:
      mesh, kind = _mesh(target)
    except Exception as e:
      emit(dict(target=target.name, fatal=parse.error_summary(f"{type(e).__name__}: {e}")))
      return 1
    emit(dict(target=target.name, device_kind=kind, versions=_versions(target.platform)))
    with tempfile.TemporaryDirectory(prefix=f"compile_check_{target.name}_") as scratch:
      for case_id, mode in jobs:
        emit(dict(start=[case_id, mode]))
        emit(compile_one(target, mesh, cases[case_id], mode, pathlib.Path(scratch)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
