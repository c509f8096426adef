"""Tokenizers for data preparation and training: a built-in byte tokenizer and local HF tokenizers.

Both expose the same small surface (``vocab_size``, ``eod``, ``bos``, ``pad``, ``encode``,
``decode``, ``spec``), and :class:`MegatronTokenizerAdapter` presents either one in the shape
megatron-core's datasets read from ``GPTDatasetConfig.tokenizer``.

    tok = build_tokenizer("byte")              # no files needed: ids 0..255 are raw UTF-8 bytes
    tok = build_tokenizer("/models/grin-tok")  # a local directory saved by save_pretrained()
    tok = build_tokenizer("null:128256")       # Megatron-LM's NullTokenizer (pre-tokenized or mock data)

The spec string is what a checkpoint records (GrinConfig.tokenizer), so `convert to-hf` can rebuild it.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Protocol, Sequence, runtime_checkable

import numpy

#: The value megatron-core's datasets use for "no pad token" (megatron_dataset._PAD_TOKEN_ID).
MEGATRON_NO_PAD = -1


@runtime_checkable
class Tokenizer(Protocol):
    """What data prep and the trainer rely on."""

    spec: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def eod(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then eod, bos, pad.

    Needs no vocabulary file, so the demo, tests and CI can tokenize real text offline.
    """

    spec = "byte"
    _NUM_BYTES = 256

    @property
    def eod(self) -> int:
        return self._NUM_BYTES

    @property
    def bos(self) -> int:
        return self._NUM_BYTES + 1

    @property
    def pad(self) -> int:
        return self._NUM_BYTES + 2

    @property
    def vocab_size(self) -> int:
        return self._NUM_BYTES + 3

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> numpy.ndarray:
        """Fast path for preprocessing large files (no per-token Python ints)."""
        return numpy.frombuffer(text.encode("utf-8"), dtype=numpy.uint8)

    def decode(self, ids: Sequence[int]) -> str:
        # Special tokens have no bytes; drop them rather than fail on round-trips of training data.
        data = bytes(int(i) for i in ids if 0 <= int(i) < self._NUM_BYTES)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, eod={self.eod})"


class NullTokenizer:
    """Megatron-LM's NullTokenizer: no vocabulary, ids are the data's; ``--vocab-size N`` gives N + 1 ids, eod = N.

    Text "1 2 3" encodes to [1, 2, 3], as Megatron-LM's does (pre-tokenized data, mock data, benchmarks).
    """

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 1:
            raise ValueError(f"NullTokenizer needs --vocab-size >= 1, got {vocab_size}")
        self._n = int(vocab_size)
        self.spec = f"null:{self._n}"

    @property
    def vocab_size(self) -> int:
        return self._n + 1

    @property
    def eod(self) -> int:
        return self._n

    bos = None
    pad = None

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def __repr__(self) -> str:
        return f"NullTokenizer(vocab_size={self.vocab_size}, eod={self.eod})"


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local directory (never the network, never remote code)."""

    def __init__(self, path: str) -> None:
        if not os.path.isdir(path):
            raise ValueError(
                f"tokenizer directory {path!r} does not exist. Pass --tokenizer byte, or a local "
                "directory containing tokenizer.json / tokenizer_config.json (for example one "
                "written by `AutoTokenizer.from_pretrained(name).save_pretrained(DIR)`)."
            )
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
        except Exception as err:  # transformers raises OSError/ValueError/KeyError variously
            raise ValueError(
                f"could not load a tokenizer from {path!r}: {err}. The directory needs the files "
                "written by `tokenizer.save_pretrained(DIR)`; remote code is not allowed."
            ) from err
        self.spec = os.path.abspath(path)
        eos = self._tok.eos_token_id
        if eos is None:
            raise ValueError(
                f"tokenizer in {path!r} has no eos_token, which megatron-grin uses as the "
                "end-of-document token. Set \"eos_token\" in its tokenizer_config.json."
            )
        self._eod = int(eos)

    @property
    def vocab_size(self) -> int:
        # len() counts added tokens; the HF .vocab_size attribute does not.
        return len(self._tok)

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def bos(self) -> int | None:
        return self._tok.bos_token_id

    @property
    def pad(self) -> int | None:
        return self._tok.pad_token_id

    @property
    def hf_tokenizer(self):
        """The wrapped transformers tokenizer, for callers that need more than encode/decode."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        # No BOS/EOS here: document boundaries are added explicitly by preprocess (append_eod).
        return self._tok.encode(text, add_special_tokens=False, verbose=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"HFTokenizer({self.spec!r}, vocab_size={self.vocab_size}, eod={self.eod})"


def build_tokenizer(spec: str) -> ByteTokenizer | NullTokenizer | HFTokenizer:
    """"byte" selects :class:`ByteTokenizer`, "null:N" :class:`NullTokenizer`; anything else is a local directory."""
    if not isinstance(spec, str) or not spec:
        raise ValueError("--tokenizer must be 'byte' or a local tokenizer directory, got an empty value")
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("null:"):
        return NullTokenizer(int(spec[5:]))
    return HFTokenizer(spec)


def static_vocab_size(spec: str) -> int | None:
    """The vocabulary of a tokenizer that needs no files (byte, null:N), else None (read the directory)."""
    if spec == "byte":
        return ByteTokenizer().vocab_size
    if spec.startswith("null:"):
        return int(spec[5:]) + 1
    return None


#: files save_pretrained() writes, one of which a Hugging Face tokenizer directory must have
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def tokenizer_dir_problem(path: str) -> str | None:
    """Cheap check of a tokenizer directory (no transformers import): why it cannot be one, or None."""
    if not os.path.isdir(path):
        if os.path.isfile(path):
            return (f"tokenizer {path} is a file; megatron-grin reads a Hugging Face tokenizer directory: "
                    "AutoTokenizer.from_pretrained(...).save_pretrained(DIR), then --tokenizer-model DIR")
        return f"tokenizer directory {path} does not exist"
    if not any(os.path.isfile(os.path.join(path, name)) for name in HF_TOKENIZER_FILES):
        return (f"tokenizer directory {path} has none of {', '.join(HF_TOKENIZER_FILES)}; write it with "
                "tokenizer.save_pretrained(DIR)")
    return None


class MegatronTokenizerAdapter:
    """Presents our tokenizers the way megatron-core's GPTDataset/MegatronDataset read them.

    megatron-core 0.16.1 reads ``vocab_size`` (token dtype), ``eod`` (masks, mock data), ``pad``
    (padding, via try/except), ``eos`` (pad-collision check) and ``unique_identifiers`` (folded
    into the dataset cache hash). A pad id that is missing or equals eod is reported as -1,
    megatron's own "no pad" value, so genuine eod tokens are never masked out as padding.
    """

    def __init__(self, tokenizer: ByteTokenizer | NullTokenizer | HFTokenizer) -> None:
        self.tokenizer = tokenizer
        self.unique_identifiers = OrderedDict(
            [("class", type(tokenizer).__name__), ("spec", tokenizer.spec), ("vocab_size", tokenizer.vocab_size)]
        )

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def eod(self) -> int:
        return self.tokenizer.eod

    @property
    def eos(self) -> int:
        return self.tokenizer.eod

    @property
    def bos(self) -> int | None:
        return getattr(self.tokenizer, "bos", None)

    @property
    def pad(self) -> int:
        pad = getattr(self.tokenizer, "pad", None)
        if pad is None or pad == self.eod:
            return MEGATRON_NO_PAD
        return int(pad)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def __repr__(self) -> str:
        return f"MegatronTokenizerAdapter({self.tokenizer!r})"
