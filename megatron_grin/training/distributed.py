"""Process groups for ``megatron-grin pretrain``: the rank layout from torchrun or Slurm, NCCL or gloo, megatron's
parallel state, and Megatron-LM's per-stage seeding."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_grin.config import GrinConfig
from megatron_grin.training.run_config import SEED_STRIDE_PER_STAGE


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int


def first_slurm_host(nodelist: str) -> str:
    """'gpu[003-006,9],cpu1' -> 'gpu003' (the first node of a Slurm hostlist)."""
    head, depth = "", 0
    for ch in nodelist:
        if ch == "," and depth == 0:
            break
        depth += ch == "["
        depth -= ch == "]"
        head += ch
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]


def dist_env(env: Optional[dict] = None) -> DistEnv:
    """Rank layout from torchrun (RANK, WORLD_SIZE, LOCAL_RANK), else Slurm (one task per rank), else 1."""
    env = os.environ if env is None else env
    if "RANK" in env:
        return DistEnv(int(env["RANK"]), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        out = DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
        if out.world_size > 1:
            env.setdefault("MASTER_ADDR", first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
            env.setdefault("MASTER_PORT", str(10000 + int(env.get("SLURM_JOB_ID", 0)) % 20000))
        return out
    return DistEnv(0, 1, 0)


def init_distributed(cfg: GrinConfig, timeout_minutes: int = 10) -> DistEnv:
    """torch.distributed + megatron parallel state for cfg's TP/PP/VPP layout."""
    env = dist_env()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    backend = "nccl" if cuda else "gloo"
    timeout = timedelta(minutes=timeout_minutes)  # --distributed-timeout-minutes
    if env.world_size == 1 and "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                                timeout=timeout)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
        context_parallel_size=cfg.context_parallel_size,
        expert_model_parallel_size=cfg.expert_model_parallel_size,
        distributed_timeout_minutes=timeout_minutes)
    return env


def set_seed(seed: int) -> None:
    """Megatron-LM's seeding: one seed per pipeline stage, TP ranks get theirs from the RNG tracker."""
    seed = seed + SEED_STRIDE_PER_STAGE * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
