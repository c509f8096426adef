"""Why the CPU expert loop splits bf16 GEMMs into row blocks: the cost of a new GEMM shape.

    python benchmarks/gemm_shape_cache.py [--dtype bf16] [--calls 200] [--out benchmarks/results/x.md]

Sampled routing gives every expert a different row count every step. oneDNN (PyTorch's bf16 CPU GEMM)
JIT-compiles and caches a kernel per shape, so an unseen row count costs extra. This times, in one process,
an expert's fc1 GEMM ([rows, 512] x [512, 1600], GRIN's CPU proportions) with (a) the same row count every
call, (b) a fresh row count every call, (c) fresh row counts run as [multiple of 64, tail] blocks, the way
megatron_grin.ops.grouped_mlp does, and (d) (b)'s row counts again. Process CPU time per call, one thread.
"""

from __future__ import annotations

import argparse
import random
import time

import torch


def per_call_ms(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, rows: list[int], block: int = 0) -> float:
    start = time.process_time()
    for n in rows:
        bulk = n // block * block if block else n
        torch.mm(x[:bulk], w.t(), out=out[:bulk])
        if bulk < n:
            torch.mm(x[bulk:n], w.t(), out=out[bulk:n])
    return (time.process_time() - start) / len(rows) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=800)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    w = torch.randn(2 * args.ffn, args.hidden, dtype=dtype)
    x = torch.randn(2400, args.hidden, dtype=dtype)
    out = torch.empty(2400, 2 * args.ffn, dtype=dtype)
    rng = random.Random(0)
    fresh = [rng.randint(1900, 2300) for _ in range(args.calls)]
    fresh_blocked = [rng.randint(1900, 2300) for _ in range(args.calls)]
    per_call_ms(x, w, out, [2048] * 5)  # warm-up of the fixed shape
    rows = [("same row count (2048) every call", per_call_ms(x, w, out, [2048] * args.calls)),
            ("a fresh row count (1900-2300) every call", per_call_ms(x, w, out, fresh)),
            ("fresh row counts as [multiple of 64, tail] blocks", per_call_ms(x, w, out, fresh_blocked, block=64)),
            ("the fresh row counts of the second line, again", per_call_ms(x, w, out, fresh))]
    lines = [f"{args.dtype}, [rows, {args.hidden}] x [{args.hidden}, {2 * args.ffn}], {args.calls} calls each, "
             "1 thread, process CPU time", "", "| GEMM row counts | ms per call |", "|---|---:|"]
    lines += [f"| {name} | {ms:.2f} |" for name, ms in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"`python benchmarks/gemm_shape_cache.py --dtype {args.dtype} --calls {args.calls}`\n\n{text}\n")


if __name__ == "__main__":
    main()
