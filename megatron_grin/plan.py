"""`megatron-grin plan`: does a GRIN layout fit in GPU memory, and how fast will it train?

An analytical model, per GPU, of a DP x PP (x TP) layout without expert parallelism (every pipeline
stage holds all experts of its layers; dropless routing):

* memory: bf16 weights of the stage (divided by TP), fp32 gradient buffer, optimizer state (fp32
  master + Adam m, v; sharded over DP with the distributed optimizer), activations of the micro-batches
  the pipeline schedule keeps in flight (1F1B or interleaved) under full / selective / no recomputation,
  the recomputation working set and backward transients, a reserve for dropless load imbalance, and a
  fixed allowance for the CUDA context, NCCL buffers and allocator fragmentation;
* time: FLOPs of the slowest pipeline rank at an efficiency calibrated to GRIN's reported 7077
  tokens/s/GPU on 64 H100, the pipeline bubble (PP-1)/(VPP m), and TP, DP and PP communication from
  their volumes and explicit bandwidths.

Every term, assumption and its validation (parameter counts equal the built model's; activation bytes
within 15 % of CPU measurements, ``benchmarks/activation_memory.py``) is in docs/planning.md.

    megatron-grin plan --config configs/cluster/h100x64.yaml
    megatron-grin plan --model-preset grin-16x3.8b --gpus 64 --global-batch-size 2048 --pp 8 --vpp 4
    megatron-grin plan --config configs/cluster/h100x512.yaml --search
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from megatron_grin.config import PRESETS, ConfigError, GrinConfig, preset

GiB = 2.0**30
RECOMPUTE_MODES = ("none", "selective", "full")


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """A parallel layout and batch for ``gpus`` GPUs (megatron flag names in comments)."""

    gpus: int
    tp: int = 1  # --tensor-model-parallel-size (sequence parallel on when > 1)
    pp: int = 1  # --pipeline-model-parallel-size
    vpp: int = 1  # model chunks per pipeline rank (1: plain 1F1B; >1: interleaved)
    micro_batch_size: int = 1  # --micro-batch-size
    global_batch_size: int = 2048  # --global-batch-size (sequences)
    seq_length: int = 4096  # --seq-length
    recompute: str = "none"  # none | selective (core attention) | full (--recompute-granularity)
    recompute_method: str = "uniform"  # --recompute-method uniform | block (full only)
    recompute_num_layers: int = 1  # --recompute-num-layers (full only)
    distributed_optimizer: bool = False  # --use-distributed-optimizer
    bf16: bool = True  # --bf16 (else fp32 weights and activations)

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    def problems(self, cfg: GrinConfig, gpus_per_node: int = 8) -> list[str]:
        """Why megatron would refuse this layout (empty when it is valid)."""
        out = []
        try:
            cfg.replace(tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
                        virtual_pipeline_model_parallel_size=self.vpp if self.vpp > 1 else None).validate()
        except ConfigError as err:
            out.append(str(err))
        if self.gpus % (self.tp * self.pp):
            out.append(f"{self.gpus} GPUs are not divisible by TP {self.tp} x PP {self.pp}")
        if self.tp > gpus_per_node:
            out.append(f"TP {self.tp} spans nodes ({gpus_per_node} GPUs per node); keep TP within a node")
        if self.recompute not in RECOMPUTE_MODES:
            out.append(f"--recompute {self.recompute!r}: use one of {RECOMPUTE_MODES}")
        if self.recompute_method not in ("uniform", "block"):
            out.append(f"--recompute-method {self.recompute_method!r}: use uniform or block")
        if self.recompute == "full" and self.recompute_num_layers < 1:
            out.append("--recompute-num-layers must be >= 1")
        if self.seq_length > cfg.max_position_embeddings:
            out.append(f"--seq-length {self.seq_length} exceeds max_position_embeddings "
                       f"{cfg.max_position_embeddings}")
        dp = self.dp
        if not out and self.global_batch_size % (self.micro_batch_size * dp):
            out.append(f"global batch {self.global_batch_size} is not divisible by micro-batch "
                       f"{self.micro_batch_size} x DP {dp}")
        elif not out and self.vpp > 1 and self.num_microbatches % self.pp:
            out.append(f"the interleaved schedule needs the microbatches ({self.num_microbatches}) to be a "
                       f"multiple of PP {self.pp}")
        return out

    def describe(self) -> str:
        vpp = f" (VPP {self.vpp})" if self.vpp > 1 else ""
        rec = self.recompute
        if rec == "full":
            rec += f" ({self.recompute_method}, {self.recompute_num_layers} layer" \
                   f"{'s' if self.recompute_num_layers > 1 else ''})"
        return (f"TP {self.tp} x PP {self.pp}{vpp} x DP {self.dp}; micro-batch {self.micro_batch_size} x "
                f"{self.num_microbatches} microbatches = global batch {self.global_batch_size} x "
                f"{self.seq_length} tokens; recompute {rec}; "
                f"{'distributed' if self.distributed_optimizer else 'replicated'} optimizer; "
                f"{'bf16' if self.bf16 else 'fp32'}")

    def flags(self) -> str:
        parts = [f"--tp {self.tp}", f"--pp {self.pp}"]
        if self.vpp > 1:
            parts.append(f"--vpp {self.vpp}")
        parts += [f"--micro-batch-size {self.micro_batch_size}", f"--recompute {self.recompute}"]
        if self.recompute == "full" and (self.recompute_method, self.recompute_num_layers) != ("uniform", 1):
            parts += [f"--recompute-method {self.recompute_method}",
                      f"--recompute-num-layers {self.recompute_num_layers}"]
        parts.append("--distributed-optimizer" if self.distributed_optimizer else "--no-distributed-optimizer")
        return " ".join(parts)


@dataclass(frozen=True)
class Implementation:
    """How the model computes, which decides what autograd keeps for backward (docs/planning.md).

    Defaults describe megatron-grin on GPUs today: Transformer Engine fused/flash attention,
    megatron's unfused SwiGLU (``transformer_config`` sets ``bias_activation_fusion=False``) and
    megatron's default ``deallocate_pipeline_outputs=False``.
    """

    attention: str = "flash"  # flash (TE, GPU) | unfused (megatron local DotProductAttention, CPU)
    fused_swiglu: bool = False  # bias_activation_fusion: weighted_bias_swiglu keeps only the fc1 output
    deallocate_pipeline_outputs: bool = False  # free a stage's sent output until its backward

    @classmethod
    def for_config(cls, cfg: GrinConfig, attention: str = "flash") -> "Implementation":
        return cls(attention=attention, fused_swiglu=bool(cfg.extra.get("bias_activation_fusion", False)),
                   deallocate_pipeline_outputs=bool(cfg.extra.get("deallocate_pipeline_outputs", False)))


@dataclass(frozen=True)
class Assumptions:
    """Hardware and the explicit constants of the model (each a CLI flag; see docs/planning.md)."""

    gpu_memory_gib: float = 80.0  # capacity the total is compared with
    gpus_per_node: int = 8
    peak_tflops: float = 989.4  # H100 SXM dense BF16
    efficiency: Optional[float] = None  # share of peak while computing; None = calibrated (CALIBRATION)
    imbalance: float = 2.0  # busiest expert's load / mean expert load, for the dropless reserve
    cuda_context_gib: float = 1.0  # CUDA context, cuBLAS/cuDNN/TE workspaces
    nccl_gib: float = 1.5  # NCCL communicator buffers (DP, TP, PP, embedding groups)
    fragmentation: float = 0.10  # allocator slack, as a share of activation + transient bytes
    min_headroom: float = 0.10  # refuse layouts with less free memory than this share
    nvlink_gbps: float = 300.0  # intra-node collective bus bandwidth per GPU (GB/s)
    network_gbps: float = 200.0  # inter-node collective bus bandwidth per GPU (GB/s, 8x400 Gb/s rails)
    p2p_network_gbps: float = 40.0  # inter-node point-to-point per GPU (GB/s, one 400 Gb/s NIC)
    tp_overlap: float = 0.0  # share of TP collectives hidden behind compute
    dp_overlap: float = 0.0  # share of DP gradient reduce-scatter / param all-gather hidden
    pp_overlap: float = 0.0  # share of pipeline sends hidden


#: The throughput anchor the efficiency is calibrated to (GRIN paper, Table 3; docs/planning.md).
CALIBRATION = dict(model="grin-16x3.8b", tokens_per_s_per_gpu=7077.0,
                   layout=Layout(gpus=64, tp=1, pp=8, vpp=4, micro_batch_size=1, global_batch_size=2048,
                                 seq_length=4096, recompute="full", distributed_optimizer=True))


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


# ------------------------------------------------------------------------------------------------
# time
# ------------------------------------------------------------------------------------------------
def attention_window_ratio(seq: int, window: Optional[int]) -> float:
    """Attended (query, key) pairs with the sliding window / pairs of full causal attention."""
    causal = seq * (seq + 1) / 2
    if window is None or window >= seq:
        return 1.0
    return (window * (window + 1) / 2 + (seq - window) * window) / causal


def model_flops_per_token(cfg: GrinConfig, seq: int) -> dict[str, float]:
    """Training FLOPs per token, the MFU convention: 6 x active params + 12 x layers x (heads x head_dim)
    x seq (causal full attention counted as full, as PaLM and megatron do) x the sliding-window ratio."""
    dense = 6.0 * parameter_summary(cfg)["active"]
    attention = 12.0 * cfg.num_layers * cfg.num_attention_heads * cfg.head_dim * seq \
        * attention_window_ratio(seq, cfg.sliding_window)
    return {"params": dense, "attention": attention, "total": dense + attention}


def _layer_fwd_flops_per_token(cfg: GrinConfig, seq: int) -> tuple[float, float]:
    """(matmul, attention-score) forward FLOPs per token of one layer (whole layer, all TP ranks)."""
    lp = _layer_params(cfg)
    matmul = 2.0 * (lp["attention"] + lp["router"] + cfg.moe_router_topk * lp["expert"] // cfg.num_experts)
    score = 4.0 * cfg.num_attention_heads * cfg.head_dim * seq * attention_window_ratio(seq, cfg.sliding_window)
    return matmul, score


def rank_flops_per_microbatch(cfg: GrinConfig, lay: Layout, rank: int) -> float:
    """Hardware FLOPs (recomputation included) of one micro-batch through all chunks of one GPU."""
    tokens = lay.seq_length * lay.micro_batch_size
    matmul, score = _layer_fwd_flops_per_token(cfg, lay.seq_length)
    layer_fwd = matmul + score
    replay = {"none": 0.0, "selective": score, "full": layer_fwd}[lay.recompute]
    if lay.recompute == "full" and lay.recompute_method == "block":
        replay *= min(lay.recompute_num_layers, cfg.num_layers // (lay.pp * lay.vpp)) \
            / (cfg.num_layers // (lay.pp * lay.vpp))
    per_layer = 3 * layer_fwd + replay
    flops = cfg.num_layers // lay.pp * per_layer
    if rank == lay.pp - 1:
        flops += 3 * 2.0 * cfg.hidden_size * cfg.padded_vocab_size  # output layer (not recomputed)
    return flops * tokens / lay.tp


def _tp_comm_seconds(cfg: GrinConfig, lay: Layout, asm: Assumptions, rank: int) -> float:
    """Sequence-parallel all-gathers / reduce-scatters per micro-batch on one GPU (NVLink)."""
    if lay.tp == 1:
        return 0.0
    per_layer = 4 + 5 + (4 if lay.recompute == "full" else 0)  # forward, backward (+ SP re-gather), replay
    count = cfg.num_layers // lay.pp * per_layer + (3 if rank == lay.pp - 1 else 0)
    volume = lay.seq_length * lay.micro_batch_size * cfg.hidden_size * (2 if lay.bf16 else 4)
    return count * volume * (lay.tp - 1) / lay.tp / (asm.nvlink_gbps * 1e9) * (1 - asm.tp_overlap)


def _dp_comm_seconds(cfg: GrinConfig, lay: Layout, asm: Assumptions, rank: int) -> float:
    """Gradient reduce-scatter (fp32) + parameter all-gather per step, or an fp32 all-reduce."""
    if lay.dp == 1:
        return 0.0
    params = rank_parameters(cfg, lay.tp, lay.pp, lay.vpp, rank)
    if lay.distributed_optimizer:
        volume = params * (4 + (2 if lay.bf16 else 4))
    else:
        volume = 2 * params * 4
    within_node = lay.tp * lay.dp <= asm.gpus_per_node  # megatron puts a stage's DP replicas on adjacent ranks
    bandwidth = asm.nvlink_gbps if within_node else asm.network_gbps
    return volume * (lay.dp - 1) / lay.dp / (bandwidth * 1e9) * (1 - asm.dp_overlap)


def _pp_comm_seconds(cfg: GrinConfig, lay: Layout, asm: Assumptions) -> float:
    """Activation and gradient sends per step on one GPU: 2 x VPP per micro-batch."""
    if lay.pp == 1:
        return 0.0
    volume = lay.seq_length * lay.micro_batch_size / lay.tp * cfg.hidden_size * (2 if lay.bf16 else 4)
    same_node = lay.tp * lay.dp < asm.gpus_per_node
    bandwidth = asm.nvlink_gbps if same_node else asm.p2p_network_gbps
    sends = 2 * lay.vpp * lay.num_microbatches
    return sends * volume / (bandwidth * 1e9) * (1 - asm.pp_overlap)


def step_time(cfg: GrinConfig, lay: Layout, asm: Assumptions, efficiency: float) -> dict[str, float]:
    """Predicted seconds per step and their parts (the slowest pipeline rank sets the pace)."""
    flops = [rank_flops_per_microbatch(cfg, lay, r) for r in range(lay.pp)]
    compute = [f / (asm.peak_tflops * 1e12 * efficiency) for f in flops]
    tp = [_tp_comm_seconds(cfg, lay, asm, r) for r in range(lay.pp)]
    per_mb = [c + t for c, t in zip(compute, tp)]
    slowest = max(range(lay.pp), key=lambda r: per_mb[r])
    m = lay.num_microbatches
    bubble = (lay.pp - 1) / (lay.vpp * m)
    busy = m * per_mb[slowest]
    bubble_s = (lay.pp - 1) / lay.vpp * sum(per_mb) / lay.pp
    dp = max(_dp_comm_seconds(cfg, lay, asm, r) for r in range(lay.pp))
    pp = _pp_comm_seconds(cfg, lay, asm)
    total = busy + bubble_s + dp + pp
    tokens_per_gpu = lay.global_batch_size * lay.seq_length / lay.gpus
    tok_s = tokens_per_gpu / total
    mfu = tok_s * model_flops_per_token(cfg, lay.seq_length)["total"] / (asm.peak_tflops * 1e12)
    return {"step_s": total, "compute_s": m * compute[slowest], "tp_comm_s": m * tp[slowest],
            "tp_factor": per_mb[slowest] / compute[slowest], "bubble": bubble, "bubble_s": bubble_s,
            "dp_comm_s": dp, "pp_comm_s": pp, "slowest_rank": slowest,
            "stage_imbalance": max(flops) / (sum(flops) / lay.pp), "tokens_per_s_per_gpu": tok_s, "mfu": mfu,
            "hfu": sum(flops) * m * lay.tp * lay.dp / lay.gpus / total / (asm.peak_tflops * 1e12)}


def calibrated_efficiency(asm: Assumptions = Assumptions()) -> float:
    """The compute efficiency at which the CALIBRATION layout predicts GRIN's measured throughput.

    The step is C / eff + D, with C the compute (and bubble) time at 100 % efficiency and D the
    communication that does not scale with it; solved by bisection. docs/planning.md shows the numbers.
    """
    return _calibrated(dataclasses.replace(asm, efficiency=None))


@functools.lru_cache(maxsize=16)
def _calibrated(asm: Assumptions) -> float:
    cfg, lay = preset(CALIBRATION["model"]), CALIBRATION["layout"]
    target = CALIBRATION["tokens_per_s_per_gpu"]
    low, high = 1e-3, 1.0
    if step_time(cfg, lay, asm, high)["tokens_per_s_per_gpu"] < target:
        raise ValueError(f"the calibration anchor ({target:g} tokens/s/GPU) is unreachable even at 100% of "
                         f"{asm.peak_tflops:g} TFLOPS with these bandwidth assumptions")
    for _ in range(100):  # tokens/s grows monotonically with the efficiency
        mid = (low + high) / 2
        low, high = (mid, high) if step_time(cfg, lay, asm, mid)["tokens_per_s_per_gpu"] < target else (low, mid)
    return (low + high) / 2


# ------------------------------------------------------------------------------------------------
# a plan
# ------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Memory of every pipeline rank and the predicted speed of one layout."""

    cfg: GrinConfig
    layout: Layout
    impl: Implementation
    assumptions: Assumptions
    ranks: list[RankMemory]
    time: dict[str, float]
    efficiency: float

    @property
    def peak(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.total)

    @property
    def capacity(self) -> float:
        return self.assumptions.gpu_memory_gib * GiB

    @property
    def headroom(self) -> float:
        return 1.0 - self.peak.total / self.capacity

    @property
    def fits(self) -> bool:
        return self.headroom >= self.assumptions.min_headroom

    def to_dict(self) -> dict[str, Any]:
        counts = parameter_summary(self.cfg)
        return {
            "layout": {**dataclasses.asdict(self.layout), "dp": self.layout.dp,
                       "num_microbatches": self.layout.num_microbatches},
            "implementation": dataclasses.asdict(self.impl),
            "assumptions": {**dataclasses.asdict(self.assumptions), "efficiency": self.efficiency},
            "parameters": counts,
            "memory_gib": [{"rank": r.rank, "parameters": r.parameters, "inflight_chunk_microbatches": r.inflight,
                            **{k: v / GiB for k, v in r.terms.items()}, "total": r.total / GiB,
                            "activation_detail": {k: v / GiB for k, v in r.activation_detail.items()}}
                           for r in self.ranks],
            "peak_rank": self.peak.rank, "peak_gib": self.peak.total / GiB, "headroom": self.headroom,
            "fits": self.fits, "time": self.time,
        }


def evaluate(cfg: GrinConfig, lay: Layout, impl: Optional[Implementation] = None,
             asm: Assumptions = Assumptions()) -> Plan:
    """Memory and speed of one (valid) layout; see Layout.problems for validity."""
    impl = impl or Implementation.for_config(cfg)
    eff = asm.efficiency if asm.efficiency is not None else calibrated_efficiency(asm)
    ranks = [rank_memory(cfg, lay, impl, asm, r) for r in range(lay.pp)]
    return Plan(cfg, lay, impl, asm, ranks, step_time(cfg, lay, asm, eff), eff)


def candidate_layouts(cfg: GrinConfig, base: Layout, gpus_per_node: int = 8,
                      recompute_modes: Sequence[str] = RECOMPUTE_MODES) -> list[Layout]:
    """Valid layouts for --search: TP in {1,2,4,8}, PP dividing the layers, VPP, micro-batch 1..4."""
    out = []
    for tp in (1, 2, 4, 8):
        for pp in [p for p in range(1, cfg.num_layers + 1) if cfg.num_layers % p == 0]:
            if base.gpus % (tp * pp):
                continue
            per_stage = cfg.num_layers // pp
            vpps = [1] + ([v for v in range(2, per_stage + 1) if per_stage % v == 0] if pp > 1 else [])
            for vpp in vpps:
                for mbs in (1, 2, 3, 4):
                    for rec in recompute_modes:
                        lay = dataclasses.replace(base, tp=tp, pp=pp, vpp=vpp, micro_batch_size=mbs,
                                                  recompute=rec, recompute_method="uniform",
                                                  recompute_num_layers=1)
                        if not lay.problems(cfg, gpus_per_node):
                            out.append(lay)
    return out


def search(cfg: GrinConfig, base: Layout, impl: Optional[Implementation] = None,
           asm: Assumptions = Assumptions(), top: int = 5) -> list[Plan]:
    """The fastest fitting layouts (headroom >= min_headroom), best first.

    With flash attention selective recomputation frees only the attention's log-sum-exp (same memory
    as none, more compute), so it is searched only with unfused attention.
    """
    impl = impl or Implementation.for_config(cfg)
    modes = RECOMPUTE_MODES if impl.attention == "unfused" else ("none", "full")
    plans = [evaluate(cfg, lay, impl, asm) for lay in candidate_layouts(cfg, base, asm.gpus_per_node, modes)]
    fitting = [p for p in plans if p.fits]
    fitting.sort(key=lambda p: (-p.time["tokens_per_s_per_gpu"], -p.headroom))
    return fitting[:top]


def suggestions(cfg: GrinConfig, lay: Layout, impl: Optional[Implementation] = None,
                asm: Assumptions = Assumptions()) -> list[tuple[str, Plan]]:
    """For each knob, the smallest single change that makes a refused layout fit; fastest first."""
    def recompute(rec):
        return dataclasses.replace(lay, recompute=rec, recompute_method="uniform", recompute_num_layers=1)

    def more_stages(pp):
        same_vpp = dataclasses.replace(lay, pp=pp)
        keep = lay.vpp > 1 and not same_vpp.problems(cfg, asm.gpus_per_node)
        return same_vpp if keep else dataclasses.replace(lay, pp=pp, vpp=1)

    knobs = [  # each knob's changes, smallest first
        [(f"increase --pp to {pp}", more_stages(pp))
         for pp in range(lay.pp + 1, cfg.num_layers + 1) if cfg.num_layers % pp == 0],
        [(f"enable --recompute {rec}", recompute(rec))
         for rec in ("selective", "full") if RECOMPUTE_MODES.index(rec) > RECOMPUTE_MODES.index(lay.recompute)],
        [("enable --distributed-optimizer", dataclasses.replace(lay, distributed_optimizer=True))]
        if not lay.distributed_optimizer else [],
        [(f"increase --tp to {tp}", dataclasses.replace(lay, tp=tp)) for tp in (2, 4, 8) if tp > lay.tp],
        [("drop --vpp (plain 1F1B keeps fewer micro-batches in flight)", dataclasses.replace(lay, vpp=1))]
        if lay.vpp > 1 else [],
        [(f"lower --micro-batch-size to {mbs}", dataclasses.replace(lay, micro_batch_size=mbs))
         for mbs in range(lay.micro_batch_size - 1, 0, -1)],
    ]
    found = []
    for changes in knobs:
        for text, cand in changes:
            if cand.problems(cfg, asm.gpus_per_node):
                continue
            result = evaluate(cfg, cand, impl, asm)
            if result.fits:
                found.append((text, result))
                break
    found.sort(key=lambda item: -item[1].time["tokens_per_s_per_gpu"])
    return found


# ------------------------------------------------------------------------------------------------
# configs and command line
# ------------------------------------------------------------------------------------------------
_LAYOUT_KEYS = {
    "tensor_model_parallel_size": "tp", "pipeline_model_parallel_size": "pp",
    "virtual_pipeline_model_parallel_size": "vpp", "micro_batch_size": "micro_batch_size",
    "global_batch_size": "global_batch_size", "seq_length": "seq_length",
    "recompute_granularity": "recompute", "recompute_method": "recompute_method",
    "recompute_num_layers": "recompute_num_layers", "use_distributed_optimizer": "distributed_optimizer",
    "bf16": "bf16",
}
_MODEL_KEYS = {f.name for f in dataclasses.fields(GrinConfig)} - {"extra", "tensor_model_parallel_size",
                                                                   "pipeline_model_parallel_size",
                                                                   "virtual_pipeline_model_parallel_size",
                                                                   "recompute_granularity", "recompute_method",
                                                                   "recompute_num_layers", "bf16"}


def _load_yaml(path: Path) -> dict:
    import yaml

    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a YAML mapping")
    return data


def read_configs(paths: Sequence[str]) -> tuple[dict, dict, list[str]]:
    """Merge YAML files (later wins) into (flat settings, slurm section, files read).

    A cluster file (``slurm:`` / ``trainer:`` sections, configs/cluster/*.yaml) contributes its layout;
    given without a model or recipe file, the repository's configs/grin-16x3.8b.yaml and
    configs/pretrain-grin.yaml next to it are read first, as launch/submit.sh does.
    """
    files = [Path(p) for p in paths]
    loaded = [(p, _load_yaml(p)) for p in files]
    clusters = [(p, d) for p, d in loaded if "trainer" in d or "slurm" in d]
    if clusters and len(clusters) == len(loaded):
        root = clusters[0][0].resolve().parent.parent
        defaults = [root / "grin-16x3.8b.yaml", root / "pretrain-grin.yaml"]
        loaded = [(p, _load_yaml(p)) for p in defaults if p.is_file()] + loaded
    settings: dict = {}
    slurm: dict = {}
    for path, data in loaded:
        if "trainer" in data or "slurm" in data:
            unknown = set(data) - {"slurm", "trainer"}
            if unknown:
                raise ConfigError(f"{path}: unknown sections {sorted(unknown)} (use slurm: and trainer:)")
            slurm.update(data.get("slurm") or {})
            settings.update(data.get("trainer") or {})
        else:
            settings.update(data)
    return settings, slurm, [str(p) for p, _ in loaded]


def _model_from_settings(settings: dict, model_preset: Optional[str]) -> GrinConfig:
    name = model_preset or settings.get("model_preset") or "grin-16x3.8b"
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    overrides = {k: v for k, v in settings.items() if k in _MODEL_KEYS}
    return preset(name, **overrides)


def _layout_from(settings: dict, slurm: dict, args: argparse.Namespace, cfg: GrinConfig) -> Layout:
    values: dict[str, Any] = {}
    for key, name in _LAYOUT_KEYS.items():
        if settings.get(key) is not None:
            values[name] = settings[key]
    chunk = settings.get("num_layers_per_virtual_pipeline_stage")
    if chunk and "vpp" not in values:
        pp = int(values.get("pp", 1))
        values["vpp"] = cfg.num_layers // pp // int(chunk)
    if values.get("recompute") is None:
        values.pop("recompute", None)
    for name in ("tp", "pp", "vpp", "micro_batch_size", "global_batch_size", "seq_length", "recompute",
                 "recompute_method", "recompute_num_layers", "distributed_optimizer"):
        cli = getattr(args, name)
        if cli is not None:
            values[name] = cli
    if args.dtype is not None:
        values["bf16"] = args.dtype == "bf16"
    gpus = args.gpus or (int(slurm["nodes"]) * int(slurm.get("gpus_per_node", 8)) if "nodes" in slurm else None)
    if not gpus:
        raise ConfigError("give --gpus N (or a cluster config with slurm: nodes)")
    values.setdefault("seq_length", cfg.max_position_embeddings)
    if "global_batch_size" not in values:
        raise ConfigError("give --global-batch-size (or a recipe config that sets global_batch_size)")
    ints = ("tp", "pp", "vpp", "micro_batch_size", "global_batch_size", "seq_length", "recompute_num_layers")
    values = {k: (int(v) if k in ints else v) for k, v in values.items()}
    return Layout(gpus=int(gpus), **values)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="megatron-grin plan",
        description="Per-GPU memory and predicted speed of a GRIN layout (DP x PP x TP, no expert parallelism). "
                    "Exit status 1 when the layout does not fit with --min-headroom free. See docs/planning.md.")
    ap.add_argument("--config", action="append", default=[], metavar="YAML",
                    help="model, recipe or cluster YAML (repeatable, later wins); a cluster file alone also "
                         "reads configs/grin-16x3.8b.yaml and configs/pretrain-grin.yaml")
    ap.add_argument("--model-preset", choices=sorted(PRESETS), help="model (default: the config's, else grin-16x3.8b)")
    ap.add_argument("--gpus", type=int, help="GPUs in the job (default: the cluster config's nodes x gpus_per_node)")
    ap.add_argument("--gpu-memory", type=float, default=None, metavar="GIB", help="memory per GPU in GiB (80)")
    ap.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (8)")
    lay = ap.add_argument_group("layout (override the configs)")
    lay.add_argument("--tp", type=int)
    lay.add_argument("--pp", type=int)
    lay.add_argument("--vpp", type=int, help="model chunks per pipeline rank (interleaved 1F1B when > 1)")
    lay.add_argument("--micro-batch-size", type=int)
    lay.add_argument("--global-batch-size", type=int)
    lay.add_argument("--seq-length", type=int)
    lay.add_argument("--recompute", choices=RECOMPUTE_MODES)
    lay.add_argument("--recompute-method", choices=("uniform", "block"))
    lay.add_argument("--recompute-num-layers", type=int)
    lay.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction, default=None)
    lay.add_argument("--dtype", choices=("bf16", "fp32"), help="weights/activations (default: the config's bf16, "
                                                               "else bf16)")
    srch = ap.add_argument_group("search")
    srch.add_argument("--search", action="store_true", help="list the fastest fitting layouts instead")
    srch.add_argument("--top", type=int, default=5, help="layouts --search prints (5)")
    model = ap.add_argument_group("assumptions (docs/planning.md)")
    model.add_argument("--efficiency", type=float, help="share of peak FLOPs while computing (default: calibrated "
                                                        "to GRIN's 7077 tokens/s/GPU on 64 H100)")
    model.add_argument("--peak-tflops", type=float, help="dense BF16 peak per GPU (989.4, H100 SXM)")
    model.add_argument("--imbalance", type=float, help="busiest expert load / mean, dropless reserve (2.0)")
    model.add_argument("--min-headroom", type=float, help="refuse layouts with less free memory (0.10)")
    model.add_argument("--fragmentation", type=float, help="allocator slack on activations (0.10)")
    model.add_argument("--nvlink-gbps", type=float, help="intra-node collective bandwidth, GB/s (300)")
    model.add_argument("--network-gbps", type=float, help="inter-node collective bandwidth per GPU, GB/s (200)")
    model.add_argument("--p2p-network-gbps", type=float, help="inter-node pipeline send bandwidth, GB/s (40)")
    model.add_argument("--attention", choices=("flash", "unfused"), default="flash",
                       help="attention kernel: flash (TE, GPU) or unfused (megatron local, CPU)")
    model.add_argument("--fused-swiglu", action=argparse.BooleanOptionalAction, default=None,
                       help="megatron bias_activation_fusion (default: the model config's, off)")
    model.add_argument("--deallocate-pipeline-outputs", action=argparse.BooleanOptionalAction, default=None,
                       help="free sent stage outputs (default: the model config's, megatron default off)")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    return ap


def _assumptions(args: argparse.Namespace, slurm: dict) -> Assumptions:
    names = {"gpu_memory": "gpu_memory_gib", "gpus_per_node": "gpus_per_node", "efficiency": "efficiency",
             "peak_tflops": "peak_tflops", "imbalance": "imbalance", "min_headroom": "min_headroom",
             "fragmentation": "fragmentation", "nvlink_gbps": "nvlink_gbps", "network_gbps": "network_gbps",
             "p2p_network_gbps": "p2p_network_gbps"}
    values = {field_: getattr(args, arg) for arg, field_ in names.items() if getattr(args, arg) is not None}
    if "gpus_per_node" not in values and "gpus_per_node" in slurm:
        values["gpus_per_node"] = int(slurm["gpus_per_node"])
    return Assumptions(**values)


def _implementation(args: argparse.Namespace, cfg: GrinConfig) -> Implementation:
    impl = Implementation.for_config(cfg, attention=args.attention)
    if args.fused_swiglu is not None:
        impl = dataclasses.replace(impl, fused_swiglu=args.fused_swiglu)
    if args.deallocate_pipeline_outputs is not None:
        impl = dataclasses.replace(impl, deallocate_pipeline_outputs=args.deallocate_pipeline_outputs)
    return impl


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
_TERM_LABELS = {
    "weights": "weights ({dtype}, this stage's layers incl. all experts, / TP)",
    "gradients": "gradients (fp32 main-grad buffer)",
    "optimizer": "optimizer (fp32 master + Adam m, v{shard})",
    "activations": "activations (saved for backward, in flight)",
    "recompute_and_transients": "recompute working set + backward transients",
    "imbalance_reserve": "dropless imbalance reserve ({imbalance:g}x mean expert load)",
    "cuda_nccl_fragmentation": "CUDA context + NCCL + fragmentation",
}


def _header(plan: Plan) -> list[str]:
    c, lay = plan.cfg, plan.layout
    counts = parameter_summary(c)
    return [f"model: {c.num_layers} layers, hidden {c.hidden_size}, {c.num_experts} experts (top-{c.moe_router_topk}, "
            f"ffn {c.ffn_hidden_size}): {counts['total'] / 1e9:.2f}B parameters, {counts['active'] / 1e9:.2f}B active",
            f"on {lay.gpus} GPUs x {plan.assumptions.gpu_memory_gib:g} GiB: {lay.describe()}"]


def _memory_lines(plan: Plan) -> list[str]:
    lay = plan.layout
    shown = sorted({0, plan.peak.rank, lay.pp - 1})
    cols = [plan.ranks[r] for r in shown]
    fmt = dict(dtype="bf16" if lay.bf16 else "fp32", imbalance=plan.assumptions.imbalance,
               shard=f", / DP {lay.dp}" if lay.distributed_optimizer else ", not sharded")
    lines = ["", "memory per GPU (GiB)".ljust(62) + "".join(f"{'PP rank ' + str(r.rank):>12}" for r in cols)]
    lines.append("  parameters on the GPU".ljust(62) + "".join(f"{r.parameters / 1e9:>11.2f}B" for r in cols))
    for key, label in _TERM_LABELS.items():
        lines.append(("  " + label.format(**fmt)).ljust(62) + "".join(f"{r.terms[key] / GiB:>12.2f}" for r in cols))
    lines.append("  total".ljust(62) + "".join(f"{r.total / GiB:>12.2f}" for r in cols))
    lines.append("  chunk-microbatches in flight".ljust(62) + "".join(f"{r.inflight:>12d}" for r in cols))
    peak = plan.peak
    lines.append(f"peak: PP rank {peak.rank}, {peak.total / GiB:.1f} of {plan.assumptions.gpu_memory_gib:g} GiB, "
                 f"headroom {100 * plan.headroom:.1f}%")
    return lines


def _time_lines(plan: Plan) -> list[str]:
    t, lay, asm = plan.time, plan.layout, plan.assumptions
    fl = model_flops_per_token(plan.cfg, lay.seq_length)
    calibrated = "calibrated to GRIN's 7077 tokens/s/GPU on 64 H100" if asm.efficiency is None else "given"
    return [
        "",
        "predicted speed",
        f"  model FLOPs per token: 6 x {parameter_summary(plan.cfg)['active'] / 1e9:.2f}B active = "
        f"{fl['params'] / 1e9:.1f} G + attention {fl['attention'] / 1e9:.1f} G "
        f"(window ratio {attention_window_ratio(lay.seq_length, plan.cfg.sliding_window):.3f})",
        f"  compute efficiency {100 * plan.efficiency:.1f}% of {asm.peak_tflops:g} TFLOPS ({calibrated})",
        f"  compute {t['compute_s']:.2f} s on the slowest PP rank {t['slowest_rank']} "
        f"(stage imbalance {t['stage_imbalance']:.3f}), TP comm factor {t['tp_factor']:.3f}",
        f"  pipeline bubble (PP-1)/(VPP m) = {lay.pp - 1}/({lay.vpp} x {lay.num_microbatches}) = "
        f"{100 * t['bubble']:.1f}% ({t['bubble_s']:.2f} s)",
        f"  DP gradient/parameter communication {t['dp_comm_s']:.2f} s, pipeline sends {t['pp_comm_s']:.2f} s",
        f"  step {t['step_s']:.2f} s -> {t['tokens_per_s_per_gpu']:.0f} tokens/s/GPU, MFU {100 * t['mfu']:.1f}%",
    ]


def format_plan(plan: Plan) -> str:
    return "\n".join(_header(plan) + _memory_lines(plan) + _time_lines(plan))


def format_search(plans: list[Plan]) -> str:
    head = f"{'#':>2}  {'tokens/s/GPU':>12} {'MFU':>6} {'peak GiB':>9} {'headroom':>9}  layout"
    rows = [head]
    for i, p in enumerate(plans, 1):
        rows.append(f"{i:>2}  {p.time['tokens_per_s_per_gpu']:>12.0f} {100 * p.time['mfu']:>5.1f}% "
                    f"{p.peak.total / GiB:>9.1f} {100 * p.headroom:>8.1f}%  {p.layout.flags()}")
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings, slurm, files = read_configs(args.config)
        cfg = _model_from_settings(settings, args.model_preset)
        lay = _layout_from(settings, slurm, args, cfg)
        asm = _assumptions(args, slurm)
        impl = _implementation(args, cfg)
        if asm.efficiency is None:
            calibrated_efficiency(asm)  # fails early if the bandwidth assumptions make the anchor unreachable
    except (ConfigError, OSError, ValueError, TypeError) as err:
        print(f"megatron-grin plan: {err}", file=sys.stderr)
        return 2
    if args.search:
        return _run_search(cfg, lay, impl, asm, args, files)
    problems = lay.problems(cfg, asm.gpus_per_node)
    if problems:
        print("megatron-grin plan: invalid layout: " + "; ".join(problems), file=sys.stderr)
        return 2
    plan = evaluate(cfg, lay, impl, asm)
    fixes = [] if plan.fits else suggestions(cfg, lay, impl, asm)
    if args.json:
        out = {**plan.to_dict(), "configs": files,
               "suggestions": [{"change": t, "flags": p.layout.flags(), "headroom": p.headroom,
                                "tokens_per_s_per_gpu": p.time["tokens_per_s_per_gpu"]} for t, p in fixes]}
        print(json.dumps(out, indent=2))
    else:
        if files:
            print("configs: " + ", ".join(files))
        print(format_plan(plan))
        if not plan.fits:
            print(_refusal(plan, fixes))
    return 0 if plan.fits else 1


def _refusal(plan: Plan, fixes: list[tuple[str, Plan]]) -> str:
    need = plan.peak.total / GiB
    limit = plan.assumptions.gpu_memory_gib * (1 - plan.assumptions.min_headroom)
    lines = ["", f"DOES NOT FIT: PP rank {plan.peak.rank} needs {need:.1f} GiB; at most {limit:.1f} GiB leaves the "
             f"required {100 * plan.assumptions.min_headroom:.0f}% headroom of {plan.assumptions.gpu_memory_gib:g} GiB."]
    if fixes:
        lines.append("Changes that fit:")
        lines += [f"  {t}: {p.peak.total / GiB:.1f} GiB ({100 * p.headroom:.0f}% headroom), "
                  f"{p.time['tokens_per_s_per_gpu']:.0f} tokens/s/GPU  [{p.layout.flags()}]" for t, p in fixes]
    else:
        lines.append("No single change fits; try --search.")
    return "\n".join(lines)


def _run_search(cfg: GrinConfig, lay: Layout, impl: Implementation, asm: Assumptions,
                args: argparse.Namespace, files: list[str]) -> int:
    if args.distributed_optimizer is None:  # explore with the distributed optimizer unless told otherwise
        lay = dataclasses.replace(lay, distributed_optimizer=True)
    plans = search(cfg, lay, impl, asm, top=args.top)
    if args.json:
        print(json.dumps({"configs": files, "layouts": [p.to_dict() for p in plans]}, indent=2))
    else:
        if files:
            print("configs: " + ", ".join(files))
        counts = parameter_summary(cfg)
        print(f"{lay.gpus} GPUs x {asm.gpu_memory_gib:g} GiB, global batch {lay.global_batch_size} x "
              f"{lay.seq_length}, {counts['total'] / 1e9:.1f}B parameters; fastest layouts with >= "
              f"{100 * asm.min_headroom:.0f}% headroom:")
        print(format_search(plans) if plans else "  none fits")
    return 0 if plans else 1


if __name__ == "__main__":
    sys.exit(main())
