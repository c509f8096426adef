"""Megatron-LM's own torch_dist checkpoints of a GRIN model (patches/pretrain_grin.py): which model they hold, and
how ``megatron-grin pretrain --load`` and ``convert to-hf --load`` read them.

What Megatron-LM core_v0.16.1 writes (megatron/training/checkpointing.py: save_checkpoint, generate_state_dict,
get_rng_state), checked against a checkpoint its save_checkpoint wrote through the patch path (docs/training.md)::

    <save>/iter_0000200/        common.pt, metadata.json, .metadata, __<rank>_<n>.distcp (dist_checkpointing)
    <save>/latest_checkpointed_iteration.txt   "200" (no newline); "release" names <save>/release/
    <save>/grin_config.json     the model the patch path's builder built (megatron_lm.py), when it is recent

common.pt holds ``args`` (Megatron-LM's argparse.Namespace after validate_args, with consumed_train_samples,
consumed_valid_samples, skipped_train_samples, iteration, world_size, data_parallel_size, params_dtype, model_type,
and the GRIN flags of the patch path), ``checkpoint_version`` 3.0, ``iteration``, ``opt_param_scheduler``,
``num_floating_point_operations_so_far``, the optimizer's non-tensor part, ``content_metadata`` (how the sharded
state dicts were built) and ``rerun_state_machine`` (only mid-rerun). The sharded part: ``model`` (``model0``,
``model1``... per virtual stage), ``optimizer.*`` and ``rng_state``, a ShardedObject on the (PP, TP) grid with
the DP ranks as replicas, holding a list of one dict (one per DP rank with --data-parallel-random-init):
random_rng_state, np_rng_state, torch_rng_state, cuda_rng_state, rng_tracker_states.

They are read as Megatron-LM's load_checkpoint reads them: weights; optimizer and LR schedule unless --finetune or
--no-load-optim, and only if the stored optimizer state fits this run's (else a fresh optimizer, logged); the RNG
when TP and PP are unchanged; iteration and data position (``args.consumed_*_samples``). The model is
``--grin-config FILE`` when given, else what the checkpoint's ``args`` describe, else ``<load>/grin_config.json``.
Nothing here imports torch or megatron: flag validation reads common.pt with ckpt_integrity.read_common_state.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Iterable, Optional

from megatron_grin.ckpt_format import (
    COMMON_NAME,
    CONFIG_NAME,
    MODEL_FIELDS,
    RESOLVED_BACKEND_KEY,
    CheckpointError,
    config_from_json,
    read_config_json,
)
from megatron_grin.ckpt_integrity import Unresolved, read_common_state, read_metadata_file
from megatron_grin.config import ConfigError, GrinConfig
from megatron_grin.training.data_files import parse_data_path
from megatron_grin.training.flag_table import MegatronFlag
from megatron_grin.training.megatron_args import grin_config_from_megatron_args
from megatron_grin.training.tokenizer import build_tokenizer, static_vocab_size

#: set in Megatron-LM's args by patches/pretrain_grin.py (megatron_lm.grin_extra_args): the checkpoint holds GRIN
PATCH_ARG = "grin_router"
KIND = "a Megatron-LM checkpoint (patches/pretrain_grin.py)"


# --- which checkpoint, which model ---------------------------------------------------------------------------
def is_ours(iter_dir: str) -> bool:
    """megatron-grin's own checkpoints carry grin_config.json in the iteration directory."""
    return os.path.isfile(os.path.join(iter_dir, CONFIG_NAME))


def megatron_args(iter_dir: str) -> Optional[argparse.Namespace]:
    """The ``args`` of a Megatron-LM checkpoint (read without torch), None for megatron-grin's own; raises
    CheckpointError when common.pt cannot be read safely."""
    if is_ours(iter_dir):
        return None
    common = read_common_state(os.path.join(iter_dir, COMMON_NAME))
    args = common.get("args")
    return args if "grin" not in common and isinstance(args, argparse.Namespace) else None


def model_config(iter_dir: str, mflags: tuple[MegatronFlag, ...],
                 grin_config: Optional[str] = None) -> tuple[GrinConfig, str]:
    """(model, where it came from) of one checkpoint: ``--grin-config`` FILE, else the checkpoint's own
    grin_config.json, else its Megatron-LM args (patch path), else ``<load>/grin_config.json``.
    ``mflags``: Megatron-LM's flag table (training.arguments.megatron_flags())."""
    if grin_config:
        return config_from_json(read_config_json(grin_config), grin_config), f"--grin-config {grin_config}"
    if is_ours(iter_dir):
        return config_from_json(read_config_json(iter_dir), iter_dir), CONFIG_NAME
    beside = _beside(iter_dir)
    try:
        args = megatron_args(iter_dir)
    except CheckpointError as err:
        raise CheckpointError(f"{iter_dir} is a torch_dist checkpoint without {CONFIG_NAME}, and its Megatron-LM "
                              f"args cannot be read: {err} Pass --grin-config FILE (a {CONFIG_NAME}) to name its "
                              "model.") from None
    if args is not None and getattr(args, PATCH_ARG, None) is not None:
        return config_from_args(args, mflags, read_config_json(beside) if beside else None), \
            "its Megatron-LM args"
    if beside:
        return config_from_json(read_config_json(beside), beside), beside
    raise CheckpointError(_unknown_model(iter_dir, args))


def raw_config(iter_dir: str, cfg: GrinConfig, grin_config: Optional[str] = None) -> dict:
    """The raw grin_config.json data ckpt_format.check_same_model reads for the model :func:`model_config` gave: the
    file's, or for Megatron-LM's args the config with the concrete expert backend the builder recorded, if any."""
    if grin_config:
        return read_config_json(grin_config)
    if is_ours(iter_dir):
        return read_config_json(iter_dir)
    data = {**dataclasses.asdict(cfg), "padded_vocab": cfg.padded_vocab_size}
    beside = _beside(iter_dir)
    builder = read_config_json(beside) if beside else {}
    if RESOLVED_BACKEND_KEY in builder and _same_model(builder, cfg):
        data[RESOLVED_BACKEND_KEY] = builder[RESOLVED_BACKEND_KEY]  # the concrete expert backend it trained with
    return data


def describe(iter_dir: str, grin_config: Optional[str] = None) -> str:
    """What ``pretrain --dry-run`` says about the checkpoint it would resume ("" for megatron-grin's own)."""
    if is_ours(iter_dir) and not grin_config:
        return ""
    try:
        args = megatron_args(iter_dir)
    except CheckpointError:
        args = None
    what = KIND if args is not None and getattr(args, PATCH_ARG, None) is not None else "a Megatron-LM checkpoint"
    source = f"--grin-config {grin_config}" if grin_config else "its Megatron-LM args" if what == KIND else \
        os.path.join(os.path.dirname(os.path.normpath(iter_dir)), CONFIG_NAME)
    return (f" ({what} at iteration {getattr(args, 'iteration', '?')}: model from {source}; weights, optimizer, LR "
            f"schedule, RNG and data position ({getattr(args, 'consumed_train_samples', '?')} samples) restored as "
            "Megatron-LM restores them)")


def _unknown_model(iter_dir: str, args: Optional[argparse.Namespace]) -> str:
    fix = (f"megatron-grin reads Megatron-LM checkpoints of GRIN models written through patches/pretrain_grin.py "
           f"(patches/README.md); if it holds a GRIN model, pass --grin-config FILE (a {CONFIG_NAME}).")
    if args is None:
        return (f"{iter_dir} is a torch_dist checkpoint without {CONFIG_NAME} whose common.pt holds no Megatron-LM "
                f"args (written by neither megatron-grin nor Megatron-LM's save_checkpoint): {fix}")
    experts = getattr(args, "num_experts", None)
    model = (f"{getattr(args, 'num_layers', '?')} layers, hidden {getattr(args, 'hidden_size', '?')}, "
             + (f"{experts} experts" if experts else "dense (no --num-experts)"))
    return (f"{iter_dir} is a Megatron-LM torch_dist checkpoint without {CONFIG_NAME} of a model not trained through "
            f"patches/pretrain_grin.py ({model}; its args have no --{PATCH_ARG.replace('_', '-')}): {fix}")


def _beside(iter_dir: str) -> Optional[str]:
    """``<load>/grin_config.json`` (the patch path's builder writes it) if present and readable."""
    path = os.path.join(os.path.dirname(os.path.normpath(iter_dir)), CONFIG_NAME)
    try:
        return path if os.path.isfile(path) and read_config_json(path) is not None else None
    except CheckpointError:
        return None


def _same_model(data: dict, cfg: GrinConfig) -> bool:
    try:
        saved = config_from_json(data)
    except CheckpointError:
        return False
    return all(getattr(saved, name) == getattr(cfg, name) for name in MODEL_FIELDS)


# --- Megatron-LM's args -> the model ---------------------------------------------------------------------------
def tokenizer_spec(args: argparse.Namespace) -> Optional[str]:
    """megatron-grin's spelling of the tokenizer Megatron-LM trained with (HF directory, null:N), if it reads it."""
    kind = getattr(args, "tokenizer_type", None)
    if kind == "HuggingFaceTokenizer" and getattr(args, "tokenizer_model", None):
        return args.tokenizer_model
    if kind == "NullTokenizer" and getattr(args, "vocab_size", None):
        return f"null:{args.vocab_size}"
    return None


def _tokenizer_vocab(args: argparse.Namespace, beside: Optional[dict]) -> Optional[int]:
    """The unpadded vocabulary the patch path's builder used (Megatron-LM's tokenizer's), which args do not record:
    the builder's grin_config.json when it matches, else the tokenizer's own (null:N, a local HF directory)."""
    padded = getattr(args, "padded_vocab_size", None)
    if beside and beside.get("padded_vocab") == padded and beside.get("vocab_size"):
        return int(beside["vocab_size"])
    spec = tokenizer_spec(args)
    if spec is None:
        return None
    vocab = static_vocab_size(spec)
    if vocab is None and os.path.isdir(spec):
        try:
            vocab = build_tokenizer(spec).vocab_size  # transformers, only for this case
        except (OSError, ValueError):
            return None
    return vocab


def config_from_args(args: argparse.Namespace, mflags: tuple[MegatronFlag, ...],
                     beside: Optional[dict] = None) -> GrinConfig:
    """The GrinConfig a checkpoint's Megatron-LM args describe, read as the patch path's builder read them
    (``beside``: the builder's grin_config.json, for the unpadded vocabulary).

    Megatron enums the light reader leaves unresolved (the attention backend) take their flag's default: a run
    choice that Megatron-LM's --use-checkpoint-args does not take from a checkpoint either.
    """
    plain = argparse.Namespace(**vars(args))
    defaults = {m.dest: m.default for m in mflags}
    for name, value in vars(plain).items():
        if isinstance(value, Unresolved) and value.what.startswith("megatron."):
            setattr(plain, name, defaults.get(name))
    try:
        cfg = grin_config_from_megatron_args(plain, mflags, _tokenizer_vocab(plain, beside))
    except ConfigError as err:
        raise CheckpointError([f"its Megatron-LM args describe a model megatron-grin does not build: {p}"
                               for p in err.problems]) from None
    spec = tokenizer_spec(plain)
    return cfg.replace(tokenizer=spec) if spec else cfg


# --- what a resume takes from it ---------------------------------------------------------------------------------
def layout(args: Any) -> dict:
    """The layout the checkpoint was saved under, in the form of the trainer's own header."""
    return {"tp": args.tensor_model_parallel_size, "pp": args.pipeline_model_parallel_size,
            "vpp": getattr(args, "virtual_pipeline_model_parallel_size", None) or 1,
            "dp": getattr(args, "data_parallel_size", None), "world": getattr(args, "world_size", None)}


def resume_facts(args: Any) -> dict:
    """The data and batch settings, as training/checkpointing.resume_facts records them for its own checkpoints."""
    data = None
    if getattr(args, "data_path", None):
        prefixes, weights = parse_data_path(args.data_path)
        data = {"prefixes": [os.path.abspath(p) for p in prefixes], "weights": weights}
    facts = {"data_path": data, "mock_data": bool(getattr(args, "mock_data", False)), "seq_length": args.seq_length,
             "global_batch_size": args.global_batch_size, "seed": args.seed, "tokenizer": tokenizer_spec(args)}
    if getattr(args, "split", None):
        facts["split"] = args.split
    return facts


def header(common: dict, sharded_keys: Iterable[str]) -> dict:
    """Megatron-LM's common state in the form of the trainer's own ``grin`` header (training/checkpointing.py)."""
    args = common["args"]
    stored = {key.split(".")[0] for key in sharded_keys}  # optimizer.state.exp_avg.<param>, optimizer.distributed...
    has_optimizer = "optimizer" in stored and not getattr(args, "no_save_optim", False)
    return {"megatron_lm": True, "has_optimizer": has_optimizer,
            "use_distributed_optimizer": bool(getattr(args, "use_distributed_optimizer", False)),
            "bf16": bool(getattr(args, "bf16", False)), "layout": layout(args),
            "train_state": {"iteration": int(common["iteration"]),
                            "consumed_train_samples": int(getattr(args, "consumed_train_samples", 0) or 0),
                            "consumed_valid_samples": int(getattr(args, "consumed_valid_samples", 0) or 0)},
            "run_args": resume_facts(args)}


def rng_state(saved: list, args: Any, dp_rank: int) -> dict:
    """This rank's RNG state from Megatron-LM's list (one entry, or one per DP rank with
    --data-parallel-random-init), in the trainer's layout (checkpointing.set_rng_state)."""
    state = saved[dp_rank] if getattr(args, "data_parallel_random_init", False) else saved[0]
    return {"random": state["random_rng_state"], "numpy": state["np_rng_state"], "torch": state["torch_rng_state"],
            "cuda": state["cuda_rng_state"], "tracker": state["rng_tracker_states"]}


def unused(common: dict) -> list[str]:
    """What a Megatron-LM checkpoint holds that megatron-grin does not restore (said in one log line)."""
    out = []
    flops = common.get("num_floating_point_operations_so_far")
    if flops:
        out.append(f"num_floating_point_operations_so_far {flops:.4g} (megatron-grin reports MFU per interval)")
    skipped = getattr(common.get("args"), "skipped_train_samples", 0)
    if skipped:
        out.append(f"skipped_train_samples {skipped} (a statistic of Megatron-LM's rerun machine)")
    if common.get("rerun_state_machine"):
        out.append("rerun_state_machine (a step Megatron-LM was to re-run is not re-run)")
    return out


def optimizer_misfit(template: Any, iter_dir: str) -> list[str]:
    """Entries of an optimizer's sharded state dict that the checkpoint lacks or stores with another shape (another
    optimizer, sharding type, DP buffer layout or expert backend): empty when it can be loaded."""
    stored = read_metadata_file(iter_dir).state_dict_metadata
    out = []
    for key, shape in _leaves(template):
        have = stored.get(key)
        if have is None:
            out.append(f"{key} missing")
        elif shape is not None and tuple(getattr(have, "size", ())) != shape:
            out.append(f"{key}: {tuple(have.size)} stored, {shape} expected")
    return out


def _leaves(x: Any) -> Iterable[tuple[str, Optional[tuple]]]:
    """(stored key, global shape or None) of every ShardedTensor / ShardedObject under x (duck-typed: no megatron
    import here); ShardedTensorFactories are built first."""
    if hasattr(x, "build") and hasattr(x, "merge_fn"):
        x = x.build()
    if isinstance(x, dict):
        for v in x.values():
            yield from _leaves(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _leaves(v)
    elif hasattr(x, "global_shape") and hasattr(x, "key"):
        yield x.key, tuple(x.global_shape)
    elif hasattr(x, "unique_key"):
        yield x.unique_key, None


# --- the trainer's view of one (loaded) checkpoint -----------------------------------------------------------------
@dataclasses.dataclass
class Reading:
    """How the trainer reads a Megatron-LM checkpoint: its common state as the trainer's own header, the sharding
    options its state dicts were built with, and the one log line saying what is not restored."""

    args: Any
    grin: dict
    metadata: dict
    note: str

    def rng(self, saved: list, dp_rank: int) -> dict:
        return rng_state(saved, self.args, dp_rank)

    def optimizer_fits(self, template: Any, iter_dir: str, notes: list) -> bool:
        """Megatron-LM's optimizer state loads only into the same optimizer layout; else a note, and False."""
        misfit = optimizer_misfit(template, iter_dir)
        if misfit:
            more = f" and {len(misfit) - 1} more" if len(misfit) > 1 else ""
            notes.append(f"the checkpoint's optimizer state does not fit this run's optimizer ({misfit[0]}{more}: "
                         "another optimizer, distributed-optimizer sharding, data-parallel layout or expert backend): "
                         "loading the weights and starting a fresh optimizer")
        return not misfit


def reading(common: dict, iter_dir: str, sharded_keys: Iterable[str], source: str) -> Optional[Reading]:
    """The trainer's view of a loaded common state if it is Megatron-LM's (``args``, no ``grin`` header), else None.
    ``source``: where the model config came from (:func:`model_config`)."""
    if "grin" in common or "args" not in common:
        return None
    missed = unused(common)
    note = (f"{iter_dir} is {KIND}; model from {source}; weights, optimizer, LR schedule, RNG and data position "
            f"(args.consumed_train_samples) read as Megatron-LM's load_checkpoint reads them; not restored: "
            f"{'; '.join(missed) if missed else 'nothing'}")
    metadata = {k: v for k, v in (common.get("content_metadata") or {}).items() if k != "dp_cp_group"}
    return Reading(common["args"], header(common, sharded_keys), metadata, note)
