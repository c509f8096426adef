"""Fused kernels and autograd ops for GRIN MoE layers, each beside the PyTorch reference it is tested against.

Glossary (shape suffixes): T tokens, E experts, K picks per token, H hidden, F expert ffn (per TP rank),
N = T*K permuted rows.

* ``routing``: SparseMixer-v2 routing for all picks (Philox Gumbel sampling, masked softmax, Heun
  multiplier) and its custom router gradient; reference: ``model/sparsemixer.py``.
* ``jitter``: GRIN's multiplicative input jitter from counter-based (Philox) draws keyed by token.
* ``permute``: dropless token permute / unpermute (the routing weights optionally fused into unpermute).
* ``swiglu``: SwiGLU with the routing weight applied inside, the router gradient in fp32 (fwd + bwd).
* ``grouped_gemm``: Triton grouped GEMMs (forward, dgrad, wgrad into megatron's fp32 main_grad).
* ``grouped_mlp``: the expert MLP of the "grouped_mm" backend (grouped GEMMs + SwiGLU, or the CPU loop).
* ``backend``: which implementation an op runs ("auto" / "triton" / "torch", the fusion switches).
* ``window_attention``: causal / sliding-window attention without [b, heads, s, s] scores (SDPA,
  compiled FlexAttention, a blockwise kernel); reference: its dense float64 ``window_attention_reference``.

Nothing here builds a module or imports megatron-core: model/ owns the layers that call these ops.
"""
