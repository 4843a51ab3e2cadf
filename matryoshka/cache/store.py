"""Opening a cache for reading: manifest, committed extent, statistics and arrays."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..names import looks_like_path
from .errors import CacheDamagedError, CacheError
from .format import FORMAT_VERSION, chunk_key, decode
from .location import Location
from .remote import ChunkSource


def _why(e: BaseException) -> str:
    """A library exception as a short cause: its type and the first line of its message."""
    text = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
    return f"{type(e).__name__}{': ' + text if text else ''}"


HEADLESS = ("its root zarr.json is missing (the arrays are there; a `cache copy` writes it last: if one was "
            "interrupted, run it again)")
"""Why a folder with a cache's arrays and no root metadata is damaged."""

REQUIRED_MANIFEST = ("fingerprint", "format_version", "n_tokens", "arrays", "split", "context_size", "storage")
"""Manifest fields every reader relies on; one missing means the metadata was damaged or hand-edited."""


@dataclass
class ArrayStats:
    """Statistics of one cached array over its committed non-BOS tokens."""

    count: int
    mean: np.ndarray
    mean_sq_norm: float
    total_variance: float
    """E||x - mu||^2: the FVU denominator per token."""

    @classmethod
    def from_sums(cls, count: int, total: np.ndarray, sq_norm: float) -> ArrayStats:
        mean = total / max(count, 1)
        msq = sq_norm / max(count, 1)
        return cls(count=count, mean=mean, mean_sq_norm=msq, total_variance=max(msq - float(mean @ mean), 0.0))

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean.tolist(), "mean_sq_norm": self.mean_sq_norm,
                "total_variance": self.total_variance}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ArrayStats:
        return cls(count=d["count"], mean=np.asarray(d["mean"], dtype=np.float64),
                   mean_sq_norm=d["mean_sq_norm"], total_variance=d["total_variance"])


class Cache:
    """A harvested cache, opened read-only. Only committed chunks are visible."""

    def __init__(self, path: str | Path | Location, local_cache_dir: str | Path | None = None) -> None:
        """Open a local directory or an fsspec URL (``file://``, ``s3://``, ``gs://``). For a URL,
        ``local_cache_dir`` keeps a local copy of every chunk read (see :mod:`.remote`)."""
        self.location = Location.of(path)
        self.path = str(self.location)
        self.remote = self.location.remote
        """Reads are bound by latency (object storage): chunks are fetched many per request."""
        if not self.location.exists("zarr.json"):
            if self.location.exists("acts/zarr.json") and self.location.exists("tokens/zarr.json"):
                raise CacheDamagedError(self.path, HEADLESS)
            raise CacheError(f"cache: {self.path!r} is not a cache (no zarr.json); run `pipeline harvest` "
                             "or list caches with `pipeline cache ls`")
        try:
            self.group = zarr.open_group(self.path, mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
            raise CacheError(f"cache: {self.path!r} is not a cache (no zarr group there)") from None
        except (ValueError, TypeError, KeyError) as e:  # a truncated or hand-broken zarr.json
            raise CacheDamagedError(self.path, f"its zarr.json is unreadable ({_why(e)})") from None
        attrs = self.group.attrs.asdict()
        if "manifest" not in attrs:
            raise CacheError(f"cache: {self.path!r} is a zarr group without a matryoshka manifest")
        self.manifest: dict[str, Any] = attrs["manifest"]
        self._check_metadata()
        if self.manifest["format_version"] > FORMAT_VERSION:
            raise CacheError(f"cache: {self.path!r} has format {self.manifest['format_version']}; "
                             f"this version reads up to {FORMAT_VERSION}: upgrade matryoshka")
        self.progress: dict[str, Any] = attrs.get("progress", {"chunks": 0})
        self.complete: bool = bool(attrs.get("complete", False))
        self._stats = attrs.get("stats")
        layout = f"{self.fingerprint}-{self.manifest['n_tokens']}x{self.chunk_tokens}"  # see remote.py
        self._chunks = ChunkSource(self.location, layout, local_cache_dir) if self.remote else None

    @property
    def chunk_source(self) -> ChunkSource | None:
        """Where a remote cache's chunk bytes come from (its local copy, the store); None for a local cache."""
        return self._chunks

    def _check_metadata(self) -> None:
        """The manifest has what readers rely on, and every array's own zarr.json opens: a damaged one is one
        line naming it, here, rather than a traceback in whichever command touches the array first."""
        m = self.manifest
        missing = [k for k in REQUIRED_MANIFEST if not isinstance(m, dict) or k not in m]
        if missing or not isinstance(m["arrays"], dict) or not isinstance(m["storage"], dict) \
                or "chunk_tokens" not in m["storage"] or "dtype" not in m["storage"]:
            what = ", ".join(missing) if missing else "arrays or storage"
            raise CacheDamagedError(self.path, f"its zarr.json manifest lacks {what}")
        for key in [*(f"acts/{name}" for name in m["arrays"]), "tokens"]:
            try:
                node = self.group[key]
            except KeyError:  # zarr says so both when the file is absent and when it is not array metadata
                meta = f"{key}/zarr.json"
                there = self.location.exists(meta)
                raise CacheDamagedError(self.path, f"{meta} is {'not valid zarr metadata' if there else 'missing'}") \
                    from None
            except (ValueError, TypeError) as e:
                raise CacheDamagedError(self.path, f"{key}/zarr.json is unreadable ({_why(e)})") from None
            if not isinstance(node, zarr.Array):
                raise CacheDamagedError(self.path, f"{key}/zarr.json is not an array's")

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def storage_dtype(self) -> str:
        return self.manifest["storage"]["dtype"]

    @property
    def chunk_tokens(self) -> int:
        return self.manifest["storage"]["chunk_tokens"]

    @property
    def n_chunks(self) -> int:
        return -(-self.manifest["n_tokens"] // self.chunk_tokens)

    @property
    def chunks_committed(self) -> int:
        return self.n_chunks if self.complete else int(self.progress["chunks"])

    @property
    def tokens_committed(self) -> int:
        return min(self.chunks_committed * self.chunk_tokens, self.manifest["n_tokens"])

    @property
    def array_names(self) -> list[str]:
        return list(self.manifest["arrays"])

    def _check_array(self, name: str) -> None:
        if name not in self.manifest["arrays"]:
            raise CacheError(f"site: cache {self.path!r} has no array {name!r}; it has {', '.join(self.array_names)}")

    def array(self, name: str) -> zarr.Array:
        self._check_array(name)
        return self.group[f"acts/{name}"]

    @property
    def tokens(self) -> zarr.Array:
        return self.group["tokens"]

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Committed rows [start, stop) of an array, decoded to float32."""
        if stop > self.tokens_committed:
            raise CacheError(f"cache: rows up to {stop} requested but only {self.tokens_committed} are committed")
        return decode(self.array(name)[start:stop], self.storage_dtype)

    def require_complete(self) -> None:
        if not self.complete:
            raise CacheError(f"cache: {self.path!r} is an unfinished harvest ({self.chunks_committed} of "
                             f"{self.n_chunks} chunks); finish it with `pipeline harvest --resume`")

    def split_chunks(self, split: str) -> range:
        """Chunk indices of a split (both splits are whole chunks)."""
        if split not in self.split:
            raise CacheError(f"split: {split!r} is not one of {', '.join(self.split)}")
        a, b = self.split[split]
        if a == b:
            raise CacheError(f"split: cache {self.path!r} has an empty {split} split")
        return range(a // self.chunk_tokens, -(-b // self.chunk_tokens))

    def chunk_rows(self, chunk: int) -> range:
        return range(chunk * self.chunk_tokens, min((chunk + 1) * self.chunk_tokens, self.manifest["n_tokens"]))

    def chunk_bytes(self, name: str, chunk: int) -> bytes:
        """The stored bytes of one chunk (``name`` is an array or ``tokens``), read without zarr."""
        return self.chunk_bytes_many([(name, chunk)])[(name, chunk)]

    def is_local(self, chunks: list[tuple[str, int]]) -> bool:
        """Whether these ``(name, chunk)`` are read from local disk (a local cache, or local copies)."""
        return self._chunks is None or self._chunks.has_local(chunk_key(*nc) for nc in chunks)

    def chunk_bytes_many(self, chunks: list[tuple[str, int]]) -> dict[tuple[str, int], bytes]:
        """Stored bytes of many ``(name, chunk)``: from object storage in one concurrent request."""
        keys = {nc: chunk_key(*nc) for nc in chunks}
        if self._chunks is not None:
            got = self._chunks.get_many(keys.values())
            return {nc: got[k] for nc, k in keys.items()}
        out = {}
        for nc, k in keys.items():
            with open(Path(self.path) / k, "rb") as f:
                out[nc] = f.read()
        return out

    def stats(self, name: str) -> ArrayStats:
        """Final statistics of a complete cache, or running ones of the committed prefix."""
        self._check_array(name)
        if self._stats is not None:
            return ArrayStats.from_json(self._stats[name])
        s = self.progress.get("sums", {}).get(name)
        if s is None:
            raise CacheError(f"cache: {self.path!r} has no committed tokens yet")
        return ArrayStats.from_sums(s["count"], np.asarray(s["sum"]), s["sq_norm"])

    @property
    def split(self) -> dict[str, list[int]]:
        """Token ranges ``{"heldout": [0, h], "train": [h, n]}``; the held-out split comes first."""
        return self.manifest["split"]


def is_cache(path: Path) -> bool:
    try:
        meta = json.loads((Path(path) / "zarr.json").read_text())
        return meta.get("node_type") == "group" and "manifest" in meta.get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False


def cache_or_wreck(meta: bytes | None, has_arrays: bool) -> bool:
    """Whether a folder is a cache, intact or damaged, from its root ``zarr.json`` (None: there is none) and
    whether it holds a cache's ``acts`` group and ``tokens`` array. `cache ls` lists a damaged one as
    damaged rather than leaving it out; a zarr group of someone else's (no manifest, no cache arrays) is not one."""
    if has_arrays:
        return True
    try:
        m = json.loads(meta) if meta is not None else None
        return isinstance(m, dict) and m.get("node_type") == "group" and "manifest" in m.get("attributes", {})
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False


def cache_location(root: str | Path, manifest: dict[str, Any]) -> Path | str:
    """Where a cache lives under a cache root: ``<root>/<model>/<fingerprint>``, for harvest and copy alike,
    so a team sharing one root finds every cache by its fingerprint. The model folder is a local model
    directory's name, else the resolved Hugging Face id with ``/`` as ``--`` (``gpt2`` and
    ``openai-community/gpt2`` are one model, one fingerprint and so one folder; ``synthetic`` for the
    synthetic source)."""
    name = manifest["model"].get("resolved") or manifest["model"]["name"]
    folder = Path(name).name if looks_like_path(name) else name.replace("/", "--")
    return Location.of(root).join(folder, manifest["fingerprint"]).pathlike
