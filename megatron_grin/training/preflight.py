"""Checks that need no model and no process group, run before anything is built: a run that cannot finish
should say so in its first seconds, not at its first save or hours into training.

* every directory the run writes (``--save``, ``--log-dir``, ``--tensorboard-dir``, ``--wandb-save-dir``, the
  data index cache) is writable, and ``--save`` has room for one checkpoint;
* ``--load`` names a save root that exists (ckpt_format.check_load_dir);
* every dataset and blend component gets documents in every split that samples are drawn from (megatron-core
  would loop forever otherwise).

The trainer runs :func:`problems` on rank 0 and every rank raises the same ConfigError. Light: no megatron.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional, Sequence

from megatron_grin.ckpt_format import CheckpointError, check_load_dir, checkpoint_candidates, estimated_bytes
from megatron_grin.ckpt_integrity import read_manifest
from megatron_grin.config import GrinConfig
from megatron_grin.training.data_files import check_splits, default_cache_root, parse_data_path, read_idx_info


def sample_counts(tcfg) -> tuple[int, int]:
    """Samples to build for (train, valid), as Megatron-LM sizes them."""
    gbs = tcfg.global_batch_size
    evals = (tcfg.train_iters // tcfg.eval_interval if tcfg.eval_interval else 0) + 1
    return tcfg.train_iters * gbs, (evals * tcfg.eval_iters * gbs if tcfg.eval_iters else 0)


def split_sizes(tcfg) -> tuple[int, int, int]:
    """(train, valid, test) samples the run draws (a run of 0 iterations still builds a train split)."""
    train, valid = sample_counts(tcfg)
    return max(train, 1), valid, 0


def writable(flag: str, path: Optional[str], create: bool = True) -> Optional[str]:
    """None if this process can create files in ``path`` (created if missing, unless ``create`` is False: a dry
    run creates nothing, and checks the nearest existing directory), else a message naming the flag."""
    if not path:
        return None
    if not create:
        return _could_create(flag, path)
    probe = os.path.join(path, f".grin-write-test-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w", encoding="utf-8") as f:
            f.write("x")
        os.remove(probe)
    except OSError as err:
        return (f"{flag} {path} is not writable ({err.strerror}): point {flag} at a directory this job can write "
                "(found now rather than at the first save).")
    return None


def _could_create(flag: str, path: str) -> Optional[str]:
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        what = "is not a directory" if not os.path.isdir(probe) else "is not writable"
        return (f"{flag} {path}: {probe} {what}; point {flag} at a directory this job can write (found now rather "
                "than at the first save).")
    return None


def space_problem(cfg: GrinConfig, save: Optional[str], load: Optional[str]) -> Optional[str]:
    """--save must have room for one checkpoint: the size of the one resumed, else an estimate."""
    if not save or not os.path.isdir(save):
        return None
    need = 0
    for _, path in checkpoint_candidates(load)[:1] if load and os.path.isdir(load) else []:
        try:
            manifest = read_manifest(path)
        except CheckpointError:
            manifest = None
        need = sum(f.get("size", 0) for f in manifest["files"].values()) if manifest else 0
    need = need or estimated_bytes(cfg, with_optimizer=True)
    free = shutil.disk_usage(save).free
    if free < need:
        return (f"--save {save}: No space left on device for a checkpoint: one needs about {need / 2**30:.2f} GiB, "
                f"{free / 2**30:.2f} GiB are free. Free space or point --save at a larger file system.")
    return None


def data_problems(tcfg, sizes: Sequence[int]) -> list[str]:
    """Split/sample counts of every dataset and blend component: none that megatron builds may be empty.
    (Index consistency and token ids are checked with the flags: run_checks.py.)"""
    if tcfg.mock_data or not tcfg.data_path:
        return []
    try:
        prefixes, weights = parse_data_path(tcfg.data_path)
        return check_splits([read_idx_info(p) for p in prefixes], weights, tcfg.split, sizes)
    except ValueError as err:
        return [str(err)]


def problems(cfg: GrinConfig, tcfg, sizes: Sequence[int], create: bool = True) -> list[str]:
    """Everything above, for the run ``cfg``/``tcfg`` that draws ``sizes`` (train, valid, test) samples
    (``create=False``: a dry run, which creates no directory)."""
    out = []
    if tcfg.load:
        try:
            check_load_dir(tcfg.load, tcfg.save)
        except CheckpointError as err:
            out += err.problems
    cache = None
    if tcfg.data_path and not tcfg.mock_data:
        try:
            cache = default_cache_root(parse_data_path(tcfg.data_path)[0], tcfg.data_cache_path)
        except ValueError:
            cache = tcfg.data_cache_path
    for flag, path in (("--save", tcfg.save), ("--log-dir", tcfg.log_dir), ("--tensorboard-dir", tcfg.tensorboard_dir),
                       ("--wandb-save-dir", tcfg.wandb_save_dir if tcfg.wandb_project else None),
                       ("--data-cache-path", cache)):
        problem = writable(flag, path, create)
        if problem:
            out.append(problem)
    out += [p for p in [space_problem(cfg, tcfg.save, tcfg.load)] if p and not out]
    return out + data_problems(tcfg, sizes)
