#!/usr/bin/env bash
# Create or reuse the project virtualenv (.venv) with CPU torch 2.13.0 and megatron-grin installed.
# Sourced by tests/run.sh and launch/local.sh; safe to source repeatedly.
_grin_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_grin_venv="${GRIN_VENV:-$_grin_root/.venv}"
_grin_stamp="$_grin_venv/.grin-installed"
if [ ! -x "$_grin_venv/bin/python" ]; then
  python3 -m venv "$_grin_venv"
fi
# shellcheck disable=SC1091
source "$_grin_venv/bin/activate"
_grin_hash="$(cat "$_grin_root/pyproject.toml" | sha1sum | cut -c1-12)"
if [ ! -f "$_grin_stamp" ] || [ "$(cat "$_grin_stamp")" != "$_grin_hash" ]; then
  # Install torch first, pinned, so that nothing below can pull a CUDA build on a CPU machine.
  if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "torch==${GRIN_TORCH_VERSION:-2.13.0}"
  fi
  python -m pip install -q -e "$_grin_root[test]"
  echo "$_grin_hash" > "$_grin_stamp"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
# megatron-core says once per module that Transformer Engine / Apex are missing; nothing else is silenced
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore:Transformer Engine and Apex are not installed:UserWarning}"
unset _grin_root _grin_venv _grin_stamp _grin_hash
