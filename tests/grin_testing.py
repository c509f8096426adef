"""Shared helpers for tests: tiny configs, a random HF reference model, and a gloo process launcher."""

from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.multiprocessing as mp

from megatron_grin.config import GrinConfig, preset


def tiny_config(**overrides) -> GrinConfig:
    """Odd sizes on purpose (vocab 97, 5 experts, ffn 40); TP=2 compatible."""
    base = dict(num_layers=4, hidden_size=48, ffn_hidden_size=40, num_attention_heads=4, num_query_groups=2,
                num_experts=5, vocab_size=97, max_position_embeddings=64, sliding_window=None,
                input_jitter_eps=0.01)
    base.update(overrides)
    return preset("test", **base)


def hf_reference(cfg: GrinConfig, seed: int = 0):
    """A randomly initialised transformers PhimoeForCausalLM with the same shape (fp32, eager)."""
    from transformers import PhimoeConfig, PhimoeForCausalLM

    from megatron_grin.convert.hf_keys import hf_config_dict

    torch.manual_seed(seed)
    hf_cfg = PhimoeConfig(**{k: v for k, v in hf_config_dict(cfg).items() if k not in ("architectures", "torch_dtype")})
    hf_cfg._attn_implementation = "eager"
    model = PhimoeForCausalLM(hf_cfg).float()
    with torch.no_grad():  # HF init leaves LayerNorm at (1, 0) and biases at 0: randomise them so they matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def full_state_from_hf(model, cfg: GrinConfig) -> dict[str, torch.Tensor]:
    from megatron_grin.convert.hf_keys import from_hf

    return from_hf({k: v.detach().clone() for k, v in model.state_dict().items()}, cfg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel(rank: int, world_size: int, port: int, tp: int = 1, pp: int = 1, vpp=None, seed: int = 0):
    """compat + gloo + megatron parallel state, as the trainer does it."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_grin import compat

    compat.apply()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             virtual_pipeline_model_parallel_size=vpp)
    model_parallel_cuda_manual_seed(seed)


def _worker(rank, world_size, port, fn, args, queue, collected):
    torch.set_num_threads(1)
    try:
        queue.put((rank, fn(rank, world_size, port, *args), None))
        collected.wait(600)  # tensors travel through shared memory owned by this process: stay alive
    except BaseException:  # report to the parent instead of hanging it
        queue.put((rank, None, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _detach(value):
    """Deep-copy tensors out of the worker's shared memory."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detach(v) for v in value)
    return value


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    """Run fn(rank, world_size, port, *args) in world_size spawned processes; return results by rank."""
    ctx = mp.get_context("spawn")
    queue, collected = ctx.Queue(), ctx.Event()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, collected))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = [None] * world_size, []
    try:
        for _ in range(world_size):
            rank, value, err = queue.get(timeout=timeout)
            results[rank] = value
            if err:
                errors.append(f"rank {rank}:\n{err}")
                break
        results = [_detach(r) for r in results]
    finally:
        collected.set()
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return results


def philox_python(ctr, key, rounds=10):
    """Philox4x32-10 on Python integers (the Random123 definition): an independent reference for the kernels."""
    (c0, c1, c2, c3), (k0, k1), mask = ctr, key, 0xFFFFFFFF
    for _ in range(rounds):
        pa, pb = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((pb >> 32) ^ c1 ^ k0) & mask, pb & mask, ((pa >> 32) ^ c3 ^ k1) & mask, pa & mask
        k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
    return c0, c1, c2, c3


def process_running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
