"""Checks of a resolved run against the files it names: data, tokenizer, the ``--load`` directory.

Each check takes a ``training.resolve.Resolution`` (``r``; not imported here, resolve imports this module).
``light`` reads headers and small JSON files only (milliseconds), so its problems are reported together
with every flag problem. ``heavy`` loads a Hugging Face tokenizer (transformers) and samples token ids; it
runs once everything else passed. Neither imports megatron-core or torch.distributed.
"""

from __future__ import annotations

import os
from typing import Optional

from megatron_grin import ckpt_format
from megatron_grin.ckpt_format import CheckpointError
from megatron_grin.ckpt_integrity import read_common_state
from megatron_grin.config import ConfigError, GrinConfig, have_transformer_engine, resolve_backend
from megatron_grin.training import data_files, megatron_checkpoint
from megatron_grin.training.tokenizer import build_tokenizer, static_vocab_size, tokenizer_dir_problem
from megatron_grin.training.run_config import TrainConfig

HF_MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


# --- the --load directory ----------------------------------------------------------------------------------------
def foreign_content(root: str) -> Optional[str]:
    """What a --load directory holds that megatron-grin cannot resume from, or None (ours, or nothing)."""
    if not os.path.isdir(root):
        return None
    names = set(os.listdir(root))
    tracked = _tracker_text(root)
    if tracked == "release" or "release" in names:
        return "a Megatron-LM 'release' checkpoint (latest_checkpointed_iteration.txt says release)"
    iters = sorted(n for n in names if n.startswith("iter_") and not n.endswith((".tmp", ".deleting", ".old")))
    for name in iters:
        sub = os.path.join(root, name)
        inner = set(os.listdir(sub)) if os.path.isdir(sub) else set()
        if any(n.startswith("mp_rank_") for n in inner):
            return (f"{name}/ in Megatron-LM's legacy --ckpt-format torch layout (mp_rank_*/model_optim_rng.pt); "
                    "megatron-grin reads torch_dist checkpoints only (Megatron-LM converts one: rerun its training "
                    "command with --ckpt-format torch --ckpt-convert-format torch_dist --ckpt-convert-save DIR, then "
                    "--load DIR/torch_dist)")
        if not ckpt_format.is_complete(sub) and not any(n.endswith(".tmp") for n in inner):
            return (f"{name}/ without dist_checkpointing's metadata.json and .metadata (an incomplete save or another "
                    "format)")
    if not iters and names & set(HF_MODEL_FILES):
        return ("a Hugging Face model (config.json and weights); convert it first: megatron-grin convert from-hf "
                f"--hf {root} --save CKPT, then --load CKPT")
    if not iters and names & {"metadata.json", ".metadata", ckpt_format.COMMON_NAME}:
        return ("one checkpoint's files (it is an iteration directory); --load takes the directory that holds "
                "iter_NNNNNNN/")
    if tracked is not None and tracked.isdigit() and not iters:
        return f"{ckpt_format.TRACKER_NAME} (iteration {tracked}) but no iter_* directory"
    return None


def _tracker_text(root: str) -> Optional[str]:
    try:
        with open(os.path.join(root, ckpt_format.TRACKER_NAME), encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def saved_config(t: TrainConfig, mflags: tuple = ()) -> tuple[Optional[GrinConfig], list[str]]:
    """The model config of the checkpoint --load would resume (None: nothing to resume), and the problems.
    ``mflags``: Megatron-LM's flag table, to read the args of Megatron-LM's checkpoints (megatron_checkpoint.py)."""
    if not t.load:
        return None, []
    try:
        ckpt_format.check_load_dir(t.load, t.save, exit_on_missing=False)
        found = ckpt_format.find_checkpoint(t.load, t.ckpt_step) if os.path.isdir(t.load) else None
    except CheckpointError as err:
        return None, err.problems
    if found is None:
        foreign = foreign_content(t.load)
        return None, [f"--load {t.load} holds {foreign}: refusing to start from scratch into it"] if foreign else []
    iteration, path = found
    if t.grin_config or not megatron_checkpoint.is_ours(path):  # Megatron-LM's, or a model named by --grin-config
        try:
            return megatron_checkpoint.model_config(path, mflags, t.grin_config)[0], []
        except CheckpointError as err:
            return None, [f"--load {t.load}: {p} Refusing to start from scratch into it." for p in err.problems]
    try:  # a damaged newest checkpoint is skipped here: the trainer verifies, warns and falls back
        _, path, data = ckpt_format.config_to_resume(t.load, t.ckpt_step)
        return ckpt_format.config_from_json(data, path), []
    except CheckpointError as err:
        return None, err.problems


def missing_checkpoint(t: TrainConfig) -> bool:
    """--exit-on-missing-checkpoint applies: Megatron-LM then exits with status 0 before training."""
    if not (t.exit_on_missing_checkpoint and t.load):
        return False
    return not os.path.isdir(t.load) or ckpt_format.find_checkpoint(t.load, t.ckpt_step) is None


def _checkpoint_model(r) -> list[str]:
    t = r.tcfg
    if r.saved is None:
        return []
    load_optim = not (t.no_load_optim or t.finetune)
    try:
        iteration, path = ckpt_format.find_checkpoint(t.load, t.ckpt_step)
        if t.grin_config or not megatron_checkpoint.is_ours(path):
            data = megatron_checkpoint.raw_config(path, r.saved, t.grin_config)
            ckpt_format.check_same_model(t.load, iteration, data, r.saved, r.cfg, load_optim)
        else:
            ckpt_format.check_checkpoint_config(t.load, r.cfg, step=t.ckpt_step, load_optim=load_optim)
    except CheckpointError as err:
        return err.problems
    return _schedule(t, path) if load_optim else []


# --- the learning-rate schedule of the checkpoint resumed ----------------------------------------------------
SCHEDULE_FLAGS = {"max_lr": "--lr", "min_lr": "--min-lr", "lr_warmup_steps": "--lr-warmup-iters (x global batch)",
                  "lr_decay_steps": "--lr-decay-iters, default --train-iters (x global batch)",
                  "lr_decay_style": "--lr-decay-style", "start_wd": "--weight-decay", "end_wd": "--weight-decay",
                  "wd_incr_steps": "--train-iters (x global batch)", "wd_incr_style": "(weight-decay style)"}


def check_schedule(saved: dict, current: dict, policy: str) -> list[str]:
    """Megatron-LM's rule for a changed LR/WD schedule on resume: refused unless
    --override-opt-param-scheduler (this run's values) or --use-checkpoint-opt-param-scheduler (the saved ones)."""
    constant_wd = saved.get("wd_incr_style") == current.get("wd_incr_style") == "constant" and \
        saved.get("start_wd") == saved.get("end_wd")
    diffs = [(k, saved[k], current[k]) for k in SCHEDULE_FLAGS if k in saved and k in current and saved[k] != current[k]
             and not (k == "wd_incr_steps" and constant_wd)]  # a constant weight decay never reads it
    if not diffs:
        return []
    listed = "; ".join(f"{k} ({SCHEDULE_FLAGS[k]}): checkpoint {a!r}, this run {b!r}" for k, a, b in diffs)
    if policy == "override":
        return [f"--override-opt-param-scheduler: using this run's schedule ({listed})"]
    if policy == "checkpoint":
        return [f"--use-checkpoint-opt-param-scheduler: keeping the checkpoint's schedule ({listed})"]
    raise CheckpointError(f"the learning-rate schedule differs from the checkpoint's: {listed}. Pass the same flags, "
                          "or --override-opt-param-scheduler to use this run's values, or "
                          "--use-checkpoint-opt-param-scheduler to keep the checkpoint's (as in Megatron-LM).")


def scheduler_policy(t: TrainConfig) -> str:
    """Whose schedule a resume with a changed one takes (check_schedule's ``policy``)."""
    return "override" if t.override_opt_param_scheduler else \
        "checkpoint" if t.use_checkpoint_opt_param_scheduler else "refuse"


def _schedule(t: TrainConfig, path: str) -> list[str]:
    """A changed LR schedule is refused with the flags (the trainer checks again when it loads): the saved
    scheduler state read from common.pt without torch, against the one this run would build."""
    try:
        common = read_common_state(os.path.join(path, ckpt_format.COMMON_NAME))
    except CheckpointError:
        return []  # damaged: the trainer verifies it, says so and falls back
    saved = common.get("opt_param_scheduler")
    grin = common.get("grin")
    if not isinstance(saved, dict) or (isinstance(grin, dict) and not grin.get("has_optimizer", True)):
        return []  # converted weights (no optimizer, no schedule to continue)
    try:
        check_schedule(saved, t.scheduler_kwargs(), scheduler_policy(t))
    except CheckpointError as err:
        return [f"--load {path}: {p}" for p in err.problems]
    return []


# --- data, tokenizer, implementation -------------------------------------------------------------------------------
def _data(t: TrainConfig) -> list[str]:
    if t.mock_data or not t.data_path:
        return []
    try:
        prefixes, _ = data_files.parse_data_path(t.data_path)
    except ValueError as err:
        return [str(err)]
    problems = []
    for prefix in prefixes:
        try:
            data_files.read_idx_info(prefix)
        except ValueError as err:
            problems.append(str(err) + _megatron_name_hint(prefix))
            continue
        problems += data_files.check_index_order(prefix)
    return problems


def _megatron_name_hint(prefix: str) -> str:
    """Megatron-LM's preprocess_data.py (and ours) name the output PREFIX_text_document."""
    for suffix in ("_text_document", "_text_sentence"):
        if not prefix.endswith(suffix) and os.path.isfile(prefix + suffix + ".bin"):
            return f" ({prefix}{suffix}.bin exists: pass --data-path {prefix}{suffix})"
    return ""


def _tokenizer_light(r) -> list[str]:
    spec = r.tcfg.tokenizer
    vocab = static_vocab_size(spec)
    if vocab is None:
        problem = tokenizer_dir_problem(spec)
        return [f"--tokenizer-model / --tokenizer: {problem}"] if problem else []
    if r.tcfg.vocab_from_tokenizer:
        r.cfg = r.cfg.replace(vocab_size=vocab)
        r.problems_recheck = True
    elif spec.startswith("null:"):
        r.cfg = r.cfg.replace(vocab_size=vocab)  # Megatron-LM's NullTokenizer: --vocab-size N means N + 1 ids
        r.problems_recheck = True
    elif r.cfg.vocab_size < vocab:
        return [f"--vocab-size {r.cfg.vocab_size} is smaller than the {spec} tokenizer's {vocab}; drop --vocab-size"]
    return []


def _implementation(r) -> list[str]:
    out = []
    try:
        resolve_backend(r.cfg.expert_backend)
    except ConfigError as err:
        out += err.problems
    if r.tcfg.transformer_impl == "transformer_engine" and not have_transformer_engine():
        out.append("--transformer-impl transformer_engine: Transformer Engine is not installed (pip install "
                   "'megatron-grin[te]'), or use --transformer-impl local")
    return out


def light(r) -> list[str]:
    """File checks that read headers and JSON only; may fill r.cfg.vocab_size from a file-less tokenizer."""
    r.problems_recheck = False
    problems = _implementation(r) + _data(r.tcfg) + _tokenizer_light(r)
    if r.problems_recheck:
        problems += [p for p in r.cfg.problems(r.tcfg.world_size) if p not in r.problems]
    if static_vocab_size(r.tcfg.tokenizer) is not None or not r.tcfg.vocab_from_tokenizer:
        problems += _checkpoint_model(r)
    return problems


def heavy(r) -> list[str]:
    """Checks that load a tokenizer or torch; fills r.cfg.vocab_size from a Hugging Face tokenizer."""
    t = r.tcfg
    problems = []
    if static_vocab_size(t.tokenizer) is None:
        try:
            tok = build_tokenizer(t.tokenizer)
        except ValueError as err:
            return [f"--tokenizer-model / --tokenizer: {err}"]
        if t.vocab_from_tokenizer:
            r.cfg = r.cfg.replace(vocab_size=tok.vocab_size)
        elif r.cfg.vocab_size < tok.vocab_size:
            problems.append(f"--vocab-size {r.cfg.vocab_size} is smaller than the tokenizer's {tok.vocab_size} "
                            f"({t.tokenizer}); drop --vocab-size to use the tokenizer's")
        problems += r.cfg.problems(t.world_size) + _checkpoint_model(r)
    if not t.mock_data and t.data_path and not problems:
        prefixes, _ = data_files.parse_data_path(t.data_path)
        for prefix in prefixes:
            problems += data_files.check_token_ids(prefix, r.cfg.vocab_size)
    return problems
