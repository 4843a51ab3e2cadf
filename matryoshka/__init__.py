"""Matryoshka SAEs and transcoders from a shared activation cache.

Stages, in the one direction data flows: ``harvest`` (LM -> cache), ``cache`` (the zarr store),
``train`` (cache -> runs), ``evaluate`` (runs + cache -> metrics).
"""
__version__ = "0.1.0"


def load(path, device="cpu"):
    """A trained run as a dictionary with stateless ``encode``/``decode`` in the cache's units."""
    from .train.load import load as _load

    return _load(path, device)
