"""pdpo_jax: persona-consistent dialogue generation via pseudo preference tuning, in JAX/Flax."""

__version__ = "0.1.0"
