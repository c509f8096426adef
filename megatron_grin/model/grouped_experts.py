"""GroupedMMExperts: the "grouped_mm" expert backend (all experts in two 3D weights, grouped GEMMs).

This module holds all experts in two 3D parameters, so no per-step allocation grows with the number of
experts beyond the permuted activations; the maths (grouped GEMMs, SwiGLU with the routing weight inside,
the fused weight gradient) is in ops/grouped_mlp.py. Which kernels run comes from the config:
``grin_expert_fusion`` (Megatron-LM's --moe-grouped-gemm: grouped GEMMs + the SwiGLU kernel, or the
per-expert loop) and ``grin_grouped_gemm`` (torch's grouped_mm or the Triton grouped GEMM); with the
Triton GEMM the weight gradients add straight into megatron's fp32 ``main_grad`` when DDP provides one.

Contract (megatron-core 0.16 experts): ``__init__(num_local_experts, config, submodules,
pg_collection)``, ``forward(permuted_local_hidden_states [N, H], tokens_per_expert [E],
permuted_probs [N]) -> (output [N, H], None)``. Tensor parallelism is megatron's expert TP: fc1 is
column-parallel with [gate; up] per rank, fc2 row-parallel; the token dispatcher does the
all-gather / reduce-scatter, so this module never communicates.

Checkpoints: ``state_dict()`` has SequentialMLP's keys (``local_experts.{i}.linear_fc{1,2}.weight`` and
``_extra_state``) and ``sharded_state_dict()`` has its global keys, shapes and offsets, so weights move
freely between the "sequential", "grouped_mm" and "te_grouped" backends. Optimizer state does not
(one 3D parameter here vs one per expert there), as with megatron's legacy GroupedMLP.
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
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.utils import make_sharded_object_for_checkpoint
from megatron.core.utils import get_pg_rank, get_pg_size

from megatron_grin.ops.grouped_mlp import GEMMS, expert_kernels, grouped_swiglu_mlp

_SEQ_KEY = re.compile(r"^local_experts\.(\d+)\.linear_fc([12])\.(weight|_extra_state)$")


class GroupedMMExperts(MegatronModule):
    """All local experts as two 3D weights: fc1 [E, 2F/tp, H] ([gate; up] per rank), fc2 [E, H, F/tp]."""

    def __init__(self, num_local_experts: int, config, submodules=None, pg_collection=None,
                 gemm: Optional[str] = None, **kwargs):
        super().__init__(config=config)
        if gemm is not None and gemm not in GEMMS:
            raise ValueError(f"GroupedMMExperts gemm {gemm!r} is unknown; choose one of {GEMMS}")
        self.gemm = gemm  # None: from the config's fusion switch and grouped GEMM choice, per device
        self.fusion = getattr(config, "grin_expert_fusion", "auto")
        self.grouped_gemm = getattr(config, "grin_grouped_gemm", "auto")
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
        hidden = hidden.reshape(-1, hidden.shape[-1])
        gemm, swiglu = self.kernels(hidden)
        output = grouped_swiglu_mlp(hidden, self.fc1_weight, self.fc2_weight, tokens_per_expert, probs,
                                    gemm=gemm, swiglu=swiglu, accumulation_fusion=gemm == "triton")
        return output, None

    def kernels(self, hidden: torch.Tensor) -> tuple[str, str]:
        """(gemm, swiglu backend) this module runs for ``hidden``."""
        if self.gemm is None:
            return expert_kernels(hidden, self.fusion, self.grouped_gemm)
        return self.gemm, "auto"

    def backward_dw(self):
        """No deferred weight-gradient work (megatron API)."""

    # -- distributed checkpoint: SequentialMLP's global keys, shapes and offsets --------------------
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        singleton = (metadata or {}).get("singleton_local_shards", False)
        ep_size, ep_rank = get_pg_size(self.ep_group), get_pg_rank(self.ep_group)
        tp_size, tp_rank = get_pg_size(self.tp_group), get_pg_rank(self.tp_group)
        dp_rank = get_pg_rank(self.dp_group)
        first_expert = ep_rank * self.num_local_experts
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
        state.update(self._extra_state_objects(prefix, sharded_offsets, singleton))
        return state

    def _extra_state_objects(self, prefix: str, sharded_offsets: tuple, singleton: bool) -> dict:
        """SequentialMLP's (empty) per-expert _extra_state objects, so either backend loads the other's checkpoint."""
        ep_rank, tp_rank, dp_rank = (get_pg_rank(g) for g in (self.ep_group, self.tp_group, self.dp_group))
        first_expert, num_global = ep_rank * self.num_local_experts, get_pg_size(self.ep_group) * self.num_local_experts
        state = {}
        for e in range(self.num_local_experts):
            global_e = first_expert + e
            for mod in ("linear_fc1", "linear_fc2"):
                if singleton:
                    key, offsets = f"{prefix}experts.{global_e}.{mod}._extra_state", sharded_offsets
                else:
                    key = f"{prefix}experts.{mod}._extra_state"
                    offsets = (*sharded_offsets, (len(sharded_offsets), global_e, num_global))
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
    return ModuleSpec(module=GroupedMMExperts)

