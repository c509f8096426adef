"""The Megatron-LM patch path: Megatron-LM's parsed args become the GrinConfig `megatron-grin pretrain` builds.

``args`` are built as Megatron-LM 0.16's parser builds them: every dest at its parser default (from the flag
table read out of Megatron-LM's source), the given flags converted with their Megatron-LM types, and the
validate_args steps the builder relies on (moe_ffn_hidden_size, sequence parallel at TP 1, vocabulary padding,
single-element lists). The flags under test are the ones documented at the top of patches/pretrain_grin.py.
"""

import argparse
import os
import re
import shlex

import pytest

from megatron_grin.config import ConfigError, preset
from megatron_grin.megatron_lm import grin_config_from_megatron_args, grin_extra_args
from megatron_grin.training.arguments import megatron_flags, parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 32064  # the GRIN tokenizer's vocabulary


def documented_flags() -> list[str]:
    """The model flags in the header comment of patches/pretrain_grin.py."""
    text = open(os.path.join(ROOT, "patches", "pretrain_grin.py"), encoding="utf-8").read()
    lines = [ln[1:].strip().rstrip("\\").strip() for ln in text.splitlines() if ln.startswith("#")]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("torchrun"))
    body = " ".join(lines[start:start + 12]).split("(with --tensor")[0]
    tokens = shlex.split(body)
    tokens = tokens[tokens.index("--num-layers"):]
    i = tokens.index("--tokenizer-type")
    return tokens[:i] + tokens[i + 4:]  # the tokenizer is Megatron-LM's business here, not the model's


def megatron_args(tokens: list[str], tp: int = 1) -> argparse.Namespace:
    by_flag = {f: m for m in megatron_flags() for f in m.flags}
    ns = argparse.Namespace(**{m.dest: m.default for m in megatron_flags()})
    grin, rest = grin_extra_args(argparse.ArgumentParser()).parse_known_args(tokens)
    vars(ns).update(vars(grin))
    i = 0
    while i < len(rest):
        m = by_flag[rest[i]]
        values = []
        i += 1
        while i < len(rest) and not rest[i].startswith("--"):
            values.append(rest[i])
            i += 1
        value = m.convert(values)
        if m.name == "--window-size":
            value = tuple(int(v) for v in value.strip("()").split(","))
        setattr(ns, m.dest, value)
    # validate_args (arguments.py): the steps the builder reads the results of
    ns.tensor_model_parallel_size = tp
    if ns.moe_ffn_hidden_size is None:
        ns.moe_ffn_hidden_size = ns.ffn_hidden_size
    if tp == 1:
        ns.sequence_parallel = False
    for dest in ("moe_router_load_balancing_type", "moe_aux_loss_coeff"):
        value = getattr(ns, dest)
        if isinstance(value, list) and len(value) == 1:
            setattr(ns, dest, value[0])
    multiple = ns.make_vocab_size_divisible_by * tp  # _vocab_size_with_padding (training/tokenizer/tokenizer.py)
    ns.padded_vocab_size = -(-VOCAB // multiple) * multiple
    ns.vocab_size = VOCAB
    ns.virtual_pipeline_model_parallel_size = None
    return ns


def test_the_documented_flags_build_exactly_grin():
    cfg = grin_config_from_megatron_args(megatron_args(documented_flags()))
    grin = preset("grin-16x3.8b", bf16=True, padded_vocab=32128, tokenizer=None, moe_grouped_gemm=False,
                  moe_permute_fusion=False, moe_router_fusion=False)
    assert cfg == grin


def test_the_patch_path_and_pretrain_build_the_same_model():
    """Same flags, two parsers (Megatron-LM's args / pretrain's scanner), one set of declarations."""
    flags = documented_flags()
    patch = grin_config_from_megatron_args(megatron_args(flags))
    ours = parse([*flags, "--vocab-size", str(VOCAB), "--mock-data", "--train-iters", "1"]).cfg
    assert patch.replace(tokenizer=None, padded_vocab=None, moe_grouped_gemm=None, moe_permute_fusion=None,
                         moe_router_fusion=None) == ours.replace(tokenizer=None)


def test_megatron_lm_semantics_are_kept():
    flags = documented_flags()
    without_gqa = [f for f in flags if f != "--group-query-attention"]
    assert grin_config_from_megatron_args(megatron_args(without_gqa)).num_query_groups == 32  # MHA, as Megatron-LM
    eps = grin_config_from_megatron_args(megatron_args([*flags, "--norm-epsilon", "1e-6"]))
    assert eps.layernorm_epsilon == 1e-6  # --norm-epsilon stores to args.layernorm_epsilon
    tp2 = grin_config_from_megatron_args(megatron_args([*flags, "--sequence-parallel"], tp=2))
    assert tp2.padded_vocab_size == 32256 and tp2.seq_parallel  # Megatron-LM's padding, kept in the checkpoint
    no_jitter = [f for f in flags]
    i = no_jitter.index("--moe-input-jitter-eps")
    del no_jitter[i:i + 2]
    assert grin_config_from_megatron_args(megatron_args(no_jitter)).input_jitter_eps == 0.0  # as pretrain's


@pytest.mark.parametrize("extra, reason", [
    (["--normalization", "RMSNorm"], "GRIN uses LayerNorm"),
    (["--disable-bias-linear"], "q/k/v/o projections and output layer carry biases"),
    (["--fp16"], "fp16 with loss scaling is not supported"),
    (["--expert-model-parallel-size", "8"], "--expert-model-parallel-size 8: must be 1"),
    (["--mtp-num-layers", "1"], "multi-token prediction"),
    (["--qk-layernorm"], "GRIN's architecture"),
    (["--moe-router-score-function", "sigmoid"], "SparseMixer-v2"),
    (["--moe-aux-loss-coeff", "0.01", "--moe-router-load-balancing-type", "aux_loss"], "global_aux_loss"),
])
def test_contradicting_megatron_lm_flags_are_refused(extra, reason):
    with pytest.raises(ConfigError) as info:
        grin_config_from_megatron_args(megatron_args([*documented_flags(), *extra]))
    assert any(reason in p for p in info.value.problems), info.value.problems


def test_grin_properties_must_be_stated():
    flags = [f for f in documented_flags() if f not in ("--swiglu", "--untie-embeddings-and-output-weights")]
    with pytest.raises(ConfigError) as info:
        grin_config_from_megatron_args(megatron_args(flags))
    text = "\n".join(info.value.problems)
    assert "pass --swiglu" in text and "pass --untie-embeddings-and-output-weights" in text


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as info:
        grin_config_from_megatron_args(megatron_args([*documented_flags(), "--fp16", "--normalization", "RMSNorm",
                                                      "--expert-model-parallel-size", "2"]))
    assert len(info.value.problems) == 3


def test_the_header_names_every_flag_the_table_documents():
    readme = open(os.path.join(ROOT, "patches", "README.md"), encoding="utf-8").read()
    for flag in set(re.findall(r"--[a-z0-9-]+", " ".join(documented_flags()))) - {"--bf16"}:
        base = flag if flag.startswith("--grin") else flag
        assert base in readme or flag in ("--num-layers", "--hidden-size", "--num-attention-heads",
                                          "--max-position-embeddings", "--num-experts", "--moe-router-topk",
                                          "--rotary-base", "--normalization", "--norm-epsilon"), flag
