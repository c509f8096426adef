# Copy into the root of a Megatron-LM checkout (tag core_v0.16.1) and run it instead of pretrain_gpt.py.
# patches/README.md explains each flag; this set builds exactly the GRIN 16x3.8B model:
#
#   pip install megatron-grin            # in the same environment as Megatron-LM
#   torchrun ... pretrain_grin.py <your data, optimizer, checkpoint and logging flags> \
#       --num-layers 32 --hidden-size 4096 --num-attention-heads 32 --group-query-attention \
#       --num-query-groups 8 --max-position-embeddings 4096 --num-experts 16 --moe-router-topk 2 \
#       --moe-ffn-hidden-size 6400 --swiglu --position-embedding-type rope --rotary-base 10000 \
#       --untie-embeddings-and-output-weights --normalization LayerNorm --norm-epsilon 1e-5 \
#       --window-size 2046,0 --hidden-dropout 0 --attention-dropout 0 --moe-input-jitter-eps 0.01 \
#       --moe-router-dtype fp32 --moe-router-load-balancing-type global_aux_loss --moe-aux-loss-coeff 0 \
#       --grin-router sparsemixer_v2 --grin-jitter-eps 0.01 \
#       --tokenizer-type HuggingFaceTokenizer --tokenizer-model /path/to/grin-tokenizer --bf16
#   (with --tensor-model-parallel-size > 1 also --sequence-parallel; --expert-model-parallel-size stays 1)
#
# Everything else (data, optimizer, checkpoints, logging) is Megatron-LM's own. A Megatron-LM flag that
# contradicts GRIN is refused with its reason (the answers megatron-grin pretrain gives), never overridden.
"""Megatron-LM entry point training GRIN (SparseMixer-v2 MoE) through megatron-grin's layer specs."""

import time

_PROGRAM_START_TIME = time.time()  # as pretrain_gpt.py: before the heavy imports, for the startup report

from functools import partial  # noqa: E402

from megatron.core.enums import ModelType  # noqa: E402
from megatron.training import (  # noqa: E402
    get_args,
    get_tokenizer,
    inprocess_restart,
    pretrain,
    set_startup_timestamps,
)

import pretrain_gpt  # noqa: E402
from megatron_grin import compat  # noqa: E402
from megatron_grin.megatron_lm import (  # noqa: E402
    grin_extra_args,
    grin_gpt_builder,
    grin_transformer_config_from_args,
)
from megatron_grin.model import routing_rng  # noqa: E402
from model_provider import model_provider  # noqa: E402

# pretrain_gpt's get_batch, is_dataset_built_on_rank and get_embedding_ranks ask Megatron-LM's arguments for a
# TransformerConfig; give them the configuration of the model that is really trained (GRIN's).
pretrain_gpt.core_transformer_config_from_args = grin_transformer_config_from_args


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """pretrain_gpt.forward_step, with the routing sampler told which iteration this is (replayable draws)."""
    args = get_args()
    routing_rng.set_routing_seed(args.seed)
    routing_rng.set_routing_iteration(args.curr_iteration)
    return pretrain_gpt.forward_step(data_iterator, model, return_schedule_plan=return_schedule_plan)


if __name__ == "__main__":
    set_startup_timestamps(program_start=_PROGRAM_START_TIME, main_entry=time.time())
    compat.apply()  # no-op on GPU machines except the 0.16.1 te_general_gemm fix
    pretrain_gpt.train_valid_test_datasets_provider.is_distributed = True
    pretrain, store = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)
    pretrain(
        pretrain_gpt.train_valid_test_datasets_provider,
        partial(model_provider, partial(grin_gpt_builder, tokenizer_vocab=lambda: get_tokenizer().vocab_size)),
        ModelType.encoder_or_decoder,
        forward_step,
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
        extra_args_provider=partial(  # pretrain_gpt's own provider (modelopt's), then the GRIN flags
            grin_extra_args, modelopt_args=pretrain_gpt.add_modelopt_args if pretrain_gpt.has_nvidia_modelopt else None),
        store=store,
        get_embedding_ranks=pretrain_gpt.get_embedding_ranks,
    )
