"""Accounting: parameter counts, FLOPs per token and peak FLOP/s, one convention for the whole package.

The trainer's logged MFU (``training/metrics.py``), ``megatron-grin bench`` and ``megatron-grin plan`` all
call these functions, so their numbers agree by construction. Pure arithmetic on a :class:`GrinConfig`:
no torch or megatron import, so the flag-parsing path (``plan``, ``pretrain --dry-run``) stays light.

Conventions:
* parameters: ``parameter_counts`` is the unpadded model (HF's counts: 41.9B total, 6.6B active for
  grin-16x3.8b); ``rank_parameters`` is what one GPU holds (vocab padded to
  ``make_vocab_size_divisible_by``, sharded over TP, the layers of its pipeline chunks).
* MFU FLOPs (``flops_per_token``): PaLM's ``6 x N + 12 x L x heads x head_dim x seq`` per token, N the
  active parameters a token passes through except the embedding lookup (attention, norms, biases,
  router, its top-k experts, the LM head). Attention counts the full square: no causal or sliding-window
  discount, as PaLM and Megatron-LM do, so MFU compares across attention kernels.
* hardware FLOPs (``layer_matmul_flops``, ``attention_score_flops``): the GEMMs one token costs in one
  layer, for the planner's time model; the score FLOPs depend on how many keys a kernel really visits.
"""

from __future__ import annotations

from typing import Optional

from megatron_grin.config import GrinConfig


# ------------------------------------------------------------------------------------------------
# parameters
# ------------------------------------------------------------------------------------------------
def layer_parameters(cfg: GrinConfig, tp: int = 1) -> dict[str, int]:
    """Parameters of one transformer layer held by one TP rank (tp=1: the whole layer), by part."""
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    a, g, e, k = cfg.num_attention_heads, cfg.num_query_groups, cfg.num_experts, cfg.moe_router_topk
    qkv = d * (a + 2 * g)
    attention = (h * qkv + qkv) // tp + a * d * h // tp + h  # qkv weight+bias sharded; o_proj bias replicated
    norms = 2 * 2 * h  # input and pre-MLP LayerNorm (weight, bias), replicated
    router = e * h  # replicated
    expert = 3 * h * f // tp  # fc1 [gate; up] + fc2, sharded over expert-TP = TP
    return {"total": attention + norms + router + e * expert, "active": attention + norms + router + k * expert,
            "expert": e * expert, "attention": attention, "norms": norms, "router": router,
            "one_expert": expert}


def padded_vocab(cfg: GrinConfig, tp: int) -> int:
    """Embedding rows at tensor-parallel size ``tp`` (the config's padding rule, GrinConfig.padded_vocab_size)."""
    if cfg.tensor_model_parallel_size == tp:
        return cfg.padded_vocab_size
    return cfg.replace(tensor_model_parallel_size=tp).padded_vocab_size


def embedding_parameters(cfg: GrinConfig, tp: int = 1, padded: bool = True) -> int:
    """Word embedding rows x hidden (vocab-sharded over TP when padded)."""
    v = padded_vocab(cfg, tp) // tp if padded else cfg.vocab_size
    return v * cfg.hidden_size


def head_parameters(cfg: GrinConfig, tp: int = 1, padded: bool = True) -> int:
    """Final LayerNorm (replicated) + output layer weight and bias (vocab-sharded)."""
    v = padded_vocab(cfg, tp) // tp if padded else cfg.vocab_size
    return 2 * cfg.hidden_size + v * cfg.hidden_size + v


def parameter_counts(cfg: GrinConfig) -> dict[str, int]:
    """Total, active (per token: the top-k experts, not all) and expert parameters, unpadded vocab."""
    layer = layer_parameters(cfg)
    outer = embedding_parameters(cfg, padded=False) + head_parameters(cfg, padded=False)
    return {"total": cfg.num_layers * layer["total"] + outer, "active": cfg.num_layers * layer["active"] + outer,
            "expert": cfg.num_layers * layer["expert"]}


def chunk_parameters(cfg: GrinConfig, tp: int, pp: int, vpp: int, rank: int, chunk: int) -> int:
    """Parameters (padded vocab, one TP shard) of model chunk ``chunk`` on pipeline rank ``rank``.

    Megatron splits layers evenly: each of the PP x VPP chunks holds num_layers / (PP x VPP) layers; the
    embedding sits on chunk 0 of rank 0, the final norm and output layer on the last chunk of the last
    rank (untied embeddings).
    """
    n = cfg.num_layers // (pp * vpp) * layer_parameters(cfg, tp)["total"]
    if rank == 0 and chunk == 0:
        n += embedding_parameters(cfg, tp)
    if rank == pp - 1 and chunk == vpp - 1:
        n += head_parameters(cfg, tp)
    return n


def rank_parameters(cfg: GrinConfig, tp: int, pp: int, vpp: int, rank: int) -> int:
    """Parameters held by one GPU of pipeline rank ``rank`` (all its chunks, one TP shard)."""
    return sum(chunk_parameters(cfg, tp, pp, vpp, rank, c) for c in range(vpp))


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------
def attention_window_ratio(seq: int, window: Optional[int]) -> float:
    """Attended (query, key) pairs with the sliding window / pairs of full causal attention."""
    causal = seq * (seq + 1) / 2
    if window is None or window >= seq:
        return 1.0
    return (window * (window + 1) / 2 + (seq - window) * window) / causal


def flops_per_token(cfg: GrinConfig, seq_length: int) -> dict[str, float]:
    """Training (fwd + bwd) FLOPs per token in the MFU convention (module docstring), by part."""
    matmul = 6.0 * (parameter_counts(cfg)["active"] - embedding_parameters(cfg, padded=False))
    attention = 12.0 * cfg.num_layers * cfg.num_attention_heads * cfg.head_dim * seq_length
    return {"params": matmul, "attention": attention, "total": matmul + attention}


def layer_matmul_flops(cfg: GrinConfig) -> dict[str, float]:
    """Forward GEMM FLOPs per token of one whole layer (all TP ranks), by part: x3 for fwd + bwd."""
    p = layer_parameters(cfg)
    qkv = cfg.head_dim * (cfg.num_attention_heads + 2 * cfg.num_query_groups)
    return {"qkv": 2.0 * cfg.hidden_size * qkv, "proj": 2.0 * cfg.num_attention_heads * cfg.head_dim * cfg.hidden_size,
            "router": 2.0 * p["router"], "experts": 2.0 * cfg.moe_router_topk * p["one_expert"]}


def attention_score_flops(cfg: GrinConfig, keys_per_query: float) -> float:
    """Forward FLOPs per token of QK^T and AV over ``keys_per_query`` keys (one layer, all heads)."""
    return 4.0 * cfg.num_attention_heads * cfg.head_dim * keys_per_query


def head_matmul_flops(cfg: GrinConfig, tp: int = 1) -> float:
    """Forward FLOPs per token of the output layer (all TP ranks; padded vocab, as megatron computes it)."""
    return 2.0 * cfg.hidden_size * padded_vocab(cfg, tp)


# ------------------------------------------------------------------------------------------------
# peak FLOP/s and memory bandwidth per device (vendor datasheets, dense, SXM parts unless named)
# ------------------------------------------------------------------------------------------------
#: name fragment: (dense bf16 TFLOP/s, dense TF32 TFLOP/s, HBM TB/s). Looked up in this order, so the
#: more specific names come first ("GH200" before "H200", "H100 PCIe" before "H100").
DEVICES: dict[str, tuple[float, float, float]] = {
    "GH200": (989.4, 494.7, 4.9), "H200": (989.4, 494.7, 4.8), "H100 PCIe": (756.0, 378.0, 2.0),
    "H100": (989.4, 494.7, 3.35), "H800": (989.4, 494.7, 3.35), "B200": (2250.0, 1100.0, 8.0),
    "A100": (312.0, 156.0, 2.039), "A800": (312.0, 156.0, 2.039), "L40S": (362.1, 181.0, 0.864),
    "A10G": (70.0, 35.0, 0.6), "A10": (125.0, 62.5, 0.6),
}


def device_entry(device_name: str) -> Optional[tuple[str, tuple[float, float, float]]]:
    """(matched fragment, (bf16 TFLOP/s, TF32 TFLOP/s, HBM TB/s)) for a device name, or None if unknown."""
    for fragment, entry in DEVICES.items():
        if fragment.lower() in device_name.lower():
            return fragment, entry
    return None


def datasheet_peak_tflops(device_name: str, bf16: bool = True) -> Optional[float]:
    """Dense peak TFLOP/s of a named device (bf16, else TF32 for fp32 training); None if unknown."""
    found = device_entry(device_name)
    return None if found is None else found[1][0 if bf16 else 1]


def mfu(tokens_per_second: float, cfg: GrinConfig, seq_length: int, peak_flops: float, devices: int = 1) -> float:
    """Model FLOPs utilisation: tokens/s x FLOPs per token / (peak FLOP/s x devices)."""
    return tokens_per_second * flops_per_token(cfg, seq_length)["total"] / (peak_flops * devices)
