"""SparseMixer-v2 routing (GRIN): sampled expert choice with a Heun-style router gradient.

Glossary (shape suffixes): T tokens, E experts, K picks per token (top_k), H hidden.
    logits_TE   router logits z (fp32)
    uniforms_TKL  random uniforms in (0,1); lanes 0..E-1 drive the Gumbel draw, lane E the Heun Bernoulli
    weights_TK  each pick's weight: its own masked-softmax probability (times the Heun multiplier in training)
    experts_TK  chosen expert ids

Semantics follow Hugging Face transformers' ``phimoe.sparsemixer`` (the only public reference):
  * pick k works on z with the previous picks removed; experts whose relative gap
    (max - z) / clamp(|z|, min=max) exceeds 2*jitter_eps are masked (|z| is the *original* logit);
  * training samples D ~ masked softmax (Gumbel-max), eval takes the argmax;
  * the weight is p_D of that pick's masked softmax, never renormalised over picks;
  * training multiplies the forward weight by m in {1.0, 0.3333}: m = 1 when D is the argmax, else with
    probability 1/4 (Heun's third-order rule);
  * backward: dL/dz = g * p_D * (onehot(D) - p) with g = dL/dweight -- m does not appear, and nothing
    flows through p itself.
The paper's corrected estimator v2* (temperature 2, Bernoulli 5/8, x2) is available as
``variant="v2_star"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_grin import routing_rng

HEUN_LOW = 0.3333  # HF literal, not 1/3
HEUN_HIGH_ADD = 0.6667


@dataclass(frozen=True)
class EstimatorVariant:
    """Constants that distinguish SparseMixer-v2 (what GRIN trained with) from the paper's v2*."""

    temperature: float
    p_full: float  # P(m = 1) for a pick that is not the argmax
    grad_scale: float


VARIANTS = {
    "v2": EstimatorVariant(temperature=1.0, p_full=0.25, grad_scale=1.0),
    "v2_star": EstimatorVariant(temperature=2.0, p_full=5.0 / 8.0, grad_scale=2.0),
}


class _HeunWeight(torch.autograd.Function):
    """Forward: p_D * m. Backward: the SparseMixer router gradient g * p_D * (onehot(D) - p), without m."""

    @staticmethod
    def forward(ctx, logits_TE, p_D_T1, experts_T1, probs_TE, multiplier_T1, grad_scale: float):
        ctx.save_for_backward(p_D_T1, experts_T1, probs_TE)
        ctx.grad_scale = grad_scale
        return p_D_T1 * multiplier_T1

    @staticmethod
    def backward(ctx, grad_T1):
        p_D_T1, experts_T1, probs_TE = ctx.saved_tensors
        g_T1 = grad_T1 * p_D_T1 * ctx.grad_scale
        grad_TE = probs_TE * -g_T1
        grad_TE.scatter_add_(-1, experts_T1, g_T1)
        return grad_TE, None, None, None, None, None


def _relative_mask(logits_TE: torch.Tensor, remaining_TE: torch.Tensor, jitter_eps: float):
    """Mask experts whose relative gap to the best remaining logit exceeds 2*jitter_eps."""
    with torch.no_grad():
        max_T1, argmax_T1 = remaining_TE.max(dim=-1, keepdim=True)
        factor_TE = logits_TE.abs().clamp(min=max_T1)
        drop_TE = ((max_T1 - logits_TE) / factor_TE) > (2 * jitter_eps)
    return remaining_TE.masked_fill(drop_TE, float("-inf")), argmax_T1


def sparsemixer_v2(logits: torch.Tensor, jitter_eps: float, top_k: int, training: bool,
                   uniforms: Optional[torch.Tensor] = None, variant: str = "v2"):
    """SparseMixer-v2 routing for any top_k >= 1: returns (weights [T, top_k], experts [T, top_k]).

    See :func:`sparsemixer_v2_with_stats` for the arguments.
    """
    weights, experts, _ = sparsemixer_v2_with_stats(logits, jitter_eps, top_k, training, uniforms, variant)
    return weights, experts


def sparsemixer_v2_with_stats(logits: torch.Tensor, jitter_eps: float, top_k: int, training: bool,
                              uniforms: Optional[torch.Tensor] = None, variant: str = "v2"):
    """SparseMixer-v2 routing for any top_k >= 1, plus per-pick statistics.

    Args:
        logits: [T, E] router logits.
        jitter_eps: mask threshold epsilon (HF ``router_jitter_noise``, 0.01 for GRIN).
        top_k: picks per token.
        training: sample (True) or take the argmax (False).
        uniforms: [T, top_k, E+1] uniforms in (0, 1) for training; drawn from torch's generator if None.
        variant: "v2" (GRIN, default) or "v2_star" (the paper's corrected estimator).

    Returns:
        (weights [T, top_k], experts [T, top_k] int64, stats) where stats holds bool [T, top_k] tensors
        ``sampled_not_argmax`` and ``full_multiplier`` (training only; empty dict in eval).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [tokens, experts], got shape {tuple(logits.shape)}")
    num_experts = logits.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
    est = VARIANTS[variant]
    if training and uniforms is None:
        uniforms = torch.rand(logits.shape[0], top_k, num_experts + 1, device=logits.device).clamp_(1e-7, 1 - 1e-7)
    scaled = logits / est.temperature if est.temperature != 1.0 else logits
    remaining = scaled
    weights, experts, not_argmax, full = [], [], [], []
    for k in range(top_k):
        masked_TE, argmax_T1 = _relative_mask(scaled, remaining, jitter_eps)
        if training:
            u_TE = uniforms[:, k, :num_experts].to(masked_TE.dtype)
            gumbel_TE = -torch.log(-torch.log(u_TE))
            pick_T1 = (masked_TE + gumbel_TE).argmax(dim=-1, keepdim=True)
        else:
            pick_T1 = argmax_T1
        probs_TE = torch.softmax(masked_TE, dim=-1)
        p_D_T1 = probs_TE.gather(-1, pick_T1)
        if training:
            with torch.no_grad():
                is_top_T1 = pick_T1 == probs_TE.argmax(dim=-1, keepdim=True)
                full_T1 = is_top_T1 | (uniforms[:, k, num_experts:] > 1.0 - est.p_full)
                mult_T1 = torch.add(HEUN_LOW, full_T1, alpha=HEUN_HIGH_ADD).to(probs_TE.dtype)
            not_argmax.append(~is_top_T1)
            full.append(full_T1)
            # d p_D(z / temperature) / dz carries 1 / temperature; v2* then doubles the router gradient.
            w_T1 = _HeunWeight.apply(logits, p_D_T1, pick_T1, probs_TE, mult_T1, est.grad_scale / est.temperature)
        else:
            w_T1 = p_D_T1
        weights.append(w_T1)
        experts.append(pick_T1)
        remaining = remaining.scatter(-1, pick_T1, float("-inf"))
    stats = {}
    if training:
        stats = {"sampled_not_argmax": torch.cat(not_argmax, -1), "full_multiplier": torch.cat(full, -1)}
    return torch.cat(weights, dim=-1), torch.cat(experts, dim=-1), stats




# --------------------------------------------------------------------------------------------------
# megatron-core integration
# --------------------------------------------------------------------------------------------------
from megatron.core import parallel_state  # noqa: E402
from megatron.core.transformer.moe.moe_utils import (  # noqa: E402
    MoEAuxLossAutoScaler,
    get_tokens_per_expert_and_token_count,
    save_to_aux_losses_tracker,
    switch_load_balancing_loss_func,
)
from megatron.core.transformer.moe.router import TopKRouter  # noqa: E402


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
