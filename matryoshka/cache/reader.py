"""The shuffled reader: batches of activation rows (or row-aligned source/target pairs) from a cache.

How it shuffles. Each epoch takes the split's chunks in a random order (the same order on every rank;
rank ``r`` of ``w`` takes every ``w``-th chunk, so ranks are disjoint and together cover the split).
A chunk is read sequentially, decompressed by background threads, its BOS rows dropped, and its rows
poured into a *mixing buffer*. Whenever the buffer holds ``buffer_tokens`` rows it is permuted and the
front is served as batches until half of it is left; at the end of the epoch the rest is permuted and
served. So every row of the split is served exactly once per epoch, and a batch is a uniform sample
of at least ``buffer_tokens / 2`` rows from at least ``buffer_tokens / (2 * chunk_tokens)`` chunks.

Memory is bounded by the buffer (``buffer_tokens + chunk_tokens`` rows), the chunks decoded ahead
(``prefetch_chunks``) and two batches: nothing else is kept, whatever the size of the cache.

Resume. :meth:`ShuffledReader.state_dict` is the cursor: epoch, chunks consumed this epoch, the row
ids waiting in the buffer in their order, and the buffer RNG's state. A reader given that cursor
reloads exactly those rows and continues the stream where it stopped, bit for bit.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .format import STORAGE, to_torch
from .store import Cache, CacheError


@dataclass
class ReaderConfig:
    """How a reader draws batches. Sizes are in tokens (rows)."""

    batch_size: int = 4096
    buffer_tokens: int = 2**18
    prefetch_chunks: int = 8
    threads: int = 0
    """Decompression threads; 0 means one per CPU core."""
    seed: int = 0
    exclude_bos: bool = True
    split: str = "train"
    drop_last: bool = False
    """Serve the last, smaller batch of each epoch (False: every row exactly once per epoch)."""

    def validate(self) -> None:
        for name in ("batch_size", "buffer_tokens", "prefetch_chunks"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise CacheError(f"{name}: {v!r} must be a positive integer")
        if self.buffer_tokens < self.batch_size:
            raise CacheError(f"buffer_tokens: {self.buffer_tokens} is smaller than batch_size {self.batch_size}; "
                             "the mixing buffer must hold at least one batch (a few batches mix far better)")


def open_arrays(arrays: Sequence[str | tuple[str | Cache, str]], cache: str | Cache | None) -> list[tuple[Cache, str]]:
    """Resolve array names (``"8.resid_mid"``, or ``(cache, name)`` for an array of another cache)
    and check that they are row-aligned: every cache must carry one fingerprint and be complete."""
    default = Cache(cache) if isinstance(cache, str) else cache
    out: list[tuple[Cache, str]] = []
    for a in arrays:
        c, name = (a if isinstance(a, tuple) else (default, a))
        if c is None:
            raise CacheError(f"array {name!r} names no cache")
        c = Cache(c) if isinstance(c, str) else c
        c.require_complete()
        c.array(name)
        out.append((c, name))
    fps = {c.fingerprint for c, _ in out}
    if len(fps) > 1:
        raise CacheError("source and target come from different caches (fingerprints "
                         f"{', '.join(sorted(fps))}): their rows are not aligned; harvest both sites into one cache")
    return out


class ShuffledReader:
    """Iterate over shuffled batches: ``{array name: tensor [batch_size, width]}`` on ``device``.

    ``dtype`` is the consumer's choice (default: the storage dtype); rows travel to the device in the
    storage dtype and are cast there. Several consumers (models) can share every batch.
    """

    def __init__(self, arrays: Sequence[str | tuple[str | Cache, str]], cache: str | Cache | None = None,
                 config: ReaderConfig | None = None, *, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 state: dict[str, Any] | None = None) -> None:
        self.cfg = config or ReaderConfig()
        self.cfg.validate()
        if not 0 <= rank < world_size:
            raise CacheError(f"rank: {rank} is not in 0..{world_size - 1}")
        self.sources = open_arrays(arrays, cache)
        self.names = [n for _, n in self.sources]
        self.cache = self.sources[0][0]
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.storage_dtype = self.cache.storage_dtype
        self.dtype = dtype or STORAGE[self.storage_dtype][1]
        self.widths = [c.manifest["arrays"][n]["width"] for c, n in self.sources]
        self.chunks = self.cache.split_chunks(self.cfg.split)
        self.bos_id = self.cache.manifest["bos"]["token_id"] if self.cfg.exclude_bos else None
        self.split_tokens = self._split_tokens()
        if self.cfg.batch_size > self.split_tokens:
            raise CacheError(f"batch_size: {self.cfg.batch_size} is larger than the {self.cfg.split} split "
                             f"({self.split_tokens} tokens{' without BOS' if self.bos_id is not None else ''})")
        if len(self.chunks) < world_size:
            raise CacheError(f"world_size: {world_size} ranks but the {self.cfg.split} split has only "
                             f"{len(self.chunks)} chunks")
        cap = self.cfg.buffer_tokens + self.cache.chunk_tokens
        pin = self.device.type == "cuda"
        st = STORAGE[self.storage_dtype][1]
        self._buf = [torch.empty((cap, w), dtype=st, pin_memory=pin) for w in self.widths]
        self._batch_bufs = [[torch.empty((self.cfg.batch_size, w), dtype=st, pin_memory=True) for w in self.widths]
                            for _ in range(2)] if pin else [[], []]
        self._events: list[torch.cuda.Event | None] = [None, None]
        self._pool = ThreadPoolExecutor(self.cfg.threads or None, thread_name_prefix="cache-read")
        self.last_rows = np.empty(0, np.int64)
        """Cache row ids of the last batch served: with the ``tokens`` array they give each row's context."""
        self._reset_epoch(0)
        if state is not None:
            self.load_state_dict(state)

    # -- sizes -------------------------------------------------------------------------------------
    def _split_tokens(self) -> int:
        a, b = self.cache.split[self.cfg.split]
        n = b - a
        if self.bos_id is None:
            return n
        policy = self.cache.manifest["bos"]["policy"]
        if policy == "context":  # BOS only at position 0 of every context
            return n - n // self.cache.manifest["context_size"]
        return int((self.cache.tokens[a:b] != self.bos_id).sum())

    # -- epoch plan ----------------------------------------------------------------------------------
    def _chunk_order(self, epoch: int) -> list[int]:
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(np.asarray(self.chunks))
        return [int(c) for c in order[self.rank::self.world_size]]

    def _reset_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._order = self._chunk_order(epoch)
        self._next_chunk = 0  # chunks of this epoch poured into the buffer
        self._rng = np.random.default_rng([self.cfg.seed, epoch, self.rank, 1])
        self._pool_rows = np.empty(0, np.int64)  # row ids waiting in the buffer, in serving order
        self._pool_slots = np.empty(0, np.int64)
        self._free = list(range(self._buf[0].shape[0]))[::-1]
        self._ready: list[int] = []  # sizes of the next batches: consecutive slices from the pool's front
        self._inflight: dict[int, Future] = {}
        self.batches_this_epoch = 0

    # -- loading -------------------------------------------------------------------------------------
    def _load(self, chunk: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Row ids and data of one chunk (only ``rows`` if given), BOS rows dropped. Runs in a thread."""
        r = self.cache.chunk_rows(chunk)
        if rows is not None:
            ids = rows
        else:
            ids = np.arange(r.start, r.stop, dtype=np.int64)
            if self.bos_id is not None:
                ids = ids[self.cache.tokens[r.start:r.stop] != self.bos_id]
        data = []
        for c, n in self.sources:
            a = c.array(n)[r.start:r.stop]
            data.append(a[ids - r.start] if len(ids) != len(r) else a)
        return ids, data

    def _prefetch(self) -> None:
        stop = min(self._next_chunk + self.cfg.prefetch_chunks, len(self._order))
        for i in range(self._next_chunk, stop):
            if i not in self._inflight:
                self._inflight[i] = self._pool.submit(self._load, self._order[i])

    def _pour(self, ids: np.ndarray, data: list[np.ndarray]) -> None:
        n = len(ids)
        slots = np.asarray([self._free.pop() for _ in range(n)], dtype=np.int64)
        idx = torch.from_numpy(slots)
        for buf, a in zip(self._buf, data):
            buf.index_copy_(0, idx, to_torch(np.ascontiguousarray(a), self.storage_dtype))
        self._pool_rows = np.concatenate([self._pool_rows, ids])
        self._pool_slots = np.concatenate([self._pool_slots, slots])

    def _shuffle_pool(self, keep: int) -> None:
        """Permute the buffer and queue its front for serving, leaving ``keep`` rows (whole batches only)."""
        perm = self._rng.permutation(len(self._pool_rows))
        self._pool_rows, self._pool_slots = self._pool_rows[perm], self._pool_slots[perm]
        serve = len(self._pool_rows) - keep
        b = self.cfg.batch_size
        full = serve // b * b if keep else serve
        self._ready = [min(b, full - i) for i in range(0, full, b)]

    def _fill(self) -> bool:
        """Pour chunks until batches are ready; False at the end of the epoch."""
        while not self._ready:
            if self._next_chunk < len(self._order):
                self._prefetch()
                ids, data = self._inflight.pop(self._next_chunk).result()
                self._next_chunk += 1
                self._pour(ids, data)
                if len(self._pool_rows) >= self.cfg.buffer_tokens:
                    self._shuffle_pool(keep=self.cfg.buffer_tokens // 2)
            elif len(self._pool_rows):
                self._shuffle_pool(keep=0)
                if self.cfg.drop_last and self._ready[-1] < self.cfg.batch_size:
                    n = self._ready.pop()  # the short tail batch: dropped
                    self._free.extend(self._pool_slots[-n:][::-1].tolist())
                    self._pool_rows, self._pool_slots = self._pool_rows[:-n], self._pool_slots[:-n]
                if not self._ready:
                    return False
            else:
                return False
        return True

    def _take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Remove the pool's first ``n`` rows and return their row ids and buffer slots."""
        rows, slots = self._pool_rows[:n], self._pool_slots[:n]
        self._pool_rows, self._pool_slots = self._pool_rows[n:], self._pool_slots[n:]
        self._free.extend(slots[::-1].tolist())
        return rows, slots

    # -- iteration -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        """The next batch; epochs follow one another for as long as the consumer asks."""
        if not self._fill():
            self._reset_epoch(self.epoch + 1)
            if not self._fill():
                raise CacheError(f"the {self.cfg.split} split of {self.cache.path!r} gives rank {self.rank} no rows")
        return self._serve(self._ready.pop(0))

    def _serve(self, n: int) -> dict[str, torch.Tensor]:
        rows, slots = self._take(n)
        self.last_rows = rows
        k = self.batches_this_epoch % 2
        self.batches_this_epoch += 1
        if self._events[k] is not None:
            self._events[k].synchronize()  # the copy that last used this pinned batch buffer is done
        idx = torch.from_numpy(slots)
        out = {}
        for j, (name, buf) in enumerate(zip(self.names, self._buf)):
            if self.device.type == "cpu":
                out[name] = torch.index_select(buf, 0, idx).to(self.dtype)
                continue
            d = self._batch_bufs[k][j][: len(slots)]
            torch.index_select(buf, 0, idx, out=d)
            out[name] = d.to(self.device, non_blocking=True).to(self.dtype)
        if self.device.type == "cuda":
            self._events[k] = torch.cuda.Event()
            self._events[k].record()
        return out

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank serves per epoch (all epochs are the same size)."""
        n = sum(self._chunk_tokens(c) for c in self._chunk_order(0))
        return n // self.cfg.batch_size if self.cfg.drop_last else -(-n // self.cfg.batch_size)

    def _chunk_tokens(self, chunk: int) -> int:
        r = self.cache.chunk_rows(chunk)
        if self.bos_id is None:
            return len(r)
        if self.cache.manifest["bos"]["policy"] == "context":
            return len(r) - len(r) // self.cache.manifest["context_size"]
        return int((self.cache.tokens[r.start:r.stop] != self.bos_id).sum())

    # -- cursor --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The cursor: enough to continue this exact stream in a new process."""
        return {
            "fingerprint": self.cache.fingerprint, "arrays": list(self.names), "split": self.cfg.split,
            "seed": self.cfg.seed, "rank": self.rank, "world_size": self.world_size,
            "epoch": self.epoch, "next_chunk": self._next_chunk, "batches_this_epoch": self.batches_this_epoch,
            "pool_rows": self._pool_rows.copy(), "ready": list(self._ready),
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = {"fingerprint": self.cache.fingerprint, "arrays": list(self.names), "split": self.cfg.split,
                "seed": self.cfg.seed, "rank": self.rank, "world_size": self.world_size}
        for k, v in mine.items():
            if state[k] != v:
                raise CacheError(f"reader cursor: saved {k} {state[k]!r} differs from this reader's {v!r}")
        self._reset_epoch(int(state["epoch"]))
        self._next_chunk = int(state["next_chunk"])
        self.batches_this_epoch = int(state["batches_this_epoch"])
        self._rng.bit_generator.state = state["rng"]
        rows = np.asarray(state["pool_rows"], dtype=np.int64)
        ct = self.cache.chunk_tokens
        # Reload the waiting rows chunk by chunk, then restore their serving order.
        chunks = rows // ct
        futures = [(c, self._pool.submit(self._load, int(c), np.sort(rows[chunks == c]))) for c in np.unique(chunks)]
        for _, f in futures:
            self._pour(*f.result())
        order = {r: i for i, r in enumerate(self._pool_rows.tolist())}
        perm = np.asarray([order[r] for r in rows.tolist()], dtype=np.int64)
        self._pool_rows, self._pool_slots = self._pool_rows[perm], self._pool_slots[perm]
        self._ready = [int(n) for n in state["ready"]]

    def close(self) -> None:
        for f in self._inflight.values():
            f.cancel()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "ShuffledReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
