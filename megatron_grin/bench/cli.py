"""``megatron-grin bench moe-layer|routing|model`` (also ``python -m megatron_grin.bench.cli``).

* ``moe-layer``: one GRIN MoE layer fwd+bwd against a dense SwiGLU MLP with the same active FLOPs,
  megatron-core's MoELayer and transformers' PhimoeSparseMoeBlock (bench/layers.py);
* ``routing``: the routing alone, as a share of the layer (bench/layers.py);
* ``model``: a few-layer GRIN model and a dense GPT with the same active parameters: MoE/dense
  throughput, MFU, peak memory (bench/model.py).

The harness (interleaved timing, memory, ``--profile`` traces, JSON + markdown) is bench/harness.py.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
from typing import Optional

import torch

from megatron_grin.bench.harness import DTYPES, environment, markdown_table, setup_megatron, write_results
from megatron_grin.bench.layers import cmd_moe_layer, cmd_routing
from megatron_grin.bench.model import cmd_model
from megatron_grin.config import ROUTER_VARIANTS
from megatron_grin.settings import bounded
from megatron_grin.training.run_config import SEED_MAX

DEFAULT_SHAPES = {  # GPU: GRIN's own shapes; CPU: the same proportions, scaled to finish in minutes
    "cpu": dict(hidden=512, ffn=800, experts=16, topk=2, tokens=16384, dtype="fp32",
                backends="sequential,grouped_mm,te_grouped"),
    # the Triton grouped GEMM beside torch's grouped_mm (the default): the measurement that picks between them
    "cuda": dict(hidden=4096, ffn=6400, experts=16, topk=2, tokens=16384, dtype="bf16",
                 backends="sequential,grouped_mm,grouped_triton,te_grouped"),
}


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--hidden-size", "--hidden", dest="hidden", type=bounded(int, ge=1),
                   help="hidden size (default: 4096 on GPU, 512 on CPU)")
    p.add_argument("--moe-ffn-hidden-size", "--ffn", dest="ffn", type=bounded(int, ge=1),
                   help="expert ffn size (default: 6400 on GPU, 800 on CPU)")
    p.add_argument("--num-experts", "--experts", dest="experts", type=bounded(int, ge=1),
                   help="number of experts (default 16)")
    p.add_argument("--moe-router-topk", "--topk", dest="topk", type=bounded(int, ge=1),
                   help="experts per token (default 2)")
    p.add_argument("--tokens", type=bounded(int, ge=1), help="tokens per step (default 16384)")
    p.add_argument("--seq-length", type=bounded(int, ge=1), default=4096, help="sequence length; tokens = seq x batch")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--backends",
                   help="comma-separated GRIN expert backends (moe-layer default: sequential,grouped_mm,te_grouped, on "
                        "CUDA also grouped_triton; routing and model: auto, the first one counts). te_grouped is "
                        "skipped without Transformer Engine. Pinned variants of "
                        "grouped_mm: grouped_mm_forced (torch's grouped_mm even where it is not the default), "
                        "grouped_triton (the Triton grouped GEMMs), unfused (every fusion switch off)")
    p.add_argument("--grin-router", "--variant", dest="variant", choices=list(ROUTER_VARIANTS),
                   default=ROUTER_VARIANTS[0])
    p.add_argument("--moe-input-jitter-eps", "--input-jitter", dest="input_jitter", type=bounded(float, ge=0, lt=1),
                   default=0.01,
                   help="GRIN's multiplicative input jitter (0 = off)")
    p.add_argument("--imbalance", type=float, default=0.0,
                   help="router logit bias -imbalance*e/(E-1) on expert e, to skew routing (0 = none)")
    p.add_argument("--warmup", type=bounded(int, ge=0), default=2)
    p.add_argument("--reps", type=bounded(int, ge=1), default=7)
    p.add_argument("--threads", type=bounded(int, ge=1), help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="what the table reports: wall time, or process CPU time (robust on a shared machine, "
                        "best with --threads 1); both are always saved in the JSON")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--profile", metavar="DIR",
                   help="after timing, run one step of each case under torch.profiler: a Chrome/Perfetto trace "
                        "(DIR/<name>-<case>.json, open in ui.perfetto.dev) and its most expensive ops (.txt)")
    p.add_argument("--out-dir", default="benchmarks/results", help="where JSON + markdown go ('' = don't write)")
    p.add_argument("--name", help="output file stem (default: <kind>-<device>-<dtype>-<allocator>)")
    p.add_argument("--seed", type=bounded(int, ge=0, le=SEED_MAX), default=0, help="torch and megatron RNG seed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-grin bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    layer = sub.add_parser("moe-layer", help="one MoE layer fwd+bwd vs dense, megatron MoELayer and HF Phimoe")
    _add_common(layer)
    layer.add_argument("--baselines", default="dense,megatron,hf", help="comma-separated: dense, megatron, hf")
    layer.add_argument("--hf-experts", default="eager", choices=["eager", "grouped_mm", "batched_mm"],
                       help="transformers experts implementation for the HF block")
    routing = sub.add_parser("routing", help="routing fwd+bwd alone, as a share of the layer")
    _add_common(routing)
    model = sub.add_parser("model", help="a few-layer GRIN model vs a dense GPT with the same active parameters")
    _add_common(model)
    model.add_argument("--num-layers", "--layers", dest="layers", type=bounded(int, ge=1), default=4)
    model.add_argument("--num-attention-heads", "--heads", dest="heads", type=bounded(int, ge=1),
                       help="attention heads (default hidden/128)")
    model.add_argument("--num-query-groups", "--query-groups", dest="query_groups", type=bounded(int, ge=1),
                       help="GQA groups (default: heads)")
    model.add_argument("--vocab-size", "--vocab", dest="vocab", type=bounded(int, ge=1), default=32064)
    model.add_argument("--peak-tflops", type=float,
                       help="MFU denominator (default: datasheet on GPU, measured GEMM on CPU)")
    return parser


def _resolve(args) -> str:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    defaults = DEFAULT_SHAPES[device]
    if args.kind != "moe-layer" and args.backends is None:
        args.backends = "auto"  # routing and model time one GRIN layer / model: the default expert backend
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.clock == "cpu" and device == "cuda":
        raise SystemExit("--clock cpu measures host CPU time: use it for CPU runs only")
    if args.kind == "model" and args.tokens == defaults["tokens"] and device == "cpu":
        args.tokens = 4096  # a few-layer model with a 32k vocab: keep the CPU run to seconds per step
    if args.kind == "model" and device == "cpu" and args.seq_length == 4096:
        args.seq_length = 1024
    args.backends = [b for b in args.backends.split(",") if b]
    if hasattr(args, "baselines"):
        args.baselines = [b for b in args.baselines.split(",") if b]
    if args.threads:
        torch.set_num_threads(args.threads)
    return device


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry (``megatron-grin bench ...``): run, print, write; exit status 0."""
    run(argv)
    return 0


def run(argv: Optional[list[str]] = None) -> dict:
    """Run one benchmark; returns the result dict that is also written as JSON."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    device = _resolve(args)
    setup_megatron(device, args.seed)
    command = {"moe-layer": cmd_moe_layer, "routing": cmd_routing, "model": cmd_model}[args.kind]
    load_before = os.getloadavg()
    result = command(args, device)
    shape_line = (f"hidden {args.hidden}, expert ffn {args.ffn}, {args.experts} experts, top-{args.topk}, "
                  f"{args.tokens} tokens, {args.dtype}, {device}, {torch.get_num_threads()} threads, imbalance "
                  f"{args.imbalance}, {args.warmup} warm-up + {args.reps} timed reps, {args.clock} time "
                  f"(median, min-max)")
    result["meta"] = {"kind": args.kind, "command": "megatron-grin bench " + shlex.join(argv),
                      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "device": device, "dtype": args.dtype, "shape_line": shape_line,
                      "args": {k: v for k, v in vars(args).items()}, "environment": environment(device),
                      # other work on a shared machine shows up here, and in the min-max spread
                      "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg()}
    table = markdown_table(args.kind, result)
    print(f"\n{shape_line}\nallocator: {result['meta']['environment']['allocator']}, "
          f"threads: {torch.get_num_threads()}, load average before/after: {load_before[0]:.1f}/"
          f"{os.getloadavg()[0]:.1f}\n\n{table}")
    for path in write_results(args.kind, result, args.out_dir, args.name):
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    sys.exit(main())
