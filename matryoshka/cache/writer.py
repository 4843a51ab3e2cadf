"""The cache writer: parallel compression and writes, committed in order, resumable.

Protocol. Chunk ``i`` is compressed and written by a pool of threads in any order; a chunk is
*committed* when it and every chunk before it are on disk and the group attributes say so. The
attributes (``progress``: committed chunks and the running statistics sums) are rewritten
atomically (zarr's local store writes a temporary file and renames it), and only at chunk counts
from which a resumed run can restart with the same LM batches, so a harvest killed at any moment
leaves a readable cache of whole chunks, and ``--resume`` rewrites nothing that differs: the
result is byte-identical to an uninterrupted run.

The statistics are float64 sums added in chunk order, never in completion order, so they too are
identical however the threads interleave.

A shard of a multi-worker harvest (harvest/shards.py) uses the same protocol on its own chunk range,
committing to its own record group; the last shard to finish adds the shards' sums in chunk order.
"""
from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore

from ..errors import MatryoshkaError
from .format import STORAGE, bos_rows, chunk_key, compressors, decode, encode_chunk, host_view, row_width, token_codec
from .retry import retrying
from .store import ArrayStats, CacheError


class ActivationError(MatryoshkaError, RuntimeError):
    """Non-finite activations: names the array and the token range."""

    exit_code = 1


@dataclass
class _Chunk:
    index: int
    rows: int
    tokens: np.ndarray
    acts: dict[str, np.ndarray]
    filled: int = 0


@dataclass
class _Sums:
    count: int = 0
    total: np.ndarray | None = None
    sq_norm: float = 0.0

    def add(self, count: int, total: np.ndarray, sq_norm: float) -> None:
        self.count += count
        self.total = total.copy() if self.total is None else self.total + total
        self.sq_norm += sq_norm

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "sum": [] if self.total is None else self.total.tolist(), "sq_norm": self.sq_norm}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> _Sums:
        return cls(d["count"], np.asarray(d["sum"], dtype=np.float64) if d["sum"] else None, d["sq_norm"])


@dataclass
class WriteStats:
    rows_written: int = 0
    raw_bytes: int = 0
    stored_bytes: int = 0
    started: float = field(default_factory=time.monotonic)


class CacheWriter:
    """Writes batches of whole sequences to a cache opened by :func:`create_or_resume`."""

    guard: Callable[[], None] = staticmethod(lambda: None)
    """Called before every commit; raises if this writer may no longer commit (its lock was broken)."""

    def __init__(self, group: zarr.Group, manifest: dict[str, Any], progress: dict[str, Any],
                 threads: int, batch_seqs: int, chunks: range | None = None, record: zarr.Group | None = None,
                 only: set[int] | None = None) -> None:
        """``chunks`` and ``record``: a shard of a multi-worker harvest writes only these chunks and keeps its
        progress in its own ``record`` group (harvest/shards.py); by default, every chunk and the cache's group.
        ``only``: a repair (harvest/repair.py) is fed whole resume blocks, so the LM sees the batches the
        harvest did, but stores only these chunks and commits nothing (progress and statistics stay)."""
        self.group = group
        self.record = record if record is not None else group
        self.manifest = manifest
        st = manifest["storage"]
        self.dtype: str = st["dtype"]
        self.ctx: int = manifest["context_size"]
        self.chunk_rows: int = st["chunk_tokens"]
        self.n_rows: int = manifest["n_tokens"]
        self.n_chunks = -(-self.n_rows // self.chunk_rows)
        chunks = chunks if chunks is not None else range(self.n_chunks)
        self.first, self.end = chunks.start, chunks.stop
        self.names = list(manifest["arrays"])
        self.only = only
        self.codec: str = st["codec"]
        self.token_codec = token_codec(self.codec)
        # Commits land only where a resumed run restarts on the same LM batch boundaries.
        spc = st["seqs_per_chunk"]
        self.align_chunks = self.align(spc, batch_seqs)
        self.committed = int(progress.get("chunks", self.first))
        self._sums = {n: _Sums.from_json(progress["sums"][n]) if "sums" in progress else _Sums() for n in self.names}
        self._done: dict[int, dict[str, tuple[int, np.ndarray, float]]] = {}
        self._watermark = self.committed
        self._lock = threading.Lock()
        self._last_commit = 0.0
        self._errors: dict[float, BaseException] = {}  # by chunk index (inf: not a chunk's)
        self.stats = WriteStats()
        self._current: _Chunk | None = None
        self._next_chunk = self.committed
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cache-write")
        self._slots = threading.Semaphore(2 * threads)
        self._incoming: queue.Queue = queue.Queue(maxsize=2)
        self._assembler = threading.Thread(target=self._assemble_loop, name="cache-assemble", daemon=True)
        self._assembler.start()

    @staticmethod
    def align(seqs_per_chunk: int, batch_seqs: int) -> int:
        """Chunks between resume points: whole chunks that are also whole LM batches."""
        return math.lcm(seqs_per_chunk, batch_seqs) // seqs_per_chunk

    @property
    def start_row(self) -> int:
        return self.committed * self.chunk_rows

    @property
    def end_row(self) -> int:
        return min(self.end * self.chunk_rows, self.n_rows)

    # -- producer side (the harvest loop) ------------------------------------------------------
    def write(self, tokens: torch.Tensor, acts: dict[str, torch.Tensor]) -> None:
        """Queue one batch: tokens [B, T] and, per array, storage-dtype activations [B, T, d] on any device.

        GPU tensors are copied to pinned host memory without blocking; the copy completes in the
        background while the LM runs the next batch. Each copy runs on its tensor's own device (several
        with ``--device-map``), so the writer waits for an event recorded on each of those devices, not
        on the current one.
        """
        self._raise_if_failed()
        host: dict[str, torch.Tensor] = {}
        for name, t in acts.items():
            if t.device.type == "cuda":
                h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                h.copy_(t, non_blocking=True)
                host[name] = h
            else:
                host[name] = t
        events = []
        for device in {t.device for t in acts.values() if t.device.type == "cuda"}:
            events.append(torch.cuda.Event())
            events[-1].record(torch.cuda.current_stream(device))
        while True:
            try:
                self._incoming.put((tokens.cpu(), host, events), timeout=0.5)
                return
            except queue.Full:
                self._raise_if_failed()

    def finish(self) -> None:
        """Flush everything, wait for the writes, and mark the cache complete."""
        self._incoming.put(None)
        self._assembler.join()
        self._pool.shutdown(wait=True)
        self._raise_if_failed()
        if self._current is not None:
            raise CacheError(f"harvest ended mid-chunk at row {self.start_row}")
        if self._watermark != self.end:
            raise CacheError(f"only chunks {self.first}..{self._watermark - 1} of {self.first}..{self.end - 1} "
                             "were written")
        self.guard()
        self.committed = self.end
        if self.only is not None:  # a repair: the cache's attributes already describe it
            return
        if self.record is not self.group:  # a shard: the last shard to finish completes the cache
            self._on_store(lambda: self.record.attrs.update({"progress": self._progress_json(self.end), "done": True}),
                           "recording the shard's end")
            return
        self._on_store(lambda: self.group.attrs.update(complete_attrs(self._sums, self.n_chunks)),
                       "completing the cache")

    def abort(self) -> None:
        """Stop the threads after an error; committed chunks stay readable."""
        try:
            self._incoming.put_nowait(None)
        except queue.Full:
            pass
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _raise_if_failed(self) -> None:
        """Raise the failure of the earliest chunk, once the writes already started have ended, so the
        error does not depend on which thread happened to finish first."""
        if self._errors:
            self._pool.shutdown(wait=True)
            raise self._errors[min(self._errors)]

    # -- assembling batches into chunks ---------------------------------------------------------
    def _assemble_loop(self) -> None:
        try:
            while (item := self._incoming.get()) is not None:
                if self._errors:
                    continue
                tokens, host, events = item
                for event in events:
                    event.synchronize()
                self._assemble(tokens.reshape(-1).numpy(), {n: host_view(t, self.dtype).reshape(-1, t.shape[-1])
                                                            for n, t in host.items()})
        except BaseException as e:  # noqa: BLE001 - handed to the producer thread
            self._errors.setdefault(math.inf, e)

    def _assemble(self, tokens: np.ndarray, acts: dict[str, np.ndarray]) -> None:
        pos = 0
        while pos < len(tokens):
            if self._current is None:
                if self._next_chunk >= self.end:
                    raise CacheError("more tokens were written than the cache holds")
                i = self._next_chunk
                rows = min(self.chunk_rows, self.n_rows - i * self.chunk_rows)
                self._current = _Chunk(i, rows, np.empty(rows, np.int32),
                                       {n: np.empty((rows, a.shape[1]), a.dtype) for n, a in acts.items()})
                self._next_chunk += 1
            c = self._current
            take = min(c.rows - c.filled, len(tokens) - pos)
            c.tokens[c.filled:c.filled + take] = tokens[pos:pos + take]
            for n, a in acts.items():
                c.acts[n][c.filled:c.filled + take] = a[pos:pos + take]
            c.filled += take
            pos += take
            if c.filled == c.rows:
                self._current = None
                self._slots.acquire()
                fut = self._pool.submit(self._write_chunk, c)
                fut.add_done_callback(lambda f: self._slots.release())

    # -- writer threads -------------------------------------------------------------------------
    def _write_chunk(self, c: _Chunk) -> None:
        try:
            if self.only is not None and c.index not in self.only:  # a repair: an intact chunk of the block
                self._chunk_done(c, {}, 0)
                return
            r0 = c.index * self.chunk_rows
            keep = ~bos_rows(self.manifest["bos"], (r0 + np.arange(c.rows)) % self.manifest["context_size"], c.tokens)
            sums = {}
            for n, a in c.acts.items():
                x = decode(a, self.dtype)
                bad = nonfinite_rows(a, x, self.dtype)
                if len(bad):
                    hint = " (float16 overflow? use --dtype bfloat16)" if self.dtype == "float16" else ""
                    raise ActivationError(
                        f"non-finite activations in {self.manifest['arrays'][n]['hook_name']} at tokens "
                        f"{r0 + bad[0]}..{r0 + bad[-1]} (chunk {c.index}){hint}")
                sums[n] = chunk_sums(x[keep])
            stored = 0
            for n, a in c.acts.items():
                stored += self._put(chunk_key(n, c.index), a, self.codec, 0)
            self._put(chunk_key("tokens", c.index), c.tokens, self.token_codec, -1)
            self._chunk_done(c, sums, stored)
        except BaseException as e:  # noqa: BLE001 - handed to the producer thread
            self._errors[c.index] = e

    def _put(self, key: str, rows: np.ndarray, codec: str, fill: int) -> int:
        """Encode a chunk on this thread and store it in one atomic write; its stored size. The last
        chunk is padded with the fill value to the full chunk shape, as zarr stores edge chunks."""
        if len(rows) < self.chunk_rows:
            full = np.full((self.chunk_rows, *rows.shape[1:]), fill, rows.dtype)
            full[:len(rows)] = rows
            rows = full
        data = encode_chunk(rows, codec)
        path = f"{self.group.path}/{key}".lstrip("/")
        self._on_store(lambda: sync(self.group.store.set(path, default_buffer_prototype().buffer.from_bytes(data))),
                       f"writing {key}")
        return len(data)

    def _on_store(self, write: Callable[[], Any], what: str) -> None:
        """Run a write of the cache; on object storage, ride out its transient failures (cache/retry.py):
        every write here (a whole chunk, or the group's attributes) is safe to repeat."""
        if isinstance(self.group.store, FsspecStore):
            retrying(write, what)
        else:
            write()

    def _chunk_done(self, c: _Chunk, sums: dict[str, tuple[int, np.ndarray, float]], stored: int) -> None:
        with self._lock:
            self.stats.rows_written += c.rows
            self.stats.raw_bytes += sum(a.nbytes for a in c.acts.values())
            self.stats.stored_bytes += stored
            self._done[c.index] = sums
            advanced = False
            while self._watermark in self._done:
                for n, (count, total, sq) in self._done.pop(self._watermark).items():
                    self._sums[n].add(count, total, sq)
                self._watermark += 1
                advanced = True
            w = self._watermark
            now = time.monotonic()
            if (self.only is None and advanced and w % self.align_chunks == 0 and w < self.end
                    and now - self._last_commit > 0.5):
                self.guard()
                self._on_store(lambda: self.record.attrs.update({"progress": self._progress_json(w)}),
                               f"committing chunks ..{w - 1}")
                self.committed = w
                self._last_commit = now

    def _progress_json(self, chunks: int) -> dict[str, Any]:
        return {"chunks": chunks, "sums": {n: s.to_json() for n, s in self._sums.items()}}


def complete_attrs(sums: dict[str, _Sums], n_chunks: int) -> dict[str, Any]:
    """The group attributes of a finished cache: progress, final statistics, the complete flag."""
    stats = {n: ArrayStats.from_sums(s.count, s.total, s.sq_norm).to_json() for n, s in sums.items()}
    return {"progress": {"chunks": n_chunks, "sums": {n: s.to_json() for n, s in sums.items()}},
            "stats": stats, "complete": True}


_EXPONENT = {"bfloat16": (np.uint16, 0x7F80), "float16": (np.uint16, 0x7C00), "float32": (np.uint32, 0x7F800000)}
"""Exponent bits of each storage format: all set means inf or nan."""


def nonfinite_rows(stored: np.ndarray, x: np.ndarray, dtype: str) -> np.ndarray:
    """Rows holding an inf or nan. Looked for in the stored bits first where the format allows (a third
    of the time of ``isfinite`` on the decoded floats); ``x`` is the decoded chunk."""
    if dtype in _EXPONENT:
        view, mask = _EXPONENT[dtype]
        if not ((stored.view(view) & mask) == mask).any():
            return np.empty(0, np.int64)
    return np.nonzero(~np.isfinite(x).all(axis=1))[0]


def chunk_sums(x: np.ndarray) -> tuple[int, np.ndarray, float]:
    """Row count, per-dimension sum and summed squared norm, accumulated in float64 without a float64
    copy of the rows (such a copy would cost the writer threads more than encoding the chunk)."""
    return len(x), x.sum(axis=0, dtype=np.float64), float(np.einsum("ij,ij->i", x, x, dtype=np.float64).sum())


def merge_progress(parts: list[dict[str, Any]]) -> dict[str, _Sums]:
    """Running sums of consecutive chunk ranges (shards, in chunk order) added into the sums of their union."""
    merged: dict[str, _Sums] = {}
    for part in parts:
        for name, d in part.get("sums", {}).items():
            s = _Sums.from_json(d)
            if s.total is not None:
                merged.setdefault(name, _Sums()).add(s.count, s.total, s.sq_norm)
    return merged


def create_arrays(group: zarr.Group, manifest: dict[str, Any]) -> None:
    """Lay out the empty arrays of a new cache."""
    st = manifest["storage"]
    np_dtype, _, itemsize = STORAGE[st["dtype"]]
    rows, chunk = manifest["n_tokens"], st["chunk_tokens"]
    for name, a in manifest["arrays"].items():
        w = row_width(a["width"], st["dtype"])
        group.create_array(f"acts/{name}", shape=(rows, w), chunks=(chunk, w), dtype=np_dtype,
                           compressors=compressors(st["codec"], itemsize), fill_value=0)
    group.create_array("tokens", shape=(rows,), chunks=(chunk,), dtype=np.int32,
                       compressors=compressors(token_codec(st["codec"]), 4), fill_value=-1)
