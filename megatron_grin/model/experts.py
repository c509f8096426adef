"""Dropless expert computation: which megatron expert module computes the routed tokens.

GRIN is dropless (no capacity factor) and uses no expert parallelism: every rank holds all experts of
its layers, each sharded over the tensor-parallel group (expert TP = TP). Backends are looked up by
name in ``BACKEND_SPECS`` so faster implementations (grouped GEMM, fused kernels) plug in here
without touching the layer spec.
"""

from __future__ import annotations

from typing import Callable

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP, TEGroupedMLP
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_grin.config import have_transformer_engine, resolve_backend
from megatron_grin.model.grouped_experts import grouped_mm_spec


def _sequential(use_te: bool) -> ModuleSpec:
    """One SwiGLU MLP per expert, looping over experts (works everywhere, zero-token experts included)."""
    if use_te:
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

        fc1, fc2 = TEColumnParallelLinear, TERowParallelLinear
    else:
        fc1, fc2 = ColumnParallelLinear, RowParallelLinear
    return ModuleSpec(module=SequentialMLP, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2))


def _te_grouped(use_te: bool) -> ModuleSpec:
    """Transformer Engine GroupedLinear: one grouped GEMM per projection for all experts."""
    if not have_transformer_engine():
        raise ValueError("--grin-expert-backend te_grouped needs Transformer Engine "
                         "(pip install 'megatron-grin[te]'); use 'sequential' or 'auto' instead.")
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelGroupedLinear,
        TERowParallelGroupedLinear,
    )

    return ModuleSpec(module=TEGroupedMLP, submodules=MLPSubmodules(
        linear_fc1=TEColumnParallelGroupedLinear, linear_fc2=TERowParallelGroupedLinear))


#: name -> builder(use_te) returning the experts ModuleSpec.
BACKEND_SPECS: dict[str, Callable[[bool], ModuleSpec]] = {
    "sequential": _sequential,
    "grouped_mm": grouped_mm_spec,
    "te_grouped": _te_grouped,
}


def experts_spec(backend: str, use_te: bool) -> ModuleSpec:
    """ModuleSpec of the experts module for a backend name ('auto' allowed)."""
    return BACKEND_SPECS[resolve_backend(backend)](use_te)
