"""The one base class of every error a user can cause or must be told about, and the configuration error.

The CLI catches :class:`MatryoshkaError` alone: it prints the message as one line and exits with the
error's ``exit_code``. Each stage derives its own errors from it (``CacheError``, the lock errors,
``ActivationError``, ``NonFiniteMetrics``, ``Interrupted``), so a new one needs no change to the CLI.
This module imports nothing from the package, so any module may import it.
"""
from __future__ import annotations


class MatryoshkaError(Exception):
    """A failure the user is told about in one line (never a traceback): bad input exits with status 2,
    a run that failed on its data (non-finite activations or metrics) with 1. ``prefix`` starts the
    line (``error: ``)."""

    exit_code: int = 2
    prefix: str = "error: "


class ConfigError(MatryoshkaError, ValueError):
    """Bad user input: a key, a value, a flag or a file the run cannot use."""
