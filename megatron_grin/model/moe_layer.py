"""GRIN's MoE layer: megatron's MoELayer with GRIN's router path and token dispatcher.

route (SparseMixerV2Router.route_tokens: input jitter, fp32 gate, SparseMixer-v2 picks as [T, K]) ->
dispatch (GrinTokenDispatcher: device counts, fused permute) -> experts -> combine (unpermute, TP
reduce-scatter). Unlike megatron's layer, the experts see the *jittered* input, as GRIN trained (HF/GRIN
multiply the MoE input by U(1-eps, 1+eps) before both the gate and the experts; megatron's
``moe_input_jitter_eps`` only touches the router input), and nothing in the forward or backward waits
for the host when the experts are GroupedMMExperts.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from megatron_grin.model.dispatcher import GrinTokenDispatcher


class GrinMoELayer(MoELayer):
    """MoELayer + SparseMixerV2Router + GrinTokenDispatcher (expert-parallel size 1, no shared experts)."""

    def __init__(self, config, submodules=None, layer_number: Optional[int] = None, pg_collection=None):
        pg_collection = pg_collection or get_default_pg_collection()
        super().__init__(config=config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection)
        if not hasattr(self.router, "route_tokens"):
            raise ValueError("GrinMoELayer needs the SparseMixerV2Router (MoESubmodules.router).")
        if self.use_shared_expert:
            raise ValueError("GrinMoELayer has no shared experts (GRIN uses none); unset moe_shared_expert_*.")
        if config.moe_latent_size:
            raise ValueError("GrinMoELayer does not support moe_latent_size.")
        self.token_dispatcher = GrinTokenDispatcher(self.num_local_experts, config, pg_collection=pg_collection)

    def forward(self, hidden_states: torch.Tensor, intermediate_tensors=None,
                padding_mask: Optional[torch.Tensor] = None):
        """[S(/TP), B, H] -> (output of the same shape, None)."""
        if intermediate_tensors is not None:
            raise NotImplementedError("GrinMoELayer does not support partial CUDA-graph capture of the MoE layer.")
        if self.training and self.attn_tp_group.size() > 1 and not self.config.sequence_parallel:
            raise ValueError("MoE layers with tensor parallelism need --sequence-parallel in training.")

        def custom_forward(hidden):
            expert_input, weights_TK, experts_TK = self.router.route_tokens(hidden, padding_mask)
            permuted, tokens_per_expert, permuted_probs = self.token_dispatcher.dispatch(
                expert_input, weights_TK, experts_TK)
            expert_output, mlp_bias = self.experts(permuted, tokens_per_expert, permuted_probs)
            if mlp_bias is not None:
                raise ValueError("GrinMoELayer: expert biases are not supported (add_bias_linear=False).")
            return self.token_dispatcher.combine(expert_output), None

        if self.moe_layer_recompute:
            return tensor_parallel.checkpoint(custom_forward, False, hidden_states)
        return custom_forward(hidden_states)
