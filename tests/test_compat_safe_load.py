"""compat.py's security accommodations: every file we or megatron read on load is planted with a pickle that
would run code, and nothing runs.

Each plant's payload would create a marker file; every test asserts the marker never appears. Where a test
says "live", the same file is opened by unpatched torch/megatron/numpy in a fresh interpreter and the marker
*does* appear: the plant is real and only the accommodation stops it. Real checkpoints (megatron's
dist_checkpointing and the trainer's) still load.
"""

import collections
import io
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from megatron_grin import ckpt_integrity, compat
from megatron_grin.ckpt_format import MANIFEST_NAME, CheckpointError
from megatron_grin.ckpt_integrity import UnsafeFileError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TINY = ["--model-preset", "test", "--mock-data", "--seq-length", "32", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--lr", "1e-3", "--log-interval", "1", "--eval-iters", "0", "--seed", "7"]


class Payload:
    """Unpickling this runs a shell command (what an attacker plants)."""

    def __init__(self, marker):
        self.cmd = f"touch {marker}"

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _run_unpatched(code: str) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter that never imports megatron_grin (to show a plant is live)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=ENV,
                          timeout=300)


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_grin", *args], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=600)


class Tracer(pickle.Unpickler):
    def __init__(self, f):
        super().__init__(f)
        self.seen = collections.Counter()

    def find_class(self, module, name):
        self.seen[(module, name)] += 1
        return super().find_class(module, name)


def _allowed(pair) -> bool:
    module, name = pair
    dtype = module == "torch" and isinstance(getattr(torch, name), torch.dtype)
    return pair in ckpt_integrity.METADATA_ALLOWED or dtype


# --- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pg(tmp_path_factory):
    compat.apply()  # as the trainer and the converter do, before any load
    created = not torch.distributed.is_initialized()
    if created:
        store = tmp_path_factory.mktemp("pg") / "store"
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    if created:  # later tests check that flag validation starts no process group
        torch.distributed.destroy_process_group()


def _state(obj_data=None):
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    torch.manual_seed(0)
    tensors = {"w": torch.randn(4, 3), "b": torch.randn(5).to(torch.bfloat16), "n": torch.arange(6)}
    sd = {k: ShardedTensor.from_rank_offsets(k, v.clone()) for k, v in tensors.items()}
    rng = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    sd["rng_state"] = ShardedObject("rng_state", [obj_data if obj_data is not None else rng], (1,), (0,))
    sd["extra"] = ShardedObject("layer._extra_state", io.BytesIO(b"x"), (1,), (0,))
    sd.update(iteration=3, checkpoint_version=3.0, grin={"format": 1, "layout": {"tp": 1}},
              opt_param_scheduler={"max_lr": 1e-3, "decay_style": "cosine"})
    return tensors, sd


def _template():
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    t = {"w": torch.zeros(4, 3), "b": torch.zeros(5, dtype=torch.bfloat16), "n": torch.zeros(6, dtype=torch.int64)}
    sd = {k: ShardedTensor.from_rank_offsets(k, v) for k, v in t.items()}
    sd["rng_state"] = ShardedObject("rng_state", None, (1,), (0,))
    sd["extra"] = ShardedObject("layer._extra_state", None, (1,), (0,))
    return sd


@pytest.fixture(scope="module")
def mcore_ckpt(pg, tmp_path_factory):
    """A checkpoint written by megatron.core.dist_checkpointing.save (torch_dist, as the trainer writes)."""
    from megatron.core import dist_checkpointing

    d = str(tmp_path_factory.mktemp("mcore") / "iter_0000003")
    os.makedirs(d)
    tensors, sd = _state()
    dist_checkpointing.save(sd, d, sharded_strategy=("torch_dist", 1))
    return d, tensors


@pytest.fixture(scope="module")
def trainer_ckpt(tmp_path_factory):
    """Two steps of the real trainer, saved at iteration 2."""
    root = str(tmp_path_factory.mktemp("trainer") / "run")
    proc = _cli("pretrain", *TINY, "--train-iters", "2", "--save", root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _copy(src, tmp_path) -> str:
    dst = str(tmp_path / "ckpt")
    shutil.copytree(src, dst)
    return dst


# --- real checkpoints load under the restricted readers -----------------------------------------------------
def test_real_metadata_names_only_allowed_classes(mcore_ckpt, trainer_ckpt):
    for d in (mcore_ckpt[0], os.path.join(trainer_ckpt, "iter_0000002")):
        with open(os.path.join(d, ".metadata"), "rb") as f:
            tracer = Tracer(f)
            tracer.load()
        assert all(map(_allowed, tracer.seen)), [p for p in tracer.seen if not _allowed(p)]
        assert ("torch", "float32") in tracer.seen


def test_checkpoints_round_trip_under_the_accommodations(mcore_ckpt):
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    assert FileSystemReader.read_metadata is compat._safe_read_metadata
    assert DefaultLoadPlanner.load_bytes is compat._safe_load_bytes
    d, tensors = mcore_ckpt
    assert dist_checkpointing.load_common_state_dict(d)["opt_param_scheduler"]["decay_style"] == "cosine"
    loaded = dist_checkpointing.load(_template(), d)
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype
    numpy_state = loaded["rng_state"][0]["numpy"]  # np.random state: an ndarray inside a ShardedObject
    assert numpy_state[0] == "MT19937" and numpy_state[1].dtype == np.uint32 and len(numpy_state[1]) == 624
    assert loaded["extra"].getvalue() == b"x"
    assert set(dist_checkpointing.load_tensors_metadata(d)) == {"w", "b", "n"}


# --- .metadata ---------------------------------------------------------------------------------------------------
def _plant_metadata(d, marker, hidden):
    path = os.path.join(d, ".metadata")
    if hidden:  # a real Metadata with the payload tucked into one field
        with open(path, "rb") as f:
            md = pickle.load(f)
        md.storage_meta.modules = [Payload(marker)]
        obj = md
    else:
        obj = Payload(marker)
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return path


@pytest.mark.parametrize("hidden", [False, True])
def test_planted_metadata_runs_nothing(mcore_ckpt, tmp_path, hidden):
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException

    d = _copy(mcore_ckpt[0], tmp_path)
    marker = tmp_path / "pwned"
    path = _plant_metadata(d, marker, hidden)
    with pytest.raises(UnsafeFileError, match=r"\.metadata: refusing to unpickle posix\.system"):
        FileSystemReader(d).read_metadata()
    with pytest.raises(CheckpointException, match=rf"{path}: refusing"):  # DCP wraps it (a BaseException)
        dist_checkpointing.load(_template(), d)
    with pytest.raises(UnsafeFileError):
        dist_checkpointing.load_tensors_metadata(d)
    assert ckpt_integrity.checkpoint_problems(d) and not marker.exists()
    proc = _run_unpatched(f"""
        from torch.distributed.checkpoint import FileSystemReader
        try:
            FileSystemReader({d!r}).read_metadata()
        except Exception:
            pass
    """)
    assert marker.exists(), "the plant is not live: " + proc.stderr[-2000:]


def test_metadata_of_another_type_is_refused(mcore_ckpt, tmp_path):
    d = _copy(mcore_ckpt[0], tmp_path)
    with open(os.path.join(d, ".metadata"), "wb") as f:
        pickle.dump({"not": "metadata"}, f)
    with pytest.raises(UnsafeFileError, match="holds a dict, not torch checkpoint Metadata"):
        ckpt_integrity.read_metadata_file(d)


# --- common.pt and ShardedObject bytes ------------------------------------------------------------------------------
def test_planted_common_pt_runs_nothing_even_with_weights_only_forced_off(mcore_ckpt, tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    d = _copy(mcore_ckpt[0], tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"iteration": 3, "grin": Payload(marker)}, os.path.join(d, "common.pt"))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # turns torch's weights_only default off
    with pytest.raises(UnsafeFileError, match=r"common\.pt: refusing .*posix\.system"):
        dist_checkpointing.load_common_state_dict(d)
    assert not marker.exists()
    proc = _run_unpatched(f"""
        import os
        os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
        from megatron.core import dist_checkpointing
        dist_checkpointing.load_common_state_dict({d!r})
    """)
    assert marker.exists(), "the plant is not live: " + proc.stderr[-2000:]


def test_planted_sharded_object_bytes_run_nothing(pg, tmp_path):
    """A ShardedObject (a BYTE_IO item in a .distcp) whose pickle runs code: torch loads those weights_only=False."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    marker = tmp_path / "pwned"
    d = str(tmp_path / "evil")
    os.makedirs(d)
    dist_checkpointing.save(_state(obj_data=Payload(marker))[1], d, sharded_strategy=("torch_dist", 1))
    assert not marker.exists()
    with pytest.raises(CheckpointException, match=r"__0_\d\.distcp \(item 'rng_state/shard_0_1'\): refusing"):
        dist_checkpointing.load(_template(), d)
    assert not marker.exists()
    proc = _run_unpatched(f"""
        import torch
        torch.distributed.init_process_group("gloo", init_method="file://{tmp_path}/pg2", rank=0, world_size=1)
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedObject
        dist_checkpointing.load({{"rng_state": ShardedObject("rng_state", None, (1,), (0,))}}, {d!r})
    """)
    assert marker.exists(), "the plant is not live: " + proc.stderr[-2000:]


def test_transformer_engine_extra_state_with_data_is_refused():
    from megatron_grin.training.checkpointing import _refuse_pickled_extra_state

    ok = {"decoder.linear_fc1._extra_state": torch.empty(0, dtype=torch.uint8), "decoder.w": torch.ones(2)}
    _refuse_pickled_extra_state(ok, "ckpt")  # what TE saves without FP8
    planted = torch.frombuffer(bytearray(pickle.dumps(Payload("/nonexistent"))), dtype=torch.uint8)
    with pytest.raises(CheckpointError, match="_extra_state holds Tensor data"):
        _refuse_pickled_extra_state({**ok, "decoder.linear_fc2._extra_state": planted}, "ckpt")


# --- the commands --------------------------------------------------------------------------------------------------
def test_pretrain_refuses_a_planted_metadata(trainer_ckpt, tmp_path):
    root = _copy(trainer_ckpt, tmp_path)
    marker = tmp_path / "pwned"
    _plant_metadata(os.path.join(root, "iter_0000002"), marker, hidden=True)
    _reseal(os.path.join(root, "iter_0000002"))  # checksums match: the restricted unpickler is what refuses
    proc = _cli("pretrain", *TINY, "--train-iters", "2", "--load", root)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "refusing to unpickle posix.system" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


def _reseal(iter_dir):
    """Rewrite the manifest to match the files (as an attacker who edits the checkpoint would)."""
    manifest = ckpt_integrity.read_manifest(iter_dir)
    names = [n for n in os.listdir(iter_dir) if n != MANIFEST_NAME]
    ckpt_integrity.write_manifest(iter_dir, ckpt_integrity.digest_files(iter_dir, names), manifest["run_id"])


@pytest.mark.parametrize("what", [".metadata", pytest.param("common.pt", marks=pytest.mark.slow)])
def test_convert_to_hf_refuses_planted_files(trainer_ckpt, tmp_path, what):
    root = _copy(trainer_ckpt, tmp_path)
    marker = tmp_path / "pwned"
    it = os.path.join(root, "iter_0000002")
    if what == ".metadata":
        _plant_metadata(it, marker, hidden=True)
    else:
        common = torch.load(os.path.join(it, "common.pt"), weights_only=True)
        common["grin"]["layout"] = Payload(marker)
        torch.save(common, os.path.join(it, "common.pt"))
    _reseal(it)  # checksums match: the restricted loaders are what refuse
    proc = _cli("convert", "to-hf", "--load", root, "--out", str(tmp_path / "hf"))
    assert proc.returncode == 1
    assert f"{what}: refusing" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not marker.exists() and not (tmp_path / "hf").exists()


# --- dataset index caches ----------------------------------------------------------------------------------------
@pytest.fixture
def corpus(tmp_path):
    from megatron_grin.training.preprocess import preprocess
    from megatron_grin.training.tokenizer import ByteTokenizer

    prefixes = []
    for name in ("a", "b"):
        src = tmp_path / f"{name}.jsonl"
        rnd = random.Random(name)
        texts = ["".join(rnd.choice("abcdefgh ") for _ in range(rnd.randint(20, 90))) for _ in range(60)]
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        prefixes.append(str(tmp_path / name))
        preprocess([str(src)], prefixes[-1], ByteTokenizer())
    return prefixes


def _build(prefixes, cache):
    from megatron_grin.training import data
    from megatron_grin.training.tokenizer import ByteTokenizer

    return data.build_datasets(["1", prefixes[0], "1", prefixes[1]], "90,10,0", 32, 7, 64, 8, 0, ByteTokenizer(),
                               data_cache_path=cache)


def _cache_files(cache):
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(cache) for f in fs if f.endswith(".npy"))


def test_dataset_cache_is_plain_integers_and_reloads(pg, corpus, tmp_path):
    cache = str(tmp_path / "cache")
    first = _build(corpus, cache)
    files = _cache_files(cache)
    assert {f.rsplit("-", 1)[1] for f in files} >= {"document_index.npy", "sample_index.npy", "shuffle_index.npy"}
    for f in files:  # what megatron writes holds no pickle: it loads with allow_pickle=False
        assert np.load(f, allow_pickle=False).dtype.kind in "iu", f
    again = _build(corpus, cache)  # a cache hit, through the accommodation
    assert _cache_files(cache) == files
    for a, b in zip(first[:2], again[:2]):
        assert len(a) == len(b) and all(np.array_equal(a[i]["tokens"], b[i]["tokens"]) for i in (0, len(a) - 1))


@pytest.mark.parametrize("how", ["raw_pickle", "object_npy", "npz"])
def test_planted_dataset_cache_runs_nothing(pg, corpus, tmp_path, how):
    cache = str(tmp_path / "cache")
    _build(corpus, cache)
    target = [f for f in _cache_files(cache) if f.endswith("-document_index.npy")][0]
    marker = tmp_path / "pwned"
    if how == "raw_pickle":  # numpy.load(allow_pickle=True) falls back to pickle.load for a non-.npy file
        with open(target, "wb") as f:
            pickle.dump(Payload(marker), f)
    elif how == "object_npy":
        np.save(target, np.array([Payload(marker), 1], dtype=object), allow_pickle=True)
    else:
        with open(target, "wb") as f:
            np.savez(f, x=np.array([Payload(marker)], dtype=object))
    with pytest.raises(UnsafeFileError, match=rf"{target} .*--data-cache-path"):
        _build(corpus, cache)
    assert not marker.exists()
    if how == "raw_pickle":
        proc = _run_unpatched(f"""
            import numpy
            try:
                numpy.load({target!r}, allow_pickle=True, mmap_mode="r")
            except Exception:
                pass
        """)
        assert marker.exists(), "the plant is not live: " + proc.stderr[-2000:]


# --- fail closed ---------------------------------------------------------------------------------------------------
def test_version_gate_refuses_what_was_not_audited(monkeypatch):
    monkeypatch.delenv(compat.UNAUDITED_ENV, raising=False)
    compat.check_security_gate((0, 16, 1), "2.13.0+cpu")
    compat.check_security_gate((0, 16, 1), "2.6.0")
    with pytest.raises(RuntimeError, match="weights_only|Install torch >= 2.6"):
        compat.check_security_gate((0, 16, 1), "2.5.1+cu124")
    for mcore, version in (((0, 16, 1), "2.14.0"), ((0, 17, 0), "2.13.0")):
        with pytest.raises(RuntimeError, match=compat.UNAUDITED_ENV):
            compat.check_security_gate(mcore, version)
    monkeypatch.setenv(compat.UNAUDITED_ENV, "1")
    compat.check_security_gate((0, 17, 0), "2.14.0")  # explicitly allowed: patched anyway, with a warning
    with pytest.raises(RuntimeError):
        compat.check_security_gate((0, 16, 1), "2.4.0")  # never below 2.6
    assert compat._release("2.13.0+cpu") == (2, 13, 0) and compat._release("2.6.0rc1") == (2, 6, 0)


def test_a_missing_hook_point_fails_closed(monkeypatch):
    from megatron.core.dist_checkpointing.strategies import common

    monkeypatch.delattr(common, "TorchCommonLoadStrategy")
    with pytest.raises(RuntimeError, match="re-audit"):
        compat._common_pt_loader()


def test_security_accommodations_are_selected_on_every_machine_and_version():
    for version in ((0, 16, 1), (0, 17, 0), (1, 0, 0)):
        for cuda in (False, True):
            names = {a.name for a in compat.select(version, cuda) if a.security}
            assert names == {a.name for a in compat.ACCOMMODATIONS if a.security}
