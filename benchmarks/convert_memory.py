"""Peak memory and time of `megatron-grin convert` in both directions, for a model well above 1 GB.

    python benchmarks/convert_memory.py                      # 8 layers, hidden 1024, 16 experts, ffn 1600
    python benchmarks/convert_memory.py --dtype fp32 --work /scratch/bench --keep

Steps, each in its own process so that its peak RSS (``ru_maxrss`` from ``wait4``) is its own:
  1. write a random HF PhimoeForCausalLM directory tensor by tensor (never the whole model in memory);
  2. ``baseline``: import everything and build the meta model, convert nothing (the fixed cost);
  3. ``from-hf`` into a TP2 x PP2 checkpoint; 4. ``to-hf`` back; 5. check every tensor round-tripped.
The streaming claim is: peak RSS - baseline ~ a small multiple of one layer, not the model size.
Results go to benchmarks/convert_memory_results.json (and a markdown table on stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
BASELINE = """
import sys
from megatron_grin.convert import cli as convert
from megatron_grin.convert import hf_io
from megatron_grin.convert import verify  # noqa: F401  (everything a conversion imports)
from megatron_grin.convert.mcore_io import build_tp1_model, single_process_megatron
import transformers  # noqa: F401
cfg = hf_io.grin_config_from_hf(hf_io.read_config(sys.argv[1]))
with single_process_megatron():
    build_tp1_model(cfg)
"""


def run(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of a child process."""
    start = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return time.time() - start, usage.ru_maxrss / 1024


def write_random_hf(path: str, cfg, dtype: torch.dtype) -> int:
    """A random HF Phimoe directory written one tensor at a time; returns its size in bytes."""
    from megatron_grin.convert import hf_io
    from megatron_grin.convert.hf_keys import hf_keys
    from megatron_grin.convert.safetensors_writer import ShardedSafetensorsWriter, plan_shards

    shapes = hf_io.hf_tensor_shapes(cfg)
    order = list(hf_keys(cfg))
    plan = plan_shards([(k, shapes[k], dtype) for k in order], 2 * 10**9)
    g = torch.Generator().manual_seed(0)
    with ShardedSafetensorsWriter(path, plan) as writer:
        for name in order:
            t = torch.randn(shapes[name], generator=g) * (0.02 if len(shapes[name]) == 2 else 0.1)
            if "norm.weight" in name:
                t += 1.0
            writer.write(name, t.to(dtype))
    hf_io.write_json(os.path.join(path, "config.json"), hf_io.hf_config_from_grin(cfg, dtype, 1, 2))
    return sum(e.nbytes for shard in plan for e in shard)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--ffn", type=int, default=1600)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--work", default="/tmp/grin-convert-bench")
    parser.add_argument("--keep", action="store_true", help="keep the generated directories")
    parser.add_argument("--out", default=os.path.join(HERE, "convert_memory_results.json"))
    args = parser.parse_args()

    from megatron_grin.config import GrinConfig

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = GrinConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                     num_attention_heads=args.hidden // 64, num_query_groups=max(2, args.hidden // 256),
                     num_experts=args.experts, bf16=dtype == torch.bfloat16)
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    hf_dir, ckpt, back = (os.path.join(args.work, n) for n in ("hf", "ckpt", "hf-back"))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONWARNINGS": "ignore"}

    t = time.time()
    total = write_random_hf(hf_dir, cfg, dtype)
    element = torch.empty((), dtype=dtype).element_size()
    layer = (total - element * (2 * cfg.vocab_size * cfg.hidden_size + cfg.vocab_size + 2 * cfg.hidden_size)) \
        // cfg.num_layers
    print(f"model: {total / 2**30:.2f} GiB {args.dtype}, one layer {layer / 2**20:.0f} MiB "
          f"(generated in {time.time() - t:.0f}s)", file=sys.stderr)

    py = sys.executable
    steps = {
        "baseline (imports + meta model)": [py, "-c", BASELINE, hf_dir],
        "from-hf (TP2 x PP2 checkpoint)": [py, "-m", "megatron_grin.convert.cli", "from-hf", "--hf", hf_dir,
                                           "--save", ckpt, "--tensor-model-parallel-size", "2",
                                           "--pipeline-model-parallel-size", "2"],
        "to-hf": [py, "-m", "megatron_grin.convert.cli", "to-hf", "--load", ckpt, "--out", back],
    }
    results = {}
    for name, cmd in steps.items():
        seconds, rss = run(cmd, env)
        results[name] = {"seconds": round(seconds, 1), "peak_rss_mib": round(rss)}
        print(f"{name}: {seconds:.1f}s, peak RSS {rss:.0f} MiB", file=sys.stderr)

    # the round trip is exact (reads both directories tensor by tensor)
    from megatron_grin.convert.hf_io import HFWeights

    a, b = HFWeights(hf_dir, cfg), HFWeights(back, cfg)
    exact = all(torch.equal(a[k], b[k]) for k in a.keys())
    base = results["baseline (imports + meta model)"]["peak_rss_mib"]
    report = {
        "model": {"layers": cfg.num_layers, "hidden": cfg.hidden_size, "experts": cfg.num_experts,
                  "ffn": cfg.ffn_hidden_size, "vocab": cfg.vocab_size, "dtype": args.dtype,
                  "size_mib": round(total / 2**20), "layer_mib": round(layer / 2**20)},
        "steps": results,
        "above_baseline_mib": {k: v["peak_rss_mib"] - base for k, v in results.items()},
        "roundtrip_exact": exact,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "OMP_NUM_THREADS": env["OMP_NUM_THREADS"]},
        "date": time.strftime("%Y-%m-%d"),
    }
    existing = {}
    if os.path.isfile(args.out):
        with open(args.out, encoding="utf-8") as f:
            existing = json.load(f)
    existing[f"{args.layers}x{args.hidden}x{args.experts}x{args.ffn}-{args.dtype}"] = report
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(existing, f, indent=2)
        f.write("\n")
    print(f"\nModel {total / 2**30:.2f} GiB ({args.dtype}); one layer {layer / 2**20:.0f} MiB; "
          f"round trip exact: {exact}\n")
    print("| step | time (s) | peak RSS (MiB) | above baseline (MiB) |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['seconds']} | {r['peak_rss_mib']} | {r['peak_rss_mib'] - base} |")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
