"""The Slurm launchers (launch/submit.sh, launch/grin.sbatch): dry runs and shellcheck (fast), and real jobs on
a two-node Slurm cluster started by the ``slurm_cluster`` fixture (slow: `bash tests/run.sh -m slow`).

The slow tests train `--model-preset test --mock-data` on CPU with gloo, 2 nodes x 2 ranks.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from slurm import ensure_debian_packages, slurm_cluster  # noqa: F401  (pytest fixture)

ROOT = Path(__file__).resolve().parents[1]
SUBMIT = ROOT / "launch" / "submit.sh"
SHELL_FILES = ["launch/grin.sbatch", "launch/submit.sh", "launch/site.env"]
PRESETS = {"h100x64": 8, "h100x128": 16, "h100x256": 32, "h100x512": 64}


def submit(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    proc = subprocess.run(["bash", str(SUBMIT), *args], env=full_env, capture_output=True, text=True)
    if check and proc.returncode:
        raise AssertionError(f"submit.sh {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    return proc


# --- fast: dry runs and shellcheck ------------------------------------------------------------------------
def test_shellcheck_clean():
    ensure_debian_packages({"shellcheck": "shellcheck"})
    proc = subprocess.run(["shellcheck", "-x", *SHELL_FILES], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def dry_run(*args: str) -> tuple[str, str, str]:
    """``submit.sh ... --dry-run``: (whole output, the sbatch command, the srun command the job would run)."""
    out = submit("--dry-run", *args).stdout
    head, _, srun = out.partition("# on the first node of the allocation, grin.sbatch runs:\n")
    return out, head.partition("# submit:\n")[2], srun


@pytest.mark.parametrize("preset,nodes", PRESETS.items())
def test_dry_run_torchrun_per_node(preset, nodes, tmp_path):
    run_dir = tmp_path / "run"
    out, sbatch, srun = dry_run("--preset", preset, "--run-dir", str(run_dir))
    assert f"--nodes={nodes} " in sbatch and "--gpus-per-node=8" in sbatch and "--ntasks-per-node=1" in sbatch
    assert f"--chdir={run_dir} " in sbatch and "LAUNCH_MODE=torchrun" in sbatch
    assert (f"srun --nodes={nodes} --kill-on-bad-exit=1 --label --ntasks={nodes} --ntasks-per-node=1 "
            "--cpus-per-task=CPUS_ON_NODE") in srun
    assert f"--nnodes={nodes} --nproc-per-node=8 " in srun and '--node-rank="$SLURM_NODEID"' in srun
    trainer = srun.splitlines()[-1].strip()
    assert trainer.startswith("megatron-grin pretrain ")
    assert ("--tensor-model-parallel-size 1 --pipeline-model-parallel-size 8 "
            "--num-layers-per-virtual-pipeline-stage 1 --micro-batch-size 1 "
            "--recompute-granularity full --recompute-method uniform --recompute-num-layers 1 "
            "--use-distributed-optimizer") in trainer
    ckpt = run_dir / "checkpoints"
    assert f"--save {ckpt} --load {ckpt} " in trainer and f"--config {run_dir}/config.yaml" in trainer
    dp = nodes  # 8 ranks per node / (TP 1 x PP 8)
    assert f"TP 1 x PP 8 x DP {dp} (VPP 4); global batch 2048 = micro 1 x DP {dp} x {2048 // dp} microbatches" in out
    assert not run_dir.exists(), "--dry-run must not write anything"


@pytest.mark.parametrize("preset,nodes", PRESETS.items())
def test_dry_run_srun_per_rank(preset, nodes, tmp_path):
    _, sbatch, srun = dry_run("--preset", preset, "--run-dir", str(tmp_path), "--mode", "srun")
    assert "--ntasks-per-node=8" in sbatch and "LAUNCH_MODE=srun" in sbatch
    assert (f"srun --nodes={nodes} --kill-on-bad-exit=1 --label --ntasks={nodes * 8} --ntasks-per-node=8 "
            "--cpus-per-task=CPUS_ON_NODE/8") in srun
    assert "torchrun" not in srun
    assert "--pipeline-model-parallel-size 8" in srun.splitlines()[-1]


@pytest.mark.parametrize("preset,nodes", PRESETS.items())
def test_preset_command_passes_the_trainers_own_checks(preset, nodes, tmp_path):
    """The merged config and the flags a preset job would run parse and validate in `megatron-grin pretrain`."""
    from megatron_grin.training.arguments import parse_args

    out, _, srun = dry_run("--preset", preset, "--run-dir", str(tmp_path), "--", "--mock-data")
    config = "\n".join(line[4:] for line in out.splitlines() if line.startswith("#   "))
    (tmp_path / "config.yaml").write_text(config)  # what submit.sh writes at submission
    argv = shlex.split(srun.splitlines()[-1])
    assert argv[:2] == ["megatron-grin", "pretrain"]
    model, train = parse_args(argv[2:], world_size=nodes * 8)
    assert (model.num_layers, model.hidden_size, model.num_experts, model.ffn_hidden_size) == (32, 4096, 16, 6400)
    assert (model.tensor_model_parallel_size, model.pipeline_model_parallel_size) == (1, 8)
    assert model.virtual_pipeline_model_parallel_size == 4 and model.recompute_granularity == "full"
    assert (train.data_parallel_size, train.global_batch_size, train.seq_length) == (nodes, 2048, 4096)
    assert train.use_distributed_optimizer and train.save == train.load == str(tmp_path / "checkpoints")


def test_submit_rejects_a_layout_that_does_not_divide():
    # 3 nodes x 8 = 24 ranks = PP 8 x DP 3, and 2048 sequences do not split over 3 replicas.
    proc = submit("--preset", "h100x64", "--nodes", "3", "--dry-run", check=False)
    assert proc.returncode != 0 and "global batch 2048 is not divisible by micro-batch 1 x DP 3" in proc.stderr


def test_submit_refuses_a_preset_run_without_data(tmp_path):
    proc = submit("--preset", "h100x64", "--run-dir", str(tmp_path / "run"), check=False)
    assert proc.returncode != 0 and "no training data" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_dry_run_chain_container_and_overrides(tmp_path):
    out, sbatch, srun = dry_run("--preset", "h100x64", "--run-dir", str(tmp_path), "--chain", "3", "--no-requeue",
                                "--container", "nvcr.io/nvidia/pytorch:25.01-py3", "--time", "24:00:00",
                                "--grace", "900", "--", "--micro-batch-size", "2")
    assert "submitted 3 times" in out and "--dependency=singleton" in sbatch and "--no-requeue" in sbatch
    assert "--time=24:00:00" in sbatch and "--signal=B:USR1@900" in sbatch and "REQUEUE=0" in sbatch
    assert "--container-image=nvcr.io/nvidia/pytorch:25.01-py3" in srun
    assert srun.splitlines()[-1].startswith("    python -m megatron_grin pretrain ")
    assert srun.rstrip().endswith("--micro-batch-size 2")  # the user's flags come last, so they win
    assert "micro 2 x DP 8 x 128 microbatches" in out


# --- slow: real jobs on a two-node cluster ----------------------------------------------------------------
RANKS_PER_NODE = 2
TRAIN = ["--model-preset", "test", "--mock-data", "--seq-length", "32", "--micro-batch-size", "1",
         "--global-batch-size", "4", "--log-interval", "1", "--eval-iters", "0"]
ITERATION = re.compile(r"\biter(?:ation)?\s+(\d+)\s*/\s*\d+")  # "iter 5/40 |" (megatron: "iteration")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _submit_job(cluster, run_dir: Path, name: str, *args: str) -> str:
    env = {**cluster.env, "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    out = submit("--nodes", "2", "--gpus-per-node", str(RANKS_PER_NODE), "--cpu", "--name", name,
                 "--run-dir", str(run_dir), *args, env=env).stdout
    match = re.search(r"submitted job (\d+)", out)
    assert match, out
    return match.group(1)


def _log(run_dir: Path, name: str, job: str) -> str:
    path = run_dir / "logs" / f"{name}-{job}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def _tracker(run_dir: Path) -> int | None:
    path = run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    return int(path.read_text()) if path.exists() else None


def _wait_completed(cluster, run_dir: Path, name: str, job: str, timeout: float = 150) -> tuple[dict, str]:
    """Wait for the job to end; it must have COMPLETED with exit code 0. Returns (job record, its log)."""
    info = cluster.wait_done(job, timeout=timeout)
    log = _log(run_dir, name, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n--- log ---\n{log}"
    return info, log


@pytest.mark.slow
@pytest.mark.parametrize("mode,layout", [
    ("torchrun", ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2"]),
    ("srun", ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "1"]),
])
def test_two_nodes_train_and_checkpoint(slurm_cluster, tmp_path, mode, layout):
    run_dir, name = tmp_path / "run", f"train-{mode}"
    job = _submit_job(slurm_cluster, run_dir, name, "--mode", mode, "--",
                      *TRAIN, *layout, "--train-iters", "4", "--save-interval", "2")
    info, log = _wait_completed(slurm_cluster, run_dir, name, job)
    assert info["NodeList"] == "node[1-2]" and info["NumNodes"] == "2", info
    assert f"2 nodes (node[1-2]) x {RANKS_PER_NODE} ranks, mode {mode}" in log
    assert _tracker(run_dir) == 4, log
    assert (run_dir / "checkpoints" / "iter_0000004").is_dir(), sorted(os.listdir(run_dir / "checkpoints"))
    # Every line a rank prints carries its label: node index (torchrun mode) or global rank (srun mode).
    labels = set(re.findall(r"^(\d+): ", log, re.M))
    assert "0" in labels and labels <= ({"0", "1"} if mode == "torchrun" else {"0", "1", "2", "3"}), log
    if mode == "torchrun":
        assert re.search(r"^0: \[rank0\]:", log, re.M), log
        # both torchrun agents (one per node) started 2 ranks each and kept per-rank logs
        rank_logs = list((run_dir / "logs" / "torchrun").glob(f"{job}.0/*/attempt_0/[01]/stdout.log"))
        assert len(rank_logs) == 4, rank_logs
    assert max(int(i) for i in ITERATION.findall(log)) == 4, log


@pytest.mark.slow
def test_usr1_saves_requeues_and_resumes(slurm_cluster, tmp_path):
    # ~0.1 s per iteration on an idle 2-core machine: 60 leave seconds to signal mid-run (we signal at 2).
    run_dir, name, iters = tmp_path / "run", "preempt", 60
    job = _submit_job(slurm_cluster, run_dir, name, "--",
                      *TRAIN, "--pipeline-model-parallel-size", "2", "--train-iters", str(iters),
                      "--save-interval", "1000")
    # Wait for training to be under way, then do what --signal=B:USR1@600 does before the time limit.
    slurm_cluster.wait_for(lambda: any(int(i) >= 2 for i in ITERATION.findall(_log(run_dir, name, job))),
                           timeout=120, what=f"iteration 2 in job {job}'s log")
    slurm_cluster.client("scancel", "-s", "USR1", "--batch", job)
    # Slurm holds a requeued job for cred_expire (120 s here, as by default) unless the launcher's
    # StartTime=now helper gets through, which it does on this cluster (proctrack/linuxproc).
    slurm_cluster.wait_for(lambda: f"job {job} restart 1:" in _log(run_dir, name, job), timeout=240,
                           what="the requeued job to start")
    info, log = _wait_completed(slurm_cluster, run_dir, name, job)
    assert info["Restarts"] == "1", info
    first, _, second = log.partition(f"job {job} restart 1:")
    assert second, f"no restarted run in the log (--open-mode=append keeps both):\n{log}"
    assert "received SIGUSR1" in first and "requeueing job" in first, log
    saved = int(re.search(r"trainer exited with status 0; latest checkpoint iteration: (\d+)", first).group(1))
    assert 2 <= saved < iters, log
    assert f"resuming from checkpoint iteration {saved}" in second, log
    resumed = [int(i) for i in ITERATION.findall(second)]
    assert resumed and min(resumed) > saved and max(resumed) == iters, log
    assert _tracker(run_dir) == iters


@pytest.mark.slow
def test_singleton_chain_runs_jobs_one_after_the_other(slurm_cluster, tmp_path):
    run_dir, name = tmp_path / "run", "chain"
    # one LR schedule for the whole chain (the second job trains further; a changed schedule is refused on resume)
    common = [*TRAIN, "--pipeline-model-parallel-size", "2", "--save-interval", "1000", "--lr-decay-iters", "6"]
    first = _submit_job(slurm_cluster, run_dir, name, "--singleton", "--", *common, "--train-iters", "3")
    second = _submit_job(slurm_cluster, run_dir, name, "--singleton", "--", *common, "--train-iters", "6")
    pending = slurm_cluster.job(second)
    assert pending["JobState"] == "PENDING" and pending["Dependency"] == "singleton(unfulfilled)", pending
    a, _ = _wait_completed(slurm_cluster, run_dir, name, first)
    b, second_log = _wait_completed(slurm_cluster, run_dir, name, second)
    assert b["StartTime"] >= a["EndTime"], (a, b)  # ISO timestamps compare as strings
    assert "resuming from checkpoint iteration 3" in second_log, second_log
    assert _tracker(run_dir) == 6
