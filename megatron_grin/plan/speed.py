"""``megatron-grin plan``'s time model: per-layer compute times from measurement, communication analytic.

Compute comes from ``megatron-grin bench`` results for the hardware (``plan/calibration``; the shipped
default is the H200 run of ../shared/notes/h200-2026-12-04.md, used for H100/H200 and scaled by the
datasheet ratio of the target device):
  * the MoE layer: ``bench moe-layer`` of the expert backend, scaled by the routed GEMM FLOPs;
  * the dense GEMM rate: ``bench moe-layer``'s dense SwiGLU MLP; the attention projections and the
    LM head run at it (modelled from a measured rate);
  * core attention: unfused, what ``bench model`` leaves per layer after the MoE layer, the projections
    and the head, scaled by b x heads x s^2; the fused kernels (flash/FlexAttention) have no GPU
    measurement yet and are modelled at FLASH_EFFICIENCY of peak;
  * the optimizer step: bytes AdamW moves at HBM_EFFICIENCY of the datasheet bandwidth (modelled).
TP, DP and pipeline communication stay analytic (volumes over the assumed bandwidths) and are labelled so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_grin.accounting import (
    DEVICES,
    attention_window_ratio,
    device_entry,
    flops_per_token,
    head_matmul_flops,
    layer_matmul_flops,
    rank_parameters,
)
from megatron_grin.config import GrinConfig
from megatron_grin.plan.calibration import Benchmark, Calibration
from megatron_grin.plan.layout import Assumptions, Implementation, Layout

#: share of peak the fused attention kernels reach fwd + bwd (FlashAttention-2/3 and FlexAttention reach
#: 35-60 % on H100 at head dim 128); an assumption until the GPU check measures our fused path
FLASH_EFFICIENCY = 0.40
#: share of the datasheet HBM bandwidth elementwise optimizer kernels reach
HBM_EFFICIENCY = 0.80
#: bytes per parameter an optimizer step moves (bf16 weights, fp32 main grads and state): torch foreach
#: AdamW with megatron's local fallbacks (clip 20, Adam 80, main->model copy 14, zeroing 4) or fused Adam
OPTIMIZER_BYTES = {"torch": 118.0, "fused": 54.0}
DEFAULT_DEVICE = "H100"


@dataclass(frozen=True)
class Part:
    """Seconds of one part of a micro-batch (or a step) on one GPU, and where the number comes from."""

    seconds: float
    source: str
    measured: bool


# ------------------------------------------------------------------------------------------------
# compute parts from the benchmarks
# ------------------------------------------------------------------------------------------------
def _device_ratio(measured_on: str, target: str) -> tuple[float, float]:
    """(compute, bandwidth) time ratios target / measured device from the datasheets (1.0 if unknown)."""
    m, t = device_entry(measured_on), device_entry(target)
    if m is None or t is None:
        return 1.0, 1.0
    return m[1][0] / t[1][0], m[1][2] / t[1][2]


@dataclass(frozen=True)
class ComputeModel:
    """Per-part compute times for one target device, from one device's benchmarks."""

    device: str
    measured_on: str
    peak_flops: float
    hbm_bytes_per_s: float
    gemm_flops: Optional[float]  # measured dense GEMM rate on the target (scaled), FLOP/s
    moe: Optional[Benchmark]
    model: Optional[Benchmark]
    compute_ratio: float
    bandwidth_ratio: float
    efficiency: Optional[float] = None  # --efficiency: every compute part from FLOPs at this share of peak

    @property
    def label(self) -> str:
        same = (device_entry(self.measured_on) or (self.measured_on,))[0] == self.device
        scaled = "" if same else f", scaled to {self.device} by the datasheet"
        return f"bench on {self.measured_on}{scaled}"

    def rate(self) -> float:
        return self.peak_flops * self.efficiency if self.efficiency else self.gemm_flops

    def moe_seconds(self, cfg: GrinConfig, tokens: int, backend: str) -> Part:
        """One MoE layer (router, dispatch, experts; fwd + bwd) on ``tokens`` tokens, whole layer."""
        flops = 3 * tokens * layer_matmul_flops(cfg)["experts"]
        if self.efficiency or self.moe is None:
            eff = self.efficiency or FLASH_EFFICIENCY
            return Part(flops / self.peak_flops / eff, f"modelled: expert GEMM FLOPs at {100 * eff:.0f}% of peak",
                        False)
        name = backend if backend in self.moe.ms else "grouped_mm"
        s = self.moe.shape
        ref = 3 * s["tokens"] * 2 * s["topk"] * 3 * s["hidden"] * s["ffn"]
        note = "" if name == backend else f" ({backend} unmeasured: {name})"
        return Part(self.moe.ms[name] / 1e3 * flops / ref * self.compute_ratio,
                    f"measured: bench moe-layer {name}{note}, {self.label}", True)

    def linear_seconds(self, cfg: GrinConfig, tokens: int) -> Part:
        f = layer_matmul_flops(cfg)
        return Part(3 * tokens * (f["qkv"] + f["proj"]) / self.rate(), "modelled: FLOPs at the measured GEMM rate",
                    not self.efficiency)

    def head_seconds(self, cfg: GrinConfig, tokens: int, tp: int = 1) -> Part:
        return Part(3 * tokens * head_matmul_flops(cfg, tp) / self.rate(), "modelled: FLOPs at the measured GEMM rate",
                    not self.efficiency)

    def core_seconds(self, cfg: GrinConfig, micro_batch: int, seq: int, attention: str) -> Part:
        """Core attention (and the layer's elementwise work) for one micro-batch, fwd + bwd, whole layer."""
        units = micro_batch * cfg.num_attention_heads * seq**2
        if attention == "unfused" and self.model is not None and not self.efficiency:
            per_unit, note = self._unfused_per_unit()
            return Part(per_unit * units * self.bandwidth_ratio, f"measured: {note}, {self.label}", True)
        keys = (seq + 1) / 2 * attention_window_ratio(seq, cfg.sliding_window)
        if attention == "unfused":
            keys = seq  # the full square, masked
        flops = 3.5 * micro_batch * seq * 4 * cfg.num_attention_heads * cfg.head_dim * keys  # bwd = 2.5 x fwd
        eff = self.efficiency or FLASH_EFFICIENCY
        return Part(flops / (self.peak_flops * eff), f"modelled: score FLOPs at {100 * eff:.0f}% of peak", False)

    def _unfused_per_unit(self) -> tuple[float, str]:
        """Seconds per b x heads x s^2 of the unfused layer remainder measured by ``bench model``."""
        m = self.model
        cfg = GrinConfig(**{k: v for k, v in m.model.items() if k in GrinConfig.__dataclass_fields__})
        name = next(iter(m.ms)) if "grouped_mm" not in m.ms else "grouped_mm"
        layers, b = cfg.num_layers, m.tokens // m.seq_length
        rest = (m.ms[name] / 1e3 * self.compute_ratio - self.head_seconds(cfg, m.tokens).seconds) / layers \
            - self.moe_seconds(cfg, m.tokens, name).seconds - self.linear_seconds(cfg, m.tokens).seconds
        return (rest / (b * cfg.num_attention_heads * m.seq_length**2) / self.compute_ratio,
                f"bench model {layers} layers minus MoE, projections, head")

    def optimizer_seconds(self, params: float, optimizer: str) -> Part:
        seconds = OPTIMIZER_BYTES[optimizer] * params / (self.hbm_bytes_per_s * HBM_EFFICIENCY)
        return Part(seconds, f"modelled: {OPTIMIZER_BYTES[optimizer]:.0f} B/param at {100 * HBM_EFFICIENCY:.0f}% of "
                             f"HBM bandwidth", False)


def compute_model(cal: Calibration, asm: Assumptions) -> ComputeModel:
    """The compute model for the assumed device from the calibration's GPU benchmarks."""
    target = asm.device or DEFAULT_DEVICE
    found = device_entry(target)
    if found is None:
        raise ValueError(f"--device {target!r} is not in the datasheet table (accounting.DEVICES); use one of "
                         f"{', '.join(DEVICES)}")
    peak = (asm.peak_tflops or found[1][0]) * 1e12
    moe = _latest(cal.benchmarks_for("moe-layer"), target)
    model = _latest(cal.benchmarks_for("model"), target)
    measured_on = (moe or model).device if (moe or model) else target
    compute_ratio, bandwidth_ratio = _device_ratio(measured_on, target)
    gemm = None
    if moe is not None and "dense" in moe.ms:
        s = moe.shape
        gemm = 18.0 * s["tokens"] * s["hidden"] * s["topk"] * s["ffn"] / (moe.ms["dense"] / 1e3) / compute_ratio
    efficiency = asm.efficiency if asm.efficiency is not None else (None if gemm else 0.5)
    return ComputeModel(found[0], measured_on, peak, found[1][2] * 1e12, gemm, moe, model, compute_ratio,
                        bandwidth_ratio, efficiency)


def _latest(benches: list[Benchmark], target: str) -> Optional[Benchmark]:
    """The last benchmark measured on the target device, else the last one on any GPU."""
    same = [b for b in benches if device_entry(b.device) and device_entry(b.device)[0] == device_entry(target)[0]]
    return (same or benches or [None])[-1]


# ------------------------------------------------------------------------------------------------
# a step
# ------------------------------------------------------------------------------------------------
def microbatch_parts(cfg: GrinConfig, lay: Layout, impl: Implementation, cm: ComputeModel,
                     rank: int) -> dict[str, Part]:
    """Compute of one micro-batch through all chunks of one GPU (recomputation included), by part."""
    tokens, tp = lay.seq_length * lay.micro_batch_size, lay.tp
    layers = cfg.num_layers // lay.pp
    moe = cm.moe_seconds(cfg, tokens, impl.expert_backend)
    linear = cm.linear_seconds(cfg, tokens)
    core = cm.core_seconds(cfg, lay.micro_batch_size, lay.seq_length, impl.attention)
    replay = {"none": 0.0, "selective": 1 / 3, "full": 1 / 3}[lay.recompute]  # forward = 1/3 of fwd + bwd
    if lay.recompute == "full" and lay.recompute_method == "block":
        replay *= min(lay.recompute_num_layers, layers // lay.vpp) / (layers // lay.vpp)
    full = replay if lay.recompute == "full" else 0.0

    def scaled(part: Part, factor: float) -> Part:
        return Part(part.seconds * factor, part.source, part.measured)

    parts = {"moe_layers": scaled(moe, layers * (1 + full) / tp),
             "attention_projections": scaled(linear, layers * (1 + full) / tp),
             "core_attention": scaled(core, layers * (1 + replay) / tp)}
    if rank == lay.pp - 1:
        parts["lm_head"] = scaled(cm.head_seconds(cfg, tokens, tp), 1 / tp)
    return parts


def _tp_comm_seconds(cfg: GrinConfig, lay: Layout, asm: Assumptions, rank: int) -> float:
    """Sequence-parallel all-gathers / reduce-scatters per micro-batch on one GPU (NVLink)."""
    if lay.tp == 1:
        return 0.0
    per_layer = 4 + 5 + (4 if lay.recompute == "full" else 0)  # forward, backward (+ SP re-gather), replay
    count = cfg.num_layers // lay.pp * per_layer + (3 if rank == lay.pp - 1 else 0)
    volume = lay.seq_length * lay.micro_batch_size * cfg.hidden_size * (2 if lay.bf16 else 4)
    return count * volume * (lay.tp - 1) / lay.tp / (asm.nvlink_gbps * 1e9) * (1 - asm.tp_overlap)


def _dp_comm_seconds(cfg: GrinConfig, lay: Layout, asm: Assumptions, rank: int) -> float:
    """Gradient reduce-scatter (fp32) + parameter all-gather per step, or an fp32 all-reduce."""
    if lay.dp == 1:
        return 0.0
    params = rank_parameters(cfg, lay.tp, lay.pp, lay.vpp, rank)
    volume = params * (4 + (2 if lay.bf16 else 4)) if lay.distributed_optimizer else 2 * params * 4
    within_node = lay.tp * lay.dp <= asm.gpus_per_node  # megatron puts a stage's DP replicas on adjacent ranks
    bandwidth = asm.nvlink_gbps if within_node else asm.network_gbps
    return volume * (lay.dp - 1) / lay.dp / (bandwidth * 1e9) * (1 - asm.dp_overlap)


def _pp_comm_seconds(cfg: GrinConfig, lay: Layout, asm: Assumptions) -> float:
    """Activation and gradient sends per step on one GPU: 2 x VPP per micro-batch."""
    if lay.pp == 1:
        return 0.0
    volume = lay.seq_length * lay.micro_batch_size / lay.tp * cfg.hidden_size * (2 if lay.bf16 else 4)
    same_node = lay.tp * lay.dp < asm.gpus_per_node
    bandwidth = asm.nvlink_gbps if same_node else asm.p2p_network_gbps
    return 2 * lay.vpp * lay.num_microbatches * volume / (bandwidth * 1e9) * (1 - asm.pp_overlap)


def step_time(cfg: GrinConfig, lay: Layout, impl: Implementation, asm: Assumptions,
              cm: ComputeModel) -> dict:
    """Predicted seconds per step and their parts (the slowest pipeline rank sets the pace)."""
    parts = [microbatch_parts(cfg, lay, impl, cm, r) for r in range(lay.pp)]
    compute = [sum(p.seconds for p in rank.values()) for rank in parts]
    tp = [_tp_comm_seconds(cfg, lay, asm, r) for r in range(lay.pp)]
    per_mb = [c + t for c, t in zip(compute, tp)]
    slowest = max(range(lay.pp), key=lambda r: per_mb[r])
    m = lay.num_microbatches
    bubble_s = (lay.pp - 1) / lay.vpp * sum(per_mb) / lay.pp
    params = max(rank_parameters(cfg, lay.tp, lay.pp, lay.vpp, r) for r in range(lay.pp))
    optimizer = cm.optimizer_seconds(params / lay.dp if lay.distributed_optimizer else params, impl.optimizer)
    dp = max(_dp_comm_seconds(cfg, lay, asm, r) for r in range(lay.pp))
    pp = _pp_comm_seconds(cfg, lay, asm)
    total = m * per_mb[slowest] + bubble_s + optimizer.seconds + dp + pp
    tok_s = lay.global_batch_size * lay.seq_length / lay.gpus / total
    mfu = tok_s * flops_per_token(cfg, lay.seq_length)["total"] / cm.peak_flops
    step_parts = {name: Part(m * p.seconds, p.source, p.measured) for name, p in parts[slowest].items()}
    step_parts["optimizer_step"] = optimizer
    return {"step_s": total, "compute_s": m * compute[slowest], "tp_comm_s": m * tp[slowest],
            "bubble": (lay.pp - 1) / (lay.vpp * m), "bubble_s": bubble_s, "optimizer_s": optimizer.seconds,
            "dp_comm_s": dp, "pp_comm_s": pp, "slowest_rank": slowest,
            "stage_imbalance": max(compute) / (sum(compute) / lay.pp), "tokens_per_s_per_gpu": tok_s, "mfu": mfu,
            "parts": step_parts}
