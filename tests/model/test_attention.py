"""GrinCoreAttention (model/attention.py), megatron's local-spec core attention without [b, h, s, s].

References: megatron-core's own ``DotProductAttention`` inside a real ``SelfAttention`` (same weights,
same inputs), HF Phimoe for the whole model (tests/model/test_model_parity.py runs the default spec, i.e.
this module), and peak RSS of fresh processes for memory (benchmarks/attention_memory.py). The kernels
are tested in tests/ops/test_window_attention.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from grin_testing import init_parallel, run_distributed

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import attention_memory  # noqa: E402


@pytest.mark.slow
def test_two_layer_grin_shaped_step_memory_within_1_5x_from_1024_to_4096():
    """The issue's bar: one training step of a 2-layer GRIN-shaped model (head dim 128, 4 q heads per KV
    head, window 2047, 16 experts; hidden 512) peaks within 1.5x at seq 4096 of seq 1024, and its
    activation memory grows no more than linearly. megatron's DotProductAttention fails both (1.8x, 6.3x
    measured, benchmarks/attention_memory.py model --attention-backend unfused)."""
    rows = {r["seq"]: r for r in attention_memory.measure("model", "--seqs", "1024", "4096")}
    assert {r["core_attention"] for r in rows.values()} == {"GrinCoreAttention"}
    short, long = rows[1024], rows[4096]
    assert long["step_peak_mib"] / short["step_peak_mib"] <= 1.5, rows
    assert long["fwd_bwd_peak_mib"] / short["fwd_bwd_peak_mib"] <= 1.5, rows
    activations = {s: r["fwd_bwd_peak_mib"] - r["after_build_mib"] for s, r in rows.items()}
    assert activations[4096] / activations[1024] <= 4.4, rows  # linear: <= 4x (+10 %); quadratic: ~16x


# ---------------------------------------------------------------------------------------------------
# megatron SelfAttention: GrinCoreAttention against DotProductAttention
# ---------------------------------------------------------------------------------------------------
SEQ, BATCH, HIDDEN, HEADS = 24, 2, 64, 8
CASES = {  # name: (num_query_groups, window_size, extra)
    "g8": (8, None, {}), "g2": (2, None, {}), "g1": (1, None, {}),
    "g8_win": (8, (4, 0), {}), "g2_win": (2, (4, 0), {}), "g1_win": (1, (4, 0), {}),
    "g2_win_covers_seq": (2, (30, 0), {}),
    "g2_win_mask": (2, (4, 0), {"mask": True}), "g2_mask": (2, None, {"mask": True}),
    "g2_win_selective_recompute": (2, (4, 0), {"recompute": True}),
    "g2_win_skip_freq": (2, (4, 0), {"skip_freq": 2}),
    "g2_win_bf16": (2, (4, 0), {"bf16": True}), "g2_bf16": (2, None, {"bf16": True}),
}


def _config(groups, window, extra=None, tp=1):
    from megatron.core.transformer.transformer_config import TransformerConfig

    extra = extra or {}
    dtype = torch.bfloat16 if extra.get("bf16") else torch.float32
    kw = dict(num_layers=2, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=groups,
              kv_channels=HIDDEN // HEADS, add_qkv_bias=True, add_bias_linear=False, attention_dropout=0.0,
              hidden_dropout=0.0, masked_softmax_fusion=False, window_size=window, use_cpu_initialization=True,
              params_dtype=dtype, bf16=dtype == torch.bfloat16, tensor_model_parallel_size=tp,
              sequence_parallel=False)
    if extra.get("recompute"):
        kw.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    if extra.get("skip_freq"):
        kw.update(window_attn_skip_freq=extra["skip_freq"])
    return TransformerConfig(**kw)


def _self_attention(cfg, core, layer_number):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    spec = ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                      submodules=SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear, core_attention=core,
                                                         linear_proj=RowParallelLinear, q_layernorm=IdentityOp,
                                                         k_layernorm=IdentityOp))
    return build_module(spec, config=cfg, layer_number=layer_number)


def _run_pair(cfg, extra, layer_number=1, seed=0):
    """Same weights and inputs through DotProductAttention and GrinCoreAttention: relative differences."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_grin.model.attention import GrinCoreAttention

    torch.manual_seed(seed)
    ref = _self_attention(cfg, DotProductAttention, layer_number)
    ours = _self_attention(cfg, ModuleSpec(module=GrinCoreAttention, params={"block_size": 8}), layer_number)
    with torch.no_grad():  # random biases so they matter
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=g).to(cfg.params_dtype)
    grad_out = torch.randn(SEQ, BATCH, HIDDEN, generator=g).to(cfg.params_dtype)
    rope = RotaryEmbedding(kv_channels=cfg.kv_channels, rotary_percent=1.0)(SEQ)
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1)[None, None] if extra.get("mask") else None
    results = []
    for module in (ref, ours):
        module.train()
        x = hidden.clone().requires_grad_()
        out, _ = module(x, attention_mask=mask, rotary_pos_emb=rope)
        out.backward(grad_out)
        results.append((out.double(), x.grad.double(), {n: p.grad.double() for n, p in module.named_parameters()}))
    (o_ref, x_ref, p_ref), (o_ours, x_ours, p_ours) = results
    rel = lambda a, b: ((a - b).norm() / (b.norm() + 1e-30)).item()  # noqa: E731
    return {"out": rel(o_ours, o_ref), "dx": rel(x_ours, x_ref),
            "dparams": max(rel(p_ours[n], p_ref[n]) for n in p_ref), "window_left": ours.core_attention.window_left,
            "state": list(ours.core_attention.state_dict())}


def _inference_cases():
    """core_attention called as megatron's static-batching inference does: sq != sk, decode (sq = 1)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_grin.model.attention import GrinCoreAttention

    out = {}
    for name, window, mask_type, sq in [("decode_win", (4, 0), AttnMaskType.no_mask, 1),
                                        ("chunk_win", (4, 0), AttnMaskType.no_mask, 3),
                                        ("decode_causal", None, AttnMaskType.causal, 1),
                                        ("chunk_no_mask", None, AttnMaskType.no_mask, 3)]:
        # megatron's DotProductAttention uses the constructor's mask type: give both the inference one
        kw = dict(config=_config(2, window), layer_number=1, attn_mask_type=mask_type, attention_type="self")
        g = torch.Generator().manual_seed(3)
        q = torch.randn(sq, BATCH, HEADS, HIDDEN // HEADS, generator=g)
        k, v = (torch.randn(20, BATCH, 2, HIDDEN // HEADS, generator=g) for _ in range(2))
        ref = DotProductAttention(**kw)(q, k, v, None, attn_mask_type=mask_type)
        out[name] = (ref - GrinCoreAttention(**kw)(q, k, v, None, attn_mask_type=mask_type)).abs().max().item()
    return out


def _refusals():
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_grin.model.attention import GrinCoreAttention

    kw = dict(layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    q, k = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 2, 8)
    m = GrinCoreAttention(config=_config(2, (4, 0)), **kw)
    calls = {
        "packed": lambda: m(q, k, k, None, packed_seq_params=PackedSeqParams(qkv_format="thd")),
        "bias": lambda: m(q, k, k, None, attention_bias=torch.zeros(1)),
        "dropout": lambda: GrinCoreAttention(config=_config(2, None), attention_dropout=0.1, **kw)(q, k, k, None),
        "right_window": lambda: GrinCoreAttention(config=_config(2, (4, 2)), **kw),
        "fused_on_cpu": lambda: GrinCoreAttention(config=_config(2, None), attention_backend="fused", **kw),
        "unfused_name": lambda: GrinCoreAttention(config=_config(2, None), attention_backend="unfused", **kw),
    }
    errors = {}
    for name, call in calls.items():
        try:
            call()
            errors[name] = None
        except (NotImplementedError, ValueError) as exc:
            errors[name] = str(exc)
    # attention dropout is a no-op in eval, in megatron too: allowed
    GrinCoreAttention(config=_config(2, None), attention_dropout=0.1, **kw).eval()(q, k, k, None)
    return errors


def _model_wiring():
    """build_model: which core attention each --attention-backend builds on the local spec, and the log line."""
    import logging

    from grin_testing import tiny_config
    from megatron_grin.model.build import build_model

    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("megatron_grin").addHandler(handler)
    logging.getLogger("megatron_grin").setLevel(logging.INFO)
    built = {}
    for backend in ("auto", "flash", "unfused", "local"):
        for var in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN"):  # megatron's GPTModel sets them
            os.environ.pop(var, None)
        model = build_model(tiny_config(num_layers=2, sliding_window=5, attention_backend=backend)).eval()
        built[backend] = sorted({type(layer.self_attention.core_attention).__name__ for layer in model.decoder.layers})
        if backend == "auto":
            for seq in (12, 4):  # the window (blockwise), then a sequence the window covers (SDPA)
                model(torch.randint(0, 97, (1, seq)), torch.arange(seq)[None], None)
    return built, records


def _recording_saved_storages(module, into: dict) -> None:
    """Make ``module``'s forward record {storage pointer: bytes} of every tensor autograd saves in it."""
    forward = module.forward

    def pack(t):
        into[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def recorded(*args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return forward(*args, **kwargs)

    module.forward = recorded


def _saved_bytes():
    """Bytes autograd keeps for the core attention of one SelfAttention layer, against the formula
    e*b*s*d*(hq + hkv + (hq + 2 hkv) + hq) + 4*b*hq*s: q and k after RoPE, the fused qkv output (kept
    alive by the v view), the output, the fp32 log-sum-exp; and whether linear_proj saves our output's
    storage (then the output costs nothing extra)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_grin.model.attention import GrinCoreAttention

    out, (s, b, hq, hkv, d) = {}, (64, 2, HEADS, 2, HIDDEN // HEADS)
    for name, window, bf16 in [("sdpa", None, False), ("blockwise", (7, 0), False), ("blockwise_bf16", (7, 0), True)]:
        module = _self_attention(_config(hkv, window, {"bf16": bf16}), ModuleSpec(module=GrinCoreAttention), 1)
        core_saved, proj_saved = {}, {}
        _recording_saved_storages(module.core_attention, core_saved)
        _recording_saved_storages(module.linear_proj, proj_saved)
        x = torch.randn(s, b, HIDDEN, dtype=module.config.params_dtype, requires_grad=True)
        module(x, attention_mask=None, rotary_pos_emb=RotaryEmbedding(kv_channels=d, rotary_percent=1.0)(s))
        e = 2 if bf16 else 4
        out[name] = (sum(core_saved.values()), e * b * s * d * (3 * hq + 3 * hkv) + 4 * b * hq * s,
                     bool(set(core_saved) & set(proj_saved)))
    return out


def _single_rank_worker(rank, world, port):
    init_parallel(rank, world, port)
    wiring = _model_wiring()  # first: the module logs each kernel choice once per process
    results = {name: _run_pair(_config(groups, window, extra), extra, layer_number=2 if extra.get("skip_freq") else 1)
               for name, (groups, window, extra) in CASES.items()}
    return results, _inference_cases(), _refusals(), wiring, _saved_bytes()


@pytest.fixture(scope="module")
def single_rank():
    return run_distributed(_single_rank_worker, 1)[0]


@pytest.mark.parametrize("name", list(CASES))
def test_self_attention_matches_dot_product_attention(single_rank, name):
    r = single_rank[0][name]
    groups, window, extra = CASES[name]
    tol = 2e-2 if extra.get("bf16") else 1e-5
    assert r["out"] < tol and r["dx"] < tol and r["dparams"] < tol, r
    assert r["window_left"] == (None if window is None or extra.get("skip_freq") else window[0])
    assert r["state"] == []  # no parameters or buffers: checkpoints are unchanged


def test_inference_shapes_match_dot_product_attention(single_rank):
    for name, err in single_rank[1].items():
        assert err < 1e-5, (name, err)


def test_unsupported_settings_are_refused_by_name(single_rank):
    for name, msg in single_rank[2].items():
        assert msg is not None and ("GrinCoreAttention" in msg or "--attention-backend" in msg), (name, msg)


def test_attention_backend_picks_the_core_attention_and_logs_it(single_rank):
    built, records = single_rank[3]
    assert built == {"auto": ["GrinCoreAttention"], "flash": ["GrinCoreAttention"],
                     "unfused": ["DotProductAttention"], "local": ["DotProductAttention"]}
    build_lines = [r for r in records if r.startswith("core attention:")]
    assert any("GrinCoreAttention" in r and "SDPA" in r and "blockwise kernel on cpu" in r
               for r in build_lines), records
    assert any("flash only" in r for r in build_lines), records
    assert any("DotProductAttention" in r for r in build_lines), records
    assert any("causal attention -> SDPA flash kernel (cpu float32)" in r for r in records), records


def test_saved_activations_per_layer_follow_the_formula(single_rank):
    for name, (measured, formula, output_shared_with_linear_proj) in single_rank[4].items():
        assert measured == formula, (name, measured, formula)
        assert output_shared_with_linear_proj, name


def _tp2_worker(rank, world, port):
    init_parallel(rank, world, port, tp=2)
    return {name: _run_pair(_config(g, w, tp=2), {})
            for name, (g, w) in {"g2_win": (2, (4, 0)), "g1_win": (1, (4, 0)), "g8": (8, None)}.items()}


@pytest.mark.slow
def test_tensor_parallel_2_matches_dot_product_attention():
    """Heads per partition come from the tensors, including num_query_groups < TP (one K/V head per rank).
    The whole model at TP=2 is covered in the default suite by tests/model/test_parallel.py."""
    for rank_result in run_distributed(_tp2_worker, 2):
        for name, r in rank_result.items():
            assert r["out"] < 1e-5 and r["dx"] < 1e-5 and r["dparams"] < 1e-5, (name, r)


def test_core_attention_spec_names():
    """--attention-backend -> core attention per spec flavour (Megatron-LM / Megatron-Bridge meanings)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_grin.model.attention import GrinCoreAttention
    from megatron_grin.model.spec import core_attention_spec

    for name in ("auto", "flash", "fused"):
        spec = core_attention_spec(name, use_te=False)
        assert spec.module is GrinCoreAttention and spec.params == {"attention_backend": name}
    assert core_attention_spec("unfused", use_te=False) is DotProductAttention
    assert core_attention_spec("local", use_te=False) is DotProductAttention
    assert core_attention_spec("local", use_te=True) is DotProductAttention
    with pytest.raises(ValueError, match="--attention-backend"):
        core_attention_spec("sdpa")
