"""Raw Pallas kernels (TPU Mosaic and GPU lowerings) with their block-size configs.

This package imports jax only, never attn_jax: the adapters in ``attn_jax/<family>/pallas.py``
translate the library's calls (BlockMask, padding, sharding) into kernel arguments.
"""
