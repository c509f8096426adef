#!/usr/bin/env bash
# Every CPU number in docs/performance.md: bash benchmarks/cpu_suite.sh  (~30 min on 2 cores).
#
# The primary runs use one thread and report process CPU time (--threads 1 --clock cpu): on a machine
# shared with other jobs, wall time with 2 OpenMP threads swings by 2-5x (a descheduled thread stalls
# every parallel region), while single-thread CPU time stays within a few percent. The default
# configuration (2 threads, wall time) is run too, for reference.
#
# Two allocators (the issue's protocol):
#   glibc    the default. Blocks over 32 MiB are mmapped and unmapped on free, so every step page-faults
#            them back in (tens of thousands of faults per step), which taxes big-tensor code (dense) most.
#   caching  Debian's jemalloc (apt-get install -y libjemalloc2), never releasing memory
#            (MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1): no page faults after warm-up, so the
#            ratios show compute alone. Plain LD_PRELOAD jemalloc (decay on) is neither: it returns
#            pages every few ms and faults more than glibc.
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
JEMALLOC=${JEMALLOC:-/usr/lib/x86_64-linux-gnu/libjemalloc.so.2}
OUT=${OUT:-benchmarks/results}
ONE=(--threads 1 --clock cpu)
ALL=(--backends sequential,grouped_mm --baselines dense,megatron,hf)

bench() {  # bench ALLOCATOR KIND ARGS...: one megatron-grin bench run under glibc or the caching jemalloc
  local alloc=$1; shift
  if [ "$alloc" = caching ]; then
    LD_PRELOAD="$JEMALLOC" MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1 \
      python -m megatron_grin bench "$@" --out-dir "$OUT"
  else
    python -m megatron_grin bench "$@" --out-dir "$OUT"
  fi
}

# the targets: GRIN's proportions at CPU scale, one thread, both dtypes, both allocators
for alloc in glibc caching; do
  for dtype in fp32 bf16; do
    bench "$alloc" moe-layer --dtype "$dtype" "${ONE[@]}" --reps 15 "${ALL[@]}" \
      --name "moe-layer-cpu-$dtype-1t-$alloc"
  done
done
# the expert modules alone (no router, no dispatcher), on the same expert-sorted rows
for dtype in fp32 bf16; do
  LD_PRELOAD="$JEMALLOC" MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1 python benchmarks/experts_only.py \
    --dtype "$dtype" --reps 9 --out "$OUT/experts-only-cpu-$dtype-1t-caching.json" | grep -v Warn \
    > "$OUT/experts-only-cpu-$dtype-1t-caching.md"
done
# bf16 under glibc, ours against megatron only, with more repetitions (the 5-way run above is noisier there)
bench glibc moe-layer --dtype bf16 "${ONE[@]}" --reps 21 --no-memory --backends grouped_mm --baselines dense,megatron \
  --name moe-layer-cpu-bf16-1t-glibc-reps21
# routing alone (SparseMixer op, and the whole router with gating and input jitter) as a share of the layer
for dtype in fp32 bf16; do
  bench caching routing --dtype "$dtype" "${ONE[@]}" --reps 9 --backends grouped_mm --name "routing-cpu-$dtype-1t-caching"
done
# other shapes: fewer/more experts, skewed routing (logit bias 3: expert 0 favoured e^3 = 20x over expert 15)
for dtype in fp32 bf16; do
  for shape in "--experts 8:e8" "--experts 32:e32" "--imbalance 3:imbalance3"; do
    bench caching moe-layer --dtype "$dtype" ${shape%%:*} "${ONE[@]}" --reps 5 "${ALL[@]}" \
      --name "moe-layer-cpu-$dtype-1t-${shape##*:}-caching"
  done
done
# GRIN's input jitter off: what the GRIN-specific noise costs
bench caching moe-layer --dtype bf16 --input-jitter 0 "${ONE[@]}" --reps 7 --no-memory \
  --backends grouped_mm --baselines dense,megatron --name moe-layer-cpu-bf16-1t-nojitter-caching
# the default configuration: 2 threads, wall time
for dtype in fp32 bf16; do
  bench glibc moe-layer --dtype "$dtype" --reps 7 --no-memory "${ALL[@]}" --name "moe-layer-cpu-$dtype-2t-wall-glibc"
done
# a few-layer GRIN model: tokens/s and MFU against a GEMM peak measured on the same thread count
for backend in sequential grouped_mm; do
  bench caching model --backends "$backend" "${ONE[@]}" --reps 3 --name "model-cpu-fp32-1t-$backend-caching"
done
# what a new GEMM shape costs (why bf16 expert GEMMs run on row blocks)
for dtype in bf16 fp32; do
  python benchmarks/gemm_shape_cache.py --dtype "$dtype" --out "$OUT/gemm-shape-cache-cpu-$dtype.md"
done
python benchmarks/summarize.py "$OUT" > "$OUT/SUMMARY.md"
