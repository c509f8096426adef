"""``--data-path`` checks that need no megatron-core: Megatron's prefix/weight syntax and the .bin/.idx pair.

Runs while flags are validated, before any process group starts, so it reads only headers and a few
index entries. The .idx layout is megatron-core's ``IndexedDataset`` (version 1); its header and dtype
codes are restated here, and tests/training/test_data.py checks them against megatron-core's own.
"""

from __future__ import annotations

import math
import os
import re
import struct
from typing import Optional, Sequence

import numpy

#: megatron.core.datasets.indexed_dataset._INDEX_HEADER
INDEX_HEADER = b"MMIDIDX\x00\x00"
#: megatron.core.datasets.indexed_dataset.DType codes
DTYPE_CODES = {1: numpy.uint8, 2: numpy.int8, 3: numpy.int16, 4: numpy.int32, 5: numpy.int64, 6: numpy.float64,
               7: numpy.float32, 8: numpy.uint16}

#: magic (9) + version (8) + dtype code (1) + sequence count (8) + document count (8).
_IDX_PREAMBLE_BYTES = 34
_FIX_HINT = "run `megatron-grin preprocess --input FILE --output-prefix {prefix} --tokenizer TOK`"


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def parse_data_path(data_path: Sequence[str] | str) -> tuple[list[str], list[float] | None]:
    """Megatron's --data-path: ``PREFIX...`` or ``W1 PREFIX1 W2 PREFIX2...`` -> (prefixes, weights)."""
    tokens = data_path.split() if isinstance(data_path, str) else [str(t) for t in data_path]
    if not tokens:
        raise ValueError("--data-path is empty: give PREFIX [PREFIX...] or W1 PREFIX1 W2 PREFIX2 ...")
    numeric = [_is_number(t) for t in tokens]
    if not any(numeric):
        return tokens, None
    pairs_ok = len(tokens) % 2 == 0 and all(numeric[0::2]) and not any(numeric[1::2])
    if not pairs_ok:
        raise ValueError(
            f"--data-path {' '.join(tokens)}: mixes weights and prefixes; use either PREFIX... or "
            "weight/prefix pairs like `0.3 data/a 0.7 data/b`"
        )
    weights = [float(t) for t in tokens[0::2]]
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--data-path weights {weights} must be non-negative with a positive sum")
    return tokens[1::2], weights


def read_idx_info(prefix: str) -> dict:
    """Check that ``prefix``.bin/.idx form a readable megatron IndexedDataset; return its counts.

    Checks the magic, version and dtype, that the .idx size matches its counts exactly (catches
    truncation) and that the last sequence ends exactly at the end of the .bin.
    """

    hint = _FIX_HINT.format(prefix=prefix)
    if prefix.endswith((".bin", ".idx")):
        raise ValueError(f"--data-path {prefix}: give the prefix without .bin/.idx ({prefix[:-4]})")
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    for path in (bin_path, idx_path):
        if not os.path.isfile(path):
            raise ValueError(f"--data-path: {path} does not exist; {hint}")
    idx_size, bin_size = os.path.getsize(idx_path), os.path.getsize(bin_path)
    with open(idx_path, "rb") as f:
        preamble = f.read(_IDX_PREAMBLE_BYTES)
        if len(preamble) < _IDX_PREAMBLE_BYTES or preamble[:9] != INDEX_HEADER:
            raise ValueError(f"--data-path: {idx_path} is not a megatron .idx file (bad header); {hint}")
        version, code, seq_count, doc_count = struct.unpack("<QBQQ", preamble[9:])
        if code not in DTYPE_CODES:
            raise ValueError(f"--data-path: {idx_path} has unknown token dtype code {code}; {hint}")
        itemsize = numpy.dtype(DTYPE_CODES[code]).itemsize
        if version != 1:
            raise ValueError(f"--data-path: {idx_path} has unsupported version {version}; {hint}")
        expected = _IDX_PREAMBLE_BYTES + 12 * seq_count + 8 * doc_count
        if idx_size not in (expected, expected + seq_count):  # + one mode byte per sequence if multimodal
            raise ValueError(
                f"--data-path: {idx_path} is truncated or corrupt ({idx_size} bytes, expected "
                f"{expected}); {hint}"
            )
        if seq_count == 0:
            raise ValueError(f"--data-path: {idx_path} holds no documents; {hint}")
        f.seek(_IDX_PREAMBLE_BYTES + 4 * (seq_count - 1))
        (last_len,) = struct.unpack("<i", f.read(4))
        f.seek(_IDX_PREAMBLE_BYTES + 4 * seq_count + 8 * (seq_count - 1))
        (last_ptr,) = struct.unpack("<q", f.read(8))
        f.seek(_IDX_PREAMBLE_BYTES + 12 * seq_count)
        (first_doc,) = struct.unpack("<q", f.read(8))
        f.seek(_IDX_PREAMBLE_BYTES + 12 * seq_count + 8 * (doc_count - 1))
        (last_doc,) = struct.unpack("<q", f.read(8))
    if first_doc != 0 or last_doc != seq_count:
        raise ValueError(f"--data-path: {idx_path} has an inconsistent document index; {hint}")
    if last_ptr + last_len * itemsize != bin_size:
        raise ValueError(
            f"--data-path: {bin_path} ({bin_size} bytes) does not match {idx_path} (expects "
            f"{last_ptr + last_len * itemsize}); the pair is from different runs or truncated; {hint}"
        )
    return {"prefix": prefix, "sequences": seq_count, "bin_bytes": bin_size, "idx_bytes": idx_size}


def default_cache_root(prefixes: Sequence[str], data_cache_path: Optional[str]) -> str:
    """Where megatron's index caches go: --data-cache-path, else a ``cache/`` folder next to the first dataset."""
    return data_cache_path or os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "cache")


def validate_data_path(data_path: Sequence[str] | str) -> tuple[list[str], list[float] | None]:
    """Parse --data-path and check every dataset on disk, raising ValueError naming the bad file.

    Cheap (reads headers and a few index entries); call it before starting process groups.
    """
    prefixes, weights = parse_data_path(data_path)
    for prefix in prefixes:
        read_idx_info(prefix)
    return prefixes, weights


# --- splits and sample counts: nothing megatron builds may hang -------------------------------------------------
SPLIT_NAMES = ("train", "valid", "test")
#: megatron.core.datasets.blended_megatron_dataset_config.BlendedMegatronDatasetConfig.mid_level_dataset_surplus
MID_LEVEL_SURPLUS = 0.005
_SPLIT_PART = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*")


def parse_split(split: str) -> list[float]:
    """--split "98,2,0" -> normalized [train, valid, test] shares, with an error naming the flag."""
    parts = split.replace("/", ",").split(",") if isinstance(split, str) else []
    matches = [_SPLIT_PART.fullmatch(p) for p in parts]
    if not 1 <= len(parts) <= 3 or not all(matches) or sum(float(m.group(1)) for m in matches) <= 0:
        raise ValueError(f"--split {split!r}: give up to three non-negative weights, e.g. 98,2,0")
    values = [float(m.group(1)) for m in matches] + [0.0] * (3 - len(parts))
    return [v / sum(values) for v in values]


def split_bookends(shares: Sequence[float]) -> list:
    """megatron's convert_split_vector_to_split_matrix for one vector: (begin, end) share per split, or None."""
    edges = [0.0]
    for share in shares:
        edges.append(edges[-1] + share)
    return [None if end <= begin else (begin, end) for begin, end in zip(edges[:-1], edges[1:])]


def split_documents(documents: int, bookends) -> int:
    """Documents megatron gives a split (its rounding, _build_megatron_dataset_splits)."""
    return 0 if bookends is None else int(round(bookends[1] * documents)) - int(round(bookends[0] * documents))


def check_splits(infos: list[dict], weights: Optional[list], split: str, sizes: Sequence[int]) -> list[str]:
    """Every (dataset, split) megatron will build for ``sizes`` samples must get documents: megatron-core 0.16
    loops forever in GPTDataset._get_num_epochs on a split of zero tokens (data.build_datasets does not
    build splits that are asked for 0 samples, so only those with samples count)."""
    bookends = split_bookends(parse_split(split))
    problems = []
    for name, ends, size in zip(SPLIT_NAMES, bookends, sizes):
        if ends is None and size and name == "train":
            problems.append(f"--split {split}: the train share is 0, and {size} train samples are needed; give the "
                            "train split a positive weight, e.g. --split 98,2,0.")
        if ends is None or not size:
            continue
        for i, info in enumerate(infos):
            share = f" (blend weight {weights[i]:g})" if weights else ""
            if split_documents(info["sequences"], ends) == 0:
                problems.append(
                    f"--split {split}: the {name} split of {info['prefix']}{share} gets 0 of its {info['sequences']} "
                    f"documents, and {size} {name} samples are needed (megatron would wait forever). Add documents, "
                    f"raise the {name} share of --split (e.g. --split 90,10,0), or "
                    + ("--eval-iters 0 to skip validation." if name == "valid" else "drop the dataset."))
    return problems


# --- token ids against the vocabulary, and the index's own consistency -----------------------------------------
def check_token_ids(prefix: str, vocab_size: int, windows: int = 64, window_tokens: int = 1 << 16) -> list[str]:
    """The .bin's token ids (a sample of ``windows`` evenly spaced windows, plus both ends) must be < the
    vocabulary: an id beyond it is an IndexError (or a device assert) in the middle of training."""
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    with open(idx_path, "rb") as f:
        code = struct.unpack("<B", f.read(_IDX_PREAMBLE_BYTES)[17:18])[0]
    dtype = numpy.dtype(DTYPE_CODES[code])
    if dtype.kind not in "iu":
        hint = _FIX_HINT.format(prefix=prefix)
        return [f"--data-path: {idx_path} stores token ids as {dtype} (not integers); {hint}"]
    tokens = numpy.memmap(bin_path, dtype=dtype, mode="r")
    n = len(tokens)
    starts = sorted({int(s) for s in numpy.linspace(0, max(n - window_tokens, 0), num=min(windows, max(n, 1)))})
    top = max((int(tokens[s:s + window_tokens].max()) for s in starts if s < n), default=0)
    low = min((int(tokens[s:s + window_tokens].min()) for s in starts if s < n), default=0)
    if top >= vocab_size or low < 0:
        bad = top if top >= vocab_size else low
        return [f"--data-path: {bin_path} holds token id {bad}, outside this run's vocabulary of {vocab_size} "
                f"(--tokenizer / --vocab-size). The data was tokenized with another tokenizer: re-run "
                f"`megatron-grin preprocess` with this run's tokenizer, or train with the one that made it."]
    return []


def check_index_order(prefix: str, chunk: int = 1 << 22) -> list[str]:
    """Each sequence must start where the previous one ends and document boundaries must ascend: a reordered
    or spliced .idx otherwise reads other bytes than the documents it lists, silently."""
    idx_path = prefix + ".idx"
    with open(idx_path, "rb") as f:
        _, code, seqs, docs = struct.unpack("<QBQQ", f.read(_IDX_PREAMBLE_BYTES)[9:])
    itemsize = numpy.dtype(DTYPE_CODES[code]).itemsize
    lengths = numpy.memmap(idx_path, dtype=numpy.int32, mode="r", offset=_IDX_PREAMBLE_BYTES, shape=(seqs,))
    pointers = numpy.memmap(idx_path, dtype=numpy.int64, mode="r", offset=_IDX_PREAMBLE_BYTES + 4 * seqs, shape=(seqs,))
    documents = numpy.memmap(idx_path, dtype=numpy.int64, mode="r", offset=_IDX_PREAMBLE_BYTES + 12 * seqs,
                             shape=(docs,))
    hint = _FIX_HINT.format(prefix=prefix)
    expected = 0
    for lo in range(0, seqs, chunk):
        length = numpy.asarray(lengths[lo:lo + chunk], dtype=numpy.int64)
        ends = expected + numpy.cumsum(length * itemsize)
        starts = numpy.concatenate(([expected], ends[:-1]))
        wrong = numpy.flatnonzero((numpy.asarray(pointers[lo:lo + chunk]) != starts) | (length < 0))
        if wrong.size:
            return [f"--data-path: {idx_path} is inconsistent at sequence {lo + int(wrong[0])} (its offset is not "
                    f"where the previous sequence ends): the index was reordered or belongs to another .bin; {hint}"]
        expected = int(ends[-1])
    if docs and numpy.any(numpy.diff(numpy.asarray(documents)) < 0):
        return [f"--data-path: {idx_path} has document boundaries out of order; {hint}"]
    return []

