"""Peak CPU memory of attention at growing sequence lengths: is it linear in s?

Two measurements, each in fresh processes (peak RSS is the kernel's own count, VmHWM / ru_maxrss):

* ``kernels``: two stacked attention calls (forward + backward) of each kernel at each length, in one
  process: the peak mark is reset through /proc/self/clear_refs before each run and read back after.
  Kernels: ``blockwise`` (ops.window_attention, the CPU sliding-window path), ``sdpa`` (full causal) and
  ``dense`` (megatron-like: K/V repeated, full fp32 scores, masked softmax), the control that shows
  the instrument sees quadratic growth.
* ``model``: one training step (forward, backward, AdamW) of a 2-layer GRIN-shaped model with
  megatron-core (world size 1), one child process per length; the peak is the child's ru_maxrss from
  ``os.wait4``. GRIN's attention at CPU scale: head dim 128, 4 query heads per KV head, sliding window
  2047, 16 experts top-2, ffn / hidden = 1.5625 and vocab / hidden = 7.83 as GRIN's (6400, 32064 at
  4096); hidden 512, micro-batch 1, fp32.

    python benchmarks/attention_memory.py kernels --seqs 1024 4096
    python benchmarks/attention_memory.py model --seqs 1024 4096 [--attention-backend unfused]

Run under MALLOC_MMAP_THRESHOLD_=65536 (set for the children here) so glibc returns large freed blocks
to the OS at once; otherwise its dynamic threshold can keep them resident and blur the numbers.
Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

MIB = 2**20
ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
#: the "model" case: GRIN's attention shape (head dim 128, 4 q heads per kv head, window 2047), scaled width
MODEL = dict(num_layers=2, hidden_size=512, ffn_hidden_size=800, num_attention_heads=4, num_query_groups=1,
             num_experts=16, moe_router_topk=2, vocab_size=4008, make_vocab_size_divisible_by=8,
             sliding_window=2047, max_position_embeddings=4096, bf16=False, input_jitter_eps=0.01)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / MIB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    """Reset the peak-RSS mark (VmHWM) so earlier peaks do not hide the one measured next (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _dense(q, k, v, window, scale):
    """megatron-like unfused attention: repeat K/V, full fp32 scores, masked softmax, matmul."""
    import torch

    r = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    i = torch.arange(q.shape[-2])
    keep = i[None] <= i[:, None]
    if window is not None:
        keep &= (i[:, None] - i[None]) <= window
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(scores.masked_fill(~keep, -10000.0), -1), v)


def kernel_peak(kind: str, seq: int, window, heads: int = 8, groups: int = 2, dim: int = 64) -> dict:
    """Peak RSS growth of two stacked attention calls, forward + backward (batch 1, fp32)."""
    import torch

    from megatron_grin.ops import window_attention as wa

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, seq, dim, generator=gen, requires_grad=True)
    k = torch.randn(1, groups, seq, dim, generator=gen, requires_grad=True)
    v = torch.randn(1, groups, seq, dim, generator=gen, requires_grad=True)
    scale = 1 / math.sqrt(dim)
    attn = {"blockwise": lambda x: wa.window_attention_blockwise(x, k, v, window, scale),
            "sdpa": lambda x: wa.sdpa_attention(x, k, v, scale),
            "dense": lambda x: _dense(x, k, v, window, scale)}[kind]
    _reset_peak()
    base = _status_mib("VmRSS")
    start = time.perf_counter()
    x = q
    for _ in range(2):
        x = x + attn(x)  # each call's saved tensors live until backward
    x.pow(2).mean().backward()
    seconds = time.perf_counter() - start
    growth = _status_mib("VmHWM") - base
    return {"case": "kernels", "kernel": kind, "seq": seq, "window": window, "heads": heads, "groups": groups,
            "dim": dim, "growth_mib": round(growth, 1), "seconds": round(seconds, 2)}


def _model_step(seq: int, attention_backend: str, port: int) -> dict:
    """Child: one training step of the 2-layer GRIN-shaped model; prints its JSON line."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_grin import compat
    from megatron_grin.config import preset
    from megatron_grin.model.build import build_model

    compat.apply()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)
    torch.manual_seed(0)
    cfg = preset("grin-16x3.8b", **MODEL, attention_backend=attention_backend)
    model = build_model(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(seq).unsqueeze(0)
    _reset_peak()  # building allocates transients of its own: measure the step
    after_build = _status_mib("VmRSS")
    start = time.perf_counter()
    model(tokens, positions, None, labels=tokens).mean().backward()
    fwd_bwd_peak = _status_mib("VmHWM")
    optimizer.step()
    core = type(model.decoder.layers[0].self_attention.core_attention).__name__
    return {"case": "model", "seq": seq, "attention_backend": attention_backend, "core_attention": core,
            "after_build_mib": round(after_build, 1), "fwd_bwd_peak_mib": round(fwd_bwd_peak, 1),
            "step_peak_mib": round(_status_mib("VmHWM"), 1),
            "step_seconds": round(time.perf_counter() - start, 2)}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_peak(seq: int, attention_backend: str = "auto") -> dict:
    """Run one training step in a child process; its peak RSS is the child's ru_maxrss."""
    port = _free_port()
    cmd = [sys.executable, os.path.abspath(__file__), "_model_child", str(seq), attention_backend, str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ENV})
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"model step at seq {seq} failed ({proc.returncode}):\n{err[-3000:]}")
    return {**json.loads(lines[-1]), "process_peak_mib": round(usage.ru_maxrss * 1024 / MIB, 1)}


def measure(*args: str) -> list[dict]:
    """Run this script with ``args`` in a fresh process (for tests); its JSON lines as dicts."""
    res = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True,
                         timeout=900, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    if res.returncode or not rows:
        raise RuntimeError(f"attention_memory.py {' '.join(args)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("case", choices=["kernels", "model", "_model_child"])
    p.add_argument("rest", nargs="*")
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--kernels", nargs="+", default=["blockwise", "sdpa"])
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--attention-backend", default="auto")
    args = p.parse_args(argv)
    if args.case == "_model_child":
        seq, backend, port = args.rest
        print(json.dumps(_model_step(int(seq), backend, int(port))), flush=True)
        return
    if args.case == "model":
        for seq in args.seqs:
            print(json.dumps(model_peak(seq, args.attention_backend)), flush=True)
        return
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != ENV["MALLOC_MMAP_THRESHOLD_"]:  # glibc reads it at start
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ENV})
    import torch

    torch.set_num_threads(1)
    for kind in args.kernels:
        for seq in args.seqs:
            window = None if kind == "sdpa" else args.window
            print(json.dumps(kernel_peak(kind, seq, window, args.heads, args.groups)), flush=True)


if __name__ == "__main__":
    main()
