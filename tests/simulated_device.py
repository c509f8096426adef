"""A simulated accelerator for CPU-only machines: real CPU maths, tensors that report another device.

Why: both crashes of the first H200 run (shared/notes/h200-2026-12-04.md) were a tensor made without
``device=`` (so on the CPU) meeting a CUDA tensor. On a CPU-only machine every tensor is on the CPU, so
such code passes every test. Under :class:`SimulatedDevice`, tensors moved "to the device" are wrapper
tensors that report ``device='meta'`` but hold real CPU values, so the whole forward *and* backward runs
with real numbers, and:

* a factory call that omits ``device=`` makes a plain CPU tensor; the first op mixing it with a device
  tensor raises the error CUDA raises ("Expected all tensors to be on the same device ... meta and cpu");
  a backward that returns a gradient on the wrong device fails autograd's own device check;
* code that follows the inputs (``device=x.device``, ``x.new_zeros``, ``zeros_like``, ``.to(x.device)``,
  ``torch.Generator(device=x.device)``) stays on the simulated device, as on a GPU;
* every host synchronisation (``.item()``, ``.tolist()``, ``bool(t)``, ``.cpu()``, a device->host copy)
  is recorded with the innermost megatron_grin (and megatron) source line that caused it.

Which device it reports: ``meta`` is the only non-CPU device type whose autograd works in a CPU-only
torch (a CUDA tensor that needs grad aborts the process: "PyTorch is not linked with support for cuda
devices"; FakeTensorMode cannot fake CUDA autograd leaves, data-dependent ops or CUDA generators).

What it cannot see (the GPU tier, tests/gpu/, covers these):
* branches taken only when ``device.type == 'cuda'`` (Triton kernels, torch grouped_mm, CUDA streams,
  ``torch.cuda.*`` calls): the simulated device is not CUDA, so those lines do not run;
* allocator, stream and asynchrony effects, performance, and numerics of CUDA kernels;
* CPU-scalar mixing rules are modelled, not CUDA's own: a 0-dim CPU tensor may meet device tensors in
  pointwise ops (as CUDA allows); anything else that mixes raises, except copies and CPU index tensors.
"""

from __future__ import annotations

import contextlib
import os
import traceback
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, return_and_correct_aliasing
from torch.utils._pytree import tree_flatten, tree_map

SIM = torch.device("meta")
CPU = torch.device("cpu")
_aten = torch.ops.aten

#: ops that legitimately take CPU and device tensors together (copies, CPU index tensors)
_MIX_ALLOWED = {
    _aten.copy_.default, _aten._to_copy.default, _aten.index.Tensor, _aten.index_put.default,
    _aten.index_put_.default, _aten._index_put_impl_.default,
}
#: device -> host: the value is needed on the host, the host waits for the device
_HOST_SYNC_OPS = {_aten._local_scalar_dense.default, _aten.equal.default, _aten.is_nonzero.default}
#: ops whose CUDA kernels read a device value on the host to size their output (a hidden host sync)
_CUDA_SYNCING_OPS = {
    _aten.bincount.default, _aten.nonzero.default, _aten.masked_select.default, _aten._unique2.default,
    _aten.unique_consecutive.default, _aten.unique_dim.default, _aten.repeat_interleave.Tensor,
    _aten.histc.default,
}

_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_GRIN_DIR = os.path.join(_PKG, "megatron_grin") + os.sep
_MEGATRON_MARK = os.sep + os.path.join("megatron", "core") + os.sep


_ACTIVE: list = []  # the SimulatedDevice contexts entered, innermost last


class DeviceMismatch(RuntimeError):
    """What CUDA would raise: a CPU tensor met a device tensor."""


class SimTensor(torch.Tensor):
    """A tensor on the simulated device: holds a real CPU tensor ``inner``."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        out = torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), storage_offset=inner.storage_offset(), dtype=inner.dtype,
            device=SIM, layout=inner.layout, requires_grad=False)
        out.inner = inner
        return out

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self) -> str:
        return f"SimTensor({self.inner!r})"

    def tolist(self):
        """A host sync (recorded), as on CUDA."""
        _ACTIVE[-1]._sync("Tensor.tolist")
        return self.inner.tolist()

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert a device tensor to numpy (CUDA refuses it too); use .cpu() first")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"SimTensor used outside SimulatedDevice ({func}); enter the context first")


@dataclass
class HostSync:
    """One device->host synchronisation and who asked for it."""

    op: str
    grin_line: str | None  # innermost megatron_grin frame, "path:line in func"
    megatron_line: str | None  # innermost megatron-core frame
    owner: str | None  # "megatron_grin" or "megatron": whose frame is innermost (made the call)

    def __str__(self) -> str:
        return f"{self.op} in {self.owner}: {self.grin_line or '-'} (megatron: {self.megatron_line or '-'})"


def _where() -> tuple[str | None, str | None, str | None]:
    """(innermost megatron_grin frame, innermost megatron frame, which of the two is innermost)."""
    grin = mega = owner = None
    for frame in reversed(traceback.extract_stack()[:-3]):
        name = frame.filename
        here = f"{os.path.relpath(name, _PKG) if name.startswith(_PKG) else name}:{frame.lineno} in {frame.name}"
        if grin is None and name.startswith(_GRIN_DIR):
            grin, owner = here, owner or "megatron_grin"
        if mega is None and _MEGATRON_MARK in name:
            mega, owner = here, owner or "megatron"
        if grin and mega:
            break
    return grin, mega, owner


def _is_sim_device(device: Any) -> bool:
    return device is not None and torch.device(device).type == SIM.type


class _Generator(torch.Generator):
    """torch.Generator whose ``device`` is the simulated device when asked for it (draws run on the CPU)."""

    def __new__(cls, device="cpu"):
        sim = _is_sim_device(device)
        gen = super().__new__(cls, device="cpu" if sim else device)
        gen._sim = sim
        return gen

    def __init__(self, device="cpu"):
        pass

    @property
    def device(self):
        return SIM if getattr(self, "_sim", False) else super().device


def _data_factory(real):
    """torch.tensor / as_tensor / asarray: with ``device=<simulated>`` they make a real meta tensor without
    passing through dispatch, so they are wrapped here (module attributes, patched while the context is on)."""

    def factory(*args, **kwargs):
        if not _is_sim_device(kwargs.get("device")) or (args and isinstance(args[0], torch.Tensor)):
            return real(*args, **kwargs)  # from a tensor: an ordinary _to_copy, seen by dispatch
        out = real(*args, **{**kwargs, "device": CPU})
        return _ACTIVE[-1].wrap(out) if type(out) is torch.Tensor else out

    return factory


class SimulatedDevice(TorchDispatchMode):
    """Context manager: inside it, ``to_device(t)`` / ``module.to(SIM)`` put tensors on the simulated device;
    ``syncs`` lists every host synchronisation seen."""

    def __init__(self):
        super().__init__()
        self.syncs: list[HostSync] = []
        self._stack = contextlib.ExitStack()
        self._by_storage: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    # -- public helpers ----------------------------------------------------------------------------
    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A device copy of a CPU tensor (a leaf that requires grad if the input does)."""
        if isinstance(tensor, SimTensor):
            return tensor
        return self.wrap(tensor.detach().clone()).requires_grad_(tensor.requires_grad)

    def wrap(self, inner: torch.Tensor) -> SimTensor:
        """SimTensor around ``inner``, sharing its wrapper storage with every other wrapper of the same CPU
        storage. Why: autograd accumulates a gradient in place when its storage has one user; a wrapper's
        own storage always has one, so a view made in backward (no autograd view tracking there) would be
        overwritten in place while its base is still in use, as a plain CPU tensor never is."""
        out = SimTensor(inner)
        ptr = inner.untyped_storage().data_ptr()
        if ptr:
            first = self._by_storage.get(ptr)
            if first is not None and first.inner.untyped_storage().data_ptr() == ptr:
                torch._functionalize_unsafe_set(out, first)
            else:
                self._by_storage[ptr] = out
        return out

    @staticmethod
    def to_host(tensor: torch.Tensor) -> torch.Tensor:
        """The CPU values of a simulated tensor (for checks outside the code under test)."""
        return tensor.inner if isinstance(tensor, SimTensor) else tensor

    @staticmethod
    def on_device(tensor: torch.Tensor) -> bool:
        return isinstance(tensor, SimTensor)

    def grin_syncs(self) -> list[HostSync]:
        """Host syncs made by megatron_grin code (not by megatron code it calls)."""
        return [s for s in self.syncs if s.owner == "megatron_grin"]

    # -- context -----------------------------------------------------------------------------------
    def __enter__(self):
        self._stack.__enter__()
        for name in ("tensor", "as_tensor", "asarray", "Generator"):
            real = getattr(torch, name)
            setattr(torch, name, _Generator if name == "Generator" else _data_factory(real))
            self._stack.callback(setattr, torch, name, real)
        _ACTIVE.append(self)
        self._stack.callback(_ACTIVE.pop)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._stack.__exit__(*exc)

    # -- dispatch ----------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        sims = [t for t in flat if isinstance(t, SimTensor)]
        plains = [t for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, SimTensor)]
        if any(t.device.type == SIM.type for t in plains):
            raise RuntimeError(f"{func}: a real {SIM.type} tensor appeared (a factory the simulation missed)")
        to_sim = _is_sim_device(kwargs.get("device"))
        if to_sim:
            kwargs = {**kwargs, "device": CPU}
        if sims and plains:
            self._check_mix(func, args, plains)
        if sims and (func in _HOST_SYNC_OPS or self._cuda_syncs(func, args, kwargs)):
            self._sync(func)
        device_to_host = (func is _aten._to_copy.default and bool(sims) and kwargs.get("device") is not None
                          and not to_sim)
        if device_to_host:
            self._sync(func)  # .cpu() / .to("cpu")
        out = func(*tree_map(self.to_host, args), **tree_map(self.to_host, kwargs))
        if not (sims or to_sim) or func in _HOST_SYNC_OPS or device_to_host:
            return out
        wrapped = tree_map(lambda t: self.wrap(t) if type(t) is torch.Tensor else t, out)
        return return_and_correct_aliasing(func, args, kwargs, wrapped)

    def _check_mix(self, func, args, plains) -> None:
        if func in _MIX_ALLOWED:
            if func is _aten.copy_.default and not isinstance(args[0], SimTensor):
                self._sync(func)  # device -> host copy
            return
        if torch.Tag.pointwise in func.tags and all(t.dim() == 0 for t in plains):
            return  # CUDA accepts CPU scalars in elementwise ops
        grin, mega, _ = _where()
        shapes = [tuple(t.shape) for t in plains]
        msg = (f"Expected all tensors to be on the same device, but found at least two devices, {SIM.type} "
               f"(simulated accelerator) and cpu! op {func}, CPU operands of shapes {shapes}, at {grin or mega}")
        raise DeviceMismatch(msg)

    @staticmethod
    def _cuda_syncs(func, args, kwargs) -> bool:
        """True for ops that sync inside their CUDA kernel (bincount, nonzero, boolean-mask indexing, ...)."""
        if func in _CUDA_SYNCING_OPS:
            return not (func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is not None)
        if func in (_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default):
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
        return False

    def _sync(self, func) -> None:
        self.syncs.append(HostSync(str(func), *_where()))
