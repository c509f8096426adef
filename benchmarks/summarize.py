"""Print the markdown tables of docs/performance.md from benchmarks/results/*.json.

    python benchmarks/summarize.py [results_dir]
"""

from __future__ import annotations

import glob
import json
import os
import sys

from megatron_grin.bench import markdown_table


def _expert_bytes(meta: dict) -> int:
    """fp32/bf16 bytes of all experts' weights (= their gradients): 3 * hidden * ffn * experts."""
    args = meta["args"]
    width = 4 if args["dtype"] == "fp32" else 2
    return 3 * args["hidden"] * args["ffn"] * args["experts"] * width


def main(results_dir: str = "benchmarks/results") -> None:
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            result = json.load(f)
        meta = result.get("meta")
        if not meta or "kind" not in meta:
            continue
        env = meta["environment"]
        print(f"### {os.path.basename(path)[:-5]}\n\n`{meta['command']}`  \n{meta['shape_line']}; "
              f"allocator {env['allocator']}, {env['threads']} threads, {env.get('cpu') or env.get('gpu')}, "
              f"{meta['date']}\n")
        print(markdown_table(meta["kind"], result))
        if meta["kind"] == "moe-layer":
            grads = _expert_bytes(meta) / 2**20
            for row in result["rows"]:
                if row["role"] == "ours" and row.get("step_peak_bytes"):
                    print(f"\n{row['name']}: step peak minus expert weight grads = "
                          f"{row['step_peak_bytes'] / 2**20 - grads:.0f} MiB", end="")
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
