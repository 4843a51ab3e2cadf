"""`pipeline harvest`: validate, open (or resume) the cache, run the LM once (or the synthetic generator,
``source: synthetic``), write every batch."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
import shutil
import threading
import queue
from pathlib import Path
from typing import Any

import torch
import zarr
from tqdm.auto import tqdm

from ..cache.format import FORMAT_VERSION, row_bytes, seqs_per_chunk, to_storage
from ..cache.manifest import build_manifest, holdout_summary
from ..cache import remote
from ..cache.lock import LOCK_NAME, writer_lock
from ..cache.store import Cache, CacheError, cache_location
from ..cache.manifest import identity_difference
from ..cache.writer import CacheWriter, create_arrays
from ..config import ConfigError, HarvestConfig, check_device, site_name
from ..cpus import usable_cpus
from ..models import (Capture, ModelInfo, check_context_size, check_sites, hook_name, hub_id, load_model,
                      load_tokenizer, model_info, resolve_attention, tokenizer_identity)
from . import synthetic
from .shards import harvest_shard, worker_shard
from .tokens import DatasetExhausted, batches, bos_id, contexts, dataset_identity, open_documents


@dataclass
class Plan:
    """Everything checked and decided before the LM is loaded."""

    manifest: dict[str, Any]
    info: ModelInfo | None  # None (and no tokenizer or documents) for the synthetic source
    tokenizer: Any
    documents: Any


def plan(cfg: HarvestConfig) -> Plan:
    """Validate the config against the model, tokenizer and dataset, and write the manifest."""
    check_device(cfg.device)
    if cfg.source == "synthetic":
        return Plan(synthetic.manifest(cfg), None, None, None)
    info = model_info(cfg.model, cfg.revision)
    check_sites(info, cfg.site_list)
    attention = resolve_attention(info, cfg.attn_implementation)
    check_context_size(info, cfg.context_size)
    tokenizer = load_tokenizer(info)
    ds = open_documents(cfg)
    bos = bos_id(tokenizer, cfg.bos)
    spc, heldout = cfg.holdout_layout(
        seqs_per_chunk(cfg.context_size, row_bytes(info.d_model, cfg.dtype), cfg.chunk_mb, cfg.n_sequences))
    arrays = {site_name(l, s): {"layer": l, "site": s, "hook_name": hook_name(l, s), "width": info.d_model}
              for l, s in cfg.site_list}
    identity = {
        "format_version": FORMAT_VERSION,
        "model": info.identity, "model_dtype": cfg.model_dtype,
        # rows differ at rounding level between implementations; eager, what every cache was harvested
        # with before the choice existed, is left out so that those caches keep their fingerprints
        **({} if attention == "eager" else {"attn_implementation": attention}),
        "tokenizer": tokenizer_identity(tokenizer),
        "dataset": dataset_identity(cfg),
        "context_size": cfg.context_size, "bos": cfg.bos,
        "sites": list(arrays), "dtype": cfg.dtype,
    }
    manifest = build_manifest(
        source="model", identity=identity,
        model={"name": info.name, "resolved": info.resolved, "revision": info.revision, "arch": info.arch,
               "d_model": info.d_model, "n_layers": info.n_layers, "dtype": cfg.model_dtype,
               "attn_implementation": attention, **({"hub_id": hub} if (hub := hub_id(info.resolved)) else {})},
        tokenizer={"name": tokenizer.name_or_path, **tokenizer_identity(tokenizer)},
        dataset={"id": cfg.dataset, "config": cfg.dataset_config, "split": cfg.dataset_split,
                 "revision": cfg.dataset_revision, "text_column": cfg.text_column,
                 "token_column": cfg.token_column, "seed": cfg.seed, "shuffle_buffer": cfg.shuffle_buffer},
        context_size=cfg.context_size, bos={"policy": cfg.bos, "token_id": bos}, dtype=cfg.dtype, codec=cfg.codec,
        seqs_per_chunk=spc, arrays=arrays, n_sequences=cfg.n_sequences, batch_size=cfg.batch_size,
        heldout_seqs=heldout, holdout_asked=cfg.holdout)
    return Plan(manifest, info, tokenizer, ds)


def _existing_ancestor(path: Path) -> Path:
    """``path`` itself, or its nearest ancestor that exists."""
    while not path.exists():
        path = path.parent
    return path


def _check_writable(path: Path) -> None:
    probe = _existing_ancestor(path)
    if not os.access(probe, os.W_OK) or not probe.is_dir():
        raise ConfigError(f"cache: cannot write to {str(path)!r} ({str(probe)!r} is not a writable directory)")


CACHE_ENTRIES = {"zarr.json", "acts", "tokens", "shards", "ground_truth", LOCK_NAME}
"""What a cache folder holds (a killed writer's temporary files aside)."""


def _check_not_foreign(path: Path | str) -> None:
    """A folder that is not a cache must be new or empty: the cache would be written among someone's files,
    and ``cache rm`` would be asked to delete it with them. A cache whose root zarr.json was deleted is refused
    too: a new root over its old arrays fails half-way and leaves an empty "partial" cache."""
    names = remote.entries(path)
    if "zarr.json" not in names and ("acts" in names or "tokens" in names):
        raise CacheError(f"cache: {str(path)!r} holds a cache's arrays but no root zarr.json (deleted, or a "
                         "`cache copy` interrupted before its last step); nothing was written: run the copy again, "
                         "restore the zarr.json, or delete the folder (or give another --cache) and harvest again")
    foreign = [n for n in names if n not in CACHE_ENTRIES and not n.startswith(".part-") and not n.endswith(".partial")]
    if foreign and "zarr.json" not in names:
        raise ConfigError(f"cache: {str(path)!r} is a folder that is not a cache and holds {len(foreign)} other "
                          f"entr{'y' if len(foreign) == 1 else 'ies'} ({', '.join(sorted(foreign)[:3])}"
                          f"{', ...' if len(foreign) > 3 else ''}); give --cache a new or empty folder")


def _check_space(path: Path, manifest: dict[str, Any], start_row: int) -> None:
    dtype = manifest["storage"]["dtype"]
    per_token = sum(row_bytes(a["width"], dtype) for a in manifest["arrays"].values()) + 4
    need = (manifest["n_tokens"] - start_row) * per_token
    probe = _existing_ancestor(path)
    free = shutil.disk_usage(probe).free
    if need > free:
        raise ConfigError(f"cache: {need / 1e9:.2f} GB needed (uncompressed) but only {free / 1e9:.2f} GB free "
                          f"at {str(probe)!r}; lower --tokens or choose another --cache")


def _existing(path: Path | str, manifest: dict[str, Any], resume: bool,
              sharded: bool = False) -> dict[str, Any] | None:
    """The progress of a cache already at ``path`` (a directory or a URL; None if there is none), refusing
    what cannot continue."""
    if not (remote.exists(path, "zarr.json") if remote.is_url(path) else (path / "zarr.json").exists()):
        return None
    there = Cache(path)  # refuses another zarr group, and damaged metadata (root or array zarr.json), in one line
    attrs, old = there.group.attrs.asdict(), there.manifest
    if old["fingerprint"] != manifest["fingerprint"]:
        raise CacheError(f"cache: {str(path)!r} holds fingerprint {old['fingerprint']}, this harvest is "
                         f"{manifest['fingerprint']} ({identity_difference(manifest, old)}); choose another "
                         "--cache (the default path never collides)")
    if "shards" in there.group and not attrs.get("complete") and not sharded:
        raise CacheError(f"cache: {str(path)!r} is being harvested in shards; continue it with --shard I/N "
                         "(or torchrun), as it was started")
    if attrs.get("complete"):
        if old["n_tokens"] < manifest["n_tokens"]:
            raise CacheError(f"cache: {str(path)!r} is complete with {old['n_tokens']} tokens; extending it "
                             f"to {manifest['n_tokens']} is not supported yet: harvest to another --cache")
        # settings outside the fingerprint (codec, held-out split, chunk size) must not be dropped silently;
        # a larger cache's chunking and split follow from its own token count; the split is named before the
        # chunk size, which follows from it (config.holdout_layout)
        same_size = old["n_tokens"] == manifest["n_tokens"]
        for key, was, now in [("codec", old["storage"]["codec"], manifest["storage"]["codec"]),
                              *([("held-out split", old["split"]["heldout"], manifest["split"]["heldout"]),
                                 ("chunk_tokens", old["storage"]["chunk_tokens"], manifest["storage"]["chunk_tokens"])]
                                if same_size else [])]:
            if was != now:
                raise CacheError(f"cache: {str(path)!r} is complete with {key} {was!r}, not the {now!r} this "
                                 "harvest asks for; harvest to another --cache, or leave the setting as it was")
        return {"complete": True}
    progress = attrs.get("progress", {"chunks": 0})
    if not resume:
        raise CacheError(f"cache: {str(path)!r} is an unfinished harvest ({progress['chunks']} chunks "
                         "committed); pass --resume to continue it")
    for key in ("n_tokens", "storage", "split", "batch_size"):
        if old[key] != manifest[key]:
            raise CacheError(f"cache: --resume with a different {key} ({manifest[key]!r}) than the unfinished "
                             f"harvest at {str(path)!r} ({old[key]!r}); resume with the same settings")
    return progress


def exhausted_error(cfg: HarvestConfig, e: DatasetExhausted, n_tokens: int, then: str) -> ConfigError:
    """The one line for a dataset shorter than ``--tokens``."""
    return ConfigError(f"tokens: {cfg.dataset!r} ran out after {e.sequences * cfg.context_size:,} tokens "
                       f"({e.sequences} contexts) but --tokens asks for {n_tokens:,}; lower --tokens{then}")


def harvest(cfg: HarvestConfig, progress: bool = True) -> Path | str:
    """Run the harvest described by ``cfg`` and return the cache's path (a URL stays a string)."""
    p = plan(cfg)
    manifest = p.manifest
    if progress:
        print(f"harvest: {holdout_summary(manifest)}", file=sys.stderr)
    given = remote.local_path(cfg.cache) if cfg.cache else None
    path = (given if remote.is_url(given) else Path(given).expanduser()) if given else \
        cache_location(cfg.cache_root, manifest)
    url = remote.is_url(path)
    remote.check_writable(path) if url else _check_writable(path)
    _check_not_foreign(path)
    shard = worker_shard(cfg)
    if shard.count > 1:
        return harvest_shard(cfg, p, path, shard, progress)
    created = remote.created_by_us(path)  # removed again if this run leaves nothing worth resuming
    if not url:
        path.mkdir(parents=True, exist_ok=True)
    writer = None
    exhausted = False
    lock = writer_lock(path, cfg.break_lock)
    held = False  # only a writer that held the lock may remove what it created
    try:
        lock.acquire()
        held = True
        state = _existing(path, manifest, cfg.resume)
        if state is not None and state.get("complete"):
            if progress:
                print(f"cache {path} is already complete ({manifest['n_tokens']:,} tokens); nothing to do")
            return path
        if not url:
            _check_space(path, manifest, (state or {"chunks": 0})["chunks"] * manifest["storage"]["chunk_tokens"])
        if state is None:
            group = zarr.create_group(str(path), attributes={"manifest": manifest, "progress": {"chunks": 0}})
            create_arrays(group, manifest)
            state = {"chunks": 0}
        else:
            for stray in [] if url else path.rglob("*.partial"):  # a killed local write (never renamed);
                stray.unlink()                                     # an object PUT is all or nothing
            group = zarr.open_group(str(path), mode="r+")
        threads = cfg.writer_threads or usable_cpus()
        writer = CacheWriter(group, manifest, state, threads=threads, batch_seqs=cfg.batch_size)
        writer.guard = lock.check
        write_rows(cfg, p, writer, progress)
        created = None
        return path
    except DatasetExhausted as e:
        exhausted = True
        raise exhausted_error(cfg, e, manifest["n_tokens"], "; the partial cache was removed" if created else "") from None
    finally:
        if writer is not None:
            writer.abort()
        lock.release()
        if created is not None and held and (writer is None or writer.committed == 0 or exhausted):
            remote.remove(created)


def _prefetch(it, depth: int = 2):
    """Tokenize ahead of the LM in a background thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def fill() -> None:
        try:
            for item in it:
                q.put(item)
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)

    threading.Thread(target=fill, daemon=True, name="tokenize").start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def write_rows(cfg: HarvestConfig, p: Plan, writer: CacheWriter, progress: bool, desc: str = "") -> None:
    """Run the LM over the writer's sequences (all of them, a shard's range, or a repair's blocks) and write them."""
    if cfg.source == "synthetic":
        return synthetic.generate(cfg, writer, progress, desc)
    manifest, info, tokenizer = p.manifest, p.info, p.tokenizer
    ctx = cfg.context_size
    start_seq, first_seq = writer.start_row // ctx, writer.first * manifest["storage"]["seqs_per_chunk"]
    n_seqs = writer.end_row // ctx
    device = torch.device(cfg.device) if cfg.device else None
    if device is not None and device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # else pinned buffers and events open a context on GPU 0 too
    model = load_model(info, dtype=cfg.model_dtype, device=cfg.device, device_map=cfg.device_map, tokenizer=tokenizer,
                       progress=progress, attn_implementation=manifest["model"]["attn_implementation"])
    names = {(a["layer"], a["site"]): n for n, a in manifest["arrays"].items()}
    capture = Capture(model, info.arch, list(names), transform=lambda t: to_storage(t, cfg.dtype))
    bar = tqdm(total=(n_seqs - first_seq) * ctx, initial=(start_seq - first_seq) * ctx, unit="tok", unit_scale=True,
               disable=not progress, desc=f"harvest {Path(cfg.model).name}{desc}", dynamic_ncols=True)
    try:
        for first, ids in _prefetch(batches(contexts(cfg, tokenizer, p.documents), start_seq, n_seqs, cfg.batch_size)):
            acts = capture(torch.from_numpy(ids))
            writer.write(torch.from_numpy(ids), {names[k]: v for k, v in acts.items()})
            s = writer.stats
            bar.update(ids.size)
            bar.set_postfix_str(f"{s.stored_bytes / 1e9:.2f} GB written, ratio {s.raw_bytes / s.stored_bytes:.2f}"
                                if s.stored_bytes else  # object stores are not asked each chunk's size
                                f"{s.raw_bytes / 1e9:.2f} GB raw written", refresh=False)
        writer.finish()
    finally:
        capture.close()
        bar.close()
