"""``megatron-grin convert``: megatron-grin checkpoints <-> Hugging Face PhimoeForCausalLM, streaming.

    megatron-grin convert to-hf   --load CKPT --out HF_DIR [--ckpt-step N] [--dtype bf16|fp32]
                                  [--tokenizer-model TOK_DIR] [--verify] [--force]
    megatron-grin convert from-hf --hf HF_DIR --save CKPT [--tensor-model-parallel-size N]
                                  [--pipeline-model-parallel-size M] [--iteration 0] [--verify] [--force]

Both directions run on CPU in one process and move one decoder layer at a time, so peak memory is
about one layer's weights whatever the model size (docs/conversion.md has measurements).
``to-hf`` reads a checkpoint saved under any TP/PP/DP layout; ``from-hf`` writes one the trainer
resumes from under any layout (model weights only: the optimizer starts fresh). The output is
written into a temporary directory next to the destination and renamed into place only when
complete (and, with ``--verify``, only when the parity gate passes). Exit status: 0 on success,
1 when the input is unusable or the parity gate fails (the message says why), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings
from typing import Iterator, Optional

import torch
from megatron.core import package_info

from megatron_grin import ckpt_format, ckpt_integrity
from megatron_grin.ckpt_format import TRACKER_NAME, iteration_dir
from megatron_grin.cli import quiet_missing_extras
from megatron_grin.config import ConfigError
from megatron_grin.convert import hf_io
from megatron_grin.convert.hf_io import ConversionError
from megatron_grin.convert.hf_keys import (
    HF_GLOBAL_KEYS,
    globals_from_hf,
    globals_to_hf,
    hf_keys,
    layer_from_hf,
    layer_to_hf,
)
from megatron_grin.convert.mcore_io import (
    CheckpointReader,
    check_files,
    find_checkpoint,
    save_streaming,
    single_process_megatron,
)
from megatron_grin.convert.safetensors_writer import ShardedSafetensorsWriter, parse_size, plan_shards, size_arg
from megatron_grin.convert.verify import verify as run_verify
from megatron_grin.settings import bounded
from megatron_grin.training import megatron_checkpoint
from megatron_grin.training.arguments import megatron_flags
from megatron_grin.training.save_dir import pid_alive, pid_start

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def _say(msg: str) -> None:
    print(f"[convert] {msg}", file=sys.stderr, flush=True)


def _finished(summary: dict, start: float, wrote: str) -> dict:
    """The summary a conversion returns, with its duration, said on stderr."""
    summary["seconds"] = round(time.time() - start, 2)
    _say(f"{wrote} in {summary['seconds']}s")
    return summary


# --- output directories ------------------------------------------------------------------------------
def _inside(path: str, other: str) -> bool:
    path, other = os.path.realpath(path), os.path.realpath(other)
    return path == other or path.startswith(other.rstrip(os.sep) + os.sep)


CONVERTED_RUN_PREFIX = "convert-from-hf-"  # the run id in the manifest of a from-hf checkpoint


def _not_replaceable(path: str, kind: str) -> Optional[str]:
    """Why --force must not replace ``path`` (None: an earlier output of the same conversion, or empty).
    ``kind``: "hf" (a to-hf export: files only, config.json among them) or "checkpoint" (a from-hf checkpoint
    root: the tracker and one iteration written by the converter)."""
    if not os.path.isdir(path) or os.path.islink(path):
        return "it is not a directory"
    names = sorted(os.listdir(path))
    if not names:
        return None
    if kind == "hf":
        dirs = [n for n in names if os.path.isdir(os.path.join(path, n))]
        if dirs or "config.json" not in names:
            return (f"it is not a Hugging Face export (it holds {', '.join(dirs[:3] or names[:3])}"
                    f"{', ...' if len(dirs or names) > 3 else ''})")
        return None
    iters = [n for n in names if re.fullmatch(r"iter_\d{7}", n)]
    if set(names) != {TRACKER_NAME, *iters} or len(iters) != 1:
        held = ", ".join(n for n in names if n != TRACKER_NAME)[:200]
        return f"it holds {held}, not one converted checkpoint"
    try:
        manifest = ckpt_integrity.read_manifest(os.path.join(path, iters[0]))
    except ckpt_format.CheckpointError:
        manifest = None
    if not str((manifest or {}).get("run_id", "")).startswith(CONVERTED_RUN_PREFIX):
        return f"its {iters[0]} was written by a training run, not by convert from-hf"
    return None


@contextlib.contextmanager
def atomic_output(path: str, force: bool, protect: tuple[str, ...] = (), kind: str = "hf") -> Iterator[str]:
    """Yield a temporary directory next to ``path``; move it to ``path`` only if the block succeeds. --force
    replaces only an earlier output of the same conversion (``kind``, see :func:`_not_replaceable`)."""
    path = os.path.abspath(path)
    for src in protect:
        if _inside(src, path):
            raise ConversionError(f"the output {path} would replace the input {src}; choose another directory.")
    if os.path.lexists(path) and not force:
        raise ConversionError(f"{path} already exists; pass --force to replace it.")
    why = _not_replaceable(path, kind) if os.path.lexists(path) else None
    if why:
        raise ConversionError(f"{path} exists and --force replaces only an earlier output of this conversion, but "
                              f"{why}. Choose another directory, or move it away yourself.")
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    _remove_dead_outputs(parent)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-{socket.gethostname()}-{os.getpid()}-{pid_start(os.getpid())}-",
                           dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output should look like a normal directory
    try:
        yield tmp
        if os.path.lexists(path):  # --force: swap, then delete the old one
            old = f"{tmp}.old"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old) if os.path.isdir(old) and not os.path.islink(old) else os.remove(old)
        else:
            os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


_TMP_OUTPUT = re.compile(r"^\..+\.tmp-(?P<host>.+)-(?P<pid>\d+)-(?P<start>\d+|None)-[^-]+$")


def _remove_dead_outputs(parent: str) -> None:
    """Temporary outputs that conversions killed on this host left in ``parent`` (kill -9 leaves them,
    model-sized): named .<output>.tmp-<host>-<pid>-<start>-<random>, removed once that process is gone."""
    host = socket.gethostname()
    for name in os.listdir(parent):
        match = _TMP_OUTPUT.match(name)
        if match and match["host"] == host and \
                not pid_alive(int(match["pid"]), None if match["start"] == "None" else match["start"]):
            _say(f"removing {os.path.join(parent, name)}, left by a conversion that was killed")
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    return None if name is None else _DTYPES[name]


def _narrower(out: torch.dtype, source: torch.dtype) -> bool:
    """Does writing ``source`` values as ``out`` round them?"""
    return torch.finfo(out).bits < torch.finfo(source).bits or (out != source and out == torch.bfloat16)


# --- to-hf ---------------------------------------------------------------------------------------------------
def to_hf(load: str, out: str, iteration: Optional[int] = None, dtype: Optional[str] = None,
          tokenizer: Optional[str] = None, verify: bool = False, force: bool = False,
          max_shard_size: str = "5GB", verify_atol: Optional[float] = None, verify_kl: Optional[float] = None,
          verify_seq_len: int = 32, grin_config: Optional[str] = None) -> dict:
    """Export a megatron-grin checkpoint to an HF PhimoeForCausalLM directory; returns a summary."""

    start = time.time()
    iter_dir, it = find_checkpoint(load, iteration)
    check_files(iter_dir)  # before anything is read from it: the trainer's check (sizes, checksums)
    cfg, source = megatron_checkpoint.model_config(iter_dir, megatron_flags(), grin_config)
    tokenizer = tokenizer or cfg.tokenizer  # the checkpoint records the tokenizer it was trained with
    bos, eos, pad = (1, 32000, None) if tokenizer is None else hf_io.tokenizer_ids(tokenizer, cfg.vocab_size)
    if tokenizer is None:  # a checkpoint that records none: GRIN-MoE's ids, when the vocabulary has room for them
        bos, eos = (b if b < cfg.vocab_size else None for b in (bos, eos))
    max_bytes = parse_size(max_shard_size)
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
        _say(f"warning: head_dim {cfg.head_dim} x {cfg.num_attention_heads} heads != hidden {cfg.hidden_size}; "
             "transformers 4.x Phimoe ignores config.head_dim, so the export loads correctly only in 5.x")
    _say(f"reading {iter_dir} (iteration {it}): {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
         f"{cfg.num_experts} experts, saved at TP{cfg.tensor_model_parallel_size}/PP{cfg.pipeline_model_parallel_size}"
         f"; model from {source}")
    with single_process_megatron(), atomic_output(out, force, protect=(load,)) as tmp:
        reader = CheckpointReader(iter_dir, cfg)
        stored = reader.stored_dtype("embedding.word_embeddings.weight")
        out_dtype = _dtype(dtype) or stored
        shapes = hf_io.hf_tensor_shapes(cfg)
        plan = plan_shards([(k, shapes[k], out_dtype) for k in hf_keys(cfg)], max_bytes)
        with ShardedSafetensorsWriter(tmp, plan) as writer:
            for layer in [None, *range(cfg.num_layers)]:
                ours = reader.load(reader.names(layer))
                hf = globals_to_hf(ours, cfg) if layer is None else layer_to_hf(ours, layer, cfg)
                del ours
                for _ in range(len(hf)):
                    name = writer.expected
                    if name not in hf:
                        raise ConversionError(f"internal: export order expected {name!r} next")
                    writer.write(name, hf.pop(name).to(out_dtype))
                if layer is not None and (layer + 1) % max(1, cfg.num_layers // 8) == 0:
                    _say(f"  layer {layer + 1}/{cfg.num_layers} written ({time.time() - start:.0f}s)")
        hf_io.write_json(os.path.join(tmp, "config.json"), hf_io.hf_config_from_grin(cfg, out_dtype, bos, eos, pad))
        hf_io.write_json(os.path.join(tmp, "generation_config.json"), hf_io.generation_config(bos, eos, pad))
        copied = hf_io.copy_tokenizer(tokenizer, tmp) if tokenizer and os.path.isdir(tokenizer) else []
        summary = dict(direction="to-hf", source=iter_dir, iteration=it, out=os.path.abspath(out),
                       dtype=str(out_dtype).replace("torch.", ""), shards=len(plan), tokenizer_files=copied)
        if verify:
            rounded = out_dtype if _narrower(out_dtype, stored) else None
            summary["verify"] = _parity_gate(iter_dir, cfg, tmp, verify_atol, verify_kl, verify_seq_len,
                                             round_ours_to=rounded)
    return _finished(summary, start, f"wrote {out} ({len(plan)} shard(s), {summary['dtype']})")


# --- from-hf -------------------------------------------------------------------------------------------------
def from_hf(hf: str, save: str, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
            iteration: int = 0, dtype: Optional[str] = None, verify: bool = False, force: bool = False,
            verify_atol: Optional[float] = None, verify_kl: Optional[float] = None,
            verify_seq_len: int = 32) -> dict:
    """Import an HF PhimoeForCausalLM directory as a megatron-grin checkpoint; returns a summary."""

    start = time.time()
    if iteration < 0:
        raise ConversionError(f"--iteration must be >= 0 (got {iteration}).")
    hf_config = hf_io.read_config(hf)
    overrides = dict(tensor_model_parallel_size=tensor_model_parallel_size,
                     pipeline_model_parallel_size=pipeline_model_parallel_size)
    if dtype is not None:
        overrides["bf16"] = _dtype(dtype) == torch.bfloat16
    cfg = hf_io.grin_config_from_hf(hf_config, **overrides)
    if any(os.path.isfile(os.path.join(hf, name)) for name in hf_io.TOKENIZER_FILES):
        cfg = cfg.replace(tokenizer=os.path.abspath(hf))  # recorded: pretrain and to-hf use it without --tokenizer
    weights = hf_io.HFWeights(hf, cfg)  # checks shards, names and shapes before anything is written
    hf_dtype = weights.dtype("model.embed_tokens.weight")
    out_dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    _say(f"reading {hf}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_experts} experts; writing "
         f"{str(out_dtype).replace('torch.', '')} for TP{tensor_model_parallel_size}/PP{pipeline_model_parallel_size}")
    layer_keys: dict[int, list[str]] = {}
    for key in hf_io.hf_tensor_shapes(cfg):
        if key.startswith("model.layers."):
            layer_keys.setdefault(int(key.split(".")[2]), []).append(key)

    def produce(layer: Optional[int]) -> dict[str, torch.Tensor]:
        if layer is None:
            return globals_from_hf(_finite(hf, {k: weights[k] for k in HF_GLOBAL_KEYS}), cfg)
        if (layer + 1) % max(1, cfg.num_layers // 8) == 0:
            _say(f"  layer {layer + 1}/{cfg.num_layers} ({time.time() - start:.0f}s)")
        return layer_from_hf(_finite(hf, {k: weights[k] for k in layer_keys[layer]}), layer, cfg)

    with single_process_megatron(), atomic_output(save, force, protect=(hf,), kind="checkpoint") as tmp:
        it_dir = iteration_dir(tmp, iteration)
        os.makedirs(it_dir)
        # No optimizer and no layout: the trainer starts a fresh optimizer and LR schedule from these weights.
        zero = {"iteration": 0, "consumed_train_samples": 0, "consumed_valid_samples": 0} if iteration == 0 else None
        common = ckpt_format.common_state(iteration, bf16=cfg.bf16, megatron_core=package_info.__version__,
                                          has_optimizer=False, use_distributed_optimizer=None, train_state=zero,
                                          converted_from=os.path.abspath(hf))
        save_streaming(cfg, it_dir, produce, common)
        ckpt_format.write_config(it_dir, cfg)
        ckpt_integrity.write_manifest(it_dir, ckpt_integrity.digest_files(it_dir, os.listdir(it_dir)),
                                      run_id=f"{CONVERTED_RUN_PREFIX}{os.getpid()}-{int(time.time())}")
        ckpt_format.write_tracker(tmp, iteration)
        summary = dict(direction="from-hf", source=os.path.abspath(hf), save=os.path.abspath(save),
                       iteration=iteration, dtype=str(out_dtype).replace("torch.", ""),
                       tensor_model_parallel_size=tensor_model_parallel_size,
                       pipeline_model_parallel_size=pipeline_model_parallel_size)
        if verify:
            rounded = out_dtype if _narrower(out_dtype, hf_dtype) else None
            summary["verify"] = _parity_gate(it_dir, cfg, hf, verify_atol, verify_kl, verify_seq_len,
                                             round_hf_to=rounded)
    return _finished(summary, start, f"wrote {save}/iter_{iteration:07d}")


def _finite(source: str, tensors: dict) -> dict:
    """Refuse NaN/inf weights: a checkpoint holding them trains to NaN at its first step."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ConversionError(f"{source}: {name} holds {bad} NaN/inf value(s) of {t.numel()}; the model is "
                                  "damaged or was saved after diverging. Convert an intact copy; nothing was written.")
    return tensors


def _parity_gate(iter_dir: str, cfg, hf_dir: str, atol: Optional[float], kl_tol: Optional[float], seq_len: int,
                 **rounding) -> dict:
    """Run the --verify parity check of our checkpoint against the HF model; raise if it fails (the caller
    then removes its temporary output). Returns the report as a dict for the summary."""

    report = run_verify(iter_dir, cfg, hf_dir, atol=atol, kl_tol=kl_tol, seq_len=seq_len, **rounding)
    _say(f"parity: {report.summary()}")
    if not report.passed:
        raise ConversionError(f"parity gate failed, nothing written: {report.summary()}. The converted model "
                              "does not reproduce the source's logits.")
    return dataclasses.asdict(report)


# --- CLI -----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-grin convert", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="direction", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--force", action="store_true", help="replace the output directory if it exists")
        p.add_argument("--verify", action="store_true",
                       help="run both models on fixed sequences and fail unless their logits match")
        p.add_argument("--verify-atol", type=bounded(float, ge=0), default=None,
                       help="max |logit diff| the mapping check allows (default 1e-4; docs/conversion.md)")
        p.add_argument("--verify-kl", type=bounded(float, ge=0), default=None,
                       help="mean KL(ours||HF) the mapping check allows (default: not checked)")
        p.add_argument("--verify-seq-len", type=bounded(int, ge=1), default=32, help="tokens per verification sequence")
        p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                       help="output dtype (default: the input's)")

    to = sub.add_parser("to-hf", help="megatron-grin checkpoint -> HF PhimoeForCausalLM directory")
    common(to)
    to.add_argument("--load", required=True, help="save root (uses latest_checkpointed_iteration.txt) or iter_N dir")
    to.add_argument("--out", required=True, help="HF output directory (must not exist unless --force)")
    to.add_argument("--ckpt-step", "--iteration", dest="iteration", type=bounded(int, ge=0), default=None,
                    help="iteration to export (default: the latest)")
    to.add_argument("--tokenizer-model", "--tokenizer", dest="tokenizer", default=None,
                    help="local HF tokenizer directory to copy (sets bos/eos ids); default: the tokenizer the "
                         "checkpoint records (pretrain's --tokenizer-model)")
    to.add_argument("--max-shard-size", type=size_arg, default="5GB",
                    help="safetensors shard size limit, e.g. 5GB, 500MB, 2GiB or bytes (default 5GB)")
    to.add_argument("--grin-config", default=None, metavar="FILE",
                    help="grin_config.json naming the model (default: the checkpoint's own, else the args of a "
                         "Megatron-LM checkpoint from patches/pretrain_grin.py, else <load>/grin_config.json)")

    fr = sub.add_parser("from-hf", help="HF PhimoeForCausalLM directory -> megatron-grin checkpoint")
    common(fr)
    fr.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    fr.add_argument("--save", required=True, help="checkpoint root to create (must not exist unless --force)")
    fr.add_argument("--tensor-model-parallel-size", type=bounded(int, ge=1), default=1,
                    help="TP size the trainer will use")
    fr.add_argument("--pipeline-model-parallel-size", type=bounded(int, ge=1), default=1,
                    help="PP size the trainer will use")
    fr.add_argument("--iteration", type=bounded(int, ge=0), default=0,
                    help="iteration number of the written checkpoint (default 0: a fresh run)")
    return parser


def _quiet() -> None:
    """Keep stderr to our progress lines: megatron's "TE/Apex not installed", megatron's and transformers'
    deprecation notices (by module; our own warnings and everyone's errors still show)."""
    quiet_missing_extras()
    for module in (r"megatron\.", r"transformers\.", r"torch\.distributed\.checkpoint"):
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_initialized():
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # conversion is CPU-only by design
    _quiet()
    verify_kw = dict(verify=args.verify, force=args.force, verify_atol=args.verify_atol, verify_kl=args.verify_kl,
                     verify_seq_len=args.verify_seq_len, dtype=args.dtype)
    try:
        if args.direction == "to-hf":
            to_hf(args.load, args.out, iteration=args.iteration, tokenizer=args.tokenizer,
                  max_shard_size=args.max_shard_size, grin_config=args.grin_config, **verify_kw)
        else:
            from_hf(args.hf, args.save, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                    iteration=args.iteration, **verify_kw)
    except (ConversionError, ConfigError) as err:
        print(f"megatron-grin convert {args.direction}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a full disk, a read-only or vanished directory: the temporary output is gone
        where = f" ({err.filename})" if err.filename else ""
        print(f"megatron-grin convert {args.direction}: error: {err.strerror or err}{where}; nothing was written "
              "(the temporary output was removed). Free space or choose another output directory.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
