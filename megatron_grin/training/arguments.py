"""Flags of ``megatron-grin pretrain``: Megatron-LM names, YAML defaults, one translation, early checks.

    model_cfg, train_cfg = parse_args(["--config", "configs/local.yaml", "--train-iters", "200"])

Precedence, lowest first: built-in defaults < ``--model-preset`` < ``--config FILE.yaml`` < flags.
YAML keys are flag names with dashes or underscores (``seq_length: 256`` == ``--seq-length 256``);
``true``/``false`` switch boolean flags, lists fill flags that take several values (``data_path``).
Unknown flags and unknown YAML keys fail with the nearest known name. Everything that can be checked
without a process group is checked here (batch arithmetic, layout, data files, tokenizer, the model
config of the checkpoint ``--load`` would resume), so a bad run stops before any rank starts.

The full flag table is docs/training.md; tests/test_arguments.py keeps the two in sync.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import yaml

from megatron_grin.ckpt_format import check_checkpoint_config
from megatron_grin.config import (
    ATTENTION_BACKENDS,
    EXPERT_BACKENDS,
    PRESETS,
    ROUTER_VARIANTS,
    ConfigError,
    GrinConfig,
    have_transformer_engine,
    preset,
    resolve_backend,
)
from megatron_grin.training.data_files import validate_data_path
from megatron_grin.training.tokenizer import build_tokenizer

PROG = "megatron-grin pretrain"


@dataclass
class TrainConfig:
    """Everything about a run that is not the model (Megatron-LM flag names in comments)."""

    # --- batch and schedule --------------------------------------------------------------------
    seq_length: int = 4096  # --seq-length
    micro_batch_size: int = 1  # --micro-batch-size
    global_batch_size: int = 1  # --global-batch-size (default: micro x data-parallel size)
    train_iters: int = 0  # --train-iters
    # --- optimizer (AdamW) and learning-rate schedule -------------------------------------------
    lr: float = 1e-4  # --lr
    min_lr: float = 0.0  # --min-lr
    lr_decay_style: str = "linear"  # --lr-decay-style constant|linear|cosine|inverse-square-root
    lr_warmup_iters: int = 0  # --lr-warmup-iters
    lr_warmup_init: float = 0.0  # --lr-warmup-init
    lr_decay_iters: Optional[int] = None  # --lr-decay-iters (default: --train-iters)
    override_opt_param_scheduler: bool = False  # --override-opt-param-scheduler
    weight_decay: float = 0.01  # --weight-decay
    adam_beta1: float = 0.9  # --adam-beta1
    adam_beta2: float = 0.999  # --adam-beta2
    adam_eps: float = 1e-8  # --adam-eps
    clip_grad: float = 1.0  # --clip-grad
    use_distributed_optimizer: bool = False  # --use-distributed-optimizer
    overlap_grad_reduce: bool = False  # --overlap-grad-reduce
    seed: int = 1234  # --seed
    # --- data --------------------------------------------------------------------------------
    data_path: Optional[list[str]] = None  # --data-path
    split: str = "969, 30, 1"  # --split
    mock_data: bool = False  # --mock-data
    tokenizer: str = "byte"  # --tokenizer / --tokenizer-type + --tokenizer-model
    data_cache_path: Optional[str] = None  # --data-cache-path
    num_workers: int = 0  # --num-workers
    # --- checkpoints -------------------------------------------------------------------------
    save: Optional[str] = None  # --save
    load: Optional[str] = None  # --load
    save_interval: Optional[int] = None  # --save-interval
    ckpt_keep_last: Optional[int] = None  # --ckpt-keep-last (prune older complete checkpoints)
    ckpt_step: Optional[int] = None  # --ckpt-step (load this iteration instead of the latest)
    no_load_optim: bool = False  # --no-load-optim
    no_load_rng: bool = False  # --no-load-rng
    finetune: bool = False  # --finetune (weights only; iteration and data position restart at 0)
    # --- run control -------------------------------------------------------------------------
    exit_signal_handler: bool = True  # --exit-signal-handler (SIGTERM / SIGUSR1 -> save and exit 0)
    exit_duration_in_mins: Optional[float] = None  # --exit-duration-in-mins
    exit_interval: Optional[int] = None  # --exit-interval (save and exit at iterations divisible by it)
    # --- logging and evaluation --------------------------------------------------------------
    log_interval: int = 100  # --log-interval
    eval_interval: Optional[int] = 1000  # --eval-interval
    eval_iters: int = 100  # --eval-iters
    log_dir: Optional[str] = None  # --log-dir (metrics.jsonl, loss_curve.png, summary.json; default --save)
    tensorboard_dir: Optional[str] = None  # --tensorboard-dir
    wandb_project: Optional[str] = None  # --wandb-project
    wandb_exp_name: Optional[str] = None  # --wandb-exp-name
    wandb_save_dir: Optional[str] = None  # --wandb-save-dir
    wandb_entity: Optional[str] = None  # --wandb-entity
    peak_tflops: Optional[float] = None  # --peak-tflops (per device, for MFU; default: table or measured)
    # --- implementation ----------------------------------------------------------------------
    transformer_impl: Optional[str] = None  # --transformer-impl local|transformer_engine (default: auto)
    # --- derived (filled by parse_args) ------------------------------------------------------
    world_size: int = 1
    data_parallel_size: int = 1
    num_microbatches: int = 1
    vocab_from_tokenizer: bool = field(default=True, repr=False)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (the CLI prints it) instead of exiting from inside a library."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(message)


# Flag dest -> GrinConfig field. Model flags default to None so the preset fills what is not given.
MODEL_FLAGS = {
    "num_layers": "num_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_query_groups",
    "kv_channels": "kv_channels",
    "vocab_size": "vocab_size",
    "make_vocab_size_divisible_by": "make_vocab_size_divisible_by",
    "max_position_embeddings": "max_position_embeddings",
    "rotary_base": "rotary_base",
    "sliding_window": "sliding_window",
    "norm_epsilon": "layernorm_epsilon",
    "init_method_std": "init_method_std",
    "num_experts": "num_experts",
    "moe_router_topk": "moe_router_topk",
    "grin_router": "router_variant",
    "grin_jitter_eps": "router_jitter_eps",
    "moe_input_jitter_eps": "input_jitter_eps",
    "moe_aux_loss_coeff": "moe_aux_loss_coeff",
    "moe_z_loss_coeff": "moe_z_loss_coeff",
    "grin_expert_backend": "expert_backend",
    "moe_router_fusion": "moe_router_fusion",
    "moe_permute_fusion": "moe_permute_fusion",
    "moe_grouped_gemm": "moe_grouped_gemm",
    "attention_backend": "attention_backend",
    "tensor_model_parallel_size": "tensor_model_parallel_size",
    "pipeline_model_parallel_size": "pipeline_model_parallel_size",
    "expert_tensor_parallel_size": "expert_tensor_parallel_size",
    "expert_model_parallel_size": "expert_model_parallel_size",
    "context_parallel_size": "context_parallel_size",
    "sequence_parallel": "sequence_parallel",
    "bf16": "bf16",
    "recompute_granularity": "recompute_granularity",
    "recompute_method": "recompute_method",
    "recompute_num_layers": "recompute_num_layers",
}

#: Megatron-LM flags GRIN's fixed architecture already implies: accepted, and checked when they take a value.
ARCHITECTURE_FLAGS = {
    "--untie-embeddings-and-output-weights": None,
    "--swiglu": None,
    "--disable-bias-linear": None,
    "--add-qkv-bias": None,
    "--group-query-attention": None,
    "--use-mcore-models": None,
    "--normalization": "LayerNorm",
    "--position-embedding-type": "rope",
}

_TOKENIZER_TYPES = {"byte": "byte", "bytetokenizer": "byte", "huggingfacetokenizer": None}


def _int_or_none(text: str) -> Optional[int]:
    return None if text.lower() in ("none", "null", "0", "") else int(text)


def _model_flags(g) -> None:
    add = g.add_argument
    add("--model-preset", choices=sorted(PRESETS), help="architecture preset; flags below override it")
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                 "kv_channels", "vocab_size", "make_vocab_size_divisible_by", "max_position_embeddings",
                 "num_experts", "moe_router_topk"):
        add("--" + name.replace("_", "-"), type=int, default=None)
    add("--moe-ffn-hidden-size", dest="ffn_hidden_size", type=int, default=None, help="alias of --ffn-hidden-size")
    add("--rotary-base", type=float, default=None)
    add("--sliding-window", type=_int_or_none, default=None, metavar="N|none",
        help="local attention window (HF convention, query included); none = full causal attention")
    add("--norm-epsilon", type=float, default=None)
    add("--init-method-std", type=float, default=None)
    add("--moe-aux-loss-coeff", type=float, default=None)
    add("--moe-z-loss-coeff", type=float, default=None)
    add("--moe-input-jitter-eps", type=float, default=None)
    add("--grin-router", choices=ROUTER_VARIANTS, default=None)
    add("--grin-jitter-eps", type=float, default=None)
    add("--grin-expert-backend", choices=EXPERT_BACKENDS, default=None)
    for flag, value in ARCHITECTURE_FLAGS.items():
        if value is None:
            add(flag, action="store_true", help=argparse.SUPPRESS)
        else:
            add(flag, default=None, help=argparse.SUPPRESS)


def _parallel_flags(g) -> None:
    add, boolean = g.add_argument, argparse.BooleanOptionalAction
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_tensor_parallel_size",
                 "expert_model_parallel_size", "context_parallel_size"):
        add("--" + name.replace("_", "-"), type=int, default=None)
    add("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    add("--sequence-parallel", action=boolean, default=None)
    add("--bf16", action=boolean, default=None)
    add("--recompute-granularity", choices=("full", "selective"), default=None)
    add("--recompute-method", choices=("uniform", "block"), default=None)
    add("--recompute-num-layers", type=int, default=None)
    add("--use-distributed-optimizer", action=boolean, default=False)
    add("--overlap-grad-reduce", action=boolean, default=False)
    add("--transformer-impl", choices=("local", "transformer_engine"), default=None)
    add("--moe-router-fusion", action=boolean, default=None, help="Triton SparseMixer-v2 routing (default: on CUDA)")
    add("--moe-permute-fusion", action=boolean, default=None, help="Triton permute/unpermute (default: on CUDA)")
    add("--moe-grouped-gemm", action=boolean, default=None, help="grouped-GEMM experts (default: on)")
    add("--attention-backend", choices=ATTENTION_BACKENDS, default=None)


def _training_flags(g) -> None:
    add = g.add_argument
    add("--seq-length", type=int, default=None)
    add("--micro-batch-size", type=int, default=1)
    add("--global-batch-size", type=int, default=None)
    add("--train-iters", type=int, default=None)
    add("--lr", type=float, default=1e-4)
    add("--min-lr", type=float, default=0.0)
    add("--lr-decay-style", choices=("constant", "linear", "cosine", "inverse-square-root"), default="linear")
    add("--lr-warmup-iters", type=int, default=0)
    add("--lr-warmup-init", type=float, default=0.0)
    add("--lr-decay-iters", type=int, default=None)
    add("--override-opt-param-scheduler", action="store_true")
    add("--weight-decay", type=float, default=0.01)
    add("--adam-beta1", type=float, default=0.9)
    add("--adam-beta2", type=float, default=0.999)
    add("--adam-eps", type=float, default=1e-8)
    add("--clip-grad", type=float, default=1.0)
    add("--seed", type=int, default=1234)


def _data_flags(g) -> None:
    add = g.add_argument
    add("--data-path", nargs="*", default=None, metavar="[WEIGHT] PREFIX")
    add("--split", default="969, 30, 1")
    add("--mock-data", action=argparse.BooleanOptionalAction, default=False)
    add("--tokenizer", default=None, metavar="byte|DIR")
    add("--tokenizer-type", default=None, metavar="TYPE")
    add("--tokenizer-model", default=None, metavar="DIR")
    add("--data-cache-path", default=None)
    add("--num-workers", type=int, default=None)


def _run_flags(g) -> None:
    add = g.add_argument
    add("--save", default=None)
    add("--load", default=None)
    add("--save-interval", type=int, default=None)
    add("--ckpt-keep-last", type=int, default=None, metavar="N")
    add("--ckpt-step", type=int, default=None)
    add("--no-load-optim", action="store_true")
    add("--no-load-rng", action="store_true")
    add("--finetune", action="store_true")
    add("--exit-signal-handler", action=argparse.BooleanOptionalAction, default=True)
    add("--exit-duration-in-mins", type=float, default=None)
    add("--exit-interval", type=int, default=None)


def _logging_flags(g) -> None:
    add = g.add_argument
    add("--log-interval", type=int, default=100)
    add("--eval-interval", type=_int_or_none, default=1000)
    add("--eval-iters", type=int, default=100)
    add("--log-dir", default=None)
    add("--tensorboard-dir", default=None)
    add("--wandb-project", default=None)
    add("--wandb-exp-name", default=None)
    add("--wandb-save-dir", default=None)
    add("--wandb-entity", default=None)
    add("--peak-tflops", type=float, default=None)


def build_parser() -> argparse.ArgumentParser:
    """All flags, grouped as in docs/training.md."""
    p = _Parser(prog=PROG, allow_abbrev=False,
                description="Pretrain a GRIN MoE on megatron-core (Megatron-LM flag names; docs/training.md).")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of flag defaults (keys = flag names)")
    for title, add_flags in (("model", _model_flags), ("parallelism and memory", _parallel_flags),
                             ("training", _training_flags), ("data", _data_flags),
                             ("checkpoints and run control", _run_flags), ("logging and evaluation", _logging_flags)):
        add_flags(p.add_argument_group(title))
    return p


def known_flags(parser: argparse.ArgumentParser) -> list[str]:
    return sorted(s for action in parser._actions for s in action.option_strings if s.startswith("--"))


def _nearest(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f"; did you mean {close[0]}?" if close else ""


def unknown_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[tuple[str, str]]:
    """Flags in argv (up to ``--``) that the parser does not know, each with a "did you mean" hint."""
    known = known_flags(parser)
    found = []
    for token in argv:
        if token == "--":
            break
        flag = token.split("=", 1)[0]
        if flag.startswith("--") and flag not in known:
            found.append((flag, _nearest(flag, known)))
    return found


def check_flags(parser: argparse.ArgumentParser, argv: Sequence[str], origin: str = "") -> None:
    """Reject flags the parser does not know, naming the nearest known one."""
    for flag, hint in unknown_flags(parser, argv)[:1]:
        raise ConfigError(f"unrecognized argument {flag}{origin}{hint}")


def yaml_to_argv(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """Turn a YAML mapping of flag defaults into argv tokens (so flags and YAML are typed identically)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as err:
        raise ConfigError(f"--config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path}: not valid YAML ({err})") from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    actions = {s: a for a in parser._actions for s in a.option_strings}
    names = sorted(s[2:] for s in actions if s.startswith("--"))
    argv: list[str] = []
    for key, value in data.items():
        flag = "--" + str(key).replace("_", "-")
        if flag == "--config" or flag not in actions:
            close = difflib.get_close_matches(flag[2:], names, n=1, cutoff=0.5)
            hint = ""
            if close:
                spelt = close[0].replace("-", "_") if "_" in str(key) else close[0]
                hint = f"; did you mean {spelt!r} (--{close[0]})?"
            raise ConfigError(f"--config {path}: unknown key {key!r}{hint}")
        action = actions[flag]
        if value is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise ConfigError(f"--config {path}: {key} must be true or false (got {value!r})")
            argv.append(flag if value else "--no-" + flag[2:])
        elif action.nargs == 0:  # store_true
            if not isinstance(value, bool):
                raise ConfigError(f"--config {path}: {key} must be true or false (got {value!r})")
            if value:
                argv.append(flag)
        elif isinstance(value, (list, tuple)):
            if action.nargs not in ("*", "+"):
                raise ConfigError(f"--config {path}: {key} takes one value, not a list")
            argv += [flag, *map(str, value)]
        elif isinstance(value, dict):
            raise ConfigError(f"--config {path}: {key} takes a value, not a mapping")
        else:
            text = str(value).lower() if isinstance(value, bool) else str(value)
            argv += [flag, *(text.split() if action.nargs in ("*", "+") else [text])]
    return argv


def world_size_from_env(env: Optional[dict] = None) -> int:
    """World size the launcher announced (torchrun's WORLD_SIZE, else Slurm's SLURM_NTASKS), else 1."""
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        return int(env.get("WORLD_SIZE", 1))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_NTASKS"])
    return 1


def _tokenizer_spec(ns: argparse.Namespace) -> str:
    kind = (ns.tokenizer_type or "").lower()
    if kind and kind not in _TOKENIZER_TYPES:
        raise ConfigError(f"--tokenizer-type {ns.tokenizer_type}: use byte or HuggingFaceTokenizer "
                          "(with --tokenizer-model DIR)")
    if ns.tokenizer and ns.tokenizer_model and ns.tokenizer != ns.tokenizer_model:
        raise ConfigError("--tokenizer and --tokenizer-model disagree; pass one of them")
    if kind == "huggingfacetokenizer" and not (ns.tokenizer_model or ns.tokenizer):
        raise ConfigError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR")
    return ns.tokenizer or ns.tokenizer_model or "byte"


def _check_architecture_flags(ns: argparse.Namespace) -> None:
    for flag, required in ARCHITECTURE_FLAGS.items():
        value = getattr(ns, flag[2:].replace("-", "_"))
        if required is not None and value is not None and value != required:
            raise ConfigError(f"{flag} {value}: GRIN uses {required}; drop the flag")


def _model_config(ns: argparse.Namespace, explicit: set[str]) -> GrinConfig:
    base = preset(ns.model_preset) if ns.model_preset else GrinConfig()
    changes = {fld: getattr(ns, dest) for dest, fld in MODEL_FLAGS.items() if dest in explicit}
    cfg = base.replace(**changes)
    layers_per_stage = ns.num_layers_per_virtual_pipeline_stage
    if layers_per_stage is not None:
        pp = cfg.pipeline_model_parallel_size
        if layers_per_stage < 1 or cfg.num_layers % (pp * layers_per_stage):
            raise ConfigError(f"--num-layers-per-virtual-pipeline-stage {layers_per_stage}: --num-layers "
                              f"{cfg.num_layers} must be a multiple of it x --pipeline-model-parallel-size {pp}")
        vpp = cfg.num_layers // (pp * layers_per_stage)
        cfg = cfg.replace(virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None)
    return cfg


def _explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Dests whose flag appears in argv (YAML tokens included): those override the preset."""
    by_flag = {s: a.dest for a in parser._actions for s in a.option_strings}
    found = set()
    for token in argv:
        flag = token.split("=", 1)[0]
        if flag in by_flag:
            found.add(by_flag[flag])
        elif flag.startswith("--no-") and "--" + flag[5:] in by_flag:
            found.add(by_flag["--" + flag[5:]])
    return found


def _train_config(ns: argparse.Namespace, cfg: GrinConfig, world_size: int) -> TrainConfig:
    if ns.train_iters is None:
        raise ConfigError("--train-iters is required (0 saves the initial weights and exits)")
    dp = world_size // (cfg.tensor_model_parallel_size * cfg.pipeline_model_parallel_size)
    gbs = ns.global_batch_size if ns.global_batch_size is not None else ns.micro_batch_size * dp
    return TrainConfig(
        seq_length=ns.seq_length if ns.seq_length is not None else cfg.max_position_embeddings,
        micro_batch_size=ns.micro_batch_size, global_batch_size=gbs, train_iters=ns.train_iters,
        lr=ns.lr, min_lr=ns.min_lr, lr_decay_style=ns.lr_decay_style, lr_warmup_iters=ns.lr_warmup_iters,
        lr_warmup_init=ns.lr_warmup_init, lr_decay_iters=ns.lr_decay_iters,
        override_opt_param_scheduler=ns.override_opt_param_scheduler, weight_decay=ns.weight_decay,
        adam_beta1=ns.adam_beta1, adam_beta2=ns.adam_beta2, adam_eps=ns.adam_eps, clip_grad=ns.clip_grad,
        use_distributed_optimizer=ns.use_distributed_optimizer, overlap_grad_reduce=ns.overlap_grad_reduce,
        seed=ns.seed,
        data_path=ns.data_path or None, split=ns.split, mock_data=ns.mock_data, tokenizer=_tokenizer_spec(ns),
        data_cache_path=ns.data_cache_path,
        num_workers=ns.num_workers if ns.num_workers is not None else (2 if torch.cuda.is_available() else 0),
        save=ns.save, load=ns.load, save_interval=ns.save_interval, ckpt_keep_last=ns.ckpt_keep_last,
        ckpt_step=ns.ckpt_step, no_load_optim=ns.no_load_optim, no_load_rng=ns.no_load_rng, finetune=ns.finetune,
        exit_signal_handler=ns.exit_signal_handler, exit_duration_in_mins=ns.exit_duration_in_mins,
        exit_interval=ns.exit_interval, log_interval=ns.log_interval, eval_interval=ns.eval_interval,
        eval_iters=ns.eval_iters, log_dir=ns.log_dir or ns.save, tensorboard_dir=ns.tensorboard_dir,
        wandb_project=ns.wandb_project, wandb_exp_name=ns.wandb_exp_name, wandb_save_dir=ns.wandb_save_dir,
        wandb_entity=ns.wandb_entity, peak_tflops=ns.peak_tflops, transformer_impl=ns.transformer_impl,
        world_size=world_size, data_parallel_size=max(dp, 1),
        num_microbatches=max(gbs // max(ns.micro_batch_size * dp, 1), 1),
        vocab_from_tokenizer=ns.vocab_size is None,
    )


def _validate_batch(cfg: GrinConfig, tcfg: TrainConfig) -> None:
    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    dp, mbs, gbs = tcfg.data_parallel_size, tcfg.micro_batch_size, tcfg.global_batch_size
    for flag, value in (("--micro-batch-size", mbs), ("--global-batch-size", gbs), ("--seq-length", tcfg.seq_length),
                        ("--log-interval", tcfg.log_interval), ("--save-interval", tcfg.save_interval),
                        ("--eval-interval", tcfg.eval_interval), ("--ckpt-keep-last", tcfg.ckpt_keep_last),
                        ("--exit-interval", tcfg.exit_interval)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1 (got {value})")
    for flag, value in (("--train-iters", tcfg.train_iters), ("--eval-iters", tcfg.eval_iters),
                        ("--lr-warmup-iters", tcfg.lr_warmup_iters), ("--num-workers", tcfg.num_workers)):
        if value < 0:
            raise ConfigError(f"{flag} must be >= 0 (got {value})")
    if gbs % (mbs * dp):
        raise ConfigError(f"--global-batch-size {gbs} is not divisible by --micro-batch-size {mbs} x data-parallel "
                          f"size {dp} (= world {tcfg.world_size} / (TP {tp} x PP {pp})) = {mbs * dp}")
    m = gbs // (mbs * dp)
    if cfg.virtual_pipeline_model_parallel_size and m % pp:
        raise ConfigError(f"the interleaved schedule needs the number of micro-batches (--global-batch-size {gbs} "
                          f"/ (--micro-batch-size {mbs} x DP {dp}) = {m}) to be a multiple of "
                          f"--pipeline-model-parallel-size {pp}")
    if tcfg.seq_length > cfg.max_position_embeddings:
        raise ConfigError(f"--seq-length {tcfg.seq_length} exceeds --max-position-embeddings "
                          f"{cfg.max_position_embeddings}")
    if cfg.seq_parallel and tcfg.seq_length % tp:
        raise ConfigError(f"--seq-length {tcfg.seq_length} must be divisible by --tensor-model-parallel-size {tp} "
                          "under sequence parallelism")
    if not 0 <= tcfg.min_lr <= tcfg.lr:
        raise ConfigError(f"--min-lr {tcfg.min_lr} must be in [0, --lr {tcfg.lr}]")
    decay = tcfg.lr_decay_iters if tcfg.lr_decay_iters is not None else tcfg.train_iters
    if tcfg.lr_warmup_iters and tcfg.lr_warmup_iters >= max(decay, 1):
        raise ConfigError(f"--lr-warmup-iters {tcfg.lr_warmup_iters} must be smaller than --lr-decay-iters "
                          f"(default --train-iters) {decay}")


def _validate_files(cfg: GrinConfig, tcfg: TrainConfig) -> None:
    if not tcfg.mock_data and not tcfg.data_path:
        raise ConfigError("give --data-path PREFIX (from `megatron-grin preprocess`) or --mock-data")
    if tcfg.mock_data and tcfg.data_path:
        raise ConfigError("--mock-data and --data-path exclude each other; drop one")
    if not tcfg.mock_data:
        try:
            validate_data_path(tcfg.data_path)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if tcfg.load:
        check_checkpoint_config(tcfg.load, cfg, step=tcfg.ckpt_step, load_optim=not (tcfg.no_load_optim or tcfg.finetune))


def validate(cfg: GrinConfig, tcfg: TrainConfig) -> None:
    """Every check that needs no process group; raises ConfigError naming the flag to change."""
    cfg.validate(tcfg.world_size)
    try:
        resolve_backend(cfg.expert_backend)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if tcfg.transformer_impl == "transformer_engine" and not have_transformer_engine():
        raise ConfigError("--transformer-impl transformer_engine: Transformer Engine is not installed "
                          "(pip install 'megatron-grin[te]'), or use --transformer-impl local")
    _validate_batch(cfg, tcfg)
    _validate_files(cfg, tcfg)


def _apply_tokenizer(cfg: GrinConfig, tcfg: TrainConfig) -> GrinConfig:
    try:
        tokenizer = build_tokenizer(tcfg.tokenizer)
    except ValueError as err:
        raise ConfigError(f"--tokenizer: {err}") from None
    if tcfg.vocab_from_tokenizer:
        return cfg.replace(vocab_size=tokenizer.vocab_size)
    if cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"--vocab-size {cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} "
                          f"({tcfg.tokenizer}); drop --vocab-size to use the tokenizer's")
    return cfg


def parse_args(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None,
               check: bool = True) -> tuple[GrinConfig, TrainConfig]:
    """Flags (+ --config YAML) -> validated (GrinConfig, TrainConfig). Raises ConfigError."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    check_flags(parser, argv)
    pre = _Parser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    config_path = pre.parse_known_args(argv)[0].config
    yaml_argv = yaml_to_argv(config_path, parser) if config_path else []
    full = yaml_argv + argv
    ns = parser.parse_args(full)
    _check_architecture_flags(ns)
    explicit = _explicit_dests(parser, full)
    world = world_size_from_env() if world_size is None else world_size
    cfg = _model_config(ns, explicit)
    tcfg = _train_config(ns, cfg, world)
    cfg = _apply_tokenizer(cfg, tcfg)
    if check:
        validate(cfg, tcfg)
    return cfg, tcfg
