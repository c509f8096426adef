"""Preprocessing: text -> megatron-core indexed datasets (``megatron-grin preprocess``), and a built-in corpus.

    megatron-grin preprocess --input corpus.jsonl --output-prefix data/corpus --tokenizer byte
        # -> data/corpus_text_document.{bin,idx}, named as Megatron-LM's tools/preprocess_data.py names them
    stats = preprocess(["corpus.jsonl"], "data/corpus_text_document", tokenizer)   # the exact dataset prefix
    paths = stdlib_corpus("data")   # the running Python's standard library as plain-text documents

The on-disk format is megatron-core's own (``<prefix>.bin`` / ``<prefix>.idx``), so datasets made
by Megatron-LM's tools/preprocess_data.py work here and vice versa. See docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import sysconfig
from typing import Iterator, Sequence

from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from megatron_grin.training.arguments import unknown_flags
from megatron_grin.training.tokenize_pool import tokenized
from megatron_grin.training.tokenizer import Tokenizer, build_tokenizer

log = logging.getLogger(__name__)

#: Suffixes read as JSON lines (one object per line); every other file is one plain-text document.
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------


def _iter_texts(path: str, json_key: str) -> Iterator[str]:
    """Yield the documents of one input file, in file order."""
    if not path.lower().endswith(JSONL_SUFFIXES):
        try:
            with open(path, encoding="utf-8") as f:
                yield f.read()
        except UnicodeDecodeError as err:
            raise ValueError(f"--input {path}: not UTF-8 text ({err}); convert it to UTF-8 first") from err
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"--input {path}:{lineno}: not UTF-8 text ({err.reason} at byte {err.start}); "
                                 "convert the file to UTF-8 first") from err
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"--input {path}:{lineno}: not a JSON object per line ({err.msg})") from err
            if not isinstance(record, dict) or json_key not in record:
                raise ValueError(
                    f"--input {path}:{lineno}: no key {json_key!r}; pass the text field with --json-keys"
                )
            text = record[json_key]
            if not isinstance(text, str):
                raise ValueError(f"--input {path}:{lineno}: {json_key!r} is {type(text).__name__}, not a string")
            yield text


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _commit(tmp_bin: str, tmp_idx: str, bin_path: str, idx_path: str) -> None:
    """Publish .bin then .idx; the .idx is the commit marker, so no crash leaves a mismatched pair."""
    _fsync(tmp_bin)
    _fsync(tmp_idx)
    if os.path.exists(idx_path):
        os.remove(idx_path)
    os.replace(tmp_bin, bin_path)
    os.replace(tmp_idx, idx_path)


def preprocess(
    inputs: list[str],
    output_prefix: str,
    tokenizer: Tokenizer | str,
    json_key: str = "text",
    append_eod: bool = True,
    workers: int = 1,
) -> dict:
    """Tokenize JSONL / plain-text files into ``<output_prefix>.bin`` and ``.idx`` (one sequence per document).

    Files are written under temporary names and renamed at the end, so an interrupted run never
    leaves a readable but partial dataset under the final name. Empty documents are skipped.
    Returns ``{"documents", "tokens", "skipped", "dtype", "bin", "idx"}``.
    """

    if isinstance(tokenizer, str):
        tokenizer = build_tokenizer(tokenizer)
    if not inputs:
        raise ValueError("--input: give at least one JSONL or text file")
    for path in inputs:
        if not os.path.isfile(path):
            raise ValueError(f"--input {path}: no such file")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if not output_prefix or output_prefix.endswith((".bin", ".idx")) or output_prefix.endswith(os.sep):
        raise ValueError(f"--output-prefix {output_prefix!r}: give a prefix without .bin/.idx, e.g. data/corpus")

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    bin_path, idx_path = output_prefix + ".bin", output_prefix + ".idx"
    tmp_bin, tmp_idx = f"{bin_path}.tmp{os.getpid()}", f"{idx_path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
        builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
    except OSError as err:
        raise ValueError(f"--output-prefix {output_prefix}: cannot write {bin_path} ({err.strerror or err}); choose a "
                         "prefix in a directory this job can write") from None

    texts = (text for path in inputs for text in _iter_texts(path, json_key))
    documents = tokens = skipped = 0
    docs = tokenized(texts, tokenizer, append_eod, workers)
    try:
        for ids in docs:
            if ids.size == 0:
                skipped += 1
                continue
            builder.add_document(ids, [int(ids.size)])
            documents += 1
            tokens += int(ids.size)
        if documents == 0:
            raise ValueError(f"--input {' '.join(inputs)}: no non-empty documents (check --json-keys)")
        builder.finalize(tmp_idx)
        _commit(tmp_bin, tmp_idx, bin_path, idx_path)
    except BaseException:
        docs.close()  # stops worker processes now, not at garbage collection
        builder.data_file.close()
        for path in (tmp_bin, tmp_idx):
            if os.path.exists(path):
                os.remove(path)
        raise
    log.info("wrote %s and %s: %d documents, %d tokens (%s)", bin_path, idx_path, documents, tokens, dtype.__name__)
    return {
        "documents": documents,
        "tokens": tokens,
        "skipped": skipped,
        "dtype": dtype.__name__,
        "bin": bin_path,
        "idx": idx_path,
    }


def stdlib_files(max_files: int | None = None) -> list[str]:
    """The running interpreter's standard-library .py files (no tests, no site-packages), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        found.extend(os.path.join(dirpath, n) for n in filenames if n.endswith(".py"))
    found.sort(key=lambda p: os.path.relpath(p, root))
    return found if max_files is None else found[:max_files]


def stdlib_corpus(out_dir: str, max_files: int | None = None) -> list[str]:
    """Write the stdlib sources as ``<out_dir>/stdlib.jsonl``: a real corpus that needs no download.

    Each line is ``{"text": source, "path": relative path}``; order is deterministic.
    """
    root = sysconfig.get_paths()["stdlib"]
    files = stdlib_files(max_files)
    if not files:
        raise ValueError(f"no standard-library .py files under {root}; use --input with your own text")
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, "stdlib.jsonl")
    tmp = f"{out}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for path in files:
            with open(path, encoding="utf-8", errors="replace") as src:
                text = src.read()
            f.write(json.dumps({"text": text, "path": os.path.relpath(path, root)}) + "\n")
    os.replace(tmp, out)
    return [out]


# ---------------------------------------------------------------------------------------------
# CLI: megatron-grin preprocess
# ---------------------------------------------------------------------------------------------

#: Megatron-LM preprocess_data.py flags with no equivalent here, and what to do instead.
_UNSUPPORTED_FLAGS = {
    "--vocab-file": "save the tokenizer with save_pretrained(DIR) and pass --tokenizer DIR",
    "--merge-file": "save the tokenizer with save_pretrained(DIR) and pass --tokenizer DIR",
    "--split-sentences": "documents are stored whole; drop the flag",
    "--keep-newlines": "text is stored verbatim; drop the flag",
    "--partitions": "pass several --input files instead",
}


def dataset_prefix(output_prefix: str, json_key: str = "text") -> str:
    """Megatron-LM's tools/preprocess_data.py: ``{output_prefix}_{key}_document`` (one sequence per document)."""
    return f"{output_prefix}_{json_key}_document"


def build_parser(prog: str = "megatron-grin preprocess") -> argparse.ArgumentParser:
    """Flags follow Megatron-LM's tools/preprocess_data.py where one exists."""
    p = argparse.ArgumentParser(
        prog=prog,
        allow_abbrev=False,
        description="Tokenize JSONL (.jsonl/.json: one object per line) or plain-text files (one "
        "document per file) into a megatron indexed dataset PREFIX_text_document.bin / .idx.",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="input files, in order")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="writes PREFIX_<json key>_document.bin/.idx, as Megatron-LM's preprocess_data.py; "
                        "train with --data-path PREFIX_text_document")
    p.add_argument("--tokenizer", metavar="byte|DIR", help="'byte' or a local HF tokenizer directory")
    p.add_argument("--tokenizer-model", metavar="DIR", help="Megatron-LM alias of --tokenizer DIR")
    p.add_argument(
        "--tokenizer-type",
        metavar="TYPE",
        help="Megatron-LM alias: HuggingFaceTokenizer (with --tokenizer-model DIR) or byte",
    )
    p.add_argument(
        "--json-keys", "--json-key", dest="json_keys", nargs="+", default=["text"], metavar="KEY",
        help="JSON field holding the text (one key)",
    )
    p.add_argument(
        "--append-eod", action=argparse.BooleanOptionalAction, default=True,
        help="append the end-of-document token to each document (default: on)",
    )
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    return p


def _check_unknown_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    found = [f"{flag} is not supported: {_UNSUPPORTED_FLAGS[flag]}" if flag in _UNSUPPORTED_FLAGS
             else f"unrecognized argument {flag}{hint}" for flag, hint in unknown_flags(parser, argv)]
    if found:
        parser.error("; ".join(found))


def _tokenizer_spec(args: argparse.Namespace) -> str:
    """Resolve --tokenizer and its Megatron-LM aliases into one spec."""
    kind = (args.tokenizer_type or "").lower()
    if kind and kind not in ("byte", "bytetokenizer", "huggingfacetokenizer"):
        raise ValueError(f"--tokenizer-type {args.tokenizer_type}: use byte or HuggingFaceTokenizer")
    spec = args.tokenizer or args.tokenizer_model or ("byte" if kind in ("byte", "bytetokenizer") else None)
    if spec is None:
        raise ValueError("--tokenizer is required: 'byte' or a local tokenizer directory")
    if args.tokenizer and args.tokenizer_model and args.tokenizer != args.tokenizer_model:
        raise ValueError("--tokenizer and --tokenizer-model disagree; pass one of them")
    return spec


def main(argv: Sequence[str] | None = None) -> int:
    """``megatron-grin preprocess``: returns a process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    _check_unknown_flags(parser, argv)
    args = parser.parse_args(argv)
    try:
        if len(args.json_keys) != 1:
            raise ValueError(f"--json-keys takes one key here, got {args.json_keys}; run once per key")
        stats = preprocess(
            args.input,
            dataset_prefix(args.output_prefix, args.json_keys[0]),
            build_tokenizer(_tokenizer_spec(args)),
            json_key=args.json_keys[0],
            append_eod=args.append_eod,
            workers=args.workers,
        )
    except ValueError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {stats['bin']} and {stats['idx']}: {stats['documents']} documents, "
        f"{stats['tokens']} tokens ({stats['dtype']}), {stats['skipped']} empty skipped; "
        f"train with --data-path {stats['bin'][:-4]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
