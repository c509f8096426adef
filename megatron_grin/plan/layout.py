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
            out.append(str(err))
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
        parts = [f"--tp {self.tp}", f"--pp {self.pp}"]
        if self.vpp > 1:
            parts.append(f"--vpp {self.vpp}")
        parts += [f"--micro-batch-size {self.micro_batch_size}", f"--recompute {self.recompute}"]
        if self.recompute == "full" and (self.recompute_method, self.recompute_num_layers) != ("uniform", 1):
            parts += [f"--recompute-method {self.recompute_method}",
                      f"--recompute-num-layers {self.recompute_num_layers}"]
        parts.append("--distributed-optimizer" if self.distributed_optimizer else "--no-distributed-optimizer")
        return " ".join(parts)


@dataclass(frozen=True)
class Implementation:
    """How the model computes, which decides what autograd keeps for backward (docs/planning.md).

    Defaults describe megatron-grin on GPUs today: Transformer Engine fused/flash attention,
    megatron's unfused SwiGLU (``transformer_config`` sets ``bias_activation_fusion=False``) and
    megatron's default ``deallocate_pipeline_outputs=False``.
    """

    attention: str = "flash"  # flash (TE, GPU) | unfused (megatron local DotProductAttention, CPU)
    fused_swiglu: bool = False  # bias_activation_fusion: weighted_bias_swiglu keeps only the fc1 output
    deallocate_pipeline_outputs: bool = False  # free a stage's sent output until its backward

    @classmethod
    def for_config(cls, cfg: GrinConfig, attention: str = "flash") -> "Implementation":
        return cls(attention=attention, fused_swiglu=bool(cfg.extra.get("bias_activation_fusion", False)),
                   deallocate_pipeline_outputs=bool(cfg.extra.get("deallocate_pipeline_outputs", False)))


@dataclass(frozen=True)
class Assumptions:
    """Hardware and the explicit constants of the model (each a CLI flag; see docs/planning.md)."""

    gpu_memory_gib: float = 80.0  # capacity the total is compared with
    gpus_per_node: int = 8
    peak_tflops: float = 989.4  # H100 SXM dense BF16
    efficiency: Optional[float] = None  # share of peak while computing; None = calibrated (CALIBRATION)
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


#: The throughput anchor the efficiency is calibrated to (GRIN paper, Table 3; docs/planning.md).
CALIBRATION = dict(model="grin-16x3.8b", tokens_per_s_per_gpu=7077.0,
                   layout=Layout(gpus=64, tp=1, pp=8, vpp=4, micro_batch_size=1, global_batch_size=2048,
                                 seq_length=4096, recompute="full", distributed_optimizer=True))
