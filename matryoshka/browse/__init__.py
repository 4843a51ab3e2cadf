"""`pipeline browse`: a static, offline feature browser for trained dictionaries.

The pages are rendered with Jinja2 templates on the Python side (the runs page completely, with its plots
drawn by matplotlib as inline SVG), and one small script, ``static/browse.js``, renders the per-latent
pages from lazily loaded data shards. Why not vendored JS libraries: a templating or table library would
add a build- and licence-tracked dependency for what is here a few dozen lines (one sortable table, one
histogram of 24 bars, token spans), while Jinja2 and matplotlib are already installed and kept up to date
with the package; nothing has to be downloaded at build or view time.

Modules: :mod:`.sample` (the pass over held-out rows), :mod:`.records` (contexts, histograms),
:mod:`.family` (parents and children), :mod:`.truth` (synthetic ground truth), :mod:`.logits` (output
tokens), :mod:`.build` (one run's data), :mod:`.site` (files and pages), :mod:`.serve` (``--serve``).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..cache import Cache, CacheError
from ..evaluate.report import runs_of
from ..train.load import checkpoint_dir
from .build import run_data
from .site import write_index, write_run

DEFAULT_TOKENS = 131_072
"""Held-out rows read per run by default: the top contexts and statistics come from these."""


def resolve_runs(runs: list[str], cache: str | None, runs_dir: str = "runs") -> list[Path]:
    """Run folders: those given, or every evaluated run of ``cache``, or the most recently evaluated run."""
    if runs:
        out = []
        for r in runs:
            p = Path(r)
            if not (checkpoint_dir(p) / "model.safetensors").is_file():
                raise CacheError(f"browse: {r!r} is not a trained run (no checkpoint/model.safetensors)")
            if not (p / "eval.json").is_file():
                raise CacheError(f"browse: run {r!r} has no eval.json; evaluate it first: pipeline evaluate {r}")
            out.append(p)
        return out
    root = Path(runs_dir) / Cache(cache).fingerprint if cache is not None else Path(runs_dir)
    evaluated = sorted(p.parent for p in root.glob("*/eval.json" if cache is not None else "*/*/eval.json"))
    if not evaluated:
        raise CacheError(f"browse: no evaluated runs under {str(root)!r}; run `pipeline evaluate` first")
    if cache is None:
        evaluated = [max(evaluated, key=lambda p: (p / "eval.json").stat().st_mtime)]
    return evaluated


def browse(runs: list[Path], cache: str | None = None, tokens: int = DEFAULT_TOKENS, batch_size: int = 4096,
           local_cache_dir: str | None = None, progress: bool = False) -> Path:
    """Build (or rebuild) the browser pages of ``runs`` and the runs page; returns the runs page's path.
    All runs must come from one cache (one report folder)."""
    for flag, value in (("--tokens", tokens), ("--batch-size", batch_size)):
        if value < 1:
            raise CacheError(f"browse: {flag} {value} must be at least 1")
    folders = {p.resolve().parent for p in runs}
    if len(folders) != 1:
        raise CacheError(f"browse: the runs come from {len(folders)} cache folders "
                         f"({', '.join(sorted(map(str, folders)))}); "
                         "browse the runs of one cache at a time")
    folder = folders.pop()
    site = folder / "browse"
    opened: dict[str, Cache] = {}
    for p in runs:
        cfg = json.loads((p / "eval.json").read_text())["config"]
        where = cache or cfg["cache"]
        if where not in opened:
            opened[where] = Cache(where, local_cache_dir=local_cache_dir)
        c = opened[where]
        if c.fingerprint != cfg["fingerprint"]:
            raise CacheError(f"browse: run {str(p)!r} was trained on cache {cfg['fingerprint']}, not on {c.path!r} "
                             f"({c.fingerprint})")
        t0 = time.perf_counter()
        data = run_data(p, c, tokens, batch_size, progress=progress)
        size = write_run(data, site)
        total = sum(size.values())
        if progress:
            print(f"browse: {p.name}: {data.meta['width']} latents, {total / 1e6:.1f} MB "
                  f"({total / data.meta['width']:,.0f} bytes per latent), {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr)
    return write_index(site, runs_of(folder), folder.name)
