"""`pipeline cache ls | info | verify`: what a cache holds, and whether every chunk is intact."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..cpus import usable_cpus
from .format import STORAGE, chunk_key, decode_chunk, row_bytes, row_width, token_codec
from .location import Location
from .manifest import holdout_summary
from .store import Cache, CacheDamagedError, CacheError, cache_or_wreck


def stored_bytes(path: Path | str) -> int:
    return Location.of(path).total_bytes()


def find_caches(root: str | Path, max_depth: int = 4) -> Iterator[Path | str]:
    """Caches under ``root`` (a directory or a URL prefix): those whose zarr.json carries a matryoshka manifest,
    and damaged ones (a cache's arrays under an unreadable or missing zarr.json; :func:`cache_or_wreck`)."""
    yield from Location.of(root).find_caches(cache_or_wreck, max_depth)


def describe_path(path: Path | str) -> dict:
    """:func:`describe` of the cache at ``path``, or, for a damaged one, a row that says so."""
    try:
        return describe(Cache(path))
    except CacheDamagedError as e:
        return {"path": str(path), "fingerprint": "?", "model": "?", "sites": "?", "tokens": 0, "planned": 0,
                "status": f"DAMAGED ({e.reason})", "bytes": stored_bytes(path)}


def describe(cache: Cache) -> dict:
    m = cache.manifest
    return {
        "path": cache.path, "fingerprint": cache.fingerprint, "model": m["model"]["name"],
        "sites": ",".join(cache.array_names), "tokens": cache.tokens_committed, "planned": m["n_tokens"],
        "status": "complete" if cache.complete else (f"{len(shard_lines(cache))} shards, unfinished" if
                                                      "shards" in cache.group else
                                                      f"partial {cache.tokens_committed / m['n_tokens']:.0%}"),
        "bytes": cache.location.total_bytes(),
    }


def shard_lines(cache: Cache) -> list[str]:
    """One line per shard of a multi-worker harvest (harvest/shards.py): its chunks and its progress."""
    if "shards" not in cache.group:
        return []
    shards = cache.group["shards"]
    lines = []
    for i in range(shards.attrs["count"]):
        r = shards[str(i)].attrs.asdict()
        a, b = r["chunks"]
        state = "done" if r["done"] else f"{r['progress']['chunks'] - a} of {b - a} chunks committed"
        lines.append(f"shard {i}/{shards.attrs['count']:<4} chunks {a}..{b - 1}: {state}")
    return lines


def info_lines(cache: Cache) -> list[str]:
    m = cache.manifest
    raw = sum(row_bytes(a["width"], cache.storage_dtype) for a in m["arrays"].values()) * cache.tokens_committed
    size = cache.location.total_bytes()
    lines = [
        f"cache        {cache.path}",
        f"fingerprint  {cache.fingerprint}   format v{m['format_version']}, written by matryoshka {m['tool_version']}",
        f"status       {'complete' if cache.complete else 'unfinished'}: {cache.tokens_committed:,} of "
        f"{m['n_tokens']:,} tokens committed",
        f"model        {m['model']['name']} ({m['model']['arch']}, d_model {m['model']['d_model']}, "
        f"{m['model']['n_layers']} layers, computed in {m['model']['dtype']})"
        + (f", a copy of {hub!r} on the Hub" if (hub := m["model"].get("hub_id")) else ""),
        f"tokenizer    {m['tokenizer']['name']} (vocab {m['tokenizer']['vocab_size']})",
        f"dataset      {m['dataset']['id']} split {m['dataset']['split']}, column "
        f"{m['dataset']['token_column'] or m['dataset']['text_column']}, order seed {m['dataset']['seed']}",
        f"contexts     {m['n_sequences']:,} x {m['context_size']} tokens, BOS policy {m['bos']['policy']} "
        f"(id {m['bos']['token_id']})",
        f"storage      {cache.storage_dtype}, codec {m['storage']['codec']} + crc32c, chunks of "
        f"{m['storage']['chunk_tokens']:,} tokens ({m['storage']['seqs_per_chunk']} sequences)",
        f"size         {size / 1e9:.3f} GB on disk, {raw / 1e9:.3f} GB raw, ratio {raw / max(size, 1):.2f}",
        f"split        {holdout_summary(m)}",
        *shard_lines(cache),
        "arrays:",
    ]
    for name, a in m["arrays"].items():
        try:
            s = cache.stats(name)
            stat = (f"mean norm {float((s.mean @ s.mean) ** 0.5):.3g}, E|x|^2 {s.mean_sq_norm:.4g}, "
                    f"variance {s.total_variance:.4g}")
        except CacheError:
            stat = "no statistics yet"
        lines.append(f"  {name:<16} {a['hook_name']:<28} width {a['width']:<6} {stat}")
    return lines


@dataclass
class Damage:
    key: str
    problem: str
    chunk: int | None = None
    """The chunk index of a damaged or missing chunk (what `pipeline cache repair` re-harvests); None for
    damage that is not one chunk's (an array's shape, an unfinished cache)."""


def verify(cache: Cache, progress: bool = True) -> list[Damage]:
    """Read every committed chunk of every array (crc32c checks each) and check shapes against the manifest.

    Chunks are read and decoded as the reader does (``Cache.chunk_bytes_many``, ``decode_chunk``), one
    committed chunk of every array per task on a thread pool: through zarr, one chunk at a time, every
    chunk is decoded on zarr's one event-loop thread, and a remote cache pays a round trip per chunk and
    array."""
    m = cache.manifest
    damage: list[Damage] = []
    for name, a in m["arrays"].items():
        arr = cache.array(name)
        shape = (m["n_tokens"], row_width(a["width"], cache.storage_dtype))
        if arr.shape != shape:
            damage.append(Damage(f"acts/{name}", f"shape {arr.shape}, manifest says {shape}"))
    if not cache.complete:
        damage.append(Damage("zarr.json", f"unfinished: {cache.chunks_committed} of {cache.n_chunks} chunks committed"))
    present = set(cache.location.listing())  # one listing, not a request per chunk
    scratch = threading.local()

    def check(i: int) -> list[Damage]:
        """Chunk ``i`` of every array: missing, or unreadable (checksum, codec), or intact."""
        names = [*cache.array_names, "tokens"]
        exists = {n: chunk_key(n, i) in present for n in names}
        found = [Damage(chunk_key(n, i), "missing", i) for n in names if not exists[n]]
        try:
            raw = cache.chunk_bytes_many([(n, i) for n in names if exists[n]])
        except OSError as e:  # the store failed for longer than its retries (cache/retry.py)
            return found + [Damage(chunk_key(n, i), f"unreadable ({str(e).splitlines()[0][:120]})", i)
                            for n in names if exists[n]]
        for (n, _), data in raw.items():
            try:
                decode_chunk(data, *_decoder(cache, n, scratch))
            except Exception as e:  # noqa: BLE001 - any decode failure is damage
                found.append(Damage(chunk_key(n, i), f"unreadable ({str(e).splitlines()[0][:120]})", i))
        return found

    workers = 16 if cache.remote else usable_cpus()  # object storage: requests in flight, not cores
    with ThreadPoolExecutor(workers) as pool:
        for found in tqdm(pool.map(check, range(cache.chunks_committed)), total=cache.chunks_committed,
                          desc="verify", unit="chunk", disable=not progress):
            damage.extend(found)
    return damage


def _decoder(cache: Cache, name: str, scratch: threading.local) -> tuple[str, np.ndarray]:
    """The codec of an array's chunks, and this thread's buffer of a whole chunk's shape to decode into."""
    if name == "tokens":
        codec = token_codec(cache.manifest["storage"]["codec"])
        key, shape, dtype = "tokens", (cache.chunk_tokens,), np.int32
    else:
        width = row_width(cache.manifest["arrays"][name]["width"], cache.storage_dtype)
        key, codec, dtype = name, cache.manifest["storage"]["codec"], STORAGE[cache.storage_dtype][0]
        shape = (cache.chunk_tokens, width)
    buffers = scratch.__dict__.setdefault("buffers", {})
    if key not in buffers:
        buffers[key] = np.empty(shape, dtype)
    return codec, buffers[key]
