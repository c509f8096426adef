"""Every flag of Megatron-LM 0.16's pretraining parser gets an answer from `pretrain`, as its data file says.

megatron_grin/training/megatron_lm_flags.json holds Megatron-LM's flags (read from its source at core_v0.16.1);
each is honoured by a declared setting, or answered in megatron_lm_answers.yaml (no-op or refused with a reason).
The example launch scripts of Megatron-LM (tests/training/megatron_lm_examples.json) dry-run or are refused at
once with the complete list of what to change.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from megatron_grin.config import ConfigError
from megatron_grin.training import flag_table
from megatron_grin.training.arguments import _declared_targets, build_parser, megatron_flags, parse, targets

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = ["--model-preset", "test", "--mock-data", "--train-iters", "10"]
FLAGS = megatron_flags()
HONOURED = frozenset(_declared_targets())


def test_the_table_is_megatron_lm_0_16s_parser():
    data = json.load(open(flag_table.FLAGS_FILE))
    assert data["tag"] == "core_v0.16.1" and len(data["flags"]) == 653 and len(data["extensions"]) == 18
    spellings = {f for e in data["flags"] for f in e["flags"]}
    assert len(spellings) == 682 and "--export-model-type" in {f for m in FLAGS for f in m.flags}
    for flag in ("--moe-grouped-gemm", "--moe-token-dispatcher-type", "--attention-backend", "--lr-warmup-fraction",
                 "--overlap-param-gather", "--override-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler",
                 "--exit-on-missing-checkpoint", "--ckpt-format", "--window-size"):
        assert flag in spellings, flag


def test_every_megatron_flag_is_answered_and_every_answer_is_for_a_real_flag():
    assert flag_table.unanswered(HONOURED) == []
    assert flag_table.stale_answers(HONOURED) == []
    known = set(targets())
    assert not [f for m in FLAGS for f in m.flags if f not in known]


def test_the_flags_real_moe_scripts_use_are_honoured():
    honoured = {f for m in FLAGS if m.answer is None or m.answer.passthrough for f in m.flags}
    for flag in ("--moe-grouped-gemm", "--moe-router-load-balancing-type", "--moe-permute-fusion",
                 "--moe-router-fusion", "--moe-router-dtype", "--attention-backend", "--use-flash-attn",
                 "--lr-warmup-fraction", "--train-samples", "--lr-decay-samples", "--lr-warmup-samples",
                 "--overlap-param-gather", "--overlap-grad-reduce", "--manual-gc", "--profile", "--profile-step-start",
                 "--use-pytorch-profiler", "--exit-on-missing-checkpoint", "--use-checkpoint-args", "--eod-mask-loss",
                 "--distributed-timeout-minutes", "--window-size", "--moe-ffn-hidden-size", "--padded-vocab-size",
                 "--group-query-attention", "--calculate-per-token-loss"):
        assert flag in honoured, flag


def _values(m) -> tuple:
    """(a value equal to megatron-grin's behaviour, a value that differs) as command-line tokens, or None."""
    a = m.answer
    if not m.takes_values():
        if m.kind == "store_true":
            return ([], None) if a.ours is True else (None, [])
        return ([], None) if a.ours is False else (None, [])
    ours = a.ours if not isinstance(a.ours, list) else (a.ours[0] if a.ours else None)
    same = [] if ours is None else [str(ours)]
    if m.choices:
        other = next((c for c in m.choices if str(c) != str(ours) and c not in a.same), None)
        return same or None, None if other is None else [str(other)]
    if m.type == "int":
        n = int(m.nargs) if str(m.nargs).isdigit() else 1
        return same or None, [str((ours or 0) + 3)] * n
    if m.type == "float":
        return same or None, [str((ours or 0.0) + 0.25)]
    return same or None, ["7"] if str(ours) != "7" else ["8"]


ANSWERED = [m for m in FLAGS if m.answer is not None and not m.answer.passthrough]


@pytest.mark.parametrize("m", ANSWERED, ids=[m.name for m in ANSWERED])
def test_dry_run_answers_each_flag_as_the_data_says(m):
    same, other = _values(m)
    if same is not None:
        parsed = parse([*BASE, m.name, *same])  # megatron-grin's behaviour already equals it: a logged no-op
        assert any(n.startswith(m.name) and "no-op" in n for n in parsed.notes), parsed.notes
    if other is not None:
        if m.answer.any_note is not None or any(str(s) == " ".join(other) for s in m.answer.same):
            parsed = parse([*BASE, m.name, *other])
            assert any(n.startswith(m.name) for n in parsed.notes)
        else:
            with pytest.raises(ConfigError) as info:
                parse([*BASE, m.name, *other])
            hits = [p for p in info.value.problems if p.startswith(m.name)]
            assert hits and m.answer.reason and m.answer.reason in hits[0], info.value.problems  # with its reason


PASSED = [m for m in FLAGS if m.answer is not None and m.answer.passthrough]


@pytest.mark.parametrize("m", PASSED, ids=[m.name for m in PASSED])
def test_passthrough_flags_reach_megatron_cores_config(m):
    value = [] if not m.takes_values() else [str(m.choices[-1])]
    parsed = parse([*BASE, m.name, *value])
    assert m.answer.passthrough in parsed.cfg.extra


HONOURED_FLAGS = [m for m in FLAGS if m.answer is None]
SAMPLES = {"--window-size": "2046,0", "--data-path": "0.5 a 0.5 b", "--split": "90,5,5", "--tokenizer-model": "byte",
           "--tokenizer-type": "byte", "--num-virtual-stages-per-pipeline-rank": "2", "--eval-interval": "5"}


def _sample(m) -> list[str]:
    """Megatron-LM's default when it has one, else a value of the declared setting's type."""
    if not m.takes_values():
        return []
    if m.name in SAMPLES:
        return SAMPLES[m.name].split()
    if m.default not in (None, [], ""):
        return [str(v) for v in (m.default if isinstance(m.default, list) else [m.default])]
    s = targets()[m.name].setting
    return [str(s.choices[0])] if s.choices else ["4" if s.type is int else "0.5" if s.type is float else "x"]


@pytest.mark.parametrize("m", HONOURED_FLAGS, ids=[m.name for m in HONOURED_FLAGS])
def test_honoured_flags_parse(m):
    """Each honoured flag takes a value of its type; it may be refused for GRIN (EP 2), never as unknown."""
    try:
        parse([*BASE, m.name, *_sample(m)], world_size=8, check=False)
    except ConfigError as err:
        assert not any("unknown flag" in p or "expected" in p for p in err.problems), err.problems


def test_suggestions_only_between_related_flags():
    def first(*argv):
        with pytest.raises(ConfigError) as info:
            parse([*BASE, *argv])
        return info.value.problems[0]

    assert "did you mean --overlap-param-gather?" in first("--overlap-param-gathr")
    assert "did you mean --lr-warmup-iters?" in first("--lr-warmup-iter", "5")
    assert "override" not in first("--overlap-params-gathering")
    assert "did you mean" not in first("--frobnicate")
    assert "--tensor-model-parallel-size" in first("--tp", "2")


def test_help_lists_every_flag_grouped_as_megatron_lm_with_defaults():
    text = build_parser().format_help()
    for m in FLAGS:
        assert m.name in text, m.name
    for title in ("transformer configuration:", "learning rate and weight decay:", "checkpointing:", "logging:",
                  "data and dataloader:", "GRIN:"):
        assert title in text
    assert "--lr LR" in text and "(default: 0.0001)" in text
    result = subprocess.run([sys.executable, "-m", "megatron_grin", "pretrain", "--help"], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0 and "--moe-token-dispatcher-type" in result.stdout


# --- Megatron-LM's example launch scripts ---------------------------------------------------------------------
EXAMPLES = json.load(open(os.path.join(os.path.dirname(__file__), "megatron_lm_examples.json")))["scripts"]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """A preprocessed corpus, a Hugging Face tokenizer directory and a checkpoint directory for the placeholders."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from megatron_grin.training.preprocess import preprocess

    root = tmp_path_factory.mktemp("scripts")
    vocab = {"[UNK]": 0, "<eos>": 1, "<pad>": 2, "hello": 3, "world": 4}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="<eos>",
                            pad_token="<pad>").save_pretrained(str(root / "tok"))
    (root / "in.jsonl").write_text("".join(json.dumps({"text": "hello world " * 50}) + "\n" for _ in range(100)))
    preprocess([str(root / "in.jsonl")], str(root / "corpus_text_document"), str(root / "tok"))
    return {"${TOKENIZER_MODEL}": str(root / "tok"), "$DATA_PATH": str(root / "corpus_text_document"),
            "${CHECKPOINT_PATH}": str(root / "ckpt"), "$CHECKPOINT_PATH": str(root / "ckpt"),
            '${WANDB_PROJECT:-"Mixtral"}': "Mixtral", '${WANDB_NAME:-"Mixtral_8x7B"}': "Mixtral_8x7B",
            "$VOCAB_FILE": str(root / "vocab.json"), "$MERGE_FILE": str(root / "merges.txt"),
            "$TENSORBOARD_LOGS_PATH": str(root / "tb")}


def script(name: str, fixtures: dict) -> list[str]:
    out = []
    for token in EXAMPLES[name]["tokens"]:
        for key, value in fixtures.items():
            token = token.replace(key, value)
        out.append(token)
    return out


def refusals(argv, world_size) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(argv, world_size=world_size)
    return info.value.problems


def test_mixtral_script_is_refused_at_once_with_what_to_change(fixtures):
    found = refusals(script("train_mixtral_8x7b_distributed", fixtures), 8)
    starts = sorted(p.split(":")[0].split(" ")[0] for p in found)
    assert starts == ["--disable-bias-linear", "--expert-model-parallel-size", "--moe-router-load-balancing-type",
                      "--normalization", "--tokenizer-type"], found


def test_mixtral_script_with_those_changes_dry_runs(fixtures):
    argv = script("train_mixtral_8x7b_distributed", fixtures)
    for flag, n in (("--disable-bias-linear", 0), ("--normalization", 1), ("--expert-model-parallel-size", 1)):
        i = argv.index(flag)
        del argv[i:i + 1 + n]
    argv[argv.index("--tokenizer-type") + 1] = "HuggingFaceTokenizer"
    argv[argv.index("--moe-router-load-balancing-type") + 1] = "global_aux_loss"
    parsed = parse(argv, world_size=8)
    cfg, t = parsed.cfg, parsed.tcfg
    assert (cfg.num_experts, cfg.ffn_hidden_size, cfg.num_query_groups, cfg.rotary_base) == (8, 14336, 8, 1e6)
    assert (cfg.pipeline_model_parallel_size, t.data_parallel_size, t.num_microbatches) == (4, 2, 128)
    assert not cfg.seq_parallel and any("disabling sequence parallelism" in n for n in parsed.notes)
    assert t.overlap_param_gather and t.lr_decay_steps == 320000 * 256


def test_mixtral_script_with_a_grin_config_dry_runs(fixtures):
    """The training half of the script on the GRIN architecture (--config grin-16x3.8b)."""
    argv = script("train_mixtral_8x7b_distributed", fixtures)
    keep = argv[argv.index("--tokenizer-type"):]
    keep[keep.index("Llama2Tokenizer")] = "HuggingFaceTokenizer"
    i = keep.index("--expert-model-parallel-size")
    del keep[i:i + 2]
    parsed = parse(["--config", "grin-16x3.8b", *keep], world_size=8)
    assert parsed.cfg.num_experts == 16 and parsed.cfg.sliding_window == 2047


def test_gpt3_dense_script_is_refused_with_the_complete_list(fixtures):
    t0 = time.time()
    found = refusals(script("train_gpt3_175b_distributed", fixtures), 128)
    assert time.time() - t0 < 2.0
    text = "\n".join(found)
    for item in ("dense model", "--fp16", "--rampup-batch-size", "--vocab-file", "--merge-file", "--swiglu is missing",
                 "--position-embedding-type is missing", "--untie-embeddings-and-output-weights is missing"):
        assert item in text, item
    assert "unknown flag" not in text


def test_llama3_fp8_script_is_answered_without_unknown_flags(fixtures):
    argv = [t.replace("$", "") for t in script("train_llama3_8b_h100_fp8", fixtures)]
    found = refusals(argv, 8)
    text = "\n".join(found)
    assert "unknown flag" not in text and "--fp8-format hybrid" in text and "dense model" in text
