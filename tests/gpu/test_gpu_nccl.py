"""NCCL process groups as the trainer starts them, at world size 1 (and 2 where the machine has two GPUs):
the collectives of the per-step bookkeeping and of the MoE metrics run on device tensors (the second crash
of the first H200 run was a CPU table meeting CUDA router statistics here)."""

import os

import pytest
import torch
from gpu_testing import on_gpu
from grin_testing import run_distributed, tiny_config

pytestmark = pytest.mark.gpu


def _rank(rank, world, port, device_type):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.spec_utils import build_module

    from megatron_grin import compat
    from megatron_grin.model import routing_rng
    from megatron_grin.model.build import transformer_config
    from megatron_grin.model.spec import grin_moe_spec
    from megatron_grin.training import distributed, metrics, trainer

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    compat.apply()
    cfg = tiny_config(hidden_size=64, ffn_hidden_size=64, num_experts=4, moe_aux_loss_coeff=0.01)
    distributed.init_distributed(cfg)
    model_parallel_cuda_manual_seed(1)
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    out = {"backend": dist.get_backend(), "dp_backend": dist.get_backend(ps.get_data_parallel_group())}
    on_device = torch.full((3,), float(rank + 1), device=device)
    out["device_sum"] = metrics.all_reduce(on_device).tolist()
    out["device_sum_device"] = on_device.device.type
    host = metrics.all_reduce(torch.full((2,), float(rank + 1)), torch.distributed.ReduceOp.MAX)
    out["host_max"], out["host_max_device"] = host.tolist(), host.device.type
    local = torch.tensor([2.0 * (rank + 1), 4.0], dtype=torch.float64, device=device)
    step = trainer.reduce_step(local, trainer.ExitSignals(False), None, torch.ones(1, device=device))
    out["loss"], out["stop"] = step.loss, step.stop_reason
    out["memory"] = trainer.reduce_memory(device)
    # a MoE layer's statistics on the device, collected as the trainer does at a log interval
    layer = build_module(grin_moe_spec("grouped_mm"), config=transformer_config(cfg), layer_number=1).to(device)
    layer.set_layer_number(1)
    routing_rng.set_routing_iteration(1)
    x = torch.randn(16, 2, 64, device=device, generator=torch.Generator(device=device).manual_seed(rank))
    layer(x)[0].sum().backward()
    moe = metrics.collect_moe_metrics([layer], cfg, microbatches=1)
    out["routed"] = moe["per_layer"][1]["tokens_per_expert_max"]
    out["idle"] = moe["experts_without_tokens"]
    out["balance"] = moe.get("load_balancing_loss", 0.0)  # megatron's tracker, reduced over the groups
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    return out


def _check(results, device, world):
    for res in results:
        want = "nccl" if on_gpu(device) else "gloo"
        assert res["backend"] == want and res["dp_backend"] == want, res
        assert res["device_sum"] == [sum(range(1, world + 1))] * 3 and res["device_sum_device"] == device.type
        assert res["host_max"] == [float(world)] * 2 and res["host_max_device"] == "cpu"
        assert res["loss"] == pytest.approx(sum(2.0 * (r + 1) for r in range(world)) / (4.0 * world))
        assert res["stop"] is None and len(res["memory"]) == 3
        assert res["routed"] > 0 and res["idle"] >= 0 and res["balance"] > 0


def test_nccl_world_size_1(device):
    _check(run_distributed(_rank, 1, device.type), device, 1)


def test_nccl_world_size_2(device):
    if on_gpu(device) and torch.cuda.device_count() < 2:
        pytest.skip(f"one GPU here ({torch.cuda.get_device_name()}); world size 2 needs two")
    _check(run_distributed(_rank, 2, device.type), device, 2)
