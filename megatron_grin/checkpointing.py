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
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from megatron_grin.config import ConfigError, GrinConfig

log = logging.getLogger(__name__)

CONFIG_NAME = "grin_config.json"
TRACKER_NAME = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 1
#: grin_config.json also records the concrete expert backend, whose parameter layout the optimizer state follows.
RESOLVED_BACKEND_KEY = "resolved_expert_backend"
#: GrinConfig fields that define the model's function; a checkpoint that differs in any is refused.
MODEL_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "kv_channels", "vocab_size", "make_vocab_size_divisible_by", "max_position_embeddings",
                "rotary_base", "sliding_window", "layernorm_epsilon", "num_experts", "moe_router_topk")


# --- directory layout (no process group needed) ----------------------------------------------------------
def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def is_complete(path: str) -> bool:
    """A committed checkpoint: final name, megatron's metadata and our config file all present."""
    if path.endswith(".tmp") or not os.path.isdir(path):
        return False
    return all(os.path.isfile(os.path.join(path, n)) for n in (CONFIG_NAME, "metadata.json", ".metadata"))


def read_tracker(root: str) -> Optional[int]:
    try:
        with open(os.path.join(root, TRACKER_NAME), encoding="utf-8") as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def complete_iterations(root: str) -> list[int]:
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.startswith("iter_") and name[5:].isdigit() and is_complete(os.path.join(root, name)):
            found.append(int(name[5:]))
    return sorted(found)


def find_checkpoint(root: str, step: Optional[int] = None) -> Optional[tuple[int, str]]:
    """(iteration, directory) of the checkpoint --load resumes from, or None if there is none.

    The tracker's iteration when that checkpoint is complete, else the newest complete one (a save
    killed before the tracker moved, or a tracker pointing at a deleted or partial directory).
    """
    if step is not None:
        path = iteration_dir(root, step)
        if not is_complete(path):
            raise ConfigError(f"--ckpt-step {step}: {path} is not a complete checkpoint")
        return step, path
    tracked = read_tracker(root)
    if tracked is not None and is_complete(iteration_dir(root, tracked)):
        return tracked, iteration_dir(root, tracked)
    complete = complete_iterations(root)
    if tracked is not None:
        log.warning("%s names iteration %d but %s is not a complete checkpoint; %s", TRACKER_NAME, tracked,
                    iteration_dir(root, tracked), f"using iteration {complete[-1]}" if complete else "none is")
    if not complete:
        return None
    return complete[-1], iteration_dir(root, complete[-1])


def _config_json(path: str) -> dict:
    with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as f:
        return json.load(f)


def _config_from_json(data: dict) -> GrinConfig:
    known = {f.name for f in dataclasses.fields(GrinConfig)}
    return GrinConfig(**{k: v for k, v in data.items() if k in known})


def _backend_from_json(data: dict) -> Optional[str]:
    backend = data.get(RESOLVED_BACKEND_KEY) or data.get("expert_backend")
    return None if backend in (None, "auto") else backend


def read_config(path: str) -> GrinConfig:
    return _config_from_json(_config_json(path))


def config_differences(saved: GrinConfig, current: GrinConfig) -> list[tuple[str, Any, Any]]:
    """(field, saved, current) for every model-defining field that differs."""
    out = []
    for name in MODEL_FIELDS:
        a, b = getattr(saved, name), getattr(current, name)
        if name == "kv_channels":
            a, b = saved.head_dim, current.head_dim
        if a != b:
            out.append((name, a, b))
    return out


def saved_expert_backend(path: str) -> Optional[str]:
    """The concrete expert backend a checkpoint was trained with ('auto' resolved at save time), if recorded."""
    return _backend_from_json(_config_json(path))


def check_checkpoint_config(root: str, cfg: GrinConfig, step: Optional[int] = None,
                            load_optim: bool = True) -> Optional[int]:
    """Raise ConfigError if the checkpoint --load would resume was made for a different model, or if its
    optimizer state cannot be loaded because the expert backend lays the expert weights out differently."""
    from megatron_grin.experts import resolve_backend

    found = find_checkpoint(root, step)
    if found is None:
        return None
    iteration, path = found
    data = _config_json(path)
    diffs = config_differences(_config_from_json(data), cfg)
    if diffs:
        listed = "; ".join(f"{'--' + n.replace('_', '-')}: checkpoint {a!r}, this run {b!r}" for n, a, b in diffs)
        raise ConfigError(f"--load {root}: iteration {iteration} was saved for a different model ({listed}). "
                          "Match the flags, or point --load elsewhere.")
    saved, current = _backend_from_json(data), resolve_backend(cfg.expert_backend)
    if load_optim and saved is not None and saved != current:
        raise ConfigError(
            f"--load {root}: iteration {iteration} was trained with expert backend {saved!r}, but this run's "
            f"--grin-expert-backend {cfg.expert_backend} is {current!r}. The weights load into either, the "
            f"optimizer state does not (it is kept per parameter and the backends group the experts' weights "
            f"differently). Pass --grin-expert-backend {saved} to resume exactly, or --no-load-optim to load the "
            f"weights and start a fresh optimizer.")
    return iteration


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


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
    from megatron.core import tensor_parallel

    state = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

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
        from megatron.core import parallel_state as ps

        return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
                "vpp": len(self.model), "dp": ps.get_data_parallel_world_size(),
                "world": torch.distributed.get_world_size()}

    def _model_state(self, metadata: dict) -> dict:
        from megatron.core.utils import unwrap_model

        chunks = unwrap_model(self.model)
        if len(chunks) == 1:
            return {"model": chunks[0].sharded_state_dict(metadata=metadata)}
        return {f"model{i}": chunk.sharded_state_dict(metadata=metadata) for i, chunk in enumerate(chunks)}

    def _rng_object(self, state: Optional[dict]):
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        pp, tp = ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
        return ShardedObject("rng_state", [state], (pp, tp),
                             (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
                             replica_id=ps.get_data_parallel_rank(with_context_parallel=True))

    def _has_optimizer_state(self) -> bool:
        opts = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        local = any(len(o.optimizer.state) > 0 for o in opts if getattr(o, "optimizer", None) is not None)
        from megatron_grin.metrics import all_reduce

        flag = all_reduce(torch.tensor([1.0 if local else 0.0]), torch.distributed.ReduceOp.MAX)  # ranks agree
        return bool(flag.item())

    # -- save ---------------------------------------------------------------------------------------------
    def save(self, state: TrainState) -> str:
        """Write iteration ``state.iteration`` atomically; returns the committed directory."""
        from megatron.core import dist_checkpointing

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
        sd["iteration"] = state.iteration
        sd["checkpoint_version"] = 3.0
        sd["grin"] = {"format": FORMAT_VERSION, "train_state": dataclasses.asdict(state),
                      "layout": self._layout(), "has_optimizer": has_optimizer,
                      "use_distributed_optimizer": self.use_distributed_optimizer, "bf16": self.cfg.bf16,
                      "megatron_core": _mcore_version()}
        dist_checkpointing.save(sd, tmp, sharded_strategy=("torch_dist", 1), content_metadata=meta)
        torch.distributed.barrier()
        if rank0:
            from megatron_grin.experts import resolve_backend

            config = {**dataclasses.asdict(self.cfg), RESOLVED_BACKEND_KEY: resolve_backend(self.cfg.expert_backend)}
            _write_atomic(os.path.join(tmp, CONFIG_NAME), json.dumps(config, indent=2) + "\n")
            _fsync_dir(tmp)
            old = None
            if os.path.exists(final):  # an earlier save of this iteration: replace it only once ours is whole
                old = final + ".old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(root)
            _write_atomic(os.path.join(root, TRACKER_NAME), f"{state.iteration}\n")
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
        from megatron.core import dist_checkpointing
        from megatron.core.utils import unwrap_model

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
            chunk.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"], strict=True)
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
    from torch.distributed.checkpoint import FileSystemReader

    try:
        md = FileSystemReader(path).read_metadata()
    except Exception:  # unreadable metadata: let dist_checkpointing.load report it
        return set()
    return {key.split("/")[0] for key in md.state_dict_metadata}


def _mcore_version() -> str:
    from megatron.core import package_info

    return package_info.__version__
