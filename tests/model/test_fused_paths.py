"""Megatron-LM's fusion switches select the fused paths, and the fused paths train exactly like the unfused ones.

`megatron-grin pretrain` twice on a tiny model for 20 steps: once with --moe-router-fusion,
--moe-permute-fusion and --moe-grouped-gemm forced on (every Triton kernel: routing, input jitter, permute,
unpermute, grouped GEMMs, weighted SwiGLU, run by the CPU interpreter), once with all three off (the PyTorch
references). The same picks every step (identical routing statistics) and the same losses (relative 1e-6).
The layer-level check of the same paths runs in the default tier (tests/model/test_grouped_mlp.py).
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--model-preset", "test", "--mock-data", "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "32",
        "--num-attention-heads", "2", "--num-query-groups", "1", "--seq-length", "16", "--micro-batch-size", "1",
        "--global-batch-size", "2", "--lr", "1e-3", "--log-interval", "1", "--eval-iters", "0", "--seed", "7",
        "--train-iters", "20"]
SWITCHES = ("--moe-router-fusion", "--moe-permute-fusion", "--moe-grouped-gemm")
ROUTING_STATS = ("moe/tokens_per_expert_cv", "moe/tokens_per_expert_cv_max", "moe/experts_without_tokens",
                 "moe/sampled_not_argmax_share", "moe/heun_full_share")


def _pretrain(log_dir, fused: bool) -> list:
    flags = list(SWITCHES) if fused else [f"--no-{s[2:]}" for s in SWITCHES]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TRITON_INTERPRET": "1" if fused else "0"}
    proc = subprocess.run([sys.executable, "-m", "megatron_grin", "pretrain", *TINY, *flags, "--log-dir", str(log_dir)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    with open(os.path.join(log_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow  # ~45 s: the Triton interpreter runs every kernel of 20 steps
def test_fused_paths_give_the_same_picks_and_losses(tmp_path):
    fused, unfused = _pretrain(tmp_path / "fused", True), _pretrain(tmp_path / "unfused", False)
    losses = [[r["loss"] for r in run if r["type"] == "train"] for run in (fused, unfused)]
    assert len(losses[0]) == len(losses[1]) == 20
    for got, want in zip(*losses):
        assert abs(got - want) <= 1e-6 * abs(want), losses
    steps = [[r for r in run if r["type"] == "interval"] for run in (fused, unfused)]
    assert len(steps[0]) == len(steps[1]) == 20
    for got, want in zip(*steps):
        assert {k: got[k] for k in ROUTING_STATS} == {k: want[k] for k in ROUTING_STATS}, (got, want)
    assert len({r["moe/sampled_not_argmax_share"] for r in steps[0]}) > 1  # sampling really varied per step
