"""Why a chunk could not be read, in one line that points at the right fix.

A chunk that fails to read is not always damage (which ``pipeline cache verify`` finds): the whole cache
may have been deleted while it was being read (its root ``zarr.json`` is gone), or the file may belong to
a teammate who wrote it readable by themselves alone (a permission problem, named with the file). Only
what is neither gets the hint to verify.
"""
from __future__ import annotations

from pathlib import Path

from ..files import permission_line
from .errors import CacheError
from .location import Location


def cache_deleted(path: str | Path | Location) -> bool:
    """Whether the cache at ``path`` no longer exists: its root ``zarr.json`` is gone."""
    try:
        return not Location.of(path).exists("zarr.json")
    except Exception:  # noqa: BLE001 - a store that cannot answer says nothing about deletion
        return False


def unreadable_chunk(path: str | Path, chunk: int, name: str, e: BaseException) -> CacheError:
    """The error for chunk ``chunk`` of array ``name`` of the cache at ``path`` failing with ``e``."""
    if isinstance(e, PermissionError):
        return CacheError(f"cache: chunk {chunk} of {name} in {str(path)!r}: {permission_line(e)}")
    if cache_deleted(path):
        return CacheError(f"cache: {str(path)!r} was deleted while being read (its zarr.json is gone); "
                          "harvest or copy it again, or give another --cache")
    return CacheError(f"cache: chunk {chunk} of {name} in {str(path)!r} is unreadable ({e}); "
                      "run `pipeline cache verify`")
