"""Use megatron-grin from an upstream Megatron-LM checkout (its ``pretrain_gpt.py`` training loop).

Megatron-LM builds models through ``model_provider(gpt_builder)`` and parses flags with an optional
``extra_args_provider``. This module supplies both: GRIN flags on top of Megatron-LM's, and a builder
that turns Megatron-LM's ``args`` into a :class:`GrinConfig` and builds the same model megatron-grin's
own trainer builds. See ``patches/pretrain_grin.py`` for the drop-in entry point.
"""

from __future__ import annotations

import argparse
from typing import Any

from megatron_grin.config import GrinConfig
from megatron_grin.model.build import build_model

_GRIN_ARG_DEFAULTS = {"grin_router": "sparsemixer_v2", "grin_jitter_eps": 0.01, "grin_expert_backend": "auto"}


def add_grin_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM ``extra_args_provider``: the GRIN-specific flags."""
    group = parser.add_argument_group("grin", "GRIN / SparseMixer-v2 routing")
    group.add_argument("--grin-router", choices=["sparsemixer_v2", "sparsemixer_v2_star"],
                       default=_GRIN_ARG_DEFAULTS["grin_router"], help="SparseMixer estimator (v2 = GRIN).")
    group.add_argument("--grin-jitter-eps", type=float, default=_GRIN_ARG_DEFAULTS["grin_jitter_eps"],
                       help="relative mask threshold epsilon (HF router_jitter_noise)")
    group.add_argument("--grin-expert-backend", default=_GRIN_ARG_DEFAULTS["grin_expert_backend"],
                       help="auto | sequential | grouped_mm | te_grouped")
    group.add_argument("--grin-sliding-window", type=int, default=None,
                       help="attention window in keys incl. the query (HF sliding_window; GRIN: 2047)")
    return parser


def _arg(args: Any, name: str, default: Any = None) -> Any:
    value = getattr(args, name, None)
    return default if value is None else value


def grin_config_from_megatron_args(args: Any) -> GrinConfig:
    """Translate Megatron-LM's parsed ``args`` into a GrinConfig (validated)."""
    recompute = _arg(args, "recompute_granularity")
    cfg = GrinConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        ffn_hidden_size=_arg(args, "moe_ffn_hidden_size", _arg(args, "ffn_hidden_size")),
        num_attention_heads=args.num_attention_heads,
        num_query_groups=_arg(args, "num_query_groups", args.num_attention_heads),
        kv_channels=_arg(args, "kv_channels"),
        vocab_size=_arg(args, "padded_vocab_size", _arg(args, "vocab_size")), make_vocab_size_divisible_by=1,
        max_position_embeddings=args.max_position_embeddings, rotary_base=float(_arg(args, "rotary_base", 10000)),
        sliding_window=_arg(args, "grin_sliding_window"), layernorm_epsilon=_arg(args, "norm_epsilon", 1e-5),
        init_method_std=_arg(args, "init_method_std", 0.02), num_experts=args.num_experts,
        moe_router_topk=_arg(args, "moe_router_topk", 2),
        router_variant=_arg(args, "grin_router", _GRIN_ARG_DEFAULTS["grin_router"]),
        router_jitter_eps=_arg(args, "grin_jitter_eps", _GRIN_ARG_DEFAULTS["grin_jitter_eps"]),
        input_jitter_eps=_arg(args, "moe_input_jitter_eps", 0.0),
        moe_aux_loss_coeff=float(_arg(args, "moe_aux_loss_coeff", 0.0)),
        moe_z_loss_coeff=_arg(args, "moe_z_loss_coeff"),
        expert_backend=_arg(args, "grin_expert_backend", _GRIN_ARG_DEFAULTS["grin_expert_backend"]),
        tensor_model_parallel_size=_arg(args, "tensor_model_parallel_size", 1),
        pipeline_model_parallel_size=_arg(args, "pipeline_model_parallel_size", 1),
        virtual_pipeline_model_parallel_size=_arg(args, "virtual_pipeline_model_parallel_size"),
        expert_tensor_parallel_size=_arg(args, "expert_tensor_parallel_size"),
        expert_model_parallel_size=_arg(args, "expert_model_parallel_size", 1),
        context_parallel_size=_arg(args, "context_parallel_size", 1),
        sequence_parallel=_arg(args, "sequence_parallel"),
        bf16=bool(_arg(args, "bf16", False)),
        recompute_granularity=recompute, recompute_method=_arg(args, "recompute_method"),
        recompute_num_layers=_arg(args, "recompute_num_layers"),
    )
    return cfg.validate()


def grin_gpt_builder(args: Any, pre_process: bool, post_process: bool, vp_stage=None, config=None,
                     pg_collection=None):
    """Drop-in for Megatron-LM's ``gpt_builder``: builds the GRIN model for this (virtual) stage.

    Megatron-LM's own TransformerConfig (``config``) is not used for the architecture: GRIN's is derived
    from ``args`` so that both trainers build the identical model.
    """

    return build_model(grin_config_from_megatron_args(args), pre_process=pre_process, post_process=post_process,
                       vp_stage=vp_stage)
