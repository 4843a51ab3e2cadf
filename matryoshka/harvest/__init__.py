"""Stage 1: run the language model once and write its activations to a cache."""
from .run import harvest, plan

__all__ = ["harvest", "plan"]
