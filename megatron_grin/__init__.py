"""megatron-grin: pretrain GRIN mixture-of-experts models (SparseMixer-v2, dropless) on megatron-core.

Modules: config (settings, presets), router (SparseMixer-v2), routing_rng (replayable sampling),
experts (dropless expert backends), moe_layer, layers, spec (ModuleSpecs), model (builder),
hf_mapping (HF PhimoeForCausalLM keys), compat (CPU/gloo accommodations), cli.
"""

__version__ = "0.1.0"

__all__ = ["sparsemixer_v2", "GrinConfig", "preset", "__version__"]


def __getattr__(name):
    # Lazy: `import megatron_grin` stays cheap and works without optional extras.
    if name == "sparsemixer_v2":
        from megatron_grin.router import sparsemixer_v2

        return sparsemixer_v2
    if name in ("GrinConfig", "preset"):
        from megatron_grin import config

        return getattr(config, name)
    raise AttributeError(f"module 'megatron_grin' has no attribute {name!r}")
