"""Each CPU accommodation for megatron-core: needed (fails without) and effective (works with)."""

import inspect
import subprocess
import sys
import textwrap

import pytest
import torch

from gemm_probe import GemmDtypes, bf16, no_bf16_gemm_cpu
from grin_testing import init_parallel, run_distributed, tiny_config
from megatron_grin import compat


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "ignore", "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)


def test_apply_selects_by_version_and_device():
    names = lambda version, cuda: {a.name for a in compat.select(version, cuda) if not a.security}  # noqa: E731
    assert names((0, 16, 1), cuda=False) == {a.name for a in compat.ACCOMMODATIONS if not a.security}
    assert names((0, 16, 1), cuda=True) == {"te_general_gemm", "process_memory_without_psutil",
                                             "distopt_torch_adam_state", "gpt_dataset_loss_mask_cache",
                                             "quiet_unknown_mlp_type"}
    assert names((0, 17, 0), cuda=False) == set()  # the security ones are always selected: test_compat_safe_load.py


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


def test_gpt_dataset_loss_masks_do_not_depend_on_the_first_sample_read():
    """0.16.1 zeroes the first sample's pad labels inside its cached loss mask, so every later mask depended
    on where a run started (a resumed run masked other tokens). Fails without the accommodation."""
    from megatron_grin.training import data
    from megatron_grin.training.tokenizer import build_tokenizer

    def masks(first: int) -> list:
        train, _, _ = data.build_datasets(None, "1,0,0", 64, 5, 64, 0, 0, build_tokenizer("byte"), mock=True,
                                          create_attention_mask=False)
        return [train[i]["loss_mask"].clone() for i in range(first, 20)]

    from_start, resumed = masks(0)[10:], masks(10)
    assert all(torch.equal(a, b) for a, b in zip(from_start, resumed))
    assert any(not bool(m.all()) for m in from_start)  # some samples do mask pad labels


# --- bf16 GEMMs on CPUs without a native bf16 kernel (ops/cpu_gemm.py; accommodation "bf16_gemm_in_fp32") ----------
def test_megatron_linear_and_attention_use_the_fp32_route():
    """On an emulated CPU without a bf16 GEMM (oneDNN off), megatron's linear and unfused attention send only fp32
    GEMMs to aten; megatron's own linear sends bf16 ones (the slow kernel). Same maths as a bf16 GEMM."""
    from megatron.core.tensor_parallel import layers
    from megatron.core.transformer import dot_product_attention

    linear = layers.linear_with_grad_accumulation_and_async_allreduce
    assert "bf16_gemm_in_fp32" in compat.applied() and linear.fp32_on_reference_gemm
    x, w, b = bf16(6, 2, 8, seed=7), bf16(16, 8, seed=8), bf16(16, seed=9)
    g = bf16(6, 2, 16, seed=10)
    results = {}
    for name, fn in (("patched", linear), ("megatron", linear.__wrapped__)):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
        with no_bf16_gemm_cpu(), GemmDtypes() as seen:
            out = fn(xi, wi, bi, False, False, False)
            out.backward(g)
        results[name] = seen.dtypes, out, xi.grad, wi.grad, bi.grad
    dtypes, out, gx, gw, _ = results["patched"]
    assert dtypes == {torch.float32}
    assert results["megatron"][0] == {torch.bfloat16}
    assert out.dtype == gx.dtype == gw.dtype == torch.bfloat16
    torch.testing.assert_close(out, (x.float() @ w.float().T + b.float()).bfloat16(), rtol=0, atol=0)
    for got, want in zip(results["patched"][1:], results["megatron"][1:]):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    with no_bf16_gemm_cpu(), GemmDtypes() as seen:
        dot_product_attention.torch.baddbmm(torch.empty(2, 4, 3, dtype=torch.bfloat16), bf16(2, 4, 5),
                                            bf16(2, 5, 3), beta=0.0, alpha=0.5)
    assert seen.dtypes == {torch.float32}
    with GemmDtypes() as seen:  # fp32 is untouched
        linear(x.float(), w.float(), None, False, False, False)
    assert seen.dtypes == {torch.float32}


def _bf16_model_step(rank, world, port):
    from megatron.core.transformer.module import Float16Module

    from megatron_grin.model.build import build_model, transformer_config
    from megatron_grin.ops.cpu_gemm import native_bf16_gemm

    init_parallel(rank, world, port)
    cfg = tiny_config(num_layers=2, bf16=True)
    model = Float16Module(transformer_config(cfg), build_model(cfg)).train()
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).unsqueeze(0).expand(2, 16)
    losses, dtypes = [], []
    for emulate in (True, False):
        model.zero_grad()
        with torch.backends.mkldnn.flags(enabled=not emulate), GemmDtypes() as seen:
            loss = model(tokens, pos, None, labels=tokens).float().mean()
            loss.backward()
        losses.append(loss.item())
        dtypes.append(seen.dtypes)
    return losses, dtypes, native_bf16_gemm()


def test_bf16_model_step_has_no_bf16_gemm_without_the_kernel():
    """The whole bf16 model (embedding, attention, experts, output layer) runs only fp32 GEMMs on a CPU without a
    bf16 GEMM; with the kernel it keeps bf16 GEMMs. The loss agrees with the native run to bf16 precision."""
    losses, dtypes, native = run_distributed(_bf16_model_step, 1)[0]
    assert dtypes[0] == {torch.float32}, dtypes
    assert torch.bfloat16 in dtypes[1] if native else dtypes[1] == {torch.float32}
    assert losses[0] == pytest.approx(losses[1], rel=1e-2)


def test_unknown_mlp_type_warning_is_filtered_narrowly(caplog):
    """TransformerLayer's "Unknown MLP type" line (logged for every MoELayer subclass) is dropped; others pass."""
    import logging

    logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Unknown MLP type: <class 'GrinMoELayer'>")
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def test_meta_build_points_megatron_allocations_at_meta():
    """Without the accommodation megatron's explicit current_device() placement would allocate real storage."""
    assert torch.cuda.current_device is not None
    original = torch.cuda.current_device
    with compat.megatron_allocates_on_meta():
        assert torch.cuda.current_device() == "meta"
        assert torch.empty(3, device=torch.cuda.current_device()).is_meta
    assert torch.cuda.current_device is original


def test_fully_parallel_load_needs_cuda_in_megatron_0_16(monkeypatch, tmp_path):
    """megatron-core 0.16's fully parallel load exchanges shards with .cuda(): on this CPU machine it cannot run,
    and compat says so (the trainer then loads as by default, and logs it)."""
    from megatron.core.dist_checkpointing import exchange_utils

    assert "cuda()" in inspect.getsource(exchange_utils.exchange_loaded_tensors_broadcast)
    assert compat.fully_parallel_load_runs() == torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert compat.fully_parallel_load_runs()
