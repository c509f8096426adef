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
``grin_config.json`` is in place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Optional

from megatron_grin.config import ConfigError, GrinConfig, resolve_backend

log = logging.getLogger(__name__)

CONFIG_NAME = "grin_config.json"
TRACKER_NAME = "latest_checkpointed_iteration.txt"
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
                "rotary_base", "sliding_window", "layernorm_epsilon", "num_experts", "moe_router_topk")
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


def read_tracker(root: str) -> Optional[int]:
    try:
        with open(os.path.join(root, TRACKER_NAME), encoding="utf-8") as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


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


# --- grin_config.json ----------------------------------------------------------------------------------------
def read_config_json(path: str) -> dict:
    """The raw grin_config.json of an iteration directory (``path`` may also name the file itself)."""
    file = path if path.endswith(".json") else os.path.join(path, CONFIG_NAME)
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {CONFIG_NAME}: cannot tell the model shape. Checkpoints of "
                              "Megatron-LM's pretrain_gpt need --grin-config FILE (a GrinConfig as JSON).") from None
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
    try:
        return GrinConfig(**{k: v for k, v in data.items() if k in known})
    except TypeError as err:
        raise CheckpointError(f"{source}: {err}") from None


def read_config(path: str) -> GrinConfig:
    return config_from_json(read_config_json(path), path)


def config_json(cfg: GrinConfig) -> str:
    """grin_config.json's text: the config, plus the concrete expert backend ('auto' resolved now)."""
    data = {**dataclasses.asdict(cfg), RESOLVED_BACKEND_KEY: resolve_backend(cfg.expert_backend)}
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


def check_checkpoint_config(root: str, cfg: GrinConfig, step: Optional[int] = None,
                            load_optim: bool = True) -> Optional[int]:
    """Raise CheckpointError if the checkpoint a load would take was made for a different model, or if its
    optimizer state cannot be loaded because the expert backend lays the expert weights out differently."""
    found = find_checkpoint(root, step)
    if found is None:
        return None
    iteration, path = found
    data = read_config_json(path)
    diffs = config_differences(config_from_json(data, path), cfg)
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
    return iteration


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
