"""Summary of a benchmarks/gpu_check.sh results directory: a table, summary.json and calibration.json.

    python3 benchmarks/gpu_check_summary.py RESULTS_DIR

Run by gpu_check.sh after every stage (so a run killed midway still leaves a summary), standard library
only (no torch import: it must be quick). It reads what the stages wrote:
  stages.tsv                    one line per finished stage: name, status, exit code, seconds, limit, command
  tier-junit.xml                the GPU test tier (pytest -m gpu)
  pretrain*/ (+ .flags)         each pretrain run's metrics.jsonl / summary.json, and its command-line flags
  moe-layer.json, routing.json, model.json   the `megatron-grin bench` results
and writes summary.md (the table it prints), summary.json (everything in it) and calibration.json: one
record per pretrain run, {layout: {flags}, peak_allocated_gib, peak_reserved_gib, tokens_per_s, step_s},
the measured points the memory/speed planner calibrates against.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import xml.etree.ElementTree as ET
from typing import Any

WARMUP_STEPS = 3  # first steps excluded from step times (allocator growth, autotuning, compilation)


def read_stages(results: str) -> list[dict]:
    out = []
    path = os.path.join(results, "stages.tsv")
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            name, status, rc, seconds, limit, command = (line.rstrip("\n").split("\t") + [""] * 6)[:6]
            out.append({"stage": name, "status": status, "exit": int(rc or 0), "seconds": int(seconds or 0),
                        "limit": int(limit or 0), "command": command})
    return out


def tier(results: str) -> dict | None:
    """Counts and failed test ids from the tier's JUnit XML."""
    path = os.path.join(results, "tier-junit.xml")
    if not os.path.exists(path):
        return None
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failed = []
    for case in ET.parse(path).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        if kinds & {"failure", "error"}:
            counts["failed"] += 1
            failed.append(test_id)
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failed_tests": failed}


def parse_flags(flags: list[str]) -> dict[str, Any]:
    """['--num-layers', '2', '--bf16'] -> {'num_layers': 2, 'bf16': True} (numbers as numbers)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(flags):
        key = flags[i].lstrip("-").replace("-", "_")
        if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            value: Any = flags[i + 1]
            for cast in (int, float):
                try:
                    value = cast(value)
                    break
                except ValueError:
                    pass
            out[key] = value
            i += 2
        else:
            out[key] = True
            i += 1
    return out


def pretrain(results: str, name: str) -> dict | None:
    """Steady-state step time and throughput, peak memory and MFU of one pretrain run."""
    log_dir = os.path.join(results, name)
    jsonl = os.path.join(log_dir, "metrics.jsonl")
    if not os.path.exists(jsonl):
        return None
    with open(jsonl, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    train = [r for r in records if r.get("type") == "train"]
    steady = [r for r in train if r["iteration"] > WARMUP_STEPS] or train[1:] or train
    mfu = [r["perf/mfu"] for r in records if r.get("type") == "interval" and r["iteration"] > WARMUP_STEPS
           and r.get("perf/mfu") is not None]
    summary = {}
    if os.path.exists(os.path.join(log_dir, "summary.json")):
        with open(os.path.join(log_dir, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
    flags = []
    if os.path.exists(os.path.join(results, name + ".flags")):
        with open(os.path.join(results, name + ".flags"), encoding="utf-8") as f:
            flags = [line.rstrip("\n") for line in f if line.strip()]
    parallel = summary.get("layout") or {}  # the trainer's tp / pp / vpp / dp
    out = {"run": name, "layout": {**parse_flags(flags), **parallel, "device": summary.get("device")},
           "steps": len(train), "steady_steps": len(steady),
           "step_s": statistics.median(r["step_seconds"] for r in steady) if steady else None,
           "tokens_per_s": statistics.median(r["tokens_per_second"] for r in steady) if steady else None,
           "mfu": statistics.median(mfu) if mfu else None,
           "first_loss": train[0]["loss"] if train else None, "last_loss": train[-1]["loss"] if train else None,
           "peak_allocated_gib": summary.get("peak_memory_gib"), "peak_reserved_gib": summary.get("peak_reserved_gib")}
    return out


def bench(results: str, name: str) -> dict | None:
    path = os.path.join(results, name + ".json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    keep = ("name", "role", "median_ms", "ratio_to_dense", "share_of_layer", "tokens_per_s", "mfu", "peak_bytes")
    return {"shape": data.get("meta", {}).get("shape_line"),
            "rows": [{k: row[k] for k in keep if row.get(k) is not None} for row in data.get("rows", [])]}


def _fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def table(summary: dict) -> str:
    lines = ["| stage | status | s (limit) | result |", "|---|---|---:|---|"]
    for st in summary["stages"]:
        lines.append(f"| {st['stage']} | {st['status']} | {st['seconds']} ({st['limit']}) | {_result(summary, st)} |")
    return "\n".join(lines)


def _result(summary: dict, st: dict) -> str:
    name = st["stage"]
    if name == "tier" and summary.get("tier"):
        t = summary["tier"]
        extra = f"; failed: {', '.join(t['failed_tests'][:4])}" if t["failed_tests"] else ""
        return f"{t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped{extra}"
    run = next((p for p in summary["pretrain"] if p["run"] == name), None)
    if run:
        return (f"{_fmt(run['tokens_per_s'], ',.0f')} tok/s, {_fmt(run['step_s'], '.3f')} s/step, MFU "
                f"{_fmt(run['mfu'], '.1%')}, peak {_fmt(run['peak_allocated_gib'], '.1f')} GiB allocated / "
                f"{_fmt(run['peak_reserved_gib'], '.1f')} reserved, loss {_fmt(run['first_loss'], '.2f')} -> "
                f"{_fmt(run['last_loss'], '.2f')}")
    rows = (summary["bench"].get(name) or {}).get("rows", [])
    if rows:
        parts = []
        for row in rows[:6]:
            value = f"{_fmt(row.get('median_ms'), '.2f')} ms"
            if "ratio_to_dense" in row:
                value += f" ({row['ratio_to_dense']:.2f}x dense)"
            if "tokens_per_s" in row:
                value += f", {row['tokens_per_s']:,.0f} tok/s"
            parts.append(f"{row['name']}: {value}")
        return "; ".join(parts)
    return f"see {name}.log" if st["status"] != "ok" else ""


def summarize(results: str) -> dict:
    stages = read_stages(results)
    names = [s["stage"] for s in stages]
    summary = {
        "stages": stages, "tier": tier(results),
        "pretrain": [p for p in (pretrain(results, n) for n in names if n.startswith("pretrain")) if p],
        "bench": {n: bench(results, n) for n in names if os.path.exists(os.path.join(results, n + ".json"))},
    }
    calibration = [{"layout": p["layout"], "peak_allocated_gib": p["peak_allocated_gib"],
                    "peak_reserved_gib": p["peak_reserved_gib"], "tokens_per_s": p["tokens_per_s"],
                    "step_s": p["step_s"]} for p in summary["pretrain"]]
    for name, payload in (("summary.json", summary), ("calibration.json", calibration)):
        with open(os.path.join(results, name), "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
    with open(os.path.join(results, "summary.md"), "w", encoding="utf-8") as f:
        f.write(table(summary) + "\n")
    return summary


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        print("usage: gpu_check_summary.py RESULTS_DIR", file=sys.stderr)
        return 2
    print(table(summarize(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
