"""The model family: standard, selective and reference attention in a post-LN decoder."""

from selattn.model.transformer import Transformer, count_params

__all__ = ['Transformer', 'count_params']
