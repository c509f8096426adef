"""The training driver end to end on CPU: losses, preemption, logging outputs, the CLI.

Runs `python -m megatron_grin pretrain` in subprocesses on the `test` preset with mock data (a few
seconds of training each; most of the time is interpreter start-up). Helpers here are shared with
test_checkpointing.py.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: smallest useful run: 4 layers of width 64, 4 experts, 32-token sequences, 2 micro-batches of 2 per step
TINY = ["--model-preset", "test", "--mock-data", "--seq-length", "32", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--lr", "1e-3", "--log-interval", "2", "--eval-iters", "0", "--seed", "7"]


def env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


def pretrain_cmd(*args, nproc: int = 1) -> list:
    if nproc == 1:
        return [sys.executable, "-m", "megatron_grin", "pretrain", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "megatron_grin", "pretrain", *args]


def run_pretrain(*args, nproc: int = 1, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(pretrain_cmd(*args, nproc=nproc), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env())
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def records(log_dir, kind: str = "train") -> list:
    with open(os.path.join(log_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


def losses(log_dir) -> dict:
    """iteration -> loss (a resumed run appends; later records win)."""
    return {r["iteration"]: r["loss"] for r in records(log_dir)}


def descendants(pid: int) -> list:
    """All live descendant pids of pid (from /proc), deepest last."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300, poll: float = 0.01) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


# --- training ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One 8-step run with everything on: eval, TensorBoard, wandb requested, checkpoints."""
    out = tmp_path_factory.mktemp("straight")
    proc = run_pretrain(*TINY, "--train-iters", "8", "--save", str(out / "ckpt"), "--save-interval", "4",
                        "--log-dir", str(out), "--eval-interval", "4", "--eval-iters", "1",
                        "--tensorboard-dir", str(out / "tb"), "--wandb-project", "grin-test",
                        "--moe-aux-loss-coeff", "0.01", "--log-params-norm", "--log-num-zeros-in-grad")
    return out, proc


def test_loss_falls_and_every_step_is_recorded(straight):
    out, _ = straight
    got = losses(out)
    assert sorted(got) == list(range(1, 9))
    assert all(math.isfinite(v) for v in got.values())
    assert got[8] < got[1] - 0.1  # lr 1e-3 on mock data: the loss moves from ln(V) ~ 4.9 quickly


def test_plain_log_lines_show_loss_lr_throughput_mfu_and_moe(straight):
    out, proc = straight
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("iter ") and "| loss" in ln]
    assert len(lines) == 4  # --log-interval 2 over 8 steps, no TTY: plain lines, no progress bar
    for key in ("loss", "lr", "grad", "tok/s", "MFU", "mem", "moe cv", "lbl"):
        assert key in lines[-1], (key, lines[-1])
    assert "validation loss" in proc.stdout


def test_interval_records_hold_router_metrics_reduced_over_layers(straight):
    out, _ = straight
    rec = records(out, "interval")[-1]
    for key in ("moe/tokens_per_expert_cv", "moe/experts_without_tokens", "moe/router_entropy",
                "moe/load_balancing_loss", "perf/mfu", "perf/tokens_per_second", "memory/peak_gib"):
        assert key in rec, key
    assert 0.5 < rec["moe/load_balancing_loss"] < 2.0  # E * sum f_i P_i is ~1 near balance
    assert 0 < rec["moe/router_entropy"] <= math.log(4) + 1e-6  # 4 experts
    assert 0 < rec["perf/mfu"] < 1


def test_params_norm_and_zeros_in_grad_are_logged_when_asked(straight):
    """--log-params-norm (its value is checked at every layout in test_metrics.py) and --log-num-zeros-in-grad
    (megatron's optimizer counts them): in the interval records, every step's record and the log line."""
    out, proc = straight
    norms = [r["train/params_norm"] for r in records(out, "interval")]
    assert len(norms) == 4 and all(n > 0 for n in norms) and len(set(norms)) == 4  # training moves the weights
    zeros = [r["num_zeros_in_grad"] for r in records(out)]
    assert len(zeros) == 8 and all(z == int(z) and z > 0 for z in zeros)  # unseen vocabulary rows get no gradient
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("iter ") and "| loss" in ln][-1]
    assert f"params norm {norms[-1]:.3f}" in line and f"zeros in grad {int(zeros[-1])}" in line


def test_summary_png_tensorboard_and_missing_wandb(straight):
    out, proc = straight
    summary = json.load(open(out / "summary.json"))
    assert summary["status"] == "finished" and summary["iteration"] == 8
    assert summary["first_loss"] == losses(out)[1] and summary["last_loss"] == losses(out)[8]
    assert summary["checkpoint"].endswith("iter_0000008") and summary["parameters"]["active"] > 0
    assert summary["last_eval"][0] == 8
    assert open(out / "loss_curve.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "tb"))
    try:
        import wandb  # noqa: F401
    except ImportError:
        assert "wandb is not installed" in proc.stdout + proc.stderr
    for key in ("checkpoint:", "loss_curve:", "summary:"):
        assert key in proc.stdout


def test_flops_per_token_counts_active_parameters_and_attention():
    """Independent count from the architecture: attention + router + top-k experts + lm head, PaLM attention."""
    from megatron_grin.config import preset
    from megatron_grin.training.metrics import flops_per_token

    cfg = preset("tiny", vocab_size=259)
    h, f, v, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size, cfg.head_dim
    q, kv, e, k, L, S = cfg.num_attention_heads, cfg.num_query_groups, cfg.num_experts, cfg.moe_router_topk, \
        cfg.num_layers, 256
    attention = (h * (q + 2 * kv) * d + (q + 2 * kv) * d) + (q * d * h + h)  # qkv + bias, o_proj + bias
    norms = 2 * 2 * h
    per_layer = attention + norms + e * h + k * 3 * h * f  # router + top-k SwiGLU experts (w1, w3, w2)
    head = v * h + v + 2 * h  # lm head + bias, final norm
    expected = 6 * (L * per_layer + head) + 12 * L * q * d * S
    assert flops_per_token(cfg, S) == expected


# --- preemption ------------------------------------------------------------------------------------------
def test_sigterm_saves_at_the_next_step_exits_0_and_resume_finishes(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    args = [*TINY, "--train-iters", "40", "--save", ckpt, "--load", ckpt, "--log-interval", "1"]
    proc = subprocess.Popen(pretrain_cmd(*args), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        metrics = os.path.join(ckpt, "metrics.jsonl")
        assert wait_for(lambda: os.path.exists(metrics) and len(open(metrics).readlines()) >= 6, proc), \
            proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopping at iteration" in stdout and "SIGTERM" in stdout
    stopped = max(losses(ckpt))
    assert 3 <= stopped < 40
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read().strip() == str(stopped)
    assert os.path.exists(os.path.join(ckpt, f"iter_{stopped:07d}", "grin_config.json"))
    assert json.load(open(os.path.join(ckpt, "summary.json")))["status"] == "stopped"

    resumed = run_pretrain(*args)
    assert f"iteration {stopped}" in resumed.stdout  # "loaded ...: iteration N"
    assert sorted(losses(ckpt)) == list(range(1, 41))
    first_resumed = [r for r in records(ckpt)][stopped]  # the record after the first run's last one
    assert first_resumed["iteration"] == stopped + 1


def test_exit_duration_stops_with_a_checkpoint(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    proc = run_pretrain(*TINY, "--train-iters", "1000", "--save", ckpt, "--exit-duration-in-mins", "0.0001")
    assert "--exit-duration-in-mins reached" in proc.stdout
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read().strip() == "1"


def test_signal_handler_only_sets_a_flag():
    from megatron_grin.training.trainer import ExitSignals

    previous = signal.getsignal(signal.SIGUSR1)
    signals = ExitSignals(enabled=True)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.received == signal.SIGUSR1
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGUSR1) == previous


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_all_ranks_at_the_same_step(tmp_path):
    """torchrun with 2 data-parallel ranks; SIGTERM to rank 1 only: both save one checkpoint and exit 0."""
    ckpt = str(tmp_path / "ckpt")
    args = [*TINY, "--train-iters", "200", "--save", ckpt, "--log-interval", "1"]
    proc = subprocess.Popen(pretrain_cmd(*args, nproc=2), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        metrics = os.path.join(ckpt, "metrics.jsonl")
        assert wait_for(lambda: os.path.exists(metrics) and len(open(metrics).readlines()) >= 6, proc)
        workers = [p for p in descendants(proc.pid) if b"megatron_grin" in open(f"/proc/{p}/cmdline", "rb").read()]
        ranks = {}
        for pid in workers:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            if b"RANK" in environ:
                ranks[int(environ[b"RANK"])] = pid
        os.kill(ranks[1], signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    stopped = max(losses(ckpt))
    assert stopped < 200 and "SIGTERM" in stdout
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read().strip() == str(stopped)


# --- CLI ---------------------------------------------------------------------------------------------------
def test_cli_dispatch(monkeypatch, capsys):
    from megatron_grin import cli

    assert cli.main([]) == 2 and "pretrain" in capsys.readouterr().out
    assert cli.main(["pretrian"]) == 2 and "did you mean pretrain" in capsys.readouterr().err
    seen = {}
    fake = types.ModuleType("grin_fake_command")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 3
    monkeypatch.setitem(sys.modules, "grin_fake_command", fake)
    monkeypatch.setitem(cli.COMMANDS, "fake", ("grin_fake_command", "main", "x"))
    assert cli.main(["fake", "a", "--b"]) == 3 and seen["argv"] == ["a", "--b"]  # exit status passes through


def test_console_script_and_module_entry_points():
    proc = subprocess.run([sys.executable, "-m", "megatron_grin", "--help"], capture_output=True, text=True,
                          timeout=120, env=env())
    assert proc.returncode == 0
    for name in ("pretrain", "preprocess", "convert", "plan", "bench"):
        assert name in proc.stdout
