"""Write the browser: ``RUNS_DIR/<fingerprint>/browse/``, next to the cache's ``report.md``.

Layout (every file static; opened from ``file://`` it loads nothing from the network)::

    browse/index.html                 the runs page: sortable comparison table, FVU vs L0, FVU per prefix
    browse/static/browse.{js,css}     the pages' only script and style
    browse/<run>/latent.html?i=J      one latent; hierarchy.html (group-1 roots, their children);
                                      search.html?q=TOKEN
    browse/<run>/data/meta.js         the run's settings (small, on every page)
    browse/<run>/data/s/NNNNN.js      shard n: latents [n * SHARD, (n+1) * SHARD), their token strings
    browse/<run>/data/tree.js         parent, share, density and label of every latent (hierarchy page)
    browse/<run>/data/q/NNNNN.js      search bucket: activating token -> latents (see ``bucket``)

Data files are scripts calling ``browse.put(key, data)`` rather than JSON: browsers refuse ``fetch`` of
``file://`` URLs, but a ``<script>`` added on demand loads from disk, so a page reads only its own shard
and the site's size is linear in the number of latents. A run's folder is written beside the old one and
renamed into place, so a failed build leaves the previous site whole.
"""
from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

from ..evaluate.report import OPTIONAL_COLUMNS, draw_fvu_l0, draw_prefix, nested
from .build import RunData

SHARD = 256
"""Latents per data shard: one latent page loads one shard (about SHARD x the bytes per latent)."""
LATENTS_PER_BUCKET = 512
STATIC = Path(__file__).parent / "static"
TEMPLATES = Path(__file__).parent / "templates"


def bucket(token: str, n: int) -> int:
    """The search bucket of a normalised token (stripped, lower case): a 32-bit multiplicative hash of its
    code points, which browse.js computes the same way."""
    h = 0
    for ch in token:
        h = (h * 31 + ord(ch)) & 0xFFFFFFFF
    return h % n


def normalise(token: str) -> str:
    return token.strip().lower()


def _env():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    return Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]),
                       undefined=StrictUndefined, keep_trailing_newline=True)


def _script(key: str, data: Any) -> str:
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")  # no "</script>"
    return f"browse.put({json.dumps(key)},{text});\n"


def _write(path: Path, text: str) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return len(text.encode("utf-8"))


def write_run(data: RunData, site: Path) -> dict[str, int]:
    """The run's folder under ``site``; returns the bytes written per kind of file."""
    final = site / data.name
    tmp = site / f".{data.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    W = len(data.latents)
    n_buckets = max(1, math.ceil(W / LATENTS_PER_BUCKET))
    meta = {**data.meta, "shard": SHARD, "buckets": n_buckets}
    size = {"meta": _write(tmp / "data" / "meta.js", _script("meta", meta)), "shards": 0, "tree": 0, "search": 0}
    for s0 in range(0, W, SHARD):
        recs = data.latents[s0:s0 + SHARD]
        ids = {t for r in recs for c in r["top"] + r["quantile"] for t in c["t"]}
        size["shards"] += _write(tmp / "data" / "s" / f"{s0 // SHARD:05d}.js", _script(
            f"s{s0 // SHARD}", {"latents": recs, "strings": {str(t): data.strings[t] for t in sorted(ids)},
                                "labels": {str(r["id"]): data.labels[r["id"]] for r in recs}}))
    tree = {"parent": [r["parent"] for r in data.latents],
            "share": [r["candidates"][0][1] if r["candidates"] else 0 for r in data.latents],
            "density": [float(f"{r['density']:.3g}") for r in data.latents], "label": data.labels}
    size["tree"] = _write(tmp / "data" / "tree.js", _script("tree", tree))
    buckets: list[dict[str, list]] = [{} for _ in range(n_buckets)]
    for r in data.latents:
        best: dict[str, float] = {}
        for c in r["top"]:
            tok = normalise(data.strings[c["t"][c["c"]]])
            if tok:
                best[tok] = max(best.get(tok, 0.0), c["v"])
        for tok, v in best.items():
            buckets[bucket(tok, n_buckets)].setdefault(tok, []).append([r["id"], v])
    for b, entries in enumerate(buckets):
        for hits in entries.values():
            hits.sort(key=lambda h: (-h[1], h[0]))
        size["search"] += _write(tmp / "data" / "q" / f"{b:05d}.js", _script(f"q{b}", entries))
    env = _env()
    for page in ("latent", "hierarchy", "search"):
        _write(tmp / f"{page}.html", env.get_template(f"{page}.html.j2").render(run=data.name, page=page))
    if final.exists():
        old = site / f".{data.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    return size


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.tight_layout()
    fig.savefig(buf, format="svg")
    text = buf.getvalue()
    return text[text.index("<svg"):]


def plots(results: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(title, inline SVG) of FVU against L0 and, for nested dictionaries, FVU per Matryoshka prefix: the
    report's two plots (evaluate/report.py draws them), as SVG."""
    from matplotlib.figure import Figure

    out = []
    for title, draw, runs in (("FVU against L0", draw_fvu_l0, results),
                              ("FVU per Matryoshka prefix", draw_prefix, nested(results))):
        if runs:
            fig = Figure(figsize=(5.6, 3.6), dpi=100)
            draw(fig.add_subplot(), runs)
            out.append((title, _svg(fig)))
    return out


def _cell(v: Any, fmt: str) -> tuple[str, str]:
    """(shown text, sort key) of a table cell."""
    if v is None:
        return "–", ""
    return format(v, fmt), repr(v)


def runs_table(results: list[dict[str, Any]]) -> tuple[list[str], list[list[tuple[str, str]]]]:
    extra = [c for c in OPTIONAL_COLUMNS if any(r.get(c[1]) for r in results)]
    head = ["run", "arch", "site", "width", "k", "L0", "FVU", "FVU (scalar mean)", "dead", "dense", "absorption",
            "splitting (cond.)", "prefix FVU"] + [c[0] for c in extra]
    rows = []
    for r in results:
        c, f = r["config"], r.get("features") or {}
        site = c["source"] if c.get("target") in (None, c["source"]) else f"{c['source']} → {c['target']}"
        rows.append([(r["run"], r["run"]), (c["arch"], c["arch"]), (site, site), _cell(c["width"], "d"),
                     _cell(c["k"], "d"), _cell(r["l0"], ".1f"), _cell(r["fvu"], ".4f"), _cell(r["fvu_seed"], ".4f"),
                     _cell(r["dead"], "d"), _cell(r["dense"], "d"), _cell(f.get("absorption"), ".2e"),
                     _cell(f.get("splitting_conditional"), ".2e"),
                     (" ".join(f"{v:.3f}" for v in r["prefix_fvu"]), repr(r["prefix_fvu"][0]))]
                    + [_cell((r.get(sec) or {}).get(key), fmt) for _, sec, key, fmt in extra])
    return head, rows


def write_index(site: Path, results: list[dict[str, Any]], title: str) -> Path:
    """The runs page, linking each run that has latent pages, and the static files."""
    (site / "static").mkdir(parents=True, exist_ok=True)
    for f in STATIC.iterdir():
        if f.is_file():
            shutil.copyfile(f, site / "static" / f.name)
    head, rows = runs_table(results)
    built = {r["run"]: (site / r["run"] / "latent.html").is_file() for r in results}
    page = _env().get_template("index.html.j2").render(title=title, head=head, rows=rows, results=results,
                                                       built=built, plots=plots(results), page="index", run=None)
    _write(site / "index.html", page)
    return site / "index.html"
