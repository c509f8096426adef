"""Everything about a run that is not the model: each field declares its Megatron-LM flag, default and range.

Defaults are Megatron-LM 0.16's unless docs/training.md ("Differences from Megatron-LM") lists the field.
The learning-rate schedule is counted in samples, as Megatron-LM counts it; the ``lr_*_steps`` properties
give the values its ``get_optimizer_param_scheduler`` computes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_grin.settings import GRIN_GROUP, optional_int, setting

TRAIN, LR, REG, DIST, DATA, TOK = ("training", "learning rate and weight decay", "regularization", "distributed",
                                   "data and dataloader", "tokenizer")
CKPT, LOG, VAL, PROF, MIX, TC = ("checkpointing", "logging", "validation", "profiling", "mixed precision",
                                 "transformer configuration")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
WD_INCR_STYLES = ("constant", "linear", "cosine")
#: numpy's RandomState (random.seed, megatron's dataset shuffles) takes seeds 0 .. 2**32 - 1
SEED_MAX = 2**32 - 1
#: Megatron-LM's seeding: pipeline stage s seeds with --seed + SEED_STRIDE_PER_STAGE * s (training/distributed.py)
SEED_STRIDE_PER_STAGE = 100


@dataclass
class TrainConfig:
    """Batch, schedule, optimizer, data, checkpoints, logging and run control of one ``pretrain`` run."""

    # --- batch and length ----------------------------------------------------------------------
    seq_length: Optional[int] = setting(None, "--seq-length", help="tokens per sequence (default: "
                                        "--max-position-embeddings)", group=DATA, type=int, ge=1)
    micro_batch_size: int = setting(1, "--micro-batch-size", help="sequences per micro-batch per data-parallel rank",
                                    group=TRAIN, type=int, ge=1)
    global_batch_size: Optional[int] = setting(None, "--global-batch-size", help="sequences per optimizer step "
                                               "(default: micro x data-parallel size)", group=TRAIN, type=int, ge=1)
    train_iters: Optional[int] = setting(None, "--train-iters", help="optimizer steps (0: save the initial "
                                         "weights and exit)", group=TRAIN, type=int, ge=0)
    train_samples: Optional[int] = setting(None, "--train-samples", help="sequences to train on, instead of "
                                           "--train-iters", group=TRAIN, type=int, ge=1)
    # --- optimizer (AdamW) and learning-rate schedule -------------------------------------------
    lr: float = setting(1e-4, "--lr", help="peak learning rate", group=LR, type=float, ge=0)
    min_lr: float = setting(0.0, "--min-lr", help="floor of the decay", group=LR, type=float, ge=0)
    lr_decay_style: str = setting("linear", "--lr-decay-style", help="constant, linear, cosine, "
                                  "inverse-square-root, WSD", group=LR, choices=LR_DECAY_STYLES)
    lr_wsd_decay_style: str = setting("exponential", "--lr-wsd-decay-style", help="decay of the WSD schedule's "
                                      "last phase", group=LR, choices=WSD_DECAY_STYLES)
    lr_decay_iters: Optional[int] = setting(None, "--lr-decay-iters", help="steps of the decay (default: "
                                            "--train-iters)", group=LR, type=int, ge=1)
    lr_decay_samples: Optional[int] = setting(None, "--lr-decay-samples", help="samples of the decay (default: "
                                              "--train-samples)", group=LR, type=int, ge=1)
    lr_wsd_decay_iters: Optional[int] = setting(None, "--lr-wsd-decay-iters", help="steps of WSD's decay phase",
                                                group=LR, type=int, ge=1)
    lr_wsd_decay_samples: Optional[int] = setting(None, "--lr-wsd-decay-samples", help="samples of WSD's decay "
                                                  "phase", group=LR, type=int, ge=1)
    lr_warmup_fraction: Optional[float] = setting(None, "--lr-warmup-fraction", help="warmup as a share of the "
                                                  "decay", group=LR, type=float, ge=0, lt=1)
    lr_warmup_iters: int = setting(0, "--lr-warmup-iters", help="linear warmup steps", group=LR, type=int, ge=0)
    lr_warmup_samples: int = setting(0, "--lr-warmup-samples", help="linear warmup samples", group=LR, type=int, ge=0)
    lr_warmup_init: float = setting(0.0, "--lr-warmup-init", help="learning rate at the start of warmup", group=LR,
                                    type=float, ge=0)
    override_opt_param_scheduler: bool = setting(
        False, "--override-opt_param-scheduler", "--override-opt-param-scheduler", help="on resume, take the "
        "schedule from the flags", group=LR, kind="flag")
    use_checkpoint_opt_param_scheduler: bool = setting(
        False, "--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler", help="on resume, take "
        "the schedule from the checkpoint", group=LR, kind="flag")
    weight_decay: float = setting(0.01, "--weight-decay", help="AdamW weight decay (not on biases and norms)",
                                  group=REG, type=float, ge=0)
    start_weight_decay: Optional[float] = setting(None, "--start-weight-decay", help="weight decay at the start "
                                                  "(non-constant --weight-decay-incr-style)", group=LR, type=float,
                                                  ge=0)
    end_weight_decay: Optional[float] = setting(None, "--end-weight-decay", help="weight decay at the end",
                                                group=LR, type=float, ge=0)
    weight_decay_incr_style: str = setting("constant", "--weight-decay-incr-style", help="constant, linear, cosine",
                                           group=LR, choices=WD_INCR_STYLES)
    adam_beta1: float = setting(0.9, "--adam-beta1", help="AdamW beta1", group=REG, type=float, ge=0, lt=1)
    adam_beta2: float = setting(0.999, "--adam-beta2", help="AdamW beta2", group=REG, type=float, ge=0, lt=1)
    adam_eps: float = setting(1e-8, "--adam-eps", help="AdamW epsilon", group=REG, type=float, gt=0)
    clip_grad: float = setting(1.0, "--clip-grad", help="global gradient-norm clipping (0: off)", group=REG,
                               type=float, ge=0)
    use_distributed_optimizer: bool = setting(False, "--use-distributed-optimizer", help="shard fp32 main weights "
                                              "and Adam moments over DP (ZeRO-1)", group=DIST, kind="switch")
    overlap_grad_reduce: bool = setting(False, "--overlap-grad-reduce", help="overlap the DP gradient reduction "
                                        "with backward", group=DIST, kind="switch")
    overlap_param_gather: bool = setting(False, "--overlap-param-gather", help="overlap the distributed optimizer's "
                                         "parameter all-gather with the next forward", group=DIST, kind="switch")
    grad_reduce_in_bf16: bool = setting(False, "--grad-reduce-in-bf16", help="reduce gradients in bf16 (default: "
                                        "fp32)", group=MIX, kind="flag")
    seed: int = setting(1234, "--seed", help="seeds initialisation, data order and routing samples",
                        group="RNG and initialization", type=int, ge=0, le=SEED_MAX)
    distributed_timeout_minutes: int = setting(10, "--distributed-timeout-minutes", help="collective timeout",
                                               group=DIST, type=int, ge=1)
    # --- data --------------------------------------------------------------------------------
    data_path: Optional[list] = setting(None, "--data-path", help="PREFIX..., or a blend W1 PREFIX1 W2 PREFIX2 ...",
                                        group=DATA, nargs="+", metavar="[WEIGHT] PREFIX")
    split: str = setting("969, 30, 1", "--split", help="train/valid/test shares", group=DATA)
    mock_data: bool = setting(False, "--mock-data", help="megatron's synthetic MockGPTDataset", group=DATA,
                              kind="switch")
    data_cache_path: Optional[str] = setting(None, "--data-cache-path", help="where megatron's index caches go "
                                             "(default: next to the data)", group=DATA)
    num_workers: Optional[int] = setting(None, "--num-workers", help="DataLoader workers (default: 2 on GPU, "
                                         "0 on CPU)", group=DATA, type=int, ge=0)
    eod_mask_loss: bool = setting(False, "--eod-mask-loss", help="no loss on end-of-document tokens", group=DATA,
                                  kind="flag")
    reset_position_ids: bool = setting(False, "--reset-position-ids", help="restart position ids after each "
                                       "end-of-document token", group=DATA, kind="flag")
    tokenizer: Optional[str] = setting(None, "--tokenizer", help="byte, or a local HF tokenizer directory (default: "
                                       "the checkpoint's, else byte)", group=TOK, metavar="byte|DIR")
    tokenizer_type: Optional[str] = setting(None, "--tokenizer-type", help="HuggingFaceTokenizer (with "
                                            "--tokenizer-model DIR), NullTokenizer, or byte", group=TOK)
    tokenizer_model: Optional[str] = setting(None, "--tokenizer-model", help="local HF tokenizer directory",
                                             group=TOK, metavar="DIR")
    # --- checkpoints -------------------------------------------------------------------------
    save: Optional[str] = setting(None, "--save", help="directory checkpoints are written to", group=CKPT)
    load: Optional[str] = setting(None, "--load", help="directory to resume from (fresh start when it holds no "
                                  "checkpoint)", group=CKPT)
    save_interval: Optional[int] = setting(None, "--save-interval", help="save every N steps (and at the end)",
                                           group=CKPT, type=int, ge=1)
    ckpt_keep_last: Optional[int] = setting(None, "--ckpt-keep-last", help="after a save, delete complete "
                                            "checkpoints older than the newest N", group=CKPT, type=int, ge=1)
    ckpt_fully_parallel_save: bool = setting(True, "--no-ckpt-fully-parallel-save",
                                             "--disable-ckpt-fully-parallel-save", help="let data-parallel rank 0 "
                                             "write every replicated shard (default: the writes are spread over "
                                             "the data-parallel ranks)", group=CKPT, kind="off")
    ckpt_fully_parallel_load: bool = setting(False, "--ckpt-fully-parallel-load", help="spread the checkpoint reads "
                                             "over the data-parallel ranks and exchange the shards", group=CKPT,
                                             kind="flag")
    ckpt_step: Optional[int] = setting(None, "--ckpt-step", help="load this iteration instead of the latest",
                                       group=CKPT, type=int, ge=0)
    no_load_optim: bool = setting(False, "--no-load-optim", help="resume the weights only: fresh optimizer and "
                                  "schedule", group=CKPT, kind="flag")
    no_load_rng: bool = setting(False, "--no-load-rng", help="do not restore the RNG state", group=CKPT, kind="flag")
    finetune: bool = setting(False, "--finetune", help="load the weights only; iteration and data position restart "
                             "at 0", group=CKPT, kind="flag")
    use_checkpoint_args: bool = setting(False, "--use-checkpoint-args", help="take the model settings (and "
                                        "tokenizer) from the --load checkpoint", group=CKPT, kind="flag")
    grin_config: Optional[str] = setting(None, "--grin-config", help="grin_config.json naming the model of a --load "
                                         "checkpoint (default: the checkpoint's own, or its Megatron-LM args)",
                                         group=GRIN_GROUP, metavar="FILE")
    use_tokenizer_model_from_checkpoint_args: bool = setting(
        True, "--no-use-tokenizer-model-from-checkpoint-args", help="with --use-checkpoint-args, keep this run's "
        "tokenizer", group=CKPT, kind="off")
    exit_on_missing_checkpoint: bool = setting(False, "--exit-on-missing-checkpoint", help="exit (status 0) when "
                                               "--load holds no checkpoint", group=CKPT, kind="flag")
    ckpt_fallback: bool = setting(True, "--ckpt-fallback", help="resume from the newest intact checkpoint when the "
                                  "newest is damaged (--no-ckpt-fallback: refuse)", group=GRIN_GROUP, kind="switch")
    save_dir_takeover: bool = setting(False, "--save-dir-takeover", help="write into a --save that holds another "
                                      "run's checkpoints (they are kept, never pruned)", group=GRIN_GROUP, kind="flag")
    break_save_lock: bool = setting(False, "--break-save-lock", help="take the --save lock of a job that cannot be "
                                    "proven dead", group=GRIN_GROUP, kind="flag")
    # --- run control -------------------------------------------------------------------------
    exit_signal_handler: bool = setting(True, "--exit-signal-handler", help="on SIGTERM / SIGUSR1 save at the next "
                                        "step and exit 0", group=TRAIN, kind="switch")
    exit_duration_in_mins: Optional[float] = setting(None, "--exit-duration-in-mins", help="the same, once the run "
                                                     "has been up this long", group=TRAIN, type=float, gt=0)
    exit_interval: Optional[int] = setting(None, "--exit-interval", help="the same, at iterations divisible by N",
                                           group=TRAIN, type=int, ge=1)
    manual_gc: bool = setting(False, "--manual-gc", help="disable Python's automatic GC; collect every "
                              "--manual-gc-interval steps", group=TRAIN, kind="flag")
    manual_gc_interval: int = setting(0, "--manual-gc-interval", help="steps between collections (0: only at "
                                      "start and around evaluation)", group=TRAIN, type=int, ge=0)
    manual_gc_eval: bool = setting(True, "--no-manual-gc-eval", help="with --manual-gc, no collection around "
                                   "evaluation", group=TRAIN, kind="off")
    empty_unused_memory_level: int = setting(0, "--empty-unused-memory-level", help="1: empty the CUDA cache after "
                                             "each step; 2: also before the optimizer step", group=TRAIN, type=int,
                                             ge=0, le=2)
    # --- logging, evaluation, profiling -------------------------------------------------------
    log_interval: int = setting(100, "--log-interval", help="one log line (and MoE statistics) every N steps",
                                group=LOG, type=int, ge=1)
    log_params_norm: bool = setting(False, "--log-params-norm", help="log the parameters' L2 norm every "
                                    "--log-interval steps", group=LOG, kind="flag")
    log_num_zeros_in_grad: bool = setting(False, "--log-num-zeros-in-grad", help="log the number of zero gradient "
                                          "entries (megatron's optimizer counts them: a host sync per step)",
                                          group=LOG, kind="flag")
    eval_interval: Optional[int] = setting(None, "--eval-interval", help="validate every N steps (and at the end)",
                                           group=VAL, type=optional_int, ge=1)
    eval_iters: int = setting(100, "--eval-iters", help="global batches per validation (0: off)", group=VAL,
                              type=int, ge=0)
    log_dir: Optional[str] = setting(None, "--log-dir", help="metrics.jsonl, loss_curve.png, summary.json "
                                     "(default: --save)", group=LOG)
    tensorboard_dir: Optional[str] = setting(None, "--tensorboard-dir", help="TensorBoard event files", group=LOG)
    wandb_project: Optional[str] = setting(None, "--wandb-project", help="log to Weights & Biases", group=LOG)
    wandb_exp_name: Optional[str] = setting(None, "--wandb-exp-name", help="W&B run name", group=LOG)
    wandb_save_dir: Optional[str] = setting(None, "--wandb-save-dir", help="W&B local directory", group=LOG)
    wandb_entity: Optional[str] = setting(None, "--wandb-entity", help="W&B entity", group=LOG)
    peak_tflops: Optional[float] = setting(None, "--peak-tflops", help="per-device peak for MFU (default: table or "
                                           "measured)", group=GRIN_GROUP, type=float, gt=0)
    profile: bool = setting(False, "--profile", help="profile steps --profile-step-start..end (nsys range, or "
                            "--use-pytorch-profiler)", group=PROF, kind="flag")
    profile_step_start: int = setting(10, "--profile-step-start", help="first profiled step", group=PROF, type=int,
                                      ge=0)
    profile_step_end: int = setting(12, "--profile-step-end", help="step after the last profiled one", group=PROF,
                                    type=int, ge=0)
    use_pytorch_profiler: bool = setting(False, "--use-pytorch-profiler", help="torch.profiler traces into "
                                         "--tensorboard-dir", group=PROF, kind="flag")
    profile_ranks: list = setting(None, "--profile-ranks", help="global ranks that profile", group=PROF, type=int,
                                  nargs="+", ge=0, default_factory=lambda: [0])
    record_memory_history: bool = setting(False, "--record-memory-history", help="record CUDA allocations for a "
                                          "memory snapshot", group=PROF, kind="flag")
    memory_snapshot_path: str = setting("snapshot.pickle", "--memory-snapshot-path", help="where the memory "
                                        "snapshot goes", group=PROF)
    # --- implementation ----------------------------------------------------------------------
    transformer_impl: Optional[str] = setting(None, "--transformer-impl", help="local or transformer_engine "
                                              "(default: TE when installed and on a GPU)", group=TC,
                                              choices=("local", "transformer_engine"))
    # --- derived (filled by arguments.resolve) ---------------------------------------------------
    world_size: int = 1
    data_parallel_size: int = 1
    num_microbatches: int = 1
    vocab_from_tokenizer: bool = field(default=True, repr=False)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length

    @property
    def iteration_based(self) -> bool:
        return self.train_samples is None

    @property
    def lr_decay_steps(self) -> int:
        """Samples over which the learning rate decays (Megatron-LM's ``lr_decay_steps``)."""
        if self.iteration_based:
            iters = self.lr_decay_iters if self.lr_decay_iters is not None else self.train_iters
            return max(iters, 1) * self.global_batch_size
        return self.lr_decay_samples if self.lr_decay_samples is not None else self.train_samples

    @property
    def lr_warmup_steps(self) -> float:
        if self.lr_warmup_fraction is not None:
            return self.lr_warmup_fraction * self.lr_decay_steps
        return self.lr_warmup_iters * self.global_batch_size if self.iteration_based else self.lr_warmup_samples

    @property
    def wd_incr_steps(self) -> int:
        return max(self.train_iters, 1) * self.global_batch_size if self.iteration_based else self.train_samples

    @property
    def wsd_decay_steps(self) -> Optional[int]:
        if self.iteration_based:
            return None if self.lr_wsd_decay_iters is None else self.lr_wsd_decay_iters * self.global_batch_size
        return self.lr_wsd_decay_samples

    @property
    def weight_decay_range(self) -> tuple[float, float]:
        """(start, end) weight decay: both --weight-decay for the constant style, as Megatron-LM."""
        if self.weight_decay_incr_style == "constant":
            return self.weight_decay, self.weight_decay
        return self.start_weight_decay, self.end_weight_decay

    def scheduler_kwargs(self) -> dict:
        """Keyword arguments of megatron-core's OptimizerParamScheduler, as Megatron-LM builds them."""
        start_wd, end_wd = self.weight_decay_range
        return dict(init_lr=self.lr_warmup_init, max_lr=self.lr, min_lr=self.min_lr,
                    lr_warmup_steps=self.lr_warmup_steps, lr_decay_steps=self.lr_decay_steps,
                    lr_decay_style=self.lr_decay_style, start_wd=start_wd, end_wd=end_wd,
                    wd_incr_steps=self.wd_incr_steps, wd_incr_style=self.weight_decay_incr_style,
                    use_checkpoint_opt_param_scheduler=self.use_checkpoint_opt_param_scheduler,
                    override_opt_param_scheduler=self.override_opt_param_scheduler,
                    wsd_decay_steps=self.wsd_decay_steps, lr_wsd_decay_style=self.lr_wsd_decay_style)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
