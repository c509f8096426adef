"""Helpers of the GPU tier: the device, shapes that fit it, error measures, and pretrain subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tier_device() -> torch.device | None:
    """cuda when present; cpu under GRIN_GPU_TIER_DEVICE=cpu (dry run); else None (the tier is skipped)."""
    if os.environ.get("GRIN_GPU_TIER_DEVICE") == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


def on_gpu(device: torch.device) -> bool:
    return device.type == "cuda"


def size(device: torch.device, gpu: int, cpu: int) -> int:
    """The GPU shape on a GPU, a small one for the CPU dry run."""
    return gpu if on_gpu(device) else cpu


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 on the CPU (METHOD.md: bf16 lands near 1e-3..1e-2, fp32 far below)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def env(**extra: str) -> dict:
    """The environment of a tier subprocess: this one's (PYTHONPATH carries megatron-core) plus ``extra``."""
    out = {**os.environ, "PYTHONWARNINGS": "ignore", **extra}
    out["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return out


#: A pretrain whose kernels are deterministic (bit-exact runs need it on a GPU: atomics reorder sums).
DETERMINISTIC_MAIN = ("import sys, torch; torch.use_deterministic_algorithms(True, warn_only=True); "
                      "from megatron_grin.cli import main; sys.exit(main(sys.argv[1:]))")


def pretrain(args: list, *, deterministic: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m megatron_grin pretrain ARGS`` (one process); asserts exit status 0 with its output."""
    cmd = ([sys.executable, "-c", DETERMINISTIC_MAIN, "pretrain"] if deterministic
           else [sys.executable, "-m", "megatron_grin", "pretrain"])
    extra = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"} if deterministic else {}
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env(**extra),
                          check=False)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def losses(log_dir: str) -> dict[int, float]:
    """iteration -> training loss from metrics.jsonl (later records win)."""
    with open(os.path.join(log_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return {r["iteration"]: r["loss"] for r in map(json.loads, f) if r["type"] == "train"}


def summary(log_dir: str) -> dict:
    with open(os.path.join(log_dir, "summary.json"), encoding="utf-8") as f:
        return json.load(f)
