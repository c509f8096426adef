"""The checkpoint format: directory layout, what "complete" means, the tracker, grin_config.json, the header.

One owner for these facts: the trainer (training/checkpointing.py) and the converter (convert/) both
read and write checkpoints through this module. It imports no torch and no megatron, so flag validation
can check a ``--load`` directory before any process group starts.

Layout (Megatron-LM's, so its tools and ``megatron-grin convert`` read it)::

    <root>/iter_0000200/                 one complete checkpoint (dist_checkpointing files + grin_config.json)
    <root>/iter_0000400.tmp/             a save in progress (or one killed mid-way: never loaded)
    <root>/latest_checkpointed_iteration.txt

Complete = final name (no ``.tmp``) and megatron's ``metadata.json`` and torch's ``.metadata`` present:
``dist_checkpointing.save`` writes those last, and the trainer renames ``.tmp`` away only after
``grin_config.json`` and ``grin_manifest.json`` (every file's size and SHA-256, and the run that wrote it)
are in place. Intact = complete and every file matches the manifest (ckpt_integrity.py).

The manifest, the checksums and the safe reading of ``.metadata`` (a pickle) are ckpt_integrity.py's.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import multiprocessing
import os
import re
import signal
from typing import Any, Optional

from megatron_grin.accounting import parameter_counts
from megatron_grin.config import ConfigError, GrinConfig, resolve_backend

log = logging.getLogger(__name__)

CONFIG_NAME = "grin_config.json"
TRACKER_NAME = "latest_checkpointed_iteration.txt"
#: per-checkpoint list of files with size and digest, and the id of the run that wrote it
MANIFEST_NAME = "grin_manifest.json"
#: hashlib algorithm of new manifests (SHA-NI makes it ~1.8 GB/s per core; each rank hashes its own files)
HASH_ALGORITHM = "sha256"
#: megatron's non-tensor state (torch.save'd dict)
COMMON_NAME = "common.pt"
#: files dist_checkpointing writes after every shard is done
COMMIT_FILES = ("metadata.json", ".metadata")
#: version of the ``grin`` entry of the common state
FORMAT_VERSION = 1
#: megatron's checkpoint_version for torch_dist checkpoints
MEGATRON_CHECKPOINT_VERSION = 3.0
#: top-level key of the model's sharded state dict (megatron's convention; ``model{i}`` per virtual stage)
MODEL_KEY = "model"
#: grin_config.json also records the concrete expert backend, whose parameter layout the optimizer state follows.
RESOLVED_BACKEND_KEY = "resolved_expert_backend"
#: GrinConfig fields that define the model's function; a checkpoint that differs in any is refused.
MODEL_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "kv_channels", "vocab_size", "make_vocab_size_divisible_by", "max_position_embeddings",
                "rotary_base", "sliding_window", "layernorm_epsilon", "num_experts", "moe_router_topk",
                "padded_vocab_size")
_ITER = re.compile(r"^iter_(\d{7})$")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used as asked; the message names the path and what to do."""


# --- layout ------------------------------------------------------------------------------------------------
def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def iteration_of(path: str) -> Optional[int]:
    """The iteration an ``iter_NNNNNNN`` directory holds, else None."""
    match = _ITER.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def is_complete(path: str) -> bool:
    """A committed checkpoint: final name and dist_checkpointing's commit files present."""
    if path.rstrip("/").endswith(".tmp") or not os.path.isdir(path):
        return False
    return all(os.path.isfile(os.path.join(path, name)) for name in COMMIT_FILES)


_WARNED_TRACKERS: set = set()


def read_tracker(root: str) -> Optional[int]:
    """The tracker's iteration; None when there is none, or (said once per file) when it holds no iteration
    number: the newest complete checkpoint is then taken, as for a tracker naming an incomplete one."""
    path = os.path.join(root, TRACKER_NAME)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
    except OSError:
        return None
    if text.isdigit():
        return int(text)
    if path not in _WARNED_TRACKERS:
        _WARNED_TRACKERS.add(path)
        log.warning("%s holds %r, not an iteration number; taking the newest complete checkpoint in %s", path,
                    text[:40], root)
    return None


def write_tracker(root: str, iteration: int) -> None:
    write_atomic(os.path.join(root, TRACKER_NAME), f"{iteration}\n")


def complete_iterations(root: str) -> list[int]:
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        it = iteration_of(name)
        if it is not None and is_complete(os.path.join(root, name)):
            found.append(it)
    return sorted(found)


def unfinished_saves(root: str) -> list[str]:
    return sorted(n for n in os.listdir(root) if n.startswith("iter_") and n.endswith(".tmp")) \
        if os.path.isdir(root) else []


def find_checkpoint(root: str, step: Optional[int] = None) -> Optional[tuple[int, str]]:
    """(iteration, directory) of the checkpoint a load takes from ``root``, or None if it holds none.

    ``step`` given: that iteration, which must be complete. Else the tracker's iteration when that
    checkpoint is complete, else the newest complete one (a save killed before the tracker moved, or a
    tracker pointing at a deleted or partial directory).
    """
    if step is not None:
        path = iteration_dir(root, step)
        if not is_complete(path):
            hint = " (only an unfinished .tmp save)" if os.path.isdir(path + ".tmp") else ""
            raise CheckpointError(f"--ckpt-step {step}: {path} is not a complete checkpoint{hint}; complete "
                                  f"iterations in {root}: {complete_iterations(root) or 'none'}.")
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


def checkpoint_candidates(root: str) -> list[tuple[int, str]]:
    """Every complete checkpoint in the order a resume tries them: the tracker's, then newest first."""
    tracked = read_tracker(root)
    order = sorted(complete_iterations(root), key=lambda it: (it != tracked, -it))
    return [(it, iteration_dir(root, it)) for it in order]


def check_load_dir(load: str, save: Optional[str], exit_on_missing: bool = False) -> None:
    """``--load`` must name a save root: a missing path is a typo (unless it is also --save: a run's first job),
    a file or an iteration directory a mistake; with --exit-on-missing-checkpoint it must hold a checkpoint."""
    same_as_save = save is not None and os.path.realpath(load) == os.path.realpath(save)
    if not os.path.exists(load):
        if same_as_save and not exit_on_missing:
            return
        raise CheckpointError(f"--load {load} does not exist. Check the path (a typo starts nothing from it); "
                              "to start from scratch, drop --load.")
    if not os.path.isdir(load):
        raise CheckpointError(f"--load {load} is a file; give the directory the run saved into (--save).")
    it = iteration_of(load)
    if it is not None:
        raise CheckpointError(f"--load {load} is one checkpoint; give its parent directory and --ckpt-step {it}: "
                              f"--load {os.path.dirname(os.path.normpath(load))} --ckpt-step {it}.")
    if exit_on_missing and not complete_iterations(load):
        raise CheckpointError(f"--load {load} holds no complete checkpoint and --exit-on-missing-checkpoint is set.")


def estimated_bytes(cfg: GrinConfig, with_optimizer: bool) -> int:
    """About what one checkpoint takes on disk: weights, plus fp32 main weights and two Adam moments."""
    params = parameter_counts(cfg)["total"]
    weights = 2 if cfg.bf16 else 4
    return params * (weights + ((12 if cfg.bf16 else 8) if with_optimizer else 0))


# --- grin_config.json ----------------------------------------------------------------------------------------
def read_config_json(path: str) -> dict:
    """The raw grin_config.json of an iteration directory (``path`` may also name the file itself)."""
    file = path if path.endswith(".json") else os.path.join(path, CONFIG_NAME)
    beside = os.path.join(os.path.dirname(os.path.normpath(path)), CONFIG_NAME)
    if not path.endswith(".json") and not os.path.isfile(file) and os.path.isfile(beside):
        file = beside  # patches/pretrain_grin.py (Megatron-LM's loop) writes <save>/grin_config.json
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {CONFIG_NAME}: cannot tell the model shape. Checkpoints of "
                              "Megatron-LM's pretrain_gpt need --grin-config FILE (a GrinConfig as JSON); "
                              "patches/pretrain_grin.py writes one into --save.") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{file} is unreadable or not valid JSON ({err}).") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} is not a JSON object.")
    return data


def config_from_json(data: dict, source: str = CONFIG_NAME) -> GrinConfig:
    known = {f.name for f in dataclasses.fields(GrinConfig)}
    unknown = sorted(set(data) - known - {RESOLVED_BACKEND_KEY})
    if unknown:
        log.warning("%s: ignoring unknown fields %s", source, unknown)
    fields = {k: v for k, v in data.items() if k in known}
    if "padded_vocab" not in data and "vocab_size" in data:  # written before the padded size was recorded:
        d = data.get("make_vocab_size_divisible_by", 128)  # megatron-grin then padded without TP
        fields["padded_vocab"] = -(-data["vocab_size"] // d) * d
    try:
        return GrinConfig(**fields)
    except TypeError as err:
        raise CheckpointError(f"{source}: {err}") from None


def read_config(path: str) -> GrinConfig:
    return config_from_json(read_config_json(path), path)


def config_json(cfg: GrinConfig) -> str:
    """grin_config.json's text: the config, with the padded vocabulary the tensors have (it depends on TP: a
    resume or conversion at another TP keeps it), plus the concrete expert backend ('auto' resolved now)."""
    data = {**dataclasses.asdict(cfg), "padded_vocab": cfg.padded_vocab_size,
            RESOLVED_BACKEND_KEY: resolve_backend(cfg.expert_backend)}
    return json.dumps(data, indent=2) + "\n"


def write_config(iter_dir: str, cfg: GrinConfig) -> None:
    write_atomic(os.path.join(iter_dir, CONFIG_NAME), config_json(cfg))


def saved_expert_backend(data: dict) -> Optional[str]:
    """The concrete expert backend a checkpoint was trained with, if recorded."""
    backend = data.get(RESOLVED_BACKEND_KEY) or data.get("expert_backend")
    return None if backend in (None, "auto") else backend


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


def config_to_resume(root: str, step: Optional[int] = None) -> Optional[tuple[int, str, dict]]:
    """(iteration, directory, raw grin_config.json) of the checkpoint a resume takes, None if there is none.

    A candidate whose grin_config.json is unreadable is damaged, not different: the trainer's verification
    reports it and falls back to an older one (or refuses), so the next candidate is read instead. Only an
    explicit ``step``, or a damaged config in every candidate, raises.
    """
    if not os.path.isdir(root):
        return None
    candidates = [find_checkpoint(root, step)] if step is not None else checkpoint_candidates(root)
    first_error = None
    for found in candidates:
        if found is None:
            return None
        iteration, path = found
        try:
            data = read_config_json(path)
            config_from_json(data, path)
        except CheckpointError as err:
            ours = any(os.path.isfile(os.path.join(path, n)) for n in (CONFIG_NAME, MANIFEST_NAME))
            if step is not None or not ours:  # Megatron-LM's (no config at all) or the one asked for
                raise
            first_error = first_error or err
            continue
        return iteration, path, data
    if first_error:
        raise first_error
    return None


def check_checkpoint_config(root: str, cfg: GrinConfig, step: Optional[int] = None,
                            load_optim: bool = True) -> Optional[int]:
    """Raise CheckpointError if the checkpoint a load would take was made for a different model, or if its
    optimizer state cannot be loaded because the expert backend lays the expert weights out differently."""
    found = config_to_resume(root, step)
    if found is None:
        return None
    iteration, path, data = found
    check_same_model(root, iteration, data, config_from_json(data, path), cfg, load_optim)
    return iteration


def check_same_model(root: str, iteration: int, data: dict, saved_cfg: GrinConfig, cfg: GrinConfig,
                     load_optim: bool) -> None:
    """Raise CheckpointError if ``saved_cfg`` (``data``: its raw grin_config.json) is another model than ``cfg``, or
    its optimizer state cannot follow ``cfg``'s expert backend."""
    diffs = config_differences(saved_cfg, cfg)
    if diffs:
        listed = "; ".join(f"{'--' + n.replace('_', '-')}: checkpoint {a!r}, this run {b!r}" for n, a, b in diffs)
        raise CheckpointError(f"--load {root}: iteration {iteration} was saved for a different model ({listed}). "
                              "Match the flags, or point --load elsewhere.")
    saved, current = saved_expert_backend(data), resolve_backend(cfg.expert_backend)
    if load_optim and saved is not None and saved != current:
        raise CheckpointError(
            f"--load {root}: iteration {iteration} was trained with expert backend {saved!r}, but this run's "
            f"--grin-expert-backend {cfg.expert_backend} is {current!r}. The weights load into either, the "
            f"optimizer state does not (it is kept per parameter and the backends group the experts' weights "
            f"differently). Pass --grin-expert-backend {saved} to resume exactly, or --no-load-optim to load the "
            f"weights and start a fresh optimizer.")


# --- the common (non-tensor) state -----------------------------------------------------------------------------
def common_state(iteration: int, *, bf16: bool, megatron_core: str, has_optimizer: bool,
                 use_distributed_optimizer: Optional[bool], layout: Optional[dict] = None,
                 train_state: Optional[dict] = None, **extra: Any) -> dict:
    """The checkpoint's common state: megatron's ``iteration``/``checkpoint_version`` and our ``grin`` entry.

    ``has_optimizer: False`` makes the trainer start a fresh optimizer and LR schedule; no ``layout`` means no
    layout-change notes; no ``train_state`` makes the trainer assume iteration x global batch samples consumed.
    """
    grin = {"format": FORMAT_VERSION, "layout": layout or {}, "has_optimizer": has_optimizer,
            "use_distributed_optimizer": use_distributed_optimizer, "bf16": bf16, "megatron_core": megatron_core,
            **extra}
    if train_state is not None:
        grin["train_state"] = train_state
    return {"iteration": iteration, "checkpoint_version": MEGATRON_CHECKPOINT_VERSION, "grin": grin}


# --- files and writer processes --------------------------------------------------------------------------------
def writer_process_init() -> None:
    """Start of megatron's checkpoint-writer processes (compat.py; here because a spawned process imports it,
    and this module is light). They die with their rank (Linux: the kernel SIGKILLs them when it dies, kill -9
    included) and ignore the stop signals Slurm sends every process of a job step: the rank decides when to
    stop, and needs its writers for the save it makes then."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the rank died before PDEATHSIG was set: it never fires
        os._exit(1)


# --- atomic files --------------------------------------------------------------------------------------------
def fsync_dir(path: str) -> None:
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


def write_atomic(path: str, text: str) -> None:
    """Write-temp, fsync, rename, fsync the directory: readers see the old file or the new one, never half."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")
