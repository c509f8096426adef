#!/usr/bin/env bash
# Put the megatron-core wheel for the GPU machine's Python into .whl/ (git-ignored), on a machine with PyPI.
# The GPU machine has no network and no megatron-core; benchmarks/gpu_check.sh installs this wheel there
# into a temporary folder (shared/notes/gpu-environment.md).
#
#   bash benchmarks/fetch_megatron_wheel.sh            # megatron-core 0.16.1 for CPython 3.12, manylinux x86-64
#   MCORE_VERSION=0.16.1 PY_VERSION=3.12 bash benchmarks/fetch_megatron_wheel.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MCORE_VERSION=${MCORE_VERSION:-0.16.1}
PY_VERSION=${PY_VERSION:-3.12}
PY=${PYTHON:-python3}
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d .whl "megatron-core==$MCORE_VERSION"
ls -l .whl/megatron_core-"$MCORE_VERSION"-*.whl
