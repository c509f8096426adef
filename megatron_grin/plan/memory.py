"""``megatron-grin plan``'s memory model: what megatron-core allocates on one GPU, term by term.

Allocated bytes (what ``torch.cuda.max_memory_allocated`` reports) are
  static      weights, the fp32 main-grad buffer, optimizer state (live for the whole run);
  buffers     persistent scratch (the unfused attention's [b*heads, s, s] score buffer, masks);
  activations what autograd saves, for every micro-batch the pipeline schedule keeps in flight;
  working    the short-lived tensors of the op running at the worst moment (the unfused attention's fp32
              softmax copies, the logits' fp32 copy, a backend's expert weight gradient, ...).
Each layer is a sequence of ``Segment``s, each with the bytes it saves and the extra bytes live at its
forward and backward peaks; ``_pass_peaks`` walks them in forward then backward order. The optimizer
step peaks separately (torch AdamW's foreach temporaries). Every term is checked against the allocations
of real training steps (``benchmarks/step_memory.py``, exact on CPU) and the H200 measurement
(``plan/calibration``); docs/planning.md has the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_grin.accounting import padded_vocab, rank_parameters
from megatron_grin.config import GrinConfig
from megatron_grin.plan.layout import Assumptions, GiB, Implementation, Layout


#: query rows per block of the blockwise sliding-window kernel (GrinCoreAttention's block_size)
BLOCK_ROWS = 256


# ------------------------------------------------------------------------------------------------
# shapes and segments
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Shape:
    cfg: GrinConfig
    seq: int
    micro_batch: int
    tp: int
    p: int  # bytes per activation element (2 bf16, 4 fp32)

    @property
    def tokens(self) -> int:  # tokens of the micro-batch; MoE experts see all of them on every TP rank
        return self.seq * self.micro_batch

    @property
    def local_tokens(self) -> float:  # tokens held per TP rank between blocks (sequence parallel)
        return self.tokens / self.tp

    @property
    def routed_rows(self) -> int:  # dropless: every token's top-k picks, whatever the routing
        return self.tokens * self.cfg.moe_router_topk

    @property
    def half(self) -> bool:  # 16-bit activations: megatron upcasts softmax and cross entropy to fp32
        return self.p == 2

    @property
    def scores(self) -> float:  # elements of the attention scores [b, heads / TP, s, s]
        return self.micro_batch * self.cfg.num_attention_heads / self.tp * self.seq**2


@dataclass(frozen=True)
class Segment:
    """Part of a layer: bytes it saves for backward, and extra bytes live at its forward / backward peak
    (beyond everything saved so far, its own saved bytes included)."""

    name: str
    saved: float
    forward: float = 0.0
    backward: float = 0.0
    rebuilt: float = 0.0  # saved bytes recomputed in backward (selective recomputation), within backward

    def saved_only(self) -> "Segment":
        """The segment as autograd's saved tensors see it (no transients)."""
        return Segment(self.name, self.saved, 0.0, self.rebuilt, self.rebuilt)


def _attention_segments(x: _Shape, impl: Implementation, recompute: str) -> list[Segment]:
    c, t, p, s, b = x.cfg, x.tp, x.p, x.seq, x.micro_batch
    h, d = c.hidden_size, c.head_dim
    a, g = c.num_attention_heads / t, c.num_query_groups / t  # heads per TP rank
    tl, tok = x.local_tokens, x.tokens
    q, kv, qkv = tok * a * d * p, tok * g * d * p, tok * (a + 2 * g) * d * p
    # After RoPE q and k are new tensors; v stays a view of the fused qkv output and keeps it alive.
    inputs = q + kv + qkv
    if impl.attention == "flash":  # q, k, v (+ qkv storage), output, fp32 log-sum-exp; dq/dk/dv + fp32 dq
        saved, fwd, bwd = inputs + q + b * a * s * 4, 0.0, q + 2 * kv + tok * a * d * 4 + q
    elif impl.attention == "blockwise":  # ops/window_attention.py: fp32 score blocks, fp32 dq/dk/dv
        block = b * a * BLOCK_ROWS * min(BLOCK_ROWS + (c.sliding_window or s), s) * 4
        grads32 = (q + 2 * kv) * 4 / p + b * a * s * 4
        # a block's fp32 scores and probs; in backward p, dp and the previous block's probs (a loop variable)
        saved, fwd, bwd = inputs + q + b * a * s * 4, 2 * block, grads32 + 3 * block + q + 2 * kv
    else:  # megatron DotProductAttention: k, v repeated to all heads; softmax [b, a, s, s] (+ its fp32 copy)
        expanded = 3 * q if c.num_query_groups != c.num_attention_heads else 2 * q + qkv
        probs = x.scores * (p + (4 if x.half else 0))  # bf16: fp32 softmax output + its bf16 cast
        saved = expanded + probs + s * s
        fwd = x.scores * (p + (4 if x.half else 0))  # the raw scores and their fp32 copy
        # fp32 grads in and out of softmax (bf16 probs freed); fp32 masks the scores in place, a view, so
        # autograd's CopySlices adds a zeroed base gradient and a clone
        bwd = x.scores * (8 - p) if x.half else x.scores * 12
    core = Segment("core_attention", saved, fwd, bwd)
    if recompute == "selective":  # core attention checkpointed: its inputs stay, the rest is rebuilt
        rebuilt = core.saved - (q if impl.attention == "unfused" else inputs)  # rebuilt beside the kept inputs
        core = Segment("core_attention", inputs, core.forward + rebuilt, core.backward + rebuilt, rebuilt)
    return [Segment("input_layernorm", tl * h * p + 2 * tl * 4),  # input + fp32 mean, rstd
            Segment("qkv_input", tl * h * p),  # LayerNorm output (sequence-parallel shard)
            Segment("rope", 4 * s * d * p),  # cos/sin for q and k
            core,
            Segment("proj_input", q if impl.attention == "unfused" or recompute == "selective" else 0.0)]


def _expert_bytes(x: _Shape, impl: Implementation) -> tuple[float, float, float]:
    """(saved, forward extra, backward extra) of the expert backend for one micro-batch."""
    c, t, p = x.cfg, x.tp, x.p
    h, f, e = c.hidden_size, c.ffn_hidden_size / t, c.num_experts
    n = x.routed_rows
    busiest = min(2.0 * n / e, x.tokens)  # rows of a loaded expert (per-expert buffers)
    if impl.expert_backend == "grouped_mm":  # saves x, fc1 out [n, 2F] (its grad in place), fc2 input, probs;
        # forward adds fc2's output, backward a stacked weight gradient and the grads of x and fc2's input
        saved = n * (h + 2 * f + f) * p + n * 4
        weight_grads = 0.0 if impl.wgrad_fusion else e * 2 * f * h * p  # fc1's stacked bf16 weight gradient
        return saved, n * h * p, weight_grads + n * (f + h) * p
    glu = 2 * f if impl.fused_swiglu else 5 * f  # fc1 out [+ x_linear+0, silu, silu*x_linear]
    saved = n * (h + glu + f) * p + n * 4  # sequential: permuted tokens, SwiGLU, fc2 input, fp32 probs
    per_expert_grads = 3 * h * f * p + busiest * (2 * f + h) * p
    return saved, busiest * 2 * f * p, per_expert_grads


def _moe_segments(x: _Shape, impl: Implementation) -> list[Segment]:
    c, p = x.cfg, x.p
    h, e, k = c.hidden_size, c.num_experts, c.moe_router_topk
    tl = x.local_tokens
    # Router input: the LayerNorm output, or the jittered input (ops/jitter.py recomputes its noise in
    # backward from counters, so nothing else is kept).
    router_inputs = tl * h * p
    saved, fwd, bwd = _expert_bytes(x, impl)
    return [Segment("pre_mlp_layernorm", tl * h * p + 2 * tl * 4),
            # router: its input(s); fp32 logits and per-pick probabilities, bool masks, int64 picks/indices
            Segment("router", router_inputs + tl * (k + 1) * e * 5 + x.tokens * k * 28),
            Segment("experts", saved, fwd, bwd)]


def layer_segments(x: _Shape, impl: Implementation, recompute: str = "none") -> list[Segment]:
    """One transformer layer for one micro-batch (no recomputation, or selective)."""
    return _attention_segments(x, impl, recompute) + _moe_segments(x, impl)


def _checkpoint_input_bytes(x: _Shape) -> float:
    """A checkpointed layer (chunk of layers) keeps only its input (sequence-parallel shard)."""
    return x.local_tokens * x.cfg.hidden_size * x.p


def head_segments(x: _Shape) -> list[Segment]:
    """Final LayerNorm, output layer and cross entropy (never recomputed). The logits [T, V/TP] exist
    in the compute dtype beside the fp32 copy cross entropy saves; in backward the gradient is cast back."""
    c, tl = x.cfg, x.local_tokens
    logits = x.tokens * padded_vocab(c, x.tp) / x.tp
    return [Segment("final_layernorm", tl * c.hidden_size * x.p + 2 * tl * 4),
            Segment("output_layer_input", tl * c.hidden_size * x.p),
            Segment("cross_entropy", logits * 4 + x.tokens * 9,  # fp32 softmax, labels, mask
                    logits * x.p, logits * x.p if x.half else 0.0)]


# ------------------------------------------------------------------------------------------------
# a chunk of layers for one micro-batch: saved bytes and the peaks of its forward / backward
# ------------------------------------------------------------------------------------------------
def _groups(layers: int, recompute: str, method: str, num: int) -> list[tuple[int, bool]]:
    """(layers, checkpointed) groups of a chunk in forward order (megatron's full recomputation)."""
    if recompute != "full":
        return [(layers, False)] if layers else []
    if method == "uniform":
        return [(min(num, layers - i), True) for i in range(0, layers, num)]
    return [(1, True)] * min(num, layers) + ([(layers - num, False)] if layers > num else [])


def _chunk_segments(x: _Shape, impl: Implementation, lay: Layout, layers: int,
                    pre: bool, post: bool) -> list[tuple[list[Segment], bool]]:
    """The chunk as (segments, checkpointed) groups, embedding first and head last."""
    layer = layer_segments(x, impl, "selective" if lay.recompute == "selective" else "none")
    out: list[tuple[list[Segment], bool]] = [([Segment("embedding", x.tokens * 8)], False)] if pre else []
    out += [(layer * n, ckpt) for n, ckpt in _groups(layers, lay.recompute, lay.recompute_method,
                                                      lay.recompute_num_layers)]
    if post:
        out.append((head_segments(x), False))
    return out


def _forward_walk(live: float, segments: list[Segment]) -> tuple[float, float]:
    peak = live
    for seg in segments:
        peak = max(peak, live + seg.saved + seg.forward)
        live += seg.saved
    return live, peak


def _backward_walk(live: float, segments: list[Segment]) -> tuple[float, float]:
    peak = live
    for seg in reversed(segments):
        peak = max(peak, live + seg.backward)
        live -= seg.saved
    return live, peak


def _pass_peaks(base: float, groups: list[tuple[list[Segment], bool]], x: _Shape) -> dict[str, float]:
    """Saved bytes after the forward, and the forward and backward peaks above ``base``."""
    live, fwd = base, base
    for segments, ckpt in groups:
        if ckpt:  # forward without saving: the group's tensors are transient; only its input stays
            _, top = _forward_walk(live, segments)
            fwd = max(fwd, top)
            live += _checkpoint_input_bytes(x)
        else:
            live, top = _forward_walk(live, segments)
            fwd = max(fwd, top)
    saved, bwd = live - base, live
    for segments, ckpt in reversed(groups):
        if ckpt:  # rebuilt with grad, then its backward; the rebuilt input is the checkpointed one
            live -= _checkpoint_input_bytes(x)
            rebuilt, top = _forward_walk(live, segments)
            _, back = _backward_walk(rebuilt, segments)
            bwd = max(bwd, top, back)
        else:
            live, back = _backward_walk(live, segments)
            bwd = max(bwd, back)
    return {"saved": saved, "forward": fwd - base, "backward": bwd - base}


def microbatch_activation_bytes(cfg: GrinConfig, seq: int, micro_batch: int, *, tp: int = 1, dtype_bytes: int = 2,
                                recompute: str = "none", recompute_method: str = "uniform",
                                recompute_num_layers: int = 1, layers: Optional[int] = None,
                                pre_process: bool = True, post_process: bool = True,
                                impl: Implementation = Implementation()) -> dict[str, float]:
    """Saved-tensor bytes of one forward of a whole (single-stage) model for one micro-batch.

    ``forward``: what autograd holds when the forward ends (what benchmarks/activation_memory.py
    measures); ``backward_peak``: the most it holds during backward, recomputed layers included.
    """
    x = _Shape(cfg, seq, micro_batch, tp, dtype_bytes)
    lay = Layout(gpus=tp, tp=tp, micro_batch_size=micro_batch, global_batch_size=micro_batch, seq_length=seq,
                 recompute=recompute, recompute_method=recompute_method, recompute_num_layers=recompute_num_layers)
    groups = _chunk_segments(x, impl, lay, cfg.num_layers if layers is None else layers, pre_process, post_process)
    peaks = _pass_peaks(0.0, [([seg.saved_only() for seg in segs], ckpt) for segs, ckpt in groups], x)
    return {"forward": peaks["saved"], "backward_peak": max(peaks["saved"], peaks["backward"])}


# ------------------------------------------------------------------------------------------------
# pipeline schedule
# ------------------------------------------------------------------------------------------------
def inflight_chunks(pp: int, vpp: int, num_microbatches: int, rank: int) -> int:
    """Chunk-micro-batches whose activations pipeline rank ``rank`` holds at its peak.

    megatron-core 0.16 schedules: 1F1B warms up PP - rank - 1 forwards, then keeps one more; the
    interleaved schedule warms up (PP - rank - 1) x 2 + (VPP - 1) x PP chunk-forwards (+1).
    Without pipelining each micro-batch finishes its backward before the next forward.
    """
    if pp == 1:
        return 1
    if vpp == 1:
        return min(pp - rank, num_microbatches)
    return min((pp - rank - 1) * 2 + (vpp - 1) * pp + 1, num_microbatches * vpp)


@dataclass
class _Activations:
    """Activation bytes of one GPU: the in-flight micro-batches other than the one at its peak, and the
    peaks of that one (saved tensors only, or with working sets)."""

    others: dict[str, float]
    current: dict[str, float]
    inflight: int


def _rank_activations(cfg: GrinConfig, lay: Layout, impl: Implementation, rank: int,
                      saved_only: bool) -> _Activations:
    x = _Shape(cfg, lay.seq_length, lay.micro_batch_size, lay.tp, 2 if lay.bf16 else 4)
    layers = cfg.num_layers // (lay.pp * lay.vpp)
    inflight = inflight_chunks(lay.pp, lay.vpp, lay.num_microbatches, rank)
    groups = _chunk_segments(x, impl, lay, layers, pre=False, post=rank == lay.pp - 1)
    if saved_only:
        groups = [([seg.saved_only() for seg in segs], ckpt) for segs, ckpt in groups]
    current = _pass_peaks(0.0, groups, x)
    chunk = _pass_peaks(0.0, _chunk_segments(x, impl, lay, layers, pre=False, post=False), x)["saved"]
    others = {f"layers ({inflight - 1} more chunk-microbatches x {layers} layers)": (inflight - 1) * chunk}
    if rank == 0:
        others["embedding (token ids)"] = inflight * x.tokens * 8
    # Each in-flight chunk-microbatch's output stays allocated unless megatron deallocates pipeline outputs.
    outputs = inflight - (1 if rank == lay.pp - 1 else 0) if lay.pp > 1 else 0
    if not impl.deallocate_pipeline_outputs and outputs > 0:
        others["pipeline outputs kept (deallocate_pipeline_outputs=False)"] = outputs * _checkpoint_input_bytes(x)
    return _Activations(others, current, inflight)


def rank_activation_bytes(cfg: GrinConfig, lay: Layout, rank: int,
                          impl: Implementation = Implementation()) -> dict[str, float]:
    """Saved-tensor bytes of one GPU: ``saved`` (all in-flight micro-batches when the last forward ends),
    ``pipeline_outputs`` (sent stage outputs megatron keeps), ``peak`` (recomputation included)."""
    act = _rank_activations(cfg, lay, impl, rank, saved_only=True)
    outputs = sum(v for k, v in act.others.items() if k.startswith("pipeline outputs"))
    others = sum(act.others.values())
    return {"saved": others - outputs + act.current["saved"], "pipeline_outputs": outputs, "inflight": act.inflight,
            "peak": others - outputs + max(act.current.values())}


# ------------------------------------------------------------------------------------------------
# memory per GPU
# ------------------------------------------------------------------------------------------------
def persistent_buffers(x: _Shape, impl: Implementation) -> float:
    """Scratch kept for the whole run: the unfused attention's score buffer (megatron's global memory
    buffer, [b x heads/TP, s, s] in the compute dtype) and its cached [s, s] boolean mask."""
    return x.scores * x.p + x.seq**2 if impl.attention == "unfused" else 0.0


def optimizer_step_bytes(optimizer_params: float, impl: Implementation) -> float:
    """Temporaries of the optimizer step: torch's foreach AdamW (megatron's fallback without TE or Apex)
    allocates sqrt(v) for every parameter it updates at once, fp32; fused Adam kernels allocate none."""
    return 4.0 * optimizer_params if impl.optimizer == "torch" else 0.0


@dataclass
class RankMemory:
    """Bytes on one GPU of a pipeline rank: allocated (static, buffers, activations, working set at the
    peak moment) and the reserves the allocator and the CUDA runtime need beyond them."""

    rank: int
    parameters: int
    static_terms: dict[str, float]
    phase_peaks: dict[str, float]  # allocated bytes at the peak of forward, backward, optimizer step
    allocated_terms: dict[str, float]  # what is live at the overall peak, by kind
    reserve_terms: dict[str, float] = field(default_factory=dict)
    inflight: int = 0
    activation_detail: dict[str, float] = field(default_factory=dict)

    @property
    def static(self) -> float:
        return sum(self.static_terms.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phase_peaks, key=self.phase_peaks.get)

    @property
    def allocated(self) -> float:
        return max(self.phase_peaks.values())

    @property
    def total(self) -> float:
        return self.allocated + sum(self.reserve_terms.values())


def rank_memory(cfg: GrinConfig, lay: Layout, impl: Implementation, asm: Assumptions, rank: int) -> RankMemory:
    """Memory breakdown of one GPU on pipeline rank ``rank``."""
    params = rank_parameters(cfg, lay.tp, lay.pp, lay.vpp, rank)
    w_bytes = 2 if lay.bf16 else 4
    optimizer_params = params / lay.dp if lay.distributed_optimizer else params
    static = {"weights": params * w_bytes,
              "main_grads": params * 4.0,  # megatron DDP fp32 grad buffer (grad_reduce_in_fp32)
              "optimizer_states": (12 if lay.bf16 else 8) * optimizer_params}  # fp32 master (bf16) + Adam m, v
    x = _Shape(cfg, lay.seq_length, lay.micro_batch_size, lay.tp, w_bytes)
    buffers = persistent_buffers(x, impl)
    act = _rank_activations(cfg, lay, impl, rank, saved_only=False)
    others = sum(act.others.values())
    residual = asm.gpu_residual or 0.0  # GPU-only allocations the CPU measurements cannot see (fitted)
    dyn = {phase: buffers + others + act.current[phase] for phase in ("forward", "backward")}
    phases = {phase: sum(static.values()) + (1 + residual) * dyn[phase] for phase in dyn}
    phases["optimizer"] = sum(static.values()) + buffers + optimizer_step_bytes(optimizer_params, impl)
    peak = max(phases, key=phases.get)
    dynamic = {"buffers": buffers}
    if peak == "optimizer":
        dynamic["optimizer_step"] = optimizer_step_bytes(optimizer_params, impl)
    else:
        dynamic["activations"] = others + act.current["saved"]
        dynamic["working_set"] = act.current[peak] - act.current["saved"]
        dynamic["gpu_residual"] = residual * dyn[peak]
    working = max(act.current["forward"], act.current["backward"]) + others
    reserves = {"imbalance_reserve": imbalance_reserve_bytes(x, impl, asm.imbalance),
                "fragmentation": asm.fragmentation * working,
                "cuda_context_nccl": (asm.cuda_context_gib + asm.nccl_gib) * GiB}
    detail = {**act.others, "this micro-batch (saved when its forward ends)": act.current["saved"]}
    return RankMemory(rank, params, static, phases, {**static, **dynamic}, reserves, act.inflight, detail)


def imbalance_reserve_bytes(x: _Shape, impl: Implementation, imbalance: float) -> float:
    """Reserve for the busiest expert's buffers under dropless routing (docs/planning.md).

    With EP = 1 the saved expert activations total exactly tokens x top_k rows whatever the routing;
    what varies is the size of each expert's own buffers (forward and backward), which fragments the
    allocator. The reserve holds one set of them at ``imbalance`` x the mean load, at most every token.
    """
    c, t = x.cfg, x.tp
    rows = min(imbalance * x.routed_rows / c.num_experts, x.tokens)
    glu = 2 * c.ffn_hidden_size / t if impl.fused_swiglu else 5 * c.ffn_hidden_size / t
    per_row = c.hidden_size + glu + c.ffn_hidden_size / t + 2 * c.ffn_hidden_size / t + c.hidden_size
    return rows * per_row * x.p
