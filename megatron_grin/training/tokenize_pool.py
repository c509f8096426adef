"""Tokenizing documents for ``megatron-grin preprocess``, in this process or a pool of spawned workers.

A module of its own so that each spawned worker imports only this and the tokenizer, not megatron-core (which
preprocess.py needs for writing the dataset): a worker then starts in well under a second.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Iterable, Iterator

import numpy

from megatron_grin.training.tokenizer import Tokenizer, build_tokenizer


def _encode(tokenizer: Tokenizer, text: str, append_eod: bool) -> numpy.ndarray:
    """Token ids of one document as int64, with the end-of-document id appended if asked."""
    if hasattr(tokenizer, "encode_array"):
        ids = tokenizer.encode_array(text).astype(numpy.int64)
    else:
        ids = numpy.asarray(tokenizer.encode(text), dtype=numpy.int64)
    if append_eod and ids.size:
        ids = numpy.append(ids, tokenizer.eod)
    return ids


_WORKER_STATE: dict = {}  # per worker process only: the tokenizer rebuilt from its spec


def _worker_init(spec: str, append_eod: bool) -> None:
    _WORKER_STATE["tokenizer"] = build_tokenizer(spec)
    _WORKER_STATE["append_eod"] = append_eod


def _worker_encode(text: str) -> numpy.ndarray:
    return _encode(_WORKER_STATE["tokenizer"], text, _WORKER_STATE["append_eod"])


def tokenized(
    texts: Iterable[str], tokenizer: Tokenizer, append_eod: bool, workers: int
) -> Iterator[numpy.ndarray]:
    """Tokenize in order; with workers > 1, spawned processes rebuild the tokenizer from its spec (at most one per
    CPU: more only add start-up time)."""
    workers = min(workers, os.cpu_count() or 1)
    if workers == 1:
        for text in texts:
            yield _encode(tokenizer, text, append_eod)
        return
    ctx = multiprocessing.get_context("spawn")  # fork after torch/threads is not safe
    with ctx.Pool(workers, initializer=_worker_init, initargs=(tokenizer.spec, append_eod)) as pool:
        yield from pool.imap(_worker_encode, texts, chunksize=16)
