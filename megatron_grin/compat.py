"""The one place where megatron-grin adapts megatron-core to CPU-only machines and to its known bugs.

megatron-core assumes CUDA in a handful of places that are incidental to the maths (device="cuda"
scratch tensors in the pipeline schedules, torch.cuda RNG state in the model-parallel RNG tracker,
torch.cuda.synchronize in p2p). Development, CI and the local demo run on CPU with gloo, so each of
those call sites is redirected here, narrowly (by patching the name inside the one megatron module
that uses it), gated on the megatron-core version it was verified against, and applied only when
CUDA is absent. Each accommodation has a test in tests/test_compat.py, or, for the trainer's (optimizers,
distributed optimizer, dist_checkpointing), in tests/test_compat_trainer.py.

The *security* accommodations (``security=True``) are applied on every machine: they close the places where
opening a checkpoint or a dataset cache would unpickle data from the file (torch's ``.metadata`` reader and
``load_bytes``, megatron's ``common.pt`` loader, megatron's index-cache ``numpy.load(allow_pickle=True)``), and
make megatron's checkpoint writer processes die with their rank. They fail closed: on a torch or megatron-core
version they were not audited for, or when a hook point is gone, :func:`apply` raises instead of running
unprotected (tests/test_compat_safe_load.py plants a pickle in every file we or megatron read).

The module is one registry on purpose (~650 lines): every patch of megatron-core sits beside its gate and its
reason, so a version bump is reviewed in one file.

Call :func:`apply` once, before building models or schedules or reading any checkpoint or dataset cache (the
trainer, the converter, ``build_datasets`` and the tests do).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import io
import itertools
import logging
import os
import pickle
import types
from dataclasses import dataclass
from multiprocessing.managers import SyncManager
from typing import Callable

import megatron.core.utils as mutils
import numpy as np
import torch
from megatron.core import package_info
from megatron.core.datasets import gpt_dataset
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.dist_checkpointing.strategies import async_utils, filesystem_async, state_dict_saver
from megatron.core.dist_checkpointing.strategies import common as mcore_common
from megatron.core.distributed import param_and_grad_buffer
from megatron.core.optimizer import clip_grads, distrib_optimizer, grad_scaler
from megatron.core.optimizer import optimizer as moptimizer
from megatron.core.pipeline_parallel import p2p_communication, schedules
from megatron.core.tensor_parallel import layers as mlayers
from megatron.core.tensor_parallel import random as mrandom
from megatron.core.transformer import dot_product_attention, utils
from megatron.core.transformer.moe import moe_utils
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta

from megatron_grin.ckpt_format import writer_process_init
from megatron_grin.ckpt_integrity import UnsafeFileError, read_dcp_metadata
from megatron_grin.ops.cpu_gemm import in_fp32, reference_gemm

log = logging.getLogger(__name__)

#: megatron-core releases these accommodations were verified against (major, minor).
VERIFIED_MCORE = ((0, 16),)
#: torch releases the security accommodations admit: [first, first not admitted). Run and tested on 2.13; the
#: replaced methods (FileSystemReader.read_metadata, DefaultLoadPlanner.load_bytes) have the same shape in an older
#: release's source (read_metadata without per-rank files is handled), and a missing hook point fails closed.
#: torch < 2.6 is refused outright (torch.load defaulted to weights_only=False).
AUDITED_TORCH = ((2, 6), (2, 14))


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


class _ModuleProxy(types.ModuleType):
    """Stand-in for a module's name inside one megatron module: forwards everything, overrides a few."""

    def __init__(self, module: types.ModuleType, **overrides):
        super().__init__(module.__name__)
        self.__dict__["_module"] = module
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self.__dict__["_module"], name)


def _TorchProxy(overrides: dict[str, object]) -> _ModuleProxy:  # noqa: N802  (reads as the class it was)
    return _ModuleProxy(torch, **overrides)


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
    security: bool = False  # fail closed: a version or machine this is not applied on refuses to run


def _gpt_dataset_loss_mask_cache() -> None:
    # 0.16.1 GPTDataset.__getitem__ caches the first sample's loss mask, then zeroes that sample's pad-label
    # positions in the cached tensor itself: every later sample inherits them. Which sample comes first
    # depends on where a run starts, so a resumed run masks other tokens than the uninterrupted one (seen:
    # resume not bit-exact with --mock-data). Not caching costs a ones() and an arange() per sample.
    GPTDataset = gpt_dataset.GPTDataset
    init = GPTDataset.__init__

    @functools.wraps(init)
    def uncached_masks(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.masks_and_position_ids_are_cacheable = False

    GPTDataset.__init__ = uncached_masks


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


# --- security accommodations (every machine, fail closed); tests in tests/test_compat_safe_load.py ----------
def _name_of(f) -> str:
    return os.fspath(f) if isinstance(f, (str, os.PathLike)) else repr(f)


def _refused_global(err: BaseException) -> str:
    """The line of torch's weights_only message that names the refused global."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
    return next((ln for ln in lines if "unsupported" in ln.lower() or "global" in ln.lower()), lines[0])


def _numpy_rng_globals() -> list:
    """What np.random.get_state() (in the RNG ShardedObject) needs beyond torch's weights_only defaults."""
    return [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _weights_only_load(f, *args, _load: Callable = torch.load, _name: str = "", **kwargs):
    """torch.load that never unpickles code, whatever the caller (or TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD) asks."""
    kwargs.pop("pickle_module", None)
    kwargs["weights_only"] = True
    try:
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            return _load(f, *args, **kwargs)
    except pickle.UnpicklingError as err:
        raise UnsafeFileError(f"{_name or _name_of(f)}: refusing a checkpoint object that needs code to load "
                              f"({_refused_global(err)}); the file was tampered with or is not a megatron-grin "
                              "checkpoint.") from None


def _safe_read_metadata(self, *args, **kwargs):
    """FileSystemReader.read_metadata (torch 2.6-2.13) with the pickle.load restricted to checkpoint metadata."""
    if hasattr(self, "_get_metadata_path"):  # newer torch: per-rank __<rank>.metadata files too
        path = self._get_metadata_path(kwargs.get("rank"))
    else:
        path = self.fs.concat_path(self.path, ".metadata")
    with self.fs.create_stream(path, "rb") as stream:
        metadata = read_dcp_metadata(stream, os.fspath(path))
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = self.load_id
    return metadata


def _safe_load_bytes(self, read_item, value: io.BytesIO) -> None:
    """DefaultLoadPlanner.load_bytes (torch 2.6-2.13), loading ShardedObjects with weights_only=True."""
    fqn = read_item.dest_index.fqn
    info = (getattr(getattr(self, "metadata", None), "storage_data", None) or {}).get(read_item.storage_index)
    obj = _weights_only_load(value, _name=f"{info.relative_path} (item {fqn!r})" if info else repr(fqn))
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[fqn], obj)
    else:
        self.state_dict[fqn] = obj


def _need(owner, *names: str) -> None:
    missing = [n for n in names if not hasattr(owner, n)]
    if missing:
        raise RuntimeError(f"{getattr(owner, '__name__', owner)} has no {missing}: the checkpoint-loading code "
                           "changed; re-audit megatron_grin/compat.py's security accommodations for this version.")


def _dcp_metadata_reader() -> None:
    # torch DCP's FileSystemReader.read_metadata pickle.load()s .metadata (any class, any call): megatron's
    # torch_dist loader, load_tensors_metadata and our own readers all come through here.
    _need(dcp_filesystem.FileSystemReader, "read_metadata")
    dcp_filesystem.FileSystemReader.read_metadata = _safe_read_metadata


def _dcp_load_bytes() -> None:
    # DefaultLoadPlanner.load_bytes torch.load()s every BYTE_IO item of the .distcp files (megatron's
    # ShardedObjects: rng_state, *._extra_state) with weights_only=False.
    _need(DefaultLoadPlanner, "load_bytes")
    DefaultLoadPlanner.load_bytes = _safe_load_bytes


def _common_pt_loader() -> None:
    # strategies/common.py loads common.pt (and <key>.pt sharded objects) with torch.load() without
    # weights_only: safe only under torch >= 2.6's default, which TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns off.
    _need(mcore_common, "torch", "TorchCommonLoadStrategy")
    mcore_common.torch = _ModuleProxy(torch, load=functools.partial(_weights_only_load, _load=torch.load))


def _safe_np_load(file, mmap_mode=None, allow_pickle=False, *, _load: Callable = np.load, **kwargs):
    """numpy.load for megatron's index caches: a plain integer .npy, never a pickle, .npz or object array."""
    name, fix = _name_of(file), "Delete the cache directory (--data-cache-path) to have it rebuilt."
    if isinstance(file, (str, os.PathLike)):
        with open(file, "rb") as fh:
            if fh.read(len(np.lib.format.MAGIC_PREFIX)) != np.lib.format.MAGIC_PREFIX:
                raise UnsafeFileError(f"{name} is not a .npy array (a pickle or .npz?): refusing this dataset "
                                      f"index cache file. {fix}")
    try:
        arr = _load(file, mmap_mode=mmap_mode, allow_pickle=False, **kwargs)
    except ValueError as err:  # an object array: "cannot be loaded when allow_pickle=False"
        raise UnsafeFileError(f"{name} holds Python objects, not an index array ({err}). {fix}") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "iu":
        raise UnsafeFileError(f"{name} is not an integer index array. {fix}")
    return arr


DATASET_MODULES = ("megatron.core.datasets.gpt_dataset", "megatron.core.datasets.blended_dataset",
                   "megatron.core.datasets.masked_dataset")


def _dataset_cache_loader() -> None:
    # megatron.core.datasets reads its .npy index caches (often on a shared file system) with
    # numpy.load(allow_pickle=True), which pickle.load()s a file that is not .npy/.npz. The caches hold only
    # integer arrays, so each module's `numpy` name gets a load that refuses anything else.
    for name in DATASET_MODULES:
        module = importlib.import_module(name)
        _need(module, "numpy")
        module.numpy = _ModuleProxy(np, load=functools.partial(_safe_np_load, _load=np.load))


def _writer_processes_die_with_rank() -> None:
    # torch_dist saving forks one writer process per file bucket and keeps a multiprocessing Manager server
    # for the write results; kill -9 of the rank left them running, and Slurm's SIGTERM/SIGUSR1 to every
    # process of the step killed the Manager before the save that signal asks for. They now die with the
    # rank, and only with it.
    cls = filesystem_async.FileSystemWriterAsync
    _need(cls, "write_preloaded_data")
    _need(filesystem_async, "_get_write_results_queue", "_results_queue")
    write = cls.__dict__["write_preloaded_data"].__func__

    @functools.wraps(write)
    def write_and_die_with_rank(*args, **kwargs):
        writer_process_init()
        return write(*args, **kwargs)

    def results_queue():
        if filesystem_async._results_queue is None:
            manager = SyncManager(ctx=torch.multiprocessing.get_context("spawn"))
            manager.start(initializer=writer_process_init)
            filesystem_async._results_queue = manager.Queue()
        return filesystem_async._results_queue

    cls.write_preloaded_data = staticmethod(write_and_die_with_rank)
    filesystem_async._get_write_results_queue = results_queue


def _linear_in_fp32(linear: Callable) -> Callable:
    """megatron's ``linear_with_grad_accumulation_and_async_allreduce`` (0.16 signature) in fp32 where a bf16 GEMM
    would hit the CPU's slow reference kernel (ops/cpu_gemm.py says why and when).

    The fp32 copies of input, weight and bias go through the same autograd function (so the tensor-parallel
    communication is unchanged); the weight gradient reaches the bf16 parameter through the cast, where megatron's
    DDP hook adds it to main_grad as before. Left alone with gradient-accumulation fusion or deferred embedding
    wgrad, which write into ``weight.main_grad`` themselves (CUDA only).
    """

    @functools.wraps(linear)
    def wrapped(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                grad_output_buffer=None, wgrad_deferral_limit=0, async_grad_allreduce=None, tp_group=None):
        kw = {"gradient_accumulation_fusion": gradient_accumulation_fusion, "allreduce_dgrad": allreduce_dgrad,
              "sequence_parallel": sequence_parallel, "grad_output_buffer": grad_output_buffer,
              "wgrad_deferral_limit": wgrad_deferral_limit, "async_grad_allreduce": async_grad_allreduce,
              "tp_group": tp_group}
        if gradient_accumulation_fusion or grad_output_buffer is not None or not reference_gemm(weight):
            return linear(input, weight, bias, **kw)
        out = linear(input.float(), weight.float(), None if bias is None else bias.float(), **kw)
        return out.to(input.dtype)

    wrapped.fp32_on_reference_gemm = True  # marks the wrapper (applied once)
    return wrapped


def _bf16_gemm_in_fp32() -> None:
    # megatron's linear layers (forward and backward; Column/RowParallelLinear look the function up per call) and
    # its unfused attention (baddbmm, bmm) take the fp32 route on CPUs without a bf16 GEMM.
    linear = mlayers.linear_with_grad_accumulation_and_async_allreduce
    if not getattr(linear, "fp32_on_reference_gemm", False):
        mlayers.linear_with_grad_accumulation_and_async_allreduce = _linear_in_fp32(linear)
    dot_product_attention.torch = _TorchProxy({"baddbmm": in_fp32(torch.baddbmm), "bmm": in_fp32(torch.bmm)})


def _quiet_unknown_mlp_type() -> None:
    # TransformerLayer logs "Unknown MLP type" for every MoELayer subclass it builds; GrinMoELayer is one.
    logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_UnknownMlpTypeFilter())


class _UnknownMlpTypeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Unknown MLP type" not in record.getMessage()


# --- call-site accommodations: used where the code needs them, gated on the verified megatron-core versions --------
def _verified(what: str) -> bool:
    verified = mcore_version()[:2] in VERIFIED_MCORE
    if not verified:
        log.warning("%s: megatron-core %s is outside the verified range %s; not applied", what,
                    package_info.__version__, VERIFIED_MCORE)
    return verified


@contextlib.contextmanager
def megatron_allocates_on_meta():
    """Inside a ``torch.device("meta")`` build: megatron 0.16 allocates parameters on
    ``torch.cuda.current_device()`` explicitly, so that is pointed at "meta" too for the duration."""
    if not _verified("megatron_allocates_on_meta"):
        yield
        return
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: "meta"  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.cuda.current_device = original  # type: ignore[assignment]


def fully_parallel_load_runs() -> bool:
    """Whether --ckpt-fully-parallel-load can run here: megatron-core 0.16's FullyParallelLoadStrategyWrapper
    exchanges the loaded shards as CUDA tensors (exchange_utils.exchange_loaded_tensors_broadcast), so without
    CUDA each data-parallel rank reads its own shards instead (the default load)."""
    return torch.cuda.is_available() or mcore_version()[:2] not in VERIFIED_MCORE


class _SingleProcessBlendBuilder(BlendedMegatronDatasetBuilder):
    """megatron 0.16.1's BlendedDataset calls torch.distributed.get_rank() on a cache miss even without a process
    group; single-process, its (cheap to rebuild) cache is skipped instead."""

    @staticmethod
    def build_generic_dataset(dataset_cls, is_built_on_rank, synchronize_ranks, *args):
        if dataset_cls is BlendedDataset and not torch.distributed.is_initialized():
            args = (*args[:-1], dataclasses.replace(args[-1], path_to_cache=None))
        return BlendedMegatronDatasetBuilder.build_generic_dataset(
            dataset_cls, is_built_on_rank, synchronize_ranks, *args)


def dataset_builder_class() -> type:
    """megatron's BlendedMegatronDatasetBuilder, with the single-process blend fix where the version needs it."""
    return _SingleProcessBlendBuilder if _verified("dataset_builder_class") else BlendedMegatronDatasetBuilder


def _release(version: str) -> tuple[int, ...]:
    out = []
    for part in version.split("+")[0].split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        out.append(int(digits))
        if digits != part:
            break
    return tuple(out)


def check_security_gate(mcore: tuple[int, ...], torch_version: str = torch.__version__) -> None:
    """Refuse to run where the security accommodations were not audited (they would patch the wrong code)."""
    have = _release(torch_version)[:2]
    if have < AUDITED_TORCH[0]:
        raise RuntimeError(f"torch {torch_version}: torch.load defaults to unpickling arbitrary objects before "
                           "2.6, so checkpoints cannot be read safely. Install torch >= 2.6.")
    if have < AUDITED_TORCH[1] and tuple(mcore[:2]) in VERIFIED_MCORE:
        return
    if os.environ.get(UNAUDITED_ENV) == "1":
        log.warning("%s=1: applying the safe-loading patches to torch %s / megatron-core %s, which they were "
                    "not audited for", UNAUDITED_ENV, torch_version, ".".join(map(str, mcore)))
        return
    raise RuntimeError(f"torch {torch_version} / megatron-core {'.'.join(map(str, mcore))}: the safe checkpoint "
                       f"and dataset-cache loading in megatron_grin/compat.py was audited for torch "
                       f"{AUDITED_TORCH[0]}..{AUDITED_TORCH[1]} (exclusive) and megatron-core {VERIFIED_MCORE}. "
                       f"Use those versions, or re-audit the loaders; {UNAUDITED_ENV}=1 runs anyway.")


ACCOMMODATIONS: tuple[Accommodation, ...] = (
    Accommodation("te_general_gemm", "0.16.1 NameError in router_gating_linear without Transformer Engine",
                  cpu_only=False, apply=_te_general_gemm),
    Accommodation("gpt_dataset_loss_mask_cache", "GPTDataset's cached loss mask keeps the first sample's "
                  "pad-label zeros", cpu_only=False, apply=_gpt_dataset_loss_mask_cache),
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
    Accommodation("quiet_unknown_mlp_type", "TransformerLayer logs 'Unknown MLP type' for MoELayer subclasses",
                  cpu_only=False, apply=_quiet_unknown_mlp_type),
    Accommodation("bf16_gemm_in_fp32", "bf16 linear/attention GEMMs in fp32 where the CPU has no bf16 GEMM "
                  "(torch's reference kernel is 15-70x slower)", cpu_only=True, apply=_bf16_gemm_in_fp32),
    *(Accommodation(name, why, cpu_only=False, apply=fn, needed_below=(99, 0), security=True) for name, why, fn in (
        ("dcp_metadata_reader", "torch DCP unpickles .metadata with any class", _dcp_metadata_reader),
        ("dcp_load_bytes", "torch DCP loads ShardedObject bytes with weights_only=False", _dcp_load_bytes),
        ("common_pt_loader", "megatron loads common.pt without weights_only", _common_pt_loader),
        ("dataset_cache_loader", "megatron loads index caches with allow_pickle=True", _dataset_cache_loader),
        ("writer_processes_die_with_rank", "torch_dist writer processes outlive a killed rank",
         _writer_processes_die_with_rank))),
)

#: environment variable that lets the security accommodations run on unaudited torch/megatron-core versions
UNAUDITED_ENV = "MEGATRON_GRIN_UNAUDITED_LOADERS"
_applied: list[str] = []


def select(version: tuple[int, ...], cuda: bool) -> list[Accommodation]:
    """The accommodations a megatron-core version needs on a machine with or without CUDA."""
    return [acc for acc in ACCOMMODATIONS
            if tuple(version[:2]) < acc.needed_below and not (acc.cpu_only and cuda)]


def apply() -> list[str]:
    """Apply every accommodation needed on this machine and megatron-core version; idempotent.

    Returns the names of the accommodations in effect. Raises RuntimeError where the security ones cannot be
    applied (unaudited versions, missing hook points): nothing is loaded unprotected.
    """
    return _apply(lambda acc: True)


def apply_security() -> list[str]:
    """Only the security accommodations (for code that reads checkpoints or caches but trains nothing)."""
    return _apply(lambda acc: acc.security)


def _apply(wanted: Callable[[Accommodation], bool]) -> list[str]:
    version = mcore_version()
    todo = [acc for acc in select(version, torch.cuda.is_available()) if wanted(acc) and acc.name not in _applied]
    if todo and not _applied and version[:2] not in VERIFIED_MCORE:
        log.warning("megatron-core %s is outside the verified range %s; applying only accommodations "
                    "whose gate admits it", ".".join(map(str, version)), VERIFIED_MCORE)
    if any(acc.security for acc in todo):
        check_security_gate(version)
    for acc in todo:
        acc.apply()
        _applied.append(acc.name)
    return list(_applied)


def applied() -> list[str]:
    return list(_applied)
