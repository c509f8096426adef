"""Measure the activation memory of small GRIN models on CPU and compare it with ``megatron-grin plan``.

Activation memory is what autograd keeps for backward. It is measured exactly, on any device, by
tracking the storages that pass through ``torch.autograd.graph.saved_tensors_hooks``: a storage is
counted once (views share it) from the moment it is saved until the graph releases it, parameters
excluded. Before the forward nothing is held, so the bytes held when the forward ends are the
forward's activation memory; the peak during backward adds what recomputation rebuilds.

Each config is a real megatron-core GRIN model (world size 1, ``compat.apply()``, fp32, local
layers, SequentialMLP experts, megatron's allgather dispatcher) run forward in training mode and backward,
with no, selective and full recomputation, under both attention implementations: megatron's unfused
DotProductAttention (``--attention-backend unfused``) and GrinCoreAttention's fused kernels (``auto``:
SDPA for full causal, the blockwise kernel for a sliding window on CPU). The estimate is
``plan_memory.microbatch_activation_bytes(..., impl=Implementation(attention=...), dtype_bytes=4)``.
Saved tensors only; ``benchmarks/step_memory.py`` measures everything a step allocates (transients,
optimizer, the GPU expert paths).

    python benchmarks/activation_memory.py           # all configs -> benchmarks/results/activation_memory.json
    python benchmarks/activation_memory.py --quick   # the tiny configs tests/plan/test_plan.py asserts on
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from megatron_grin.plan import layout as plan_layout
from megatron_grin.plan import memory as plan_memory
from megatron_grin.config import GrinConfig, preset

RESULTS = Path(__file__).resolve().parent / "results" / "activation_memory.json"
TOLERANCE = 0.15
RECOMPUTE = ("none", "selective", "full")

#: (name, model overrides, seq, micro_batch). GRIN's shape ratios: ffn ~1.5 hidden, 4 query heads per
#: kv head, head dim 64 here; 8 experts, top-2, input jitter on (as GRIN trains).
QUICK = [
    ("h128-s128-b2-L2", dict(hidden_size=128, num_layers=2), 128, 2),
    ("h128-s128-b1-L3-window", dict(hidden_size=128, num_layers=3, sliding_window=63), 128, 1),
]
FULL = [
    ("h256-s256-b2-L2", dict(hidden_size=256, num_layers=2), 256, 2),
    ("h256-s512-b1-L4", dict(hidden_size=256, num_layers=4), 512, 1),
    ("h512-s256-b4-L2", dict(hidden_size=512, num_layers=2), 256, 4),
    ("h512-s512-b1-L2-window", dict(hidden_size=512, num_layers=2, sliding_window=255), 512, 1),
    ("h384-s384-b3-L3-top4", dict(hidden_size=384, num_layers=3, moe_router_topk=4), 384, 3),
]


#: attention implementation -> (--attention-backend, the planner's name for a config without / with a window)
ATTENTION = {"unfused": ("unfused", "unfused", "unfused"), "fused": ("auto", "flash", "blockwise")}


def implementation(cfg: GrinConfig, attention: str) -> plan_layout.Implementation:
    name = ATTENTION[attention][2 if cfg.sliding_window is not None else 1]
    return plan_layout.Implementation(attention=name, expert_backend="sequential", fused_swiglu=False)


def reset_attention_env() -> None:
    """megatron's GPTModel pins NVTE_*_ATTN for the first attention backend a process builds; forget it."""
    for var in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN"):
        os.environ.pop(var, None)


def bench_config(overrides: dict, seq: int, attention: str = "unfused") -> GrinConfig:
    h = overrides["hidden_size"]
    heads = h // 64 if h >= 256 else 4
    base = dict(ffn_hidden_size=3 * h // 2, num_attention_heads=heads, num_query_groups=max(heads // 4, 2),
                num_experts=8, moe_router_topk=2, vocab_size=1000, max_position_embeddings=seq,
                sliding_window=None, input_jitter_eps=0.01, expert_backend="sequential", bf16=False,
                attention_backend=ATTENTION[attention][0])
    return preset("tiny", **{**base, **overrides})


def with_recompute(cfg: GrinConfig, mode: str) -> GrinConfig:
    if mode == "full":
        return cfg.replace(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if mode == "selective":
        return cfg.replace(recompute_granularity="selective")
    return cfg


class SavedTensorTracker:
    """Bytes of the (non-parameter) storages autograd currently keeps for backward, and their peak."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if key in self.exclude or nbytes == 0:
            return tensor
        return _Held(self, tensor, key, nbytes)

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Held:
    """A saved tensor; the graph drops it after its backward (or with the graph), and __del__ counts that."""

    __slots__ = ("tracker", "tensor", "key")

    def __init__(self, tracker: SavedTensorTracker, tensor: torch.Tensor, key: int, nbytes: int):
        self.tracker, self.tensor, self.key = tracker, tensor, key
        refs = tracker.refs.get(key, 0)
        if refs == 0:
            tracker.sizes[key] = nbytes
            tracker.live += nbytes
            tracker.peak = max(tracker.peak, tracker.live)
        tracker.refs[key] = refs + 1

    def __del__(self):
        tracker = self.tracker
        refs = tracker.refs[self.key] - 1
        if refs:
            tracker.refs[self.key] = refs
        else:
            del tracker.refs[self.key]
            tracker.live -= tracker.sizes.pop(self.key)


def measure(cfg: GrinConfig, seq: int, micro_batch: int, seed: int = 0) -> dict:
    """Forward (training mode) + backward of one micro-batch; needs megatron parallel state (world size 1)."""
    from megatron_grin.model.build import build_model

    torch.manual_seed(seed)
    model = build_model(cfg).train()
    tokens = torch.randint(0, cfg.vocab_size, (micro_batch, seq))
    positions = torch.arange(seq).unsqueeze(0).expand(micro_batch, seq)
    tracker = SavedTensorTracker({p.untyped_storage().data_ptr() for p in model.parameters()})
    start = time.perf_counter()
    with tracker.hooks():
        loss = model(tokens, positions, None, labels=tokens).mean()
        forward = tracker.live
        tracker.peak = tracker.live
        loss.backward()
    seconds = time.perf_counter() - start
    return {"forward_bytes": forward, "backward_peak_bytes": tracker.peak, "after_backward_bytes": tracker.live,
            "seconds": seconds}


def estimate(cfg: GrinConfig, seq: int, micro_batch: int, mode: str, attention: str = "unfused") -> dict:
    impl = implementation(cfg, attention)
    est = plan_memory.microbatch_activation_bytes(cfg, seq, micro_batch, tp=1, dtype_bytes=4, recompute=mode,
                                           impl=impl)
    return {"forward_bytes": est["forward"], "backward_peak_bytes": est["backward_peak"]}


def run(configs, modes=RECOMPUTE, attentions=tuple(ATTENTION)) -> list[dict]:
    """Measure and estimate every (config, recompute mode, attention); needs megatron parallel state."""
    rows = []
    for name, overrides, seq, mb in configs:
        for mode, attention in [(m, a) for a in attentions for m in modes]:
            reset_attention_env()
            cfg = with_recompute(bench_config(overrides, seq, attention), mode)
            got, want = measure(cfg, seq, mb), estimate(cfg, seq, mb, mode, attention)
            rows.append({
                "config": name, "recompute": mode, "attention": attention, "seq": seq, "micro_batch": mb,
                "model": {k: getattr(cfg, k) for k in ("num_layers", "hidden_size", "ffn_hidden_size",
                                                        "num_attention_heads", "num_query_groups", "num_experts",
                                                        "moe_router_topk", "sliding_window", "vocab_size")},
                "measured": got, "estimated": want,
                "forward_error": want["forward_bytes"] / got["forward_bytes"] - 1,
                "backward_peak_error": want["backward_peak_bytes"] / got["backward_peak_bytes"] - 1,
            })
    return rows


#: Pipeline and tensor parallelism through megatron's schedules on 2 CPU processes (gloo):
#: (name, model overrides, seq, micro_batch, TP, PP, VPP, microbatches, recompute).
SCHEDULES = [
    ("pp2-1f1b", dict(hidden_size=128, num_layers=4), 128, 1, 1, 2, 1, 4, "none"),
    ("pp2-vpp2", dict(hidden_size=128, num_layers=4), 128, 1, 1, 2, 2, 4, "none"),
    ("pp2-vpp2-full", dict(hidden_size=128, num_layers=4), 128, 1, 1, 2, 2, 4, "full"),
    ("tp2-sp", dict(hidden_size=128, num_layers=2), 128, 2, 2, 1, 1, 2, "none"),
    ("tp2-sp-full", dict(hidden_size=128, num_layers=2), 128, 2, 2, 1, 1, 2, "full"),
]


def _schedule_run(scenario) -> dict:
    """One scenario on this rank: build the stage's chunks, run one step of megatron's schedule."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_grin.model.build import build_model

    name, overrides, seq, mb, tp, pp, vpp, num_micro, mode = scenario
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None)
    model_parallel_cuda_manual_seed(0)
    reset_attention_env()
    cfg = with_recompute(bench_config(overrides, seq), mode).replace(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None)
    torch.manual_seed(0)
    chunks = []
    for v in range(vpp):
        vp = v if vpp > 1 else None
        chunks.append(build_model(cfg, pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
                                  post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
                                  vp_stage=vp).train())
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (mb, seq), generator=g) for _ in range(num_micro)]
    positions = torch.arange(seq).unsqueeze(0).expand(mb, seq)

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        return model(tokens, positions, None, labels=tokens), lambda out: (out.float().mean(), {})

    data = [iter(batches) for _ in chunks] if vpp > 1 else iter(batches)
    tracker = SavedTensorTracker({p.untyped_storage().data_ptr() for c in chunks for p in c.parameters()})
    with tracker.hooks():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=data,
                                    model=chunks if vpp > 1 else chunks[0], num_microbatches=num_micro,
                                    seq_length=seq, micro_batch_size=mb, forward_only=False)
    lay = plan_layout.Layout(gpus=tp * pp, tp=tp, pp=pp, vpp=vpp, micro_batch_size=mb, global_batch_size=mb * num_micro,
                      seq_length=seq, recompute=mode, bf16=False)
    est = plan_memory.rank_activation_bytes(cfg, lay, ps.get_pipeline_model_parallel_rank(),
                                     implementation(cfg, "unfused"))
    return {"config": name, "recompute": mode, "tp": tp, "pp": pp, "vpp": vpp, "num_microbatches": num_micro,
            "seq": seq, "micro_batch": mb, "rank": torch.distributed.get_rank(),
            "pp_rank": ps.get_pipeline_model_parallel_rank(), "tp_rank": ps.get_tensor_model_parallel_rank(),
            "inflight_estimated": est["inflight"], "measured_peak_bytes": tracker.peak,
            "estimated_peak_bytes": est["peak"], "peak_error": est["peak"] / tracker.peak - 1}


def schedule_rows(scenarios=SCHEDULES) -> list[dict]:
    """Run scenarios in this (already initialised, world size TP x PP) process group; this rank's rows."""
    return [_schedule_run(s) for s in scenarios]


def _schedule_worker(rank: int, world: int, port: int, scenarios, queue) -> None:
    torch.set_num_threads(1)
    try:
        import torch.distributed as dist

        from megatron_grin import compat

        compat.apply()
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        queue.put((rank, schedule_rows(scenarios), None))
    except BaseException:  # report instead of hanging the parent
        import traceback

        queue.put((rank, None, traceback.format_exc()))


def run_schedules(scenarios=SCHEDULES, world: int = 2, timeout: float = 600.0) -> list[dict]:
    """Every scenario on ``world`` spawned CPU processes; one row per rank and scenario."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_schedule_worker, args=(r, world, port, scenarios, queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    rows, errors, pending, deadline = [], [], world, time.monotonic() + timeout
    try:
        while pending and not errors:
            try:
                _, result, err = queue.get(timeout=5)
            except Exception:  # queue.Empty: keep waiting while the workers live
                if time.monotonic() > deadline or not any(p.is_alive() for p in procs):
                    errors.append("schedule workers died or timed out without a result")
                continue
            pending -= 1
            if err:
                errors.append(err)
            else:
                rows += result
    finally:
        for proc in procs:
            proc.join(timeout=5 if errors else 60)
            if proc.is_alive():
                proc.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return sorted(rows, key=lambda r: (scenarios.index(next(s for s in scenarios if s[0] == r["config"])), r["rank"]))


def init_single_process(port: int = 29731) -> None:
    """compat + gloo + megatron parallel state for one CPU process (what the tests' init_parallel does)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_grin import compat

    compat.apply()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)


def format_table(rows: list[dict]) -> str:
    lines = [f"{'config':<24} {'recompute':<10} {'attention':<9} {'measured MiB':>13} {'estimated MiB':>14} "
             f"{'error':>7}   {'bwd peak MiB':>12} {'estimated':>10} {'error':>7}"]
    for r in rows:
        m, e = r["measured"], r["estimated"]
        lines.append(f"{r['config']:<24} {r['recompute']:<10} {r.get('attention', 'unfused'):<9} "
                     f"{m['forward_bytes'] / 2**20:>13.2f} "
                     f"{e['forward_bytes'] / 2**20:>14.2f} {100 * r['forward_error']:>6.1f}%   "
                     f"{m['backward_peak_bytes'] / 2**20:>12.2f} {e['backward_peak_bytes'] / 2**20:>10.2f} "
                     f"{100 * r['backward_peak_error']:>6.1f}%")
    return "\n".join(lines)


def format_schedule_table(rows: list[dict]) -> str:
    lines = [f"{'config':<16} {'recompute':<9} {'rank':>4} {'pp rank':>7} {'in flight':>9} {'measured MiB':>13} "
             f"{'estimated MiB':>14} {'error':>7}"]
    for r in rows:
        lines.append(f"{r['config']:<16} {r['recompute']:<9} {r['rank']:>4} {r['pp_rank']:>7} "
                     f"{r['inflight_estimated']:>9} {r['measured_peak_bytes'] / 2**20:>13.2f} "
                     f"{r['estimated_peak_bytes'] / 2**20:>14.2f} {100 * r['peak_error']:>6.1f}%")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the tiny configs the tests use")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default {RESULTS})")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    init_single_process()
    configs = QUICK if args.quick else QUICK + FULL
    rows = run(configs)
    print(format_table(rows))
    worst = max(max(abs(r["forward_error"]), abs(r["backward_peak_error"])) for r in rows)
    if not args.quick:
        schedules = run_schedules()
        print()
        print(format_schedule_table(schedules))
        worst = max(worst, max(abs(r["peak_error"]) for r in schedules))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"torch": torch.__version__, "python": platform.python_version(), "device": "cpu",
                "dtype": "float32", "tolerance": TOLERANCE, "worst_abs_error": worst}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows, "schedules": schedules}, indent=1) + "\n")
        print(f"wrote {args.out}")
    print(f"worst |estimate / measured - 1| = {100 * worst:.1f}% (tolerance {100 * TOLERANCE:.0f}%)")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
