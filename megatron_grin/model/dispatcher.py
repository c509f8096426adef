"""GrinTokenDispatcher: dropless token dispatch for expert-parallel size 1, on [T, K] picks, no host sync.

Why not megatron's MoEAllGatherTokenDispatcher: it takes dense [T, E] probs and a routing map, copies
the per-expert token counts to the host (``.cpu()``) and permutes with ``masked_select`` (host syncs in
forward and backward). GRIN has no expert parallelism, so every rank holds all experts and the number of
permuted rows is known, N = T * K: the counts and the row map stay on the device, the permute and the
unpermute are one kernel each (ops/permute.py, Triton on CUDA) and the probs travel as [T, K].

Tensor parallelism is megatron's: under sequence parallelism the tokens, picks and weights of all TP
ranks are all-gathered (the weights' backward reduce-scatters, which also sums the partial router
gradients of the TP-sharded experts), every rank computes its expert shard for all tokens, and the
partial outputs are reduce-scattered back in fp32, as megatron's allgather dispatcher does.

The routing weights are handed to the experts per permuted row (``permuted_probs``), which apply them
(GroupedMMExperts inside its SwiGLU kernel, megatron's experts after the activation), so the unpermute is
a plain sum of each token's K rows.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.utils import get_pg_size

from megatron_grin.ops.permute import permute_probs, permute_tokens, unpermute_tokens


class GrinTokenDispatcher:
    """dispatch(hidden, weights [T, K], experts [T, K]) -> expert rows; combine(expert output) -> hidden."""

    def __init__(self, num_local_experts: int, config, pg_collection=None):
        if num_local_experts != config.num_moe_experts:
            raise ValueError(f"GrinTokenDispatcher needs every expert on every rank (expert-parallel size 1): "
                             f"{num_local_experts} local of {config.num_moe_experts} experts.")
        pg_collection = pg_collection or get_default_pg_collection()
        self.config = config
        self.num_experts = config.num_moe_experts
        self.group = pg_collection.tp_ep  # = the expert-TP group when EP = 1 (megatron's allgather domain)
        self.group_size = get_pg_size(self.group)
        self.backend = getattr(config, "grin_permute_backend", "auto")
        self._row_id_map: Optional[torch.Tensor] = None
        self._hidden_shape: Optional[torch.Size] = None
        self._reduce_dtype: Optional[torch.dtype] = None

    def dispatch(self, hidden_SBH: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor):
        """(permuted rows [N, H] expert-major, tokens_per_expert [E] int64 on the device, probs per row [N])."""
        self._hidden_shape = hidden_SBH.shape
        hidden_TH = hidden_SBH.reshape(-1, hidden_SBH.shape[-1])
        if self.group_size > 1:
            with torch.no_grad():
                experts_TK = gather_from_sequence_parallel_region(experts_TK, group=self.group)
            weights_TK = gather_from_sequence_parallel_region(weights_TK, group=self.group)
            hidden_TH = gather_from_sequence_parallel_region(hidden_TH, group=self.group, use_global_buffer=True)
        permuted_NH, self._row_id_map, tokens_per_expert = permute_tokens(hidden_TH, experts_TK, self.num_experts,
                                                                          backend=self.backend)
        self._reduce_dtype = weights_TK.dtype
        return permuted_NH, tokens_per_expert, permute_probs(weights_TK, self._row_id_map)

    def combine(self, expert_output_NH: torch.Tensor) -> torch.Tensor:
        """Sum each token's K expert rows (the experts applied the weights), back to [S(/TP), B, H]."""
        if self._row_id_map is None:
            raise RuntimeError("GrinTokenDispatcher.combine() without a dispatch() first")
        output_TH = unpermute_tokens(expert_output_NH, self._row_id_map, None, backend=self.backend)
        self._row_id_map = None
        if self.group_size > 1:
            output_TH = reduce_scatter_to_sequence_parallel_region(
                output_TH.to(self._reduce_dtype), group=self.group).to(output_TH.dtype)
        return output_TH.view(self._hidden_shape)
