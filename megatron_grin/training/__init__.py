"""``megatron-grin pretrain`` and its parts: flags, trainer loop, checkpoints, metrics, data, tokenizers."""
