"""The ring form of context-parallel attention compiles for a 4-chip TPU v5e (``v5e:2x2``) at
128k tokens with the real TPU compiler (libtpu, deviceless, no TPU needed), and fits a v5e
chip's 16 GiB HBM. Slow (about a minute) and needs a venv with ``jax[tpu]``: set
``ATTN_JAX_TPU_VENV`` (default ``/work/venvs/tpu``). The committed result of the same script is
``benchmarks/context_parallel/``."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
VENV = pathlib.Path(os.environ.get("ATTN_JAX_TPU_VENV", "/work/venvs/tpu"))
V5E_HBM = 16 * 2**30


@pytest.mark.slow
def test_ring_compiles_for_v5e_2x2_at_128k_tokens(tmp_path):
  python = VENV / "bin" / "python"
  if not python.exists():
    pytest.skip(f"no jax[tpu] venv at {VENV} (set ATTN_JAX_TPU_VENV)")
  out = tmp_path / "result.json"
  env = dict(os.environ, PYTHONPATH=str(REPO), ALLOW_MULTIPLE_LIBTPU_LOAD="1", JAX_PLATFORMS="")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([str(python), str(REPO / "benchmarks/context_parallel/tpu_compile.py"), "--topology",
                         "v5e:2x2", "--tokens", "131072", "--strategy", "ring", "--passes", "forward",
                         "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  (result,) = json.loads(out.read_text())["results"]
  assert (result["chips"], result["tokens_per_chip"], result["strategy"]) == (4, 32768, "ring")
  assert result["plan"]["ring_steps"] == 4 and result["plan"]["load_balance"] == "zigzag"
  assert 0 < result["memory_per_chip"]["total_bytes"] < V5E_HBM
