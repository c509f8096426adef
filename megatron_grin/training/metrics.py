"""Training metrics: console, TensorBoard, W&B, a JSONL record, the loss-curve PNG and the run summary.

The console shows a progress bar (tqdm) on a TTY and one plain line per ``--log-interval`` otherwise:
loss, learning rate, grad norm, tokens/s, MFU, memory and the MoE balance. MFU counts the FLOPs of the
*active* parameters (the top-k experts a token visits, not all experts) plus attention, in the PaLM
convention: 6 x N_active + 12 x layers x heads x head_dim x seq per token (no causal discount, no
recomputation). Per-MoE-layer routing statistics (RouterStats) and megatron's load-balancing-loss tracker
are reduced over every rank (DP, TP, PP) at each log interval, then reset.

Only global rank 0 writes: ``<log-dir>/metrics.jsonl`` (appended, so a resumed run continues it),
``loss_curve.png`` and ``summary.json``. matplotlib, tensorboard and wandb are optional.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
    reduce_aux_losses_tracker_across_ranks,
)
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.utils import unwrap_model
from tqdm import tqdm

from megatron_grin import accounting
from megatron_grin.config import GrinConfig
from megatron_grin.model.router import RouterStats, SparseMixerV2Router

log = logging.getLogger(__name__)

# --- FLOPs and peak ------------------------------------------------------------------------------------------
def flops_per_token(cfg: GrinConfig, seq_length: int) -> float:
    """Training FLOPs per token in the package's one convention (accounting.flops_per_token)."""
    return accounting.flops_per_token(cfg, seq_length)["total"]


def measured_peak_flops(dtype: torch.dtype, device: str) -> float:
    """Achievable matmul FLOP/s on this device (a short square-GEMM benchmark), the CPU's stand-in peak."""
    n = 1024 if device == "cpu" else 8192
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    torch.matmul(a, b)
    reps = 3
    if device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b)
    if device != "cpu":
        torch.cuda.synchronize()
    return 2.0 * n**3 * reps / (time.perf_counter() - start)


def peak_flops_per_device(cfg: GrinConfig, peak_tflops: Optional[float],
                          device: Optional[str] = None) -> tuple[float, str]:
    """(FLOP/s, where the number comes from): --peak-tflops, the datasheet (accounting.DEVICES), else a
    measurement. ``device`` defaults to CUDA when available."""
    if peak_tflops:
        return peak_tflops * 1e12, "--peak-tflops"
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        name = torch.cuda.get_device_name()
        tflops = accounting.datasheet_peak_tflops(name, bf16=cfg.bf16)
        if tflops is not None:
            return tflops * 1e12, f"datasheet {accounting.device_entry(name)[0]}"
        dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    else:
        dtype = torch.float32  # CPU bf16 GEMMs are emulated on most parts: fp32 is the peak
    return measured_peak_flops(dtype, device), f"measured {device} matmul"


def memory_bytes() -> tuple[float, float, float]:
    """(current, peak, peak reserved) bytes: the CUDA caching allocator's allocated / max allocated / max
    reserved on CUDA (host counters: no device sync), else the process RSS (current, peak, peak)."""
    if torch.cuda.is_available():
        return (float(torch.cuda.memory_allocated()), float(torch.cuda.max_memory_allocated()),
                float(torch.cuda.max_memory_reserved()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # KiB on Linux
    try:
        with open("/proc/self/statm") as f:
            current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        current = peak
    return float(current), peak, peak


def all_reduce(tensor: torch.Tensor, op=None) -> torch.Tensor:
    """All-reduce a small tensor over the world, in place where the backend takes its device; returns the
    result on the tensor's device. NCCL only reduces CUDA tensors, so a CPU tensor goes through the current
    GPU and back (a host sync: callers keep such tensors off the per-step path)."""
    op = torch.distributed.ReduceOp.SUM if op is None else op
    if tensor.device.type == "cpu" and torch.distributed.get_backend() == "nccl":
        on_device = tensor.to(torch.cuda.current_device())
        torch.distributed.all_reduce(on_device, op=op)
        return on_device.cpu()
    torch.distributed.all_reduce(tensor, op=op)
    return tensor


def _comm_device() -> torch.device:
    """Where this rank's collectives run: the current GPU under NCCL, else the CPU."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def params_norm(model: list) -> float:
    """L2 norm of all of the model's parameters (--log-params-norm), as Megatron-LM's calc_params_l2_norm: each
    tensor-parallel shard once, replicated parameters on TP rank 0 only, summed over the model-parallel group
    (TP x PP; data-parallel ranks hold the same weights). Collective: call on every rank; one host sync."""
    params = [p for chunk in unwrap_model(model) for p in chunk.parameters()
              if param_is_not_tensor_parallel_duplicate(p)]
    device = params[0].device if params else _comm_device()
    squares = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        squares += p.detach().double().square().sum()
    if torch.distributed.is_initialized() and ps.model_parallel_is_initialized():
        squares = squares.to(_comm_device())
        torch.distributed.all_reduce(squares, group=ps.get_model_parallel_group())
    return math.sqrt(squares.item())  # the log line needs it on the host


# --- MoE metrics (collective) --------------------------------------------------------------------------------
def routers(model: list) -> list:
    return [m for chunk in unwrap_model(model) for m in chunk.modules() if isinstance(m, SparseMixerV2Router)]


def collect_moe_metrics(model: list, cfg: GrinConfig, microbatches: int) -> dict:
    """Reduce routing statistics and the balance loss over all ranks; reset both. Call on every rank.

    ``microbatches`` = micro-batches run since the last call (to average the balance-loss tracker).
    """

    width = cfg.num_experts + 5
    found = routers(model)
    # The stats live where the routers run (no CPU table may meet them: the first H200 run crashed here).
    device = next(found[0].parameters()).device if found else _comm_device()
    table = torch.zeros(cfg.num_layers, width, dtype=torch.float64, device=device)
    for router in found:
        table[router.layer_number - 1] += router.stats.as_tensor(device=device)
        router.stats.reset()
    # One device->host copy per log interval (the summaries are host numbers); summarize() then reads
    # host memory instead of syncing once per value and layer.
    table = all_reduce(table).cpu()
    per_layer = {i + 1: RouterStats.summarize(table[i], cfg.num_experts) for i in range(cfg.num_layers)}
    out: dict[str, Any] = {"per_layer": per_layer}
    for key in next(iter(per_layer.values())):
        values = [m[key] for m in per_layer.values()]
        out[key] = sum(values) / len(values)
    out["experts_without_tokens"] = sum(m["experts_without_tokens"] for m in per_layer.values())
    out["tokens_per_expert_cv_max"] = max(m["tokens_per_expert_cv"] for m in per_layer.values())
    balance = _balance_loss(cfg, microbatches)
    if balance is not None:
        out["load_balancing_loss"] = sum(balance) / len(balance)
        for i, value in enumerate(balance):
            per_layer[i + 1]["load_balancing_loss"] = value
    return out


def _balance_loss(cfg: GrinConfig, microbatches: int) -> Optional[list[float]]:
    tracker = get_moe_layer_wise_logging_tracker()
    if "load_balancing_loss" not in tracker:
        return None
    reduce_aux_losses_tracker_across_ranks(["load_balancing_loss"])
    # one device->host copy per log interval: the values go to the log
    values = (tracker["load_balancing_loss"]["values"].double() / max(microbatches, 1)).tolist()
    clear_aux_losses_tracker()
    return values[: cfg.num_layers]


# --- the logger ----------------------------------------------------------------------------------------------
@dataclass
class _Window:
    """Sums since the last log line."""

    loss: float = 0.0
    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0
    grad_norm: float = 0.0
    num_zeros: Optional[float] = None  # the last step's, with --log-num-zeros-in-grad

    def mean_loss(self) -> float:
        return self.loss / self.steps if self.steps else float("nan")


@dataclass
class RunTotals:
    first_loss: Optional[float] = None
    last_loss: Optional[float] = None
    first_iteration: Optional[int] = None
    last_iteration: Optional[int] = None
    seconds: float = 0.0
    tokens: int = 0
    mfu: list = field(default_factory=list)
    peak_memory: tuple = ()  # the last interval's memory_bytes() (max over ranks)
    eval_losses: list = field(default_factory=list)


class MetricsLogger:
    """Writes on global rank 0 only; every method is cheap and safe to call on every rank."""

    def __init__(self, cfg: GrinConfig, tcfg, *, start_iteration: int, run_config: dict):
        self.cfg, self.tcfg = cfg, tcfg
        self.enabled = torch.distributed.get_rank() == 0
        self.flops_per_token = flops_per_token(cfg, tcfg.seq_length)
        self.peak, self.peak_source = peak_flops_per_device(cfg, tcfg.peak_tflops) if self.enabled else (0.0, "")
        self.window = _Window()
        self.totals = RunTotals()
        self.start_time = time.time()
        self._lr = float("nan")
        self.log_dir = tcfg.log_dir
        self.jsonl = None
        self.tb = None
        self.wandb = None
        self.bar = None
        if not self.enabled:
            return
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
            self.jsonl = open(os.path.join(self.log_dir, "metrics.jsonl"), "a", encoding="utf-8")
        self._open_tensorboard(run_config)
        self._open_wandb(run_config)
        if sys.stdout.isatty():
            sized = shutil.get_terminal_size((0, 0)).columns > 0  # a pty without a size reports 0 columns
            self.bar = tqdm(total=tcfg.train_iters, initial=start_iteration, unit="it", desc="train",
                            dynamic_ncols=sized, ncols=None if sized else 120)

    # -- sinks --------------------------------------------------------------------------------------------
    def _open_tensorboard(self, run_config: dict) -> None:
        if not self.tcfg.tensorboard_dir:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("--tensorboard-dir given but tensorboard is not installed; pip install tensorboard")
            return
        self.tb = SummaryWriter(log_dir=self.tcfg.tensorboard_dir, max_queue=1000)
        self.tb.add_text("config", "```\n" + json.dumps(run_config, indent=2, default=str) + "\n```")

    def _open_wandb(self, run_config: dict) -> None:
        if not self.tcfg.wandb_project:
            return
        try:
            import wandb
        except ImportError:
            log.warning("--wandb-project given but wandb is not installed (pip install wandb); continuing without")
            return
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        save_dir = self.tcfg.wandb_save_dir or self.log_dir or "."
        os.makedirs(save_dir, exist_ok=True)
        try:
            self.wandb = wandb.init(project=self.tcfg.wandb_project, name=self.tcfg.wandb_exp_name,
                                    entity=self.tcfg.wandb_entity, dir=save_dir, config=run_config, mode=mode,
                                    resume="allow")
        except Exception as err:  # never let the dashboard stop training
            log.warning("wandb.init failed (%s); continuing without wandb", err)
            self.wandb = None

    def _emit(self, record: dict, scalars: dict, iteration: int) -> None:
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.tb:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, iteration)
        if self.wandb:
            self.wandb.log(scalars, step=iteration)

    def say(self, message: str) -> None:
        """A console line that does not break the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    # -- events -------------------------------------------------------------------------------------------
    def step(self, iteration: int, loss: float, lr: float, grad_norm: Optional[float], loss_scale: float,
             seconds: float, num_zeros: Optional[float] = None) -> None:
        """After optimizer step ``iteration`` (1-based count of finished steps)."""
        if not self.enabled:
            return
        tokens = self.tcfg.tokens_per_step
        w, t = self.window, self.totals
        w.loss += loss
        w.steps += 1
        w.seconds += seconds
        w.tokens += tokens
        w.grad_norm = grad_norm if grad_norm is not None else float("nan")
        w.num_zeros = num_zeros
        if t.first_loss is None:
            t.first_loss, t.first_iteration = loss, iteration
        t.last_loss, t.last_iteration = loss, iteration
        t.seconds += seconds
        t.tokens += tokens
        record = {"type": "train", "iteration": iteration, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "loss_scale": loss_scale, "step_seconds": seconds, "tokens_per_second": tokens / seconds}
        if num_zeros is not None:
            record["num_zeros_in_grad"] = num_zeros
        self._emit(record, {}, iteration)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / seconds:,.0f}",
                                 mfu=f"{self._mfu(tokens / seconds):.1%}", refresh=False)
        self._lr = lr

    def _mfu(self, tokens_per_second: float) -> float:
        world = self.tcfg.world_size
        return tokens_per_second * self.flops_per_token / (self.peak * world) if self.peak else float("nan")

    def interval(self, iteration: int, moe: dict, memory: tuple[float, ...],
                 params_norm: Optional[float] = None) -> None:
        """Once per --log-interval, after collect_moe_metrics (same values on every rank); ``memory`` is
        memory_bytes() (current, peak, peak reserved), the maximum over ranks; ``params_norm`` with
        --log-params-norm."""
        if not self.enabled or not self.window.steps:
            return
        w = self.window
        tok_s = w.tokens / w.seconds
        mfu = self._mfu(tok_s)
        self.totals.mfu.append(mfu)
        self.totals.peak_memory = tuple(memory)
        gib = 2.0**30
        scalars = {"train/loss": w.mean_loss(), "train/lr": self._lr, "train/grad_norm": w.grad_norm,
                   "perf/tokens_per_second": tok_s, "perf/tokens_per_second_per_device": tok_s / self.tcfg.world_size,
                   "perf/mfu": mfu, "perf/step_seconds": w.seconds / w.steps,
                   "memory/current_gib": memory[0] / gib, "memory/peak_gib": memory[1] / gib}
        if len(memory) > 2:
            scalars["memory/peak_reserved_gib"] = memory[2] / gib
        if params_norm is not None:
            scalars["train/params_norm"] = params_norm
        if w.num_zeros is not None:
            scalars["train/num_zeros_in_grad"] = w.num_zeros
        for key in ("load_balancing_loss", "tokens_per_expert_cv", "tokens_per_expert_cv_max",
                    "experts_without_tokens", "router_entropy", "sampled_not_argmax_share", "heun_full_share"):
            if key in moe:
                scalars[f"moe/{key}"] = moe[key]
        for layer, values in moe.get("per_layer", {}).items():
            for key, value in values.items():
                scalars[f"moe/layer_{layer}/{key}"] = value
        self._emit({"type": "interval", "iteration": iteration, **{k: v for k, v in scalars.items()
                                                                    if "/layer_" not in k}}, scalars, iteration)
        line = (f"iter {iteration:>7d}/{self.tcfg.train_iters} | loss {w.mean_loss():.4f} | lr {self._lr:.3e} | "
                f"grad {w.grad_norm:.3f} | {tok_s:,.0f} tok/s | MFU {mfu:.1%} | {w.seconds / w.steps:.2f} s/it | "
                f"mem {memory[1] / gib:.2f} GiB")
        if params_norm is not None:
            line += f" | params norm {params_norm:.3f}"
        if w.num_zeros is not None:
            line += f" | zeros in grad {int(w.num_zeros)}"
        if "tokens_per_expert_cv" in moe:
            line += (f" | moe cv {moe['tokens_per_expert_cv']:.2f} (max {moe['tokens_per_expert_cv_max']:.2f}) "
                     f"idle {int(moe['experts_without_tokens'])} H {moe['router_entropy']:.2f}")
        if "load_balancing_loss" in moe:
            line += f" lbl {moe['load_balancing_loss']:.3f}"
        self.say(line)
        self.window = _Window()

    def evaluation(self, iteration: int, loss: float) -> None:
        if not self.enabled:
            return
        self.totals.eval_losses.append((iteration, loss))
        ppl = math.exp(min(loss, 50.0))
        self._emit({"type": "eval", "iteration": iteration, "loss": loss, "ppl": ppl},
                   {"valid/loss": loss, "valid/ppl": ppl}, iteration)
        self.say(f"iter {iteration:>7d} | validation loss {loss:.4f} | ppl {ppl:.2f}")

    # -- end ----------------------------------------------------------------------------------------------
    def close(self, summary: dict) -> dict:
        """Write summary.json and loss_curve.png (rank 0); returns the summary."""
        if not self.enabled:
            return summary
        if self.bar is not None:
            self.bar.close()
        t = self.totals
        summary = {
            **summary,
            "first_iteration": t.first_iteration, "last_iteration": t.last_iteration,
            "first_loss": t.first_loss, "last_loss": t.last_loss,
            "last_eval": t.eval_losses[-1] if t.eval_losses else None,
            "train_seconds": t.seconds, "wall_seconds": time.time() - self.start_time,
            "tokens": t.tokens, "tokens_per_second": t.tokens / t.seconds if t.seconds else None,
            "mfu_mean": sum(t.mfu) / len(t.mfu) if t.mfu else None, "peak_flops_per_device": self.peak,
            "peak_source": self.peak_source, "flops_per_token": self.flops_per_token,
            "peak_memory_gib": t.peak_memory[1] / 2.0**30 if len(t.peak_memory) > 1 else None,
            "peak_reserved_gib": t.peak_memory[2] / 2.0**30 if len(t.peak_memory) > 2 else None,
        }
        if self.log_dir:
            summary["loss_curve"] = plot_loss_curve(os.path.join(self.log_dir, "metrics.jsonl"),
                                                    os.path.join(self.log_dir, "loss_curve.png"))
            path = os.path.join(self.log_dir, "summary.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2, default=str)
                f.write("\n")
            summary["summary"] = path
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.flush()
            self.tb.close()
        if self.wandb:
            self.wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            self.wandb.finish()
        return summary


def read_history(jsonl_path: str) -> tuple[dict[int, float], dict[int, float]]:
    """(train loss by iteration, eval loss by iteration) from metrics.jsonl; later records win (resumes)."""
    train, evals = {}, {}
    try:
        with open(jsonl_path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if rec.get("type") == "train":
                    train[rec["iteration"]] = rec["loss"]
                elif rec.get("type") == "eval":
                    evals[rec["iteration"]] = rec["loss"]
    except OSError:
        pass
    return train, evals


def plot_loss_curve(jsonl_path: str, png_path: str) -> Optional[str]:
    """Plot training (and validation) loss over the whole run history; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no loss-curve plot (pip install matplotlib)")
        return None
    train, evals = read_history(jsonl_path)
    if not train:
        return None
    its = sorted(train)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot(its, [train[i] for i in its], lw=0.8, alpha=0.45, label="train (per step)")
    window = max(1, len(its) // 50)
    if window > 1:
        smooth = [sum(train[j] for j in its[max(0, k - window + 1):k + 1]) / len(its[max(0, k - window + 1):k + 1])
                  for k in range(len(its))]
        ax.plot(its, smooth, lw=1.8, label=f"train ({window}-step mean)")
    if evals:
        e = sorted(evals)
        ax.plot(e, [evals[i] for i in e], "o-", lw=1.2, label="validation")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("megatron-grin training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
