"""The checkpoint records the training tokenizer; `convert to-hf` then writes its files and special-token ids
without being told again (the ids are checked against the tokenizer itself, read with transformers)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = ["--model-preset", "test", "--seq-length", "16", "--micro-batch-size", "1", "--global-batch-size", "1",
         "--train-iters", "0", "--eval-iters", "0"]


def cli(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "megatron_grin", *args], capture_output=True, text=True,
                          timeout=900, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tok")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "grin": 4, "<pad>": 5}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(str(path))
    return str(path)


def test_to_hf_writes_the_recorded_hf_tokenizer(tmp_path, hf_tokenizer):
    from transformers import AutoTokenizer

    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": "hello grin " * 30}) + "\n" for _ in range(20)))
    cli("preprocess", "--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "corpus"),
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_tokenizer)
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    cli("pretrain", *TRAIN, "--data-path", str(tmp_path / "corpus_text_document"), "--split", "100,0,0",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_tokenizer, "--save", ckpt)
    with open(os.path.join(ckpt, "iter_0000000", "grin_config.json")) as f:
        assert json.load(f)["tokenizer"] == os.path.abspath(hf_tokenizer)
    cli("convert", "to-hf", "--load", ckpt, "--out", out)  # no --tokenizer
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(hf_tokenizer)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert AutoTokenizer.from_pretrained(out).encode("hello grin") == tok.encode("hello grin")


@pytest.mark.slow
def test_to_hf_uses_the_byte_tokenizers_ids(tmp_path):
    from megatron_grin.training.tokenizer import ByteTokenizer

    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    cli("pretrain", *TRAIN, "--mock-data", "--save", ckpt)
    cli("convert", "to-hf", "--load", ckpt, "--out", out)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    byte = ByteTokenizer()
    assert (config["bos_token_id"], config["eos_token_id"], config["vocab_size"]) == (byte.bos, byte.eod, 259)
