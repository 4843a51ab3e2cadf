"""The report of one cache: every evaluated run of it side by side, in Markdown with PNG plots.

``runs/<fingerprint>/report.md`` and ``runs/<fingerprint>/report/*.png``: the comparison table, each
run's training curves (FVU and AuxDead latents over tokens, from its metrics.jsonl), the feature-density
histogram (log10 density of each run's live latents), FVU against L0 across runs, FVU of each
Matryoshka prefix against the latents it uses, the hierarchy statistics per group, and the top
contexts of a few live latents sampled per run. It reads each run's ``eval.json`` and ``eval.npz``
(density and top contexts), so it can be rebuilt at any time without evaluating again.
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..cache import Cache
from ..run_folder import EVAL_FILES, Place
from .contexts import cache_tokenizer, markdown_safe, top_contexts

LEGEND = ("*dead*: latents that fire on none of the evaluated held-out tokens. Training's *AuxDead* (progress bar, "
          "`aux_dead` in metrics.jsonl, the training curves below) is another count: latents that fired on none of "
          "the last `dead_tokens` training tokens (20 steps under `reference`), the ones the auxiliary loss trains. "
          "*FVU (scalar mean)*: the squared error over the variance about one mean of all N·d numbers (the seed "
          "repository's FVU); *FVU*: about each dimension's own mean. A – is a metric that was not computed or "
          "came out non-finite.")
"""The runs table's legend (in the report, under the table)."""

SAMPLED_LATENTS = 4
"""Live latents per run whose top contexts the report shows (a fixed seed picks them)."""


def runs_of(folder: Path) -> list[dict[str, Any]]:
    """The eval.json of every evaluated run in a cache's run folder, by name; ``"eval_dir"`` is the folder
    each was read from (its eval.npz and metrics.jsonl are there)."""
    out = []
    for p in sorted(Path(folder).glob("*/eval.json")):
        try:
            out.append({**json.loads(p.read_text()), "eval_dir": str(p.parent)})
        except (OSError, ValueError):
            continue  # a run being evaluated right now: it joins the next report
    return out


def publish_report(cache: Cache, folder: Place, rewrite: bool = True) -> Path | str:
    """The report of the evaluated runs in ``folder`` (a cache's folder of a runs folder, local or on object
    storage): their eval files fetched into its local copy, the report written there and published, images
    before ``report.md``. Returns where the team finds it. ``rewrite=False`` keeps an existing report."""
    if rewrite or not folder.exists("report.md"):
        folder.fetch(keep=lambda key: key.count("/") == 1 and key.split("/")[1] in EVAL_FILES)
        write_report(cache, runs_of(folder.work), folder.work)
        folder.publish("report", "report.md")
    return folder.home.join("report.md").pathlike


def _figure():
    from matplotlib.figure import Figure  # no pyplot: no global state, the Agg canvas, no display needed

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    return fig, fig.add_subplot()


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path.name


def _density_plot(results: list[dict], npz: dict[str, Any], out: Path) -> str:
    fig, ax = _figure()
    logs = {r["run"]: np.log10(npz[r["run"]]["density"][npz[r["run"]]["density"] > 0]) for r in results
            if r["run"] in npz}
    lo = min((v.min() for v in logs.values() if len(v)), default=-6.0)
    bins = np.linspace(np.floor(lo), 0, 50)
    for r in results:
        if r["run"] in logs:
            ax.hist(logs[r["run"]], bins=bins, histtype="step", linewidth=1.5, label=f"{r['run']} ({r['dead']} dead)")
    ax.set_xlabel("log10 feature density (fraction of held-out tokens)")
    ax.set_ylabel("live latents")
    ax.set_title("Feature density")
    ax.legend(fontsize=8)
    return _save(fig, out / "density.png")


def draw_fvu_l0(ax, results: list[dict]) -> None:
    """FVU against L0, one labelled point per run (the report's PNG and the feature browser's SVG)."""
    for r in results:
        ax.scatter(r["l0"], r["fvu"], s=30)
        ax.annotate(r["run"], (r["l0"], r["fvu"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("FVU")
    ax.grid(alpha=0.3)


def nested(results: list[dict]) -> list[dict]:
    """The runs with more than one Matryoshka prefix."""
    return [r for r in results if len(r["prefix_fvu"]) > 1]


def draw_prefix(ax, results: list[dict]) -> None:
    """FVU of each Matryoshka prefix against the latents it uses, one line per run of :func:`nested`."""
    for r in results:
        ax.plot(np.cumsum(r["config"]["group_sizes"]), r["prefix_fvu"], marker="o", label=r["run"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("latents in the prefix (groups 1..g)")
    ax.set_ylabel("FVU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _fvu_l0_plot(results: list[dict], out: Path) -> str:
    fig, ax = _figure()
    draw_fvu_l0(ax, results)
    ax.set_title("FVU against L0")
    return _save(fig, out / "fvu_l0.png")


def _prefix_plot(results: list[dict], out: Path) -> str | None:
    if not nested(results):
        return None
    fig, ax = _figure()
    draw_prefix(ax, nested(results))
    ax.set_title("FVU per Matryoshka prefix")
    return _save(fig, out / "prefix_fvu.png")


def training_curves(run_dir: Path) -> dict[str, np.ndarray]:
    """A run's metrics.jsonl as columns (tokens, fvu, l0, aux_dead, reader_wait), in logged order; a line cut
    short by a kill is skipped, a null (a non-finite metric) is NaN. Empty when the run logged nothing."""
    rows = []
    try:
        for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    except OSError:
        return {}
    keys = ("tokens", "fvu", "l0", "aux_dead", "reader_wait")
    if not rows:
        return {}
    return {k: np.array([np.nan if r.get(k) is None else r[k] for r in rows], dtype=float) for k in keys}


def _training_plot(results: list[dict], out: Path) -> str | None:
    """FVU and AuxDead latents over training tokens, every run in one figure (what W&B would show, offline)."""
    curves = {r["run"]: c for r in results if (c := training_curves(Path(r["eval_dir"])))}
    if not curves:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 6.0), dpi=100)
    fvu, dead = fig.subplots(2, 1, sharex=True)
    for run, c in curves.items():
        fvu.plot(c["tokens"], c["fvu"], label=run)
        dead.plot(c["tokens"], c["aux_dead"], label=run)
    fvu.set_yscale("log")
    fvu.set_ylabel("FVU (training batches)")
    fvu.set_title("Training curves")
    dead.set_ylabel("AuxDead latents (no firing\nin the last dead_tokens)")
    dead.set_ylim(bottom=0)
    dead.yaxis.get_major_locator().set_params(integer=True)
    dead.set_xlabel("training tokens")
    for ax in (fvu, dead):
        ax.grid(alpha=0.3)
    fvu.legend(fontsize=8)
    return _save(fig, out / "training.png")


def _num(v: Any, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


OPTIONAL_COLUMNS = [  # (header, eval.json section, key, format): shown when some run has the section
    ("CE recovered (zero-abl.)", "lm", "ce_recovered_zero", ".3f"),
    ("CE recovered (mean-abl.)", "lm", "ce_recovered_mean", ".3f"),
    ("KL", "lm", "kl", ".4f"), ("GT recovery", "ground_truth", "recovery", ".3f"),
    ("GT absorption", "ground_truth", "absorption", ".3f")]


def _table(results: list[dict]) -> list[str]:
    extra = [c for c in OPTIONAL_COLUMNS if any(r.get(c[1]) for r in results)]
    rows = ["| run | arch | site (→ target) | width | k | L0 | FVU | FVU (scalar mean) | cosine | dead | dense | "
            "absorption | splitting | splitting (cond.) | monosemanticity |" + "".join(f" {c[0]} |" for c in extra),
            "|" + "---|" * (15 + len(extra))]
    for r in results:
        c, f = r["config"], r.get("features") or {}
        sites = c["source"] if c["target"] in (None, c["source"]) else f"{c['source']} → {c['target']}"
        rows.append(f"| {r['run']} | {c['arch']} | {sites} | {c['width']} | {_num(c['k'], 'd')} | "
                    f"{_num(r['l0'], '.1f')} | {_num(r['fvu'], '.4f')} | {_num(r['fvu_seed'], '.4f')} | "
                    f"{_num(r['cosine'], '.3f')} | {r['dead']} | "
                    f"{r['dense']} | {_num(f.get('absorption'), '.2e')} | {_num(f.get('splitting'), '.2e')} | "
                    f"{_num(f.get('splitting_conditional'), '.2e')} | {_num(f.get('monosemanticity'), '.3f')} |"
                    + "".join(f" {_num((r.get(sec) or {}).get(key), fmt)} |" for _, sec, key, fmt in extra))
    return rows + ["", LEGEND]


def _hierarchy(r: dict) -> list[str]:
    groups = (r.get("features") or {}).get("hierarchy") or []
    if len(groups) < 2:
        return []
    rows = [f"**{r['run']}**", "", "| group | size | density | L0 | dead | rare | earlier co-fire | within abs cos | "
            "between abs cos |", "|" + "---|" * 9]
    for g in groups:
        rows.append(f"| {g['group']} | {g['size']} | {g['density']:.2e} | {g['l0']:.2f} | {g['dead']} | {g['rare']} | "
                    f"{_num(g['earlier_cofire'], '.3f')} | {_num(g['within_cos'], '.3f')} | "
                    f"{_num(g['between_cos'], '.3f')} |")
    return rows + [""]


def _contexts(cache: Cache, results: list[dict], npz: dict[str, Any], n_latents: int) -> list[str]:
    tokenizer, why = cache_tokenizer(cache)
    if cache.manifest["tokenizer"].get("vocab_size", 2) <= 1:
        return [f"None: the cache's tokens carry no text ({why})."]
    lines = [] if tokenizer is not None else [f"Token ids are shown: {why}.", ""]
    for r in results:
        z = npz.get(r["run"])
        if z is None or "top_rows" not in z:
            continue
        live = np.flatnonzero(z["top_rows"][:, 0] >= 0)
        pick = sorted(np.random.default_rng(0).choice(live, min(n_latents, len(live)), replace=False).tolist())
        bounds = np.cumsum(r["config"]["group_sizes"] or [r["config"]["width"]])
        lines += [f"### {r['run']}", ""]
        for j, ctxs in top_contexts(cache, z["top_values"], z["top_rows"], pick, tokenizer).items():
            g = int(np.searchsorted(bounds, j, side="right"))
            lines.append(f"**latent {j}** (group {g}, density {z['density'][j]:.2e})")
            lines.append("")
            lines += [f"{i}. `{v:.3g}` {markdown_safe(t)}" for i, (v, t) in enumerate(ctxs, 1)]
            lines.append("")
    return lines


def write_report(cache: Cache, results: list[dict[str, Any]], folder: Path,
                 n_latents: int = SAMPLED_LATENTS) -> Path:
    """Write ``folder/report.md`` and ``folder/report/*.png`` for ``results`` (eval.json dicts) of ``cache``.
    Returns the report's path."""
    folder = Path(folder)
    path = folder / "report.md"
    results = sorted(results, key=lambda r: r["run"])
    npz = {}
    for r in results:
        f = Path(r["eval_dir"]) / "eval.npz"
        if f.is_file():
            with np.load(f) as z:
                npz[r["run"]] = dict(z)
    images = folder / "report"
    images.mkdir(parents=True, exist_ok=True)
    plots = [("Training curves", _training_plot(results, images)),
             ("Feature density", _density_plot(results, npz, images)),
             ("FVU against L0", _fvu_l0_plot(results, images)),
             ("FVU per Matryoshka prefix", _prefix_plot(results, images))]
    m = cache.manifest
    held = cache.split["heldout"]
    lines = [f"# Evaluation report: cache {cache.fingerprint}", "",
             f"Cache `{cache.path}`: model `{m['model']['name']}`, arrays {', '.join(f'`{a}`' for a in m['arrays'])}, "
             f"held-out rows {held[0]:,}..{held[1]:,}. Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. "
             "Metric definitions: docs/evaluation.md.", "", "## Runs", "", *_table(results), ""]
    for title, name in plots:
        if name:
            lines += [f"## {title}", "", f"![{title}](report/{name})", ""]
    hier = [line for r in results for line in _hierarchy(r)]
    if hier:
        lines += ["## Hierarchy per Matryoshka group", "", *hier]
    ctx = _contexts(cache, results, npz, n_latents)
    if ctx:
        lines += ["## Top-activating contexts (sampled live latents)", "", *ctx]
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path
