"""One GRIN MoE layer forward+backward on the GPU, with every expert backend, against the CPU in float64.

The reference is the same layer built on the CPU with the GPU layer's weights, in float64. Its router
logits are set to the GPU's values (the gradient still flows through its own gate): a bf16 or TF32 gate
moves logits by ~1e-3, which flips sampled picks of near-tied tokens and would compare different
routings; the logits themselves are checked separately. Everything after the gate (jitter, SparseMixer
picks and weights, dispatch, experts, combine, balance loss, backward) is compared in full.
"""

from unittest import mock

import pytest
import torch
from gpu_testing import rel_err, size
from grin_testing import init_parallel, run_distributed, tiny_config

pytestmark = pytest.mark.gpu

#: name: (expert backend, dtype, training, GrinConfig overrides)
CASES = {
    "grouped_mm-bf16-train": ("grouped_mm", torch.bfloat16, True, {}),
    "grouped_mm-bf16-eval": ("grouped_mm", torch.bfloat16, False, {}),
    "grouped_mm-fp32-train": ("grouped_mm", torch.float32, True, {}),
    "grouped_mm-fp32-train-unfused": ("grouped_mm", torch.float32, True, {
        "moe_router_fusion": False, "moe_permute_fusion": False, "moe_grouped_gemm": False}),
    "sequential-bf16-train": ("sequential", torch.bfloat16, True, {}),
    "sequential-fp32-eval": ("sequential", torch.float32, False, {}),
}


def _config(dtype, device, overrides, **extra):
    from megatron_grin.model.build import transformer_config

    hidden, ffn = size(device, 1024, 48), size(device, 1536, 40)
    cfg = tiny_config(hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=8, num_experts=8,
                      moe_aux_loss_coeff=0.01, bf16=dtype == torch.bfloat16, **overrides)
    return cfg, transformer_config(cfg, **extra)


def _build(backend, tconfig):
    from megatron.core.transformer.spec_utils import build_module

    from megatron_grin.model.spec import grin_moe_spec

    layer = build_module(grin_moe_spec(backend), config=tconfig, layer_number=1)
    layer.set_layer_number(1)
    return layer


def _run(layer, x, grad, training, logits_hook):
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        get_moe_layer_wise_logging_tracker,
    )

    from megatron_grin.model import routing_rng

    get_moe_layer_wise_logging_tracker().clear()  # megatron keeps these on the device of the first run
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    layer.train(training)
    layer.router.counter = routing_rng.MicrobatchCounter()
    routing_rng.set_routing_seed(17)
    routing_rng.set_routing_iteration(4)
    gate = layer.router.gating
    layer.router.gating = lambda h: logits_hook(gate(h))
    xi = x.clone().requires_grad_()
    out, _ = layer(xi)
    out.backward(grad)
    layer.router.gating = gate
    return out.detach(), xi.grad, layer.router.weight.grad


def _case(backend, dtype, training, overrides, device):
    cfg, tconfig = _config(dtype, device, overrides)
    gpu = _build(backend, tconfig).to(device)
    if dtype == torch.bfloat16:
        gpu = gpu.to(dtype)
    with _megatron_on_cpu():
        _, cpu_config = _config(dtype, device, overrides, use_cpu_initialization=True, params_dtype=torch.float32,
                                bf16=False)
        ref = _build(backend, cpu_config)
    ref.load_state_dict({k: v.double() if torch.is_tensor(v) else v for k, v in gpu.state_dict().items()})
    ref = ref.double()
    seq, batch = size(device, 1024, 12), 2
    g = torch.Generator(device=device).manual_seed(7)
    x = torch.randn(seq, batch, cfg.hidden_size, generator=g, device=device).to(dtype)
    grad = torch.randn(seq, batch, cfg.hidden_size, generator=g, device=device).to(dtype)
    seen = {}

    def record(logits):
        seen["gpu"] = logits.detach()
        return logits

    def force(logits):  # the reference's own logits, shifted to the GPU's values (gradient unchanged)
        seen["ref"] = logits.detach()
        return logits + (seen["gpu"].to(logits) - logits).detach()

    out = _run(gpu, x, grad, training, record)
    with _megatron_on_cpu():
        want = _run(ref, x.double().cpu(), grad.double().cpu(), training, force)
    return {"devices": sorted({t.device.type for t in out}), "dtype": out[0].dtype,
            "logits": rel_err(seen["gpu"], seen["ref"]),
            "errors": [rel_err(a, b) for a, b in zip(out, want)]}


def _megatron_on_cpu():
    """megatron-core puts router buffers on torch.cuda.current_device() and its gating moves CPU router
    weights there: for the CPU reference inside a CUDA process, "current device" must be the CPU."""
    return mock.patch.object(torch.cuda, "current_device", lambda: "cpu")


def _rank(rank, world, port, device_name):
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 cases compare IEEE fp32 against float64
    init_parallel(rank, world, port)
    out = {}
    for name, case in CASES.items():
        try:
            out[name] = _case(*case, device)
        except Exception as err:  # noqa: BLE001 - reported per case
            out[name] = {"error": f"{type(err).__name__}: {err}"}
    return out


@pytest.fixture(scope="module")
def results(device):
    return run_distributed(_rank, 1, str(device))[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_moe_layer_matches_float64_on_cpu(results, device, case):
    res = results[case]
    assert "error" not in res, res.get("error")
    dtype = CASES[case][1]
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert res["devices"] == [device.type] and res["dtype"] == dtype
    assert res["logits"] < (1e-2 if dtype == torch.bfloat16 else 1e-5), res
    out_err, dx_err, router_err = res["errors"]
    assert out_err < tol and dx_err < tol and router_err < 2 * tol, res
