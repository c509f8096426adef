"""Checkpoints: model, optimizer, LR schedule, RNG and data position in megatron's torch_dist format.

Layout (Megatron-LM's, so its tools and ``megatron-grin convert`` read it)::

    <save>/iter_0000200/                 one complete checkpoint (dist_checkpointing files, grin_config.json,
                                         grin_manifest.json: every file's size and SHA-256, and the run)
    <save>/iter_0000400.tmp/             a save in progress (or one killed mid-way: never loaded)
    <save>/latest_checkpointed_iteration.txt
    <save>/grin_run.json, grin_run.lock  the run that owns the directory, and its lock (save_dir.py)

Saving is atomic: every rank writes into ``iter_N.tmp`` and hashes the files it wrote; rank 0 writes
``grin_config.json`` and the manifest, renames the directory to ``iter_N`` and only then replaces the
tracker file (write-temp + rename). A crash at any point leaves the previous checkpoint loadable; a failed
save (a full disk) removes its ``.tmp`` and says why. ``--ckpt-keep-last N`` deletes this run's older
checkpoints after a successful save (never another run's).

Loading verifies first, before the model is built: the files, their sizes and their digests (each rank
hashes a share) against the manifest. A damaged newest checkpoint makes the run fall back to the newest
intact one with a warning (``--no-ckpt-fallback``: refuse), so an auto-requeued job resumes instead of
crash-looping.

Weights are stored per parameter with global offsets, so they load under any TP/PP/VPP/DP layout.
Optimizer state is reshardable too: the regular optimizer stores it in the model's parameter space and
the distributed optimizer uses megatron's ``fully_reshardable`` format. Switching between the two, or
between fp32 and bf16, loads the weights and starts a fresh optimizer (with a log line saying so).
The RNG state is per (PP, TP) rank and is skipped (logged) when the layout changes.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import logging
import os
import random
import shutil
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from megatron.core import dist_checkpointing, package_info, tensor_parallel
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import (
    get_default_load_sharded_strategy,
    get_default_save_sharded_strategy,
)
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
    FullyParallelSaveStrategyWrapper,
)
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint.api import CheckpointException

from megatron_grin import compat
from megatron_grin.ckpt_format import (
    CONFIG_NAME,
    MANIFEST_NAME,
    MODEL_KEY,
    CheckpointError,
    common_state,
    complete_iterations,
    config_differences,
    config_json,
    estimated_bytes,
    fsync_dir,
    iteration_dir,
    write_atomic,
    write_tracker,
)
from megatron_grin.ckpt_integrity import digest_files, read_manifest, read_metadata_file, write_manifest
from megatron_grin.config import GrinConfig
from megatron_grin.training import megatron_checkpoint
from megatron_grin.training.arguments import megatron_flags
from megatron_grin.training.data_files import parse_data_path
from megatron_grin.training.metrics import all_reduce
from megatron_grin.training.run_checks import check_schedule
from megatron_grin.training.ckpt_choice import agree, all_gather
from megatron_grin.training.save_dir import SaveDir

log = logging.getLogger(__name__)


def _remove_tree(path: str) -> None:
    """Rename first (so a half-deleted directory never looks like a checkpoint), then delete."""
    doomed = f"{path}.deleting"
    try:
        os.replace(path, doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def prune(root: str, keep_last: int, protect: tuple[int, ...] = (),
          owns: Optional[Callable[[int], bool]] = None) -> list[int]:
    """Delete this run's complete checkpoints older than its newest ``keep_last`` (never one in ``protect``,
    never one ``owns`` says is another run's), and the debris of interrupted saves older than the newest."""
    complete = complete_iterations(root)
    mine = [it for it in complete if owns is None or owns(it)]
    doomed = [it for it in mine[:-keep_last] if it not in protect] if keep_last > 0 else []
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
                 save_dir: Optional[SaveDir], keep_last: Optional[int] = None, run_args: Optional[dict] = None,
                 grin_config: Optional[str] = None, fully_parallel_save: bool = True,
                 fully_parallel_load: bool = False):
        self.cfg = cfg
        self.model = model  # DDP-wrapped chunks
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.use_distributed_optimizer = use_distributed_optimizer
        self.save_dir = save_dir
        self.keep_last = keep_last
        self.run_args = run_args or {}  # data and batch settings, compared on resume
        self.grin_config = grin_config  # --grin-config: the model of a checkpoint that has no grin_config.json
        self.fully_parallel_save = fully_parallel_save  # --no-ckpt-fully-parallel-save turns it off
        self.fully_parallel_load = fully_parallel_load  # --ckpt-fully-parallel-load

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

    def _save_strategy(self):
        """Megatron-LM's: torch_dist, and by default its replicated shards' writes spread over the DP ranks
        (otherwise DP rank 0 of every model-parallel group writes them all)."""
        strategy = get_default_save_sharded_strategy("torch_dist")
        if self.fully_parallel_save and ps.get_data_parallel_world_size(with_context_parallel=True) > 1:
            group = ps.get_data_parallel_group(with_context_parallel=True)
            strategy = FullyParallelSaveStrategyWrapper(strategy, group)
        return strategy

    def _load_strategy(self, path: str):
        """None (dist_checkpointing's default), or with --ckpt-fully-parallel-load the reads spread over the DP ranks
        and the shards exchanged between them, where megatron-core can (compat.fully_parallel_load_runs)."""
        if not self.fully_parallel_load or ps.get_data_parallel_world_size(with_context_parallel=True) == 1:
            return None
        if not compat.fully_parallel_load_runs():
            log.warning("--ckpt-fully-parallel-load: not applied without CUDA (megatron-core exchanges the shards as "
                        "CUDA tensors); every data-parallel rank reads its own shards")
            return None
        return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(path),
                                                ps.get_data_parallel_group(with_context_parallel=True))

    def _has_optimizer_state(self) -> bool:
        opts = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        local = any(len(o.optimizer.state) > 0 for o in opts if getattr(o, "optimizer", None) is not None)

        flag = all_reduce(torch.tensor([1.0 if local else 0.0]), torch.distributed.ReduceOp.MAX)  # ranks agree
        return bool(flag.item())

    # -- save ---------------------------------------------------------------------------------------------
    def save(self, state: TrainState) -> str:
        """Write iteration ``state.iteration`` atomically; returns the committed directory."""

        root = self.save_dir.root
        final = iteration_dir(root, state.iteration)
        tmp = final + ".tmp"
        rank0 = torch.distributed.get_rank() == 0
        agree(self._prepare(root, tmp) if rank0 else None)
        try:
            meta = sharded_metadata(self.use_distributed_optimizer)
            has_optimizer = self._has_optimizer_state()
            sd = self._model_state(dict(meta))
            if has_optimizer:  # an optimizer that never stepped (iteration 0) has no state to save
                sd["optimizer"] = _drop_empty_param_state(self.optimizer.sharded_state_dict(sd, metadata=dict(meta)))
            sd["opt_param_scheduler"] = self.scheduler.state_dict()
            sd["rng_state"] = self._rng_object(get_rng_state())
            sd.update(common_state(state.iteration, bf16=self.cfg.bf16, megatron_core=package_info.__version__,
                                   has_optimizer=has_optimizer, use_distributed_optimizer=self.use_distributed_optimizer,
                                   layout=self._layout(), train_state=dataclasses.asdict(state),
                                   run_args=self.run_args))
            dist_checkpointing.save(sd, tmp, sharded_strategy=self._save_strategy(), content_metadata=meta)
            try:  # every rank hashes the files it wrote, in parallel; a failure must not skip the collective
                mine = digest_files(tmp, _own_files(tmp, torch.distributed.get_rank()))
            except OSError as err:
                mine = {"": _save_failure(root, tmp, state.iteration, err)}
            parts = all_gather(mine)
            error = next((part[""] for part in parts if "" in part), None)
            if error is None and rank0:
                error = self._commit(tmp, final, state.iteration, {n: i for part in parts for n, i in part.items()})
        except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
            error = _save_failure(root, tmp, state.iteration, err)
        if error and rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        agree([error] if error else None)
        return final

    def _prepare(self, root: str, tmp: str) -> Optional[list]:
        """Rank 0, before a save: a fresh ``.tmp`` and room for one more checkpoint; the problem otherwise."""
        try:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        except OSError as err:
            return [f"--save {root}: cannot write {tmp} ({err.strerror})."]
        previous = [read_manifest(iteration_dir(root, it)) for it in complete_iterations(root)[-1:]]
        need = sum(f.get("size", 0) for f in previous[0]["files"].values()) if previous and previous[0] else \
            estimated_bytes(self.cfg, with_optimizer=True)
        free = shutil.disk_usage(tmp).free
        if free < need:
            shutil.rmtree(tmp, ignore_errors=True)
            return [f"--save {root}: No space left on device for a checkpoint: about {need / 2**30:.2f} GiB needed, "
                    f"{free / 2**30:.2f} GiB free. Nothing was written; free space (or lower --ckpt-keep-last), "
                    "then resume: the previous checkpoint is intact."]
        return None

    def _commit(self, tmp: str, final: str, iteration: int, digests: dict) -> Optional[str]:
        """Rank 0: config, manifest, rename into place, tracker, pruning; an error text if it failed."""
        root = self.save_dir.root
        try:
            write_atomic(os.path.join(tmp, CONFIG_NAME), config_json(self.cfg))
            rest = set(os.listdir(tmp)) - set(digests) - {MANIFEST_NAME}  # common.pt, metadata, config
            digests.update(digest_files(tmp, rest))
            write_manifest(tmp, digests, self.save_dir.run_id)
            fsync_dir(tmp)
            old = None
            if os.path.exists(final):  # an earlier save of this iteration: replace it only once ours is whole
                other = not self.save_dir.owns(iteration)
                old = f"{final}.run-{(read_manifest(final) or {}).get('run_id', 'unknown')[:8]}" if other else \
                    final + ".old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                if other:
                    log.warning("moved another run's iteration %d aside to %s", iteration, old)
                    old = None
            os.replace(tmp, final)
            fsync_dir(root)
            write_tracker(root, iteration)
            if old:
                shutil.rmtree(old, ignore_errors=True)
        except OSError as err:
            return _save_failure(root, tmp, iteration, err)
        pruned = prune(root, self.keep_last or 0, protect=(iteration,), owns=self.save_dir.owns)
        if pruned:
            log.info("pruned checkpoints %s (--ckpt-keep-last %d)", pruned, self.keep_last)
        return None

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
        load_rng = not (finetune or no_load_rng) and bool(grin) and "rng_state" in _sharded_keys(path)  # ours only
        if saved and (saved.get("tp"), saved.get("pp")) != (layout["tp"], layout["pp"]):
            load_rng = False
            notes.append(f"layout changed (TP {saved.get('tp')} -> {layout['tp']}, PP {saved.get('pp')} -> "
                         f"{layout['pp']}): weights and optimizer are resharded, the RNG state is not restored")
        elif saved and saved != layout:
            notes.append(f"resharding from layout {saved} to {layout}")
        return load_optim, load_rng, notes

    def load(self, found: tuple[int, str], *, finetune: bool = False, no_load_optim: bool = False,
             no_load_rng: bool = False, global_batch_size: int = 1,
             scheduler_policy: str = "refuse") -> "LoadReport":
        """Restore the verified checkpoint ``found`` (from :func:`choose_checkpoint`)."""

        iteration, path = found
        saved, source = megatron_checkpoint.model_config(path, megatron_flags(), self.grin_config)
        diffs = config_differences(saved, self.cfg)
        if diffs:
            raise CheckpointError(f"{path} was saved for a different model: {diffs}")
        common = dist_checkpointing.load_common_state_dict(path)
        foreign = megatron_checkpoint.reading(common, path, _sharded_keys(path), source)  # Megatron-LM's own
        grin = foreign.grin if foreign else common.get("grin") or {}
        load_optim, load_rng, notes = self._load_plan(path, grin, finetune, no_load_optim, no_load_rng)
        notes = ([foreign.note] if foreign else []) + notes
        load_schedule = not (finetune or no_load_optim) and grin.get("has_optimizer") and \
            "opt_param_scheduler" in common
        if load_schedule:
            notes += check_schedule(common["opt_param_scheduler"], self.scheduler.state_dict(), scheduler_policy)
        if not finetune:
            notes += resume_differences(grin.get("run_args") or {}, self.run_args)

        meta = foreign.metadata if foreign else sharded_metadata(self.use_distributed_optimizer)
        template = self._model_state(dict(meta))
        if load_optim:
            template["optimizer"] = self.optimizer.sharded_state_dict(template, is_loading=True, metadata=dict(meta))
            if foreign and not foreign.optimizer_fits(template["optimizer"], path, notes):
                load_optim = False
                del template["optimizer"]
        if load_rng:
            template["rng_state"] = self._rng_object(None)
        try:
            loaded = dist_checkpointing.load(template, path, sharded_strategy=self._load_strategy(path))
        except CheckpointException as err:  # raised on every rank alike (DCP gathers the failures)
            raise CheckpointError(f"--load: {path} could not be read ({_deepest(err)}). Its files passed the "
                                  "checks before loading; restore it, or resume from another with --ckpt-step N.") \
                from None

        chunks = unwrap_model(self.model)
        for i, chunk in enumerate(chunks):
            key = MODEL_KEY if len(chunks) == 1 else f"{MODEL_KEY}{i}"
            _refuse_pickled_extra_state(loaded[key], path)
            chunk.load_state_dict(loaded[key], strict=True)
        if load_optim:
            self.optimizer.load_state_dict(loaded["optimizer"])
        else:  # fp32 main copies (bf16, distributed optimizer) were made from the initial weights
            self.optimizer.reload_model_params()
        # A checkpoint that never stepped (iteration 0, converted weights) has no schedule worth continuing.
        if load_schedule:
            self.scheduler.load_state_dict(_unused_wd_steps_as_now(common["opt_param_scheduler"], self.scheduler))
        if load_rng:
            set_rng_state(foreign.rng(loaded["rng_state"], ps.get_data_parallel_rank()) if foreign else
                          loaded["rng_state"][0])
        state = TrainState() if finetune else _saved_train_state(grin, common, iteration, global_batch_size, notes)
        return LoadReport(iteration=state.iteration, path=path, state=state, loaded_optimizer=load_optim,
                          loaded_rng=load_rng, notes=notes)


def _saved_train_state(grin: dict, common: dict, iteration: int, global_batch_size: int,
                       notes: list) -> TrainState:
    """Iteration and data position of a checkpoint; one without them (e.g. written by `megatron-grin convert
    from-hf`) is taken to have consumed iteration x global batch samples, with a note."""
    if "train_state" in grin:
        return TrainState(**grin["train_state"])
    it = int(common.get("iteration", iteration))
    state = TrainState(iteration=it, consumed_train_samples=it * global_batch_size)
    notes.append(f"no data position in the checkpoint: assuming {state.consumed_train_samples} samples "
                 "consumed (iteration x global batch)")
    return state


def resume_facts(tcfg) -> dict:
    """The data and batch settings a checkpoint records, so a resume can say what changed."""
    data = None
    if tcfg.data_path:
        prefixes, weights = parse_data_path(tcfg.data_path)
        data = {"prefixes": [os.path.abspath(p) for p in prefixes], "weights": weights}
    return {"data_path": data, "mock_data": tcfg.mock_data, "split": tcfg.split, "seq_length": tcfg.seq_length,
            "global_batch_size": tcfg.global_batch_size, "seed": tcfg.seed, "tokenizer": tcfg.tokenizer}


# --- what a resumed run is compared against --------------------------------------------------------------------
#: OptimizerParamScheduler fields megatron's load_state_dict checks (_check_and_set) -> the flag that sets them
def _unused_wd_steps_as_now(saved: dict, scheduler) -> dict:
    """megatron's scheduler asserts that wd_incr_steps (train iterations x batch) matches the checkpoint's even where
    a constant weight decay never reads it; then, like check_schedule, a longer run resumes (the value is moot)."""
    constant = saved.get("wd_incr_style") == scheduler.wd_incr_style == "constant" and \
        saved.get("start_wd") == saved.get("end_wd")
    return {**saved, "wd_incr_steps": scheduler.wd_incr_steps} if constant and "wd_incr_steps" in saved else saved


def resume_differences(saved: dict, current: dict) -> list[str]:
    """Data and batch settings that changed since the checkpoint: allowed (as in Megatron-LM), but the resumed run
    then reads other samples than the interrupted one would have, so each is reported."""
    out = []
    for key in sorted(set(saved) & set(current)):
        if saved[key] != current[key]:
            out.append(f"WARNING: --{key.replace('_', '-')} changed since the checkpoint ({saved[key]!r} -> "
                       f"{current[key]!r}): the resumed run does not continue the interrupted run's data order")
    return out


def _drop_empty_param_state(state: dict) -> dict:
    """The fully_reshardable state lives on data-parallel rank 0; other ranks hold ``param_state=None``,
    which would otherwise enter the common state as a (warned-about) rank difference."""
    if isinstance(state, dict):
        if "param_state" in state and state["param_state"] is None:
            state = {k: v for k, v in state.items() if k != "param_state"}
        return {k: _drop_empty_param_state(v) if isinstance(v, dict) else v for k, v in state.items()}
    return state


def _refuse_pickled_extra_state(state: dict, path: str) -> None:
    """Transformer Engine unpickles a non-empty ``_extra_state`` byte tensor (its FP8 metadata) in
    load_state_dict. megatron-grin trains without FP8, where TE saves an empty tensor: anything else is refused."""
    for key, value in state.items():
        bad = (torch.is_tensor(value) and value.numel() > 0) or \
            (isinstance(value, io.BytesIO) and value.getbuffer().nbytes > 0)
        if "_extra_state" in key and bad:
            raise CheckpointError(f"{path}: {key} holds {type(value).__name__} data that Transformer Engine would "
                                  "unpickle (FP8 metadata, which megatron-grin never writes); refusing to load it.")


def _own_files(tmp: str, rank: int) -> list[str]:
    """The data files this rank wrote (torch_dist names them ``__<rank>_<n>.distcp``)."""
    return sorted(n for n in os.listdir(tmp) if n.startswith(f"__{rank}_") and n.endswith(".distcp"))


def _causes(err: BaseException) -> list:
    """The exception, what it wraps, and DCP's per-rank failures ({rank: (exception, traceback)})."""
    causes, todo = [], [err]
    while todo and len(causes) < 20:
        e = todo.pop(0)
        causes.append(e)
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
        for failure in (getattr(e, "failures", None) or {}).values():
            failure = failure[0] if isinstance(failure, tuple) and failure else failure
            todo += [failure] if isinstance(failure, BaseException) else []
    return causes


def _deepest(err: BaseException) -> str:
    """The first line of the innermost cause ("ExcType: message"), or our own error's whole message."""
    causes = _causes(err)
    ours = [c for c in causes if isinstance(c, CheckpointError)]
    if ours:
        return str(ours[0])
    deepest = causes[-1]
    return (f"{type(deepest).__name__}: {deepest}".splitlines() or [""])[0][:300]


def _save_failure(root: str, tmp: str, iteration: int, err: BaseException) -> str:
    """One paragraph for a failed save: a full disk said as such (torch's writer reports it as 'unexpected pos')."""
    causes = _causes(err)
    full = any(isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e) for e in causes)
    try:
        full = full or shutil.disk_usage(root).free < (64 << 20)
    except OSError:
        pass
    what = _deepest(err)
    head = "No space left on device while saving" if full else "saving failed at"
    fix = "free space (or lower --ckpt-keep-last) and resume" if full else "resume from it once the cause is fixed"
    return (f"--save {root}: {head} iteration {iteration} ({what}). The unfinished {os.path.basename(tmp)} was "
            f"removed; earlier checkpoints are intact: {fix}.")


def _sharded_keys(path: str) -> set:
    """Top-level names of the sharded objects in a checkpoint (cheap: reads .metadata)."""
    try:
        md = read_metadata_file(path)
    except CheckpointError:  # unreadable metadata: verification reported it already
        return set()
    return {key.split("/")[0] for key in md.state_dict_metadata}
