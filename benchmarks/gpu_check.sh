#!/usr/bin/env bash
# One command for a GPU machine: megatron-core from the wheel in .whl/, the GPU test tier, a short
# GRIN-shaped pretrain (memory, tok/s) and the GPU benchmarks, inside 8 minutes.
#
#   bash benchmarks/gpu_check.sh                           # on the GPU machine
#   GRIN_GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh # dry run of the same stages on a CPU, toy shapes
#
# Every stage runs under its own `timeout`, all of them inside one time budget; each stage's log and
# results are written as soon as it ends, and the summary (table, summary.json, calibration.json) is
# refreshed after every stage, so a run killed midway still returns what it did. The summary table is
# printed last. Exit status: 0 when every stage passed, 1 otherwise.
#
# Where results go: RESULTS (below). With $OUT set (the device tool's output folder, which returns at
# most 8 files), $OUT receives after every stage: gpu_check.tar.gz (the whole RESULTS folder: every log,
# bench JSON/markdown, the tier's JUnit XML, the pretrain's metrics.jsonl), summary.md, summary.json and
# calibration.json ({layout, peak_allocated_gib, peak_reserved_gib, tokens_per_s, step_s} per pretrain).
#
# Settings (environment):
#   GRIN_GPU_CHECK_STAGES      stages to run, comma-separated (default: env,tier,pretrain,moe-layer,routing,model;
#                              also available: moe-layer-imbalance, pretrain-grin-vocab)
#   GRIN_GPU_CHECK_BUDGET_S    the whole run's budget in seconds (default 465)
#   GRIN_GPU_CHECK_TIMEOUT_<STAGE>  one stage's limit (STAGE upper-case, '-' as '_'), e.g. ..._TIMEOUT_TIER=240
#   GRIN_GPU_CHECK_RESULTS     results folder (default runs/gpu_check-<date>)
#   GRIN_GPU_CHECK_DEVICE      cuda (default) or cpu (dry run)
#   PYTHON                     the interpreter (default python3)
# Machine notes: shared/notes/gpu-environment.md. To add a stage: one `stage` line in main() (and its name
# in STAGES); a pretrain stage named pretrain* becomes a calibration point.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
DEVICE=${GRIN_GPU_CHECK_DEVICE:-cuda}
BUDGET_S=${GRIN_GPU_CHECK_BUDGET_S:-465}
STAGES=${GRIN_GPU_CHECK_STAGES:-env,tier,pretrain,moe-layer,routing,model}
RESULTS=${GRIN_GPU_CHECK_RESULTS:-$ROOT/runs/gpu_check-$(date +%Y%m%d-%H%M%S)}
RESERVE_S=8      # kept for the last summary
MIN_STAGE_S=15   # a stage with less time left is skipped, not started
START=$SECONDS
FAILED=0

log() { printf '[gpu_check %4ds] %s\n' "$((SECONDS - START))" "$*"; }

selected() { [[ ",$STAGES," == *",$1,"* ]]; }

# megatron-core: the importable one, else the wheel in .whl/ installed into a temporary folder.
setup_megatron() {
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    local have
    if have=$("$PY" -c 'import importlib.metadata as m, importlib.util as u; u.find_spec("megatron.core") and print(m.version("megatron-core"))' 2>/dev/null) && [[ -n $have ]]; then
        log "megatron-core $have (installed)"
        return 0
    fi
    local wheels=("$ROOT"/.whl/megatron_core-*.whl)
    if [[ ! -e ${wheels[0]} ]]; then
        log "no megatron-core and no wheel in .whl/: run 'bash benchmarks/fetch_megatron_wheel.sh' on a machine with PyPI"
        return 1
    fi
    local site
    site=$(mktemp -d)
    PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "${wheels[@]}" || return 1
    export PYTHONPATH="$site:$PYTHONPATH"
    log "megatron-core from ${wheels[*]##*/}"
}

record() {  # name status exit seconds limit command
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RESULTS/stages.tsv"
}

publish() {  # refresh the summary; copy it and a bundle of everything into $OUT
    "$PY" "$ROOT/benchmarks/gpu_check_summary.py" "$RESULTS" >/dev/null 2>>"$RESULTS/summary.err" || true
    [[ -n ${OUT:-} ]] || return 0
    mkdir -p "$OUT"
    tar -czf "$OUT/gpu_check.tar.gz.part" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" &&
        mv "$OUT/gpu_check.tar.gz.part" "$OUT/gpu_check.tar.gz"
    local f
    for f in summary.md summary.json calibration.json; do
        [[ -e $RESULTS/$f ]] && cp "$RESULTS/$f" "$OUT/$f"
    done
    return 0
}

stage() {  # stage NAME LIMIT_S COMMAND...: run COMMAND under timeout, log to RESULTS/NAME.log, record, publish
    local name=$1 limit=$2
    shift 2
    selected "$name" || return 0
    local var
    var="GRIN_GPU_CHECK_TIMEOUT_$(tr 'a-z-' 'A-Z_' <<<"$name")"
    limit=${!var:-$limit}
    local left=$((BUDGET_S - RESERVE_S - (SECONDS - START)))
    if ((left < MIN_STAGE_S)); then
        log "$name: skipped (${left} s left of the ${BUDGET_S} s budget)"
        record "$name" skipped 0 0 0 "$*"
        FAILED=1
        publish
        return 0
    fi
    ((limit > left)) && limit=$left
    log "$name (limit ${limit} s): $*"
    local t0=$SECONDS rc status=ok
    timeout -k 10 "$limit" "$@" >"$RESULTS/$name.log" 2>&1
    rc=$?
    if ((rc == 124 || rc == 137)); then
        status=timeout
    elif ((rc != 0)); then
        status=failed
    fi
    [[ $status == ok ]] || FAILED=1
    log "$name: $status (exit $rc, $((SECONDS - t0)) s)"
    record "$name" "$status" "$rc" "$((SECONDS - t0))" "$limit" "$*"
    publish
}

pretrain_stage() {  # pretrain_stage NAME LIMIT_S ITERS LAYOUT_FLAGS...: a calibration point (see summary)
    local name=$1 limit=$2 iters=$3
    shift 3
    selected "$name" || return 0
    printf '%s\n' "$@" >"$RESULTS/$name.flags"
    stage "$name" "$limit" "$PY" -m megatron_grin pretrain "$@" --train-iters "$iters" --log-interval 1 \
        --eval-iters 0 --log-dir "$RESULTS/$name"
}

env_report() {
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
for name in ("triton", "transformers", "megatron.core", "transformer_engine"):
    try:
        module = __import__(name, fromlist=["__version__"])
        print(name, getattr(module, "__version__", "?"))
    except ImportError:
        print(name, "absent")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", torch.cuda.device_count(), "x", p.name, f"sm{p.major}{p.minor}", f"{p.total_memory / 2**30:.0f} GiB")
EOF
}

main() {
    mkdir -p "$RESULTS"
    : >"$RESULTS/stages.tsv"
    log "results: $RESULTS${OUT:+ (bundled into $OUT)}; device $DEVICE; stages $STAGES; budget ${BUDGET_S} s"
    if ! setup_megatron; then
        record setup failed 1 0 0 "megatron-core"
        publish
        return 1
    fi
    local -a tier_env=() xdist=() grin bench_dev moe_layer routing model
    if "$PY" -c "import xdist" 2>/dev/null; then
        xdist=(-n 4 --dist loadfile)  # tier files in parallel: most of their time is process start-up
    fi
    if [[ $DEVICE == cpu ]]; then  # toy shapes: checks the machinery, not the GPU
        tier_env=(GRIN_GPU_TIER_DEVICE=cpu TRITON_INTERPRET=1)
        grin=(--model-preset grin-16x3.8b --num-layers 2 --hidden-size 128 --ffn-hidden-size 192
            --num-attention-heads 4 --num-query-groups 2 --seq-length 256 --micro-batch-size 2
            --global-batch-size 4 --mock-data)
        bench_dev=(--device cpu --hidden 64 --ffn 96 --warmup 1 --reps 2)
        moe_layer=(--tokens 512) routing=(--tokens 512) model=(--layers 2 --tokens 256 --seq-length 128)
    else  # the note's layouts (shared/notes/h200-2026-12-04.md)
        grin=(--model-preset grin-16x3.8b --num-layers 2 --bf16 --seq-length 4096 --micro-batch-size 2
            --global-batch-size 8 --mock-data)
        bench_dev=(--device cuda)
        moe_layer=(--reps 20) routing=(--reps 40) model=(--layers 4 --tokens 16384 --reps 10)
    fi
    local bench=("$PY" -m megatron_grin bench)
    stage env 20 bash -c env_report
    stage tier 200 env "${tier_env[@]}" "$PY" -m pytest -m gpu -q -p no:cacheprovider -rfE --continue-on-collection-errors \
        --junitxml="$RESULTS/tier-junit.xml" "${xdist[@]}"
    pretrain_stage pretrain 100 16 "${grin[@]}"
    stage moe-layer 55 "${bench[@]}" moe-layer "${bench_dev[@]}" "${moe_layer[@]}" --out-dir "$RESULTS" --name moe-layer
    stage routing 40 "${bench[@]}" routing "${bench_dev[@]}" "${routing[@]}" --out-dir "$RESULTS" --name routing
    stage model 60 "${bench[@]}" model "${bench_dev[@]}" "${model[@]}" --out-dir "$RESULTS" --name model
    # optional (GRIN_GPU_CHECK_STAGES): skewed routing; the 2-layer run with GRIN's own 32064-token vocabulary
    stage moe-layer-imbalance 55 "${bench[@]}" moe-layer "${bench_dev[@]}" "${moe_layer[@]}" --imbalance 3 \
        --out-dir "$RESULTS" --name moe-layer-imbalance
    pretrain_stage pretrain-grin-vocab 100 16 "${grin[@]}" --vocab-size 32064
    publish
    echo
    cat "$RESULTS/summary.md" 2>/dev/null || log "no summary (see $RESULTS/summary.err)"
    return "$FAILED"
}

cd "$ROOT" || exit 1
export -f env_report
export PY
main
