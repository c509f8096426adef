"""The one place where megatron-grin adapts megatron-core to CPU-only machines and to its known bugs.

megatron-core assumes CUDA in a handful of places that are incidental to the maths (device="cuda"
scratch tensors in the pipeline schedules, torch.cuda RNG state in the model-parallel RNG tracker,
torch.cuda.synchronize in p2p). Development, CI and the local demo run on CPU with gloo, so each of
those call sites is redirected here, narrowly (by patching the name inside the one megatron module
that uses it), gated on the megatron-core version it was verified against, and applied only when
CUDA is absent. Each accommodation has a test in tests/test_compat.py, or, for the trainer's (optimizers,
distributed optimizer, dist_checkpointing), in tests/test_compat_trainer.py.

Call :func:`apply` once, before building models or schedules (the trainer and tests do).
"""

from __future__ import annotations

import functools
import logging
import os
import types
from dataclasses import dataclass
from typing import Callable

import megatron.core.utils as mutils
import torch
from megatron.core import package_info
from megatron.core.dist_checkpointing.strategies import async_utils, filesystem_async, state_dict_saver
from megatron.core.distributed import param_and_grad_buffer
from megatron.core.optimizer import clip_grads, distrib_optimizer, grad_scaler
from megatron.core.optimizer import optimizer as moptimizer
from megatron.core.pipeline_parallel import p2p_communication, schedules
from megatron.core.tensor_parallel import random as mrandom
from megatron.core.transformer import utils
from megatron.core.transformer.moe import moe_utils

log = logging.getLogger(__name__)

#: megatron-core releases these accommodations were verified against (major, minor).
VERIFIED_MCORE = ((0, 16),)


def mcore_version() -> tuple[int, int, int]:
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

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _current_device() -> None:
    # RoPE (rotary_pos_embedding), the router gating and several buffers call torch.cuda.current_device().
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]


def _schedules_cuda_tensors() -> None:
    # schedules.py allocates its token counter with device="cuda".

    schedules.torch = _TorchProxy(dict(_CPU_FACTORIES))


def _attention_masks() -> None:
    # transformer/utils.py builds the default causal and sliding-window masks with device="cuda".

    utils.torch = _TorchProxy(dict(_CPU_FACTORIES))


def _p2p_synchronize() -> None:
    # p2p_communication calls torch.cuda.synchronize() after batched send/recv (batch_p2p_sync=True) and
    # allocates shape tensors on torch.cuda.current_device().

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

    cpu_rng = _CudaNamespace({
        "get_rng_state": lambda device=None: torch.get_rng_state(),
        "set_rng_state": lambda state, device=None: torch.set_rng_state(state),
        "manual_seed": lambda seed: torch.manual_seed(seed),
        "random": types.SimpleNamespace(get_rng_state=lambda device=None: torch.get_rng_state()),
    })
    mrandom.torch = _TorchProxy({"cuda": cpu_rng})
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)


# --- trainer accommodations (optimizer, distributed optimizer, dist_checkpointing); tests in
# --- tests/test_compat_trainer.py ---------------------------------------------------------------------
_TENSOR_TYPE = torch.Tensor.type


def _report_cuda_type(self, dtype=None, non_blocking=False, **kwargs):
    """Tensor.type() that names a CPU tensor as its CUDA counterpart (only while a check runs)."""
    if dtype is None and not kwargs:
        name = _TENSOR_TYPE(self)
        if self.device.type == "cpu" and name.startswith("torch.") and not name.startswith("torch.cuda."):
            return "torch.cuda." + name[len("torch."):]
        return name
    return _TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


def _with_cuda_type_names(fn: Callable) -> Callable:
    """Run fn while Tensor.type() reports CPU tensors as torch.cuda.* (restored afterwards)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        torch.Tensor.type = _report_cuda_type  # type: ignore[method-assign]
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.type = _TENSOR_TYPE  # type: ignore[method-assign]

    return wrapped


def _optimizer_cuda_tensors() -> None:
    # The optimizers, gradient clipping, the grad scaler, DDP's grad buffers and megatron.core.utils'
    # multi-tensor fallbacks allocate scalars and buffers with device="cuda" / current_device().

    for module in (moptimizer, clip_grads, grad_scaler, distrib_optimizer, param_and_grad_buffer, mutils):
        module.torch = _TorchProxy(dict(_CPU_FACTORIES))


def _cuda_tensor_type_checks() -> None:
    # Float16OptimizerWithFloat16Params, DistributedOptimizer and fp32 grad clipping accept parameters only
    # if param.type() is 'torch.cuda.{Float,BFloat16,Half}Tensor'. Those three call sites see CUDA names.

    f16 = moptimizer.Float16OptimizerWithFloat16Params
    f16.__init__ = _with_cuda_type_names(f16.__init__)
    dopt = distrib_optimizer.DistributedOptimizer
    build = dopt.__dict__["_build_model_and_main_param_groups"].__func__
    dopt._build_model_and_main_param_groups = classmethod(_with_cuda_type_names(build))
    clip = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = clip
    moptimizer.clip_grad_by_total_norm_fp32 = clip  # imported by name there


def _dist_ckpt_cuda() -> None:
    # torch_dist saving calls torch.cuda.synchronize() after staging tensors and all-reduces flags in
    # device="cuda" / current_device() tensors.

    cuda = _CudaNamespace({"synchronize": lambda *a, **k: None})
    for module in (filesystem_async, state_dict_saver, async_utils):
        module.torch = _TorchProxy({**_CPU_FACTORIES, "cuda": cuda})


def _process_memory_without_psutil() -> None:
    # filesystem_async measures the writer's RSS with psutil and raises if psutil is missing. Applied only
    # when psutil is not installed: /proc/self/statm gives the same number on Linux.


    if getattr(filesystem_async, "HAVE_PSUTIL", True):
        return

    def process_memory() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    filesystem_async._process_memory = process_memory


def _distopt_torch_adam_state() -> None:
    # Without Apex/TE the DistributedOptimizer wraps torch.optim.AdamW, which keeps a per-parameter "step"
    # tensor. megatron-core 0.16.1 mishandles it in three places (applied only when HAVE_APEX_OR_TE is False):
    #  * state_dict() asserts on an optimizer that has not stepped yet (e.g. building the load template);
    #  * loading the fully_reshardable format copies every state key, but "step" is not in the file;
    #  * load_state_dict() gives every parameter the *same* step tensor, so AdamW increments it once per
    #    parameter per step and the bias correction is wrong after a resume (loss diverges from an
    #    uninterrupted run, and differently per pipeline layout).

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    dopt = distrib_optimizer.DistributedOptimizer
    state_dict, load_state_dict = dopt.state_dict, dopt.load_state_dict
    set_states = dopt._set_main_param_and_optimizer_states

    def fresh_state_dict(self):
        if self.optimizer is not None and self.init_state_fn is not None:
            fresh = [p for g in self.optimizer.param_groups for p in g["params"] if not self.optimizer.state[p]]
            if fresh:  # what AdamW's first step would create: zero moments, step 0
                self.init_state_fn(self.optimizer, self.config)
                for p in fresh:
                    self.optimizer.state[p]["step"] = torch.tensor(0.0, dtype=torch.float32)
        return state_dict(self)

    def set_states_without_step(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return set_states(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        for key, value in tensors.items():  # "step" comes from the param groups, not from the file
            dst[key].copy_(value)

    def load_state_dict_unaliased(self, sd):
        result = load_state_dict(self, sd)
        if self.optimizer is not None:
            for state in self.optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
        return result

    dopt.state_dict = fresh_state_dict
    dopt._set_main_param_and_optimizer_states = set_states_without_step
    dopt.load_state_dict = load_state_dict_unaliased


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
    Accommodation("optimizer_cuda_tensors", "optimizers, grad clipping, grad buffers allocate on device='cuda'",
                  cpu_only=True, apply=_optimizer_cuda_tensors),
    Accommodation("cuda_tensor_type_checks", "optimizers and clipping accept only torch.cuda.* param.type()",
                  cpu_only=True, apply=_cuda_tensor_type_checks),
    Accommodation("dist_ckpt_cuda", "torch_dist save calls torch.cuda.synchronize and reduces on cuda",
                  cpu_only=True, apply=_dist_ckpt_cuda),
    Accommodation("process_memory_without_psutil", "torch_dist save needs psutil (only when it is missing)",
                  cpu_only=False, apply=_process_memory_without_psutil),
    Accommodation("distopt_torch_adam_state", "DistributedOptimizer + torch AdamW: step state bugs "
                  "(only without Apex/TE)", cpu_only=False, apply=_distopt_torch_adam_state),
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
