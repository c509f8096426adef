"""Move full (TP=1, PP=1) tensors into a sharded model chunk and back, in memory.

Parameter names in a pipeline chunk use local layer indices; each TransformerLayer knows its global
``layer_number``. Tensor-parallel params carry megatron's ``tensor_model_parallel`` / ``partition_dim``
attributes. SwiGLU expert ``linear_fc1`` is special: each TP rank holds [gate_r; up_r], so the full
[gate; up] tensor is split per half, not contiguously.

Full tensors always use SequentialMLP's per-expert names (``experts.local_experts.{e}.linear_fc1.weight``);
the "grouped_mm" backend's stacked ``experts.fc1_weight`` [E, 2F, H] / ``experts.fc2_weight`` [E, H, F]
are translated here, so callers never see which expert backend a model was built with.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
import torch.distributed as dist
from megatron.core import parallel_state

_LOCAL_LAYER = re.compile(r"^(.*decoder\.layers\.)(\d+)(\..*)$")
_STACKED_EXPERTS = re.compile(r"^(.*\.experts\.)fc([12])_weight$")  # GroupedMMExperts' 3D weights


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def global_name(model: torch.nn.Module, local_name: str) -> str:
    """Name of a parameter in the full model (global layer index)."""
    m = _LOCAL_LAYER.match(local_name)
    if not m:
        return local_name
    layer = unwrap(model).decoder.layers[int(m.group(2))]
    return f"{m.group(1)}{layer.layer_number - 1}{m.group(3)}"


def _is_glu_fc1(name: str) -> bool:
    return (name.endswith("linear_fc1.weight") and ".experts." in name) or name.endswith(".experts.fc1_weight")


def per_expert_names(name: str, num_experts: int) -> list[str] | None:
    """SequentialMLP's per-expert names for a stacked GroupedMMExperts weight, else None."""
    match = _STACKED_EXPERTS.match(name)
    if match is None:
        return None
    return [f"{match.group(1)}local_experts.{e}.linear_fc{match.group(2)}.weight" for e in range(num_experts)]


def expand_stacked_experts(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert views (SequentialMLP names) in place of stacked GroupedMMExperts weights; others as they are."""
    out = {}
    for name, tensor in tensors.items():
        names = per_expert_names(name, tensor.shape[0]) if tensor is not None else None
        if names:
            out.update(zip(names, tensor.unbind(0)))
        else:
            out[name] = tensor
    return out


def shard(full: torch.Tensor, param: torch.nn.Parameter, name: str, tp_rank: int, tp_size: int,
          dim_offset: int = 0) -> torch.Tensor:
    """This rank's slice of a full tensor for ``param`` (``dim_offset=-1``: one expert of a stacked weight)."""
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim + dim_offset
    if _is_glu_fc1(name):
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp_size, dim=dim)[tp_rank], up.chunk(tp_size, dim=dim)[tp_rank]], dim=dim)
    return full.chunk(tp_size, dim=dim)[tp_rank]


@torch.no_grad()
def load_full_state(model: torch.nn.Module, full: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Copy full tensors (keyed by global names) into this rank's shards of ``model``."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for name, param in unwrap(model).named_parameters():
        key = global_name(model, name)
        expert_keys = per_expert_names(key, param.shape[0])
        needed = expert_keys or [key]
        if any(k not in full for k in needed):
            if strict:
                raise KeyError(f"no tensor for parameter {next(k for k in needed if k not in full)}")
            continue
        if expert_keys:  # stack the experts' shards; the per-expert TP dim is one lower
            src = torch.stack([shard(full[k], param, name, tp_rank, tp_size, dim_offset=-1) for k in expert_keys])
        else:
            src = shard(full[key], param, name, tp_rank, tp_size)
        if src.shape != param.shape:
            raise ValueError(f"{key}: shard shape {tuple(src.shape)} != parameter shape {tuple(param.shape)}")
        param.copy_(src.to(param.dtype))


def gather_full(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Full tensors (global names) of this pipeline chunk, gathered over TP.

    ``tensors`` maps local parameter names to per-rank tensors (e.g. gradients); default: the parameters.
    """
    group = parallel_state.get_tensor_model_parallel_group()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    out = {}
    for name, param in unwrap(model).named_parameters():
        local = (tensors[name] if tensors is not None else param).detach().float().contiguous()
        if tp_size > 1 and getattr(param, "tensor_model_parallel", False):
            parts = [torch.empty_like(local) for _ in range(tp_size)]
            dist.all_gather(parts, local, group=group)
            dim = param.partition_dim
            if _is_glu_fc1(name):
                halves = [p.chunk(2, dim=dim) for p in parts]
                local = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
            else:
                local = torch.cat(parts, dim=dim)
        out[global_name(model, name)] = local
    return expand_stacked_experts(out)
