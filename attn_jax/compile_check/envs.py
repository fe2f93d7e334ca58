"""The compiler environments: one virtual environment per platform, created once and cached.

The TPU compiler (libtpu) and the GPU one (XLA:GPU in the CUDA plugin, with ptxas from NVIDIA's
``nvidia-cuda-nvcc-cu12`` wheel) cannot share a Python environment with each other or with a
CPU jax, so each lives in its own venv, pinned to the jax / jaxlib version of the interpreter that
runs the check. The venvs hold jax, its compiler and numpy only; the worker imports attn_jax and
pallas_kernels from the source tree through ``PYTHONPATH``.

Where they live: ``$ATTN_JAX_COMPILE_CHECK_HOME`` if set, else ``.compile_check/`` at the root of
a source checkout (gitignored), else ``~/.cache/attn_jax/compile_check``. An existing interpreter
can be used instead (``--tpu-python`` / ``--gpu-python`` or ``$ATTN_JAX_TPU_PYTHON`` /
``$ATTN_JAX_GPU_PYTHON``), e.g. a venv that a developer already has.

Standard library only (this runs before any compiler environment exists).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib.metadata
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

from attn_jax.compile_check import targets as targets_lib

# Where attn_jax and pallas_kernels are imported from in the workers.
SOURCE_ROOT = pathlib.Path(__file__).resolve().parents[2]
# Tools that a CUDA toolkit on the PATH would offer XLA in place of the pip-installed ones.
_CUDA_TOOLS = ("ptxas", "nvlink", "nvcc", "fatbinary")
_PYTHON_ENV = {targets_lib.TPU: "ATTN_JAX_TPU_PYTHON", targets_lib.GPU: "ATTN_JAX_GPU_PYTHON"}


def running_versions() -> dict[str, str]:
  """The jax and jaxlib versions of this interpreter, to which the venvs are pinned."""
  return {name: importlib.metadata.version(name) for name in ("jax", "jaxlib")}


def requirements(platform: str, versions: dict[str, str] | None = None) -> list[str]:
  """pip requirements of the compiler environment of ``platform``."""
  v = versions or running_versions()
  if platform == targets_lib.TPU:
    # jax[tpu] pins jaxlib and the libtpu release built for this jax.
    return [f"jax[tpu]=={v['jax']}", f"jaxlib=={v['jaxlib']}"]
  if platform == targets_lib.GPU:
    return [f"jax=={v['jax']}", f"jaxlib=={v['jaxlib']}", f"jax-cuda12-plugin=={v['jaxlib']}",
            "nvidia-cuda-nvcc-cu12"]
  raise ValueError(f"platform must be 'tpu' or 'gpu', got {platform!r}")


def default_home() -> pathlib.Path:
  if os.environ.get("ATTN_JAX_COMPILE_CHECK_HOME"):
    return pathlib.Path(os.environ["ATTN_JAX_COMPILE_CHECK_HOME"])
  if (SOURCE_ROOT / "pyproject.toml").exists() and (SOURCE_ROOT / "attn_jax").is_dir():
    return SOURCE_ROOT / ".compile_check"
  return pathlib.Path.home() / ".cache" / "attn_jax" / "compile_check"


@dataclasses.dataclass(frozen=True)
class Environment:
  """A compiler environment ready for workers.

  Attributes:
    platform: ``"tpu"`` or ``"gpu"``.
    python: its interpreter.
    created: whether this call created it (False: cached or given).
    setup_s: seconds spent creating it (0 when cached or given).
    origin: where it came from, for the report ("created", "cached", or the given path's source).
  """

  platform: str
  python: pathlib.Path
  created: bool
  setup_s: float
  origin: str


@contextlib.contextmanager
def _locked(path: pathlib.Path):
  # Parallel test workers (pytest -n) may ask for the same venv at once: one creates it.
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _venv_python(venv: pathlib.Path) -> pathlib.Path:
  return venv / "bin" / "python"


def ensure(platform: str, *, home: pathlib.Path | None = None, python: str | None = None,
           log=print) -> Environment:
  """The compiler environment of ``platform``: given, cached, or created now.

  Args:
    platform: ``"tpu"`` or ``"gpu"``.
    home: folder of the cached venvs (default :func:`default_home`).
    python: an existing interpreter to use as is (default ``$ATTN_JAX_TPU_PYTHON`` /
      ``$ATTN_JAX_GPU_PYTHON``, else a venv of our own).
    log: receives one line per step.

  Raises:
    RuntimeError: pip failed; the message ends with pip's own output.
  """
  reqs = requirements(platform)
  python = python or os.environ.get(_PYTHON_ENV[platform])
  if python:
    path = pathlib.Path(python)
    if not path.exists():
      raise ValueError(f"the {platform} python {python!r} does not exist")
    return Environment(platform, path, False, 0.0, f"given: {python}")
  home = pathlib.Path(home) if home is not None else default_home()
  versions = running_versions()
  venv = home / f"{platform}-jax{versions['jax']}"
  marker = venv / "attn_jax_ready.json"
  with _locked(home / f"{platform}.lock"):
    if marker.exists() and json.loads(marker.read_text()).get("requirements") == reqs:
      return Environment(platform, _venv_python(venv), False, 0.0, f"cached: {venv}")
    log(f"creating the {platform} compiler environment in {venv}: pip install {' '.join(reqs)}")
    start = time.time()
    if venv.exists():
      shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip_log = venv / "pip.log"
    with open(pip_log, "w") as out:
      proc = subprocess.run([str(_venv_python(venv)), "-m", "pip", "install", "--quiet", *reqs],
                            stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode:
      tail = pip_log.read_text()[-3000:]
      raise RuntimeError(f"pip install {' '.join(reqs)} failed for the {platform} compiler "
                         f"environment ({venv}):\n{tail}")
    seconds = time.time() - start
    marker.write_text(json.dumps({"requirements": reqs, "setup_s": seconds}))
    log(f"created the {platform} compiler environment in {seconds:.0f} s")
    return Environment(platform, _venv_python(venv), True, seconds, f"created: {venv}")


def _has_cuda_tool(folder: str) -> bool:
  return any(os.access(os.path.join(folder, t), os.X_OK) for t in _CUDA_TOOLS)


def worker_environ(platform: str, python: pathlib.Path) -> dict[str, str]:
  """Environment variables of a worker process.

  Inherited XLA and jax settings are dropped (a test suite's CPU flags must not reach the GPU
  compiler). For GPU workers, folders of the PATH that hold a CUDA toolkit's ptxas / nvlink /
  nvcc are removed and the pip wheel's ``bin`` put first, so that the ptxas that runs is the
  pip-installed one, as on a user's machine without CUDA; XLA's log, which the worker reads, says
  which binaries it found.
  """
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("XLA_", "JAX_", "TF_CPP_", "CUDA_", "PYTHON"))}
  env["PYTHONPATH"] = str(SOURCE_ROOT)
  # The compilers need no device; a CPU backend keeps jax from probing for one.
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "0"
  if platform == targets_lib.TPU:
    # libtpu takes a machine-wide lock file unless told otherwise; compile-only processes share
    # no device, so several may run at once (--jobs, or other users of the machine).
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
  if platform == targets_lib.GPU:
    env["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
    # XLA logs each ptxas run with its -v report (registers, spills) at this level.
    env["TF_CPP_VMODULE"] = "subprocess_compilation=3"
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and not _has_cuda_tool(p)]
    wheel_bins = sorted(python.parent.parent.glob("lib/python3*/site-packages/nvidia/cuda_nvcc/bin"))
    env["PATH"] = os.pathsep.join([str(p) for p in wheel_bins] + path)
  return env
