"""CPU proxies for the GPU's device rules: tensors made where their inputs live, no hidden host syncs.

The first H200 run (shared/notes/h200-2026-12-04.md) crashed twice on one class of bug that a CPU-only
suite cannot see: a tensor made without ``device=`` (so on the CPU) meeting a CUDA tensor.
  1. ``routing_rng.philox4x32`` turned its Python-int counters into CPU tensors that met CUDA token ids;
  2. ``metrics.collect_moe_metrics`` added the routers' CUDA statistics into a CPU float64 table.

Two proxies run here on a CPU-only torch:
* ``FakeTensorMode`` with ``device="cuda"`` tensors: real CUDA device objects and torch's own device
  checks, but no data, no autograd leaves (a CUDA tensor that needs grad aborts a CPU-only torch), no
  CUDA generators and no data-dependent ops; used for the routing randomness, which needs none of those.
* ``tests/simulated_device.py``: real CPU values in tensors that report another device, so the router,
  the MoE layer (every expert backend, forward and backward), a whole 2-layer GRIN model with its
  attention and loss, the metrics collection and the trainer's per-step bookkeeping run end to end, and
  must give the CPU's numbers; a CPU tensor meeting a device tensor raises CUDA's error, and every
  host sync is recorded with the megatron_grin line that caused it. It cannot run branches taken only on
  ``device.type == "cuda"`` (Triton kernels, torch grouped_mm): the GPU tier (tests/gpu/) covers those.

Checked against the code of commit 8b7e3aa (before the fixes), in a scratch copy of the tree:
* philox4x32 with CPU counters (8b7e3aa): test_fake_cuda_routing_randomness fails with
  FakeTensorDeviceMismatchError, test_router_and_moe_layer_on_device fails with DeviceMismatch at the
  XOR of routing_rng.philox4x32; both pass with the counters made on the token ids' device;
* collect_moe_metrics with a CPU table (8b7e3aa): test_metrics_on_device fails with DeviceMismatch at
  ``table[...] += router.stats.as_tensor()``; passes with the table on the stats' device;
* _local_loss_sums with one ``.cpu()`` per micro-batch (8b7e3aa): test_step_bookkeeping_on_device fails
  (2 host syncs for 2 micro-batches); passes with one sync per step.
"""

from __future__ import annotations

import pytest
import torch
from grin_testing import init_parallel, run_distributed, tiny_config
from simulated_device import SIM, DeviceMismatch, SimulatedDevice

HIDDEN, SEQ, BATCH = 48, 12, 2


# --- the proxies can fail: the two crashes' patterns ------------------------------------------------------
def _old_philox_counters(c0, c1, c2, c3):
    """8b7e3aa's philox4x32 preamble: Python-int counters become CPU tensors."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & 0xFFFFFFFF for c in (c0, c1, c2, c3))
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    return ((c2 * 0xCD9E8D57) >> 32) ^ c1  # the line that crashed on the H200


def test_proxies_catch_the_h200_crash_patterns():
    from torch._subclasses.fake_tensor import (
        FakeTensorDeviceMismatchError,
        FakeTensorMode,
    )

    with FakeTensorMode(), pytest.raises(FakeTensorDeviceMismatchError):
        _old_philox_counters(torch.arange(8, device="cuda").view(-1, 1), torch.arange(3, device="cuda"), 5, 0)
    with SimulatedDevice() as sim:
        ids = sim.to_device(torch.arange(8))
        with pytest.raises(DeviceMismatch, match="same device"):
            _old_philox_counters(ids.view(-1, 1), sim.to_device(torch.arange(3)), 5, 0)
        stats = sim.to_device(torch.ones(7, dtype=torch.float64))
        table = torch.zeros(2, 7, dtype=torch.float64)  # 8b7e3aa's collect_moe_metrics table
        with pytest.raises(DeviceMismatch, match="same device"):
            table[0] += stats
        scalar = torch.tensor(2.0)  # CUDA takes CPU scalars in elementwise ops: so does the proxy
        assert sim.on_device(stats * scalar)
        assert not sim.syncs
        stats.sum().item()
        torch.bincount(sim.to_device(torch.tensor([0, 2, 2])))  # its CUDA kernel reads the max on the host
        assert [s.op for s in sim.syncs] == ["aten._local_scalar_dense.default", "aten.bincount.default"]


def test_fake_cuda_routing_randomness():
    """The Philox counters for CUDA token ids are made on CUDA (crash 1 of the note, FakeTensorMode).

    Only up to the Philox words: on a CPU-only torch, FakeTensorMode fails slicing a fake CUDA tensor
    ("not linked with support for cuda devices"), so routing_uniforms runs on the simulated device below.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from megatron_grin.model import routing_rng

    with FakeTensorMode():
        ids = routing_rng.global_token_ids(SEQ, BATCH, seq_rank=1, seq_shards=2, sample_offset=4,
                                           device=torch.device("cuda"))
        lanes = torch.arange(4, device=ids.device).view(1, 2, 2)
        words = routing_rng.philox4x32(ids.view(-1, 1, 1), lanes, 2 * 4, 1, 3, 7)
    assert ids.device.type == "cuda" and ids.shape == (SEQ * BATCH,)
    assert all(w.device.type == "cuda" and w.shape == (SEQ * BATCH, 2, 2) for w in words)


# --- the package on the simulated device (one spawned rank runs every case) ------------------------------
def _layer(backend: str, cfg_overrides: dict):
    from megatron.core.transformer.spec_utils import build_module

    from megatron_grin.model.build import transformer_config
    from megatron_grin.model.spec import grin_moe_spec

    torch.manual_seed(0)
    layer = build_module(grin_moe_spec(backend), config=transformer_config(tiny_config(**cfg_overrides)),
                         layer_number=1)
    layer.set_layer_number(1)
    return layer


def _fwd_bwd(layer, x, grad, training: bool, to_device=None):
    """One MoE layer forward/backward; returns (out, dx, router dW) on the host, and the devices seen."""
    from megatron_grin.model import routing_rng

    move = to_device or torch.clone
    layer.train(training)
    layer.router.counter = routing_rng.MicrobatchCounter()
    routing_rng.set_routing_seed(11)
    routing_rng.set_routing_iteration(5)
    xi = move(x).requires_grad_()
    out, _ = layer(xi)
    out.backward(move(grad))
    devices = {t.device.type for t in (out, xi.grad, layer.router.weight.grad)}
    return (out.detach(), xi.grad, layer.router.weight.grad.clone()), devices


def _moe_case(backend: str, training: bool, cfg_overrides: dict) -> dict:
    """The layer on the CPU and on the simulated device: same numbers, device outputs, host syncs."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    g = torch.Generator().manual_seed(1)
    x, grad = torch.randn(SEQ, BATCH, HIDDEN, generator=g), torch.randn(SEQ, BATCH, HIDDEN, generator=g)
    res: dict = {"error": None}
    try:
        ref, _ = _fwd_bwd(_layer(backend, cfg_overrides), x, grad, training)
        clear_aux_losses_tracker()
        res["ref_metrics"] = _layer_stats(_layer(backend, cfg_overrides), x, grad, training)
        clear_aux_losses_tracker()
        layer = _layer(backend, cfg_overrides)
    except Exception as err:  # noqa: BLE001 - broken on the CPU too: not a device problem, but say so
        res["error"] = f"the CPU reference run failed: {type(err).__name__}: {err}"
        return res
    with SimulatedDevice() as sim:
        try:
            layer.to(sim.to_device(x).device)
            got, devices = _fwd_bwd(layer, x, grad, training, sim.to_device)
            res["devices"] = devices
            res["max_err"] = max((sim.to_host(a) - b).abs().max().item() for a, b in zip(got, ref))
            res["grin_syncs"] = [str(s) for s in sim.grin_syncs() if not _cpu_path_read(s)]
            res["megatron_syncs"] = sorted({str(s) for s in sim.syncs if s.owner == "megatron"})
        except Exception as err:  # noqa: BLE001 - reported to the test
            res["error"] = f"{type(err).__name__}: {err}"
            return res
        try:
            res["metrics"] = _collect(layer, sim, cfg_overrides)
        except Exception as err:  # noqa: BLE001 - reported to the test
            res["metrics_error"] = f"{type(err).__name__}: {err}"
    return res


def _layer_stats(layer, x, grad, training: bool) -> dict:
    """collect_moe_metrics after one CPU forward/backward (the reference for the device run)."""
    _fwd_bwd(layer, x, grad, training)
    return _collect(layer, None, {})


def _collect(layer, sim, cfg_overrides: dict) -> dict:
    from megatron_grin.training.metrics import collect_moe_metrics

    before = len(sim.syncs) if sim else 0
    out = collect_moe_metrics([layer], tiny_config(**cfg_overrides), microbatches=1)
    if sim is not None:
        out["_host_syncs"] = len(sim.syncs) - before
    return out


def _bookkeeping() -> dict:
    """The trainer's per-step reductions on device losses from two micro-batches."""
    from megatron_grin.training import trainer

    res: dict = {"error": None}
    with SimulatedDevice() as sim:
        try:
            losses = [{"lm loss": sim.to_device(torch.tensor([6.0, 3.0], dtype=torch.float64))},
                      {"lm loss": sim.to_device(torch.tensor([2.0, 5.0], dtype=torch.float64))}]
            device = losses[0]["lm loss"].device
            local = trainer._local_loss_sums(losses, device)
            res["local_on_device"] = sim.on_device(local)
            res["syncs_local"] = len(sim.syncs)
            scale = sim.to_device(torch.tensor([1.0]))
            step = trainer.reduce_step(local, trainer.ExitSignals(False), deadline=None, loss_scale=scale)
            res["loss"], res["stop"], res["loss_scale"] = step.loss, step.stop_reason, step.loss_scale
            res["syncs_step"] = len(sim.syncs)
            res["empty_on_device"] = sim.on_device(trainer._local_loss_sums([], device))
            res["memory"] = trainer.reduce_memory(device)
        except Exception as err:  # noqa: BLE001 - reported to the test
            res["error"] = f"{type(err).__name__}: {err}"
    return res


#: host reads on paths that a CUDA device does not take (the simulated device is not CUDA): (file, function)
CPU_PATH_READS = {
    # the CPU expert loop slices rows per expert on the host; CUDA takes the grouped path, whose device
    # flow test_grouped_expert_path_on_device checks
    ("megatron_grin/ops/grouped_mlp.py", "grouped_swiglu_mlp"),
}


def _cpu_path_read(sync) -> bool:
    path, _, func = sync.grin_line.partition(" in ")
    return (path.rsplit(":", 1)[0], func) in CPU_PATH_READS


def _grouped_path() -> dict:
    """The grouped expert path (CUDA's, here through torch's grouped_mm on the CPU) with device counts."""
    from megatron_grin.ops.grouped_mlp import grouped_swiglu_mlp

    g = torch.Generator().manual_seed(2)
    counts = torch.tensor([3, 0, 7, 5, 1])
    x, probs = torch.randn(16, HIDDEN, generator=g), torch.rand(16, generator=g)
    fc1, fc2 = torch.randn(5, 80, HIDDEN, generator=g) * 0.1, torch.randn(5, HIDDEN, 40, generator=g) * 0.1
    dy = torch.randn(16, HIDDEN, generator=g)

    def run(move, **kw):
        leaves = [move(t).requires_grad_() for t in (x, probs, fc1, fc2)]
        out = grouped_swiglu_mlp(leaves[0], leaves[2], leaves[3], move(counts), leaves[1], **kw)
        out.backward(move(dy))
        return [out.detach()] + [t.grad for t in leaves]

    res: dict = {"error": None}
    try:
        ref = run(torch.clone, gemm="loop")
        with SimulatedDevice() as sim:
            got = run(sim.to_device, gemm="grouped_mm", swiglu="torch")
            res["on_device"] = all(sim.on_device(t) for t in got)
            res["max_err"] = max((sim.to_host(a) - b).abs().max().item() for a, b in zip(got, ref))
            res["syncs"] = [str(s) for s in sim.syncs]
    except Exception as err:  # noqa: BLE001 - reported to the test
        res["error"] = f"{type(err).__name__}: {err}"
    return res


def _model(window) -> dict:
    """A whole 2-layer GRIN GPTModel (embedding, RoPE, attention, MoE, LM head, loss) fwd+bwd on the device.

    megatron-core places buffers on ``torch.cuda.current_device()`` (compat points it at the CPU here):
    as on a GPU machine, it must name the device, so it names the simulated one while the model is built
    and run.
    """
    from unittest import mock

    from megatron_grin.model import routing_rng
    from megatron_grin.model.build import build_model

    cfg = tiny_config(num_layers=2, sliding_window=window, moe_aux_loss_coeff=0.01)
    g = torch.Generator().manual_seed(3)
    tokens, labels = (torch.randint(0, cfg.vocab_size, (BATCH, 16), generator=g) for _ in range(2))
    positions = torch.arange(16).unsqueeze(0).expand(BATCH, -1)

    def run(model, move):
        routing_rng.set_routing_iteration(3)
        for module in model.modules():
            if isinstance(getattr(module, "counter", None), routing_rng.MicrobatchCounter):
                module.counter = routing_rng.MicrobatchCounter()
        loss = model(move(tokens), move(positions), None, labels=move(labels))
        loss.float().sum().backward()
        return loss.detach(), [p.grad for p in model.parameters() if p.grad is not None]

    res: dict = {"error": None}
    try:
        torch.manual_seed(0)
        ref, ref_grads = run(build_model(cfg), torch.clone)
        with SimulatedDevice() as sim, mock.patch.object(torch.cuda, "current_device", lambda: SIM):
            torch.manual_seed(0)
            got, grads = run(build_model(cfg).to(SIM), sim.to_device)
            res["on_device"] = sim.on_device(got) and len(grads) == len(ref_grads) and all(map(sim.on_device, grads))
            res["max_err"] = max([(sim.to_host(got) - ref).abs().max().item()] +
                                 [(sim.to_host(a) - b).abs().max().item() for a, b in zip(grads, ref_grads)])
            res["grin_syncs"] = [str(s) for s in sim.grin_syncs() if not _cpu_path_read(s)]
            res["megatron_syncs"] = sorted({str(s) for s in sim.syncs if s.owner == "megatron"})
    except Exception as err:  # noqa: BLE001 - reported to the test
        res["error"] = f"{type(err).__name__}: {err}"
    return res


CASES = {  # name: (expert backend, training, config overrides)
    "sequential-train": ("sequential", True, {"moe_aux_loss_coeff": 0.01}),
    "grouped_mm-train": ("grouped_mm", True, {"moe_aux_loss_coeff": 0.01}),
    "grouped_mm-eval": ("grouped_mm", False, {}),
    "grouped_mm-train-v2star-nojitter": ("grouped_mm", True, {"input_jitter_eps": 0.0,
                                                              "router_variant": "sparsemixer_v2_star"}),
}


def _simulated_rank(rank, world, port):
    init_parallel(rank, world, port)
    out = {name: _moe_case(*case) for name, case in CASES.items()}
    out["bookkeeping"] = _bookkeeping()
    out["grouped_path"] = _grouped_path()
    out["model"] = {window: _model(window) for window in (None, 5)}
    return out


@pytest.fixture(scope="module")
def simulated():
    return run_distributed(_simulated_rank, 1)[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_router_and_moe_layer_on_device(simulated, case):
    """Router (jitter, routing, stats, balance loss) and MoE layer fwd+bwd stay on the device, same numbers."""
    res = simulated[case]
    assert res["error"] is None, res["error"]
    assert res["devices"] == {"meta"}, res["devices"]  # output, input grad and router grad on the device
    assert res["max_err"] < 1e-6, res["max_err"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_host_sync_from_our_code_in_moe_forward_backward(simulated, case):
    """The hot path holds no .item()/.tolist()/.cpu()/bincount/nonzero of ours (megatron's own are listed)."""
    res = simulated[case]
    assert res["error"] is None, res["error"]
    assert res["grin_syncs"] == [], "host syncs in megatron_grin's MoE forward/backward:\n" + "\n".join(
        res["grin_syncs"]) + "\n(megatron's own: " + "; ".join(res["megatron_syncs"]) + ")"


def test_grouped_expert_path_on_device(simulated):
    """The grouped experts (what CUDA runs) take device counts and never read them on the host."""
    res = simulated["grouped_path"]
    assert res["error"] is None, res["error"]
    assert res["on_device"] and res["max_err"] < 1e-5, res
    assert res["syncs"] == [], res["syncs"]


@pytest.mark.parametrize("case", ["sequential-train", "grouped_mm-eval"])
def test_metrics_on_device(simulated, case):
    """collect_moe_metrics reduces device statistics (crash 2 of the note) with one host copy."""
    res = simulated[case]
    assert res["error"] is None, res["error"]
    assert "metrics_error" not in res, res["metrics_error"]
    got, ref = res["metrics"], res["ref_metrics"]
    assert got.pop("_host_syncs") <= 2  # the table, and the balance-loss tracker when it is on
    assert got.keys() == ref.keys()
    for key, value in ref.items():
        if key != "per_layer":
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert got["per_layer"][1]["tokens_per_expert_max"] > 0  # the device statistics were counted


@pytest.mark.parametrize("window", [None, 5])
def test_whole_model_forward_backward_on_device(simulated, window):
    """Embedding, RoPE, attention (full, and a window shorter than the sequence), MoE layers, LM head and
    loss on the device: no CPU tensor meets a device tensor, same numbers as on the CPU, no host sync of ours."""
    res = simulated["model"][window]
    assert res["error"] is None, res["error"]
    assert res["on_device"] and res["max_err"] < 1e-5, res
    assert res["grin_syncs"] == [], "\n".join(res["grin_syncs"]) + "\nmegatron's: " + "; ".join(res["megatron_syncs"])


def test_step_bookkeeping_on_device(simulated):
    """The trainer's per-step loss sums stay on the device; the step reads the host once."""
    res = simulated["bookkeeping"]
    assert res["error"] is None, res["error"]
    assert res["local_on_device"] and res["empty_on_device"]
    assert res["syncs_local"] == 0, "no host sync while summing the micro-batch losses"
    assert res["syncs_step"] == 1, "one device->host copy per step (loss, stop flags, loss scale)"
    assert res["loss"] == pytest.approx(8.0 / 8.0) and res["stop"] is None and res["loss_scale"] == 1.0
    assert len(res["memory"]) == 3 and res["memory"][1] > 0
