"""``megatron-grin pretrain``: start the process groups, build GRIN on megatron-core, train, checkpoint.

    megatron-grin pretrain --config configs/local.yaml                       # one process (CPU or GPU)
    torchrun --nproc-per-node 8 -m megatron_grin pretrain --config run.yaml  # one rank per GPU
    srun python -m megatron_grin pretrain ...                                # one Slurm task per rank

Flags are parsed and checked before any process group starts (arguments.py). Then: process groups
(NCCL on GPU, gloo on CPU; torchrun's RANK/WORLD_SIZE, else Slurm's SLURM_PROCID/SLURM_NTASKS),
megatron parallel state (TP, PP, virtual PP, DP), the model chunks wrapped in megatron's
DistributedDataParallel, ``get_megatron_optimizer`` + ``OptimizerParamScheduler``, ``--load``, the data
iterators at the checkpoint's data position, and the loop: one ``get_forward_backward_func()`` call
(1F1B or interleaved) and one optimizer step per iteration. SIGTERM/SIGUSR1 (and
``--exit-duration-in-mins``, ``--exit-interval``) end the run at the next step boundary with a
checkpoint and exit status 0; every rank agrees through an all-reduce.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from megatron_grin import compat
from megatron_grin.ckpt_format import iteration_dir
from megatron_grin.config import GrinConfig
from megatron_grin.model import build as grin_model
from megatron_grin.model import routing_rng
from megatron_grin.model.build import parameter_counts
from megatron_grin.training import data
from megatron_grin.training.arguments import TrainConfig
from megatron_grin.training.checkpointing import Checkpointer, TrainState
from megatron_grin.training.data import get_batch
from megatron_grin.training.metrics import MetricsLogger, all_reduce, collect_moe_metrics, memory_bytes, routers
from megatron_grin.training.tokenizer import build_tokenizer

log = logging.getLogger("megatron_grin.training.trainer")


# --- process groups ----------------------------------------------------------------------------------------
@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int


def first_slurm_host(nodelist: str) -> str:
    """'gpu[003-006,9],cpu1' -> 'gpu003' (the first node of a Slurm hostlist)."""
    head, depth = "", 0
    for ch in nodelist:
        if ch == "," and depth == 0:
            break
        depth += ch == "["
        depth -= ch == "]"
        head += ch
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]


def dist_env(env: Optional[dict] = None) -> DistEnv:
    """Rank layout from torchrun (RANK, WORLD_SIZE, LOCAL_RANK), else Slurm (one task per rank), else 1."""
    env = os.environ if env is None else env
    if "RANK" in env:
        return DistEnv(int(env["RANK"]), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        out = DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
        if out.world_size > 1:
            env.setdefault("MASTER_ADDR", first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
            env.setdefault("MASTER_PORT", str(10000 + int(env.get("SLURM_JOB_ID", 0)) % 20000))
        return out
    return DistEnv(0, 1, 0)


def init_distributed(cfg: GrinConfig) -> DistEnv:
    """torch.distributed + megatron parallel state for cfg's TP/PP/VPP layout."""

    env = dist_env()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    backend = "nccl" if cuda else "gloo"
    timeout = timedelta(minutes=30)
    if env.world_size == 1 and "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                                timeout=timeout)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
        context_parallel_size=cfg.context_parallel_size,
        expert_model_parallel_size=cfg.expert_model_parallel_size,
        distributed_timeout_minutes=30)
    return env


def set_seed(seed: int) -> None:
    """Megatron-LM's seeding: one seed per pipeline stage, TP ranks get theirs from the RNG tracker."""


    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


# --- model, optimizer --------------------------------------------------------------------------------------
def build_model(cfg: GrinConfig, tcfg: TrainConfig) -> tuple[list, object]:
    """Model chunks of this rank (one per virtual stage), in DistributedDataParallel; and their config."""


    use_te = None if tcfg.transformer_impl is None else tcfg.transformer_impl == "transformer_engine"
    # With PP=2 and virtual stages both pipeline neighbours are the same rank, and batched send/recv pairs
    # the activation and the gradient messages in posting order: they cross (seen on gloo). Megatron's
    # unbatched path sends the two directions over different process groups, which keeps them apart.
    split_p2p = cfg.virtual_pipeline_model_parallel_size is not None and cfg.pipeline_model_parallel_size == 2
    tconfig = grin_model.transformer_config(cfg, **({"batch_p2p_comm": False} if split_p2p else {}))
    vpp = cfg.virtual_pipeline_model_parallel_size
    chunks = []
    for i in range(vpp or 1):
        vp = i if vpp else None
        chunk = grin_model.build_model(
            cfg, pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            vp_stage=vp, use_te=use_te, tconfig=tconfig)
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        chunks.append(Float16Module(tconfig, chunk) if cfg.bf16 else chunk)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=tcfg.overlap_grad_reduce,
        use_distributed_optimizer=tcfg.use_distributed_optimizer)
    model = [DistributedDataParallel(tconfig, ddp_config, chunk, disable_bucketing=i > 0)
             for i, chunk in enumerate(chunks)]
    for m in model:
        m.train()
    return model, tconfig


def build_optimizer(model: list, cfg: GrinConfig, tcfg: TrainConfig, tconfig) -> tuple:
    """AdamW (megatron's, distributed or not) and the LR schedule, counted in samples like Megatron-LM."""

    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=tcfg.lr, min_lr=tcfg.min_lr, weight_decay=tcfg.weight_decay,
        adam_beta1=tcfg.adam_beta1, adam_beta2=tcfg.adam_beta2, adam_eps=tcfg.adam_eps, clip_grad=tcfg.clip_grad,
        bf16=cfg.bf16, params_dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
        use_distributed_optimizer=tcfg.use_distributed_optimizer), model)
    gbs = tcfg.global_batch_size
    decay_iters = max(tcfg.lr_decay_iters if tcfg.lr_decay_iters is not None else tcfg.train_iters, 1)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=tcfg.lr_warmup_init, max_lr=tcfg.lr, min_lr=tcfg.min_lr,
        lr_warmup_steps=tcfg.lr_warmup_iters * gbs, lr_decay_steps=decay_iters * gbs,
        lr_decay_style=tcfg.lr_decay_style, start_wd=tcfg.weight_decay, end_wd=tcfg.weight_decay,
        wd_incr_steps=max(tcfg.train_iters, 1) * gbs, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=not tcfg.override_opt_param_scheduler,
        override_opt_param_scheduler=tcfg.override_opt_param_scheduler)
    # Wire megatron's schedule hooks the way Megatron-LM's training loop does.
    tconfig.grad_scale_func = optimizer.scale_loss
    tconfig.finalize_model_grads_func = finalize_model_grads
    if tcfg.overlap_grad_reduce:
        no_sync = [m.no_sync for m in model]
        grad_sync = [m.start_grad_sync for m in model]
        tconfig.no_sync_func = no_sync[0] if len(model) == 1 else no_sync
        tconfig.grad_sync_func = grad_sync[0] if len(model) == 1 else grad_sync
    return optimizer, scheduler


# --- data --------------------------------------------------------------------------------------------------
def sample_counts(tcfg: TrainConfig) -> tuple[int, int]:
    """Samples to build for (train, valid), as Megatron-LM sizes them."""
    gbs = tcfg.global_batch_size
    evals = (tcfg.train_iters // tcfg.eval_interval if tcfg.eval_interval else 0) + 1
    return tcfg.train_iters * gbs, (evals * tcfg.eval_iters * gbs if tcfg.eval_iters else 0)


def build_data(cfg: GrinConfig, tcfg: TrainConfig, chunks: int, consumed_train: int, consumed_valid: int):
    """(train iterators, valid iterators or None): one iterator per model chunk, at the saved position."""


    train_samples, valid_samples = sample_counts(tcfg)
    if tcfg.mock_data:  # megatron warns that it cannot cache the (synthetic) indices: expected, not news
        logging.getLogger("megatron.core.datasets").setLevel(logging.ERROR)
    train_ds, valid_ds, _ = data.build_datasets(
        tcfg.data_path, tcfg.split, tcfg.seq_length, tcfg.seed, max(train_samples, 1), valid_samples, 0,
        build_tokenizer(tcfg.tokenizer), mock=tcfg.mock_data, data_cache_path=tcfg.data_cache_path,
        create_attention_mask=False)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()

    def iterators(ds, consumed, cyclic):
        if ds is None:
            return None
        its = [data.make_data_iterator(ds, tcfg.micro_batch_size, consumed, dp_rank, dp_size,
                                       num_workers=tcfg.num_workers, cyclic=cyclic) for _ in range(chunks)]
        return its if chunks > 1 else its[0]

    return iterators(train_ds, consumed_train, False), iterators(valid_ds, consumed_valid, True)


# --- one step ----------------------------------------------------------------------------------------------
def loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Sum of masked per-token losses; megatron divides by the token count and the micro-batch count."""
    losses = output.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss.detach().double(), num_tokens.double()])
    return loss, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    batch = get_batch(data_iterator, device)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def _local_loss_sums(losses: list) -> torch.Tensor:
    """[loss sum, tokens] over this rank's micro-batches; zero except on last-stage TP rank 0."""

    out = torch.zeros(2, dtype=torch.float64)
    if losses and ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_last_stage(ignore_virtual=True):
        for item in losses:
            out += item["lm loss"].double().cpu()
    return out


def run_schedule(model: list, data_iterator, tcfg: TrainConfig, forward_only: bool) -> list:
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data_iterator,
        model=model if len(model) > 1 else model[0], num_microbatches=tcfg.num_microbatches,
        seq_length=tcfg.seq_length, micro_batch_size=tcfg.micro_batch_size, forward_only=forward_only)


def train_step(model: list, optimizer, scheduler, data_iterator, tcfg: TrainConfig) -> tuple:
    """Forward/backward over the global batch and one optimizer step; (local loss sums, grad norm)."""
    for m in model:
        m.zero_grad_buffer()
    optimizer.zero_grad()
    losses = run_schedule(model, data_iterator, tcfg, forward_only=False)
    updated, grad_norm, _ = optimizer.step()
    if updated:
        scheduler.step(increment=tcfg.global_batch_size)
    return _local_loss_sums(losses), grad_norm


def evaluate(model: list, data_iterator, tcfg: TrainConfig) -> float:
    """Mean validation loss over --eval-iters global batches (argmax routing; router stats untouched)."""

    kept = [(r, copy.deepcopy(r.stats)) for r in routers(model)]
    for m in model:
        m.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(tcfg.eval_iters):
            total += _local_loss_sums(run_schedule(model, data_iterator, tcfg, forward_only=True))
    for m in model:
        m.train()
    for router, stats in kept:
        router.stats = stats

    total = all_reduce(total)
    return float(total[0] / total[1])


# --- run control -------------------------------------------------------------------------------------------
class ExitSignals:
    """SIGTERM / SIGUSR1 only set a flag; the loop saves and exits at the next step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, enabled: bool):
        self.received: Optional[int] = None
        self._previous = {}
        if enabled:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class StepResult:
    loss: float
    stop_reason: Optional[str]
    signalled: bool = False  # some rank got SIGTERM/SIGUSR1 (the same on every rank)


def reduce_step(local: torch.Tensor, signals: ExitSignals, deadline: Optional[float]) -> StepResult:
    """One all-reduce per step: the global loss, and which stop conditions hold on any rank."""

    watched = ExitSignals.SIGNALS
    vec = torch.zeros(3 + len(watched), dtype=torch.float64)
    vec[:2] = local
    vec[2] = 1.0 if deadline is not None and time.time() > deadline else 0.0
    for i, sig in enumerate(watched):
        vec[3 + i] = 1.0 if signals.received == sig else 0.0
    vec = all_reduce(vec)
    loss = float(vec[0] / vec[1]) if vec[1] > 0 else float("nan")
    got = [sig.name for i, sig in enumerate(watched) if vec[3 + i] > 0]
    if got:
        return StepResult(loss, f"received {'/'.join(got)} (on at least one rank)", signalled=True)
    return StepResult(loss, "--exit-duration-in-mins reached" if vec[2] > 0 else None)


def reduce_memory() -> tuple[float, float]:
    mem = all_reduce(torch.tensor(memory_bytes(), dtype=torch.float64), torch.distributed.ReduceOp.MAX)
    return float(mem[0]), float(mem[1])


# --- the run -----------------------------------------------------------------------------------------------
class Trainer:
    """Owns the built state of one rank; ``run()`` trains and returns the process exit status."""

    def __init__(self, cfg: GrinConfig, tcfg: TrainConfig, start_time: float):
        self.cfg, self.tcfg, self.start_time = cfg, tcfg, start_time
        self.env = init_distributed(cfg)
        set_seed(tcfg.seed)
        self.model, self.tconfig = build_model(cfg, tcfg)
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg, tcfg, self.tconfig)
        self.ckpt = Checkpointer(cfg, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                 use_distributed_optimizer=tcfg.use_distributed_optimizer, save_dir=tcfg.save,
                                 load_dir=tcfg.load, keep_last=tcfg.ckpt_keep_last)
        self.last_saved: Optional[int] = None
        self.last_eval: Optional[int] = None
        self.steps_done = 0
        self.state = self._load()
        self.train_iters, self.valid_iters = build_data(cfg, tcfg, len(self.model), self.state.consumed_train_samples,
                                                        self.state.consumed_valid_samples)

        self.metrics = MetricsLogger(cfg, tcfg, start_iteration=self.state.iteration,
                                     run_config={"model": dataclasses.asdict(cfg), "train": dataclasses.asdict(tcfg)})

    def _load(self):
        if not self.tcfg.load:
            return TrainState()
        report = self.ckpt.load(step=self.tcfg.ckpt_step, finetune=self.tcfg.finetune,
                                no_load_optim=self.tcfg.no_load_optim, no_load_rng=self.tcfg.no_load_rng,
                                global_batch_size=self.tcfg.global_batch_size)
        if report is None:
            log.info("--load %s holds no checkpoint: starting from scratch", self.tcfg.load)
            return TrainState()
        for note in report.notes:
            log.info("load: %s", note)
        log.info("loaded %s: iteration %d, %d samples consumed, optimizer %s, RNG %s", report.path,
                 report.iteration, report.state.consumed_train_samples,
                 "restored" if report.loaded_optimizer else "fresh", "restored" if report.loaded_rng else "fresh")
        self.last_saved = report.iteration if self.tcfg.save and os.path.abspath(self.tcfg.save) == \
            os.path.abspath(self.tcfg.load) else None
        return report.state

    def save(self) -> None:
        if not self.tcfg.save or self.last_saved == self.state.iteration:
            return
        t0 = time.perf_counter()
        path = self.ckpt.save(self.state)
        self.last_saved = self.state.iteration
        self.metrics.say(f"saved checkpoint {path} ({time.perf_counter() - t0:.1f} s)")

    def _evaluate(self) -> None:
        if self.valid_iters is None or self.tcfg.eval_iters == 0 or self.last_eval == self.state.iteration or \
                not self.steps_done:  # a run that trained nothing has nothing new to measure
            return
        loss = evaluate(self.model, self.valid_iters, self.tcfg)
        self.state.consumed_valid_samples += self.tcfg.eval_iters * self.tcfg.global_batch_size
        self.last_eval = self.state.iteration
        self.metrics.evaluation(self.state.iteration, loss)

    def _after_step(self, iteration: int, microbatches: int) -> bool:
        """Logging, evaluation and saving due at this iteration; True if a log line was written."""
        tcfg = self.tcfg
        logged = iteration % tcfg.log_interval == 0
        if logged:
            moe = collect_moe_metrics(self.model, self.cfg, microbatches)
            self.metrics.interval(iteration, moe, reduce_memory())
        if tcfg.eval_interval and iteration % tcfg.eval_interval == 0:
            self._evaluate()
        if tcfg.save_interval and iteration % tcfg.save_interval == 0:
            self.save()
        return logged

    def run(self) -> int:
        tcfg, state = self.tcfg, self.state
        routing_rng.set_routing_seed(tcfg.seed)
        signals = ExitSignals(tcfg.exit_signal_handler)
        deadline = self.start_time + 60 * tcfg.exit_duration_in_mins if tcfg.exit_duration_in_mins else None
        reason, microbatches, signalled = None, 0, False
        try:
            if state.iteration >= tcfg.train_iters:
                self.metrics.say(f"iteration {state.iteration} >= --train-iters {tcfg.train_iters}: nothing to train")
            while state.iteration < tcfg.train_iters:
                routing_rng.set_routing_iteration(state.iteration)
                t0 = time.perf_counter()
                local, grad_norm = train_step(self.model, self.optimizer, self.scheduler, self.train_iters, tcfg)
                state.iteration += 1
                state.consumed_train_samples += tcfg.global_batch_size
                self.steps_done += 1
                microbatches += tcfg.num_microbatches
                result = reduce_step(local, signals, deadline)
                if not math.isfinite(result.loss):
                    raise RuntimeError(f"loss is {result.loss} at iteration {state.iteration}; stopping (the last "
                                       f"checkpoint is intact)")
                self.metrics.step(state.iteration, result.loss, self.optimizer.param_groups[0]["lr"],
                                  grad_norm, float(self.optimizer.get_loss_scale()), time.perf_counter() - t0)
                if self._after_step(state.iteration, microbatches):
                    microbatches = 0
                if result.stop_reason is None and tcfg.exit_interval and state.iteration % tcfg.exit_interval == 0:
                    result.stop_reason = f"--exit-interval {tcfg.exit_interval}"
                if result.stop_reason:
                    reason, signalled = result.stop_reason, result.signalled
                    break
            if not signalled:  # a preempted run saves first: the grace period is short
                self._evaluate()
            self.save()
        finally:
            signals.restore()
        return self._finish(reason)

    def _finish(self, reason: Optional[str]) -> int:
        tcfg = self.tcfg
        if reason:
            self.metrics.say(f"stopping at iteration {self.state.iteration}: {reason}"
                             + ("; checkpoint saved" if tcfg.save else "; no --save, nothing saved"))
        summary = self.metrics.close({
            "status": "stopped" if reason else "finished", "stop_reason": reason,
            "iteration": self.state.iteration, "train_iters": tcfg.train_iters,
            "consumed_train_samples": self.state.consumed_train_samples,
            "checkpoint": self.ckpt_path(), "parameters": parameter_counts(self.cfg),
            "layout": {"tp": self.cfg.tensor_model_parallel_size, "pp": self.cfg.pipeline_model_parallel_size,
                       "vpp": self.cfg.virtual_pipeline_model_parallel_size, "dp": tcfg.data_parallel_size},
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        })
        if self.env.rank == 0:
            for key in ("checkpoint", "loss_curve", "summary"):
                if summary.get(key):
                    print(f"{key}: {summary[key]}", flush=True)
        return 0

    def ckpt_path(self) -> Optional[str]:
        if not self.tcfg.save or self.last_saved is None:
            return None
        return iteration_dir(self.tcfg.save, self.last_saved)

    def close(self) -> None:
        if dist.is_initialized():
            dist.barrier()
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


def run(cfg: GrinConfig, tcfg: TrainConfig, start: float) -> int:
    """Train a validated configuration (``megatron-grin pretrain`` after its flags were checked)."""
    compat.apply()
    trainer = Trainer(cfg, tcfg, start)
    status = trainer.run()  # on an exception, no barrier: the launcher tears the other ranks down
    trainer.close()
    return status
