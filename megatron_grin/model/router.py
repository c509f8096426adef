"""megatron-core router for GRIN: SparseMixer-v2 picks, replayable randomness, routing statistics.

The maths is in model/sparsemixer.py; this module plugs it into megatron's ``TopKRouter`` contract.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    get_tokens_per_expert_and_token_count,
    save_to_aux_losses_tracker,
    switch_load_balancing_loss_func,
)
from megatron.core.transformer.moe.router import TopKRouter

from megatron_grin.model import routing_rng
from megatron_grin.model.sparsemixer import sparsemixer_v2_with_stats


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
        counts = torch.bincount(experts_TK.reshape(-1), minlength=self.num_experts).to(torch.float64)
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
        """Metrics from a (possibly all-reduced) ``as_tensor`` vector."""
        counts = vector[:num_experts]
        tokens, picks, not_argmax, full, entropy = vector[num_experts:].tolist()
        mean = counts.mean().item()
        return {
            "tokens_per_expert_min": counts.min().item(),
            "tokens_per_expert_max": counts.max().item(),
            "tokens_per_expert_cv": (counts.std(unbiased=False).item() / mean) if mean > 0 else 0.0,
            "experts_without_tokens": float((counts == 0).sum().item()),
            "router_entropy": entropy / tokens if tokens else 0.0,
            "sampled_not_argmax_share": not_argmax / picks if picks else 0.0,
            "heun_full_share": full / not_argmax if not_argmax else 0.0,
        }


class SparseMixerV2Router(TopKRouter):
    """megatron-core router running SparseMixer-v2 (plugs into ``MoESubmodules.router``).

    Returns megatron's routing contract: dense ``probs`` [T, E] (zero off the picks; each pick's
    SparseMixer weight) and a boolean ``routing_map`` [T, E] with exactly top_k True per row, so the
    stock dropless token dispatchers and expert modules run unchanged.

    GRIN settings come from the config's ``grin_*`` fields (see model.GrinTransformerConfig).
    """

    def __init__(self, config, pg_collection=None, **kwargs):
        super().__init__(config=config, pg_collection=pg_collection)
        self.jitter_eps = float(getattr(config, "grin_router_jitter_eps", 0.01))
        self.input_jitter_eps = float(getattr(config, "grin_input_jitter_eps", 0.0))
        self.variant = getattr(config, "grin_router_variant", "v2")
        self.balance_coeff = float(config.moe_aux_loss_coeff or 0.0)
        self.counter = routing_rng.MicrobatchCounter()
        self.stats = RouterStats(config.num_moe_experts)
        self._generators: dict = {}

    # -- randomness ---------------------------------------------------------------------------
    def _token_ids(self, seq_local: int, batch: int, device) -> torch.Tensor:
        sp = self.config.sequence_parallel
        tp = self.tp_group.size() if sp else 1
        tp_rank = self.tp_group.rank() if sp else 0
        dp_rank = parallel_state.get_data_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
        return routing_rng.global_token_ids(seq_local, batch, seq_rank=tp_rank, seq_shards=tp,
                                            sample_offset=dp_rank * batch, device=device)

    def _jitter(self, hidden_SBH: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
        """x * U(1-eps, 1+eps), the same on every TP rank for the same token and on replay."""
        step = routing_rng.routing_step()
        sp = self.config.sequence_parallel
        tp, tp_rank = (self.tp_group.size(), self.tp_group.rank()) if sp else (1, 0)
        dp_rank = parallel_state.get_data_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
        seed = hash((step.seed, key, self.layer_number, routing_rng.STREAM_INPUT_JITTER, dp_rank)) & (2**62 - 1)
        gen = self._generators.get(hidden_SBH.device)
        if gen is None:
            gen = self._generators[hidden_SBH.device] = torch.Generator(device=hidden_SBH.device)
        gen.manual_seed(seed)
        s_local, batch, hidden = hidden_SBH.shape
        noise = routing_rng.jitter_noise((s_local * tp, batch, hidden), self.input_jitter_eps, hidden_SBH.dtype, gen)
        return hidden_SBH * noise[tp_rank * s_local:(tp_rank + 1) * s_local]

    # -- routing ------------------------------------------------------------------------------
    def jitter_and_route(self, hidden_SBH: torch.Tensor, padding_mask=None):
        """Returns (expert input, probs [T, E], routing_map [T, E]); the expert input is jittered in training."""
        key = self.counter.take() if self.training else None
        if key is not None and self.input_jitter_eps > 0:
            hidden_SBH = self._jitter(hidden_SBH, key)
        logits = self.gating(hidden_SBH)
        probs, routing_map = self.routing(logits, padding_mask=padding_mask, key=key,
                                          seq_batch=tuple(hidden_SBH.shape[:2]))
        return hidden_SBH, probs, routing_map

    def forward(self, input: torch.Tensor, padding_mask=None):
        _, probs, routing_map = self.jitter_and_route(input, padding_mask)
        return probs, routing_map

    def routing(self, logits: torch.Tensor, padding_mask=None, key=None, seq_batch=None):
        num_experts = self.config.num_moe_experts
        logits_TE = logits.reshape(-1, num_experts)
        logits_TE = self.apply_z_loss(logits_TE, padding_mask=None)
        uniforms = None
        if self.training:
            if key is None:
                key = self.counter.take()
            seq_local, batch = seq_batch if seq_batch is not None else (logits_TE.shape[0], 1)
            step = routing_rng.routing_step()
            uniforms = routing_rng.routing_uniforms(
                self._token_ids(seq_local, batch, logits_TE.device), num_experts + 1, self.topk,
                seed=step.seed, iteration=key[0], layer_number=self.layer_number or 0, microbatch=key[1])
        weights_TK, experts_TK, stats = sparsemixer_v2_with_stats(
            logits_TE, self.jitter_eps, self.topk, self.training, uniforms=uniforms, variant=self.variant)
        probs_TE = torch.zeros_like(logits_TE).scatter(1, experts_TK, weights_TK)
        routing_map_TE = torch.zeros_like(logits_TE, dtype=torch.bool).scatter(1, experts_TK, True)
        if torch.is_grad_enabled() or not self.training:
            self.stats.add(logits_TE.detach(), experts_TK, stats)
        if self.training and self.balance_coeff > 0 and torch.is_grad_enabled():
            probs_TE = self._apply_balance_loss(probs_TE, logits_TE, routing_map_TE)
        return probs_TE, routing_map_TE

    def _apply_balance_loss(self, probs_TE, logits_TE, routing_map_TE):
        """GRIN's global balance loss: f_i from the *sampled* picks, counted over TP x DP.

        Each rank holds the piece sum_i f_i * P_i(local tokens); the pieces add up to the loss of the
        whole global micro-batch. DDP *averages* gradients over DP, so the attached piece is scaled by the
        DP size: the coefficient then means the same at any DP size (megatron's own global_aux_loss
        omits this factor).
        """
        scores_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
        tokens_per_expert, _, total_tokens = get_tokens_per_expert_and_token_count(
            routing_map=routing_map_TE, reduce_group=self.tp_dp_cp_group, topk=self.topk)
        loss = switch_load_balancing_loss_func(
            probs=scores_TE, tokens_per_expert=tokens_per_expert, total_num_tokens=total_tokens,
            topk=self.topk, num_experts=self.config.num_moe_experts, moe_aux_loss_coeff=self.balance_coeff)
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        save_to_aux_losses_tracker("load_balancing_loss", loss.detach() / self.balance_coeff, self.layer_number,
                                   num_layers, reduce_group=self.tp_dp_cp_group, reduce_group_has_dp=True)
        dp_size = self.tp_dp_cp_group.size() // self.tp_cp_group.size()
        return MoEAuxLossAutoScaler.apply(probs_TE, loss * dp_size)
