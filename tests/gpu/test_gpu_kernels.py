"""Fused kernels on the GPU against their PyTorch references and float64 maths (fresh random inputs).

Tolerances are relative to magnitude (||out - ref|| / ||ref||): fp32 kernels to 1e-5, bf16 outputs to
1e-2 (one bf16 ulp is 2^-8 relative). Routing picks may differ only where two Gumbel scores tie to
within an ulp (the kernel's log/exp vs torch's), so at most 0.1 % of the tokens.
"""

import pytest
import torch
from gpu_testing import generator, rel_err, size

from megatron_grin.ops import grouped_gemm as gg
from megatron_grin.ops import jitter as jitter_ops
from megatron_grin.ops import permute as permute_ops
from megatron_grin.ops import routing as routing_ops
from megatron_grin.ops import swiglu as swiglu_ops

pytestmark = pytest.mark.gpu
BF16_REL, FP32_REL = 1e-2, 1e-5


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """fp32 cases compare IEEE fp32 with float64: no TF32 in torch matmuls or the Triton GEMMs that follow it."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _tol(dtype: torch.dtype) -> float:
    return BF16_REL if dtype == torch.bfloat16 else FP32_REL


def _key(tokens: int, device, seed: int, stream: int = 0) -> routing_ops.RoutingKey:
    ids = torch.randint(0, 2**40, (tokens,), generator=generator(device, seed), device=device)
    return routing_ops.RoutingKey(ids, seed=0xC0FFEE + seed, iteration=3 + seed, layer_number=7,
                                  microbatch=seed % 3, stream=stream)


def _on_cpu(key: routing_ops.RoutingKey) -> routing_ops.RoutingKey:
    return routing_ops.RoutingKey(key.token_ids.cpu(), key.seed, key.iteration, key.layer_number, key.microbatch,
                                  key.stream)


# --- routing ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k,experts,training,variant", [
    (2, 16, True, "sparsemixer_v2"), (2, 16, False, "sparsemixer_v2"), (1, 7, True, "sparsemixer_v2_star"),
    (4, 64, True, "sparsemixer_v2")])
def test_routing_kernel_matches_the_float64_reference(device, top_k, experts, training, variant):
    tokens = size(device, 16384, 96)
    logits = torch.randn(tokens, experts, generator=generator(device, top_k), device=device) * 2
    key = _key(tokens, device, seed=top_k)
    z = logits.clone().requires_grad_()
    w, e, stats = routing_ops.sparsemixer_routing(z, 0.01, top_k, training, key, variant, backend="triton")
    z_ref = logits.double().cpu().requires_grad_()
    w_ref, e_ref, stats_ref = routing_ops.sparsemixer_routing(z_ref, 0.01, top_k, training, _on_cpu(key), variant,
                                                              backend="torch")
    assert w.device == device and e.device == device
    same = (e.cpu() == e_ref).all(dim=1)
    assert same.float().mean().item() >= 0.999, f"{(~same).sum().item()} of {tokens} tokens picked differently"
    assert rel_err(w.cpu()[same], w_ref[same]) < FP32_REL
    for name in stats_ref:
        assert torch.equal(stats[name].cpu().bool()[same], stats_ref[name].bool()[same]), name
    g = torch.randn(tokens, top_k, generator=generator(device, 5), device=device)
    (w * g).sum().backward()
    (w_ref * g.double().cpu()).sum().backward()
    assert rel_err(z.grad.cpu()[same], z_ref.grad[same]) < FP32_REL


# --- permute / unpermute -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_permute_kernels_match_the_reference(device, dtype):
    tokens, hidden, experts, top_k = size(device, 16384, 64), size(device, 4096, 64), 16, 2
    g = generator(device, 11)
    x = torch.randn(tokens, hidden, generator=g, device=device).to(dtype)
    picks = torch.rand(tokens, experts, generator=g, device=device).topk(top_k, dim=1).indices
    probs = torch.rand(tokens, top_k, generator=g, device=device)
    grad = torch.randn(tokens, hidden, generator=g, device=device).to(dtype)
    scale_E = torch.linspace(0.5, 2.0, experts, device=device)  # a per-expert "expert": rows scaled by s[e]
    out = {}
    for backend in ("triton", "torch"):
        xi, pi = x.clone().requires_grad_(), probs.clone().requires_grad_()
        rows, row_map, counts = permute_ops.permute_tokens(xi, picks, experts, backend=backend)
        expert_of_row = torch.repeat_interleave(torch.arange(experts, device=device), counts, output_size=tokens * top_k)
        y = permute_ops.unpermute_tokens(rows * scale_E[expert_of_row, None].to(dtype), row_map, pi, backend=backend)
        y.backward(grad)
        out[backend] = (rows.detach(), row_map, counts, y.detach(), xi.grad, pi.grad)
    kern, ref = out["triton"], out["torch"]
    assert torch.equal(kern[0], ref[0]) and torch.equal(kern[1], ref[1]) and torch.equal(kern[2], ref[2])
    for a, b in zip(kern[3:], ref[3:]):
        assert rel_err(a, b) < _tol(dtype)
    # float64 maths: out[t] = sum_k probs[t, k] * s[picks[t, k]] * x[t]
    factor = (probs.double() * scale_E.double()[picks]).sum(1, keepdim=True)
    assert rel_err(kern[3], factor * x.double()) < _tol(dtype)
    assert rel_err(kern[5], (scale_E.double()[picks] * (x.double() * grad.double()).sum(1, keepdim=True))) < _tol(dtype)


# --- input jitter ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_input_jitter_kernel_matches_the_reference(device, dtype):
    tokens, hidden = size(device, 8192, 32), size(device, 4096, 48)
    x = torch.randn(tokens, hidden, generator=generator(device, 3), device=device).to(dtype)
    key = jitter_ops.jitter_key(_key(tokens, device, 4).token_ids, seed=9, iteration=2, layer_number=3, microbatch=1)
    outs = {}
    for backend in ("triton", "torch"):
        xi = x.clone().requires_grad_()
        y = jitter_ops.input_jitter(xi, 0.01, key, backend=backend)
        y.backward(torch.ones_like(y))
        outs[backend] = (y.detach(), xi.grad)
    ulp = torch.finfo(dtype).eps * 2  # CPU interpreter truncates fp32 -> bf16: one ulp; CUDA agrees bit for bit
    for a, b in zip(outs["triton"], outs["torch"]):
        assert ((a.double() - b.double()).abs() <= ulp * b.double().abs()).all()
    noise = outs["torch"][1].double()  # d(x * noise)/dx = noise, in U(0.99, 1.01)
    assert noise.min() >= 0.99 - 1e-2 and noise.max() <= 1.01 + 1e-2 and abs(noise.mean().item() - 1) < 1e-3


# --- weighted SwiGLU ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weighted_swiglu_kernel_matches_float64(device, dtype):
    rows, ffn = size(device, 16384, 40), size(device, 6400, 24)
    g = generator(device, 21)
    h = torch.randn(rows, 2 * ffn, generator=g, device=device).to(dtype)
    p = torch.rand(rows, generator=g, device=device)
    dy = torch.randn(rows, ffn, generator=g, device=device).to(dtype)
    hk, pk = h.clone().requires_grad_(), p.clone().requires_grad_()
    yk = swiglu_ops.weighted_swiglu(hk, pk, backend="triton")
    yk.backward(dy)
    h64, p64 = h.double().requires_grad_(), p.double().requires_grad_()
    gate, up = h64.chunk(2, dim=-1)
    y64 = torch.nn.functional.silu(gate) * up * p64[:, None]
    y64.backward(dy.double())
    assert yk.dtype == dtype and yk.device == device
    assert rel_err(yk, y64) < _tol(dtype)
    assert rel_err(hk.grad, h64.grad) < _tol(dtype)
    assert rel_err(pk.grad, p64.grad) < _tol(dtype)
    yt = swiglu_ops.torch_weighted_swiglu(h, p)  # the reference path on the same device
    assert rel_err(yk, yt) < _tol(dtype)


# --- grouped GEMM ------------------------------------------------------------------------------------------
def _counts(device, rows: int, experts: int) -> torch.Tensor:
    """Random per-expert row counts summing to rows, with some experts empty."""
    g = generator(device, 31)
    weights = torch.rand(experts, generator=g, device=device) * (torch.rand(experts, generator=g, device=device) > 0.25)
    weights[0] = 1.0
    counts = (weights / weights.sum() * rows).floor().long()
    counts[0] += rows - counts.sum()
    return counts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_gemm_kernels_match_float64(device, dtype):
    experts, rows = 16, size(device, 8192, 48)
    inp, outp = size(device, 2048, 32), size(device, 2560, 40)
    g = generator(device, 41)
    counts = _counts(device, rows, experts)
    offsets = gg.offsets_from_counts(counts)
    x = torch.randn(rows, inp, generator=g, device=device).to(dtype)
    w = (torch.randn(experts, outp, inp, generator=g, device=device) / inp**0.5).to(dtype)
    dy = torch.randn(rows, outp, generator=g, device=device).to(dtype)
    bounds = [0, *torch.cumsum(counts, 0).tolist()]

    def per_expert(fn):
        return torch.cat([fn(e, slice(bounds[e], bounds[e + 1])) for e in range(experts)])

    y64 = per_expert(lambda e, r: x.double()[r] @ w.double()[e].T)
    y = gg.grouped_mm(x, w, offsets, trans_w=True, backend="triton")
    assert y.dtype == dtype and rel_err(y, y64) < _tol(dtype)
    dx64 = per_expert(lambda e, r: dy.double()[r] @ w.double()[e])
    dx = gg.grouped_mm(dy, w, offsets, trans_w=False, backend="triton")
    assert rel_err(dx, dx64) < _tol(dtype)
    dw64 = torch.stack([dy.double()[bounds[e]:bounds[e + 1]].T @ x.double()[bounds[e]:bounds[e + 1]]
                        for e in range(experts)])
    acc = torch.ones(experts, outp, inp, device=device)  # fp32 accumulation into an existing main_grad
    gg.grouped_wgrad(dy, x, offsets, out=acc, accumulate=True, backend="triton")
    assert rel_err(acc - 1, dw64) < _tol(dtype)
    assert bool((acc[counts == 0] == 1).all())  # empty experts add nothing
    xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
    yl = gg.grouped_linear(xi, wi, offsets, backend="triton")
    yl.backward(dy)
    assert rel_err(yl, y64) < _tol(dtype) and rel_err(xi.grad, dx64) < _tol(dtype)
    assert rel_err(wi.grad, dw64) < _tol(dtype)
