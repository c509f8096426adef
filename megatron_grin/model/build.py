"""Build GRIN models on megatron-core: the TransformerConfig, the GPTModel with an lm-head bias, counts.

``build_model(cfg)`` returns a megatron ``GPTModel`` for this pipeline stage (or virtual stage) using
the GRIN specs; the model follows megatron's conventions (input [B, S] token ids, [S, B, H] inside,
logits [B, S, V/TP] or the per-token loss when labels are given).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_grin import compat
from megatron_grin.config import GrinConfig, resolve_backend
from megatron_grin.model.spec import default_use_te, grin_block_spec
from megatron_grin.ops.backend import fusion_backend
from megatron_grin.settings import field_default


@dataclass
class GrinTransformerConfig(TransformerConfig):
    """megatron TransformerConfig plus the GRIN router settings the SparseMixerV2Router reads."""

    # Defaults are GrinConfig's (config.py declares them once); transformer_config() always sets all three.
    grin_router_variant: str = field_default(GrinConfig, "router_variant")
    """SparseMixer estimator, by --grin-router's names: sparsemixer_v2 (GRIN) or sparsemixer_v2_star."""
    grin_router_jitter_eps: float = field_default(GrinConfig, "router_jitter_eps")
    """Relative mask threshold epsilon (HF router_jitter_noise)."""
    grin_input_jitter_eps: float = field_default(GrinConfig, "input_jitter_eps")
    """Multiplicative jitter of the MoE input in training (HF input_jitter_noise); experts see it too."""
    grin_router_backend: str = "auto"
    """Routing and input-jitter kernels (--moe-router-fusion): auto (Triton on CUDA), triton or torch."""
    grin_permute_backend: str = "auto"
    """Permute/unpermute kernels of GrinTokenDispatcher (--moe-permute-fusion): auto, triton or torch."""
    grin_expert_fusion: str = "auto"
    """GroupedMMExperts (--moe-grouped-gemm): auto (grouped GEMMs + SwiGLU kernel on CUDA, the expert loop
    on CPU), triton (forced on) or torch (the expert loop)."""
    grin_grouped_gemm: str = "auto"
    """The grouped GEMM when fused: auto (torch grouped_mm on sm90+ bf16, else Triton), grouped_mm or triton."""


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
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        window_size=None if cfg.sliding_window is None else (cfg.sliding_window - 1, 0),
        attention_backend=AttnBackend[cfg.attention_backend],  # the core attention: model/spec.py
        num_moe_experts=cfg.num_experts,
        moe_router_topk=cfg.moe_router_topk,
        moe_router_load_balancing_type="none",  # the GRIN router attaches its own global balance loss
        moe_aux_loss_coeff=cfg.balance_loss_coeff,  # 0 under --moe-router-load-balancing-type none
        moe_z_loss_coeff=cfg.moe_z_loss_coeff,
        moe_expert_capacity_factor=None,  # dropless
        moe_token_dispatcher_type="allgather",  # EP=1: gather SP shards, every rank computes all experts
        moe_grouped_gemm=resolve_backend(cfg.expert_backend) == "te_grouped",
        moe_router_dtype=cfg.moe_router_dtype,
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
        cuda_graph_scope=[],  # the whole layer; megatron's default spelling ("full") warns that it is deprecated
        grin_router_variant=cfg.router_variant,
        grin_router_jitter_eps=cfg.router_jitter_eps,
        grin_input_jitter_eps=cfg.input_jitter_eps,
        grin_router_backend=fusion_backend(cfg.moe_router_fusion),
        grin_permute_backend=fusion_backend(cfg.moe_permute_fusion),
        grin_expert_fusion=fusion_backend(cfg.moe_grouped_gemm),
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
                tconfig: Optional[GrinTransformerConfig] = None, mlp_spec: Optional[Any] = None,
                **config_overrides: Any) -> GrinGPTModel:
    """Build the GRIN model chunk for the current (virtual) pipeline stage; needs parallel_state set up.

    ``mlp_spec`` replaces the MoE layer of every block (``bench model``'s dense GPT with the same attention).
    """
    use_te = default_use_te() if use_te is None else use_te
    tconfig = tconfig or transformer_config(cfg, **config_overrides)
    block = grin_block_spec(tconfig, use_te=use_te, expert_backend=cfg.expert_backend, vp_stage=vp_stage)
    if mlp_spec is not None:
        block.layer_specs = [dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, mlp=mlp_spec))
                             for layer in block.layer_specs]
    return GrinGPTModel(
        config=tconfig,
        transformer_layer_spec=block,
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


def build_model_on_meta(cfg: GrinConfig, **kwargs: Any) -> GrinGPTModel:
    """Build the model with no storage (meta tensors): shapes, names and counts of any size, instantly.

    megatron allocates on ``torch.cuda.current_device()`` explicitly: compat points that at "meta" too.
    """
    with torch.device("meta"), compat.megatron_allocates_on_meta():
        return build_model(cfg, use_cpu_initialization=False, perform_initialization=False, **kwargs)
