"""The GPU tier (``pytest -m gpu``): every test here is marked ``gpu`` and skipped without CUDA.

``GRIN_GPU_TIER_DEVICE=cpu`` runs the tier's code on the CPU at small shapes (with ``TRITON_INTERPRET=1``
for the kernel tests): a dry run that checks the tests themselves before GPU time is spent on them. It
proves nothing about the GPU.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_testing import tier_device

_HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    device = tier_device()
    for item in items:
        if not str(item.fspath).startswith(_HERE):
            continue
        item.add_marker(pytest.mark.gpu)
        if device is None:
            item.add_marker(pytest.mark.skip(reason="needs CUDA (GRIN_GPU_TIER_DEVICE=cpu dry-runs it on the CPU)"))


@pytest.fixture(scope="session")
def device():
    return tier_device()
