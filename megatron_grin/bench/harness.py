"""The benchmark harness: process setup, interleaved timing, peak memory, profiler traces, result files.

Every case runs in one process, interleaved (the order rotates each repetition), after a warm-up; the
tables give the median and the min-max spread, and every sample goes to the JSON. Peak memory and
profiler traces come from separate, untimed steps.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import socket
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import package_info, parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import MemoryProfileTimeline

from megatron_grin import compat

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# ------------------------------------------------------------------------------------------------
# process setup and environment
# ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_megatron(device: str, seed: int = 0) -> None:
    """compat + a world-1 process group + megatron parallel state (idempotent)."""
    compat.apply()
    if device == "cuda":
        torch.cuda.set_device(0)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def allocator() -> str:
    """'glibc' (the default), 'jemalloc' (preloaded) or 'caching' (jemalloc that never returns memory:
    MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1, so no page faults after warm-up)."""
    preloaded = "jemalloc" in os.environ.get("LD_PRELOAD", "")
    try:
        with open("/proc/self/maps") as maps:
            preloaded = preloaded or "jemalloc" in maps.read()
    except OSError:
        pass
    if not preloaded:
        return "glibc"
    conf = os.environ.get("MALLOC_CONF", "")
    return "caching" if "dirty_decay_ms:-1" in conf and "muzzy_decay_ms:-1" in conf else "jemalloc"


def environment(device: str) -> dict:
    import transformers

    info = {"torch": torch.__version__, "megatron_core": package_info.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "device": device, "threads": torch.get_num_threads(), "allocator": allocator(),
            "LD_PRELOAD": os.environ.get("LD_PRELOAD", ""),
            "MALLOC_CONF": os.environ.get("MALLOC_CONF", ""), "hostname": platform.node()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        try:
            with open("/proc/cpuinfo") as f:
                info["cpu"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
        except OSError:
            info["cpu"] = platform.processor()
        info["cpu_count"] = os.cpu_count()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info

# ------------------------------------------------------------------------------------------------
# timing and memory
# ------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One implementation: ``step()`` runs fwd+bwd once; ``reset()`` drops grads between steps."""

    name: str
    step: Callable[[], None]
    reset: Callable[[], None] = lambda: None
    role: str = ""  # "dense", "ours", "megatron", "hf", ...


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _minor_faults() -> int:
    try:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except OSError:
        return 0


def time_interleaved(cases: list[Case], warmup: int, reps: int, device: str) -> dict[str, dict[str, list[float]]]:
    """Wall and process-CPU seconds (and minor page faults) per step for every case; each repetition runs
    all cases, starting at a rotating offset. CPU time (all threads) does not count the time other
    processes hold the cores; page faults show what the allocator costs (glibc unmaps blocks > 32 MiB)."""
    samples = {c.name: {"wall": [], "cpu": [], "faults": []} for c in cases}
    for rep in range(warmup + reps):
        shift = rep % len(cases)
        for case in cases[shift:] + cases[:shift]:
            _sync(device)
            faults, wall, cpu = _minor_faults(), time.perf_counter(), time.process_time()
            case.step()
            _sync(device)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            faults = _minor_faults() - faults
            case.reset()
            if rep >= warmup:
                samples[case.name]["wall"].append(wall)
                samples[case.name]["cpu"].append(cpu)
                samples[case.name]["faults"].append(faults)
    return samples


def peak_memory(case: Case, device: str) -> dict:
    """Peak bytes during one fwd+bwd: CUDA allocator stats, or the CPU profiler's memory timeline.

    ``peak_bytes`` counts everything live (weights, grads, inputs); ``step_peak_bytes`` subtracts what was
    live before the step, i.e. activations, temporaries and the gradients the step creates.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        case.step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        case.reset()
        return {"peak_bytes": peak, "step_peak_bytes": peak - base}
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            case.step()
        case.reset()
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
        totals = [sum(s) for s in sizes]
        return {"peak_bytes": max(totals), "step_peak_bytes": max(totals) - totals[0]}
    except Exception as err:  # the profiler's memory timeline is a private API: degrade, don't fail
        case.reset()
        return {"peak_bytes": None, "step_peak_bytes": None, "error": repr(err)}


def summarize(samples: dict[str, list[float]], clock: str) -> dict:
    """median / min / max in ms of the chosen clock, plus both clocks' samples."""
    ms = [s * 1e3 for s in samples[clock]]
    return {"clock": clock, "median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms),
            "wall_median_ms": statistics.median(samples["wall"]) * 1e3,
            "cpu_median_ms": statistics.median(samples["cpu"]) * 1e3,
            "samples_ms": ms, "wall_samples_ms": [s * 1e3 for s in samples["wall"]],
            "cpu_samples_ms": [s * 1e3 for s in samples["cpu"]],
            "page_faults_per_step": statistics.median(samples["faults"]) if samples.get("faults") else None}


def profile_trace(case: Case, device: str, out_dir: str, stem: str, top: int = 30) -> dict:
    """One untimed step under torch.profiler: a Chrome/Perfetto trace (``<stem>-<case>.json``) and the ops
    that took the most time (``.txt``, self time on the device where there is one), to see where time goes."""
    os.makedirs(out_dir, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", case.name).strip("-").lower()
    path = os.path.join(out_dir, f"{stem}-{slug}")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    _sync(device)
    with profile(activities=activities, record_shapes=True) as prof:
        case.step()
        _sync(device)
    case.reset()
    prof.export_chrome_trace(path + ".json")
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    with open(path + ".txt", "w") as f:
        f.write(prof.key_averages().table(sort_by=sort, row_limit=top))
    return {"trace": path + ".json", "top_ops": path + ".txt"}



def run_cases(args, cases: list[Case], device: str) -> list[dict]:
    """Time the cases interleaved; add peak memory (unless --no-memory) and traces (--profile DIR)."""
    samples = time_interleaved(cases, args.warmup, args.reps, device)
    rows = []
    dense = next((c for c in cases if c.role == "dense"), None)
    dense_ms = statistics.median(samples[dense.name][args.clock]) * 1e3 if dense else None
    for case in cases:
        row = {"name": case.name, "role": case.role, **summarize(samples[case.name], args.clock)}
        row["ratio_to_dense"] = row["median_ms"] / dense_ms if dense_ms else None
        rows.append(row)
    if not args.no_memory:
        for case, row in zip(cases, rows):
            row.update(peak_memory(case, device))
    if getattr(args, "profile", None):
        for case, row in zip(cases, rows):
            row.update(profile_trace(case, device, args.profile, args.name or args.kind))
    return rows

# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
def _fmt_bytes(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f}"


def _layer_table(rows: list[dict], clock: str, other: str) -> list[str]:
    lines = [f"| implementation | {clock} median ms | min-max ms | x dense | {other} median ms | "
             "page faults/step | peak MiB | step peak MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['ratio_to_dense']:.3f}" if r.get("ratio_to_dense") else "-"
        faults = r.get("page_faults_per_step")
        lines.append(f"| {r['name']} | {r['median_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f} | {ratio} | "
                     f"{r[f'{other}_median_ms']:.1f} | {'n/a' if faults is None else f'{faults:.0f}'} | "
                     f"{_fmt_bytes(r.get('peak_bytes'))} | {_fmt_bytes(r.get('step_peak_bytes'))} |")
    return lines


def _routing_table(rows: list[dict], clock: str) -> list[str]:
    lines = [f"| what | {clock} median ms | min-max ms | share of layer |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['median_ms']:.2f} | {r['min_ms']:.2f}-{r['max_ms']:.2f} | "
                     f"{100 * r['share_of_layer']:.1f}% |")
    return lines


def _model_table(rows: list[dict], clock: str) -> list[str]:
    lines = [f"| model | {clock} median ms/step | min-max ms | tokens/s | throughput / dense | achieved TFLOP/s | "
             "peak TFLOP/s | MFU | peak MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        peak = f"{r['peak_tflops']:.2f}" if r.get("peak_tflops") else "n/a"
        vs_dense = f"{r['throughput_vs_dense']:.3f}" if r.get("throughput_vs_dense") else "-"
        lines.append(f"| {r['name']} | {r['median_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f} | "
                     f"{r['tokens_per_s']:.0f} | {vs_dense} | {r['achieved_tflops']:.3f} | {peak} | {mfu} | "
                     f"{_fmt_bytes(r.get('peak_bytes'))} |")
    return lines


def markdown_table(kind: str, result: dict) -> str:
    rows = result["rows"]
    clock = rows[0].get("clock", "wall")
    if kind == "moe-layer":
        return "\n".join(_layer_table(rows, clock, "cpu" if clock == "wall" else "wall"))
    if kind == "routing":
        return "\n".join(_routing_table(rows, clock))
    return "\n".join(_model_table(rows, clock))


def write_results(kind: str, result: dict, out_dir: Optional[str], name: Optional[str]) -> list[str]:
    if not out_dir:
        return []
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, name or f"{kind}-{result['meta']['device']}-{result['meta']['dtype']}-"
                                         f"{result['meta']['environment']['allocator']}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    meta = result["meta"]
    with open(stem + ".md", "w") as f:
        f.write(f"# bench {kind}\n\n`{meta['command']}`\n\n{meta['shape_line']}\n\n{markdown_table(kind, result)}\n")
    return [stem + ".json", stem + ".md"]
