"""The measurements the planner is calibrated against, and the error it states from them.

Files (``plan/measurements/*.json`` ship with the package; ``plan --bench-results FILE`` adds more) use
one schema, ``megatron-grin-calibration/1``::

    {"schema": "megatron-grin-calibration/1", "id": "...", "source": "where the numbers come from",
     "device": "NVIDIA H200" | "cpu",
     "runs": [                                   # whole training steps: memory and speed points
       {"id": "...", "command": "megatron-grin pretrain ...",
        "model": {"preset": "grin-16x3.8b", "overrides": {"num_layers": 2}},
        "layout": {plan Layout fields: gpus, tp, pp, vpp, micro_batch_size, global_batch_size, seq_length,
                   recompute, recompute_method, recompute_num_layers, distributed_optimizer, bf16},
        "implementation": {"attention": "unfused" | "flash" | "blockwise",
                           "expert_backend": "grouped_mm" | "sequential" | "te_grouped",
                           "optimizer": "torch" | "fused"},
        "measured": {"peak_allocated_gib": 73.9,     # torch.cuda.max_memory_allocated over the run
                     "peak_reserved_gib": null,      # torch.cuda.max_memory_reserved (optional)
                     "step_s": 0.64, "tokens_per_s": 51155,      # optional; medians after warm-up
                     "pp_rank": 0}},                 # optional: the rank measured (default: the peak)
     "benchmarks": [                             # per-part compute times (bench), for the time model
       {"kind": "moe-layer", "command": "...", "shape": {"hidden", "ffn", "experts", "topk", "tokens", "dtype"},
        "ms": {"dense": 23.4, "grouped_mm": 34.9, "sequential": 37.0}},
       {"kind": "model", "command": "...", "model": {GrinConfig fields}, "tokens": 16384, "seq_length": 4096,
        "attention": "unfused", "ms": {"grouped_mm": 489.5}}]}

A raw ``megatron-grin bench moe-layer|model --out-dir`` JSON is read too (its ``meta`` and rows), and so is
``benchmarks/gpu_check.sh``'s calibration.json (a list of pretrain runs: flags, peaks, tokens/s), so each
GPU run adds points; docs/planning.md shows predicted against measured for every point.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from megatron_grin.config import ConfigError, GrinConfig, preset
from megatron_grin.plan.layout import Implementation, Layout

SCHEMA = "megatron-grin-calibration/1"
SHIPPED = Path(__file__).resolve().parent / "measurements"
GiB = 2.0**30


@dataclass(frozen=True)
class Run:
    """One measured training layout."""

    id: str
    source: str
    device: str
    cfg: GrinConfig
    layout: Layout
    impl: Implementation
    measured: dict
    command: str = ""

    @property
    def on_gpu(self) -> bool:
        return self.device.lower() != "cpu"


@dataclass(frozen=True)
class Benchmark:
    """One ``megatron-grin bench`` result: per-implementation milliseconds at a shape."""

    kind: str
    device: str
    source: str
    ms: dict
    shape: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    tokens: int = 0
    seq_length: int = 0
    attention: str = "unfused"
    command: str = ""


@dataclass(frozen=True, eq=False)  # compared and cached by identity (load() returns one object per file set)
class Calibration:
    runs: tuple[Run, ...]
    benchmarks: tuple[Benchmark, ...]
    files: tuple[str, ...]

    def memory_runs(self, gpu: Optional[bool] = None) -> list[Run]:
        return [r for r in self.runs if r.measured.get("peak_allocated_gib") is not None
                and (gpu is None or r.on_gpu == gpu)]

    def speed_runs(self) -> list[Run]:
        return [r for r in self.runs if r.on_gpu and r.measured.get("tokens_per_s")]

    def benchmarks_for(self, kind: str) -> list[Benchmark]:
        return [b for b in self.benchmarks if b.kind == kind and b.device.lower() != "cpu"]


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def _fail(path: str, what: str) -> ConfigError:
    return ConfigError(f"--bench-results {path}: {what} (see the schema in docs/planning.md)")


def _model(spec: dict, path: str) -> GrinConfig:
    if "preset" in spec:
        return preset(spec["preset"], **spec.get("overrides", {}))
    try:
        return GrinConfig(**spec)
    except TypeError as err:
        raise _fail(path, f"bad model {spec}: {err}") from err


def _run(item: dict, data: dict, path: str) -> Run:
    try:
        lay = Layout(**item["layout"])
        impl = Implementation(**item.get("implementation", {}))
        return Run(item.get("id", "?"), data.get("source", path), item.get("device", data.get("device", "?")),
                   _model(item["model"], path), lay, impl, dict(item["measured"]), item.get("command", ""))
    except (KeyError, TypeError) as err:
        raise _fail(path, f"run {item.get('id', '?')} lacks or misnames {err}") from err


def _benchmark(item: dict, data: dict, path: str) -> Benchmark:
    fields = {f.name for f in dataclasses.fields(Benchmark)} - {"device", "source"}
    try:
        return Benchmark(device=item.get("device", data.get("device", "?")), source=data.get("source", path),
                         **{k: v for k, v in item.items() if k in fields})
    except TypeError as err:
        raise _fail(path, f"benchmark entry {item}: {err}") from err


def _from_bench_output(data: dict, path: str) -> dict:
    """A raw ``megatron-grin bench`` JSON as a calibration file."""
    meta, args = data["meta"], data["meta"].get("args", {})
    env = meta.get("environment", {})
    device = env.get("gpu", meta.get("device", "cpu"))
    entry: dict[str, Any] = {"kind": meta["kind"], "command": meta.get("command", ""), "ms": {}}
    for row in data["rows"]:
        name = row["name"]
        if name.startswith("dense"):
            entry["ms"]["dense"] = row["median_ms"]
        elif "(" in name and (name.startswith("GRIN MoE") or name.startswith("GRIN model")):
            entry["ms"][name[name.rindex("(") + 1:-1]] = row["median_ms"]
    if meta["kind"] == "moe-layer":
        entry["shape"] = {k: args[k] for k in ("hidden", "ffn", "experts", "topk", "tokens", "dtype") if k in args}
    elif meta["kind"] == "model":
        entry.update(model=data.get("model", {}), tokens=args.get("tokens", 0), seq_length=args.get("seq_length", 0),
                     attention=data.get("attention", "unfused"))
    return {"schema": SCHEMA, "source": path, "device": device, "runs": [], "benchmarks": [entry]}


_FLAG_FIELDS = {"grin_expert_backend": "expert_backend"}


def _from_gpu_check(records: list, path: str) -> dict:
    """benchmarks/gpu_check.sh's calibration.json (one record per pretrain run: the run's flags plus the
    trainer's tp / pp / vpp / dp and device) as a calibration file."""
    runs = []
    for i, rec in enumerate(records):
        flags = dict(rec.get("layout") or {})
        fields = set(GrinConfig.__dataclass_fields__) - {"extra", "bf16"}
        overrides = {_FLAG_FIELDS.get(k, k): v for k, v in flags.items() if _FLAG_FIELDS.get(k, k) in fields}
        tp, pp, dp = (int(flags.get(k) or 1) for k in ("tp", "pp", "dp"))
        attention = "unfused" if flags.get("attention_backend") in ("unfused", "local") else "flash"
        backend = overrides.get("expert_backend", "auto")
        runs.append({
            "id": f"{Path(path).parent.name}/{flags.get('run', i)}", "device": flags.get("device") or "?",
            "model": {"preset": flags.get("model_preset", "grin-16x3.8b"),
                      "overrides": {k: v for k, v in overrides.items() if k != "model_preset"}},
            "layout": {"gpus": tp * pp * dp, "tp": tp, "pp": pp, "vpp": int(flags.get("vpp") or 1),
                       "micro_batch_size": int(flags.get("micro_batch_size", 1)),
                       "global_batch_size": int(flags.get("global_batch_size", 1)),
                       "seq_length": int(flags.get("seq_length", 4096)),
                       "recompute": flags.get("recompute_granularity") or "none",
                       "distributed_optimizer": bool(flags.get("use_distributed_optimizer", False)),
                       "bf16": bool(flags.get("bf16", False))},
            "implementation": {"attention": attention,
                               "expert_backend": "grouped_mm" if backend == "auto" else backend},
            "measured": {k: rec.get(k) for k in ("peak_allocated_gib", "peak_reserved_gib", "tokens_per_s",
                                                 "step_s")}})
    return {"schema": SCHEMA, "source": path, "runs": runs, "benchmarks": []}


def read_file(path: str) -> tuple[list[Run], list[Benchmark]]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise _fail(path, f"cannot read: {err}") from err
    if isinstance(data, list):
        data = _from_gpu_check(data, path)
    if "meta" in data and "rows" in data:
        data = _from_bench_output(data, path)
    if data.get("schema") != SCHEMA:
        raise _fail(path, f"schema is {data.get('schema')!r}, expected {SCHEMA!r}")
    return ([_run(r, data, path) for r in data.get("runs", [])],
            [_benchmark(b, data, path) for b in data.get("benchmarks", [])])


def shipped_files() -> list[str]:
    return sorted(str(p) for p in SHIPPED.glob("*.json"))


@functools.lru_cache(maxsize=8)
def load(extra: tuple[str, ...] = ()) -> Calibration:
    """The shipped measurements plus ``extra`` files (later files' benchmarks take precedence)."""
    runs, benches = [], []
    files = tuple(shipped_files()) + tuple(extra)
    for path in files:
        r, b = read_file(path)
        runs += r
        benches += b
    return Calibration(tuple(runs), tuple(benches), files)


# ------------------------------------------------------------------------------------------------
# stated error
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Band:
    """Relative error of predictions against measurements: (predicted / measured - 1) over ``points``."""

    low: float
    high: float
    points: int
    what: str

    @property
    def width(self) -> float:
        return max(abs(self.low), abs(self.high))

    def describe(self) -> str:
        if not self.points:
            return f"uncalibrated: no measured {self.what}"
        return f"{100 * self.low:+.0f}/{100 * self.high:+.0f} % on {self.points} measured {self.what}"


def band(errors: Sequence[float], what: str) -> Band:
    errors = [e for e in errors if not math.isnan(e)]
    if not errors:
        return Band(0.0, 0.0, 0, what)
    return Band(min(errors), max(errors), len(errors), what)
