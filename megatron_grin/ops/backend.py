"""Which implementation an op runs: its Triton kernel or its PyTorch reference.

Every op in this package takes ``backend`` = "auto" | "triton" | "torch":
  * "auto": the kernel for CUDA tensors when Triton is installed, else the reference;
  * "triton": the kernel, on CUDA or on CPU under the Triton interpreter (``TRITON_INTERPRET=1``, set before
    the kernel modules are imported: Triton reads it when each ``@triton.jit`` decorator runs);
  * "torch": the reference.
The model maps Megatron-LM's ``--moe-router-fusion`` / ``--moe-permute-fusion`` / ``--moe-grouped-gemm``
(None / True / False) onto these names (``fusion_backend``).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

try:  # Triton is optional: CPU installs use the torch references.
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    HAVE_TRITON = False

BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """Triton runs kernels with its CPU interpreter (tests, CPU wiring checks)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def have_triton_kernels(device: torch.device) -> bool:
    """Triton can run here: a CUDA device, or the CPU interpreter (TRITON_INTERPRET=1, for tests)."""
    return HAVE_TRITON and (device.type == "cuda" or interpreting())


def fusion_backend(switch: Optional[bool]) -> str:
    """Megatron-LM's fusion switch (None = default, True = forced on, False = off) -> a backend name."""
    return {None: "auto", True: "triton", False: "torch"}[switch]


def use_triton(tensor: torch.Tensor, backend: str, what: str) -> bool:
    """Resolve ``backend`` for an op on ``tensor``; a forced kernel that cannot run here is a clear error."""
    if backend == "auto":
        return tensor.is_cuda and HAVE_TRITON
    if backend == "triton":
        if not have_triton_kernels(tensor.device):
            raise ValueError(f"the triton {what} backend needs triton and a CUDA device (or TRITON_INTERPRET=1 on "
                             f"CPU); got a {tensor.device.type} tensor. Turn the fusion switch off or leave it unset.")
        return True
    if backend == "torch":
        return False
    raise ValueError(f"{what} backend {backend!r} is unknown; choose one of {BACKENDS}")
