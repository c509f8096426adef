"""A Megatron-LM checkpoint of a GRIN model, written by patches/pretrain_grin.py's loop, resumes in `megatron-grin
pretrain` and converts with `convert to-hf`; a --load directory holding something we cannot read is refused with
what was found.

The fixture writes the checkpoint as Megatron-LM core_v0.16.1's save_checkpoint does (generate_state_dict):
dist_checkpointing.save of {args, checkpoint_version 3.0, iteration, model, optimizer, opt_param_scheduler,
rng_state, num_floating_point_operations_so_far} with the content metadata, then the tracker "2" (no newline); no
grin_config.json. ``args`` is Megatron-LM's Namespace after validate_args and two training steps (enums, torch
dtypes, consumed samples), checked key by key and type by type against one that Megatron-LM's own save_checkpoint
wrote (docs/training.md, "Megatron-LM checkpoints"). The model and its two steps are megatron-grin's trainer's, so the
uninterrupted run is the reference the resumed one must match bit for bit.
"""

import argparse
import copy
import json
import os
import pickle
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from unittest import mock

import numpy as np
import pytest
import torch
from test_megatron_lm import megatron_args
from test_train import ROOT, env, losses

from megatron_grin.ckpt_format import CONFIG_NAME, TRACKER_NAME, config_json
from megatron_grin.config import ConfigError
from megatron_grin.training.arguments import parse, parse_args

#: the patch path's documented model flags (patches/pretrain_grin.py), at a tiny size
MODEL = shlex.split(
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --group-query-attention --num-query-groups 2 "
    "--max-position-embeddings 64 --num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 48 --swiglu "
    "--position-embedding-type rope --rotary-base 10000 --untie-embeddings-and-output-weights --normalization LayerNorm "
    "--norm-epsilon 1e-5 --window-size 15,0 --hidden-dropout 0 --attention-dropout 0 --moe-input-jitter-eps 0.01 "
    "--moe-router-dtype fp32 --moe-router-load-balancing-type global_aux_loss --moe-aux-loss-coeff 0.01 "
    "--grin-router sparsemixer_v2 --grin-jitter-eps 0.01 --bf16")
RUN = shlex.split(
    "--tokenizer-type NullTokenizer --vocab-size 95 --seq-length 32 --micro-batch-size 2 --global-batch-size 4 "
    "--train-iters 4 --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 1 --weight-decay 0.1 "
    "--seed 1234 --mock-data --eval-iters 0 --log-interval 1 --ckpt-format torch_dist")
FLAGS = MODEL + RUN
SAVED_AT = 2
#: what Megatron-LM's validate_args deletes (deprecated) from the parser's namespace
DELETED = ("batch_size", "checkpoint_activations", "kitchen_config_file", "kitchen_recipe_number",
           "model_parallel_size", "recompute_activations", "warmup")


def megatron_lm_args(save: str, iteration: int, consumed: int) -> argparse.Namespace:
    """Megatron-LM's args as save_checkpoint pickles them: the parser's values (test_megatron_lm.megatron_args), then
    what validate_args, the tokenizer, get_model and the training loop change or add."""
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    ns = megatron_args(FLAGS)
    for dest in DELETED:
        delattr(ns, dest)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.uint8}
    for dest in ("main_grads_dtype", "main_params_dtype", "exp_avg_dtype", "exp_avg_sq_dtype"):
        setattr(ns, dest, dtypes[getattr(ns, dest)])
    vars(ns).update(
        vocab_size=95, padded_vocab_size=128,  # NullTokenizer: 96 ids, padded to a multiple of 128 x TP
        attention_backend=AttnBackend[ns.attention_backend], exit_signal=signal.Signals[ns.exit_signal],
        params_dtype=torch.bfloat16, model_type=ModelType.encoder_or_decoder, align_param_gather=False,
        inprocess_active_world_size=1, rank=0, world_size=1, data_parallel_size=1,
        transformer_pipeline_model_parallel_size=1, use_dist_ckpt=True, variable_seq_lengths=False,
        virtual_pipeline_model_parallel_size=None, lr_decay_iters=ns.train_iters, save=save,
        iteration=iteration, curr_iteration=iteration - 1, consumed_train_samples=consumed,
        consumed_valid_samples=0, skipped_train_samples=0)
    return ns


def save_as_megatron_lm(trainer, root: str, args: argparse.Namespace) -> str:
    """megatron/training/checkpointing.py: save_checkpoint -> generate_state_dict -> dist_checkpointing.save."""
    from megatron.core import dist_checkpointing, tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.utils import unwrap_model

    from megatron_grin.training.checkpointing import sharded_metadata

    meta = sharded_metadata(use_distributed_optimizer=False)  # _build_sharded_state_dict_metadata's, replicated
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.get_rng_state()
    rng = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
           "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": cuda,
           "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}
    state = {"args": args, "checkpoint_version": 3.0, "iteration": args.iteration,
             "model": unwrap_model(trainer.model)[0].sharded_state_dict(metadata=dict(meta))}
    state["optimizer"] = trainer.optimizer.sharded_state_dict(state, metadata=dict(meta))
    state["opt_param_scheduler"] = trainer.scheduler.state_dict()
    state["rng_state"] = ShardedObject("rng_state", [rng], (1, 1), (0, 0), replica_id=0)  # (PP, TP) grid, DP replicas
    state["num_floating_point_operations_so_far"] = 1.5e12
    path = os.path.join(root, f"iter_{args.iteration:07d}")
    os.makedirs(path)
    dist_checkpointing.save(state, path, sharded_strategy=("torch_dist", 1), content_metadata=meta)
    with open(os.path.join(root, TRACKER_NAME), "w") as f:
        f.write(str(args.iteration))
    return path


def _step(trainer) -> float:
    """One step exactly as Trainer.run takes it; the loss it logs."""
    from megatron_grin.model import routing_rng
    from megatron_grin.training.trainer import train_step

    routing_rng.set_routing_iteration(trainer.state.iteration)
    local, *_ = train_step(trainer.model, trainer.optimizer, trainer.scheduler, trainer.train_iters, trainer.tcfg)
    trainer.state.iteration += 1
    trainer.state.consumed_train_samples += trainer.tcfg.global_batch_size
    total, tokens = local.tolist()
    return total / tokens


def _weights(trainer) -> dict:
    from megatron.core.utils import unwrap_model

    return {k: v.detach().clone() for k, v in unwrap_model(trainer.model)[0].state_dict().items()
            if torch.is_tensor(v) and "_extra_state" not in k}


def _same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def mlm(tmp_path_factory):
    """Train 2 steps with megatron-grin's trainer, save them as Megatron-LM does, train 2 more (the reference), then
    load the checkpoint back through the trainer's Checkpointer."""
    from megatron_grin import compat
    from megatron_grin.model import routing_rng
    from megatron_grin.training.trainer import Trainer

    root = str(tmp_path_factory.mktemp("mlm") / "ckpt")
    cfg, tcfg = parse_args(FLAGS, world_size=1)
    compat.apply()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the OMP_NUM_THREADS=1 subprocess that resumes: same reduction order
    with mock.patch.dict(os.environ):
        for name in ("MASTER_ADDR", "RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
            os.environ.pop(name, None)
        trainer = Trainer(cfg, tcfg, time.time())
    try:
        routing_rng.set_routing_seed(tcfg.seed)
        first = {it + 1: _step(trainer) for it in range(SAVED_AT)}
        at_save = dict(weights=_weights(trainer), optimizer=copy.deepcopy(trainer.optimizer.state_dict()),
                       scheduler=trainer.scheduler.state_dict(), torch_rng=torch.get_rng_state())
        args = megatron_lm_args(root, SAVED_AT, trainer.state.consumed_train_samples)
        path = save_as_megatron_lm(trainer, root, args)
        reference = {it + 1: _step(trainer) for it in range(SAVED_AT, tcfg.train_iters)}
        torch.manual_seed(99)  # move the RNG on, so that a restored one shows
        trainer.scheduler.num_steps = 0  # as built: megatron's scheduler load adds the saved steps to its own
        report = trainer.ckpt.load((SAVED_AT, path), global_batch_size=tcfg.global_batch_size)
        loaded = dict(weights=_weights(trainer), optimizer=trainer.optimizer.state_dict(),
                      scheduler=trainer.scheduler.state_dict(), torch_rng=torch.get_rng_state())
    finally:
        trainer.close()
        torch.set_num_threads(threads)
    yield dict(root=root, path=path, cfg=cfg, args=args, first=first, reference=reference, at_save=at_save,
               loaded=loaded, report=report)


# --- the checkpoint is Megatron-LM's -------------------------------------------------------------------------------
def test_the_fixture_has_megatron_lm_s_layout(mlm):
    from megatron.core import dist_checkpointing

    from megatron_grin.ckpt_integrity import read_metadata_file

    root, path = mlm["root"], mlm["path"]
    assert sorted(os.listdir(root)) == [os.path.basename(path), TRACKER_NAME]  # no grin_config.json anywhere
    assert open(os.path.join(root, TRACKER_NAME)).read() == str(SAVED_AT)
    assert not os.path.exists(os.path.join(path, CONFIG_NAME))
    assert json.load(open(os.path.join(path, "metadata.json")))["sharded_backend"] == "torch_dist"
    common = dist_checkpointing.load_common_state_dict(path)  # megatron-core's own loader (weights_only)
    assert sorted(common) == ["args", "checkpoint_version", "content_metadata", "iteration",
                              "num_floating_point_operations_so_far", "opt_param_scheduler", "optimizer"]
    assert isinstance(common["args"], argparse.Namespace) and common["args"].grin_router == "sparsemixer_v2"
    stored = {k.split("/")[0].split(".")[0] for k in read_metadata_file(path).state_dict_metadata}
    assert stored == {"decoder", "embedding", "output_layer", "optimizer", "rng_state"}


# --- pretrain --load ---------------------------------------------------------------------------------------------
def test_the_trainer_restores_weights_optimizer_schedule_and_rng_exactly(mlm):
    saved, loaded, report = mlm["at_save"], mlm["loaded"], mlm["report"]
    assert saved["weights"].keys() == loaded["weights"].keys()
    for name, value in saved["weights"].items():
        assert torch.equal(value, loaded["weights"][name]), name
    assert _same(saved["optimizer"], loaded["optimizer"])
    assert saved["scheduler"] == loaded["scheduler"]
    assert torch.equal(saved["torch_rng"], loaded["torch_rng"])
    assert (report.iteration, report.state.consumed_train_samples) == (SAVED_AT, SAVED_AT * 4)
    assert report.loaded_optimizer and report.loaded_rng
    assert "not restored: num_floating_point_operations_so_far 1.5e+12" in report.notes[0]


def test_pretrain_resumes_it_bit_exactly(mlm, tmp_path):
    """The resumed run's steps 3 and 4 equal the uninterrupted run's (weights, optimizer, schedule, data position)."""
    out = str(tmp_path / "out")
    proc = subprocess.run([sys.executable, "-m", "megatron_grin", "pretrain", *FLAGS, "--load", mlm["root"],
                           "--save", out, "--log-dir", out], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert losses(out) == mlm["reference"], (losses(out), mlm["reference"], mlm["first"])
    log = proc.stdout + proc.stderr
    assert "is a Megatron-LM checkpoint (patches/pretrain_grin.py); model from its Megatron-LM args" in log
    assert "iteration 2, 8 samples consumed, optimizer restored, RNG restored" in log


def test_dry_run_names_it_as_a_megatron_lm_checkpoint(mlm):
    from megatron_grin.training.dry_run import report

    text = report(parse([*FLAGS, "--load", mlm["root"], "--dry-run"], world_size=1))
    assert (f"resume {mlm['path']} (a Megatron-LM checkpoint (patches/pretrain_grin.py) at iteration 2: model from its "
            "Megatron-LM args") in text
    assert "(8 samples)" in text


# --- convert to-hf -------------------------------------------------------------------------------------------------
def test_convert_to_hf_reads_it_and_passes_the_parity_gate(mlm, tmp_path, capsys):
    from safetensors.torch import load_file

    from megatron_grin.convert.cli import main

    out = str(tmp_path / "hf")
    assert main(["to-hf", "--load", mlm["root"], "--out", out, "--verify"]) == 0, capsys.readouterr().err
    assert "model from its Megatron-LM args" in capsys.readouterr().err
    assert json.load(open(os.path.join(out, "config.json")))["vocab_size"] == 96
    shard = next(name for name in os.listdir(out) if name.endswith(".safetensors"))
    exported = load_file(os.path.join(out, shard))["model.embed_tokens.weight"]
    assert torch.equal(exported, mlm["at_save"]["weights"]["embedding.word_embeddings.weight"][:96])


# --- what cannot be read is refused, never trained over ------------------------------------------------------------
def _variant(mlm, tmp_path, **changes) -> str:
    """A copy of the checkpoint whose common.pt args differ (as another model's Megatron-LM run would write)."""
    from megatron.core import dist_checkpointing

    root = str(tmp_path / "variant")
    shutil.copytree(mlm["root"], root)
    path = os.path.join(root, os.path.basename(mlm["path"]))
    common = dist_checkpointing.load_common_state_dict(path)
    args = common["args"]
    for name, value in changes.items():
        if value is None and hasattr(args, name):
            delattr(args, name)
        else:
            setattr(args, name, value)
    torch.save(common, os.path.join(path, "common.pt"))
    return root


def _refusal(*argv) -> str:
    with pytest.raises(ConfigError) as info:
        parse_args([*FLAGS, *argv], world_size=1)
    return "\n".join(info.value.problems)


def test_a_megatron_lm_checkpoint_of_another_model_is_refused(mlm, tmp_path, capsys):
    from megatron_grin.convert.cli import main

    root = _variant(mlm, tmp_path, grin_router=None, num_experts=None)  # pretrain_gpt.py's dense GPT
    message = _refusal("--load", root, "--save", root)
    assert "Megatron-LM torch_dist checkpoint without grin_config.json of a model not trained through " \
           "patches/pretrain_grin.py (2 layers, hidden 64, dense (no --num-experts)" in message
    assert "Refusing to start from scratch into it" in message
    assert main(["to-hf", "--load", root, "--out", str(tmp_path / "hf")]) == 1
    assert "not trained through patches/pretrain_grin.py" in capsys.readouterr().err
    named = tmp_path / "grin_config.json"  # the user names the model: then it is read
    named.write_text(config_json(mlm["cfg"]))
    parse_args([*FLAGS, "--load", root, "--grin-config", str(named)], world_size=1)


def test_a_different_model_on_the_command_line_is_refused(mlm):
    message = _refusal("--load", mlm["root"], "--num-experts", "8")
    assert "iteration 2 was saved for a different model (--num-experts: checkpoint 4, this run 8)" in message


def test_a_legacy_torch_checkpoint_is_refused_with_the_conversion(tmp_path):
    root = tmp_path / "legacy"
    (root / "iter_0000100" / "mp_rank_00").mkdir(parents=True)
    (root / "iter_0000100" / "mp_rank_00" / "model_optim_rng.pt").write_bytes(b"")
    (root / TRACKER_NAME).write_text("100")
    message = _refusal("--load", str(root), "--save", str(root))
    assert "legacy --ckpt-format torch layout" in message and "--ckpt-convert-format torch_dist" in message


class Payload:
    def __init__(self, marker):
        self.cmd = f"touch {marker}"

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_a_planted_pickle_in_common_pt_is_refused(mlm, tmp_path):
    root = str(tmp_path / "planted")
    shutil.copytree(mlm["root"], root)
    marker = tmp_path / "pwned"
    torch.save({"args": Payload(marker), "iteration": 2}, os.path.join(root, os.path.basename(mlm["path"]),
                                                                         "common.pt"))
    message = _refusal("--load", root)
    assert "refusing to unpickle posix.system" in message and "Pass --grin-config FILE" in message
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # and the trainer's own loader (weights_only) refuses it too
        torch.load(os.path.join(root, os.path.basename(mlm["path"]), "common.pt"), weights_only=True)
    assert not marker.exists()
