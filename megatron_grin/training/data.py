"""Training data: GPT datasets, resumable batches (--data-path checks: data_files.py; preprocessing: preprocess.py).

    megatron-grin preprocess --input corpus.jsonl --output-prefix data/corpus --tokenizer byte
    train, valid, test = build_datasets(["data/corpus"], "98,2,0", 512, 1234, 1000, 20, 0, tok)
    it = make_data_iterator(train, micro_batch_size=4, consumed_samples=0, dp_rank=0, dp_size=1)
    batch = get_batch(it)   # tokens, labels, loss_mask, attention_mask, position_ids

The on-disk format is megatron-core's own (``<prefix>.bin`` / ``<prefix>.idx``), so datasets made
by Megatron-LM's tools/preprocess_data.py work here and vice versa. See docs/data.md.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import logging
import operator
import os
import shutil
import subprocess
import tempfile
from typing import Callable, Iterator, Sequence

import megatron.core.datasets as mcd
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from megatron_grin import compat
from megatron_grin.training.data_files import check_splits, default_cache_root, parse_data_path, read_idx_info
from megatron_grin.training.tokenizer import MegatronTokenizerAdapter, Tokenizer

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Dataset building
# ---------------------------------------------------------------------------------------------


def ensure_helpers() -> None:
    """Make sure megatron's C++ dataset helpers (sample/blending index builders) are importable.

    megatron-core wheels ship them prebuilt (checked on 0.16.1); a source checkout needs a one-time
    `make`, done here under a file lock so that concurrent ranks compile once.
    """

    try:
        importlib.import_module("megatron.core.datasets.helpers_cpp")
        return
    except ImportError:
        pass

    src_dir = os.path.dirname(os.path.abspath(mcd.__file__))
    if not os.path.isfile(os.path.join(src_dir, "Makefile")):
        raise RuntimeError(
            f"megatron.core.datasets.helpers_cpp is missing and {src_dir} has no Makefile to build it; "
            "reinstall megatron-core from its wheel (pip install --force-reinstall megatron-core)"
        )
    if shutil.which("make") is None or (shutil.which("c++") or shutil.which("g++")) is None:
        raise RuntimeError(
            f"megatron.core.datasets.helpers_cpp must be compiled from {src_dir}/helpers.cpp but make or "
            "a C++ compiler is missing: install build tools (apt-get install build-essential) and "
            "pybind11 (pip install pybind11), or install the megatron-core wheel, which ships it prebuilt"
        )
    lock_name = f"megatron_helpers_{hashlib.md5(src_dir.encode()).hexdigest()}.lock"
    lock_path = os.path.join(tempfile.gettempdir(), lock_name)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        importlib.invalidate_caches()
        try:
            importlib.import_module("megatron.core.datasets.helpers_cpp")  # built by another rank
            return
        except ImportError:
            result = subprocess.run(["make", "-C", src_dir], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling megatron's dataset helpers in {src_dir} failed:\n{result.stderr[-2000:]}")
        importlib.invalidate_caches()
        importlib.import_module("megatron.core.datasets.helpers_cpp")


def _data_fingerprint(prefixes: Sequence[str]) -> str:
    """Content fingerprint of the datasets, so re-preprocessing a prefix never reuses stale indices.

    megatron keys its index cache by path and sizes, not content; hashing the .idx (head and tail)
    and both file sizes is cheap and identical on every node that sees the same bytes.
    """
    h = hashlib.sha256()
    for prefix in prefixes:
        idx_path = prefix + ".idx"
        size = os.path.getsize(idx_path)
        h.update(f"{os.path.abspath(prefix)}|{size}|{os.path.getsize(prefix + '.bin')}|".encode())
        with open(idx_path, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _sample_counts(seq_length: int, *counts: int) -> list[int]:
    if seq_length < 1:
        raise ValueError(f"--seq-length must be >= 1, got {seq_length}")
    try:
        sizes = [operator.index(n) for n in counts]
    except TypeError:
        sizes = [-1]
    if min(sizes) < 0:
        raise ValueError(f"train/valid/test sample counts must be non-negative ints, got {counts}")
    return sizes


def build_datasets(
    data_path: Sequence[str] | str | None,
    split: str,
    seq_length: int,
    seed: int,
    train_samples: int,
    valid_samples: int,
    test_samples: int,
    tokenizer: Tokenizer | MegatronTokenizerAdapter,
    mock: bool = False,
    data_cache_path: str | None = None,
    is_built_on_rank: Callable[[], bool] | None = None,
    create_attention_mask: bool = True,
    eod_mask_loss: bool = False,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
) -> tuple:
    """Build (train, valid, test) megatron GPT datasets; a split is None if it has no share.

    Call on every rank (megatron barriers inside when torch.distributed is initialized). Each
    sample is a dict of ``seq_length`` tokens/labels plus masks. ``mock=True`` ignores data_path
    and split and uses megatron's synthetic MockGPTDataset. Index caches go to
    ``<data_cache_path or dir of first prefix/cache>/data-<content fingerprint>``.
    """
    sizes = _sample_counts(seq_length, train_samples, valid_samples, test_samples)
    adapter = tokenizer if isinstance(tokenizer, MegatronTokenizerAdapter) else MegatronTokenizerAdapter(tokenizer)
    compat.apply_security()  # megatron reads its index caches with numpy.load(allow_pickle=True)
    ensure_helpers()

    blend, path_to_cache, dataset_cls = None, None, MockGPTDataset
    if not mock:
        if data_path is None:
            raise ValueError("--data-path is required unless --mock-data is set")
        prefixes, weights = parse_data_path(data_path)
        problems = check_splits([read_idx_info(p) for p in prefixes], weights, split, sizes)
        if problems:
            raise ValueError(" ".join(problems))
        blend, dataset_cls = (prefixes, weights), GPTDataset
        cache_root = default_cache_root(prefixes, data_cache_path)
        path_to_cache = os.path.join(cache_root, "data-" + _data_fingerprint(prefixes))

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=None if mock else split,
        path_to_cache=path_to_cache,
        tokenizer=adapter,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
    )
    if not mock:  # a split asked for 0 samples is not built: megatron would still index it (and hang if empty)
        config.split_matrix = [None if not n else ends for ends, n in zip(config.split_matrix, sizes)]
    builder = compat.dataset_builder_class()(dataset_cls, sizes, is_built_on_rank or (lambda: True), config)
    train, valid, test = builder.build()
    return train, valid, test


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


class PretrainingSampler:
    """Megatron-LM's MegatronPretrainingSampler (megatron/training, not shipped in megatron-core).

    Walks sample ids in order from ``consumed_samples`` (a global count over all data-parallel
    ranks); each step takes the next ``micro_batch_size * dp_size`` ids and yields this rank's
    slice. A run resumed at ``consumed_samples=k`` therefore yields exactly the batches an
    uninterrupted run yields from k on. The last partial global micro-batch is dropped.
    ``cyclic=True`` restarts from sample 0 when the data is exhausted (for validation).
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        cyclic: bool = False,
    ) -> None:
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(
                "need micro_batch_size >= 1 and 0 <= dp_rank < dp_size, got "
                f"micro_batch_size={micro_batch_size}, dp_rank={dp_rank}, dp_size={dp_size}"
            )
        self.global_micro = micro_batch_size * dp_size
        if consumed_samples < 0 or consumed_samples % self.global_micro:
            raise ValueError(
                f"consumed_samples={consumed_samples} is not a multiple of micro_batch_size*dp_size="
                f"{self.global_micro}; the checkpoint was written with a different batch layout"
            )
        self.usable = (total_samples // self.global_micro) * self.global_micro
        if self.usable == 0:
            raise ValueError(
                f"dataset has {total_samples} samples, fewer than one global micro-batch ({self.global_micro})"
            )
        if not cyclic and consumed_samples >= self.usable:
            raise ValueError(
                f"consumed_samples={consumed_samples} exhausts the {total_samples} samples built; "
                "raise --train-samples (or --train-iters) so the datasets are built larger"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.cyclic = cyclic

    def __len__(self) -> int:
        if self.cyclic:
            raise TypeError("a cyclic PretrainingSampler is endless")
        return (self.usable - self.consumed_samples) // self.global_micro

    def __iter__(self) -> Iterator[list[int]]:
        lo = self.dp_rank * self.micro_batch_size
        start = self.consumed_samples % self.usable if self.cyclic else self.consumed_samples
        while True:
            for first in range(start, self.usable, self.global_micro):
                yield list(range(first + lo, first + lo + self.micro_batch_size))
            if not self.cyclic:
                return
            start = 0


def make_data_iterator(
    dataset,
    micro_batch_size: int,
    consumed_samples: int,
    dp_rank: int,
    dp_size: int,
    num_workers: int = 0,
    cyclic: bool = False,
) -> Iterator[dict] | None:
    """A DataLoader iterator over this rank's micro-batches, resuming at ``consumed_samples``.

    Returns None for a None dataset (a rank that did not build it). Batches are dicts of stacked
    tensors; pass the iterator to :func:`get_batch`.
    """
    if dataset is None:
        return None
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size, cyclic)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
    return iter(loader)


BATCH_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")


def get_batch(data_iterator: Iterator[dict] | None, device: torch.device | str | None = None) -> dict | None:
    """Next micro-batch as the model's inputs, on ``device``.

    Shapes: tokens, labels, position_ids [b, s] int64; loss_mask [b, s] float32; attention_mask
    [b, 1, s, s] bool with True = masked (megatron's convention), or None when the datasets were
    built with create_attention_mask=False. Returns None for a None iterator.
    """
    if data_iterator is None:
        return None
    sample = next(data_iterator)
    batch = {key: sample.get(key) for key in BATCH_KEYS}
    if device is not None:
        non_blocking = torch.device(device).type == "cuda"
        batch = {k: None if v is None else v.to(device, non_blocking=non_blocking) for k, v in batch.items()}
    return batch
