"""megatron-core router for GRIN: SparseMixer-v2 picks, replayable randomness, routing statistics.

The maths is in model/sparsemixer.py and the fused kernels in ops/ (routing, input jitter); this module
plugs them into megatron's ``TopKRouter``. ``route_tokens`` is the path of GrinMoELayer: it keeps the
picks as [T, K] (what GrinTokenDispatcher consumes) and never builds the dense [T, E] probs or routing map;
``forward`` still answers megatron's contract for callers that want it.

Device-correct by construction: every tensor is made from the inputs' device, and nothing in the forward
reads a tensor value on the host (the statistics stay on the device until the trainer reduces them).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    save_to_aux_losses_tracker,
    switch_load_balancing_loss_func,
)
from megatron.core.transformer.moe.router import TopKRouter

from megatron_grin.model import routing_rng
from megatron_grin.ops.jitter import input_jitter, jitter_key
from megatron_grin.ops.permute import expert_counts
from megatron_grin.ops.routing import RoutingKey, sparsemixer_routing


class RouterStats:
    """Routing statistics accumulated over the micro-batches of one step (local, on device, no host sync)."""

    _SCALARS = ("tokens", "picks", "not_argmax", "full_multiplier", "entropy_sum")

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self._vector: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self._vector = None

    @torch.no_grad()
    def add(self, logits_TE: torch.Tensor, experts_TK: torch.Tensor, stats: dict) -> None:
        counts = expert_counts(experts_TK, self.num_experts).to(torch.float64)
        probs = torch.softmax(logits_TE.float(), dim=-1)
        entropy = -(probs * torch.log(probs.clamp(min=1e-30))).sum().double()
        zero = entropy.new_zeros(())
        not_argmax = stats["sampled_not_argmax"].sum().double() if stats else zero
        full = (stats["full_multiplier"] & stats["sampled_not_argmax"]).sum().double() if stats else zero
        scalars = torch.stack([zero + logits_TE.shape[0], zero + experts_TK.numel(), not_argmax, full, entropy])
        vector = torch.cat([counts, scalars])
        self._vector = vector if self._vector is None else self._vector + vector

    def as_tensor(self, device=None) -> torch.Tensor:
        """Flat float64 vector, sum-reducible across ranks: [tokens_per_expert (E), tokens, picks,
        not_argmax, full_multiplier, entropy_sum]. Zeros if nothing was routed since the last reset."""
        if self._vector is None:
            return torch.zeros(self.num_experts + len(self._SCALARS), dtype=torch.float64, device=device)
        return self._vector if device is None else self._vector.to(device)

    @staticmethod
    def summarize(vector: torch.Tensor, num_experts: int) -> dict[str, float]:
        """Metrics from a (possibly all-reduced) ``as_tensor`` vector (host values: call off the hot path)."""
        counts = vector[:num_experts]
        tokens, picks, not_argmax, full, entropy = vector[num_experts:].tolist()
        mean = counts.mean().item()
        return {
            "tokens_per_expert_min": counts.min().item(),
            "tokens_per_expert_max": counts.max().item(),
            "tokens_per_expert_cv": (counts.std(unbiased=False).item() / mean) if mean else 0.0,
            "experts_without_tokens": float((counts == 0).sum().item()),
            "router_entropy": entropy / tokens if tokens else 0.0,
            "sampled_not_argmax_share": not_argmax / picks if picks else 0.0,
            "heun_full_share": full / not_argmax if not_argmax else 0.0,
        }


def dense_routing(weights_TK: torch.Tensor, experts_TK: torch.Tensor, num_experts: int):
    """megatron's contract from [T, K] picks: probs [T, E] (zero off the picks) and a bool routing map [T, E]."""
    tokens = experts_TK.shape[0]
    probs = weights_TK.new_zeros(tokens, num_experts).scatter(1, experts_TK, weights_TK)
    routing_map = torch.zeros(tokens, num_experts, dtype=torch.bool, device=experts_TK.device)
    routing_map = routing_map.scatter(1, experts_TK, True)
    return probs, routing_map


class SparseMixerV2Router(TopKRouter):
    """megatron-core router running SparseMixer-v2 (plugs into ``MoESubmodules.router``).

    GRIN settings come from the config's ``grin_*`` fields (see model.build.GrinTransformerConfig):
    ``grin_router_backend`` (from --moe-router-fusion) picks the fused Triton routing and input-jitter
    kernels or their PyTorch references.
    """

    def __init__(self, config, pg_collection=None, **kwargs):
        super().__init__(config=config, pg_collection=pg_collection)
        self.jitter_eps = float(config.grin_router_jitter_eps)  # a GrinTransformerConfig: no silent defaults
        self.input_jitter_eps = float(config.grin_input_jitter_eps)
        self.variant = config.grin_router_variant
        self.backend = config.grin_router_backend
        self.balance_coeff = float(config.moe_aux_loss_coeff or 0.0)
        self.counter = routing_rng.MicrobatchCounter()
        self.stats = RouterStats(config.num_moe_experts)

    # -- randomness ---------------------------------------------------------------------------
    def _token_ids(self, seq_local: int, batch: int, device) -> torch.Tensor:
        """Global ids of this rank's tokens (s-major like megatron's [S*B] view): the same on every layout."""
        sp = self.config.sequence_parallel
        tp, tp_rank = (self.tp_group.size(), self.tp_group.rank()) if sp else (1, 0)
        dp_rank = parallel_state.get_data_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
        return routing_rng.global_token_ids(seq_local, batch, seq_rank=tp_rank, seq_shards=tp,
                                            sample_offset=dp_rank * batch, device=device)

    # -- routing ------------------------------------------------------------------------------
    def route_tokens(self, hidden_SBH: torch.Tensor, padding_mask=None):
        """(expert input [S, B, H], weights [T, K], experts [T, K]); the expert input is jittered in training.

        GRIN jitters the MoE input before both the gate and the experts (HF transformers 4.x); each rank
        draws the noise of its own tokens only, keyed by global token id.
        """
        seq_local, batch, hidden = hidden_SBH.shape
        key = self.counter.take() if self.training else None
        token_ids = self._token_ids(seq_local, batch, hidden_SBH.device) if key is not None else None
        if key is not None and self.input_jitter_eps > 0:
            jkey = jitter_key(token_ids, seed=routing_rng.routing_step().seed, iteration=key[0],
                              layer_number=self.layer_number or 0, microbatch=key[1])
            hidden_SBH = input_jitter(hidden_SBH.reshape(-1, hidden), self.input_jitter_eps, jkey,
                                      self.backend).view(hidden_SBH.shape)
        logits_TE = self.gating(hidden_SBH).reshape(-1, self.config.num_moe_experts)
        logits_TE = self.apply_z_loss(logits_TE, padding_mask=None)
        weights_TK, experts_TK = self._pick(logits_TE, key, token_ids)
        return hidden_SBH, weights_TK, experts_TK

    def forward(self, input: torch.Tensor, padding_mask=None):
        """megatron's contract: (probs [T, E], routing_map [T, E])."""
        _, weights_TK, experts_TK = self.route_tokens(input, padding_mask)
        return dense_routing(weights_TK, experts_TK, self.config.num_moe_experts)

    def routing(self, logits: torch.Tensor, padding_mask=None):
        """megatron's ``TopKRouter.routing`` on bare logits ([T, E], tokens numbered 0..T-1 in training)."""
        logits_TE = self.apply_z_loss(logits.reshape(-1, self.config.num_moe_experts), padding_mask=None)
        key = self.counter.take() if self.training else None
        token_ids = self._token_ids(logits_TE.shape[0], 1, logits_TE.device) if key is not None else None
        weights_TK, experts_TK = self._pick(logits_TE, key, token_ids)
        return dense_routing(weights_TK, experts_TK, self.config.num_moe_experts)

    def _pick(self, logits_TE: torch.Tensor, key, token_ids):
        """SparseMixer-v2 on the logits (fused kernel or reference), statistics, the balance loss."""
        routing_key = None
        if key is not None:
            routing_key = RoutingKey(token_ids, routing_rng.routing_step().seed, key[0], self.layer_number or 0, key[1])
        weights_TK, experts_TK, stats = sparsemixer_routing(
            logits_TE, self.jitter_eps, self.topk, self.training, routing_key, self.variant, backend=self.backend)
        if torch.is_grad_enabled() or not self.training:  # not the no-grad first pass of a recomputed layer
            self.stats.add(logits_TE.detach(), experts_TK, stats)
        if self.training and self.balance_coeff > 0 and torch.is_grad_enabled():
            weights_TK = self._apply_balance_loss(weights_TK, logits_TE, experts_TK)
        return weights_TK, experts_TK

    def _apply_balance_loss(self, weights_TK, logits_TE, experts_TK):
        """GRIN's global balance loss: f_i from the *sampled* picks, counted over TP x DP.

        Each rank holds the piece sum_i f_i * P_i(local tokens); the pieces add up to the loss of the
        whole global micro-batch. DDP *averages* gradients over DP, so the attached piece is scaled by the
        DP size: the coefficient then means the same at any DP size (megatron's own global_aux_loss
        omits this factor).
        """
        num_experts = self.config.num_moe_experts
        scores_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
        tokens_per_expert = reduce_from_tensor_model_parallel_region(expert_counts(experts_TK, num_experts),
                                                                     self.tp_dp_cp_group)
        loss = switch_load_balancing_loss_func(
            probs=scores_TE, tokens_per_expert=tokens_per_expert,
            total_num_tokens=experts_TK.shape[0] * self.tp_dp_cp_group.size(), topk=self.topk,
            num_experts=num_experts, moe_aux_loss_coeff=self.balance_coeff)
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        save_to_aux_losses_tracker("load_balancing_loss", loss.detach() / self.balance_coeff, self.layer_number,
                                   num_layers, reduce_group=self.tp_dp_cp_group, reduce_group_has_dp=True)
        dp_size = self.tp_dp_cp_group.size() // self.tp_cp_group.size()
        return MoEAuxLossAutoScaler.apply(weights_TK, loss * dp_size)
