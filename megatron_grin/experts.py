"""Dropless expert computation: which megatron expert module computes the routed tokens.

GRIN is dropless (no capacity factor) and uses no expert parallelism: every rank holds all experts of
its layers, each sharded over the tensor-parallel group (expert TP = TP). Backends are looked up by
name in ``EXPERT_BACKENDS`` so faster implementations (grouped GEMM, fused kernels) plug in here
without touching the layer spec.
"""

from __future__ import annotations

from typing import Callable

from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.spec_utils import ModuleSpec


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions import transformer_engine as _te  # noqa: F401
    except Exception:
        return False
    return True


def _sequential(use_te: bool) -> ModuleSpec:
    """One SwiGLU MLP per expert, looping over experts (works everywhere, zero-token experts included)."""
    if use_te:
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

        fc1, fc2 = TEColumnParallelLinear, TERowParallelLinear
    else:
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

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
    from megatron.core.transformer.moe.experts import TEGroupedMLP

    return ModuleSpec(module=TEGroupedMLP, submodules=MLPSubmodules(
        linear_fc1=TEColumnParallelGroupedLinear, linear_fc2=TERowParallelGroupedLinear))


#: name -> builder(use_te) returning the experts ModuleSpec.
EXPERT_BACKENDS: dict[str, Callable[[bool], ModuleSpec]] = {
    "sequential": _sequential,
    "te_grouped": _te_grouped,
}


def _register_optional_backends() -> None:
    """Backends that live in ops/ (kept there beside their kernels) add themselves to the registry."""
    from megatron_grin.ops.grouped_mlp import register

    register(EXPERT_BACKENDS)


_register_optional_backends()


def resolve_backend(name: str) -> str:
    """Turn 'auto' into the concrete backend for this machine.

    Transformer Engine's GroupedLinear where installed (GPU clusters), else "grouped_mm": torch's grouped
    GEMM on sm90+ bf16 and, on CPU, one autograd node looping over whole expert MLPs, measured faster
    than SequentialMLP in fp32 and bf16 (docs/performance.md).
    """
    if name == "auto":
        return "te_grouped" if have_transformer_engine() else "grouped_mm"
    if name not in EXPERT_BACKENDS:
        raise ValueError(f"--grin-expert-backend {name!r} is unknown; choose one of "
                         f"{['auto', *EXPERT_BACKENDS]}.")
    return name


def experts_spec(backend: str, use_te: bool) -> ModuleSpec:
    """ModuleSpec of the experts module for a backend name ('auto' allowed)."""
    return EXPERT_BACKENDS[resolve_backend(backend)](use_te)
