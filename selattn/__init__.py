"""selattn: GPT-style character models with standard and selective attention, in JAX."""

__version__ = '0.1.0'
