"""Read and write megatron-grin distributed checkpoints one layer at a time, in a single CPU process.

megatron-core's ``torch_dist`` checkpoints store each parameter under a global key with global
offsets, so any TP/PP layout can be read through the sharded state dict of a TP=1/PP=1 model:

* :class:`CheckpointReader` builds that model on the *meta* device (no weights), and loads the
  parameters of one layer at a time by passing only their entries to ``dist_checkpointing.load``.
* :func:`save_streaming` writes a checkpoint through ``dist_checkpointing.save`` with a strategy whose
  planner produces each tensor on demand (layer by layer) while torch.distributed.checkpoint
  writes it, so the whole model never sits in memory. The files hold TP=1/PP=1 chunks; megatron
  reshards them on load into any TP/PP layout (weights are layout-independent in ``torch_dist``).

Directory layout (the trainer's): ``<root>/iter_{N:07d}/`` (``.tmp`` suffix while being written),
``<root>/latest_checkpointed_iteration.txt``, and ``grin_config.json`` inside each iteration dir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import re
from typing import Callable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.core import CheckpointingException
from torch.distributed.checkpoint.api import CheckpointException
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.planner import WriteItemType

from megatron_grin import compat
from megatron_grin.ckpt_format import (
    MODEL_KEY,
    CheckpointError,
    checkpoint_candidates,
    is_complete,
    iteration_of,
    unfinished_saves,
)
from megatron_grin.ckpt_integrity import checkpoint_problems, damage_report
from megatron_grin.ckpt_format import find_checkpoint as find_checkpoint_in
from megatron_grin.config import GrinConfig
from megatron_grin.convert.hf_io import ConversionError
from megatron_grin.model.build import build_model, build_model_on_meta
from megatron_grin.training.checkpointing import sharded_metadata
from megatron_grin.training.run_checks import foreign_content

log = logging.getLogger(__name__)

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


# --- which checkpoint -------------------------------------------------------------------------------------
def find_checkpoint(load: str, iteration: Optional[int] = None) -> tuple[str, Optional[int]]:
    """Resolve ``--load`` (a save root or an iteration directory) to a complete iteration directory.

    From a save root, the same choice as the trainer's resume (``ckpt_format.find_checkpoint``).
    """
    if not os.path.isdir(load):
        raise CheckpointError(f"--load {load!r} does not exist or is not a directory.")
    it = iteration_of(load)
    if it is not None or is_complete(load):  # an iteration directory itself
        if not is_complete(load):
            raise CheckpointError(f"{load} is not a complete distributed checkpoint (no metadata.json/.metadata): "
                                  "the save did not finish.")
        if iteration is not None and it is not None and iteration != it:
            raise CheckpointError(f"--iteration {iteration} disagrees with --load {load} (iteration {it}).")
        return load, it
    found = find_checkpoint_in(load, iteration)
    if found is None:
        unfinished = unfinished_saves(load)
        if unfinished:
            raise CheckpointError(f"{load} has only unfinished checkpoint(s) {unfinished}: they are still being "
                                  "written or the run died while saving. Wait for the save to finish.")
        foreign = foreign_content(load)
        raise CheckpointError(f"{load} contains no complete checkpoint (no iter_NNNNNNN directory with "
                              "metadata.json)" + (f": it holds {foreign}." if foreign else "."))
    return found[1], found[0]


_verified: dict[str, list] = {}


def check_files(iter_dir: str) -> None:
    """The trainer's check before use (ckpt_integrity.checkpoint_problems): every file present, complete and, with
    a manifest, matching its checksum. The converter never falls back: it exports what it was asked to."""
    stamp = [os.stat(os.path.join(iter_dir, n)).st_mtime_ns for n in sorted(os.listdir(iter_dir))] \
        if os.path.isdir(iter_dir) else None
    key = os.path.realpath(iter_dir)
    if stamp is not None and _verified.get(key) == stamp:  # checked in this process, unchanged since
        return
    problems = checkpoint_problems(iter_dir)
    if not problems:
        _verified[key] = stamp
    else:
        root = os.path.dirname(os.path.normpath(iter_dir))
        intact = [it for it, path in checkpoint_candidates(root) if path != iter_dir] if os.path.isdir(root) else []
        hint = f" Complete checkpoints beside it: iterations {sorted(intact)} (pick one with --iteration N)." \
            if intact else ""
        raise ConversionError(f"{damage_report(iter_dir, problems)}. Restore the files (or re-copy the checkpoint)."
                              f"{hint}")


# --- single-process megatron -----------------------------------------------------------------------------
@contextlib.contextmanager
def single_process_megatron() -> Iterator[None]:
    """A one-rank gloo world with TP=1/PP=1 parallel state, torn down afterwards (reentrant-safe)."""

    compat.apply()
    own_pg = not dist.is_initialized()
    if own_pg:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise RuntimeError("checkpoint conversion runs in a single process; torch.distributed has "
                           f"{dist.get_world_size()} ranks here.")
    own_mp = not parallel_state.model_parallel_is_initialized()
    if own_mp:
        parallel_state.initialize_model_parallel(1, 1)
    rng = torch.get_rng_state()
    model_parallel_cuda_manual_seed(0)
    try:
        yield
    finally:
        torch.set_rng_state(rng)
        if own_mp:
            parallel_state.destroy_model_parallel()
        if own_pg:
            dist.destroy_process_group()


def tp1_config(cfg: GrinConfig) -> GrinConfig:
    """The same model as one TP=1/PP=1 chunk with the portable (local) expert backend."""
    return cfg.replace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                       virtual_pipeline_model_parallel_size=None, sequence_parallel=None,
                       expert_tensor_parallel_size=None, expert_backend="sequential",
                       recompute_granularity=None, recompute_method=None, recompute_num_layers=None)


def build_tp1_model(cfg: GrinConfig, device: str = "meta", dtype: Optional[torch.dtype] = None):
    """A TP=1/PP=1 model, on the meta device by default (no weights allocated, no initialisation)."""

    cfg1 = tp1_config(cfg)
    if dtype is not None:
        cfg1 = cfg1.replace(bf16=dtype == torch.bfloat16)
    if device == "meta":
        return build_model_on_meta(cfg1, use_te=False)
    with torch.device(device):
        return build_model(cfg1, use_te=False, perform_initialization=False, use_cpu_initialization=True)


def _singleton_experts(stored_keys) -> bool:
    """megatron's 'singleton_local_shards' layout stores experts under per-expert keys."""
    return any(re.search(r"\.experts\.experts\.\d+\.", k) for k in stored_keys)


def model_sharded_state_dict(model, singleton_local_shards: bool = False) -> dict:
    return model.sharded_state_dict(metadata={"singleton_local_shards": singleton_local_shards})


def layer_of(name: str) -> Optional[int]:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


# --- reading ---------------------------------------------------------------------------------------------
class CheckpointReader:
    """Loads the parameters of a megatron-grin checkpoint, a few at a time, under TP=1 names."""

    def __init__(self, iter_dir: str, cfg: GrinConfig):
        self.iter_dir = iter_dir
        self.cfg = cfg
        check_files(iter_dir)
        self.stored = dist_checkpointing.load_tensors_metadata(iter_dir)  # sharded key -> meta ShardedTensor
        model = build_tp1_model(cfg)
        sharded = model_sharded_state_dict(model, _singleton_experts(self.stored))
        params = {name for name, _ in model.named_parameters()}
        self.entries: dict[str, object] = {}
        for name in params:
            entry = sharded.get(name)
            if not isinstance(entry, (ShardedTensor, ShardedTensorFactory)):
                raise ConversionError(f"internal: no sharded entry for parameter {name}")
            self.entries[name] = entry
        self._check_keys()
        self.param_shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}

    def _check_keys(self) -> None:
        missing, wrong = [], []
        for name, entry in self.entries.items():
            for leaf in _leaves(entry):
                stored = self.stored.get(leaf.key)
                if stored is None:
                    missing.append(f"{name} ({leaf.key})")
                elif tuple(stored.global_shape) != tuple(leaf.global_shape):
                    wrong.append((name, tuple(stored.global_shape), tuple(leaf.global_shape)))
        if missing:
            raise ConversionError(f"{self.iter_dir} lacks {len(missing)} parameter(s) of the model grin_config.json "
                                  f"describes, e.g. {missing[:3]}.")
        if wrong:
            name, got, want = wrong[0]
            raise ConversionError(f"{self.iter_dir}: {len(wrong)} tensor(s) do not match grin_config.json, e.g. {name}: "
                                  f"{got} stored, {want} expected.")

    def stored_dtype(self, name: str) -> torch.dtype:
        return self.stored[_leaves(self.entries[name])[0].key].dtype

    def names(self, layer: Optional[int]) -> list[str]:
        """Parameter names of one decoder layer, or of the embedding/final norm/output layer (None)."""
        return sorted(n for n in self.entries if layer_of(n) == layer)

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read the given parameters (full, unsharded, in their stored dtype)."""

        request, shapes, factories = {}, {}, {}
        for name in names:
            entry = dataclasses.replace(self.entries[name], data=torch.empty(
                self.entries[name].data.shape, dtype=self.stored_dtype(name)))
            if isinstance(entry, ShardedTensorFactory):  # applied here, so that its pieces can be rewritten
                factories[name] = entry
                entry = entry.build()
            request[name], shapes[name] = _without_prepended_axes(entry)
        try:
            # a partial request cannot pass megatron's whole-tensor coverage check: skip it
            loaded = dist_checkpointing.load({MODEL_KEY: request}, self.iter_dir, validate_access_integrity=False)
        except CheckpointingException as err:
            raise ConversionError(f"cannot read {self.iter_dir}: {err}") from None
        out = {}
        for name in names:
            value = _reshape_like(loaded[MODEL_KEY][name], shapes[name])
            out[name] = factories[name].merge_fn(value) if name in factories else value
        return out


def _leaves(entry) -> list:
    """The ShardedTensors an entry stands for (a factory is built, on its meta data)."""

    if isinstance(entry, ShardedTensorFactory):
        entry = entry.build()
    if isinstance(entry, ShardedTensor):
        return [entry]
    values = entry.values() if isinstance(entry, dict) else entry
    return [leaf for v in values for leaf in _leaves(v)]


def _without_prepended_axes(x):
    """Rewrite layer-stacked ShardedTensors (prepended layer axis) as explicit chunks of the global tensor.

    megatron turns prepended-axis tensors into torch ShardedTensors that assume every other chunk lives
    on another rank; in a one-rank world that is wrong for a partial (one layer) request. An explicit
    chunk (local shape with the leading 1s, no prepended axes, no regular grid) reads the same bytes.
    Returns the rewritten structure and the original local shapes (same nesting).
    """

    if isinstance(x, ShardedTensor):
        p = x.prepend_axis_num
        if not p:
            return x, tuple(x.local_shape)
        local = (1,) * p + tuple(x.local_shape)
        return dataclasses.replace(x, data=x.data.reshape(local), local_shape=local, prepend_axis_num=0,
                                   axis_fragmentations=None), tuple(x.local_shape)
    if isinstance(x, dict):
        pairs = {k: _without_prepended_axes(v) for k, v in x.items()}
        return {k: v[0] for k, v in pairs.items()}, {k: v[1] for k, v in pairs.items()}
    if isinstance(x, list):
        pairs = [_without_prepended_axes(v) for v in x]
        return [v[0] for v in pairs], [v[1] for v in pairs]
    raise ConversionError(f"internal: unexpected sharded entry {type(x).__name__}")


def _reshape_like(x, shapes):
    if isinstance(x, torch.Tensor):
        return x.reshape(shapes)
    if isinstance(x, dict):
        return {k: _reshape_like(v, shapes[k]) for k, v in x.items()}
    return [_reshape_like(v, s) for v, s in zip(x, shapes)]


# --- writing ---------------------------------------------------------------------------------------------
def _writer_and_planner(table: Mapping, produce: Callable[[Optional[int]], Mapping[str, torch.Tensor]],
                        checkpoint_dir: str):
    """A FileSystemWriter that writes layer by layer and a planner that produces tensors on demand."""

    def bucket(item) -> tuple[int, int]:
        if item.type == WriteItemType.BYTE_IO:
            return (-2, 0)
        layer = layer_of(table[(item.index.fqn, tuple(item.index.offset))][0])
        return (-1, 0) if layer is None else (layer, 0)

    class LazyPlanner(MCoreSavePlanner):
        cached: tuple = (None, {})

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            name, size, stride, offset, dtype = table[(write_item.index.fqn, tuple(write_item.index.offset))]
            layer = layer_of(name)
            if self.cached[0] != layer or not self.cached[1]:
                self.cached = (None, {})  # drop the previous layer before producing the next one
                self.cached = (layer, {k: v.to(dtype).contiguous() for k, v in produce(layer).items()})
            full = self.cached[1][name]
            return full.as_strided(size, stride, offset).reshape(write_item.tensor_data.chunk.sizes)

    class LayerFileWriter(FileSystemWriter):
        """One data file per layer, written in layer order (keeps one layer in memory)."""

        def write_data(self, plan, planner):
            items = sorted(plan.items, key=bucket)  # stable: keeps the plan order inside a layer
            if not hasattr(self, "_write_data"):
                # torch without the private _write_data hook (2.13 has it): public API only, one file per
                # tensor, still in layer order
                self.single_file_per_rank = False
                return super().write_data(dataclasses.replace(plan, items=items), planner)

            files: queue.Queue = queue.Queue()
            groups: dict[tuple, list] = {}
            for item in items:
                groups.setdefault(bucket(item), []).append(item)
            for n, group in enumerate(groups.values()):
                name = f"{plan.storage_data.prefix}{n}.distcp"
                files.put((self.fs.concat_path(self.path, name), name, group))
            return self._write_data(planner, files)

    writer = LayerFileWriter(checkpoint_dir, single_file_per_rank=True, sync_files=True, thread_count=1)
    return writer, LazyPlanner(dedup_replicated_tensors=False, flatten_state_dict=False)


def sync_save_strategy():
    """megatron's ``torch_dist`` format written synchronously by torch.distributed.checkpoint, no forking.

    megatron-core 0.16's own writer (FileSystemWriterAsync) forks writer processes and calls
    ``torch.cuda.synchronize()``; on CPU-only gloo runs that fails or can deadlock. The files are the same.
    """

    class SyncSaveStrategy(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            writer, planner = self.writer_and_planner(flat, str(checkpoint_dir))
            dcp.save(mcore_to_pyt_state_dict(flat, False), storage_writer=writer, planner=planner)

        def writer_and_planner(self, flat, checkpoint_dir):
            return (FileSystemWriter(checkpoint_dir, single_file_per_rank=True, sync_files=True, thread_count=1),
                    MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False))

    return SyncSaveStrategy("torch_dist", 1)


def _streaming_strategy(sources: Mapping[int, str], dtypes: Mapping[str, torch.dtype],
                        produce: Callable[[Optional[int]], Mapping[str, torch.Tensor]]):
    """sync_save_strategy() whose tensors are produced on demand, one layer at a time (one rank only)."""

    strategy = sync_save_strategy()

    def writer_and_planner(flat, checkpoint_dir):
        table = {}
        for key, shards in flat.items():
            for sh in shards:
                if isinstance(sh, ShardedTensor):
                    name = sources[id(sh)]
                    d = sh.data  # a meta view of the parameter: its geometry says which part to write
                    table[(key, tuple(sh.global_offset))] = (name, d.size(), d.stride(), d.storage_offset(),
                                                             dtypes[name])
        return _writer_and_planner(table, produce, checkpoint_dir)

    strategy.writer_and_planner = writer_and_planner
    return strategy


def save_streaming(cfg: GrinConfig, checkpoint_dir: str,
                   produce: Callable[[Optional[int]], Mapping[str, torch.Tensor]],
                   common: Optional[dict] = None) -> None:
    """Write a megatron-grin checkpoint of ``cfg``'s model into (existing, empty) ``checkpoint_dir``.

    ``produce(layer)`` returns the full (TP=1) parameters of decoder layer ``layer`` under their
    megatron names, or of the embedding, final norm and output layer for ``layer=None``. It is
    called once per layer, in order, while the files are being written.
    """

    model = build_tp1_model(cfg)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    sharded = model_sharded_state_dict(model)
    sources: dict[int, str] = {}

    def remember(x, name):
        if isinstance(x, ShardedTensor):
            sources[id(x)] = name
        elif isinstance(x, dict):
            for v in x.values():
                remember(v, name)
        elif isinstance(x, list):
            for v in x:
                remember(v, name)

    for name in list(sharded):
        if isinstance(sharded[name], ShardedTensorFactory):  # build now, so every piece knows its parameter
            sharded[name] = sharded[name].build()
        remember(sharded[name], name)

    state = {MODEL_KEY: sharded, **(common or {})}
    try:
        dist_checkpointing.save(state, checkpoint_dir, sharded_strategy=_streaming_strategy(sources, dtypes, produce),
                                content_metadata=sharded_metadata(use_distributed_optimizer=False))
    except CheckpointException as err:  # torch wraps what produce() or the file system raised (a BaseException)
        raise _first_failure(err, checkpoint_dir) from None


def _first_failure(err: CheckpointException, where: str) -> Exception:
    """The ConversionError or OSError behind a DCP CheckpointException, else a ConversionError saying what failed."""
    for failure in err.failures.values():  # {rank: (exception, traceback)}
        exc = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(exc, (ConversionError, OSError)):
            return exc
    return ConversionError(f"writing {where} failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
