"""Build GRIN models on megatron-core: the TransformerConfig, the GPTModel with an lm-head bias, counts.

``build_model(cfg)`` returns a megatron ``GPTModel`` for this pipeline stage (or virtual stage) using
the GRIN specs; the model follows megatron's conventions (input [B, S] token ids, [S, B, H] inside,
logits [B, S, V/TP] or the per-token loss when labels are given).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_grin.config import GrinConfig, resolve_backend
from megatron_grin.model.spec import default_use_te, grin_block_spec


@dataclass
class GrinTransformerConfig(TransformerConfig):
    """megatron TransformerConfig plus the GRIN router settings the SparseMixerV2Router reads."""

    grin_router_variant: str = "v2"
    """SparseMixer estimator: "v2" (GRIN) or "v2_star" (the paper's corrected estimator)."""
    grin_router_jitter_eps: float = 0.01
    """Relative mask threshold epsilon (HF router_jitter_noise)."""
    grin_input_jitter_eps: float = 0.0
    """Multiplicative jitter of the MoE input in training (HF input_jitter_noise); experts see it too."""


_VARIANT = {"sparsemixer_v2": "v2", "sparsemixer_v2_star": "v2_star"}


def transformer_config(cfg: GrinConfig, **overrides: Any) -> GrinTransformerConfig:
    """Translate a GrinConfig into megatron-core's MoE config (dropless, EP=1, LayerNorm, SwiGLU)."""
    cfg.validate()
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        moe_ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim,
        normalization="LayerNorm",
        layernorm_epsilon=cfg.layernorm_epsilon,
        add_bias_linear=False,  # experts and router carry no bias; o_proj / lm_head biases come from the spec
        add_qkv_bias=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        bias_activation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_method_std,
        window_size=None if cfg.sliding_window is None else (cfg.sliding_window - 1, 0),
        num_moe_experts=cfg.num_experts,
        moe_router_topk=cfg.moe_router_topk,
        moe_router_load_balancing_type="none",  # the GRIN router attaches its own global balance loss
        moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
        moe_z_loss_coeff=cfg.moe_z_loss_coeff,
        moe_expert_capacity_factor=None,  # dropless
        moe_token_dispatcher_type="allgather",  # EP=1: gather SP shards, every rank computes all experts
        moe_grouped_gemm=resolve_backend(cfg.expert_backend) == "te_grouped",
        moe_router_dtype="fp32",
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=1,
        expert_tensor_parallel_size=cfg.tensor_model_parallel_size,
        sequence_parallel=cfg.seq_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=cfg.bf16,
        use_cpu_initialization=not cuda,
        batch_p2p_sync=cuda,
        recompute_granularity=cfg.recompute_granularity,
        recompute_method=cfg.recompute_method,
        recompute_num_layers=cfg.recompute_num_layers,
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        grin_router_variant=_VARIANT[cfg.router_variant],
        grin_router_jitter_eps=cfg.router_jitter_eps,
        grin_input_jitter_eps=cfg.input_jitter_eps,
    )
    kwargs.update(cfg.extra)
    kwargs.update(overrides)
    return GrinTransformerConfig(**kwargs)


class GrinGPTModel(GPTModel):
    """GPTModel whose output layer carries a bias (GRIN / Phi-3.5-MoE ``lm_head_bias``)."""

    def __init__(self, *args, lm_head_bias: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        if self.post_process and lm_head_bias:
            old = self.output_layer
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                self.config.hidden_size, self.vocab_size, config=self.config, init_method=self.config.init_method,
                bias=True, skip_bias_add=False, gather_output=not self.parallel_output,
                skip_weight_param_allocation=False, tp_group=self.pg_collection.tp)
            self.output_layer.weight.data.copy_(old.weight.data)


def build_model(cfg: GrinConfig, *, pre_process: bool = True, post_process: bool = True,
                vp_stage: Optional[int] = None, use_te: Optional[bool] = None,
                tconfig: Optional[GrinTransformerConfig] = None, **config_overrides: Any) -> GrinGPTModel:
    """Build the GRIN model chunk for the current (virtual) pipeline stage; needs parallel_state set up."""
    use_te = default_use_te() if use_te is None else use_te
    tconfig = tconfig or transformer_config(cfg, **config_overrides)
    return GrinGPTModel(
        config=tconfig,
        transformer_layer_spec=grin_block_spec(tconfig, use_te=use_te, expert_backend=cfg.expert_backend,
                                               vp_stage=vp_stage),
        vocab_size=cfg.padded_vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(cfg.rotary_base),
        vp_stage=vp_stage,
    )


def parameter_counts(cfg: GrinConfig) -> dict[str, int]:
    """Total and active (per-token) parameter counts of the unpadded model, computed analytically.

    Active = everything except the (num_experts - top_k) experts a token does not visit.
    """
    h, f, v, e, k = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size, cfg.num_experts, cfg.moe_router_topk
    d, heads, groups = cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
    attn = h * d * (heads + 2 * groups) + d * (heads + 2 * groups) + heads * d * h + h
    norms = 2 * 2 * h
    router = e * h
    expert = 3 * h * f
    layer_total = attn + norms + router + e * expert
    layer_active = attn + norms + router + k * expert
    embed_and_head = v * h + (v * h + v) + 2 * h
    return {
        "total": cfg.num_layers * layer_total + embed_and_head,
        "active": cfg.num_layers * layer_active + embed_and_head,
        "expert": cfg.num_layers * e * expert,
    }


def build_model_on_meta(cfg: GrinConfig, **kwargs: Any) -> GrinGPTModel:
    """Build the model with no storage (meta tensors): shapes, names and counts of any size, instantly.

    megatron allocates on ``torch.cuda.current_device()`` explicitly, so that is pointed at "meta" for the
    duration of the build, alongside the default-device context.
    """
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: "meta"  # type: ignore[assignment]
    try:
        with torch.device("meta"):
            return build_model(cfg, use_cpu_initialization=False, perform_initialization=False, **kwargs)
    finally:
        torch.cuda.current_device = original  # type: ignore[assignment]
