"""A 2-layer GRIN-shaped model (hidden 4096, 16 experts x 6400, GQA 32/8, window 2047) trains in bf16.

A few steps at seq 4096 (past the sliding window): the loss starts near ln(vocab) and stays finite, and
the run reports memory and throughput. benchmarks/gpu_check.sh times the note's full layout.
"""

import math

import pytest
from gpu_testing import losses, on_gpu, pretrain, summary

pytestmark = pytest.mark.gpu

VOCAB = 32064


def test_two_grin_layers_train_in_bf16(device, tmp_path):
    if on_gpu(device):
        shape = ["--seq-length", "4096", "--bf16"]
    else:  # dry run: GRIN's layout at toy width, fp32 (CPU bf16 is emulated and slow)
        shape = ["--hidden-size", "128", "--ffn-hidden-size", "192", "--num-attention-heads", "4",
                 "--num-query-groups", "2", "--seq-length", "256", "--window-size", "63,0"]
    pretrain(["--model-preset", "grin-16x3.8b", "--num-layers", "2", *shape, "--micro-batch-size", "1",
              "--global-batch-size", "2", "--train-iters", "3", "--mock-data", "--log-interval", "1",
              "--eval-iters", "0", "--log-dir", str(tmp_path)], timeout=600)
    loss = losses(str(tmp_path))
    assert sorted(loss) == [1, 2, 3] and all(math.isfinite(v) for v in loss.values()), loss
    assert 0 < loss[1] < math.log(VOCAB) + 1.5, loss  # random init: about uniform over the (tokenizer's) vocabulary
    run = summary(str(tmp_path))
    assert run["peak_memory_gib"] > 0 and run["tokens_per_second"] > 0, run
