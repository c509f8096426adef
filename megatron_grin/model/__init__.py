"""The GRIN model on megatron-core: SparseMixer-v2 maths and router, MoE layer, experts, layers, specs, builder.

Data flow of one MoE layer: router (``router.py``, maths in ``sparsemixer.py``, randomness in
``routing_rng.py``) -> megatron token dispatcher -> experts (``experts.py`` picks a backend) -> combine.
``spec.py`` assembles layers as megatron ``ModuleSpec``s and ``build.py`` builds the ``GPTModel``.
"""
