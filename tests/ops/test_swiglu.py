"""Weighted SwiGLU (silu(gate) * up * prob): the Triton kernels (CPU interpreter) against float64 references.

The float64 reference here is independent of the code under test: autograd through the plain formula.
"""

import pytest
import torch

pytest.importorskip("triton")

from megatron_grin.ops import swiglu as sw  # noqa: E402
from grin_interpreter import in_interpreter  # noqa: E402

BF16_ULP = 2.0**-7  # one bf16 ulp is at most 2^-7 of the value

CASES = [  # (rows, ffn, dtype, probs dtype, block_f)
    (1, 24, torch.float32, torch.float32, None),
    (37, 24, torch.bfloat16, torch.float32, None),
    (37, 24, torch.bfloat16, torch.float32, 16),  # a column tail inside the backward's column loop
    (19, 5, torch.float32, torch.float32, None),  # odd ffn
    (6, 1100, torch.bfloat16, torch.bfloat16, None),  # two column blocks of 1024, bf16 probs
    (0, 24, torch.bfloat16, torch.float32, None),
]


def _inputs(rows, ffn, dtype, pdtype, seed=0):
    g = torch.Generator().manual_seed(seed + rows * 31 + ffn)
    h = (torch.randn(rows, 2 * ffn, generator=g) * 2).to(dtype)
    p = torch.rand(rows, generator=g).to(pdtype)
    dy = torch.randn(rows, ffn, generator=g).to(dtype)
    return h, p, dy


def _float64_reference(h, p, dy):
    """Autograd through silu(gate) * up * p in float64: (out, grad h, grad p)."""
    h64, p64 = h.double().requires_grad_(), p.double().requires_grad_()
    gate, up = h64.chunk(2, dim=-1)
    out = torch.nn.functional.silu(gate) * up * p64.unsqueeze(-1)
    out.backward(dy.double())
    return out.detach(), h64.grad, p64.grad


def _excess(got, ref, bound, dtype) -> float:
    """max(|got - ref| - tol), tol = one output ulp (bf16) + a summation error relative to ``bound``."""
    got, ref, bound = got.double(), ref.double(), bound.double()
    tol = (BF16_ULP * ref.abs() + 2.0**-16 * bound) if dtype == torch.bfloat16 else 2.0**-18 * bound + 1e-30
    return ((got - ref).abs() - tol).max().item() if got.numel() else -1.0


def _kernel_case(case):
    rows, ffn, dtype, pdtype, block_f = case
    h, p, dy = _inputs(rows, ffn, dtype, pdtype)
    hk, pk = h.clone().requires_grad_(), p.clone().requires_grad_()
    y = sw.triton_weighted_swiglu(hk, pk, block_f=block_f)
    y.backward(dy)
    ref_y, ref_gh, ref_gp = _float64_reference(h, p, dy)
    gate, up = h.double().chunk(2, dim=-1)
    terms = (dy.double().abs() * (torch.nn.functional.silu(gate) * up).abs()).sum(-1)
    return {"dtypes": (y.dtype, hk.grad.dtype, pk.grad.dtype) == (dtype, dtype, pdtype),
            "out": _excess(y.detach(), ref_y, ref_y.abs(), dtype),
            "grad_h": _excess(hk.grad, ref_gh, ref_gh.abs(), dtype),
            "grad_p": _excess(pk.grad, ref_gp, terms * 8, pdtype)}


def _in_place_case():
    """The in-place backward writes fc1's gradient over fc1's output, equals the out-of-place one, runs once."""
    h, p, dy = _inputs(21, 24, torch.bfloat16, torch.float32, seed=3)
    ref_h, ref_p = h.clone().requires_grad_(), p.clone().requires_grad_()
    sw.weighted_swiglu(ref_h, ref_p, backend="triton").backward(dy)
    leaf, pk = h.clone().requires_grad_(), p.clone().requires_grad_()
    fc1_out = leaf * 1  # a non-leaf, as in the MLP
    y = sw.weighted_swiglu(fc1_out, pk, backend="triton", in_place_grad=True)
    y.backward(dy, retain_graph=True)
    same = torch.equal(leaf.grad, ref_h.grad) and torch.equal(pk.grad, ref_p.grad)
    overwritten = torch.equal(fc1_out.detach(), ref_h.grad)
    try:
        y.backward(dy)
        refused = False
    except RuntimeError as err:
        refused = "backward ran twice" in str(err)
    return {"same": same, "overwritten": overwritten, "refused": refused}


def _all_checks():
    return {"cases": {case: _kernel_case(case) for case in CASES}, "in_place": _in_place_case()}


@pytest.fixture(scope="module")
def interpreted():
    return in_interpreter(_all_checks)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}-F{}-{}-p{}-bf{}".format(
    c[0], c[1], str(c[2])[6:], str(c[3])[6:], c[4]))
def test_kernel_matches_float64(interpreted, case):
    result = interpreted["cases"][case]
    assert result["dtypes"], result
    for name in ("out", "grad_h", "grad_p"):
        assert result[name] <= 0, (name, result)


def test_in_place_grad_and_refuses_a_second_backward(interpreted):
    assert interpreted["in_place"] == {"same": True, "overwritten": True, "refused": True}


def test_reference_matches_float64_autograd():
    h, p, dy = _inputs(11, 9, torch.float64, torch.float64)
    hr, pr = h.clone().requires_grad_(), p.clone().requires_grad_()
    out = sw.torch_weighted_swiglu(hr, pr)
    out.backward(dy)
    ref_y, ref_gh, ref_gp = _float64_reference(h, p, dy)
    torch.testing.assert_close(out.detach(), ref_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hr.grad, ref_gh, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pr.grad, ref_gp, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(sw.torch_weighted_swiglu, (h[:4, :6].clone().requires_grad_(),
                                                               p[:4].clone().requires_grad_()))


def test_reference_bf16_rounds_once_and_keeps_the_router_gradient_fp32():
    h, p, dy = _inputs(13, 24, torch.bfloat16, torch.float32)
    y = sw.torch_weighted_swiglu(h, p)
    gate, up = h.float().chunk(2, dim=-1)
    assert torch.equal(y, (torch.nn.functional.silu(gate) * up * p[:, None]).bfloat16())
    _, gp = sw.torch_weighted_swiglu_backward(dy, h, p)
    assert gp.dtype == torch.float32
    torch.testing.assert_close(gp, (dy.float() * torch.nn.functional.silu(gate) * up).sum(-1))


def test_dispatch_and_validation():
    h, p, _ = _inputs(4, 6, torch.float32, torch.float32)
    assert torch.equal(sw.weighted_swiglu(h, p), sw.torch_weighted_swiglu(h, p))  # auto on CPU = torch
    with pytest.raises(ValueError, match="backend"):
        sw.weighted_swiglu(h, p, backend="cuda")
    with pytest.raises(ValueError, match="gate \\| up"):
        sw.weighted_swiglu(h[:, :5], p)
    with pytest.raises(ValueError, match="probs"):
        sw.weighted_swiglu(h, p[:3])
