"""What a shuffled reader serves, worked out before it reads a row: the checks and the epochs' plan.

A reader's settings are checked here against the cache, each in one line that names the bad value and
what would do (exit status 2 at the CLI), so that a reader that starts can serve every epoch. The plan
they make is the reader's layout: the split's chunks and the rows each serves, which chunks each rank
reads in each epoch and in which order, the blocks they are cut into (one half of the buffer each) and
how many batches an epoch makes. How the reader decompresses and serves those blocks is
:mod:`matryoshka.cache.reader`'s business.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .format import bos_rows
from .store import Cache, CacheError


@dataclass
class ReaderConfig:
    """How a reader draws batches. Sizes are in tokens (rows)."""

    batch_size: int = 4096
    buffer_tokens: int = 2**18
    """Rows in memory: two blocks of half this size, one served while the next is decompressed."""
    threads: int = 0
    """Decompression threads; 0 means :func:`~matryoshka.cache.reader.default_threads` (three per four cores)."""
    seed: int = 0
    exclude_bos: bool = True
    split: str = "train"
    drop_last: bool = False
    """Drop the last, smaller batch of each epoch (False: every row exactly once per epoch)."""

    def validate(self) -> None:
        for name in ("batch_size", "buffer_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise CacheError(f"{name}: {v!r} must be a positive integer")
        if self.buffer_tokens < 2 * self.batch_size:
            raise CacheError(f"buffer_tokens: {self.buffer_tokens} is smaller than two batches of {self.batch_size}; "
                             "each half of the buffer must hold at least one batch (many batches mix far better)")


def check_rank(rank: int, world_size: int) -> None:
    """A rank is one of the team's (checked before any cache is opened)."""
    if not 0 <= rank < world_size:
        raise CacheError(f"rank: {rank} is not in 0..{world_size - 1}")


def bos_to_exclude(manifest: dict[str, Any], exclude_bos: bool) -> dict[str, Any] | None:
    """The cache's BOS description (``format.bos_rows``) if its BOS rows are to be left out, else None."""
    return manifest["bos"] if exclude_bos and manifest["bos"]["token_id"] is not None else None


def served_rows(cache: Cache, chunk: int, bos: dict[str, Any] | None) -> int:
    """Rows ``chunk`` serves, its BOS rows left out (under the context policy they are found by position
    alone, a chunk being whole contexts, without reading the tokens)."""
    r = cache.chunk_rows(chunk)
    if bos is None:
        return len(r)
    ctx = cache.manifest["context_size"]
    if bos["policy"] == "context":
        return len(r) - len(r) // ctx
    ids = np.arange(r.start, r.stop)
    return int((~bos_rows(bos, ids % ctx, cache.tokens[r.start:r.stop])).sum())


def block_bounds(n_chunks: int, most: int) -> np.ndarray:
    """Where each block of an epoch's ``n_chunks`` chunks starts (and the last ends): the fewest blocks
    of at most ``most`` chunks, their sizes differing by one at most."""
    n_blocks = -(-n_chunks // most)
    return np.arange(n_blocks + 1) * n_chunks // n_blocks


@dataclass(frozen=True, eq=False)
class ReadPlan:
    """One rank's epochs: each epoch takes the split's chunks in a random order (the same on every rank),
    rank ``r`` of ``w`` every ``w``-th of them from the ``r``-th, cut into blocks of at most
    ``chunks_per_block`` chunks (:func:`block_bounds`) that alternate between the buffer's halves. Make
    one with :meth:`make`, which checks that the settings can serve it."""

    cfg: ReaderConfig
    rank: int
    world_size: int
    chunk_tokens: int
    counts: dict[int, int]
    """Rows each chunk of the split serves (BOS rows excluded), in the split's order."""
    chunks_per_block: int
    """The most chunks a block holds (its half of the buffer holds that many)."""
    bounds: np.ndarray
    """Where each block of an epoch starts in the rank's order of chunks (every epoch alike: ranks keep
    their number of chunks)."""

    @classmethod
    def make(cls, cache: Cache, cfg: ReaderConfig, rank: int, world_size: int,
             bos: dict[str, Any] | None) -> ReadPlan:
        """The plan for ``cfg`` on ``cache``, or a :class:`CacheError` naming the setting that cannot work:
        a batch larger than the split, more ranks than chunks, a buffer of fewer than two chunks, blocks
        too small for a batch."""
        counts = {c: served_rows(cache, c, bos) for c in cache.split_chunks(cfg.split)}
        without_bos = " without BOS" if bos is not None else ""
        total, ct = sum(counts.values()), cache.chunk_tokens
        if cfg.batch_size > total:
            raise CacheError(f"batch_size: {cfg.batch_size} is larger than the {cfg.split} split "
                             f"({total} tokens{without_bos})")
        if len(counts) < world_size:
            raise CacheError(f"world_size: {world_size} ranks but the {cfg.split} split has only "
                             f"{len(counts)} chunks")
        if cfg.buffer_tokens < 2 * ct:  # else each half would silently hold a whole chunk anyway
            raise CacheError(f"buffer_tokens: {cfg.buffer_tokens} is less than two chunks of {ct} rows; "
                             f"each half of the buffer holds whole chunks: use buffer_tokens >= {2 * ct}")
        most = cfg.buffer_tokens // 2 // ct
        n_chunks = len(range(rank, len(counts), world_size))  # this rank's, in every epoch
        plan = cls(cfg, rank, world_size, ct, counts, most, block_bounds(n_chunks, most))
        plan._check_blocks_hold_a_batch(without_bos)
        return plan

    def _check_blocks_hold_a_batch(self, without_bos: str) -> None:
        """Every block must serve a whole batch (an epoch's only one excepted), or a batch would need rows
        of three blocks while the buffer holds two. Checked against the smallest chunks, whatever the order."""
        n, b = int(self.bounds[-1]), self.cfg.batch_size
        small = np.cumsum(sorted(self.counts.values()))

        def fewest(most: int) -> int:  # chunks in the smallest block, 0 if an epoch is one block
            bounds = block_bounds(n, most)
            return 0 if len(bounds) == 2 else int(np.diff(bounds).min())

        def enough(most: int) -> bool:
            return not fewest(most) or small[fewest(most) - 1] >= b
        if enough(self.chunks_per_block):
            return
        most = next(m for m in range(self.chunks_per_block + 1, n + 1) if enough(m))
        least = fewest(self.chunks_per_block)
        raise CacheError(f"buffer_tokens: {self.cfg.buffer_tokens} makes blocks of as few as {least} chunk(s) of "
                         f"{self.chunk_tokens} rows, which can serve as few as {small[least - 1]} rows{without_bos}, "
                         f"fewer than batch_size {b}; each half of the buffer must hold a batch: use "
                         f"buffer_tokens >= {2 * self.chunk_tokens * most}")

    @property
    def chunks(self) -> list[int]:
        """The split's chunks."""
        return list(self.counts)

    @property
    def split_tokens(self) -> int:
        """Rows the split serves, on all ranks together."""
        return sum(self.counts.values())

    @property
    def half(self) -> int:
        """Rows in one half of the buffer: a block's chunks, each in ``chunk_tokens`` rows."""
        return self.chunks_per_block * self.chunk_tokens

    @property
    def n_blocks(self) -> int:
        """Blocks per epoch."""
        return len(self.bounds) - 1

    def chunk_order(self, epoch: int, every_rank: bool = False) -> list[int]:
        """This rank's chunks of ``epoch`` in order (``every_rank``: the epoch's whole order, which rank ``r``
        takes every ``world_size``-th chunk of, from the ``r``-th)."""
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(np.asarray(self.chunks))
        return [int(c) for c in (order if every_rank else order[self.rank::self.world_size])]

    def block_chunks(self, order: list[int], block: int) -> list[int]:
        """The chunks of ``block`` in an epoch's ``order`` (:meth:`chunk_order`)."""
        return order[self.bounds[block]:self.bounds[block + 1]]

    def places(self, order: list[int]) -> dict[int, tuple[int, int]]:
        """Each chunk of an epoch's ``order``: (its block, its place in the block)."""
        block_of = np.searchsorted(self.bounds, np.arange(len(order)), side="right") - 1
        return {c: (int(b), p - int(self.bounds[b])) for p, (c, b) in enumerate(zip(order, block_of))}

    def half_of(self, epoch: int, block: int) -> int:
        """Blocks alternate between the buffer's halves, across epoch boundaries too."""
        return (epoch * self.n_blocks + block) % 2

    def batches_in_epoch(self, epoch: int) -> int:
        """Batches this rank serves in ``epoch`` (see ``ShuffledReader.batches_in_epoch``)."""
        b, order = self.cfg.batch_size, self.chunk_order(epoch, every_rank=True)
        rows = [sum(self.counts[c] for c in order[r::self.world_size]) for r in range(self.world_size)]
        return min(rows) // b if self.cfg.drop_last else -(-rows[self.rank] // b)
