"""Parity gate for converted checkpoints: our model vs transformers' PhimoeForCausalLM on fixed inputs.

Our TP=1/PP=1 model is loaded from the megatron checkpoint the way the trainer resumes (one
``dist_checkpointing.load`` of the whole model: independent of the layer-by-layer reader the converter
uses), the HF model with ``AutoModelForCausalLM.from_pretrained`` (no remote code), both in eval mode
with fp32 compute, and their logits on a few seeded token sequences are compared: max |logit
difference|, mean KL(ours || HF) per token and top-1 agreement.

Two checks:

* **mapping** (always, ``max|diff| <= 1e-4``): our model with exactly the weights the HF directory
  holds. When the export changes the dtype (fp32 checkpoint -> bf16 files) our weights are rounded
  the same way first, so any difference left is a conversion error, not rounding.
* **dtype** (only when the conversion rounded fp32 weights to bf16): the unrounded model against the
  rounded one, a sanity bound on what rounding costs: mean KL <= 5e-2 nats per token (and finite
  logits). Max |diff| and top-1 agreement are reported, not gated: rounding flips MoE routing at near
  ties, which moves single logits by O(1) (a random 8-layer 16-expert model: max |diff| 1.3 at logit
  scale 3.8, mean KL 4.5e-3, 86% top-1 agreement) while the conversion itself is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import dist_checkpointing

from megatron_grin.config import GrinConfig
from megatron_grin.convert.mcore_io import MODEL_KEY, build_tp1_model, model_sharded_state_dict

FP32_ATOL = 1e-4
#: rounded (bf16) weights against the unrounded ones: mean KL(unrounded || rounded) per token at most this (nats).
BF16_KL = 5e-2


@dataclass
class Comparison:
    max_abs_diff: float
    mean_kl: float
    top1_agreement: float
    max_abs_logit: float
    atol: Optional[float]  # None: reported, not gated
    kl_tol: Optional[float]

    @property
    def passed(self) -> bool:
        if not (math.isfinite(self.max_abs_diff) and math.isfinite(self.mean_kl)):
            return False
        return (self.atol is None or self.max_abs_diff <= self.atol) and \
            (self.kl_tol is None or self.mean_kl <= self.kl_tol)

    def summary(self) -> str:
        atol = f" (tol {self.atol:.3g})" if self.atol is not None else ""
        kl = f" (tol {self.kl_tol:g})" if self.kl_tol is not None else ""
        return (f"max|logit diff| {self.max_abs_diff:.3g}{atol}, mean KL {self.mean_kl:.3g}{kl}, "
                f"top-1 agreement {self.top1_agreement:.2%}")


@dataclass
class ParityReport:
    mapping: Comparison
    dtype: Optional[Comparison]
    tokens: int

    @property
    def passed(self) -> bool:
        return self.mapping.passed and (self.dtype is None or self.dtype.passed)

    def summary(self) -> str:
        text = f"mapping: {self.mapping.summary()}"
        if self.dtype is not None:
            text += f"; bf16 rounding: {self.dtype.summary()}"
        return f"{text} over {self.tokens} tokens (max |logit| {self.mapping.max_abs_logit:.3g})"


def fixed_tokens(cfg: GrinConfig, batch: int = 2, seq_len: int = 32, seed: int = 1234) -> torch.Tensor:
    seq_len = min(seq_len, cfg.max_position_embeddings)
    return torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def load_tp1_model(iter_dir: str, cfg: GrinConfig):
    """Our TP=1 model (fp32, eval) with every parameter loaded from the checkpoint in one load."""

    model = build_tp1_model(cfg, device="cpu", dtype=torch.float32).eval()
    params = {name for name, _ in model.named_parameters()}
    sharded = {k: v for k, v in model_sharded_state_dict(model).items() if k in params}
    loaded = dist_checkpointing.load({MODEL_KEY: sharded}, iter_dir)[MODEL_KEY]
    missing = params - set(loaded)
    if missing:
        raise RuntimeError(f"checkpoint load left parameters unset: {sorted(missing)[:5]}")
    model.load_state_dict(loaded, strict=False)
    return model


@torch.no_grad()
def _logits(model, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return model(tokens, pos, None)[..., :vocab].float()


@torch.no_grad()
def hf_logits(hf_dir: str, tokens: torch.Tensor, rounded_to: Optional[torch.dtype] = None) -> torch.Tensor:
    """Logits of the HF model (fp32 compute); ``rounded_to`` first rounds its weights to that dtype."""
    import transformers
    from transformers import AutoModelForCausalLM

    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager", trust_remote_code=False,
                                                 local_files_only=True, **{dtype_kw: rounded_to or torch.float32})
    model = model.float().eval()
    logits = model(input_ids=tokens).logits.float()
    del model
    return logits


def compare(ours: torch.Tensor, theirs: torch.Tensor, atol: Optional[float] = None,
            kl_tol: Optional[float] = None, lossy: bool = False) -> Comparison:
    """Compare logits: the mapping gate's tolerances (max|diff| 1e-4 unless given), or, if ``lossy``, the
    bf16 rounding bound (mean KL only)."""
    if ours.shape != theirs.shape:
        raise ValueError(f"logit shapes differ: ours {tuple(ours.shape)}, HF {tuple(theirs.shape)}")
    diff = (ours - theirs).abs().max().item()
    logp, logq = F.log_softmax(ours.double(), -1), F.log_softmax(theirs.double(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    scale = ours.abs().max().item()
    if lossy:
        atol, kl_tol = None, BF16_KL if kl_tol is None else kl_tol
    elif atol is None:
        atol = FP32_ATOL
    return Comparison(diff, kl, top1, scale, atol, kl_tol)


def verify(iter_dir: str, cfg: GrinConfig, hf_dir: str, round_ours_to: Optional[torch.dtype] = None,
           round_hf_to: Optional[torch.dtype] = None, atol: Optional[float] = None, kl_tol: Optional[float] = None,
           batch: int = 2, seq_len: int = 32) -> ParityReport:
    """Compare our model (from the checkpoint in ``iter_dir``) with the HF model in ``hf_dir``.

    A lossy conversion rounded one side's weights: ``round_ours_to`` (to-hf: fp32 checkpoint exported as
    bf16) or ``round_hf_to`` (from-hf: fp32 HF weights saved as bf16). The mapping gate then compares with
    the other side rounded the same way. ``atol``/``kl_tol`` override the mapping gate's tolerances.
    Needs megatron's parallel state (single_process_megatron).
    """
    tokens = fixed_tokens(cfg, batch, seq_len)
    model = load_tp1_model(iter_dir, cfg)
    ours = _logits(model, tokens, cfg.vocab_size)
    ours_rounded = None
    if round_ours_to is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(round_ours_to).float())
        ours_rounded = _logits(model, tokens, cfg.vocab_size)
    del model
    theirs = hf_logits(hf_dir, tokens)
    if round_ours_to is not None:
        mapping = compare(ours_rounded, theirs, atol, kl_tol)
        dtype = compare(ours, theirs, lossy=True)
    elif round_hf_to is not None:
        mapping = compare(ours, hf_logits(hf_dir, tokens, round_hf_to), atol, kl_tol)
        dtype = compare(theirs, ours, lossy=True)
    else:
        mapping, dtype = compare(ours, theirs, atol, kl_tol), None
    return ParityReport(mapping, dtype, tokens.numel())
