"""``megatron-grin convert``: megatron checkpoints to and from Hugging Face ``PhimoeForCausalLM``."""
