#!/usr/bin/env bash
# Issue 12, part B, in one GPU run: the GPU kernel tests (tests/gpu, real kernels against the
# reference), then the benchmark sweep (experiments/gpu_check.py), within BUDGET_S seconds.
#
#   bash experiments/gpu_check.sh [BUDGET_S]        # default 480 s; run from the repository root
#
# Results go to $OUT (default gpu_check_out/): nvidia_smi.txt, gpu_tests.log, gpu_tests.xml,
# gpu_check.log, gpu_check.json, gpu_check.md (the sweep also writes benchmarks/gpu_<device>/).
# tokamax is compared when its wheels are in .whl/ (fetch them first with
# experiments/gpu_check_wheels.sh on a machine with network access, and carry .whl along).
set -uo pipefail
budget=${1:-480}
start=$(date +%s)
out=${OUT:-gpu_check_out}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# The tests run in 4 processes on one GPU: each takes memory as it needs it, not 75% up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

if compgen -G ".whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  # tokamax imports xprof (a 32 MB profiler with a dozen dependencies of its own) for its
  # benchmarking helpers only; its attention kernels run without it, so a stub stands in.
  if ! "$py" -c "import xprof" 2> /dev/null; then
    mkdir -p /tmp/site/xprof/cli
    : > /tmp/site/xprof/__init__.py
    : > /tmp/site/xprof/cli/__init__.py
    echo "get_kernel_stats_tool = None" > /tmp/site/xprof/cli/tools.py
  fi
fi
nvidia-smi > "$out/nvidia_smi.txt" 2>&1 || echo "nvidia-smi failed" >> "$out/nvidia_smi.txt"

test_budget=$(( budget * 35 / 100 ))
timeout -k 10 "$test_budget" "$py" -m pytest --gpu -m gpu tests/gpu -n 4 --dist loadgroup -q -p no:cacheprovider -rfE \
  --junitxml="$out/gpu_tests.xml" > "$out/gpu_tests.log" 2>&1
echo "gpu tests: exit $? after $(( $(date +%s) - start )) s (timeout exit is 124)"
tail -n 25 "$out/gpu_tests.log"

left=$(( start + budget - $(date +%s) - 20 ))
# GPU_CHECK_ARGS: extra flags, e.g. --tiny for a dry run of the whole script on a CPU.
timeout -k 10 $(( left + 60 )) "$py" -m experiments.gpu_check --out "$out" --budget_s "$left" ${GPU_CHECK_ARGS:-} \
  > "$out/gpu_check.log" 2>&1
echo "sweep: exit $? after $(( $(date +%s) - start )) s"
# The reply of a device run carries the last 12,000 characters of output: the report's head.
if [ -f "$out/gpu_check.md" ]; then head -c 9000 "$out/gpu_check.md"; else tail -n 40 "$out/gpu_check.log"; fi
