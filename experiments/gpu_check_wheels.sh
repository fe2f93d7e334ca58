#!/usr/bin/env bash
# Fetches tokamax and the packages it needs that the GPU machine's image lacks (about 6 MB of
# wheels for Python 3.12) into .whl/, which git ignores and `carry` takes to the GPU machine,
# where experiments/gpu_check.sh installs them. Run from the repository root, with network access.
set -euo pipefail
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.whl/' "$exclude" 2> /dev/null || echo '/.whl/' >> "$exclude"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  tokamax==0.0.17 qwix==0.1.8 einshape==1.0 immutabledict==4.3.1 tensorboardx==2.6.5 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  "typing-extensions>=4.16"
du -sh .whl
