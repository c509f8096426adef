"""Grouped GEMM for the dropless experts: forward, dgrad and wgrad (optionally fused into fp32 main_grad).

Why: ``torch.nn.functional.grouped_mm`` covers forward and backward, but its weight gradient is a
bf16 tensor that megatron then adds into ``param.main_grad`` (fp32) in another pass; megatron's
``gradient_accumulation_fusion`` does that add inside the wgrad GEMM (``wgrad_gemm_accum_fp32``), which
has no grouped form. These kernels give the three grouped GEMMs with fp32 accumulation, the wgrad
optionally adding straight into an fp32 ``main_grad`` [E, ...] in place, and no host sync anywhere:
the per-expert row ranges are read from device offsets inside the kernels.

Rows are expert-sorted: expert e owns rows [offsets[e-1], offsets[e]) (offsets[-1] = 0), the
cumulative ends that torch's grouped_mm takes as ``offs``. Experts may have zero rows.

* forward / dgrad (``grouped_mm``): out[rows of e] = x[rows of e] @ w[e].T (``trans_w=True``, weights
  [E, O, I] as our stacked fc1 [E, 2F, H] / fc2 [E, H, F]) or @ w[e] (``trans_w=False``, [E, I, O]: the
  dgrad of a [E, O, I] weight). The launch grid is sized for the worst case, cdiv(N, BLOCK_M) + E row
  tiles times the column tiles; each program walks the E offsets to find its (expert, row tile) and
  exits early when it has none. Row tiles never straddle two experts, so zero-row experts cost nothing
  and every expert's tail is a masked partial tile.
* wgrad (``grouped_wgrad``): out[e] = a[rows of e].T @ b[rows of e] -> [E, P, Q], one program per
  (expert, P tile, Q tile) looping over the expert's rows; ``accumulate=True`` adds into ``out`` (fp32).
  For a [E, O, I] weight: ``grouped_wgrad(grad_out_NO, x_NI, offsets)``.

Shapes: N rows, E experts, I in-features, O out-features (for GRIN fc1: I = H = 4096, O = 2F = 12800).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_grin.ops.backend import HAVE_TRITON, interpreting, use_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl


def offsets_from_counts(counts_E: torch.Tensor) -> torch.Tensor:
    """Cumulative row ends (int32, on the counts' device, no host sync) from per-expert row counts."""
    return counts_E.cumsum(0, dtype=torch.int32)


def _check_offsets(offsets_E: torch.Tensor, num_experts: int) -> None:
    if offsets_E.dim() != 1 or offsets_E.numel() != num_experts:
        raise ValueError(f"offsets must be [{num_experts}] cumulative row ends, got {tuple(offsets_E.shape)}")
    if offsets_E.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"offsets must be int32 or int64, got {offsets_E.dtype}")


def _check_mm(x_NI: torch.Tensor, w: torch.Tensor, offsets_E: torch.Tensor, trans_w: bool) -> int:
    """Validate shapes; returns the out-feature count O."""
    if x_NI.dim() != 2 or w.dim() != 3:
        raise ValueError(f"expected x [N, I] and w [E, O, I] (trans_w) or [E, I, O]; got {tuple(x_NI.shape)}, "
                         f"{tuple(w.shape)}")
    in_dim = 2 if trans_w else 1
    if w.shape[in_dim] != x_NI.shape[1]:
        raise ValueError(f"x has {x_NI.shape[1]} features but w {tuple(w.shape)} (trans_w={trans_w}) "
                         f"takes {w.shape[in_dim]}")
    if x_NI.dtype != w.dtype:
        raise ValueError(f"x and w dtypes differ: {x_NI.dtype} vs {w.dtype}")
    _check_offsets(offsets_E, w.shape[0])
    return w.shape[1] if trans_w else w.shape[2]


def _check_wgrad(a_NP: torch.Tensor, b_NQ: torch.Tensor, offsets_E: torch.Tensor, num_experts: int) -> None:
    if a_NP.dim() != 2 or b_NQ.dim() != 2 or a_NP.shape[0] != b_NQ.shape[0]:
        raise ValueError(f"wgrad operands must be [N, P] and [N, Q], got {tuple(a_NP.shape)}, {tuple(b_NQ.shape)}")
    if a_NP.dtype != b_NQ.dtype:
        raise ValueError(f"wgrad operand dtypes differ: {a_NP.dtype} vs {b_NQ.dtype}")
    _check_offsets(offsets_E, num_experts)


# ------------------------------------------------------------------------------------------------
# torch reference: a loop over experts with torch.mm (host sync on the offsets)
# ------------------------------------------------------------------------------------------------
def _ranges(offsets_E: torch.Tensor):
    start = 0
    for e, end in enumerate(offsets_E.tolist()):
        yield e, start, end
        start = end


def torch_grouped_mm(x_NI: torch.Tensor, w: torch.Tensor, offsets_E: torch.Tensor, trans_w: bool = True,
                     out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Reference: out[rows of e] = x[rows of e] @ (w[e].T if trans_w else w[e]); fp32 accumulation.

    Rows past offsets[-1] are zero here (the kernel leaves them unwritten).
    """
    out_features = _check_mm(x_NI, w, offsets_E, trans_w)
    out = x_NI.new_zeros(x_NI.shape[0], out_features, dtype=out_dtype or x_NI.dtype)
    cdt = torch.float64 if x_NI.dtype == torch.float64 else torch.float32
    for e, start, end in _ranges(offsets_E):
        if end > start:
            we = w[e].t() if trans_w else w[e]
            out[start:end] = torch.mm(x_NI[start:end].to(cdt), we.to(cdt)).to(out.dtype)
    return out


def torch_grouped_wgrad(a_NP: torch.Tensor, b_NQ: torch.Tensor, offsets_E: torch.Tensor,
                        out: Optional[torch.Tensor] = None, accumulate: bool = False) -> torch.Tensor:
    """Reference: out[e] (+)= a[rows of e].T @ b[rows of e] -> [E, P, Q]; zero for experts with no rows."""
    num_experts = offsets_E.numel()
    _check_wgrad(a_NP, b_NQ, offsets_E, num_experts)
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs the buffer to add into (out=main_grad)")
        out = a_NP.new_empty(num_experts, a_NP.shape[1], b_NQ.shape[1])
    cdt = torch.float64 if a_NP.dtype == torch.float64 or out.dtype == torch.float64 else torch.float32
    for e, start, end in _ranges(offsets_E):
        g = torch.mm(a_NP[start:end].t().to(cdt), b_NQ[start:end].to(cdt))
        if accumulate:
            out[e] = (out[e].to(cdt) + g).to(out.dtype)  # sum in fp32, round once (as the kernel does)
        else:
            out[e] = g.to(out.dtype)
    return out


# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------
if HAVE_TRITON:

    @triton.jit
    def _swizzled_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
        """(row tile, column tile) of program ``pid``, taking GROUP_M row tiles at a time for L2 reuse."""
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows

    @triton.jit
    def _grouped_mm_kernel(a_ptr, b_ptr, c_ptr, offs_ptr, N, E, OUT, IN,
                           stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                           DOT_FP32: tl.constexpr):
        """c[rows of e] = a[rows of e] @ b[e] with b[e] a [IN, OUT] view given by strides (fp32 accumulation).

        Program -> (virtual row tile, column tile), grouped GROUP_M row tiles at a time for L2 reuse; the
        virtual row tiles are the experts' row tiles in order, cdiv(rows_e, BLOCK_M) each, so the grid's
        cdiv(N, BLOCK_M) + E row tiles always cover them and the rest exit at once.
        """
        pid = tl.program_id(0)
        tile_m, tile_n = _swizzled_tile(pid, tl.cdiv(N, BLOCK_M) + E, tl.cdiv(OUT, BLOCK_N), GROUP_M)

        # Which expert owns virtual row tile tile_m, and its rows [row_start, row_end).
        expert = -1
        row_start = 0
        row_end = 0
        tiles_before = 0
        prev_end = 0
        for e in range(0, E):
            end = tl.load(offs_ptr + e).to(tl.int32)
            tiles = (end - prev_end + BLOCK_M - 1) // BLOCK_M
            hit = (tile_m >= tiles_before) & (tile_m < tiles_before + tiles)
            expert = tl.where(hit, e, expert)
            row_start = tl.where(hit, prev_end + (tile_m - tiles_before) * BLOCK_M, row_start)
            row_end = tl.where(hit, end, row_end)
            tiles_before += tiles
            prev_end = end
        if expert < 0:
            return

        rows = row_start + tl.arange(0, BLOCK_M)
        cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < row_end
        col_ok = cols < OUT
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + ks[None, :] * stride_ak
        b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k in range(0, IN, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                k_ok = (k + ks) < IN
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if DOT_FP32:  # the CPU interpreter's tl.dot multiplies bf16 bit patterns as integers
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _grouped_wgrad_kernel(a_ptr, b_ptr, c_ptr, offs_ptr, P, Q,
                              stride_an, stride_ap, stride_bn, stride_bq, stride_ce, stride_cp, stride_cq,
                              ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
                              DOT_FP32: tl.constexpr):
        """c[e] (+)= a[rows of e].T @ b[rows of e]: program (tile, expert), the K loop over the expert's rows."""
        pid = tl.program_id(0)
        e = tl.program_id(1)
        tile_m, tile_n = _swizzled_tile(pid, tl.cdiv(P, BLOCK_M), tl.cdiv(Q, BLOCK_N), GROUP_M)

        start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0).to(tl.int32)
        end = tl.load(offs_ptr + e).to(tl.int32)
        ps = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
        qs = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        p_ok = ps < P
        q_ok = qs < Q
        c_ptrs = c_ptr + e.to(tl.int64) * stride_ce + ps.to(tl.int64)[:, None] * stride_cp + qs[None, :] * stride_cq
        c_mask = p_ok[:, None] & q_ok[None, :]
        if ACCUMULATE:
            if end <= start:  # nothing to add
                return
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        ks = tl.arange(0, BLOCK_K)
        for k in range(start, end, BLOCK_K):
            rows = k + ks
            r_ok = rows < end
            rows64 = rows.to(tl.int64)
            a = tl.load(a_ptr + rows64[:, None] * stride_an + ps[None, :] * stride_ap,
                        mask=r_ok[:, None] & p_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_M]
            b = tl.load(b_ptr + rows64[:, None] * stride_bn + qs[None, :] * stride_bq,
                        mask=r_ok[:, None] & q_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
            if DOT_FP32:  # the CPU interpreter's tl.dot multiplies bf16 bit patterns as integers
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
        if ACCUMULATE:
            acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)

    def _cuda_configs(wgrad: bool):
        """Configs for H100/H200 (sm90: 228 KB shared memory, 132 SMs) in bf16: the large wgmma tiles of
        Triton's Hopper matmul tutorial. Three per kernel: each costs a compile (seconds) the first time a
        shape is seen, and ``bench moe-layer --device cuda`` tunes six shapes inside its warm-up."""
        shapes = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3)]
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
                for bm, bn, bk, w, s in shapes]

    # Tuned on the feature sizes (not the row counts, which change every step with sampled routing).
    _grouped_mm_tuned = triton.autotune(_cuda_configs(False), key=["OUT", "IN", "stride_ak", "stride_bk"])(
        _grouped_mm_kernel)
    _grouped_wgrad_tuned = triton.autotune(_cuda_configs(True), key=["P", "Q", "stride_ap", "stride_bq"])(
        _grouped_wgrad_kernel)
    # Accumulating into main_grad: every tuning trial would add once more, so tuning restores the buffer.
    _grouped_wgrad_accum_tuned = triton.autotune(_cuda_configs(True), key=["P", "Q", "stride_ap", "stride_bq"],
                                                 restore_value=["c_ptr"])(_grouped_wgrad_kernel)


#: Blocks used under the CPU interpreter; no autotuning there. Its cost is per program, not per element:
#: these run a small GEMM ~10x faster than 16-wide blocks (the tests pick 16-wide ones explicitly).
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 1}


def _dot_args(dtype: torch.dtype) -> dict:
    """PRECISION: fp32 operands give exact fp32 products unless torch allows tf32 matmuls (bf16 ignores it).

    DOT_FP32: under the CPU interpreter (triton 3.9), tl.dot on bf16 operands multiplies their uint16 bit
    patterns, so the operands are widened to fp32 first; bf16 x bf16 products are exact in fp32, which is
    what the tensor cores accumulate, so only the summation order differs from the GPU.
    """
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {"PRECISION": "tf32" if tf32 else "ieee", "DOT_FP32": interpreting() and dtype == torch.bfloat16}


def _launch_config(config: Optional[dict]) -> Optional[dict]:
    """An explicit config, the interpreter's, or None (autotune)."""
    if config is not None:
        return dict(config)
    return dict(INTERPRETER_CONFIG) if interpreting() else None


def triton_grouped_mm(x_NI: torch.Tensor, w: torch.Tensor, offsets_E: torch.Tensor, trans_w: bool = True,
                      out: Optional[torch.Tensor] = None, config: Optional[dict] = None) -> torch.Tensor:
    """Launch the grouped GEMM: [N, O] in x's dtype (or ``out``'s); rows past offsets[-1] stay unwritten.

    ``config`` (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M and optionally num_warps / num_stages) skips autotuning.
    """
    out_features = _check_mm(x_NI, w, offsets_E, trans_w)
    rows, in_features = x_NI.shape
    num_experts = w.shape[0]
    if out is None:
        out = x_NI.new_empty(rows, out_features)
    elif out.shape != (rows, out_features):
        raise ValueError(f"out must be [{rows}, {out_features}], got {tuple(out.shape)}")
    if rows == 0 or out_features == 0 or num_experts == 0:
        return out
    if in_features == 0:
        return out.zero_()
    stride_bk, stride_bn = (w.stride(2), w.stride(1)) if trans_w else (w.stride(1), w.stride(2))
    args = (x_NI, w, out, offsets_E, rows, num_experts, out_features, in_features, x_NI.stride(0), x_NI.stride(1),
            w.stride(0), stride_bk, stride_bn, out.stride(0), out.stride(1))
    cfg = _launch_config(config)
    if cfg is None:
        def grid(meta):
            return ((triton.cdiv(rows, meta["BLOCK_M"]) + num_experts) * triton.cdiv(out_features, meta["BLOCK_N"]),)

        even_k = all(in_features % c.kwargs["BLOCK_K"] == 0 for c in _grouped_mm_tuned.configs)
        _grouped_mm_tuned[grid](*args, EVEN_K=even_k, **_dot_args(x_NI.dtype))
    else:
        grid = ((triton.cdiv(rows, cfg["BLOCK_M"]) + num_experts) * triton.cdiv(out_features, cfg["BLOCK_N"]),)
        _grouped_mm_kernel[grid](*args, EVEN_K=in_features % cfg["BLOCK_K"] == 0, **_dot_args(x_NI.dtype), **cfg)
    return out


def triton_grouped_wgrad(a_NP: torch.Tensor, b_NQ: torch.Tensor, offsets_E: torch.Tensor,
                         out: Optional[torch.Tensor] = None, accumulate: bool = False,
                         config: Optional[dict] = None) -> torch.Tensor:
    """Launch the grouped wgrad GEMM: out[e] (+)= a[rows of e].T @ b[rows of e], [E, P, Q].

    ``accumulate`` adds into ``out`` (megatron's gradient_accumulation_fusion: an fp32 main_grad) in place,
    summing in fp32 and rounding once. Without ``out``, a new [E, P, Q] tensor in a's dtype.
    """
    num_experts = offsets_E.numel()
    _check_wgrad(a_NP, b_NQ, offsets_E, num_experts)
    P, Q = a_NP.shape[1], b_NQ.shape[1]
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs the buffer to add into (out=main_grad)")
        out = a_NP.new_empty(num_experts, P, Q)
    elif out.shape != (num_experts, P, Q):
        raise ValueError(f"out must be [{num_experts}, {P}, {Q}], got {tuple(out.shape)}")
    if num_experts == 0 or P == 0 or Q == 0:
        return out
    args = (a_NP, b_NQ, out, offsets_E, P, Q, a_NP.stride(0), a_NP.stride(1), b_NQ.stride(0), b_NQ.stride(1),
            out.stride(0), out.stride(1), out.stride(2))
    cfg = _launch_config(config)
    if cfg is None:
        def grid(meta):
            return (triton.cdiv(P, meta["BLOCK_M"]) * triton.cdiv(Q, meta["BLOCK_N"]), num_experts)

        kernel = _grouped_wgrad_accum_tuned if accumulate else _grouped_wgrad_tuned
        kernel[grid](*args, ACCUMULATE=bool(accumulate), **_dot_args(a_NP.dtype))
    else:
        grid = (triton.cdiv(P, cfg["BLOCK_M"]) * triton.cdiv(Q, cfg["BLOCK_N"]), num_experts)
        _grouped_wgrad_kernel[grid](*args, ACCUMULATE=bool(accumulate), **_dot_args(a_NP.dtype), **cfg)
    return out


# ------------------------------------------------------------------------------------------------
# autograd: a grouped linear layer y = x @ w[e].T with megatron's gradient_accumulation_fusion
# ------------------------------------------------------------------------------------------------
def _megatron_dummy_wgrad(weight: torch.Tensor, dtype: torch.dtype):
    """What megatron's linear returns as the weight grad once it has added into main_grad (layers.py)."""
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    grad = make(weight.main_grad.shape, dtype=dtype, device=weight.device, requires_grad=False)
    weight.grad_added_to_main_grad = True
    return grad


class _GroupedLinearFn(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ w[e].T; backward dgrad = dy @ w[e], wgrad = dy.T @ x (or += main_grad)."""

    @staticmethod
    def forward(ctx, x_NI, w_EOI, offsets_E, backend, gradient_accumulation_fusion, config):
        ctx.save_for_backward(x_NI, w_EOI, offsets_E)
        # Like megatron: main_grad is held on ctx (not saved), so reuse across layers passes the version check.
        ctx.main_grad = w_EOI.main_grad if gradient_accumulation_fusion and hasattr(w_EOI, "main_grad") else None
        ctx.backend, ctx.config = backend, config
        return _mm(backend)(x_NI, w_EOI, offsets_E, trans_w=True, **_cfg(backend, config))

    @staticmethod
    def backward(ctx, grad_NO):
        x_NI, w_EOI, offsets_E = ctx.saved_tensors
        grad_NO = grad_NO.contiguous()
        kw = _cfg(ctx.backend, ctx.config)
        grad_x = _mm(ctx.backend)(grad_NO, w_EOI, offsets_E, trans_w=False, **kw) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            if ctx.main_grad is not None:
                _wgrad(ctx.backend)(grad_NO, x_NI, offsets_E, out=ctx.main_grad, accumulate=True, **kw)
                grad_w = _megatron_dummy_wgrad(w_EOI, x_NI.dtype)
            else:
                grad_w = _wgrad(ctx.backend)(grad_NO, x_NI, offsets_E, **kw)
        return grad_x, grad_w, None, None, None, None


def _mm(backend: str):
    return triton_grouped_mm if backend == "triton" else torch_grouped_mm


def _wgrad(backend: str):
    return triton_grouped_wgrad if backend == "triton" else torch_grouped_wgrad


def _cfg(backend: str, config: Optional[dict]) -> dict:
    return {"config": config} if backend == "triton" else {}


def _resolve_backend(x: torch.Tensor, backend: str) -> str:
    return "triton" if use_triton(x, backend, "grouped GEMM") else "torch"


def grouped_linear(x_NI: torch.Tensor, w_EOI: torch.Tensor, offsets_E: torch.Tensor, backend: str = "auto",
                   gradient_accumulation_fusion: bool = False, config: Optional[dict] = None) -> torch.Tensor:
    """Differentiable grouped linear on expert-sorted rows: y [N, O] = x @ w[e].T per expert.

    With ``gradient_accumulation_fusion`` and a ``w_EOI.main_grad`` (fp32 [E, O, I]), the wgrad GEMM adds
    into main_grad and the weight's .grad is megatron's dummy (None unless the param has
    ``grad_added_to_main_grad``), exactly as megatron's own linear layers do. 'auto' picks the Triton
    kernels for CUDA tensors; the torch backend loops over experts (and syncs on the offsets).
    """
    backend = _resolve_backend(x_NI, backend)
    _check_mm(x_NI, w_EOI, offsets_E, True)
    return _GroupedLinearFn.apply(x_NI, w_EOI, offsets_E, backend, bool(gradient_accumulation_fusion), config)


def grouped_mm(x_NI: torch.Tensor, w: torch.Tensor, offsets_E: torch.Tensor, trans_w: bool = True,
               backend: str = "auto", config: Optional[dict] = None) -> torch.Tensor:
    """Non-differentiable grouped GEMM: x[rows of e] @ (w[e].T if trans_w else w[e]) -> [N, O]."""
    if _resolve_backend(x_NI, backend) == "triton":
        return triton_grouped_mm(x_NI, w, offsets_E, trans_w, config=config)
    return torch_grouped_mm(x_NI, w, offsets_E, trans_w)


def grouped_wgrad(a_NP: torch.Tensor, b_NQ: torch.Tensor, offsets_E: torch.Tensor, out: Optional[torch.Tensor] = None,
                  accumulate: bool = False, backend: str = "auto", config: Optional[dict] = None) -> torch.Tensor:
    """Non-differentiable grouped wgrad: out[e] (+)= a[rows of e].T @ b[rows of e] -> [E, P, Q]."""
    if _resolve_backend(a_NP, backend) == "triton":
        return triton_grouped_wgrad(a_NP, b_NQ, offsets_E, out, accumulate, config=config)
    return torch_grouped_wgrad(a_NP, b_NQ, offsets_E, out, accumulate)
