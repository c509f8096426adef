"""`megatron-grin plan`: parameter counts equal the built model's, activation estimates match CPU
measurements within 15 %, the cluster presets fit with >= 10 % headroom, and the CLI refuses and
suggests and searches as documented (docs/planning.md). Memory and speed against the recorded
calibration points: tests/plan/test_calibration.py."""

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest

from grin_testing import init_parallel, run_distributed, tiny_config
from megatron_grin import accounting
from megatron_grin.config import preset
from megatron_grin.plan import cli as plan
from megatron_grin.plan import layout as plan_layout
from megatron_grin.plan import memory as plan_memory
from megatron_grin.plan import planner

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import activation_memory as bench  # noqa: E402

TOLERANCE = 0.15


# ---------------------------------------------------------------------------------------------
# parameter counts
# ---------------------------------------------------------------------------------------------
COUNT_CONFIGS = {"grin": preset("grin-16x3.8b"), "tiny": preset("tiny"), "test": preset("test"),
                 "tiny_config": tiny_config(), "odd": tiny_config(num_experts=7, moe_router_topk=3, kv_channels=20)}


def test_grin_totals():
    counts = accounting.parameter_counts(preset("grin-16x3.8b"))
    assert abs(counts["total"] / 1e9 - 41.9) < 0.05 and abs(counts["active"] / 1e9 - 6.6) < 0.05


def _padded_total(cfg):
    return accounting.rank_parameters(cfg, 1, 1, 1, 0)


@pytest.mark.parametrize("tp,pp,vpp", [(1, 8, 4), (2, 4, 2), (1, 32, 1), (8, 2, 16)])
def test_stage_counts_sum_to_the_model(tp, pp, vpp):
    cfg = preset("grin-16x3.8b")
    padding = cfg.replace(tensor_model_parallel_size=tp).padded_vocab_size - cfg.vocab_size  # Megatron-LM: x TP
    per_rank = [accounting.rank_parameters(cfg, tp, pp, vpp, r) for r in range(pp)]
    replicated = cfg.num_layers * (4 * cfg.hidden_size + cfg.num_experts * cfg.hidden_size + cfg.hidden_size) \
        + 2 * cfg.hidden_size  # norms, router, o_proj bias, final norm: one copy on every TP rank
    total = accounting.parameter_counts(cfg)["total"]
    assert sum(per_rank) * tp - (tp - 1) * replicated - 2 * padding * cfg.hidden_size - padding == total


def _measure_everything(rank, world, port):
    """One 2-process run (process start-up dominates on CPU): meta-device builds per stage and per TP
    rank, activation measurements of the tiny configs, and megatron schedules under PP / VPP / TP."""
    from megatron.core import parallel_state as ps

    from megatron_grin.model.build import build_model_on_meta

    def count(model):
        return sum(p.numel() for p in model.parameters())

    init_parallel(rank, world, port)  # TP 1 x PP 1 x DP 2: each rank measures on its own
    out = {"quick": bench.run(bench.QUICK[rank::world])}
    out["counts"] = {name: count(build_model_on_meta(c)) for name, c in list(COUNT_CONFIGS.items())[rank::world]}
    cfg = preset("grin-16x3.8b")
    out["whole"] = count(build_model_on_meta(cfg))
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    staged = cfg.replace(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    out["pp2_vpp2"] = []
    for v in range(2):
        first = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=v)
        last = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=v)
        out["pp2_vpp2"].append(count(build_model_on_meta(staged, vp_stage=v, pre_process=first, post_process=last)))
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    out["tp2"] = count(build_model_on_meta(cfg.replace(tensor_model_parallel_size=2)))
    out["schedules"] = bench.schedule_rows([s for s in bench.SCHEDULES if s[0] in ("pp2-vpp2", "tp2-sp-full")])
    return out


@pytest.fixture(scope="module")
def measured():
    return run_distributed(_measure_everything, 2, timeout=900)


def test_parameter_counts_equal_meta_device_builds(measured):
    """accounting.parameter_counts (unpadded) against the built model's parameters (padded vocab)."""
    built = {name: n for res in measured for name, n in res["counts"].items()}
    assert set(built) == set(COUNT_CONFIGS)
    for name, cfg in COUNT_CONFIGS.items():
        padding = cfg.padded_vocab_size - cfg.vocab_size
        assert built[name] - 2 * padding * cfg.hidden_size - padding == accounting.parameter_counts(cfg)["total"], name


def test_counts_equal_meta_device_builds_per_stage_and_tp_rank(measured):
    cfg = preset("grin-16x3.8b")
    for rank, res in enumerate(measured):
        assert res["pp2_vpp2"] == [accounting.chunk_parameters(cfg, 1, 2, 2, rank, v) for v in range(2)]
        assert res["tp2"] == accounting.rank_parameters(cfg, 2, 1, 1, 0)
        assert res["whole"] == _padded_total(cfg)
    assert sum(sum(r["pp2_vpp2"]) for r in measured) == measured[0]["whole"]


# ---------------------------------------------------------------------------------------------
# activations: estimate vs CPU measurement
# ---------------------------------------------------------------------------------------------
def test_activation_estimate_within_15_percent_of_cpu_measurement(measured):
    rows = [row for res in measured for row in res["quick"]]
    assert len(rows) == len(bench.QUICK) * 3 * len(bench.ATTENTION)
    for row in rows:
        assert abs(row["forward_error"]) <= TOLERANCE, row
        assert abs(row["backward_peak_error"]) <= TOLERANCE, row
    by_mode = {(r["config"], r["recompute"], r["attention"]): r["measured"]["forward_bytes"] for r in rows}
    for name, *_ in bench.QUICK:  # recomputation really saves memory; the fused kernels keep no scores
        assert by_mode[(name, "full", "unfused")] < by_mode[(name, "selective", "unfused")] \
            < by_mode[(name, "none", "unfused")]
        assert by_mode[(name, "none", "fused")] < by_mode[(name, "none", "unfused")]


def test_pipeline_and_tensor_parallel_estimates_within_15_percent(measured):
    rows = [row for res in measured for row in res["schedules"]]
    assert len(rows) == 4
    for row in rows:
        assert abs(row["peak_error"]) <= TOLERANCE, row
    first = next(r for r in rows if r["config"] == "pp2-vpp2" and r["pp_rank"] == 0)
    assert first["inflight_estimated"] == 5  # (PP-1) x 2 + (VPP-1) x PP + 1


def test_recorded_benchmark_results_are_within_tolerance():
    data = json.loads((ROOT / "benchmarks" / "results" / "activation_memory.json").read_text())
    assert len(data["rows"]) >= 15 and len(data["schedules"]) >= 8
    assert all(abs(r["forward_error"]) <= TOLERANCE and abs(r["backward_peak_error"]) <= TOLERANCE
               for r in data["rows"])
    assert all(abs(r["peak_error"]) <= TOLERANCE for r in data["schedules"])


# ---------------------------------------------------------------------------------------------
# schedule, time model
# ---------------------------------------------------------------------------------------------
def test_inflight_microbatches_follow_megatron_schedules():
    assert plan_memory.inflight_chunks(8, 1, 256, 0) == 8 and plan_memory.inflight_chunks(8, 1, 256, 7) == 1
    assert plan_memory.inflight_chunks(8, 4, 256, 0) == 39  # L (1 + (PP-1)/(PP VPP)) layer-microbatches of 1 layer
    assert plan_memory.inflight_chunks(8, 1, 4, 0) == 4  # fewer micro-batches than stages
    assert plan_memory.inflight_chunks(1, 1, 64, 0) == 1


def test_sliding_window_ratio():
    assert accounting.attention_window_ratio(4096, None) == 1.0
    assert accounting.attention_window_ratio(4096, 8192) == 1.0
    assert accounting.attention_window_ratio(4096, 2047) == pytest.approx(0.7497, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# the cluster presets and the CLI
# ---------------------------------------------------------------------------------------------
PRESET_SIZES = (64, 128, 256, 512)


def _preset_args(gpus):
    path = ROOT / "megatron_grin" / "configs" / "cluster" / f"h100x{gpus}.yaml"
    if path.is_file():
        return ["--config", str(path)]
    return ["--model-preset", "grin-16x3.8b", "--gpus", str(gpus), "--global-batch-size", "2048", "--tp", "1",
            "--pp", "8", "--vpp", "4", "--micro-batch-size", "1", "--recompute", "full", "--distributed-optimizer"]


@pytest.mark.parametrize("gpus", PRESET_SIZES)
def test_cluster_presets_fit_with_10_percent_headroom(gpus, capsys):
    assert plan.main(_preset_args(gpus) + ["--gpu-memory", "80", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["headroom"] >= 0.10
    assert out["layout"]["gpus"] == gpus and out["parameters"]["total"] == accounting.parameter_counts(
        preset("grin-16x3.8b"))["total"]
    assert out["time"]["tokens_per_s_per_gpu"] > 1000


def test_text_output_shows_every_memory_term(capsys):
    assert plan.main(_preset_args(64)) == 0
    text = capsys.readouterr().out
    for words in ("weights", "gradients", "optimizer", "activations", "working set", "peak allocated",
                  "imbalance reserve", "CUDA context", "headroom", "pipeline bubble", "tokens/s/GPU", "MFU",
                  "measured:", "modelled:", "analytic:", "measured GPU", "measured layouts"):
        assert words in text, words


def test_refuses_a_layout_that_does_not_fit_and_says_what_to_change(capsys):
    argv = ["--model-preset", "grin-16x3.8b", "--gpus", "64", "--global-batch-size", "2048", "--pp", "2",
            "--recompute", "full", "--distributed-optimizer"]
    assert plan.main(argv) == 1
    text = capsys.readouterr().out
    assert "DOES NOT FIT" in text and "increase --tensor-model-parallel-size to 2" in text
    pp = int(re.search(r"increase --pipeline-model-parallel-size to (\d+)", text).group(1))
    layout = plan_layout.Layout(gpus=64, global_batch_size=2048, recompute="full", distributed_optimizer=True)
    fits = {p: planner.evaluate(preset("grin-16x3.8b"), dataclasses.replace(layout, pp=p)).fits for p in (4, 8)}
    assert fits[pp] and all(not fits[p] for p in fits if p < pp)  # the smallest PP that fits
    assert plan.main(argv[:-3] + ["--pp", "8", "--vpp", "4", "--recompute", "none", "--distributed-optimizer"]) == 1
    assert "enable --recompute-granularity full" in capsys.readouterr().out


def test_invalid_layout_is_an_error(capsys):
    assert plan.main(["--model-preset", "grin-16x3.8b", "--gpus", "64", "--global-batch-size", "2048",
                      "--pp", "5"]) == 2
    assert "--pipeline-model-parallel-size 5" in capsys.readouterr().err


def test_search_lists_fitting_layouts_fastest_first(capsys):
    assert plan.main(_preset_args(512) + ["--search", "--top", "4", "--json"]) == 0
    layouts = json.loads(capsys.readouterr().out)["layouts"]
    assert 1 <= len(layouts) <= 4
    speeds = [lay["time"]["tokens_per_s_per_gpu"] for lay in layouts]
    assert speeds == sorted(speeds, reverse=True)
    assert all(lay["headroom"] >= max(0.10, lay["required_headroom"]) and lay["layout"]["gpus"] == 512
               for lay in layouts)


def test_search_space_is_valid_megatron_layouts():
    cfg = preset("grin-16x3.8b")
    layouts = planner.candidate_layouts(cfg, plan_layout.Layout(gpus=64, global_batch_size=2048))
    assert {lay.tp for lay in layouts} == {1, 2, 4, 8}
    assert all(not lay.problems(cfg) for lay in layouts)
    assert all(lay.vpp == 1 or lay.num_microbatches % lay.pp == 0 for lay in layouts)


PLAN_BASE = ["--model-preset", "grin-16x3.8b", "--global-batch-size", "2048"]


def test_config_file_problems_name_the_file(tmp_path, capsys):
    bad = tmp_path / "F.yaml"
    bad.write_bytes(b"\xff\xfeslurm:\n  nodes: 8\n")
    assert plan.main(["--config", str(bad)]) == 2
    assert "F.yaml: not UTF-8 text (" in capsys.readouterr().err
    dup = tmp_path / "cluster.yaml"
    dup.write_text("slurm:\n  nodes: 8\ntrainer:\n  global_batch_size: 2048\n  global_batch_size: 1024\n")
    assert plan.main(["--config", str(dup)]) == 2
    err = capsys.readouterr().err
    assert "cluster.yaml" in err and "key 'global_batch_size' given twice" in err


def test_gpus_must_fill_whole_nodes(capsys):
    assert plan.main(PLAN_BASE + ["--gpus", "64", "--gpus-per-node", "3"]) == 2
    assert "--gpus 64 is not a multiple of --gpus-per-node 3" in capsys.readouterr().err
    plan.main(PLAN_BASE + ["--gpus", "4", "--gpus-per-node", "8"])  # part of one node: the planner models it
    assert "not a multiple" not in capsys.readouterr().err


def test_layout_problems_one_per_line(capsys):
    assert plan.main(PLAN_BASE + ["--gpus", "64", "--tp", "3"]) == 2
    err = capsys.readouterr().err
    assert ".;" not in err
    assert "  - --moe-ffn-hidden-size 6400 is not divisible by --tensor-model-parallel-size 3" in err
    assert "  - 64 GPUs are not divisible by TP 3 x PP 1" in err
