"""Weighted SwiGLU for the experts: ``silu(gate) * up * prob`` in one kernel forward, one backward.

Why: megatron's experts (and our earlier grouped path) run SwiGLU, then scale an [N, F] or [N, H] tensor
by the routing weight in another pass that saves its input for the router gradient. Applying the weight to
fc2's *input* instead is the same maths (fc2 has no bias, so fc2(a * p) = fc2(a) * p) and lets one kernel
do it: forward reads fc1's output once and writes the weighted activation; backward recomputes silu from
the saved fc1 output and writes the fc1 gradient and the router gradient
dL/dp[n] = <dL/dy[n], silu(gate[n]) * up[n]> (fp32) in the same pass, without saving the activation.

Precision: everything is computed in fp32 from the stored inputs and rounded once on store (to the
fc1-output dtype for the activation and the fc1 gradient, to the probs dtype for the probs gradient).
The torch reference does exactly the same, so the two agree to an ulp of the output dtype.

Shapes: N rows (permuted tokens), F expert ffn (per TP rank); fc1's output is [N, 2F] = [gate | up].
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_grin.ops.backend import HAVE_TRITON, use_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl


def _check_args(fc1_out_N2F: torch.Tensor, probs_N: torch.Tensor) -> None:
    if fc1_out_N2F.dim() != 2 or fc1_out_N2F.shape[1] % 2:
        raise ValueError(f"fc1 output must be [rows, 2F] = [gate | up], got {tuple(fc1_out_N2F.shape)}")
    if probs_N.shape != (fc1_out_N2F.shape[0],):
        raise ValueError(f"probs must be [{fc1_out_N2F.shape[0]}], got {tuple(probs_N.shape)}")
    if not fc1_out_N2F.is_floating_point() or not probs_N.is_floating_point():
        raise ValueError(f"weighted_swiglu takes floating tensors, got {fc1_out_N2F.dtype} and {probs_N.dtype}")


# ------------------------------------------------------------------------------------------------
# torch reference (the CPU path)
# ------------------------------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def torch_weighted_swiglu_forward(fc1_out_N2F: torch.Tensor, probs_N: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up * prob [N, F] in fc1's dtype, computed in fp32 (fp64 for fp64 inputs)."""
    cdt = _compute_dtype(fc1_out_N2F.dtype)
    gate, up = fc1_out_N2F.to(cdt).chunk(2, dim=-1)
    return (F.silu(gate) * up * probs_N.to(cdt).unsqueeze(-1)).to(fc1_out_N2F.dtype)


def torch_weighted_swiglu_backward(grad_NF: torch.Tensor, fc1_out_N2F: torch.Tensor, probs_N: torch.Tensor):
    """(grad of fc1's output [N, 2F] in its dtype, grad of probs [N] in the probs dtype, summed in fp32).

    With a = silu(g) = g * s, s = sigmoid(g):  d/du = dy * p * a,  d/dg = dy * p * u * s * (1 + g * (1 - s)),
    d/dp = sum_f dy * a * u.
    """
    cdt = _compute_dtype(fc1_out_N2F.dtype)
    gate, up = fc1_out_N2F.to(cdt).chunk(2, dim=-1)
    dy = grad_NF.to(cdt)
    sig = torch.sigmoid(gate)
    act = gate * sig
    dy_p = dy * probs_N.to(cdt).unsqueeze(-1)
    grad_gate = dy_p * up * sig * (1 + gate * (1 - sig))
    grad_fc1 = torch.cat((grad_gate, dy_p * act), dim=-1).to(fc1_out_N2F.dtype)
    grad_probs = (dy * act * up).sum(-1).to(probs_N.dtype)
    return grad_fc1, grad_probs


class _TorchWeightedSwiGLU(torch.autograd.Function):
    """The reference as one autograd node with the hand-written backward the kernel implements."""

    @staticmethod
    def forward(ctx, fc1_out_N2F, probs_N):
        ctx.save_for_backward(fc1_out_N2F, probs_N)
        return torch_weighted_swiglu_forward(fc1_out_N2F, probs_N)

    @staticmethod
    def backward(ctx, grad_NF):
        fc1_out_N2F, probs_N = ctx.saved_tensors
        grad_fc1, grad_probs = torch_weighted_swiglu_backward(grad_NF, fc1_out_N2F, probs_N)
        return (grad_fc1 if ctx.needs_input_grad[0] else None), (grad_probs if ctx.needs_input_grad[1] else None)


def torch_weighted_swiglu(fc1_out_N2F: torch.Tensor, probs_N: torch.Tensor) -> torch.Tensor:
    """Reference ``silu(gate) * up * prob`` -> [N, F]; same contract as :func:`weighted_swiglu`."""
    _check_args(fc1_out_N2F, probs_N)
    return _TorchWeightedSwiGLU.apply(fc1_out_N2F, probs_N)


# ------------------------------------------------------------------------------------------------
# Triton kernels: forward one program per (row block, column block); backward one program per row
# block, walking all F columns so the probs gradient is summed in registers (no atomics, deterministic)
# ------------------------------------------------------------------------------------------------
if HAVE_TRITON:

    @triton.jit
    def _weighted_swiglu_fwd_kernel(x_ptr, probs_ptr, out_ptr, N, FF, stride_x, stride_out,
                                    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
        """out[n, f] = silu(x[n, f]) * x[n, F + f] * probs[n], fp32 inside, rounded once."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        row_ok = rows < N
        ok = row_ok[:, None] & (cols < FF)[None, :]
        x_row = x_ptr + rows.to(tl.int64)[:, None] * stride_x + cols[None, :]
        g = tl.load(x_row, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(x_row + FF, mask=ok, other=0.0).to(tl.float32)
        p = tl.load(probs_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        y = g * tl.sigmoid(g) * u * p[:, None]
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=ok)

    @triton.jit
    def _weighted_swiglu_bwd_kernel(grad_ptr, x_ptr, probs_ptr, grad_x_ptr, grad_probs_ptr, N, FF,
                                    stride_grad, stride_x, stride_grad_x,
                                    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
        """grad_x = [dy p u s (1 + g (1 - s)) | dy p silu(g)], grad_probs[n] = sum_f dy silu(g) u (fp32).

        grad_x may alias x (in-place backward): each element is read before it is written, by one program.
        """
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        p = tl.load(probs_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        dot = tl.zeros([BLOCK_R, BLOCK_F], tl.float32)
        for start in range(0, FF, BLOCK_F):
            cols = start + tl.arange(0, BLOCK_F)
            ok = row_ok[:, None] & (cols < FF)[None, :]
            x_row = x_ptr + rows64[:, None] * stride_x + cols[None, :]
            g = tl.load(x_row, mask=ok, other=0.0).to(tl.float32)
            u = tl.load(x_row + FF, mask=ok, other=0.0).to(tl.float32)
            dy = tl.load(grad_ptr + rows64[:, None] * stride_grad + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            s = tl.sigmoid(g)
            act = g * s
            dy_p = dy * p[:, None]
            gx_row = grad_x_ptr + rows64[:, None] * stride_grad_x + cols[None, :]
            tl.store(gx_row, (dy_p * u * s * (1.0 + g * (1.0 - s))).to(grad_x_ptr.dtype.element_ty), mask=ok)
            tl.store(gx_row + FF, (dy_p * act).to(grad_x_ptr.dtype.element_ty), mask=ok)
            dot += dy * act * u
        tl.store(grad_probs_ptr + rows, tl.sum(dot, axis=1), mask=row_ok)


def _blocks(ffn: int, block_f: Optional[int]) -> tuple[int, int]:
    """(rows, columns) per program: ~4k elements, the column block a power of two up to 1024."""
    block_f = block_f or min(1024, triton.next_power_of_2(max(ffn, 1)))
    return max(1, 4096 // block_f), block_f


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def triton_weighted_swiglu_forward(fc1_out_N2F: torch.Tensor, probs_N: torch.Tensor,
                                   block_f: Optional[int] = None) -> torch.Tensor:
    """Launch the forward kernel: [N, F] in fc1's dtype."""
    _check_args(fc1_out_N2F, probs_N)
    x = _row_major(fc1_out_N2F)
    rows, ffn = x.shape[0], x.shape[1] // 2
    out = x.new_empty(rows, ffn)
    if rows and ffn:
        block_r, block_f = _blocks(ffn, block_f)
        _weighted_swiglu_fwd_kernel[(triton.cdiv(rows, block_r), triton.cdiv(ffn, block_f))](
            x, probs_N.contiguous(), out, rows, ffn, x.stride(0), out.stride(0), BLOCK_R=block_r, BLOCK_F=block_f)
    return out


def triton_weighted_swiglu_backward(grad_NF: torch.Tensor, fc1_out_N2F: torch.Tensor, probs_N: torch.Tensor,
                                    in_place: bool = False, block_f: Optional[int] = None):
    """Launch the backward kernel: (grad of fc1's output [N, 2F] in its dtype, grad of probs [N]).

    ``in_place`` writes the fc1 gradient over ``fc1_out_N2F`` (which must then be row-major and dead
    after this call): one [N, 2F] buffer less at the peak.
    """
    _check_args(fc1_out_N2F, probs_N)
    rows, two_f = fc1_out_N2F.shape
    ffn = two_f // 2
    if grad_NF.shape != (rows, ffn):
        raise ValueError(f"grad of the output must be [{rows}, {ffn}], got {tuple(grad_NF.shape)}")
    if in_place and fc1_out_N2F.stride(-1) != 1:
        raise ValueError("an in-place backward needs fc1's output row-major")
    x = _row_major(fc1_out_N2F)
    grad = _row_major(grad_NF)
    grad_x = x if in_place else torch.empty_like(x)
    grad_probs = torch.empty(rows, device=x.device, dtype=torch.float32)
    if rows and ffn:
        block_r, block_f = _blocks(ffn, block_f)
        _weighted_swiglu_bwd_kernel[(triton.cdiv(rows, block_r),)](
            grad, x, probs_N.contiguous(), grad_x, grad_probs, rows, ffn, grad.stride(0), x.stride(0),
            grad_x.stride(0), BLOCK_R=block_r, BLOCK_F=block_f)
    elif rows:
        grad_probs.zero_()
    return grad_x, grad_probs.to(probs_N.dtype)


class _WeightedSwiGLU(torch.autograd.Function):
    """Forward: one kernel. Backward: one kernel recomputing silu from the saved fc1 output and probs."""

    @staticmethod
    def forward(ctx, fc1_out_N2F, probs_N, in_place_grad, block_f):
        ctx.save_for_backward(fc1_out_N2F, probs_N)
        ctx.in_place_grad, ctx.block_f, ctx.consumed = in_place_grad, block_f, False
        return triton_weighted_swiglu_forward(fc1_out_N2F, probs_N, block_f)

    @staticmethod
    def backward(ctx, grad_NF):
        if ctx.consumed:  # the saved fc1 output now holds its gradient: refuse loudly, do not compute garbage
            raise RuntimeError("weighted_swiglu(in_place_grad=True): backward ran twice "
                               "(retain_graph is not supported)")
        fc1_out_N2F, probs_N = ctx.saved_tensors
        ctx.consumed = ctx.in_place_grad
        grad_fc1, grad_probs = triton_weighted_swiglu_backward(grad_NF, fc1_out_N2F, probs_N, ctx.in_place_grad,
                                                               ctx.block_f)
        return (grad_fc1 if ctx.needs_input_grad[0] else None,
                grad_probs if ctx.needs_input_grad[1] else None, None, None)


def triton_weighted_swiglu(fc1_out_N2F: torch.Tensor, probs_N: torch.Tensor, in_place_grad: bool = False,
                           block_f: Optional[int] = None) -> torch.Tensor:
    """The fused kernels with the contract of :func:`torch_weighted_swiglu`."""
    _check_args(fc1_out_N2F, probs_N)
    return _WeightedSwiGLU.apply(fc1_out_N2F, probs_N, bool(in_place_grad), block_f)


def weighted_swiglu(fc1_out_N2F: torch.Tensor, probs_N: torch.Tensor, backend: str = "auto",
                    in_place_grad: bool = False) -> torch.Tensor:
    """``silu(gate) * up * prob`` for fc1's output [N, 2F] = [gate | up] and per-row probs [N] -> [N, F].

    Differentiable in both inputs; the probs gradient (the router's) is summed in fp32. 'auto' takes
    the Triton kernels for CUDA bf16/fp16/fp32 tensors when triton is installed (the kernels compute in
    fp32, so fp64 stays on the torch reference), else the torch reference; 'triton'
    forces the kernels (CUDA, or CPU under TRITON_INTERPRET=1). ``in_place_grad`` (kernels only) writes
    fc1's gradient over fc1's output, which nothing else may use afterwards; a second backward is refused.
    """
    if backend == "auto" and fc1_out_N2F.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        backend = "torch"  # the kernels compute in fp32: fp64 stays on the reference
    if use_triton(fc1_out_N2F, backend, "swiglu"):
        return triton_weighted_swiglu(fc1_out_N2F, probs_N, in_place_grad)
    return torch_weighted_swiglu(fc1_out_N2F, probs_N)
