"""`pipeline harvest`: validate, open (or resume) the cache, run the LM once (or the synthetic generator,
``source: synthetic``), write every batch. The cache's lifecycle (lock, space, create or resume, clean up)
is cache/lifecycle.py's; this module decides where the cache goes and what is written into it."""
from __future__ import annotations

import sys
from pathlib import Path

from ..cache.lifecycle import open_writer
from ..cache.location import Location
from ..cache.manifest import holdout_summary
from ..cache.store import cache_location
from ..config import HarvestConfig
from ..cpus import usable_cpus
from .plan import Plan, plan
from .rows import exhausted_error, write_rows
from .shards import harvest_shard, worker_shard
from .tokens import DatasetExhausted

__all__ = ["Plan", "harvest", "plan", "cache_place"]


def cache_place(cfg: HarvestConfig, manifest: dict) -> Location:
    """Where the cache goes: ``--cache`` as given (a path or URL), else ``<cache root>/<model>/<fingerprint>``."""
    return Location.of(cfg.cache if cfg.cache else cache_location(cfg.cache_root, manifest))


def harvest(cfg: HarvestConfig, progress: bool = True) -> Path | str:
    """Run the harvest described by ``cfg`` and return the cache's path (a URL stays a string)."""
    p = plan(cfg)
    manifest = p.manifest
    if progress:
        print(f"harvest: {holdout_summary(manifest)}", file=sys.stderr)
    where = cache_place(cfg, manifest)
    shard = worker_shard(cfg)
    if shard.count > 1:
        return harvest_shard(cfg, p, where, shard, progress)
    with open_writer(where, manifest, resume=cfg.resume, break_lock=cfg.break_lock) as session:
        if session.complete:
            if progress:
                print(f"cache {where} is already complete ({manifest['n_tokens']:,} tokens); nothing to do")
            return where.pathlike
        writer = session.writer(session.state, threads=cfg.writer_threads or usable_cpus(), batch_seqs=cfg.batch_size)
        try:
            write_rows(cfg, p, writer, progress)
        except DatasetExhausted as e:
            session.discard = True  # a dataset that ran out can never finish this cache
            raise exhausted_error(cfg, e, manifest["n_tokens"],
                                  "; the partial cache was removed" if session.created else "") from None
    return where.pathlike
