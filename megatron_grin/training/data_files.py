"""``--data-path`` checks that need no megatron-core: Megatron's prefix/weight syntax and the .bin/.idx pair.

Runs while flags are validated, before any process group starts, so it reads only headers and a few
index entries. The .idx layout is megatron-core's ``IndexedDataset`` (version 1); its header and dtype
codes are restated here, and tests/training/test_data.py checks them against megatron-core's own.
"""

from __future__ import annotations

import math
import os
import struct
from typing import Sequence

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


def validate_data_path(data_path: Sequence[str] | str) -> tuple[list[str], list[float] | None]:
    """Parse --data-path and check every dataset on disk, raising ValueError naming the bad file.

    Cheap (reads headers and a few index entries); call it before starting process groups.
    """
    prefixes, weights = parse_data_path(data_path)
    for prefix in prefixes:
        read_idx_info(prefix)
    return prefixes, weights
