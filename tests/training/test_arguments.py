"""`megatron-grin pretrain` flags: precedence, Megatron-LM's derivations and early, complete, clear errors.

Every error case also asserts that no process group exists afterwards: validation finishes before any rank
starts. Reference values of Megatron-LM's behaviour cite its source at core_v0.16.1.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from megatron_grin.config import ConfigError, GrinConfig, preset
from megatron_grin.settings import declared
from megatron_grin.training.arguments import parse, parse_args, world_size_from_env
from megatron_grin.training.run_config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "megatron_grin", "configs")
MOCK = ["--mock-data", "--train-iters", "10"]
TEST = ["--model-preset", "test", *MOCK]


def problems(*argv, world_size=1) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_args(list(argv), world_size=world_size)
    assert not torch.distributed.is_initialized(), "validation must not start process groups"
    return info.value.problems


def expect_error(pattern: str, *argv, world_size=1) -> str:
    found = problems(*argv, world_size=world_size)
    hits = [p for p in found if re.search(pattern, p)]
    assert hits, f"no problem matches {pattern!r}: {found}"
    return hits[0]


def write_yaml(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


# --- precedence -----------------------------------------------------------------------------------------
def test_preset_then_yaml_then_flags(tmp_path):
    cfg_file = write_yaml(tmp_path, "model_preset: tiny\nhidden-size: 256\nnum_experts: 4\nlr: 0.002\n"
                                    "micro_batch_size: 2\nbf16: true\ndata_path: null\nmock_data: true\n")
    cfg, tcfg = parse_args(["--config", cfg_file, "--num-experts", "6", "--train-iters", "3", "--no-bf16"])
    tiny = preset("tiny")
    assert cfg.hidden_size == 256  # YAML over preset
    assert cfg.num_experts == 6  # flag over YAML
    assert cfg.num_layers == tiny.num_layers and cfg.ffn_hidden_size == tiny.ffn_hidden_size  # preset kept
    assert cfg.bf16 is False  # --no-bf16 over `bf16: true`
    assert tcfg.lr == 0.002 and tcfg.micro_batch_size == 2 and tcfg.train_iters == 3
    assert cfg.vocab_size == 259  # byte tokenizer's, since --vocab-size was not given


def test_packaged_configs_by_name_and_by_path(tmp_path):
    by_name = parse_args(["--config", "local", "--mock-data", "--train-iters", "5"])
    by_path = parse_args(["--config", os.path.join(CONFIGS, "local.yaml"), "--mock-data", "--train-iters", "5"])
    assert by_name == by_path
    cfg, tcfg = by_name
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_experts, tcfg.seq_length) == (4, 128, 8, 256)
    grin, _ = parse_args(["--config", "grin-16x3.8b", *MOCK])
    assert grin.replace(tokenizer=None, vocab_size=32064) == preset("grin-16x3.8b")
    expect_error("no such file, and not a packaged config", "--config", "nonexistent", *MOCK)


def test_the_cluster_recipe_parses(tmp_path):
    import yaml

    merged = {}
    for name in ("grin-16x3.8b.yaml", "pretrain-grin.yaml"):
        merged.update(yaml.safe_load(open(os.path.join(CONFIGS, name))))
    merged.update(yaml.safe_load(open(os.path.join(CONFIGS, "cluster", "h100x64.yaml")))["trainer"])
    cfg, tcfg = parse_args(["--config", write_yaml(tmp_path, yaml.safe_dump(merged)), "--mock-data"], world_size=64)
    assert cfg.num_layers == 32 and tcfg.global_batch_size == 2048 and cfg.virtual_pipeline_model_parallel_size == 4


def test_a_second_config_is_an_error(tmp_path):
    expect_error("--config given more than once", "--config", "local", "--config", "local", *MOCK)


def test_yaml_lists_and_virtual_pipeline(tmp_path):
    cfg_file = write_yaml(tmp_path, "model_preset: test\nnum_layers: 8\npipeline_model_parallel_size: 2\n"
                                    "num_layers_per_virtual_pipeline_stage: 2\nglobal_batch_size: 4\n"
                                    "data_path: [0.5, a, 0.5, b]\n")
    cfg, tcfg = parse_args(["--config", cfg_file, "--train-iters", "1"], world_size=4, check=False)
    assert cfg.virtual_pipeline_model_parallel_size == 2  # 8 layers / (PP 2 x 2 per virtual stage)
    assert tcfg.data_parallel_size == 2 and tcfg.num_microbatches == 2
    assert tcfg.data_path == ["0.5", "a", "0.5", "b"]


# --- no GRIN defaults without a GRIN preset or config -----------------------------------------------------
def test_without_a_preset_megatron_lm_defaults_apply():
    """A Megatron-LM style description of a MoE: query groups, window, dropout, ffn and jitter are Megatron's."""
    argv = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--max-position-embeddings",
            "32", "--num-experts", "4", "--swiglu", "--position-embedding-type", "rope",
            "--untie-embeddings-and-output-weights", *MOCK]
    cfg, _ = parse_args(argv)
    assert cfg.num_query_groups == 4  # no --group-query-attention: one key/value head per query head
    assert cfg.sliding_window is None and cfg.hidden_dropout == 0.1 and cfg.attention_dropout == 0.1
    assert cfg.input_jitter_eps == 0.0 and cfg.moe_router_dtype is None and cfg.moe_router_topk == 2
    assert cfg.ffn_hidden_size == int((4 * 64 * 2 / 3) / 64) * 64  # validate_args, arguments.py:802-808
    gqa, _ = parse_args(argv + ["--group-query-attention"])
    assert gqa.num_query_groups == 1  # Megatron-LM's parser default for --num-query-groups
    expect_error("--num-query-groups 2 without --group-query-attention", *argv, "--num-query-groups", "2")


def test_a_dense_script_is_refused_with_what_to_add():
    found = problems("--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                     "--max-position-embeddings", "32", *MOCK)
    assert any("dense model" in p and "--config grin-16x3.8b" in p for p in found)
    for flag in ("--swiglu", "--position-embedding-type", "--untie-embeddings-and-output-weights"):
        assert any(p.startswith(f"{flag} is missing") for p in found), flag


def test_no_model_at_all_is_one_problem():
    found = problems(*MOCK)
    assert len([p for p in found if "no model" in p]) == 1 and not any("is required (Megatron" in p for p in found)


# --- Megatron-LM semantics ------------------------------------------------------------------------------
def test_sequence_parallel_at_tp1_is_dropped_with_a_note():
    parsed = parse([*TEST, "--sequence-parallel"], world_size=1)
    assert parsed.cfg.seq_parallel is False
    assert any("disabling sequence parallelism" in n for n in parsed.notes)
    cfg, _ = parse_args([*TEST, "--tensor-model-parallel-size", "2", "--sequence-parallel"], world_size=2)
    assert cfg.seq_parallel


def test_moe_ffn_hidden_size_is_the_expert_size():
    cfg, _ = parse_args([*TEST, "--ffn-hidden-size", "128"])
    assert cfg.ffn_hidden_size == 128  # Megatron-LM: moe_ffn_hidden_size <- ffn_hidden_size when not given
    parsed = parse([*TEST, "--ffn-hidden-size", "128", "--moe-ffn-hidden-size", "32"])
    assert parsed.cfg.ffn_hidden_size == 32
    assert any("--ffn-hidden-size 128 is Megatron-LM's dense MLP size, unused" in n for n in parsed.notes)
    cfg, _ = parse_args([*TEST, "--moe-ffn-hidden-size", "32", "--ffn-hidden-size", "128"])
    assert cfg.ffn_hidden_size == 32  # order does not matter: no alias, no last-wins


@pytest.mark.parametrize("tp, rows", [(1, 32128), (2, 32256), (4, 32256), (8, 32768)])
def test_vocab_padding_includes_tp_as_megatron_lm(tp, rows):
    """Megatron-LM's _vocab_size_with_padding (training/tokenizer/tokenizer.py): 32064 at divisor 128."""
    grin = ["--config", "grin-16x3.8b", *MOCK, "--tensor-model-parallel-size", str(tp), "--sequence-parallel"]
    cfg, _ = parse_args(grin, world_size=tp)
    assert cfg.padded_vocab_size == rows
    fixed, _ = parse_args([*grin, "--padded-vocab-size", "32768"], world_size=tp)
    assert fixed.padded_vocab_size == 32768


def test_a_resume_keeps_the_checkpoints_padded_vocab(tmp_path):
    saved = parse_args([*TEST], world_size=1)[0]  # 259 -> 384 rows at TP 1
    fake_checkpoint(str(tmp_path), saved)
    cfg, _ = parse_args([*TEST, "--load", str(tmp_path), "--tensor-model-parallel-size", "2"], world_size=2)
    assert cfg.padded_vocab_size == saved.padded_vocab_size == 384  # fresh TP 2 would pad to 512
    assert parse_args([*TEST, "--tensor-model-parallel-size", "2"], world_size=2)[0].padded_vocab_size == 512


def test_window_size_is_megatrons_tuple():
    cfg, _ = parse_args([*TEST, "--window-size", "2046,0"])
    assert cfg.sliding_window == 2047
    assert parse_args([*TEST, "--window-size", "(6, 0)"])[0].sliding_window == 7
    assert parse_args([*TEST, "--sliding-window", "7"])[0].sliding_window == 7
    expect_error("the right window must be 0", *TEST, "--window-size", "100,5")
    expect_error("contradicts", *TEST, "--window-size", "9,0", "--sliding-window", "7")


def test_sample_based_schedule_as_megatron_lm():
    """get_optimizer_param_scheduler (training.py:1372-1385) and update_train_iters (1136)."""
    _, t = parse_args(["--model-preset", "test", "--mock-data", "--train-samples", "1000", "--global-batch-size", "8",
                       "--lr-decay-samples", "800", "--lr-warmup-samples", "80"])
    assert (t.train_iters, t.lr_decay_steps, t.lr_warmup_steps, t.wd_incr_steps) == (125, 800, 80, 1000)
    _, t = parse_args([*TEST, "--global-batch-size", "4", "--lr-warmup-fraction", "0.1", "--lr-decay-iters", "8"])
    assert (t.lr_decay_steps, t.lr_warmup_steps) == (32, pytest.approx(3.2))
    expect_error("with --train-samples use --lr-decay-samples", "--model-preset", "test", "--mock-data",
                 "--train-samples", "100", "--lr-decay-iters", "5")
    expect_error("exclude each other", *TEST, "--train-samples", "100")
    expect_error("exclude each other", *TEST, "--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "2")


def test_scheduler_override_flags_both_spellings():
    for spelling in ("--override-opt_param-scheduler", "--override-opt-param-scheduler"):
        assert parse_args([*TEST, spelling])[1].override_opt_param_scheduler
    for spelling in ("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler"):
        assert parse_args([*TEST, spelling])[1].use_checkpoint_opt_param_scheduler
    expect_error("both override and use-checkpoint are set", *TEST, "--override-opt-param-scheduler",
                 "--use-checkpoint-opt-param-scheduler")


def test_weight_decay_increment_as_megatron_lm():
    _, t = parse_args([*TEST, "--weight-decay-incr-style", "linear", "--start-weight-decay", "0.0",
                       "--end-weight-decay", "0.1"])
    assert t.scheduler_kwargs()["start_wd"] == 0.0 and t.scheduler_kwargs()["end_wd"] == 0.1
    expect_error("needs --start-weight-decay", *TEST, "--weight-decay-incr-style", "cosine")
    expect_error("only with a non-constant", *TEST, "--start-weight-decay", "0.1")


def test_load_balancing_type_follows_megatron_lm():
    parse_args([*TEST, "--moe-router-load-balancing-type", "global_aux_loss", "--moe-aux-loss-coeff", "0.01"])
    parse_args([*TEST, "--moe-router-load-balancing-type", "aux_loss"])  # coefficient 0: no loss either way
    expect_error("Megatron-LM's global_aux_loss", *TEST, "--moe-router-load-balancing-type", "aux_loss",
                 "--moe-aux-loss-coeff", "0.01")
    parsed = parse([*TEST, "--moe-router-load-balancing-type", "none", "--moe-aux-loss-coeff", "0.01"])
    assert parsed.cfg.balance_loss_coeff == 0.0 and any("unused under" in n for n in parsed.notes)
    expect_error("takes 1 value here", *TEST, "--moe-aux-loss-coeff", "0.01", "0.02")


def test_null_tokenizer_adds_the_end_of_document_id():
    cfg, t = parse_args([*TEST, "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000"])
    assert (cfg.vocab_size, t.tokenizer, cfg.tokenizer) == (1001, "null:1000", "null:1000")
    expect_error("NullTokenizer needs --vocab-size", *TEST, "--tokenizer-type", "NullTokenizer")
    expect_error("megatron-grin reads HuggingFaceTokenizer", *TEST, "--tokenizer-type", "GPT2BPETokenizer")


def test_exit_on_missing_checkpoint_exits_0(tmp_path, capsys):
    from megatron_grin.training import pretrain

    empty = tmp_path / "ckpt"
    empty.mkdir()
    assert pretrain.main([*TEST, "--load", str(empty), "--exit-on-missing-checkpoint"]) == 0
    assert "--exit-on-missing-checkpoint" in capsys.readouterr().out


# --- --load of what cannot be resumed -----------------------------------------------------------------------
def fake_checkpoint(root, cfg: GrinConfig, iteration: int = 10, config: bool = True) -> str:
    """What a torch_dist save commits: iter dir with megatron's metadata files (+ grin_config.json), tracker."""
    from dataclasses import asdict

    path = os.path.join(root, f"iter_{iteration:07d}")
    os.makedirs(path)
    for name in ("metadata.json", ".metadata", "common.pt"):
        open(os.path.join(path, name), "w").close()
    if config:
        data = {**asdict(cfg), "padded_vocab": cfg.padded_vocab_size}
        with open(os.path.join(path, "grin_config.json"), "w") as f:
            json.dump(data, f)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(f"{iteration}\n")
    return path


def test_checkpoint_of_another_model_is_refused_before_init(tmp_path):
    saved = parse_args(TEST)[0]
    fake_checkpoint(str(tmp_path), saved)
    args = [*TEST, "--load", str(tmp_path)]
    parse_args(args)  # same model: fine
    parse_args([*args, "--tensor-model-parallel-size", "2", "--bf16"], world_size=2)  # layout/precision may change
    message = expect_error("was saved for a different model", *args, "--hidden-size", "128", "--num-experts", "8")
    assert "--hidden-size: checkpoint 64, this run 128" in message
    assert "--num-experts: checkpoint 4, this run 8" in message


@pytest.mark.parametrize("layout, found", [
    ("megatron", "without grin_config.json"), ("legacy", "legacy --ckpt-format torch"),
    ("release", "'release' checkpoint"), ("hf", "a Hugging Face model"), ("iteration", "iteration directory")])
def test_load_of_a_checkpoint_we_cannot_read_is_refused(tmp_path, layout, found):
    root = tmp_path / "ckpt"
    root.mkdir()
    if layout == "megatron":
        fake_checkpoint(str(root), GrinConfig(), config=False)
    elif layout == "legacy":
        (root / "iter_0000100" / "mp_rank_00").mkdir(parents=True)
        (root / "latest_checkpointed_iteration.txt").write_text("100")
    elif layout == "release":
        (root / "release").mkdir()
        (root / "latest_checkpointed_iteration.txt").write_text("release")
    elif layout == "hf":
        (root / "config.json").write_text("{}")
        (root / "model.safetensors").write_text("")
    else:
        for name in ("metadata.json", ".metadata", "common.pt"):
            (root / name).write_text("")
    message = expect_error(found, *TEST, "--load", str(root), "--save", str(root))
    assert "--load" in message


def test_load_of_an_empty_directory_starts_fresh(tmp_path):
    parse_args([*TEST, "--load", str(tmp_path), "--save", str(tmp_path)])


# --- every problem at once, fast, without heavy imports --------------------------------------------------------
def test_every_problem_of_a_command_line_in_one_run():
    found = problems("--model-preset", "test", "--train-iters", "x", "--lr-warmup-iter", "5", "--fp16", "--tp", "2",
                     "--adam-beta1", "1.5", "--num-experts", "3", "--moe-router-topk", "4", "--mock-data",
                     "--normalization", "RMSNorm")
    expected = ["--train-iters 'x': expected an integer", "--lr-warmup-iter: unknown flag",
                "did you mean --lr-warmup-iters?", "--fp16: fp16 with loss scaling is not supported",
                "Megatron-LM's name: --tensor-model-parallel-size", "--adam-beta1 1.5: must be >= 0 and < 1",
                "--normalization RMSNorm: GRIN uses LayerNorm"]
    text = "\n".join(found)
    for item in expected:
        assert item in text, item


def test_command_line_errors_are_fast_and_import_nothing_heavy():
    code = ("import sys, time; t = time.time()\n"
            "from megatron_grin.training.pretrain import main\n"
            "rc = main(['--bogus', '--model-preset', 'test', '--mock-data', '--train-iters', '1', '--fp16'])\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') "
            "or m.startswith('megatron.core'))\n"
            "print(rc, heavy, time.time() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    rc, heavy, seconds = out.stdout.strip().rsplit(" ", 1)[0].split(" ", 1) + [float(out.stdout.split()[-1])]
    assert rc == "2" and heavy == "[]", out.stdout + out.stderr
    assert seconds < 2.0, seconds
    assert "--bogus: unknown flag" in out.stderr and "--fp16" in out.stderr and "Traceback" not in out.stderr


def test_the_cli_reports_every_problem_with_status_2():
    result = subprocess.run([sys.executable, "-m", "megatron_grin", "pretrain", *TEST, "--micro-batch", "2",
                             "--seed", "-1"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert "did you mean --micro-batch-size?" in result.stderr and "--seed -1: must be >= 0" in result.stderr
    assert "Traceback" not in result.stderr


# --- range checks beside the declarations --------------------------------------------------------------------
def _outside(s) -> str:
    if s.ge is not None:
        return str(s.ge - 1 if s.type is int else s.ge - 0.5)
    if s.gt is not None:
        return str(s.gt if s.type is int else s.gt - 0.5)
    return str(s.le + 1 if s.le is not None else s.lt)


RANGED = [(s.flag, s) for cls in (GrinConfig, TrainConfig) for _, s in declared(cls)
          if s.kind == "value" and s.type in (int, float) and any(
              v is not None for v in (s.ge, s.gt, s.le, s.lt))]


@pytest.mark.parametrize("flag, s", RANGED, ids=[f for f, _ in RANGED])
def test_every_numeric_flag_is_range_checked(flag, s):
    expect_error(re.escape(f"{flag} ") + r".*must be", *TEST, flag, _outside(s))


def test_adam_and_friends_ranges_named():
    for argv, text in ((["--adam-beta2", "1"], "--adam-beta2 1: must be >= 0 and < 1"),
                       (["--weight-decay", "-0.1"], "--weight-decay -0.1: must be >= 0"),
                       (["--rotary-base", "0"], "--rotary-base 0: must be > 0"),
                       (["--make-vocab-size-divisible-by", "0"], "--make-vocab-size-divisible-by 0: must be >= 1"),
                       (["--clip-grad", "-1"], "--clip-grad -1: must be >= 0"),
                       (["--kv-channels", "0"], "--kv-channels 0: must be >= 1"),
                       (["--exit-duration-in-mins", "0"], "--exit-duration-in-mins 0: must be > 0")):
        expect_error(re.escape(text), *TEST, *argv)


# --- launch environment ----------------------------------------------------------------------------------------
def test_world_size_from_torchrun_or_slurm():
    assert world_size_from_env({}) == 1
    assert world_size_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "16"}) == 16
    assert world_size_from_env({"WORLD_SIZE": "4", "RANK": "0", "SLURM_NTASKS": "16"}) == 4


def test_layout_errors_name_the_flags():
    expect_error(r"--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2", *TEST,
                 "--micro-batch-size", "2", "--global-batch-size", "6", world_size=2)
    expect_error("world size 3 is not divisible by TP x PP = 2", *TEST, "--tensor-model-parallel-size", "2",
                 world_size=3)
    expect_error("multiple of --pipeline-model-parallel-size 2", *TEST, "--pipeline-model-parallel-size", "2",
                 "--num-layers-per-virtual-pipeline-stage", "1", "--global-batch-size", "3", world_size=2)
    expect_error("--train-iters \\(or --train-samples\\) is required", "--model-preset", "test", "--mock-data")
    expect_error("--data-path PREFIX .* or --mock-data", "--model-preset", "test", "--train-iters", "1")


def test_data_files_are_checked(tmp_path):
    from megatron_grin.training.preprocess import preprocess

    src = tmp_path / "a.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"document number {i} " * 20}) for i in range(8)) + "\n")
    prefix = str(tmp_path / "corpus_text_document")
    preprocess([str(src)], prefix, "byte")
    parse_args(["--model-preset", "test", "--train-iters", "1", "--data-path", prefix])  # intact: accepted
    expect_error("corpus_text_document.bin exists: pass --data-path", "--model-preset", "test", "--train-iters", "1",
                 "--data-path", str(tmp_path / "corpus"))
    with open(prefix + ".idx", "r+b") as f:
        f.truncate(os.path.getsize(prefix + ".idx") - 5)
    expect_error("truncated or corrupt", "--model-preset", "test", "--train-iters", "1", "--data-path", prefix)


def test_plan_suggestions_paste_into_pretrain():
    """`megatron-grin plan` prints layouts as Megatron-LM flags (Layout.flags); pretrain takes them as they are."""
    from megatron_grin.plan.layout import Layout

    for lay in (Layout(gpus=64, tp=2, pp=8, vpp=4, micro_batch_size=1, global_batch_size=2048, recompute="full",
                       distributed_optimizer=True),
                Layout(gpus=64, tp=1, pp=4, micro_batch_size=2, global_batch_size=2048, recompute="selective"),
                Layout(gpus=64, tp=1, pp=8, global_batch_size=2048)):
        cfg, t = parse_args(["--config", "grin-16x3.8b", "--mock-data", "--train-iters", "1", "--global-batch-size",
                             "2048", *lay.flags().split()], world_size=64)
        assert (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size) == (lay.tp, lay.pp)
        assert (cfg.virtual_pipeline_model_parallel_size or 1) == lay.vpp and t.micro_batch_size == lay.micro_batch_size
        assert (cfg.recompute_granularity or "none") == lay.recompute
        assert t.use_distributed_optimizer == lay.distributed_optimizer


# --- bad input: config files, seeds, launcher environment, recomputation ---------------------------------------
BASE = ("--model-preset", "test", "--mock-data", "--train-iters", "1")


def test_config_file_not_utf8_is_named(tmp_path, capsys):
    from megatron_grin.training import pretrain

    path = tmp_path / "F.yaml"
    path.write_bytes(b"\xff\xfehidden_size: 64\n")
    expect_error(r"F\.yaml: not UTF-8 text \(", *BASE, "--config", str(path))
    assert pretrain.main(["--config", str(path), "--dry-run", *BASE]) == 2
    assert "F.yaml: not UTF-8 text (" in capsys.readouterr().err


def test_config_duplicate_key_is_refused(tmp_path):
    path = write_yaml(tmp_path, "hidden_size: 64\nnum_layers: 2\nhidden_size: 128\n")
    msg = expect_error(r"key 'hidden_size' given twice \(lines 1 and 3\)", *BASE, "--config", path)
    assert "run.yaml" in msg
    from megatron_grin.training.arguments import read_yaml

    anchors = write_yaml(tmp_path, "base: &b {seed: 1, lr: 0.1}\nrun: {<<: *b, seed: 2}\n")  # a merge may override
    assert read_yaml(anchors)["run"] == {"seed": 2, "lr": 0.1}


def test_seed_stays_in_numpys_range():
    import numpy as np

    from megatron_grin.training.run_config import SEED_MAX

    with pytest.raises(ValueError):  # the reference: numpy's own bound
        np.random.RandomState(SEED_MAX + 1)
    np.random.RandomState(SEED_MAX)
    expect_error(r"--seed 4294967296: must be >= 0 and <= 4294967295", *BASE, "--seed", str(2**32))
    assert parse_args([*BASE, "--seed", str(SEED_MAX)])[1].seed == SEED_MAX
    # set_seed adds 100 per pipeline stage: the last stage must stay in range too
    expect_error(r"--seed 4294967295: the last pipeline stage seeds with 4294967395", *BASE, "--seed", str(SEED_MAX),
                 "--pipeline-model-parallel-size", "2", world_size=2)
    from megatron_grin.bench.cli import build_parser as bench_parser

    with pytest.raises(SystemExit):
        bench_parser().parse_args(["routing", "--seed", str(2**32)])


@pytest.mark.parametrize("env, pattern", [
    ({"WORLD_SIZE": "abc"}, r"WORLD_SIZE='abc': must be a positive integer"),
    ({"WORLD_SIZE": "0"}, r"WORLD_SIZE='0': must be a positive integer"),
    ({"WORLD_SIZE": "-2", "RANK": "0"}, r"WORLD_SIZE='-2': must be a positive integer"),
    ({"WORLD_SIZE": "1_0"}, r"WORLD_SIZE='1_0': must be a positive integer"),
    ({"RANK": "abc"}, r"RANK='abc': must be a non-negative integer below WORLD_SIZE=1"),
    ({"RANK": "4", "WORLD_SIZE": "4"}, r"RANK='4': must be a non-negative integer below WORLD_SIZE=4"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "x"}, r"SLURM_NTASKS='x': must be a positive integer"),
])
def test_launcher_environment_must_be_valid(env, pattern, monkeypatch, capsys):
    from megatron_grin.training import pretrain
    from megatron_grin.training.arguments import launcher_ranks

    with pytest.raises(ConfigError, match=pattern):
        launcher_ranks(env)
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert pretrain.main([*BASE, "--dry-run"]) == 2
    assert re.search(pattern, capsys.readouterr().err)
    assert launcher_ranks({"RANK": "3", "WORLD_SIZE": "4"}) == (3, 4)


def test_recompute_flags_follow_megatron():
    """Megatron-LM's validate_args refuses a method with selective granularity; TransformerConfig refuses
    --recompute-num-layers with selective and requires it with full (checked against megatron-core itself)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    def core(**kw):
        TransformerConfig(num_layers=2, hidden_size=8, num_attention_heads=1, **kw)

    expect_error(r"--recompute-method block with --recompute-granularity selective.*drop --recompute-method",
                 *BASE, "--recompute-granularity", "selective", "--recompute-method", "block")
    with pytest.raises(ValueError):
        core(recompute_granularity="selective", recompute_num_layers=1)
    expect_error(r"--recompute-num-layers 1 with --recompute-granularity selective",
                 *BASE, "--recompute-granularity", "selective", "--recompute-num-layers", "1")
    with pytest.raises(ValueError):
        core(recompute_granularity="full", recompute_method="uniform")
    expect_error(r"full needs --recompute-num-layers", *BASE, "--recompute-granularity", "full",
                 "--recompute-method", "uniform")
    core(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    assert parse_args([*BASE, "--recompute-granularity", "full", "--recompute-method", "uniform",
                       "--recompute-num-layers", "1"])[0].recompute_num_layers == 1
    assert parse_args([*BASE, "--recompute-granularity", "selective"])[0].recompute_granularity == "selective"
