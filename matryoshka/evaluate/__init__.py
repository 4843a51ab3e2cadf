"""Stage 4: metrics of trained dictionaries on a cache's held-out split, LM splicing, feature reports."""
from .stage import evaluate, find_runs, table

__all__ = ["evaluate", "find_runs", "table"]
