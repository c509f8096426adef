"""Data pipeline: preprocess -> .bin/.idx -> megatron GPT datasets -> resumable batches (CPU, small)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig

import numpy
import pytest
import torch

from megatron_grin.training import data, data_files
from megatron_grin.training import preprocess as preprocess_cli
from megatron_grin.training.tokenizer import ByteTokenizer, MegatronTokenizerAdapter, build_tokenizer

EOD = 256  # ByteTokenizer's end-of-document id

DOCS = [
    "def f(x):\n    return x + 1\n",
    "héllo wörld — unicode ✓",
    "",  # empty: skipped
    "the quick brown fox jumps over the lazy dog " * 3,
]
TXT = "plain text file\nis one document\n"


def _reference_ids(text: str) -> list[int]:
    """Independent of the tokenizer under test: UTF-8 bytes then EOD."""
    return list(text.encode("utf-8")) + [EOD]


def _write_jsonl(path, texts, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t, "meta": 1}) + "\n")
    return str(path)


def _read_docs(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def _corpus(tmp_path, name="corpus", n_docs=40, seed=0) -> tuple[str, list[list[int]]]:
    rng = numpy.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    texts = [f"{name} doc {i}: " + " ".join(rng.choice(words, size=int(rng.integers(3, 30)))) for i in range(n_docs)]
    src = _write_jsonl(tmp_path / f"{name}.jsonl", texts)
    prefix = str(tmp_path / "ds" / name)
    preprocess_cli.preprocess([src], prefix, ByteTokenizer())
    return prefix, [_reference_ids(t) for t in texts]


# ------------------------------------------------------------------ tokenizers


def test_byte_tokenizer_roundtrip_and_specials():
    tok = build_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eod, tok.bos, tok.pad) == (259, 256, 257, 258)
    text = "naïve ✓ text"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text) + [tok.eod]) == text


def test_megatron_adapter_exposes_what_gpt_dataset_reads():
    adapter = MegatronTokenizerAdapter(ByteTokenizer())
    assert (adapter.vocab_size, adapter.eod, adapter.eos, adapter.pad) == (259, 256, 256, 258)
    assert json.dumps(adapter.unique_identifiers)  # folded into megatron's cache hash


def _make_hf_tokenizer_dir(path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<eos>": 1, "<pad>": 2, "hello": 3, "world": 4, "grin": 5, "moe": 6}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="<eos>", pad_token="<pad>")
    hf.save_pretrained(str(path))
    return str(path)


def test_hf_tokenizer_from_local_dir_preprocesses(tmp_path):
    tok = build_tokenizer(_make_hf_tokenizer_dir(tmp_path / "tok"))
    assert (tok.vocab_size, tok.eod, tok.pad) == (7, 1, 2)
    assert tok.encode("hello grin world") == [3, 5, 4]
    assert tok.decode([3, 5]) == "hello grin"
    src = _write_jsonl(tmp_path / "hf.jsonl", ["hello world", "moe grin unknownword"])
    stats = preprocess_cli.preprocess([src], str(tmp_path / "hf"), tok)
    assert stats["dtype"] == "uint16"
    assert _read_docs(str(tmp_path / "hf")) == [[3, 4, 1], [6, 5, 0, 1]]


def test_hf_tokenizer_missing_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        build_tokenizer(str(tmp_path / "nope"))


# ------------------------------------------------------------------ preprocess


def test_preprocess_jsonl_and_txt_match_independent_tokenization(tmp_path):
    jsonl = _write_jsonl(tmp_path / "in.jsonl", DOCS)
    txt = tmp_path / "in.txt"
    txt.write_text(TXT, encoding="utf-8")
    prefix = str(tmp_path / "out" / "mix")
    stats = preprocess_cli.preprocess([jsonl, str(txt)], prefix, ByteTokenizer())

    expected = [_reference_ids(t) for t in DOCS if t] + [_reference_ids(TXT)]
    assert _read_docs(prefix) == expected
    assert stats["documents"] == 4 and stats["skipped"] == 1 and stats["dtype"] == "uint16"
    assert stats["tokens"] == sum(map(len, expected))
    assert sorted(os.listdir(tmp_path / "out")) == ["mix.bin", "mix.idx"]  # no temp files left


def test_preprocess_without_eod_and_with_other_json_key(tmp_path):
    src = _write_jsonl(tmp_path / "in.jsonl", ["abc", "de"], key="content")
    preprocess_cli.preprocess([src], str(tmp_path / "o"), ByteTokenizer(), json_key="content", append_eod=False)
    assert _read_docs(str(tmp_path / "o")) == [[97, 98, 99], [100, 101]]


def test_preprocess_failure_keeps_previous_dataset_and_leaves_no_temp_files(tmp_path):
    prefix = str(tmp_path / "o")
    preprocess_cli.preprocess([_write_jsonl(tmp_path / "good.jsonl", ["good"])], prefix, ByteTokenizer())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        preprocess_cli.preprocess([str(bad)], prefix, ByteTokenizer())
    assert _read_docs(prefix) == [_reference_ids("good")]
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "good.jsonl", "o.bin", "o.idx"]


def test_preprocess_missing_key_names_flag(tmp_path):
    src = _write_jsonl(tmp_path / "in.jsonl", ["x"], key="body")
    with pytest.raises(ValueError, match="--json-keys"):
        preprocess_cli.preprocess([src], str(tmp_path / "o"), ByteTokenizer())


def test_preprocess_with_two_workers_matches_one(tmp_path):
    src = _write_jsonl(tmp_path / "in.jsonl", [f"doc {i} " * i for i in range(1, 40)])
    preprocess_cli.preprocess([src], str(tmp_path / "one"), ByteTokenizer(), workers=1)
    preprocess_cli.preprocess([src], str(tmp_path / "two"), ByteTokenizer(), workers=2)
    assert _read_docs(str(tmp_path / "one")) == _read_docs(str(tmp_path / "two"))


def test_stdlib_corpus_is_a_real_offline_corpus(tmp_path):
    files = preprocess_cli.stdlib_files()
    assert len(files) > 100
    assert not any(f"{os.sep}test{os.sep}" in f or "site-packages" in f for f in files)
    (path,) = preprocess_cli.stdlib_corpus(str(tmp_path), max_files=3)
    with open(path, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    root = sysconfig.get_paths()["stdlib"]
    assert [d["path"] for d in lines] == [os.path.relpath(p, root) for p in files[:3]]
    assert all(isinstance(d["text"], str) for d in lines)


# ------------------------------------------------------------------ --data-path validation


def test_validate_accepts_prefixes_and_weighted_pairs(tmp_path):
    a, _ = _corpus(tmp_path, "a", n_docs=5)
    b, _ = _corpus(tmp_path, "b", n_docs=5)
    assert data_files.validate_data_path([a, b]) == ([a, b], None)
    assert data_files.validate_data_path(["0.3", a, "0.7", b]) == ([a, b], [0.3, 0.7])
    assert data_files.validate_data_path(f"1 {a} 3 {b}") == ([a, b], [1.0, 3.0])


def _damage(prefix: str, how: str) -> str:
    """Break the dataset at prefix; return the file the error must name."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    if how == "missing-bin":
        os.remove(bin_)
        return bin_
    if how == "missing-idx":
        os.remove(idx)
        return idx
    if how == "truncated-idx":
        with open(idx, "r+b") as f:
            f.truncate(os.path.getsize(idx) - 5)
        return idx
    if how == "garbage-idx":
        with open(idx, "wb") as f:
            f.write(b"\x00garbage, not an index" * 4)
        return idx
    if how == "empty-idx":
        open(idx, "wb").close()
        return idx
    if how == "truncated-bin":
        with open(bin_, "r+b") as f:
            f.truncate(os.path.getsize(bin_) - 2)
        return bin_
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["missing-bin", "missing-idx", "truncated-idx", "garbage-idx", "empty-idx", "truncated-bin"]
)
def test_validate_names_the_broken_file_and_the_fix(tmp_path, how):
    good, _ = _corpus(tmp_path, "good", n_docs=3)
    bad, _ = _corpus(tmp_path, "bad", n_docs=3)
    named = _damage(bad, how)
    with pytest.raises(ValueError) as err:
        data_files.validate_data_path(["0.5", good, "0.5", bad])
    assert named in str(err.value) and "megatron-grin preprocess" in str(err.value)


def test_validate_rejects_malformed_lists(tmp_path):
    a, _ = _corpus(tmp_path, "a", n_docs=3)
    with pytest.raises(ValueError, match="weight/prefix pairs"):
        data_files.validate_data_path(["0.3", a, a])
    with pytest.raises(ValueError, match="without .bin"):
        data_files.validate_data_path([a + ".bin"])
    with pytest.raises(ValueError, match="--data-path is empty"):
        data_files.validate_data_path([])


# ------------------------------------------------------------------ GPT datasets


def _in_order(ds) -> list[dict]:
    """Samples in sample-index order (undo megatron's shuffle index)."""
    return [ds[int(i)] for i in numpy.argsort(ds.shuffle_index, kind="stable")]


def test_gpt_dataset_one_epoch_reproduces_the_corpus(tmp_path):
    prefix, docs = _corpus(tmp_path, n_docs=30)
    seq = 16
    train, valid, test = data.build_datasets([prefix], "1,0,0", seq, 1234, 1, 0, 0, ByteTokenizer())
    assert valid is None and test is None
    assert sorted(train.document_index.tolist()) == list(range(len(docs)))  # exactly one epoch

    stream: list[int] = []
    for sample in _in_order(train):
        assert sample["tokens"].shape == (seq,) and sample["labels"].shape == (seq,)
        assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
        text = sample["tokens"].tolist() + sample["labels"][-1:].tolist()  # seq_length + 1 tokens
        stream += text if not stream else text[1:]  # consecutive samples share one token
    expected = [t for d in train.document_index for t in docs[d]]
    assert stream == expected[: len(stream)]
    assert len(expected) - len(stream) < seq  # only the final partial sample is dropped


def test_split_fractions_partition_documents(tmp_path):
    prefix, _ = _corpus(tmp_path, n_docs=20)
    train, valid, test = data.build_datasets(prefix, "70,20,10", 8, 1, 10, 4, 2, ByteTokenizer())
    assert set(train.indices) == set(range(14)) and set(valid.indices) == set(range(14, 18))
    assert set(test.indices) == {18, 19}
    assert len(train) >= 10 and len(valid) >= 4 and len(test) >= 2


def test_blended_weighted_data_path_builds(tmp_path):
    a, _ = _corpus(tmp_path, "a", n_docs=20, seed=1)
    b, _ = _corpus(tmp_path, "b", n_docs=20, seed=2)
    train, valid, _ = data.build_datasets(["0.25", a, "0.75", b], "90,10,0", 8, 7, 40, 8, 0, ByteTokenizer())
    assert len(train) == 40 and len(valid) == 8
    ids = numpy.array([int(train[i]["dataset_id"]) for i in range(len(train))])
    assert (ids == 0).sum() == 10 and (ids == 1).sum() == 30


def test_mock_data_needs_no_files():
    train, valid, test = data.build_datasets(None, "", 32, 0, 8, 4, 4, ByteTokenizer(), mock=True)
    sample = train[0]
    assert sample["tokens"].shape == (32,) and int(sample["tokens"].max()) < 259
    assert len(valid) >= 4 and len(test) >= 4


def test_empty_split_fails_fast_instead_of_hanging(tmp_path):
    prefix, _ = _corpus(tmp_path, n_docs=5)
    with pytest.raises(ValueError, match="--split"):
        data.build_datasets([prefix], "98,2,0", 8, 0, 10, 5, 0, ByteTokenizer())
    with pytest.raises(ValueError, match="--split"):
        data.build_datasets([prefix], "98,x", 8, 0, 10, 5, 0, ByteTokenizer())


def test_small_data_with_the_default_split_builds_instead_of_hanging(tmp_path):
    """100 documents, --split 969,30,1: the test split gets none. megatron-core 0.16 built it anyway (0 samples
    asked) and looped forever in _get_num_epochs (in a worker thread for a blend); a split asked for no samples is
    now not built. Run in a child process, so that a regression fails by timeout instead of hanging the suite."""
    prefix, _ = _corpus(tmp_path, "small", n_docs=100)
    other, _ = _corpus(tmp_path, "other", n_docs=300, seed=3)
    script = (
        "import sys\n"
        "from megatron_grin.training import data\n"
        "from megatron_grin.training.tokenizer import ByteTokenizer\n"
        f"for path in ([{prefix!r}], ['0.5', {prefix!r}, '0.5', {other!r}]):\n"
        "    train, valid, test = data.build_datasets(path, '969, 30, 1', 16, 0, 20, 4, 0, ByteTokenizer())\n"
        "    print('BUILT', len(train), len(valid), test, flush=True)\n")
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        pytest.fail("build_datasets hung on a split with no documents")
    built = [line.split() for line in proc.stdout.splitlines() if line.startswith("BUILT")]
    assert len(built) == 2, proc.stderr[-3000:]
    assert all(int(t) >= 20 and int(v) >= 4 and test == "None" for _, t, v, test in built)


def test_split_arithmetic_is_megatrons():
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    for split in ("969, 30, 1", "98,2,0", "1,0,0", "70,20,10", "0,1,0", "1/1/1", "5"):
        ours = data_files.split_bookends(data_files.parse_split(split))
        theirs = convert_split_vector_to_split_matrix(parse_and_normalize_split(split.replace("/", ",")))
        assert ours == [tuple(t) if t else None for t in theirs], split  # the same sums in the same order
        for n in (1, 7, 33, 100, 499, 500, 1001):  # megatron's rounding (_build_megatron_dataset_splits)
            for ends in theirs:
                want = 0 if ends is None else int(round(ends[1] * n)) - int(round(ends[0] * n))
                assert data_files.split_documents(n, ends) == want


def test_every_blend_component_needs_documents_where_samples_are_drawn(tmp_path):
    big, _ = _corpus(tmp_path, "big", n_docs=200)
    tiny, _ = _corpus(tmp_path, "tiny", n_docs=10, seed=4)
    infos = [data_files.read_idx_info(p) for p in (big, tiny)]
    problems = data_files.check_splits(infos, [0.9, 0.1], "969, 30, 1", (40, 8, 0))
    assert len(problems) == 1 and f"the valid split of {tiny} (blend weight 0.1) gets 0 of its 10" in problems[0]
    assert "--eval-iters 0" in problems[0]
    assert data_files.check_splits(infos, [0.9, 0.1], "969, 30, 1", (40, 0, 0)) == []  # no validation: fine
    with pytest.raises(ValueError, match=f"the valid split of {tiny}"):
        data.build_datasets(["0.9", big, "0.1", tiny], "969, 30, 1", 16, 0, 40, 8, 0, ByteTokenizer())


def test_token_ids_beyond_the_vocabulary_are_found(tmp_path):
    prefix, _ = _corpus(tmp_path, n_docs=30)
    assert data_files.check_token_ids(prefix, 259) == []  # bytes and eod (256) fit the byte tokenizer
    assert "holds token id 256, outside this run's vocabulary of 200" in data_files.check_token_ids(prefix, 200)[0]
    tokens = numpy.memmap(prefix + ".bin", dtype=numpy.uint16, mode="r+")
    tokens[len(tokens) // 3] = 5000  # one bad id in the middle of the corpus
    tokens.flush()
    assert "holds token id 5000" in data_files.check_token_ids(prefix, 259)[0]


def test_an_inconsistent_index_is_found(tmp_path):
    prefix, _ = _corpus(tmp_path, n_docs=30)
    assert data_files.check_index_order(prefix) == []
    lengths = numpy.memmap(prefix + ".idx", dtype=numpy.int32, mode="r+", offset=34, shape=(30,))
    lengths[[3, 4]] = lengths[[4, 3]]  # two documents' lengths swapped, offsets left: a reordered index
    lengths.flush()
    data_files.read_idx_info(prefix)  # the header and the ends still agree ...
    assert "inconsistent at sequence 4" in data_files.check_index_order(prefix)[0]  # ... the order does not


def test_repreprocessing_a_prefix_does_not_reuse_stale_indices(tmp_path):
    prefix, _ = _corpus(tmp_path, n_docs=10, seed=0)
    first, _, _ = data.build_datasets([prefix], "1,0,0", 8, 0, 5, 0, 0, ByteTokenizer())
    src = _write_jsonl(tmp_path / "new.jsonl", ["Z" * 30] * 3)
    preprocess_cli.preprocess([src], prefix, ByteTokenizer())
    second, _, _ = data.build_datasets([prefix], "1,0,0", 8, 0, 5, 0, 0, ByteTokenizer())
    assert sorted(second.document_index.tolist()) == [0, 1, 2]
    assert set(second[0]["tokens"].tolist()) <= {ord("Z"), EOD}


def test_helpers_are_available_and_missing_build_tools_are_explained(monkeypatch):
    data.ensure_helpers()
    import importlib
    import shutil

    real = importlib.import_module

    def no_helpers(name, *a, **k):
        if name.endswith("helpers_cpp"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", no_helpers)
    monkeypatch.setattr(shutil, "which", lambda _: None)
    with pytest.raises(RuntimeError, match="helpers_cpp"):
        data.ensure_helpers()


# ------------------------------------------------------------------ batches and resume


def _batches(it, n):
    return [data.get_batch(it)["tokens"] for _ in range(n)]


def test_resumed_iterator_yields_the_same_batches(tmp_path):
    prefix, _ = _corpus(tmp_path, n_docs=30)
    train, _, _ = data.build_datasets([prefix], "1,0,0", 8, 3, 40, 0, 0, ByteTokenizer())
    mbs, dp, k = 2, 2, 12  # k consumed samples = 3 global micro-batches
    for rank in range(dp):
        full = _batches(data.make_data_iterator(train, mbs, 0, rank, dp), 8)
        resumed = _batches(data.make_data_iterator(train, mbs, k, rank, dp), 5)
        assert all(torch.equal(x, y) for x, y in zip(full[k // (mbs * dp):], resumed))


def test_sampler_partitions_global_batches_across_dp_ranks():
    samplers = [data.PretrainingSampler(22, 4, 2, r, 2) for r in range(2)]
    steps = list(zip(*samplers))
    assert [a + b for a, b in steps] == [[4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15], [16, 17, 18, 19]]
    assert len(samplers[0]) == 4
    cyclic = iter(data.PretrainingSampler(10, 8, 2, 0, 1, cyclic=True))
    assert [next(cyclic) for _ in range(3)] == [[8, 9], [0, 1], [2, 3]]
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        data.PretrainingSampler(22, 3, 2, 0, 2)
    with pytest.raises(ValueError, match="--train-samples"):
        data.PretrainingSampler(22, 20, 2, 0, 2)


def test_get_batch_shapes_and_dtypes():
    train, _, _ = data.build_datasets(None, "", 16, 0, 8, 0, 0, ByteTokenizer(), mock=True)
    batch = data.get_batch(data.make_data_iterator(train, 4, 0, 0, 1), device="cpu")
    assert batch["tokens"].shape == batch["labels"].shape == batch["position_ids"].shape == (4, 16)
    assert batch["tokens"].dtype == torch.int64 and batch["loss_mask"].dtype == torch.float32
    assert batch["attention_mask"].shape == (4, 1, 16, 16) and batch["attention_mask"].dtype == torch.bool
    assert data.get_batch(None) is None and data.make_data_iterator(None, 1, 0, 0, 1) is None


# ------------------------------------------------------------------ CLI


def test_cli_preprocess_writes_dataset(tmp_path, capsys):
    src = _write_jsonl(tmp_path / "in.jsonl", ["ab", "c"])
    prefix = str(tmp_path / "cli")
    rc = preprocess_cli.main(["--input", src, "--output-prefix", prefix, "--tokenizer", "byte", "--json-keys", "text"])
    assert rc == 0 and "2 documents" in capsys.readouterr().out
    assert _read_docs(prefix + "_text_document") == [[97, 98, EOD], [99, EOD]]  # Megatron-LM's naming
    rc = preprocess_cli.main(["--input", src, "--output-prefix", prefix, "--tokenizer-type", "byte", "--no-append-eod"])
    assert rc == 0 and _read_docs(prefix + "_text_document") == [[97, 98], [99]]


@pytest.mark.parametrize(
    "flag, hint",
    [("--output-prefx", "did you mean --output-prefix"), ("--vocab-file", "--tokenizer DIR")],
)
def test_cli_unknown_flag_suggests_the_nearest(tmp_path, capsys, flag, hint):
    with pytest.raises(SystemExit) as err:
        preprocess_cli.main(["--input", "x.jsonl", flag, "p", "--tokenizer", "byte"])
    assert err.value.code == 2 and hint in capsys.readouterr().err


def test_cli_reports_value_errors_without_traceback(tmp_path, capsys):
    rc = preprocess_cli.main(["--input", str(tmp_path / "missing.jsonl"), "--output-prefix", "p", "--tokenizer", "byte"])
    assert rc == 2 and "missing.jsonl: no such file" in capsys.readouterr().err


def test_index_format_constants_match_megatron_core():
    """data_files restates megatron-core's .idx header and dtype codes so that flag checks need no megatron."""
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

    assert data_files.INDEX_HEADER == _INDEX_HEADER
    for code, dtype in data_files.DTYPE_CODES.items():
        assert DType.dtype_from_code(code) == dtype


def test_pretrain_on_a_tiny_corpus_trains_or_says_why_not(tmp_path):
    """With the default --split, 10 documents leave the valid split empty: refused before the model is built
    when validation is on, trained when it is off (no hang either way)."""
    prefix, _ = _corpus(tmp_path, "tiny", n_docs=10)
    base = [sys.executable, "-m", "megatron_grin", "pretrain", "--model-preset", "test", "--data-path", prefix,
            "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2",
            "--log-interval", "1", "--data-cache-path", str(tmp_path / "cache")]
    run = dict(capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    refused = subprocess.run([*base, "--eval-interval", "1", "--eval-iters", "1"], **run)
    assert refused.returncode == 2 and f"the valid split of {prefix} gets 0 of its 10 documents" in refused.stderr
    assert "iter " not in refused.stdout and "Traceback" not in refused.stderr
    trained = subprocess.run([*base, "--eval-iters", "0"], **run)
    assert trained.returncode == 0 and "iter       2/2" in trained.stdout, trained.stderr[-3000:]


def test_a_split_without_a_train_share_is_refused_before_anything_is_built(tmp_path):
    """--split 0,100,0 used to pass every check and end in a TypeError at the first forward step."""
    prefix, _ = _corpus(tmp_path, n_docs=50)
    with pytest.raises(ValueError, match="the train share is 0"):
        data.build_datasets([prefix], "0,100,0", 8, 0, 10, 5, 0, ByteTokenizer())


def test_the_dry_run_makes_the_run_s_preflight_checks_and_creates_nothing(tmp_path, capsys):
    """What the real run refuses in its first seconds, --dry-run refuses too: bad --split, an output path that is
    a file; and a dry run creates no directory."""
    from megatron_grin.training.pretrain import main

    prefix, _ = _corpus(tmp_path, n_docs=50)
    base = ["--model-preset", "test", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--train-iters", "2", "--eval-iters", "0", "--tokenizer", "byte", "--data-path", prefix, "--dry-run"]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert main([*base, "--split", "0,100,0"]) == 2
    assert "the train share is 0" in capsys.readouterr().err
    assert main([*base, "--split", "a,b,c"]) == 2
    assert "--split 'a,b,c'" in capsys.readouterr().err
    assert main([*base, "--save", str(a_file)]) == 2
    assert f"--save {a_file}: {a_file} is not a directory" in capsys.readouterr().err
    fresh = tmp_path / "new" / "save"
    assert main([*base, "--save", str(fresh)]) == 0
    assert "the configuration is valid" in capsys.readouterr().out and not (tmp_path / "new").exists()


def test_preprocess_names_an_unwritable_output_and_a_non_utf8_line(tmp_path, capsys):
    src = _write_jsonl(tmp_path / "in.jsonl", ["one", "two"])
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    argv = ["--input", str(src), "--tokenizer", "byte", "--output-prefix"]
    assert preprocess_cli.main([*argv, str(a_file / "x")]) == 2
    assert "--output-prefix" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n\xff\xfe{"text": "x"}\n')
    assert preprocess_cli.main(["--input", str(bad), "--tokenizer", "byte", "--output-prefix",
                                str(tmp_path / "out" / "c")]) == 2
    assert f"--input {bad}:2: not UTF-8 text" in capsys.readouterr().err
    assert not [n for n in os.listdir(tmp_path / "out") if ".tmp" in n]
