"""Test-wide setup: eight fake CPU devices for sharding tests, deterministic hypothesis profile."""

import os

# Must be set before jax initialises its backends; conftest is imported before any test module.
# Eight fake CPU devices serve the sharding tests. The test programs are tiny and compiled once
# each, so XLA's CPU optimisation passes cost more than they save: turning them off halves the
# suite's compile time without changing what is computed.
_FLAGS = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
          "--xla_llvm_disable_expensive_passes=true")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAGS).strip()

import hypothesis  # noqa: E402

hypothesis.settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
  parser.addoption("--gpu", action="store_true", default=False,
                   help="run the tests marked gpu: the GPU kernels for real, against the reference "
                        "(needs an NVIDIA GPU; see experiments/gpu_check.sh)")


def pytest_collection_modifyitems(config, items):
  # The gpu tests need a GPU, which CI does not have: without --gpu they are deselected (the
  # summary counts them), never collected-and-skipped. With --gpu on a machine without a GPU,
  # each one skips naming the reason.
  if config.getoption("--gpu"):
    return
  kept = [item for item in items if item.get_closest_marker("gpu") is None]
  if len(kept) < len(items):
    config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("gpu")])
    items[:] = kept
