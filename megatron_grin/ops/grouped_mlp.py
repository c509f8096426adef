"""The expert MLP of the "grouped_mm" backend: grouped GEMMs, weighted SwiGLU, fused weight gradients.

All experts' SwiGLU MLPs on expert-sorted rows, ``fc2(silu(gate) * up * prob)``, run one of three ways
(``gemm``):
  * "grouped_mm": torch's grouped GEMM (``torch.nn.functional.grouped_mm``, CUDA sm90+ in bf16);
  * "triton": the Triton grouped GEMMs of ops/grouped_gemm.py, whose weight gradient can add straight
    into megatron's fp32 ``main_grad`` (``gradient_accumulation_fusion``);
  * "loop": whole expert MLPs looping inside one autograd node (``_ExpertLoop``), the CPU path: each
    expert's [rows, 2F] activation is still in cache for its SwiGLU (docs/performance.md).
The two grouped paths read the row counts as device offsets (no host sync) and apply the routing weight
inside the SwiGLU kernel (ops/swiglu.py: forward and backward in one pass each, the router gradient in
fp32); fc2 has no bias, so fc2(a * p) = fc2(a) * p. The loop scales fc2's output instead.
The megatron module that owns the weights is model/grouped_experts.py.

Why torch's grouped_mm is the default grouped GEMM on sm90+ bf16: it is the only grouped GEMM measured on
a GPU so far (an H200, ../shared/notes; it ran at GRIN's shapes), while the Triton kernels have been
compiled for sm90 and tested under the CPU interpreter but never timed or autotuned on a GPU. Both run
in ``bench moe-layer --device cuda`` and ``benchmarks/bench_grouped_gemm.py`` side by side; ``triton``
is one setting away (``grin_grouped_gemm``) and is the choice on CUDA devices where grouped_mm is not
supported. See docs/performance.md.

Shapes: N permuted rows, E local experts, H hidden, F expert ffn per TP rank.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_grin.ops import grouped_gemm as gg
from megatron_grin.ops.cpu_gemm import addmm_into, mm_into
from megatron_grin.ops.backend import have_triton_kernels, use_triton
from megatron_grin.ops.swiglu import weighted_swiglu

GEMMS = ("auto", "grouped_mm", "triton", "loop")


# ------------------------------------------------------------------------------------------------
# choosing the kernels
# ------------------------------------------------------------------------------------------------
def _grouped_mm_fn():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """torch's grouped_mm is fast here: CUDA sm90+ in bf16 (it falls back to a slow path on sm80).

    CPU runs grouped_mm too, but measured slower than looping over whole expert MLPs (docs/performance.md).
    """
    if _grouped_mm_fn() is None or x.shape[-1] % 8 or x.device.type != "cuda":  # 16-byte aligned rows
        return False
    return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)


def expert_kernels(x: torch.Tensor, fusion: str = "auto", grouped_gemm: str = "auto") -> tuple[str, str]:
    """(gemm, swiglu backend) for the fused-expert switch and the grouped GEMM choice on x's device.

    ``fusion`` (Megatron-LM's --moe-grouped-gemm: auto / triton = forced on / torch = off): on = grouped
    GEMMs plus the SwiGLU kernel; off = the expert loop. ``grouped_gemm`` picks the grouped GEMM when on:
    "auto" (grouped_mm where supported, else Triton), "grouped_mm" or "triton".
    """
    if grouped_gemm not in ("auto", "grouped_mm", "triton"):
        raise ValueError(f"grouped GEMM {grouped_gemm!r} is unknown; choose auto, grouped_mm or triton")
    if not use_triton(x, fusion, "fused expert MLP"):
        if fusion == "auto" and grouped_mm_supported(x):  # CUDA without triton: grouped GEMMs, torch SwiGLU
            return "grouped_mm", "torch"
        return "loop", "torch"
    if grouped_gemm == "auto":
        grouped_gemm = "grouped_mm" if grouped_mm_supported(x) else "triton"
    return grouped_gemm, "triton"


# ------------------------------------------------------------------------------------------------
# the grouped paths
# ------------------------------------------------------------------------------------------------
class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm's backward needs it)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _linear(gemm: str, x_NK: torch.Tensor, weight_EMK: torch.Tensor, offsets_E: torch.Tensor,
            accumulation_fusion: bool) -> torch.Tensor:
    """y[rows of expert e] = x[rows of e] @ weight[e].T for expert-sorted rows; [N, M]."""
    if gemm == "triton":
        return gg.grouped_linear(x_NK, weight_EMK, offsets_E, backend="triton",
                                 gradient_accumulation_fusion=accumulation_fusion)
    return _ContiguousGrad.apply(_grouped_mm_fn()(x_NK, weight_EMK.transpose(-2, -1), offs=offsets_E))


def _grouped_path(gemm: str, swiglu: str, x_NH, fc1_EFH, fc2_EHF, counts_E, probs_N, accumulation_fusion: bool):
    """fc1 -> weighted SwiGLU (the routing weight inside) -> fc2, with device offsets: no host sync."""
    offsets_E = counts_E.to(device=x_NH.device).cumsum(0, dtype=torch.int32)
    if probs_N is None:  # moe_apply_probs_on_input: the weight was applied to the input already
        probs_N = torch.ones(x_NH.shape[0], device=x_NH.device, dtype=torch.float32)
    h_N2F = _linear(gemm, x_NH, fc1_EFH, offsets_E, accumulation_fusion)
    # h is referenced by the SwiGLU node alone, so the kernel may write fc1's gradient over it (one [N, 2F] less).
    a_NF = weighted_swiglu(h_N2F, probs_N, backend=swiglu, in_place_grad=swiglu == "triton")
    return _linear(gemm, a_NF, fc2_EHF, offsets_E, accumulation_fusion)


# ------------------------------------------------------------------------------------------------
# the CPU path: one autograd node looping over whole expert MLPs
# ------------------------------------------------------------------------------------------------
def _rowwise_dot_fp32(a_NH: torch.Tensor, b_NH: torch.Tensor) -> torch.Tensor:
    """fp32 <a[n], b[n]> for every row (bf16 products are exact in fp32; einsum would lower to a bmm on CPU)."""
    if a_NH.dtype == torch.float32 and b_NH.dtype == torch.float32:
        return a_NH.mul(b_NH).sum(-1)
    return a_NH.float().mul_(b_NH).sum(-1)


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
        mm_into(a_NK[rows], b_KM, out_NM[rows])  # fp32 where the CPU has no bf16 GEMM (ops/cpu_gemm.py)
    return out_NM


def _mm_wgrad(g_NM: torch.Tensor, a_NK: torch.Tensor, out_MK: torch.Tensor, splits: list[slice]) -> None:
    """out = g.T @ a, accumulated over the row slices."""
    mm_into(g_NM[splits[0]].t(), a_NK[splits[0]], out_MK)
    for rows in splits[1:]:
        addmm_into(out_MK, g_NM[rows].t(), a_NK[rows])


def _expert_slices(counts: list[int]):
    """(expert, row slice) for every expert that has rows, in order."""
    start = 0
    for e, count in enumerate(counts):
        if count:
            yield e, slice(start, start + count)
            start += count


def grouped_swiglu_mlp(x_NH: torch.Tensor, fc1_EFH: torch.Tensor, fc2_EHF: torch.Tensor,
                       tokens_per_expert: torch.Tensor, probs_N: Optional[torch.Tensor] = None, *,
                       gemm: str = "auto", swiglu: str = "auto", accumulation_fusion: bool = False) -> torch.Tensor:
    """All experts' SwiGLU MLPs on expert-sorted rows: fc2(silu(gate) * up * probs) -> [N, H].

    ``tokens_per_expert`` [E] may live on the device: the grouped paths never read it on the host (the
    loop does). ``gemm`` is one of GEMMS ("auto" = :func:`expert_kernels`' default for x); ``swiglu`` the
    SwiGLU backend of the grouped paths; ``accumulation_fusion`` lets the Triton wgrad add into
    ``weight.main_grad`` (megatron's gradient_accumulation_fusion).
    """
    if x_NH.dim() != 2 or fc1_EFH.dim() != 3 or fc2_EHF.dim() != 3:
        raise ValueError(f"expected x [N, H], fc1 [E, 2F, H], fc2 [E, H, F]; got {tuple(x_NH.shape)}, "
                         f"{tuple(fc1_EFH.shape)}, {tuple(fc2_EHF.shape)}")
    num_experts, two_f, hidden = fc1_EFH.shape
    if x_NH.shape[1] != hidden or fc2_EHF.shape != (num_experts, hidden, two_f // 2):
        raise ValueError(f"shape mismatch: x {tuple(x_NH.shape)}, fc1 {tuple(fc1_EFH.shape)}, "
                         f"fc2 {tuple(fc2_EHF.shape)}")
    counts_E = torch.as_tensor(tokens_per_expert)
    if counts_E.shape != (num_experts,):
        raise ValueError(f"tokens_per_expert has {counts_E.numel()} entries for {num_experts} experts")
    if probs_N is not None and probs_N.shape != (x_NH.shape[0],):
        raise ValueError(f"probs must be [{x_NH.shape[0]}], got {tuple(probs_N.shape)}")
    if gemm == "auto":
        gemm, swiglu = expert_kernels(x_NH)
    if gemm not in GEMMS:
        raise ValueError(f"expert gemm {gemm!r} is unknown; choose one of {GEMMS}")
    if gemm == "triton" and not have_triton_kernels(x_NH.device):
        raise ValueError("the triton grouped GEMM needs triton and a CUDA device (or TRITON_INTERPRET=1)")
    if gemm == "grouped_mm" and _grouped_mm_fn() is None:
        raise ValueError(f"torch {torch.__version__} has no grouped_mm; use the triton or loop expert GEMMs")
    if gemm != "loop":
        return _grouped_path(gemm, swiglu, x_NH, fc1_EFH, fc2_EHF, counts_E, probs_N, accumulation_fusion)
    counts = [int(c) for c in counts_E.tolist()]  # host list: the loop slices rows per expert
    if sum(counts) != x_NH.shape[0]:
        raise ValueError(f"tokens_per_expert sums to {sum(counts)} but there are {x_NH.shape[0]} rows")
    return _ExpertLoop.apply(x_NH, fc1_EFH, fc2_EHF, probs_N, counts)
