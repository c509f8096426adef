"""GRIN layer and block specs: megatron ModuleSpecs with the GRIN router, MoE layer and biases.

The GRIN block is pre-LN with LayerNorm *with bias*, q/k/v/o biases, GQA + RoPE (+ sliding window),
and an MoE MLP (SparseMixer-v2 router without bias, dropless SwiGLU experts without bias).
Two flavours: ``local`` (pure PyTorch; CPU, tests, no Transformer Engine) and ``te``.
Megatron-LM's ``--attention-backend`` (``TransformerConfig.attention_backend``) picks the core attention:
``local`` is megatron's DotProductAttention on either flavour (as Megatron-Bridge does); on the local
spec ``unfused`` is too, and auto / flash / fused are GrinCoreAttention (model/attention.py); on the TE
spec auto / flash / fused / unfused are TEDotProductAttention, which megatron's GPTModel steers through
the NVTE_*_ATTN variables.
"""

from __future__ import annotations

import logging

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnBackend, AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_grin.config import have_transformer_engine
from megatron_grin.model import attention as grin_attention
from megatron_grin.model.experts import experts_spec
from megatron_grin.model.layers import (
    RowParallelLinearWithBias,
    SequenceParallelLayerNorm,
    te_row_parallel_linear_with_bias,
)
from megatron_grin.model.moe_layer import GrinMoELayer
from megatron_grin.model.router import SparseMixerV2Router


def grin_moe_spec(expert_backend: str = "auto", use_te: bool = False) -> ModuleSpec:
    """The MoE MLP: GrinMoELayer + SparseMixerV2Router + dropless experts."""
    return ModuleSpec(
        module=GrinMoELayer,
        submodules=MoESubmodules(experts=experts_spec(expert_backend, use_te), router=SparseMixerV2Router),
        metainfo={"fuse_pre_mlp_layernorm": False},
    )


def core_attention_spec(attention_backend: str = "auto", use_te: bool = False):
    """The ``core_attention`` submodule for Megatron-LM's --attention-backend name on this spec flavour."""
    if attention_backend not in {b.name for b in AttnBackend}:
        raise ValueError(f"--attention-backend {attention_backend!r} is unknown; choose one of "
                         f"{[b.name for b in AttnBackend]}")
    if attention_backend == "local" or (attention_backend == "unfused" and not use_te):
        return DotProductAttention
    if use_te:
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        return TEDotProductAttention
    return ModuleSpec(module=grin_attention.GrinCoreAttention, params={"attention_backend": attention_backend})


def describe_core_attention(attention_backend: str, use_te: bool, window_size, device_type: str) -> str:
    """The model-build log line: which core attention runs, with which kernels."""
    core = core_attention_spec(attention_backend, use_te)
    if core is DotProductAttention:
        return "core attention: megatron DotProductAttention (unfused: materialises [b, heads, s, s] scores)"
    if use_te:
        return (f"core attention: TEDotProductAttention (Transformer Engine's kernel choice, "
                f"--attention-backend {attention_backend})")
    left = None if window_size is None or window_size[0] < 0 else window_size[0]
    return "core attention: " + grin_attention.describe(attention_backend, left, device_type)


def grin_layer_spec(use_te: bool = False, expert_backend: str = "auto", attention_backend: str = "auto") -> ModuleSpec:
    """One GRIN transformer layer (attention + MoE)."""
    core_attention = core_attention_spec(attention_backend, use_te)
    if use_te:
        from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear, TENorm

        return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp,  # fused into linear_qkv
            self_attention=ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                                      submodules=SelfAttentionSubmodules(
                                          linear_qkv=TELayerNormColumnParallelLinear,
                                          core_attention=core_attention,
                                          linear_proj=te_row_parallel_linear_with_bias(),
                                          q_layernorm=IdentityOp, k_layernorm=IdentityOp)),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=TENorm,
            mlp=grin_moe_spec(expert_backend, use_te=True),
            mlp_bda=get_bias_dropout_add,
        ))

    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=SequenceParallelLayerNorm,
        self_attention=ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                                  submodules=SelfAttentionSubmodules(
                                      linear_qkv=ColumnParallelLinear,
                                      core_attention=core_attention,
                                      linear_proj=RowParallelLinearWithBias,
                                      q_layernorm=IdentityOp, k_layernorm=IdentityOp)),
        self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=SequenceParallelLayerNorm,
        mlp=grin_moe_spec(expert_backend, use_te=False),
        mlp_bda=get_bias_dropout_add,
        # Same checkpoint keys as the TE flavour, where the input LayerNorm lives inside linear_qkv.
        sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_"},
    ))


def grin_block_spec(config, use_te: bool = False, expert_backend: str = "auto",
                    vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """Layer specs for this pipeline stage plus the final LayerNorm; logs the core attention once.

    The attention choice is ``config.attention_backend`` (megatron's AttnBackend, from --attention-backend).
    """
    attention_backend = getattr(config.attention_backend, "name", config.attention_backend)
    grin_attention.log_once(logging.INFO, describe_core_attention(
        attention_backend, use_te, config.window_size, "cuda" if torch.cuda.is_available() else "cpu"))
    layer = grin_layer_spec(use_te=use_te, expert_backend=expert_backend, attention_backend=attention_backend)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        final_norm = SequenceParallelLayerNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=final_norm)


def default_use_te() -> bool:
    """TE layers when Transformer Engine is installed and a GPU is present."""

    return have_transformer_engine() and torch.cuda.is_available()
