"""The shuffled reader: batches of activation rows (or row-aligned source/target pairs) from a cache.

How it shuffles. Each epoch takes the split's chunks in a random order (the same order on every rank;
rank ``r`` of ``w`` takes every ``w``-th chunk, so ranks are disjoint and together cover the split).
Consecutive chunks of that order form *blocks*: the fewest that hold at most ``buffer_tokens / 2`` rows,
as equal in size as can be (a short last block would mix few chunks, and its quick decode would leave the
decoders idle while the previous block is served, then the consumer waiting for the next). A block's chunks
are read sequentially and decompressed by background threads straight into one half of the buffer;
its rows (BOS rows dropped) are permuted and served as batches while the next block decompresses into
the other half. A batch that straddles two blocks takes the old block's last rows first. So every row
of the split is served exactly once per epoch, each epoch in a new order, and a batch is a uniform
sample of one block: up to ``buffer_tokens / 2`` rows from up to ``buffer_tokens / (2 * chunk_tokens)``
chunks (at least half as many, whatever the split's size). The order and the blocks, and the checks
that the settings can serve them, are :mod:`matryoshka.cache.plan`'s; this module serves them.

Memory is the buffer (``buffer_tokens`` rows in two halves) and, on the CPU, four batches (see
:attr:`ShuffledReader.host_bytes`), whatever the size of the cache: a chunk is decompressed in place,
never copied into the buffer. On the CPU the decode threads also gather the next batches, ahead of
any decompression waiting in their queue, so whichever job there is keeps every core busy. On a GPU
the buffer is pinned and mirrored on the device (``buffer_tokens`` rows there too): each block crosses
to the device once, in one asynchronous copy, and batches are gathered on the device, so the host's
cores only decompress. A host half is then free as soon as its copy lands, so the next two blocks
decompress back to back while one is served: no decode thread waits at a block boundary. Every block
must hold a batch (checked at start; an epoch of one block excepted), or a batch would need rows of
three blocks.
From object storage, an I/O thread fetches the next block's chunks in one concurrent request (plus
that block's compressed bytes in memory) while the current block is served: the read-ahead that keeps
a remote cache near local speed.

Resume. :meth:`ShuffledReader.state_dict` is the cursor: epoch, blocks begun, the row ids waiting to
be served in their order, and the RNG state. A reader given that cursor decompresses the chunks of
those rows back into their places and continues the stream where it stopped, bit for bit.
"""
from __future__ import annotations

import mmap
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np
import torch

from ..cpus import usable_cpus
from .format import (
    STORAGE,
    bos_rows,
    decode,
    decode_chunk,
    from_storage,
    numpy_view,
    row_bytes,
    row_width,
    to_torch,
    token_codec,
)
from .plan import ReaderConfig, ReadPlan, bos_to_exclude, check_rank
from .retry import StoreUnavailable
from .store import Cache, CacheError
from .unreadable import unreadable_chunk
from .workers import URGENT, PriorityPool, Task

PREPARED = 2
"""Batches the CPU path has its workers gather ahead of the consumer."""


def default_threads(cores: int | None = None) -> int:
    """Decompression threads for ``cores`` CPU cores (default: those this process may use, see
    :mod:`matryoshka.cpus`): all but a quarter, left to the serving thread (and CUDA's), which must get
    the GIL back quickly; docs/benchmarks.md ("Reader") compares thread counts on a 16-core GPU host.
    On 2 cores this is both."""
    n = cores or usable_cpus()
    return n - n // 4


def host_buffer(shape: tuple[int, int], dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    """A zeroed host buffer, its pages touched once here rather than on the first epoch's writes.
    Unpinned, it is backed by transparent huge pages where the OS offers them (Linux): batches gather
    rows at random from the whole buffer, and with 4 KiB pages nearly every row is a TLB miss. Pinned
    buffers come from CUDA's allocator. Hand-written because it pays: docs/benchmarks.md, "Reader"."""
    if pinned or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, dtype=dtype, pin_memory=pinned)
    nbytes = shape[0] * shape[1] * torch.empty(0, dtype=dtype).element_size()
    region = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    t = torch.frombuffer(region, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)
    t.zero_()
    return t


class RecycledArrays:
    """Output arrays handed out again once nothing refers to them. A fresh array per batch and array
    costs page faults: glibc gives freed memory above its trim threshold back to the OS, and a
    transcoder's two 6 MiB outputs cross it. An array is reused only when its reference count shows
    that no tensor, view or numpy array made from it is alive, so a consumer may keep batches as long as
    it likes: those it keeps are never written again. Hand-written because it pays: docs/benchmarks.md,
    "Reader"."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep  # arrays kept per shape and dtype: a batch being consumed and the next one
        self._pools: dict[tuple, list[np.ndarray]] = {}
        self._unused_refs = self._refs([np.empty(0)], 0)  # this interpreter's count for an unused array

    @staticmethod
    def _refs(pool: list[np.ndarray], i: int) -> int:
        return sys.getrefcount(pool[i])

    def get(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        pool = self._pools.setdefault((shape, np.dtype(dtype)), [])
        for i in range(len(pool)):
            if self._refs(pool, i) <= self._unused_refs:
                return pool[i]
        a = np.empty(shape, dtype)
        if len(pool) < self.keep:
            pool.append(a)
        return a


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
                 state: dict[str, Any] | None = None, mirror: bool | None = None) -> None:
        """``mirror``: copy each decompressed block to a buffer on ``device`` and gather batches there
        (default, and required, off the CPU). The host half is then free as soon as its copy lands, so
        two blocks decompress back to back; on the CPU it is off (the copy would cost more than it
        frees) but runs the same schedule, which is how the tests check it without a GPU."""
        self.cfg = config or ReaderConfig()
        self.cfg.validate()
        check_rank(rank, world_size)
        self.sources = open_arrays(arrays, cache)
        self.names = [n for _, n in self.sources]
        self.cache = self.sources[0][0]
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        m = self.cache.manifest
        self.storage_dtype = self.cache.storage_dtype
        self.codec = m["storage"]["codec"]
        # float8 rows are scaled values, useless without their scale: served dequantized, bf16 by default
        self.dtype = dtype or (torch.bfloat16 if self.storage_dtype == "float8" else STORAGE[self.storage_dtype][1])
        self.widths = [c.manifest["arrays"][n]["width"] for c, n in self.sources]
        self.ctx = m["context_size"]
        self.ct = self.cache.chunk_tokens
        # the BOS rows to leave out (format.bos_rows); under the context policy they are found by position
        # alone, without reading the tokens
        self.bos = bos_to_exclude(m, self.cfg.exclude_bos)
        self.bos_by_position = self.bos is not None and self.bos["policy"] == "context"
        self.plan = ReadPlan.make(self.cache, self.cfg, rank, world_size, self.bos)
        """The split's chunks and the epochs' order and blocks (:class:`~matryoshka.cache.plan.ReadPlan`)."""
        self.half = self.plan.half
        self.mirror = self._mirrored(mirror)
        # training's case, float32 from a narrower storage dtype: the workers widen the rows as they gather
        self.widened = self.dtype == torch.float32 and self.storage_dtype != "float32"
        self._allocate()
        self._pool = PriorityPool(self.cfg.threads or default_threads(), "cache-read")
        self._ready: deque[tuple[np.ndarray, list[Task], list[np.ndarray]]] = deque()
        """CPU path: batches being gathered, in serving order (row ids, gathers, output arrays)."""
        self._reading: list[list[Future]] = [[], []]  # CPU path: gathers that read each half
        remote = any(c.remote for c, _ in self.sources)
        self._io = ThreadPoolExecutor(1, thread_name_prefix="cache-fetch") if remote else None
        # Blocks being decompressed, oldest first: (epoch, block, decodes); two at most, one per half.
        self._loads: deque[tuple[int, int, list[Task]]] = deque()
        self.epoch = -1
        self.last_rows = np.empty(0, np.int64)
        """Cache row ids of the last batch served: with the ``tokens`` array they give each row's context."""
        self.waited = {"decode": 0.0, "gather": 0.0, "upload": 0.0}
        """Seconds the consumer's thread has waited for blocks to decompress, (on the CPU) for workers
        to gather a batch and (with a mirror) for a half's copy to the device: what is left of its time
        in ``next`` is serving work."""
        self.closed = False
        self.failed: str | None = None
        """The error that stopped the stream, if one did (see :meth:`__next__`)."""
        self._reset_epoch(0)
        if state is not None:
            self.load_state_dict(state)

    def _mirrored(self, mirror: bool | None) -> bool:
        """Whether batches are gathered in a mirror of the buffer on the device: the default off the CPU,
        and the only way there."""
        mirrored = self.device.type != "cpu" if mirror is None else mirror
        if not mirrored and self.device.type != "cpu":
            raise CacheError(f"mirror: False needs device cpu, not {self.device}: batches for a device are "
                             "gathered in its mirror of the buffer")
        return mirrored

    def _allocate(self) -> None:
        """The buffer (two halves, in the storage dtype), its device mirror and what carries batches out."""
        cuda = self.device.type == "cuda"
        st = torch.uint8 if self.storage_dtype == "float8" else STORAGE[self.storage_dtype][1]
        stored = [row_width(w, self.storage_dtype) for w in self.widths]
        self._buf = [host_buffer((2 * self.half, w), st, pinned=cuda) for w in stored]
        self._np = [numpy_view(b) for b in self._buf]
        # With a mirror, each block is copied to the device once and batches are gathered there: the host
        # does no per-batch copy at all, so its cores are left to decompression.
        self._dev = [torch.empty((2 * self.half, w), dtype=st, device=self.device) for w in stored] \
            if self.mirror else []
        self._uploaded: list[torch.cuda.Event | None] = [None, None]  # a half's host->device copy is done
        # each half's serving order travels from its own pinned buffer (allocating pinned memory per block
        # cost the serving thread milliseconds)
        self._order_pinned = [torch.empty(self.half, dtype=torch.int64, pin_memory=True) for _ in range(2)] \
            if self.mirror and cuda else []
        # the CPU path's batches: the consumer's, the one it may still hold and those being gathered
        self._outputs = RecycledArrays(keep=(PREPARED + 2) * len(self.sources))

    # -- sizes ---------------------------------------------------------------------------------------
    @property
    def host_bytes(self) -> int:
        """Host memory of the reader's buffers: the buffer's two halves and, on the CPU, the batch arrays
        (``PREPARED`` being gathered, the one served and one the consumer may still hold; with their
        stored rows when widened to float32). Compressed chunks being read come on top."""
        buffer = sum(b.numel() * b.element_size() for b in self._buf)
        if self.mirror:  # batches live on the device, and so does the mirror unless the device is the CPU
            return buffer + (sum(d.numel() * d.element_size() for d in self._dev) if self.device.type == "cpu" else 0)
        row = sum(row_bytes(w, self.storage_dtype) + (4 * w if self.widened else 0) for w in self.widths)
        return buffer + (PREPARED + 2) * self.cfg.batch_size * row

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank serves in the current epoch (see :meth:`batches_in_epoch`)."""
        return self._epoch_batches

    def batches_in_epoch(self, epoch: int) -> int:
        """Batches this rank serves in ``epoch``. One rank: every epoch alike. Several: a rank's rows change
        from epoch to epoch (its chunks do), and with ``drop_last`` every rank serves the same number, the
        most the rank with the fewest rows can fill, so the ranks' streams stay in the same epoch step by
        step and a global batch (one batch of each rank) never holds a row twice."""
        return self.plan.batches_in_epoch(epoch)

    # -- the epoch's state ---------------------------------------------------------------------------
    def _reset_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._order = self.plan.chunk_order(epoch)
        self._next_block = 0  # blocks whose rows have joined the pool
        self._rng = np.random.default_rng([self.cfg.seed, epoch, self.rank, 1])
        self._pool_rows = np.empty(0, np.int64)  # row ids waiting to be served, in serving order
        self._pool_slots = np.empty(0, np.int64)  # their rows in the buffer
        # [half, rows waiting, (with a mirror) the slots of its rows in serving order on the device, the
        # waiting ones last] of each block in the pool, oldest first
        self._pool_parts: list[list[Any]] = []
        self.batches_this_epoch = 0
        self._taken = 0  # batches taken off the pool this epoch: served, or being gathered
        self._epoch_batches = self.batches_in_epoch(epoch)
        if self.cfg.drop_last and not self._epoch_batches:
            raise CacheError(f"batch_size: {self.cfg.batch_size} rows is more than one of the {self.world_size} "
                             f"ranks holds in epoch {epoch} of the {self.cfg.split} split; use fewer ranks, a "
                             "smaller batch or a larger split")

    def _next_epoch(self) -> None:
        """Start the next epoch, dropping this one's blocks still loading: with ``drop_last`` an epoch can end
        before its last blocks are needed (its rank's batch count is reached)."""
        stale = [t for e, _, ts in self._loads if e == self.epoch for t in ts]
        for t in stale:
            t.cancel()
        wait([t.future for t in stale])  # begun ones finish writing their half first
        self._loads = deque(load for load in self._loads if load[0] != self.epoch)
        self._reset_epoch(self.epoch + 1)

    # -- decompression (background threads) ----------------------------------------------------------
    def _fetch(self, chunks: list[int]) -> dict[tuple[int, int], bytes]:
        """A block's stored chunks of every array, one concurrent request per cache: object storage
        answers many requests at once far faster than one after another."""
        out: dict[tuple[int, int], bytes] = {}
        by_cache: dict[int, tuple[Cache, list[tuple[int, str]]]] = {}
        for j, (c, name) in enumerate(self.sources):
            by_cache.setdefault(id(c), (c, []))[1].append((j, name))
        for c, items in by_cache.values():
            got = c.chunk_bytes_many([(name, ch) for _, name in items for ch in chunks])
            out.update({(j, ch): got[(name, ch)] for j, name in items for ch in chunks})
        return out

    def _decode(self, chunk: int, base: int, fetched: Future | None = None,
                after: Sequence[Future] = ()) -> tuple[np.ndarray, np.ndarray]:
        """Decompress a chunk into buffer rows ``base ..``; return its served row ids and their slots.
        ``fetched``: the block's bytes being fetched from object storage (else each chunk is read here).
        ``after``: gathers still reading the half, which must finish first."""
        wait(after)
        r = self.cache.chunk_rows(chunk)
        ids = np.arange(r.start, r.stop, dtype=np.int64)
        if self.bos is not None:
            tokens = None if self.bos_by_position else decode_chunk(
                self.cache.chunk_bytes("tokens", chunk), token_codec(self.codec), np.empty(self.ct, np.int32))[: len(r)]
            ids = ids[~bos_rows(self.bos, ids % self.ctx, tokens)]
        for j, ((c, name), out) in enumerate(zip(self.sources, self._np)):
            try:
                raw = fetched.result()[(j, chunk)] if fetched is not None else c.chunk_bytes(name, chunk)
                decode_chunk(raw, self.codec, out[base:base + self.ct])
            except StoreUnavailable as e:
                raise CacheError(f"cache: chunk {chunk} of {name} in {c.path!r} could not be read: {e}") from None
            except (OSError, ValueError) as e:  # damage, a deleted cache or a permission problem
                raise unreadable_chunk(c.path, chunk, name, e) from None
        return ids, ids - r.start + base

    def _next_to_load(self) -> tuple[int, int]:
        """(epoch, block) of the first block not yet being decompressed: after the last one in flight,
        or else the next to join the pool (an epoch's last block is followed by the next epoch's first)."""
        e, b = (self._loads[-1][0], self._loads[-1][1] + 1) if self._loads else (self.epoch, self._next_block)
        return (e + 1, 0) if b >= self.plan.n_blocks else (e, b)

    def _half_in_use(self, half: int) -> bool:
        """Whether rows waiting to be served live in this half (of the device mirror, if there is one)."""
        return any(h == half and n for h, n, _ in self._pool_parts)

    def _start_loading(self) -> None:
        """Begin decompressing the next blocks, two at most in flight, each into its host half once that
        half is free (:meth:`_free_half`)."""
        while len(self._loads) < 2:
            epoch, block = self._next_to_load()
            half = self.plan.half_of(epoch, block)
            after = self._free_half(half)
            if after is None:
                return
            self._loads.append((epoch, block, self._submit_decodes(epoch, block, half, after)))

    def _free_half(self, half: int) -> list[Future] | None:
        """Make a host half ready for the next block, or None if it is not free yet. With a mirror, it is
        free once its last block has reached the device (waited for here). Without one, once none of its
        rows wait to be served; those being gathered may still be read, and the gathers reading them are
        returned for the decodes to wait for."""
        if self.mirror:
            if self._uploaded[half] is not None:
                self._wait_upload(half)
            return []
        if self._half_in_use(half):
            return None
        after, self._reading[half] = [f for f in self._reading[half] if not f.done()], []
        return after

    def _submit_decodes(self, epoch: int, block: int, half: int, after: list[Future]) -> list[Task]:
        """Queue the decompression of a block's chunks into ``half``, one task per chunk, after ``after``.
        From object storage the I/O thread fetches the block's chunks in one request; else (or where every
        chunk is on local disk) each decode thread reads its own chunk."""
        order = self._order if epoch == self.epoch else self.plan.chunk_order(epoch)
        chunks = self.plan.block_chunks(order, block)
        remote = self._io is not None and not all(c.is_local([(n, ch) for ch in chunks]) for c, n in self.sources)
        fetched = self._io.submit(self._fetch, chunks) if remote else None
        base = half * self.half
        return [self._pool.submit(self._decode, c, base + j * self.ct, fetched, after) for j, c in enumerate(chunks)]

    def _add_block(self) -> bool:
        """Append the next block, permuted, to the pool; False when the epoch has no more blocks."""
        if self._next_block >= self.plan.n_blocks:
            return False
        self._start_loading()
        epoch, block, futures = self._loads.popleft()
        assert (epoch, block) == (self.epoch, self._next_block), "blocks join the pool in the order they load"
        t0 = time.perf_counter()
        parts = [t.future.result() for t in futures]
        self.waited["decode"] += time.perf_counter() - t0
        # Permuting the slots shuffles them with the very swaps `permutation(len)` draws, and a row's id is
        # its slot plus its chunk's offset: one shuffle and no gathers (it was half the serving thread's
        # time at a block boundary).
        half = self.plan.half_of(epoch, block)
        slots = self._rng.permutation(np.concatenate([p[1] for p in parts]))
        chunks = self.plan.block_chunks(self._order, block)
        base = half * self.half
        offsets = np.array([self.cache.chunk_rows(c).start - base - j * self.ct for j, c in enumerate(chunks)])
        self._pool_parts.append([half, len(slots), self._upload(half, slots)])
        self._pool_rows = np.concatenate([self._pool_rows, slots + offsets[(slots - base) // self.ct]])
        self._pool_slots = np.concatenate([self._pool_slots, slots])
        self._next_block += 1
        self._start_loading()  # with a mirror, the half just copied can take the block after next
        return True

    def _wait_upload(self, half: int) -> None:
        t0 = time.perf_counter()
        self._uploaded[half].synchronize()
        self.waited["upload"] += time.perf_counter() - t0

    def _upload(self, half: int, slots: np.ndarray) -> torch.Tensor | None:
        """Copy a decompressed half of the host buffer to its mirror, and the slots of its waiting rows in
        serving order, asynchronously from pinned memory; return those slots on the device. Sending a
        block's order once, not each batch's indices, leaves the serving thread one gather per batch and
        array: each CUDA call it makes hands the GIL to the decode threads and waits to get it back."""
        if not self.mirror:
            return None
        assert not self._half_in_use(half), "a block is copied over a half only once all its rows are served"
        rows = slice(half * self.half, (half + 1) * self.half)
        if self.device.type != "cuda":
            for host, dev in zip(self._buf, self._dev):
                dev[rows].copy_(host[rows])
            return torch.from_numpy(slots).to(self.device)
        if self._uploaded[half] is not None:
            self._wait_upload(half)  # the half's last copy has left its pinned order buffer
        order = self._order_pinned[half][:len(slots)]
        order.numpy()[:] = slots
        for host, dev in zip(self._buf, self._dev):
            dev[rows].copy_(host[rows], non_blocking=True)
        order = order.to(self.device, non_blocking=True)
        self._uploaded[half] = torch.cuda.Event()
        self._uploaded[half].record()
        return order

    # -- iteration -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        """The next batch; epochs follow one another for as long as the consumer asks. After an error (an
        unreadable chunk) the reader's place in the stream is lost: it refuses to go on, and a new reader
        given an earlier cursor (a checkpoint's) continues the stream."""
        if self.closed:
            raise CacheError("reader: it is closed; a new one given its state_dict() continues the stream")
        if self.failed is not None:
            raise CacheError(f"reader: it stopped at an error ({self.failed}); a new reader given an earlier "
                             "state_dict() continues the stream")
        try:
            return self._next()
        except BaseException as e:
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            raise

    def _next(self) -> dict[str, torch.Tensor]:
        if not self.mirror:
            return self._next_gathered()
        n = self._batch_rows()
        if not n:
            self._next_epoch()
            return next(self)
        self.last_rows, _, index, _ = self._take(n)
        self.batches_this_epoch += 1
        self._start_loading()  # the next block decompresses while this batch is consumed
        device_slots = index[0] if len(index) == 1 else torch.cat(index)  # two parts once per block
        return {name: from_storage(dev.index_select(0, device_slots), self.storage_dtype, self.dtype)
                for name, dev in zip(self.names, self._dev)}

    def _batch_rows(self, wait_for_decode: bool = True) -> int | None:
        """Rows of this epoch's next batch, blocks joining the pool as it needs them; 0 at the epoch's end.
        None if the batch needs a block still decompressing and ``wait_for_decode`` is False."""
        b = self.cfg.batch_size
        if self.cfg.drop_last and self._taken >= self._epoch_batches:  # the rows left wait for no batch
            return 0
        while len(self._pool_rows) < b and self._next_block < self.plan.n_blocks:
            self._start_loading()
            if not wait_for_decode and not all(t.future.done() for t in self._loads[0][2]):
                return None
            self._add_block()
        n = min(b, len(self._pool_rows))
        return 0 if n < b and self.cfg.drop_last else n

    def _take(self, n: int) -> tuple[np.ndarray, np.ndarray, list[torch.Tensor], set[int]]:
        """Take the next ``n`` rows off the pool: their ids, their slots in the host buffer, (with a mirror)
        their slots on the device, and the halves they are in."""
        rows, slots = self._pool_rows[:n], self._pool_slots[:n]
        self._pool_rows, self._pool_slots = self._pool_rows[n:], self._pool_slots[n:]
        self._taken += 1
        left, index, halves = n, [], set()
        while left:
            part = self._pool_parts[0]
            take = min(left, part[1])
            halves.add(part[0])
            if self.mirror:
                index.append(part[2].narrow(0, len(part[2]) - part[1], take))
            part[1] -= take
            left -= take
            if not part[1]:
                self._pool_parts.pop(0)
        return rows, slots, index, halves

    # -- the CPU path: workers gather the next batches -----------------------------------------------
    def _next_gathered(self) -> dict[str, torch.Tensor]:
        """Serve the oldest batch being gathered (gathering it here if no worker has begun), after queueing
        more. On two cores, the consumer's thread gathering every batch alone left the decoders idle
        whenever they were ahead; the workers now share both jobs, so no core waits while there is work."""
        if not self._ready:
            self._prepare(wait_for_decode=True)
            if not self._ready:
                self._next_epoch()
                return next(self)
        rows, tasks, arrays = self._ready.popleft()
        self._prepare(wait_for_decode=False)
        self._start_loading()
        for t in tasks:
            if not t.run_here() and not t.future.done():  # a worker is on it
                t0 = time.perf_counter()
                wait([t.future])
                self.waited["gather"] += time.perf_counter() - t0
            t.future.result()  # an error in the gather is raised here
        self.last_rows = rows
        self.batches_this_epoch += 1
        if self.widened:
            return {name: torch.from_numpy(a) for name, a in zip(self.names, arrays)}
        return {name: from_storage(to_torch(a, self.storage_dtype), self.storage_dtype, self.dtype)
                for name, a in zip(self.names, arrays)}

    def _prepare(self, wait_for_decode: bool) -> None:
        """Queue the gathers of this epoch's next batches, up to ``PREPARED`` of them, for the workers
        (ahead of any decompression); without ``wait_for_decode``, stop at a block still decompressing."""
        b = self.cfg.batch_size
        while len(self._ready) < PREPARED:
            n = self._batch_rows(wait_for_decode)
            if not n:
                return
            rows, slots, _, halves = self._take(n)
            tasks, arrays = [], []
            for host, width in zip(self._np, self.widths):
                # an epoch's last, smaller batch is the head of a full one: one size of array is ever kept
                stored = self._outputs.get((b, host.shape[1]), host.dtype)[:n]
                wide = self._outputs.get((b, width), np.float32)[:n] if self.widened else None
                tasks.append(self._pool.submit(self._gather, host, slots, stored, wide, priority=URGENT))
                arrays.append(stored if wide is None else wide)
            for h in halves:
                self._reading[h] += [t.future for t in tasks]
            self._ready.append((rows, tasks, arrays))

    def _gather(self, host: np.ndarray, slots: np.ndarray, stored: np.ndarray, wide: np.ndarray | None) -> None:
        """A batch's rows of one array, in the storage dtype, and widened to float32 if ``wide`` is given:
        numpy on one worker (torch's would spread over OpenMP threads that compete with the decoders)."""
        np.take(host, slots, axis=0, out=stored, mode="wrap")  # slots are valid; "raise" would copy twice
        if wide is not None:
            decode(stored, self.storage_dtype, wide)

    # -- cursor --------------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return {"fingerprint": self.cache.fingerprint, "arrays": list(self.names), "split": self.cfg.split,
                "seed": self.cfg.seed, "rank": self.rank, "world_size": self.world_size,
                "buffer_tokens": self.cfg.buffer_tokens, "blocks": "even",
                "exclude_bos": self.cfg.exclude_bos}

    def state_dict(self) -> dict[str, Any]:
        """The cursor: enough to continue this exact stream in a new process (batches being gathered are
        rows still waiting)."""
        if self.failed is not None:
            raise CacheError(f"reader: it stopped at an error ({self.failed}); its cursor is lost, take an "
                             "earlier one")
        waiting = np.concatenate([rows for rows, _, _ in self._ready] + [self._pool_rows])
        return {**self._identity(), "epoch": self.epoch, "next_block": self._next_block,
                "batches_this_epoch": self.batches_this_epoch, "pool_rows": waiting,
                "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in self._identity().items():
            if state.get(k) != v:  # a cursor without "blocks" cut its epochs into full blocks and a short last one
                raise CacheError(f"reader cursor: saved {k} {state.get(k)!r} differs from this reader's {v!r}")
        self._cancel_loads()
        self.failed = None  # a consistent place in the stream again
        self._reset_epoch(int(state["epoch"]))
        self._next_block = int(state["next_block"])
        self.batches_this_epoch = self._taken = int(state["batches_this_epoch"])  # batches being gathered wait again
        self._rng.bit_generator.state = state["rng"]
        rows = np.asarray(state["pool_rows"], dtype=np.int64)
        # Decompress the chunks of the waiting rows back into the places an unbroken run had them in.
        where = self.plan.places(self._order)
        tasks = [self._pool.submit(self._decode, int(c), self.plan.half_of(self.epoch, where[int(c)][0]) * self.half
                                   + where[int(c)][1] * self.ct) for c in np.unique(rows // self.ct)]
        slot_of: dict[int, int] = {}
        for t in tasks:
            ids, slots = t.future.result()
            slot_of.update(zip(ids.tolist(), slots.tolist()))
        self._pool_rows = rows
        self._pool_slots = np.asarray([slot_of[r] for r in rows.tolist()], dtype=np.int64)
        halves = self._pool_slots // self.half
        cuts = [0, *(np.flatnonzero(np.diff(halves)) + 1).tolist(), len(rows)]
        for a, b in zip(cuts, cuts[1:]):
            if b > a:
                half = int(halves[a])
                self._pool_parts.append([half, b - a, self._upload(half, self._pool_slots[a:b])])

    def _cancel_loads(self) -> None:
        """Drop the blocks in flight and the batches being gathered (what has begun finishes first: it
        writes into the buffer or reads it)."""
        tasks = [t for _, _, ts in self._loads for t in ts] + [t for _, ts, _ in self._ready for t in ts]
        for t in tasks:
            t.cancel()
        wait([t.future for t in tasks])
        self._loads.clear()
        self._ready.clear()
        self._reading = [[], []]

    def settle(self) -> None:
        """Wait for the work done ahead of the consumer (blocks decompressing, batches being gathered, copies
        to the device): a benchmark times something else on the same cores only after this."""
        wait([t.future for _, _, ts in self._loads for t in ts] + [t.future for _, ts, _ in self._ready for t in ts])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Stop the threads and let go of the buffers. Batches already served stay valid, and so does the
        cursor: the rows of batches being gathered still count as waiting."""
        if self.closed:
            return
        ready = list(self._ready)
        self._cancel_loads()
        self._ready.extend(ready)  # their gathers are cancelled or done; state_dict reads only their rows
        self._pool.shutdown()
        if self._io is not None:
            self._io.shutdown(wait=True)
        self._buf, self._np, self._dev = [], [], []
        self.closed = True

    def __enter__(self) -> ShuffledReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
