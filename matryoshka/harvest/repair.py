"""`pipeline cache repair`: re-harvest exactly the damaged and missing chunks of a complete cache.

A harvest is deterministic (the model's or the generator's rows depend only on the cache's settings, and
resumes already rely on it), so a chunk that fails its crc32c or has gone missing is rebuilt byte-identical
from the settings in the cache's own manifest: no config is needed, and a model or dataset that no longer
gives the cache's fingerprint is refused rather than mixed in.

The LM is run over whole *resume blocks* (chunks that are also whole LM batches, ``CacheWriter.align``),
starting where the harvest's batches started, so it sees the very batches it saw; of each block only the
damaged chunks are stored. Progress, statistics and the other chunks are not touched.

It is its own command, not ``cache verify --repair``: verify only reads, and stays safe to run on any cache
at any time (while it is being written, by anyone); repair writes, so it takes the cache's writer lock (a
cache being written is refused, naming the writer), loads the model, and re-verifies afterwards. A healthy
cache is verified, reported healthy, and left untouched (not even the lock is taken).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..cache import Cache, CacheError
from ..cache.format import row_bytes
from ..cache.inspect import Damage, verify
from ..cache.lifecycle import open_writer
from ..cache.writer import CacheWriter
from ..config import HarvestConfig, from_dict, site_name
from ..cpus import usable_cpus
from .plan import Plan, plan
from .rows import write_rows


@dataclasses.dataclass
class Repair:
    """What a repair found and did: the chunks re-harvested (empty: the cache was healthy)."""

    path: str
    chunks: list[int]
    damage: list[Damage]


def harvest_config(cache: Cache) -> HarvestConfig:
    """The harvest settings that produced ``cache``, rebuilt from its manifest: the chunk size and held-out
    split come out as stored (``chunk_mb`` is the stored chunk's size, ``holdout`` its token count)."""
    m = cache.manifest
    st = m["storage"]
    widest = max(row_bytes(a["width"], st["dtype"]) for a in m["arrays"].values())
    sites = [site_name(a["layer"], a["site"]) for a in m["arrays"].values() if a["layer"] is not None]
    d = m["dataset"]
    settings: dict[str, Any] = dict(
        source=m["source"], layers=None, sites=",".join(sites), tokens=m["n_tokens"],
        context_size=m["context_size"], batch_size=m["batch_size"], dtype=st["dtype"], codec=st["codec"],
        chunk_mb=st["chunk_tokens"] * widest / 2**20, holdout=m["split"]["heldout"][1], cache=cache.path,
        seed=d["seed"])
    if m["source"] == "synthetic":  # no model, dataset or BOS: only the generator's settings and seed
        settings.update(synthetic=m["synthetic"]["settings"], seed=m["synthetic"]["seed"])
    else:
        settings.update(bos=m["bos"]["policy"], model=m["model"]["name"], revision=m["model"]["revision"],
                        model_dtype=m["model"]["dtype"],
                        dataset=d["id"], dataset_config=d["config"], dataset_split=d["split"],
                        dataset_revision=d["revision"], text_column=d["text_column"], token_column=d["token_column"],
                        shuffle_buffer=d["shuffle_buffer"])
    return from_dict(HarvestConfig, settings, "harvest")


def _blocks(chunks: list[int], align: int, n_chunks: int) -> list[range]:
    """The resume blocks holding ``chunks``, adjacent ones merged (one LM pass each)."""
    out: list[range] = []
    for c in sorted(set(chunks)):
        start = c // align * align
        stop = min(start + align, n_chunks)
        if out and out[-1].stop >= start:
            out[-1] = range(out[-1].start, max(out[-1].stop, stop))
        else:
            out.append(range(start, stop))
    return out


def _repairable(cache: Cache, damage: list[Damage]) -> list[int]:
    """The damaged chunks, refusing damage that re-harvesting chunks cannot mend."""
    if not cache.complete:
        raise CacheError(f"repair: {cache.path!r} is an unfinished harvest; continue it with `pipeline harvest "
                         "--resume` (same settings), then verify it")
    if cache.manifest["source"] not in ("model", "synthetic"):
        raise CacheError(f"repair: {cache.path!r} holds rows written by {cache.manifest['source']!r}, not a "
                         "harvest: they cannot be re-harvested; write the cache again")
    other = [d for d in damage if d.chunk is None]
    if other:
        raise CacheError(f"repair: {cache.path!r}: {other[0].key}: {other[0].problem}; re-harvesting chunks cannot "
                         "mend that: harvest the cache again")
    return sorted({d.chunk for d in damage})


def repair(path: str | Path, progress: bool = True) -> Repair:
    """Re-harvest the damaged and missing chunks of the cache at ``path`` and verify it again (see the
    module docstring). Raises :class:`CacheError` for what cannot be repaired or is still damaged after."""
    cache = Cache(path)
    damage = verify(cache, progress)
    chunks = _repairable(cache, damage)
    if not chunks:
        return Repair(cache.path, [], [])
    cfg = harvest_config(cache)
    p = plan(cfg)
    if p.manifest["fingerprint"] != cache.fingerprint:
        raise CacheError(f"repair: {cache.path!r} has fingerprint {cache.fingerprint}, but its model, tokenizer "
                         f"and dataset now give {p.manifest['fingerprint']}: they no longer produce its rows; "
                         "harvest the cache again")
    p = Plan(cache.manifest, p.info, p.tokenizer, p.documents)  # the stored layout, chunk for chunk
    # a cache being written (or repaired) is refused here, naming its writer
    with open_writer(cache.location, cache.manifest, resume=True) as session:
        cache = Cache(path)  # what the lock now protects: verified again, as another writer may have been at it
        chunks = _repairable(cache, verify(cache, progress=False))
        m = cache.manifest
        align = CacheWriter.align(m["storage"]["seqs_per_chunk"], m["batch_size"])
        for block in _blocks(chunks, align, cache.n_chunks):
            writer = session.writer({"chunks": block.start}, threads=usable_cpus(), batch_seqs=m["batch_size"],
                                    chunks=block, only=set(chunks) & set(block))
            try:
                write_rows(cfg, p, writer, progress, desc=f" repair chunks {block.start}..{block.stop - 1}")
            finally:
                writer.abort()
    left = verify(Cache(path), progress=False)
    if left:
        raise CacheError(f"repair: {len(left)} problem(s) remain in {cache.path!r} after re-harvesting chunks "
                         f"{_ranges(chunks)} (first: {left[0].key}: {left[0].problem})")
    return Repair(cache.path, chunks, damage)


def _ranges(chunks: list[int]) -> str:
    """``0, 3..5``: chunk indices as ranges."""
    out, run = [], [chunks[0]]
    for c in chunks[1:]:
        if c == run[-1] + 1:
            run.append(c)
        else:
            out.append(run)
            run = [c]
    out.append(run)
    return ", ".join(f"{r[0]}" if len(r) == 1 else f"{r[0]}..{r[-1]}" for r in out)


def summary(r: Repair) -> str:
    """The one line `pipeline cache repair` prints."""
    if not r.chunks:
        return f"ok: {r.path} is healthy; nothing to repair, nothing written"
    return (f"repaired: chunks {_ranges(r.chunks)} ({len(r.damage)} damaged or missing file(s)) re-harvested in "
            f"{r.path}; verify: ok")
