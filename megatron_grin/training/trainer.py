"""``megatron-grin pretrain``: start the process groups, build GRIN on megatron-core, train, checkpoint.

    megatron-grin pretrain --config local                                    # one process (CPU or GPU)
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
import signal
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from megatron_grin import compat
from megatron_grin.accounting import parameter_counts
from megatron_grin.ckpt_format import iteration_dir
from megatron_grin.config import ConfigError, GrinConfig
from megatron_grin.model import build as grin_model
from megatron_grin.model import routing_rng
from megatron_grin.training import data, preflight
from megatron_grin.training.checkpointing import Checkpointer, TrainState, resume_facts
from megatron_grin.training.ckpt_choice import agree, choose_checkpoint, open_save_dir, resumes_from_save
from megatron_grin.training.data import get_batch
from megatron_grin.training.distributed import init_distributed, set_seed
from megatron_grin.training.metrics import (
    MetricsLogger,
    all_reduce,
    collect_moe_metrics,
    memory_bytes,
    params_norm,
    routers,
)
from megatron_grin.training.run_checks import scheduler_policy
from megatron_grin.training.run_config import TrainConfig
from megatron_grin.training.run_control import RunControl, param_sync_funcs
from megatron_grin.training.tokenizer import build_tokenizer

log = logging.getLogger("megatron_grin.training.trainer")


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
        grad_reduce_in_fp32=not tcfg.grad_reduce_in_bf16, overlap_grad_reduce=tcfg.overlap_grad_reduce,
        use_distributed_optimizer=tcfg.use_distributed_optimizer, overlap_param_gather=tcfg.overlap_param_gather)
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
        use_distributed_optimizer=tcfg.use_distributed_optimizer,
        log_num_zeros_in_grad=tcfg.log_num_zeros_in_grad), model)
    # Megatron-LM's get_optimizer_param_scheduler: steps in samples, iteration- or sample-based (run_config.py)
    scheduler = OptimizerParamScheduler(optimizer, **tcfg.scheduler_kwargs())
    # Wire megatron's schedule hooks the way Megatron-LM's training loop does.
    tconfig.grad_scale_func = optimizer.scale_loss
    tconfig.finalize_model_grads_func = finalize_model_grads
    if tcfg.overlap_grad_reduce:
        no_sync = [m.no_sync for m in model]
        grad_sync = [m.start_grad_sync for m in model]
        tconfig.no_sync_func = no_sync[0] if len(model) == 1 else no_sync
        tconfig.grad_sync_func = grad_sync[0] if len(model) == 1 else grad_sync
    tconfig.param_sync_func = param_sync_funcs(model, tcfg)  # --overlap-param-gather
    return optimizer, scheduler


# --- data --------------------------------------------------------------------------------------------------
def build_data(cfg: GrinConfig, tcfg: TrainConfig, chunks: int, consumed_train: int, consumed_valid: int):
    """(train iterators, valid iterators or None): one iterator per model chunk, at the saved position."""

    train_samples, valid_samples = preflight.sample_counts(tcfg)
    if tcfg.mock_data:  # megatron warns that it cannot cache the (synthetic) indices: expected, not news
        logging.getLogger("megatron.core.datasets").setLevel(logging.ERROR)
    train_ds, valid_ds, _ = data.build_datasets(
        tcfg.data_path, tcfg.split, tcfg.seq_length, tcfg.seed, max(train_samples, 1), valid_samples, 0,
        build_tokenizer(tcfg.tokenizer), mock=tcfg.mock_data, data_cache_path=tcfg.data_cache_path,
        eod_mask_loss=tcfg.eod_mask_loss, reset_position_ids=tcfg.reset_position_ids,
        create_attention_mask=False)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    # --num-workers: Megatron-LM's 2 on GPU; none on CPU, where workers only compete with the compute threads
    workers = tcfg.num_workers if tcfg.num_workers is not None else (2 if torch.cuda.is_available() else 0)

    def iterators(ds, consumed, cyclic):
        if ds is None:
            return None
        its = [data.make_data_iterator(ds, tcfg.micro_batch_size, consumed, dp_rank, dp_size,
                                       num_workers=workers, cyclic=cyclic) for _ in range(chunks)]
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


def model_device(model: list) -> torch.device:
    """Where this rank's model (and so its per-step bookkeeping) lives."""
    return next(model[0].parameters()).device


def _local_loss_sums(losses: list, device: torch.device) -> torch.Tensor:
    """[loss sum, tokens] over this rank's micro-batches, on ``device`` (no host sync); zero except on the
    last-stage TP rank 0."""
    if losses and ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_last_stage(ignore_virtual=True):
        return torch.stack([item["lm loss"] for item in losses]).to(device=device, dtype=torch.float64).sum(0)
    return torch.zeros(2, dtype=torch.float64, device=device)


def run_schedule(model: list, data_iterator, tcfg: TrainConfig, forward_only: bool) -> list:
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data_iterator,
        model=model if len(model) > 1 else model[0], num_microbatches=tcfg.num_microbatches,
        seq_length=tcfg.seq_length, micro_batch_size=tcfg.micro_batch_size, forward_only=forward_only)


def train_step(model: list, optimizer, scheduler, data_iterator, tcfg: TrainConfig,
               control: Optional[RunControl] = None) -> tuple:
    """Forward/backward over the global batch and one optimizer step; (local loss sums, grad norm, number of zero
    gradient entries or None: counted with --log-num-zeros-in-grad only)."""
    for m in model:
        m.zero_grad_buffer()
    optimizer.zero_grad()
    losses = run_schedule(model, data_iterator, tcfg, forward_only=False)
    if control is not None:
        control.before_optimizer_step()  # --empty-unused-memory-level
    updated, grad_norm, num_zeros = optimizer.step()  # megatron's step reads found-inf and the grad norm on the host
    if control is not None:
        control.after_optimizer_step()
    if updated:
        scheduler.step(increment=tcfg.global_batch_size)
    return _local_loss_sums(losses, model_device(model)), grad_norm, num_zeros if tcfg.log_num_zeros_in_grad else None


def evaluate(model: list, data_iterator, tcfg: TrainConfig) -> float:
    """Mean validation loss over --eval-iters global batches (argmax routing; router stats untouched)."""

    kept = [(r, copy.deepcopy(r.stats)) for r in routers(model)]
    for m in model:
        m.eval()
    device = model_device(model)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for _ in range(tcfg.eval_iters):
            total += _local_loss_sums(run_schedule(model, data_iterator, tcfg, forward_only=True), device)
    for m in model:
        m.train()
    for router, stats in kept:
        router.stats = stats

    total = all_reduce(total).tolist()  # one host sync per evaluation
    return total[0] / total[1] if total[1] else float("nan")


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
    loss_scale: float = 1.0


def reduce_step(local: torch.Tensor, signals: ExitSignals, deadline: Optional[float],
                loss_scale: Optional[torch.Tensor] = None) -> StepResult:
    """One all-reduce per step: the global loss, and which stop conditions hold on any rank.

    The vector is built on ``local``'s device (the model's) with scalar fills, and read back once: the one
    host sync of the step's bookkeeping, needed because every rank must agree on stopping and the loss is
    checked for NaN and logged. The optimizer's loss scale (a device scalar) rides along in that copy.
    """
    watched = ExitSignals.SIGNALS
    vec = torch.zeros(3 + len(watched), dtype=torch.float64, device=local.device)
    vec[:2] = local
    vec[2] = 1.0 if deadline is not None and time.time() > deadline else 0.0
    for i, sig in enumerate(watched):
        vec[3 + i] = 1.0 if signals.received == sig else 0.0
    vec = all_reduce(vec)
    if loss_scale is not None:
        vec = torch.cat([vec, torch.as_tensor(loss_scale).reshape(1).to(vec)])
    host = vec.tolist()
    loss = host[0] / host[1] if host[1] > 0 else float("nan")
    scale = host[-1] if loss_scale is not None else 1.0
    got = [sig.name for i, sig in enumerate(watched) if host[3 + i] > 0]
    if got:
        return StepResult(loss, f"received {'/'.join(got)} (on at least one rank)", signalled=True, loss_scale=scale)
    return StepResult(loss, "--exit-duration-in-mins reached" if host[2] > 0 else None, loss_scale=scale)


def reduce_memory(device: torch.device) -> tuple[float, ...]:
    """memory_bytes(), the maximum over ranks (once per log interval)."""
    mem = torch.tensor(memory_bytes(), dtype=torch.float64, device=device)
    return tuple(all_reduce(mem, torch.distributed.ReduceOp.MAX).tolist())


# --- the run -----------------------------------------------------------------------------------------------
class Trainer:
    """Owns the built state of one rank; ``run()`` trains and returns the process exit status."""

    def __init__(self, cfg: GrinConfig, tcfg: TrainConfig, start_time: float):
        self.cfg, self.tcfg, self.start_time = cfg, tcfg, start_time
        self.env = init_distributed(cfg, tcfg.distributed_timeout_minutes)
        set_seed(tcfg.seed)
        # Before anything is built: paths and data are usable, this run owns --save (locked), and the
        # checkpoint it resumes is intact.
        agree(None if self.env.rank else preflight.problems(cfg, tcfg, preflight.split_sizes(tcfg)),
              ConfigError)
        self.save_dir = open_save_dir(tcfg.save, resuming=resumes_from_save(tcfg), takeover=tcfg.save_dir_takeover,
                                      break_lock=tcfg.break_save_lock) if tcfg.save else None
        self.found = choose_checkpoint(tcfg.load, tcfg.ckpt_step, tcfg.ckpt_fallback) \
            if tcfg.load and os.path.isdir(tcfg.load) else None
        if tcfg.load and self.found is None and tcfg.exit_on_missing_checkpoint:
            raise MissingCheckpoint(f"--load {tcfg.load} holds no checkpoint and --exit-on-missing-checkpoint is set")
        self.model, self.tconfig = build_model(cfg, tcfg)
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg, tcfg, self.tconfig)
        self.ckpt = Checkpointer(cfg, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                 use_distributed_optimizer=tcfg.use_distributed_optimizer, save_dir=self.save_dir,
                                 keep_last=tcfg.ckpt_keep_last, run_args=resume_facts(tcfg),
                                 grin_config=tcfg.grin_config, fully_parallel_save=tcfg.ckpt_fully_parallel_save,
                                 fully_parallel_load=tcfg.ckpt_fully_parallel_load)
        self.last_saved: Optional[int] = None
        self.last_eval: Optional[int] = None
        self.steps_done = 0
        self.state = self._load()
        self.control = RunControl(tcfg, self.env.rank, self.model)
        self.train_iters, self.valid_iters = build_data(cfg, tcfg, len(self.model), self.state.consumed_train_samples,
                                                        self.state.consumed_valid_samples)

        self.metrics = MetricsLogger(cfg, tcfg, start_iteration=self.state.iteration,
                                     run_config={"model": dataclasses.asdict(cfg), "train": dataclasses.asdict(tcfg)})

    def _load(self):
        if not self.tcfg.load:
            return TrainState()
        if self.found is None:
            if self.env.rank == 0:
                log.warning("--load %s holds no checkpoint: starting from scratch", self.tcfg.load)
            return TrainState()
        tcfg = self.tcfg
        policy = scheduler_policy(tcfg)
        report = self.ckpt.load(self.found, finetune=tcfg.finetune, no_load_optim=tcfg.no_load_optim,
                                no_load_rng=tcfg.no_load_rng, global_batch_size=tcfg.global_batch_size,
                                scheduler_policy=policy)
        for note in report.notes:
            (log.warning if note.startswith("WARNING") else log.info)("load: %s", note)
        log.info("loaded %s: iteration %d, %d samples consumed, optimizer %s, RNG %s", report.path,
                 report.iteration, report.state.consumed_train_samples,
                 "restored" if report.loaded_optimizer else "fresh", "restored" if report.loaded_rng else "fresh")
        self.last_saved = report.iteration if self.tcfg.save and os.path.abspath(self.tcfg.save) == \
            os.path.abspath(self.tcfg.load) else None
        return report.state

    def save(self) -> None:
        if self.save_dir is None or self.last_saved == self.state.iteration:
            return
        t0 = time.perf_counter()
        with self.control.synchronized_params():
            path = self.ckpt.save(self.state)
        self.last_saved = self.state.iteration
        self.metrics.say(f"saved checkpoint {path} ({time.perf_counter() - t0:.1f} s)")

    def _evaluate(self) -> None:
        if self.valid_iters is None or self.tcfg.eval_iters == 0 or self.last_eval == self.state.iteration or \
                not self.steps_done:  # a run that trained nothing has nothing new to measure
            return
        with self.control.evaluation():
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
            norm = params_norm(self.model) if tcfg.log_params_norm else None
            self.metrics.interval(iteration, moe, reduce_memory(model_device(self.model)), params_norm=norm)
        if tcfg.eval_interval and iteration % tcfg.eval_interval == 0:
            self._evaluate()
        if tcfg.save_interval and iteration % tcfg.save_interval == 0:
            self.save()
        return logged

    def run(self) -> int:
        tcfg, state = self.tcfg, self.state
        routing_rng.set_routing_seed(tcfg.seed)
        signals = ExitSignals(tcfg.exit_signal_handler)
        self.control.start()
        deadline = self.start_time + 60 * tcfg.exit_duration_in_mins if tcfg.exit_duration_in_mins else None
        reason, microbatches, signalled = None, 0, False
        try:
            if state.iteration >= tcfg.train_iters:
                self.metrics.say(f"iteration {state.iteration} >= --train-iters {tcfg.train_iters}: nothing to train")
            while state.iteration < tcfg.train_iters:
                routing_rng.set_routing_iteration(state.iteration)
                t0 = time.perf_counter()
                self.control.step_begin(state.iteration)
                local, grad_norm, num_zeros = train_step(self.model, self.optimizer, self.scheduler,
                                                         self.train_iters, tcfg, self.control)
                state.iteration += 1
                state.consumed_train_samples += tcfg.global_batch_size
                self.steps_done += 1
                self.control.step_end(state.iteration)
                microbatches += tcfg.num_microbatches
                result = reduce_step(local, signals, deadline, self.optimizer.get_loss_scale())
                if not math.isfinite(result.loss):
                    raise RuntimeError(f"loss is {result.loss} at iteration {state.iteration}; stopping (the last "
                                       f"checkpoint is intact)")
                self.metrics.step(state.iteration, result.loss, self.optimizer.param_groups[0]["lr"],
                                  grad_norm, result.loss_scale, time.perf_counter() - t0, num_zeros)
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
            self.control.stop()
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
        if self.save_dir is not None:
            self.save_dir.release()
        if dist.is_initialized():
            dist.barrier()
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


class MissingCheckpoint(Exception):
    """--exit-on-missing-checkpoint with nothing to load: Megatron-LM exits with status 0."""


def run(cfg: GrinConfig, tcfg: TrainConfig, start: float) -> int:
    """Train a validated configuration (``megatron-grin pretrain`` after its flags were checked).

    A refused checkpoint or --save directory (a ConfigError, raised alike on every rank) is printed once and
    exits with status 2, like a bad flag; the --save lock is released at exit (save_dir.py).
    """
    if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:  # a launcher that shields torchrun from SIGTERM
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    compat.apply()
    try:
        trainer = Trainer(cfg, tcfg, start)
        status = trainer.run()  # on an exception, no barrier: the launcher tears the other ranks down
    except MissingCheckpoint as err:
        log.warning("%s: exiting", err)
        return 0
    except ConfigError as err:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"megatron-grin pretrain: error: {err}", file=sys.stderr, flush=True)
        return 2
    trainer.close()
    return status
