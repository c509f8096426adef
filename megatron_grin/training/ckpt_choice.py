"""Decisions every rank makes alike before anything is built: which run ``--save`` belongs to (rank 0 takes its
lock), and which checkpoint ``--load`` resumes (verified together: each rank hashes a share of the files).

A refusal is raised on every rank with the same message, so the job ends cleanly with one error line.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from megatron_grin.ckpt_format import MANIFEST_NAME, CheckpointError, checkpoint_candidates, find_checkpoint
from megatron_grin.ckpt_integrity import (
    damage_report,
    digest_problems,
    read_manifest,
    share_of,
    structure_problems,
)
from megatron_grin.training.save_dir import SaveDir, claim

log = logging.getLogger(__name__)


# --- collectives over the whole world (small Python objects) ---------------------------------------------------
def from_rank0(obj):
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj) -> list:
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def agree(problems: Optional[list], error: type = CheckpointError) -> None:
    """Raise the same ``error`` on every rank if any rank has problems (the first such rank's)."""
    found = [p for p in all_gather(problems or None) if p]
    if found:
        raise error(found[0])


def open_save_dir(save: str, resuming: bool, takeover: bool, break_lock: bool) -> SaveDir:
    """Rank 0 locks ``--save`` and decides which run this is (save_dir.claim); every rank learns the answer."""
    claimed, error = None, None
    if torch.distributed.get_rank() == 0:
        try:
            claimed = claim(save, resuming, takeover, break_lock)
        except CheckpointError as err:
            error = str(err)
    error, run_id, adopted = from_rank0((error, claimed and claimed.run_id, claimed and claimed.adopted))
    if error:
        raise CheckpointError(error)
    return claimed or SaveDir(save, run_id, adopted)


# --- verification before anything is built ---------------------------------------------------------------------
def verify(path: str) -> list[str]:
    """Problems of one checkpoint, found together: rank 0 checks the structure, every rank hashes a share."""
    manifest, problems = None, []
    if torch.distributed.get_rank() == 0:
        try:
            manifest = read_manifest(path)
            problems = structure_problems(path, manifest)
        except CheckpointError as err:
            problems = [str(err)]
    manifest, problems = from_rank0((manifest, problems))
    if problems or manifest is None:
        return problems
    mine = share_of(manifest, torch.distributed.get_rank(), torch.distributed.get_world_size())
    return sorted(p for part in all_gather(digest_problems(path, manifest, mine)) for p in part)


def choose_checkpoint(load: str, step: Optional[int], fallback: bool) -> Optional[tuple[int, str]]:
    """(iteration, directory) to resume from: the tracker's, else the newest, verified; on damage the newest
    intact older one (warned loudly), or an error with ``--no-ckpt-fallback`` or an explicit ``--ckpt-step``."""
    candidates = [find_checkpoint(load, step)] if step is not None else checkpoint_candidates(load)
    damaged = []
    for iteration, path in candidates:
        problems = verify(path)
        if not problems:
            if read_manifest(path) is None:
                log.warning("%s has no %s (written by an older megatron-grin or by Megatron-LM): its files are "
                            "present and long enough, but their contents cannot be checked", path, MANIFEST_NAME)
            if damaged:
                log.warning("!!! %s. Falling back to the newest intact checkpoint, iteration %d: the iterations "
                            "after it are trained again. (--no-ckpt-fallback refuses instead.)",
                            " !!! ".join(damaged), iteration)
            return iteration, path
        damaged.append(damage_report(path, problems))
        if step is not None or not fallback:
            fix = "pick another with --ckpt-step" if step is not None else \
                "drop --no-ckpt-fallback to resume from the newest intact one, or --ckpt-step N"
            raise CheckpointError(f"--load {load}: {damaged[-1]}. Restore the files, {fix}.")
    if damaged:
        raise CheckpointError(f"--load {load}: no intact checkpoint to resume from. {'. '.join(damaged)}. Restore "
                              "the files, or point --load elsewhere.")
    return None


def resumes_from_save(tcfg) -> bool:
    """This job continues the run in --save: it loads from there, and not as the start of a fine-tuning."""
    return bool(tcfg.load and tcfg.save and not tcfg.finetune
                and os.path.realpath(tcfg.load) == os.path.realpath(tcfg.save))
