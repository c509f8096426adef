"""megatron-grin convert on bad inputs and bad luck: NaN weights, a conversion killed with -9, a full disk."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
from grin_testing import hf_reference
from safetensors.torch import load_file, save_file

from megatron_grin import ckpt_format, ckpt_integrity
from megatron_grin.config import preset
from megatron_grin.convert import cli as convert

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _leftovers(path: str) -> list[str]:
    parent, base = os.path.split(os.path.abspath(path))
    return [n for n in os.listdir(parent) if n.startswith(f".{base}.tmp-")]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    cfg = preset("test", hidden_size=48, ffn_hidden_size=40, num_experts=5, vocab_size=259, sliding_window=6)
    path = str(tmp_path_factory.mktemp("hf") / "phimoe")
    hf_reference(cfg, seed=3).save_pretrained(path, safe_serialization=True, max_shard_size="200KB")
    return path


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    save = str(tmp_path_factory.mktemp("ckpt") / "ckpt")
    assert convert.main(["from-hf", "--hf", hf_dir, "--save", save]) == 0
    return save


def test_from_hf_writes_a_manifest_the_trainer_verifies(converted):
    iter_dir = ckpt_format.iteration_dir(converted, 0)
    manifest = ckpt_integrity.read_manifest(iter_dir)
    assert manifest["run_id"].startswith("convert-from-hf") and ckpt_integrity.checkpoint_problems(iter_dir) == []
    assert set(manifest["files"]) == set(os.listdir(iter_dir)) - {ckpt_format.MANIFEST_NAME}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_from_hf_refuses_non_finite_weights(hf_dir, tmp_path, capsys, bad):
    import shutil

    broken = str(tmp_path / "broken")
    shutil.copytree(hf_dir, broken)
    shard = sorted(glob.glob(os.path.join(broken, "model-*.safetensors")))[-1]
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[3] = bad
    save_file(tensors, shard, metadata={"format": "pt"})
    save = str(tmp_path / "out")
    assert convert.main(["from-hf", "--hf", broken, "--save", save]) == 1
    err = capsys.readouterr().err
    assert f"{broken}: {name} holds 1 NaN/inf value(s)" in err, err
    assert not os.path.exists(save) and not _leftovers(save)


def test_a_killed_conversion_leaves_nothing_behind(converted, tmp_path, capsys):
    """kill -9 mid-conversion leaves a model-sized temporary directory; the next conversion to that output
    removes it (its process is gone), and nothing else of the killed process survives."""
    out = str(tmp_path / "hf")
    proc = subprocess.Popen([sys.executable, "-m", "megatron_grin", "convert", "to-hf", "--load", converted, "--out",
                             out, "--verify"], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not _leftovers(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    caught = bool(_leftovers(out))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert caught, "the conversion ended before it could be killed"
    assert _leftovers(out) and not os.path.exists(out)
    assert convert.main(["to-hf", "--load", converted, "--out", out]) == 0
    assert "left by a conversion that was killed" in capsys.readouterr().err
    assert not _leftovers(out) and os.path.isfile(os.path.join(out, "config.json"))


@pytest.mark.parametrize("size", ["abc", "1e3", "0", "-5", "0.5B"])
def test_bad_max_shard_size_is_a_usage_error(size, capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert.build_parser().parse_args(["to-hf", "--load", "CK", "--out", "D", f"--max-shard-size={size}"])
    assert exit_info.value.code == 2
    assert "argument --max-shard-size:" in capsys.readouterr().err
    args = convert.build_parser().parse_args(["to-hf", "--load", "CK", "--out", "D", "--max-shard-size", "2GiB"])
    assert args.max_shard_size == 2 * 2**30
