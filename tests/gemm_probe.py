"""Which GEMM kernels a computation reaches: the dtype of every aten GEMM call (a TorchDispatchMode).

On a CPU without a native bf16 GEMM (emulated by switching oneDNN off), a bf16 mm/bmm reaching aten is ATen's
slow reference kernel; ops/cpu_gemm.py and compat's ``bf16_gemm_in_fp32`` route those through fp32.
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
GEMMS = {_aten.mm.default, _aten.mm.out, _aten.addmm.default, _aten.addmm_.default, _aten.bmm.default,
         _aten.baddbmm.default}


class GemmDtypes(TorchDispatchMode):
    """Records the dtype of every GEMM that reaches aten."""

    def __init__(self):
        super().__init__()
        self.dtypes: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in GEMMS:
            self.dtypes.add(args[0].dtype)
        return func(*args, **(kwargs or {}))


def no_bf16_gemm_cpu():
    return torch.backends.mkldnn.flags(enabled=False)


def bf16(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()
