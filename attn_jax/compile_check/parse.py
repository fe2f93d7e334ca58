"""Reading what the compilers said: ptxas reports, XLA dumps and error messages.

* GPU registers and spills: XLA logs every ``ptxas -v`` run (``TF_CPP_VMODULE=
  subprocess_compilation=3``); each entry function's report names it and gives its spill stores /
  loads and registers. The same log says which ptxas (and nvlink) binary XLA found.
* GPU shared memory: the ``*thunk_sequence.txt`` file of an ``xla_dump_to`` dump lists every
  kernel launch with its dynamic shared memory.
* TPU scoped VMEM: each ``tpu_custom_call`` of the ``*after_codegen.txt`` dump carries
  ``used_scoped_memory_configs`` (memory space 1 is VMEM).
* Which kernels are the project's: each ``pallas_call`` leaves ``<name>)/pallas_call`` in the
  op_name metadata of the HLO before optimisation.

Standard library only.
"""

from __future__ import annotations

import json
import pathlib
import re

_PTXAS_REPORT = re.compile(
    r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>[^']+)'\s*\n"
    r"ptxas info\s*: Function properties for \S+\s*\n"
    r"\s*(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads"
    r"\s*\nptxas info\s*: Used (?P<regs>\d+) registers")
_TOOL_FOUND = re.compile(r"Using (?P<path>\S+/(?P<tool>ptxas|nvlink)) with version (?P<version>\S+)")
_TOOL_RUN = re.compile(r"subprocess_compilation\.cc:\d+\] (?P<path>\S+/(?P<tool>ptxas|nvlink)) ")
_THUNK = re.compile(r"kCustomKernel \[[^\]]*\] (?P<name>\S+) grid: .*?shared_memory: (?P<smem>\d+) bytes")
_PALLAS_NAME = re.compile(r'op_name="[^"]*?(?P<name>[A-Za-z_][\w.-]*)\)*/pallas_call')
_SCOPED = re.compile(r'"used_scoped_memory_configs":\[(?P<configs>[^\]]*)\]')


def ptxas_reports(log: str) -> list[dict]:
  """One dict per ptxas entry-function report: name, arch, registers, spill bytes, stack."""
  return [dict(name=m["name"], arch=m["arch"], registers=int(m["regs"]), spill_stores=int(m["stores"]),
               spill_loads=int(m["loads"]), stack=int(m["stack"])) for m in _PTXAS_REPORT.finditer(log)]


def cuda_tools(log: str) -> dict[str, dict]:
  """``{tool: {"path", "version", "ran"}}`` for the ptxas / nvlink binaries XLA found.

  ``ran`` says whether XLA executed the tool (it locates nvlink even when it never links).
  """
  tools = {}
  for m in _TOOL_FOUND.finditer(log):
    tools[m["tool"]] = dict(path=m["path"], version=m["version"], ran=False)
  for m in _TOOL_RUN.finditer(log):
    if m["tool"] in tools and tools[m["tool"]]["path"] == m["path"]:
      tools[m["tool"]]["ran"] = True
  return tools


def _files(dump: pathlib.Path, suffix: str) -> list[pathlib.Path]:
  return sorted(p for p in pathlib.Path(dump).glob(f"*{suffix}"))


def pallas_names(dump: pathlib.Path) -> list[str]:
  """Names of the pallas_calls in the program (HLO before optimisation), in order, deduplicated."""
  names = []
  for f in _files(dump, "before_optimizations.txt"):
    names += [m["name"] for m in _PALLAS_NAME.finditer(f.read_text())]
  return list(dict.fromkeys(names))


def gpu_shared_memory(dump: pathlib.Path) -> dict[str, int]:
  """``{kernel launch name: dynamic shared memory bytes}`` from the thunk sequence."""
  out = {}
  files = [f for f in _files(dump, "thunk_sequence.txt")]
  for f in files[:1]:
    for m in _THUNK.finditer(f.read_text()):
      out[m["name"]] = max(out.get(m["name"], 0), int(m["smem"]))
  return out


def tpu_scoped_vmem(dump: pathlib.Path) -> dict[str, int]:
  """``{pallas kernel name: scoped VMEM bytes}`` (the largest over its launches)."""
  out = {}
  for f in _files(dump, "after_codegen.txt"):
    for line in f.read_text().splitlines():
      if 'custom_call_target="tpu_custom_call"' not in line:
        continue
      name = _PALLAS_NAME.search(line)
      scoped = _SCOPED.search(line)
      if not name or not scoped:
        continue
      vmem = sum(int(c.get("size", 0)) for c in json.loads(f"[{scoped['configs']}]")
                 if str(c.get("memory_space")) == "1")
      out[name["name"]] = max(out.get(name["name"], 0), vmem)
  return out


def match_kernel(name: str, launches) -> str | None:
  """The launch (ptxas entry / thunk) name of pallas kernel ``name``: itself, or XLA's
  deduplicated ``name_1``, ``name.1`` variants."""
  for launch in launches:
    if launch == name or re.fullmatch(re.escape(name) + r"[._]\d+", launch):
      return launch
  return None


def error_summary(message: str, limit: int = 2000) -> str:
  """The compiler's own message without Python's traceback and jax's internal-frames note."""
  lines = [l for l in message.strip().splitlines()
           if l.strip() and not l.startswith(("Traceback", "  File ", "--------------------"))
           and "internal frames" not in l]
  text = "\n".join(lines)
  return text if len(text) <= limit else text[:limit] + " ..."
