"""``megatron-grin plan``'s text output: every memory term and time part, what is measured and what is
modelled, and the stated error of each prediction."""

from __future__ import annotations

from megatron_grin.accounting import flops_per_token, parameter_counts
from megatron_grin.plan.layout import GiB
from megatron_grin.plan.planner import Plan

_ALLOCATED = {
    "weights": "weights ({dtype}, this stage's layers incl. all experts, / TP)",
    "main_grads": "main gradients (fp32 DDP buffer)",
    "optimizer_states": "optimizer state (fp32 master + Adam m, v{shard})",
    "buffers": "persistent buffers (unfused attention score buffer, mask)",
    "activations": "activations saved for backward (in flight)",
    "working_set": "working set at the peak (recompute, transients)",
    "optimizer_step": "optimizer step temporaries (foreach AdamW)",
    "gpu_residual": "GPU-only allocations (fitted, +{residual:.0%} of dynamic)",
}
_RESERVES = {
    "imbalance_reserve": "dropless imbalance reserve ({imbalance:g}x mean expert load)",
    "fragmentation": "allocator fragmentation ({fragmentation:.0%} of activations)",
    "cuda_context_nccl": "CUDA context + NCCL buffers",
}
_PARTS = {"moe_layers": "MoE layers (router, dispatch, experts)", "attention_projections": "attention q/k/v/o GEMMs",
          "core_attention": "core attention and elementwise", "lm_head": "LM head",
          "optimizer_step": "optimizer step"}


def _row(label: str, values: list[str], width: int = 64) -> str:
    return ("  " + label).ljust(width) + "".join(f"{v:>12}" for v in values)


def header(plan: Plan) -> list[str]:
    c, lay, asm = plan.cfg, plan.layout, plan.assumptions
    counts = parameter_counts(c)
    return [f"model: {c.num_layers} layers, hidden {c.hidden_size}, {c.num_experts} experts (top-{c.moe_router_topk}, "
            f"ffn {c.ffn_hidden_size}): {counts['total'] / 1e9:.2f}B parameters, {counts['active'] / 1e9:.2f}B active",
            f"on {lay.gpus} x {asm.device} ({asm.gpu_memory_gib:g} GiB): {lay.describe()}",
            f"implementation: {plan.impl.describe()}"]


def memory_lines(plan: Plan) -> list[str]:
    lay, asm = plan.layout, plan.assumptions
    cols = [plan.ranks[r] for r in sorted({0, plan.peak.rank, lay.pp - 1})]
    fmt = dict(dtype="bf16" if lay.bf16 else "fp32", imbalance=asm.imbalance, fragmentation=asm.fragmentation,
               residual=asm.gpu_residual or 0.0, shard=f", / DP {lay.dp}" if lay.distributed_optimizer else "")
    gib = lambda v: f"{v / GiB:.2f}"  # noqa: E731
    lines = ["", "memory per GPU (GiB)".ljust(64) + "".join(f"{'PP rank ' + str(r.rank):>12}" for r in cols),
             _row("parameters on the GPU", [f"{r.parameters / 1e9:.2f}B" for r in cols])]
    keys = [k for k in _ALLOCATED if any(k in r.allocated_terms for r in cols)]
    lines += [_row(_ALLOCATED[k].format(**fmt), [gib(r.allocated_terms.get(k, 0.0)) for r in cols]) for k in keys]
    lines.append(_row("= peak allocated (torch.cuda.max_memory_allocated)", [gib(r.allocated) for r in cols]))
    lines.append(_row("  at the peak of", [r.peak_phase for r in cols]))
    lines += [_row(label.format(**fmt), [gib(r.reserve_terms[k]) for r in cols]) for k, label in _RESERVES.items()]
    lines.append(_row("= total on the device", [gib(r.total) for r in cols]))
    lines.append(_row("chunk-microbatches in flight", [str(r.inflight) for r in cols]))
    peak, band = plan.peak, plan.memory_band
    lines += [f"peak: PP rank {peak.rank}, {peak.allocated / GiB:.1f} GiB allocated (+-{100 * band.width:.0f} %: "
              f"{band.describe()}), {peak.total / GiB:.1f} GiB with reserves, of {asm.gpu_memory_gib:g} GiB: "
              f"headroom {100 * plan.headroom:.1f}% (required {100 * plan.required_headroom:.0f}%)"]
    return lines


def time_lines(plan: Plan) -> list[str]:
    t, lay, asm = plan.time, plan.layout, plan.assumptions
    fl = flops_per_token(plan.cfg, lay.seq_length)
    lines = ["", f"predicted speed (seconds per step on the slowest PP rank {t['slowest_rank']}, "
                 f"stage imbalance {t['stage_imbalance']:.3f})"]
    for key, part in t["parts"].items():
        lines.append(f"  {_PARTS[key]:<40}{part.seconds:>9.3f}   {part.source}")
    analytic = "analytic: volume / assumed bandwidth"
    lines += [f"  {'TP communication':<40}{t['tp_comm_s']:>9.3f}   {analytic} (--nvlink-gbps {asm.nvlink_gbps:g})",
              f"  {'pipeline bubble':<40}{t['bubble_s']:>9.3f}   (PP-1)/(VPP m) = {lay.pp - 1}/({lay.vpp} x "
              f"{lay.num_microbatches}) = {100 * t['bubble']:.1f}% of the compute",
              f"  {'DP gradient/parameter communication':<40}{t['dp_comm_s']:>9.3f}   {analytic}",
              f"  {'pipeline sends':<40}{t['pp_comm_s']:>9.3f}   {analytic}"]
    band = plan.speed_band
    lines += [f"step {t['step_s']:.2f} s -> {t['tokens_per_s_per_gpu']:.0f} tokens/s/GPU (+-{100 * band.width:.0f} %: "
              f"{band.describe()}; communication untested), MFU {100 * t['mfu']:.1f}% of "
              f"{asm.peak_tflops:g} TFLOPS ({asm.device} datasheet)",
              f"  model FLOPs per token (accounting.flops_per_token): {fl['params'] / 1e9:.1f} G matmul + "
              f"{fl['attention'] / 1e9:.1f} G attention"]
    return lines


def format_plan(plan: Plan) -> str:
    return "\n".join(header(plan) + memory_lines(plan) + time_lines(plan))


def format_search(plans: list[Plan]) -> str:
    head = f"{'#':>2}  {'tokens/s/GPU':>12} {'MFU':>6} {'alloc GiB':>9} {'total GiB':>9} {'headroom':>9}  layout"
    rows = [head]
    for i, p in enumerate(plans, 1):
        rows.append(f"{i:>2}  {p.time['tokens_per_s_per_gpu']:>12.0f} {100 * p.time['mfu']:>5.1f}% "
                    f"{p.peak.allocated / GiB:>9.1f} {p.peak.total / GiB:>9.1f} {100 * p.headroom:>8.1f}%  "
                    f"{p.layout.flags()}")
    return "\n".join(rows)


def refusal(plan: Plan, fixes: list[tuple[str, Plan]]) -> str:
    asm = plan.assumptions
    need = plan.peak.total / GiB
    limit = asm.gpu_memory_gib * (1 - plan.required_headroom)
    lines = ["", f"DOES NOT FIT: PP rank {plan.peak.rank} needs {need:.1f} GiB; at most {limit:.1f} GiB leaves the "
             f"required {100 * plan.required_headroom:.0f}% headroom of {asm.gpu_memory_gib:g} GiB."]
    if fixes:
        lines.append("Changes that fit:")
        lines += [f"  {t}: {p.peak.total / GiB:.1f} GiB ({100 * p.headroom:.0f}% headroom), "
                  f"{p.time['tokens_per_s_per_gpu']:.0f} tokens/s/GPU  [{p.layout.flags()}]" for t, p in fixes]
    else:
        lines.append("No single change fits; try --search.")
    return "\n".join(lines)
