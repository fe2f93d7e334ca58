"""Neighborhood attention (NATTEN semantics) on the block-sparse softmax engine."""
