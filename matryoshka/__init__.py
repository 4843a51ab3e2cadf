"""Matryoshka SAEs and transcoders from a shared activation cache.

Stages, in the one direction data flows: ``harvest`` (LM -> cache), ``cache`` (the zarr store),
``train`` (cache -> runs), ``evaluate`` (runs + cache -> metrics).
"""
__version__ = "0.1.0"
