"""`megatron-grin plan`: does a GRIN layout fit in GPU memory, and how fast will it train?

An analytical model, per GPU, of a DP x PP (x TP) layout without expert parallelism (every pipeline
stage holds all experts of its layers; dropless routing):

* memory: bf16 weights of the stage (divided by TP), fp32 gradient buffer, optimizer state (fp32
  master + Adam m, v; sharded over DP with the distributed optimizer), activations of the micro-batches
  the pipeline schedule keeps in flight (1F1B or interleaved) under full / selective / no recomputation,
  the recomputation working set and backward transients, a reserve for dropless load imbalance, and a
  fixed allowance for the CUDA context, NCCL buffers and allocator fragmentation;
* time: FLOPs of the slowest pipeline rank at an efficiency calibrated to GRIN's reported 7077
  tokens/s/GPU on 64 H100, the pipeline bubble (PP-1)/(VPP m), and TP, DP and PP communication from
  their volumes and explicit bandwidths.

Every term, assumption and its validation (parameter counts equal the built model's; activation bytes
within 15 % of CPU measurements, ``benchmarks/activation_memory.py``) is in docs/planning.md.

    megatron-grin plan --config configs/cluster/h100x64.yaml
    megatron-grin plan --model-preset grin-16x3.8b --gpus 64 --global-batch-size 2048 --pp 8 --vpp 4
    megatron-grin plan --config configs/cluster/h100x512.yaml --search
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from megatron_grin.config import PRESETS, ConfigError, GrinConfig, preset
from megatron_grin.plan.layout import RECOMPUTE_MODES, Assumptions, GiB, Implementation, Layout
from megatron_grin.plan.memory import (
    RankMemory,
    parameter_summary,
    rank_memory,
)
from megatron_grin.plan.speed import (
    attention_window_ratio,
    calibrated_efficiency,
    model_flops_per_token,
    step_time,
)


# ------------------------------------------------------------------------------------------------
# a plan
# ------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Memory of every pipeline rank and the predicted speed of one layout."""

    cfg: GrinConfig
    layout: Layout
    impl: Implementation
    assumptions: Assumptions
    ranks: list[RankMemory]
    time: dict[str, float]
    efficiency: float

    @property
    def peak(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.total)

    @property
    def capacity(self) -> float:
        return self.assumptions.gpu_memory_gib * GiB

    @property
    def headroom(self) -> float:
        return 1.0 - self.peak.total / self.capacity

    @property
    def fits(self) -> bool:
        return self.headroom >= self.assumptions.min_headroom

    def to_dict(self) -> dict[str, Any]:
        counts = parameter_summary(self.cfg)
        return {
            "layout": {**dataclasses.asdict(self.layout), "dp": self.layout.dp,
                       "num_microbatches": self.layout.num_microbatches},
            "implementation": dataclasses.asdict(self.impl),
            "assumptions": {**dataclasses.asdict(self.assumptions), "efficiency": self.efficiency},
            "parameters": counts,
            "memory_gib": [{"rank": r.rank, "parameters": r.parameters, "inflight_chunk_microbatches": r.inflight,
                            **{k: v / GiB for k, v in r.terms.items()}, "total": r.total / GiB,
                            "activation_detail": {k: v / GiB for k, v in r.activation_detail.items()}}
                           for r in self.ranks],
            "peak_rank": self.peak.rank, "peak_gib": self.peak.total / GiB, "headroom": self.headroom,
            "fits": self.fits, "time": self.time,
        }


def evaluate(cfg: GrinConfig, lay: Layout, impl: Optional[Implementation] = None,
             asm: Assumptions = Assumptions()) -> Plan:
    """Memory and speed of one (valid) layout; see Layout.problems for validity."""
    impl = impl or Implementation.for_config(cfg)
    eff = asm.efficiency if asm.efficiency is not None else calibrated_efficiency(asm)
    ranks = [rank_memory(cfg, lay, impl, asm, r) for r in range(lay.pp)]
    return Plan(cfg, lay, impl, asm, ranks, step_time(cfg, lay, asm, eff), eff)


def candidate_layouts(cfg: GrinConfig, base: Layout, gpus_per_node: int = 8,
                      recompute_modes: Sequence[str] = RECOMPUTE_MODES) -> list[Layout]:
    """Valid layouts for --search: TP in {1,2,4,8}, PP dividing the layers, VPP, micro-batch 1..4."""
    out = []
    for tp in (1, 2, 4, 8):
        for pp in [p for p in range(1, cfg.num_layers + 1) if cfg.num_layers % p == 0]:
            if base.gpus % (tp * pp):
                continue
            per_stage = cfg.num_layers // pp
            vpps = [1] + ([v for v in range(2, per_stage + 1) if per_stage % v == 0] if pp > 1 else [])
            for vpp in vpps:
                for mbs in (1, 2, 3, 4):
                    for rec in recompute_modes:
                        lay = dataclasses.replace(base, tp=tp, pp=pp, vpp=vpp, micro_batch_size=mbs,
                                                  recompute=rec, recompute_method="uniform",
                                                  recompute_num_layers=1)
                        if not lay.problems(cfg, gpus_per_node):
                            out.append(lay)
    return out


def search(cfg: GrinConfig, base: Layout, impl: Optional[Implementation] = None,
           asm: Assumptions = Assumptions(), top: int = 5) -> list[Plan]:
    """The fastest fitting layouts (headroom >= min_headroom), best first.

    With flash attention selective recomputation frees only the attention's log-sum-exp (same memory
    as none, more compute), so it is searched only with unfused attention.
    """
    impl = impl or Implementation.for_config(cfg)
    modes = RECOMPUTE_MODES if impl.attention == "unfused" else ("none", "full")
    plans = [evaluate(cfg, lay, impl, asm) for lay in candidate_layouts(cfg, base, asm.gpus_per_node, modes)]
    fitting = [p for p in plans if p.fits]
    fitting.sort(key=lambda p: (-p.time["tokens_per_s_per_gpu"], -p.headroom))
    return fitting[:top]


def suggestions(cfg: GrinConfig, lay: Layout, impl: Optional[Implementation] = None,
                asm: Assumptions = Assumptions()) -> list[tuple[str, Plan]]:
    """For each knob, the smallest single change that makes a refused layout fit; fastest first."""
    def recompute(rec):
        return dataclasses.replace(lay, recompute=rec, recompute_method="uniform", recompute_num_layers=1)

    def more_stages(pp):
        same_vpp = dataclasses.replace(lay, pp=pp)
        keep = lay.vpp > 1 and not same_vpp.problems(cfg, asm.gpus_per_node)
        return same_vpp if keep else dataclasses.replace(lay, pp=pp, vpp=1)

    knobs = [  # each knob's changes, smallest first
        [(f"increase --pp to {pp}", more_stages(pp))
         for pp in range(lay.pp + 1, cfg.num_layers + 1) if cfg.num_layers % pp == 0],
        [(f"enable --recompute {rec}", recompute(rec))
         for rec in ("selective", "full") if RECOMPUTE_MODES.index(rec) > RECOMPUTE_MODES.index(lay.recompute)],
        [("enable --distributed-optimizer", dataclasses.replace(lay, distributed_optimizer=True))]
        if not lay.distributed_optimizer else [],
        [(f"increase --tp to {tp}", dataclasses.replace(lay, tp=tp)) for tp in (2, 4, 8) if tp > lay.tp],
        [("drop --vpp (plain 1F1B keeps fewer micro-batches in flight)", dataclasses.replace(lay, vpp=1))]
        if lay.vpp > 1 else [],
        [(f"lower --micro-batch-size to {mbs}", dataclasses.replace(lay, micro_batch_size=mbs))
         for mbs in range(lay.micro_batch_size - 1, 0, -1)],
    ]
    found = []
    for changes in knobs:
        for text, cand in changes:
            if cand.problems(cfg, asm.gpus_per_node):
                continue
            result = evaluate(cfg, cand, impl, asm)
            if result.fits:
                found.append((text, result))
                break
    found.sort(key=lambda item: -item[1].time["tokens_per_s_per_gpu"])
    return found


# ------------------------------------------------------------------------------------------------
# configs and command line
# ------------------------------------------------------------------------------------------------
_LAYOUT_KEYS = {
    "tensor_model_parallel_size": "tp", "pipeline_model_parallel_size": "pp",
    "virtual_pipeline_model_parallel_size": "vpp", "micro_batch_size": "micro_batch_size",
    "global_batch_size": "global_batch_size", "seq_length": "seq_length",
    "recompute_granularity": "recompute", "recompute_method": "recompute_method",
    "recompute_num_layers": "recompute_num_layers", "use_distributed_optimizer": "distributed_optimizer",
    "bf16": "bf16",
}
_MODEL_KEYS = {f.name for f in dataclasses.fields(GrinConfig)} - {"extra", "tensor_model_parallel_size",
                                                                   "pipeline_model_parallel_size",
                                                                   "virtual_pipeline_model_parallel_size",
                                                                   "recompute_granularity", "recompute_method",
                                                                   "recompute_num_layers", "bf16"}


def _load_yaml(path: Path) -> dict:
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a YAML mapping")
    return data


def read_configs(paths: Sequence[str]) -> tuple[dict, dict, list[str]]:
    """Merge YAML files (later wins) into (flat settings, slurm section, files read).

    A cluster file (``slurm:`` / ``trainer:`` sections, configs/cluster/*.yaml) contributes its layout;
    given without a model or recipe file, the repository's configs/grin-16x3.8b.yaml and
    configs/pretrain-grin.yaml next to it are read first, as launch/submit.sh does.
    """
    files = [Path(p) for p in paths]
    loaded = [(p, _load_yaml(p)) for p in files]
    clusters = [(p, d) for p, d in loaded if "trainer" in d or "slurm" in d]
    if clusters and len(clusters) == len(loaded):
        root = clusters[0][0].resolve().parent.parent
        defaults = [root / "grin-16x3.8b.yaml", root / "pretrain-grin.yaml"]
        loaded = [(p, _load_yaml(p)) for p in defaults if p.is_file()] + loaded
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
    name = model_preset or settings.get("model_preset") or "grin-16x3.8b"
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    overrides = {k: v for k, v in settings.items() if k in _MODEL_KEYS}
    return preset(name, **overrides)


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
    gpus = args.gpus or (int(slurm["nodes"]) * int(slurm.get("gpus_per_node", 8)) if "nodes" in slurm else None)
    if not gpus:
        raise ConfigError("give --gpus N (or a cluster config with slurm: nodes)")
    values.setdefault("seq_length", cfg.max_position_embeddings)
    if "global_batch_size" not in values:
        raise ConfigError("give --global-batch-size (or a recipe config that sets global_batch_size)")
    ints = ("tp", "pp", "vpp", "micro_batch_size", "global_batch_size", "seq_length", "recompute_num_layers")
    values = {k: (int(v) if k in ints else v) for k, v in values.items()}
    return Layout(gpus=int(gpus), **values)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="megatron-grin plan",
        description="Per-GPU memory and predicted speed of a GRIN layout (DP x PP x TP, no expert parallelism). "
                    "Exit status 1 when the layout does not fit with --min-headroom free. See docs/planning.md.")
    ap.add_argument("--config", action="append", default=[], metavar="YAML",
                    help="model, recipe or cluster YAML (repeatable, later wins); a cluster file alone also "
                         "reads configs/grin-16x3.8b.yaml and configs/pretrain-grin.yaml")
    ap.add_argument("--model-preset", choices=sorted(PRESETS), help="model (default: the config's, else grin-16x3.8b)")
    ap.add_argument("--gpus", type=int, help="GPUs in the job (default: the cluster config's nodes x gpus_per_node)")
    ap.add_argument("--gpu-memory", type=float, default=None, metavar="GIB", help="memory per GPU in GiB (80)")
    ap.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (8)")
    lay = ap.add_argument_group("layout (override the configs)")
    lay.add_argument("--tp", type=int)
    lay.add_argument("--pp", type=int)
    lay.add_argument("--vpp", type=int, help="model chunks per pipeline rank (interleaved 1F1B when > 1)")
    lay.add_argument("--micro-batch-size", type=int)
    lay.add_argument("--global-batch-size", type=int)
    lay.add_argument("--seq-length", type=int)
    lay.add_argument("--recompute", choices=RECOMPUTE_MODES)
    lay.add_argument("--recompute-method", choices=("uniform", "block"))
    lay.add_argument("--recompute-num-layers", type=int)
    lay.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction, default=None)
    lay.add_argument("--dtype", choices=("bf16", "fp32"), help="weights/activations (default: the config's bf16, "
                                                               "else bf16)")
    srch = ap.add_argument_group("search")
    srch.add_argument("--search", action="store_true", help="list the fastest fitting layouts instead")
    srch.add_argument("--top", type=int, default=5, help="layouts --search prints (5)")
    model = ap.add_argument_group("assumptions (docs/planning.md)")
    model.add_argument("--efficiency", type=float, help="share of peak FLOPs while computing (default: calibrated "
                                                        "to GRIN's 7077 tokens/s/GPU on 64 H100)")
    model.add_argument("--peak-tflops", type=float, help="dense BF16 peak per GPU (989.4, H100 SXM)")
    model.add_argument("--imbalance", type=float, help="busiest expert load / mean, dropless reserve (2.0)")
    model.add_argument("--min-headroom", type=float, help="refuse layouts with less free memory (0.10)")
    model.add_argument("--fragmentation", type=float, help="allocator slack on activations (0.10)")
    model.add_argument("--nvlink-gbps", type=float, help="intra-node collective bandwidth, GB/s (300)")
    model.add_argument("--network-gbps", type=float, help="inter-node collective bandwidth per GPU, GB/s (200)")
    model.add_argument("--p2p-network-gbps", type=float, help="inter-node pipeline send bandwidth, GB/s (40)")
    model.add_argument("--attention", choices=("flash", "unfused"), default="flash",
                       help="attention kernel: flash (TE, GPU) or unfused (megatron local, CPU)")
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
             "p2p_network_gbps": "p2p_network_gbps"}
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


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
_TERM_LABELS = {
    "weights": "weights ({dtype}, this stage's layers incl. all experts, / TP)",
    "gradients": "gradients (fp32 main-grad buffer)",
    "optimizer": "optimizer (fp32 master + Adam m, v{shard})",
    "activations": "activations (saved for backward, in flight)",
    "recompute_and_transients": "recompute working set + backward transients",
    "imbalance_reserve": "dropless imbalance reserve ({imbalance:g}x mean expert load)",
    "cuda_nccl_fragmentation": "CUDA context + NCCL + fragmentation",
}


def _header(plan: Plan) -> list[str]:
    c, lay = plan.cfg, plan.layout
    counts = parameter_summary(c)
    return [f"model: {c.num_layers} layers, hidden {c.hidden_size}, {c.num_experts} experts (top-{c.moe_router_topk}, "
            f"ffn {c.ffn_hidden_size}): {counts['total'] / 1e9:.2f}B parameters, {counts['active'] / 1e9:.2f}B active",
            f"on {lay.gpus} GPUs x {plan.assumptions.gpu_memory_gib:g} GiB: {lay.describe()}"]


def _memory_lines(plan: Plan) -> list[str]:
    lay = plan.layout
    shown = sorted({0, plan.peak.rank, lay.pp - 1})
    cols = [plan.ranks[r] for r in shown]
    fmt = dict(dtype="bf16" if lay.bf16 else "fp32", imbalance=plan.assumptions.imbalance,
               shard=f", / DP {lay.dp}" if lay.distributed_optimizer else ", not sharded")
    lines = ["", "memory per GPU (GiB)".ljust(62) + "".join(f"{'PP rank ' + str(r.rank):>12}" for r in cols)]
    lines.append("  parameters on the GPU".ljust(62) + "".join(f"{r.parameters / 1e9:>11.2f}B" for r in cols))
    for key, label in _TERM_LABELS.items():
        lines.append(("  " + label.format(**fmt)).ljust(62) + "".join(f"{r.terms[key] / GiB:>12.2f}" for r in cols))
    lines.append("  total".ljust(62) + "".join(f"{r.total / GiB:>12.2f}" for r in cols))
    lines.append("  chunk-microbatches in flight".ljust(62) + "".join(f"{r.inflight:>12d}" for r in cols))
    peak = plan.peak
    lines.append(f"peak: PP rank {peak.rank}, {peak.total / GiB:.1f} of {plan.assumptions.gpu_memory_gib:g} GiB, "
                 f"headroom {100 * plan.headroom:.1f}%")
    return lines


def _time_lines(plan: Plan) -> list[str]:
    t, lay, asm = plan.time, plan.layout, plan.assumptions
    fl = model_flops_per_token(plan.cfg, lay.seq_length)
    calibrated = "calibrated to GRIN's 7077 tokens/s/GPU on 64 H100" if asm.efficiency is None else "given"
    return [
        "",
        "predicted speed",
        f"  model FLOPs per token: 6 x {parameter_summary(plan.cfg)['active'] / 1e9:.2f}B active = "
        f"{fl['params'] / 1e9:.1f} G + attention {fl['attention'] / 1e9:.1f} G "
        f"(window ratio {attention_window_ratio(lay.seq_length, plan.cfg.sliding_window):.3f})",
        f"  compute efficiency {100 * plan.efficiency:.1f}% of {asm.peak_tflops:g} TFLOPS ({calibrated})",
        f"  compute {t['compute_s']:.2f} s on the slowest PP rank {t['slowest_rank']} "
        f"(stage imbalance {t['stage_imbalance']:.3f}), TP comm factor {t['tp_factor']:.3f}",
        f"  pipeline bubble (PP-1)/(VPP m) = {lay.pp - 1}/({lay.vpp} x {lay.num_microbatches}) = "
        f"{100 * t['bubble']:.1f}% ({t['bubble_s']:.2f} s)",
        f"  DP gradient/parameter communication {t['dp_comm_s']:.2f} s, pipeline sends {t['pp_comm_s']:.2f} s",
        f"  step {t['step_s']:.2f} s -> {t['tokens_per_s_per_gpu']:.0f} tokens/s/GPU, MFU {100 * t['mfu']:.1f}%",
    ]


def format_plan(plan: Plan) -> str:
    return "\n".join(_header(plan) + _memory_lines(plan) + _time_lines(plan))


def format_search(plans: list[Plan]) -> str:
    head = f"{'#':>2}  {'tokens/s/GPU':>12} {'MFU':>6} {'peak GiB':>9} {'headroom':>9}  layout"
    rows = [head]
    for i, p in enumerate(plans, 1):
        rows.append(f"{i:>2}  {p.time['tokens_per_s_per_gpu']:>12.0f} {100 * p.time['mfu']:>5.1f}% "
                    f"{p.peak.total / GiB:>9.1f} {100 * p.headroom:>8.1f}%  {p.layout.flags()}")
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings, slurm, files = read_configs(args.config)
        cfg = _model_from_settings(settings, args.model_preset)
        lay = _layout_from(settings, slurm, args, cfg)
        asm = _assumptions(args, slurm)
        impl = _implementation(args, cfg)
        if asm.efficiency is None:
            calibrated_efficiency(asm)  # fails early if the bandwidth assumptions make the anchor unreachable
    except (ConfigError, OSError, ValueError, TypeError) as err:
        print(f"megatron-grin plan: {err}", file=sys.stderr)
        return 2
    if args.search:
        return _run_search(cfg, lay, impl, asm, args, files)
    problems = lay.problems(cfg, asm.gpus_per_node)
    if problems:
        print("megatron-grin plan: invalid layout: " + "; ".join(problems), file=sys.stderr)
        return 2
    plan = evaluate(cfg, lay, impl, asm)
    fixes = [] if plan.fits else suggestions(cfg, lay, impl, asm)
    if args.json:
        out = {**plan.to_dict(), "configs": files,
               "suggestions": [{"change": t, "flags": p.layout.flags(), "headroom": p.headroom,
                                "tokens_per_s_per_gpu": p.time["tokens_per_s_per_gpu"]} for t, p in fixes]}
        print(json.dumps(out, indent=2))
    else:
        if files:
            print("configs: " + ", ".join(files))
        print(format_plan(plan))
        if not plan.fits:
            print(_refusal(plan, fixes))
    return 0 if plan.fits else 1


def _refusal(plan: Plan, fixes: list[tuple[str, Plan]]) -> str:
    need = plan.peak.total / GiB
    limit = plan.assumptions.gpu_memory_gib * (1 - plan.assumptions.min_headroom)
    lines = ["", f"DOES NOT FIT: PP rank {plan.peak.rank} needs {need:.1f} GiB; at most {limit:.1f} GiB leaves the "
             f"required {100 * plan.assumptions.min_headroom:.0f}% headroom of {plan.assumptions.gpu_memory_gib:g} GiB."]
    if fixes:
        lines.append("Changes that fit:")
        lines += [f"  {t}: {p.peak.total / GiB:.1f} GiB ({100 * p.headroom:.0f}% headroom), "
                  f"{p.time['tokens_per_s_per_gpu']:.0f} tokens/s/GPU  [{p.layout.flags()}]" for t, p in fixes]
    else:
        lines.append("No single change fits; try --search.")
    return "\n".join(lines)


def _run_search(cfg: GrinConfig, lay: Layout, impl: Implementation, asm: Assumptions,
                args: argparse.Namespace, files: list[str]) -> int:
    if args.distributed_optimizer is None:  # explore with the distributed optimizer unless told otherwise
        lay = dataclasses.replace(lay, distributed_optimizer=True)
    plans = search(cfg, lay, impl, asm, top=args.top)
    if args.json:
        print(json.dumps({"configs": files, "layouts": [p.to_dict() for p in plans]}, indent=2))
    else:
        if files:
            print("configs: " + ", ".join(files))
        counts = parameter_summary(cfg)
        print(f"{lay.gpus} GPUs x {asm.gpu_memory_gib:g} GiB, global batch {lay.global_batch_size} x "
              f"{lay.seq_length}, {counts['total'] / 1e9:.1f}B parameters; fastest layouts with >= "
              f"{100 * asm.min_headroom:.0f}% headroom:")
        print(format_search(plans) if plans else "  none fits")
    return 0 if plans else 1


if __name__ == "__main__":
    sys.exit(main())
