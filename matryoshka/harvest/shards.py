"""Multi-worker harvest: shard ``i`` of ``n`` writes one disjoint chunk range of one store.

Started as ``pipeline harvest --shard i/n`` on separate machines (same ``--cache``), or by
``torchrun --nproc-per-node n -m matryoshka.cli harvest ...`` (rank and world size from the
environment). The finished cache equals a single-process harvest of the same config: the same
manifest, tokens, order, held-out split and chunk bytes. Statistics are the only exception (below).

* **Partition.** The chunks are cut into units of ``lcm(seqs_per_chunk, batch_size)`` sequences, and
  shard ``i`` takes units ``[i*U//n, (i+1)*U//n)``. So every shard runs exactly the LM batches a single
  process runs over those sequences (batch composition can change float results), and its resume
  points are the single process's.
* **Tokens.** The document stream is sequential (a seeded shuffle, then packing), so every worker
  tokenizes it from the start and skips the contexts before its range: cheap next to the LM.
* **Progress.** Each shard keeps its own progress (committed chunks and running statistics sums) in the
  attributes of the zarr group ``shards/<i>`` (``shards`` records the count), so shards never rewrite the
  same object. ``cache info`` lists them. A killed shard resumes with ``--resume`` from its own commits.
* **Locks.** The cache's writer lock is held only briefly, to create or check the store and to finish
  it, so a single-process harvest and a sharded one exclude each other and shards never wait on one
  another while writing; each shard holds its own lock ``shards/<i>/.writer.lock`` while it writes.
* **Completion.** The last shard to finish completes the cache (under the cache lock): it adds the
  shards' statistics sums in chunk order and sets ``complete``. If that shard died first, running any
  shard again (``--resume``) completes it. Until then readers see an unfinished cache. Under torchrun
  every rank returns only once the cache is complete.
* **Statistics.** Float64 sums per shard, added in shard order: equal to a single process's sums
  (which adds chunk by chunk) up to float64 rounding (relative ~1e-15; tested at 1e-12).
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import torch
import zarr

from ..cache.lock import CacheLockedError, writer_lock
from ..cache.remote import is_url, join
from ..cache.store import CacheError
from ..cache.writer import CacheWriter, complete_attrs, create_arrays, merge_progress
from ..config import ConfigError, HarvestConfig, parse_shard
from ..cpus import usable_cpus
from .tokens import DatasetExhausted

LOCK_WAIT_S = 60.0


@dataclasses.dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1
    together: bool = False
    """Started together by torchrun: each worker returns only when the cache is complete, so what the
    command runs next (``pipeline run`` trains) finds it complete on every rank."""

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def worker_shard(cfg: HarvestConfig) -> Shard:
    """``--shard I/N``, else torchrun's RANK/WORLD_SIZE, else the whole cache."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.shard is not None:
        if world > 1:
            raise ConfigError(f"shard: --shard {cfg.shard} under torchrun (WORLD_SIZE {world}); the ranks already "
                              "split the harvest, drop --shard")
        return Shard(*parse_shard(cfg.shard))
    return Shard(int(os.environ.get("RANK", "0")), world, together=True) if world > 1 else Shard()


def chunk_range(manifest: dict, batch_seqs: int, shard: Shard) -> range:
    """The chunks shard ``shard`` writes: whole units of ``lcm(seqs_per_chunk, batch_size)`` sequences."""
    st = manifest["storage"]
    n_chunks = -(-manifest["n_tokens"] // st["chunk_tokens"])
    unit = CacheWriter.align(st["seqs_per_chunk"], batch_seqs)
    units = -(-n_chunks // unit)
    a, b = shard.index * units // shard.count, (shard.index + 1) * units // shard.count
    return range(min(a * unit, n_chunks), min(b * unit, n_chunks))


class _held:
    """The cache's writer lock, waited for (other shards hold it only for a moment)."""

    def __init__(self, path: str | Path) -> None:
        self.lock = writer_lock(path)

    def __enter__(self) -> None:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                self.lock.acquire()
                return
            except CacheLockedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        self.lock.release()


def _layout(group: zarr.Group, manifest: dict, batch_seqs: int, count: int) -> None:
    """Create every shard's record (all shards at once, by whichever shard creates the store)."""
    shards = group.create_group("shards", attributes={"count": count})
    for i in range(count):
        r = chunk_range(manifest, batch_seqs, Shard(i, count))
        shards.create_group(str(i), attributes={"chunks": [r.start, r.stop], "progress": {"chunks": r.start},
                                                "done": False})


def _open_record(path: str | Path, group: zarr.Group, shard: Shard) -> zarr.Group:
    try:
        count = group["shards"].attrs["count"]
    except KeyError:
        raise CacheError(f"cache: {str(path)!r} is an unsharded harvest; continue it without --shard "
                         "(or torchrun)") from None
    if count != shard.count:
        raise CacheError(f"shard: {str(path)!r} is being harvested in {count} shards, not {shard.count}; "
                         f"use --shard I/{count} (or torchrun --nproc-per-node {count})")
    return group[f"shards/{shard.index}"]


def _remove_partials(path: Path, chunks: range) -> None:
    """Half-written files (zarr's temporaries) a killed run of this shard left in its own chunks."""
    for stray in path.rglob("*.partial"):
        parts = stray.relative_to(path).parts
        if "c" in parts[:-1]:
            head = parts[parts.index("c") + 1].split(".")[0]
            if head.isdigit() and int(head) in chunks:
                stray.unlink(missing_ok=True)


def finish_if_last(path: str | Path) -> bool:
    """Complete the cache if every shard is done (under the cache lock); True if it is complete."""
    with _held(path):
        group = zarr.open_group(str(path), mode="r+")
        if group.attrs.get("complete"):
            return True
        records = [group[f"shards/{i}"].attrs.asdict() for i in range(group["shards"].attrs["count"])]
        if not all(r["done"] for r in records):
            return False
        m = group.attrs["manifest"]
        group.attrs.update(complete_attrs(merge_progress([r["progress"] for r in records]),
                                          -(-m["n_tokens"] // m["storage"]["chunk_tokens"])))
        return True


def harvest_shard(cfg: HarvestConfig, p, path: str | Path, shard: Shard, progress: bool) -> str | Path:
    """Write shard ``shard`` of the cache at ``path`` (creating the store if no shard has yet)."""
    from .run import _check_space, _existing, exhausted_error, write_rows

    manifest = p.manifest
    if not is_url(path):
        Path(path).mkdir(parents=True, exist_ok=True)
    with _held(path):
        state = _existing(path, manifest, resume=True, sharded=True)  # same fingerprint and settings, or refused
        if state is not None and state.get("complete"):
            if progress:
                print(f"cache {path} is already complete ({manifest['n_tokens']:,} tokens); nothing to do")
            return path
        if state is None:
            group = zarr.create_group(str(path), attributes={"manifest": manifest, "progress": {"chunks": 0}})
            create_arrays(group, manifest)
            _layout(group, manifest, cfg.batch_size, shard.count)
        group = zarr.open_group(str(path), mode="r+")
        record = _open_record(path, group, shard)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if cfg.device is None and torch.cuda.is_available() and local > 1:  # a GPU per local rank (or shared)
        gpu = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        cfg = cfg.model_copy(update={"device": f"cuda:{gpu}"})
    lock = writer_lock(join(path, "shards", str(shard.index)), cfg.break_lock)
    writer = None
    try:
        try:
            lock.acquire()
        except CacheLockedError as e:
            raise CacheLockedError(f"shard {shard}: {e}") from None
        rec = record.attrs.asdict()
        chunks = range(*rec["chunks"])
        if not rec["done"]:
            if rec["progress"]["chunks"] > chunks.start and not cfg.resume:
                raise CacheError(f"cache: shard {shard} of {str(path)!r} is unfinished "
                                 f"({rec['progress']['chunks'] - chunks.start} of {len(chunks)} chunks committed); "
                                 "pass --resume to continue it")
            if not is_url(path):
                _remove_partials(Path(path), chunks)
                left = (len(chunks) * manifest["storage"]["chunk_tokens"])
                _check_space(Path(path), manifest, max(0, manifest["n_tokens"] - left))
            threads = cfg.writer_threads or max(1, usable_cpus() // local)
            writer = CacheWriter(group, manifest, rec["progress"], threads=threads, batch_seqs=cfg.batch_size,
                                 chunks=chunks, record=record)
            writer.guard = lock.check
            if writer.committed < chunks.stop:
                write_rows(cfg, p, writer, progress, desc=f" shard {shard}")
            else:
                writer.finish()
    except DatasetExhausted as e:
        raise exhausted_error(cfg, e, manifest["n_tokens"], " and harvest to another --cache") from None
    finally:
        if writer is not None:
            writer.abort()
        lock.release()
    complete = finish_if_last(path)
    while shard.together and not complete:  # another rank is still writing; torchrun stops us if it fails
        time.sleep(0.5)
        complete = bool(zarr.open_group(str(path), mode="r").attrs.get("complete"))
    if progress and not complete:
        print(f"shard {shard} of {path} is done; the last shard to finish completes the cache")
    return path
