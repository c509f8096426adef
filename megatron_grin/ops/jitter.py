"""GRIN's input jitter ``x * U(1 - eps, 1 + eps)`` from counter-based draws, as one fused op.

Why: the noise must be the same for the same token on every TP rank, in every DP/TP/PP layout, and when
activation recomputation replays the forward. A stateful generator seeded per micro-batch gave each DP
rank its own stream and made every TP rank draw the noise of the whole sequence only to keep its own
slice. Here every element's noise is a pure function of what it is for, like the routing uniforms
(``model/routing_rng.py``), so each rank draws only its own tokens and the backward recomputes the noise
instead of saving it.

Draws: element h of token t takes byte h % 4 (little-endian) of word (h % 16) // 4 of the Philox4x32-10
block with counters (token_id, h // 16, layer_number * 4 + STREAM_INPUT_JITTER, microbatch) and key
(seed, iteration): ``routing_rng``'s layout on its own stream. The 8-bit code c gives, in fp32,
``noise = 1 + (c - 127.5) * (eps / 127.5)``: 256 levels symmetric around 1 (mean exactly 1; a step of
7.8e-5 at GRIN's eps = 0.01, finer than bf16's spacing near 1), and 16 elements per Philox call, which
keeps the CPU reference about as cheap as the generator it replaces. ``y = x * noise`` in fp32, rounded
once to x's dtype; the gradient is ``dy * noise`` the same way. The kernel and the reference compute the
same fp32 operations in the same order (the kernel without FMA contraction), so they agree bit for bit
(under the CPU interpreter, to a bf16 ulp: it truncates fp32 -> bf16 instead of rounding).

Shapes: T tokens, H hidden.
"""

from __future__ import annotations

import torch

from megatron_grin.model import routing_rng
from megatron_grin.ops.backend import HAVE_TRITON, use_triton
from megatron_grin.ops.routing import RoutingKey

if HAVE_TRITON:
    import triton
    import triton.language as tl

_M32 = 0xFFFFFFFF
BYTES_PER_BLOCK = 16  # 4 Philox words x 4 bytes
#: Chunks of the CPU reference. Philox: its int64 temporaries stay in cache (3x faster than one pass over
#: 0.5M blocks); the noise: fewer, larger chunks (1 MiB of fp32) halve the per-op dispatch cost.
_CPU_CHUNK_BLOCKS = 1 << 15
_CPU_CHUNK_ELEMENTS = 1 << 18


def jitter_key(token_ids: torch.Tensor, *, seed: int, iteration: int, layer_number: int,
               microbatch: int) -> RoutingKey:
    """The key of one layer's jitter in one micro-batch (routing_rng's counters, the input-jitter stream)."""
    return RoutingKey(token_ids, seed, iteration, layer_number, microbatch, stream=routing_rng.STREAM_INPUT_JITTER)


def _scale(eps: float) -> float:
    """eps / 127.5 as the float32 both implementations multiply by (a Python float holding the fp32 value)."""
    return float(torch.tensor(eps / 127.5, dtype=torch.float32))


def _check(x_TH: torch.Tensor, eps: float, key: RoutingKey) -> None:
    if x_TH.dim() != 2:
        raise ValueError(f"jitter input must be [tokens, hidden], got shape {tuple(x_TH.shape)}")
    if key.token_ids.shape != (x_TH.shape[0],):
        raise ValueError(f"token_ids must be [{x_TH.shape[0]}], got {tuple(key.token_ids.shape)}")
    if not 0 <= eps < 1:
        raise ValueError(f"jitter eps must be in [0, 1), got {eps}")


# ------------------------------------------------------------------------------------------------
# torch reference (the CPU path)
# ------------------------------------------------------------------------------------------------
def jitter_codes(key: RoutingKey, hidden: int) -> torch.Tensor:
    """The 8-bit codes [T, hidden] (uint8, on the token ids' device)."""
    tokens = key.token_ids.numel()
    blocks = -(-hidden // BYTES_PER_BLOCK)
    device = key.token_ids.device
    words = torch.empty(tokens, blocks, 4, dtype=torch.int32, device=device)  # its bytes are the codes
    lanes = torch.arange(blocks, device=device, dtype=torch.int64).view(1, -1)
    rows = max(1, _CPU_CHUNK_BLOCKS // blocks) if device.type == "cpu" else max(tokens, 1)
    for start in range(0, tokens, rows):
        tok = key.token_ids[start:start + rows].to(torch.int64).view(-1, 1)
        drawn = routing_rng.philox4x32(tok, lanes, key.layer_number * 4 + key.stream, key.microbatch,
                                       key.seed, key.iteration)
        for w, word in enumerate(drawn):  # uint32 values in int64 -> int32 keeps the low 32 bits (two's complement)
            words[start:start + tok.shape[0], :, w] = word
    return words.view(torch.uint8).view(tokens, blocks * BYTES_PER_BLOCK)[:, :hidden]  # little-endian bytes


def apply_codes(x_TH: torch.Tensor, codes_TH: torch.Tensor, eps: float) -> torch.Tensor:
    """x * noise(codes) in fp32, rounded once to x's dtype; row chunks on CPU (no fp32 copy of x)."""
    scale = _scale(eps)
    out = torch.empty_like(x_TH, memory_format=torch.contiguous_format)
    tokens, hidden = x_TH.shape
    rows = max(1, _CPU_CHUNK_ELEMENTS // max(hidden, 1)) if x_TH.device.type == "cpu" else max(tokens, 1)
    for start in range(0, tokens, rows):
        part = slice(start, start + rows)
        noise = codes_TH[part].to(torch.float32).sub_(127.5).mul_(scale).add_(1.0)
        torch.mul(x_TH[part], noise, out=out[part])  # computed in fp32 (type promotion), rounded once on store
    return out


class _TorchJitter(torch.autograd.Function):
    """Reference: saves the 8-bit codes (1 byte per element) and rebuilds the noise in backward."""

    @staticmethod
    def forward(ctx, x_TH, eps, key):
        codes = jitter_codes(key, x_TH.shape[1])
        ctx.save_for_backward(codes)
        ctx.eps = eps
        return apply_codes(x_TH, codes, eps)

    @staticmethod
    def backward(ctx, grad_TH):
        (codes,) = ctx.saved_tensors
        return apply_codes(grad_TH, codes, ctx.eps), None, None


# ------------------------------------------------------------------------------------------------
# Triton kernel: one program per (BLOCK_T tokens, BLOCK_G Philox blocks of 16 elements)
# ------------------------------------------------------------------------------------------------
if HAVE_TRITON:

    @triton.jit
    def _jitter_kernel(src_ptr, token_ids_ptr, dst_ptr, T, H, stride_src, stride_dst, philox_key, c2, c3, scale,
                       BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr):
        """dst[t, h] = src[t, h] * (1 + (code(t, h) - 127.5) * scale), fp32 inside, rounded once."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        groups = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
        row_ok = rows < T
        tok = tl.load(token_ids_ptr + rows, mask=row_ok, other=0)
        zero = tl.zeros([BLOCK_T, BLOCK_G], tl.uint32)
        r0, r1, r2, r3 = tl.philox(philox_key, zero + tok.to(tl.uint32)[:, None], zero + groups.to(tl.uint32)[None, :],
                                   zero + c2, zero + c3)
        # join appends its new axis last: [..., i, j] = join(r0, r2)[i] if j == 0 else join(r1, r3)[i], so the
        # row-major flattening is r0 r1 r2 r3 per block
        words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK_T, BLOCK_G * 4])
        shifts = (tl.arange(0, 4) * 8).to(tl.uint32)
        codes = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & 0xFF, [BLOCK_T, BLOCK_G * 16])
        noise = (codes.to(tl.float32) - 127.5) * scale + 1.0
        cols = tl.program_id(1) * (BLOCK_G * 16) + tl.arange(0, BLOCK_G * 16)
        mask = row_ok[:, None] & (cols < H)[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(src_ptr + rows64[:, None] * stride_src + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dst_ptr + rows64[:, None] * stride_dst + cols[None, :], (x * noise).to(dst_ptr.dtype.element_ty),
                 mask=mask)


def _signed32(value: int) -> int:
    """A uint32 counter word as the int32 Triton passes to tl.philox (bitcast back inside)."""
    value &= _M32
    return value - (1 << 32) if value >= 1 << 31 else value


def triton_apply_jitter(x_TH: torch.Tensor, eps: float, key: RoutingKey) -> torch.Tensor:
    """Launch the kernel: x * noise [T, H] in x's dtype (forward, and backward on the gradient)."""
    x = x_TH if x_TH.stride(-1) == 1 else x_TH.contiguous()
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    tokens, hidden = x.shape
    if tokens and hidden:
        block_t, block_g = 16, 16
        token_ids = key.token_ids.to(device=x.device, dtype=torch.int64).contiguous()
        philox_key = ((key.iteration & _M32) << 32) | (key.seed & _M32)  # Triton: k0 = low, k1 = high word
        grid = (triton.cdiv(tokens, block_t), triton.cdiv(hidden, block_g * BYTES_PER_BLOCK))
        _jitter_kernel[grid](x, token_ids, out, tokens, hidden, x.stride(0), out.stride(0), philox_key,
                             _signed32(key.layer_number * 4 + key.stream), _signed32(key.microbatch), _scale(eps),
                             BLOCK_T=block_t, BLOCK_G=block_g, enable_fp_fusion=False)  # no FMA: as the reference
    return out


class _TritonJitter(torch.autograd.Function):
    """Forward and backward are the same kernel (multiply by the noise), which is recomputed, not saved."""

    @staticmethod
    def forward(ctx, x_TH, eps, key):
        ctx.eps, ctx.key = eps, key
        return triton_apply_jitter(x_TH, eps, key)

    @staticmethod
    def backward(ctx, grad_TH):
        return triton_apply_jitter(grad_TH, ctx.eps, ctx.key), None, None


def input_jitter(x_TH: torch.Tensor, eps: float, key: RoutingKey, backend: str = "auto") -> torch.Tensor:
    """``x * U(1 - eps, 1 + eps)`` per element, keyed by (key, token, hidden index); differentiable in x."""
    _check(x_TH, eps, key)
    if use_triton(x_TH, backend, "input jitter"):
        return _TritonJitter.apply(x_TH, float(eps), key)
    return _TorchJitter.apply(x_TH, float(eps), key)
