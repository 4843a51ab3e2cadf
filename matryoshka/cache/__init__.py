"""The activation cache: a chunked, compressed zarr v3 store shared by every later stage."""
from .store import ArrayStats, Cache, CacheError, is_cache

__all__ = ["ArrayStats", "Cache", "CacheError", "is_cache"]
