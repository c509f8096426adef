"""A ``--save`` directory belongs to one run: its identity file and its lock (rank 0, no process group needed).

    <save>/grin_run.json     the run that owns the directory: run id, who created it, the last Slurm job
    <save>/grin_run.lock     held while a job of that run is alive: host, pid, Slurm job, started, command

Two jobs writing one directory lose checkpoints (one's "saved" iteration holds the other's weights, pruning
deletes the other's files, the tracker moves backwards), so a job writes to ``--save`` only while it holds
the lock, and only for the run that owns the directory:

* a job *continues* the owning run when it resumes from that directory (``--load`` = ``--save``, no
  ``--finetune``) or is the same Slurm job (a requeue); anything else is a *new* run;
* a new run is refused while the directory holds another run's checkpoints (``--save-dir-takeover``
  takes it over: the other run's checkpoints are kept, never pruned, and moved aside rather than replaced);
* the lock is stale, and taken over with a warning, when its process is gone (same host: the pid, with its
  start time, no longer runs), when it is this Slurm job's own (requeued after kill -9 or a node failure),
  or when its heartbeat (refreshed every 30 s) is older than 10 minutes; otherwise the new job is refused
  with the owner's details (``--break-save-lock`` takes it anyway).

Checkpoints name their run in their manifest (ckpt_format.MANIFEST_NAME); ones without (written before
manifests existed, or by Megatron-LM) belong to the run that adopts the directory by resuming from it.
"""

from __future__ import annotations

import atexit
import getpass
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from megatron_grin.ckpt_format import (
    CheckpointError,
    complete_iterations,
    iteration_dir,
    unfinished_saves,
    write_atomic,
)
from megatron_grin.ckpt_integrity import read_manifest

log = logging.getLogger(__name__)

RUN_NAME = "grin_run.json"
LOCK_NAME = "grin_run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


@dataclass
class SaveDir:
    """The run this job writes ``root`` for, and the checkpoints there that are that run's."""

    root: str
    run_id: str
    adopted: set = field(default_factory=set)  # iterations without a manifest that this run took over
    lock: Optional["SaveDirLock"] = None

    def owns(self, iteration: int) -> bool:
        return checkpoint_run(self.root, iteration) == self.run_id or iteration in self.adopted

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def checkpoint_run(root: str, iteration: int) -> Optional[str]:
    """The run id in a checkpoint's manifest; None without a (readable) manifest."""
    try:
        manifest = read_manifest(iteration_dir(root, iteration))
    except CheckpointError:
        return None
    return manifest.get("run_id") if manifest else None


# --- who we are ------------------------------------------------------------------------------------------------
def pid_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (tells a reused pid apart); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int, start: Optional[str]) -> bool:
    if not os.path.isdir("/proc"):  # not Linux: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    now = pid_start(pid)
    return now is not None and (start is None or now == start)


def this_job(run_id: str) -> dict:
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry (containers)
        user = str(os.getuid())
    return {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "pid_start": pid_start(os.getpid()),
            "user": user, "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "token": uuid.uuid4().hex,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)[:500]}


def describe(owner: dict) -> str:
    """'run ID (pid P on HOST, Slurm job J, user U, started T: COMMAND)' from a lock or identity file."""
    where = f"pid {owner['pid']} on {owner.get('host')}" if owner.get("pid") else f"on {owner.get('host')}"
    job = f", Slurm job {owner['slurm_job_id']}" if owner.get("slurm_job_id") else ""
    return (f"run {owner.get('run_id')} ({where}{job}, user {owner.get('user')}, started {owner.get('started')}: "
            f"{owner.get('command')!r})")


# --- the lock --------------------------------------------------------------------------------------------------
def stale_reason(owner: dict, age_s: float, env: Optional[dict] = None) -> Optional[str]:
    """Why a lock held by ``owner`` (heartbeat ``age_s`` seconds old) is dead; None if it may be alive."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID")
    if job and owner.get("slurm_job_id") == job:
        return f"it is this Slurm job's own ({job}), from before a requeue"
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        if not pid_alive(owner["pid"], owner.get("pid_start")):
            return f"process {owner['pid']} on this host is gone"
        return None
    if age_s > STALE_AFTER_S:
        return f"its heartbeat is {age_s / 60:.0f} minutes old"
    return None


class SaveDirLock:
    """An exclusive lock file with a heartbeat; see the module docstring for when it counts as stale."""

    def __init__(self, root: str, run_id: str):
        self.path = os.path.join(root, LOCK_NAME)
        self.me = this_job(run_id)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def acquire(self, break_lock: bool = False) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_dead(break_lock)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.me, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            self._thread = threading.Thread(target=self._beat, name="grin-save-lock", daemon=True)
            self._thread.start()
            atexit.register(self.release)  # an exception ending the run releases it too; kill -9 leaves it stale
            return
        raise CheckpointError(f"--save: could not take {self.path}: other jobs keep taking it; is another job "
                              "starting on this directory right now?")

    def _read(self, path: str) -> tuple[dict, float]:
        try:
            with open(path, encoding="utf-8") as f:
                owner = json.load(f)
            return (owner if isinstance(owner, dict) else {}), time.time() - os.path.getmtime(path)
        except FileNotFoundError:
            return {}, 0.0
        except (OSError, ValueError):  # half-written by a job killed while taking it
            return {}, STALE_AFTER_S + 1

    def _take_over_if_dead(self, break_lock: bool) -> None:
        owner, age = self._read(self.path)
        reason = stale_reason(owner, age) if owner else "it is empty or unreadable"
        if reason is None and not break_lock:
            raise CheckpointError(
                f"--save {os.path.dirname(self.path)} is in use by {describe(owner)}; its lock {self.path} was "
                f"refreshed {age:.0f} s ago. Two runs writing one directory overwrite each other's checkpoints. "
                "Wait for it to end, give this run another --save, or, if that job is certainly dead (e.g. its "
                "node was lost), pass --break-save-lock.")
        aside = f"{self.path}.stale-{os.getpid()}"
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return  # someone else removed it: race for O_EXCL again
        moved, _ = self._read(aside)
        if owner and moved.get("token") != owner.get("token"):  # a fresh lock replaced the stale one meanwhile
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        os.unlink(aside)
        log.warning("--save: took over the lock of %s: %s", describe(owner) if owner else "an unknown job",
                    reason or "--break-save-lock")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        owner, _ = self._read(self.path)
        if owner.get("token") == self.me["token"]:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


# --- the run that owns the directory -------------------------------------------------------------------------
def read_identity(root: str) -> Optional[dict]:
    try:
        with open(os.path.join(root, RUN_NAME), encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{os.path.join(root, RUN_NAME)} is unreadable ({err}); it names the run that owns "
                              "this --save directory. Restore it, or delete it to let this run take over.") from None
    return data if isinstance(data, dict) and data.get("run_id") else None


def decide_run(root: str, resuming: bool, takeover: bool, env: Optional[dict] = None) -> tuple[str, set, list[str]]:
    """(run id this job writes for, checkpoints it adopts, notes): refuses a new run among another run's files."""
    env = os.environ if env is None else env
    identity = read_identity(root)
    owners = {it: checkpoint_run(root, it) for it in complete_iterations(root)}
    job = env.get("SLURM_JOB_ID")
    if identity and (resuming or (job and identity.get("slurm_job_id") == job)):
        legacy = {it for it, run in owners.items() if run is None} if resuming else set()
        return identity["run_id"], set(identity.get("adopted", [])) | legacy, []
    if identity is None and resuming:  # the first job of this run here, or a directory from before identities
        return uuid.uuid4().hex, {it for it, run in owners.items() if run is None}, []
    others = sorted(owners)
    if others and not takeover:
        owner = describe(identity) if identity else "a run without an identity file (older megatron-grin, Megatron-LM)"
        raise CheckpointError(
            f"--save {root} holds checkpoints {others[:6]}{' ...' if len(others) > 6 else ''} of {owner}, and this "
            "job is a new run (it does not resume from --save: no --load there, another --load, or --finetune). "
            "Its saves would overwrite or prune them and move the tracker. Give this run its own --save, resume "
            f"that run with --load {root} (without --finetune), or pass --save-dir-takeover to write here anyway "
            "(the other run's checkpoints are kept and never pruned).")
    notes = [f"--save-dir-takeover: {root} holds checkpoints {others} of another run; they are kept, never "
             "pruned, and moved aside (iter_N.run-ID) if this run saves the same iteration"] if others else []
    return uuid.uuid4().hex, set(), notes


def claim(root: str, resuming: bool, takeover: bool = False, break_lock: bool = False) -> SaveDir:
    """Lock ``root``, decide whose run this is, record it, and clear debris of dead saves (rank 0)."""
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"--save {root}: cannot create it ({err.strerror}).") from None
    lock = SaveDirLock(root, run_id="?")
    lock.acquire(break_lock)
    try:
        run_id, adopted, notes = decide_run(root, resuming, takeover)
        lock.me["run_id"] = run_id
        write_atomic(lock.path, json.dumps(lock.me, indent=1))
        identity = {**this_job(run_id), "adopted": sorted(adopted)}
        for key in ("pid", "pid_start", "token"):
            identity.pop(key)
        write_atomic(os.path.join(root, RUN_NAME), json.dumps(identity, indent=1) + "\n")
        for note in notes:
            log.warning("%s", note)
        for name in unfinished_saves(root):  # saves of dead jobs: nobody else writes here while we hold the lock
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    except BaseException:
        lock.release()
        raise
    return SaveDir(root, run_id, adopted, lock)
