"""Runs the compile check: environments, one worker process per target, results.

Standard library only, apart from importing the case registry (which imports attn_jax lazily in
the cases' calls): the compiling happens in the workers, in the compiler environments.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
import subprocess
import sys
import tempfile
import time

from attn_jax.compile_check import cases as cases_lib
from attn_jax.compile_check import envs
from attn_jax.compile_check import targets as targets_lib

# Spill rule of the issue: no register spill in a project kernel at these head dims on these GPUs.
SPILL_FREE_HEAD_DIM = 128
SPILL_FREE_TARGETS = ("h100", "a100")


@dataclasses.dataclass
class Run:
  """Everything one run produced: per-(target, case, mode) results and what they were made with."""

  results: list[dict]
  meta: dict


def _jobs_for(target, cases, modes):
  return [[c.id, m] for c in cases if target.platform in c.platforms
          for m in c.modes if modes is None or m in modes]


def _read_lines(path: pathlib.Path, offset: int):
  if not path.exists():
    return [], offset
  with open(path) as f:
    f.seek(offset)
    text = f.read()
  complete = text[:text.rfind("\n") + 1]
  return [json.loads(l) for l in complete.splitlines() if l.strip()], offset + len(complete)


class _Worker:
  """One target's worker process; restarted after a crash with the jobs it had not reached."""

  def __init__(self, target, env: envs.Environment, jobs, work: pathlib.Path, log, modules=()):
    self.target, self.env, self.pending, self.work, self.log = target, env, list(jobs), work, log
    self.modules = list(modules)
    self.results, self.info = [], {}
    self.proc = None
    self.current = None
    self.starts = 0
    self.out = work / f"{target.name}.jsonl"
    self.offset = 0
    self.stderr_path = work / f"{target.name}.stderr"

  def start(self):
    jobs_file = self.work / f"{self.target.name}.jobs{self.starts}.json"
    jobs_file.write_text(json.dumps(self.pending))
    self.starts += 1
    self.stderr = open(self.stderr_path, "ab")
    self.proc = subprocess.Popen(
        [str(self.env.python), "-m", "attn_jax.compile_check.worker", "--target", self.target.name,
         "--jobs", str(jobs_file), "--out", str(self.out),
         *(a for m in self.modules for a in ("--cases-module", m))],
        cwd=str(envs.SOURCE_ROOT), env=envs.worker_environ(self.target.platform, self.env.python),
        stdout=self.stderr, stderr=self.stderr, stdin=subprocess.DEVNULL)

  def poll(self) -> bool:
    """Reads new results; True while the worker still has work."""
    lines, self.offset = _read_lines(self.out, self.offset)
    for rec in lines:
      if "start" in rec:
        self.current = rec["start"]
      elif "fatal" in rec:
        self.info["fatal"] = rec["fatal"]
      elif "device_kind" in rec:
        self.info.update(device_kind=rec["device_kind"], versions=rec["versions"])
      else:
        self.results.append(rec)
        self.pending.remove([rec["case"], rec["mode"]])
        self.current = None
        self.log(_progress_line(rec))
    if self.proc.poll() is None:
      return True
    self.stderr.close()
    if self.proc.returncode != 0 or self.pending:
      if "fatal" in self.info:
        for case_id, mode in self.pending:
          self.results.append(self._failure(case_id, mode, self.info["fatal"], "setup"))
        self.pending = []
        return False
      tail = self.stderr_path.read_text(errors="replace")[-1500:]
      victim = self.current or (self.pending[0] if self.pending else None)
      if victim is not None:
        rec = self._failure(*victim, f"the compiler process died (exit code {self.proc.returncode}):\n{tail}",
                            "compile")
        self.results.append(rec)
        self.log(_progress_line(rec))
        self.pending.remove(victim)
        self.current = None
      if self.pending:
        self.start()
        return True
    return False

  def _failure(self, case_id, mode, message, stage):
    case = cases_lib.all_cases()[case_id]
    return dict(target=self.target.name, case=case_id, family=case.family, mode=mode,
                head_dim=case.head_dim, dtype=case.dtype, status="failed", stage=stage,
                error_type="WorkerDied", error=message)


def _progress_line(rec) -> str:
  if rec["status"] == "compiled":
    bits = []
    for k in rec.get("kernels", []):
      if "registers" in k:
        bits.append(f"{k['name']} {k['registers']} regs, spill {k['spill_stores']} B, smem {k['smem_bytes']}")
      else:
        bits.append(f"{k['name']} VMEM {k['vmem_bytes']}")
    return f"  {rec['target']:5s} {rec['case']} [{rec['mode']}] compiled in {rec['compile_s']} s: " + "; ".join(bits)
  first = rec["error"].strip().splitlines()[0] if rec.get("error") else ""
  return f"  {rec['target']:5s} {rec['case']} [{rec['mode']}] FAILED at {rec.get('stage')}: {first[:300]}"


def run(targets=None, kernels=None, *, match=None, quick=False, modes=None, jobs: int = 1,
        home=None, tpu_python=None, gpu_python=None, cases_modules=(), log=print,
        partial_path=None) -> Run:
  """Compiles the selected cases for the selected targets.

  Args:
    targets: target names (see :mod:`targets`), a comma-separated string, or None (defaults).
    kernels: family names (see :func:`cases.families`), or None for all.
    match: keep cases whose id contains this string.
    quick: only the CI subset.
    modes: ``("fwd",)``, ``("fwd+bwd",)`` or None (each case's own modes).
    jobs: workers (targets) compiling at once.
    home, tpu_python, gpu_python: compiler environments (see :func:`envs.ensure`).
    cases_modules: modules to import that register more case families.
    partial_path: a JSON file rewritten with the results so far each time a target finishes, so
      that an interrupted run keeps what it compiled.
    log: receives progress lines.

  Raises:
    ValueError: an unknown target, family or mode (the message lists the valid ones), or a
      selection with no case.
  """
  target_list = targets_lib.resolve(targets)
  cases_lib.load_modules(cases_modules)
  case_list = cases_lib.select(kernels, match=match, quick=quick)
  if modes is not None:
    if isinstance(modes, str):
      modes = [m.strip() for m in modes.split(",")]
    bad = [m for m in modes if m not in cases_lib.MODES]
    if bad:
      raise ValueError(f"modes must be among {cases_lib.MODES}, got {bad}")
  if not case_list:
    raise ValueError(f"no case matches kernels={kernels!r}, match={match!r}, quick={quick}; "
                     f"case ids look like {next(iter(cases_lib.all_cases()))!r}")
  started = time.time()
  environments, setup = {}, {}
  for platform in dict.fromkeys(t.platform for t in target_list):
    python = tpu_python if platform == targets_lib.TPU else gpu_python
    env = envs.ensure(platform, home=home, python=python, log=log)
    environments[platform] = env
    setup[platform] = dict(origin=env.origin, created=env.created, setup_s=round(env.setup_s, 1))
  with tempfile.TemporaryDirectory(prefix="compile_check_") as tmp:
    work = pathlib.Path(tmp)
    workers = [_Worker(t, environments[t.platform], _jobs_for(t, case_list, modes), work, log, cases_modules)
               for t in target_list]
    workers = [w for w in workers if w.pending]
    queue, running = list(workers), []
    try:
      while queue or running:
        while queue and len(running) < max(1, jobs):
          w = queue.pop(0)
          log(f"{w.target.name}: {len(w.pending)} compiles ({w.target.description})")
          w.start()
          running.append(w)
        time.sleep(0.5)
        still = [w for w in running if w.poll()]
        if partial_path and len(still) < len(running):
          pathlib.Path(partial_path).parent.mkdir(parents=True, exist_ok=True)
          pathlib.Path(partial_path).write_text(json.dumps(dict(
              done=[w.target.name for w in workers if w not in still and w not in queue],
              results=[r for w in workers for r in w.results]), indent=1))
        running = still
    finally:
      for w in running:  # Interrupted: leave no compiler running.
        if w.proc.poll() is None:
          w.proc.kill()
  meta = dict(
      date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      running_jax=envs.running_versions(), python=sys.version.split()[0],
      environments=setup, total_s=round(time.time() - started, 1),
      targets={w.target.name: dict(description=w.target.description, platform=w.target.platform,
                                   **w.info, cuda_tools=_tools(w.results)) for w in workers},
      selection=dict(kernels=kernels, match=match, quick=quick, modes=modes))
  results = [r for w in workers for r in w.results]
  return Run(results, meta)


def _tools(results):
  for r in results:
    if r.get("cuda_tools"):
      return r["cuda_tools"]
  return None


def violations(run: Run, *, spill_head_dim: int = SPILL_FREE_HEAD_DIM,
               spill_targets=SPILL_FREE_TARGETS) -> list[str]:
  """What fails the check: every compile failure, and every register spill of a project kernel
  at head dim <= ``spill_head_dim`` on ``spill_targets``."""
  out = []
  for r in run.results:
    where = f"{r['target']} {r['case']} [{r['mode']}]"
    if r["status"] != "compiled":
      kernels = ", ".join(k["name"] for k in r.get("kernels", []))
      out.append(f"{where}{f' (kernels {kernels})' if kernels else ''}: {r.get('stage')} failed: "
                 f"{r.get('error', '')}")
      continue
    if r["target"] in spill_targets and r["head_dim"] <= spill_head_dim:
      for k in r.get("kernels", []):
        if k.get("spill_stores") or k.get("spill_loads"):
          out.append(f"{where}: kernel {k['name']} spills {k['spill_stores']} B stores / "
                     f"{k['spill_loads']} B loads ({k['registers']} registers)")
  return out
