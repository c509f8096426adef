"""TP / PP / DP runs on CPU (gloo) against the TP=1 run: same loss and same gradients.

Weights come from one random HF Phimoe reference, sharded into each layout. Both routing modes are
covered: eval (argmax) and training (sampled, with input jitter and the global balance loss), the latter
proving that routing randomness is keyed by token, not by rank or call order.
"""

import pytest
import torch

from grin_testing import full_state_from_hf, hf_reference, init_parallel, run_distributed, tiny_config

SEQ, MICRO, NUM_MICRO = 8, 2, 2


def _batches(cfg, micro, num_micro, sample_offset=0):
    g = torch.Generator().manual_seed(123)
    tokens = torch.randint(0, cfg.vocab_size, (8, SEQ + 1), generator=g)
    tokens = tokens[sample_offset: sample_offset + micro * num_micro]
    return [{"tokens": tokens[i * micro:(i + 1) * micro, :-1], "labels": tokens[i * micro:(i + 1) * micro, 1:]}
            for i in range(num_micro)]


def _train_step(rank, world, port, tp, pp, training, cfg_overrides=None, micro=MICRO, num_micro=NUM_MICRO):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    from megatron_grin.model import routing_rng
    from megatron_grin.model.build import build_model
    from grin_sharding import gather_full, load_full_state

    init_parallel(rank, world, port, tp=tp, pp=pp)
    # One embedding size for every layout (Megatron-LM's padding grows with TP; a checkpoint keeps its own rows):
    # the padded rows' logits take part in the softmax, so the layouts must share them to compute the same model.
    cfg = tiny_config(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, moe_aux_loss_coeff=0.05,
                      padded_vocab=256, **(cfg_overrides or {}))
    model = build_model(cfg, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    load_full_state(model, full_state_from_hf(hf_reference(cfg, seed=3), cfg))
    tconfig = model.config
    ddp = DistributedDataParallel(config=tconfig, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                  module=model)
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.no_sync_func = ddp.no_sync
    ddp.train() if training else ddp.eval()
    routing_rng.set_routing_seed(11)
    routing_rng.set_routing_iteration(5)
    dp_rank = ps.get_data_parallel_rank()
    batches = iter(_batches(cfg, micro, num_micro, sample_offset=dp_rank * micro * num_micro))

    def loss_func(output):
        loss = output.float().mean()
        return loss, {"loss": loss.detach()}

    def forward_step(data_iterator, m):
        b = next(data_iterator)
        pos = torch.arange(SEQ).unsqueeze(0).expand_as(b["tokens"])
        return m(b["tokens"], pos, None, labels=b["labels"]), loss_func

    clear_aux_losses_tracker()
    losses = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=batches, model=[ddp],
                                         num_microbatches=num_micro, seq_length=SEQ, micro_batch_size=micro,
                                         forward_only=False)
    loss = sum(float(x["loss"]) for x in losses) / num_micro if losses else None
    grads = gather_full(model, {n: p.main_grad for n, p in model.named_parameters()})
    tracker = get_moe_layer_wise_logging_tracker().get("load_balancing_loss")
    lb = tracker["values"].clone() if tracker is not None else None
    keep = ps.get_tensor_model_parallel_rank() == 0 and dp_rank == 0
    return {"loss": loss, "grads": grads if keep else {}, "lb": lb}


def _merge(results):
    loss = [r["loss"] for r in results if r["loss"] is not None]
    grads = {}
    for r in results:
        grads.update(r["grads"])
    return loss[0], grads


@pytest.fixture(scope="module")
def reference():
    return {training: _merge(run_distributed(_train_step, 1, 1, 1, training)) for training in (False, True)}


def _assert_same(ref, other):
    (loss_ref, grads_ref), (loss, grads) = ref, other
    assert abs(loss - loss_ref) <= 1e-5 * abs(loss_ref), (loss, loss_ref)
    assert sorted(grads) == sorted(grads_ref)
    for name, g in grads_ref.items():
        err = (grads[name] - g).abs().max().item()
        assert err <= 1e-4 * (g.abs().max().item() + 1e-6), (name, err)


@pytest.mark.parametrize("training", [False, True], ids=["eval-routing", "train-routing"])
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2pp2"])
def test_layout_matches_tp1(reference, tp, pp, training):
    _assert_same(reference[training], _merge(run_distributed(_train_step, tp * pp, tp, pp, training)))


def test_activation_recompute_replays_sampling(reference):
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    _assert_same(reference[True], _merge(run_distributed(_train_step, 1, 1, 1, True, recompute)))


def test_data_parallel_balance_loss_is_global():
    """DP=2 on halves of the batch: balance loss summed over ranks equals the DP=1 one on the whole batch.

    Expert sampling is keyed by global sample index, so it is layout-independent; the input-jitter draw is
    keyed per (micro-batch, DP rank), hence off here.
    """
    no_jitter = {"input_jitter_eps": 0.0}
    whole = run_distributed(_train_step, 1, 1, 1, True, no_jitter, 4, 1)[0]
    halves = run_distributed(_train_step, 2, 1, 1, True, no_jitter, 2, 1)
    torch.testing.assert_close(halves[0]["lb"] + halves[1]["lb"], whole["lb"], rtol=1e-5, atol=1e-7)
    assert abs((halves[0]["loss"] + halves[1]["loss"]) / 2 - whole["loss"]) < 1e-5 * abs(whole["loss"])
    for name, g in whole["grads"].items():  # DDP averages over DP: same gradients as the whole batch
        assert (halves[0]["grads"][name] - g).abs().max() <= 1e-4 * (g.abs().max() + 1e-6), name
