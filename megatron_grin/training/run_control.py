"""Megatron-LM's run-control flags, at the points of the training loop where Megatron-LM's ``train()`` acts.

* ``--manual-gc`` / ``--manual-gc-interval`` / ``--no-manual-gc-eval``: automatic garbage collection off,
  ``gc.collect()`` at the start, every N steps and around evaluation;
* ``--empty-unused-memory-level``: ``torch.cuda.empty_cache()`` before (1) and also after (2) the optimizer step;
* ``--profile`` (an nsys capture range, CUDA) or with ``--use-pytorch-profiler`` (torch.profiler traces into
  ``--tensorboard-dir``) for steps ``--profile-step-start`` .. ``--profile-step-end`` on ``--profile-ranks``;
* ``--record-memory-history``: CUDA allocation history, dumped to ``--memory-snapshot-path`` at the end;
* ``--overlap-param-gather``: the distributed optimizer's parameter all-gather runs in forward pre-hooks;
  they are switched off (parameters synchronised) around evaluation and checkpointing, as Megatron-LM does.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from typing import Iterator, Optional

import torch

from megatron_grin.config import ConfigError
from megatron_grin.training.run_config import TrainConfig

log = logging.getLogger(__name__)


class RunControl:
    """Owns the side effects of the flags above for one rank; a no-op for flags left at their defaults."""

    def __init__(self, tcfg: TrainConfig, rank: int, model: Optional[list] = None):
        self.t, self.rank, self.model = tcfg, rank, model or []
        self.profiling = tcfg.profile and rank in (tcfg.profile_ranks or [])
        self._prof = None
        cuda_only = [f for f, on in (("--profile without --use-pytorch-profiler (an nsys capture range)",
                                      tcfg.profile and not tcfg.use_pytorch_profiler),
                                     ("--record-memory-history", tcfg.record_memory_history)) if on]
        if cuda_only and not torch.cuda.is_available():
            raise ConfigError(f"{' and '.join(cuda_only)} need a GPU; on CPU use --profile --use-pytorch-profiler")

    # -- run boundaries ------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.t.manual_gc:
            gc.disable()
            gc.collect()
        if self.t.record_memory_history and torch.cuda.is_available():
            torch.cuda.memory._record_memory_history(True, trace_alloc_max_entries=100000,
                                                     trace_alloc_record_context=True)
        if self.profiling and self.t.use_pytorch_profiler:
            start = self.t.profile_step_start
            self._prof = torch.profiler.profile(
                schedule=torch.profiler.schedule(wait=max(start - 1, 0), warmup=1 if start > 0 else 0,
                                                 active=self.t.profile_step_end - start, repeat=1),
                on_trace_ready=torch.profiler.tensorboard_trace_handler(self.t.tensorboard_dir or "profile"),
                record_shapes=True, with_stack=True)
            self._prof.start()

    def stop(self) -> None:
        if self._prof is not None:
            self._prof.stop()
            self._prof = None
        if self.t.record_memory_history and torch.cuda.is_available() and self.rank == 0:
            torch.cuda.memory._dump_snapshot(self.t.memory_snapshot_path)
            log.info("memory snapshot: %s", self.t.memory_snapshot_path)

    # -- steps -------------------------------------------------------------------------------------------------
    def step_begin(self, iteration: int) -> None:
        """Before the step that will be iteration + 1 (Megatron-LM counts the step about to run)."""
        if not self.profiling:
            return
        if self._prof is not None:
            self._prof.step()
        elif iteration == self.t.profile_step_start and torch.cuda.is_available():
            torch.cuda.cudart().cudaProfilerStart()

    def step_end(self, iteration: int) -> None:
        """After step ``iteration`` (1-based) finished."""
        if self.t.manual_gc and self.t.manual_gc_interval and iteration % self.t.manual_gc_interval == 0:
            gc.collect()
        if self.profiling and self._prof is None and iteration == self.t.profile_step_end \
                and torch.cuda.is_available():
            torch.cuda.cudart().cudaProfilerStop()

    def before_optimizer_step(self) -> None:
        if self.t.empty_unused_memory_level >= 1 and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def after_optimizer_step(self) -> None:
        if self.t.empty_unused_memory_level >= 2 and torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- evaluation and checkpoints ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def synchronized_params(self) -> Iterator[None]:
        """Parameters all-gathered and the pre-hooks off (for evaluation and saving) under --overlap-param-gather."""
        hooks = self.t.overlap_param_gather and self.t.use_distributed_optimizer
        if hooks:
            for chunk in self.model:
                chunk.disable_forward_pre_hook()  # also waits for / forces the pending parameter all-gathers
        try:
            yield
        finally:
            if hooks:
                for chunk in self.model:
                    chunk.enable_forward_pre_hook()

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        collect = self.t.manual_gc and self.t.manual_gc_eval
        if collect:
            gc.collect()
        with self.synchronized_params():
            yield
        if collect:
            gc.collect()


def param_sync_funcs(model: list, tcfg: TrainConfig):
    """megatron's ``config.param_sync_func`` for --overlap-param-gather (one per model chunk), else None."""
    if not (tcfg.overlap_param_gather and tcfg.use_distributed_optimizer):
        return None
    funcs = [chunk.start_param_sync for chunk in model]
    return funcs[0] if len(funcs) == 1 else funcs
