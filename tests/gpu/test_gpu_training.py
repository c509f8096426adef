"""The trainer on the GPU: a tiny model saves, resumes bit-exactly, and converts to HF with the parity gate.

Bit-exact on a GPU needs deterministic kernels (atomics reorder floating-point sums), so both runs set
``torch.use_deterministic_algorithms`` (warn-only) and cuBLAS's fixed workspace, and use the unfused
attention (PyTorch's flash / memory-efficient backward stays non-deterministic in warn-only mode; the
fused attention is exercised by test_gpu_grin_shaped.py). The resumed run loads the
uninterrupted run's own step-4 checkpoint: its step 5 then depends only on what the checkpoint restored
(weights, data position, routing randomness), steps 6-8 also on the optimizer state and the LR schedule.
"""

import json
import os
import subprocess
import sys

import pytest
from gpu_testing import ROOT, env, losses, pretrain

pytestmark = pytest.mark.gpu

TINY = ["--model-preset", "test", "--mock-data", "--seq-length", "64", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--lr", "1e-3", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine",
        "--min-lr", "1e-4", "--moe-aux-loss-coeff", "0.01", "--log-interval", "1", "--eval-iters", "0",
        "--seed", "5", "--train-iters", "8", "--attention-backend", "unfused"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-train")
    straight, resumed = root / "straight", root / "resumed"
    pretrain([*TINY, "--save", str(straight / "ckpt"), "--save-interval", "4", "--log-dir", str(straight)],
             deterministic=True)
    proc = pretrain([*TINY, "--load", str(straight / "ckpt"), "--ckpt-step", "4", "--save", str(resumed / "ckpt"),
                     "--log-dir", str(resumed)], deterministic=True)
    return straight, resumed, proc.stdout


def test_runs_on_the_gpu(runs, device):
    straight, _, _ = runs
    with open(straight / "summary.json", encoding="utf-8") as f:
        summary = json.load(f)
    assert (summary["device"] != "cpu") == (device.type == "cuda"), summary["device"]
    assert summary["peak_memory_gib"] > 0 and summary["tokens_per_second"] > 0


def test_resume_continues_bit_exactly(runs):
    straight, resumed, stdout = runs
    assert "optimizer restored, RNG restored" in stdout
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == list(range(1, 9)) and sorted(b) == list(range(5, 9))
    assert a[5] == b[5], f"step 5 (restored weights, data, routing keys only): {a[5]!r} vs {b[5]!r}"
    diff = {i: (a[i], b[i]) for i in range(6, 9) if a[i] != b[i]}
    assert not diff, f"steps after 5 (optimizer state, LR) differ: {diff}"


def test_convert_the_gpu_checkpoint_to_hf_with_the_parity_gate(runs, tmp_path):
    _, resumed, _ = runs
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "megatron_grin", "convert", "to-hf", "--load", str(resumed / "ckpt"),
                           "--out", str(out), "--verify"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=env(), check=False)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    with open(out / "config.json", encoding="utf-8") as f:
        assert json.load(f)["architectures"] == ["PhimoeForCausalLM"]
    assert any(name.endswith(".safetensors") for name in os.listdir(out))
    assert "parity:" in proc.stdout + proc.stderr  # the gate ran (conversion runs on the CPU by design)
