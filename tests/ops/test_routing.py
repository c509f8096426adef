"""Fused SparseMixer-v2 routing kernel (Triton, run by the CPU interpreter) against the torch reference.

The kernel must pick exactly the reference's experts (same Philox lanes, same masks, same ties) and match
its weights and router gradients to ~1e-6, for any top_k, both estimator variants, train and eval.
"""

import os

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from grin_interpreter import in_interpreter  # noqa: E402
from megatron_grin.model import routing_rng  # noqa: E402
from megatron_grin.ops import permute as permute_ops  # noqa: E402
from megatron_grin.ops import routing as routing_ops  # noqa: E402


def _logits(t, e, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(t, e, generator=g) * scale
    if t > 8:
        z[::5, 0] = z[::5, e - 1]  # ties between experts
        z[3] = 0.0  # an all-zero row (the relative mask divides 0 by 0)
        z[4] = -z[4].abs() - 1  # all negative
    return z


def _key(t, seed):
    g = torch.Generator().manual_seed(seed + 100)
    return routing_ops.RoutingKey(torch.randint(0, 2**40, (t,), generator=g), seed=0xC0FFEE + seed,
                                  iteration=3 + seed, layer_number=7, microbatch=seed % 3)


CASES = [  # (tokens, experts, top_k, variant, training)
    (1, 4, 1, "sparsemixer_v2", True),
    (37, 16, 2, "sparsemixer_v2", True),
    (37, 16, 2, "sparsemixer_v2_star", True),
    (130, 16, 2, "sparsemixer_v2", True),  # ragged tail over several programs
    (45, 7, 3, "sparsemixer_v2", True),  # E + 1 = 8 lanes: exactly one tile
    (20, 5, 4, "sparsemixer_v2_star", True),
    (24, 3, 3, "sparsemixer_v2", True),  # top_k = E
    (64, 16, 4, "sparsemixer_v2", False),
    (33, 3, 3, "sparsemixer_v2_star", False),
    (50, 8, 1, "sparsemixer_v2", False),
]


def _compare(tokens, experts, top_k, variant, training):
    """Kernel vs reference on one case: (picks equal, max |dweight|, max |dgrad|, stats equal)."""
    z = _logits(tokens, experts, seed=tokens + experts)
    key = _key(tokens, seed=top_k)
    grad_TK = torch.randn(tokens, top_k, generator=torch.Generator().manual_seed(5))
    results = {}
    for backend in ("triton", "torch"):
        logits = z.clone().requires_grad_()
        weights, picks, stats = routing_ops.sparsemixer_routing(logits, 0.01, top_k, training, key, variant,
                                                                backend=backend)
        weights.backward(grad_TK)
        results[backend] = (weights.detach(), picks, stats, logits.grad)
    (w_k, e_k, s_k, g_k), (w_r, e_r, s_r, g_r) = results["triton"], results["torch"]
    same_stats = sorted(s_k) == sorted(s_r) and all(torch.equal(s_k[n], s_r[n]) for n in s_r)
    return {"picks_equal": e_k.dtype == torch.int64 and torch.equal(e_k, e_r),
            "weight_err": (w_k - w_r).abs().max().item() if tokens else 0.0,
            "grad_err": (g_k - g_r).abs().max().item() if tokens else 0.0, "stats_equal": same_stats}


@triton.jit
def _lanes_kernel(tok_ptr, out_ptr, philox_key, c1_base, c2, c3, T, LANES: tl.constexpr, BLOCK: tl.constexpr):
    """The routing kernel's lane layout, alone: uniform of lane e = word e % 4 of block c1_base + e // 4."""
    rows = tl.program_id(0) * 16 + tl.arange(0, 16)
    cols = tl.arange(0, BLOCK)
    zero = tl.zeros([16, BLOCK], tl.uint32)
    tok = tl.load(tok_ptr + rows, mask=rows < T, other=0)
    r0, r1, r2, r3 = tl.philox(philox_key, zero + tok.to(tl.uint32)[:, None],
                               zero + c1_base + (cols // 4).to(tl.uint32)[None, :], zero + c2, zero + c3)
    word = cols[None, :] % 4
    bits = tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3)))
    u = ((bits >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    tl.store(out_ptr + rows[:, None] * LANES + cols[None, :], u, mask=(rows[:, None] < T) & (cols[None, :] < LANES))


def _lanes_match_routing_rng():
    tokens, lanes, top_k = 21, 17, 2
    key = _key(tokens, seed=1)
    ref = routing_rng.routing_uniforms(key.token_ids, lanes, top_k, seed=key.seed, iteration=key.iteration,
                                       layer_number=key.layer_number, microbatch=key.microbatch)
    blocks = (lanes + 3) // 4
    philox_key = ((key.iteration & 0xFFFFFFFF) << 32) | (key.seed & 0xFFFFFFFF)
    equal = []
    for k in range(top_k):
        out = torch.zeros(tokens, lanes)
        _lanes_kernel[(2,)](key.token_ids, out, philox_key, k * blocks, key.layer_number * 4, key.microbatch,
                            tokens, LANES=lanes, BLOCK=32)
        equal.append(torch.equal(out, ref[:, k]))
    return all(equal)


def _zero_tokens():
    empty = torch.zeros(0, 8, requires_grad=True)
    key = routing_ops.RoutingKey(torch.zeros(0, dtype=torch.int64), 1, 0, 1, 0)
    weights, picks, stats = routing_ops.sparsemixer_routing(empty, 0.01, 2, True, key, backend="triton")
    weights.sum().backward()
    return (tuple(weights.shape), tuple(picks.shape), tuple(stats["full_multiplier"].shape), tuple(empty.grad.shape))


def _all_checks():
    return {"cases": {case: _compare(*case) for case in CASES}, "lanes": _lanes_match_routing_rng(),
            "zero_tokens": _zero_tokens()}


@pytest.fixture(scope="module")
def interpreted():
    return in_interpreter(_all_checks)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-E{}-K{}-{}-{}".format(*c[:4], "train" if c[4] else "eval"))
def test_kernel_matches_torch_reference(interpreted, case):
    result = interpreted["cases"][case]
    assert result["picks_equal"]
    assert result["stats_equal"]
    assert result["weight_err"] <= 1e-6, result
    assert result["grad_err"] <= 1e-6, result


def test_kernel_draws_routing_rng_uniforms_bit_for_bit(interpreted):
    """tl.philox with routing_rng's key (seed, iteration) and counters gives the very same uniforms."""
    assert interpreted["lanes"]


def test_zero_tokens(interpreted):
    assert interpreted["zero_tokens"] == ((0, 2), (0, 2), (0, 2), (0, 8))


def test_launcher_rejects_bad_inputs():
    z = torch.randn(6, 4)
    key = routing_ops.RoutingKey(torch.arange(6), 1, 0, 1, 0)
    with pytest.raises(ValueError, match="tokens, experts"):
        routing_ops.triton_sparsemixer_forward(torch.randn(2, 3, 4), 0.01, 2, True, key)
    with pytest.raises(ValueError, match="top_k"):
        routing_ops.triton_sparsemixer_forward(z, 0.01, 5, True, key)
    with pytest.raises(ValueError, match="fp32"):
        routing_ops.triton_sparsemixer_forward(z.bfloat16(), 0.01, 2, True, key)
    with pytest.raises(ValueError, match="RoutingKey"):
        routing_ops.triton_sparsemixer_forward(z, 0.01, 2, True, None)
    with pytest.raises(ValueError, match="token_ids"):
        routing_ops.triton_sparsemixer_forward(z, 0.01, 2, True, routing_ops.RoutingKey(torch.arange(5), 1, 0, 1, 0))
    with pytest.raises(ValueError, match="variant"):
        routing_ops.triton_sparsemixer_forward(z, 0.01, 2, True, key, variant="v3")
    with pytest.raises(ValueError, match="backend"):
        routing_ops.sparsemixer_routing(z, 0.01, 2, True, key, backend="cuda")


def test_auto_backend_is_torch_on_cpu():
    z = torch.randn(10, 4)
    key = routing_ops.RoutingKey(torch.arange(10), 5, 1, 2, 0)
    auto = routing_ops.sparsemixer_routing(z, 0.01, 2, True, key)
    ref = routing_ops.torch_sparsemixer_routing(z, 0.01, 2, True, key)
    assert torch.equal(auto[0], ref[0]) and torch.equal(auto[1], ref[1])


def test_kernels_compile_for_hopper():
    """The interpreter does not type-check like the compiler: build every kernel for sm90 (no GPU needed)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("triton was imported in interpreter mode")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    def compiled(module, names):
        return {n: JITFunction(getattr(module, n).fn) for n in names}

    routing_fns = compiled(routing_ops, ["_masked_softmax", "_sparsemixer_fwd_kernel", "_sparsemixer_bwd_kernel"])
    permute_fns = compiled(permute_ops, ["_scatter_rows_kernel", "_gather_rows_kernel", "_unpermute_bwd_kernel"])
    target = GPUTarget("cuda", 90, 32)
    fwd_sig = {"logits_ptr": "*fp32", "token_ids_ptr": "*i64", "weights_ptr": "*fp32", "experts_ptr": "*i64",
               "not_argmax_ptr": "*i8", "full_ptr": "*i8", "T": "i32", "E": "i32", "stride_t": "i32",
               "philox_key": "i64", "c2": "i32", "c3": "i32", "temperature": "fp32", "thr": "fp32",
               "bern_thr": "fp32", "mult_low": "fp32", "mult_high": "fp32", "TOP_K": "constexpr",
               "TRAINING": "constexpr", "SCALE": "constexpr", "LANE_BLOCKS": "constexpr", "BLOCK_T": "constexpr",
               "BLOCK_E": "constexpr"}
    bwd_sig = {"logits_ptr": "*fp32", "experts_ptr": "*i64", "grad_w_ptr": "*fp32", "grad_logits_ptr": "*fp32",
               "T": "i32", "E": "i32", "stride_t": "i32", "temperature": "fp32", "thr": "fp32", "grad_scale": "fp32",
               "TOP_K": "constexpr", "SCALE": "constexpr", "BLOCK_T": "constexpr", "BLOCK_E": "constexpr"}
    rows_sig = {"src_ptr": "*bf16", "row_map_ptr": "*i64", "probs_ptr": "*fp32", "dst_ptr": "*bf16", "H": "i32",
                "TOP_K": "constexpr", "HAS_PROBS": "constexpr", "BLOCK_H": "constexpr"}
    unperm_sig = {"grad_out_ptr": "*bf16", "permuted_ptr": "*bf16", "row_map_ptr": "*i64", "probs_ptr": "*fp32",
                  "grad_permuted_ptr": "*bf16", "grad_probs_ptr": "*fp32", "H": "i32", "TOP_K": "constexpr",
                  "BLOCK_H": "constexpr"}
    jobs = [(routing_ops, routing_fns, "_sparsemixer_fwd_kernel", fwd_sig,
             dict(TOP_K=2, TRAINING=training, SCALE=not training, LANE_BLOCKS=5, BLOCK_T=32, BLOCK_E=32))
            for training in (True, False)]
    jobs.append((routing_ops, routing_fns, "_sparsemixer_bwd_kernel", bwd_sig,
                 dict(TOP_K=2, SCALE=True, BLOCK_T=32, BLOCK_E=32)))
    jobs += [(permute_ops, permute_fns, name, rows_sig, dict(TOP_K=2, HAS_PROBS=True, BLOCK_H=1024))
             for name in ("_scatter_rows_kernel", "_gather_rows_kernel")]
    jobs.append((permute_ops, permute_fns, "_unpermute_bwd_kernel", unperm_sig, dict(TOP_K=2, BLOCK_H=1024)))
    for module, fns, name, sig, consts in jobs:
        saved = {n: module.__dict__[n] for n in fns}
        module.__dict__.update(fns)  # nested @jit helpers must be compiled-mode functions too
        try:
            try:
                kernel = triton.compile(ASTSource(fn=fns[name], signature=sig, constexprs=consts), target=target)
            except RuntimeError as err:  # no ptxas / toolchain here: not the kernel's fault
                if "ptxas" in str(err).lower():
                    pytest.skip(f"no CUDA toolchain: {err}")
                raise
        finally:
            module.__dict__.update(saved)
        assert "cubin" in kernel.asm or "ptx" in kernel.asm, name
