"""A plan: the memory of every pipeline rank and the predicted speed of one layout, each with its stated
error from the calibration points; the layout search and the single-change suggestions.

``evaluate(cfg, layout)`` is the public entry (``megatron-grin plan`` and ``pretrain --dry-run`` call it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from megatron_grin.accounting import parameter_counts
from megatron_grin.config import GrinConfig
from megatron_grin.plan import calibration
from megatron_grin.plan.calibration import Band, Calibration
from megatron_grin.plan.layout import RECOMPUTE_MODES, Assumptions, GiB, Implementation, Layout
from megatron_grin.plan.memory import RankMemory, rank_memory
from megatron_grin.plan.speed import ComputeModel, compute_model, step_time


# ------------------------------------------------------------------------------------------------
# calibration: the GPU-only residual and the error bands
# ------------------------------------------------------------------------------------------------
def predicted_peak(run: calibration.Run, residual: float = 0.0) -> RankMemory:
    """The planner's memory for a measured run (its measured rank, else the peak rank)."""
    asm = Assumptions(gpu_residual=residual)
    ranks = [rank_memory(run.cfg, run.layout, run.impl, asm, r) for r in range(run.layout.pp)]
    rank = run.measured.get("pp_rank")
    return ranks[rank] if rank is not None else max(ranks, key=lambda m: m.allocated)


@functools.lru_cache(maxsize=8)
def gpu_residual(cal: Calibration) -> float:
    """Share of the dynamic bytes (activations, working set, buffers) GPU runs allocate beyond the terms
    that CPU measurements reproduce exactly: the largest over the measured GPU runs, rounded up to 1 %."""
    shares = []
    for run in cal.memory_runs(gpu=True):
        mem = predicted_peak(run)
        dynamic = mem.allocated - mem.static
        shares.append((run.measured["peak_allocated_gib"] * GiB - mem.allocated) / dynamic)
    return math.ceil(100 * max([0.0] + shares)) / 100


@functools.lru_cache(maxsize=8)
def memory_errors(cal: Calibration) -> dict[str, list[float]]:
    """predicted / measured - 1 of the allocated peak: CPU runs (no residual) and GPU runs (fitted residual)."""
    residual = gpu_residual(cal)
    out: dict[str, list[float]] = {"cpu": [], "gpu": []}
    for run in cal.memory_runs():
        mem = predicted_peak(run, residual if run.on_gpu else 0.0)
        out["gpu" if run.on_gpu else "cpu"].append(mem.allocated / (run.measured["peak_allocated_gib"] * GiB) - 1)
    return out


def memory_band(cal: Calibration, peak: RankMemory) -> Band:
    """The stated error of a GPU plan's allocated peak: the worst CPU error of the modelled terms, plus the
    fitted GPU residual counted as its own uncertainty (it rests on few GPU points)."""
    errors = memory_errors(cal)
    cpu = max([abs(e) for e in errors["cpu"]] + [0.0])
    fitted = peak.allocated_terms.get("gpu_residual", 0.0) / peak.allocated
    points = len(errors["cpu"]) + len(errors["gpu"])
    return Band(-(cpu + fitted), cpu + fitted, points,
                f"layouts ({len(errors['gpu'])} GPU, {len(errors['cpu'])} CPU)")


@functools.lru_cache(maxsize=8)
def speed_errors(cal: Calibration, asm: Assumptions) -> tuple[float, ...]:
    """predicted / measured - 1 of tokens/s for the measured GPU runs, on their own device."""
    out = []
    for run in cal.speed_runs():
        run_asm = dataclasses.replace(asm, device=run.device, peak_tflops=None, efficiency=None)
        cm = compute_model(cal, run_asm)
        t = step_time(run.cfg, run.layout, run.impl, run_asm, cm)
        out.append(t["tokens_per_s_per_gpu"] * run.layout.gpus / run.measured["tokens_per_s"] - 1)
    return tuple(out)


# ------------------------------------------------------------------------------------------------
# a plan
# ------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Memory of every pipeline rank and the predicted speed of one layout, with their stated errors."""

    cfg: GrinConfig
    layout: Layout
    impl: Implementation
    assumptions: Assumptions
    ranks: list[RankMemory]
    time: dict
    compute: ComputeModel
    memory_band: Band
    speed_band: Band

    @property
    def peak(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.total)

    @property
    def capacity(self) -> float:
        return self.assumptions.gpu_memory_gib * GiB

    @property
    def headroom(self) -> float:
        return 1.0 - self.peak.total / self.capacity

    @property
    def required_headroom(self) -> float:
        """--min-headroom, or the memory prediction's stated error if that is larger."""
        return max(self.assumptions.min_headroom, self.memory_band.width)

    @property
    def fits(self) -> bool:
        return self.headroom >= self.required_headroom

    def to_dict(self) -> dict[str, Any]:
        t = dict(self.time)
        parts = t.pop("parts")
        return {
            "layout": {**dataclasses.asdict(self.layout), "dp": self.layout.dp,
                       "num_microbatches": self.layout.num_microbatches},
            "implementation": dataclasses.asdict(self.impl),
            "assumptions": dataclasses.asdict(self.assumptions),
            "parameters": parameter_counts(self.cfg),
            "memory_gib": [{"rank": r.rank, "parameters": r.parameters, "inflight_chunk_microbatches": r.inflight,
                            "allocated": {k: v / GiB for k, v in r.allocated_terms.items()},
                            "phase_peaks": {k: v / GiB for k, v in r.phase_peaks.items()},
                            "reserves": {k: v / GiB for k, v in r.reserve_terms.items()},
                            "peak_allocated": r.allocated / GiB, "total": r.total / GiB,
                            "activation_detail": {k: v / GiB for k, v in r.activation_detail.items()}}
                           for r in self.ranks],
            "peak_rank": self.peak.rank, "peak_allocated_gib": self.peak.allocated / GiB,
            "peak_gib": self.peak.total / GiB, "headroom": self.headroom,
            "required_headroom": self.required_headroom, "fits": self.fits,
            "memory_error": dataclasses.asdict(self.memory_band), "speed_error": dataclasses.asdict(self.speed_band),
            "time": {**t, "parts": {k: {"seconds": p.seconds, "source": p.source, "measured": p.measured}
                                    for k, p in parts.items()}},
        }


def resolve(asm: Assumptions, cal: Calibration) -> tuple[Assumptions, ComputeModel]:
    """Fill the device's datasheet peak and the fitted GPU residual into the assumptions."""
    cm = compute_model(cal, asm)
    residual = gpu_residual(cal) if asm.gpu_residual is None else asm.gpu_residual
    return dataclasses.replace(asm, device=cm.device, peak_tflops=cm.peak_flops / 1e12, gpu_residual=residual), cm


def evaluate(cfg: GrinConfig, lay: Layout, impl: Optional[Implementation] = None,
             asm: Assumptions = Assumptions(), cal: Optional[Calibration] = None) -> Plan:
    """Memory and speed of one (valid) layout; see Layout.problems for validity."""
    impl = impl or Implementation.for_config(cfg)
    cal = cal or calibration.load()
    asm, cm = resolve(asm, cal)
    ranks = [rank_memory(cfg, lay, impl, asm, r) for r in range(lay.pp)]
    peak = max(ranks, key=lambda r: r.total)
    speed = calibration.band(speed_errors(cal, dataclasses.replace(asm, device=None, peak_tflops=None)),
                             "GPU layouts")
    return Plan(cfg, lay, impl, asm, ranks, step_time(cfg, lay, impl, asm, cm), cm, memory_band(cal, peak), speed)


# ------------------------------------------------------------------------------------------------
# search and suggestions
# ------------------------------------------------------------------------------------------------
def candidate_layouts(cfg: GrinConfig, base: Layout, gpus_per_node: int = 8,
                      recompute_modes: Sequence[str] = RECOMPUTE_MODES) -> list[Layout]:
    """Valid layouts for --search: TP in {1,2,4,8}, PP dividing the layers, VPP, micro-batch 1..4."""
    out = []
    for tp in (1, 2, 4, 8):
        for pp in [p for p in range(1, cfg.num_layers + 1) if cfg.num_layers % p == 0]:
            if base.gpus % (tp * pp):
                continue
            per_stage = cfg.num_layers // pp
            vpps = [1] + ([v for v in range(2, per_stage + 1) if per_stage % v == 0] if pp > 1 else [])
            for vpp in vpps:
                for mbs in (1, 2, 3, 4):
                    for rec in recompute_modes:
                        lay = dataclasses.replace(base, tp=tp, pp=pp, vpp=vpp, micro_batch_size=mbs,
                                                  recompute=rec, recompute_method="uniform",
                                                  recompute_num_layers=1)
                        if not lay.problems(cfg, gpus_per_node):
                            out.append(lay)
    return out


def search(cfg: GrinConfig, base: Layout, impl: Optional[Implementation] = None,
           asm: Assumptions = Assumptions(), top: int = 5, cal: Optional[Calibration] = None) -> list[Plan]:
    """The fastest fitting layouts (headroom >= the required margin), best first.

    With flash attention selective recomputation frees only the attention's log-sum-exp (same memory
    as none, more compute), so it is searched only with unfused attention.
    """
    impl = impl or Implementation.for_config(cfg)
    modes = RECOMPUTE_MODES if impl.attention == "unfused" else ("none", "full")
    plans = [evaluate(cfg, lay, impl, asm, cal) for lay in candidate_layouts(cfg, base, asm.gpus_per_node, modes)]
    fitting = [p for p in plans if p.fits]
    fitting.sort(key=lambda p: (-p.time["tokens_per_s_per_gpu"], -p.headroom))
    return fitting[:top]


def _changes(cfg: GrinConfig, lay: Layout, asm: Assumptions) -> list[list[tuple[str, Layout]]]:
    """Each knob's single changes, smallest first."""
    def recompute(rec):
        return dataclasses.replace(lay, recompute=rec, recompute_method="uniform", recompute_num_layers=1)

    def more_stages(pp):
        same_vpp = dataclasses.replace(lay, pp=pp)
        keep = lay.vpp > 1 and not same_vpp.problems(cfg, asm.gpus_per_node)
        return same_vpp if keep else dataclasses.replace(lay, pp=pp, vpp=1)

    return [
        [(f"increase --pipeline-model-parallel-size to {pp}", more_stages(pp))
         for pp in range(lay.pp + 1, cfg.num_layers + 1) if cfg.num_layers % pp == 0],
        [(f"enable --recompute-granularity {rec}", recompute(rec))
         for rec in ("selective", "full") if RECOMPUTE_MODES.index(rec) > RECOMPUTE_MODES.index(lay.recompute)],
        [("enable --use-distributed-optimizer", dataclasses.replace(lay, distributed_optimizer=True))]
        if not lay.distributed_optimizer else [],
        [(f"increase --tensor-model-parallel-size to {tp}", dataclasses.replace(lay, tp=tp))
         for tp in (2, 4, 8) if tp > lay.tp],
        [("drop --num-virtual-stages-per-pipeline-rank (plain 1F1B keeps fewer micro-batches in flight)",
          dataclasses.replace(lay, vpp=1))]
        if lay.vpp > 1 else [],
        [(f"lower --micro-batch-size to {mbs}", dataclasses.replace(lay, micro_batch_size=mbs))
         for mbs in range(lay.micro_batch_size - 1, 0, -1)],
    ]


def suggestions(cfg: GrinConfig, lay: Layout, impl: Optional[Implementation] = None,
                asm: Assumptions = Assumptions(), cal: Optional[Calibration] = None) -> list[tuple[str, Plan]]:
    """For each knob, the smallest single change that makes a refused layout fit; fastest first."""
    found = []
    for changes in _changes(cfg, lay, asm):
        for text, cand in changes:
            if cand.problems(cfg, asm.gpus_per_node):
                continue
            result = evaluate(cfg, cand, impl, asm, cal)
            if result.fits:
                found.append((text, result))
                break
    found.sort(key=lambda item: -item[1].time["tokens_per_s_per_gpu"])
    return found
