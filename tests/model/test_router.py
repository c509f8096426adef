"""SparseMixer-v2 against transformers' phimoe ``sparsemixer`` and an independent float64 reference."""

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from grin_testing import philox_python
from megatron_grin import sparsemixer_v2
from megatron_grin.model.sparsemixer import sparsemixer_v2_with_stats
from megatron_grin.model.routing_rng import bits_to_uniform, philox4x32, routing_uniforms

hf_phimoe = pytest.importorskip("transformers.models.phimoe.modeling_phimoe")


def _logits(t=64, e=16, seed=0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(t, e, generator=g, dtype=torch.float64) * scale
    z[::7, 3] = z[::7, 5]  # ties
    z[1] = 0.0  # all-equal row
    z[2, :] = -abs(z[2, :]) - 1  # all negative
    return z.to(dtype)


class _ControlledDraws(TorchFunctionMode):
    """Feed our uniforms into HF's Exponential / rand_like draws, pick by pick."""

    def __init__(self, uniforms):
        super().__init__()
        self.u, self.n_exp, self.n_rand = uniforms, 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.exponential_:
            e = self.u.shape[-1] - 1
            out = -torch.log(self.u[:, self.n_exp, :e]).to(args[0].dtype)
            self.n_exp += 1
            return args[0].copy_(out)
        if func is torch.rand_like:
            e = self.u.shape[-1] - 1
            out = self.u[:, self.n_rand, e:].to(args[0].dtype).clone()
            self.n_rand += 1
            return out
        if func is torch.Tensor.uniform_:
            return args[0]
        return func(*args, **kwargs)


@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0])
def test_eval_matches_hf(scale):
    z = _logits(scale=scale)
    z_ours, z_hf = z.clone().requires_grad_(), z.clone().requires_grad_()
    w, idx = sparsemixer_v2(z_ours, 0.01, 2, training=False)
    w_hf, idx_hf = hf_phimoe.sparsemixer(z_hf, 0.01, False)
    assert torch.equal(idx, idx_hf)
    assert torch.equal(w, w_hf)
    coeff = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    (w * coeff).sum().backward()
    (w_hf * coeff).sum().backward()
    torch.testing.assert_close(z_ours.grad, z_hf.grad, rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_training_matches_hf_with_controlled_draws(seed):
    z = _logits(seed=seed, scale=2.0)
    u = routing_uniforms(torch.arange(z.shape[0]), z.shape[1] + 1, 2, seed=seed, iteration=3, layer_number=1,
                         microbatch=0)
    z_ours, z_hf = z.clone().requires_grad_(), z.clone().requires_grad_()
    w, idx = sparsemixer_v2(z_ours, 0.01, 2, training=True, uniforms=u)
    with _ControlledDraws(u):
        w_hf, idx_hf = hf_phimoe.sparsemixer(z_hf, 0.01, True)
    assert torch.equal(idx, idx_hf)
    assert torch.equal(w, w_hf)
    coeff = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed))
    (w * coeff).sum().backward()
    (w_hf * coeff).sum().backward()
    torch.testing.assert_close(z_ours.grad, z_hf.grad, rtol=0, atol=0)
    # the draws really mattered: some picks were not the argmax
    assert (idx[:, 0] != z.argmax(-1)).any()


# HF builds m = 0.3333 + 0.6667 * mask in float32, then casts: the low multiplier is float32(0.3333).
_HEUN_LOW = float(torch.tensor(0.3333, dtype=torch.float32))


def _gap(num, den):
    """IEEE division as torch does it (x/0 -> +-inf, 0/0 -> nan)."""
    if den == 0:
        return math.nan if num == 0 else math.copysign(math.inf, num)
    return num / den


def _reference(z, eps, top_k, u, training, temperature=1.0, p_full=0.25):
    """Plain-Python float64 SparseMixer-v2 (independent of the implementation under test)."""
    z = z.double().tolist()
    weights, experts, grads_basis = [], [], []
    for t, row in enumerate(z):
        zs = [v / temperature for v in row]
        remaining = list(zs)
        w_row, e_row, basis = [], [], []
        for k in range(top_k):
            zmax = max(remaining)
            kept = [i for i, v in enumerate(remaining)
                    if v != -math.inf and not (_gap(zmax - zs[i], max(abs(zs[i]), zmax)) > 2 * eps)]
            denom = sum(math.exp(zs[i] - zmax) for i in kept)
            p = [math.exp(zs[i] - zmax) / denom if i in kept else 0.0 for i in range(len(zs))]
            if training:
                scores = {i: zs[i] - math.log(-math.log(float(u[t, k, i]))) for i in kept}
                d = max(scores, key=lambda i: (scores[i], -i))
            else:
                d = max(kept, key=lambda i: (remaining[i], -i))
            m = 1.0
            if training:
                top = max(kept, key=lambda i: (p[i], -i))
                m = 1.0 if (d == top or float(u[t, k, len(zs)]) > 1 - p_full) else _HEUN_LOW
            w_row.append(p[d] * m)
            e_row.append(d)
            basis.append((d, p))
            remaining[d] = -math.inf
        weights.append(w_row)
        experts.append(e_row)
        grads_basis.append(basis)
    return torch.tensor(weights, dtype=torch.float64), torch.tensor(experts), grads_basis


@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("variant", ["sparsemixer_v2", "sparsemixer_v2_star"])
def test_any_top_k_matches_float64_reference(top_k, training, variant):
    z = _logits(t=48, e=8, seed=top_k, scale=0.5, dtype=torch.float64)
    u = routing_uniforms(torch.arange(48), 9, top_k, seed=5, iteration=0, layer_number=2, microbatch=1).double()
    temperature, p_full, scale = (1.0, 0.25, 1.0) if variant == "sparsemixer_v2" else (2.0, 5 / 8, 2.0)
    zg = z.clone().requires_grad_()
    w, idx = sparsemixer_v2(zg, 0.01, top_k, training, uniforms=u if training else None, variant=variant)
    w_ref, idx_ref, basis = _reference(z, 0.01, top_k, u, training, temperature, p_full)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn(w.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (w * g).sum().backward()
    expected = torch.zeros_like(z)
    for t, picks in enumerate(basis):
        for k, (d, p) in enumerate(picks):
            p = torch.tensor(p, dtype=torch.float64)
            onehot = torch.zeros_like(p)
            onehot[d] = 1
            # router gradient: g * p_D * (onehot - p), no multiplier; eval: ordinary softmax gradient
            coeff = scale / temperature if training else 1.0 / temperature
            expected[t] += float(g[t, k]) * float(p[d]) * (onehot - p) * coeff
    torch.testing.assert_close(zg.grad, expected, rtol=1e-10, atol=1e-12)


def test_picks_follow_masked_softmax_and_heun_rate():
    torch.manual_seed(0)
    row = torch.tensor([2.0, 1.98, 1.97, 1.5, 1.99, -3.0, 1.985, 0.2])
    n = 40000
    z = row.expand(n, -1).contiguous()
    w, idx, stats = sparsemixer_v2_with_stats(z, 0.01, 1, training=True)
    keep = (row.max() - row) / row.abs().clamp(min=row.max()) <= 0.02
    p = torch.softmax(row.masked_fill(~keep, -math.inf), -1)
    counts = torch.bincount(idx[:, 0], minlength=8).double()
    assert counts[~keep].sum() == 0
    expected = p[keep].double() * n
    chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), chi2  # ~5 sigma
    not_top = stats["sampled_not_argmax"][:, 0]
    rate = stats["full_multiplier"][:, 0][not_top].double().mean().item()
    assert abs(rate - 0.25) < 4 * math.sqrt(0.25 * 0.75 / not_top.sum().item())
    assert torch.all(w[~not_top, 0] == p[0])  # argmax picks always keep m = 1


def test_gumbel_never_inf_or_nan():
    u = torch.tensor([[[2.0**-24, 1 - 2.0**-24, 0.5]]])
    z = torch.tensor([[0.0, 0.001]])
    w, idx = sparsemixer_v2(z, 0.01, 1, training=True, uniforms=u)
    assert torch.isfinite(w).all()
    x = torch.tensor([0, 0xFFFFFFFF, 511, 512, 0x7FFFFFFF], dtype=torch.int64)
    v = bits_to_uniform(x)
    assert (v > 0).all() and (v < 1).all()
    assert torch.isfinite(-torch.log(-torch.log(v))).all()


def test_philox_known_answers():
    # Random123 known-answer vectors for philox4x32-10.
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, expected in cases:
        out = philox4x32(*[torch.tensor([c]) for c in ctr], *key)
        assert tuple(int(o) for o in out) == expected


def test_philox_vectorised_matches_python_reference():
    # thousands of counters at once: the vectorised int64 kernels (wrapping multiplies) must agree too
    g = torch.Generator().manual_seed(5)
    ctr = torch.randint(0, 2**32, (4, 4099), generator=g, dtype=torch.int64)
    ctr[:, :4] = torch.tensor([0, 0xFFFFFFFF, 0x80000000, 0x7FFFFFFF]).view(1, 4)  # sign and carry edges
    key = (0xFEDCBA98, 0x89ABCDEF)
    out = torch.stack(philox4x32(*ctr, *key))
    for n in list(range(0, 4099, 97)) + [0, 1, 2, 3, 4098]:
        assert tuple(int(v) for v in out[:, n]) == philox_python(tuple(int(c) for c in ctr[:, n]), key)


def test_rejects_bad_top_k():
    with pytest.raises(ValueError, match="top_k"):
        sparsemixer_v2(torch.zeros(3, 4), 0.01, 5, training=False)


def test_dense_routing_is_megatrons_contract():
    """The [T, K] picks the GRIN dispatcher consumes, densified for megatron's callers: probs [T, E] zero off
    the picks, a bool routing map with exactly top_k True per row."""
    from megatron_grin.model.router import dense_routing

    z = _logits(t=40, e=8, seed=3)
    weights, experts = sparsemixer_v2(z.clone().requires_grad_(), 0.01, 3, training=False)
    probs, routing_map = dense_routing(weights, experts, 8)
    assert routing_map.dtype == torch.bool and (routing_map.sum(1) == 3).all()
    assert torch.equal(probs.gather(1, experts), weights) and (probs[~routing_map] == 0).all()
    probs.sum().backward()  # differentiable through the weights
