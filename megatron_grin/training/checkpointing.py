"""Checkpoints: model, optimizer, LR schedule, RNG and data position in megatron's torch_dist format.

Layout (Megatron-LM's, so its tools and ``megatron-grin convert`` read it)::

    <save>/iter_0000200/                 one complete checkpoint (dist_checkpointing files + grin_config.json)
    <save>/iter_0000400.tmp/             a save in progress (or one killed mid-way: never loaded)
    <save>/latest_checkpointed_iteration.txt

Saving is atomic: every rank writes into ``iter_N.tmp``; after all ranks finish, rank 0 writes
``grin_config.json`` (the model config), renames the directory to ``iter_N`` and only then replaces the
tracker file (write-temp + rename). A crash at any point leaves the previous checkpoint loadable, and
``--load`` takes the tracker's iteration if that checkpoint is complete, else the newest complete one.
``--ckpt-keep-last N`` deletes older complete checkpoints after a successful save.

Weights are stored per parameter with global offsets, so they load under any TP/PP/VPP/DP layout.
Optimizer state is reshardable too: the regular optimizer stores it in the model's parameter space and
the distributed optimizer uses megatron's ``fully_reshardable`` format. Switching between the two, or
between fp32 and bf16, loads the weights and starts a fresh optimizer (with a log line saying so).
The RNG state is per (PP, TP) rank and is skipped (logged) when the layout changes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from megatron.core import dist_checkpointing, package_info, tensor_parallel
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint import FileSystemReader

from megatron_grin.ckpt_format import (
    CONFIG_NAME,
    MODEL_KEY,
    common_state,
    complete_iterations,
    config_differences,
    config_json,
    find_checkpoint,
    fsync_dir,
    iteration_dir,
    read_config,
    write_atomic,
    write_tracker,
)
from megatron_grin.config import ConfigError, GrinConfig
from megatron_grin.training.metrics import all_reduce

log = logging.getLogger(__name__)

def _remove_tree(path: str) -> None:
    """Rename first (so a half-deleted directory never looks like a checkpoint), then delete."""
    doomed = f"{path}.deleting"
    try:
        os.replace(path, doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def prune(root: str, keep_last: int, protect: tuple[int, ...] = ()) -> list[int]:
    """Delete complete checkpoints older than the newest ``keep_last`` (never one in ``protect``), and the
    debris of interrupted saves older than the newest complete checkpoint."""
    complete = complete_iterations(root)
    doomed = [it for it in complete[:-keep_last] if it not in protect] if keep_last > 0 else []
    for it in doomed:
        _remove_tree(iteration_dir(root, it))
    newest = complete[-1] if complete else -1
    for name in os.listdir(root):  # leftovers of deletions, replaced saves and saves killed before a newer commit
        stem = name[5:].split(".")[0]
        stale_tmp = name.endswith(".tmp") and stem.isdigit() and int(stem) < newest
        if name.startswith("iter_") and (name.endswith((".deleting", ".old")) or stale_tmp):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return doomed


# --- RNG ---------------------------------------------------------------------------------------------------
def get_rng_state() -> dict:
    state = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


# --- save / load -------------------------------------------------------------------------------------------
def sharded_metadata(use_distributed_optimizer: bool) -> dict:
    """How model and optimizer build their sharded state dicts (stored as the checkpoint's content metadata).

    The distributed optimizer's state goes out in ``fully_reshardable`` form (model space, any layout),
    gathered to data-parallel rank 0 over gloo (``mem_efficient``: no full copy on every GPU).
    """
    meta = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if use_distributed_optimizer:
        meta.update(distrib_optim_sharding_type="fully_reshardable",
                    distrib_optim_fully_reshardable_mem_efficient=True)
    return meta


@dataclass
class TrainState:
    """Where training stands; stored in every checkpoint's common state."""

    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0


@dataclass
class LoadReport:
    iteration: int
    path: str
    state: TrainState
    loaded_optimizer: bool
    loaded_rng: bool
    notes: list


class Checkpointer:
    """Saves and loads the trainer's state for one process (collective: call on every rank)."""

    def __init__(self, cfg: GrinConfig, *, model: list, optimizer, scheduler, use_distributed_optimizer: bool,
                 save_dir: Optional[str], load_dir: Optional[str], keep_last: Optional[int] = None):
        self.cfg = cfg
        self.model = model  # DDP-wrapped chunks
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.use_distributed_optimizer = use_distributed_optimizer
        self.save_dir = save_dir
        self.load_dir = load_dir
        self.keep_last = keep_last

    # -- helpers ------------------------------------------------------------------------------------------
    def _layout(self) -> dict:
        return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
                "vpp": len(self.model), "dp": ps.get_data_parallel_world_size(),
                "world": torch.distributed.get_world_size()}

    def _model_state(self, metadata: dict) -> dict:
        chunks = unwrap_model(self.model)
        if len(chunks) == 1:
            return {MODEL_KEY: chunks[0].sharded_state_dict(metadata=metadata)}
        return {f"{MODEL_KEY}{i}": chunk.sharded_state_dict(metadata=metadata) for i, chunk in enumerate(chunks)}

    def _rng_object(self, state: Optional[dict]):
        pp, tp = ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
        return ShardedObject("rng_state", [state], (pp, tp),
                             (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
                             replica_id=ps.get_data_parallel_rank(with_context_parallel=True))

    def _has_optimizer_state(self) -> bool:
        opts = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        local = any(len(o.optimizer.state) > 0 for o in opts if getattr(o, "optimizer", None) is not None)

        flag = all_reduce(torch.tensor([1.0 if local else 0.0]), torch.distributed.ReduceOp.MAX)  # ranks agree
        return bool(flag.item())

    # -- save ---------------------------------------------------------------------------------------------
    def save(self, state: TrainState) -> str:
        """Write iteration ``state.iteration`` atomically; returns the committed directory."""

        root = self.save_dir
        final = iteration_dir(root, state.iteration)
        tmp = final + ".tmp"
        rank0 = torch.distributed.get_rank() == 0
        if rank0:
            os.makedirs(root, exist_ok=True)
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
            os.makedirs(tmp)
        torch.distributed.barrier()

        meta = sharded_metadata(self.use_distributed_optimizer)
        has_optimizer = self._has_optimizer_state()
        sd = self._model_state(dict(meta))
        if has_optimizer:  # an optimizer that never stepped (iteration 0) has no state to save
            sd["optimizer"] = _drop_empty_param_state(self.optimizer.sharded_state_dict(sd, metadata=dict(meta)))
        sd["opt_param_scheduler"] = self.scheduler.state_dict()
        sd["rng_state"] = self._rng_object(get_rng_state())
        sd.update(common_state(state.iteration, bf16=self.cfg.bf16, megatron_core=package_info.__version__,
                               has_optimizer=has_optimizer, use_distributed_optimizer=self.use_distributed_optimizer,
                               layout=self._layout(), train_state=dataclasses.asdict(state)))
        dist_checkpointing.save(sd, tmp, sharded_strategy=("torch_dist", 1), content_metadata=meta)
        torch.distributed.barrier()
        if rank0:

            write_atomic(os.path.join(tmp, CONFIG_NAME), config_json(self.cfg))
            fsync_dir(tmp)
            old = None
            if os.path.exists(final):  # an earlier save of this iteration: replace it only once ours is whole
                old = final + ".old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            fsync_dir(root)
            write_tracker(root, state.iteration)
            if old:
                shutil.rmtree(old, ignore_errors=True)
            pruned = prune(root, self.keep_last or 0, protect=(state.iteration,))  # also clears debris
            if pruned:
                log.info("pruned checkpoints %s (--ckpt-keep-last %d)", pruned, self.keep_last)
        torch.distributed.barrier()
        return final

    # -- load ---------------------------------------------------------------------------------------------
    def _load_plan(self, path: str, grin: dict, finetune: bool, no_load_optim: bool,
                   no_load_rng: bool) -> tuple[bool, bool, list]:
        """(load the optimizer?, load the RNG?, notes for the log) for this checkpoint and this run."""
        notes = []
        layout, saved = self._layout(), grin.get("layout") or {}
        load_optim = not (finetune or no_load_optim)
        if load_optim and not grin.get("has_optimizer"):
            load_optim = False
            notes.append("the checkpoint holds no optimizer state (saved before the first step, or converted): "
                         "starting a fresh optimizer")
        elif load_optim and grin.get("use_distributed_optimizer") != self.use_distributed_optimizer:
            load_optim = False
            notes.append("--use-distributed-optimizer differs from the checkpoint's: loading weights only and "
                         "starting a fresh optimizer")
        elif load_optim and grin.get("bf16") != self.cfg.bf16:
            load_optim = False
            notes.append("--bf16 differs from the checkpoint's: loading weights only and starting a fresh optimizer")
        load_rng = not (finetune or no_load_rng) and "rng_state" in _sharded_keys(path)
        if saved and (saved.get("tp"), saved.get("pp")) != (layout["tp"], layout["pp"]):
            load_rng = False
            notes.append(f"layout changed (TP {saved.get('tp')} -> {layout['tp']}, PP {saved.get('pp')} -> "
                         f"{layout['pp']}): weights and optimizer are resharded, the RNG state is not restored")
        elif saved and saved != layout:
            notes.append(f"resharding from layout {saved} to {layout}")
        return load_optim, load_rng, notes

    def load(self, *, step: Optional[int] = None, finetune: bool = False, no_load_optim: bool = False,
             no_load_rng: bool = False, global_batch_size: int = 1) -> Optional[LoadReport]:
        """Restore from --load; returns None (fresh start) when it holds no checkpoint."""

        found = find_checkpoint(self.load_dir, step)
        if found is None:
            return None
        iteration, path = found
        diffs = config_differences(read_config(path), self.cfg)
        if diffs:
            raise ConfigError(f"{path} was saved for a different model: {diffs}")
        common = dist_checkpointing.load_common_state_dict(path)
        grin = common.get("grin") or {}
        load_optim, load_rng, notes = self._load_plan(path, grin, finetune, no_load_optim, no_load_rng)

        meta = sharded_metadata(self.use_distributed_optimizer)
        template = self._model_state(dict(meta))
        if load_optim:
            template["optimizer"] = self.optimizer.sharded_state_dict(template, is_loading=True, metadata=dict(meta))
        if load_rng:
            template["rng_state"] = self._rng_object(None)
        loaded = dist_checkpointing.load(template, path)

        chunks = unwrap_model(self.model)
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(loaded[MODEL_KEY if len(chunks) == 1 else f"{MODEL_KEY}{i}"], strict=True)
        if load_optim:
            self.optimizer.load_state_dict(loaded["optimizer"])
        else:  # fp32 main copies (bf16, distributed optimizer) were made from the initial weights
            self.optimizer.reload_model_params()
        # A checkpoint that never stepped (iteration 0, converted weights) has no schedule worth continuing.
        if not (finetune or no_load_optim) and grin.get("has_optimizer") and "opt_param_scheduler" in loaded:
            self.scheduler.load_state_dict(loaded["opt_param_scheduler"])
        if load_rng:
            set_rng_state(loaded["rng_state"][0])
        if finetune:
            state = TrainState()
        elif "train_state" in grin:
            state = TrainState(**grin["train_state"])
        else:  # e.g. written by `megatron-grin convert from-hf`
            it = int(common.get("iteration", iteration))
            state = TrainState(iteration=it, consumed_train_samples=it * global_batch_size)
            notes.append(f"no data position in the checkpoint: assuming {state.consumed_train_samples} samples "
                         "consumed (iteration x global batch)")
        return LoadReport(iteration=state.iteration, path=path, state=state, loaded_optimizer=load_optim,
                          loaded_rng=load_rng, notes=notes)


def _drop_empty_param_state(state: dict) -> dict:
    """The fully_reshardable state lives on data-parallel rank 0; other ranks hold ``param_state=None``,
    which would otherwise enter the common state as a (warned-about) rank difference."""
    if isinstance(state, dict):
        if "param_state" in state and state["param_state"] is None:
            state = {k: v for k, v in state.items() if k != "param_state"}
        return {k: _drop_empty_param_state(v) if isinstance(v, dict) else v for k, v in state.items()}
    return state


def _sharded_keys(path: str) -> set:
    """Top-level names of the sharded objects in a checkpoint (cheap: reads .metadata)."""

    try:
        md = FileSystemReader(path).read_metadata()
    except Exception:  # unreadable metadata: let dist_checkpointing.load report it
        return set()
    return {key.split("/")[0] for key in md.state_dict_metadata}
