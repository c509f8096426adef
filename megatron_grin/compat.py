"""The one place where megatron-grin adapts megatron-core to CPU-only machines and to its known bugs.

megatron-core assumes CUDA in a handful of places that are incidental to the maths (device="cuda"
scratch tensors in the pipeline schedules, torch.cuda RNG state in the model-parallel RNG tracker,
torch.cuda.synchronize in p2p). Development, CI and the local demo run on CPU with gloo, so each of
those call sites is redirected here, narrowly (by patching the name inside the one megatron module
that uses it), gated on the megatron-core version it was verified against, and applied only when
CUDA is absent. Each accommodation has a test in tests/test_compat.py.

Call :func:`apply` once, before building models or schedules (the trainer and tests do).
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger(__name__)

#: megatron-core releases these accommodations were verified against (major, minor).
VERIFIED_MCORE = ((0, 16),)


def mcore_version() -> tuple[int, int, int]:
    from megatron.core import package_info

    parts = [int("".join(ch for ch in p if ch.isdigit()) or 0) for p in package_info.__version__.split(".")[:3]]
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


def _cpu_device(device):
    """Map any CUDA device spec to "cpu"; leave others alone."""
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return "cpu"
    return device


class _TorchProxy(types.ModuleType):
    """Stand-in for the `torch` name inside one megatron module: forwards everything, overrides a few."""

    def __init__(self, overrides: dict[str, object]):
        super().__init__("torch")
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(torch, name)


def _factory_on_cpu(fn: Callable) -> Callable:
    def wrapped(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    wrapped.__name__ = getattr(fn, "__name__", "factory")
    return wrapped


_CPU_FACTORIES = {name: _factory_on_cpu(getattr(torch, name)) for name in ("zeros", "ones", "empty", "full", "tensor")}


@dataclass(frozen=True)
class Accommodation:
    """One patch: what it fixes, when it is needed, and how to apply it."""

    name: str
    why: str
    cpu_only: bool
    apply: Callable[[], None]
    needed_below: tuple[int, int] = (0, 17)  # not verified (nor expected to be needed) from this version on


def _te_general_gemm() -> None:
    # 0.16.1 references te_general_gemm in router_gating_linear without importing it when TE is absent.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _current_device() -> None:
    # RoPE (rotary_pos_embedding), the router gating and several buffers call torch.cuda.current_device().
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]


def _schedules_cuda_tensors() -> None:
    # schedules.py allocates its token counter with device="cuda".
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _TorchProxy(dict(_CPU_FACTORIES))


def _attention_masks() -> None:
    # transformer/utils.py builds the default causal and sliding-window masks with device="cuda".
    from megatron.core.transformer import utils

    utils.torch = _TorchProxy(dict(_CPU_FACTORIES))


def _p2p_synchronize() -> None:
    # p2p_communication calls torch.cuda.synchronize() after batched send/recv (batch_p2p_sync=True) and
    # allocates shape tensors on torch.cuda.current_device().
    from megatron.core.pipeline_parallel import p2p_communication

    p2p_communication.torch = _TorchProxy({**_CPU_FACTORIES, "cuda": _CudaNamespace({"synchronize": lambda *a, **k: None})})


class _CudaNamespace(types.SimpleNamespace):
    """A `torch.cuda` look-alike that overrides a few functions and forwards the rest."""

    def __init__(self, overrides: dict[str, object]):
        super().__init__(**overrides)

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


def _rng_tracker() -> None:
    # The model-parallel RNG tracker (and activation checkpointing, which saves/restores RNG states) keeps
    # torch.cuda generator states. On CPU the CPU default generator plays the role of the device generator.
    from megatron.core.tensor_parallel import random as mrandom

    cpu_rng = _CudaNamespace({
        "get_rng_state": lambda device=None: torch.get_rng_state(),
        "set_rng_state": lambda state, device=None: torch.set_rng_state(state),
        "manual_seed": lambda seed: torch.manual_seed(seed),
        "random": types.SimpleNamespace(get_rng_state=lambda device=None: torch.get_rng_state()),
    })
    mrandom.torch = _TorchProxy({"cuda": cpu_rng})
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)


ACCOMMODATIONS: tuple[Accommodation, ...] = (
    Accommodation("te_general_gemm", "0.16.1 NameError in router_gating_linear without Transformer Engine",
                  cpu_only=False, apply=_te_general_gemm),
    Accommodation("current_device", "torch.cuda.current_device() used for placement (RoPE, router, buffers)",
                  cpu_only=True, apply=_current_device),
    Accommodation("schedules_cuda_tensors", "pipeline schedules allocate device='cuda' scratch tensors",
                  cpu_only=True, apply=_schedules_cuda_tensors),
    Accommodation("attention_masks", "local attention builds causal/sliding-window masks on device='cuda'",
                  cpu_only=True, apply=_attention_masks),
    Accommodation("p2p_synchronize", "pipeline p2p calls torch.cuda.synchronize and allocates on cuda",
                  cpu_only=True, apply=_p2p_synchronize),
    Accommodation("rng_tracker", "model-parallel RNG tracker and recompute use torch.cuda RNG state",
                  cpu_only=True, apply=_rng_tracker),
)

_applied: list[str] = []


def select(version: tuple[int, ...], cuda: bool) -> list[Accommodation]:
    """The accommodations a megatron-core version needs on a machine with or without CUDA."""
    return [acc for acc in ACCOMMODATIONS
            if tuple(version[:2]) < acc.needed_below and not (acc.cpu_only and cuda)]


def apply() -> list[str]:
    """Apply every accommodation needed on this machine and megatron-core version; idempotent.

    Returns the names of the accommodations in effect.
    """
    if _applied:
        return list(_applied)
    version = mcore_version()
    if version[:2] not in VERIFIED_MCORE:
        log.warning("megatron-core %s is outside the verified range %s; applying only accommodations "
                    "whose gate admits it", ".".join(map(str, version)), VERIFIED_MCORE)
    for acc in select(version, torch.cuda.is_available()):
        acc.apply()
        _applied.append(acc.name)
    return list(_applied)


def applied() -> list[str]:
    return list(_applied)
