"""``bench model``: a few-layer GRIN model and a dense GPT with the same active parameters, in one run.

The dense GPT is GRIN's block with the MoE layer replaced by one SwiGLU MLP of ffn = top_k x expert ffn
(on GPU: GRIN's dense 6.6B at 4 layers, the same attention and ffn 2 x 6400), so the two differ only by
the router's parameters: MoE/dense throughput is the comparison of GRIN's Table 3 (86.56 % on 64 H100).
Both step fwd+bwd on the same tokens, interleaved; the table gives tokens/s, throughput relative to the
dense model, MFU (accounting's FLOPs convention, each model its own FLOPs) and, on CUDA, peak memory.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_grin import accounting
from megatron_grin.bench.harness import Case, run_cases
from megatron_grin.bench.layers import PINNED, dense_mlp_submodules
from megatron_grin.config import GrinConfig
from megatron_grin.model.build import build_model, transformer_config
from megatron_grin.model.grouped_experts import GroupedMMExperts
from megatron_grin.model.spec import default_use_te
from megatron_grin.training.metrics import peak_flops_per_device


def model_config(args) -> GrinConfig:
    """The GRIN model of the run: ``--num-layers`` layers at the bench's shapes."""
    heads = args.heads or max(1, args.hidden // 128)
    backend = "grouped_mm" if args.backends[0] in PINNED else args.backends[0]
    return GrinConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                      num_attention_heads=heads, num_query_groups=args.query_groups or heads,
                      num_experts=args.experts, moe_router_topk=args.topk, vocab_size=args.vocab,
                      max_position_embeddings=args.seq_length, sliding_window=None, bf16=args.dtype == "bf16",
                      expert_backend=backend, router_variant=args.variant,
                      input_jitter_eps=args.input_jitter).validate()


def build_grin(args, cfg: GrinConfig, device: str):
    """The GRIN model; a pinned ``grouped_mm`` variant of --backends (bench.layers.PINNED) pins its kernels."""
    gemm, overrides = PINNED.get(args.backends[0], (None, {}))
    model = build_model(cfg, **overrides)
    if gemm is not None:
        for module in model.modules():
            if isinstance(module, GroupedMMExperts):
                module.gemm = gemm
    return model.to(device).train()


def build_dense_gpt(cfg: GrinConfig, device: str):
    """GRIN's block with a dense SwiGLU MLP of ffn = top_k x expert ffn instead of the MoE layer."""
    ffn = cfg.moe_router_topk * cfg.ffn_hidden_size
    tconfig = dataclasses.replace(transformer_config(cfg), num_moe_experts=None, ffn_hidden_size=ffn,
                                  moe_ffn_hidden_size=None)
    mlp = ModuleSpec(module=MLP, submodules=dense_mlp_submodules(default_use_te()))
    return build_model(cfg, tconfig=tconfig, mlp_spec=mlp).to(device).train()


def dense_flops_per_token(cfg: GrinConfig, seq_length: int) -> float:
    """The dense GPT's training FLOPs per token: GRIN's active FLOPs without the routers' GEMMs."""
    router = accounting.layer_parameters(cfg)["router"]
    return accounting.flops_per_token(cfg, seq_length)["total"] - 6.0 * cfg.num_layers * router


def _model_case(name: str, role: str, model, batch: dict) -> Case:
    def step():
        model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).float().mean().backward()

    return Case(name, step, lambda: model.zero_grad(set_to_none=True), role)


def cmd_model(args, device: str) -> dict:
    cfg = model_config(args)
    batch_size = max(1, args.tokens // args.seq_length)
    gen = torch.Generator(device="cpu").manual_seed(4)
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, args.seq_length), generator=gen).to(device)
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1),
             "position_ids": torch.arange(args.seq_length, device=device).unsqueeze(0).expand(batch_size, -1)}
    dense, grin = build_dense_gpt(cfg, device), build_grin(args, cfg, device)
    cases = [_model_case(f"dense GPT, {args.layers} layers (SwiGLU ffn {cfg.moe_router_topk * cfg.ffn_hidden_size})",
                         "dense", dense, batch),
             _model_case(f"GRIN model, {args.layers} layers ({args.backends[0]})", "model", grin, batch)]
    if device != "cuda":
        args.no_memory = True  # the CPU profiler's memory timeline of a whole model costs more than the run
    rows = run_cases(args, cases, device)
    peak_flops, source = peak_flops_per_device(cfg, args.peak_tflops, device)
    tokens_per_step = batch_size * args.seq_length
    per_token = {"dense": dense_flops_per_token(cfg, args.seq_length),
                 "model": accounting.flops_per_token(cfg, args.seq_length)["total"]}
    for row in rows:
        seconds = row["median_ms"] / 1e3
        row["tokens_per_step"] = tokens_per_step
        row["tokens_per_s"] = tokens_per_step / seconds
        row["model_tflops_per_step"] = per_token[row["role"]] * tokens_per_step / 1e12
        row["achieved_tflops"] = row["model_tflops_per_step"] / seconds
        row["peak_tflops"], row["peak_source"] = peak_flops / 1e12, source
        row["mfu"] = row["achieved_tflops"] / row["peak_tflops"] if peak_flops else None
        row["throughput_vs_dense"] = rows[0]["median_ms"] / row["median_ms"]
    parameters = {name: sum(p.numel() for p in m.parameters()) for name, m in (("dense", dense), ("grin", grin))}
    return {"rows": rows, "model": dataclasses.asdict(cfg), "parameters": parameters,
            "moe_over_dense_throughput": rows[1]["throughput_vs_dense"]}
