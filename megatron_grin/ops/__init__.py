"""Fused kernels and autograd ops for GRIN MoE layers, each beside the PyTorch reference it is tested against.

Glossary (shape suffixes): T tokens, E experts, K picks per token, H hidden, F expert ffn (per TP rank),
N = T*K permuted rows.

* ``routing``: SparseMixer-v2 routing for all picks (Philox Gumbel sampling, masked softmax, Heun
  multiplier) and its custom router gradient; reference: ``model/sparsemixer.py``.
* ``permute``: dropless token permute / unpermute with the routing weights fused into unpermute.
* ``grouped_mlp``: the grouped-GEMM SwiGLU expert MLP of the "grouped_mm" backend.

Nothing here builds a module or imports megatron-core: model/ owns the layers that call these ops.
"""
