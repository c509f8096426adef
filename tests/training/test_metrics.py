"""--log-params-norm: the norm counts every weight exactly once at any tensor/pipeline layout (TP shards once,
replicated parameters once), checked against a float64 norm of the full weights at TP 1 x PP 1."""

import math

import pytest
import torch

from grin_testing import full_state_from_hf, hf_reference, init_parallel, run_distributed, tiny_config


def _norm(rank, world, port, tp, pp):
    from megatron.core import parallel_state as ps

    from grin_sharding import load_full_state
    from megatron_grin.model.build import build_model
    from megatron_grin.training.metrics import params_norm

    init_parallel(rank, world, port, tp=tp, pp=pp)
    cfg = tiny_config(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, padded_vocab=256)
    model = build_model(cfg, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    load_full_state(model, full_state_from_hf(hf_reference(cfg, seed=3), cfg))
    return params_norm([model])


def _reference() -> float:
    """float64 norm of every weight of the TP1 model, counted once (megatron's full state: HF weights mapped)."""
    cfg = tiny_config(padded_vocab=256)
    state = full_state_from_hf(hf_reference(cfg, seed=3), cfg)
    return math.sqrt(sum(v.double().square().sum().item() for k, v in state.items() if torch.is_tensor(v)
                         and "_extra_state" not in k))


def test_params_norm_is_the_full_model_s_norm_at_every_layout():
    expected = _reference()
    assert run_distributed(_norm, 1, 1, 1)[0] == pytest.approx(expected, rel=1e-9)
    for tp, pp in ((2, 1), (1, 2)):
        norms = run_distributed(_norm, 2, tp, pp)
        assert norms[0] == norms[1] == pytest.approx(expected, rel=1e-9), (tp, pp, norms, expected)

