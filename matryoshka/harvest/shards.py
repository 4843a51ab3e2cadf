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

from ..cache.lifecycle import WriteSession, check_space, locked, open_part_writer, open_writer
from ..cache.location import Location
from ..cache.store import CacheError
from ..cache.writer import CacheWriter, complete_attrs, merge_progress
from ..config import ConfigError, HarvestConfig, parse_shard
from ..cpus import usable_cpus
from .plan import Plan
from .rows import exhausted_error, write_rows
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


def _layout(group: zarr.Group, manifest: dict, batch_seqs: int, count: int) -> None:
    """Create every shard's record (all shards at once, by whichever shard creates the store)."""
    shards = group.create_group("shards", attributes={"count": count})
    for i in range(count):
        r = chunk_range(manifest, batch_seqs, Shard(i, count))
        shards.create_group(str(i), attributes={"chunks": [r.start, r.stop], "progress": {"chunks": r.start},
                                                "done": False})


def _open_record(path: Location, group: zarr.Group, shard: Shard) -> zarr.Group:
    try:
        count = group["shards"].attrs["count"]
    except KeyError:
        raise CacheError(f"cache: {str(path)!r} is an unsharded harvest; continue it without --shard "
                         "(or torchrun)") from None
    if count != shard.count:
        raise CacheError(f"shard: {str(path)!r} is being harvested in {count} shards, not {shard.count}; "
                         f"use --shard I/{count} (or torchrun --nproc-per-node {count})")
    return group[f"shards/{shard.index}"]


def finish_if_last(where: Location) -> bool:
    """Complete the cache if every shard is done (under the cache lock); True if it is complete."""
    with locked(where, wait_s=LOCK_WAIT_S):
        group = zarr.open_group(str(where), mode="r+")
        if group.attrs.get("complete"):
            return True
        records = [group[f"shards/{i}"].attrs.asdict() for i in range(group["shards"].attrs["count"])]
        if not all(r["done"] for r in records):
            return False
        m = group.attrs["manifest"]
        group.attrs.update(complete_attrs(merge_progress([r["progress"] for r in records]),
                                          -(-m["n_tokens"] // m["storage"]["chunk_tokens"])))
        return True


def _shard_device(cfg: HarvestConfig) -> HarvestConfig:
    """A GPU per local rank (or shared) when several run on one machine and no device was named."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if cfg.device is None and torch.cuda.is_available() and local > 1:
        gpu = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        return cfg.model_copy(update={"device": f"cuda:{gpu}"})
    return cfg


def _write_shard(cfg: HarvestConfig, p: Plan, session: WriteSession, record: zarr.Group, shard: Shard,
                 progress: bool) -> None:
    """Under the shard's own lock: refuse an unfinished shard without --resume, then write its chunks."""
    where, manifest = session.location, session.manifest
    rec = record.attrs.asdict()
    chunks = range(*rec["chunks"])
    if rec["done"]:
        return
    if rec["progress"]["chunks"] > chunks.start and not cfg.resume:
        raise CacheError(f"cache: shard {shard} of {str(where)!r} is unfinished "
                         f"({rec['progress']['chunks'] - chunks.start} of {len(chunks)} chunks committed); "
                         "pass --resume to continue it")
    where.remove_partials(chunks)
    check_space(where, manifest, max(0, manifest["n_tokens"] - len(chunks) * manifest["storage"]["chunk_tokens"]))
    threads = cfg.writer_threads or max(1, usable_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    writer = session.writer(rec["progress"], threads=threads, batch_seqs=cfg.batch_size, chunks=chunks, record=record)
    if writer.committed < chunks.stop:
        write_rows(cfg, p, writer, progress, desc=f" shard {shard}")
    else:
        writer.finish()


def harvest_shard(cfg: HarvestConfig, p: Plan, where: Location, shard: Shard, progress: bool) -> str | Path:
    """Write shard ``shard`` of the cache at ``where`` (creating the store if no shard has yet)."""
    manifest = p.manifest
    with open_writer(where, manifest, resume=True, sharded=True, wait_s=LOCK_WAIT_S,
                     on_create=lambda group: _layout(group, manifest, cfg.batch_size, shard.count)) as store:
        if store.complete:
            if progress:
                print(f"cache {where} is already complete ({manifest['n_tokens']:,} tokens); nothing to do")
            return where.pathlike
        record = _open_record(where, store.group, shard)
    cfg = _shard_device(cfg)
    try:
        with open_part_writer(where, f"shards/{shard.index}", manifest, break_lock=cfg.break_lock,
                              label=f"shard {shard}") as session:
            _write_shard(cfg, p, session, record, shard, progress)
    except DatasetExhausted as e:
        raise exhausted_error(cfg, e, manifest["n_tokens"], " and harvest to another --cache") from None
    complete = finish_if_last(where)
    while shard.together and not complete:  # another rank is still writing; torchrun stops us if it fails
        time.sleep(0.5)
        complete = bool(zarr.open_group(str(where), mode="r").attrs.get("complete"))
    if progress and not complete:
        print(f"shard {shard} of {where} is done; the last shard to finish completes the cache")
    return where.pathlike
