"""The console script: each subcommand starts without megatron's "TE/Apex not installed" noise on stderr
(megatron warns while its modules import, so the filter must be in place before the lazy import)."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("command", [["convert", "to-hf", "--help"], ["pretrain", "--help"]])
def test_a_subcommand_imports_quietly(command):
    proc = subprocess.run([sys.executable, "-W", "default", "-m", "megatron_grin", *command], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "not installed" not in proc.stderr, proc.stderr[-2000:]
