"""`pipeline cache ls | info | verify`: what a cache holds, and whether every chunk is intact."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tqdm.auto import tqdm

from . import remote
from .format import chunk_key, row_bytes, row_width
from .store import Cache, CacheError, is_cache


def stored_bytes(path: Path | str) -> int:
    if remote.is_url(path):
        return remote.total_bytes(str(path))
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def find_caches(root: str | Path, max_depth: int = 4) -> Iterator[Path | str]:
    """Caches under ``root`` (a directory or a URL prefix): those whose zarr.json carries a matryoshka manifest."""
    if remote.is_url(root):
        yield from remote.find_caches(str(root), max_depth)
        return
    root = Path(root)
    if not root.is_dir():
        raise CacheError(f"cache ls: {str(root)!r} is not a directory")
    base = len(root.parts)
    for dirpath, dirnames, _ in os.walk(root):
        p = Path(dirpath)
        if is_cache(p):
            dirnames.clear()
            yield p
        elif len(p.parts) - base >= max_depth:
            dirnames.clear()
        dirnames.sort()


def describe(cache: Cache) -> dict:
    m = cache.manifest
    return {
        "path": cache.path, "fingerprint": cache.fingerprint, "model": m["model"]["name"],
        "sites": ",".join(cache.array_names), "tokens": cache.tokens_committed, "planned": m["n_tokens"],
        "status": "complete" if cache.complete else (f"{len(shard_lines(cache))} shards, unfinished" if
                                                      "shards" in cache.group else
                                                      f"partial {cache.tokens_committed / m['n_tokens']:.0%}"),
        "bytes": stored_bytes(cache.path),
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
    size = stored_bytes(cache.path)
    lines = [
        f"cache        {cache.path}",
        f"fingerprint  {cache.fingerprint}   format v{m['format_version']}, written by matryoshka {m['tool_version']}",
        f"status       {'complete' if cache.complete else 'unfinished'}: {cache.tokens_committed:,} of {m['n_tokens']:,} tokens committed",
        f"model        {m['model']['name']} ({m['model']['arch']}, d_model {m['model']['d_model']}, "
        f"{m['model']['n_layers']} layers, computed in {m['model']['dtype']})",
        f"tokenizer    {m['tokenizer']['name']} (vocab {m['tokenizer']['vocab_size']})",
        f"dataset      {m['dataset']['id']} split {m['dataset']['split']}, column "
        f"{m['dataset']['token_column'] or m['dataset']['text_column']}, order seed {m['dataset']['seed']}",
        f"contexts     {m['n_sequences']:,} x {m['context_size']} tokens, BOS policy {m['bos']['policy']} (id {m['bos']['token_id']})",
        f"storage      {cache.storage_dtype}, codec {m['storage']['codec']} + crc32c, chunks of "
        f"{m['storage']['chunk_tokens']:,} tokens ({m['storage']['seqs_per_chunk']} sequences)",
        f"size         {size / 1e9:.3f} GB on disk, {raw / 1e9:.3f} GB raw, ratio {raw / max(size, 1):.2f}",
        f"split        held-out tokens {m['split']['heldout'][0]:,}..{m['split']['heldout'][1]:,}, "
        f"train {m['split']['train'][0]:,}..{m['split']['train'][1]:,}",
        *shard_lines(cache),
        "arrays:",
    ]
    for name, a in m["arrays"].items():
        try:
            s = cache.stats(name)
            stat = f"mean norm {float((s.mean @ s.mean) ** 0.5):.3g}, E|x|^2 {s.mean_sq_norm:.4g}, variance {s.total_variance:.4g}"
        except CacheError:
            stat = "no statistics yet"
        lines.append(f"  {name:<16} {a['hook_name']:<28} width {a['width']:<6} {stat}")
    return lines


@dataclass
class Damage:
    key: str
    problem: str


def verify(cache: Cache, progress: bool = True) -> list[Damage]:
    """Read every committed chunk of every array (crc32c checks each) and check shapes against the manifest."""
    m = cache.manifest
    damage: list[Damage] = []
    for name, a in m["arrays"].items():
        arr = cache.array(name)
        shape = (m["n_tokens"], row_width(a["width"], cache.storage_dtype))
        if arr.shape != shape:
            damage.append(Damage(f"acts/{name}", f"shape {arr.shape}, manifest says {shape}"))
    if not cache.complete:
        damage.append(Damage("zarr.json", f"unfinished: {cache.chunks_committed} of {cache.n_chunks} chunks committed"))
    names = cache.array_names + ["tokens"]
    ct = cache.chunk_tokens
    present = set(remote.listing(cache.path)) if cache.remote else None  # one listing, not a request per chunk
    root = Path(cache.path)
    for i in tqdm(range(cache.chunks_committed), desc="verify", unit="chunk", disable=not progress):
        r0, r1 = i * ct, min((i + 1) * ct, m["n_tokens"])
        for name in names:
            key = chunk_key(name, i)
            if not (key in present if present is not None else (root / key).is_file()):
                damage.append(Damage(key, "missing"))
                continue
            try:
                (cache.tokens if name == "tokens" else cache.array(name))[r0:r1]
            except Exception as e:  # noqa: BLE001 - any decode failure is damage
                damage.append(Damage(key, f"unreadable ({str(e).splitlines()[0][:80]})"))
    return damage
