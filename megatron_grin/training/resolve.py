"""Given flag values -> GrinConfig + TrainConfig, with Megatron-LM's derivations and every contradiction listed.

The model starts from a GRIN preset (``--model-preset`` or a config that names one), from the ``--load``
checkpoint's model (``--use-checkpoint-args``), or else from Megatron-LM's defaults, which are read from
Megatron-LM's own flag table: without a GRIN preset nothing GRIN-specific is assumed, and a dense or
non-GRIN script is refused with the flags to add. Derivations follow Megatron-LM 0.16's ``validate_args``
and ``get_optimizer_param_scheduler`` (file and line references in docs/training.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_grin.config import GrinConfig, preset
from megatron_grin.settings import declared
from megatron_grin.training import run_checks
from megatron_grin.training.flag_table import MegatronFlag
from megatron_grin.training.run_config import SEED_MAX, SEED_STRIDE_PER_STAGE, TrainConfig

#: fields whose Megatron-LM default megatron-grin does not adopt (docs/training.md, "Differences")
KEEP_OURS = {"sequence_parallel", "moe_router_fusion", "moe_permute_fusion", "moe_grouped_gemm",
             "num_query_groups", "ffn_hidden_size", "vocab_size", "padded_vocab"}
#: Megatron-LM requires these (validate_args); megatron-grin also needs --num-experts (GRIN is a MoE)
REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings", "num_experts")
TOKENIZERS_WE_READ = {"byte": "byte", "bytetokenizer": "byte", "huggingfacetokenizer": "hf", "nulltokenizer": "null"}
GRIN_FIX = ("--config grin-16x3.8b (the released GRIN architecture), or --model-preset NAME")


@dataclass
class Resolution:
    cfg: GrinConfig
    tcfg: TrainConfig
    notes: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    model_source: str = ""
    saved: Optional[GrinConfig] = None  # the model config of the checkpoint --load resumes, if any
    problems_recheck: bool = False  # the vocabulary changed after the first model check
    describe_missing: bool = True  # list each missing GRIN property (not when no model was described at all)


def get(values: dict, key: str, default: Any = None) -> Any:
    given = values.get(key)
    return default if given is None else given.value


def resolve(values: dict, world_size: int, mflags: tuple[MegatronFlag, ...]) -> Resolution:
    """Build both configurations from the given values; problems and notes are collected, never raised."""
    r = Resolution(cfg=GrinConfig(), tcfg=TrainConfig())
    tcfg = _train_fields(values, r)
    r.saved, problems = run_checks.saved_config(tcfg, mflags)
    r.problems += problems
    grin_chosen = _model(values, mflags, r)
    _megatron_answers(values, mflags, r, grin_chosen)
    r.tcfg = _train(values, r.cfg, tcfg, world_size, r)
    r.cfg = r.cfg.replace(tokenizer=r.tcfg.tokenizer)
    r.problems += r.cfg.problems(world_size)
    r.problems += batch_problems(r.cfg, r.tcfg)
    return r


def model_config(values: dict, mflags: tuple[MegatronFlag, ...]) -> tuple[GrinConfig, list[str]]:
    """The model alone, resolved exactly as ``pretrain`` resolves it (``megatron-grin plan`` reads YAML so)."""
    r = Resolution(cfg=GrinConfig(), tcfg=TrainConfig())
    grin_chosen = _model(values, mflags, r)
    _megatron_answers(values, mflags, r, grin_chosen)
    return r.cfg, r.problems


# --- Megatron-LM flags that no setting owns ----------------------------------------------------------------------
def _megatron_answers(values: dict, mflags: tuple, r: Resolution, grin_chosen: bool) -> None:
    for m in mflags:
        a = m.answer
        if a is None:
            continue
        given = values.get(f"megatron.{m.name}")
        if given is None:
            if a.fixed and not grin_chosen and r.describe_missing and not _fixed_satisfied(m, values):
                r.problems.append(f"{m.name} is missing: {a.reason} (or choose a GRIN config: {GRIN_FIX})")
            continue
        if a.passthrough:
            r.cfg.extra[a.passthrough] = given.value
            r.notes.append(f"{given.origin}: passed to megatron-core's TransformerConfig.{a.passthrough}")
            continue
        accepted, text = m.judge(given.value)
        if accepted:
            r.notes.append(f"{given.origin}: no-op ({text})")
        else:
            r.problems.append(f"{given.origin}: {text}")


def _fixed_satisfied(m: MegatronFlag, values: dict) -> bool:
    """--use-rotary-position-embeddings means --position-embedding-type rope in Megatron-LM."""
    return m.name == "--position-embedding-type" and "megatron.--use-rotary-position-embeddings" in values


# --- the model ------------------------------------------------------------------------------------------------
def megatron_base(mflags: tuple) -> tuple[GrinConfig, list[str]]:
    """GrinConfig with Megatron-LM's default for every field it has a flag for; and the required fields."""
    defaults = {flag: m.default for m in mflags for flag in m.flags}
    changes, required = {}, []
    for name, s in declared(GrinConfig):
        if name in KEEP_OURS or s.flag not in defaults:
            continue
        value = defaults[s.flag]
        if isinstance(value, list):
            value = value[0] if value else None
        if value is None and name in REQUIRED:
            required.append(name)
            continue
        if value is None and name == "input_jitter_eps":
            value = 0.0  # Megatron-LM: None = no jitter
        if name == "rotary_base":
            value = float(value)
        changes[name] = value
    return GrinConfig().replace(**changes), required


def _model(values: dict, mflags: tuple, r: Resolution) -> bool:
    """Fill r.cfg; returns whether a GRIN preset / config / checkpoint supplied the architecture."""
    name = get(values, "cli.model_preset")
    required: list[str] = []
    if name:
        base, r.model_source = preset(name), f"model preset {name}"
    elif get(values, "train.use_checkpoint_args") and r.saved is not None:
        base, r.model_source = r.saved, "the --load checkpoint (--use-checkpoint-args)"
    else:
        base, required = megatron_base(mflags)
        r.model_source = "Megatron-LM's defaults (no GRIN preset or config chosen)"
    grin = bool(name) or r.saved is not None and bool(get(values, "train.use_checkpoint_args"))
    changes = {n: values[f"model.{n}"].value for n, _ in declared(GrinConfig) if f"model.{n}" in values}
    missing = [n for n in required if n not in changes]
    if missing and len(missing) == len(REQUIRED):
        r.problems.append(f"no model: choose {GRIN_FIX}, or describe a GRIN MoE with Megatron-LM's flags "
                          "(--num-layers, "
                          "--hidden-size, --num-attention-heads, --max-position-embeddings, --num-experts, "
                          "--moe-router-topk, --moe-ffn-hidden-size, --swiglu, --position-embedding-type rope, "
                          "--untie-embeddings-and-output-weights, ...)")
        return _finish_model(values, base.replace(**changes), grin=False, r=r, describe=False)
    if "num_experts" in missing:
        r.problems.append("no --num-experts: this is a dense model, and megatron-grin trains GRIN mixture-of-experts "
                          f"models. Choose {GRIN_FIX}, or describe a GRIN MoE: --num-experts N --moe-router-topk K "
                          "--moe-ffn-hidden-size F.")
    for n in missing:
        if n != "num_experts":
            flag = dict(declared(GrinConfig))[n].flag
            r.problems.append(f"{flag} is required (Megatron-LM requires it too), or choose {GRIN_FIX}.")
    return _finish_model(values, base.replace(**changes), grin, r)


def _finish_model(values: dict, cfg: GrinConfig, grin: bool, r: Resolution, describe: bool = True) -> bool:
    cfg = _ffn(values, cfg, grin, r)
    cfg = _query_groups(values, cfg, grin, r)
    cfg = _shorthands(values, cfg, r)
    r.cfg = cfg.replace(extra=dict(cfg.extra))
    r.describe_missing = describe
    return grin


def _ffn(values: dict, cfg: GrinConfig, grin: bool, r: Resolution) -> GrinConfig:
    """Expert size: --moe-ffn-hidden-size, else --ffn-hidden-size (Megatron-LM), else Megatron-LM's default."""
    dense = get(values, "cli.ffn_hidden_size")
    if "model.ffn_hidden_size" in values:
        if dense is not None and dense != cfg.ffn_hidden_size:
            r.notes.append(f"--ffn-hidden-size {dense} is Megatron-LM's dense MLP size, unused: every GRIN layer is "
                           f"MoE and the experts use --moe-ffn-hidden-size {cfg.ffn_hidden_size}")
        return cfg
    if dense is not None:
        return cfg.replace(ffn_hidden_size=dense)
    if grin:
        return cfg
    h = cfg.hidden_size if "model.hidden_size" in values else None
    if h is None:
        return cfg
    swiglu = "megatron.--swiglu" in values
    size = int((4 * h * 2 / 3) / 64) * 64 if swiglu else 4 * h  # validate_args (arguments.py:802-810)
    r.notes.append(f"expert size {size}: Megatron-LM's default for hidden {h}{' with --swiglu' if swiglu else ''} "
                   "(no --moe-ffn-hidden-size / --ffn-hidden-size given)")
    return cfg.replace(ffn_hidden_size=size)


def _query_groups(values: dict, cfg: GrinConfig, grin: bool, r: Resolution) -> GrinConfig:
    """Megatron-LM uses --num-query-groups only with --group-query-attention (else one group per head)."""
    gqa = bool(get(values, "cli.group_query_attention"))
    given = values.get("model.num_query_groups")
    if grin or gqa:
        if not grin and given is None:
            return cfg.replace(num_query_groups=1)  # Megatron-LM's default with --group-query-attention
        return cfg
    if given is not None and given.value != cfg.num_attention_heads:
        r.problems.append(f"{given.origin} without --group-query-attention: Megatron-LM builds one key/value head per "
                          "query head and ignores it; add --group-query-attention (or drop --num-query-groups)")
    return cfg.replace(num_query_groups=cfg.num_attention_heads)


def _shorthands(values: dict, cfg: GrinConfig, r: Resolution) -> GrinConfig:
    changes: dict[str, Any] = {}
    per_stage = values.get("cli.num_layers_per_virtual_pipeline_stage")
    if per_stage is not None:
        pp, n = cfg.pipeline_model_parallel_size, per_stage.value
        if cfg.num_layers % (pp * n):
            r.problems.append(f"{per_stage.origin}: --num-layers {cfg.num_layers} must be a multiple of it x "
                              f"--pipeline-model-parallel-size {pp}")
        else:
            vpp = cfg.num_layers // (pp * n)
            _set(changes, values, r, "virtual_pipeline_model_parallel_size", vpp if vpp > 1 else None, per_stage)
    if get(values, "cli.use_flash_attn"):
        _set(changes, values, r, "attention_backend", "flash", values["cli.use_flash_attn"])
    if get(values, "cli.recompute_activations"):
        _set(changes, values, r, "recompute_granularity", "selective", values["cli.recompute_activations"])
    if "cli.sliding_window" in values:
        _set(changes, values, r, "sliding_window", values["cli.sliding_window"].value, values["cli.sliding_window"])
    cfg = cfg.replace(**changes)
    if cfg.tensor_model_parallel_size == 1 and cfg.sequence_parallel:
        r.notes.append("--sequence-parallel: disabling sequence parallelism because tensor model parallelism is "
                       "disabled (as Megatron-LM does)")
        cfg = cfg.replace(sequence_parallel=None)
    if cfg.moe_router_load_balancing_type == "none" and cfg.moe_aux_loss_coeff > 0:
        r.notes.append(f"--moe-aux-loss-coeff {cfg.moe_aux_loss_coeff:g} is unused under "
                       "--moe-router-load-balancing-type none (as in Megatron-LM)")
    return cfg


def _set(changes: dict, values: dict, r: Resolution, name: str, value: Any, given) -> None:
    """A shorthand sets a field, unless that field's own flag says otherwise."""
    own = values.get(f"model.{name}")
    if own is not None and own.value != value:
        r.problems.append(f"{given.origin} contradicts {own.origin}; keep one")
    changes[name] = value


# --- the run ---------------------------------------------------------------------------------------------------
def _train_fields(values: dict, r: Resolution) -> TrainConfig:
    changes = {n: values[f"train.{n}"].value for n, _ in declared(TrainConfig) if f"train.{n}" in values}
    return TrainConfig(**changes)


def _train(values: dict, cfg: GrinConfig, t: TrainConfig, world: int, r: Resolution) -> TrainConfig:
    dp = max(world // (cfg.tensor_model_parallel_size * cfg.pipeline_model_parallel_size), 1)
    gbs = t.global_batch_size if t.global_batch_size is not None else t.micro_batch_size * dp
    changes: dict[str, Any] = dict(world_size=world, data_parallel_size=dp, global_batch_size=gbs,
                                   num_microbatches=max(gbs // max(t.micro_batch_size * dp, 1), 1),
                                   seq_length=t.seq_length or cfg.max_position_embeddings,
                                   log_dir=t.log_dir or t.save)
    r.problems += _schedule_problems(values, t)
    if t.train_iters is None and t.train_samples is not None:
        changes["train_iters"] = t.train_samples // gbs  # training.py:update_train_iters, no ramp-up
    tokenizer, from_ckpt = _tokenizer(values, t, r)
    changes.update(tokenizer=tokenizer, vocab_from_tokenizer="model.vocab_size" not in values and not from_ckpt)
    if "model.vocab_size" not in values and from_ckpt and r.saved is not None:
        r.cfg = r.cfg.replace(vocab_size=r.saved.vocab_size)
    if r.saved is not None and "model.padded_vocab" not in values:
        r.cfg = r.cfg.replace(padded_vocab=r.saved.padded_vocab_size)  # keep the checkpoint's rows at any TP
    return t.replace(**changes)


def _schedule_problems(values: dict, t: TrainConfig) -> list[str]:
    """Megatron-LM's validate_args rules for iteration- vs sample-based schedules (arguments.py:756-790)."""
    out = []
    if t.train_iters is None and t.train_samples is None:
        out.append("--train-iters (or --train-samples) is required; --train-iters 0 saves the initial weights")
    if t.train_iters is not None and t.train_samples is not None:
        out.append("--train-iters and --train-samples exclude each other; keep one")
    if t.train_samples is not None:
        out += [f"{values[f'train.{n}'].origin}: with --train-samples use {alt}" for n, alt in
                (("lr_decay_iters", "--lr-decay-samples"), ("lr_warmup_iters", "--lr-warmup-samples"),
                 ("lr_wsd_decay_iters", "--lr-wsd-decay-samples")) if f"train.{n}" in values]
    else:
        out += [f"{values[f'train.{n}'].origin}: with --train-iters use {alt}" for n, alt in
                (("lr_decay_samples", "--lr-decay-iters"), ("lr_warmup_samples", "--lr-warmup-iters"),
                 ("lr_wsd_decay_samples", "--lr-wsd-decay-iters")) if f"train.{n}" in values]
    if t.lr_warmup_fraction is not None and ("train.lr_warmup_iters" in values or "train.lr_warmup_samples" in values):
        out.append("--lr-warmup-fraction and --lr-warmup-iters / --lr-warmup-samples exclude each other; keep one")
    if t.override_opt_param_scheduler and t.use_checkpoint_opt_param_scheduler:
        out.append("--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler exclude each other "
                   "(Megatron-LM: 'both override and use-checkpoint are set')")
    if t.weight_decay_incr_style == "constant":
        out += [f"{values[k].origin}: only with a non-constant --weight-decay-incr-style (the constant style uses "
                "--weight-decay)" for k in ("train.start_weight_decay", "train.end_weight_decay") if k in values]
    elif t.start_weight_decay is None or t.end_weight_decay is None:
        out.append(f"--weight-decay-incr-style {t.weight_decay_incr_style} needs --start-weight-decay and "
                   "--end-weight-decay")
    if t.lr_decay_style == "WSD" and t.lr_wsd_decay_iters is None and t.lr_wsd_decay_samples is None:
        out.append("--lr-decay-style WSD needs --lr-wsd-decay-iters (or --lr-wsd-decay-samples)")
    if t.profile and t.profile_step_end <= t.profile_step_start:
        out.append(f"--profile-step-end {t.profile_step_end} must be after --profile-step-start {t.profile_step_start}")
    return out


def _tokenizer(values: dict, t: TrainConfig, r: Resolution) -> tuple[str, bool]:
    """(tokenizer spec, taken from the checkpoint): byte, a local HF directory, or null:VOCAB."""
    kind_given = t.tokenizer_type
    kind = TOKENIZERS_WE_READ.get((kind_given or "").lower())
    if kind_given and kind is None:
        r.problems.append(f"--tokenizer-type {kind_given}: megatron-grin reads HuggingFaceTokenizer (a local "
                          "directory: AutoTokenizer.from_pretrained(...).save_pretrained(DIR), then --tokenizer-type "
                          "HuggingFaceTokenizer --tokenizer-model DIR), NullTokenizer (with --vocab-size) and byte")
        return "byte", False
    if t.tokenizer and t.tokenizer_model and t.tokenizer != t.tokenizer_model:
        r.problems.append("--tokenizer and --tokenizer-model disagree; pass one of them")
    if kind == "null":
        vocab = get(values, "model.vocab_size")
        if vocab is None:
            r.problems.append("--tokenizer-type NullTokenizer needs --vocab-size (Megatron-LM's NullTokenizer "
                              "adds one end-of-document id after it)")
            return "byte", False
        return f"null:{vocab}", False
    spec = t.tokenizer or t.tokenizer_model
    if kind == "hf" and spec is None:
        r.problems.append("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR")
    if kind == "byte" and spec not in (None, "byte"):
        r.problems.append(f"--tokenizer-type byte takes no --tokenizer-model ({spec})")
    if spec is not None:
        return spec, False
    saved = r.saved.tokenizer if r.saved is not None else None
    if saved and t.use_tokenizer_model_from_checkpoint_args:
        r.notes.append(f"tokenizer {saved}: the one the --load checkpoint was trained with")
        return saved, True
    return "byte", False


# --- cross checks of model and run --------------------------------------------------------------------------------
def batch_problems(cfg: GrinConfig, t: TrainConfig) -> list[str]:
    out = []
    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    dp, mbs, gbs = t.data_parallel_size, t.micro_batch_size, t.global_batch_size
    if gbs % (mbs * dp):
        out.append(f"--global-batch-size {gbs} is not divisible by --micro-batch-size {mbs} x data-parallel size {dp} "
                   f"(= world {t.world_size} / (TP {tp} x PP {pp})) = {mbs * dp}")
    elif cfg.virtual_pipeline_model_parallel_size and (gbs // (mbs * dp)) % pp:
        out.append(f"the interleaved schedule needs the number of micro-batches (--global-batch-size {gbs} / "
                   f"(--micro-batch-size {mbs} x DP {dp}) = {gbs // (mbs * dp)}) to be a multiple of "
                   f"--pipeline-model-parallel-size {pp}")
    if t.seq_length > cfg.max_position_embeddings:
        out.append(f"--seq-length {t.seq_length} exceeds --max-position-embeddings {cfg.max_position_embeddings}")
    if cfg.seq_parallel and t.seq_length % tp:
        out.append(f"--seq-length {t.seq_length} must be divisible by --tensor-model-parallel-size {tp} under "
                   "sequence parallelism")
    if t.min_lr > t.lr:
        out.append(f"--min-lr {t.min_lr:g} must not exceed --lr {t.lr:g}")
    last_stage_seed = t.seed + SEED_STRIDE_PER_STAGE * (pp - 1)
    if last_stage_seed > SEED_MAX:
        out.append(f"--seed {t.seed}: the last pipeline stage seeds with {last_stage_seed} (--seed + "
                   f"{SEED_STRIDE_PER_STAGE} x stage), above numpy's {SEED_MAX}; use --seed <= "
                   f"{SEED_MAX - SEED_STRIDE_PER_STAGE * (pp - 1)}")
    if t.train_iters is not None and t.train_iters >= 0 and t.lr_decay_steps:
        if t.lr_warmup_steps and t.lr_warmup_steps >= t.lr_decay_steps:
            out.append(f"the warmup ({t.lr_warmup_steps:g} samples) must be shorter than the decay "
                       f"({t.lr_decay_steps} samples): lower --lr-warmup-iters / --lr-warmup-samples / "
                       "--lr-warmup-fraction or raise --lr-decay-iters")
    if t.overlap_param_gather and not (t.use_distributed_optimizer and t.overlap_grad_reduce):
        out.append("--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce "
                   "(as in Megatron-LM)")
    if t.mock_data and t.data_path:
        out.append("--mock-data and --data-path exclude each other; drop one")
    if not t.mock_data and not t.data_path:
        out.append("give --data-path PREFIX (from `megatron-grin preprocess`) or --mock-data")
    return out


def as_dict(cfg: GrinConfig) -> dict:
    return dataclasses.asdict(cfg)
