"""Megatron-LM run flags honoured in training: sample-based schedules, --manual-gc, --overlap-param-gather.

Expected learning rates are Megatron-LM's schedule (core/optimizer_param_scheduler.py), worked out by hand
below; the overlapped parameter gather must reproduce the plain distributed optimizer's losses exactly.
"""

import gc
import json
import os
import subprocess
import sys

import pytest

from megatron_grin.training.run_config import TrainConfig
from megatron_grin.training.run_control import RunControl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--model-preset", "test", "--mock-data", "--seq-length", "32", "--micro-batch-size", "2", "--eval-iters",
        "0", "--log-interval", "1", "--seed", "7"]


def run(tmp_path, *args, nproc: int = 1) -> list[dict]:
    cmd = [sys.executable, "-m", "megatron_grin", "pretrain"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m",
         "megatron_grin", "pretrain"]
    log_dir = str(tmp_path)
    proc = subprocess.run([*cmd, *TINY, *args, "--log-dir", log_dir], capture_output=True, text=True, timeout=900,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(log_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["type"] == "train"]


def test_sample_based_schedule_is_megatron_lms(tmp_path):
    """--train-samples 16 at batch 4 = 4 steps; warmup 8 samples, linear decay over 16, peak 1e-3, floor 0.

    After step k the scheduler has seen 4k samples: warmup 1e-3 x 4/8; then 1e-3 x (1 - (n - 8) / (16 - 8)).
    """
    rows = run(tmp_path, "--train-samples", "16", "--global-batch-size", "4", "--lr", "1e-3", "--min-lr", "0",
               "--lr-warmup-samples", "8", "--lr-decay-style", "linear", "--calculate-per-token-loss")
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    assert [r["lr"] for r in rows] == pytest.approx([5e-4, 1e-3, 5e-4, 0.0])
    assert all(r["loss"] == r["loss"] and r["loss"] < 10 for r in rows)  # finite with per-token loss scaling


def test_manual_gc_collects_only_when_told(monkeypatch):
    calls = []
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append("collect"))
    was_enabled = gc.isenabled()
    control = RunControl(TrainConfig(manual_gc=True, manual_gc_interval=2), rank=0)
    try:
        control.start()
        assert not gc.isenabled() and calls == ["collect"]
        control.step_end(1)
        control.step_end(2)
        assert calls == ["collect", "collect"]
        with control.evaluation():
            pass
        assert calls == ["collect"] * 4  # before and after evaluation (--no-manual-gc-eval turns it off)
    finally:
        gc.enable() if was_enabled else None
    quiet = RunControl(TrainConfig(), rank=0)
    quiet.start()
    quiet.step_end(2)
    assert calls == ["collect"] * 4 and gc.isenabled() == was_enabled


@pytest.mark.slow
def test_overlap_param_gather_reproduces_the_distributed_optimizer(tmp_path):
    """Two data-parallel ranks: the all-gather moved into forward pre-hooks changes nothing numerically."""
    common = ["--train-iters", "3", "--global-batch-size", "8", "--use-distributed-optimizer",
              "--overlap-grad-reduce"]
    plain = run(tmp_path / "plain", *common, nproc=2)
    overlapped = run(tmp_path / "overlap", *common, "--overlap-param-gather", nproc=2)
    assert [r["loss"] for r in overlapped] == [r["loss"] for r in plain]
