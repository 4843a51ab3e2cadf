"""The cache's errors, in a module of their own so that every cache module can raise them."""
from __future__ import annotations

from ..errors import MatryoshkaError


class CacheError(MatryoshkaError, ValueError):
    """A cache that is missing, incomplete, damaged or not the one expected."""


class CacheDamagedError(CacheError):
    """A cache whose metadata (root or array ``zarr.json``) cannot be read: nothing in it can be trusted.
    ``reason`` is the short cause, as `pipeline cache ls` shows it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cache: {path!r} is damaged: {reason}; restore the cache from a copy, or delete the "
                         "folder and harvest again")
        self.reason = reason
