"""``pretrain --dry-run``: what a validated command line would train, printed without starting anything.

The parameter counts come from accounting.py and the memory and speed estimate from the planner
(``megatron_grin.plan``), so the numbers agree with ``megatron-grin plan`` by construction.
"""

from __future__ import annotations

import os
from megatron_grin import ckpt_format
from megatron_grin.accounting import parameter_counts
from megatron_grin.config import GrinConfig
from megatron_grin.plan import planner
from megatron_grin.plan.layout import Layout
from megatron_grin.training import megatron_checkpoint
from megatron_grin.training.run_config import TrainConfig


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _model_lines(c: GrinConfig, source: str) -> list[str]:
    counts = parameter_counts(c)
    window = "full causal attention" if c.sliding_window is None else f"window {c.sliding_window} keys " \
                                                                      f"(--window-size {c.sliding_window - 1},0)"
    return [
        f"model ({source}):",
        f"  {c.num_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} query heads / {c.num_query_groups} "
        f"key-value heads of {c.head_dim}, {window}, RoPE base {c.rotary_base:g}, "
        f"LayerNorm eps {c.layernorm_epsilon:g}",
        f"  {c.num_experts} SwiGLU experts of {c.ffn_hidden_size}, top-{c.moe_router_topk} {c.router_variant} "
        f"(mask eps {c.router_jitter_eps:g}, input jitter {c.input_jitter_eps:g}), balance loss "
        f"{c.balance_loss_coeff:g} ({c.moe_router_load_balancing_type}), router dtype {c.moe_router_dtype or 'model'}",
        f"  vocabulary {c.vocab_size} ({c.tokenizer}), padded to {c.padded_vocab_size}; dropout {c.hidden_dropout:g} / "
        f"{c.attention_dropout:g}; {'bf16' if c.bf16 else 'fp32'}",
        f"  parameters: {_count(counts['total'])} total, {_count(counts['active'])} active per token",
    ]


def _run_lines(c: GrinConfig, t: TrainConfig) -> list[str]:
    vpp = c.virtual_pipeline_model_parallel_size
    layout = (f"TP {c.tensor_model_parallel_size} x PP {c.pipeline_model_parallel_size}"
              + (f" (VPP {vpp})" if vpp else "") + f" x DP {t.data_parallel_size} = {t.world_size} ranks"
              + (", sequence parallel" if c.seq_parallel else ""))
    schedule = (f"{t.train_iters} iterations" if t.iteration_based else
                f"{t.train_samples} samples = {t.train_iters} iterations")
    data = "mock data" if t.mock_data else "--data-path " + " ".join(map(str, t.data_path or []))
    recompute = c.recompute_granularity or "none"
    return [
        "run:",
        f"  layout {layout}; recompute {recompute}; "
        f"{'distributed' if t.use_distributed_optimizer else 'replicated'} optimizer",
        f"  batch {t.global_batch_size} x {t.seq_length} tokens = {t.tokens_per_step:,} tokens/step "
        f"(micro-batch {t.micro_batch_size}, {t.num_microbatches} micro-batches per rank); {schedule}",
        f"  AdamW lr {t.lr:g} -> {t.min_lr:g} ({t.lr_decay_style}), warmup {t.lr_warmup_steps:g} and decay "
        f"{t.lr_decay_steps} samples, weight decay {t.weight_decay:g}, clip {t.clip_grad:g}, seed {t.seed}",
        f"  data: {data} (split {t.split}); tokenizer {t.tokenizer}",
        f"  checkpoints: {_checkpoint_text(t)}",
    ]


def _checkpoint_text(t: TrainConfig) -> str:
    load = "no --load (fresh start)"
    if t.load:
        found = ckpt_format.find_checkpoint(t.load, t.ckpt_step) if os.path.isdir(t.load) else None
        load = f"resume {found[1]}{megatron_checkpoint.describe(found[1], t.grin_config)}" if found else \
            f"--load {t.load} holds no checkpoint (fresh start)"
    save = f"save to {t.save} every {t.save_interval or 'run end'}" if t.save else "no --save (nothing is saved)"
    return f"{load}; {save}"


def _plan_lines(c: GrinConfig, t: TrainConfig) -> tuple[list[str], bool]:
    """The planner's estimate, and whether it fits (True when there is no estimate)."""
    vpp = c.virtual_pipeline_model_parallel_size or 1
    try:
        lay = Layout(gpus=t.world_size, tp=c.tensor_model_parallel_size, pp=c.pipeline_model_parallel_size, vpp=vpp,
                     micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
                     seq_length=t.seq_length, recompute=c.recompute_granularity or "none",
                     recompute_method=c.recompute_method or "uniform", recompute_num_layers=c.recompute_num_layers or 1,
                     distributed_optimizer=t.use_distributed_optimizer, bf16=c.bf16)
        plan = planner.evaluate(c, lay).to_dict()
    except Exception as err:  # the planner models GPU layouts; say why there is no estimate rather than fail
        return [f"planner: no estimate for this layout ({type(err).__name__}: {err})"], True
    speed = plan["time"].get("tokens_per_s_per_gpu")
    return [f"planner (megatron-grin plan, per GPU, {plan['assumptions'].get('gpu_memory_gib', '?')} GiB): peak "
            f"{plan['peak_gib']:.1f} GiB on PP rank {plan['peak_rank']} ({100 * plan['headroom']:.0f}% headroom, "
            f"{'fits' if plan['fits'] else 'DOES NOT FIT'})"
            + (f", about {speed:.0f} tokens/s/GPU" if speed else "")], bool(plan["fits"])


def report(parsed) -> str:
    """The resolved model and run, the planner's estimate and how each Megatron-LM flag was taken."""
    c, t = parsed.cfg, parsed.tcfg
    plan, fits = _plan_lines(c, t)
    lines = ["dry run: the configuration is valid; nothing was started." if fits else
             "dry run: the flags are valid, but the planner estimates that this layout does NOT FIT in GPU memory "
             "(below: `megatron-grin plan` suggests layouts that do); nothing was started."]
    if parsed.config_file:
        lines.append(f"config file: {parsed.config_file}")
    lines += _model_lines(c, parsed.model_source) + _run_lines(c, t) + plan
    if parsed.notes:
        lines.append("Megatron-LM flags accepted without effect, or passed through:")
        lines += [f"  {note}" for note in parsed.notes]
    return "\n".join(lines)
