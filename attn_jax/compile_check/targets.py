"""The hardware the compile check compiles for: TPU topologies and NVIDIA GPU descriptions.

A TPU target is a libtpu topology name (libtpu knows each generation's VMEM, SMEM and layouts).
A GPU target is a ``GpuTargetConfigProto`` in text form, kept beside this file in ``targets/``:
the compute capability selects ``ptxas -arch`` and the shared-memory and register limits are the
ones XLA and Triton check against. Both are compiled for without the device (XLA's deviceless,
ahead-of-time compilation). Standard library only: the orchestrator imports it before any
compiler environment exists.
"""

from __future__ import annotations

import dataclasses
import pathlib

TPU = "tpu"
GPU = "gpu"

_TARGET_DIR = pathlib.Path(__file__).resolve().parent / "targets"


@dataclasses.dataclass(frozen=True)
class Target:
  """One compile target.

  Attributes:
    name: the command-line name, e.g. ``"v5e"`` or ``"h100"``.
    platform: ``"tpu"`` or ``"gpu"``; selects the compiler environment (libtpu or the CUDA plugin).
    topology: TPU only, the libtpu topology name given to ``get_topology_desc``.
    config_file: GPU only, the ``GpuTargetConfigProto`` text file in ``targets/``.
    description: what the target is, for the report.
  """

  name: str
  platform: str
  description: str
  topology: str | None = None
  config_file: str | None = None

  def gpu_config_text(self) -> str:
    """The target description handed to XLA (GPU targets only)."""
    if self.config_file is None:
      raise ValueError(f"target {self.name!r} is not a GPU target")
    return (_TARGET_DIR / self.config_file).read_text()


TARGETS: dict[str, Target] = {}


def register(target: Target) -> Target:
  """Adds a target; its name must be new."""
  if target.name in TARGETS:
    raise ValueError(f"target {target.name!r} is already registered")
  if target.platform not in (TPU, GPU):
    raise ValueError(f"Target.platform must be 'tpu' or 'gpu', got {target.platform!r}")
  TARGETS[target.name] = target
  return target


register(Target("v4", TPU, "TPU v4", topology="v4:2x2x1"))
register(Target("v5e", TPU, "TPU v5e (v5 lite)", topology="v5e:2x2"))
register(Target("v5p", TPU, "TPU v5p", topology="v5p:2x2x1"))
register(Target("v6e", TPU, "TPU v6e (Trillium)", topology="v6e:2x2"))
register(Target("a100", GPU, "NVIDIA A100 SXM 80 GB, sm_80", config_file="a100.txtpb"))
register(Target("h100", GPU, "NVIDIA H100 SXM 80 GB, sm_90a", config_file="h100.txtpb"))
register(Target("h200", GPU, "NVIDIA H200 141 GB, sm_90a (the H100's SM)", config_file="h200.txtpb"))
register(Target("b200", GPU, "NVIDIA B200, sm_100a", config_file="b200.txtpb"))

# The targets run by default: the four TPU generations, A100 and H100. h200 compiles exactly as
# h100 (the same SM and limits) and b200 (sm_100a) has not been through the matrix yet: both on
# request (--targets ..., or all).
DEFAULT = ("v4", "v5e", "v5p", "v6e", "a100", "h100")


def resolve(names) -> list[Target]:
  """Targets by name (``"all"`` for every registered one); ValueError naming the valid names."""
  if names is None:
    names = DEFAULT
  if isinstance(names, str):
    names = [n.strip() for n in names.split(",") if n.strip()]
  if list(names) == ["all"]:
    return list(TARGETS.values())
  unknown = [n for n in names if n not in TARGETS]
  if unknown or not names:
    raise ValueError(f"targets must be names among {sorted(TARGETS)} (or 'all'), got "
                     f"{', '.join(map(repr, unknown)) if unknown else 'none'}")
  return [TARGETS[n] for n in dict.fromkeys(names)]
