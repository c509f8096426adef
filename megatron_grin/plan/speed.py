"""``megatron-grin plan``'s time model: FLOPs of the slowest pipeline rank, the pipeline bubble and
TP/DP/PP communication, at an efficiency calibrated to GRIN's reported throughput (docs/planning.md)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

from megatron_grin.config import GrinConfig, preset
from megatron_grin.plan.layout import CALIBRATION, Assumptions, Layout
from megatron_grin.plan.memory import _layer_params, parameter_summary, rank_parameters


# ------------------------------------------------------------------------------------------------
# time
# ------------------------------------------------------------------------------------------------
def attention_window_ratio(seq: int, window: Optional[int]) -> float:
    """Attended (query, key) pairs with the sliding window / pairs of full causal attention."""
    causal = seq * (seq + 1) / 2
    if window is None or window >= seq:
        return 1.0
    return (window * (window + 1) / 2 + (seq - window) * window) / causal


def model_flops_per_token(cfg: GrinConfig, seq: int) -> dict[str, float]:
    """Training FLOPs per token, the MFU convention: 6 x active params + 12 x layers x (heads x head_dim)
    x seq (causal full attention counted as full, as PaLM and megatron do) x the sliding-window ratio."""
    dense = 6.0 * parameter_summary(cfg)["active"]
    attention = 12.0 * cfg.num_layers * cfg.num_attention_heads * cfg.head_dim * seq \
        * attention_window_ratio(seq, cfg.sliding_window)
    return {"params": dense, "attention": attention, "total": dense + attention}


def _layer_fwd_flops_per_token(cfg: GrinConfig, seq: int) -> tuple[float, float]:
    """(matmul, attention-score) forward FLOPs per token of one layer (whole layer, all TP ranks)."""
    lp = _layer_params(cfg)
    matmul = 2.0 * (lp["attention"] + lp["router"] + cfg.moe_router_topk * lp["expert"] // cfg.num_experts)
    score = 4.0 * cfg.num_attention_heads * cfg.head_dim * seq * attention_window_ratio(seq, cfg.sliding_window)
    return matmul, score


def rank_flops_per_microbatch(cfg: GrinConfig, lay: Layout, rank: int) -> float:
    """Hardware FLOPs (recomputation included) of one micro-batch through all chunks of one GPU."""
    tokens = lay.seq_length * lay.micro_batch_size
    matmul, score = _layer_fwd_flops_per_token(cfg, lay.seq_length)
    layer_fwd = matmul + score
    replay = {"none": 0.0, "selective": score, "full": layer_fwd}[lay.recompute]
    if lay.recompute == "full" and lay.recompute_method == "block":
        replay *= min(lay.recompute_num_layers, cfg.num_layers // (lay.pp * lay.vpp)) \
            / (cfg.num_layers // (lay.pp * lay.vpp))
    per_layer = 3 * layer_fwd + replay
    flops = cfg.num_layers // lay.pp * per_layer
    if rank == lay.pp - 1:
        flops += 3 * 2.0 * cfg.hidden_size * cfg.padded_vocab_size  # output layer (not recomputed)
    return flops * tokens / lay.tp


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
    if lay.distributed_optimizer:
        volume = params * (4 + (2 if lay.bf16 else 4))
    else:
        volume = 2 * params * 4
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
    sends = 2 * lay.vpp * lay.num_microbatches
    return sends * volume / (bandwidth * 1e9) * (1 - asm.pp_overlap)


def step_time(cfg: GrinConfig, lay: Layout, asm: Assumptions, efficiency: float) -> dict[str, float]:
    """Predicted seconds per step and their parts (the slowest pipeline rank sets the pace)."""
    flops = [rank_flops_per_microbatch(cfg, lay, r) for r in range(lay.pp)]
    compute = [f / (asm.peak_tflops * 1e12 * efficiency) for f in flops]
    tp = [_tp_comm_seconds(cfg, lay, asm, r) for r in range(lay.pp)]
    per_mb = [c + t for c, t in zip(compute, tp)]
    slowest = max(range(lay.pp), key=lambda r: per_mb[r])
    m = lay.num_microbatches
    bubble = (lay.pp - 1) / (lay.vpp * m)
    busy = m * per_mb[slowest]
    bubble_s = (lay.pp - 1) / lay.vpp * sum(per_mb) / lay.pp
    dp = max(_dp_comm_seconds(cfg, lay, asm, r) for r in range(lay.pp))
    pp = _pp_comm_seconds(cfg, lay, asm)
    total = busy + bubble_s + dp + pp
    tokens_per_gpu = lay.global_batch_size * lay.seq_length / lay.gpus
    tok_s = tokens_per_gpu / total
    mfu = tok_s * model_flops_per_token(cfg, lay.seq_length)["total"] / (asm.peak_tflops * 1e12)
    return {"step_s": total, "compute_s": m * compute[slowest], "tp_comm_s": m * tp[slowest],
            "tp_factor": per_mb[slowest] / compute[slowest], "bubble": bubble, "bubble_s": bubble_s,
            "dp_comm_s": dp, "pp_comm_s": pp, "slowest_rank": slowest,
            "stage_imbalance": max(flops) / (sum(flops) / lay.pp), "tokens_per_s_per_gpu": tok_s, "mfu": mfu,
            "hfu": sum(flops) * m * lay.tp * lay.dp / lay.gpus / total / (asm.peak_tflops * 1e12)}


def calibrated_efficiency(asm: Assumptions = Assumptions()) -> float:
    """The compute efficiency at which the CALIBRATION layout predicts GRIN's measured throughput.

    The step is C / eff + D, with C the compute (and bubble) time at 100 % efficiency and D the
    communication that does not scale with it; solved by bisection. docs/planning.md shows the numbers.
    """
    return _calibrated(dataclasses.replace(asm, efficiency=None))


@functools.lru_cache(maxsize=16)
def _calibrated(asm: Assumptions) -> float:
    cfg, lay = preset(CALIBRATION["model"]), CALIBRATION["layout"]
    target = CALIBRATION["tokens_per_s_per_gpu"]
    low, high = 1e-3, 1.0
    if step_time(cfg, lay, asm, high)["tokens_per_s_per_gpu"] < target:
        raise ValueError(f"the calibration anchor ({target:g} tokens/s/GPU) is unreachable even at 100% of "
                         f"{asm.peak_tflops:g} TFLOPS with these bandwidth assumptions")
    for _ in range(100):  # tokens/s grows monotonically with the efficiency
        mid = (low + high) / 2
        low, high = (mid, high) if step_time(cfg, lay, asm, mid)["tokens_per_s_per_gpu"] < target else (low, mid)
    return (low + high) / 2

