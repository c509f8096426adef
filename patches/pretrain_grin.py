# Copy into the root of a Megatron-LM checkout (core_r0.16.0) and run it instead of pretrain_gpt.py:
#
#   pip install megatron-grin            # in the same environment as Megatron-LM
#   torchrun ... pretrain_grin.py <your usual pretrain_gpt.py flags> \
#       --num-experts 16 --moe-router-topk 2 --grin-router sparsemixer_v2 --grin-jitter-eps 0.01 \
#       --moe-input-jitter-eps 0.01 --grin-sliding-window 2047 --normalization LayerNorm \
#       --untie-embeddings-and-output-weights --position-embedding-type rope --rotary-base 10000
#
# Everything else (data, optimizer, checkpoints, logging) is Megatron-LM's own. The routing sampler is
# keyed by the training iteration so that SparseMixer-v2's draws replay across resumes and layouts.
"""Megatron-LM entry point training GRIN (SparseMixer-v2 MoE) through megatron-grin's layer specs."""

from functools import partial

from megatron.core.enums import ModelType
from megatron.training import get_args, pretrain

import pretrain_gpt
from megatron_grin import compat
from megatron_grin.model import routing_rng
from megatron_grin.megatron_lm import add_grin_args, grin_gpt_builder
from model_provider import model_provider


def forward_step(data_iterator, model, *args, **kwargs):
    """pretrain_gpt.forward_step, with the routing sampler told which iteration this is."""
    a = get_args()
    routing_rng.set_routing_seed(a.seed)
    routing_rng.set_routing_iteration(a.curr_iteration)
    return pretrain_gpt.forward_step(data_iterator, model, *args, **kwargs)


if __name__ == "__main__":
    compat.apply()  # no-op on GPU machines except the 0.16.1 te_general_gemm fix
    pretrain_gpt.train_valid_test_datasets_provider.is_distributed = True
    pretrain(
        pretrain_gpt.train_valid_test_datasets_provider,
        partial(model_provider, grin_gpt_builder),
        ModelType.encoder_or_decoder,
        forward_step,
        extra_args_provider=add_grin_args,
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
    )
