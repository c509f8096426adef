"""GRIN model configuration: one validated dataclass, presets, and the bridge to megatron-core.

Everything below the CLI receives a :class:`GrinConfig`; argparse/YAML are translated once, at the
boundary. Validation raises :class:`ConfigError` naming the Megatron-style flag to change, and runs
before any process group exists.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Optional

ROUTER_VARIANTS = ("sparsemixer_v2", "sparsemixer_v2_star")
EXPERT_BACKENDS = ("auto", "sequential", "grouped_mm", "te_grouped")
#: Megatron-LM's --attention-backend names
ATTENTION_BACKENDS = ("auto", "flash", "fused", "unfused", "local")


class ConfigError(ValueError):
    """A bad setting, reported before any process group or model is created."""


def have_transformer_engine() -> bool:
    """Transformer Engine is installed (found without importing it: imports stay cheap before validation)."""
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_backend(name: str) -> str:
    """Turn 'auto' into the concrete expert backend for this machine.

    Transformer Engine's GroupedLinear where installed (GPU clusters), else "grouped_mm": torch's grouped
    GEMM on sm90+ bf16 and, on CPU, one autograd node looping over whole expert MLPs, measured faster
    than SequentialMLP in fp32 and bf16 (docs/performance.md).
    """
    if name == "auto":
        return "te_grouped" if have_transformer_engine() else "grouped_mm"
    if name not in EXPERT_BACKENDS:
        raise ConfigError(f"--grin-expert-backend {name!r} is unknown; choose one of {EXPERT_BACKENDS}.")
    return name


@dataclass
class GrinConfig:
    """Architecture, routing and parallel layout of a GRIN MoE model (Megatron flag names in comments)."""

    # --- architecture -----------------------------------------------------------------------
    num_layers: int = 32  # --num-layers
    hidden_size: int = 4096  # --hidden-size
    ffn_hidden_size: int = 6400  # --ffn-hidden-size / --moe-ffn-hidden-size (per expert, SwiGLU inner)
    num_attention_heads: int = 32  # --num-attention-heads
    num_query_groups: int = 8  # --num-query-groups (GQA kv heads)
    kv_channels: Optional[int] = None  # --kv-channels (head dim); None -> hidden/heads
    vocab_size: int = 32064  # --vocab-size (HF vocab, unpadded)
    make_vocab_size_divisible_by: int = 128  # --make-vocab-size-divisible-by (TP-independent padding)
    max_position_embeddings: int = 4096  # --max-position-embeddings
    rotary_base: float = 10000.0  # --rotary-base
    sliding_window: Optional[int] = 2047  # HF convention: keys visible including the query itself
    layernorm_epsilon: float = 1e-5  # --norm-epsilon
    init_method_std: float = 0.02  # --init-method-std
    # --- MoE --------------------------------------------------------------------------------
    num_experts: int = 16  # --num-experts
    moe_router_topk: int = 2  # --moe-router-topk
    router_variant: str = "sparsemixer_v2"  # --grin-router
    router_jitter_eps: float = 0.01  # --grin-jitter-eps (SparseMixer mask threshold, HF router_jitter_noise)
    input_jitter_eps: float = 0.01  # --moe-input-jitter-eps (multiplicative, training only; experts see it)
    moe_aux_loss_coeff: float = 0.0  # --moe-aux-loss-coeff (global balance loss on sampled picks)
    moe_z_loss_coeff: Optional[float] = None  # --moe-z-loss-coeff
    expert_backend: str = "auto"  # --grin-expert-backend
    # --- fused paths (Megatron-LM's switches; None = on where CUDA and Triton are available) -----
    moe_router_fusion: Optional[bool] = None  # --moe-router-fusion (Triton SparseMixer-v2 routing)
    moe_permute_fusion: Optional[bool] = None  # --moe-permute-fusion (Triton permute / weighted unpermute)
    moe_grouped_gemm: Optional[bool] = None  # --moe-grouped-gemm (grouped-GEMM experts)
    attention_backend: str = "auto"  # --attention-backend auto|flash|fused|unfused|local
    # --- parallel layout --------------------------------------------------------------------
    tensor_model_parallel_size: int = 1  # --tensor-model-parallel-size
    pipeline_model_parallel_size: int = 1  # --pipeline-model-parallel-size
    virtual_pipeline_model_parallel_size: Optional[int] = None  # --num-layers-per-virtual-pipeline-stage derived
    expert_tensor_parallel_size: Optional[int] = None  # --expert-tensor-parallel-size (must equal TP)
    expert_model_parallel_size: int = 1  # --expert-model-parallel-size (GRIN: 1)
    context_parallel_size: int = 1  # --context-parallel-size (GRIN: 1)
    sequence_parallel: Optional[bool] = None  # --sequence-parallel; None -> on when TP > 1
    # --- numerics / memory ------------------------------------------------------------------
    bf16: bool = False  # --bf16
    recompute_granularity: Optional[str] = None  # --recompute-granularity full|selective
    recompute_method: Optional[str] = None  # --recompute-method uniform|block
    recompute_num_layers: Optional[int] = None  # --recompute-num-layers
    extra: dict = field(default_factory=dict)  # further TransformerConfig overrides (advanced)

    # ----------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows: vocab padded to a multiple that does not depend on TP (so checkpoints reshard)."""
        d = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // d) * d

    @property
    def seq_parallel(self) -> bool:
        return self.tensor_model_parallel_size > 1 if self.sequence_parallel is None else self.sequence_parallel

    def replace(self, **changes: Any) -> "GrinConfig":
        return dataclasses.replace(self, **changes)

    def validate(self, world_size: Optional[int] = None) -> "GrinConfig":
        """Raise ConfigError naming the flag for any setting megatron-grin cannot train with."""
        _check_positive(self, "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                        "num_query_groups", "vocab_size", "max_position_embeddings", "num_experts",
                        "moe_router_topk", "tensor_model_parallel_size", "pipeline_model_parallel_size")
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if self.moe_router_topk > self.num_experts:
            raise ConfigError(f"--moe-router-topk {self.moe_router_topk} exceeds --num-experts "
                              f"{self.num_experts}: each token needs that many distinct experts.")
        if self.router_variant not in ROUTER_VARIANTS:
            raise ConfigError(f"--grin-router {self.router_variant!r} is unknown; choose one of {ROUTER_VARIANTS}.")
        if self.expert_backend not in EXPERT_BACKENDS:
            raise ConfigError(f"--grin-expert-backend {self.expert_backend!r} is unknown; choose one of "
                              f"{EXPERT_BACKENDS}.")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"--attention-backend {self.attention_backend!r} is unknown; choose one of "
                              f"{ATTENTION_BACKENDS}.")
        if not self.router_jitter_eps >= 0:
            raise ConfigError(f"--grin-jitter-eps must be >= 0 (got {self.router_jitter_eps}).")
        if not 0 <= self.input_jitter_eps < 1:
            raise ConfigError(f"--moe-input-jitter-eps must be in [0, 1) (got {self.input_jitter_eps}).")
        if self.moe_aux_loss_coeff < 0:
            raise ConfigError(f"--moe-aux-loss-coeff must be >= 0 (got {self.moe_aux_loss_coeff}).")
        if self.moe_z_loss_coeff is not None and self.moe_z_loss_coeff < 0:
            raise ConfigError(f"--moe-z-loss-coeff must be >= 0 (got {self.moe_z_loss_coeff}).")
        if self.hidden_size % self.num_attention_heads and self.kv_channels is None:
            raise ConfigError(f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
                              f"{self.num_attention_heads}; set --kv-channels or change one of them.")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                              f"--num-query-groups {self.num_query_groups}.")
        if self.num_attention_heads % tp:
            raise ConfigError(f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                              f"--tensor-model-parallel-size {tp}.")
        if self.num_query_groups % tp:
            raise ConfigError(f"--num-query-groups {self.num_query_groups} is not divisible by "
                              f"--tensor-model-parallel-size {tp}.")
        if self.ffn_hidden_size % tp:
            raise ConfigError(f"--ffn-hidden-size {self.ffn_hidden_size} is not divisible by "
                              f"--tensor-model-parallel-size {tp} (experts are sharded over TP).")
        etp = self.expert_tensor_parallel_size
        if etp is not None and etp != tp:
            raise ConfigError(f"--expert-tensor-parallel-size {etp} differs from --tensor-model-parallel-size "
                              f"{tp}: megatron-core 0.16 leaves expert gradients unsynchronised then. "
                              "Drop the flag (it defaults to TP).")
        if self.expert_model_parallel_size != 1:
            raise ConfigError("--expert-model-parallel-size must be 1: GRIN trains without expert "
                              "parallelism (each pipeline stage holds all experts of its layers).")
        if self.context_parallel_size != 1:
            raise ConfigError("--context-parallel-size must be 1: context parallelism is not supported.")
        if tp > 1 and not self.seq_parallel:
            raise ConfigError("--tensor-model-parallel-size > 1 requires --sequence-parallel for MoE layers "
                              "in megatron-core; remove --no-sequence-parallel.")
        if self.padded_vocab_size % tp:
            raise ConfigError(f"padded vocab {self.padded_vocab_size} is not divisible by "
                              f"--tensor-model-parallel-size {tp}; change --make-vocab-size-divisible-by.")
        if self.num_layers % pp:
            raise ConfigError(f"--num-layers {self.num_layers} is not divisible by "
                              f"--pipeline-model-parallel-size {pp}.")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None:
            if pp < 2:
                raise ConfigError("virtual pipeline stages need --pipeline-model-parallel-size >= 2.")
            if self.num_layers % (pp * vpp):
                raise ConfigError(f"--num-layers {self.num_layers} is not divisible by pipeline size x virtual "
                                  f"stages = {pp * vpp}; change --num-layers-per-virtual-pipeline-stage.")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be >= 1 or None (got {self.sliding_window}).")
        if self.recompute_granularity not in (None, "full", "selective"):
            raise ConfigError(f"--recompute-granularity {self.recompute_granularity!r}: use full or selective.")
        if self.recompute_granularity == "full" and self.recompute_method not in ("uniform", "block"):
            raise ConfigError("--recompute-granularity full needs --recompute-method uniform|block.")
        if world_size is not None and world_size % (tp * pp):
            raise ConfigError(f"world size {world_size} is not divisible by TP x PP = {tp * pp}.")
        return self


def _check_positive(cfg: GrinConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} must be a positive integer (got {value!r}).")


# --- presets ------------------------------------------------------------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    # The released GRIN MoE (microsoft/GRIN-MoE): 16x3.8B, 41.9B total / 6.6B active.
    "grin-16x3.8b": {},
    # ~10M-parameter model for CPU demos (local main job).
    "tiny": dict(num_layers=4, hidden_size=128, ffn_hidden_size=192, num_attention_heads=4, num_query_groups=2,
                 num_experts=8, vocab_size=512, max_position_embeddings=256, sliding_window=None),
    # Smallest useful shape for unit and parallel tests.
    "test": dict(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                 num_experts=4, vocab_size=128, max_position_embeddings=64, sliding_window=None),
}


def preset(name: str, **overrides: Any) -> GrinConfig:
    """Return a named preset with overrides applied (overrides use GrinConfig field names)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}.")
    return GrinConfig(**{**PRESETS[name], **overrides})
