"""GRIN model configuration: one validated dataclass whose fields declare their own flags, and the presets.

Everything below the CLI receives a :class:`GrinConfig`; flags and YAML are translated once, at the
boundary (training/arguments.py), from the declarations here. The field defaults are the released GRIN
16x3.8B model (the ``grin-16x3.8b`` preset); ``megatron-grin pretrain`` uses them only when a GRIN preset
or config is chosen, otherwise Megatron-LM's defaults apply. Validation collects every problem, each
naming the Megatron-style flag to change, before any process group exists.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_grin.settings import GRIN_GROUP, optional_int, range_problems, setting

#: --grin-router values; model/sparsemixer.py keys its estimators by the same names
ROUTER_VARIANTS = ("sparsemixer_v2", "sparsemixer_v2_star")
EXPERT_BACKENDS = ("auto", "sequential", "grouped_mm", "te_grouped")
#: Megatron-LM's --attention-backend names
ATTENTION_BACKENDS = ("auto", "flash", "fused", "unfused", "local")
#: Megatron-LM's --moe-router-load-balancing-type names (megatron-grin computes global_aux_loss; docs/training.md)
LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none")

TC, NS, TOK, MOE, DIST = "transformer configuration", "network size", "tokenizer", "moe", "distributed"


class ConfigError(ValueError):
    """Bad settings, reported before any process group or model is created; one message per problem."""

    def __init__(self, problems: "str | list[str]"):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


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


def parse_window(token: str) -> Optional[int]:
    """Megatron-LM's ``--window-size L,R`` (or ``(L,R)``) -> GRIN's HF-convention window L+1; none = full."""
    text = token.strip().strip("()").replace(" ", "")
    if text.lower() in ("none", "null", ""):
        return None
    parts = text.split(",")
    if len(parts) != 2:
        raise ValueError("give LEFT,RIGHT such as 2046,0 (GRIN's window of 2047 keys), or none")
    left, right = int(parts[0]), int(parts[1])
    if right != 0:
        raise ValueError(f"the right window must be 0: GRIN's attention is causal (got {right})")
    return None if left < 0 else left + 1


@dataclass
class GrinConfig:
    """Architecture, routing and parallel layout of a GRIN MoE model."""

    # --- architecture -----------------------------------------------------------------------
    num_layers: int = setting(32, "--num-layers", help="transformer layers (each attention + MoE)", group=TC,
                              type=int, ge=1, arch=True)
    hidden_size: int = setting(4096, "--hidden-size", help="model width", group=TC, type=int, ge=1, arch=True)
    ffn_hidden_size: int = setting(
        6400, "--moe-ffn-hidden-size", help="per-expert SwiGLU inner size (HF intermediate_size); "
        "default: --ffn-hidden-size", group=TC, type=int, ge=1, arch=True)
    num_attention_heads: int = setting(32, "--num-attention-heads", help="query heads", group=TC, type=int, ge=1,
                                       arch=True)
    num_query_groups: int = setting(8, "--num-query-groups", help="key/value heads, with --group-query-attention",
                                    group=TC, type=int, ge=1, arch=True)
    kv_channels: Optional[int] = setting(None, "--kv-channels", help="head dimension (default: hidden / heads)",
                                         group=TC, type=int, ge=1, arch=True)
    vocab_size: int = setting(32064, "--vocab-size", help="unpadded vocabulary (default: the tokenizer's)",
                              group=TOK, type=int, ge=1, arch=True)
    make_vocab_size_divisible_by: int = setting(
        128, "--make-vocab-size-divisible-by", help="pad the vocabulary to a multiple of this x TP (Megatron-LM)",
        group=NS, type=int, ge=1, arch=True)
    padded_vocab: Optional[int] = setting(
        None, "--padded-vocab-size", help="embedding rows; default: Megatron-LM's padding, or the checkpoint's "
        "on --load", group=TOK, type=int, ge=1, arch=True)
    max_position_embeddings: int = setting(4096, "--max-position-embeddings", help="longest sequence (RoPE)",
                                           group=NS, type=int, ge=1, arch=True)
    rotary_base: float = setting(10000.0, "--rotary-base", help="RoPE base", group=NS, type=float, gt=0, arch=True)
    sliding_window: Optional[int] = setting(
        2047, "--window-size", help="local attention: LEFT,0 sees LEFT+1 keys incl. the query (GRIN: 2046,0); none",
        group=NS, type=parse_window, ge=1, arch=True, metavar="LEFT,0|none")
    layernorm_epsilon: float = setting(1e-5, "--norm-epsilon", help="LayerNorm epsilon", group=TC, type=float, gt=0,
                                       arch=True)
    init_method_std: float = setting(0.02, "--init-method-std", help="std of the normal initialisation", group=TC,
                                     type=float, gt=0)
    hidden_dropout: float = setting(0.0, "--hidden-dropout", help="dropout after attention and MoE", group=TC,
                                    type=float, ge=0, lt=1, arch=True)
    attention_dropout: float = setting(0.0, "--attention-dropout", help="dropout of attention probabilities",
                                       group=TC, type=float, ge=0, lt=1, arch=True)
    # --- MoE --------------------------------------------------------------------------------
    num_experts: int = setting(16, "--num-experts", help="experts per MoE layer", group=MOE, type=int, ge=1,
                               arch=True)
    moe_router_topk: int = setting(2, "--moe-router-topk", help="experts per token", group=TC, type=int, ge=1,
                                   arch=True)
    router_variant: str = setting("sparsemixer_v2", "--grin-router", help="sparsemixer_v2 (GRIN) or "
                                  "sparsemixer_v2_star (the paper's corrected estimator)", group=GRIN_GROUP,
                                  choices=ROUTER_VARIANTS)
    router_jitter_eps: float = setting(0.01, "--grin-jitter-eps", help="SparseMixer mask threshold epsilon "
                                       "(HF router_jitter_noise)", group=GRIN_GROUP, type=float, ge=0)
    input_jitter_eps: float = setting(0.01, "--moe-input-jitter-eps", help="multiplicative input jitter "
                                      "U(1-eps, 1+eps) in training; experts see it", group=TC, type=float, ge=0, lt=1)
    moe_aux_loss_coeff: float = setting(0.0, "--moe-aux-loss-coeff", help="GRIN's global balance loss on the "
                                        "sampled picks (reduced over TP x DP)", group=MOE, type=float, ge=0,
                                        nargs="+", max_values=1)
    moe_router_load_balancing_type: str = setting(
        "global_aux_loss", "--moe-router-load-balancing-type", help="global_aux_loss (GRIN's) or none; a "
        "coefficient of 0 accepts any", group=MOE, choices=LOAD_BALANCING_TYPES, nargs="+", max_values=1)
    moe_z_loss_coeff: Optional[float] = setting(None, "--moe-z-loss-coeff", help="router z-loss", group=TC,
                                                type=float, ge=0)
    moe_router_dtype: Optional[str] = setting("fp32", "--moe-router-dtype", help="router GEMM and softmax dtype "
                                              "(default: the model's)", group=TC, choices=("fp32", "fp64"))
    expert_backend: str = setting("auto", "--grin-expert-backend", help="auto (te_grouped with Transformer Engine, "
                                  "else grouped_mm), sequential, grouped_mm, te_grouped", group=GRIN_GROUP,
                                  choices=EXPERT_BACKENDS)
    # --- fused paths (Megatron-LM's switches; None = on where CUDA and Triton are available) -----
    moe_router_fusion: Optional[bool] = setting(None, "--moe-router-fusion", help="Triton SparseMixer-v2 routing "
                                                "(default: on CUDA)", group=TC, kind="switch")
    moe_permute_fusion: Optional[bool] = setting(None, "--moe-permute-fusion", help="Triton permute / weighted "
                                                 "unpermute (default: on CUDA)", group=TC, kind="switch")
    moe_grouped_gemm: Optional[bool] = setting(None, "--moe-grouped-gemm", help="grouped-GEMM experts (default: on)",
                                               group=TC, kind="switch")
    attention_backend: str = setting("auto", "--attention-backend", help="core attention: auto, flash, fused, "
                                     "unfused, local", group=TC, choices=ATTENTION_BACKENDS)
    # --- parallel layout --------------------------------------------------------------------
    tensor_model_parallel_size: int = setting(1, "--tensor-model-parallel-size", help="TP", group=TC, type=int, ge=1)
    pipeline_model_parallel_size: int = setting(1, "--pipeline-model-parallel-size", help="PP (1F1B)", group=TC,
                                                type=int, ge=1)
    virtual_pipeline_model_parallel_size: Optional[int] = setting(
        None, "--num-virtual-stages-per-pipeline-rank", help="virtual stages per pipeline rank (interleaved 1F1B)",
        group=DIST, type=optional_int, ge=1)
    expert_tensor_parallel_size: Optional[int] = setting(None, "--expert-tensor-parallel-size", help="must equal TP",
                                                         group=TC, type=int, ge=1)
    expert_model_parallel_size: int = setting(1, "--expert-model-parallel-size", help="must be 1 (GRIN: no EP)",
                                              group=TC, type=int, ge=1)
    context_parallel_size: int = setting(1, "--context-parallel-size", help="must be 1", group=TC, type=int, ge=1)
    sequence_parallel: Optional[bool] = setting(None, "--sequence-parallel", help="sequence parallelism "
                                                "(default: on when TP > 1; dropped at TP 1)", group=TC, kind="switch")
    # --- numerics / memory ------------------------------------------------------------------
    bf16: bool = setting(False, "--bf16", help="bf16 weights and activations, fp32 main weights and Adam state",
                         group=TC, kind="switch")
    recompute_granularity: Optional[str] = setting(None, "--recompute-granularity", help="full or selective "
                                                   "activation recomputation", group=TC, choices=("full", "selective"))
    recompute_method: Optional[str] = setting(None, "--recompute-method", help="uniform or block (with full)",
                                              group=TC, choices=("uniform", "block"))
    recompute_num_layers: Optional[int] = setting(None, "--recompute-num-layers", help="layers per recompute chunk",
                                                  group=TC, type=int, ge=1)
    #: TransformerConfig fields set by Megatron-LM flags passed through (training/megatron_lm_answers.yaml)
    extra: dict = field(default_factory=dict)
    #: the tokenizer the vocabulary belongs to (byte, null:N or a local HF directory), recorded in every checkpoint's
    #: grin_config.json so that `convert to-hf` writes its files and special-token ids (set from --tokenizer)
    tokenizer: Optional[str] = None

    # ----------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows: --padded-vocab-size, else Megatron-LM's ceil(V / (divisor x TP)) x (divisor x TP).

        megatron-grin records the padded size in each checkpoint and keeps it on --load, so a checkpoint
        resumes and converts at any TP (see docs/training.md, "Vocabulary padding").
        """
        if self.padded_vocab is not None:
            return self.padded_vocab
        d = self.make_vocab_size_divisible_by * self.tensor_model_parallel_size
        return -(-self.vocab_size // d) * d

    @property
    def seq_parallel(self) -> bool:
        """Sequence parallelism in effect: on at TP > 1 unless switched off, never at TP 1 (as Megatron-LM)."""
        return self.tensor_model_parallel_size > 1 and self.sequence_parallel is not False

    @property
    def balance_loss_coeff(self) -> float:
        """The coefficient the router uses: 0 under --moe-router-load-balancing-type none (Megatron-LM)."""
        return 0.0 if self.moe_router_load_balancing_type == "none" else self.moe_aux_loss_coeff

    def replace(self, **changes: Any) -> "GrinConfig":
        return dataclasses.replace(self, **changes)

    def validate(self, world_size: Optional[int] = None) -> "GrinConfig":
        """Raise ConfigError listing every setting megatron-grin cannot train with."""
        problems = self.problems(world_size)
        if problems:
            raise ConfigError(problems)
        return self

    def problems(self, world_size: Optional[int] = None) -> list[str]:
        """Every problem of this configuration, each naming the flag to change (empty when valid)."""
        out = range_problems(self)
        if out:  # the cross-field checks below assume each value is in range
            return out
        return _model_problems(self) + _parallel_problems(self, world_size)


def _model_problems(c: GrinConfig) -> list[str]:
    out = []
    if c.moe_router_topk > c.num_experts:
        out.append(f"--moe-router-topk {c.moe_router_topk} exceeds --num-experts {c.num_experts}: each token "
                   "needs that many distinct experts.")
    if c.hidden_size % c.num_attention_heads and c.kv_channels is None:
        out.append(f"--hidden-size {c.hidden_size} is not divisible by --num-attention-heads "
                   f"{c.num_attention_heads}; set --kv-channels or change one of them.")
    if c.num_attention_heads % c.num_query_groups:
        out.append(f"--num-attention-heads {c.num_attention_heads} is not divisible by --num-query-groups "
                   f"{c.num_query_groups}.")
    if c.padded_vocab is not None and c.padded_vocab < c.vocab_size:
        out.append(f"--padded-vocab-size {c.padded_vocab} is smaller than --vocab-size {c.vocab_size}.")
    if c.moe_aux_loss_coeff > 0 and c.moe_router_load_balancing_type not in ("global_aux_loss", "none"):
        out.append(f"--moe-router-load-balancing-type {c.moe_router_load_balancing_type} with --moe-aux-loss-coeff "
                   f"{c.moe_aux_loss_coeff:g}: megatron-grin computes GRIN's balance loss, f_i from the sampled "
                   "experts counted over TP x DP (Megatron-LM's global_aux_loss); pass "
                   "--moe-router-load-balancing-type global_aux_loss, or none / --moe-aux-loss-coeff 0.")
    if c.moe_router_load_balancing_type == "sinkhorn":
        out.append("--moe-router-load-balancing-type sinkhorn changes the routing itself; GRIN routes with "
                   "SparseMixer-v2. Use global_aux_loss or none.")
    return out + _recompute_problems(c)


def _recompute_problems(c: GrinConfig) -> list[str]:
    """Megatron-LM 0.16's rules (validate_args, TransformerConfig.__post_init__), checked before anything is built."""
    out = []
    if c.recompute_granularity == "full":
        if c.recompute_method not in ("uniform", "block"):
            out.append("--recompute-granularity full needs --recompute-method uniform|block.")
        if c.recompute_num_layers is None:
            out.append("--recompute-granularity full needs --recompute-num-layers N (layers per recompute chunk "
                       "with uniform, recomputed layers per pipeline stage with block).")
    elif c.recompute_granularity == "selective":
        if c.recompute_method is not None:
            out.append(f"--recompute-method {c.recompute_method} with --recompute-granularity selective: Megatron-LM "
                       "takes a recompute method only with full granularity; drop --recompute-method.")
        if c.recompute_num_layers is not None:
            out.append(f"--recompute-num-layers {c.recompute_num_layers} with --recompute-granularity selective: "
                       "megatron-core takes it only with full granularity; drop --recompute-num-layers.")
    return out


def _parallel_problems(c: GrinConfig, world_size: Optional[int]) -> list[str]:
    out = []
    tp, pp = c.tensor_model_parallel_size, c.pipeline_model_parallel_size
    for flag, value in (("--num-attention-heads", c.num_attention_heads), ("--num-query-groups", c.num_query_groups),
                        ("--moe-ffn-hidden-size", c.ffn_hidden_size)):
        if value % tp:
            out.append(f"{flag} {value} is not divisible by --tensor-model-parallel-size {tp}"
                       + (" (experts are sharded over TP)." if "ffn" in flag else "."))
    if c.expert_tensor_parallel_size is not None and c.expert_tensor_parallel_size != tp:
        out.append(f"--expert-tensor-parallel-size {c.expert_tensor_parallel_size} differs from "
                   f"--tensor-model-parallel-size {tp}: megatron-core 0.16 leaves expert gradients unsynchronised "
                   "then. Drop the flag (it defaults to TP).")
    if c.expert_model_parallel_size != 1:
        out.append(f"--expert-model-parallel-size {c.expert_model_parallel_size}: must be 1, GRIN trains without "
                   "expert parallelism (each pipeline stage holds all experts of its layers).")
    if c.context_parallel_size != 1:
        out.append(f"--context-parallel-size {c.context_parallel_size}: must be 1, context parallelism is not "
                   "supported.")
    if tp > 1 and not c.seq_parallel:
        out.append("--tensor-model-parallel-size > 1 needs sequence parallelism for MoE layers in megatron-core; "
                   "add --sequence-parallel.")
    if c.padded_vocab_size % tp:
        out.append(f"padded vocabulary {c.padded_vocab_size} is not divisible by --tensor-model-parallel-size {tp}; "
                   "change --padded-vocab-size or --make-vocab-size-divisible-by.")
    if c.num_layers % pp:
        out.append(f"--num-layers {c.num_layers} is not divisible by --pipeline-model-parallel-size {pp}.")
    vpp = c.virtual_pipeline_model_parallel_size
    if vpp is not None:
        if pp < 2:
            out.append("virtual pipeline stages need --pipeline-model-parallel-size >= 2.")
        elif c.num_layers % (pp * vpp):
            out.append(f"--num-layers {c.num_layers} is not divisible by pipeline size x virtual stages = {pp * vpp}; "
                       "change --num-virtual-stages-per-pipeline-rank or --num-layers-per-virtual-pipeline-stage.")
    if world_size is not None and world_size % (tp * pp):
        out.append(f"world size {world_size} is not divisible by TP x PP = {tp * pp}; launch with a multiple of "
                   f"{tp * pp} ranks (a --dry-run outside a launcher: WORLD_SIZE=N megatron-grin pretrain ...), or "
                   "change --tensor-model-parallel-size / --pipeline-model-parallel-size.")
    return out


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
