"""``megatron-grin plan``: per-GPU memory and throughput of a layout, and a layout search."""
