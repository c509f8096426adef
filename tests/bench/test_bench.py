"""`megatron-grin bench`: every subcommand runs end to end on tiny shapes and writes JSON + markdown."""

import json
import os

from grin_testing import run_distributed

TINY = ["--hidden", "64", "--ffn", "96", "--experts", "4", "--tokens", "256", "--seq-length", "64",
        "--warmup", "1", "--reps", "2"]


def _run_all(rank, world, port, out_dir):
    from megatron_grin.bench import cli as bench

    os.environ["MASTER_PORT"] = str(port)
    layer = bench.run(["bench", "moe-layer", *TINY, "--imbalance", "2", "--out-dir", out_dir, "--name", "layer",
                       "--backends", "sequential,grouped_mm,unfused"])
    routing = bench.run(["routing", *TINY, "--no-memory", "--out-dir", out_dir, "--name", "routing"])
    model = bench.run(["model", *TINY, "--layers", "2", "--vocab", "128", "--out-dir", out_dir, "--name", "model",
                       "--backends", "grouped_mm", "--profile", os.path.join(out_dir, "traces")])
    return layer, routing, model


def test_bench_subcommands_write_results(tmp_path):
    layer, routing, model = run_distributed(_run_all, 1, str(tmp_path))[0]
    roles = [row["role"] for row in layer["rows"]]
    assert roles[0] == "dense" and roles.count("ours") == 3 and "megatron" in roles and "hf" in roles
    names = [row["name"] for row in layer["rows"] if row["role"] == "ours"]
    assert names[2] == "GRIN MoE (unfused: loop GEMMs, torch routing)", names  # the pinned unfused variant
    for row in layer["rows"]:
        assert row["min_ms"] <= row["median_ms"] <= row["max_ms"] and len(row["samples_ms"]) == 2
        assert row["ratio_to_dense"] > 0 and row["step_peak_bytes"] is not None
    assert layer["rows"][0]["ratio_to_dense"] == 1.0
    load = layer["routing_load"]["sequential"]
    assert load["tokens_per_expert_max_over_mean"] > 1.0  # the logit bias skews routing
    assert [r["share_of_layer"] for r in routing["rows"]][0] == 1.0

    dense, moe = model["rows"]  # the dense GPT with the same active parameters, timed in the same run
    assert dense["role"] == "dense" and moe["role"] == "model"
    assert dense["throughput_vs_dense"] == 1.0 and model["moe_over_dense_throughput"] == moe["throughput_vs_dense"] > 0
    assert moe["model_tflops_per_step"] > dense["model_tflops_per_step"]  # + the routers' GEMMs
    # same active parameters: the GRIN model has, per layer, the routers and E - K unvisited experts more
    hidden, ffn, experts, top_k, layers = 64, 96, 4, 2, 2
    extra = layers * (experts * hidden + (experts - top_k) * 3 * hidden * ffn)
    assert model["parameters"]["grin"] - model["parameters"]["dense"] == extra, model["parameters"]
    for row in (dense, moe):
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1 and row["peak_source"].startswith("measured")
        assert os.path.getsize(row["trace"]) > 0 and "Self CPU" in open(row["top_ops"]).read()

    saved = json.loads((tmp_path / "layer.json").read_text())
    assert saved["meta"]["command"].startswith("megatron-grin bench moe-layer --hidden 64")
    assert saved["meta"]["environment"]["allocator"] in ("glibc", "jemalloc", "caching")
    for stem in ("layer", "routing", "model"):
        text = (tmp_path / f"{stem}.md").read_text()
        assert text.startswith("# bench") and "median ms" in text
    assert "throughput / dense" in (tmp_path / "model.md").read_text()


def test_cpu_defaults_are_grin_proportional():
    from megatron_grin.bench.cli import _resolve, build_parser

    args = build_parser().parse_args(["moe-layer", "--device", "cpu"])
    assert _resolve(args) == "cpu"
    assert (args.hidden, args.ffn, args.experts, args.topk, args.tokens, args.dtype) == (512, 800, 16, 2, 16384, "fp32")
    assert args.backends == ["sequential", "grouped_mm", "te_grouped"] and args.baselines == ["dense", "megatron", "hf"]
