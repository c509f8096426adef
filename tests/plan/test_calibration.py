"""The planner against its recorded calibration points (plan/measurements/*.json).

* CPU: every term of real training steps' allocations (benchmarks/step_memory.py: static, forward,
  backward and optimizer-step peaks) predicted within 3 %, and a live re-measurement of the quick case
  equal to the recorded one (so a change in what the model allocates fails here until the points are
  re-recorded);
* GPU: the H200 layout of ../shared/notes/h200-2026-12-04.md, peak allocated within 0..+15 % and speed
  within +-25 %, with the speed taken from the recorded bench results;
* stated error: bands printed, and the layout search keeps a margin at least that large.
"""

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from grin_testing import run_distributed
from megatron_grin.config import ConfigError, preset
from megatron_grin.plan import calibration, planner
from megatron_grin.plan.layout import Assumptions, GiB, Implementation, Layout

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import step_memory as bench  # noqa: E402

TERM_TOLERANCE = 0.03
H200 = dict(layout=Layout(gpus=1, micro_batch_size=2, global_batch_size=8, seq_length=4096),
            impl=Implementation(attention="unfused", expert_backend="grouped_mm"))


def _cpu_runs():
    return calibration.load().memory_runs(gpu=False)


def test_cpu_points_cover_both_attentions_every_gpu_expert_path_and_parallelism():
    runs = _cpu_runs()
    assert len(runs) >= 14
    assert {r.impl.attention for r in runs} >= {"unfused", "flash", "blockwise"}
    assert {r.impl.expert_backend for r in runs} >= {"sequential", "grouped_mm"}
    assert {r.layout.recompute for r in runs} == {"none", "selective", "full"}
    assert any(r.layout.pp > 1 for r in runs) and any(r.layout.tp > 1 for r in runs)
    assert any(r.layout.distributed_optimizer for r in runs) and any(not r.layout.bf16 for r in runs)


@pytest.mark.parametrize("run", _cpu_runs(), ids=lambda r: r.id)
def test_every_memory_term_matches_the_recorded_cpu_point(run):
    mem = planner.predicted_peak(run)
    measured = run.measured["phases_gib"]
    predicted = {"static": mem.static + mem.allocated_terms["buffers"], **mem.phase_peaks}
    for phase, gib in measured.items():
        assert predicted[phase] / GiB == pytest.approx(gib, rel=TERM_TOLERANCE), phase


def _live(rank, world, port):
    return bench.run_in_process(bench.QUICK[0], rank, port)


def test_live_step_memory_equals_the_recorded_point():
    """Re-measure the quick case now: the code still allocates what the calibration file recorded."""
    row = run_distributed(_live, 1, timeout=600)[0]
    recorded = next(r for r in _cpu_runs() if r.id == f"{bench.QUICK[0].name} rank 0")
    for phase, gib in recorded.measured["phases_gib"].items():
        assert row["measured"][phase] / GiB == pytest.approx(gib, rel=0.01), phase
    assert abs(row["peak_error"]) <= TERM_TOLERANCE


def test_h200_layout_memory_and_speed():
    cfg = preset("grin-16x3.8b", num_layers=2)
    plan = planner.evaluate(cfg, H200["layout"], H200["impl"], Assumptions(device="H200", gpu_memory_gib=140))
    assert 0.0 <= plan.peak.allocated / GiB / 73.9 - 1 <= 0.15
    assert plan.time["tokens_per_s_per_gpu"] / 51155 - 1 == pytest.approx(0, abs=0.25)
    assert plan.peak.total > plan.peak.allocated  # reserves: context, NCCL, fragmentation


def test_speed_parts_come_from_the_recorded_bench():
    """MoE and core attention are the H200 bench numbers (scaled by tokens); a drift in the file or in
    how they are read fails here."""
    cfg = preset("grin-16x3.8b", num_layers=2)
    plan = planner.evaluate(cfg, H200["layout"], H200["impl"], Assumptions(device="H200"))
    parts, m = plan.time["parts"], H200["layout"].num_microbatches
    assert parts["moe_layers"].measured and parts["core_attention"].measured
    assert not parts["optimizer_step"].measured
    assert parts["moe_layers"].seconds == pytest.approx(m * 2 * 34.9e-3 * 8192 / 16384, rel=1e-9)
    # bench model: 489.5 ms for 4 MHA layers at b=4 = head + 4 x (MoE + projections + core)
    gemm = 18 * 16384 * 4096 * 2 * 6400 / 23.4e-3
    head = 3 * 16384 * 2 * 4096 * 32128 / gemm
    core_b4 = (489.5e-3 - head) / 4 - 34.9e-3 - 3 * 16384 * 2 * 4096 * (4096 * 3 + 4096) / gemm
    assert parts["core_attention"].seconds == pytest.approx(m * 2 * core_b4 / 2, rel=1e-9)


def test_speed_band_comes_from_the_measured_runs():
    plan = planner.evaluate(preset("grin-16x3.8b"), Layout(gpus=64, pp=8, global_batch_size=2048))
    err = planner.speed_errors(calibration.load(), Assumptions())
    assert plan.speed_band.points == len(err) >= 1 and plan.speed_band.width == max(abs(e) for e in err)


def test_memory_band_and_search_margin():
    cal = calibration.load()
    cfg = preset("grin-16x3.8b")
    lay = Layout(gpus=64, pp=8, vpp=4, global_batch_size=2048, recompute="full", distributed_optimizer=True)
    plan = planner.evaluate(cfg, lay)
    errors = planner.memory_errors(cal)
    assert plan.memory_band.width >= max(abs(e) for e in errors["cpu"] + errors["gpu"])
    assert plan.memory_band.width > 0 and plan.required_headroom >= plan.memory_band.width
    # a GPU whose free share lies between --min-headroom and the band is refused
    free = (plan.memory_band.width + 0.001) / 2
    tight = dataclasses.replace(plan.assumptions, min_headroom=0.0,
                                gpu_memory_gib=plan.peak.total / GiB / (1 - free))
    refused = planner.evaluate(cfg, lay, asm=tight)
    assert refused.headroom == pytest.approx(free) and not refused.fits


def _bench_output(ms_dense: float, ms_moe: float) -> dict:
    return {"meta": {"kind": "moe-layer", "command": "megatron-grin bench moe-layer --device cuda",
                     "device": "cuda", "args": {"hidden": 4096, "ffn": 6400, "experts": 16, "topk": 2,
                                                "tokens": 16384, "dtype": "bf16"},
                     "environment": {"gpu": "NVIDIA H100 80GB HBM3"}},
            "rows": [{"name": "dense SwiGLU MLP (ffn=top_k*F)", "median_ms": ms_dense},
                     {"name": "GRIN MoE (grouped_mm)", "median_ms": ms_moe}]}


def test_bench_results_file_replaces_the_shipped_numbers(tmp_path):
    path = tmp_path / "moe-layer-h100.json"
    path.write_text(json.dumps(_bench_output(46.8, 69.8)))  # twice the H200 times
    cal = calibration.load((str(path),))
    cfg = preset("grin-16x3.8b", num_layers=2)
    base = planner.evaluate(cfg, H200["layout"], H200["impl"], Assumptions(device="H100"))
    mine = planner.evaluate(cfg, H200["layout"], H200["impl"], Assumptions(device="H100"), cal)
    assert "NVIDIA H100" in mine.time["parts"]["moe_layers"].source
    assert mine.time["parts"]["moe_layers"].seconds == pytest.approx(2 * base.time["parts"]["moe_layers"].seconds)


def test_bad_calibration_file_names_the_flag(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"schema": "something-else"}))
    with pytest.raises(ConfigError, match="--bench-results"):
        calibration.read_file(str(path))


def test_gpu_check_calibration_json_is_read(tmp_path):
    """benchmarks/gpu_check.sh writes a list of pretrain runs (flags + the trainer's layout and device)."""
    record = {"layout": {"model_preset": "grin-16x3.8b", "num_layers": 2, "bf16": True, "seq_length": 4096,
                         "micro_batch_size": 2, "global_batch_size": 8, "mock_data": True,
                         "attention_backend": "unfused", "tp": 1, "pp": 1, "vpp": None, "dp": 1,
                         "device": "NVIDIA H200"},
              "peak_allocated_gib": 73.9, "peak_reserved_gib": 76.0, "tokens_per_s": 51155.0, "step_s": 0.64}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps([record]))
    (run,), benches = calibration.read_file(str(path))
    shipped = next(r for r in calibration.load().memory_runs(gpu=True) if r.id == "grin-2-layers-mbs2-seq4096")
    assert not benches and run.on_gpu and run.measured["peak_reserved_gib"] == 76.0
    assert run.layout == shipped.layout and run.impl == shipped.impl
    assert planner.predicted_peak(run).allocated == planner.predicted_peak(shipped).allocated
