"""The SwiGLU, grouped-GEMM and input-jitter kernels compile for sm90 (no GPU needed: Triton's compiler and
ptxas run on CPU). The interpreter does not type-check like the compiler, so this catches what it cannot;
the GEMMs must use Hopper's tensor-core MMA (wgmma) with pipelined async loads and fit in shared memory.
(The routing and permute kernels: tests/ops/test_routing.py.)"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SCRIPT = r"""
import inspect, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from megatron_grin.ops import grouped_gemm as gg, jitter as jt, swiglu as sw

def build(fn, sig, consts, div, warps, stages, **options):
    names = list(inspect.signature(fn.fn).parameters)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages, **options))
    ptx = k.asm["ptx"]
    return k.metadata.shared, ptx.count("wgmma.mma_async"), ptx.count("cp.async"), ptx.count("fma.rn.f32")

i32, ce = "i32", "constexpr"
mm = dict(a_ptr="*bf16", b_ptr="*bf16", c_ptr="*bf16", offs_ptr="*i32", N=i32, E=i32, OUT=i32, IN=i32, stride_am=i32,
          stride_ak=ce, stride_be=i32, stride_bk=ce, stride_bn=i32, stride_cm=i32, stride_cn=ce)
mm_c = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, EVEN_K=True, PRECISION="ieee", DOT_FP32=False,
            stride_ak=1, stride_bk=1, stride_cn=1)
div = ["a_ptr", "b_ptr", "c_ptr", "offs_ptr", "OUT", "IN", "stride_am", "stride_be", "stride_bn", "stride_cm"]
out = {"fwd": build(gg._grouped_mm_kernel, mm, mm_c, div, 8, 3)}
dg = dict(mm, stride_bk=i32, stride_bn=ce)
dg_c = dict(mm_c, EVEN_K=False, stride_bn=1)
dg_c.pop("stride_bk")
out["dgrad"] = build(gg._grouped_mm_kernel, dg, dg_c, [d for d in div if d != "stride_bn"] + ["stride_bk"], 8, 4)
wg = dict(a_ptr="*bf16", b_ptr="*bf16", c_ptr="*fp32", offs_ptr="*i32", P=i32, Q=i32, stride_an=i32, stride_ap=ce,
          stride_bn=i32, stride_bq=ce, stride_ce=i32, stride_cp=i32, stride_cq=ce)
for acc in (True, False):
    wg_c = dict(ACCUMULATE=acc, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, PRECISION="ieee", DOT_FP32=False,
                stride_ap=1, stride_bq=1, stride_cq=1)
    sig = wg if acc else dict(wg, c_ptr="*bf16")
    out[f"wgrad acc={acc}"] = build(gg._grouped_wgrad_kernel, sig, wg_c, ["a_ptr", "b_ptr", "c_ptr", "P", "Q",
                                    "stride_an", "stride_bn", "stride_ce", "stride_cp"], 8, 3)
sf = dict(x_ptr="*bf16", probs_ptr="*fp32", out_ptr="*bf16", N=i32, FF=i32, stride_x=i32, stride_out=i32)
out["swiglu fwd"] = build(sw._weighted_swiglu_fwd_kernel, sf, dict(BLOCK_R=4, BLOCK_F=1024), ["x_ptr", "out_ptr"], 4, 1)
sb = dict(grad_ptr="*bf16", x_ptr="*bf16", probs_ptr="*fp32", grad_x_ptr="*bf16", grad_probs_ptr="*fp32", N=i32,
          FF=i32, stride_grad=i32, stride_x=i32, stride_grad_x=i32)
out["swiglu bwd"] = build(sw._weighted_swiglu_bwd_kernel, sb, dict(BLOCK_R=4, BLOCK_F=1024), ["x_ptr", "grad_ptr"], 4, 1)
js = dict(src_ptr="*bf16", token_ids_ptr="*i64", dst_ptr="*bf16", T=i32, H=i32, stride_src=i32, stride_dst=i32,
          philox_key="i64", c2=i32, c3=i32, scale="fp32")
out["jitter"] = build(jt._jitter_kernel, js, dict(BLOCK_T=16, BLOCK_G=16), ["src_ptr", "dst_ptr"], 4, 1,
                      enable_fp_fusion=False)
print(repr(out))
"""


def test_kernels_compile_for_hopper():
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode and "ptxas" in proc.stderr.lower():
        pytest.skip(f"no CUDA toolchain: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = eval(proc.stdout.strip().splitlines()[-1])  # noqa: S307 - our own child's repr of ints
    for name in ("fwd", "dgrad", "wgrad acc=True", "wgrad acc=False"):
        shared, wgmma, cp_async, _ = built[name]
        assert wgmma > 0 and cp_async > 0, (name, built[name])  # tensor-core MMA, pipelined async loads
        assert shared <= 228 * 1024, (name, shared)
    assert built["jitter"][3] == 0, built["jitter"]  # no FMA contraction: bit-equal to the torch reference
    assert set(built) >= {"swiglu fwd", "swiglu bwd", "jitter"}
