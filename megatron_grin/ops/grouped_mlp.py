"""Autograd ops of the "grouped_mm" expert backend: grouped GEMMs, SwiGLU, routing-weight scaling.

Why: megatron's SequentialMLP keeps one module per expert, applies the routing weight to the [N, F]
activation (in fp32 when the probs are fp32) and saves both SwiGLU inputs and its silu output. Here:
  * on CUDA sm90+ in bf16, each projection for all experts is one ``torch.nn.functional.grouped_mm``;
  * elsewhere (CPU), whole expert MLPs loop inside one autograd node (``_ExpertLoop``), so each
    expert's [rows, 2F] activation is still in cache for its SwiGLU (measured faster than grouped_mm's
    CPU path and than SequentialMLP; docs/performance.md);
  * on the grouped_mm path SwiGLU is one autograd node that saves only fc1's output and writes its
    gradient over it in place;
  * the routing weight scales fc2's [N, H] output (H < F in GRIN), the same maths since fc2 has no bias,
    with the router gradient accumulated in fp32.
The megatron module that owns the weights is model/grouped_experts.py.

Shapes: N permuted rows, E local experts, H hidden, F expert ffn per TP rank.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------------
# small autograd ops
# ------------------------------------------------------------------------------------------------
class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up for h = [gate, up]; saves only h and writes the gradient over h, in place.

    h (fc1's output) is referenced by nothing but this node, so its buffer becomes the gradient: the
    backward allocates one [N, F] scratch instead of a [N, 2F] gradient plus autograd's cat.
    """

    @staticmethod
    def forward(ctx, h_N2F):
        gate, up = h_N2F.chunk(2, dim=-1)
        ctx.save_for_backward(h_N2F)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad_NF):  # once only: a retain_graph re-run fails autograd's version check, loudly
        (h_N2F,) = ctx.saved_tensors
        gate, up = h_N2F.chunk(2, dim=-1)
        scratch = grad_NF * up  # the last read of up
        torch.ops.aten.silu.out(gate, out=up).mul_(grad_NF)  # d/d up = silu(gate) * g
        torch.ops.aten.silu_backward.grad_input(scratch, gate, grad_input=gate)  # d/d gate, elementwise in place
        return h_N2F


class _ScaleRows(torch.autograd.Function):
    """y * probs[:, None] in y's dtype; the probs gradient is accumulated in fp32 (router precision)."""

    @staticmethod
    def forward(ctx, y_NH, probs_N):
        ctx.save_for_backward(y_NH, probs_N)
        return y_NH * probs_N.to(y_NH.dtype).unsqueeze(-1)

    @staticmethod
    def backward(ctx, grad_NH):
        y_NH, probs_N = ctx.saved_tensors
        grad_y = grad_NH * probs_N.to(grad_NH.dtype).unsqueeze(-1) if ctx.needs_input_grad[0] else None
        grad_p = _rowwise_dot_fp32(grad_NH, y_NH).to(probs_N.dtype) if ctx.needs_input_grad[1] else None
        return grad_y, grad_p


def _rowwise_dot_fp32(a_NH: torch.Tensor, b_NH: torch.Tensor) -> torch.Tensor:
    """fp32 <a[n], b[n]> for every row (bf16 products are exact in fp32; einsum would lower to a bmm on CPU)."""
    if a_NH.dtype == torch.float32 and b_NH.dtype == torch.float32:
        return a_NH.mul(b_NH).sum(-1)
    return a_NH.float().mul_(b_NH).sum(-1)


# ------------------------------------------------------------------------------------------------
# grouped GEMM with a loop fallback
# ------------------------------------------------------------------------------------------------
def _grouped_mm_fn():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Use torch's grouped_mm by default: CUDA sm90+ in bf16 (it falls back to a slow path on sm80).

    CPU runs grouped_mm too, but measured slower than looping over whole expert MLPs, whose [rows, 2F]
    activations stay in cache between the GEMMs and the SwiGLU (docs/performance.md).
    """
    if _grouped_mm_fn() is None or x.shape[-1] % 8 or x.device.type != "cuda":  # 16-byte aligned rows
        return False
    return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm's backward needs it)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_linear(x_NK: torch.Tensor, weight_EMK: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """y[rows of expert e] = x[rows of e] @ weight[e].T for expert-sorted rows (torch grouped_mm); [N, M]."""
    return _ContiguousGrad.apply(_grouped_mm_fn()(x_NK, weight_EMK.transpose(-2, -1), offs=offsets_E))


class _ExpertLoop(torch.autograd.Function):
    """Every expert's SwiGLU MLP, scaled by its routing weights, as one autograd node (the CPU path).

    Why one node: no per-expert autograd graph, no ``cat`` of the split input's gradient and no ``stack``
    of unbound weight gradients; outputs and input gradients are written straight into slices of one
    [N, H] tensor. Per expert it keeps fc1's output h [n, 2F], the SwiGLU output a [n, F] and (with
    probs) the unscaled output y [n, H]: per-expert blocks, each under glibc's 32 MiB mmap threshold at
    GRIN's CPU shapes, so they are reused from the heap instead of page-faulted in every step; the
    backward frees each expert's blocks as soon as it is done with them, and writes the gradients over h
    and a in place (so it runs once: a retain_graph re-run is refused). silu(gate) is recomputed.
    """

    @staticmethod
    def forward(ctx, x_NH, fc1_EFH, fc2_EHF, probs_N, counts: list[int]):
        out_NH = x_NH.new_empty(x_NH.shape)
        scale_N1 = None if probs_N is None else probs_N.to(x_NH.dtype).unsqueeze(-1)
        saved: dict[int, tuple] = {}
        for e, part in _expert_slices(counts):
            x_e, splits = x_NH[part], _row_split(part.stop - part.start, x_NH.dtype, x_NH.device)
            h = _mm_rows(x_e, fc1_EFH[e].t(), x_e.new_empty(x_e.shape[0], fc1_EFH.shape[1]), splits)
            gate, up = h.chunk(2, dim=-1)
            a = F.silu(gate).mul_(up)
            if scale_N1 is None:
                _mm_rows(a, fc2_EHF[e].t(), out_NH[part], splits)
                saved[e] = (h, a, None, splits)
            else:
                y = _mm_rows(a, fc2_EHF[e].t(), x_e.new_empty(x_e.shape), splits)
                torch.mul(y, scale_N1[part], out=out_NH[part])
                saved[e] = (h, a, y, splits)
        ctx.counts, ctx.saved_blocks = counts, saved
        ctx.save_for_backward(x_NH, fc1_EFH, fc2_EHF, probs_N)
        return out_NH

    @staticmethod
    def backward(ctx, grad_NH):
        if ctx.saved_blocks is None:
            raise RuntimeError("grouped_mm experts: backward ran twice (retain_graph is not supported)")
        saved, ctx.saved_blocks = ctx.saved_blocks, None
        x_NH, fc1_EFH, fc2_EHF, probs_N = ctx.saved_tensors
        grad_NH = grad_NH.contiguous()
        grad_x = torch.empty_like(x_NH) if ctx.needs_input_grad[0] else None
        grad_fc1, grad_fc2 = torch.empty_like(fc1_EFH), torch.empty_like(fc2_EHF)
        grad_p = (torch.empty(x_NH.shape[0], dtype=torch.float32, device=x_NH.device)
                  if probs_N is not None and ctx.needs_input_grad[3] else None)
        scale_N1 = None if probs_N is None else probs_N.to(x_NH.dtype).unsqueeze(-1)
        for e, count in enumerate(ctx.counts):
            if not count:
                grad_fc1[e].zero_()
                grad_fc2[e].zero_()
        for e, part in _expert_slices(ctx.counts):
            h, a, y, splits = saved.pop(e)
            g = grad_NH[part]
            if grad_p is not None:
                grad_p[part] = _rowwise_dot_fp32(g, y)
            del y
            if scale_N1 is not None:
                g = g * scale_N1[part]
            _mm_wgrad(g, a, grad_fc2[e], splits)
            grad_a = _mm_rows(g, fc2_EHF[e], a, splits)  # a's last use was the line above
            gate, up = h.chunk(2, dim=-1)
            scratch = grad_a * up  # the last read of up
            torch.ops.aten.silu.out(gate, out=up).mul_(grad_a)  # d/d up = silu(gate) * g
            del grad_a, a
            torch.ops.aten.silu_backward.grad_input(scratch, gate, grad_input=gate)  # d/d gate, in place
            del scratch
            _mm_wgrad(h, x_NH[part], grad_fc1[e], splits)  # h now holds d/d h
            if grad_x is not None:
                _mm_rows(h, fc1_EFH[e], grad_x[part], splits)
        if grad_p is not None:
            grad_p = grad_p.to(probs_N.dtype)
        return grad_x, grad_fc1, grad_fc2, grad_p, None


#: Row block for the CPU expert GEMMs in bf16/fp16: oneDNN JIT-compiles a kernel per GEMM shape and caches
#: ~1k of them; sampled routing gives every expert a new row count every step, and a cache miss costs
#: ~1 ms (13 %) per GEMM at GRIN's CPU shapes. Splitting each expert's rows into a multiple of the block and
#: a tail bounds the distinct shapes (docs/performance.md). fp32 (MKL, no per-shape JIT) runs unsplit.
ROW_BLOCK = 64


def _row_split(rows: int, dtype: torch.dtype, device: torch.device) -> list[slice]:
    """An expert's rows as [bulk, tail] slices whose lengths come from a small set, or one slice where unneeded."""
    bulk = rows // ROW_BLOCK * ROW_BLOCK
    if device.type != "cpu" or dtype == torch.float32 or bulk in (0, rows):
        return [slice(0, rows)]
    return [slice(0, bulk), slice(bulk, rows)]


def _mm_rows(a_NK: torch.Tensor, b_KM: torch.Tensor, out_NM: torch.Tensor, splits: list[slice]) -> torch.Tensor:
    """out = a @ b, one GEMM per row slice."""
    for rows in splits:
        torch.mm(a_NK[rows], b_KM, out=out_NM[rows])
    return out_NM


def _mm_wgrad(g_NM: torch.Tensor, a_NK: torch.Tensor, out_MK: torch.Tensor, splits: list[slice]) -> None:
    """out = g.T @ a, accumulated over the row slices."""
    torch.mm(g_NM[splits[0]].t(), a_NK[splits[0]], out=out_MK)
    for rows in splits[1:]:
        out_MK.addmm_(g_NM[rows].t(), a_NK[rows])


def _expert_slices(counts: list[int]):
    """(expert, row slice) for every expert that has rows, in order."""
    start = 0
    for e, count in enumerate(counts):
        if count:
            yield e, slice(start, start + count)
            start += count


def grouped_swiglu_mlp(x_NH: torch.Tensor, fc1_EFH: torch.Tensor, fc2_EHF: torch.Tensor,
                       tokens_per_expert, probs_N: Optional[torch.Tensor] = None,
                       use_grouped_mm: Optional[bool] = None) -> torch.Tensor:
    """All experts' SwiGLU MLPs on expert-sorted rows: fc2(silu(gate) * up) * probs -> [N, H]."""
    if x_NH.dim() != 2 or fc1_EFH.dim() != 3 or fc2_EHF.dim() != 3:
        raise ValueError(f"expected x [N, H], fc1 [E, 2F, H], fc2 [E, H, F]; got {tuple(x_NH.shape)}, "
                         f"{tuple(fc1_EFH.shape)}, {tuple(fc2_EHF.shape)}")
    num_experts, two_f, hidden = fc1_EFH.shape
    if x_NH.shape[1] != hidden or fc2_EHF.shape != (num_experts, hidden, two_f // 2):
        raise ValueError(f"shape mismatch: x {tuple(x_NH.shape)}, fc1 {tuple(fc1_EFH.shape)}, "
                         f"fc2 {tuple(fc2_EHF.shape)}")
    counts_E = torch.as_tensor(tokens_per_expert)
    if counts_E.numel() != num_experts:
        raise ValueError(f"tokens_per_expert has {counts_E.numel()} entries for {num_experts} experts")
    counts = [int(c) for c in counts_E.tolist()]  # host list (megatron's dispatcher already synced)
    if sum(counts) != x_NH.shape[0]:
        raise ValueError(f"tokens_per_expert sums to {sum(counts)} but there are {x_NH.shape[0]} rows")
    if probs_N is not None and probs_N.shape != (x_NH.shape[0],):
        raise ValueError(f"probs must be [{x_NH.shape[0]}], got {tuple(probs_N.shape)}")
    if use_grouped_mm is None:
        use_grouped_mm = grouped_mm_supported(x_NH)
    if not use_grouped_mm:
        return _ExpertLoop.apply(x_NH, fc1_EFH, fc2_EHF, probs_N, counts)
    offsets = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(x_NH.device, non_blocking=True)
    y_NH = grouped_linear(_SwiGLU.apply(grouped_linear(x_NH, fc1_EFH, offsets)), fc2_EHF, offsets)
    return y_NH if probs_N is None else _ScaleRows.apply(y_NH, probs_N)
