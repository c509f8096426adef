"""Megatron-LM's parsed ``args`` -> the GrinConfig ``megatron-grin pretrain`` would build (no megatron import).

Shared by the patch path's builder (megatron_grin/megatron_lm.py, inside Megatron-LM's loop) and by the readers of
the checkpoints that loop writes (training/megatron_checkpoint.py: their ``args`` describe the model), so both read
Megatron-LM's arguments through the same declarations and answers (training/megatron_lm_answers.yaml) as
``megatron-grin pretrain``: a Megatron-LM setting that contradicts GRIN is refused with its reason, never overridden.
"""

from __future__ import annotations

from typing import Any, Optional

from megatron_grin.config import ConfigError, GrinConfig
from megatron_grin.settings import declared, field_default
from megatron_grin.training.flag_table import MegatronFlag

#: args that Megatron-LM's validate_args fills from other flags (arguments.py:786-822, align_param_gather: 586
#: without virtual stages) or its parser from the environment (inprocess_active_world_size: $WORLD_SIZE, 1756);
#: not user choices
_DERIVED_BY_MEGATRON = {"encoder_num_layers", "encoder_seq_length", "dataloader_type", "align_param_gather",
                        "inprocess_active_world_size"}
#: GrinConfig fields whose Megatron-LM argument needs more than a copy (read in _special)
_SPECIAL = {"sliding_window", "ffn_hidden_size", "num_query_groups", "vocab_size", "padded_vocab",
            "input_jitter_eps", "attention_backend", "moe_aux_loss_coeff", "moe_router_load_balancing_type",
            "virtual_pipeline_model_parallel_size"}


def _dest(flag: str, mflags: tuple[MegatronFlag, ...]) -> str:
    for m in mflags:
        if flag in m.flags:
            return m.dest
    return flag[2:].replace("-", "_")


def _scalar(value: Any, flag: str, problems: list) -> Any:
    if isinstance(value, (list, tuple)):
        if len(value) > 1:
            problems.append(f"{flag} {' '.join(map(str, value))}: one value (every GRIN layer is the same MoE layer)")
        return value[0] if value else None
    return value


def _special(args: Any, problems: list, tokenizer_vocab: Optional[int]) -> dict:
    """The GrinConfig fields whose Megatron-LM argument is a tuple, a list, an enum or derived."""
    window = getattr(args, "window_size", None)
    if window is not None and (window[1] != 0 or window[0] < 0):
        problems.append(f"--window-size {window}: GRIN's attention is causal with a finite window (LEFT,0)")
    gqa = bool(getattr(args, "group_query_attention", False))
    backend = getattr(args, "attention_backend", "auto")
    padded = getattr(args, "padded_vocab_size", None)
    return dict(
        sliding_window=None if window is None or window[0] < 0 else int(window[0]) + 1,
        ffn_hidden_size=getattr(args, "moe_ffn_hidden_size", None) or args.ffn_hidden_size,
        num_query_groups=args.num_query_groups if gqa else args.num_attention_heads,
        vocab_size=tokenizer_vocab or getattr(args, "vocab_size", None) or padded,
        padded_vocab=padded,
        input_jitter_eps=getattr(args, "moe_input_jitter_eps", None) or 0.0,
        attention_backend=getattr(backend, "name", backend),
        moe_aux_loss_coeff=float(_scalar(args.moe_aux_loss_coeff, "--moe-aux-loss-coeff", problems) or 0.0),
        moe_router_load_balancing_type=_scalar(args.moe_router_load_balancing_type,
                                               "--moe-router-load-balancing-type", problems),
        virtual_pipeline_model_parallel_size=getattr(args, "virtual_pipeline_model_parallel_size", None),
        tokenizer=getattr(args, "tokenizer_model", None) if getattr(args, "tokenizer_type", None) ==
        "HuggingFaceTokenizer" else None,
    )


def _answered_problems(args: Any, extra: dict, mflags: tuple[MegatronFlag, ...]) -> list[str]:
    """Megatron-LM flags no GRIN setting owns, judged as `pretrain` judges them (given = not at the default)."""
    problems = []
    for m in mflags:
        a = m.answer
        if a is None or m.dest in _DERIVED_BY_MEGATRON or not hasattr(args, m.dest):
            continue
        value = getattr(args, m.dest)
        value = getattr(value, "name", value)  # enums: Megatron-LM parses them by member name
        if a.passthrough:
            if value != m.default:
                extra[a.passthrough] = value
            continue
        if value == m.default and not a.fixed:
            continue
        accepted, reason = m.judge(value)
        if not accepted:
            shown = m.name if value is True or value is False else f"{m.name} {value}"
            problems.append(f"{shown}: {reason}")
    return problems


def grin_config_from_megatron_args(args: Any, mflags: tuple[MegatronFlag, ...],
                                   tokenizer_vocab: Optional[int] = None) -> GrinConfig:
    """Megatron-LM's parsed ``args`` -> the validated GrinConfig ``megatron-grin pretrain`` would build.

    ``mflags``: Megatron-LM's flag table (training.arguments.megatron_flags(), passed in: the flag-parsing path
    reads checkpoints through this module). ``tokenizer_vocab``: the unpadded vocabulary of Megatron-LM's tokenizer
    (default: --vocab-size, else the padded size). Raises ConfigError listing every Megatron-LM setting that
    contradicts GRIN (never overrides).
    """
    problems: list[str] = []
    extra: dict = {}
    problems += _answered_problems(args, extra, mflags)
    fields = _special(args, problems, tokenizer_vocab)
    for name, s in declared(GrinConfig):
        if name in _SPECIAL:
            continue
        dest = _dest(s.flag, mflags)
        if hasattr(args, dest):
            value = getattr(args, dest)
            fields[name] = field_default(GrinConfig, name) if value is None and not _optional(name) else value
    if fields.get("tensor_model_parallel_size", 1) == 1:
        fields["sequence_parallel"] = None  # Megatron-LM's validate_args already turned it off
    try:
        cfg = GrinConfig(**fields, extra=extra)
    except TypeError as err:
        raise ConfigError(f"Megatron-LM arguments: {err}") from None
    problems += cfg.problems()
    if problems:
        raise ConfigError(problems)
    return cfg


def _optional(name: str) -> bool:
    return field_default(GrinConfig, name) is None
