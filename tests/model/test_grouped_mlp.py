"""GroupedMMExperts (the "grouped_mm" backend) against megatron's SequentialMLP: same init, same maths,
zero-token experts, checkpoints that move between the two (state_dict and dist-ckpt, across TP sizes)."""

import os

import pytest
import torch

from grin_testing import init_parallel, run_distributed, tiny_config

E, FFN, HIDDEN = 5, 40, 48


def _build(backend, tconfig, seed=0):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.spec_utils import build_module

    from megatron_grin.model.experts import BACKEND_SPECS, experts_spec
    torch.manual_seed(seed)
    spec = experts_spec("sequential", False) if backend == "sequential" else BACKEND_SPECS[backend](False)
    return build_module(spec, E, tconfig, pg_collection=get_default_pg_collection())


def _tconfig(tconfig_overrides=None, **overrides):
    from megatron_grin.model.build import transformer_config

    return transformer_config(tiny_config(num_experts=E, ffn_hidden_size=FFN, hidden_size=HIDDEN, **overrides),
                              **(tconfig_overrides or {}))


def _fwd_bwd(module, x, counts, probs, grad):
    x, probs = x.clone().requires_grad_(), probs.clone().requires_grad_()
    out, bias = module(x, counts, probs)
    out.backward(grad)
    return out.detach(), x.grad, probs.grad


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def _fc_grads(module):
    """fc1 / fc2 weight grads stacked per expert (zeros where an expert saw no token)."""
    if hasattr(module, "fc1_weight"):
        return module.fc1_weight.grad, module.fc2_weight.grad
    out = []
    for fc in ("linear_fc1", "linear_fc2"):
        ws = [getattr(e, fc).weight for e in module.local_experts]
        out.append(torch.stack([w.grad if w.grad is not None else torch.zeros_like(w) for w in ws]))
    return tuple(out)


def _dist_roundtrip(src, dst, directory):
    from megatron.core import dist_checkpointing

    torch.cuda.synchronize = lambda *a, **k: None  # the filesystem writer syncs CUDA; this worker is CPU-only
    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(src.sharded_state_dict(prefix="mlp.experts."), directory, sharded_strategy=("torch_dist", 1))
    loaded = dist_checkpointing.load(dst.sharded_state_dict(prefix="mlp.experts."), directory)
    return dst.load_state_dict({k[len("mlp.experts."):]: v for k, v in loaded.items()})


def _single_rank(rank, world, port, tmp):
    init_parallel(rank, world, port)
    tconfig = _tconfig()
    seq, grp = _build("sequential", tconfig), _build("grouped_mm", tconfig)
    res = {}
    sd_seq, sd_grp = seq.state_dict(), grp.state_dict()
    res["same_keys_in_order"] = list(sd_seq) == list(sd_grp)
    res["same_init"] = all(torch.equal(sd_seq[k], sd_grp[k]) for k in sd_seq if sd_seq[k] is not None)
    # forward/backward, with zero-token experts (1 and 4), through torch's grouped_mm and through the loop
    counts = torch.tensor([3, 0, 7, 5, 0])
    g = torch.Generator().manual_seed(0)
    x, probs, grad = torch.randn(15, HIDDEN, generator=g), torch.rand(15, generator=g), torch.randn(15, HIDDEN, generator=g)
    ref = _fwd_bwd(seq, x, counts, probs, grad)
    ref_w = _fc_grads(seq)
    for gemm in ("grouped_mm", "loop"):
        grp.zero_grad(set_to_none=True)
        grp.gemm = gemm
        got = _fwd_bwd(grp, x, counts, probs, grad)
        w = _fc_grads(grp)
        res[f"err_{gemm}"] = max(max(_max_err(a, b) for a, b in zip(got, ref)),
                                 max(_max_err(a, b) for a, b in zip(w, ref_w)))
        res[f"idle_expert_grads_zero_{gemm}"] = bool((w[0][[1, 4]] == 0).all() and (w[1][[1, 4]] == 0).all())
    grp.gemm = None
    # no tokens at all: an output of shape [0, H] and (zero) weight grads
    grp.zero_grad(set_to_none=True)
    out, _, _ = _fwd_bwd(grp, torch.zeros(0, HIDDEN), torch.zeros(E, dtype=torch.long), torch.zeros(0),
                         torch.zeros(0, HIDDEN))
    res["empty"] = (tuple(out.shape), grp.fc1_weight.grad is not None and bool((grp.fc1_weight.grad == 0).all()))
    # state_dict moves both ways with strict loading
    with torch.no_grad():
        for p in seq.parameters():
            p.add_(1.0)
    res["load_seq_into_grp"] = str(grp.load_state_dict(seq.state_dict()))
    res["after_load_equal"] = torch.equal(grp.fc2_weight[2], seq.local_experts[2].linear_fc2.weight)
    seq2 = _build("sequential", tconfig, seed=1)
    res["load_grp_into_seq"] = str(seq2.load_state_dict(grp.state_dict()))
    # distributed checkpoints move both ways too
    with torch.no_grad():
        grp.fc1_weight.mul_(-2.0)
    fresh_seq = _build("sequential", tconfig, seed=2)
    _dist_roundtrip(grp, fresh_seq, os.path.join(tmp, "g2s"))
    res["dist_grp_to_seq"] = all(torch.equal(a, b) for a, b in zip(grp.fc1_weight, (e.linear_fc1.weight for e in fresh_seq.local_experts)))
    fresh_grp = _build("grouped_mm", tconfig, seed=3)
    _dist_roundtrip(fresh_seq, fresh_grp, os.path.join(tmp, "s2g"))
    res["dist_seq_to_grp"] = torch.equal(fresh_grp.fc1_weight, grp.fc1_weight) and torch.equal(fresh_grp.fc2_weight, grp.fc2_weight)
    # bf16: same maths up to where the routing weight is applied (after fc2 here, after the activation there)
    tbf = _tconfig(bf16=True)
    seq_bf, grp_bf = _build("sequential", tbf), _build("grouped_mm", tbf)
    out_s = _fwd_bwd(seq_bf, x.bfloat16(), counts, probs, grad.bfloat16())
    out_g = _fwd_bwd(grp_bf, x.bfloat16(), counts, probs, grad.bfloat16())
    res["bf16_rel_err"] = max(_max_err(a, b) / max(b.float().abs().max().item(), 1e-6) for a, b in zip(out_g, out_s))
    res["bf16_dtype"] = out_g[0].dtype == torch.bfloat16
    res["layers"] = {backend: _grin_layer(backend) for backend in ("sequential", "grouped_mm")}
    return res


def _grin_layer(backend, tconfig_overrides=None):
    """A full GRIN MoE layer (router + dispatcher + experts), train and eval, on fixed inputs.

    Returns per mode (output, input grad, router weight grad, picks [T, K], fc1 weight grads)."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_grin.model import routing_rng
    from megatron_grin.model.spec import grin_moe_spec

    torch.manual_seed(0)
    layer = build_module(grin_moe_spec(backend), config=_tconfig(tconfig_overrides), layer_number=1)
    layer.set_layer_number(1)
    picks = []
    route = layer.router.route_tokens
    layer.router.route_tokens = lambda *a: picks.append(route(*a)) or picks[-1]
    g = torch.Generator().manual_seed(1)
    x, grad = torch.randn(12, 2, HIDDEN, generator=g), torch.randn(12, 2, HIDDEN, generator=g)
    out = {}
    for training in (True, False):
        layer.train(training)
        routing_rng.set_routing_iteration(5)
        xi = x.clone().requires_grad_()
        y, _ = layer(xi)
        y.backward(grad)
        out[training] = (y.detach(), xi.grad, layer.router.weight.grad.clone(), picks[-1][2],
                         _fc_grads(layer.experts)[0].clone())
        layer.zero_grad(set_to_none=True)
    return out


FUSED = {"grin_router_backend": "triton", "grin_permute_backend": "triton", "grin_expert_fusion": "triton"}
UNFUSED = {"grin_router_backend": "torch", "grin_permute_backend": "torch", "grin_expert_fusion": "torch"}


def _fused_experts_and_layer():
    """Under the Triton interpreter: the fused expert MLP (Triton grouped GEMMs + SwiGLU kernel, the wgrad into
    main_grad) against SequentialMLP, and a whole GRIN layer with every fused path against the unfused one."""
    from grin_testing import free_port

    init_parallel(0, 1, free_port())
    res = {}
    counts = torch.tensor([3, 0, 7, 5, 0])
    g = torch.Generator().manual_seed(0)
    x, probs, grad = torch.randn(15, HIDDEN, generator=g), torch.rand(15, generator=g), torch.randn(15, HIDDEN, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        tconfig = _tconfig(FUSED, bf16=dtype == torch.bfloat16)
        seq, grp = _build("sequential", tconfig), _build("grouped_mm", tconfig)
        res[f"kernels_{dtype}"] = grp.kernels(x.to(dtype))
        ref = _fwd_bwd(seq, x.to(dtype), counts, probs, grad.to(dtype)) + _fc_grads(seq)
        got = _fwd_bwd(grp, x.to(dtype), counts, probs, grad.to(dtype)) + _fc_grads(grp)
        res[f"rel_err_{dtype}"] = max(_max_err(a, b) / max(b.float().abs().max().item(), 1e-6) for a, b in zip(got, ref))
        res[f"dtype_{dtype}"] = got[0].dtype == dtype and got[2].dtype == torch.float32
        # megatron DDP's main_grad (fp32) and flag: the wgrad adds into main_grad, .grad is a dummy
        for p in grp.parameters():
            p.grad, p.main_grad, p.grad_added_to_main_grad = None, torch.full(p.shape, 0.5), False
        for _ in range(2):
            _fwd_bwd(grp, x.to(dtype), counts, probs, grad.to(dtype))
        fused = (grp.fc1_weight.main_grad, grp.fc2_weight.main_grad)
        res[f"main_grad_err_{dtype}"] = max(_max_err(m - 0.5, 2 * r.float()) / r.float().abs().max().item()
                                            for m, r in zip(fused, ref[3:]))
        res[f"main_grad_flags_{dtype}"] = all(p.grad_added_to_main_grad for p in grp.parameters())
    res["layer"] = {name: _grin_layer("grouped_mm", over) for name, over in (("fused", FUSED), ("unfused", UNFUSED))}
    return res


@pytest.fixture(scope="module")
def interpreted():
    from grin_interpreter import in_interpreter

    return in_interpreter(_fused_experts_and_layer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_expert_mlp_matches_sequential_and_fuses_the_wgrad(interpreted, dtype):
    r = interpreted
    assert r[f"kernels_{dtype}"] == ("triton", "triton") and r[f"dtype_{dtype}"]
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert r[f"rel_err_{dtype}"] < tol and r[f"main_grad_err_{dtype}"] < tol, r
    assert r[f"main_grad_flags_{dtype}"]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_grin_layer_fused_paths_match_unfused(interpreted, training):
    """Router (routing + jitter kernels), dispatcher (permute kernels) and experts all fused: same picks."""
    fused, unfused = interpreted["layer"]["fused"][training], interpreted["layer"]["unfused"][training]
    assert torch.equal(fused[3], unfused[3])
    for a, b in zip(fused[:3] + fused[4:], unfused[:3] + unfused[4:]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _tp_shards(rank, world, port, tmp):
    from megatron.core import dist_checkpointing

    init_parallel(rank, world, port, tp=2)
    tconfig = _tconfig(tensor_model_parallel_size=2, sequence_parallel=True)
    seq, grp = _build("sequential", tconfig), _build("grouped_mm", tconfig)
    sd_seq, sd_grp = seq.state_dict(), grp.state_dict()
    same_init = all(torch.equal(sd_seq[k], sd_grp[k]) for k in sd_seq if sd_seq[k] is not None)
    counts = torch.tensor([4, 0, 2, 3, 1])
    g = torch.Generator().manual_seed(0)
    x, probs, grad = torch.randn(10, HIDDEN, generator=g), torch.rand(10, generator=g), torch.randn(10, HIDDEN, generator=g)
    err = max(_max_err(a, b) for a, b in zip(_fwd_bwd(grp, x, counts, probs, grad), _fwd_bwd(seq, x, counts, probs, grad)))
    torch.cuda.synchronize = lambda *a, **k: None
    dist_checkpointing.save(grp.sharded_state_dict(prefix="mlp.experts."), tmp, sharded_strategy=("torch_dist", 1))
    return same_init, err, grp.fc1_weight.detach().clone(), grp.fc2_weight.detach().clone()


def _load_tp1(rank, world, port, tmp):
    from megatron.core import dist_checkpointing

    init_parallel(rank, world, port)
    seq = _build("sequential", _tconfig(), seed=9)
    loaded = dist_checkpointing.load(seq.sharded_state_dict(prefix="mlp.experts."), tmp)
    seq.load_state_dict({k[len("mlp.experts."):]: v for k, v in loaded.items()})
    return (torch.stack([e.linear_fc1.weight.detach() for e in seq.local_experts]),
            torch.stack([e.linear_fc2.weight.detach() for e in seq.local_experts]))


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory):
    return run_distributed(_single_rank, 1, str(tmp_path_factory.mktemp("ckpt")))[0]


def test_same_init_and_maths_as_sequential(single_rank):
    res = single_rank
    assert res["same_keys_in_order"] and res["same_init"]
    assert res["err_grouped_mm"] < 1e-5 and res["err_loop"] < 1e-5, res
    assert res["bf16_dtype"] and res["bf16_rel_err"] < 3e-2, res["bf16_rel_err"]


def test_zero_token_experts(single_rank):
    assert single_rank["idle_expert_grads_zero_grouped_mm"] and single_rank["idle_expert_grads_zero_loop"]
    assert single_rank["empty"] == ((0, HIDDEN), True)


def test_checkpoints_move_between_backends(single_rank):
    res = single_rank
    assert "All keys matched" in res["load_seq_into_grp"] and res["after_load_equal"]
    assert "All keys matched" in res["load_grp_into_seq"]
    assert res["dist_grp_to_seq"] and res["dist_seq_to_grp"]


def test_grin_layer_same_with_either_backend(single_rank):
    seq, grp = single_rank["layers"]["sequential"], single_rank["layers"]["grouped_mm"]
    for training in (True, False):
        assert torch.equal(seq[training][3], grp[training][3])  # the same picks
        for a, b in zip(seq[training], grp[training]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_tensor_parallel_shards_and_resharding(tmp_path):
    """TP=2: same shards and partial outputs as SequentialMLP; the TP=2 checkpoint loads into TP=1 sequential."""
    ranks = run_distributed(_tp_shards, 2, str(tmp_path))
    assert all(r[0] for r in ranks)
    assert max(r[1] for r in ranks) < 1e-5
    fc1_tp1, fc2_tp1 = run_distributed(_load_tp1, 1, str(tmp_path))[0]
    (_, _, fc1_a, fc2_a), (_, _, fc1_b, fc2_b) = ranks
    half = FFN // 2  # rank r holds [gate_r; up_r]: the full weight is [gate_0; gate_1; up_0; up_1]
    fc1_full = torch.cat([fc1_a[:, :half], fc1_b[:, :half], fc1_a[:, half:], fc1_b[:, half:]], dim=1)
    assert torch.equal(fc1_tp1, fc1_full)
    assert torch.equal(fc2_tp1, torch.cat([fc2_a, fc2_b], dim=2))


def test_registration_and_validation():
    from megatron_grin.config import EXPERT_BACKENDS
    from megatron_grin.model.experts import BACKEND_SPECS
    from megatron_grin.model.grouped_experts import GroupedMMExperts
    from megatron_grin.ops.grouped_mlp import grouped_swiglu_mlp

    assert BACKEND_SPECS["grouped_mm"](False).module is GroupedMMExperts
    assert set(BACKEND_SPECS) == set(EXPERT_BACKENDS) - {"auto"}  # the config's names are the registry's
    w1, w2 = torch.zeros(3, 8, 4), torch.zeros(3, 4, 4)
    with pytest.raises(ValueError, match="sums to"):
        grouped_swiglu_mlp(torch.zeros(5, 4), w1, w2, torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="entries"):
        grouped_swiglu_mlp(torch.zeros(2, 4), w1, w2, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="mismatch"):
        grouped_swiglu_mlp(torch.zeros(2, 5), w1, w2, torch.tensor([1, 1, 0]))


def _reference_swiglu_experts(x, fc1, fc2, counts, probs):
    """Float64 autograd reference: one plain SwiGLU MLP per expert on its rows, scaled by the probs."""
    outs, start = [], 0
    for e, n in enumerate(counts):
        h = x[start:start + n] @ fc1[e].t()
        gate, up = h.chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ fc2[e].t()
        outs.append(y if probs is None else y * probs[start:start + n, None])
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("with_probs", [True, False])
@pytest.mark.parametrize("counts,dtype", [
    ([3, 0, 5, 1, 0, 7], torch.float32), ([0, 0, 0, 0, 0, 9], torch.float32), ([2, 2, 2, 2, 2, 2], torch.float32),
    ([70, 0, 130, 64, 1, 200], torch.bfloat16),  # bf16 splits each expert's rows at multiples of ROW_BLOCK
])
def test_cpu_expert_loop_matches_float64_reference(counts, dtype, with_probs):
    from megatron_grin.ops.grouped_mlp import grouped_swiglu_mlp

    g = torch.Generator().manual_seed(sum(counts))
    experts, hidden, ffn, rows = len(counts), 16, 24, sum(counts)
    tensors = [torch.randn(rows, hidden, generator=g), torch.randn(experts, 2 * ffn, hidden, generator=g) * 0.2,
               torch.randn(experts, hidden, ffn, generator=g) * 0.2, torch.rand(rows, generator=g)]
    tensors = [t.to(dtype).float() for t in tensors]  # values exactly representable in the tested dtype
    grad = torch.randn(rows, hidden, generator=g).to(dtype).float()
    results = []
    for run_dtype, fn in ((dtype, grouped_swiglu_mlp), (torch.float64, _reference_swiglu_experts)):
        x, fc1, fc2, probs = (t.detach().to(run_dtype).requires_grad_() for t in tensors)
        probs = probs if with_probs else None
        if fn is grouped_swiglu_mlp:
            probs = probs.detach().float().requires_grad_() if with_probs else None  # router precision
            out = fn(x, fc1, fc2, torch.tensor(counts), probs, gemm="loop")
        else:
            out = fn(x, fc1, fc2, counts, probs)
        out.backward(grad.to(run_dtype))
        grads = [t.grad for t in (x, fc1, fc2) + ((probs,) if with_probs else ())]
        results.append([out.detach()] + grads)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for got, want in zip(*results):
        assert got.dtype == (torch.float32 if got.dim() == 1 else dtype)
        scale = want.abs().max().clamp_min(1.0)
        assert (got.double() - want).abs().max() <= tol * scale, ((got.double() - want).abs().max(), scale)
    for e, n in enumerate(counts):  # experts without rows get exact zero gradients
        if not n:
            assert not results[0][2][e].any() and not results[0][3][e].any()


def test_cpu_expert_loop_refuses_a_second_backward():
    from megatron_grin.ops.grouped_mlp import grouped_swiglu_mlp

    x = torch.randn(4, 8, requires_grad=True)
    fc1, fc2 = torch.randn(2, 12, 8, requires_grad=True), torch.randn(2, 8, 6, requires_grad=True)
    out = grouped_swiglu_mlp(x, fc1, fc2, torch.tensor([1, 3]), torch.rand(4), gemm="loop")
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.sum().backward()
