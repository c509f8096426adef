"""Benchmarks: ``megatron-grin bench moe-layer|routing|model`` (also ``python -m megatron_grin.bench.cli``).

* ``moe-layer``: fwd+bwd of one GRIN MoE layer (GrinMoELayer + SparseMixerV2Router + each chosen expert
  backend) against a dense SwiGLU MLP with the same active FLOPs (ffn = top_k * expert ffn), megatron-core's
  own MoELayer (TopKRouter softmax top-k, dropless, SequentialMLP; TEGroupedMLP too with Transformer
  Engine) and transformers' PhimoeSparseMoeBlock in training mode.
* ``routing``: the routing alone (SparseMixer op, and the whole router) fwd+bwd, as a share of the layer.
* ``model``: tokens/s and MFU of a few-layer GRIN model (model.build_model + a fwd/bwd loop).

Every implementation runs in this one process, interleaved (the order rotates each repetition), after a
warm-up; we report the median and the min-max spread, write JSON plus a markdown table, and print ratios to
the dense reference. Peak memory is measured in a separate, untimed step per implementation.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import shlex
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import package_info, parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import MemoryProfileTimeline

from megatron_grin import compat
from megatron_grin.config import GrinConfig, have_transformer_engine
from megatron_grin.model import routing_rng
from megatron_grin.model.build import build_model, parameter_counts, transformer_config
from megatron_grin.model.experts import experts_spec
from megatron_grin.model.grouped_experts import GroupedMMExperts
from megatron_grin.model.spec import default_use_te, grin_moe_spec
from megatron_grin.ops.routing import RoutingKey, have_triton_kernels, sparsemixer_routing

DEFAULT_SHAPES = {  # GPU: GRIN's own shapes; CPU: the same proportions, scaled to finish in minutes
    "cpu": dict(hidden=512, ffn=800, experts=16, topk=2, tokens=16384, dtype="fp32"),
    "cuda": dict(hidden=4096, ffn=6400, experts=16, topk=2, tokens=16384, dtype="bf16"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GPU_PEAK_TFLOPS_BF16 = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "B200": 2250.0}


# ------------------------------------------------------------------------------------------------
# process setup and environment
# ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_megatron(device: str, seed: int = 0) -> None:
    """compat + a world-1 process group + megatron parallel state (idempotent)."""


    compat.apply()
    if device == "cuda":
        torch.cuda.set_device(0)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def allocator() -> str:
    """'glibc' (the default), 'jemalloc' (preloaded) or 'caching' (jemalloc that never returns memory:
    MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1, so no page faults after warm-up)."""
    preloaded = "jemalloc" in os.environ.get("LD_PRELOAD", "")
    try:
        with open("/proc/self/maps") as maps:
            preloaded = preloaded or "jemalloc" in maps.read()
    except OSError:
        pass
    if not preloaded:
        return "glibc"
    conf = os.environ.get("MALLOC_CONF", "")
    return "caching" if "dirty_decay_ms:-1" in conf and "muzzy_decay_ms:-1" in conf else "jemalloc"


def environment(device: str) -> dict:
    import transformers

    info = {"torch": torch.__version__, "megatron_core": package_info.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "device": device, "threads": torch.get_num_threads(), "allocator": allocator(),
            "LD_PRELOAD": os.environ.get("LD_PRELOAD", ""),
            "MALLOC_CONF": os.environ.get("MALLOC_CONF", ""), "hostname": platform.node()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        try:
            with open("/proc/cpuinfo") as f:
                info["cpu"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
        except OSError:
            info["cpu"] = platform.processor()
        info["cpu_count"] = os.cpu_count()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


# ------------------------------------------------------------------------------------------------
# timing and memory
# ------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One implementation: ``step()`` runs fwd+bwd once; ``reset()`` drops grads between steps."""

    name: str
    step: Callable[[], None]
    reset: Callable[[], None] = lambda: None
    role: str = ""  # "dense", "ours", "megatron", "hf", ...


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _minor_faults() -> int:
    try:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except OSError:
        return 0


def time_interleaved(cases: list[Case], warmup: int, reps: int, device: str) -> dict[str, dict[str, list[float]]]:
    """Wall and process-CPU seconds (and minor page faults) per step for every case; each repetition runs
    all cases, starting at a rotating offset. CPU time (all threads) does not count the time other
    processes hold the cores; page faults show what the allocator costs (glibc unmaps blocks > 32 MiB)."""
    samples = {c.name: {"wall": [], "cpu": [], "faults": []} for c in cases}
    for rep in range(warmup + reps):
        shift = rep % len(cases)
        for case in cases[shift:] + cases[:shift]:
            _sync(device)
            faults, wall, cpu = _minor_faults(), time.perf_counter(), time.process_time()
            case.step()
            _sync(device)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            faults = _minor_faults() - faults
            case.reset()
            if rep >= warmup:
                samples[case.name]["wall"].append(wall)
                samples[case.name]["cpu"].append(cpu)
                samples[case.name]["faults"].append(faults)
    return samples


def peak_memory(case: Case, device: str) -> dict:
    """Peak bytes during one fwd+bwd: CUDA allocator stats, or the CPU profiler's memory timeline.

    ``peak_bytes`` counts everything live (weights, grads, inputs); ``step_peak_bytes`` subtracts what was
    live before the step, i.e. activations, temporaries and the gradients the step creates.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        case.step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        case.reset()
        return {"peak_bytes": peak, "step_peak_bytes": peak - base}
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            case.step()
        case.reset()
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
        totals = [sum(s) for s in sizes]
        return {"peak_bytes": max(totals), "step_peak_bytes": max(totals) - totals[0]}
    except Exception as err:  # the profiler's memory timeline is a private API: degrade, don't fail
        case.reset()
        return {"peak_bytes": None, "step_peak_bytes": None, "error": repr(err)}


def summarize(samples: dict[str, list[float]], clock: str) -> dict:
    """median / min / max in ms of the chosen clock, plus both clocks' samples."""
    ms = [s * 1e3 for s in samples[clock]]
    return {"clock": clock, "median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms),
            "wall_median_ms": statistics.median(samples["wall"]) * 1e3,
            "cpu_median_ms": statistics.median(samples["cpu"]) * 1e3,
            "samples_ms": ms, "wall_samples_ms": [s * 1e3 for s in samples["wall"]],
            "cpu_samples_ms": [s * 1e3 for s in samples["cpu"]],
            "page_faults_per_step": statistics.median(samples["faults"]) if samples.get("faults") else None}


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




    forced = backend == "grouped_mm_forced"  # GroupedMMExperts forced onto torch grouped_mm (even on CPU)
    cfg = _grin_config(args, expert_backend="grouped_mm" if forced else backend, router_variant=args.variant)
    tconfig = transformer_config(cfg)
    spec = grin_moe_spec("grouped_mm" if forced else backend, use_te=default_use_te())
    if forced:
        spec.submodules.experts = ModuleSpec(module=GroupedMMExperts, params={"use_grouped_mm": True})
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


def build_dense(args, device: str):
    """A dense SwiGLU MLP with ffn = top_k * expert ffn: the same active FLOPs on the same tokens."""


    if default_use_te():
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear as fc1
        from megatron.core.extensions.transformer_engine import TERowParallelLinear as fc2
    else:
        fc1, fc2 = ColumnParallelLinear, RowParallelLinear
    ffn = args.topk * args.ffn
    tconfig = dataclasses.replace(transformer_config(_grin_config(args)), num_moe_experts=None, ffn_hidden_size=ffn,
                                  moe_ffn_hidden_size=None)
    return MLP(tconfig, MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2), ffn_hidden_size=ffn).to(device).train()


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
def _available_backends(requested: list[str]) -> list[str]:
    out = []
    for b in requested:
        if b == "te_grouped" and not have_transformer_engine():
            print("[bench] skipping backend te_grouped: Transformer Engine is not installed", file=sys.stderr)
            continue
        out.append(b)
    return out


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
    for backend in _available_backends(args.backends):
        layer = build_ours(args, backend, device)
        ours[backend] = layer
        cases.append(_layer_case(f"GRIN MoE ({backend})", "ours", layer, x, grad))
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


def run_cases(args, cases: list[Case], device: str) -> list[dict]:
    samples = time_interleaved(cases, args.warmup, args.reps, device)
    rows = []
    dense = next((c for c in cases if c.role == "dense"), None)
    dense_ms = statistics.median(samples[dense.name][args.clock]) * 1e3 if dense else None
    for case in cases:
        row = {"name": case.name, "role": case.role, **summarize(samples[case.name], args.clock)}
        row["ratio_to_dense"] = row["median_ms"] / dense_ms if dense_ms else None
        rows.append(row)
    if not args.no_memory:
        for case, row in zip(cases, rows):
            row.update(peak_memory(case, device))
    return rows


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
    variant = "v2_star" if args.variant == "sparsemixer_v2_star" else "v2"
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
    gen = torch.Generator(device="cpu").manual_seed(3)
    grad = torch.randn(x_SBH.shape[0] * x_SBH.shape[1], router.config.num_moe_experts, generator=gen).to(device)

    def step():
        x = x_SBH.detach().requires_grad_()
        probs, _ = router(x)
        probs.backward(grad)

    return Case(name, step, lambda: router.zero_grad(set_to_none=True), "router")


def cmd_routing(args, device: str) -> dict:
    x, grad = _inputs(args, device)
    backend = args.backends[0]
    ours = build_ours(args, backend, device)
    megatron = build_megatron(args, "sequential", device)
    x_TH = x.reshape(-1, args.hidden)
    token_ids = torch.arange(x_TH.shape[0], device=device)
    weight = ours.router.weight.detach().float()
    cases = [_layer_case(f"GRIN MoE layer ({backend})", "layer", ours, x, grad),
             _router_case("SparseMixerV2Router fwd+bwd (gating, jitter, routing, stats)", ours.router, x, device),
             _router_case("SparseMixerV2Router fwd+bwd, input jitter off (gating, routing, stats)",
                          build_ours(argparse.Namespace(**{**vars(args), "input_jitter": 0.0}), backend, device).router,
                          x, device),
             _router_case("megatron TopKRouter fwd+bwd", megatron.router, x, device),
             _routing_op_case("SparseMixer-v2 routing op from logits (Philox draws, mask, sampling, Heun), torch",
                              "torch", args, device, x_TH, weight, token_ids)]
    if have_triton_kernels(torch.device(device)) and device == "cuda":
        cases.append(_routing_op_case("SparseMixer-v2 routing op from logits, triton", "triton", args, device, x_TH, weight,
                                      token_ids))
    args.no_memory = True
    rows = run_cases(args, cases, device)
    layer_ms = rows[0]["median_ms"]
    for row in rows:
        row["share_of_layer"] = row["median_ms"] / layer_ms
        row.pop("ratio_to_dense", None)
    return {"rows": rows}


# ------------------------------------------------------------------------------------------------
# bench model
# ------------------------------------------------------------------------------------------------
def model_flops_per_token(cfg, seq_length: int) -> float:
    """fwd+bwd FLOPs per token: 6 x active matmul parameters (incl. router and lm head, not the embedding
    lookup) + 12 x layers x seq x attention width (QK^T and AV over the full sequence, PaLM's convention)."""

    counts = parameter_counts(cfg)
    h = cfg.hidden_size
    embedding = cfg.vocab_size * h
    norms_and_biases = cfg.num_layers * (2 * 2 * h) + 2 * h + cfg.vocab_size
    active_matmul = counts["active"] - embedding - norms_and_biases
    return 6.0 * active_matmul + 12.0 * cfg.num_layers * seq_length * cfg.num_attention_heads * cfg.head_dim


def measured_gemm_tflops(device: str, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Achievable GEMM throughput here (the CPU MFU denominator): a square n x n x n matmul."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    (a @ b).sum().item()
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def cmd_model(args, device: str) -> dict:
    heads = args.heads or max(1, args.hidden // 128)
    cfg = GrinConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                     num_attention_heads=heads, num_query_groups=args.query_groups or heads,
                     num_experts=args.experts, moe_router_topk=args.topk, vocab_size=args.vocab,
                     max_position_embeddings=args.seq_length, sliding_window=None, bf16=args.dtype == "bf16",
                     expert_backend=args.backends[0], router_variant=args.variant).validate()
    model = build_model(cfg).to(device).train()
    batch = max(1, args.tokens // args.seq_length)
    gen = torch.Generator(device="cpu").manual_seed(4)
    tokens = torch.randint(0, cfg.vocab_size, (batch, args.seq_length), generator=gen).to(device)
    labels = torch.roll(tokens, -1, 1)
    pos = torch.arange(args.seq_length, device=device).unsqueeze(0).expand(batch, -1)

    def step():
        model(tokens, pos, None, labels=labels).float().mean().backward()

    case = Case(f"GRIN model, {args.layers} layers ({args.backends[0]})", step,
                lambda: model.zero_grad(set_to_none=True), "model")
    args.no_memory = True
    row = run_cases(args, [case], device)[0]
    tokens_per_step = batch * args.seq_length
    flops = model_flops_per_token(cfg, args.seq_length) * tokens_per_step
    row["tokens_per_step"] = tokens_per_step
    row["tokens_per_s"] = tokens_per_step / (row["median_ms"] / 1e3)
    row["model_tflops_per_step"] = flops / 1e12
    row["achieved_tflops"] = flops / (row["median_ms"] / 1e3) / 1e12
    if args.peak_tflops:
        peak, source = args.peak_tflops, "--peak-tflops"
    elif device == "cuda":
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in GPU_PEAK_TFLOPS_BF16.items() if k in name), None)
        source = f"datasheet dense bf16 for {name}"
    else:
        peak, source = measured_gemm_tflops(device, DTYPES[args.dtype]), "measured 2048^3 GEMM on this machine"
    row["peak_tflops"], row["peak_source"] = peak, source
    row["mfu"] = row["achieved_tflops"] / peak if peak else None
    return {"rows": [row], "model": dataclasses.asdict(cfg)}


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
def _fmt_bytes(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f}"


def markdown_table(kind: str, result: dict) -> str:
    rows = result["rows"]
    clock = rows[0].get("clock", "wall")
    other = "cpu" if clock == "wall" else "wall"
    if kind == "moe-layer":
        lines = [f"| implementation | {clock} median ms | min-max ms | x dense | {other} median ms | "
                 "page faults/step | peak MiB | step peak MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            ratio = f"{r['ratio_to_dense']:.3f}" if r.get("ratio_to_dense") else "-"
            faults = r.get("page_faults_per_step")
            lines.append(f"| {r['name']} | {r['median_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f} | {ratio} | "
                         f"{r[f'{other}_median_ms']:.1f} | {'n/a' if faults is None else f'{faults:.0f}'} | "
                         f"{_fmt_bytes(r.get('peak_bytes'))} | {_fmt_bytes(r.get('step_peak_bytes'))} |")
    elif kind == "routing":
        lines = [f"| what | {clock} median ms | min-max ms | share of layer |", "|---|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['name']} | {r['median_ms']:.2f} | {r['min_ms']:.2f}-{r['max_ms']:.2f} | "
                         f"{100 * r['share_of_layer']:.1f}% |")
    else:
        lines = [f"| model | {clock} median ms/step | min-max ms | tokens/s | achieved TFLOP/s | peak TFLOP/s | MFU |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
            peak = f"{r['peak_tflops']:.2f}" if r.get("peak_tflops") else "n/a"
            lines.append(f"| {r['name']} | {r['median_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f} | "
                         f"{r['tokens_per_s']:.0f} | {r['achieved_tflops']:.3f} | {peak} | {mfu} |")
    return "\n".join(lines)


def write_results(kind: str, result: dict, out_dir: Optional[str], name: Optional[str]) -> list[str]:
    if not out_dir:
        return []
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, name or f"{kind}-{result['meta']['device']}-{result['meta']['dtype']}-"
                                         f"{result['meta']['environment']['allocator']}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    meta = result["meta"]
    with open(stem + ".md", "w") as f:
        f.write(f"# bench {kind}\n\n`{meta['command']}`\n\n{meta['shape_line']}\n\n{markdown_table(kind, result)}\n")
    return [stem + ".json", stem + ".md"]


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--hidden", type=int, help="hidden size (default: 4096 on GPU, 512 on CPU)")
    p.add_argument("--ffn", type=int, help="expert ffn size (default: 6400 on GPU, 800 on CPU)")
    p.add_argument("--experts", type=int, help="number of experts (default 16)")
    p.add_argument("--topk", type=int, help="experts per token (default 2)")
    p.add_argument("--tokens", type=int, help="tokens per step (default 16384)")
    p.add_argument("--seq-length", type=int, default=4096, help="sequence length; tokens = seq x batch")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--backends", default="sequential,grouped_mm,te_grouped",
                   help="comma-separated GRIN expert backends (te_grouped is skipped without Transformer Engine; "
                        "grouped_mm_forced = grouped_mm on torch's grouped_mm kernel even where it is not the default)")
    p.add_argument("--variant", choices=["sparsemixer_v2", "sparsemixer_v2_star"], default="sparsemixer_v2")
    p.add_argument("--input-jitter", type=float, default=0.01, help="GRIN's multiplicative input jitter (0 = off)")
    p.add_argument("--imbalance", type=float, default=0.0,
                   help="router logit bias -imbalance*e/(E-1) on expert e, to skew routing (0 = none)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="what the table reports: wall time, or process CPU time (robust on a shared machine, "
                        "best with --threads 1); both are always saved in the JSON")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--out-dir", default="benchmarks/results", help="where JSON + markdown go ('' = don't write)")
    p.add_argument("--name", help="output file stem (default: <kind>-<device>-<dtype>-<allocator>)")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-grin bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    layer = sub.add_parser("moe-layer", help="one MoE layer fwd+bwd vs dense, megatron MoELayer and HF Phimoe")
    _add_common(layer)
    layer.add_argument("--baselines", default="dense,megatron,hf", help="comma-separated: dense, megatron, hf")
    layer.add_argument("--hf-experts", default="eager", choices=["eager", "grouped_mm", "batched_mm"],
                       help="transformers experts implementation for the HF block")
    routing = sub.add_parser("routing", help="routing fwd+bwd alone, as a share of the layer")
    _add_common(routing)
    model = sub.add_parser("model", help="tokens/s and MFU of a few-layer GRIN model")
    _add_common(model)
    model.add_argument("--layers", type=int, default=4)
    model.add_argument("--heads", type=int, help="attention heads (default hidden/128)")
    model.add_argument("--query-groups", type=int, help="GQA groups (default: heads)")
    model.add_argument("--vocab", type=int, default=32064)
    model.add_argument("--peak-tflops", type=float, help="MFU denominator (default: datasheet on GPU, measured GEMM on CPU)")
    return parser


def _resolve(args) -> str:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    defaults = DEFAULT_SHAPES[device]
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.clock == "cpu" and device == "cuda":
        raise SystemExit("--clock cpu measures host CPU time: use it for CPU runs only")
    if args.kind == "model" and args.tokens == defaults["tokens"] and device == "cpu":
        args.tokens = 4096  # a few-layer model with a 32k vocab: keep the CPU run to seconds per step
    if args.kind == "model" and device == "cpu" and args.seq_length == 4096:
        args.seq_length = 1024
    args.backends = [b for b in args.backends.split(",") if b]
    if hasattr(args, "baselines"):
        args.baselines = [b for b in args.baselines.split(",") if b]
    if args.threads:
        torch.set_num_threads(args.threads)
    return device


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry (``megatron-grin bench ...``): run, print, write; exit status 0."""
    run(argv)
    return 0


def run(argv: Optional[list[str]] = None) -> dict:
    """Run one benchmark; returns the result dict that is also written as JSON."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    device = _resolve(args)
    setup_megatron(device, args.seed)
    command = {"moe-layer": cmd_moe_layer, "routing": cmd_routing, "model": cmd_model}[args.kind]
    load_before = os.getloadavg()
    result = command(args, device)
    shape_line = (f"hidden {args.hidden}, expert ffn {args.ffn}, {args.experts} experts, top-{args.topk}, "
                  f"{args.tokens} tokens, {args.dtype}, {device}, {torch.get_num_threads()} threads, imbalance "
                  f"{args.imbalance}, {args.warmup} warm-up + {args.reps} timed reps, {args.clock} time "
                  f"(median, min-max)")
    result["meta"] = {"kind": args.kind, "command": "megatron-grin bench " + shlex.join(argv),
                      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "device": device, "dtype": args.dtype, "shape_line": shape_line,
                      "args": {k: v for k, v in vars(args).items()}, "environment": environment(device),
                      # other work on a shared machine shows up here, and in the min-max spread
                      "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg()}
    table = markdown_table(args.kind, result)
    print(f"\n{shape_line}\nallocator: {result['meta']['environment']['allocator']}, "
          f"threads: {torch.get_num_threads()}, load average before/after: {load_before[0]:.1f}/"
          f"{os.getloadavg()[0]:.1f}\n\n{table}")
    for path in write_results(args.kind, result, args.out_dir, args.name):
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    sys.exit(main())
