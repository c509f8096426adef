"""The trainer's CPU accommodations in compat.py: each is needed (megatron fails without it) and effective.

Each side runs in a fresh interpreter (the accommodations patch modules process-wide): one with only
the model/schedule accommodations, one with all of them. Every scenario is a real megatron-core call
on a one-rank gloo group: building optimizers, clipping, saving with dist_checkpointing, and the
distributed optimizer's state handling.
"""

import json
import subprocess
import sys
import textwrap

import pytest

TRAINER_ACCOMMODATIONS = ("optimizer_cuda_tensors", "cuda_tensor_type_checks", "dist_ckpt_cuda",
                          "process_memory_without_psutil", "distopt_torch_adam_state")

SCRIPT = textwrap.dedent('''
    import json, os, sys, tempfile, traceback
    import torch
    import torch.distributed as dist
    from megatron_grin import compat

    TRAINER = json.loads(sys.argv[1])
    PHASES = [  # accommodations added before each phase runs every scenario
        ("model_only", []),
        ("cpu_tensors", ["optimizer_cuda_tensors", "dist_ckpt_cuda", "process_memory_without_psutil"]),
        ("type_checks", ["cuda_tensor_type_checks"]),
        ("all", ["distopt_torch_adam_state"]),
    ]
    assert sorted(n for _, names in PHASES for n in names) == sorted(TRAINER)
    available = {acc.name: acc for acc in compat.select(compat.mcore_version(), torch.cuda.is_available())}
    for name, acc in available.items():
        if name not in TRAINER:
            acc.apply()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    from megatron.core import parallel_state, dist_checkpointing
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron_grin.config import preset
    from megatron_grin.model.build import build_model

    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)
    SCENARIOS = {}

    def scenario(name):
        def wrap(fn):
            SCENARIOS[name] = fn
            return fn
        return wrap

    def optimizer(distributed=False, bf16=False, clip=1.0):
        torch.manual_seed(0)
        cfg = preset("test", bf16=bf16)
        model = build_model(cfg)
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=distributed), model)
        opt = get_megatron_optimizer(OptimizerConfig(
            lr=1e-3, min_lr=1e-4, clip_grad=clip, bf16=bf16, use_distributed_optimizer=distributed,
            params_dtype=torch.bfloat16 if bf16 else torch.float32), [ddp])
        return ddp, opt

    def step(ddp, opt):
        ddp.zero_grad_buffer(); opt.zero_grad()
        tokens = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(1))
        out = ddp(tokens[:, :-1], torch.arange(16).expand(2, 16), None, labels=tokens[:, 1:])
        out.float().mean().backward()
        ddp.finish_grad_sync()
        return opt.step()

    @scenario("fp32_optimizer")
    def _():
        ddp, opt = optimizer()
        return bool(step(ddp, opt)[0])

    @scenario("distributed_optimizer")
    def _():
        ddp, opt = optimizer(distributed=True)
        return bool(step(ddp, opt)[0])

    @scenario("bf16_optimizer")
    def _():
        ddp, opt = optimizer(bf16=True)
        return bool(step(ddp, opt)[0])

    @scenario("clip_grad")
    def _():
        ddp, opt = optimizer(clip=1e-6)  # always clips
        ok, norm, _ = step(ddp, opt)
        return [bool(ok), float(norm), torch.zeros(2).type()]  # Tensor.type is back to normal afterwards

    @scenario("dist_ckpt_save")
    def _():
        from megatron.core.dist_checkpointing.mapping import ShardedTensor
        path = tempfile.mkdtemp()
        t = torch.arange(6.0)
        dist_checkpointing.save({"t": ShardedTensor.from_rank_offsets("t", t)}, path)
        back = dist_checkpointing.load({"t": ShardedTensor.from_rank_offsets("t", torch.empty(6))}, path)
        return bool(torch.equal(back["t"], t))

    @scenario("process_memory")
    def _():
        from megatron.core.dist_checkpointing.strategies import filesystem_async
        return filesystem_async._process_memory() > 0

    @scenario("distopt_fresh_state_dict")
    def _():
        ddp, opt = optimizer(distributed=True)
        return sorted(opt.state_dict())

    @scenario("distopt_reshardable_round_trip")
    def _():
        meta = {"distrib_optim_sharding_type": "fully_reshardable",
                "distrib_optim_fully_reshardable_mem_efficient": True, "chained_optim_avoid_prefix": True}
        ddp, opt = optimizer(distributed=True)
        step(ddp, opt); step(ddp, opt)
        path = tempfile.mkdtemp()
        sd = {"model": ddp.module.sharded_state_dict(metadata=dict(meta))}
        sd["optimizer"] = opt.sharded_state_dict(sd, metadata=dict(meta))
        dist_checkpointing.save(sd, path)
        inner = opt.chained_optimizers[0].optimizer
        before = {k: v.clone() for k, v in inner.state[inner.param_groups[0]["params"][0]].items()}
        ddp2, opt2 = optimizer(distributed=True)
        sd2 = {"model": ddp2.module.sharded_state_dict(metadata=dict(meta))}
        sd2["optimizer"] = opt2.sharded_state_dict(sd2, is_loading=True, metadata=dict(meta))
        loaded = dist_checkpointing.load(sd2, path)
        ddp2.module.load_state_dict(loaded["model"])
        opt2.load_state_dict(loaded["optimizer"])
        inner2 = opt2.chained_optimizers[0].optimizer
        after = inner2.state[inner2.param_groups[0]["params"][0]]
        steps = [st["step"] for st in inner2.state.values()]
        return {"equal": all(torch.equal(before[k], after[k]) for k in before),
                "distinct_step_tensors": len({id(s) for s in steps}), "params": len(steps)}

    @scenario("distopt_step_after_reload")
    def _():
        ddp, opt = optimizer(distributed=True)
        step(ddp, opt)
        opt.load_state_dict(opt.state_dict())  # what a resume does, minus the files
        step(ddp, opt)
        inner = opt.chained_optimizers[0].optimizer
        return sorted({float(st["step"]) for st in inner.state.values()})

    results = {}
    for phase, names in PHASES:
        for name in names:
            if name in available:
                available[name].apply()
        results[phase] = {}
        for name, fn in SCENARIOS.items():
            try:
                results[phase][name] = {"ok": True, "value": fn()}
            except BaseException as err:
                results[phase][name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:300]}
    print("RESULTS " + json.dumps(results))
''')

@pytest.fixture(scope="module")
def phases() -> dict:
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", SCRIPT, json.dumps(list(TRAINER_ACCOMMODATIONS))],
                          capture_output=True, text=True, timeout=900,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")), None)
    assert line, f"script failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(line[len("RESULTS "):])


def test_the_trainer_accommodations_are_registered():
    from megatron_grin import compat

    names = {acc.name for acc in compat.ACCOMMODATIONS}
    assert set(TRAINER_ACCOMMODATIONS) <= names


def test_optimizer_cuda_tensors_needed(phases):
    without = phases["model_only"]
    for name in ("fp32_optimizer", "distributed_optimizer", "bf16_optimizer"):
        assert not without[name]["ok"] and "CUDA" in without[name]["error"], without[name]


def test_dist_ckpt_cuda_needed_and_effective(phases):
    assert not phases["model_only"]["dist_ckpt_save"]["ok"]
    assert "CUDA" in phases["model_only"]["dist_ckpt_save"]["error"]
    assert phases["cpu_tensors"]["dist_ckpt_save"] == {"ok": True, "value": True}


def test_process_memory_without_psutil(phases):
    try:
        import psutil  # noqa: F401
    except ImportError:
        assert "psutil is not installed" in phases["model_only"]["process_memory"]["error"]
    assert phases["cpu_tensors"]["process_memory"] == {"ok": True, "value": True}


def test_cuda_tensor_type_checks_needed(phases):
    """With CPU scalars but without the type accommodation, megatron rejects CPU parameters."""
    got = phases["cpu_tensors"]
    for name in ("distributed_optimizer", "bf16_optimizer"):
        assert "Wrapped parameters must be one of" in got[name]["error"], got[name]
    for name in ("fp32_optimizer", "clip_grad"):  # clipping asserts param.grad.type() is a CUDA type
        assert not got[name]["ok"] and "AssertionError" in got[name]["error"], got[name]


def test_optimizers_build_step_and_clip_on_cpu(phases):
    got = phases["type_checks"]
    for name in ("fp32_optimizer", "distributed_optimizer", "bf16_optimizer"):
        assert got[name] == {"ok": True, "value": True}, got[name]
    ok, norm, type_name = got["clip_grad"]["value"]
    assert ok and norm > 0 and type_name == "torch.FloatTensor"  # Tensor.type is back to normal


def test_distopt_state_bugs_without_the_accommodation(phases):
    got = phases["type_checks"]
    assert not got["distopt_fresh_state_dict"]["ok"] and "AssertionError" in got["distopt_fresh_state_dict"]["error"]
    assert not got["distopt_reshardable_round_trip"]["ok"]  # fails building the load template, or on 'step'
    # one shared step tensor: AdamW adds 1 per parameter, so after a reload the counts run away
    steps = got["distopt_step_after_reload"]["value"]
    assert steps != [2.0] and max(steps) > 2.0


def test_distopt_state_with_the_accommodation(phases):
    got = phases["all"]
    assert got["distopt_fresh_state_dict"]["ok"], got["distopt_fresh_state_dict"]
    value = got["distopt_reshardable_round_trip"]["value"]
    assert value["equal"] and value["distinct_step_tensors"] == value["params"]
    assert got["distopt_step_after_reload"]["value"] == [2.0]
