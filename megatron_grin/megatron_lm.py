"""Use megatron-grin from an upstream Megatron-LM checkout (its ``pretrain_gpt.py`` training loop).

``patches/pretrain_grin.py`` runs Megatron-LM's ``pretrain`` with the hooks defined here:

* :func:`grin_extra_args` adds the GRIN-only flags (declared in config.py, as ``pretrain`` takes them) to
  Megatron-LM's parser, after modelopt's when that is installed;
* :func:`grin_config_from_megatron_args` (training/megatron_args.py, shared with the readers of the checkpoints
  this loop writes) reads Megatron-LM's parsed ``args`` through the same declarations and the same answers
  (training/megatron_lm_answers.yaml) as ``megatron-grin pretrain``: a Megatron-LM flag that contradicts GRIN is
  refused with its reason, never overridden;
* :func:`grin_gpt_builder` builds exactly the model ``megatron-grin pretrain`` builds;
* :func:`grin_transformer_config_from_args` stands in for Megatron-LM's ``core_transformer_config_from_args``
  inside pretrain_gpt.py (get_batch, is_dataset_built_on_rank, get_embedding_ranks), so those hooks see the
  configuration of the model that is really trained.

Nothing here imports Megatron-LM's ``megatron.training`` at module level: tests build ``args`` from
Megatron-LM's flag table instead (tests/test_megatron_lm.py).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Optional

from megatron_grin.ckpt_format import config_json, write_atomic
from megatron_grin.config import GrinConfig
from megatron_grin.model.build import build_model, transformer_config
from megatron_grin.settings import GRIN_GROUP, declared, field_default
from megatron_grin.training import megatron_args
from megatron_grin.training.arguments import megatron_flags


def add_grin_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The GRIN-only flags (--grin-router, --grin-jitter-eps, --grin-expert-backend), from their declarations."""
    group = parser.add_argument_group("grin", "GRIN / SparseMixer-v2 routing (megatron-grin)")
    for name, s in declared(GrinConfig):
        if s.group == GRIN_GROUP:
            group.add_argument(*s.flags, type=s.type, choices=s.choices, default=field_default(GrinConfig, name),
                               help=s.help)
    return parser


def grin_extra_args(parser: argparse.ArgumentParser, modelopt_args=None) -> argparse.ArgumentParser:
    """Megatron-LM's ``extra_args_provider``: pretrain_gpt's (modelopt's, when installed), then GRIN's."""
    if modelopt_args is not None:
        parser = modelopt_args(parser)
    return add_grin_args(parser)




def grin_config_from_megatron_args(args: Any, tokenizer_vocab: Optional[int] = None) -> GrinConfig:
    """Megatron-LM's parsed ``args`` -> the validated GrinConfig ``megatron-grin pretrain`` would build.

    ``tokenizer_vocab``: the unpadded vocabulary of Megatron-LM's tokenizer (default: --vocab-size, else the
    padded size). Raises ConfigError listing every Megatron-LM setting that contradicts GRIN (never overrides).
    """
    return megatron_args.grin_config_from_megatron_args(args, megatron_flags(), tokenizer_vocab)


def write_config(save: Optional[str], cfg: GrinConfig) -> Optional[str]:
    """``<save>/grin_config.json``: lets `megatron-grin pretrain --load` and `convert to-hf` read the checkpoints."""
    if not save:
        return None
    os.makedirs(save, exist_ok=True)
    path = os.path.join(save, "grin_config.json")
    write_atomic(path, config_json(cfg))
    return path


_CACHE: dict = {}


def grin_config_cached(args: Any, tokenizer_vocab: Optional[int] = None) -> GrinConfig:
    """One GrinConfig per Megatron-LM args object (pretrain_gpt asks for a config on every micro-batch)."""
    key = id(args)
    stale = key in _CACHE and tokenizer_vocab is not None and _CACHE[key][0].vocab_size != tokenizer_vocab
    if key not in _CACHE or stale:
        _CACHE.clear()
        _CACHE[key] = (grin_config_from_megatron_args(args, tokenizer_vocab), {})
    return _CACHE[key][0]


def grin_transformer_config_from_args(args: Any, config_class: Any = None):
    """For pretrain_gpt.py's get_batch / is_dataset_built_on_rank / get_embedding_ranks: the GRIN model's config."""
    cfg = grin_config_cached(args)
    derived = _CACHE[id(args)][1]
    if "tconfig" not in derived:
        derived["tconfig"] = transformer_config(cfg)
    return derived["tconfig"]


def grin_gpt_builder(args: Any, pre_process: bool, post_process: bool, vp_stage=None, config=None,
                     pg_collection=None, tokenizer_vocab=None):
    """Drop-in for Megatron-LM's ``gpt_builder``: the GRIN model of this (virtual) stage.

    Megatron-LM's own TransformerConfig (``config``) is not used for the architecture: GRIN's is derived from
    ``args`` through the same declarations as `megatron-grin pretrain`, so both trainers build the same model.
    ``tokenizer_vocab``: a callable returning the tokenizer's vocabulary (the entry point passes Megatron-LM's).
    """
    cfg = grin_config_cached(args, tokenizer_vocab() if callable(tokenizer_vocab) else tokenizer_vocab)
    if pre_process and getattr(args, "rank", 0) == 0:
        write_config(getattr(args, "save", None), cfg)
    use_te = None if getattr(args, "transformer_impl", None) is None else args.transformer_impl == "transformer_engine"
    return build_model(cfg, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage, use_te=use_te)
