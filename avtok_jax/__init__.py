"""AVTok in JAX/Flax: one 1D token sequence per sounding video."""

__version__ = "0.1.0"
