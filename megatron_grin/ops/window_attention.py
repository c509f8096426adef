"""Causal and sliding-window attention kernels that never materialise [batch, heads, s, s] scores.

Three exact kernels and the dense float64 reference they are tested against; shapes q [b, hq, sq, d],
k/v [b, hkv, sk, d] with hq % hkv == 0 (GQA: query head i uses K/V head i // (hq / hkv)):

* ``sdpa_attention``: full causal (or unmasked) attention through
  ``torch.nn.functional.scaled_dot_product_attention`` with ``enable_gqa`` (flash / cuDNN /
  memory-efficient on CUDA, the CPU flash kernel on CPU; none of them repeats K/V);
* ``flex_window_attention``: the sliding window through compiled FlexAttention with a cached
  BlockMask: a Triton flash kernel that skips the blocks outside the band (CUDA);
* ``window_attention_blockwise``: the sliding window (and bottom-right-aligned causal attention for
  sq != sk) in plain torch, one query block at a time, with a backward that recomputes each block:
  memory linear in s on any device. The CPU path.

Masking: query row i sits at absolute position i + sk - sq (bottom-right aligned, as megatron's
sliding-window mask and a KV cache need) and sees keys j with pos - window_left <= j <= pos;
``window_left=None`` is plain causal. HF's ``sliding_window = 2047`` is ``window_left = 2046``.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

#: SDPA kernels by name (the names ``sdpa_kernel_choice`` reports)
SDPA_KERNELS = {SDPBackend.FLASH_ATTENTION: "flash", SDPBackend.EFFICIENT_ATTENTION: "memory-efficient",
                SDPBackend.CUDNN_ATTENTION: "cuDNN", SDPBackend.MATH: "math"}


def _check_heads(q: Tensor, k: Tensor) -> None:
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads is not a multiple of {k.shape[1]} key/value heads")


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------
# the reference
# ----------------------------------------------------------------------------------------------------
def window_attention_reference(q: Tensor, k: Tensor, v: Tensor, window_left: Optional[int], scale: float,
                               causal: bool = True) -> Tensor:
    """Dense masked softmax in float64 with K/V repeated per query head: O(s^2), for tests only."""
    hq, hk = q.shape[1], k.shape[1]
    sq, sk = q.shape[-2], k.shape[-2]
    q, k, v = (t.double() for t in (q, k, v))
    k, v = k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)
    pos = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=q.device)[None, :]
    keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        keep &= j <= pos
    if window_left is not None:
        keep &= (pos - j) <= window_left
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~keep, -math.inf)
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # rows that see no key: 0, as the kernels return
    return probs @ v


# ----------------------------------------------------------------------------------------------------
# full causal: SDPA
# ----------------------------------------------------------------------------------------------------
def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool = True,
                   kernels: Optional[Sequence[SDPBackend]] = None) -> Tensor:
    """Causal (top-left aligned, so sq == sk) or unmasked attention via SDPA, K/V never repeated.

    ``kernels`` restricts SDPA to those backends (``sdpa_kernel``); None lets torch choose per call.
    """
    _check_heads(q, k)
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError("causal SDPA needs sq == sk (its is_causal is top-left aligned); "
                         "use window_attention_blockwise for a KV-cache chunk")
    gqa = q.shape[1] != k.shape[1]
    if kernels is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    with sdpa_kernel(list(kernels)):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)


def sdpa_masked(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, scale: float) -> Tensor:
    """Attention under an explicit boolean mask (True = attend), broadcast to [b, hq, sq, sk]."""
    _check_heads(q, k)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def sdpa_kernel_choice(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> str:
    """The kernel SDPA will run for these inputs under the current ``sdpa_kernel`` settings (host only).

    Why: the math kernel materialises the scores (and repeats K/V for GQA); the module warns when
    torch would pick it. Uses torch's own dispatcher (``torch._fused_sdp_choice``).
    """
    choice = torch._fused_sdp_choice(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
    return SDPA_KERNELS.get(SDPBackend(choice), SDPBackend(choice).name)


# ----------------------------------------------------------------------------------------------------
# sliding window: blockwise, plain torch
# ----------------------------------------------------------------------------------------------------
def _block_keys(s0: int, s1: int, off: int, sk: int, window_left: Optional[int]) -> tuple[int, int]:
    """Key range [k0, k1) that query rows [s0, s1) (absolute positions + off) can see."""
    k1 = min(sk, s1 + off)
    k0 = 0 if window_left is None else max(0, s0 + off - window_left)
    return k0, max(k0, k1)


def block_allowed(s0: int, s1: int, k0: int, k1: int, off: int, window_left: Optional[int],
                  device: torch.device) -> Tensor:
    """[s1 - s0, k1 - k0] bool: True where query row i (position i + off) may attend key j."""
    pos = torch.arange(s0 + off, s1 + off, device=device)[:, None]
    j = torch.arange(k0, k1, device=device)[None, :]
    allowed = j <= pos
    if window_left is not None:
        allowed &= (pos - j) <= window_left
    return allowed


def _block_scores(qb: Tensor, k: Tensor, s0: int, s1: int, k0: int, k1: int, off: int,
                  window_left: Optional[int], scale: float) -> Tensor:
    """Masked scores of one query block against its key span, [b, hkv, r, B, span] in qb's dtype."""
    kb = k[:, :, None, k0:k1].to(qb.dtype)
    scores = torch.matmul(qb, kb.transpose(-1, -2)).mul_(scale)
    return scores.masked_fill_(~block_allowed(s0, s1, k0, k1, off, window_left, qb.device), -math.inf)


def _zeros_seq_major(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Zeros of logical shape [b, heads..., s, d] stored [s, b, heads..., d], megatron's layout.

    Why: the module's [b, h, s, d] -> [s, b, h * d] permute-and-reshape is then a view, so the output
    autograd saves here and the input linear_proj saves are one storage (no copy, no extra activation).
    """
    b, *heads, s, d = shape
    order = (1, *range(2, 2 + len(heads)), 0, len(shape) - 1)
    return torch.zeros(s, b, *heads, d, dtype=dtype, device=device).permute(*order)


class _BlockwiseWindowAttention(torch.autograd.Function):
    """Exact attention one query block at a time; backward recomputes each block's probabilities.

    Each block's key span is complete, so its softmax needs no online rescaling. Autograd keeps q, k,
    v, the output and the [b, hq, sq] log-sum-exp (FlashAttention's recipe), nothing quadratic.
    """

    @staticmethod
    def forward(ctx, q, k, v, window_left, scale, block_size):
        b, hq, sq, d = q.shape
        hk, sk = k.shape[1], k.shape[2]
        r, off, acc = hq // hk, sk - sq, _accum_dtype(q.dtype)
        qg = q.view(b, hk, r, sq, d)  # query head hk*r + i uses K/V head hk (megatron's and SDPA's order)
        out = _zeros_seq_major((b, hk, r, sq, d), q.dtype, q.device)
        lse = torch.full((b, hk, r, sq), -math.inf, dtype=acc, device=q.device)
        for s0 in range(0, sq, block_size):
            s1 = min(sq, s0 + block_size)
            k0, k1 = _block_keys(s0, s1, off, sk, window_left)
            if k1 == k0:  # rows before the first key (sq > sk): nothing to attend, output 0
                continue
            scores = _block_scores(qg[:, :, :, s0:s1].to(acc), k, s0, s1, k0, k1, off, window_left, scale)
            m = scores.amax(-1, keepdim=True)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            p = scores.sub_(m).exp_()
            denom = p.sum(-1, keepdim=True)
            o = torch.matmul(p, v[:, :, None, k0:k1].to(acc))
            o = o / torch.where(denom > 0, denom, torch.ones_like(denom))
            out[:, :, :, s0:s1] = o.to(q.dtype)
            lse[:, :, :, s0:s1] = (m + torch.log(denom)).squeeze(-1)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.window_left, ctx.scale, ctx.block_size = window_left, scale, block_size
        return out.view(b, hq, sq, d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        window_left, scale = ctx.window_left, ctx.scale
        b, hq, sq, d = q.shape
        hk, sk = k.shape[1], k.shape[2]
        r, off, acc = hq // hk, sk - sq, _accum_dtype(q.dtype)
        qg, dog = q.view(b, hk, r, sq, d), dout.reshape(b, hk, r, sq, d)
        delta = (dog.to(acc) * out.to(acc)).sum(-1)  # rowsum(dO * O): the softmax-backward row term
        lse = torch.where(torch.isinf(lse), torch.full_like(lse, math.inf), lse)  # empty rows: p = 0
        dq = _zeros_seq_major((b, hk, r, sq, d), acc, q.device)
        dk = _zeros_seq_major((b, hk, sk, d), acc, q.device)
        dv = _zeros_seq_major((b, hk, sk, d), acc, q.device)
        for s0 in range(0, sq, ctx.block_size):
            s1 = min(sq, s0 + ctx.block_size)
            k0, k1 = _block_keys(s0, s1, off, sk, window_left)
            if k1 == k0:
                continue
            qb, dob = qg[:, :, :, s0:s1].to(acc), dog[:, :, :, s0:s1].to(acc)
            p = _block_scores(qb, k, s0, s1, k0, k1, off, window_left, scale)
            p = p.sub_(lse[:, :, :, s0:s1, None]).exp_()  # [b, hkv, r, B, span]
            dv[:, :, k0:k1] += torch.matmul(p.transpose(-1, -2), dob).sum(2)
            dp = torch.matmul(dob, v[:, :, None, k0:k1].to(acc).transpose(-1, -2))
            ds = p.mul_(dp.sub_(delta[:, :, :, s0:s1, None]))
            dq[:, :, :, s0:s1] = torch.matmul(ds, k[:, :, None, k0:k1].to(acc)) * scale
            dk[:, :, k0:k1] += torch.matmul(ds.transpose(-1, -2), qb).sum(2) * scale
        return dq.view(b, hq, sq, d).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def window_attention_blockwise(q: Tensor, k: Tensor, v: Tensor, window_left: Optional[int], scale: float,
                               block_size: int = 256) -> Tensor:
    """Exact causal sliding-window attention, memory linear in sequence length, on any device.

    Why: the CPU path for GRIN's window (and the GPU path when FlexAttention cannot compile). A query
    block of B rows attends at most B + window_left keys, so the transient scores are
    [b, hq, B, B + window_left] however long the sequence; softmax runs in fp32 (fp64 for fp64 inputs).
    GQA broadcasts each K/V head over its query heads inside the block matmul. Rows that see no key
    (possible only when sq > sk) return 0.
    """
    _check_heads(q, k)
    if window_left is not None and window_left < 0:
        raise ValueError(f"window_left must be >= 0 or None, got {window_left}")
    return _BlockwiseWindowAttention.apply(q, k, v, window_left, float(scale), int(block_size))


# ----------------------------------------------------------------------------------------------------
# sliding window on CUDA: compiled FlexAttention
# ----------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def window_block_mask(sq: int, sk: int, window_left: Optional[int], device: str):
    """Causal sliding-window BlockMask, built once per (sq, sk, window, device) and shared by all layers."""
    off = sk - sq

    def mask_mod(b, h, q_idx, kv_idx):
        pos = q_idx + off
        if window_left is None:
            return kv_idx <= pos
        return (kv_idx <= pos) & (pos - kv_idx <= window_left)

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=sq, KV_LEN=sk, device=device)


@functools.lru_cache(maxsize=1)
def compiled_flex_attention():
    """flex_attention compiled once per process.

    ``fullgraph=True``: a graph break or dynamo's recompile limit raises instead of silently running
    eager flex_attention, which is a dense O(s^2) reference. ``dynamic`` is left to torch: the first
    shape compiles static; a second sequence length recompiles once with dynamic shapes, after which
    new lengths do not recompile (training runs one shape, so one graph per grad mode).
    """
    return torch.compile(flex_attention, fullgraph=True)


def flex_window_attention(q: Tensor, k: Tensor, v: Tensor, window_left: Optional[int], scale: float,
                          compiled: bool = True) -> Tensor:
    """Causal sliding-window attention through FlexAttention; ``compiled=False`` is for CPU tests only.

    Why: the compiled kernel computes only the BlockMask's non-empty blocks, so GRIN's window of 2047
    at s = 4096 does ~3/4 of full causal attention's block work and never materialises scores; GQA is
    native. Uncompiled flex_attention is a dense math reference (O(s^2) memory, no CPU backward).
    """
    _check_heads(q, k)
    device = q.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    block_mask = window_block_mask(q.shape[-2], k.shape[-2], window_left, str(device))
    fn = compiled_flex_attention() if compiled else flex_attention
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
