"""``megatron-grin bench``: MoE layer, routing and model benchmarks against dense and megatron-core."""
