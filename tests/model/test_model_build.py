"""Model construction: GRIN-16x3.8B on the meta device, parameter counts, naming, dropless experts."""

import torch

from grin_testing import init_parallel, run_distributed, tiny_config
from megatron_grin.accounting import parameter_counts
from megatron_grin.config import preset


def _meta_counts(rank, world, port):
    from megatron_grin.convert.hf_keys import hf_keys, to_hf
    from megatron_grin.model.build import build_model_on_meta

    init_parallel(rank, world, port)
    cfg = preset("grin-16x3.8b")
    model = build_model_on_meta(cfg)
    params = dict(model.named_parameters())
    assert all(p.is_meta for p in params.values())
    total = sum(p.numel() for p in params.values())
    experts = sum(p.numel() for n, p in params.items() if ".experts." in n)
    padding = 2 * (cfg.padded_vocab_size - cfg.vocab_size) * cfg.hidden_size + (cfg.padded_vocab_size - cfg.vocab_size)
    from grin_sharding import expand_stacked_experts

    mapped = set(to_hf(expand_stacked_experts(params), cfg))
    return total - padding, experts, mapped == set(hf_keys(cfg))


def test_grin_16x3_8b_parameter_counts_on_meta():
    total, experts, keys_match = run_distributed(_meta_counts, 1)[0]
    cfg = preset("grin-16x3.8b")
    counts = parameter_counts(cfg)
    assert total == counts["total"]
    active = total - experts * (cfg.num_experts - cfg.moe_router_topk) // cfg.num_experts
    assert active == counts["active"]
    assert abs(total / 1e9 - 41.9) < 0.05, total  # released model: 41.9B total
    assert abs(active / 1e9 - 6.6) < 0.05, active  # 6.6B active
    assert keys_match


def _zero_token_experts(rank, world, port):
    from megatron_grin.model.build import build_model

    init_parallel(rank, world, port)
    cfg = tiny_config(num_experts=8)
    model = build_model(cfg).train()
    with torch.no_grad():  # logits (s, s/2, -s, -s/2, 0, 0, 0, 0): top-2 never reaches experts 4..7
        for layer in model.decoder.layers:
            w = layer.mlp.router.weight
            w.zero_()
            w[0].fill_(1.0), w[1].fill_(0.5), w[2].fill_(-1.0), w[3].fill_(-0.5)
    tokens = torch.randint(0, cfg.vocab_size, (2, 8))
    pos = torch.arange(8).unsqueeze(0).expand(2, 8)
    model.eval()
    loss = model(tokens, pos, None, labels=tokens).mean()
    loss.backward()
    counts = model.decoder.layers[0].mlp.router.stats.as_tensor()[: cfg.num_experts]
    from grin_sharding import expand_stacked_experts

    grads = expand_stacked_experts({n: p.grad for n, p in model.named_parameters()})  # any expert backend
    idle_grads = [g for n, g in grads.items() if "local_experts.7." in n]
    busy_grads = [g for n, g in grads.items() if "layers.0.mlp.experts.local_experts.0." in n]
    assert idle_grads and busy_grads
    return (float(loss), counts, all(g is None or torch.count_nonzero(g) == 0 for g in idle_grads),
            all(g is not None and torch.count_nonzero(g) > 0 for g in busy_grads))


def test_experts_without_tokens_are_fine():
    loss, counts, idle_grads_zero, busy_grads_nonzero = run_distributed(_zero_token_experts, 1)[0]
    assert torch.isfinite(torch.tensor(loss))
    assert (counts[4:] == 0).all()
    assert counts[:4].sum() == 2 * 16  # dropless: all 16 tokens x top-2 were computed
    assert idle_grads_zero and busy_grads_nonzero


def test_the_transformer_config_builds_without_megatron_s_deprecation_warning():
    """megatron 0.16's own default cuda_graph_scope ("full") warns in __post_init__; we pass its new spelling."""
    import warnings

    from megatron_grin.model.build import transformer_config

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = transformer_config(tiny_config())
    assert config.cuda_graph_scope == []
    assert not [w for w in caught if "deprecated" in str(w.message)], [str(w.message) for w in caught]
