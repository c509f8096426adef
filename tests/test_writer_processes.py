"""megatron's checkpoint-writer processes die with their rank (ckpt_format.writer_process_init), also when the rank
dies in the window between starting a writer and the writer setting PR_SET_PDEATHSIG: a kill -9 right at the start
of a save (tests/training/test_checkpointing.py kills there) must not leave writers behind."""

import os
import subprocess
import sys
import time

from grin_testing import process_running

SCRIPT = r"""
import multiprocessing as mp, os, sys, time
from megatron_grin.ckpt_format import writer_process_init

def writer(ready, delay):
    time.sleep(delay)  # with a delay, the rank is gone before the writer sets its death signal
    writer_process_init()
    open(ready, "w").close()
    time.sleep(60)

if __name__ == "__main__":
    ready, delay, rank_lives = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1"
    p = mp.get_context("fork").Process(target=writer, args=(ready, delay))
    p.start()
    print(p.pid, flush=True)
    if rank_lives:
        time.sleep(60)
    os._exit(0)  # the rank dies, as under kill -9: no cleanup
"""


def _start(tmp_path, delay: float, rank_lives: bool):
    ready = str(tmp_path / "ready")
    rank = subprocess.Popen([sys.executable, "-c", SCRIPT, ready, str(delay), "1" if rank_lives else "0"],
                            stdout=subprocess.PIPE, text=True)
    return rank, int(rank.stdout.readline()), ready


def _wait(predicate, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_a_writer_whose_rank_died_before_it_started_exits(tmp_path):
    rank, writer, _ = _start(tmp_path, delay=1.0, rank_lives=False)
    rank.wait(timeout=30)
    try:
        assert _wait(lambda: not process_running(writer), timeout=15), "the orphaned writer kept running"
    finally:
        if process_running(writer):
            os.kill(writer, 9)


def test_a_writer_lives_while_its_rank_does_and_dies_with_it(tmp_path):
    rank, writer, ready = _start(tmp_path, delay=0.0, rank_lives=True)
    try:
        assert _wait(lambda: os.path.exists(ready), timeout=30)
        assert process_running(writer)
        rank.kill()  # kill -9 of the rank: the kernel's death signal takes the writer
        rank.wait(timeout=30)
        assert _wait(lambda: not process_running(writer), timeout=15)
    finally:
        for pid in (rank.pid, writer):
            if process_running(pid):
                os.kill(pid, 9)
