"""``megatron-grin plan``'s memory model: parameters, activations per micro-batch, pipeline in-flight
micro-batches and the bytes of every pipeline rank (docs/planning.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from megatron_grin.config import GrinConfig
from megatron_grin.plan.layout import Assumptions, GiB, Implementation, Layout


# ------------------------------------------------------------------------------------------------
# parameters
# ------------------------------------------------------------------------------------------------
def _layer_params(cfg: GrinConfig, tp: int = 1) -> dict[str, int]:
    """Parameters of one transformer layer held by one TP rank (tp=1: the whole layer)."""
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    a, g, e, k = cfg.num_attention_heads, cfg.num_query_groups, cfg.num_experts, cfg.moe_router_topk
    qkv = d * (a + 2 * g)
    attention = (h * qkv + qkv) // tp + a * d * h // tp + h  # qkv weight+bias sharded; o_proj bias replicated
    norms = 2 * 2 * h  # input and pre-MLP LayerNorm (weight, bias), replicated
    router = e * h  # replicated
    expert = 3 * h * f // tp  # fc1 [gate; up] + fc2, sharded over expert-TP = TP
    return {"total": attention + norms + router + e * expert, "active": attention + norms + router + k * expert,
            "expert": e * expert, "attention": attention, "router": router}


def _embedding_params(cfg: GrinConfig, tp: int = 1, padded: bool = True) -> int:
    v = cfg.padded_vocab_size if padded else cfg.vocab_size
    return v // tp * cfg.hidden_size if padded else v * cfg.hidden_size


def _head_params(cfg: GrinConfig, tp: int = 1, padded: bool = True) -> int:
    """Final LayerNorm (replicated) + output layer weight and bias (vocab-sharded)."""
    v = cfg.padded_vocab_size // tp if padded else cfg.vocab_size
    return 2 * cfg.hidden_size + v * cfg.hidden_size + v


def parameter_summary(cfg: GrinConfig) -> dict[str, int]:
    """Total / active / expert parameters without vocab padding; equals ``model.parameter_counts``."""
    layer = _layer_params(cfg)
    outer = _embedding_params(cfg, padded=False) + _head_params(cfg, padded=False)
    return {"total": cfg.num_layers * layer["total"] + outer, "active": cfg.num_layers * layer["active"] + outer,
            "expert": cfg.num_layers * layer["expert"]}


def chunk_parameters(cfg: GrinConfig, tp: int, pp: int, vpp: int, rank: int, chunk: int) -> int:
    """Parameters (padded vocab, one TP shard) of model chunk ``chunk`` on pipeline rank ``rank``.

    Megatron splits layers evenly: each of the PP x VPP chunks holds num_layers / (PP x VPP) layers;
    the embedding sits on chunk 0 of rank 0, the final norm and output layer on the last chunk of the
    last rank (untied embeddings).
    """
    n = cfg.num_layers // (pp * vpp) * _layer_params(cfg, tp)["total"]
    if rank == 0 and chunk == 0:
        n += _embedding_params(cfg, tp)
    if rank == pp - 1 and chunk == vpp - 1:
        n += _head_params(cfg, tp)
    return n


def rank_parameters(cfg: GrinConfig, tp: int, pp: int, vpp: int, rank: int) -> int:
    """Parameters held by one GPU of pipeline rank ``rank`` (all its chunks, one TP shard)."""
    return sum(chunk_parameters(cfg, tp, pp, vpp, rank, c) for c in range(vpp))


# ------------------------------------------------------------------------------------------------
# activations: bytes autograd keeps, per micro-batch, for one GPU
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


def _attention_terms(x: _Shape, impl: Implementation, recompute: str) -> dict[str, float]:
    c, t, p, s, b = x.cfg, x.tp, x.p, x.seq, x.micro_batch
    h, d = c.hidden_size, c.head_dim
    a, g = c.num_attention_heads / t, c.num_query_groups / t  # heads per TP rank
    tl, tok = x.local_tokens, x.tokens
    q, kv, qkv = tok * a * d * p, tok * g * d * p, tok * (a + 2 * g) * d * p
    terms = {"input_layernorm": tl * h * p + 2 * tl * 4,  # input + fp32 mean, rstd
             "qkv_input": tl * h * p,  # LayerNorm output (sequence-parallel shard; re-gathered in backward)
             "rope": 4 * s * d * p}  # cos/sin for q and k
    # After RoPE q and k are new tensors; v stays a view of the fused qkv output and keeps it alive.
    selective_inputs = q + kv + qkv
    if recompute == "selective":  # core attention checkpointed: only its inputs (and its output) stay
        terms["core_attention"] = selective_inputs
        terms["proj_input"] = q
    elif impl.attention == "flash":  # q, k, v (+ qkv storage), output, fp32 log-sum-exp
        terms["core_attention"] = selective_inputs + q + b * a * s * 4
        terms["proj_input"] = 0.0  # the attention output itself
    else:  # megatron DotProductAttention: q, k and v expanded to all heads, softmax [b, a, s, s], mask
        expanded = 3 * q if c.num_query_groups != c.num_attention_heads else 2 * q + qkv
        terms["core_attention"] = expanded + b * a * s * s * p + s * s
        terms["proj_input"] = q
    return terms


def _moe_terms(x: _Shape, impl: Implementation) -> dict[str, float]:
    c, t, p = x.cfg, x.tp, x.p
    h, f, e, k = c.hidden_size, c.ffn_hidden_size, c.num_experts, c.moe_router_topk
    tl, n = x.local_tokens, x.routed_rows
    # Router input: the LayerNorm output, or with GRIN's input jitter the jittered input plus the noise.
    # The noise is drawn in fp32 for the whole sequence and sliced per TP rank; in fp32 the slice keeps
    # the full storage alive, in bf16 its cast is a new local tensor.
    router_inputs = tl * h * p
    if c.input_jitter_eps > 0:
        router_inputs += (x.tokens if p == 4 else tl) * h * p
    glu = 2 * f / t if impl.fused_swiglu else 5 * f / t  # fc1 output [+ x_linear+0, silu, silu*x_linear]
    return {"pre_mlp_layernorm": tl * h * p + 2 * tl * 4,
            # router: its input(s); fp32 logits and per-pick probabilities, bool masks, int64 picks/indices
            "router": router_inputs + tl * (k + 1) * e * 5 + x.tokens * k * 28,
            # experts: permuted tokens (all TP ranks see every token), SwiGLU, fc2 input, fp32 probs
            "experts": n * (h + glu + f / t) * p + n * 4}


def layer_activation_terms(x: _Shape, impl: Implementation, recompute: str = "none") -> dict[str, float]:
    """Bytes one transformer layer keeps for one micro-batch (no recomputation, or selective)."""
    return {**_attention_terms(x, impl, recompute), **_moe_terms(x, impl)}


def _layer_bytes(x: _Shape, impl: Implementation, recompute: str) -> float:
    return sum(layer_activation_terms(x, impl, "selective" if recompute == "selective" else "none").values())


def _checkpoint_input_bytes(x: _Shape) -> float:
    """A checkpointed layer (chunk of layers) keeps only its input (sequence-parallel shard)."""
    return x.local_tokens * x.cfg.hidden_size * x.p


def post_process_terms(x: _Shape) -> dict[str, float]:
    """Final LayerNorm, output layer and cross entropy (never recomputed)."""
    c, tl = x.cfg, x.local_tokens
    vocab = c.padded_vocab_size / x.tp
    return {"final_layernorm": tl * c.hidden_size * x.p + 2 * tl * 4,
            "output_layer_input": tl * c.hidden_size * x.p,
            "cross_entropy": x.tokens * vocab * 4 + x.tokens * 9}  # fp32 softmax, labels, mask


def chunk_activation_terms(x: _Shape, impl: Implementation, layers: int, recompute: str,
                           recompute_method: str = "uniform", recompute_num_layers: int = 1,
                           pre_process: bool = False, post_process: bool = False) -> dict[str, float]:
    """Bytes one model chunk of ``layers`` layers keeps for one micro-batch until its backward."""
    terms: dict[str, float] = {}
    if pre_process:
        terms["embedding"] = x.tokens * 8  # token ids
    if recompute == "full":
        n = recompute_num_layers
        if recompute_method == "uniform":
            checkpointed, full_layers = math.ceil(layers / n), 0
        else:  # block: the first n layers of the chunk are checkpointed one by one, the rest keep all
            checkpointed, full_layers = min(n, layers), max(layers - n, 0)
        terms["checkpointed_inputs"] = checkpointed * _checkpoint_input_bytes(x)
        terms["rotary_embedding"] = x.seq * x.cfg.head_dim * 4
        terms["layers"] = full_layers * _layer_bytes(x, impl, "none")
    else:
        terms["layers"] = layers * _layer_bytes(x, impl, recompute)
    if post_process:
        terms.update(post_process_terms(x))
    return terms


def recompute_working_bytes(x: _Shape, impl: Implementation, recompute: str, recompute_method: str,
                            recompute_num_layers: int, layers: int) -> float:
    """Activations rebuilt in backward: one checkpointed chunk of layers (full) or one layer's core
    attention internals (selective), for one micro-batch."""
    if recompute == "selective":
        return _layer_bytes(x, impl, "none") - _layer_bytes(x, impl, "selective")
    if recompute != "full":
        return 0.0
    rebuilt = recompute_num_layers if recompute_method == "uniform" else 1
    # The rebuilt chunk's first LayerNorm input is the checkpointed input itself (a detached view).
    return min(rebuilt, layers) * _layer_bytes(x, impl, "none") - _checkpoint_input_bytes(x)


def transient_bytes(x: _Shape, impl: Implementation, post_process: bool) -> float:
    """Largest short-lived buffers of a backward (not saved tensors): one layer's biggest gradients."""
    c, t, p = x.cfg, x.tp, x.p
    experts = x.routed_rows * (2 * c.ffn_hidden_size / t + c.hidden_size) * p  # d(fc1 out), d(permuted)
    attention = 0.0
    if impl.attention == "unfused":
        attention = 2 * x.micro_batch * c.num_attention_heads / t * x.seq ** 2 * p  # d(softmax), d(scores)
    head = x.tokens * c.padded_vocab_size / t * p if post_process else 0.0  # the logits beside the fp32 copy
    return max(experts, attention, head) + 2 * x.local_tokens * c.hidden_size * p


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


def microbatch_activation_bytes(cfg: GrinConfig, seq: int, micro_batch: int, *, tp: int = 1, dtype_bytes: int = 2,
                                recompute: str = "none", recompute_method: str = "uniform",
                                recompute_num_layers: int = 1, layers: Optional[int] = None,
                                pre_process: bool = True, post_process: bool = True,
                                impl: Implementation = Implementation()) -> dict[str, float]:
    """Saved bytes of one forward of a whole (single-stage) model for one micro-batch, by term.

    ``forward``: what autograd holds when the forward ends (what benchmarks/activation_memory.py
    measures); ``backward_peak``: that plus the layers full recomputation rebuilds in backward.
    """
    x = _Shape(cfg, seq, micro_batch, tp, dtype_bytes)
    layers = cfg.num_layers if layers is None else layers
    terms = chunk_activation_terms(x, impl, layers, recompute, recompute_method, recompute_num_layers,
                                   pre_process, post_process)
    forward = sum(terms.values())
    rebuilt = recompute_working_bytes(x, impl, recompute, recompute_method, recompute_num_layers, layers)
    # The head's saved tensors are released by its backward, before any layer is rebuilt.
    head = sum(post_process_terms(x).values()) if post_process else 0.0
    return {**terms, "forward": forward, "backward_peak": max(forward, forward - head + rebuilt)}


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


# ------------------------------------------------------------------------------------------------
# memory per GPU
# ------------------------------------------------------------------------------------------------
@dataclass
class RankMemory:
    """Bytes on one GPU of a pipeline rank."""

    rank: int
    parameters: int
    terms: dict[str, float] = field(default_factory=dict)
    inflight: int = 0
    activation_detail: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.terms.values())


def rank_memory(cfg: GrinConfig, lay: Layout, impl: Implementation, asm: Assumptions, rank: int) -> RankMemory:
    """Memory breakdown of one GPU on pipeline rank ``rank``."""
    params = rank_parameters(cfg, lay.tp, lay.pp, lay.vpp, rank)
    w_bytes = 2 if lay.bf16 else 4
    optimizer = (12 if lay.bf16 else 8) * params  # fp32 master (bf16 only) + Adam m, v
    if lay.distributed_optimizer:
        optimizer /= lay.dp
    x = _Shape(cfg, lay.seq_length, lay.micro_batch_size, lay.tp, w_bytes)
    acts, inflight = _rank_activations(cfg, lay, impl, x, rank)
    peak = rank_activation_bytes(cfg, lay, rank, impl)
    working = peak["peak"] - peak["saved"] + transient_bytes(x, impl, post_process=rank == lay.pp - 1)
    saved = sum(acts.values())
    terms = {
        "weights": params * w_bytes,
        "gradients": params * 4.0,  # megatron DDP fp32 main-grad buffer
        "optimizer": optimizer,
        "activations": saved,
        "recompute_and_transients": working,
        "imbalance_reserve": imbalance_reserve_bytes(x, impl, asm.imbalance),
        "cuda_nccl_fragmentation": (asm.cuda_context_gib + asm.nccl_gib) * GiB
        + asm.fragmentation * (saved + working),
    }
    return RankMemory(rank, params, terms, inflight, acts)


def rank_activation_bytes(cfg: GrinConfig, lay: Layout, rank: int,
                          impl: Implementation = Implementation()) -> dict[str, float]:
    """Activation bytes of one GPU at its peak: ``saved`` (tensors autograd keeps for the in-flight
    micro-batches), ``pipeline_outputs`` (sent stage outputs megatron keeps unless it deallocates them)
    and ``rebuilt`` (what recomputation adds in backward)."""
    x = _Shape(cfg, lay.seq_length, lay.micro_batch_size, lay.tp, 2 if lay.bf16 else 4)
    acts, inflight = _rank_activations(cfg, lay, impl, x, rank)
    outputs = sum(v for k, v in acts.items() if k.startswith("pipeline outputs"))
    layers = cfg.num_layers // (lay.pp * lay.vpp)
    rebuilt = recompute_working_bytes(x, impl, lay.recompute, lay.recompute_method, lay.recompute_num_layers, layers)
    saved = sum(acts.values()) - outputs
    # On the last rank the head's backward frees its saved tensors before a layer is rebuilt.
    head = sum(post_process_terms(x).values()) if rank == lay.pp - 1 else 0.0
    return {"saved": saved, "pipeline_outputs": outputs, "inflight": inflight, "rebuilt": rebuilt,
            "peak": max(saved, saved - head + rebuilt)}


def _rank_activations(cfg: GrinConfig, lay: Layout, impl: Implementation, x: _Shape,
                      rank: int) -> tuple[dict[str, float], int]:
    layers = cfg.num_layers // (lay.pp * lay.vpp)
    inflight = inflight_chunks(lay.pp, lay.vpp, lay.num_microbatches, rank)
    chunk = chunk_activation_terms(x, impl, layers, lay.recompute, lay.recompute_method, lay.recompute_num_layers)
    acts = {f"layers ({inflight} chunk-microbatches x {layers} layers)": inflight * sum(chunk.values())}
    if rank == 0:
        acts["embedding"] = inflight * x.tokens * 8
    if rank == lay.pp - 1:
        acts["final norm, output layer, cross entropy"] = sum(post_process_terms(x).values())
    # Each in-flight chunk-microbatch's output stays allocated unless megatron deallocates pipeline outputs.
    outputs = inflight - (1 if rank == lay.pp - 1 else 0) if lay.pp > 1 else 0
    if not impl.deallocate_pipeline_outputs and outputs > 0:
        acts["pipeline outputs kept (deallocate_pipeline_outputs=False)"] = outputs * _checkpoint_input_bytes(x)
    return acts, inflight

