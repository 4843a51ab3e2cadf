"""`pipeline harvest`: validate, open (or resume) the cache, run the LM once, write every batch."""
from __future__ import annotations

import os
from dataclasses import dataclass
import shutil
import threading
import queue
from pathlib import Path
from typing import Any

import torch
import zarr
from tqdm.auto import tqdm

from .. import __version__
from ..cache.format import FORMAT_VERSION, STORAGE, fingerprint, seqs_per_chunk, to_storage
from ..cache.lock import WriterLock
from ..cache.store import CacheError
from ..cache.writer import CacheWriter, create_arrays
from ..config import ConfigError, HarvestConfig, site_name
from ..models import Capture, ModelInfo, check_sites, hook_name, load_model, load_tokenizer, model_info, tokenizer_identity
from .tokens import DatasetExhausted, batches, bos_id, contexts, dataset_identity, open_documents


@dataclass
class Plan:
    """Everything checked and decided before the LM is loaded."""

    manifest: dict[str, Any]
    info: ModelInfo
    tokenizer: Any
    documents: Any


def plan(cfg: HarvestConfig) -> Plan:
    """Validate the config against the model, tokenizer and dataset, and write the manifest."""
    info = model_info(cfg.model, cfg.revision)
    check_sites(info, cfg.site_list)
    tokenizer = load_tokenizer(info)
    ds = open_documents(cfg)
    bos = bos_id(tokenizer, cfg.bos)
    _, _, itemsize = STORAGE[cfg.dtype]
    spc = seqs_per_chunk(cfg.context_size, info.d_model, itemsize, cfg.chunk_mb, cfg.n_sequences)
    heldout = cfg.holdout_sequences(spc)
    arrays = {site_name(l, s): {"layer": l, "site": s, "hook_name": hook_name(l, s), "width": info.d_model}
              for l, s in cfg.site_list}
    identity = {
        "format_version": FORMAT_VERSION,
        "model": info.identity, "model_dtype": cfg.model_dtype,
        "tokenizer": tokenizer_identity(tokenizer),
        "dataset": dataset_identity(cfg),
        "context_size": cfg.context_size, "bos": cfg.bos,
        "sites": list(arrays), "dtype": cfg.dtype,
    }
    fp = fingerprint(identity)
    n_tokens = cfg.n_sequences * cfg.context_size
    manifest = {
        "format_version": FORMAT_VERSION, "tool_version": __version__, "fingerprint": fp,
        "identity": identity,
        "model": {"name": info.name, "resolved": info.resolved, "revision": info.revision, "arch": info.arch,
                  "d_model": info.d_model, "n_layers": info.n_layers, "dtype": cfg.model_dtype},
        "tokenizer": {"name": tokenizer.name_or_path, **tokenizer_identity(tokenizer)},
        "dataset": {"id": cfg.dataset, "config": cfg.dataset_config, "split": cfg.dataset_split,
                    "revision": cfg.dataset_revision, "text_column": cfg.text_column,
                    "token_column": cfg.token_column, "seed": cfg.seed, "shuffle_buffer": cfg.shuffle_buffer},
        "context_size": cfg.context_size,
        "bos": {"policy": cfg.bos, "token_id": bos},
        "storage": {"dtype": cfg.dtype, "codec": cfg.codec, "seqs_per_chunk": spc,
                    "chunk_tokens": spc * cfg.context_size, "checksum": "crc32c"},
        "arrays": arrays,
        "n_tokens": n_tokens, "n_sequences": cfg.n_sequences, "batch_size": cfg.batch_size,
        "split": {"heldout": [0, heldout * cfg.context_size], "train": [heldout * cfg.context_size, n_tokens]},
    }
    return Plan(manifest, info, tokenizer, ds)


def default_path(cfg: HarvestConfig, manifest: dict[str, Any]) -> Path:
    model = Path(cfg.model).name if Path(cfg.model).expanduser().is_dir() else cfg.model.replace("/", "--")
    return Path(cfg.cache_root) / model / manifest["fingerprint"]


def _existing_ancestor(path: Path) -> Path:
    """``path`` itself, or its nearest ancestor that exists."""
    while not path.exists():
        path = path.parent
    return path


def _check_writable(path: Path) -> None:
    probe = _existing_ancestor(path)
    if not os.access(probe, os.W_OK) or not probe.is_dir():
        raise ConfigError(f"cache: cannot write to {str(path)!r} ({str(probe)!r} is not a writable directory)")


def _first_missing(path: Path) -> Path | None:
    """The topmost directory of ``path`` that does not exist yet (None if ``path`` exists)."""
    missing = None
    while not path.exists():
        missing, path = path, path.parent
    return missing


def _check_space(path: Path, manifest: dict[str, Any], start_row: int) -> None:
    per_token = sum(a["width"] for a in manifest["arrays"].values()) * STORAGE[manifest["storage"]["dtype"]][2] + 4
    need = (manifest["n_tokens"] - start_row) * per_token
    probe = _existing_ancestor(path)
    free = shutil.disk_usage(probe).free
    if need > free:
        raise ConfigError(f"cache: {need / 1e9:.2f} GB needed (uncompressed) but only {free / 1e9:.2f} GB free "
                          f"at {str(probe)!r}; lower --tokens or choose another --cache")


def _existing(path: Path, manifest: dict[str, Any], resume: bool) -> dict[str, Any] | None:
    """The progress of a cache already at ``path`` (None if there is none), refusing what cannot continue."""
    if not (path / "zarr.json").exists():
        return None
    attrs = zarr.open_group(str(path), mode="r").attrs.asdict()
    old = attrs.get("manifest")
    if old is None:
        raise CacheError(f"cache: {str(path)!r} holds a zarr group that is not a matryoshka cache")
    if old["fingerprint"] != manifest["fingerprint"]:
        raise CacheError(f"cache: {str(path)!r} holds fingerprint {old['fingerprint']}, this harvest is "
                         f"{manifest['fingerprint']}; choose another --cache (the default path never collides)")
    if attrs.get("complete"):
        if old["n_tokens"] < manifest["n_tokens"]:
            raise CacheError(f"cache: {str(path)!r} is complete with {old['n_tokens']} tokens; extending it "
                             f"to {manifest['n_tokens']} is not supported yet: harvest to another --cache")
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


def harvest(cfg: HarvestConfig, progress: bool = True) -> Path:
    """Run the harvest described by ``cfg`` and return the cache's path."""
    p = plan(cfg)
    manifest = p.manifest
    path = Path(cfg.cache).expanduser() if cfg.cache else default_path(cfg, manifest)
    _check_writable(path)
    created = _first_missing(path)  # removed again if this run leaves nothing worth resuming
    path.mkdir(parents=True, exist_ok=True)
    writer = None
    exhausted = False
    lock = WriterLock(path)
    try:
        lock.acquire()
        state = _existing(path, manifest, cfg.resume)
        if state is not None and state.get("complete"):
            if progress:
                print(f"cache {path} is already complete ({manifest['n_tokens']:,} tokens); nothing to do")
            return path
        _check_space(path, manifest, (state or {"chunks": 0})["chunks"] * manifest["storage"]["chunk_tokens"])
        if state is None:
            group = zarr.create_group(str(path), attributes={"manifest": manifest, "progress": {"chunks": 0}})
            create_arrays(group, manifest)
            state = {"chunks": 0}
        else:
            for stray in path.rglob("*.partial"):  # a write a killed writer left half done (never renamed)
                stray.unlink()
            group = zarr.open_group(str(path), mode="r+")
        threads = cfg.writer_threads or os.cpu_count() or 1
        writer = CacheWriter(group, manifest, state, threads=threads, batch_seqs=cfg.batch_size)
        _run(cfg, p, writer, progress)
        created = None
        return path
    except DatasetExhausted as e:
        exhausted = True
        raise ConfigError(f"tokens: {cfg.dataset!r} ran out after {e.sequences * cfg.context_size:,} tokens "
                          f"({e.sequences} contexts) but --tokens asks for {manifest['n_tokens']:,}; "
                          f"lower --tokens{'; the partial cache was removed' if created else ''}") from None
    finally:
        if writer is not None:
            writer.abort()
        lock.release()
        if created is not None and (writer is None or writer.committed == 0 or exhausted):
            shutil.rmtree(created, ignore_errors=True)


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


def _run(cfg: HarvestConfig, p: Plan, writer: CacheWriter, progress: bool) -> None:
    manifest, info, tokenizer = p.manifest, p.info, p.tokenizer
    ctx = cfg.context_size
    start_seq = writer.start_row // ctx
    n_seqs = manifest["n_sequences"]
    model = load_model(info, dtype=cfg.model_dtype, device=cfg.device, device_map=cfg.device_map, tokenizer=tokenizer,
                       progress=progress)
    names = {(a["layer"], a["site"]): n for n, a in manifest["arrays"].items()}
    capture = Capture(model, info.arch, list(names), transform=lambda t: to_storage(t, cfg.dtype))
    bar = tqdm(total=n_seqs * ctx, initial=start_seq * ctx, unit="tok", unit_scale=True, disable=not progress,
               desc=f"harvest {Path(cfg.model).name}", dynamic_ncols=True)
    try:
        for first, ids in _prefetch(batches(contexts(cfg, tokenizer, p.documents), start_seq, n_seqs, cfg.batch_size)):
            acts = capture(torch.from_numpy(ids))
            writer.write(torch.from_numpy(ids), {names[k]: v for k, v in acts.items()})
            s = writer.stats
            bar.update(ids.size)
            bar.set_postfix_str(f"{s.stored_bytes / 1e9:.2f} GB written, "
                                f"ratio {s.raw_bytes / max(s.stored_bytes, 1):.2f}", refresh=False)
        writer.finish()
    finally:
        capture.close()
        bar.close()
