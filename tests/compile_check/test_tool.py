"""The compile check's own logic, without the compilers: arguments, case registry, log parsing,
worker environment and the pass / fail rule."""

import os
import pathlib

import pytest

from attn_jax.compile_check import __main__ as cli
from attn_jax.compile_check import cases as cases_lib
from attn_jax.compile_check import envs
from attn_jax.compile_check import parse
from attn_jax.compile_check import report
from attn_jax.compile_check import runner
from attn_jax.compile_check import targets as targets_lib


@pytest.mark.parametrize("args,message", [
    (["--targets", "h100,h101"], "targets must be names among ['a100', 'b200', 'h100', 'h200', 'v4', "
                                 "'v5e', 'v5p', 'v6e'] (or 'all'), got 'h101'"),
    (["--kernels", "softmax,cudnn"], "kernels must be names among ['linear', 'neighborhood', 'softmax'], "
                                     "got 'cudnn'"),
    (["--match", "no-such-case"], "no case matches"),
    (["--modes", "bwd"], "modes must be among ('fwd', 'fwd+bwd')"),
    (["--cases-module", "tests.compile_check.no_such_module"], "No module named"),
])
def test_bad_arguments_name_the_valid_values(args, message, capsys, tmp_path):
  assert cli.main(args + ["--out", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err


def test_case_registry_covers_the_issue_matrix():
  cases = cases_lib.all_cases().values()
  assert set(cases_lib.families()) >= {"softmax", "neighborhood", "linear"}
  for family in ("softmax", "neighborhood", "linear"):
    mine = [c for c in cases if c.family == family]
    assert {c.head_dim for c in mine} == {64, 128, 256}, family
    assert {c.dtype for c in mine} >= {"bfloat16", "float32"}, family
    assert all(cases_lib.FWD_BWD in c.modes for c in mine)
    assert any(c.quick for c in mine)
  names = " ".join(c.id for c in cases)
  for feature in ("gqa", "mqa", "cross", "window-sinks", "layout-tiles", "1d-", "2d-", "3d-",
                  "none-", "fixed-", "step-", "channel-", "f16"):
    assert feature in names, feature
  assert any(cases_lib.FWD in c.modes for c in cases)
  # Lengths that are multiples of no kernel block (blocks are powers of two or multiples of 128).
  assert any(i.name == "q" and i.shape[1] % 2 for c in cases for i in c.inputs)


def test_case_validation():
  with pytest.raises(ValueError, match="grad names"):
    cases_lib.Case("x", "y", 64, "float32", inputs=(cases_lib.Input("q", (1,), "float32"),), grad=("k",),
                   call=lambda p, x: x["q"])
  with pytest.raises(ValueError, match="already registered"):
    cases_lib.register_family("softmax", lambda: iter(()))


_PTXAS_LOG = """\
I1129 subprocess_compilation.cc:201] Using /venv/lib/python3.11/site-packages/nvidia/cuda_nvcc/bin/ptxas with version 12.9.86
I1129 subprocess_compilation.cc:201] Using /usr/local/cuda/bin/nvlink with version 13.0.88
I1129 subprocess_compilation.cc:313] /venv/lib/python3.11/site-packages/nvidia/cuda_nvcc/bin/ptxas /tmp/x -o /tmp/y -arch=sm_90a --warn-on-spills -v
I1129 subprocess_compilation.cc:349] ptxas warning : Registers are spilled to local memory in function 'flash_dkv_gpu', 56 bytes spill stores, 52 bytes spill loads
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'flash_dkv_gpu' for 'sm_90a'
ptxas info    : Function properties for flash_dkv_gpu
    56 bytes stack frame, 56 bytes spill stores, 52 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 56 bytes cumulative stack size
I1129 subprocess_compilation.cc:356] ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'loop_broadcast_fusion' for 'sm_90a'
ptxas info    : Function properties for loop_broadcast_fusion
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers
"""


def test_ptxas_reports_and_tools():
  reports = parse.ptxas_reports(_PTXAS_LOG)
  assert reports[0] == dict(name="flash_dkv_gpu", arch="sm_90a", registers=255, spill_stores=56,
                            spill_loads=52, stack=56)
  assert reports[1]["name"] == "loop_broadcast_fusion" and reports[1]["registers"] == 8
  tools = parse.cuda_tools(_PTXAS_LOG)
  assert tools["ptxas"]["ran"] and tools["ptxas"]["version"] == "12.9.86"
  assert tools["nvlink"] == dict(path="/usr/local/cuda/bin/nvlink", version="13.0.88", ran=False)


def test_dump_parsing(tmp_path):
  (tmp_path / "m.before_optimizations.txt").write_text(
      '%a = custom-call(), metadata={op_name="jit(loss)/jvp(flash_fwd_gpu)/pallas_call"}\n'
      '%b = custom-call(), metadata={op_name="jit(loss)/transpose(jvp(flash_dq_gpu))/pallas_call"}\n')
  assert parse.pallas_names(tmp_path) == ["flash_fwd_gpu", "flash_dq_gpu"]
  (tmp_path / "m.thunk_sequence.txt").write_text(
      "002: kCustomKernel [prev=001 (1) | next=003 (1)] flash_fwd_gpu grid: [32, 1, 8] threads: [256, 1, 1]"
      "  shared_memory: 65536 bytes\n")
  assert parse.gpu_shared_memory(tmp_path) == {"flash_fwd_gpu": 65536}
  (tmp_path / "m.after_codegen.txt").write_text(
      '%f = custom-call(), custom_call_target="tpu_custom_call", backend_config={"used_scoped_memory_configs":'
      '[{"memory_space":"1","offset":"0","size":"2215936"},{"memory_space":"0","size":"7"}]}, '
      'metadata={op_name="jit(loss)/jvp(flash_fwd_tpu)/pallas_call"}\n')
  assert parse.tpu_scoped_vmem(tmp_path) == {"flash_fwd_tpu": 2215936}
  assert parse.match_kernel("flash_dq_gpu", ["flash_dq_gpu_1"]) == "flash_dq_gpu_1"
  assert parse.match_kernel("flash_dq_gpu", ["flash_dq_gpu_x"]) is None


def test_error_summary_drops_the_traceback():
  text = ("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
          "jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Shared memory size limit exceeded\n"
          "--------------------\nFor simplicity, JAX has removed its internal frames\n")
  assert parse.error_summary(text) == "jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Shared memory size limit exceeded"


def test_worker_environment_uses_the_pip_ptxas(tmp_path, monkeypatch):
  toolkit = tmp_path / "cuda" / "bin"
  toolkit.mkdir(parents=True)
  (toolkit / "ptxas").write_text("#!/bin/sh\n")
  (toolkit / "ptxas").chmod(0o755)
  venv = tmp_path / "venv"
  wheel_bin = venv / "lib" / "python3.11" / "site-packages" / "nvidia" / "cuda_nvcc" / "bin"
  wheel_bin.mkdir(parents=True)
  monkeypatch.setenv("PATH", f"{toolkit}{os.pathsep}/usr/bin")
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
  env = envs.worker_environ("gpu", venv / "bin" / "python")
  assert env["PATH"].split(os.pathsep) == [str(wheel_bin), "/usr/bin"]
  assert "XLA_FLAGS" not in env and env["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] == "1"
  assert env["PYTHONPATH"] == str(envs.SOURCE_ROOT)
  assert pathlib.Path(env["PYTHONPATH"], "attn_jax", "compile_check").is_dir()


def test_requirements_pin_the_running_jax():
  v = envs.running_versions()
  assert envs.requirements("tpu") == [f"jax[tpu]=={v['jax']}", f"jaxlib=={v['jaxlib']}"]
  assert f"jax-cuda12-plugin=={v['jaxlib']}" in envs.requirements("gpu")
  assert "nvidia-cuda-nvcc-cu12" in envs.requirements("gpu")


def _record(target, head_dim, spill, status="compiled"):
  return dict(target=target, case=f"softmax/c-d{head_dim}", family="softmax", mode="fwd+bwd",
              head_dim=head_dim, dtype="bfloat16", status=status, compile_s=1.0, error="boom", stage="compile",
              kernels=[dict(name="flash_dkv_gpu", registers=255, spill_stores=spill, spill_loads=spill,
                            smem_bytes=1024)])


def test_the_rule_fails_on_errors_and_on_spills_at_small_head_dims():
  ok = runner.Run([_record("h100", 128, 0), _record("a100", 256, 40), _record("b200", 64, 8)], {})
  assert runner.violations(ok) == []
  bad = runner.Run([_record("a100", 128, 16), _record("v5e", 64, 0, status="failed")], {})
  problems = runner.violations(bad)
  assert len(problems) == 2
  assert "a100 softmax/c-d128 [fwd+bwd]: kernel flash_dkv_gpu spills 16 B" in problems[0]
  assert "v5e softmax/c-d64 [fwd+bwd] (kernels flash_dkv_gpu): compile failed: boom" == problems[1]
  rows = report.headline(runner.Run([_record("h100", 128, 0), _record("h100", 256, 40)], {}))
  assert rows[2] == "| h100 | 2/2 compiled | none | 1 kernels (40 B): flash_dkv_gpu |"


def test_targets():
  assert [t.name for t in targets_lib.resolve("v5e,h100")] == ["v5e", "h100"]
  assert len(targets_lib.resolve("all")) == len(targets_lib.TARGETS)
  for t in targets_lib.TARGETS.values():
    if t.platform == "gpu":
      assert "cuda_compute_capability" in t.gpu_config_text()
