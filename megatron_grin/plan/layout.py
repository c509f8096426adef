"""Inputs of ``megatron-grin plan``: the parallel layout, implementation choices and hardware assumptions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_grin.config import ConfigError, GrinConfig

GiB = 2.0**30
RECOMPUTE_MODES = ("none", "selective", "full")


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """A parallel layout and batch for ``gpus`` GPUs (megatron flag names in comments)."""

    gpus: int
    tp: int = 1  # --tensor-model-parallel-size (sequence parallel on when > 1)
    pp: int = 1  # --pipeline-model-parallel-size
    vpp: int = 1  # model chunks per pipeline rank (1: plain 1F1B; >1: interleaved)
    micro_batch_size: int = 1  # --micro-batch-size
    global_batch_size: int = 2048  # --global-batch-size (sequences)
    seq_length: int = 4096  # --seq-length
    recompute: str = "none"  # none | selective (core attention) | full (--recompute-granularity)
    recompute_method: str = "uniform"  # --recompute-method uniform | block (full only)
    recompute_num_layers: int = 1  # --recompute-num-layers (full only)
    distributed_optimizer: bool = False  # --use-distributed-optimizer
    bf16: bool = True  # --bf16 (else fp32 weights and activations)

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    def problems(self, cfg: GrinConfig, gpus_per_node: int = 8) -> list[str]:
        """Why megatron would refuse this layout (empty when it is valid)."""
        out = []
        try:
            cfg.replace(tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
                        virtual_pipeline_model_parallel_size=self.vpp if self.vpp > 1 else None).validate()
        except ConfigError as err:
            out += err.problems
        if self.gpus % (self.tp * self.pp):
            out.append(f"{self.gpus} GPUs are not divisible by TP {self.tp} x PP {self.pp}")
        if self.tp > gpus_per_node:
            out.append(f"TP {self.tp} spans nodes ({gpus_per_node} GPUs per node); keep TP within a node")
        if self.recompute not in RECOMPUTE_MODES:
            out.append(f"--recompute {self.recompute!r}: use one of {RECOMPUTE_MODES}")
        if self.recompute_method not in ("uniform", "block"):
            out.append(f"--recompute-method {self.recompute_method!r}: use uniform or block")
        if self.recompute == "full" and self.recompute_num_layers < 1:
            out.append("--recompute-num-layers must be >= 1")
        if self.seq_length > cfg.max_position_embeddings:
            out.append(f"--seq-length {self.seq_length} exceeds max_position_embeddings "
                       f"{cfg.max_position_embeddings}")
        dp = self.dp
        if not out and self.global_batch_size % (self.micro_batch_size * dp):
            out.append(f"global batch {self.global_batch_size} is not divisible by micro-batch "
                       f"{self.micro_batch_size} x DP {dp}")
        elif not out and self.vpp > 1 and self.num_microbatches % self.pp:
            out.append(f"the interleaved schedule needs the microbatches ({self.num_microbatches}) to be a "
                       f"multiple of PP {self.pp}")
        return out

    def describe(self) -> str:
        vpp = f" (VPP {self.vpp})" if self.vpp > 1 else ""
        rec = self.recompute
        if rec == "full":
            rec += f" ({self.recompute_method}, {self.recompute_num_layers} layer" \
                   f"{'s' if self.recompute_num_layers > 1 else ''})"
        return (f"TP {self.tp} x PP {self.pp}{vpp} x DP {self.dp}; micro-batch {self.micro_batch_size} x "
                f"{self.num_microbatches} microbatches = global batch {self.global_batch_size} x "
                f"{self.seq_length} tokens; recompute {rec}; "
                f"{'distributed' if self.distributed_optimizer else 'replicated'} optimizer; "
                f"{'bf16' if self.bf16 else 'fp32'}")

    def flags(self) -> str:
        """The layout as Megatron-LM flags that paste into `megatron-grin pretrain` (and Megatron-LM)."""
        parts = [f"--tensor-model-parallel-size {self.tp}", f"--pipeline-model-parallel-size {self.pp}"]
        if self.tp > 1:
            parts.append("--sequence-parallel")
        if self.vpp > 1:
            parts.append(f"--num-virtual-stages-per-pipeline-rank {self.vpp}")
        parts.append(f"--micro-batch-size {self.micro_batch_size}")
        if self.recompute != "none":
            parts.append(f"--recompute-granularity {self.recompute}")
        if self.recompute == "full":
            parts += [f"--recompute-method {self.recompute_method}",
                      f"--recompute-num-layers {self.recompute_num_layers}"]
        parts.append("--use-distributed-optimizer" if self.distributed_optimizer else "--no-use-distributed-optimizer")
        return " ".join(parts)


ATTENTIONS = ("unfused", "flash", "blockwise")
EXPERT_BACKENDS = ("grouped_mm", "sequential", "te_grouped")
OPTIMIZERS = ("torch", "fused")


@dataclass(frozen=True)
class Implementation:
    """How the model computes, which decides what it allocates (docs/planning.md).

    ``attention``: "unfused" is megatron's local DotProductAttention (materialises the [b, heads, s, s]
    scores, softmax in fp32); "flash" a fused kernel whose memory is linear in s (TE, SDPA/flash,
    FlexAttention); "blockwise" GrinCoreAttention's sliding-window fallback (the CPU path, and the GPU
    path where FlexAttention cannot compile). ``expert_backend``: --grin-expert-backend ("auto" plans as
    grouped_mm, the default without Transformer Engine). ``optimizer``: "torch" is the AdamW megatron
    falls back to without TE or Apex (foreach temporaries), "fused" their FusedAdam. ``wgrad_fusion``:
    expert weight gradients added straight into the fp32 main-grad buffer (no stacked bf16 weight gradient).
    """

    attention: str = "flash"
    expert_backend: str = "grouped_mm"
    optimizer: str = "torch"
    fused_swiglu: bool = False  # bias_activation_fusion: weighted_bias_swiglu keeps only the fc1 output
    wgrad_fusion: bool = False
    deallocate_pipeline_outputs: bool = False  # free a stage's sent output until its backward

    @classmethod
    def for_config(cls, cfg: GrinConfig, attention: Optional[str] = None) -> "Implementation":
        """The implementation a config trains with; ``attention`` defaults to its --attention-backend
        (unfused/local -> "unfused", anything else -> "flash")."""
        if attention is None:
            attention = "unfused" if cfg.attention_backend in ("unfused", "local") else "flash"
        backend = "grouped_mm" if cfg.expert_backend == "auto" else cfg.expert_backend
        return cls(attention=attention, expert_backend=backend,
                   fused_swiglu=bool(cfg.extra.get("bias_activation_fusion", False)),
                   deallocate_pipeline_outputs=bool(cfg.extra.get("deallocate_pipeline_outputs", False)))

    def problems(self) -> list[str]:
        out = []
        for value, allowed, flag in ((self.attention, ATTENTIONS, "--attention"),
                                     (self.expert_backend, EXPERT_BACKENDS, "--grin-expert-backend"),
                                     (self.optimizer, OPTIMIZERS, "implementation optimizer")):
            if value not in allowed:
                out.append(f"{flag} {value!r}: use one of {allowed}")
        return out

    def describe(self) -> str:
        return (f"{self.attention} attention, {self.expert_backend} experts, "
                f"{'torch foreach' if self.optimizer == 'torch' else 'fused'} AdamW")


@dataclass(frozen=True)
class Assumptions:
    """Hardware and the explicit constants of the model (each a CLI flag; see docs/planning.md)."""

    gpu_memory_gib: float = 80.0  # capacity the total is compared with
    gpus_per_node: int = 8
    device: Optional[str] = None  # GPU name for the datasheet and the measured speed (default: H100)
    peak_tflops: Optional[float] = None  # dense BF16 peak; None = the device's datasheet
    efficiency: Optional[float] = None  # what-if: all compute at this share of peak instead of measured times
    gpu_residual: Optional[float] = None  # GPU-only bytes beyond the CPU-verified terms, as a share of the
    #   dynamic bytes; None = fitted to the measured GPU runs (plan/calibration), 0 on CPU
    imbalance: float = 2.0  # busiest expert's load / mean expert load, for the dropless reserve
    cuda_context_gib: float = 1.0  # CUDA context, cuBLAS/cuDNN/TE workspaces
    nccl_gib: float = 1.5  # NCCL communicator buffers (DP, TP, PP, embedding groups)
    fragmentation: float = 0.10  # allocator slack, as a share of activation + transient bytes
    min_headroom: float = 0.10  # refuse layouts with less free memory than this share
    nvlink_gbps: float = 300.0  # intra-node collective bus bandwidth per GPU (GB/s)
    network_gbps: float = 200.0  # inter-node collective bus bandwidth per GPU (GB/s, 8x400 Gb/s rails)
    p2p_network_gbps: float = 40.0  # inter-node point-to-point per GPU (GB/s, one 400 Gb/s NIC)
    tp_overlap: float = 0.0  # share of TP collectives hidden behind compute
    dp_overlap: float = 0.0  # share of DP gradient reduce-scatter / param all-gather hidden
    pp_overlap: float = 0.0  # share of pipeline sends hidden
