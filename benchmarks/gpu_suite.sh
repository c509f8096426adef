#!/usr/bin/env bash
# The GPU counterpart of benchmarks/cpu_suite.sh (GRIN's full shapes: hidden 4096, expert ffn 6400,
# 16 experts, top-2, 16k tokens, bf16). Not run yet: no GPU was available when docs/performance.md was written.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
bench() { python -m megatron_grin bench "$@" --device cuda --out-dir "$OUT"; }

bench moe-layer --reps 20 --name moe-layer-gpu-bf16
bench moe-layer --imbalance 3 --reps 20 --name moe-layer-gpu-bf16-imbalance3
bench moe-layer --hf-experts grouped_mm --baselines hf --backends grouped_mm --reps 20 --name moe-layer-gpu-bf16-hf-grouped
bench routing --reps 50 --name routing-gpu-bf16
for backend in sequential grouped_mm te_grouped; do
  bench model --backends "$backend" --layers 4 --tokens 8192 --reps 10 --name "model-gpu-bf16-$backend"
done
