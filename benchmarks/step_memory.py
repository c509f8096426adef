"""Peak allocated memory of real training steps on CPU, term by term, against ``megatron-grin plan``.

What a GPU's ``torch.cuda.max_memory_allocated()`` reports is the sum of the live tensor storages at the
worst moment of a step. This measures the same quantity on CPU, exactly and without a GPU: a
``TorchDispatchMode`` sees every aten op, registers each new output storage (views share one) and drops
it when a weak reference to the storage expires, so the live byte count after every op is what a
caching allocator would count as allocated (CUDA rounds each block up to 512 bytes; nothing else).

Each case builds the trainer's own model and optimizer (``training.trainer.build_model`` /
``build_optimizer``: Float16Module, megatron DDP with the fp32 grad buffer, megatron's optimizer) under
the tracker and runs three ``train_step``s on random tokens. The phases of the last step (forward,
backward, optimizer) are timed by wrapping megatron's ``forward_step`` / ``backward_step`` and
``optimizer.step``; their peaks, and the bytes live when the step starts (weights, gradients, optimizer
state, persistent buffers), are compared with ``plan.memory.rank_memory``'s allocated terms.

GPU code paths the CPU would not take are forced where they change allocations: torch's AdamW runs its
foreach implementation (the default for CUDA tensors; the CPU default is per tensor).

    python benchmarks/step_memory.py            # every case -> benchmarks/results/step_memory.json
    python benchmarks/step_memory.py --quick    # the cases tests/plan/test_memory_calibration.py runs
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from activation_memory import reset_attention_env
from megatron_grin.config import GrinConfig, preset
from megatron_grin.plan import layout as plan_layout
from megatron_grin.plan import memory as plan_memory

RESULTS = Path(__file__).resolve().parent / "results" / "step_memory.json"
CALIBRATION = Path(plan_memory.__file__).resolve().parent / "measurements" / "cpu-step-memory.json"
MiB = 2.0**20
PHASES = ("static", "forward", "backward", "optimizer")


# ------------------------------------------------------------------------------------------------
# the tracker
# ------------------------------------------------------------------------------------------------
class AllocationTracker(TorchDispatchMode):
    """Live bytes of all tensor storages after every aten op, the peak per phase, and (optionally) a log."""

    def __init__(self, record: bool = False):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int, str]] = {}
        self.bytes = 0
        self.phase = "setup"
        self.peaks: dict[str, int] = {}
        self.peak_ops: dict[str, str] = {}
        self.record = record
        self.log: list[tuple[str, str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _, _) in self.live.items() if ref.expired()]:
            self.bytes -= self.live.pop(key)[1]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self.live and storage.nbytes():
                    self.live[ref.cdata] = (ref, storage.nbytes(), self.phase)
                    self.bytes += storage.nbytes()
        if self.bytes > self.peaks.get(self.phase, -1):
            self.peaks[self.phase], self.peak_ops[self.phase] = self.bytes, str(func)
        if self.record:
            self.log.append((self.phase, str(func), self.bytes))
        return out

    def reset(self) -> None:
        self.peaks, self.peak_ops, self.log = {}, {}, []


@contextlib.contextmanager
def phases(tracker: AllocationTracker, optimizer):
    """Label ops by phase: megatron's forward_step / backward_step and the optimizer step."""
    from megatron.core.pipeline_parallel import schedules

    forward, backward, step = schedules.forward_step, schedules.backward_step, optimizer.step

    def forward_step(*args, **kwargs):
        tracker.phase = "forward"
        return forward(*args, **kwargs)

    def backward_step(*args, **kwargs):
        tracker.phase = "backward"
        try:
            return backward(*args, **kwargs)
        finally:
            tracker.phase = "forward"

    def optimizer_step(*args, **kwargs):
        tracker.phase = "optimizer"
        try:
            return step(*args, **kwargs)
        finally:
            tracker.phase = "between"

    schedules.forward_step, schedules.backward_step, optimizer.step = forward_step, backward_step, optimizer_step
    try:
        yield
    finally:
        schedules.forward_step, schedules.backward_step, optimizer.step = forward, backward, step


# ------------------------------------------------------------------------------------------------
# one case
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    """A model (overrides of the bench config), a layout and the implementation choices."""

    name: str
    model: dict
    layout: dict  # plan Layout fields except gpus (TP x PP x DP = the processes)
    expert_backend: str = "sequential"
    attention: str = "unfused"
    dp: int = 1
    #: force GroupedMMExperts onto a GPU path on CPU: (gemm, swiglu), the SwiGLU kernel under TRITON_INTERPRET
    expert_kernels: Optional[tuple[str, str]] = None

    @property
    def world(self) -> int:
        return self.layout.get("tp", 1) * self.layout.get("pp", 1) * self.dp

    def plan_layout(self) -> plan_layout.Layout:
        return plan_layout.Layout(gpus=self.world, **self.layout)

    def overrides(self) -> dict:
        """The model as overrides of the "tiny" preset (what the calibration file records)."""
        lay = self.plan_layout()
        h = self.model["hidden_size"]
        base = dict(ffn_hidden_size=3 * h // 2, num_attention_heads=4, num_query_groups=1, num_experts=16,
                    moe_router_topk=2, vocab_size=500, max_position_embeddings=lay.seq_length,
                    sliding_window=None, input_jitter_eps=0.01, bf16=lay.bf16)
        out = {**base, **self.model, "expert_backend": self.expert_backend,
               "attention_backend": "unfused" if self.attention == "unfused" else "auto",
               "tensor_model_parallel_size": lay.tp, "pipeline_model_parallel_size": lay.pp,
               "virtual_pipeline_model_parallel_size": lay.vpp if lay.vpp > 1 else None}
        if lay.recompute == "full":
            out.update(recompute_granularity="full", recompute_method=lay.recompute_method,
                       recompute_num_layers=lay.recompute_num_layers)
        elif lay.recompute == "selective":
            out.update(recompute_granularity="selective")
        return out

    def config(self) -> GrinConfig:
        return preset("tiny", **self.overrides())

    def implementation(self, cfg: GrinConfig) -> plan_layout.Implementation:
        return dataclasses.replace(plan_layout.Implementation.for_config(cfg, attention=self.attention),
                                   expert_backend=self.expert_backend)


def _batches(cfg: GrinConfig, micro_batch: int, seq: int):
    gen = torch.Generator().manual_seed(0)
    positions = torch.arange(seq).unsqueeze(0).expand(micro_batch, seq)
    while True:
        tokens = torch.randint(0, cfg.vocab_size, (micro_batch, seq), generator=gen)
        yield {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(micro_batch, seq),
               "attention_mask": None, "position_ids": positions}


def measure(case: Case, steps: int = 3) -> dict:
    """Build the trainer's model and optimizer under the tracker, run ``steps`` steps; the last one's
    bytes per phase. Needs megatron parallel state for the case's layout."""
    from megatron.core import parallel_state as ps
    from megatron.core.num_microbatches_calculator import (
        destroy_num_microbatches_calculator,
        init_num_microbatches_calculator,
    )

    from megatron_grin.training import trainer
    from megatron_grin.training.arguments import TrainConfig

    lay, cfg = case.plan_layout(), case.config()
    if case.expert_kernels is not None:
        from megatron_grin.model.grouped_experts import GroupedMMExperts

        GroupedMMExperts.kernels = lambda self, hidden: case.expert_kernels
    tcfg = TrainConfig(seq_length=lay.seq_length, micro_batch_size=lay.micro_batch_size,
                       global_batch_size=lay.global_batch_size, num_microbatches=lay.num_microbatches,
                       use_distributed_optimizer=lay.distributed_optimizer, train_iters=steps,
                       world_size=case.world, data_parallel_size=lay.dp)
    destroy_num_microbatches_calculator()
    init_num_microbatches_calculator(0, None, lay.global_batch_size, lay.micro_batch_size, lay.dp)
    reset_attention_env()
    tracker = AllocationTracker()
    with tracker:
        torch.manual_seed(0)
        model, tconfig = trainer.build_model(cfg, tcfg)
        optimizer, scheduler = trainer.build_optimizer(model, cfg, tcfg, tconfig)
        for group in optimizer.param_groups:
            group["foreach"] = True  # what torch's AdamW does with CUDA tensors
        data = [_batches(cfg, lay.micro_batch_size, lay.seq_length) for _ in model]
        with phases(tracker, optimizer):
            for step in range(steps):
                tracker.phase = "between"
                if step == steps - 1:
                    tracker.reset()
                    static = tracker.bytes
                trainer.train_step(model, optimizer, scheduler, data if len(data) > 1 else data[0], tcfg)
    params = sum(p.numel() for m in model for p in m.parameters())
    return {"name": case.name, "rank": torch.distributed.get_rank(), "pp_rank": ps.get_pipeline_model_parallel_rank(),
            "tp_rank": ps.get_tensor_model_parallel_rank(), "parameters": params,
            "measured": {"static": static, **{p: tracker.peaks.get(p, 0) for p in PHASES[1:]}},
            "peak_ops": dict(tracker.peak_ops)}


def estimate(case: Case, pp_rank: int) -> dict:
    """The planner's allocated bytes for this rank, by phase."""
    cfg, lay = case.config(), case.plan_layout()
    mem = plan_memory.rank_memory(cfg, lay, case.implementation(cfg), plan_layout.Assumptions(), pp_rank)
    return {"static": mem.static + mem.allocated_terms["buffers"], **mem.phase_peaks, "terms": mem.allocated_terms}


def compare(case: Case, row: dict) -> dict:
    est = estimate(case, row["pp_rank"])
    errors = {p: est[p] / row["measured"][p] - 1 for p in PHASES if row["measured"][p]}
    peak_measured = max(row["measured"][p] for p in PHASES)
    peak_estimated = max(est[p] for p in PHASES)
    return {**row, "case": dataclasses.asdict(case), "estimated": est, "errors": errors,
            "peak_measured": peak_measured, "peak_estimated": peak_estimated,
            "peak_error": peak_estimated / peak_measured - 1}


# ------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------
#: GRIN's proportions where they decide which term dominates: seq / head_dim = 32 (attention scores vs
#: hidden states), 16 experts top-2, 4 query heads per kv head, ffn ~ 1.5 hidden, input jitter on.
_GRIN_LIKE = dict(hidden_size=64, ffn_hidden_size=100, num_layers=2)
QUICK = [
    Case("grin-like-unfused-sequential", _GRIN_LIKE,
         dict(micro_batch_size=2, global_batch_size=4, seq_length=512)),
]
FULL = [
    Case("grin-like-window", {**_GRIN_LIKE, "sliding_window": 255},
         dict(micro_batch_size=2, global_batch_size=4, seq_length=512)),
    Case("grin-like-fp32", _GRIN_LIKE, dict(micro_batch_size=2, global_batch_size=4, seq_length=512, bf16=False)),
    Case("wide-short", dict(hidden_size=256, ffn_hidden_size=400, num_layers=3, num_attention_heads=8,
                             num_query_groups=2), dict(micro_batch_size=4, global_batch_size=8, seq_length=128)),
    Case("grin-like-flash-causal", _GRIN_LIKE, dict(micro_batch_size=2, global_batch_size=4, seq_length=512),
         attention="flash"),
    Case("grin-like-blockwise-window", {**_GRIN_LIKE, "sliding_window": 255},
         dict(micro_batch_size=2, global_batch_size=4, seq_length=512), attention="blockwise"),
    Case("grin-like-selective", _GRIN_LIKE,
         dict(micro_batch_size=2, global_batch_size=4, seq_length=512, recompute="selective")),
    Case("grin-like-full", {**_GRIN_LIKE, "num_layers": 4},
         dict(micro_batch_size=2, global_batch_size=4, seq_length=512, recompute="full")),
]
_MOE_HEAVY = dict(hidden_size=64, ffn_hidden_size=512, num_layers=2, moe_router_topk=4, vocab_size=128)
FULL += [Case("moe-heavy-sequential", _MOE_HEAVY, dict(micro_batch_size=4, global_batch_size=8, seq_length=128))]
#: Cases on several processes (gloo), or needing a fresh one (the Triton interpreter).
PARALLEL = [
    Case("moe-heavy-grouped-mm", _MOE_HEAVY, dict(micro_batch_size=4, global_batch_size=8, seq_length=128),
         expert_backend="grouped_mm", expert_kernels=("grouped_mm", "triton")),
    Case("grin-like-grouped-mm", {**_GRIN_LIKE, "ffn_hidden_size": 96},
         dict(micro_batch_size=2, global_batch_size=4, seq_length=512), expert_backend="grouped_mm",
         expert_kernels=("grouped_mm", "triton")),
    Case("pp2-1f1b", {**_GRIN_LIKE, "num_layers": 4}, dict(pp=2, micro_batch_size=1, global_batch_size=4,
                                                           seq_length=256)),
    Case("tp2-sp", {**_GRIN_LIKE, "num_query_groups": 2}, dict(tp=2, micro_batch_size=2, global_batch_size=4,
                                                                seq_length=256)),
    Case("dp2-distributed-optimizer", _GRIN_LIKE,
         dict(micro_batch_size=1, global_batch_size=4, seq_length=256, distributed_optimizer=True), dp=2),
]


def run_case(case: Case) -> dict:
    return compare(case, measure(case))


def _init(rank: int, world: int, port: int, tp: int, pp: int, vpp: Optional[int]) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_grin import compat

    compat.apply()
    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=vpp)
    model_parallel_cuda_manual_seed(0)


def run_in_process(case: Case, rank: int = 0, port: int = 29741) -> dict:
    """Initialise this process for the case's layout (TP x PP x DP processes) and run it."""
    lay = case.plan_layout()
    _init(rank, case.world, port, lay.tp, lay.pp, lay.vpp if lay.vpp > 1 else None)
    return run_case(case)


def _worker(rank: int, case: Case, port: int, queue) -> None:
    torch.set_num_threads(1)
    try:
        queue.put((rank, run_in_process(case, rank, port), None))
    except BaseException:  # report instead of hanging the parent
        import traceback

        queue.put((rank, None, traceback.format_exc()))


def run_spawned(case: Case, timeout: float = 600.0) -> list[dict]:
    """One case on ``case.world`` spawned CPU processes; one row per rank."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, case, port, queue)) for r in range(case.world)]
    interpret = os.environ.get("TRITON_INTERPRET")
    if case.expert_kernels and case.expert_kernels[1] == "triton":
        os.environ["TRITON_INTERPRET"] = "1"  # read when the children import the kernels
    try:
        for proc in procs:
            proc.start()
    finally:
        os.environ.pop("TRITON_INTERPRET", None)
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    rows, errors = [], []
    try:
        for _ in procs:
            _, row, err = queue.get(timeout=timeout)
            if err:
                errors.append(err)
                break
            rows.append(row)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return sorted(rows, key=lambda r: r["rank"])


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
def calibration_file(rows: list[dict]) -> dict:
    """The measured rows as plan/measurements/cpu-step-memory.json (schema: plan/calibration.py)."""
    runs = []
    for r in rows:
        case = Case(**{**r["case"], "expert_kernels": None})
        runs.append({"id": f"{r['name']} rank {r['rank']}", "device": "cpu",
                     "command": f"python benchmarks/step_memory.py --case {r['name']}",
                     "model": {"preset": "tiny", "overrides": case.overrides()},
                     "layout": dataclasses.asdict(case.plan_layout()),
                     "implementation": {"attention": case.attention, "expert_backend": case.expert_backend,
                                        "optimizer": "torch"},
                     "measured": {"peak_allocated_gib": r["peak_measured"] / 2**30, "pp_rank": r["pp_rank"],
                                  "phases_gib": {p: r["measured"][p] / 2**30 for p in PHASES}}})
    return {"schema": "megatron-grin-calibration/1", "id": "cpu-step-memory", "device": "cpu",
            "source": f"benchmarks/step_memory.py on CPU (torch {torch.__version__}): live tensor storages of "
                      f"real training steps, every GPU-relevant code path", "runs": runs, "benchmarks": []}


def format_table(rows: list[dict]) -> str:
    lines = [f"{'case':<30} {'rank':>4} " + " ".join(f"{p + ' MiB':>15} {'err':>6}" for p in PHASES)]
    for r in rows:
        cells = []
        for p in PHASES:
            m = r["measured"][p]
            cells.append(f"{m / MiB:>15.3f} {100 * r['errors'].get(p, 0.0):>+5.1f}%")
        lines.append(f"{r['name']:<30} {r['rank']:>4} " + " ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the cases the tests run")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default {RESULTS})")
    ap.add_argument("--case", action="append", default=[], help="run only these cases (by name)")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    start = time.perf_counter()
    single = QUICK if args.quick else QUICK + FULL
    parallel = [] if args.quick else PARALLEL
    if args.case:
        single = [c for c in single if c.name in args.case]
        parallel = [c for c in PARALLEL if c.name in args.case]
    rows = [run_in_process(c) for c in single]
    for case in parallel:
        rows += run_spawned(case)
    print(format_table(rows))
    worst = max(abs(r["peak_error"]) for r in rows)
    print(f"worst |peak estimate / measured - 1| = {100 * worst:.1f}% ({time.perf_counter() - start:.0f} s)")
    if not args.quick and not args.case:
        meta = {"torch": torch.__version__, "python": platform.python_version(), "device": "cpu",
                "worst_abs_peak_error": worst}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        CALIBRATION.write_text(json.dumps(calibration_file(rows), indent=1) + "\n")
        print(f"wrote {args.out} and {CALIBRATION}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
