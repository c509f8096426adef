"""SparseMixer-v2 maths (GRIN): sampled expert choice with a Heun-style router gradient, in plain PyTorch.

This is the reference every fused routing kernel (ops/routing.py) is tested against; it needs no megatron.

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
``variant="sparsemixer_v2_star"`` (the names of ``--grin-router``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

HEUN_LOW = 0.3333  # HF literal, not 1/3
HEUN_HIGH_ADD = 0.6667


@dataclass(frozen=True)
class EstimatorVariant:
    """Constants that distinguish SparseMixer-v2 (what GRIN trained with) from the paper's v2*."""

    temperature: float
    p_full: float  # P(m = 1) for a pick that is not the argmax
    grad_scale: float


VARIANTS = {
    "sparsemixer_v2": EstimatorVariant(temperature=1.0, p_full=0.25, grad_scale=1.0),
    "sparsemixer_v2_star": EstimatorVariant(temperature=2.0, p_full=5.0 / 8.0, grad_scale=2.0),
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
                   uniforms: Optional[torch.Tensor] = None, variant: str = "sparsemixer_v2"):
    """SparseMixer-v2 routing for any top_k >= 1: returns (weights [T, top_k], experts [T, top_k]).

    See :func:`sparsemixer_v2_with_stats` for the arguments.
    """
    weights, experts, _ = sparsemixer_v2_with_stats(logits, jitter_eps, top_k, training, uniforms, variant)
    return weights, experts


def sparsemixer_v2_with_stats(logits: torch.Tensor, jitter_eps: float, top_k: int, training: bool,
                              uniforms: Optional[torch.Tensor] = None, variant: str = "sparsemixer_v2"):
    """SparseMixer-v2 routing for any top_k >= 1, plus per-pick statistics.

    Args:
        logits: [T, E] router logits.
        jitter_eps: mask threshold epsilon (HF ``router_jitter_noise``, 0.01 for GRIN).
        top_k: picks per token.
        training: sample (True) or take the argmax (False).
        uniforms: [T, top_k, E+1] uniforms in (0, 1) for training; drawn from torch's generator if None.
        variant: "sparsemixer_v2" (GRIN, default) or "sparsemixer_v2_star" (the paper's corrected estimator).

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
