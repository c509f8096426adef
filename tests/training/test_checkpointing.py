"""Checkpoints: bit-exact resume, atomic commits under kill -9, --load's choice, resharding, config checks."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from test_train import ROOT, TINY, descendants, env, losses, pretrain_cmd, records, run_pretrain, wait_for

from megatron_grin.ckpt_format import CONFIG_NAME, TRACKER_NAME, complete_iterations, find_checkpoint, iteration_dir
from megatron_grin.training.checkpointing import prune


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
    assert sorted(os.listdir(straight)) == ["iter_0000006", "iter_0000008", TRACKER_NAME, "loss_curve.png",
                                            "metrics.jsonl", "summary.json"]


@pytest.mark.slow
def test_resume_with_the_distributed_optimizer_is_bit_exact(tmp_path):
    assert_bit_exact(*straight_and_split(tmp_path, "--use-distributed-optimizer"))


@pytest.mark.slow
def test_resume_with_two_data_parallel_ranks_is_bit_exact(tmp_path):
    """torchrun, DP2, distributed optimizer (gathered to DP rank 0 on save, scattered on load)."""
    args = [*RESUME_ARGS, "--use-distributed-optimizer", "--global-batch-size", "8"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_pretrain(*args, "--save", str(straight), nproc=2)
    run_pretrain(*args, "--save", str(split), "--load", str(split), "--exit-interval", "4", nproc=2)
    run_pretrain(*args, "--save", str(split), "--load", str(split), nproc=2)
    assert_bit_exact(straight, split)


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
    killed_at, family = None, []
    try:
        assert wait_for(lambda: os.path.isdir(iteration_dir(ckpt, 2)), proc), proc.stderr.read()[-3000:]
        for target in range(4, 400, 2):  # kill at the first save we catch in progress
            tmp = iteration_dir(ckpt, target) + ".tmp"
            if not wait_for(lambda: os.path.isdir(tmp) or os.path.isdir(iteration_dir(ckpt, target)), proc,
                            poll=0.002):
                break
            if os.path.isdir(tmp):
                family = [proc.pid, *descendants(proc.pid)]  # the trainer and its checkpoint writers
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = target
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pid in family[1:]:  # writer processes and megatron's queue manager
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert killed_at is not None, "never caught a save in progress"
    assert proc.returncode == -signal.SIGKILL
    assert os.path.isdir(iteration_dir(ckpt, killed_at) + ".tmp")
    assert not os.path.exists(iteration_dir(ckpt, killed_at))
    previous = killed_at - 2
    assert find_checkpoint(ckpt) == (previous, iteration_dir(ckpt, previous))

    resumed = run_pretrain(*args, "--exit-interval", str(killed_at))
    assert f"loaded {iteration_dir(ckpt, previous)}: iteration {previous}" in resumed.stdout
    assert f"stopping at iteration {killed_at}" in resumed.stdout
    assert open(os.path.join(ckpt, TRACKER_NAME)).read().strip() == str(killed_at)
    assert os.path.exists(os.path.join(iteration_dir(ckpt, killed_at), CONFIG_NAME))
    assert not os.path.exists(iteration_dir(ckpt, killed_at) + ".tmp")


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
                        "--log-interval", "1")
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
