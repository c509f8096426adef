#!/usr/bin/env bash
# The GPU counterpart of benchmarks/cpu_suite.sh: GRIN's full shapes (hidden 4096, expert ffn 6400, 16 experts,
# top-2, 16k tokens, bf16) on one GPU. ~10 min on an H200 (most of it the Triton autotuning in the warm-ups).
# What each run answers (docs/performance.md, "GPU"):
#   bench_grouped_gemm  torch grouped_mm vs the Triton grouped GEMMs per GEMM, vs a dense GEMM of the same FLOPs:
#                       the "triton/torch" column decides grin_grouped_gemm's default
#   moe-layer           the layer vs the dense SwiGLU (target <= 1.11x, <= 1.15x with --imbalance 3) and megatron;
#                       grouped_mm and grouped_triton rows side by side, the unfused path for the fusion speed-up
#   routing             the router's share of the layer (target <= 5 %), fused and unfused
#   model               4 GRIN layers vs the dense GPT with the same active parameters (target >= 0.90, MFU >= 40 %)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
bench() { python -m megatron_grin bench "$@" --device cuda --out-dir "$OUT"; }

python benchmarks/bench_grouped_gemm.py --reps 20 | tee "$OUT/grouped-gemm-gpu-bf16.txt"
bench moe-layer --reps 20 --backends grouped_mm,grouped_triton,unfused,sequential --name moe-layer-gpu-bf16
bench moe-layer --imbalance 3 --reps 20 --backends grouped_mm,grouped_triton,sequential \
  --name moe-layer-gpu-bf16-imbalance3
bench moe-layer --reps 5 --backends grouped_mm --baselines dense --profile "$OUT/traces" --name moe-layer-gpu-bf16-trace
bench routing --reps 50 --backends grouped_mm --name routing-gpu-bf16
for backend in grouped_mm grouped_triton; do
  bench model --backends "$backend" --layers 4 --tokens 16384 --reps 10 --name "model-gpu-bf16-$backend"
done
bench model --backends grouped_mm --layers 4 --tokens 16384 --reps 3 --profile "$OUT/traces" --name model-gpu-bf16-trace
python benchmarks/summarize.py "$OUT" > "$OUT/SUMMARY.md"
