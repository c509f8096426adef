"""Grouped GEMMs (forward, dgrad, wgrad, wgrad into fp32 main_grad): Triton kernels (CPU interpreter) vs float64.

The float64 references are per-expert ``torch.mm`` on the expert's rows, independent of the kernels.
"""

import pytest
import torch

pytest.importorskip("triton")

from megatron_grin.ops import grouped_gemm as gg  # noqa: E402
from grin_interpreter import in_interpreter  # noqa: E402

SMALL = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}
WIDER = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1}
BF16_ULP = 2.0**-7

CASES = [  # (rows per expert, in features, out features, dtype, config)
    ((0, 17, 5), 40, 48, torch.float32, SMALL),  # fc1-like: H=40 -> 2F=48; an empty first expert
    ((0, 17, 5), 40, 48, torch.bfloat16, SMALL),
    ((16, 0, 0, 33), 24, 40, torch.bfloat16, SMALL),  # fc2-like: full tiles, then tails
    ((1, 31, 0, 16, 2), 48, 40, torch.bfloat16, WIDER),  # 48 % 32 != 0: the masked-K path
    ((1, 31, 0, 16, 2), 48, 40, torch.float32, SMALL),  # EVEN_K path
    ((0, 0, 0), 40, 48, torch.float32, SMALL),  # no rows at all
]


def _inputs(counts, fin, fout, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + sum(counts) * 7 + fin)
    n, e = sum(counts), len(counts)
    x = torch.randn(n, fin, generator=g).to(dtype)
    w = (torch.randn(e, fout, fin, generator=g) / fin**0.5).to(dtype)
    dy = torch.randn(n, fout, generator=g).to(dtype)
    offsets = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)
    return x, w, dy, offsets


def _per_expert(counts, fn):
    """[fn(e, rows of e)] for every expert: the float64 references below are built from these."""
    out, start = [], 0
    for e, n in enumerate(counts):
        out.append(fn(e, slice(start, start + n)))
        start += n
    return out


def _references(counts, x, w, dy):
    """float64 (fwd, dgrad, wgrad) and the sums of |terms| that bound their rounding."""
    x64, w64, dy64 = x.double(), w.double(), dy.double()
    rows = lambda fn: torch.cat(_per_expert(counts, fn)) if sum(counts) else torch.zeros(0, 1, dtype=torch.float64)
    fwd = rows(lambda e, r: x64[r] @ w64[e].t())
    fwd_b = rows(lambda e, r: x64[r].abs() @ w64[e].abs().t())
    dgrad = rows(lambda e, r: dy64[r] @ w64[e])
    dgrad_b = rows(lambda e, r: dy64[r].abs() @ w64[e].abs())
    wgrad = torch.stack(_per_expert(counts, lambda e, r: dy64[r].t() @ x64[r]))
    wgrad_b = torch.stack(_per_expert(counts, lambda e, r: dy64[r].abs().t() @ x64[r].abs()))
    return (fwd, fwd_b), (dgrad, dgrad_b), (wgrad, wgrad_b)


def _excess(got, ref_bound, dtype) -> float:
    ref, bound = ref_bound
    got = got.double()
    if got.numel() == 0:
        return -1.0
    ref = ref.reshape(got.shape)
    bound = bound.reshape(got.shape)
    tol = (BF16_ULP * ref.abs() + 2.0**-16 * bound) if dtype == torch.bfloat16 else 2.0**-18 * bound + 1e-30
    return ((got - ref).abs() - tol).max().item()


def _gemm_case(case):
    counts, fin, fout, dtype, config = case
    x, w, dy, offsets = _inputs(counts, fin, fout, dtype)
    y = gg.triton_grouped_mm(x, w, offsets, trans_w=True, config=config)
    dx = gg.triton_grouped_mm(dy, w, offsets, trans_w=False, config=config)
    dw = gg.triton_grouped_wgrad(dy, x, offsets, config=config)
    fwd, dgrad, wgrad = _references(counts, x, w, dy)
    empty = [e for e, n in enumerate(counts) if n == 0]
    return {"dtypes": y.dtype == dx.dtype == dw.dtype == dtype,
            "shapes": (tuple(y.shape), tuple(dx.shape), tuple(dw.shape)) == (
                (sum(counts), fout), (sum(counts), fin), (len(counts), fout, fin)),
            "fwd": _excess(y, fwd, dtype), "dgrad": _excess(dx, dgrad, dtype), "wgrad": _excess(dw, wgrad, dtype),
            "empty_experts_zero": all(not dw[e].any() for e in empty)}


def _accumulate_case(dtype):
    """wgrad added into an fp32 main_grad twice: start + 2 * dw, an empty expert untouched bit for bit."""
    counts = (9, 0, 20, 3)
    x, _, dy, offsets = _inputs(counts, 40, 24, dtype, seed=5)
    start = torch.randn(len(counts), 24, 40, generator=torch.Generator().manual_seed(9))
    buf = start.clone()
    same = gg.triton_grouped_wgrad(dy, x, offsets, out=buf, accumulate=True, config=SMALL)
    gg.triton_grouped_wgrad(dy, x, offsets, out=buf, accumulate=True, config=SMALL)
    _, _, (one, bound) = _references(counts, x, torch.zeros(len(counts), 24, 40, dtype=dtype), dy)
    excess = _excess(buf, (start.double() + 2 * one, 2 * bound + start.double().abs()), torch.float32)
    return {"in_place": same.data_ptr() == buf.data_ptr(), "excess": excess,
            "empty_untouched": torch.equal(buf[1], start[1]), "fp32": buf.dtype == torch.float32}


def _linear_case():
    """grouped_linear: triton == float64 autograd; with gradient_accumulation_fusion the wgrad goes to main_grad."""
    counts = (5, 0, 19)
    x, w, dy, offsets = _inputs(counts, 40, 48, torch.float32, seed=2)
    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = gg.grouped_linear(xk, wk, offsets, backend="triton", config=SMALL)
    y.backward(dy)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    ref_y = torch.cat(_per_expert(counts, lambda e, r: x64[r] @ w64[e].t()))
    ref_y.backward(dy.double())
    errs = [(a.double() - b).abs().max().item() for a, b in ((y.detach(), ref_y.detach()), (xk.grad, x64.grad),
                                                             (wk.grad, w64.grad))]

    weight = torch.nn.Parameter(w.bfloat16())  # megatron: main_grad fp32, grad_added_to_main_grad set by DDP
    weight.main_grad = torch.ones(w.shape)
    weight.grad_added_to_main_grad = False
    for _ in range(2):
        gg.grouped_linear(x.bfloat16(), weight, offsets, backend="triton", gradient_accumulation_fusion=True,
                          config=SMALL).backward(dy.bfloat16())
    ref = 1 + 2 * torch.stack(_per_expert(counts, lambda e, r: dy.bfloat16().double()[r].t() @ x.bfloat16().double()[r]))
    fused_err = (weight.main_grad.double() - ref).abs().max().item()
    plain = torch.nn.Parameter(w.clone())  # main_grad but no DDP flag: the wgrad still goes to main_grad, grad None
    plain.main_grad = torch.zeros(w.shape)
    gg.grouped_linear(x, plain, offsets, backend="triton", gradient_accumulation_fusion=True, config=SMALL).backward(dy)
    return {"errs": errs, "fused_err": fused_err, "flag_set": bool(weight.grad_added_to_main_grad),
            "dummy_grad": weight.grad is not None and weight.grad.shape == w.shape,
            "plain": (plain.grad is None, bool(plain.main_grad.abs().sum() > 0))}


def _all_checks():
    return {"cases": {_case_id(case): _gemm_case(case) for case in CASES},
            "accumulate": {dtype: _accumulate_case(dtype) for dtype in (torch.bfloat16, torch.float32)},
            "linear": _linear_case()}


@pytest.fixture(scope="module")
def interpreted():
    return in_interpreter(_all_checks)


def _case_id(c):
    return "E{}-n{}-I{}-O{}-{}-bm{}".format(len(c[0]), "_".join(map(str, c[0])), c[1], c[2], str(c[3])[6:],
                                              c[4]["BLOCK_M"])


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_grouped_gemms_match_float64(interpreted, case):
    r = interpreted["cases"][_case_id(case)]
    assert r["dtypes"] and r["shapes"] and r["empty_experts_zero"], r
    for name in ("fwd", "dgrad", "wgrad"):
        assert r[name] <= 0, (name, r)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_wgrad_accumulates_into_fp32_main_grad(interpreted, dtype):
    r = interpreted["accumulate"][dtype]
    assert r["in_place"] and r["empty_untouched"] and r["fp32"] and r["excess"] <= 0, r


def test_grouped_linear_autograd_and_gradient_accumulation_fusion(interpreted):
    r = interpreted["linear"]
    assert max(r["errs"]) < 1e-4, r
    assert r["fused_err"] < 1e-3 and r["flag_set"] and r["dummy_grad"], r
    assert r["plain"] == (True, True)


def test_reference_matches_dense_mm_per_expert_and_validation():
    x, w, dy, offsets = _inputs((3, 0, 4), 8, 6, torch.float32)
    y = gg.torch_grouped_mm(x, w, offsets)
    torch.testing.assert_close(y[:3], x[:3] @ w[0].T)
    torch.testing.assert_close(y[3:], x[3:] @ w[2].T)
    dw = gg.torch_grouped_wgrad(dy, x, offsets)
    assert not dw[1].any()
    torch.testing.assert_close(dw[2], dy[3:].T @ x[3:])
    assert torch.equal(gg.grouped_mm(x, w, offsets), y)  # auto on CPU = torch
    with pytest.raises(ValueError, match="features"):
        gg.grouped_mm(x[:, :5], w, offsets)
    with pytest.raises(ValueError, match="offsets"):
        gg.grouped_mm(x, w, offsets[:2])
    with pytest.raises(ValueError, match="accumulate"):
        gg.grouped_wgrad(dy, x, offsets, accumulate=True)
    with pytest.raises(ValueError, match="backend"):
        gg.grouped_mm(x, w, offsets, backend="cutlass")
    assert torch.equal(gg.offsets_from_counts(torch.tensor([3, 0, 4])), offsets)


def test_grouped_linear_reference_gradcheck_float64():
    x, w, _, offsets = _inputs((2, 0, 3), 4, 3, torch.float64)
    x.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: gg.grouped_linear(a, b, offsets, backend="torch"), (x, w))
