"""Our GRIN model (TP1/PP1, fp32, eval) against transformers' PhimoeForCausalLM with the same weights."""

import pytest
import torch

from grin_testing import full_state_from_hf, hf_reference, init_parallel, run_distributed, tiny_config


def _parity(rank, world, port, cfg_kwargs, seq):
    from megatron_grin.convert.hf_keys import normalize_hf_keys, to_hf
    from megatron_grin.model.attention import GrinCoreAttention  # the local spec's default core attention
    from megatron_grin.model.build import build_model
    from grin_sharding import gather_full, load_full_state

    init_parallel(rank, world, port)
    cfg = tiny_config(**cfg_kwargs)
    hf = hf_reference(cfg, seed=1).eval()
    ours = build_model(cfg).eval()
    assert all(isinstance(layer.self_attention.core_attention, GrinCoreAttention) for layer in ours.decoder.layers)
    load_full_state(ours, full_state_from_hf(hf, cfg))
    tokens = torch.randint(0, cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(seq).unsqueeze(0).expand(2, seq)
    logits_ours = ours(tokens, pos, None)[..., : cfg.vocab_size]
    logits_hf = hf(input_ids=tokens).logits
    diff = (logits_ours - logits_hf).abs().max().item()
    # gradients of the same loss, compared parameter by parameter under HF names
    target = torch.roll(tokens, -1, 1)
    torch.nn.functional.cross_entropy(logits_ours.reshape(-1, cfg.vocab_size), target.reshape(-1)).backward()
    torch.nn.functional.cross_entropy(logits_hf.reshape(-1, cfg.vocab_size), target.reshape(-1)).backward()
    grads_ours = to_hf(gather_full(ours, {n: p.grad for n, p in ours.named_parameters()}), cfg)
    grads_hf = normalize_hf_keys({n: p.grad for n, p in hf.named_parameters()})
    grad_err = {k: (grads_ours[k] - grads_hf[k]).abs().max().item() / (grads_hf[k].abs().max().item() + 1e-12)
                for k in grads_hf}
    return diff, grad_err, sorted(grads_ours) == sorted(grads_hf)


@pytest.mark.parametrize("cfg_kwargs,seq", [({}, 16), ({"sliding_window": 5}, 12), ({"sliding_window": 20}, 12),
                                             ({"num_experts": 7, "ffn_hidden_size": 24}, 10)])
def test_logits_and_grads_match_hf(cfg_kwargs, seq):
    diff, grad_err, same_keys = run_distributed(_parity, 1, cfg_kwargs, seq)[0]
    assert same_keys
    assert diff <= 1e-4, diff
    worst = max(grad_err, key=grad_err.get)
    assert grad_err[worst] < 1e-4, (worst, grad_err[worst])
