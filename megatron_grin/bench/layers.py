"""``bench moe-layer`` and ``bench routing``: one GRIN MoE layer against a dense MLP, megatron and HF.

* ``moe-layer``: fwd+bwd of one GRIN MoE layer (GrinMoELayer + SparseMixerV2Router + each chosen expert
  backend) against a dense SwiGLU MLP with the same active FLOPs (ffn = top_k * expert ffn), megatron-core's
  own MoELayer (TopKRouter softmax top-k, dropless, SequentialMLP; TEGroupedMLP too with Transformer
  Engine) and transformers' PhimoeSparseMoeBlock in training mode.
* ``routing``: the routing alone (SparseMixer op, and the whole router) fwd+bwd, as a share of the layer.

Besides the expert backends of ``--grin-expert-backend``, ``--backends`` takes three variants of
``grouped_mm`` that pin its kernels: ``grouped_mm_forced`` (torch's grouped_mm, even where it is not the
default), ``grouped_triton`` (the Triton grouped GEMMs; the CUDA default run prints it beside grouped_mm)
and ``unfused`` (every fusion switch off: the PyTorch references of routing, jitter, permute and experts).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_grin.bench.harness import DTYPES, Case, run_cases
from megatron_grin.config import GrinConfig, have_transformer_engine
from megatron_grin.model import routing_rng
from megatron_grin.model.build import transformer_config
from megatron_grin.model.experts import experts_spec
from megatron_grin.model.grouped_experts import GroupedMMExperts
from megatron_grin.model.spec import default_use_te, grin_moe_spec
from megatron_grin.ops.backend import have_triton_kernels, use_triton
from megatron_grin.ops.routing import RoutingKey, sparsemixer_routing

#: --backends variants of "grouped_mm" that pin its kernels: (GroupedMMExperts' gemm, transformer-config overrides)
PINNED = {
    "grouped_mm_forced": ("grouped_mm", {}),
    "grouped_triton": ("triton", {}),
    "unfused": ("loop", {"grin_router_backend": "torch", "grin_permute_backend": "torch",
                         "grin_expert_fusion": "torch"}),
}

# ------------------------------------------------------------------------------------------------
# layer builders
# ------------------------------------------------------------------------------------------------
def _grin_config(args, **overrides):
    heads = max(1, args.hidden // 128)
    while args.hidden % heads:
        heads -= 1
    base = dict(num_layers=1, hidden_size=args.hidden, ffn_hidden_size=args.ffn, num_attention_heads=heads,
                num_query_groups=heads, num_experts=args.experts, moe_router_topk=args.topk,
                bf16=args.dtype == "bf16", input_jitter_eps=args.input_jitter, expert_backend="sequential")
    base.update(overrides)
    return GrinConfig(**base)


def _logit_bias(args, device) -> Optional[torch.Tensor]:
    """Skew routing: expert e gets logit bias -imbalance * e / (E - 1) (expert 0 is the favourite)."""
    if not args.imbalance:
        return None
    return -args.imbalance * torch.linspace(0, 1, args.experts, device=device)


def _bias_gating(router, bias: Optional[torch.Tensor]) -> None:
    if bias is None:
        return
    gating = router.gating
    router.gating = lambda x, _g=gating: _g(x) + bias


def build_ours(args, backend: str, device: str):
    """megatron MoELayer from the GRIN spec: GrinMoELayer + SparseMixerV2Router + the chosen experts."""
    gemm, overrides = PINNED.get(backend, (None, {}))
    expert_backend = "grouped_mm" if backend in PINNED else backend
    tconfig = transformer_config(_grin_config(args, expert_backend=expert_backend, router_variant=args.variant),
                                 **overrides)
    spec = grin_moe_spec(expert_backend, use_te=default_use_te())
    if gemm is not None:
        spec.submodules.experts = ModuleSpec(module=GroupedMMExperts, params={"gemm": gemm})
    layer = build_module(spec, config=tconfig, layer_number=1)
    layer.set_layer_number(1)
    _bias_gating(layer.router, _logit_bias(args, device))
    return layer.to(device).train()


def build_megatron(args, experts_backend: str, device: str):
    """megatron-core's MoELayer with its own TopKRouter (softmax, top-k, renormalised), dropless."""
    tconfig = dataclasses.replace(transformer_config(_grin_config(args, input_jitter_eps=0.0)),
                                  moe_grouped_gemm=experts_backend == "te_grouped")
    layer = MoELayer(tconfig, MoESubmodules(experts=experts_spec(experts_backend, default_use_te()),
                                            router=TopKRouter), layer_number=1)
    layer.set_layer_number(1)
    _bias_gating(layer.router, _logit_bias(args, device))
    return layer.to(device).train()


def dense_mlp_submodules(use_te: bool) -> MLPSubmodules:
    """megatron's SwiGLU MLP linears: Transformer Engine's where installed, else the local ones."""
    if use_te:
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

        return MLPSubmodules(linear_fc1=TEColumnParallelLinear, linear_fc2=TERowParallelLinear)
    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


def build_dense(args, device: str):
    """A dense SwiGLU MLP with ffn = top_k * expert ffn: the same active FLOPs on the same tokens."""
    ffn = args.topk * args.ffn
    tconfig = dataclasses.replace(transformer_config(_grin_config(args)), num_moe_experts=None, ffn_hidden_size=ffn,
                                  moe_ffn_hidden_size=None)
    return MLP(tconfig, dense_mlp_submodules(default_use_te()), ffn_hidden_size=ffn).to(device).train()


def build_hf(args, device: str):
    """transformers' PhimoeSparseMoeBlock (training mode, default experts implementation unless set)."""
    from transformers import PhimoeConfig
    from transformers.models.phimoe.modeling_phimoe import PhimoeSparseMoeBlock

    config = PhimoeConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_local_experts=args.experts,
                          num_experts_per_tok=args.topk, router_jitter_noise=0.01,
                          input_jitter_noise=args.input_jitter, num_hidden_layers=1)
    if args.hf_experts != "eager":
        config._experts_implementation = args.hf_experts
    block = PhimoeSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    bias = _logit_bias(args, "cpu")
    if bias is not None:
        block.router.bias = torch.nn.Parameter(bias, requires_grad=False)
    return block.to(device=device, dtype=DTYPES[args.dtype]).train()


def _layer_case(name: str, role: str, module, x_SBH: torch.Tensor, grad_SBH: torch.Tensor, hf: bool = False) -> Case:
    def step():
        x = x_SBH.detach().requires_grad_()
        if hf:  # HF jitters its input in place: give it a non-leaf, in its [B, S, H] layout
            out = module(x.transpose(0, 1).clone())
            out.backward(grad_SBH.transpose(0, 1))
        else:
            out = module(x)
            (out[0] if isinstance(out, tuple) else out).backward(grad_SBH)

    return Case(name, step, lambda: module.zero_grad(set_to_none=True), role)


# ------------------------------------------------------------------------------------------------
# bench moe-layer
# ------------------------------------------------------------------------------------------------
def _available_backends(requested: list[str], device: str = "cpu") -> list[str]:
    out = []
    for b in requested:
        if b == "te_grouped" and not have_transformer_engine():
            print("[bench] skipping backend te_grouped: Transformer Engine is not installed", file=sys.stderr)
            continue
        if b == "grouped_triton" and not have_triton_kernels(torch.device(device)):
            print("[bench] skipping backend grouped_triton: needs triton and CUDA (or TRITON_INTERPRET=1)",
                  file=sys.stderr)
            continue
        out.append(b)
    return out


def _label(backend: str, layer, x_SBH: torch.Tensor) -> str:
    """"GRIN MoE (backend)" plus the expert kernels GroupedMMExperts runs on these inputs."""
    kernels = getattr(layer.experts, "kernels", None)
    if kernels is None:
        return f"GRIN MoE ({backend})"
    x_TH = x_SBH.reshape(-1, x_SBH.shape[-1])
    gemm, swiglu = kernels(x_TH)
    swiglu = "" if gemm == "loop" else f"{_resolved(x_TH, swiglu)} SwiGLU, "
    return f"GRIN MoE ({backend}: {gemm} GEMMs, {swiglu}{_resolved(x_TH, layer.router.backend)} routing)"


def _resolved(x: torch.Tensor, backend: str) -> str:
    return "triton" if use_triton(x, backend, "bench") else "torch"


def _inputs(args, device):
    seq = args.seq_length if args.tokens % args.seq_length == 0 else args.tokens
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(seq, args.tokens // seq, args.hidden, generator=gen).to(device=device, dtype=DTYPES[args.dtype])
    grad = torch.randn(x.shape, generator=gen).to(device=device, dtype=DTYPES[args.dtype])
    return x, grad


def moe_layer_cases(args, device: str):
    """(cases, ours-modules-by-name) for the layer comparison."""
    x, grad = _inputs(args, device)
    cases, ours = [], {}
    if "dense" in args.baselines:
        cases.append(_layer_case("dense SwiGLU MLP (ffn=top_k*F)", "dense", build_dense(args, device), x, grad))
    for backend in _available_backends(args.backends, device):
        layer = build_ours(args, backend, device)
        ours[backend] = layer
        cases.append(_layer_case(_label(backend, layer, x), "ours", layer, x, grad))
    if "megatron" in args.baselines:
        cases.append(_layer_case("megatron MoELayer (TopKRouter, SequentialMLP)", "megatron",
                                 build_megatron(args, "sequential", device), x, grad))
        if _available_backends(["te_grouped"]):
            cases.append(_layer_case("megatron MoELayer (TopKRouter, TEGroupedMLP)", "megatron",
                                     build_megatron(args, "te_grouped", device), x, grad))
    if "hf" in args.baselines:
        cases.append(_layer_case(f"HF PhimoeSparseMoeBlock ({args.hf_experts})", "hf", build_hf(args, device), x, grad,
                                 hf=True))
    return cases, ours


def _load_stats(layer) -> dict:
    """Routing load seen by our router during the timed steps (tokens per expert max / mean, ...)."""
    stats = getattr(layer.router, "stats", None)
    if stats is None:
        return {}
    num_experts = layer.config.num_moe_experts
    vector = stats.as_tensor().cpu()
    summary = type(stats).summarize(vector, num_experts)
    mean = float(vector[:num_experts].mean())
    summary["tokens_per_expert_max_over_mean"] = summary["tokens_per_expert_max"] / mean if mean else 0.0
    return summary


def cmd_moe_layer(args, device: str) -> dict:
    cases, ours = moe_layer_cases(args, device)
    for layer in ours.values():
        layer.router.stats.reset()
    rows = run_cases(args, cases, device)
    load = {backend: _load_stats(layer) for backend, layer in ours.items()}
    return {"rows": rows, "routing_load": load}


# ------------------------------------------------------------------------------------------------
# bench routing
# ------------------------------------------------------------------------------------------------
def _routing_op_case(name: str, backend: str, args, device: str, x_TH, weight_EH, token_ids) -> Case:
    variant = args.variant
    gen = torch.Generator(device="cpu").manual_seed(2)
    grad_TE = torch.randn(x_TH.shape[0], args.experts, generator=gen).to(device)
    step_state = {"microbatch": 0}
    logits_TE = (x_TH.float() @ weight_EH.t()).detach()  # the op starts from logits: no gating GEMM timed

    def step():
        logits = logits_TE.clone().requires_grad_()
        key = RoutingKey(token_ids, seed=1234, iteration=0, layer_number=1, microbatch=step_state["microbatch"],
                         stream=routing_rng.STREAM_ROUTING)
        step_state["microbatch"] += 1
        weights, experts, _ = sparsemixer_routing(logits, 0.01, args.topk, True, key, variant, backend=backend)
        probs = torch.zeros_like(logits).scatter(1, experts, weights)
        probs.backward(grad_TE)

    return Case(name, step, role="routing-op")


def _router_case(name: str, router, x_SBH, device: str) -> Case:
    """fwd+bwd of a router as its MoE layer calls it: ours [T, K] picks (route_tokens), megatron's [T, E]."""
    ours = hasattr(router, "route_tokens")
    width = router.config.moe_router_topk if ours else router.config.num_moe_experts
    gen = torch.Generator(device="cpu").manual_seed(3)
    grad = torch.randn(x_SBH.shape[0] * x_SBH.shape[1], width, generator=gen).to(device)

    def step():
        x = x_SBH.detach().requires_grad_()
        probs = router.route_tokens(x)[1] if ours else router(x)[0]
        probs.backward(grad)

    return Case(name, step, lambda: router.zero_grad(set_to_none=True), "router")


def cmd_routing(args, device: str) -> dict:
    x, grad = _inputs(args, device)
    backend = args.backends[0]
    ours = build_ours(args, backend, device)
    x_TH = x.reshape(-1, args.hidden)
    token_ids = torch.arange(x_TH.shape[0], device=device)
    weight = ours.router.weight.detach().float()
    no_jitter = argparse.Namespace(**{**vars(args), "input_jitter": 0.0})
    cases = [_layer_case(_label(backend, ours, x), "layer", ours, x, grad),
             _router_case("SparseMixerV2Router fwd+bwd (gating, jitter, routing, stats)", ours.router, x, device),
             _router_case("SparseMixerV2Router fwd+bwd, input jitter off (gating, routing, stats)",
                          build_ours(no_jitter, backend, device).router, x, device),
             _router_case("megatron TopKRouter fwd+bwd", build_megatron(args, "sequential", device).router, x, device),
             _routing_op_case("SparseMixer-v2 routing op from logits (Philox draws, mask, sampling, Heun), torch",
                              "torch", args, device, x_TH, weight, token_ids)]
    if device == "cuda" and have_triton_kernels(torch.device(device)):
        cases += [_router_case("SparseMixerV2Router fwd+bwd, unfused (--no-moe-router-fusion)",
                               build_ours(args, "unfused", device).router, x, device),
                  _routing_op_case("SparseMixer-v2 routing op from logits, triton", "triton", args, device, x_TH,
                                   weight, token_ids)]
    args.no_memory = True
    rows = run_cases(args, cases, device)
    layer_ms = rows[0]["median_ms"]
    for row in rows:
        row["share_of_layer"] = row["median_ms"] / layer_ms
        row.pop("ratio_to_dense", None)
    return {"rows": rows}
