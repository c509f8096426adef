"""GroupedMMExperts: the "grouped_mm" expert backend (all experts in two 3D weights, grouped GEMMs).

Why: megatron's SequentialMLP keeps one module per expert, applies the routing weight to the [N, F]
activation (in fp32 when the probs are fp32) and saves both SwiGLU inputs and its silu output;
TEGroupedMLP needs Transformer Engine. This module holds all experts in two 3D parameters, so no
per-step allocation grows with the number of experts beyond the permuted activations, and:
  * on CUDA sm90+ in bf16, runs each projection for all experts as one ``torch.nn.functional.grouped_mm``;
  * elsewhere (CPU), loops over whole expert MLPs inside one autograd node (``_ExpertLoop``), so each
    expert's [rows, 2F] activation is still in cache for its SwiGLU (measured faster than grouped_mm's
    CPU path and than SequentialMLP; docs/performance.md);
  * on the grouped_mm path SwiGLU is one autograd node that saves only fc1's output and writes its
    gradient over it in place;
  * the routing weight scales fc2's [N, H] output (H < F in GRIN), the same maths since fc2 has no bias,
    with the router gradient accumulated in fp32.

Contract (megatron-core 0.16 experts): ``__init__(num_local_experts, config, submodules,
pg_collection)``, ``forward(permuted_local_hidden_states [N, H], tokens_per_expert [E],
permuted_probs [N]) -> (output [N, H], None)``. Tensor parallelism is megatron's expert TP: fc1 is
column-parallel with [gate; up] per rank, fc2 row-parallel; the token dispatcher does the
all-gather / reduce-scatter, so this module never communicates.

Checkpoints: ``state_dict()`` has SequentialMLP's keys (``local_experts.{i}.linear_fc{1,2}.weight`` and
``_extra_state``) and ``sharded_state_dict()`` has its global keys, shapes and offsets, so weights move
freely between the "sequential", "grouped_mm" and "te_grouped" backends. Optimizer state does not
(one 3D parameter here vs one per expert there), as with megatron's legacy GroupedMLP.

Shapes: N permuted rows, E local experts, H hidden, F expert ffn per TP rank.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedTensorFactory
from megatron.core.tensor_parallel.layers import (
    _initialize_affine_weight_cpu,
    _initialize_affine_weight_gpu,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.utils import make_sharded_object_for_checkpoint
from megatron.core.utils import get_pg_rank, get_pg_size

BACKEND_NAME = "grouped_mm"


# ------------------------------------------------------------------------------------------------
# small autograd ops
# ------------------------------------------------------------------------------------------------
class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up for h = [gate, up]; saves only h and writes the gradient over h, in place.

    h (fc1's output) is referenced by nothing but this node, so its buffer becomes the gradient: the
    backward allocates one [N, F] scratch instead of a [N, 2F] gradient plus autograd's cat.
    """

    @staticmethod
    def forward(ctx, h_N2F):
        gate, up = h_N2F.chunk(2, dim=-1)
        ctx.save_for_backward(h_N2F)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad_NF):  # once only: a retain_graph re-run fails autograd's version check, loudly
        (h_N2F,) = ctx.saved_tensors
        gate, up = h_N2F.chunk(2, dim=-1)
        scratch = grad_NF * up  # the last read of up
        torch.ops.aten.silu.out(gate, out=up).mul_(grad_NF)  # d/d up = silu(gate) * g
        torch.ops.aten.silu_backward.grad_input(scratch, gate, grad_input=gate)  # d/d gate, elementwise in place
        return h_N2F


class _ScaleRows(torch.autograd.Function):
    """y * probs[:, None] in y's dtype; the probs gradient is accumulated in fp32 (router precision)."""

    @staticmethod
    def forward(ctx, y_NH, probs_N):
        ctx.save_for_backward(y_NH, probs_N)
        return y_NH * probs_N.to(y_NH.dtype).unsqueeze(-1)

    @staticmethod
    def backward(ctx, grad_NH):
        y_NH, probs_N = ctx.saved_tensors
        grad_y = grad_NH * probs_N.to(grad_NH.dtype).unsqueeze(-1) if ctx.needs_input_grad[0] else None
        grad_p = _rowwise_dot_fp32(grad_NH, y_NH).to(probs_N.dtype) if ctx.needs_input_grad[1] else None
        return grad_y, grad_p


def _rowwise_dot_fp32(a_NH: torch.Tensor, b_NH: torch.Tensor) -> torch.Tensor:
    """fp32 <a[n], b[n]> for every row (bf16 products are exact in fp32; einsum would lower to a bmm on CPU)."""
    if a_NH.dtype == torch.float32 and b_NH.dtype == torch.float32:
        return a_NH.mul(b_NH).sum(-1)
    return a_NH.float().mul_(b_NH).sum(-1)


# ------------------------------------------------------------------------------------------------
# grouped GEMM with a loop fallback
# ------------------------------------------------------------------------------------------------
def _grouped_mm_fn():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Use torch's grouped_mm by default: CUDA sm90+ in bf16 (it falls back to a slow path on sm80).

    CPU runs grouped_mm too, but measured slower than looping over whole expert MLPs, whose [rows, 2F]
    activations stay in cache between the GEMMs and the SwiGLU (docs/performance.md).
    """
    if _grouped_mm_fn() is None or x.shape[-1] % 8 or x.device.type != "cuda":  # 16-byte aligned rows
        return False
    return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm's backward needs it)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_linear(x_NK: torch.Tensor, weight_EMK: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """y[rows of expert e] = x[rows of e] @ weight[e].T for expert-sorted rows (torch grouped_mm); [N, M]."""
    return _ContiguousGrad.apply(_grouped_mm_fn()(x_NK, weight_EMK.transpose(-2, -1), offs=offsets_E))


class _ExpertLoop(torch.autograd.Function):
    """Every expert's SwiGLU MLP, scaled by its routing weights, as one autograd node (the CPU path).

    Why one node: no per-expert autograd graph, no ``cat`` of the split input's gradient and no ``stack``
    of unbound weight gradients; outputs and input gradients are written straight into slices of one
    [N, H] tensor. Per expert it keeps fc1's output h [n, 2F], the SwiGLU output a [n, F] and (with
    probs) the unscaled output y [n, H]: per-expert blocks, each under glibc's 32 MiB mmap threshold at
    GRIN's CPU shapes, so they are reused from the heap instead of page-faulted in every step; the
    backward frees each expert's blocks as soon as it is done with them, and writes the gradients over h
    and a in place (so it runs once: a retain_graph re-run is refused). silu(gate) is recomputed.
    """

    @staticmethod
    def forward(ctx, x_NH, fc1_EFH, fc2_EHF, probs_N, counts: list[int]):
        out_NH = x_NH.new_empty(x_NH.shape)
        scale_N1 = None if probs_N is None else probs_N.to(x_NH.dtype).unsqueeze(-1)
        saved: dict[int, tuple] = {}
        for e, part in _expert_slices(counts):
            x_e, splits = x_NH[part], _row_split(part.stop - part.start, x_NH.dtype, x_NH.device)
            h = _mm_rows(x_e, fc1_EFH[e].t(), x_e.new_empty(x_e.shape[0], fc1_EFH.shape[1]), splits)
            gate, up = h.chunk(2, dim=-1)
            a = F.silu(gate).mul_(up)
            if scale_N1 is None:
                _mm_rows(a, fc2_EHF[e].t(), out_NH[part], splits)
                saved[e] = (h, a, None, splits)
            else:
                y = _mm_rows(a, fc2_EHF[e].t(), x_e.new_empty(x_e.shape), splits)
                torch.mul(y, scale_N1[part], out=out_NH[part])
                saved[e] = (h, a, y, splits)
        ctx.counts, ctx.saved_blocks = counts, saved
        ctx.save_for_backward(x_NH, fc1_EFH, fc2_EHF, probs_N)
        return out_NH

    @staticmethod
    def backward(ctx, grad_NH):
        if ctx.saved_blocks is None:
            raise RuntimeError("grouped_mm experts: backward ran twice (retain_graph is not supported)")
        saved, ctx.saved_blocks = ctx.saved_blocks, None
        x_NH, fc1_EFH, fc2_EHF, probs_N = ctx.saved_tensors
        grad_NH = grad_NH.contiguous()
        grad_x = torch.empty_like(x_NH) if ctx.needs_input_grad[0] else None
        grad_fc1, grad_fc2 = torch.empty_like(fc1_EFH), torch.empty_like(fc2_EHF)
        grad_p = (torch.empty(x_NH.shape[0], dtype=torch.float32, device=x_NH.device)
                  if probs_N is not None and ctx.needs_input_grad[3] else None)
        scale_N1 = None if probs_N is None else probs_N.to(x_NH.dtype).unsqueeze(-1)
        for e, count in enumerate(ctx.counts):
            if not count:
                grad_fc1[e].zero_()
                grad_fc2[e].zero_()
        for e, part in _expert_slices(ctx.counts):
            h, a, y, splits = saved.pop(e)
            g = grad_NH[part]
            if grad_p is not None:
                grad_p[part] = _rowwise_dot_fp32(g, y)
            del y
            if scale_N1 is not None:
                g = g * scale_N1[part]
            _mm_wgrad(g, a, grad_fc2[e], splits)
            grad_a = _mm_rows(g, fc2_EHF[e], a, splits)  # a's last use was the line above
            gate, up = h.chunk(2, dim=-1)
            scratch = grad_a * up  # the last read of up
            torch.ops.aten.silu.out(gate, out=up).mul_(grad_a)  # d/d up = silu(gate) * g
            del grad_a, a
            torch.ops.aten.silu_backward.grad_input(scratch, gate, grad_input=gate)  # d/d gate, in place
            del scratch
            _mm_wgrad(h, x_NH[part], grad_fc1[e], splits)  # h now holds d/d h
            if grad_x is not None:
                _mm_rows(h, fc1_EFH[e], grad_x[part], splits)
        if grad_p is not None:
            grad_p = grad_p.to(probs_N.dtype)
        return grad_x, grad_fc1, grad_fc2, grad_p, None


#: Row block for the CPU expert GEMMs in bf16/fp16: oneDNN JIT-compiles a kernel per GEMM shape and caches
#: ~1k of them; sampled routing gives every expert a new row count every step, and a cache miss costs
#: ~1 ms (13 %) per GEMM at GRIN's CPU shapes. Splitting each expert's rows into a multiple of the block and
#: a tail bounds the distinct shapes (docs/performance.md). fp32 (MKL, no per-shape JIT) runs unsplit.
ROW_BLOCK = 64


def _row_split(rows: int, dtype: torch.dtype, device: torch.device) -> list[slice]:
    """An expert's rows as [bulk, tail] slices whose lengths come from a small set, or one slice where unneeded."""
    bulk = rows // ROW_BLOCK * ROW_BLOCK
    if device.type != "cpu" or dtype == torch.float32 or bulk in (0, rows):
        return [slice(0, rows)]
    return [slice(0, bulk), slice(bulk, rows)]


def _mm_rows(a_NK: torch.Tensor, b_KM: torch.Tensor, out_NM: torch.Tensor, splits: list[slice]) -> torch.Tensor:
    """out = a @ b, one GEMM per row slice."""
    for rows in splits:
        torch.mm(a_NK[rows], b_KM, out=out_NM[rows])
    return out_NM


def _mm_wgrad(g_NM: torch.Tensor, a_NK: torch.Tensor, out_MK: torch.Tensor, splits: list[slice]) -> None:
    """out = g.T @ a, accumulated over the row slices."""
    torch.mm(g_NM[splits[0]].t(), a_NK[splits[0]], out=out_MK)
    for rows in splits[1:]:
        out_MK.addmm_(g_NM[rows].t(), a_NK[rows])


def _expert_slices(counts: list[int]):
    """(expert, row slice) for every expert that has rows, in order."""
    start = 0
    for e, count in enumerate(counts):
        if count:
            yield e, slice(start, start + count)
            start += count


def grouped_swiglu_mlp(x_NH: torch.Tensor, fc1_EFH: torch.Tensor, fc2_EHF: torch.Tensor,
                       tokens_per_expert, probs_N: Optional[torch.Tensor] = None,
                       use_grouped_mm: Optional[bool] = None) -> torch.Tensor:
    """All experts' SwiGLU MLPs on expert-sorted rows: fc2(silu(gate) * up) * probs -> [N, H]."""
    if x_NH.dim() != 2 or fc1_EFH.dim() != 3 or fc2_EHF.dim() != 3:
        raise ValueError(f"expected x [N, H], fc1 [E, 2F, H], fc2 [E, H, F]; got {tuple(x_NH.shape)}, "
                         f"{tuple(fc1_EFH.shape)}, {tuple(fc2_EHF.shape)}")
    num_experts, two_f, hidden = fc1_EFH.shape
    if x_NH.shape[1] != hidden or fc2_EHF.shape != (num_experts, hidden, two_f // 2):
        raise ValueError(f"shape mismatch: x {tuple(x_NH.shape)}, fc1 {tuple(fc1_EFH.shape)}, "
                         f"fc2 {tuple(fc2_EHF.shape)}")
    counts_E = torch.as_tensor(tokens_per_expert)
    if counts_E.numel() != num_experts:
        raise ValueError(f"tokens_per_expert has {counts_E.numel()} entries for {num_experts} experts")
    counts = [int(c) for c in counts_E.tolist()]  # host list (megatron's dispatcher already synced)
    if sum(counts) != x_NH.shape[0]:
        raise ValueError(f"tokens_per_expert sums to {sum(counts)} but there are {x_NH.shape[0]} rows")
    if probs_N is not None and probs_N.shape != (x_NH.shape[0],):
        raise ValueError(f"probs must be [{x_NH.shape[0]}], got {tuple(probs_N.shape)}")
    if use_grouped_mm is None:
        use_grouped_mm = grouped_mm_supported(x_NH)
    if not use_grouped_mm:
        return _ExpertLoop.apply(x_NH, fc1_EFH, fc2_EHF, probs_N, counts)
    offsets = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(x_NH.device, non_blocking=True)
    y_NH = grouped_linear(_SwiGLU.apply(grouped_linear(x_NH, fc1_EFH, offsets)), fc2_EHF, offsets)
    return y_NH if probs_N is None else _ScaleRows.apply(y_NH, probs_N)


# ------------------------------------------------------------------------------------------------
# the megatron experts module
# ------------------------------------------------------------------------------------------------
_SEQ_KEY = re.compile(r"^local_experts\.(\d+)\.linear_fc([12])\.(weight|_extra_state)$")


class GroupedMMExperts(MegatronModule):
    """All local experts as two 3D weights: fc1 [E, 2F/tp, H] ([gate; up] per rank), fc2 [E, H, F/tp]."""

    def __init__(self, num_local_experts: int, config, submodules=None, pg_collection=None,
                 use_grouped_mm: Optional[bool] = None, **kwargs):
        super().__init__(config=config)
        self.use_grouped_mm = use_grouped_mm  # None: torch grouped_mm where supported, else the GEMM loop
        if not config.gated_linear_unit or config.activation_func is not F.silu:
            raise ValueError("GroupedMMExperts implements SwiGLU experts (gated_linear_unit=True, silu).")
        if config.add_bias_linear:
            raise ValueError("GroupedMMExperts has no expert biases; set add_bias_linear=False.")
        if getattr(config, "moe_latent_size", None):
            raise ValueError("GroupedMMExperts does not support moe_latent_size.")
        if config.fp8 or getattr(config, "fp4", None):
            raise ValueError("GroupedMMExperts does not support fp8/fp4; use te_grouped.")
        pg_collection = pg_collection or get_default_pg_collection()
        self.num_local_experts = num_local_experts
        self.ep_group, self.tp_group, self.dp_group = pg_collection.ep, pg_collection.expt_tp, pg_collection.expt_dp
        tp_size, tp_rank = get_pg_size(self.tp_group), get_pg_rank(self.tp_group)
        ffn, hidden = config.moe_ffn_hidden_size, config.hidden_size
        if ffn % tp_size:
            raise ValueError(f"moe_ffn_hidden_size {ffn} is not divisible by expert TP size {tp_size}")
        self.ffn_per_rank = ffn // tp_size
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.fc1_weight = torch.nn.Parameter(torch.empty(num_local_experts, 2 * self.ffn_per_rank, hidden,
                                                         device=device, dtype=config.params_dtype))
        self.fc2_weight = torch.nn.Parameter(torch.empty(num_local_experts, hidden, self.ffn_per_rank,
                                                         device=device, dtype=config.params_dtype))
        if config.perform_initialization:
            self._initialize(tp_rank, tp_size)
        expert_parallel = config.expert_model_parallel_size > 1
        for param, dim in ((self.fc1_weight, 1), (self.fc2_weight, 2)):
            set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)
            param.allreduce = not expert_parallel  # same DDP grouping as megatron's expert linears
        self.register_state_dict_post_hook(_to_sequential_keys)
        self.register_load_state_dict_pre_hook(_from_sequential_keys)

    @torch.no_grad()
    def _initialize(self, tp_rank: int, tp_size: int) -> None:
        """Same values, drawn in the same order, as SequentialMLP's per-expert ColumnParallel/RowParallel."""
        cfg, ffn, hidden = self.config, self.config.moe_ffn_hidden_size, self.config.hidden_size
        for e in range(self.num_local_experts):
            fc1, fc2 = torch.empty_like(self.fc1_weight[e]), torch.empty_like(self.fc2_weight[e])
            if cfg.use_cpu_initialization:
                _initialize_affine_weight_cpu(fc1, 2 * ffn, hidden, 2 * self.ffn_per_rank, 0, cfg.init_method,
                                              stride=2, rank=tp_rank, world_size=tp_size)
                _initialize_affine_weight_cpu(fc2, hidden, ffn, self.ffn_per_rank, 1, cfg.output_layer_init_method,
                                              params_dtype=cfg.params_dtype, rank=tp_rank, world_size=tp_size)
            else:
                _initialize_affine_weight_gpu(fc1, cfg.init_method, partition_dim=0, stride=2, is_expert=True)
                _initialize_affine_weight_gpu(fc2, cfg.output_layer_init_method, partition_dim=1, is_expert=True)
            self.fc1_weight[e].copy_(fc1)
            self.fc2_weight[e].copy_(fc2)

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        """(expert outputs [N, H] scaled by their routing weights, None)."""
        hidden, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:
            if self.config.moe_router_topk != 1:
                raise ValueError("moe_apply_probs_on_input only works with moe_router_topk=1.")
            hidden = (probs.unsqueeze(-1) * hidden).to(hidden.dtype)
            probs = None
        output = grouped_swiglu_mlp(hidden.reshape(-1, hidden.shape[-1]), self.fc1_weight, self.fc2_weight,
                                    tokens_per_expert, probs, self.use_grouped_mm)
        return output, None

    def backward_dw(self):
        """No deferred weight-gradient work (megatron API)."""

    # -- distributed checkpoint: SequentialMLP's global keys, shapes and offsets --------------------
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        singleton = (metadata or {}).get("singleton_local_shards", False)
        ep_size, ep_rank = get_pg_size(self.ep_group), get_pg_rank(self.ep_group)
        tp_size, tp_rank = get_pg_size(self.tp_group), get_pg_rank(self.tp_group)
        dp_rank = get_pg_rank(self.dp_group)
        first_expert = ep_rank * self.num_local_experts
        num_global = ep_size * self.num_local_experts
        prepend = len(sharded_offsets)

        def per_expert(key: str, t: torch.Tensor, tp_axis: int, tp_offset: int, tp_frags: int, replica_id):
            return [ShardedTensor.from_rank_offsets(
                key.replace(f"{prefix}experts.", f"{prefix}experts.{first_expert + e}."), t[e].contiguous(),
                *sharded_offsets, (prepend + tp_axis, tp_offset, tp_frags), replica_id=replica_id,
                prepend_axis_num=prepend) for e in range(self.num_local_experts)]

        def whole(key: str, t: torch.Tensor, tp_axis: int, tp_offset: int, tp_frags: int, replica_id):
            return ShardedTensor.from_rank_offsets(
                key, t, *sharded_offsets, (prepend, ep_rank, ep_size), (prepend + 1 + tp_axis, tp_offset, tp_frags),
                replica_id=replica_id, prepend_axis_num=prepend)

        @torch.no_grad()
        def build_fc1(key, t, replica_id, flattened_range):
            if flattened_range is not None:
                raise NotImplementedError("GroupedMMExperts does not support flattened-range checkpoints")
            gate, up = torch.chunk(t, 2, dim=1)  # [E, F/tp, H] each
            if singleton:
                return {"singleton_local_shards": LocalNonpersistentObject(True), "data": {
                    "w": per_expert(f"{key}_w", gate, 0, tp_rank, tp_size, replica_id),
                    "v": per_expert(f"{key}_v", up, 0, tp_rank, tp_size, replica_id)}}
            return [whole(key, gate.contiguous(), 0, tp_rank, 2 * tp_size, replica_id),
                    whole(key, up.contiguous(), 0, tp_size + tp_rank, 2 * tp_size, replica_id)]

        @torch.no_grad()
        def merge_fc1(sub):
            if isinstance(sub, dict):
                return torch.cat((torch.stack(sub["data"]["w"]), torch.stack(sub["data"]["v"])), dim=1)
            return torch.cat(sub, dim=1)

        @torch.no_grad()
        def build_fc2(key, t, replica_id, flattened_range):
            if flattened_range is not None:
                raise NotImplementedError("GroupedMMExperts does not support flattened-range checkpoints")
            if singleton:
                return {"singleton_local_shards": LocalNonpersistentObject(True),
                        "data": per_expert(key, t, 1, tp_rank, tp_size, replica_id)}
            return [whole(key, t, 1, tp_rank, tp_size, replica_id)]

        @torch.no_grad()
        def merge_fc2(sub):
            return torch.stack(sub["data"]) if isinstance(sub, dict) else sub[0]

        replica_id = (0, 0, dp_rank)
        state = {
            f"{prefix}fc1_weight": ShardedTensorFactory(f"{prefix}experts.linear_fc1.weight", self.fc1_weight,
                                                        build_fc1, merge_fc1, replica_id),
            f"{prefix}fc2_weight": ShardedTensorFactory(f"{prefix}experts.linear_fc2.weight", self.fc2_weight,
                                                        build_fc2, merge_fc2, replica_id),
        }
        # SequentialMLP's (empty) per-expert _extra_state objects, so either backend loads the other's checkpoint.
        for e in range(self.num_local_experts):
            global_e = first_expert + e
            for mod in ("linear_fc1", "linear_fc2"):
                if singleton:
                    key, offsets = f"{prefix}experts.{global_e}.{mod}._extra_state", sharded_offsets
                else:
                    key, offsets = f"{prefix}experts.{mod}._extra_state", (*sharded_offsets, (prepend, global_e, num_global))
                state[f"{prefix}local_experts.{e}.{mod}._extra_state"] = make_sharded_object_for_checkpoint(
                    None, key, offsets, (0, tp_rank, dp_rank))
        return state


def _to_sequential_keys(module: GroupedMMExperts, state_dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: fc1_weight/fc2_weight -> SequentialMLP's per-expert keys (views, no copy)."""
    fc1, fc2 = state_dict.pop(prefix + "fc1_weight").unbind(0), state_dict.pop(prefix + "fc2_weight").unbind(0)
    for e in range(module.num_local_experts):  # SequentialMLP's key order
        for fc, weight in (("linear_fc1", fc1[e]), ("linear_fc2", fc2[e])):
            state_dict[f"{prefix}local_experts.{e}.{fc}.weight"] = weight
            state_dict[f"{prefix}local_experts.{e}.{fc}._extra_state"] = None


def _from_sequential_keys(module: GroupedMMExperts, state_dict, prefix: str, local_metadata, strict,
                          missing_keys, unexpected_keys, error_msgs) -> None:
    """load pre-hook: accept SequentialMLP's per-expert keys (or our own 3D keys) and drop _extra_state."""
    found: dict[str, dict[int, torch.Tensor]] = {"1": {}, "2": {}}
    for key in [k for k in state_dict if k.startswith(prefix)]:
        match = _SEQ_KEY.match(key[len(prefix):])
        if match is None:
            continue
        value = state_dict.pop(key)
        if match.group(3) == "weight":
            found[match.group(2)][int(match.group(1))] = value
    for fc, name in (("1", "fc1_weight"), ("2", "fc2_weight")):
        experts = found[fc]
        if not experts:
            continue
        if sorted(experts) != list(range(module.num_local_experts)):
            error_msgs.append(f"{prefix}local_experts.*.linear_fc{fc}.weight: expected experts "
                              f"0..{module.num_local_experts - 1}, got {sorted(experts)}")
            continue
        state_dict[prefix + name] = torch.stack([experts[e] for e in range(module.num_local_experts)])


def grouped_mm_spec(use_te: bool = False):
    """Experts ModuleSpec for the "grouped_mm" backend (use_te is irrelevant: pure PyTorch)."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    return ModuleSpec(module=GroupedMMExperts)


def register(registry: Optional[dict] = None) -> None:
    """Add the "grouped_mm" backend to ``registry`` (default: megatron_grin.experts.EXPERT_BACKENDS).

    experts.py passes its own dict, so registering from there needs no circular import.
    """
    if registry is None:
        from megatron_grin.experts import EXPERT_BACKENDS as registry
    registry.setdefault(BACKEND_NAME, grouped_mm_spec)
