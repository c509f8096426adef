"""Run Triton kernels on CPU in the test suite: a spawned worker whose triton uses the interpreter.

TRITON_INTERPRET must be set before triton is first imported, and megatron imports triton: in the pytest
process it is already imported in compiled mode, so the kernels run in a fresh process.
"""

from __future__ import annotations

import os

from grin_testing import run_distributed


def in_interpreter(fn, *args):
    """fn(*args) in a spawned process with TRITON_INTERPRET=1; returns its (picklable) result."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # inherited by the spawned worker only
    try:
        return run_distributed(_call, 1, fn, args)[0]
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = old


def _call(rank, world, port, fn, args):
    from triton.runtime.interpreter import InterpretedFunction

    from megatron_grin.ops import routing

    if not isinstance(routing._sparsemixer_fwd_kernel, InterpretedFunction):
        raise RuntimeError("the worker's triton is not in interpreter mode")
    return fn(*args)
