"""Stage 1: run the language model once and write its activations to a cache."""
from .plan import plan
from .stage import harvest

__all__ = ["harvest", "plan"]
