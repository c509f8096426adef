"""Checkpoint integrity: the manifest (every file's size and SHA-256, and the run that wrote it), the checks a
checkpoint passes before anything is loaded from it, and reading torch's ``.metadata`` pickle (and Megatron-LM's
``common.pt``, for its ``args``) without running code.

Shared by the trainer (training/checkpointing.py: each rank hashes the files it wrote, and a share of them at load)
and the converter (convert/mcore_io.py: one process checks everything). compat.py routes torch's own
``.metadata`` reader through :func:`read_dcp_metadata`. Like ckpt_format, it imports no torch and no megatron.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import pickle
import re
import signal
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, Iterable, Optional

from megatron_grin.ckpt_format import (
    COMMIT_FILES,
    COMMON_NAME,
    CONFIG_NAME,
    HASH_ALGORITHM,
    MANIFEST_NAME,
    CheckpointError,
    config_from_json,
    read_config_json,
    write_atomic,
)


# --- torch's .metadata, read without running code ------------------------------------------------------------
_DCP = "torch.distributed.checkpoint"
#: (module, name) pairs a .metadata pickle may name: traced in files torch 2.13 DCP writes through megatron-core
#: 0.16 (the trainer's and `convert from-hf`'s), plus megatron's empty legacy placeholders (<= 0.15 files).
METADATA_ALLOWED = frozenset({
    *((f"{_DCP}.metadata", n) for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata",
                                         "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                         "_MEM_FORMAT_ENCODING")),
    (f"{_DCP}.filesystem", "_StorageInfo"),
    *((f"{_DCP}.planner", n) for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
    ("collections", "OrderedDict"),
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"),
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan"),
})


class UnsafeFileError(CheckpointError):
    """A checkpoint or cache file that asks for code to be run (or imported) to load it."""


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only ``METADATA_ALLOWED`` and torch dtypes: every GLOBAL/STACK_GLOBAL/INST/OBJ/EXT goes through
    ``find_class``, so nothing else is imported or called; persistent ids are refused."""

    def __init__(self, file: BinaryIO, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in METADATA_ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and re.fullmatch(r"[a-z0-9_]+", name):  # a dtype (checked after the lookup)
            obj = super().find_class(module, name)
            if type(obj).__module__ == "torch" and type(obj).__name__ == "dtype":
                return obj
        raise UnsafeFileError(f"{self.source}: refusing to unpickle {module}.{name}, which is not part of a "
                              "checkpoint's metadata: the file was tampered with or is not a checkpoint. Do not "
                              "load it with plain pickle or torch.load(weights_only=False).")

    def persistent_load(self, pid):
        raise UnsafeFileError(f"{self.source}: refusing a persistent id in checkpoint metadata.")


def read_dcp_metadata(stream: BinaryIO, source: str):
    """Unpickle a torch.distributed.checkpoint ``.metadata`` stream; the result must be its ``Metadata``."""
    try:
        obj = RestrictedUnpickler(stream, source).load()
    except UnsafeFileError:
        raise
    except Exception as err:  # truncated or garbled: name the file
        raise CheckpointError(f"{source} is damaged: not a readable checkpoint .metadata "
                              f"({type(err).__name__}: {err}).") from None
    if (type(obj).__module__, type(obj).__name__) != (f"{_DCP}.metadata", "Metadata"):
        raise UnsafeFileError(f"{source} holds a {type(obj).__name__}, not torch checkpoint Metadata.")
    return obj


def read_metadata_file(iter_dir: str):
    path = os.path.join(iter_dir, ".metadata")
    try:
        with open(path, "rb") as f:
            return read_dcp_metadata(f, path)
    except OSError as err:
        raise CheckpointError(f"{path} is unreadable ({err.strerror}).") from None


# --- megatron's common.pt, read without torch, megatron-core or running code -------------------------------------
_ENUMS = {"megatron.core.transformer.enums": ("AttnBackend", "CudaGraphScope"), "megatron.core.enums": ("ModelType",),
          "megatron.core.rerun_state_machine": ("RerunDiagnostic", "RerunMode", "RerunState")}
#: what a common.pt may name (beyond torch dtypes, storage types and tensors, which are described, never read):
#: Megatron-LM's ``args`` (an argparse.Namespace with the enums megatron.core.safe_globals registers for it) and
#: its rerun state; traced in a checkpoint Megatron-LM core_v0.16.1's save_checkpoint wrote (docs/training.md).
COMMON_ALLOWED = frozenset({("argparse", "Namespace"), ("collections", "OrderedDict"), ("signal", "Signals"),
                            ("pathlib", "PosixPath"), ("torch._utils", "_rebuild_tensor_v2"),
                            *((module, name) for module, names in _ENUMS.items() for name in names)})
_TORCH_NAME = re.compile(r"bool|u?int(8|16|32|64)|b?float(16|32|64)|float8_\w+|complex(64|128)"
                         r"|[A-Z][A-Za-z0-9]*Storage")
_REAL = {("argparse", "Namespace"): argparse.Namespace, ("collections", "OrderedDict"): collections.OrderedDict,
         ("signal", "Signals"): signal.Signals, ("pathlib", "PosixPath"): pathlib.PosixPath}


@dataclasses.dataclass(frozen=True)
class Unresolved:
    """Something a common.pt names that the light reader does not import: a torch dtype or storage type
    (``what``: "torch.bfloat16"), a megatron enum member (``value``: its value; the member name needs megatron-core)
    or a tensor (``what`` "torch.Tensor", ``value``: its shape; the data is not read)."""

    what: str
    value: Any = None


class _EnumClass:
    """A megatron enum class: pickle calls it with the member's value."""

    def __init__(self, qualname: str):
        self.qualname = qualname

    def __call__(self, value: Any) -> Unresolved:
        return Unresolved(self.qualname, value)


def _tensor(storage, offset, size, *rest) -> Unresolved:
    return Unresolved("torch.Tensor", tuple(size))


class CommonStateUnpickler(pickle.Unpickler):
    """Resolves only ``COMMON_ALLOWED`` (Namespace, OrderedDict, stdlib enums as themselves; megatron enums, torch
    dtypes and tensors as :class:`Unresolved`); persistent ids only as torch's storage references, not followed."""

    def __init__(self, file: BinaryIO, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _REAL:
            return _REAL[module, name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _tensor
        if (module, name) in COMMON_ALLOWED:
            return _EnumClass(f"{module}.{name}")
        if module == "torch" and _TORCH_NAME.fullmatch(name):
            return Unresolved(f"torch.{name}")
        raise UnsafeFileError(f"{self.source}: refusing to unpickle {module}.{name}, which is not part of "
                              "Megatron-LM's common checkpoint state: the file was tampered with or is not a "
                              "checkpoint. Do not load it with plain pickle or torch.load(weights_only=False).")

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and pid and pid[0] == "storage":
            return Unresolved("torch.storage")
        raise UnsafeFileError(f"{self.source}: refusing persistent id {pid!r:.80}.")


def read_common_state(path: str) -> dict:
    """megatron's ``common.pt`` (a torch.save zip file) as a dict, without torch: containers, numbers, strings,
    Megatron-LM's ``args`` Namespace; dtypes, megatron enums and tensors as :class:`Unresolved`."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise CheckpointError(f"{path} is not a torch.save file (no single data.pkl inside).")
            data = archive.read(pickles[0])
    except (OSError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path} is unreadable or not a torch.save zip file ({err}).") from None
    try:
        obj = CommonStateUnpickler(io.BytesIO(data), path).load()
    except UnsafeFileError:
        raise
    except Exception as err:  # truncated or garbled: name the file
        raise CheckpointError(f"{path} is damaged ({type(err).__name__}: {err}).") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not megatron's common state (a dict).")
    return obj


# --- the manifest: sizes and digests of every file -------------------------------------------------------------
def file_digest(path: str, algorithm: str = HASH_ALGORITHM) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)  # releases the GIL: files hash in parallel threads
    return h.hexdigest()


def digest_files(root: str, names: Iterable[str], threads: int = 4) -> dict:
    """{name: {"size", algorithm}} for files under ``root``, hashed in parallel threads."""
    names = sorted(set(names))

    def one(name: str) -> tuple[str, dict]:
        path = os.path.join(root, name)
        return name, {"size": os.path.getsize(path), HASH_ALGORITHM: file_digest(path)}

    with ThreadPoolExecutor(max(1, min(threads, len(names)))) as pool:
        return dict(pool.map(one, names))


def write_manifest(iter_dir: str, files: dict, run_id: Optional[str]) -> None:
    write_atomic(os.path.join(iter_dir, MANIFEST_NAME),
                 json.dumps({"format": 1, "run_id": run_id, "algorithm": HASH_ALGORITHM, "files": files},
                            indent=1, sort_keys=True) + "\n")


def read_manifest(iter_dir: str) -> Optional[dict]:
    """The manifest, None if the checkpoint has none (written before manifests, or by Megatron-LM)."""
    path = os.path.join(iter_dir, MANIFEST_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is damaged ({err}).") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or data.get("algorithm") not in hashlib.algorithms_available:
        raise CheckpointError(f"{path} is damaged (no file list or an unknown algorithm).")
    return data


def structure_problems(iter_dir: str, manifest: Optional[dict]) -> list[str]:
    """What is missing or malformed, without reading tensor data (a few small files and every file's size)."""
    problems = []
    names = [COMMON_NAME, *COMMIT_FILES] + (list(manifest["files"]) if manifest else [])
    for name in dict.fromkeys(names):
        path = os.path.join(iter_dir, name)
        want = manifest["files"].get(name, {}).get("size") if manifest else None
        if not os.path.isfile(path):
            problems.append(f"{name} is missing")
        elif want is not None and os.path.getsize(path) != want:
            problems.append(f"{name} has {os.path.getsize(path)} bytes, the manifest says {want}")
    if os.path.isfile(os.path.join(iter_dir, CONFIG_NAME)):
        try:
            config_from_json(read_config_json(iter_dir), CONFIG_NAME)
        except CheckpointError as err:
            problems.append(str(err))
    if not problems:
        try:
            metadata = read_metadata_file(iter_dir)
        except CheckpointError as err:
            return [str(err)]
        for name, end in sorted(_data_extents(metadata).items()):
            path = os.path.join(iter_dir, name)
            size = os.path.getsize(path) if os.path.isfile(path) else None
            if size is None or size < end:
                problems.append(f"{name} is {'missing' if size is None else f'truncated ({size} < {end} bytes)'}")
    return problems


def _data_extents(metadata) -> dict:
    """{data file: bytes .metadata says it holds}."""
    need: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    return need


def digest_problems(iter_dir: str, manifest: dict, names: Iterable[str], threads: int = 4) -> list[str]:
    """Files among ``names`` whose digest differs from the manifest's."""
    algorithm, listed = manifest["algorithm"], manifest["files"]
    names = [n for n in names if n in listed and os.path.isfile(os.path.join(iter_dir, n))]

    def bad(name: str) -> Optional[str]:
        got = file_digest(os.path.join(iter_dir, name), algorithm)
        return None if got == listed[name].get(algorithm) else f"{name}: {algorithm} differs from the manifest"

    with ThreadPoolExecutor(max(1, min(threads, len(names) or 1))) as pool:
        return [p for p in pool.map(bad, names) if p]


def checkpoint_problems(iter_dir: str) -> list[str]:
    """Everything wrong with one checkpoint (empty: intact), reading every file once (one process)."""
    try:
        manifest = read_manifest(iter_dir)
    except CheckpointError as err:
        return [str(err)]
    problems = structure_problems(iter_dir, manifest)
    if manifest and not problems:
        problems = digest_problems(iter_dir, manifest, manifest["files"])
    return problems


def share_of(manifest: dict, rank: int, world: int) -> list[str]:
    """The files one rank hashes when ``world`` ranks verify together (largest first, to the least loaded)."""
    loads, mine = [0] * world, []
    for name, info in sorted(manifest["files"].items(), key=lambda kv: (-kv[1].get("size", 0), kv[0])):
        who = loads.index(min(loads))
        loads[who] += info.get("size", 0) + 1
        if who == rank:
            mine.append(name)
    return mine


def damage_report(iter_dir: str, problems: list[str]) -> str:
    """"<dir> is damaged: <first problems>" (no final period)."""
    more = f"; and {len(problems) - 4} more" if len(problems) > 4 else ""
    shown = "; ".join(p.rstrip(".") for p in problems[:4]) + more
    return f"{iter_dir} is damaged: {shown}"
