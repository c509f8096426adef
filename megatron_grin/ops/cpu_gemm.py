"""bf16 GEMMs on CPUs without a native bf16 kernel: computed in fp32 and rounded once, as a native one would.

torch runs a CPU bf16 matmul (mm, addmm, bmm, baddbmm) with oneDNN only where the CPU has bf16 GEMM support
(``torch.ops.mkldnn._is_mkldnn_bf16_supported()``: AVX512-BW/VL/DQ or AMX-BF16 on x86, the BF16 extension on
Arm) and oneDNN is enabled. Elsewhere it falls to ATen's scalar reference GEMM, measured 15-70x slower than
the fp32 GEMM of the same shape: a 2-layer model with a 32k vocabulary ran a bf16 step ~10x slower than fp32,
85 % of it in the output layer's three GEMMs. Casting the operands to fp32, multiplying with the fp32 GEMM and
rounding the product to bf16 once is what a native bf16 GEMM computes (exact products, fp32 accumulation, one
rounding), at fp32 speed plus the casts. fp32, GPUs and CPUs with the kernel take the plain path.

The experts' CPU loop (ops/grouped_mlp.py) calls :func:`mm_into` / :func:`addmm_into`; megatron's linear
layers and unfused attention are routed here by compat's ``bf16_gemm_in_fp32`` accommodation.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch


@functools.cache
def _cpu_has_bf16_gemm() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return True if check is None else bool(check())  # an unknown torch: assume native, change nothing


def native_bf16_gemm() -> bool:
    """Whether this CPU runs bf16 GEMMs with oneDNN (else: ATen's reference kernel)."""
    return bool(torch.backends.mkldnn.enabled) and _cpu_has_bf16_gemm()


def reference_gemm(t: torch.Tensor) -> bool:
    """True when a GEMM on ``t`` would hit the slow kernel (a CPU bf16 tensor without a native bf16 GEMM)."""
    return t.dtype == torch.bfloat16 and t.device.type == "cpu" and not native_bf16_gemm()


def in_fp32(fn: Callable) -> Callable:
    """``fn(input, *tensors, **kw)`` (torch.bmm, torch.baddbmm, ...) computed in fp32 where bf16 is slow.

    Differentiable: autograd runs the backward GEMMs in fp32 too and casts the gradients back to bf16.
    """

    @functools.wraps(fn)
    def wrapped(input, *args, **kwargs):
        if kwargs.get("out") is not None or not torch.is_tensor(input) or not reference_gemm(input):
            return fn(input, *args, **kwargs)
        args = [a.float() if torch.is_tensor(a) else a for a in args]
        return fn(input.float(), *args, **kwargs).to(input.dtype)

    return wrapped


def mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``torch.mm(a, b, out=out)``, through fp32 where bf16 is slow."""
    if reference_gemm(out):
        return out.copy_(torch.mm(a.float(), b.float()))
    return torch.mm(a, b, out=out)


def addmm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out.addmm_(a, b)``, through fp32 where bf16 is slow."""
    if reference_gemm(out):
        return out.copy_(torch.addmm(out.float(), a.float(), b.float()))
    return out.addmm_(a, b)
