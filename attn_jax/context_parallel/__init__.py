"""Context parallelism: the sequence axis sharded over a mesh axis, for every attention family.

:class:`~attn_jax.context_parallel.config.ContextParallel` (exported as
``attn_jax.ContextParallel``) is the setting the primitives take as ``context_parallel=``;
``softmax`` (ring / all-gather K/V with LSE merging), ``linear`` (state passing) and
``neighborhood`` (halo exchange) hold the three implementations.
"""
