"""`pdpo judge`: pairwise LLM-as-judge win rates."""

from pdpo_jax.evaluate.judge import main

__all__ = ["main"]
