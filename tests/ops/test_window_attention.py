"""The attention kernels of ops/window_attention.py against the dense float64 reference, their saved
activations and peak memory (linear in s), and on CUDA the compiled FlexAttention and SDPA's kernels.

The megatron module that dispatches to them is tested in tests/model/test_attention.py.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from megatron_grin.ops import window_attention as wa

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import attention_memory  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _inputs(b, hq, hk, sq, sk, d, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    make = lambda h, s: torch.randn(b, h, s, d, generator=g, dtype=torch.float64).to(device, dtype)  # noqa: E731
    return tuple(t.requires_grad_() for t in (make(hq, sq), make(hk, sk), make(hk, sk)))


def _out_and_grads(fn, q, k, v, seed=1):
    out = fn(q, k, v)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return out, torch.autograd.grad(out, (q, k, v), grad_out.to(out.device, out.dtype))


def _errors(fn, q, k, v, window, scale, causal=True):
    """(max abs error, relative error) of the output and of dq/dk/dv against the float64 reference."""
    out, grads = _out_and_grads(fn, q, k, v)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_grads = _out_and_grads(lambda a, b, c: wa.window_attention_reference(a, b, c, window, scale, causal),
                                    *leaves)
    pairs = [(out, ref), *zip(grads, ref_grads)]
    abs_err = [(a.double() - r).abs().max().item() for a, r in pairs]
    rel_err = [((a.double() - r).norm() / r.norm()).item() for a, r in pairs]
    return abs_err, rel_err


TOL = {torch.float64: 1e-12, torch.float32: 2e-5}
RATIOS = [(8, 8), (8, 2), (8, 1)]  # GQA: 1, 4 and 8 query heads per K/V head


# ---------------------------------------------------------------------------------------------------
# kernels against the float64 reference
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("window", [None, 3, 16, 60])
@pytest.mark.parametrize("hq,hk", RATIOS)
def test_blockwise_exact(dtype, window, hq, hk):
    """45 tokens in blocks of 8: windows shorter than the sequence straddle block edges; 60 covers all."""
    q, k, v = _inputs(2, hq, hk, 45, 45, 16, dtype)
    abs_err, _ = _errors(lambda a, b, c: wa.window_attention_blockwise(a, b, c, window, 0.3, block_size=8),
                         q, k, v, window, 0.3)
    assert abs_err[0] < TOL[dtype] and max(abs_err[1:]) < 4 * TOL[dtype], abs_err


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("sq,sk", [(1, 30), (7, 30)])
def test_blockwise_kv_cache_chunk_is_bottom_right_aligned(window, sq, sk):
    """sq != sk (decode, a prefill chunk): query row i sits at position i + sk - sq, as in megatron."""
    q, k, v = _inputs(1, 4, 2, sq, sk, 8, torch.float64)
    abs_err, _ = _errors(lambda a, b, c: wa.window_attention_blockwise(a, b, c, window, 0.5, block_size=4),
                         q, k, v, window, 0.5)
    assert max(abs_err) < 1e-12, abs_err


def test_blockwise_gradcheck():
    q, k, v = _inputs(1, 4, 2, 11, 11, 3, torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, c: wa.window_attention_blockwise(a, b, c, 2, 0.7, block_size=4),
                                    (q, k, v))


def test_blockwise_rows_without_keys_are_zero():
    q, k, v = _inputs(1, 2, 1, 6, 3, 4, torch.float64)  # sq > sk: rows 0..2 precede every key
    out = wa.window_attention_blockwise(q, k, v, None, 1.0, block_size=2)
    assert torch.all(out[:, :, :3] == 0) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_blockwise_output_is_stored_sequence_major():
    """[b, h, s, d] stored as [s, b, h, d]: the module's reshape to [s, b, h * d] is then a view."""
    q, k, v = _inputs(2, 4, 2, 9, 9, 8, torch.float32)
    out = wa.window_attention_blockwise(q, k, v, 3, 0.5, block_size=4)
    assert out.permute(2, 0, 1, 3).is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hq,hk", RATIOS)
def test_sdpa_exact(dtype, hq, hk):
    q, k, v = _inputs(2, hq, hk, 40, 40, 16, dtype)
    abs_err, _ = _errors(lambda a, b, c: wa.sdpa_attention(a, b, c, 0.25), q, k, v, None, 0.25)
    assert abs_err[0] < 5 * TOL[dtype] and max(abs_err[1:]) < 20 * TOL[dtype], abs_err


def test_sdpa_gqa_does_not_repeat_kv_on_cpu():
    """torch's CPU flash kernel takes GQA natively: no repeat_interleave, no math fallback."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v = _inputs(1, 8, 2, 64, 64, 16, torch.float32)
    assert wa.sdpa_kernel_choice(q, k, v, causal=True) == "flash"
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wa.sdpa_attention(q, k, v, 0.25).sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names, names
    assert not {"aten::repeat_interleave", "aten::_scaled_dot_product_attention_math"} & names


@pytest.mark.parametrize("kernel", ["blockwise", "sdpa"])
@pytest.mark.parametrize("hq,hk", [(8, 2), (8, 8)])
def test_bf16_relative(kernel, hq, hk):
    """The float64 reference sees the same bf16-rounded inputs: the error is bf16 output/grad rounding."""
    q, k, v = _inputs(2, hq, hk, 48, 48, 32, torch.bfloat16)
    window = 10 if kernel == "blockwise" else None
    fn = ((lambda a, b, c: wa.window_attention_blockwise(a, b, c, 10, 0.2, block_size=16)) if kernel == "blockwise"
          else (lambda a, b, c: wa.sdpa_attention(a, b, c, 0.2)))
    _, rel_err = _errors(fn, q, k, v, window, 0.2)
    assert rel_err[0] < 1e-2 and max(rel_err[1:]) < 2e-2, rel_err


@pytest.mark.parametrize("hq,hk", [(8, 2), (8, 8)])
def test_flex_mask_matches_reference_eager_cpu(hq, hk):
    """The BlockMask's mask_mod, run by eager flex_attention (forward only on CPU), is the window."""
    q, k, v = (t.detach() for t in _inputs(1, hq, hk, 64, 64, 16, torch.float32))
    with torch.no_grad():
        out = wa.flex_window_attention(q, k, v, 9, 0.25, compiled=False)
    assert (out.double() - wa.window_attention_reference(q, k, v, 9, 0.25)).abs().max().item() < 2e-5


@pytest.mark.slow
def test_flex_compiled_forward_cpu_on_megatron_views_three_lengths():
    """The compiled path (BlockMask cache, fullgraph compile, GQA) on megatron's [s, b, h, d] split views;
    CPU flex has no backward, so forward only. Three lengths compile two graphs (the second one with
    dynamic shapes), as docs/training.md says. ~30 s of compiling."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    graphs = counters["stats"]["unique_graphs"]
    for s in (256, 300, 384):
        qkv = torch.randn(s, 2, 8 + 2 * 2, 64)
        q, k, v = (t.permute(1, 2, 0, 3) for t in torch.split(qkv, [8, 2, 2], dim=2))
        with torch.no_grad():
            out = wa.flex_window_attention(q, k, v, 37, 0.125, compiled=True)
        assert (out.double() - wa.window_attention_reference(q, k, v, 37, 0.125)).abs().max().item() < 2e-5
        assert out.permute(2, 0, 1, 3).is_contiguous()  # the output follows the query's layout
    assert counters["stats"]["unique_graphs"] - graphs == 2


# ---------------------------------------------------------------------------------------------------
# memory linear in sequence length
# ---------------------------------------------------------------------------------------------------
def test_saved_activations_are_linear_in_sequence_length():
    """Autograd keeps q, k, v, the output and an fp32 log-sum-exp per row: bytes exactly linear in s."""
    def saved_bytes(fn, s):
        q, k, v = _inputs(1, 8, 2, s, s, 16, torch.float32)
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(q, k, v)
        return sum(storages.values())

    for name, fn in {"blockwise": lambda q, k, v: wa.window_attention_blockwise(q, k, v, 31, 0.25, 64),
                     "sdpa": lambda q, k, v: wa.sdpa_attention(q, k, v, 0.25)}.items():
        for s in (256, 1024):
            expect = 4 * s * (8 * 16 + 2 * 2 * 16 + 8 * 16) + 4 * 8 * s  # q, k, v, out (fp32) + lse
            assert saved_bytes(fn, s) == expect, (name, s)


def test_window_kernel_peak_memory_is_linear():
    """Peak RSS of two stacked blockwise layers (fwd + bwd, 8 heads / 2 KV heads, window 256): 4x the
    tokens must cost < 6x the memory (quadratic: 16x). The dense control (4 heads) at 2x the tokens
    must grow > 2.5x, proving the probe sees quadratic growth."""
    rows = attention_memory.measure("kernels", "--seqs", "1024", "4096", "--kernels", "blockwise")
    rows += attention_memory.measure("kernels", "--seqs", "1024", "2048", "--kernels", "dense",
                                     "--heads", "4", "--groups", "1")
    grow = {(r["kernel"], r["seq"]): r["growth_mib"] for r in rows}
    one_score_matrix_mib = 8 * 4096 * 4096 * 4 / 2**20  # 512 MiB: one fp32 [1, 8, 4096, 4096]
    assert grow["blockwise", 4096] / grow["blockwise", 1024] < 6, grow
    assert grow["blockwise", 4096] < one_score_matrix_mib / 4, grow
    assert grow["dense", 2048] / grow["dense", 1024] > 2.5, grow


# ---------------------------------------------------------------------------------------------------
# GPU: compiled FlexAttention and SDPA's fused kernels (skipped without CUDA)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hq,hk", RATIOS)
def test_flex_compiled_matches_reference_cuda(dtype, hq, hk):  # pragma: no cover - GPU only
    q, k, v = _inputs(2, hq, hk, 1024, 1024, 64, dtype, device="cuda")
    _, rel_err = _errors(lambda a, b, c: wa.flex_window_attention(a, b, c, 300, 0.125), q, k, v, 300, 0.125)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    assert rel_err[0] < tol and max(rel_err[1:]) < 2 * tol, rel_err


@pytest.mark.gpu
@cuda
def test_sdpa_takes_gqa_in_a_fused_kernel_cuda():  # pragma: no cover - GPU only
    """GRIN's shapes in bf16 (32 q / 8 KV heads, d 128, causal): flash or cuDNN, never math."""
    q = torch.randn(2, 32, 4096, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
    assert wa.sdpa_kernel_choice(q, k, k, causal=True) in ("flash", "cuDNN", "memory-efficient")


@pytest.mark.gpu
@cuda
def test_flex_window_at_grin_shapes_cuda_in_linear_memory():  # pragma: no cover - GPU only
    """GRIN's shapes (bf16, s 4096, window 2046): compiled FlexAttention matches the blockwise kernel,
    and its peak extra memory stays far below one [b, h, s, s] tensor."""
    q, k, v = _inputs(2, 32, 8, 4096, 4096, 128, torch.bfloat16, device="cuda")
    scale = 1 / math.sqrt(128)
    _out_and_grads(lambda a, b, c: wa.flex_window_attention(a, b, c, 2046, scale), q, k, v)  # compile
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    flex, flex_grads = _out_and_grads(lambda a, b, c: wa.flex_window_attention(a, b, c, 2046, scale), q, k, v)
    torch.cuda.synchronize()
    peak_extra = torch.cuda.max_memory_allocated() - base
    block, block_grads = _out_and_grads(lambda a, b, c: wa.window_attention_blockwise(a, b, c, 2046, scale), q, k, v)
    assert peak_extra < 2**30  # one bf16 [2, 32, 4096, 4096] score tensor is 2 GiB; megatron keeps several
    for a, b in [(flex, block), *zip(flex_grads, block_grads)]:
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 2e-2
