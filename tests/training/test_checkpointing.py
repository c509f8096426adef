"""Checkpoints: bit-exact resume, atomic commits under kill -9, --load's choice, resharding, config checks;
a --save directory owned and locked by one run; checksums verified before use, with fallback; clean failures."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from grin_testing import process_running
from test_train import ROOT, TINY, descendants, env, losses, pretrain_cmd, records, run_pretrain, wait_for

from megatron_grin import ckpt_format, ckpt_integrity
from megatron_grin.ckpt_format import (
    CONFIG_NAME,
    TRACKER_NAME,
    CheckpointError,
    complete_iterations,
    find_checkpoint,
    iteration_dir,
)
from megatron_grin.ckpt_integrity import checkpoint_problems
from megatron_grin.training import save_dir
from megatron_grin.training.checkpointing import prune
from megatron_grin.training.run_checks import check_schedule


# --- --load's choice (file system only) --------------------------------------------------------------------
def make_iter(root, iteration: int, complete: bool = True, suffix: str = "") -> str:
    path = iteration_dir(str(root), iteration) + suffix
    os.makedirs(path)
    names = ("metadata.json", ".metadata", CONFIG_NAME) if complete else ("metadata.json",)
    for name in names:
        with open(os.path.join(path, name), "w") as f:
            f.write("{}")
    return path


def set_tracker(root, iteration) -> None:
    with open(os.path.join(root, TRACKER_NAME), "w") as f:
        f.write(f"{iteration}\n")


def test_load_takes_the_tracked_complete_checkpoint(tmp_path):
    make_iter(tmp_path, 10)
    make_iter(tmp_path, 20)
    set_tracker(tmp_path, 10)
    assert find_checkpoint(str(tmp_path)) == (10, iteration_dir(str(tmp_path), 10))
    assert find_checkpoint(str(tmp_path), step=20)[0] == 20


def test_a_save_killed_midway_is_never_loaded(tmp_path):
    """A .tmp directory, a half-written iter dir without our commit marker, and a tracker that got ahead."""
    make_iter(tmp_path, 10)
    make_iter(tmp_path, 20, suffix=".tmp")
    make_iter(tmp_path, 30, complete=False)
    set_tracker(tmp_path, 30)
    assert complete_iterations(str(tmp_path)) == [10]
    assert find_checkpoint(str(tmp_path)) == (10, iteration_dir(str(tmp_path), 10))
    os.remove(os.path.join(tmp_path, TRACKER_NAME))
    assert find_checkpoint(str(tmp_path))[0] == 10
    assert find_checkpoint(str(tmp_path / "nothing")) is None


def test_prune_keeps_the_newest_and_protected(tmp_path):
    for it in (2, 4, 6, 8):
        make_iter(tmp_path, it)
    make_iter(tmp_path, 9, suffix=".old")
    make_iter(tmp_path, 5, complete=False, suffix=".tmp")  # a save killed before iteration 8 was committed
    make_iter(tmp_path, 10, complete=False, suffix=".tmp")  # newer than any commit: left alone
    assert prune(str(tmp_path), 2, protect=(2,)) == [4]
    assert complete_iterations(str(tmp_path)) == [2, 6, 8]
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", "iter_0000006", "iter_0000008", "iter_0000010.tmp"]


# --- resume ------------------------------------------------------------------------------------------------
RESUME_ARGS = [*TINY, "--train-iters", "8", "--moe-aux-loss-coeff", "0.01", "--lr-warmup-iters", "2",
               "--lr-decay-style", "cosine", "--min-lr", "1e-4"]


def straight_and_split(root, *extra) -> tuple:
    """8 steps straight; and 4 steps, stop (--exit-interval), resume to 8."""
    args = [*RESUME_ARGS, *extra]
    straight, split = root / "straight", root / "split"
    run_pretrain(*args, "--save", str(straight), "--save-interval", "2", "--ckpt-keep-last", "2")
    first = run_pretrain(*args, "--save", str(split), "--load", str(split), "--exit-interval", "4")
    assert "stopping at iteration 4" in first.stdout
    second = run_pretrain(*args, "--save", str(split), "--load", str(split))
    assert "optimizer restored, RNG restored" in second.stdout
    return straight, split


def assert_bit_exact(straight, split) -> None:
    a, b = losses(straight), losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert torch.equal(torch.tensor([a[i] for i in range(1, 9)], dtype=torch.float64),
                       torch.tensor([b[i] for i in range(1, 9)], dtype=torch.float64))
    lr_a = [r["lr"] for r in records(straight)]
    lr_b = {r["iteration"]: r["lr"] for r in records(split)}
    assert lr_a == [lr_b[i] for i in range(1, 9)]


@pytest.fixture(scope="module")
def adam_runs(tmp_path_factory):
    return straight_and_split(tmp_path_factory.mktemp("adam"))


def test_resume_reproduces_the_uninterrupted_losses_bit_exactly(adam_runs):
    assert_bit_exact(*adam_runs)


def test_keep_last_prunes_after_each_commit(adam_runs):
    straight, _ = adam_runs
    assert complete_iterations(str(straight)) == [6, 8]
    assert sorted(os.listdir(straight)) == [save_dir.RUN_NAME, "iter_0000006", "iter_0000008", TRACKER_NAME,
                                            "loss_curve.png", "metrics.jsonl", "summary.json"]  # lock released


@pytest.mark.slow
def test_resume_with_the_distributed_optimizer_is_bit_exact(tmp_path):
    assert_bit_exact(*straight_and_split(tmp_path, "--use-distributed-optimizer"))


def _bytes_by_rank(iter_dir) -> dict:
    sizes = {}
    for name in os.listdir(iter_dir):
        if name.endswith(".distcp"):
            rank = int(name[2:].split("_")[0])
            sizes[rank] = sizes.get(rank, 0) + os.path.getsize(os.path.join(iter_dir, name))
    return sizes


@pytest.mark.slow
def test_resume_with_two_data_parallel_ranks_is_bit_exact(tmp_path):
    """torchrun, DP2, distributed optimizer (gathered to DP rank 0 on save, scattered on load); saved with
    Megatron-LM's default fully parallel save (both DP ranks write), resumed with --ckpt-fully-parallel-load (on
    CUDA; said and not applied without it)."""
    args = [*RESUME_ARGS, "--use-distributed-optimizer", "--global-batch-size", "8"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_pretrain(*args, "--save", str(straight), nproc=2)
    run_pretrain(*args, "--save", str(split), "--load", str(split), "--exit-interval", "4", nproc=2)
    proc = run_pretrain(*args, "--save", str(split), "--load", str(split), "--ckpt-fully-parallel-load", nproc=2)
    assert_bit_exact(straight, split)
    if not torch.cuda.is_available():  # megatron-core 0.16 exchanges the loaded shards as CUDA tensors
        assert "--ckpt-fully-parallel-load: not applied without CUDA" in proc.stdout + proc.stderr
    sizes = _bytes_by_rank(split / "iter_0000004")
    assert sizes.get(1, 0) > 0.2 * sum(sizes.values()), sizes  # the replicated weights' writes are spread


@pytest.mark.slow
def test_no_fully_parallel_save_leaves_the_writes_to_data_parallel_rank_0(tmp_path):
    run_pretrain(*TINY, "--use-distributed-optimizer", "--global-batch-size", "8", "--train-iters", "2",
                 "--save", str(tmp_path), "--no-ckpt-fully-parallel-save", nproc=2)
    assert set(_bytes_by_rank(tmp_path / "iter_0000002")) == {0}


def test_loading_a_checkpoint_of_another_model_fails_before_init(adam_runs):
    straight, _ = adam_runs
    proc = run_pretrain(*RESUME_ARGS, "--load", str(straight), "--num-experts", "8", "--moe-router-topk", "3",
                        check=False)
    assert proc.returncode == 2
    assert "--num-experts: checkpoint 4, this run 8" in proc.stderr
    assert "--moe-router-topk: checkpoint 2, this run 3" in proc.stderr
    assert "iter " not in proc.stdout and "loaded" not in proc.stdout


def test_resuming_under_another_expert_backend_needs_no_load_optim(adam_runs):
    from megatron_grin.ckpt_format import check_checkpoint_config, read_config, read_config_json, saved_expert_backend
    from megatron_grin.config import ConfigError, resolve_backend

    straight, _ = adam_runs
    _, path = find_checkpoint(str(straight))
    trained_with = saved_expert_backend(read_config_json(path))
    assert trained_with == resolve_backend("auto")  # 'auto' is recorded resolved
    other = "sequential" if trained_with != "sequential" else "grouped_mm"
    proc = run_pretrain(*RESUME_ARGS, "--load", str(straight), "--grin-expert-backend", other, check=False)
    assert proc.returncode == 2
    assert f"trained with expert backend {trained_with!r}" in proc.stderr and "--no-load-optim" in proc.stderr
    assert "iter " not in proc.stdout
    cfg = read_config(path).replace(expert_backend=other)
    with pytest.raises(ConfigError, match="--grin-expert-backend"):
        check_checkpoint_config(str(straight), cfg)
    assert check_checkpoint_config(str(straight), cfg, load_optim=False) is not None  # weights only: allowed


# --- kill -9 during a save ------------------------------------------------------------------------------------
def test_kill_9_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    args = [*TINY, "--train-iters", "400", "--save", ckpt, "--load", ckpt, "--save-interval", "2",
            "--log-interval", "1"]
    proc = subprocess.Popen(pretrain_cmd(*args), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    killed_at, family, survivors = None, [], None
    try:
        assert wait_for(lambda: os.path.isdir(iteration_dir(ckpt, 2)), proc), proc.stderr.read()[-3000:]
        # a second job on the same --save is refused while the first runs, naming the first
        second = run_pretrain(*TINY, "--train-iters", "400", "--save", ckpt, check=False)
        assert second.returncode == 2 and "is in use by run" in second.stderr and f"pid {proc.pid}" in second.stderr
        for target in range(4, 400, 2):  # kill at the first save we catch in progress
            tmp = iteration_dir(ckpt, target) + ".tmp"
            if not wait_for(lambda: os.path.isdir(tmp) or os.path.isdir(iteration_dir(ckpt, target)), proc,
                            poll=0.002):
                break
            if os.path.isdir(tmp):
                family = [proc.pid, *descendants(proc.pid)]  # the trainer and its checkpoint writers
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = target
                proc.wait()
                survivors = wait_for_exit(family[1:])  # they must go on their own
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pid in family[1:]:  # whatever outlived the rank (the test fails below): don't leak it
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert killed_at is not None, "never caught a save in progress"
    assert proc.returncode == -signal.SIGKILL
    assert len(family) >= 3, "no checkpoint writer processes were running"  # the Manager and resource tracker
    assert survivors == [], "megatron's checkpoint writer processes outlived the killed rank"
    assert os.path.exists(os.path.join(ckpt, save_dir.LOCK_NAME))  # stale now: its process is gone
    assert os.path.isdir(iteration_dir(ckpt, killed_at) + ".tmp")
    assert not os.path.exists(iteration_dir(ckpt, killed_at))
    previous = killed_at - 2
    assert find_checkpoint(ckpt) == (previous, iteration_dir(ckpt, previous))

    resumed = run_pretrain(*args, "--exit-interval", str(killed_at))
    assert "took over the lock" in resumed.stdout and f"process {proc.pid} on this host is gone" in resumed.stdout
    assert f"loaded {iteration_dir(ckpt, previous)}: iteration {previous}" in resumed.stdout
    assert f"stopping at iteration {killed_at}" in resumed.stdout
    assert open(os.path.join(ckpt, TRACKER_NAME)).read().strip() == str(killed_at)
    assert os.path.exists(os.path.join(iteration_dir(ckpt, killed_at), CONFIG_NAME))
    assert checkpoint_problems(iteration_dir(ckpt, killed_at)) == []  # complete, with a manifest that matches
    assert not [n for n in os.listdir(ckpt) if n.endswith(".tmp")] and save_dir.LOCK_NAME not in os.listdir(ckpt)


def wait_for_exit(pids: list, timeout: float = 20.0) -> list:
    """The pids still alive after ``timeout`` seconds (zombies count as gone)."""
    deadline = time.time() + timeout
    alive = list(pids)
    while alive and time.time() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if process_running(p)]
    return alive


# --- other layouts -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tp1_start(tmp_path_factory):
    """Iteration-0 weights of a TP1 model, and that model's first-step loss."""
    out = tmp_path_factory.mktemp("tp1")
    run_pretrain(*TINY, "--train-iters", "0", "--save", str(out / "init"))
    run_pretrain(*TINY, "--train-iters", "2", "--load", str(out / "init"), "--log-dir", str(out / "tp1"),
                 "--log-interval", "1")
    return out


@pytest.mark.slow
def test_tp2_pp2_starts_from_the_tp1_loss_trains_and_reshards_back(tp1_start, tmp_path):
    """torchrun, 4 processes, gloo: TP2 x PP2 loaded from TP1 weights (resharding on load)."""
    tp1 = losses(tp1_start / "tp1")
    ckpt = str(tmp_path / "tp2pp2")
    proc = run_pretrain(*TINY, "--train-iters", "2", "--load", str(tp1_start / "init"), "--save", ckpt,
                        "--log-interval", "1", "--tensor-model-parallel-size", "2",
                        "--pipeline-model-parallel-size", "2", nproc=4)
    assert "layout changed (TP 1 -> 2, PP 1 -> 2)" in proc.stdout
    got = losses(ckpt)
    assert abs(got[1] - tp1[1]) <= 1e-6 * abs(tp1[1]), (got[1], tp1[1])  # same weights, same data, same routing
    assert abs(got[2] - tp1[2]) <= 1e-5 * abs(tp1[2])  # after one optimizer step
    back = run_pretrain(*TINY, "--train-iters", "3", "--load", ckpt, "--log-dir", str(tmp_path / "back"),
                        "--log-interval", "1", "--use-checkpoint-opt-param-scheduler")  # one step past its schedule
    assert "resharding" in back.stdout or "layout changed" in back.stdout
    assert "optimizer restored" in back.stdout and sorted(losses(tmp_path / "back")) == [3]


@pytest.mark.slow
def test_virtual_pipeline_matches_plain_pipeline(tp1_start, tmp_path):
    """PP2 with 2 virtual stages (interleaved schedule) gives PP2's losses from the same weights."""
    common = [*TINY, "--train-iters", "2", "--load", str(tp1_start / "init"), "--log-interval", "1",
              "--pipeline-model-parallel-size", "2"]
    run_pretrain(*common, "--log-dir", str(tmp_path / "pp"), nproc=2)
    run_pretrain(*common, "--num-layers-per-virtual-pipeline-stage", "1", "--log-dir", str(tmp_path / "vpp"), nproc=2)
    assert losses(tmp_path / "pp") == losses(tmp_path / "vpp") == losses(tp1_start / "tp1")


@pytest.mark.slow
def test_distributed_optimizer_state_reshards_exactly(tmp_path):
    """DP2 distributed-optimizer checkpoint -> TP2 (DP1) load -> save: optimizer tensors unchanged."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = [*TINY, "--use-distributed-optimizer", "--global-batch-size", "8"]
    run_pretrain(*common, "--train-iters", "2", "--save", a, nproc=2)
    run_pretrain(*common, "--train-iters", "2", "--load", a, "--save", b, "--tensor-model-parallel-size", "2",
                 "--no-load-rng", nproc=2)  # nothing to train: re-saves what it loaded, in the TP2 layout
    script = (
        "import sys, torch, torch.distributed as dist\n"
        "dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)\n"
        "from megatron_grin import compat; compat.apply()\n"
        "from megatron.core import dist_checkpointing as dc\n"
        "x, y = dc.load_plain_tensors(sys.argv[1]), dc.load_plain_tensors(sys.argv[2])\n"
        "keys = [k for k in x if k.startswith('optimizer.state.')]\n"
        "assert keys and set(keys) == {k for k in y if k.startswith('optimizer.state.')}, 'keys differ'\n"
        "bad = [k for k in keys if not torch.equal(x[k], y[k])]\n"
        "print('OPTIMIZER', len(keys), 'differ', bad[:3])\n")
    proc = subprocess.run([sys.executable, "-c", script, os.path.join(a, "iter_0000002"), os.path.join(b, "iter_0000002")],
                          capture_output=True, text=True, timeout=600, env=env())
    assert "differ []" in proc.stdout, proc.stdout + proc.stderr[-3000:]


# --- a --save directory belongs to one run: the lock ------------------------------------------------------------
def _lock_of(root, pid: int, **extra) -> None:
    owner = {**save_dir.this_job("other-run"), "pid": pid, "pid_start": save_dir.pid_start(pid), "slurm_job_id": None,
             "command": "pretrain --save elsewhere", **extra}
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, save_dir.LOCK_NAME), "w") as f:
        json.dump(owner, f)


def test_a_live_owner_keeps_the_lock_and_is_named(tmp_path):
    live = subprocess.Popen(["sleep", "60"])
    try:
        _lock_of(tmp_path, live.pid)
        with pytest.raises(CheckpointError, match=rf"in use by run other-run \(pid {live.pid} on .*--break-save-lock"):
            save_dir.SaveDirLock(str(tmp_path), "mine").acquire()
        lock = save_dir.SaveDirLock(str(tmp_path), "mine")
        lock.acquire(break_lock=True)  # told to
        assert json.load(open(lock.path))["token"] == lock.me["token"]
        lock.release()
        assert not os.path.exists(lock.path)
    finally:
        live.kill()
        live.wait()


def test_a_lock_whose_process_died_is_stale(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    _lock_of(tmp_path, dead.pid)
    lock = save_dir.SaveDirLock(str(tmp_path), "mine")
    lock.acquire()
    assert json.load(open(lock.path))["run_id"] == "mine"
    lock.release()


def test_stale_rules_for_requeues_and_other_hosts():
    me = {"host": "elsewhere", "pid": 1, "slurm_job_id": "4242"}
    assert "this Slurm job's own" in save_dir.stale_reason(me, 5.0, env={"SLURM_JOB_ID": "4242"})  # requeue
    assert save_dir.stale_reason(me, 5.0, env={"SLURM_JOB_ID": "7"}) is None  # another job, heartbeat fresh
    assert "minutes old" in save_dir.stale_reason(me, save_dir.STALE_AFTER_S + 1, env={})  # its node went away


# --- ... and its checkpoints: nobody else's are pruned, replaced or tracked ------------------------------------------
def make_owned_iter(root, iteration: int, run_id) -> str:
    path = make_iter(root, iteration)
    ckpt_integrity.write_manifest(path, {}, run_id)
    return path


def test_prune_and_ownership_follow_the_manifest(tmp_path):
    for it in (2, 4, 6):
        make_owned_iter(tmp_path, it, "A")
    for it in (3, 5, 7):
        make_owned_iter(tmp_path, it, "B")
    mine = save_dir.SaveDir(str(tmp_path), "B")
    assert [mine.owns(it) for it in (2, 3)] == [False, True]
    assert prune(str(tmp_path), 1, protect=(7,), owns=mine.owns) == [3, 5]
    assert complete_iterations(str(tmp_path)) == [2, 4, 6, 7]


def test_which_run_a_job_belongs_to(tmp_path, monkeypatch):
    root = str(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    run, adopted, _ = save_dir.decide_run(root, resuming=False, takeover=False)  # an empty directory: a new run
    make_iter(tmp_path, 4)  # written before manifests (or by Megatron-LM)
    with pytest.raises(CheckpointError, match=r"holds checkpoints \[4\] of a run without an identity file"):
        save_dir.decide_run(root, resuming=False, takeover=False)
    run, adopted, _ = save_dir.decide_run(root, resuming=True, takeover=False)  # resuming adopts them
    assert adopted == {4}
    claimed = save_dir.claim(root, resuming=True)
    make_owned_iter(tmp_path, 6, claimed.run_id)
    claimed.release()
    assert save_dir.decide_run(root, resuming=True, takeover=False)[0] == claimed.run_id  # --load = --save
    with pytest.raises(CheckpointError, match=rf"holds checkpoints \[4, 6\] of run {claimed.run_id}.*--finetune"):
        save_dir.decide_run(root, resuming=False, takeover=False, env={})  # a new run (or a --finetune)
    requeued = save_dir.decide_run(root, resuming=False, takeover=False, env={"SLURM_JOB_ID": "4242"})
    assert requeued[0] == claimed.run_id  # the same Slurm job, requeued, runs the same command again
    with pytest.raises(CheckpointError, match="Slurm job 4242"):
        save_dir.decide_run(root, resuming=False, takeover=False, env={"SLURM_JOB_ID": "4243"})
    new, adopted, notes = save_dir.decide_run(root, resuming=False, takeover=True, env={})
    assert new != claimed.run_id and adopted == set() and "kept, never pruned" in notes[0]


def test_schedule_changes_are_refused_unless_told_which_to_use():
    saved = {"max_lr": 1e-3, "min_lr": 0.0, "lr_decay_steps": 32, "wd_incr_steps": 32, "wd_incr_style": "constant",
             "start_wd": 0.01, "end_wd": 0.01}
    assert check_schedule(saved, {**saved, "wd_incr_steps": 40}, "refuse") == []  # a constant decay never reads it
    with pytest.raises(CheckpointError, match=r"max_lr \(--lr\): checkpoint 0.001, this run 0.002.*--override"):
        check_schedule(saved, {**saved, "max_lr": 2e-3}, "refuse")
    assert "this run's schedule" in check_schedule(saved, {**saved, "max_lr": 2e-3}, "override")[0]
    assert "checkpoint's schedule" in check_schedule(saved, {**saved, "lr_decay_steps": 40}, "checkpoint")[0]


# --- checkpoints are verified before use ---------------------------------------------------------------------------
def _flip_byte(path: str, at: float = 0.5) -> None:
    with open(path, "r+b") as f:
        f.seek(int(os.path.getsize(path) * at))
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))


DAMAGE = {
    "flipped byte in a shard": (lambda d: _flip_byte(os.path.join(d, "__0_0.distcp")), "__0_0.distcp: sha256 differs"),
    "truncated shard": (lambda d: os.truncate(os.path.join(d, "__0_1.distcp"), 1000), "__0_1.distcp has 1000 bytes"),
    "missing shard": (lambda d: os.remove(os.path.join(d, "__0_0.distcp")), "__0_0.distcp is missing"),
    "missing common.pt": (lambda d: os.remove(os.path.join(d, "common.pt")), "common.pt is missing"),
    "garbled grin_config.json": (lambda d: open(os.path.join(d, CONFIG_NAME), "w").write('{"num_layers": 4,'),
                                 "grin_config.json"),
    "garbled .metadata": (lambda d: _flip_byte(os.path.join(d, ".metadata"), 0.1), ".metadata"),
    "garbled manifest": (lambda d: open(os.path.join(d, ckpt_format.MANIFEST_NAME), "w").write("{"),
                         "grin_manifest.json is damaged"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_every_kind_of_damage_is_found(adam_runs, tmp_path, damage):
    straight, _ = adam_runs
    d = str(tmp_path / "iter_0000008")
    shutil.copytree(iteration_dir(str(straight), 8), d)
    assert checkpoint_problems(d) == []
    harm, expected = DAMAGE[damage]
    harm(d)
    problems = checkpoint_problems(d)
    assert problems and expected in " ".join(problems), problems


def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(adam_runs, tmp_path):
    """Auto-requeue resumes from iteration 6 with a warning (and trains exactly as the straight run did);
    --no-ckpt-fallback refuses; the converter refuses, naming the damage and the intact iterations."""
    straight, _ = adam_runs
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(straight, ckpt)
    _flip_byte(os.path.join(iteration_dir(ckpt, 8), "__0_0.distcp"))
    refused = run_pretrain(*RESUME_ARGS, "--load", ckpt, "--save", ckpt, "--no-ckpt-fallback", check=False)
    assert refused.returncode == 2 and "sha256 differs from the manifest" in refused.stderr
    assert "Traceback" not in refused.stderr and "drop --no-ckpt-fallback" in refused.stderr
    convert = subprocess.run([sys.executable, "-m", "megatron_grin", "convert", "to-hf", "--load", ckpt, "--out",
                              str(tmp_path / "hf")], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert convert.returncode == 1 and "iter_0000008 is damaged: __0_0.distcp: sha256 differs" in convert.stderr
    assert "iterations [6]" in convert.stderr and not (tmp_path / "hf").exists()
    resumed = run_pretrain(*RESUME_ARGS, "--load", ckpt, "--save", ckpt, "--log-dir", str(tmp_path / "log"))
    assert "Falling back to the newest intact checkpoint, iteration 6" in resumed.stdout
    assert f"loaded {iteration_dir(ckpt, 6)}: iteration 6" in resumed.stdout
    assert losses(tmp_path / "log") == {7: losses(straight)[7], 8: losses(straight)[8]}  # bit-exact
    assert checkpoint_problems(iteration_dir(ckpt, 8)) == []  # the damaged one was replaced by a good save


# --- nothing is lost to another run ---------------------------------------------------------------------------------
def test_another_run_cannot_write_into_a_runs_directory(adam_runs, tmp_path):
    """A fresh run and a --finetune into a directory with another run's checkpoints are refused before anything
    is built; with --save-dir-takeover they run, and the other run's checkpoints and files stay."""
    straight, _ = adam_runs
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(straight, ckpt)
    before = {n: os.path.getmtime(os.path.join(ckpt, n)) for n in os.listdir(ckpt)}
    for extra in ([], ["--finetune", "--load", ckpt, "--ckpt-keep-last", "2"]):
        proc = run_pretrain(*TINY, "--train-iters", "4", "--save", ckpt, *extra, check=False)
        assert proc.returncode == 2 and "holds checkpoints [6, 8] of run" in proc.stderr, proc.stderr[-2000:]
        assert "--save-dir-takeover" in proc.stderr and "Traceback" not in proc.stderr
    assert {n: os.path.getmtime(os.path.join(ckpt, n)) for n in os.listdir(ckpt)} == before
    run_pretrain(*TINY, "--train-iters", "4", "--save", ckpt, "--finetune", "--load", ckpt, "--ckpt-keep-last", "1",
                 "--save-dir-takeover", "--log-dir", str(tmp_path / "log"))
    assert complete_iterations(ckpt) == [4, 6, 8]  # keep-last 1 pruned nothing of the other run's
    assert open(os.path.join(ckpt, TRACKER_NAME)).read().strip() == "4"
    assert [checkpoint_problems(iteration_dir(ckpt, it)) for it in (6, 8)] == [[], []]


# --- failures are reported as what they are ------------------------------------------------------------------
def _in_small_fs(tmp_path, options: str, script: str) -> subprocess.CompletedProcess:
    """Run a shell script with $FS a fresh tmpfs mounted with ``options`` (a user namespace: no root needed)."""
    fs = tmp_path / "fs"
    fs.mkdir(exist_ok=True)
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("needs unshare -rm (user namespaces) to mount a small file system")
    return subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o {options} tmpfs {fs} && FS={fs} && "
                           f"{script}"], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=900)


def test_a_full_disk_is_reported_and_its_tmp_removed(tmp_path):
    """The first save runs out of space half-way (the free-space estimate passed): "No space left on device", no
    .tmp left, exit 2. A later save that cannot fit is refused before writing, the previous checkpoint intact."""
    cmd = " ".join(pretrain_cmd(*TINY, "--log-dir", str(tmp_path / "log"), "--save", "$FS/ckpt"))
    proc = _in_small_fs(tmp_path, "size=4800k", f"{cmd} --train-iters 2; echo RC=$?; ls -a $FS/ckpt")
    assert "RC=2" in proc.stdout and "No space left on device while saving iteration 2" in proc.stderr, \
        proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and ".tmp" not in proc.stdout.split("RC=2")[1]
    proc = _in_small_fs(tmp_path, "size=8m", f"{cmd} --train-iters 4 --save-interval 2; echo RC=$?; ls -a $FS/ckpt; "
                                        f"cat $FS/ckpt/{TRACKER_NAME}")
    listing = proc.stdout.split("RC=2")[-1].split()
    assert "RC=2" in proc.stdout and "No space left on device for a checkpoint" in proc.stderr, proc.stderr[-3000:]
    assert "iter_0000002" in listing and "iter_0000004.tmp" not in listing and listing[-1] == "2"


def test_unwritable_output_directories_are_found_before_training(tmp_path):
    cmd = " ".join(pretrain_cmd(*TINY, "--train-iters", "2", "--save", "$FS/ckpt", "--log-dir", "$FS/log",
                                "--tensorboard-dir", "$FS/tb"))
    proc = _in_small_fs(tmp_path, "ro", f"{cmd}; echo RC=$?")
    assert "RC=2" in proc.stdout, proc.stderr[-3000:]
    for flag in ("--save", "--log-dir", "--tensorboard-dir"):
        assert f"{flag} {tmp_path}/fs/" in proc.stderr and "Read-only file system" in proc.stderr
    assert "iter " not in proc.stdout and "Traceback" not in proc.stderr  # nothing trained


# --- --load is what it says, and a resume is compared with its checkpoint --------------------------------------------
def test_load_must_name_an_existing_save_root(adam_runs, tmp_path):
    straight, _ = adam_runs
    missing = run_pretrain(*TINY, "--train-iters", "2", "--load", str(tmp_path / "typo"), check=False)
    assert missing.returncode == 2 and f"--load {tmp_path}/typo does not exist" in missing.stderr
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "is a file" in run_pretrain(*TINY, "--train-iters", "2", "--load", str(a_file), check=False).stderr
    one = run_pretrain(*TINY, "--train-iters", "2", "--load", iteration_dir(str(straight), 8), check=False)
    assert one.returncode == 2 and f"--load {straight} --ckpt-step 8" in one.stderr
    (tmp_path / "empty").mkdir()
    fresh = run_pretrain(*TINY, "--train-iters", "1", "--load", str(tmp_path / "empty"))
    assert f"--load {tmp_path}/empty holds no checkpoint: starting from scratch" in fresh.stdout
    run_pretrain(*TINY, "--train-iters", "1", "--load", str(tmp_path / "new"), "--save", str(tmp_path / "new"))
    assert complete_iterations(str(tmp_path / "new")) == [1]  # --load = --save: a run's first job
    assert "Traceback" not in missing.stderr + one.stderr


def test_a_resume_compares_its_settings_with_the_checkpoint(adam_runs, tmp_path):
    """A changed schedule is refused as in Megatron-LM (or taken, when told which); a changed data setting is
    allowed and reported."""
    straight, _ = adam_runs
    refused = run_pretrain(*RESUME_ARGS, "--load", str(straight), "--lr", "2e-3", check=False)
    assert refused.returncode == 2 and "max_lr (--lr): checkpoint 0.001, this run 0.002" in refused.stderr
    assert "--override-opt-param-scheduler" in refused.stderr and "Traceback" not in refused.stderr
    dry = run_pretrain(*RESUME_ARGS, "--load", str(straight), "--lr", "2e-3", "--dry-run", check=False)
    assert dry.returncode == 2 and "max_lr (--lr): checkpoint 0.001, this run 0.002" in dry.stderr  # found with flags
    taken = run_pretrain(*RESUME_ARGS, "--load", str(straight), "--lr", "2e-3", "--override-opt-param-scheduler",
                         "--train-iters", "9", "--seq-length", "16", "--log-dir", str(tmp_path / "log"))
    assert "--seq-length changed since the checkpoint (32 -> 16)" in taken.stdout
    assert "using this run's schedule" in taken.stdout and sorted(losses(tmp_path / "log")) == [9]


def _launcher_wrapper() -> str:
    """The bash script launch/grin.sbatch runs torchrun through (one per node)."""
    with open(os.path.join(ROOT, "launch", "grin.sbatch"), encoding="utf-8") as f:
        return re.search(r"wrapper=\(bash -c '([^']*)' torchrun\)", f.read()).group(1)


@pytest.mark.slow
def test_torchrun_in_the_launchers_wrapper_exits_0_after_a_sigterm_save(tmp_path):
    """Slurm's SIGTERM reaches every process of the step: torchrun, the ranks and their checkpoint writers. Under
    the launcher's wrapper torchrun lets the ranks save (the writers survive it) and exits 0 after them."""
    ckpt = str(tmp_path / "ckpt")
    cmd = ["bash", "-c", _launcher_wrapper(), "torchrun", "--standalone", "--nproc-per-node", "2", "-m",
           "megatron_grin", "pretrain", *TINY, "--train-iters", "400", "--save", ckpt, "--save-interval", "2",
           "--log-interval", "1"]
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(SLURM_NODEID="0", PATH=path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    family = []
    try:
        assert wait_for(lambda: os.path.isdir(iteration_dir(ckpt, 4)), proc), proc.communicate()[1][-3000:]
        family = [proc.pid, *descendants(proc.pid)]
        for pid in family:  # what slurmstepd does on scancel or preemption
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        for pid in [*descendants(proc.pid), *family[1:]]:  # nothing outlives a failed test (pids checked: reuse)
            try:
                if ckpt.encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopping at iteration" in stdout and "SIGTERM" in stdout
    stopped = int(open(os.path.join(ckpt, TRACKER_NAME)).read())
    assert stopped >= 4 and checkpoint_problems(iteration_dir(ckpt, stopped)) == []


def test_longer_run_with_constant_weight_decay_resumes_the_schedule():
    """megatron's scheduler asserts on wd_incr_steps (train iterations x batch) even for a constant weight decay,
    which never reads it: a chained job that trains further must still resume (a linear increase must not)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_grin.training.checkpointing import _unused_wd_steps_as_now

    class _Opt:
        param_groups = [{"lr": 0.0, "weight_decay": 0.0}]

    def scheduler(train_steps, wd_style="constant", end_wd=0.01):
        return OptimizerParamScheduler(_Opt(), init_lr=0.0, max_lr=1e-3, min_lr=0.0, lr_warmup_steps=0,
                                       lr_decay_steps=48, lr_decay_style="linear", start_wd=0.01, end_wd=end_wd,
                                       wd_incr_steps=train_steps, wd_incr_style=wd_style,
                                       use_checkpoint_opt_param_scheduler=False)  # Megatron-LM's default flags

    saved = scheduler(12)
    saved.step(3)
    resumed = scheduler(24)
    with pytest.raises(AssertionError):  # megatron's own check, unpatched
        scheduler(24).load_state_dict(saved.state_dict())
    resumed.load_state_dict(_unused_wd_steps_as_now(saved.state_dict(), resumed))
    assert resumed.num_steps == 3 and resumed.wd_incr_steps == 24
    linear = scheduler(24, "linear", end_wd=0.1)
    assert _unused_wd_steps_as_now(scheduler(12, "linear", end_wd=0.1).state_dict(), linear)["wd_incr_steps"] == 12


def test_a_tracker_without_an_iteration_number_is_said(tmp_path, caplog):
    """Megatron-LM exits on a garbled tracker; megatron-grin takes the newest complete checkpoint, and says so."""
    from megatron_grin.ckpt_format import TRACKER_NAME, read_tracker

    (tmp_path / TRACKER_NAME).write_text("abc")
    with caplog.at_level(logging.WARNING, logger="megatron_grin.ckpt_format"):
        assert read_tracker(str(tmp_path)) is None
    assert "holds 'abc', not an iteration number" in caplog.text
    (tmp_path / TRACKER_NAME).write_text("12\n")
    assert read_tracker(str(tmp_path)) == 12
