"""Small layer variants GRIN needs that megatron-core's local backend lacks.

* ``SequenceParallelLayerNorm``: torch LayerNorm *with bias* that works under sequence parallelism
  (megatron's WrappedTorchNorm refuses SP; Apex/TE are optional). Its parameters are tagged
  ``sequence_parallel`` so ``finalize_model_grads`` all-reduces their grads over TP.
* ``RowParallelLinearWithBias``: attention o_proj with a bias (megatron builds linear_proj with
  ``bias=config.add_bias_linear``, which must stay False for the bias-free experts).
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import RowParallelLinear


class SequenceParallelLayerNorm(torch.nn.LayerNorm):
    """LayerNorm(hidden, eps, bias=True), accepting megatron's norm-builder arguments."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str = "LayerNorm", **_: object):
        if normalization != "LayerNorm" or zero_centered_gamma:
            raise ValueError("GRIN uses a plain LayerNorm with bias (normalization='LayerNorm').")
        super().__init__(hidden_size, eps=eps, elementwise_affine=True, bias=True,
                         dtype=config.params_dtype)
        for param in self.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)


class RowParallelLinearWithBias(RowParallelLinear):
    """RowParallelLinear that always carries a bias (GRIN's o_proj)."""

    def __init__(self, *args, bias: bool = False, **kwargs):
        super().__init__(*args, bias=True, **kwargs)


def te_row_parallel_linear_with_bias():
    """TE counterpart of RowParallelLinearWithBias (built only when Transformer Engine is installed)."""
    from megatron.core.extensions.transformer_engine import TERowParallelLinear

    class TERowParallelLinearWithBias(TERowParallelLinear):
        def __init__(self, *args, bias: bool = False, **kwargs):
            super().__init__(*args, bias=True, **kwargs)

    return TERowParallelLinearWithBias
