"""GRIN's MoE layer: megatron's MoELayer whose experts see the jittered input, as GRIN trained.

HF/GRIN multiply the MoE input by U(1-eps, 1+eps) in training *before* both the gate and the experts;
megatron's own ``moe_input_jitter_eps`` only touches the router input. The router does the jitter (so
it shares the router's replayable random key) and this layer forwards the jittered tensor to dispatch.
"""

from __future__ import annotations

from megatron.core.transformer.moe.moe_layer import MoELayer


class GrinMoELayer(MoELayer):
    """MoELayer + SparseMixerV2Router with GRIN's input jitter on the expert input."""

    _routed_input = None

    def route(self, hidden_states, padding_mask=None):
        jitter_and_route = getattr(self.router, "jitter_and_route", None)
        if jitter_and_route is None:
            return super().route(hidden_states, padding_mask)
        self._routed_input, probs, routing_map = jitter_and_route(hidden_states, padding_mask)
        return probs, routing_map

    def preprocess(self, hidden_states, probs, routing_map):
        if self._routed_input is not None:
            hidden_states, self._routed_input = self._routed_input, None
        return super().preprocess(hidden_states, probs, routing_map)
