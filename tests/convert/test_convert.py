"""megatron-grin convert: HF <-> megatron checkpoints (any TP/PP), parity gate, streaming writers, bad inputs.

Conversions run in this process (a one-rank gloo world, torn down afterwards). The checkpoints they read
and the runs that resume from what they write are the trainer's own (``megatron-grin pretrain`` under
torchrun, CPU ranks).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from grin_testing import hf_reference

from megatron_grin.config import preset
from megatron_grin.convert import cli as convert
from megatron_grin.convert.hf_keys import hf_keys, normalize_hf_keys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Odd sizes the trainer accepts: hidden 48 (head dim 12), 5 experts of width 40, vocab 259 (the byte
# tokenizer: padded to 384 inside the model), and a sliding window shorter than the verify sequences.
SHAPE = dict(hidden_size=48, ffn_hidden_size=40, num_experts=5, vocab_size=259, sliding_window=6)
TRAINER = ["--model-preset", "test", "--hidden-size", "48", "--ffn-hidden-size", "40", "--num-experts", "5",
           "--sliding-window", "6", "--mock-data", "--seq-length", "16", "--micro-batch-size", "2",
           "--global-batch-size", "4", "--lr", "1e-3", "--log-interval", "1", "--eval-iters", "0", "--seed", "7"]


def pretrain(*args, nproc: int) -> str:
    """Run the trainer (megatron-grin pretrain) under torchrun with nproc CPU ranks; returns its stdout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "megatron_grin", "pretrain", *TRAINER, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def _read_hf_dir(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(load_file(f))
    return out


def _leftovers(path: str) -> list[str]:
    """Temporary directories a conversion left next to its output."""
    parent, base = os.path.split(os.path.abspath(path))
    return [n for n in os.listdir(parent) if n.startswith(f".{base}.tmp-")]


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
    """A random PhimoeForCausalLM with the trainer's test shape, saved in several safetensors shards."""
    cfg = preset("test", **SHAPE)
    model = hf_reference(cfg, seed=3)
    path = str(tmp_path_factory.mktemp("hf") / "phimoe")
    model.save_pretrained(path, safe_serialization=True, max_shard_size="200KB")
    assert len(glob.glob(os.path.join(path, "*.safetensors"))) > 1
    state = normalize_hf_keys({k: v.detach().clone() for k, v in model.state_dict().items()})
    return path, state, cfg


# --- HF -> ours -> trainer at TP2 x PP2 -> HF ----------------------------------------------------------------
def test_hf_to_tp2pp2_trainer_and_back_is_exact(hf_source, tmp_path):
    """from-hf, the trainer resumes it at TP2 x PP2 (fresh optimizer) and re-saves it, to-hf: same tensors."""
    hf_dir, hf_state, cfg = hf_source
    ckpt, resaved, out = (str(tmp_path / n) for n in ("ckpt", "resaved", "hf"))
    assert convert.main(["from-hf", "--hf", hf_dir, "--save", ckpt, "--tensor-model-parallel-size", "2",
                         "--pipeline-model-parallel-size", "2"]) == 0
    assert sorted(os.listdir(ckpt)) == ["iter_0000000", "latest_checkpointed_iteration.txt"]
    saved_cfg = json.load(open(os.path.join(ckpt, "iter_0000000", "grin_config.json")))
    assert (saved_cfg["tensor_model_parallel_size"], saved_cfg["pipeline_model_parallel_size"]) == (2, 2)
    assert saved_cfg["sliding_window"] == 6 and saved_cfg["vocab_size"] == 259

    # --train-iters 0: load (resharding TP1 chunks into TP2 x PP2), nothing to train, save in that layout
    log = pretrain("--train-iters", "0", "--load", ckpt, "--save", resaved, "--tensor-model-parallel-size", "2",
                   "--pipeline-model-parallel-size", "2", nproc=4)
    assert "iteration 0" in log and "optimizer fresh" in log, log[-2000:]
    saved_layout = json.load(open(os.path.join(resaved, "iter_0000000", "grin_config.json")))
    assert (saved_layout["tensor_model_parallel_size"], saved_layout["pipeline_model_parallel_size"]) == (2, 2)

    # back to HF: every tensor equal, legacy key names, sharded layout with an index
    assert convert.main(["to-hf", "--load", resaved, "--out", out, "--max-shard-size", "100KB"]) == 0
    exported = _read_hf_dir(out)
    assert sorted(exported) == sorted(hf_keys(cfg)) == sorted(hf_state)
    for name, value in hf_state.items():
        assert torch.equal(exported[name], value), name
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files == sorted(os.path.basename(f) for f in glob.glob(f"{out}/model-*-of-*.safetensors"))
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in exported.values())
    config = json.load(open(os.path.join(out, "config.json")))
    original = json.load(open(os.path.join(hf_dir, "config.json")))
    assert config["model_type"] == "phimoe" and config["architectures"] == ["PhimoeForCausalLM"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "sliding_window", "num_local_experts", "num_experts_per_tok",
                "attention_bias", "lm_head_bias", "rms_norm_eps", "router_jitter_noise", "input_jitter_noise"):
        assert config[key] == original[key], key
    assert config["rope_theta"] == cfg.rotary_base and config["torch_dtype"] == "float32"
    assert os.path.isfile(os.path.join(out, "generation_config.json"))
    assert not _leftovers(out) and not _leftovers(ckpt)


def test_from_hf_bf16_rounds_and_passes_the_gate(hf_source, tmp_path):
    from megatron.core import dist_checkpointing

    ckpt = str(tmp_path / "ckpt")
    assert convert.main(["from-hf", "--hf", hf_source[0], "--save", ckpt, "--dtype", "bf16", "--verify"]) == 0
    meta = dist_checkpointing.load_tensors_metadata(os.path.join(ckpt, "iter_0000000"))
    assert {v.dtype for v in meta.values()} == {torch.bfloat16}
    assert json.load(open(os.path.join(ckpt, "iter_0000000", "grin_config.json")))["bf16"] is True


def test_from_hf_reads_transformers5_fused_expert_files(hf_source, tmp_path):
    """Files saved with save_original_format=False hold mlp.experts.gate_up_proj / down_proj / mlp.router."""
    from transformers import AutoModelForCausalLM

    _, hf_state, _ = hf_source
    fused, ckpt, out = (str(tmp_path / n) for n in ("fused", "ckpt", "hf"))
    AutoModelForCausalLM.from_pretrained(hf_source[0]).save_pretrained(fused, save_original_format=False)
    assert any("gate_up_proj" in k for k in _read_hf_dir(fused))
    assert convert.main(["from-hf", "--hf", fused, "--save", ckpt]) == 0
    assert convert.main(["to-hf", "--load", ckpt, "--out", out]) == 0
    exported = _read_hf_dir(out)
    assert sorted(exported) == sorted(hf_state) and all(torch.equal(exported[k], v) for k, v in hf_state.items())


# --- a trainer run at TP2 -> HF: logits ------------------------------------------------------------------------
def _reference_logits(iter_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    """Our TP1 model restored the way the trainer restores (one full dist_checkpointing.load, strict)."""
    from megatron.core import dist_checkpointing

    from megatron_grin.ckpt_format import read_config
    from megatron_grin.convert.mcore_io import single_process_megatron, tp1_config
    from megatron_grin.model.build import build_model

    cfg = tp1_config(read_config(iter_dir))
    with single_process_megatron():
        model = build_model(cfg).eval()
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, iter_dir)
        model.load_state_dict(loaded["model"], strict=True)
        pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        with torch.no_grad():
            return model(tokens, pos, None)[..., : cfg.vocab_size].float()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three optimizer steps of the trainer at TP=2 (sequence parallel), checkpointed."""
    root = str(tmp_path_factory.mktemp("trained") / "ckpt")
    pretrain("--train-iters", "3", "--save", root, "--tensor-model-parallel-size", "2", nproc=2)
    probe = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(11))
    return root, _reference_logits(os.path.join(root, "iter_0000003"), probe), probe


def _hf_logits(path, tokens, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
    with torch.no_grad():
        return model.float()(input_ids=tokens).logits.float()


def _tokenizer_dir(path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "grin": 4}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(path))
    return str(path)


def test_trained_tp2_checkpoint_exports_with_matching_logits(trained, tmp_path):
    from transformers import AutoTokenizer

    root, logits, probe = trained
    out = str(tmp_path / "hf")
    tok = _tokenizer_dir(tmp_path / "tok")
    assert convert.main(["to-hf", "--load", root, "--out", out, "--verify", "--verify-seq-len", "24",
                         "--tokenizer", tok]) == 0
    assert (_hf_logits(out, probe) - logits).abs().max().item() <= 1e-4
    config = json.load(open(os.path.join(out, "config.json")))
    generation = json.load(open(os.path.join(out, "generation_config.json")))
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2) == (generation["bos_token_id"],
                                                                         generation["eos_token_id"])
    assert AutoTokenizer.from_pretrained(out)("hello grin")["input_ids"][-2:] == [3, 4]


def test_bf16_export_within_bf16_tolerance(trained, tmp_path):
    from megatron_grin.convert.verify import compare

    root, logits, probe = trained
    out = str(tmp_path / "hf-bf16")
    assert convert.main(["to-hf", "--load", root, "--out", out, "--dtype", "bf16", "--verify"]) == 0
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
    assert all(v.dtype == torch.bfloat16 for v in _read_hf_dir(out).values())
    report = compare(logits, _hf_logits(out, probe, torch.bfloat16), lossy=True)  # bf16 weights, fp32 compute
    assert report.passed, report.summary()


def test_parity_gate_fails_on_a_wrong_mapping(trained, tmp_path, monkeypatch, capsys):
    """Swapping one expert's gate and up projections in the export is caught; nothing is written."""
    from megatron_grin.convert import hf_keys as hf_mapping

    real = hf_mapping.layer_to_hf

    def swapped(ours, i, cfg, **kw):
        out = real(ours, i, cfg, **kw)
        w1 = f"model.layers.{i}.block_sparse_moe.experts.0.w1.weight"
        w3 = f"model.layers.{i}.block_sparse_moe.experts.0.w3.weight"
        out[w1], out[w3] = out[w3], out[w1]
        return out

    monkeypatch.setattr(convert, "layer_to_hf", swapped)  # the name the exporter calls
    root, _, _ = trained
    out = str(tmp_path / "hf")
    for dtype in ("fp32", "bf16"):
        assert convert.main(["to-hf", "--load", root, "--out", out, "--verify", "--dtype", dtype]) == 1
        assert "parity gate failed" in capsys.readouterr().err
        assert not os.path.exists(out) and not _leftovers(out)


def test_singleton_expert_layout_is_read(tmp_path):
    """Checkpoints saved with megatron's singleton_local_shards metadata (per-expert keys) convert too."""
    from megatron.core import dist_checkpointing

    from megatron_grin.ckpt_format import write_config as write_grin_config
    from megatron_grin.convert.mcore_io import build_tp1_model, single_process_megatron, sync_save_strategy

    cfg = preset("test", num_experts=3, num_layers=2)
    path = str(tmp_path / "ckpt" / "iter_0000001")
    os.makedirs(path)
    with single_process_megatron():
        model = build_tp1_model(cfg, device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
        sharded = model.sharded_state_dict(metadata={"singleton_local_shards": True})
        dist_checkpointing.save({"model": sharded}, path, sharded_strategy=sync_save_strategy())
        full = {k: v.detach().clone() for k, v in model.named_parameters()}
    write_grin_config(path, cfg)
    assert any(".experts.experts.2." in k for k in dist_checkpointing.load_tensors_metadata(path))
    out = str(tmp_path / "hf")
    assert convert.main(["to-hf", "--load", str(tmp_path / "ckpt"), "--out", out]) == 0
    from megatron_grin.convert.hf_keys import to_hf

    exported = _read_hf_dir(out)
    assert all(torch.equal(exported[k], v) for k, v in to_hf(full, cfg).items())


# --- GRIN-16x3.8B on the meta device ---------------------------------------------------------------------
def test_grin_16x3_8b_maps_every_parameter_on_meta():
    from transformers import PhimoeConfig, PhimoeForCausalLM

    from megatron_grin.convert.hf_io import hf_tensor_shapes
    from megatron_grin.convert.hf_keys import hf_keys
    from megatron_grin.convert.hf_keys import hf_config_dict, to_hf
    from megatron_grin.convert.mcore_io import build_tp1_model, model_sharded_state_dict, single_process_megatron
    from megatron_grin.convert.safetensors_writer import plan_shards

    cfg = preset("grin-16x3.8b")
    with single_process_megatron():
        model = build_tp1_model(cfg)
        params = dict(model.named_parameters())
        sharded = model_sharded_state_dict(model)
    assert all(p.is_meta for p in params.values())
    assert set(params) <= set(sharded)  # every parameter has a checkpoint entry
    ours_as_hf = to_hf(params, cfg)
    shapes = hf_tensor_shapes(cfg)
    assert set(ours_as_hf) == set(shapes) == set(hf_keys(cfg))
    assert {k: tuple(v.shape) for k, v in ours_as_hf.items()} == shapes
    with torch.device("meta"):
        hf_model = PhimoeForCausalLM(PhimoeConfig(**{k: v for k, v in hf_config_dict(cfg).items()
                                                      if k not in ("architectures", "torch_dtype")}))
    theirs = {k: tuple(v.shape) for k, v in normalize_hf_keys(hf_model.state_dict()).items()}
    assert theirs == shapes  # no missing or extra keys, same shapes
    plan = plan_shards([(k, shapes[k], torch.bfloat16) for k in hf_keys(cfg)], 5 * 10**9)
    total = sum(e.nbytes for shard in plan for e in shard)
    assert abs(total / 2 / 1e9 - 41.87) < 0.01 and len(plan) == -(-total // (5 * 10**9))


# --- streaming safetensors writer ----------------------------------------------------------------------
def test_safetensors_writer_streams_in_plan_order(tmp_path):
    from safetensors import safe_open

    from megatron_grin.convert.safetensors_writer import ShardedSafetensorsWriter, plan_shards

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6).reshape(2, 3),
               "d": torch.randn(0, 4), "e": torch.randn(40)}
    plan = plan_shards([(k, v.shape, v.dtype) for k, v in tensors.items()], max_shard_bytes=100)
    assert [len(s) for s in plan] == [2, 2, 1]  # a 60 + b 14 | c 48 + d 0 | e 160 (bytes; limit 100)
    with ShardedSafetensorsWriter(str(tmp_path), plan) as w:
        with pytest.raises(ValueError, match="plan order"):
            w.write("b", tensors["b"])
        for k, v in tensors.items():
            w.write(k, v)
    for f in glob.glob(str(tmp_path / "*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                assert torch.equal(st.get_tensor(k), tensors[k])
    with pytest.raises(ValueError, match="only 1 of"):
        with ShardedSafetensorsWriter(str(tmp_path / "x"), plan) as w:
            w.write("a", tensors["a"])


# --- bad inputs ----------------------------------------------------------------------------------------------
def _copy(src: str, dst) -> str:
    dst = str(dst)
    shutil.copytree(src, dst)
    return dst


def _from_hf_fails(hf_dir, tmp_path, capsys, match):
    save = str(tmp_path / "out")
    assert convert.main(["from-hf", "--hf", hf_dir, "--save", save]) == 1
    err = capsys.readouterr().err
    assert match in err, err
    assert not os.path.exists(save) and not _leftovers(save)


def _edit_config(hf_dir, **changes):
    path = os.path.join(hf_dir, "config.json")
    config = json.load(open(path))
    config.update(changes)
    json.dump(config, open(path, "w"))


def test_from_hf_refuses_other_architectures(hf_source, tmp_path, capsys):
    hf_dir = _copy(hf_source[0], tmp_path / "llama")
    _edit_config(hf_dir, model_type="llama", architectures=["LlamaForCausalLM"])
    _from_hf_fails(hf_dir, tmp_path, capsys, "model_type='llama'")


def test_from_hf_refuses_longrope(hf_source, tmp_path, capsys):
    hf_dir = _copy(hf_source[0], tmp_path / "longrope")
    _edit_config(hf_dir, rope_scaling={"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]})
    _from_hf_fails(hf_dir, tmp_path, capsys, "longrope")


def test_from_hf_refuses_missing_shard(hf_source, tmp_path, capsys):
    hf_dir = _copy(hf_source[0], tmp_path / "missing")
    os.remove(sorted(glob.glob(os.path.join(hf_dir, "model-*.safetensors")))[-1])
    _from_hf_fails(hf_dir, tmp_path, capsys, "do not exist")


def test_from_hf_refuses_shape_mismatch(hf_source, tmp_path, capsys):
    hf_dir = _copy(hf_source[0], tmp_path / "shapes")
    _edit_config(hf_dir, intermediate_size=44)
    _from_hf_fails(hf_dir, tmp_path, capsys, "wrong shape")


def test_output_must_not_exist_unless_forced(hf_source, tmp_path, capsys):
    save = tmp_path / "exists"
    save.mkdir()
    (save / "keep.txt").write_text("x")
    assert convert.main(["from-hf", "--hf", hf_source[0], "--save", str(save)]) == 1
    assert "--force" in capsys.readouterr().err and (save / "keep.txt").exists()
    assert convert.main(["from-hf", "--hf", hf_source[0], "--save", str(save), "--force"]) == 1  # not ours
    assert "replaces only an earlier output" in capsys.readouterr().err and (save / "keep.txt").exists()
    (save / "keep.txt").unlink()
    assert convert.main(["from-hf", "--hf", hf_source[0], "--save", str(save), "--force"]) == 0  # empty
    assert convert.main(["from-hf", "--hf", hf_source[0], "--save", str(save), "--force"]) == 0  # its own output
    assert sorted(os.listdir(save)) == ["iter_0000000", "latest_checkpointed_iteration.txt"]
    assert not _leftovers(str(save))


def test_force_never_replaces_a_training_run_or_other_data(trained, hf_source, tmp_path, capsys):
    """--force replaces an earlier output of the same conversion only: a training --save directory (its
    checkpoints, run files) or a directory of other files stays as it was."""
    root, _, _ = trained
    run = _copy(root, tmp_path / "run")
    before = sorted(os.listdir(run))
    assert convert.main(["from-hf", "--hf", hf_source[0], "--save", run, "--force"]) == 1
    assert "replaces only an earlier output" in capsys.readouterr().err and sorted(os.listdir(run)) == before
    assert convert.main(["to-hf", "--load", root, "--out", run, "--force"]) == 1
    assert "not a Hugging Face export" in capsys.readouterr().err and sorted(os.listdir(run)) == before
    out = str(tmp_path / "hf")
    assert convert.main(["to-hf", "--load", root, "--out", out]) == 0
    assert convert.main(["to-hf", "--load", root, "--out", out, "--force"]) == 0  # an earlier export: replaced


def test_to_hf_refuses_unfinished_and_damaged_checkpoints(trained, tmp_path, capsys):
    root, _, _ = trained
    unfinished = tmp_path / "unfinished"
    shutil.copytree(os.path.join(root, "iter_0000003"), unfinished / "iter_0000004.tmp")
    out = str(tmp_path / "hf")
    assert convert.main(["to-hf", "--load", str(unfinished), "--out", out]) == 1
    assert "unfinished" in capsys.readouterr().err and not os.path.exists(out)

    damaged = _copy(root, tmp_path / "damaged")
    os.remove(sorted(glob.glob(os.path.join(damaged, "iter_0000003", "*.distcp")))[0])
    assert convert.main(["to-hf", "--load", damaged, "--out", out]) == 1
    assert "missing" in capsys.readouterr().err and not os.path.exists(out) and not _leftovers(out)

    wrong = _copy(root, tmp_path / "wrong")
    cfg_path = os.path.join(wrong, "iter_0000003", "grin_config.json")
    cfg = json.load(open(cfg_path))
    cfg["ffn_hidden_size"] = 24
    json.dump(cfg, open(cfg_path, "w"))
    os.remove(os.path.join(wrong, "iter_0000003", "grin_manifest.json"))  # else its checksum names the edit
    assert convert.main(["to-hf", "--load", wrong, "--out", out]) == 1
    assert "do not match" in capsys.readouterr().err and not os.path.exists(out) and not _leftovers(out)


def test_output_may_not_replace_its_input(trained, capsys):
    root, _, _ = trained
    assert convert.main(["to-hf", "--load", root, "--out", root, "--force"]) == 1
    assert "would replace the input" in capsys.readouterr().err and os.path.isdir(os.path.join(root, "iter_0000003"))
