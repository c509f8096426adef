"""Key and layout mapping between a megatron-grin model (TP=1, PP=1 view) and HF ``PhimoeForCausalLM``.

HF keys are the on-disk ("legacy") names that GRIN-MoE and Phi-3.5-MoE ship with and that
transformers 4.46+ and 5.x both load: ``block_sparse_moe.gate`` and ``block_sparse_moe.experts.{e}.w1/w2/w3``.
transformers 5.x *in-memory* fused keys (``mlp.router``, ``mlp.experts.gate_up_proj``/``down_proj``) are
accepted on input and normalised to the legacy names.

Layout differences handled here:
  * megatron fuses q/k/v into ``linear_qkv`` grouped per query group: [q_g (heads/groups*d), k_g (d), v_g (d)]
    for each group g; HF keeps separate q/k/v projections.
  * megatron's expert ``linear_fc1`` is [w1 (gate); w3 (up)] stacked on the output dim.
  * megatron's embedding and output layer are padded to ``padded_vocab_size`` rows.
"""

from __future__ import annotations

import re
from typing import Iterator, Mapping

import torch

from megatron_grin.config import GrinConfig

_LAYER = "decoder.layers.{i}."
_HF_LAYER = "model.layers.{i}."

# per-layer keys that map one-to-one (ours suffix -> HF suffix)
_DIRECT = {
    "input_layernorm.weight": "input_layernorm.weight",
    "input_layernorm.bias": "input_layernorm.bias",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.linear_proj.bias": "self_attn.o_proj.bias",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "pre_mlp_layernorm.bias": "post_attention_layernorm.bias",
    "mlp.router.weight": "block_sparse_moe.gate.weight",
}
#: HF tensors outside the layers, in export order (written and freed before the layers stream in)
HF_GLOBAL_KEYS = ("model.embed_tokens.weight", "model.norm.weight", "model.norm.bias", "lm_head.weight", "lm_head.bias")
_GLOBAL_DIRECT = {
    "decoder.final_layernorm.weight": "model.norm.weight",
    "decoder.final_layernorm.bias": "model.norm.bias",
}


# --- q/k/v ----------------------------------------------------------------------------------------
def split_qkv(qkv: torch.Tensor, cfg: GrinConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron linear_qkv weight [(heads + 2*groups)*d, ...] (or bias) -> HF q, k, v."""
    d, groups = cfg.head_dim, cfg.num_query_groups
    q_per_group = cfg.num_attention_heads // groups
    rest = qkv.shape[1:]
    grouped = qkv.reshape(groups, (q_per_group + 2) * d, *rest)
    q, k, v = torch.split(grouped, [q_per_group * d, d, d], dim=1)
    return (q.reshape(groups * q_per_group * d, *rest), k.reshape(groups * d, *rest), v.reshape(groups * d, *rest))


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: GrinConfig) -> torch.Tensor:
    """HF q, k, v (weights or biases) -> megatron linear_qkv layout."""
    d, groups = cfg.head_dim, cfg.num_query_groups
    q_per_group = cfg.num_attention_heads // groups
    rest = q.shape[1:]
    merged = torch.cat([q.reshape(groups, q_per_group * d, *rest), k.reshape(groups, d, *rest),
                        v.reshape(groups, d, *rest)], dim=1)
    return merged.reshape(groups * (q_per_group + 2) * d, *rest)


# --- one layer --------------------------------------------------------------------------------------
def layer_to_hf(ours: Mapping[str, torch.Tensor], i: int, cfg: GrinConfig,
                prefix: str = _LAYER) -> dict[str, torch.Tensor]:
    """HF tensors of decoder layer i from our (unsharded) tensors of that layer."""
    p, h = prefix.format(i=i), _HF_LAYER.format(i=i)
    out = {h + hf: ours[p + k] for k, hf in _DIRECT.items()}
    for kind in ("weight", "bias"):
        q, k, v = split_qkv(ours[p + f"self_attention.linear_qkv.{kind}"], cfg)
        out[h + f"self_attn.q_proj.{kind}"], out[h + f"self_attn.k_proj.{kind}"] = q, k
        out[h + f"self_attn.v_proj.{kind}"] = v
    f = cfg.ffn_hidden_size
    for e in range(cfg.num_experts):
        fc1 = ours[p + f"mlp.experts.local_experts.{e}.linear_fc1.weight"]
        out[h + f"block_sparse_moe.experts.{e}.w1.weight"] = fc1[:f]
        out[h + f"block_sparse_moe.experts.{e}.w3.weight"] = fc1[f:]
        out[h + f"block_sparse_moe.experts.{e}.w2.weight"] = ours[p + f"mlp.experts.local_experts.{e}.linear_fc2.weight"]
    return out


def layer_from_hf(hf: Mapping[str, torch.Tensor], i: int, cfg: GrinConfig,
                  prefix: str = _LAYER) -> dict[str, torch.Tensor]:
    """Our (unsharded) tensors of decoder layer i from HF legacy-named tensors."""
    p, h = prefix.format(i=i), _HF_LAYER.format(i=i)
    out = {p + k: hf[h + v] for k, v in _DIRECT.items()}
    for kind in ("weight", "bias"):
        out[p + f"self_attention.linear_qkv.{kind}"] = merge_qkv(
            hf[h + f"self_attn.q_proj.{kind}"], hf[h + f"self_attn.k_proj.{kind}"], hf[h + f"self_attn.v_proj.{kind}"], cfg)
    for e in range(cfg.num_experts):
        x = h + f"block_sparse_moe.experts.{e}."
        out[p + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = torch.cat([hf[x + "w1.weight"], hf[x + "w3.weight"]])
        out[p + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = hf[x + "w2.weight"]
    return out


# --- embeddings and head ------------------------------------------------------------------------
def globals_to_hf(ours: Mapping[str, torch.Tensor], cfg: GrinConfig) -> dict[str, torch.Tensor]:
    v = cfg.vocab_size
    out = {hf: ours[k] for k, hf in _GLOBAL_DIRECT.items()}
    out["model.embed_tokens.weight"] = ours["embedding.word_embeddings.weight"][:v]
    out["lm_head.weight"] = ours["output_layer.weight"][:v]
    out["lm_head.bias"] = ours["output_layer.bias"][:v]
    return out


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def globals_from_hf(hf: Mapping[str, torch.Tensor], cfg: GrinConfig) -> dict[str, torch.Tensor]:
    rows = cfg.padded_vocab_size
    out = {k: hf[v] for k, v in _GLOBAL_DIRECT.items()}
    out["embedding.word_embeddings.weight"] = _pad_rows(hf["model.embed_tokens.weight"], rows)
    out["output_layer.weight"] = _pad_rows(hf["lm_head.weight"], rows)
    out["output_layer.bias"] = _pad_rows(hf["lm_head.bias"], rows)
    return out


# --- whole model --------------------------------------------------------------------------------
def to_hf(ours: Mapping[str, torch.Tensor], cfg: GrinConfig) -> dict[str, torch.Tensor]:
    """Full HF (legacy-key) state dict from our full TP1/PP1 state dict."""
    out = globals_to_hf(ours, cfg)
    for i in range(cfg.num_layers):
        out.update(layer_to_hf(ours, i, cfg))
    return out


def from_hf(hf: Mapping[str, torch.Tensor], cfg: GrinConfig) -> dict[str, torch.Tensor]:
    """Our full TP1/PP1 state dict (parameters only) from an HF state dict (legacy or 5.x fused keys)."""
    hf = normalize_hf_keys(hf)
    out = globals_from_hf(hf, cfg)
    for i in range(cfg.num_layers):
        out.update(layer_from_hf(hf, i, cfg))
    return out


_FUSED = re.compile(r"^(model\.layers\.\d+\.)mlp\.(router\.weight|experts\.gate_up_proj|experts\.down_proj)$")


def normalize_hf_keys(hf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rewrite transformers-5.x in-memory MoE keys to the legacy on-disk names; others pass through."""
    out: dict[str, torch.Tensor] = {}
    for key, value in hf.items():
        m = _FUSED.match(key)
        if not m:
            out[key] = value
            continue
        layer, what = m.groups()
        if what == "router.weight":
            out[layer + "block_sparse_moe.gate.weight"] = value
        elif what == "experts.gate_up_proj":
            for e, gate_up in enumerate(value):
                w1, w3 = gate_up.chunk(2, dim=0)
                out[layer + f"block_sparse_moe.experts.{e}.w1.weight"] = w1
                out[layer + f"block_sparse_moe.experts.{e}.w3.weight"] = w3
        else:
            for e, down in enumerate(value):
                out[layer + f"block_sparse_moe.experts.{e}.w2.weight"] = down
    return out


def hf_keys(cfg: GrinConfig) -> Iterator[str]:
    """Every HF key a GRIN model of this shape has: the globals first, then layers 0..L-1 (the export order)."""
    yield from HF_GLOBAL_KEYS
    for i in range(cfg.num_layers):
        h = _HF_LAYER.format(i=i)
        yield from (h + v for v in _DIRECT.values())
        for proj in "qkv":
            yield from (h + f"self_attn.{proj}_proj.weight", h + f"self_attn.{proj}_proj.bias")
        for e in range(cfg.num_experts):
            yield from (h + f"block_sparse_moe.experts.{e}.w{j}.weight" for j in (1, 2, 3))


def hf_config_dict(cfg: GrinConfig, **extra) -> dict:
    """``config.json`` content of the equivalent PhimoeForCausalLM (every field GRIN sets)."""
    d = dict(
        architectures=["PhimoeForCausalLM"], model_type="phimoe",
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings, initializer_range=cfg.init_method_std,
        rms_norm_eps=cfg.layernorm_epsilon, use_cache=True, pad_token_id=None,
        # GRIN's tokenizer ids; a smaller vocabulary must pass its own (from the tokenizer).
        bos_token_id=1 if cfg.vocab_size > 1 else None, eos_token_id=32000 if cfg.vocab_size > 32000 else None,
        tie_word_embeddings=False, rope_theta=float(cfg.rotary_base), rope_scaling=None,
        sliding_window=cfg.sliding_window, attention_dropout=0.0, hidden_dropout=0.0,
        num_experts_per_tok=cfg.moe_router_topk, num_local_experts=cfg.num_experts, output_router_logits=False,
        router_aux_loss_coef=cfg.moe_aux_loss_coeff, router_jitter_noise=cfg.router_jitter_eps,
        input_jitter_noise=cfg.input_jitter_eps, attention_bias=True, lm_head_bias=True, torch_dtype="float32",
    )
    d.update(extra)
    return d
