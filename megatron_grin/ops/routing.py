"""Fused SparseMixer-v2 routing: one Triton kernel for all picks forward, one for the router gradient.

Why: the torch path (``megatron_grin.model.router.sparsemixer_v2_with_stats`` fed by
``routing_rng.routing_uniforms``) materialises [T, K, E+1] uniforms and runs ~40 small kernels per pick;
on a GPU that is launch-bound. The kernel draws the same Philox4x32-10 numbers in registers (same
key = (seed, iteration) and counters = (token_id, lane_block, layer_number*4 + stream, microbatch) as
``routing_rng``) and recomputes the masked softmaxes in backward instead of saving them.

Equality with the torch reference: the uniforms are bit-identical, the mask uses IEEE division, ties
break to the lowest expert id as in torch. ``log``/``exp`` may differ from torch by an ulp, so a pick
can differ only when two Gumbel scores tie to within an ulp; weights and gradients agree to ~1e-6.

Shapes: T tokens, E experts, K picks (top_k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_grin.model import routing_rng
from megatron_grin.model.sparsemixer import HEUN_HIGH_ADD, HEUN_LOW, VARIANTS, sparsemixer_v2_with_stats
from megatron_grin.ops.backend import HAVE_TRITON, use_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class RoutingKey:
    """What the routing randomness is for; see ``routing_rng`` for the layout."""

    token_ids: torch.Tensor  # [T] int64 global token ids
    seed: int
    iteration: int
    layer_number: int
    microbatch: int
    stream: int = routing_rng.STREAM_ROUTING


def _variant(variant: str):
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is unknown; choose one of {sorted(VARIANTS)}")
    return VARIANTS[variant]


def _heun_multipliers() -> tuple[float, float]:
    """(m for a partial pick, m for a full pick), computed exactly as the torch reference does."""

    low, high = torch.add(HEUN_LOW, torch.tensor([False, True]), alpha=HEUN_HIGH_ADD).tolist()
    return low, high


def _check_args(logits_TE: torch.Tensor, top_k: int) -> None:
    if logits_TE.dim() != 2:
        raise ValueError(f"logits must be [tokens, experts], got shape {tuple(logits_TE.shape)}")
    if not 1 <= top_k <= logits_TE.shape[1]:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={logits_TE.shape[1]}]")


# ------------------------------------------------------------------------------------------------
# torch reference (the CPU path)
# ------------------------------------------------------------------------------------------------
def torch_sparsemixer_routing(logits_TE: torch.Tensor, jitter_eps: float, top_k: int, training: bool,
                              key: Optional[RoutingKey] = None, variant: str = "sparsemixer_v2"):
    """Reference: routing_rng uniforms + router.sparsemixer_v2_with_stats.

    Returns (weights [T, K] in the logits dtype, experts [T, K] int64, stats) where stats holds bool
    [T, K] ``sampled_not_argmax`` and ``full_multiplier`` in training and is empty in eval.
    """

    _check_args(logits_TE, top_k)
    uniforms = None
    if training and key is not None:
        uniforms = routing_rng.routing_uniforms(
            key.token_ids, logits_TE.shape[1] + 1, top_k, seed=key.seed, iteration=key.iteration,
            layer_number=key.layer_number, microbatch=key.microbatch, stream=key.stream)
    return sparsemixer_v2_with_stats(logits_TE, jitter_eps, top_k, training, uniforms=uniforms, variant=variant)


# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------
if HAVE_TRITON:

    @triton.jit
    def _masked_softmax(z, absz, remaining, col_ok, thr, BLOCK_E: tl.constexpr):
        """One pick's relative mask and masked softmax (the torch reference's _relative_mask + softmax)."""
        mx = tl.max(remaining, axis=1)
        amax = tl.argmax(remaining, axis=1)
        factor = tl.maximum(absz, mx[:, None])  # clamp(|z|, min=max)
        gap = tl.math.div_rn(mx[:, None] - z, factor)
        masked = tl.where((gap > thr) | (col_ok[None, :] == 0), float("-inf"), remaining)
        m2 = tl.max(masked, axis=1)
        ex = tl.exp(masked - m2[:, None])
        p = ex / tl.sum(ex, axis=1)[:, None]
        return masked, p, amax

    @triton.jit
    def _sparsemixer_fwd_kernel(
        logits_ptr, token_ids_ptr, weights_ptr, experts_ptr, not_argmax_ptr, full_ptr,
        T, E, stride_t, philox_key, c2, c3, temperature, thr, bern_thr, mult_low, mult_high,
        TOP_K: tl.constexpr, TRAINING: tl.constexpr, SCALE: tl.constexpr, LANE_BLOCKS: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        row_ok = rows < T
        col_ok = cols < E
        ptrs = logits_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :]
        z = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=1.0)
        z = tl.where(col_ok[None, :], z, float("-inf"))  # rows past T: all 1.0, so no 0/0 or NaN softmax
        if SCALE:
            z = tl.math.div_rn(z, tl.zeros_like(z) + temperature)
        absz = tl.where(col_ok[None, :], tl.abs(z), 1.0)  # padded lanes: inf / 1, not inf / inf
        remaining = z
        cols_2d = tl.zeros([BLOCK_T, BLOCK_E], tl.int32) + cols[None, :]
        if TRAINING:
            tok = tl.load(token_ids_ptr + rows, mask=row_ok, other=0)
            zero_u = tl.zeros([BLOCK_T, BLOCK_E], tl.uint32)
            c0_2d = zero_u + tok.to(tl.uint32)[:, None]
            c2_2d = zero_u + c2  # int32 words promote to uint32 with their bits kept
            c3_2d = zero_u + c3
            word = cols_2d % 4
        for k in tl.static_range(TOP_K):
            masked, p, amax = _masked_softmax(z, absz, remaining, col_ok, thr, BLOCK_E)
            if TRAINING:
                # Lane e of pick k is word e % 4 of Philox block k * LANE_BLOCKS + e // 4.
                c1_2d = (zero_u + (k * LANE_BLOCKS)) + (cols_2d // 4).to(tl.uint32)
                r0, r1, r2, r3 = tl.philox(philox_key, c0_2d, c1_2d, c2_2d, c3_2d)
                bits = tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3)))
                u = ((bits >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2**-23
                pick = tl.argmax(masked - tl.log(-tl.log(u)), axis=1)
                u_bern = tl.sum(tl.where(cols_2d == E, u, 0.0), axis=1)
                p_d = tl.sum(tl.where(cols_2d == pick[:, None], p, 0.0), axis=1)
                is_top = pick == tl.argmax(p, axis=1)
                full = is_top | (u_bern > bern_thr)
                weight = p_d * tl.where(full, mult_high, mult_low)
                tl.store(not_argmax_ptr + rows * TOP_K + k, (is_top == 0).to(tl.int8), mask=row_ok)
                tl.store(full_ptr + rows * TOP_K + k, full.to(tl.int8), mask=row_ok)
            else:
                pick = amax
                weight = tl.sum(tl.where(cols_2d == pick[:, None], p, 0.0), axis=1)
            tl.store(weights_ptr + rows * TOP_K + k, weight, mask=row_ok)
            tl.store(experts_ptr + rows * TOP_K + k, pick.to(tl.int64), mask=row_ok)
            remaining = tl.where(cols_2d == pick[:, None], float("-inf"), remaining)

    @triton.jit
    def _sparsemixer_bwd_kernel(
        logits_ptr, experts_ptr, grad_w_ptr, grad_logits_ptr, T, E, stride_t, temperature, thr, grad_scale,
        TOP_K: tl.constexpr, SCALE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        row_ok = rows < T
        col_ok = cols < E
        io_mask = row_ok[:, None] & col_ok[None, :]
        z = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :], mask=io_mask, other=1.0)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        if SCALE:
            z = tl.math.div_rn(z, tl.zeros_like(z) + temperature)
        absz = tl.where(col_ok[None, :], tl.abs(z), 1.0)  # padded lanes: inf / 1, not inf / inf
        remaining = z
        cols_2d = tl.zeros([BLOCK_T, BLOCK_E], tl.int32) + cols[None, :]
        grad = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
        for k in tl.static_range(TOP_K):
            masked, p, amax = _masked_softmax(z, absz, remaining, col_ok, thr, BLOCK_E)
            pick = tl.load(experts_ptr + rows * TOP_K + k, mask=row_ok, other=0).to(tl.int32)
            g = tl.load(grad_w_ptr + rows * TOP_K + k, mask=row_ok, other=0.0)
            onehot = cols_2d == pick[:, None]
            p_d = tl.sum(tl.where(onehot, p, 0.0), axis=1)
            g = g * p_d * grad_scale  # dL/dz = g * p_D * (onehot(D) - p), without the Heun multiplier
            grad += tl.where(onehot, g[:, None], 0.0) - p * g[:, None]
            remaining = tl.where(onehot, float("-inf"), remaining)
        tl.store(grad_logits_ptr + rows[:, None].to(tl.int64) * E + cols[None, :], grad, mask=io_mask)


def _blocks(num_experts: int) -> tuple[int, int]:
    block_e = triton.next_power_of_2(num_experts + 1)  # lane E (the Heun Bernoulli) lives in the tile
    return max(1, 1024 // block_e), block_e  # ~8 lanes per thread at 4 warps: no spills on sm90


def _signed32(value: int) -> int:
    """A uint32 counter word as the int32 Triton passes to tl.philox (bitcast back inside)."""
    value &= _M32
    return value - (1 << 32) if value >= 1 << 31 else value


def triton_sparsemixer_forward(logits_TE: torch.Tensor, jitter_eps: float, top_k: int, training: bool,
                               key: Optional[RoutingKey], variant: str = "sparsemixer_v2"):
    """Launch the forward kernel; returns (weights [T, K] fp32, experts [T, K] int64, not_argmax, full)."""
    _check_args(logits_TE, top_k)
    if logits_TE.dtype != torch.float32:
        raise ValueError(f"the routing kernel takes fp32 logits (moe_router_dtype='fp32'), got {logits_TE.dtype}")
    if logits_TE.stride(1) != 1:
        raise ValueError("logits must be contiguous along the expert dimension")
    num_tokens, num_experts = logits_TE.shape
    if training:
        if key is None:
            raise ValueError("training routing needs a RoutingKey (token ids, seed, iteration, layer, microbatch)")
        if key.token_ids.shape != (num_tokens,):
            raise ValueError(f"token_ids must be [{num_tokens}], got {tuple(key.token_ids.shape)}")
    est = _variant(variant)
    dev = logits_TE.device
    weights = torch.empty(num_tokens, top_k, device=dev, dtype=torch.float32)
    experts = torch.empty(num_tokens, top_k, device=dev, dtype=torch.int64)
    not_argmax = torch.zeros(num_tokens, top_k, device=dev, dtype=torch.int8)
    full = torch.zeros(num_tokens, top_k, device=dev, dtype=torch.int8)
    if num_tokens == 0:
        return weights, experts, not_argmax.bool(), full.bool()
    block_t, block_e = _blocks(num_experts)
    low, high = _heun_multipliers()
    if training:
        token_ids = key.token_ids.to(device=dev, dtype=torch.int64).contiguous()
        philox_key = ((key.iteration & _M32) << 32) | (key.seed & _M32)  # Triton: k0 = low, k1 = high word
        c2, c3 = _signed32(key.layer_number * 4 + key.stream), _signed32(key.microbatch)
    else:
        token_ids, philox_key, c2, c3 = experts, 0, 0, 0  # unused
    _sparsemixer_fwd_kernel[(triton.cdiv(num_tokens, block_t),)](
        logits_TE, token_ids, weights, experts, not_argmax, full,
        num_tokens, num_experts, logits_TE.stride(0), philox_key, c2, c3, float(est.temperature),
        2 * jitter_eps, 1.0 - est.p_full, low, high,
        TOP_K=top_k, TRAINING=bool(training), SCALE=est.temperature != 1.0,
        LANE_BLOCKS=(num_experts + 1 + 3) // 4, BLOCK_T=block_t, BLOCK_E=block_e)
    return weights, experts, not_argmax.bool(), full.bool()


def triton_sparsemixer_backward(logits_TE: torch.Tensor, experts_TK: torch.Tensor, grad_weights_TK: torch.Tensor,
                                jitter_eps: float, grad_scale: float, temperature: float) -> torch.Tensor:
    """Launch the backward kernel: dL/dlogits [T, E] fp32 = sum_k grad_scale * g_k p_Dk (onehot(D_k) - p_k)."""
    if logits_TE.dim() != 2 or experts_TK.dim() != 2 or experts_TK.shape[0] != logits_TE.shape[0]:
        raise ValueError(f"logits [T, E] and experts [T, K] disagree: {tuple(logits_TE.shape)} vs "
                         f"{tuple(experts_TK.shape)}")
    if grad_weights_TK.shape != experts_TK.shape:
        raise ValueError(f"grad of weights {tuple(grad_weights_TK.shape)} must match experts {tuple(experts_TK.shape)}")
    num_tokens, num_experts = logits_TE.shape
    grad_TE = torch.empty(num_tokens, num_experts, device=logits_TE.device, dtype=torch.float32)
    if num_tokens == 0:
        return grad_TE
    block_t, block_e = _blocks(num_experts)
    _sparsemixer_bwd_kernel[(triton.cdiv(num_tokens, block_t),)](
        logits_TE, experts_TK.contiguous(), grad_weights_TK.float().contiguous(), grad_TE,
        num_tokens, num_experts, logits_TE.stride(0), float(temperature), 2 * jitter_eps, float(grad_scale),
        TOP_K=experts_TK.shape[1], SCALE=temperature != 1.0, BLOCK_T=block_t, BLOCK_E=block_e)
    return grad_TE


class _SparseMixerRouting(torch.autograd.Function):
    """Forward: the fused kernel. Backward: the SparseMixer router gradient, recomputing the masked softmaxes."""

    @staticmethod
    def forward(ctx, logits_TE, jitter_eps, top_k, training, key, variant):
        weights, experts, not_argmax, full = triton_sparsemixer_forward(
            logits_TE, jitter_eps, top_k, training, key, variant)
        est = _variant(variant)
        ctx.save_for_backward(logits_TE, experts)
        # d p_D(z / temperature) / dz carries 1 / temperature; v2* doubles the training gradient.
        ctx.grad_scale = (est.grad_scale if training else 1.0) / est.temperature
        ctx.temperature = est.temperature
        ctx.jitter_eps = jitter_eps
        ctx.mark_non_differentiable(experts, not_argmax, full)
        return weights, experts, not_argmax, full

    @staticmethod
    def backward(ctx, grad_weights, *_):
        logits_TE, experts = ctx.saved_tensors
        grad = triton_sparsemixer_backward(logits_TE, experts, grad_weights, ctx.jitter_eps, ctx.grad_scale,
                                           ctx.temperature)
        return grad, None, None, None, None, None


def triton_sparsemixer_routing(logits_TE: torch.Tensor, jitter_eps: float, top_k: int, training: bool,
                               key: Optional[RoutingKey] = None, variant: str = "sparsemixer_v2"):
    """Fused-kernel routing with the same contract as :func:`torch_sparsemixer_routing`.

    Without a key in training, a fresh (seed, iteration) is drawn from torch's generator.
    """
    if training and key is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        key = RoutingKey(torch.arange(logits_TE.shape[0], device=logits_TE.device), seed, 0, 0, 0)
    weights, experts, not_argmax, full = _SparseMixerRouting.apply(
        logits_TE, float(jitter_eps), int(top_k), bool(training), key, variant)
    stats = {"sampled_not_argmax": not_argmax, "full_multiplier": full} if training else {}
    return weights, experts, stats


def sparsemixer_routing(logits_TE: torch.Tensor, jitter_eps: float, top_k: int, training: bool,
                        key: Optional[RoutingKey] = None, variant: str = "sparsemixer_v2", backend: str = "auto"):
    """SparseMixer-v2 routing for any top_k; 'auto' takes the fused kernel on CUDA with fp32 logits.

    Returns (weights [T, K], experts [T, K] int64, stats) exactly like the torch reference.
    """
    if backend == "auto" and logits_TE.dtype != torch.float32:
        backend = "torch"  # the kernel takes fp32 logits (moe_router_dtype='fp32')
    if use_triton(logits_TE, backend, "routing"):
        return triton_sparsemixer_routing(logits_TE, jitter_eps, top_k, training, key, variant)
    return torch_sparsemixer_routing(logits_TE, jitter_eps, top_k, training, key, variant)
