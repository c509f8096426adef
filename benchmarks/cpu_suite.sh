#!/usr/bin/env bash
# Every CPU number in docs/performance.md: bash benchmarks/cpu_suite.sh  (~45 min on 2 cores).
#
# The primary runs use one thread and report process CPU time (--threads 1 --clock cpu): on a machine
# shared with other jobs, wall time with 2 OpenMP threads swings by 2-5x (a descheduled thread stalls
# every parallel region), while single-thread CPU time stays within a few percent. The default
# configuration (2 threads, wall time) is run too, for reference.
# Both allocators: glibc (default) and jemalloc (Debian: apt-get install -y libjemalloc2).
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
JEMALLOC=${JEMALLOC:-/usr/lib/x86_64-linux-gnu/libjemalloc.so.2}
OUT=${OUT:-benchmarks/results}
bench() { python -m megatron_grin bench "$@" --out-dir "$OUT"; }
ONE=(--threads 1 --clock cpu)

for alloc in glibc jemalloc; do
  pre=(); [ "$alloc" = jemalloc ] && pre=(env LD_PRELOAD="$JEMALLOC")
  for dtype in fp32 bf16; do
    "${pre[@]}" python -m megatron_grin bench moe-layer --dtype "$dtype" "${ONE[@]}" --reps 7 --out-dir "$OUT" \
      --backends sequential,grouped_mm,grouped_mm_forced --name "moe-layer-cpu-$dtype-1t-$alloc"
  done
done
for dtype in fp32 bf16; do  # GRIN's input jitter off: what the GRIN-specific noise costs
  bench moe-layer --dtype "$dtype" "${ONE[@]}" --reps 7 --no-memory --input-jitter 0 --baselines dense,megatron \
    --backends sequential,grouped_mm --name "moe-layer-cpu-$dtype-1t-nojitter-glibc"
done
for dtype in fp32 bf16; do  # the default configuration: 2 threads, wall time
  bench moe-layer --dtype "$dtype" --reps 7 --no-memory --name "moe-layer-cpu-$dtype-2t-wall-glibc"
done
# skewed routing (logit bias 3: expert 0 is favoured e^3 = 20x over expert 15 before masking)
bench moe-layer --imbalance 3 "${ONE[@]}" --reps 5 --backends sequential,grouped_mm \
  --name moe-layer-cpu-fp32-1t-imbalance3-glibc
# routing alone, as a share of the layer
for dtype in fp32 bf16; do
  bench routing --dtype "$dtype" "${ONE[@]}" --reps 9 --backends grouped_mm --name "routing-cpu-$dtype-1t-glibc"
done
# expert counts at fixed tokens: step memory beyond the experts' own weight gradients must not grow with E
for e in 8 32 64; do
  bench moe-layer --experts "$e" "${ONE[@]}" --baselines dense --backends sequential,grouped_mm --reps 3 \
    --name "moe-layer-cpu-fp32-1t-e$e-glibc"
done
# a few-layer GRIN model: tokens/s and MFU against a GEMM peak measured on the same thread count
for backend in sequential grouped_mm; do
  bench model --backends "$backend" "${ONE[@]}" --reps 3 --name "model-cpu-fp32-1t-$backend-glibc"
done
