"""`pipeline browse`: a static, offline feature browser for trained dictionaries.

The pages are rendered with Jinja2 templates on the Python side (the runs page completely, with its plots
drawn by matplotlib as inline SVG), and one small script, ``static/browse.js``, renders the per-latent
pages from lazily loaded data shards. Why not vendored JS libraries: a templating or table library would
add a build- and licence-tracked dependency for what is here a few dozen lines (one sortable table, one
histogram of 24 bars, token spans), while Jinja2 and matplotlib are already installed and kept up to date
with the package; nothing has to be downloaded at build or view time.

Modules: :mod:`.sample` (the pass over held-out rows), :mod:`.records` (contexts, histograms),
:mod:`.family` (parents and children), :mod:`.truth` (synthetic ground truth), :mod:`.logits` (output
tokens), :mod:`.build` (one run's data), :mod:`.site` (files and pages), :mod:`.shared` (runs on object
storage), :mod:`.serve` (``--serve``).
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..cache import Cache, CacheError
from ..cache.location import Location
from ..errors import MatryoshkaError
from ..evaluate.report import runs_of
from ..run_folder import RunFolder, Workspace, is_trained
from .build import run_data
from .shared import SITE, folder_files, publish_index, publish_run, run_files
from .site import write_index, write_run

DEFAULT_TOKENS = 131_072
"""Held-out rows read per run by default: the top contexts and statistics come from these."""


def resolve_runs(runs: list[str], cache: str | None, runs_dir: str = "runs") -> list[Location]:
    """Run folders, local or URLs: those given, or every evaluated run of ``cache``, or the most recently
    evaluated run under ``runs_dir``."""
    if runs:
        out = []
        for r in runs:
            where = Location.of(r)
            if not is_trained(where):
                raise CacheError(f"browse: {r!r} is not a trained run (no checkpoint/model.safetensors)")
            if not where.exists("eval.json"):
                raise CacheError(f"browse: run {r!r} has no eval.json; evaluate it first: pipeline evaluate {r}")
            out.append(where)
        return out
    root = Location.of(runs_dir)
    if cache is not None:
        root = root.join(Cache(cache).fingerprint)
    evaluated = evaluated_runs(root, depth=1 if cache is not None else 2)
    if not evaluated:
        raise CacheError(f"browse: no evaluated runs under {str(root)!r}; run `pipeline evaluate` first")
    if cache is None:
        evaluated = [max(evaluated, key=lambda run: run.modified("eval.json") or 0.0)]
    return evaluated


def evaluated_runs(root: Location, depth: int) -> list[Location]:
    """The run folders ``depth`` levels under ``root`` that hold an eval.json (1: ``root`` is one cache's
    folder; 2: a runs folder), by path."""
    keys = root.listing() if root.exists() else {}
    names = sorted({key.rsplit("/", 1)[0] for key in keys
                    if key.count("/") == depth and key.rsplit("/", 1)[1] == "eval.json"})
    return [root.join(*name.split("/")) for name in names]


@dataclass(frozen=True)
class Site:
    """A built site: its runs page on this machine (what ``--serve`` serves; for runs on object storage, in
    the workspace's local copy) and where the team finds it (the same path, or the URL it was published to)."""

    index: Path
    shared: Path | str


def browse(runs: Sequence[str | Path | Location], space: Workspace, cache: str | None = None,
           tokens: int = DEFAULT_TOKENS, batch_size: int = 4096, local_cache_dir: str | None = None,
           progress: bool = False, out: str | Path | None = None) -> Site:
    """Build (or rebuild) the browser pages of ``runs`` and the runs page. All runs must come from one cache
    (one report folder); the site is that folder's ``browse/``, published there when the folder is on object
    storage (:mod:`.shared`), or the local folder ``out`` (nothing is then written next to the runs). Runs on
    object storage are read through ``space``; the returned site's local copy lives as long as it does."""
    for flag, value in (("--tokens", tokens), ("--batch-size", batch_size)):
        if value < 1:
            raise CacheError(f"browse: {flag} {value} must be at least 1")
    homes = [Location.of(r) for r in runs]
    folders = {home.parent for home in homes}
    if len(folders) != 1:
        raise CacheError(f"browse: the runs come from {len(folders)} cache folders "
                         f"({', '.join(sorted(map(str, folders)))}); "
                         "browse the runs of one cache at a time")
    folder = space.place(folders.pop())
    publish = out is None
    if publish:
        try:
            folder.home.check_writable(what="browse")
        except MatryoshkaError as e:
            raise type(e)(f"{e}; pass --out DIR to write the site to a local folder instead") from None
        site = folder.work / SITE
    else:
        site = _out_folder(out)
    folder_runs = [space.run(home) for home in homes]
    for run in folder_runs:
        run.fetch(keep=run_files, state=False)
    folder.fetch(keep=folder_files({run.name for run in folder_runs}, with_site=publish))
    caches = _checked_caches(folder_runs, cache, local_cache_dir)  # all of them before any page is written
    for run, c in zip(folder_runs, caches):
        t0 = time.perf_counter()
        data = run_data(run.work, c, tokens, batch_size, progress=progress)
        size = write_run(data, site)
        if publish:
            publish_run(folder, run.name)
        total = sum(size.values())
        if progress:
            print(f"browse: {run.name}: {data.meta['width']} latents, {total / 1e6:.1f} MB "
                  f"({total / data.meta['width']:,.0f} bytes per latent), {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr)
    index = write_index(site, runs_of(folder.work), folder.name)
    if not publish:
        return Site(index, index)
    publish_index(folder)
    return Site(index, folder.home.join(SITE, "index.html").pathlike)


def _out_folder(out: str | Path) -> Path:
    """``--out``: a local folder that can be written (a URL is refused: a site on the bucket is published to
    its runs' own folder, without ``--out``)."""
    where = Location.of(out)
    if where.remote:
        raise CacheError(f"browse: --out {str(out)!r} is not a local folder; without --out the site is published "
                         "next to the runs' report")
    where.check_writable(what="browse: --out")
    return Path(str(where))


def _checked_caches(runs: list[RunFolder], cache: str | None, local_cache_dir: str | None) -> list[Cache]:
    """The cache of each run (``cache``, else the one it was evaluated on), opened once each, refused unless
    it has the run's fingerprint."""
    opened: dict[str, Cache] = {}
    out = []
    for run in runs:
        cfg = json.loads((run.work / "eval.json").read_text())["config"]
        where = cache or cfg["cache"]
        if where not in opened:
            opened[where] = Cache(where, local_cache_dir=local_cache_dir)
        c = opened[where]
        if c.fingerprint != cfg["fingerprint"]:
            raise CacheError(f"browse: run {str(run.home)!r} was trained on cache {cfg['fingerprint']}, not on "
                             f"{c.path!r} ({c.fingerprint})")
        out.append(c)
    return out
