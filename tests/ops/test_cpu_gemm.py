"""bf16 GEMMs on CPUs without a native bf16 kernel run in fp32 and round once (ops/cpu_gemm.py).

Such a CPU is emulated by disabling oneDNN (``torch.backends.mkldnn.flags(enabled=False)``): torch then takes
the same path as on a CPU without AVX512-BW/VL/DQ or AMX, ATen's scalar reference GEMM. Which GEMM kernel ran is
read from the aten calls' dtypes (a TorchDispatchMode), not from timings: a bf16 mm/bmm reaching aten there
is the slow kernel. The references are fp32 products rounded to bf16 once, computed here independently.
"""

import torch
from gemm_probe import GemmDtypes, bf16, no_bf16_gemm_cpu
from megatron_grin.ops import cpu_gemm

def test_predicate():
    x = torch.ones(2, 2)
    with no_bf16_gemm_cpu():
        assert cpu_gemm.reference_gemm(x.bfloat16()) and not cpu_gemm.reference_gemm(x)
    assert cpu_gemm.reference_gemm(x.bfloat16()) == (not cpu_gemm._cpu_has_bf16_gemm())


def test_ops_compute_in_fp32_and_round_once():
    a, b, c = bf16(5, 7, seed=1), bf16(7, 3, seed=2), bf16(5, 3, seed=3)
    want = (a.float() @ b.float()).bfloat16()
    with no_bf16_gemm_cpu(), GemmDtypes() as seen:
        out = cpu_gemm.mm_into(a, b, torch.empty(5, 3, dtype=torch.bfloat16))
        acc = cpu_gemm.addmm_into(c.clone(), a, b)
    assert seen.dtypes == {torch.float32}
    assert torch.equal(out, want)
    assert torch.equal(acc, torch.addmm(c.float(), a.float(), b.float()).bfloat16())
    with GemmDtypes() as seen:  # a CPU with the kernel (or, without one, the same fp32 route)
        cpu_gemm.mm_into(a, b, torch.empty(5, 3, dtype=torch.bfloat16))
    assert seen.dtypes == ({torch.bfloat16} if cpu_gemm.native_bf16_gemm() else {torch.float32})


def test_bmm_wrapper_is_differentiable():
    bmm = cpu_gemm.in_fp32(torch.bmm)
    x, y = bf16(2, 4, 6, seed=4).requires_grad_(), bf16(2, 6, 3, seed=5).requires_grad_()
    g = bf16(2, 4, 3, seed=6)
    with no_bf16_gemm_cpu(), GemmDtypes() as seen:
        out = bmm(x, y)
        out.backward(g)
    assert seen.dtypes == {torch.float32}
    assert out.dtype == x.grad.dtype == y.grad.dtype == torch.bfloat16
    assert torch.equal(out, (x.float() @ y.float()).bfloat16())
    assert torch.equal(x.grad, (g.float() @ y.float().transpose(1, 2)).bfloat16())
