"""megatron-grin: pretrain GRIN mixture-of-experts models (SparseMixer-v2, dropless) on megatron-core.

Layout (docs/architecture.md): ``config`` (settings, presets), ``compat`` (megatron-core/CPU
accommodations), ``model/`` (SparseMixer-v2, router, MoE layer, experts, specs, builder), ``ops/``
(kernels beside their references), ``training/`` (pretrain), ``convert/`` (Hugging Face),
``plan/`` (memory and speed model), ``bench/`` (benchmarks), ``cli`` (the ``megatron-grin`` command).
"""

__version__ = "0.1.0"

__all__ = ["sparsemixer_v2", "GrinConfig", "preset", "__version__"]


def __getattr__(name):
    # Lazy: `import megatron_grin` stays cheap and works without optional extras.
    if name == "sparsemixer_v2":
        from megatron_grin.model.sparsemixer import sparsemixer_v2

        return sparsemixer_v2
    if name in ("GrinConfig", "preset"):
        from megatron_grin import config

        return getattr(config, name)
    raise AttributeError(f"module 'megatron_grin' has no attribute {name!r}")
