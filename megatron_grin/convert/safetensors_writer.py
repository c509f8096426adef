"""Stream tensors into Hugging Face sharded safetensors files without holding a whole shard in memory.

The layout (which tensor goes to which ``model-0000X-of-0000Y.safetensors`` file, at which offset) is
planned up front from names, shapes and dtypes alone, so each file's header can be written before
any tensor exists. Tensors are then written one by one, in plan order, straight to disk:

    plan = plan_shards([(name, shape, dtype), ...], max_shard_bytes=5 * 2**30)
    with ShardedSafetensorsWriter(out_dir, plan) as writer:
        for name, tensor in produce_in_plan_order():
            writer.write(name, tensor)
    # -> out_dir/model-00001-of-0000N.safetensors ... + model.safetensors.index.json (also for N = 1)

The files follow the safetensors format (8-byte little-endian header length, JSON header padded with
spaces to a multiple of 8, then the raw little-endian tensor bytes in offset order), which is what
``safetensors.safe_open`` and ``transformers``' ``from_pretrained`` read.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

#: torch dtype -> safetensors dtype tag.
DTYPE_TAGS = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class Entry:
    """One tensor of the plan."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n * torch.empty((), dtype=self.dtype).element_size()


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 12345 -> bytes (decimal units like transformers' max_shard_size); > 0."""
    if isinstance(text, int):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(text), flags=re.IGNORECASE)
        if not m:
            raise ValueError(f"cannot parse size {text!r}; use e.g. 5GB, 500MB or a number of bytes")
        value, unit = float(m.group(1)), (m.group(2) or "B").upper()
        scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
        size = int(value * scale)
    if size <= 0:  # a limit of 0 would put every tensor in a file of its own
        raise ValueError(f"size {text!r} must be at least 1 byte; use e.g. 5GB or 500MB")
    return size


def size_arg(token: str) -> int:
    """argparse ``type=`` for a size: a bad one is a usage error that names the flag."""
    try:
        return parse_size(token)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def plan_shards(entries: Iterable[tuple[str, Sequence[int], torch.dtype]],
                max_shard_bytes: int) -> list[list[Entry]]:
    """Split tensors, in the given order, into consecutive files of at most ``max_shard_bytes`` each.

    A tensor larger than the limit gets a file of its own (as transformers does).
    """
    shards: list[list[Entry]] = [[]]
    size = 0
    seen = set()
    for name, shape, dtype in entries:
        if name in seen:
            raise ValueError(f"tensor {name!r} is planned twice")
        seen.add(name)
        if dtype not in DTYPE_TAGS:
            raise ValueError(f"{name}: dtype {dtype} cannot be written to safetensors")
        entry = Entry(name, tuple(int(s) for s in shape), dtype)
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    if not shards[-1]:
        raise ValueError("nothing to write: the plan is empty")
    return shards


def shard_file_names(num_shards: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


def _header(entries: Sequence[Entry], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": DTYPE_TAGS[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the reference writer aligns the data section to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return memoryview(flat.view(torch.uint8).numpy())


class ShardedSafetensorsWriter:
    """Writes a planned set of tensors, one at a time, into sharded safetensors files + index."""

    def __init__(self, out_dir: str, shards: list[list[Entry]], metadata: dict[str, str] | None = None):
        self.out_dir = out_dir
        self.shards = shards
        self.names = shard_file_names(len(shards))
        self.metadata = {"format": "pt", **(metadata or {})}
        self._order = [(i, e) for i, shard in enumerate(shards) for e in shard]
        self._next = 0
        self._file = None
        self._file_index = -1

    # -- context manager ---------------------------------------------------------------------------
    def __enter__(self) -> "ShardedSafetensorsWriter":
        os.makedirs(self.out_dir, exist_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if exc_type is None:
            self.close()

    # -- writing ---------------------------------------------------------------------------------------
    @property
    def expected(self) -> str | None:
        """Name of the tensor the writer needs next (None when done)."""
        return self._order[self._next][1].name if self._next < len(self._order) else None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise ValueError(f"unexpected tensor {name!r}: all planned tensors were already written")
        file_index, entry = self._order[self._next]
        if name != entry.name:
            raise ValueError(f"tensors must arrive in plan order: expected {entry.name!r}, got {name!r}")
        if tuple(tensor.shape) != entry.shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} differs from the planned {entry.shape}")
        if tensor.dtype != entry.dtype:
            raise ValueError(f"{name}: dtype {tensor.dtype} differs from the planned {entry.dtype}")
        if file_index != self._file_index:
            self._open(file_index)
        self._file.write(_tensor_bytes(tensor))
        self._next += 1

    def _open(self, file_index: int) -> None:
        if self._file is not None:
            self._file.close()
        self._file_index = file_index
        self._file = open(os.path.join(self.out_dir, self.names[file_index]), "wb")
        self._file.write(_header(self.shards[file_index], self.metadata))

    def close(self) -> None:
        """Check completeness and write the index (always, even for a single file, like the hub repos)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._next != len(self._order):
            raise ValueError(f"only {self._next} of {len(self._order)} planned tensors were written; "
                             f"next missing: {self.expected!r}")
        write_index(self.out_dir, self.shards, self.names)


def write_index(out_dir: str, shards: list[list[Entry]], names: list[str]) -> None:
    total = sum(e.nbytes for shard in shards for e in shard)
    weight_map = {e.name: names[i] for i, shard in enumerate(shards) for e in shard}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(out_dir, INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=False)
        f.write("\n")
