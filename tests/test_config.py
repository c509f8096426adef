"""Bad configurations fail fast, before any process group, with a message naming the setting."""

import pytest

from megatron_grin.config import ConfigError, GrinConfig, preset

BAD = [
    (dict(moe_router_topk=5, num_experts=4), "--moe-router-topk"),
    (dict(moe_router_topk=0), "--moe-router-topk"),
    (dict(num_experts=0), "--num-experts"),
    (dict(num_attention_heads=8, num_query_groups=3), "--num-query-groups"),
    (dict(tensor_model_parallel_size=8), "--num-attention-heads"),  # 4 heads over TP 8
    (dict(num_query_groups=1, tensor_model_parallel_size=2), "--num-query-groups"),
    (dict(ffn_hidden_size=95, tensor_model_parallel_size=2), "--moe-ffn-hidden-size"),
    (dict(tensor_model_parallel_size=2, expert_tensor_parallel_size=1), "--expert-tensor-parallel-size"),
    (dict(expert_model_parallel_size=2), "--expert-model-parallel-size"),
    (dict(input_jitter_eps=-0.01), "--moe-input-jitter-eps"),
    (dict(router_jitter_eps=-1.0), "--grin-jitter-eps"),
    (dict(moe_aux_loss_coeff=-1e-3), "--moe-aux-loss-coeff"),
    (dict(router_variant="topk"), "--grin-router"),
    (dict(expert_backend="megablocks"), "--grin-expert-backend"),
    (dict(pipeline_model_parallel_size=3), "--pipeline-model-parallel-size"),
    (dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=4), "virtual"),
    (dict(tensor_model_parallel_size=2, sequence_parallel=False), "--sequence-parallel"),
    (dict(hidden_size=50), "--hidden-size"),
    (dict(context_parallel_size=2), "--context-parallel-size"),
    (dict(recompute_granularity="full"), "--recompute-method"),
    (dict(sliding_window=0), "--window-size"),
    (dict(rotary_base=0.0), "--rotary-base"),
    (dict(make_vocab_size_divisible_by=0), "--make-vocab-size-divisible-by"),
    (dict(kv_channels=0), "--kv-channels"),
    (dict(hidden_dropout=1.0), "--hidden-dropout"),
    (dict(padded_vocab=100), "--padded-vocab-size"),
    (dict(moe_aux_loss_coeff=0.01, moe_router_load_balancing_type="aux_loss"), "global_aux_loss"),
]


@pytest.mark.parametrize("overrides,flag", BAD, ids=[b[1] + f"-{i}" for i, b in enumerate(BAD)])
def test_bad_config_names_the_flag(overrides, flag):
    with pytest.raises(ConfigError, match=flag):
        preset("test", **overrides).validate()


def test_world_size_must_divide():
    with pytest.raises(ConfigError, match="world size"):
        preset("test", tensor_model_parallel_size=2).validate(world_size=3)


def test_good_layouts_validate():
    preset("grin-16x3.8b", tensor_model_parallel_size=8, pipeline_model_parallel_size=4,
           virtual_pipeline_model_parallel_size=2).validate(world_size=512)
    assert preset("test", tensor_model_parallel_size=2).seq_parallel
    assert not preset("test", sequence_parallel=True).seq_parallel  # dropped at TP 1, as Megatron-LM


@pytest.mark.parametrize("tp, rows", [(1, 32128), (2, 32256), (4, 32256), (8, 32768)])
def test_vocab_padding_is_megatron_lms(tp, rows):
    """Megatron-LM 0.16 training/tokenizer/tokenizer.py _vocab_size_with_padding for vocab 32064, divisor 128."""
    assert GrinConfig(tensor_model_parallel_size=tp).padded_vocab_size == rows
    assert GrinConfig(tensor_model_parallel_size=tp, padded_vocab=32768).padded_vocab_size == 32768


def test_every_problem_is_listed():
    problems = preset("test", moe_router_topk=9, expert_model_parallel_size=2, num_query_groups=3).problems()
    assert len(problems) == 3
    with pytest.raises(ConfigError) as info:
        preset("test", moe_router_topk=9, expert_model_parallel_size=2).validate()
    assert len(info.value.problems) == 2


def test_each_setting_is_declared_once_with_flag_help_and_group():
    from megatron_grin.settings import declared

    flags = [f for _, s in declared(GrinConfig) for f in s.option_strings()]
    assert len(flags) == len(set(flags))
    for name, s in declared(GrinConfig):
        assert s.flag.startswith("--") and s.help and s.group, name


def test_validation_needs_no_megatron():
    """Config checks run before megatron (and its process groups) are imported."""
    import subprocess
    import sys

    code = ("import sys; from megatron_grin.config import preset, ConfigError\n"
            "try: preset('test', moe_router_topk=9).validate()\n"
            "except ConfigError: pass\n"
            "assert 'megatron.core' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
