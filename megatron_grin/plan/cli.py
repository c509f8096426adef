"""`megatron-grin plan`: does a GRIN layout fit in GPU memory, and how fast will it train?

An analytical model, per GPU, of a DP x PP (x TP) layout without expert parallelism (every pipeline
stage holds all experts of its layers; dropless routing):

* memory: bf16 weights of the stage (divided by TP), fp32 gradient buffer, optimizer state (fp32
  master + Adam m, v; sharded over DP with the distributed optimizer), activations of the micro-batches
  the pipeline schedule keeps in flight (1F1B or interleaved) under full / selective / no recomputation,
  the recomputation working set and backward transients, a reserve for dropless load imbalance, and a
  fixed allowance for the CUDA context, NCCL buffers and allocator fragmentation;
* time: per-layer compute times from `megatron-grin bench` results (the shipped H200 measurements by
  default, scaled to the target GPU by its datasheet; ``--bench-results FILE`` for your hardware), the
  pipeline bubble (PP-1)/(VPP m), and TP, DP and PP communication from their volumes and explicit
  bandwidths (analytic).

Every prediction states its error from the calibration points (plan/calibration.py); the layout search
keeps a memory margin at least that large. docs/planning.md has every term, assumption and point.

    megatron-grin plan --config cluster/h100x64
    megatron-grin plan --model-preset grin-16x3.8b --gpus 64 --global-batch-size 2048 \
        --pipeline-model-parallel-size 8 --num-virtual-stages-per-pipeline-rank 4
    megatron-grin plan --config cluster/h100x512 --search
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from megatron_grin.accounting import parameter_counts
from megatron_grin.config import PRESETS, ConfigError, GrinConfig
from megatron_grin.settings import bounded
from megatron_grin.training.arguments import config_path, megatron_flags, read_yaml, scan_mapping
from megatron_grin.training.resolve import model_config
from megatron_grin.plan import calibration, planner, report
from megatron_grin.plan.layout import RECOMPUTE_MODES, Assumptions, Implementation, Layout
from megatron_grin.plan.planner import evaluate, predicted_peak, search, suggestions


# ------------------------------------------------------------------------------------------------
# configs and command line
# ------------------------------------------------------------------------------------------------
_LAYOUT_KEYS = {
    "tensor_model_parallel_size": "tp", "pipeline_model_parallel_size": "pp",
    "num_virtual_stages_per_pipeline_rank": "vpp", "micro_batch_size": "micro_batch_size",
    "global_batch_size": "global_batch_size", "seq_length": "seq_length",
    "recompute_granularity": "recompute", "recompute_method": "recompute_method",
    "recompute_num_layers": "recompute_num_layers", "use_distributed_optimizer": "distributed_optimizer",
    "bf16": "bf16",
}

def read_configs(paths: Sequence[str]) -> tuple[dict, dict, list[str]]:
    """Merge YAML files (later wins) into (flat settings, slurm section, files read).

    A cluster file (``slurm:`` / ``trainer:`` sections, configs/cluster/*.yaml) contributes its layout;
    given without a model or recipe file, the repository's configs/grin-16x3.8b.yaml and
    configs/pretrain-grin.yaml next to it are read first, as launch/submit.sh does.
    """
    files = [Path(config_path(p)) for p in paths]
    loaded = [(p, read_yaml(str(p))) for p in files]
    clusters = [(p, d) for p, d in loaded if "trainer" in d or "slurm" in d]
    if clusters and len(clusters) == len(loaded):
        root = clusters[0][0].resolve().parent.parent
        defaults = [root / "grin-16x3.8b.yaml", root / "pretrain-grin.yaml"]
        loaded = [(p, read_yaml(str(p))) for p in defaults if p.is_file()] + loaded
    settings: dict = {}
    slurm: dict = {}
    for path, data in loaded:
        if "trainer" in data or "slurm" in data:
            unknown = set(data) - {"slurm", "trainer"}
            if unknown:
                raise ConfigError(f"{path}: unknown sections {sorted(unknown)} (use slurm: and trainer:)")
            slurm.update(data.get("slurm") or {})
            settings.update(data.get("trainer") or {})
        else:
            settings.update(data)
    return settings, slurm, [str(p) for p, _ in loaded]


def _model_from_settings(settings: dict, model_preset: Optional[str]) -> GrinConfig:
    """The model as `pretrain` resolves the same keys (training/arguments.py, training/resolve.py)."""
    data = dict(settings)
    if model_preset:
        data["model_preset"] = model_preset
    data.setdefault("model_preset", "grin-16x3.8b")
    scanned = scan_mapping(data, "--config")
    cfg, problems = model_config(scanned.values, megatron_flags())
    if scanned.problems or problems:
        raise ConfigError(scanned.problems + problems)
    return cfg


def _layout_from(settings: dict, slurm: dict, args: argparse.Namespace, cfg: GrinConfig) -> Layout:
    values: dict[str, Any] = {}
    for key, name in _LAYOUT_KEYS.items():
        if settings.get(key) is not None:
            values[name] = settings[key]
    chunk = settings.get("num_layers_per_virtual_pipeline_stage")
    if chunk and "vpp" not in values:
        pp = int(values.get("pp", 1))
        values["vpp"] = cfg.num_layers // pp // int(chunk)
    if values.get("recompute") is None:
        values.pop("recompute", None)
    for name in ("tp", "pp", "vpp", "micro_batch_size", "global_batch_size", "seq_length", "recompute",
                 "recompute_method", "recompute_num_layers", "distributed_optimizer"):
        cli = getattr(args, name)
        if cli is not None:
            values[name] = cli
    if args.dtype is not None:
        values["bf16"] = args.dtype == "bf16"
    if args.bf16 is not None:
        values["bf16"] = args.bf16
    gpus = args.gpus or (int(slurm["nodes"]) * int(slurm.get("gpus_per_node", 8)) if "nodes" in slurm else None)
    if not gpus:
        raise ConfigError("give --gpus N (or a cluster config with slurm: nodes)")
    values.setdefault("seq_length", cfg.max_position_embeddings)
    if "global_batch_size" not in values:
        raise ConfigError("give --global-batch-size (or a recipe config that sets global_batch_size)")
    ints = ("tp", "pp", "vpp", "micro_batch_size", "global_batch_size", "seq_length", "recompute_num_layers")
    values = {k: (int(v) if k in ints else v) for k, v in values.items()}
    return Layout(gpus=int(gpus), **values)


#: Megatron-LM's --attention-backend names -> the planner's two memory models of attention
_ATTENTION = {"auto": "flash", "fused": "flash", "local": "unfused"}


POS_INT, POS_FLOAT = bounded(int, ge=1), bounded(float, gt=0)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="megatron-grin plan",
        description="Per-GPU memory and predicted speed of a GRIN layout (DP x PP x TP, no expert parallelism). "
                    "Exit status 1 when the layout does not fit with --min-headroom free. See docs/planning.md.")
    ap.add_argument("--config", action="append", default=[], metavar="YAML",
                    help="model, recipe or cluster YAML, by path or packaged name (repeatable, later wins); a "
                         "cluster file alone also reads grin-16x3.8b.yaml and pretrain-grin.yaml beside it")
    ap.add_argument("--model-preset", choices=sorted(PRESETS), help="model (default: the config's, else grin-16x3.8b)")
    ap.add_argument("--gpus", type=POS_INT,
                    help="GPUs in the job (default: the cluster config's nodes x gpus_per_node)")
    ap.add_argument("--gpu-memory", type=POS_FLOAT, default=None, metavar="GIB", help="memory per GPU in GiB (80)")
    ap.add_argument("--gpus-per-node", type=POS_INT, default=None, help="GPUs per node (8)")
    lay = ap.add_argument_group("layout (Megatron-LM's flag names, as `pretrain` takes them; override the configs)")
    lay.add_argument("--tensor-model-parallel-size", "--tp", dest="tp", type=POS_INT, metavar="TP")
    lay.add_argument("--pipeline-model-parallel-size", "--pp", dest="pp", type=POS_INT, metavar="PP")
    lay.add_argument("--num-virtual-stages-per-pipeline-rank", "--vpp", dest="vpp", type=POS_INT, metavar="VPP",
                     help="model chunks per pipeline rank (interleaved 1F1B when > 1)")
    lay.add_argument("--micro-batch-size", type=POS_INT)
    lay.add_argument("--global-batch-size", type=POS_INT)
    lay.add_argument("--seq-length", type=POS_INT)
    lay.add_argument("--recompute-granularity", "--recompute", dest="recompute", choices=RECOMPUTE_MODES,
                     help="none, selective or full")
    lay.add_argument("--recompute-method", choices=("uniform", "block"))
    lay.add_argument("--recompute-num-layers", type=POS_INT)
    lay.add_argument("--use-distributed-optimizer", "--distributed-optimizer", dest="distributed_optimizer",
                     action=argparse.BooleanOptionalAction, default=None)
    lay.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                     help="bf16 weights and activations (default: the config's, else bf16)")
    lay.add_argument("--dtype", choices=("bf16", "fp32"), help="the same as --bf16 / --no-bf16")
    srch = ap.add_argument_group("search")
    srch.add_argument("--search", action="store_true", help="list the fastest fitting layouts instead")
    srch.add_argument("--top", type=POS_INT, default=5, help="layouts --search prints (5)")
    model = ap.add_argument_group("assumptions (docs/planning.md)")
    model.add_argument("--device", help="GPU model for the datasheet and the measured speed (H100; e.g. H200, B200)")
    model.add_argument("--bench-results", action="append", default=[], metavar="FILE",
                       help="bench or calibration JSON for this hardware (repeatable; default: the shipped H200 "
                            "measurements)")
    model.add_argument("--calibration-report", action="store_true",
                       help="print predicted against measured for every calibration point and exit")
    model.add_argument("--efficiency", type=bounded(float, gt=0, le=1),
                       help="what-if: all compute at this share of peak instead of the measured per-layer times")
    model.add_argument("--peak-tflops", type=POS_FLOAT,
                       help="dense BF16 peak per GPU (default: the --device datasheet)")
    model.add_argument("--imbalance", type=bounded(float, ge=1),
                       help="busiest expert load / mean, dropless reserve (2.0)")
    model.add_argument("--min-headroom", type=bounded(float, ge=0, lt=1),
                       help="refuse layouts with less free memory (0.10)")
    model.add_argument("--fragmentation", type=bounded(float, ge=0), help="allocator slack on activations (0.10)")
    model.add_argument("--nvlink-gbps", type=POS_FLOAT, help="intra-node collective bandwidth, GB/s (300)")
    model.add_argument("--network-gbps", type=POS_FLOAT, help="inter-node collective bandwidth per GPU, GB/s (200)")
    model.add_argument("--p2p-network-gbps", type=POS_FLOAT, help="inter-node pipeline send bandwidth, GB/s (40)")
    model.add_argument("--attention-backend", "--attention", dest="attention", default="flash",
                       type=lambda v: _ATTENTION.get(v, v), choices=("flash", "unfused"),
                       help="Megatron-LM's --attention-backend: auto/flash/fused (flash kernels, GPU) or "
                            "unfused/local (megatron local, CPU)")
    model.add_argument("--fused-swiglu", action=argparse.BooleanOptionalAction, default=None,
                       help="megatron bias_activation_fusion (default: the model config's, off)")
    model.add_argument("--deallocate-pipeline-outputs", action=argparse.BooleanOptionalAction, default=None,
                       help="free sent stage outputs (default: the model config's, megatron default off)")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    return ap


def _assumptions(args: argparse.Namespace, slurm: dict) -> Assumptions:
    names = {"gpu_memory": "gpu_memory_gib", "gpus_per_node": "gpus_per_node", "efficiency": "efficiency",
             "peak_tflops": "peak_tflops", "imbalance": "imbalance", "min_headroom": "min_headroom",
             "fragmentation": "fragmentation", "nvlink_gbps": "nvlink_gbps", "network_gbps": "network_gbps",
             "p2p_network_gbps": "p2p_network_gbps", "device": "device"}
    values = {field_: getattr(args, arg) for arg, field_ in names.items() if getattr(args, arg) is not None}
    if "gpus_per_node" not in values and "gpus_per_node" in slurm:
        values["gpus_per_node"] = int(slurm["gpus_per_node"])
    return Assumptions(**values)


def _implementation(args: argparse.Namespace, cfg: GrinConfig) -> Implementation:
    impl = Implementation.for_config(cfg, attention=args.attention)
    if args.fused_swiglu is not None:
        impl = dataclasses.replace(impl, fused_swiglu=args.fused_swiglu)
    if args.deallocate_pipeline_outputs is not None:
        impl = dataclasses.replace(impl, deallocate_pipeline_outputs=args.deallocate_pipeline_outputs)
    return impl


def _whole_nodes(gpus: int, gpus_per_node: int) -> list[str]:
    """A job of more than one node takes whole nodes (the planner places TP and DP groups by node)."""
    if gpus > gpus_per_node and gpus % gpus_per_node:
        return [f"--gpus {gpus} is not a multiple of --gpus-per-node {gpus_per_node}: a job of several nodes takes "
                "whole nodes; change --gpus or --gpus-per-node"]
    return []


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cal = calibration.load(tuple(args.bench_results))
        if args.calibration_report:
            print(calibration_report(cal, _assumptions(args, {})))
            return 0
        settings, slurm, files = read_configs(args.config)
        cfg = _model_from_settings(settings, args.model_preset)
        lay = _layout_from(settings, slurm, args, cfg)
        asm = _assumptions(args, slurm)
        impl = _implementation(args, cfg)
        problems = impl.problems() + _whole_nodes(lay.gpus, asm.gpus_per_node)
        if problems:
            raise ConfigError(problems)
        planner.resolve(asm, cal)  # an unknown --device fails here, before any layout is evaluated
    except (ConfigError, OSError, ValueError, TypeError) as err:
        print(f"megatron-grin plan: {err}", file=sys.stderr)
        return 2
    if args.search:
        return _run_search(cfg, lay, impl, asm, args, files, cal)
    problems = lay.problems(cfg, asm.gpus_per_node)
    if problems:
        print("\n".join(["megatron-grin plan: invalid layout:"] + [f"  - {p}" for p in problems]), file=sys.stderr)
        return 2
    plan = evaluate(cfg, lay, impl, asm, cal)
    fixes = [] if plan.fits else suggestions(cfg, lay, impl, asm, cal)
    if args.json:
        out = {**plan.to_dict(), "configs": files, "calibration_files": list(cal.files),
               "suggestions": [{"change": t, "flags": p.layout.flags(), "headroom": p.headroom,
                                "tokens_per_s_per_gpu": p.time["tokens_per_s_per_gpu"]} for t, p in fixes]}
        print(json.dumps(out, indent=2))
    else:
        if files:
            print("configs: " + ", ".join(files))
        print(report.format_plan(plan))
        if not plan.fits:
            print(report.refusal(plan, fixes))
    return 0 if plan.fits else 1


def _run_search(cfg: GrinConfig, lay: Layout, impl: Implementation, asm: Assumptions,
                args: argparse.Namespace, files: list[str], cal: calibration.Calibration) -> int:
    if args.distributed_optimizer is None:  # explore with the distributed optimizer unless told otherwise
        lay = dataclasses.replace(lay, distributed_optimizer=True)
    plans = search(cfg, lay, impl, asm, top=args.top, cal=cal)
    if args.json:
        print(json.dumps({"configs": files, "layouts": [p.to_dict() for p in plans]}, indent=2))
    else:
        if files:
            print("configs: " + ", ".join(files))
        margin = max(asm.min_headroom, plans[0].required_headroom) if plans else asm.min_headroom
        print(f"{lay.gpus} GPUs x {asm.gpu_memory_gib:g} GiB, global batch {lay.global_batch_size} x "
              f"{lay.seq_length}, {parameter_counts(cfg)['total'] / 1e9:.1f}B parameters; fastest layouts with >= "
              f"{100 * margin:.0f}% headroom (--min-headroom or the memory error, whichever is larger):")
        print(report.format_search(plans) if plans else "  none fits")
    return 0 if plans else 1


def calibration_report(cal: calibration.Calibration, asm: Assumptions) -> str:
    """Predicted against measured for every calibration point (docs/planning.md shows this table)."""
    residual = planner.gpu_residual(cal)
    head = f"{'peak allocated':<44} {'device':<12} {'measured':>12} {'predicted':>12} {'error':>7}"
    lines = [f"calibration files: {', '.join(cal.files)}",
             f"GPU-only residual fitted: +{residual:.0%} of the dynamic bytes", "", head]
    for run in cal.memory_runs():
        mem = predicted_peak(run, residual if run.on_gpu else 0.0)
        measured = run.measured["peak_allocated_gib"]
        unit, scale = ("GiB", 1) if measured >= 1 else ("MiB", 1024)
        predicted = mem.allocated / 2**30
        lines.append(f"{run.id[:44]:<44} {run.device[:12]:<12} {measured * scale:>8.2f} {unit} "
                     f"{predicted * scale:>8.2f} {unit} {100 * (predicted / measured - 1):>+6.1f}%")
    errors = planner.speed_errors(cal, dataclasses.replace(asm, device=None, peak_tflops=None))
    lines += ["", f"{'tokens/s':<44} {'device':<12} {'measured':>12} {'predicted':>12} {'error':>7}"]
    for run, err in zip(cal.speed_runs(), errors):
        measured = run.measured["tokens_per_s"]
        lines.append(f"{run.id[:44]:<44} {run.device[:12]:<12} {measured:>12.0f} {measured * (1 + err):>12.0f} "
                     f"{100 * err:>+6.1f}%")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
