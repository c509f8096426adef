"""Benchmark the expert GEMMs at GRIN shapes: dense torch.mm vs torch._grouped_mm vs the Triton kernels.

    python benchmarks/bench_grouped_gemm.py          # CUDA, GRIN: 16384 tokens x top-2, H 4096, F 6400, 16 experts
    python benchmarks/bench_grouped_gemm.py --reps 50 --routing uniform,skewed
    python benchmarks/bench_grouped_gemm.py --smoke  # tiny shapes; on CPU under the Triton interpreter (no perf!)

For each routing (per-expert row counts) and each of the six GEMMs of a SwiGLU expert MLP (fc1 / fc2 x
forward, dgrad, wgrad, plus wgrad accumulated into an fp32 main_grad), it prints the median time of:
  dense    one torch.mm with the same FLOPs (all N rows against one expert's weight): the roofline to beat;
  torch    torch._grouped_mm (cuBLAS/CUTLASS grouped GEMM; wgrad-acc = its bf16 wgrad, then main_grad += it);
  triton   megatron_grin.ops.grouped_gemm's triton_grouped_mm / triton_grouped_wgrad (autotuned; tuning happens
           in the warmup),
with each grouped time as a ratio to dense and in TFLOP/s. Times are CUDA-event medians over --reps after
--warmup calls; weights (210 MB for fc1 in bf16) exceed L2, so no explicit cache flush is done.
Before timing, --check (default on) compares the Triton results with the torch loop reference (fp32 accumulation).
The "triton/torch" column is what decides ``grin_grouped_gemm`` (ops/grouped_mlp.py: torch's grouped_mm is the
default on sm90+ bf16 until a run shows the Triton kernels faster); docs/performance.md records the results.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=6400)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--routing", default="uniform,skewed,ragged",
                   help="comma list: uniform (equal counts), skewed (geometric ramp, max ~2.5x mean), "
                        "ragged (2 empty experts, odd counts)")
    p.add_argument("--gemms", default="fc1.fwd,fc1.dgrad,fc1.wgrad,fc1.wgrad_acc,fc2.fwd,fc2.dgrad,fc2.wgrad,fc2.wgrad_acc")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-check", dest="check", action="store_false")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 1 rep (CPU: Triton interpreter; not a benchmark)")
    args = p.parse_args(argv)
    if args.smoke:
        args.tokens, args.hidden, args.ffn, args.experts, args.reps, args.warmup = 48, 64, 32, 4, 1, 1
    return args


def routing_counts(kind: str, rows: int, experts: int):
    """Per-expert row counts summing to ``rows`` (deterministic)."""
    import torch

    if kind == "uniform":
        weights = torch.ones(experts)
    elif kind == "skewed":  # geometric ramp 1..9, shuffled: max/mean ~ 2.5, min/mean ~ 0.27
        weights = 9.0 ** (torch.arange(experts) / max(experts - 1, 1))
        weights = weights[torch.randperm(experts, generator=torch.Generator().manual_seed(0))]
    elif kind == "ragged":  # two empty experts, the rest jittered so no count is a multiple of a block
        weights = 1 + 0.3 * torch.rand(experts, generator=torch.Generator().manual_seed(1))
        weights[: min(2, experts - 1)] = 0
    else:
        raise SystemExit(f"unknown routing {kind!r}")
    counts = (weights / weights.sum() * rows).floor().long()
    counts[int(weights.argmax())] += rows - int(counts.sum())
    return counts


class Timer:
    def __init__(self, device, warmup, reps):
        self.device, self.warmup, self.reps = device, warmup, reps

    def __call__(self, fn) -> float:
        import torch

        for _ in range(self.warmup):
            fn()
        if self.device.type != "cuda":
            times = []
            for _ in range(self.reps):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
            return statistics.median(times)
        torch.cuda.synchronize()
        events = []
        for _ in range(self.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.smoke:
            print("no CUDA device: run with --smoke for a functional check (no performance numbers on CPU)")
            return 1
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before grouped_gemm's kernels are defined
    from megatron_grin.ops import grouped_gemm as gg

    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16
    E, H, F = args.experts, args.hidden, args.ffn
    N = args.tokens * args.topk
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)

    fc1 = randn(E, 2 * F, H, scale=H ** -0.5)  # [E, 2F, H]: y = x @ fc1[e].T
    fc2 = randn(E, H, F, scale=F ** -0.5)  # [E, H, F]
    x = randn(N, H)
    a = randn(N, F)
    dy1 = randn(N, 2 * F)
    dy2 = randn(N, H)
    main1 = torch.zeros(E, 2 * F, H, device=device, dtype=torch.float32)
    main2 = torch.zeros(E, H, F, device=device, dtype=torch.float32)
    grouped = getattr(torch, "_grouped_mm", None)
    timer = Timer(device, args.warmup, args.reps)
    name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter: NOT a performance measurement)"
    print(f"device {name}; torch {torch.__version__}; N {N} rows ({args.tokens} tokens x top-{args.topk}), "
          f"H {H}, F {F}, {E} experts, bf16; median of {args.reps} after {args.warmup} warmup")

    # (inputs, dense call, torch grouped call, triton call, flops) per GEMM; W is expert 0's weight
    def gemms(offs):
        w1, w2 = fc1[0], fc2[0]
        table = {
            "fc1.fwd": (lambda: torch.mm(x, w1.t()),
                        lambda: grouped(x, fc1.transpose(-2, -1), offs=offs),
                        lambda: gg.triton_grouped_mm(x, fc1, offs, trans_w=True), 2 * N * H * 2 * F),
            "fc1.dgrad": (lambda: torch.mm(dy1, w1),
                          lambda: grouped(dy1, fc1, offs=offs),
                          lambda: gg.triton_grouped_mm(dy1, fc1, offs, trans_w=False), 2 * N * H * 2 * F),
            "fc1.wgrad": (lambda: torch.mm(dy1.t(), x),
                          lambda: grouped(dy1.t(), x, offs=offs),
                          lambda: gg.triton_grouped_wgrad(dy1, x, offs), 2 * N * H * 2 * F),
            "fc1.wgrad_acc": (lambda: main1[0].add_(torch.mm(dy1.t(), x)),
                              lambda: main1.add_(grouped(dy1.t(), x, offs=offs)),
                              lambda: gg.triton_grouped_wgrad(dy1, x, offs, out=main1, accumulate=True), 2 * N * H * 2 * F),
            "fc2.fwd": (lambda: torch.mm(a, w2.t()),
                        lambda: grouped(a, fc2.transpose(-2, -1), offs=offs),
                        lambda: gg.triton_grouped_mm(a, fc2, offs, trans_w=True), 2 * N * F * H),
            "fc2.dgrad": (lambda: torch.mm(dy2, w2),
                          lambda: grouped(dy2, fc2, offs=offs),
                          lambda: gg.triton_grouped_mm(dy2, fc2, offs, trans_w=False), 2 * N * F * H),
            "fc2.wgrad": (lambda: torch.mm(dy2.t(), a),
                          lambda: grouped(dy2.t(), a, offs=offs),
                          lambda: gg.triton_grouped_wgrad(dy2, a, offs), 2 * N * F * H),
            "fc2.wgrad_acc": (lambda: main2[0].add_(torch.mm(dy2.t(), a)),
                              lambda: main2.add_(grouped(dy2.t(), a, offs=offs)),
                              lambda: gg.triton_grouped_wgrad(dy2, a, offs, out=main2, accumulate=True), 2 * N * F * H),
        }
        return {k: table[k] for k in args.gemms.split(",")}

    def refs(offs):
        """Reference results for --check: torch._grouped_mm where it runs, else the torch loop (fp32 accumulation)."""
        return {
            "fc1.fwd": lambda: gg.torch_grouped_mm(x, fc1, offs, True),
            "fc1.dgrad": lambda: gg.torch_grouped_mm(dy1, fc1, offs, False),
            "fc1.wgrad": lambda: gg.torch_grouped_wgrad(dy1, x, offs),
            "fc2.fwd": lambda: gg.torch_grouped_mm(a, fc2, offs, True),
            "fc2.dgrad": lambda: gg.torch_grouped_mm(dy2, fc2, offs, False),
            "fc2.wgrad": lambda: gg.torch_grouped_wgrad(dy2, a, offs),
        }

    header = f"{'routing':8} {'gemm':14} {'dense ms':>9} {'torch ms':>9} {'x dense':>8} {'triton ms':>10} {'x dense':>8} " \
             f"{'triton/torch':>12} {'TF/s dense':>10} {'TF/s torch':>10} {'TF/s triton':>11}"
    for kind in args.routing.split(","):
        counts = routing_counts(kind, N, E)
        offs = counts.cumsum(0).to(device=device, dtype=torch.int32)
        print(f"\nrouting {kind}: rows per expert {counts.tolist()}")
        if args.check:
            for gemm, ref_fn in refs(offs).items():
                if gemm not in args.gemms.split(","):
                    continue
                got = gemms(offs)[gemm][2]().float()
                ref = ref_fn().float()
                rel = ((got - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()
                print(f"  check {gemm:10} triton vs torch loop: max |diff| / max |ref| = {rel:.2e}"
                      f"{'' if rel < 2e-2 else '   <-- MISMATCH'}")
        print(header)
        for gemm, (dense_fn, torch_fn, triton_fn, flops) in gemms(offs).items():
            row = {}
            for label, fn in (("dense", dense_fn), ("torch", torch_fn), ("triton", triton_fn)):
                if label == "torch" and grouped is None:
                    row[label] = None
                    continue
                try:
                    row[label] = timer(fn)
                except Exception as err:  # noqa: BLE001 - report and keep going (e.g. a layout torch refuses)
                    print(f"  {gemm} {label}: {type(err).__name__}: {str(err).splitlines()[0][:150]}")
                    row[label] = None
            d, t, k = row["dense"], row["torch"], row["triton"]

            def ms(v):
                return f"{v:.3f}" if v is not None else "n/a"

            def ratio(v, base):
                return f"{v / base:.3f}" if v is not None and base else "n/a"

            def tflops(v, flops=flops):
                return f"{flops / v / 1e9:.0f}" if v else "n/a"

            print(f"{kind:8} {gemm:14} {ms(d):>9} {ms(t):>9} {ratio(t, d):>8} {ms(k):>10} {ratio(k, d):>8} "
                  f"{ratio(k, t):>12} {tflops(d):>10} {tflops(t):>10} {tflops(k):>11}")
    if cuda and hasattr(gg, "_grouped_mm_tuned"):
        for label, tuned in (("grouped_mm", gg._grouped_mm_tuned), ("wgrad", gg._grouped_wgrad_tuned),
                             ("wgrad acc", gg._grouped_wgrad_accum_tuned)):
            print(f"autotuned {label}: " + "; ".join(f"{key[:2]} -> {cfg}" for key, cfg in tuned.cache.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
