"""Each CPU accommodation for megatron-core: needed (fails without) and effective (works with)."""

import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_grin import compat


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "ignore", "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)


def test_apply_selects_by_version_and_device():
    names = lambda version, cuda: {a.name for a in compat.select(version, cuda)}  # noqa: E731
    assert names((0, 16, 1), cuda=False) == {a.name for a in compat.ACCOMMODATIONS}
    assert names((0, 16, 1), cuda=True) == {"te_general_gemm", "process_memory_without_psutil",
                                             "distopt_torch_adam_state"}
    assert names((0, 17, 0), cuda=False) == set()


def test_without_accommodations_megatron_fails_on_cpu():
    """Proves the accommodations are needed: the plain 0.16.1 CPU path raises where we patch."""
    result = _run("""
        import torch
        from megatron.core.transformer.utils import get_default_causal_mask
        get_default_causal_mask(4)
    """)
    assert result.returncode != 0 and "CUDA" in result.stderr


@pytest.fixture(scope="module", autouse=True)
def applied():
    return compat.apply()


def test_te_general_gemm_name_exists(applied):
    from megatron.core.transformer.moe import moe_utils

    assert "te_general_gemm" in applied and hasattr(moe_utils, "te_general_gemm")
    x, w = torch.randn(3, 4), torch.randn(2, 4)
    torch.testing.assert_close(moe_utils.router_gating_linear(x, w, None, torch.float32), x @ w.T)


def test_current_device_is_cpu():
    assert torch.cuda.current_device() == "cpu"


def test_schedule_scratch_tensors_on_cpu():
    from megatron.core.pipeline_parallel import schedules

    assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    assert schedules.torch.float32 is torch.float32  # everything else forwards to torch


def test_attention_masks_on_cpu():
    from megatron.core.transformer.utils import get_default_causal_mask, get_sliding_window_causal_mask

    assert torch.equal(get_default_causal_mask(3), torch.triu(torch.ones(3, 3), 1).bool())
    assert get_sliding_window_causal_mask(4, 4, (1, 0)).device.type == "cpu"


def test_p2p_synchronize_is_noop():
    from megatron.core.pipeline_parallel import p2p_communication

    p2p_communication.torch.cuda.synchronize()
    assert p2p_communication.torch.empty(3, device=torch.cuda.current_device()).device.type == "cpu"


def test_rng_tracker_forks_cpu_generator():
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.CudaRNGStatesTracker()
    tracker.add("model-parallel-rng", 7)
    with tracker.fork("model-parallel-rng"):
        a = torch.rand(3)
    outside = torch.rand(3)
    again = mrandom.CudaRNGStatesTracker()
    again.add("model-parallel-rng", 7)
    with again.fork("model-parallel-rng"):
        b = torch.rand(3)
    assert torch.equal(a, b) and not torch.equal(a, outside)
    state = mrandom._get_cuda_rng_state()  # what activation checkpointing saves and restores
    x = torch.rand(2)
    mrandom._set_cuda_rng_state(state)
    assert torch.equal(torch.rand(2), x)
