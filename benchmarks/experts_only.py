"""Expert modules alone (no router, no dispatcher): fwd+bwd on N expert-sorted rows, interleaved.

    python benchmarks/experts_only.py --dtype bf16 [--threads 1] [--reps 9] [--out benchmarks/results/x.json]

Compares megatron's SequentialMLP, GroupedMMExperts as "auto" runs it here (grouped_mm on CUDA sm90 bf16,
the per-expert loop elsewhere) and GroupedMMExperts forced onto torch's grouped_mm kernel. Process CPU time
per step (robust on a shared machine with one thread); median and min-max in ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=800)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--rows", type=int, default=32768, help="permuted rows = tokens x top_k")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from megatron_grin.bench import cli as bench
    from megatron_grin.model.experts import BACKEND_SPECS, experts_spec
    from megatron_grin.model.build import transformer_config
    from megatron_grin.model.grouped_experts import GroupedMMExperts

    layer_args = bench.build_parser().parse_args(["moe-layer", "--device", "cpu", "--dtype", args.dtype,
                                                  "--hidden", str(args.hidden), "--ffn", str(args.ffn),
                                                  "--experts", str(args.experts)])
    bench._resolve(layer_args)
    torch.set_num_threads(args.threads)
    bench.setup_megatron("cpu")
    bench._register_backends()
    tconfig = transformer_config(bench._grin_config(layer_args))
    pg = get_default_pg_collection()
    specs = {"sequential": experts_spec("sequential", False), "grouped_mm": BACKEND_SPECS["grouped_mm"](False),
             "grouped_mm_forced": ModuleSpec(module=GroupedMMExperts, params={"gemm": "grouped_mm"})}
    modules = {name: build_module(spec, args.experts, tconfig, pg_collection=pg) for name, spec in specs.items()}
    dtype = bench.DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(0)
    counts = torch.full((args.experts,), args.rows // args.experts)
    rows = int(counts.sum())
    x = torch.randn(rows, args.hidden, generator=gen).to(dtype)
    probs = torch.rand(rows, generator=gen)
    grad = torch.randn(rows, args.hidden, generator=gen).to(dtype)
    samples: dict[str, list[float]] = {name: [] for name in modules}
    for rep in range(args.reps + 1):
        for name, module in modules.items():
            xr, pr = x.clone().requires_grad_(), probs.clone().requires_grad_()
            start = time.process_time()
            out, _ = module(xr, counts, pr)
            out.backward(grad)
            elapsed = time.process_time() - start
            module.zero_grad(set_to_none=True)
            if rep:
                samples[name].append(elapsed * 1e3)
    result = {name: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "samples_ms": v}
              for name, v in samples.items()}
    print(f"{args.dtype}, {rows} rows, hidden {args.hidden}, ffn {args.ffn}, {args.experts} experts, "
          f"{args.threads} thread(s), CPU time per fwd+bwd:")
    print("| expert module | median ms | min-max ms | x sequential |\n|---|---:|---:|---:|")
    base = result["sequential"]["median_ms"]
    for name, r in result.items():
        print(f"| {name} | {r['median_ms']:.0f} | {r['min_ms']:.0f}-{r['max_ms']:.0f} | {r['median_ms'] / base:.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": result}, f, indent=2)


if __name__ == "__main__":
    main()
