"""`megatron-grin pretrain` flags: YAML/flag precedence, the documented surface, and early, clear errors.

Every error case here also asserts that no process group exists afterwards: validation must finish
before any rank starts.
"""

import argparse
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from megatron_grin.config import ConfigError, GrinConfig, preset
from megatron_grin.training.arguments import build_parser, known_flags, parse_args, world_size_from_env
from megatron_grin.training.trainer import dist_env, first_slurm_host

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MOCK = ["--mock-data", "--train-iters", "10"]


def parse(*argv, world_size=1):
    return parse_args(list(argv), world_size=world_size)


def expect_error(match: str, *argv, world_size=1) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        parse(*argv, world_size=world_size)
    assert not torch.distributed.is_initialized(), "validation must not start process groups"
    return str(info.value)


def write_yaml(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


# --- precedence -----------------------------------------------------------------------------------------
def test_preset_then_yaml_then_flags(tmp_path):
    cfg_file = write_yaml(tmp_path, "model_preset: tiny\nhidden-size: 256\nnum_experts: 4\nlr: 0.002\n"
                                    "micro_batch_size: 2\nbf16: true\ndata_path: null\nmock_data: true\n")
    cfg, tcfg = parse("--config", cfg_file, "--num-experts", "6", "--train-iters", "3", "--no-bf16")
    tiny = preset("tiny")
    assert cfg.hidden_size == 256  # YAML over preset
    assert cfg.num_experts == 6  # flag over YAML
    assert cfg.num_layers == tiny.num_layers and cfg.ffn_hidden_size == tiny.ffn_hidden_size  # preset kept
    assert cfg.bf16 is False  # --no-bf16 over `bf16: true`
    assert tcfg.lr == 0.002 and tcfg.micro_batch_size == 2 and tcfg.train_iters == 3
    assert cfg.vocab_size == 259  # byte tokenizer's, since --vocab-size was not given


def test_without_preset_the_grin_architecture_is_the_default():
    cfg, tcfg = parse("--mock-data", "--train-iters", "1", "--vocab-size", "32064")
    grin = GrinConfig()
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_experts, cfg.vocab_size) == \
        (grin.num_layers, grin.hidden_size, grin.num_experts, 32064)
    assert tcfg.seq_length == grin.max_position_embeddings


def test_yaml_lists_and_virtual_pipeline(tmp_path):
    cfg_file = write_yaml(tmp_path, "model_preset: test\nnum_layers: 8\npipeline_model_parallel_size: 2\n"
                                    "num_layers_per_virtual_pipeline_stage: 2\nglobal_batch_size: 4\n")
    cfg, tcfg = parse("--config", cfg_file, *MOCK, world_size=4)
    assert cfg.virtual_pipeline_model_parallel_size == 2  # 8 layers / (PP 2 x 2 per virtual stage)
    assert tcfg.data_parallel_size == 2 and tcfg.num_microbatches == 2


def test_the_repository_configs_parse(tmp_path):
    """The local job's config and the cluster recipe (model + recipe + preset trainer keys)."""
    import yaml

    cfg, tcfg = parse("--config", os.path.join(ROOT, "configs", "local.yaml"), "--mock-data")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_experts, tcfg.seq_length) == (4, 128, 8, 256)
    merged = {}
    for name in ("grin-16x3.8b.yaml", "pretrain-grin.yaml"):
        path = os.path.join(ROOT, "configs", name)
        if not os.path.exists(path):
            pytest.skip(f"{name} not in this checkout")
        merged.update(yaml.safe_load(open(path)))
    cluster = os.path.join(ROOT, "configs", "cluster", "h100x64.yaml")
    if os.path.exists(cluster):
        merged.update(yaml.safe_load(open(cluster))["trainer"])
    cfg_file = write_yaml(tmp_path, yaml.safe_dump(merged))
    cfg, tcfg = parse("--config", cfg_file, "--mock-data", world_size=64)
    assert cfg.num_layers == 32 and tcfg.global_batch_size == 2048


# --- the documented surface -------------------------------------------------------------------------------
def documented_flags() -> set:
    text = open(os.path.join(ROOT, "docs", "training.md"), encoding="utf-8").read()
    rows = [line for line in text.splitlines() if line.startswith("| `--")]
    return {flag for row in rows for flag in re.findall(r"`(--[a-z0-9-]+)`", row.split(" | ")[0])}


def test_every_flag_is_documented_and_every_documented_flag_exists():
    parser_flags = set(known_flags(build_parser())) - {"--help"}
    documented = documented_flags()
    assert parser_flags - documented == set(), "flags missing from docs/training.md"
    assert documented - parser_flags == set(), "docs/training.md lists flags the parser does not know"


REQUIRED = """--tensor-model-parallel-size --pipeline-model-parallel-size --num-layers-per-virtual-pipeline-stage
--sequence-parallel --num-layers --hidden-size --ffn-hidden-size --num-attention-heads --num-query-groups
--group-query-attention --seq-length --max-position-embeddings --vocab-size --make-vocab-size-divisible-by
--num-experts --moe-router-topk --moe-aux-loss-coeff --moe-z-loss-coeff --moe-input-jitter-eps
--micro-batch-size --global-batch-size --lr --min-lr --lr-decay-style --lr-warmup-iters --lr-decay-iters
--weight-decay --adam-beta1 --adam-beta2 --adam-eps --clip-grad --train-iters --save --load --save-interval
--data-path --split --mock-data --tokenizer-type --tokenizer-model --tokenizer --bf16 --recompute-granularity
--recompute-method --recompute-num-layers --use-distributed-optimizer --wandb-project --wandb-exp-name
--wandb-save-dir --tensorboard-dir --log-interval --eval-interval --eval-iters --exit-duration-in-mins
--exit-signal-handler --seed --init-method-std --grin-router --grin-jitter-eps --grin-expert-backend
--model-preset --config""".split()


def test_the_required_megatron_flags_exist():
    assert set(REQUIRED) - set(known_flags(build_parser())) == set()


# One value per documented flag that takes one; each line must parse (check=False skips file checks).
SAMPLES = {
    "--model-preset": "tiny", "--grin-router": "sparsemixer_v2_star", "--grin-expert-backend": "sequential",
    "--lr-decay-style": "cosine", "--recompute-granularity": "full", "--recompute-method": "block",
    "--transformer-impl": "local", "--normalization": "LayerNorm", "--position-embedding-type": "rope",
    "--sliding-window": "none", "--split": "90,10,0", "--tokenizer": "byte", "--tokenizer-type": "byte",
    "--data-path": "0.5 a 0.5 b", "--eval-interval": "none", "--attention-backend": "flash",
}


@pytest.mark.parametrize("flag", sorted(documented_flags() - {"--config"}))
def test_every_documented_flag_parses(flag):
    parser = build_parser()
    action = next(a for a in parser._actions if flag in a.option_strings)
    if action.nargs == 0:
        argv = [flag]
    elif flag in SAMPLES:
        argv = [flag, *SAMPLES[flag].split()]
    else:
        argv = [flag, "0.5" if action.type is float else ("2" if action.type is int else "x")]
    value = getattr(parser.parse_args(argv), action.dest)
    if isinstance(action, argparse.BooleanOptionalAction) and flag.startswith("--no-"):
        assert value is False
    elif action.nargs == 0:
        assert value is True
    elif argv[1] != "none":
        assert value is not None and value != action.default


# --- errors before process groups ---------------------------------------------------------------------------
def test_unknown_flag_names_the_nearest():
    message = expect_error("unrecognized argument --lr-warmup-iter; did you mean --lr-warmup-iters", *MOCK,
                           "--lr-warmup-iter", "5")
    assert "--lr-warmup-iter" in message


def test_unknown_yaml_key_names_the_nearest(tmp_path):
    cfg_file = write_yaml(tmp_path, "num_expert: 4\n")
    expect_error(r"unknown key 'num_expert'; did you mean 'num_experts' \(--num-experts\)", "--config", cfg_file,
                 *MOCK)


def test_yaml_type_errors_name_the_key(tmp_path):
    expect_error("bf16 must be true or false", "--config", write_yaml(tmp_path, "bf16: 3\n"), *MOCK)
    expect_error("invalid int value", "--config", write_yaml(tmp_path, "num_layers: four\n"), *MOCK)


def test_global_batch_must_divide_by_micro_times_dp():
    message = expect_error(r"--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2",
                           "--model-preset", "test", *MOCK, "--micro-batch-size", "2", "--global-batch-size", "6",
                           world_size=2)
    assert "= 4" in message


def test_world_size_must_fit_the_layout():
    expect_error("world size 3 is not divisible by TP x PP = 2", "--model-preset", "test", *MOCK,
                 "--tensor-model-parallel-size", "2", world_size=3)


def test_interleaved_schedule_needs_a_multiple_of_pp_microbatches():
    expect_error("multiple of --pipeline-model-parallel-size 2", "--model-preset", "test", *MOCK,
                 "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
                 "--global-batch-size", "3", world_size=2)


def test_train_iters_is_required():
    expect_error("--train-iters is required", "--model-preset", "test", "--mock-data")


def test_data_path_or_mock_data_is_required():
    expect_error("--data-path PREFIX .* or --mock-data", "--model-preset", "test", "--train-iters", "1")


def test_missing_idx_is_reported(tmp_path):
    prefix = str(tmp_path / "corpus")
    open(prefix + ".bin", "wb").close()
    expect_error(r"corpus.idx does not exist", "--model-preset", "test", "--train-iters", "1",
                 "--data-path", prefix)


def test_corrupt_idx_is_reported(tmp_path):
    from megatron_grin.training.preprocess import preprocess

    src = tmp_path / "a.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"document number {i} " * 20}) for i in range(8)) + "\n")
    prefix = str(tmp_path / "corpus")
    preprocess([str(src)], prefix, "byte")
    parse("--model-preset", "test", "--train-iters", "1", "--data-path", prefix)  # intact: accepted
    with open(prefix + ".idx", "r+b") as f:
        f.truncate(os.path.getsize(prefix + ".idx") - 5)
    expect_error("truncated or corrupt", "--model-preset", "test", "--train-iters", "1", "--data-path", prefix)


def test_vocab_smaller_than_the_tokenizer_is_refused():
    expect_error("--vocab-size 100 is smaller than the tokenizer's 259", "--model-preset", "test", *MOCK,
                 "--vocab-size", "100")


def test_architecture_flags_are_checked():
    parse("--model-preset", "test", *MOCK, "--swiglu", "--normalization", "LayerNorm")
    expect_error("--normalization RMSNorm: GRIN uses LayerNorm", "--model-preset", "test", *MOCK,
                 "--normalization", "RMSNorm")


def fake_checkpoint(root, cfg: GrinConfig, iteration: int = 10) -> str:
    """What the trainer commits: iter dir with megatron's metadata files and grin_config.json, + tracker."""
    from dataclasses import asdict

    path = os.path.join(root, f"iter_{iteration:07d}")
    os.makedirs(path)
    for name in ("metadata.json", ".metadata"):
        open(os.path.join(path, name), "w").close()
    with open(os.path.join(path, "grin_config.json"), "w") as f:
        json.dump(asdict(cfg), f)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(f"{iteration}\n")
    return path


def test_checkpoint_of_another_model_is_refused_before_init(tmp_path):
    saved = preset("test", vocab_size=259)
    fake_checkpoint(str(tmp_path), saved)
    args = ["--model-preset", "test", *MOCK, "--load", str(tmp_path)]
    parse(*args)  # same model: fine
    parse(*args, "--tensor-model-parallel-size", "2", "--bf16", world_size=2)  # layout/precision may change
    message = expect_error("was saved for a different model", *args, "--hidden-size", "128", "--num-experts", "8")
    assert "--hidden-size: checkpoint 64, this run 128" in message
    assert "--num-experts: checkpoint 4, this run 8" in message


# --- launch environment ---------------------------------------------------------------------------------
def test_rank_layout_from_torchrun_slurm_or_nothing():
    assert dist_env({}) == dist_env({"UNRELATED": "1"})
    assert (dist_env({}).rank, dist_env({}).world_size) == (0, 1)
    tr = dist_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert (tr.rank, tr.world_size, tr.local_rank) == (3, 8, 1)
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_JOB_NODELIST": "gpu[007-008]",
           "SLURM_JOB_ID": "12345"}
    sl = dist_env(env)
    assert (sl.rank, sl.world_size, sl.local_rank) == (5, 16, 5)
    assert env["MASTER_ADDR"] == "gpu007" and env["MASTER_PORT"] == str(10000 + 12345 % 20000)
    assert world_size_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "16"}) == 16
    assert world_size_from_env({"WORLD_SIZE": "4", "RANK": "0", "SLURM_NTASKS": "16"}) == 4


@pytest.mark.parametrize("nodelist, first", [("node1", "node1"), ("gpu[003-006,9]", "gpu003"),
                                             ("a[1,3],b2", "a1"), ("c-01,c-02", "c-01")])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_cli_reports_bad_flags_with_status_2():
    result = subprocess.run([sys.executable, "-m", "megatron_grin", "pretrain", "--model-preset", "test",
                             "--mock-data", "--train-iters", "1", "--micro-batch", "2"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    assert "did you mean --micro-batch-size?" in result.stderr
    assert "iter " not in result.stdout
