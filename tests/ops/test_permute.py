"""Dropless permute / weighted unpermute: Triton kernels (CPU interpreter) vs the torch reference vs megatron."""

import pytest
import torch

pytest.importorskip("triton")

from megatron_grin.ops import permute as permute_ops  # noqa: E402
from grin_interpreter import in_interpreter  # noqa: E402

CASES = [  # (tokens, hidden, experts, top_k, dtype, with_probs)
    (1, 8, 3, 1, torch.float32, True),
    (37, 33, 8, 2, torch.float32, True),  # ragged hidden tail, experts 5..7 get no tokens
    (37, 33, 8, 2, torch.float32, False),
    (20, 1100, 6, 4, torch.bfloat16, True),  # two hidden blocks
    (16, 64, 4, 4, torch.float32, True),  # top_k = E: every expert gets every token
]


def _routing(tokens, experts, top_k, seed):
    """Distinct experts per token, drawn from the first experts - 3 (so some experts stay empty)."""
    g = torch.Generator().manual_seed(seed)
    pool = max(top_k, experts - 3)
    return torch.stack([torch.randperm(pool, generator=g)[:top_k] for _ in range(tokens)])


def _compare(tokens, hidden, experts, top_k, dtype, with_probs):
    g = torch.Generator().manual_seed(tokens * 7 + hidden)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    picks = _routing(tokens, experts, top_k, seed=hidden)
    probs = torch.rand(tokens, top_k, generator=g) if with_probs else None
    grad_rows = torch.randn(tokens * top_k, hidden, generator=g).to(dtype)
    grad_out = torch.randn(tokens, hidden, generator=g).to(dtype)
    out = {}
    for backend in ("triton", "torch"):
        xb = x.clone().requires_grad_()
        pb = probs.clone().requires_grad_() if with_probs else None
        permuted, row_map, counts = permute_ops.permute_tokens(xb, picks, experts, backend=backend)
        (permuted * grad_rows).sum().backward(retain_graph=False)
        rows = permuted.detach().clone().requires_grad_()
        restored = permute_ops.unpermute_tokens(rows, row_map, pb, backend=backend)
        restored.backward(grad_out)
        out[backend] = dict(permuted=permuted.detach(), row_map=row_map, counts=counts, grad_x=xb.grad,
                            restored=restored.detach(), grad_rows=rows.grad, grad_p=pb.grad if with_probs else None)
    k, r = out["triton"], out["torch"]
    tol = 1e-6 if dtype == torch.float32 else 2**-6  # bf16: the reference rounds each addition, we round once

    def err(a, b):  # relative to the largest value
        return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1)).item() if a.numel() else 0.0

    return {"permuted_equal": torch.equal(k["permuted"], r["permuted"]), "row_map_equal": torch.equal(k["row_map"], r["row_map"]),
            "counts_equal": torch.equal(k["counts"], r["counts"]), "grad_x": err(k["grad_x"], r["grad_x"]),
            "restored": err(k["restored"], r["restored"]), "grad_rows": err(k["grad_rows"], r["grad_rows"]),
            "grad_p": err(k["grad_p"], r["grad_p"]) if with_probs else 0.0, "tol": tol,
            "dtype_kept": k["restored"].dtype == dtype and k["grad_rows"].dtype == dtype}


def _all_checks():
    return {case: _compare(*case) for case in CASES}


@pytest.fixture(scope="module")
def interpreted():
    return in_interpreter(_all_checks)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-H{}-E{}-K{}-{}-{}".format(
    *c[:4], str(c[4]).split(".")[-1], "probs" if c[5] else "noprobs"))
def test_kernels_match_torch_reference(interpreted, case):
    r = interpreted[case]
    assert r["permuted_equal"] and r["row_map_equal"] and r["counts_equal"] and r["dtype_kept"]
    for name in ("grad_x", "restored", "grad_rows", "grad_p"):
        assert r[name] <= r["tol"], (name, r)


def test_order_matches_megatron_permute():
    """Rows are expert-major, token-ascending: megatron's permute order, so its dispatcher splits apply."""
    from megatron.core.transformer.moe.moe_utils import permute, unpermute

    tokens, hidden, experts, top_k = 29, 16, 7, 3
    x = torch.randn(tokens, hidden)
    picks = _routing(tokens, experts, top_k, seed=3)
    probs = torch.rand(tokens, top_k)
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool).scatter(1, picks, True)
    dense_probs = torch.zeros(tokens, experts).scatter(1, picks, probs)
    ours, row_map, counts = permute_ops.torch_permute(x, picks, experts)
    theirs, _, sorted_indices = permute(x, routing_map, num_out_tokens=tokens * top_k)
    assert torch.equal(ours, theirs)
    assert torch.equal(counts, routing_map.sum(0))
    restored = unpermute(theirs, sorted_indices, x.shape, probs=dense_probs, routing_map=routing_map)
    torch.testing.assert_close(permute_ops.torch_unpermute(ours, row_map, probs), restored)


def test_rejects_bad_shapes():
    x, picks = torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="disagree"):
        permute_ops.permute_tokens(x, picks[:3], 4)
    with pytest.raises(ValueError, match="disagree"):
        permute_ops.unpermute_tokens(torch.randn(7, 8), picks)
    with pytest.raises(ValueError, match="probs"):
        permute_ops.unpermute_tokens(torch.randn(8, 8), picks, torch.rand(4, 3))
    with pytest.raises(ValueError, match="backend"):
        permute_ops.permute_tokens(x, picks, 4, backend="nope")
    with pytest.raises(ValueError, match="rows"):
        permute_ops.triton_scatter_rows(x, picks, 9)


def test_permuted_probs_and_counts_match_megatron():
    """The probs of each permuted row and the per-expert counts, as megatron's permute(probs=...) gives them."""
    from megatron.core.transformer.moe.moe_utils import permute

    tokens, hidden, experts, top_k = 23, 8, 6, 2
    picks = _routing(tokens, experts, top_k, seed=5)
    probs = torch.rand(tokens, top_k, requires_grad=True)
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool).scatter(1, picks, True)
    dense_probs = torch.zeros(tokens, experts).scatter(1, picks, probs.detach())
    _, theirs, _ = permute(torch.randn(tokens, hidden), routing_map, probs=dense_probs, num_out_tokens=tokens * top_k)
    _, row_map, counts = permute_ops.torch_permute(torch.randn(tokens, hidden), picks, experts)
    ours = permute_ops.permute_probs(probs, row_map)
    assert torch.equal(ours.detach(), theirs)
    assert torch.equal(permute_ops.expert_counts(picks, experts), routing_map.sum(0)) and torch.equal(counts, routing_map.sum(0))
    g = torch.randn(tokens * top_k)
    ours.backward(g)
    assert torch.equal(probs.grad, g[row_map])  # each pick's gradient comes back from its row


@pytest.mark.parametrize("with_probs", [True, False])
def test_reference_unpermute_backward_is_the_float64_gradient(with_probs):
    picks = _routing(7, 5, 2, seed=1)
    permuted, row_map, _ = permute_ops.torch_permute(torch.randn(7, 3, dtype=torch.float64), picks, 5)
    probs = torch.rand(7, 2, dtype=torch.float64, requires_grad=True) if with_probs else None
    rows = permuted.detach().requires_grad_()
    inputs = (rows, probs) if with_probs else (rows,)
    assert torch.autograd.gradcheck(lambda r, p=None: permute_ops.torch_unpermute(r, row_map, p), inputs)
