"""Print the markdown tables of docs/performance.md from benchmarks/results/*.json.

    python benchmarks/summarize.py [results_dir]
"""

from __future__ import annotations

import glob
import json
import os
import sys

from megatron_grin.bench.harness import markdown_table


def _expert_bytes(meta: dict) -> int:
    """fp32/bf16 bytes of all experts' weights (= their gradients): 3 * hidden * ffn * experts."""
    args = meta["args"]
    width = 4 if args["dtype"] == "fp32" else 2
    return 3 * args["hidden"] * args["ffn"] * args["experts"] * width


def _load(results_dir: str) -> list[tuple[str, dict]]:
    out = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            result = json.load(f)
        if result.get("meta", {}).get("kind"):
            out.append((os.path.basename(path)[:-5], result))
    return out


def _ours(rows: list[dict], backend: str) -> dict:
    """Our row for a backend: "GRIN MoE (backend)" or, since the kernels are named, "GRIN MoE (backend: ...)"."""
    return next((r for r in rows if r["name"] == f"GRIN MoE ({backend})" or
                 r["name"].startswith(f"GRIN MoE ({backend}:")), {})


def summary_table(runs: list[tuple[str, dict]]) -> str:
    """One line per moe-layer run: every implementation as x dense, and our best backend vs the baselines."""
    lines = ["| run | x dense: ours (sequential) | ours (grouped_mm) | megatron MoELayer | HF Phimoe | "
             "best ours / megatron | best ours / HF | ours (grouped_mm) step peak / dense |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, result in runs:
        if result["meta"]["kind"] != "moe-layer":
            continue
        rows = result["rows"]
        ratio = {key: _ours(rows, key).get("ratio_to_dense") for key in ("sequential", "grouped_mm")}
        megatron = next((r["ratio_to_dense"] for r in rows if r["role"] == "megatron"), None)
        hf = next((r["ratio_to_dense"] for r in rows if r["role"] == "hf"), None)
        ours = min((v for v in ratio.values() if v), default=None)
        dense = next((r for r in rows if r["role"] == "dense"), {})
        grouped = _ours(rows, "grouped_mm")
        mem = (grouped["step_peak_bytes"] / dense["step_peak_bytes"]
               if grouped.get("step_peak_bytes") and dense.get("step_peak_bytes") else None)
        cells = [ratio["sequential"], ratio["grouped_mm"], megatron, hf,
                 ours / megatron if ours and megatron else None, ours / hf if ours and hf else None, mem]
        lines.append(f"| {name} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def main(results_dir: str = "benchmarks/results") -> None:
    runs = _load(results_dir)
    print("## Summary (ratios of medians; < 1 in the two 'best ours' columns means ours is faster)\n")
    print(summary_table(runs) + "\n")
    for stem, result in runs:
        meta = result["meta"]
        env = meta["environment"]
        print(f"### {stem}\n\n`{meta['command']}`  \n{meta['shape_line']}; "
              f"allocator {env['allocator']}, {env['threads']} threads, {env.get('cpu') or env.get('gpu')}, "
              f"{meta['date']}\n")
        print(markdown_table(meta["kind"], result))
        if meta["kind"] == "moe-layer":
            print(f"\nexpert weights: {_expert_bytes(meta) / 2**20:.0f} MiB (their grads as much again)", end="")
            load = result.get("routing_load", {})
            for backend, stats in load.items():
                if stats:
                    print(f"\nrouting load ({backend}): max/mean tokens per expert "
                          f"{stats['tokens_per_expert_max_over_mean']:.2f}, idle experts "
                          f"{stats['experts_without_tokens']:.0f}", end="")
            print()
        print()


if __name__ == "__main__":
    main(*sys.argv[1:])
