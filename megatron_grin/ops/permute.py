"""Dropless token permute / unpermute (EP=1), optionally with the routing weights fused into unpermute.

Why: megatron's unfused path permutes with ``index_select`` over a ``masked_select``-built index and
unpermutes with a scaled copy plus ``scatter_add_`` into a zero buffer; scaling the expert output by
its routing weight is another full pass. Here each token's K rows are written by one program
(permute) and summed back by one program, with the weights applied on the fly when given (unpermute),
without atomics, so both directions are deterministic. GrinTokenDispatcher hands the weights to the
experts instead (``permute_probs``: GroupedMMExperts applies them inside its SwiGLU kernel, which needs
no saved [N, H] expert output for the router gradient), and unpermutes without them.

Layout: rows are expert-major and token-ascending within an expert (megatron's order), so
``tokens_per_expert`` splits the permuted tensor by expert. ``row_id_map_TK[t, k]`` is the permuted
row of token t's k-th pick.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_grin.ops.backend import HAVE_TRITON, use_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl


# ------------------------------------------------------------------------------------------------
# routing map (shared by both backends)
# ------------------------------------------------------------------------------------------------
def expert_counts(experts_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Picks per expert [E] int64 on the picks' device, without a host sync (``torch.bincount`` reads the
    maximum back to the host on CUDA to size its output)."""
    flat = experts_TK.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def routing_row_map(experts_TK: torch.Tensor, num_experts: int):
    """(row_id_map [T, K] int64, source token of each permuted row [N], tokens_per_expert [E] int64).

    All on the picks' device without a host sync: N = T * K is known and the counts are a scatter-add.
    """
    if experts_TK.dim() != 2:
        raise ValueError(f"experts must be [tokens, top_k], got shape {tuple(experts_TK.shape)}")
    top_k = experts_TK.shape[1]
    flat_N = experts_TK.reshape(-1)
    order_N = torch.argsort(flat_N, stable=True)  # expert-major; (t, k) ascending within an expert
    row_id_map = torch.empty_like(order_N)
    row_id_map[order_N] = torch.arange(order_N.numel(), device=order_N.device)
    tokens_per_expert = expert_counts(flat_N, num_experts)
    return row_id_map.view_as(experts_TK), order_N // top_k, tokens_per_expert


# ------------------------------------------------------------------------------------------------
# torch reference
# ------------------------------------------------------------------------------------------------
def torch_permute(hidden_TH: torch.Tensor, experts_TK: torch.Tensor, num_experts: int):
    """Returns (permuted [N, H], row_id_map [T, K], tokens_per_expert [E]); differentiable in hidden."""
    row_id_map, source_N, tokens_per_expert = routing_row_map(experts_TK, num_experts)
    return hidden_TH.index_select(0, source_N), row_id_map, tokens_per_expert


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _source_tokens(row_id_map_TK: torch.Tensor) -> torch.Tensor:
    """The token of every permuted row [N] (the inverse of the row map, divided by K): cheap int64 work."""
    flat = row_id_map_TK.reshape(-1)
    order = torch.empty_like(flat).scatter_(0, flat, torch.arange(flat.numel(), device=flat.device))
    return order // row_id_map_TK.shape[1]


class _TorchUnpermute(torch.autograd.Function):
    """Reference unpermute with a hand-written backward: each permuted row gets its one token's gradient
    (a gather, no accumulation), the probs their fp32 dot products; the kernels compute the same.

    Unweighted, it is one gather of the N rows and a sum over K, rounded once as in the kernel: about as cheap
    as megatron's scatter-add unpermute on CPU.
    """

    @staticmethod
    def forward(ctx, permuted_NH, row_id_map_TK, probs_TK):
        ctx.save_for_backward(permuted_NH if probs_TK is not None else None, row_id_map_TK, probs_TK)
        tokens, top_k = row_id_map_TK.shape
        rows_TKH = permuted_NH.index_select(0, row_id_map_TK.reshape(-1)).view(tokens, top_k, -1)
        if probs_TK is None and top_k <= 2:  # a + b rounds once in any dtype: the kernel's fp32 sum, exactly
            return rows_TKH[:, 0] + rows_TKH[:, 1] if top_k == 2 else rows_TKH[:, 0].clone()
        if probs_TK is None:
            return rows_TKH.sum(1)  # torch accumulates low-precision sums in fp32 and rounds once
        acc = _acc_dtype(permuted_NH.dtype)
        return (rows_TKH.to(acc) * probs_TK.to(acc).unsqueeze(-1)).sum(1).to(permuted_NH.dtype)

    @staticmethod
    def backward(ctx, grad_TH):
        permuted_NH, row_id_map_TK, probs_TK = ctx.saved_tensors
        grad_permuted = grad_TH.index_select(0, _source_tokens(row_id_map_TK))
        if probs_TK is None:
            return grad_permuted, None, None
        acc = _acc_dtype(grad_TH.dtype)
        flat = row_id_map_TK.reshape(-1)
        probs_N = torch.empty(flat.numel(), dtype=acc, device=flat.device)
        probs_N.scatter_(0, flat, probs_TK.reshape(-1).to(acc))
        grad_probs_N = (grad_permuted.to(acc) * permuted_NH.to(acc)).sum(-1)  # row n: <g[token of n], row n>
        grad_permuted = (grad_permuted.to(acc) * probs_N.unsqueeze(-1)).to(grad_TH.dtype)
        return grad_permuted, None, grad_probs_N.gather(0, flat).view_as(probs_TK).to(probs_TK.dtype)


def torch_unpermute(permuted_NH: torch.Tensor, row_id_map_TK: torch.Tensor,
                    probs_TK: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out[t] = sum_k probs[t, k] * permuted[row_id_map[t, k]] in the permuted dtype (fp32 accumulation)."""
    return _TorchUnpermute.apply(permuted_NH, row_id_map_TK, probs_TK)


# ------------------------------------------------------------------------------------------------
# Triton kernels: one program per (token, hidden block)
# ------------------------------------------------------------------------------------------------
if HAVE_TRITON:

    @triton.jit
    def _scatter_rows_kernel(src_ptr, row_map_ptr, probs_ptr, dst_ptr, H,
                             TOP_K: tl.constexpr, HAS_PROBS: tl.constexpr, BLOCK_H: tl.constexpr):
        """dst[row_map[t, k]] = (probs[t, k] *) src[t] for every pick k."""
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        ok = cols < H
        x = tl.load(src_ptr + t * H + cols, mask=ok, other=0.0)
        for k in tl.static_range(TOP_K):
            row = tl.load(row_map_ptr + t * TOP_K + k)
            if HAS_PROBS:
                y = x.to(tl.float32) * tl.load(probs_ptr + t * TOP_K + k).to(tl.float32)
            else:
                y = x
            tl.store(dst_ptr + row * H + cols, y.to(dst_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _gather_rows_kernel(src_ptr, row_map_ptr, probs_ptr, dst_ptr, H,
                            TOP_K: tl.constexpr, HAS_PROBS: tl.constexpr, BLOCK_H: tl.constexpr):
        """dst[t] = sum_k (probs[t, k] *) src[row_map[t, k]], accumulated in fp32."""
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        ok = cols < H
        acc = tl.zeros([BLOCK_H], tl.float32)
        for k in tl.static_range(TOP_K):
            row = tl.load(row_map_ptr + t * TOP_K + k)
            y = tl.load(src_ptr + row * H + cols, mask=ok, other=0.0).to(tl.float32)
            if HAS_PROBS:
                y = y * tl.load(probs_ptr + t * TOP_K + k).to(tl.float32)
            acc += y
        tl.store(dst_ptr + t * H + cols, acc.to(dst_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _unpermute_bwd_kernel(grad_out_ptr, permuted_ptr, row_map_ptr, probs_ptr, grad_permuted_ptr,
                              grad_probs_ptr, H, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
        """grad_permuted[row_map[t, k]] = probs[t, k] * g[t]; grad_probs[t, k] = <g[t], permuted[row]>."""
        t = tl.program_id(0).to(tl.int64)
        for k in tl.static_range(TOP_K):
            row = tl.load(row_map_ptr + t * TOP_K + k)
            p = tl.load(probs_ptr + t * TOP_K + k).to(tl.float32)
            dot = tl.zeros([BLOCK_H], tl.float32)
            for start in range(0, H, BLOCK_H):
                cols = start + tl.arange(0, BLOCK_H)
                ok = cols < H
                g = tl.load(grad_out_ptr + t * H + cols, mask=ok, other=0.0).to(tl.float32)
                y = tl.load(permuted_ptr + row * H + cols, mask=ok, other=0.0).to(tl.float32)
                tl.store(grad_permuted_ptr + row * H + cols, (g * p).to(grad_permuted_ptr.dtype.element_ty),
                         mask=ok)
                dot += g * y
            tl.store(grad_probs_ptr + t * TOP_K + k, tl.sum(dot, axis=0))


def _block_h(hidden: int) -> int:
    return min(1024, triton.next_power_of_2(hidden))


def _check_rows(name: str, tensor: torch.Tensor, rows: int, hidden: Optional[int] = None) -> None:
    if tensor.dim() != 2 or tensor.shape[0] != rows or (hidden is not None and tensor.shape[1] != hidden):
        want = f"[{rows}, {hidden if hidden is not None else 'H'}]"
        raise ValueError(f"{name} must be {want}, got {tuple(tensor.shape)}")


def triton_scatter_rows(src_TH: torch.Tensor, row_id_map_TK: torch.Tensor, num_rows: int,
                        probs_TK: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dst [num_rows, H] with dst[row_id_map[t, k]] = (probs[t, k] *) src[t]; every row must be hit once."""
    tokens, hidden = src_TH.shape
    _check_rows("row_id_map", row_id_map_TK, tokens)
    if probs_TK is not None:
        _check_rows("probs", probs_TK, tokens, row_id_map_TK.shape[1])
    if num_rows != row_id_map_TK.numel():
        raise ValueError(f"dropless permute writes {row_id_map_TK.numel()} rows, asked for {num_rows}")
    dst = src_TH.new_empty(num_rows, hidden)
    if tokens and hidden:
        block_h = _block_h(hidden)
        _scatter_rows_kernel[(tokens, triton.cdiv(hidden, block_h))](
            src_TH.contiguous(), row_id_map_TK.contiguous(), probs_TK.contiguous() if probs_TK is not None else src_TH,
            dst, hidden, TOP_K=row_id_map_TK.shape[1], HAS_PROBS=probs_TK is not None, BLOCK_H=block_h)
    return dst


def triton_gather_rows(src_NH: torch.Tensor, row_id_map_TK: torch.Tensor,
                       probs_TK: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dst [T, H] with dst[t] = sum_k (probs[t, k] *) src[row_id_map[t, k]]."""
    tokens, top_k = row_id_map_TK.shape
    _check_rows("permuted", src_NH, tokens * top_k)
    if probs_TK is not None:
        _check_rows("probs", probs_TK, tokens, top_k)
    hidden = src_NH.shape[1]
    dst = src_NH.new_empty(tokens, hidden)
    if tokens and hidden:
        block_h = _block_h(hidden)
        _gather_rows_kernel[(tokens, triton.cdiv(hidden, block_h))](
            src_NH.contiguous(), row_id_map_TK.contiguous(), probs_TK.contiguous() if probs_TK is not None else src_NH,
            dst, hidden, TOP_K=top_k, HAS_PROBS=probs_TK is not None, BLOCK_H=block_h)
    return dst


def triton_unpermute_backward(grad_TH: torch.Tensor, permuted_NH: torch.Tensor, row_id_map_TK: torch.Tensor,
                              probs_TK: torch.Tensor):
    """(grad of permuted [N, H], grad of probs [T, K] fp32) for the weighted unpermute."""
    tokens, top_k = row_id_map_TK.shape
    _check_rows("grad", grad_TH, tokens, permuted_NH.shape[1])
    _check_rows("permuted", permuted_NH, tokens * top_k)
    hidden = permuted_NH.shape[1]
    grad_permuted = permuted_NH.new_empty(permuted_NH.shape)
    grad_probs = torch.zeros(tokens, top_k, device=grad_TH.device, dtype=torch.float32)
    if tokens and hidden:
        _unpermute_bwd_kernel[(tokens,)](
            grad_TH.contiguous(), permuted_NH.contiguous(), row_id_map_TK.contiguous(), probs_TK.contiguous(),
            grad_permuted, grad_probs, hidden, TOP_K=top_k, BLOCK_H=_block_h(hidden))
    return grad_permuted, grad_probs.to(probs_TK.dtype)


class _PermuteFn(torch.autograd.Function):
    """Forward: scatter each token to its K rows. Backward: gather-sum the K row gradients."""

    @staticmethod
    def forward(ctx, hidden_TH, row_id_map_TK):
        ctx.save_for_backward(row_id_map_TK)
        return triton_scatter_rows(hidden_TH, row_id_map_TK, row_id_map_TK.numel())

    @staticmethod
    def backward(ctx, grad_NH):
        (row_id_map_TK,) = ctx.saved_tensors
        return triton_gather_rows(grad_NH.contiguous(), row_id_map_TK), None


class _UnpermuteFn(torch.autograd.Function):
    """Forward: weighted gather-sum of each token's K rows. Backward: scaled scatter + per-pick dot."""

    @staticmethod
    def forward(ctx, permuted_NH, row_id_map_TK, probs_TK):
        # the rows are needed only for the probs gradient: unweighted, the expert output is not kept alive
        ctx.save_for_backward(permuted_NH if probs_TK is not None else None, row_id_map_TK, probs_TK)
        return triton_gather_rows(permuted_NH, row_id_map_TK, probs_TK)

    @staticmethod
    def backward(ctx, grad_TH):
        permuted_NH, row_id_map_TK, probs_TK = ctx.saved_tensors
        if probs_TK is None:
            return triton_scatter_rows(grad_TH.contiguous(), row_id_map_TK, row_id_map_TK.numel()), None, None
        grad_permuted, grad_probs = triton_unpermute_backward(grad_TH, permuted_NH, row_id_map_TK, probs_TK)
        return grad_permuted, None, grad_probs


def permute_tokens(hidden_TH: torch.Tensor, experts_TK: torch.Tensor, num_experts: int, backend: str = "auto"):
    """Dropless permute: (permuted [T*K, H], row_id_map [T, K], tokens_per_expert [E] int64, on device)."""
    if hidden_TH.dim() != 2 or experts_TK.dim() != 2 or hidden_TH.shape[0] != experts_TK.shape[0]:
        raise ValueError(f"hidden [T, H] and experts [T, K] disagree: {tuple(hidden_TH.shape)} vs "
                         f"{tuple(experts_TK.shape)}")
    if not use_triton(hidden_TH, backend, "permute"):
        return torch_permute(hidden_TH, experts_TK, num_experts)
    row_id_map, _, tokens_per_expert = routing_row_map(experts_TK, num_experts)
    return _PermuteFn.apply(hidden_TH, row_id_map), row_id_map, tokens_per_expert


def permute_probs(probs_TK: torch.Tensor, row_id_map_TK: torch.Tensor) -> torch.Tensor:
    """The routing weight of every permuted row, [N] (differentiable: the gradient is gathered back to [T, K])."""
    if probs_TK.shape != row_id_map_TK.shape:
        raise ValueError(f"probs must be [T, K] = {tuple(row_id_map_TK.shape)}, got {tuple(probs_TK.shape)}")
    flat = probs_TK.reshape(-1)
    return flat.new_empty(flat.shape).scatter(0, row_id_map_TK.reshape(-1), flat)  # a permutation: every row set


def unpermute_tokens(permuted_NH: torch.Tensor, row_id_map_TK: torch.Tensor, probs_TK: Optional[torch.Tensor] = None,
                     backend: str = "auto") -> torch.Tensor:
    """Inverse of :func:`permute_tokens`, summing each token's K rows weighted by probs [T, K] (if given)."""
    if row_id_map_TK.dim() != 2 or permuted_NH.dim() != 2 or permuted_NH.shape[0] != row_id_map_TK.numel():
        raise ValueError(f"permuted [T*K, H] and row_id_map [T, K] disagree: {tuple(permuted_NH.shape)} vs "
                         f"{tuple(row_id_map_TK.shape)}")
    if probs_TK is not None and probs_TK.shape != row_id_map_TK.shape:
        raise ValueError(f"probs must be [T, K] = {tuple(row_id_map_TK.shape)}, got {tuple(probs_TK.shape)}")
    if not use_triton(permuted_NH, backend, "permute"):
        return torch_unpermute(permuted_NH, row_id_map_TK, probs_TK)
    return _UnpermuteFn.apply(permuted_NH, row_id_map_TK, probs_TK)
