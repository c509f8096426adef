"""Fused kernels for GRIN MoE layers, each beside the PyTorch reference that is also the CPU path.

Glossary (shape suffixes): T tokens, E experts, K picks per token, H hidden, F expert ffn (per TP rank),
N = T*K permuted rows.

* ``routing``: SparseMixer-v2 routing for all picks (Philox Gumbel sampling, masked softmax, Heun
  multiplier) and its custom router gradient.
* ``permute``: dropless token permute / unpermute with the routing weights fused into unpermute.
* ``grouped_mlp``: ``GroupedMMExperts``, the "grouped_mm" expert backend (imported on demand: it
  needs megatron-core).
"""

from megatron_grin.ops.permute import permute_tokens, torch_permute, torch_unpermute, unpermute_tokens
from megatron_grin.ops.routing import (
    RoutingKey,
    sparsemixer_routing,
    torch_sparsemixer_routing,
    triton_sparsemixer_routing,
)

__all__ = [
    "RoutingKey",
    "permute_tokens",
    "sparsemixer_routing",
    "torch_permute",
    "torch_sparsemixer_routing",
    "triton_sparsemixer_routing",
    "torch_unpermute",
    "unpermute_tokens",
]
