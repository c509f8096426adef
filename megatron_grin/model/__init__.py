"""The GRIN model on megatron-core: SparseMixer-v2 maths and router, MoE layer, experts, layers, specs, builder.

Data flow of one MoE layer: router (``router.py``, maths in ``sparsemixer.py``, randomness in
``routing_rng.py``) -> GrinTokenDispatcher (``dispatcher.py``) -> experts (``experts.py`` picks a backend) -> combine.
``attention.py`` is the local spec's core attention (no [b, heads, s, s] scores; kernels in
``ops/window_attention.py``). ``spec.py`` assembles layers as megatron ``ModuleSpec``s and ``build.py``
builds the ``GPTModel``.
"""
