"""Megatron-LM integration: its args map onto the same GrinConfig our own trainer uses."""

import argparse

import pytest

from megatron_grin.config import ConfigError, preset
from megatron_grin.megatron_lm import add_grin_args, grin_config_from_megatron_args


def _megatron_lm_args(**overrides):
    g = preset("grin-16x3.8b")
    parser = add_grin_args(argparse.ArgumentParser())
    args = parser.parse_args(["--grin-sliding-window", "2047"])
    base = dict(num_layers=g.num_layers, hidden_size=g.hidden_size, ffn_hidden_size=g.ffn_hidden_size,
                moe_ffn_hidden_size=None, num_attention_heads=32, num_query_groups=8, kv_channels=None,
                padded_vocab_size=32064, max_position_embeddings=4096, rotary_base=10000, norm_epsilon=1e-5,
                init_method_std=0.02, num_experts=16, moe_router_topk=2, moe_input_jitter_eps=0.01,
                moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None, tensor_model_parallel_size=1,
                pipeline_model_parallel_size=4, virtual_pipeline_model_parallel_size=None,
                expert_tensor_parallel_size=None, expert_model_parallel_size=1, context_parallel_size=1,
                sequence_parallel=False, bf16=True, recompute_granularity="full", recompute_method="uniform",
                recompute_num_layers=1)
    base.update(overrides)
    for k, v in base.items():
        setattr(args, k, v)
    return args


def test_grin_args_map_to_the_released_architecture():
    cfg = grin_config_from_megatron_args(_megatron_lm_args())
    g = preset("grin-16x3.8b")
    for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                  "num_experts", "moe_router_topk", "sliding_window", "rotary_base", "router_jitter_eps",
                  "input_jitter_eps"):
        assert getattr(cfg, field) == getattr(g, field), field
    assert cfg.padded_vocab_size == 32064  # Megatron-LM already padded it


def test_megatron_lm_args_are_validated():
    with pytest.raises(ConfigError, match="--expert-model-parallel-size"):
        grin_config_from_megatron_args(_megatron_lm_args(expert_model_parallel_size=8))
