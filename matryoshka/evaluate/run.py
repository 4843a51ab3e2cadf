"""`pipeline evaluate`: metrics of trained runs on their cache's held-out split, and one comparison table.

With a run folder: that run. With ``--cache``: every run trained on that cache. With neither: the most
recently trained run under ``runs_dir`` (as the seed's evaluation script did). Each run gets an
``eval.json``::

    {"run": name, "fingerprint": cache fingerprint, "tokens": evaluated tokens,
     "fvu", "fvu_seed", "mse", "cosine", "l0", "prefix_fvu": [per group], "dead", "dense",
     "dead_per_group": [...], "dense_above": 0.1, "config": the run's config.json,
     "features": {                                  (absent with features: false; see features.py)
        "tokens": held-out tokens used (<= feature_tokens), "absorption", "absorbed_pairs",
        "splitting", "split_pairs", "splitting_conditional", "conditional_pairs",
        "monosemanticity": mean over scored latents, "monosemanticity_median",
        "monosemanticity_scored", "monosemanticity_excluded": dead + rare latents,
        "hierarchy": [{"group", "size", "density", "l0", "dead", "rare", "earlier_cofire",
                       "within_cos", "between_cos"} per group],
        "top_similar": [[i, j, cos], ...], "top_coactive": [[i, j, joint rate], ...],
        "settings": {"absorption_above", "split_above", "rare_below"}},
     "lm": {                                        (null with --no-lm or a cache without an LM; see splice.py)
        "sequences": held-out contexts, "tokens": scored predictions, "ce_clean", "ce_spliced",
        "ce_zero_ablated", "ce_mean_ablated", "ce_recovered_zero", "ce_recovered_mean" (null when the
        ablation does not change the CE), "kl": mean KL(clean || spliced) per scored prediction},
     "ground_truth": {"recovery", "recovery_parents", "recovery_children", "absorption", "absorption_events",
                      "tokens"}}                    (only for a cache with a ground truth; see ground_truth.py)

and an ``eval.npz`` of per-latent arrays: ``density`` [width], and with ``contexts: n > 0``
``top_values``/``top_rows`` [width, n] (the n largest activations and their cache rows; row -1: empty).
With ``report: true`` the cache's report is then rewritten: ``RUNS_DIR/<fingerprint>/report.md``.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..cache import Cache, CacheError
from ..config import EvaluateConfig, check_device
from ..train.dictionary import Dictionary
from ..train.load import checkpoint_dir, load
from .contexts import TopContexts
from .features import feature_metrics, heldout_codes
from .ground_truth import ground_truth
from .metrics import reconstruction
from .overlap import check_disjoint
from .report import runs_of, write_report
from .splice import LM, dictionary_fn, no_lm_reason

def find_runs(run: str | None, cache: str | None, runs_dir: str = "runs") -> list[Path]:
    if run is not None:
        p = Path(run)
        if not (checkpoint_dir(p) / "model.safetensors").is_file():
            raise CacheError(f"evaluate: {run!r} is not a trained run (no checkpoint/model.safetensors)")
        return [p]
    root = Path(runs_dir)
    if cache is not None:
        root = root / Cache(cache).fingerprint
    runs = sorted({p.parent.parent for p in root.glob("**/checkpoint*/model.safetensors")
                   if p.parent == checkpoint_dir(p.parent.parent)})
    if not runs:
        raise CacheError(f"evaluate: no trained runs under {str(root)!r}; train some with `pipeline train`")
    if cache is None:
        runs = [max(runs, key=lambda p: (checkpoint_dir(p) / "model.safetensors").stat().st_mtime)]
    return runs


def evaluate(cfg: EvaluateConfig, progress: bool = False, runs: list[Path] | None = None) -> list[dict[str, Any]]:
    """Evaluate runs (see the module docstring; ``runs``: these run folders instead), write their eval.json,
    return the results. Each cache's LM is loaded once for all of its runs."""
    check_device(cfg.device)
    cache, batch_size, dense_above, local_cache_dir = cfg.cache, cfg.batch_size, cfg.dense_above, cfg.local_cache_dir
    settings, results, caches = cfg, [], {}
    lms: dict[str, LM | None] = {}  # per cache fingerprint: its LM, loaded once, or None (skipped)
    # every run is checked against its cache before any is evaluated: a refusal leaves no eval.json behind
    checked = [(path, _checked_cache(path, cache, local_cache_dir))
               for path in (runs if runs is not None else find_runs(cfg.run, cache, cfg.runs_dir))]
    for path, c in checked:
        dic = load(path)
        cfg = dic.config
        lm = _lm_of(c, settings, lms, progress)  # before any work: a model that cannot be loaded stops here
        r = reconstruction(dic, c, cfg["source"], cfg["target"], batch_size=batch_size, dense_above=dense_above)
        out = {"run": cfg["name"], "path": str(path), "fingerprint": c.fingerprint,
               **{k: v for k, v in dataclasses.asdict(r).items() if k != "density"},
               "dense_above": dense_above, "config": cfg}
        truth = ground_truth(dic, c, cfg["source"], cfg["target"], batch_size=batch_size)
        if truth is not None:
            out["ground_truth"] = truth.to_json()
        features = _features_and_contexts(dic, c, settings, r.density, path, progress)
        if features is not None:
            out["features"] = features
        out["lm"] = None if lm is None else lm.downstream(dictionary_fn(dic), cfg["target"] or cfg["source"],
                                                          cfg["source"], desc=f"LM {cfg['name']}")
        (path / "eval.json").write_text(json.dumps(out, indent=2))
        results.append(out)
        caches[path.parent] = c
    if settings.report:
        for folder, c in caches.items():
            report = write_report(c, runs_of(folder), folder)
            for r in results:
                if Path(r["path"]).parent == folder:
                    r["report"] = str(report)
    return results


def _checked_cache(path: Path, cache: str | None, local_cache_dir: str | None) -> Cache:
    """The cache a run is evaluated on (``cache``, else the one it trained on), refused unless it has the
    run's fingerprint and a held-out split that shares no row with the rows the run trained on."""
    ck = checkpoint_dir(path)
    cfg = json.loads(((ck if ck.is_dir() else Path(path)) / "config.json").read_text())
    c = Cache(cache or cfg["cache"], local_cache_dir=local_cache_dir)
    if c.fingerprint != cfg["fingerprint"]:
        raise CacheError(f"evaluate: run {str(path)!r} was trained on cache {cfg['fingerprint']}, not on "
                         f"{c.path!r} ({c.fingerprint})")
    if c.split["heldout"][0] == c.split["heldout"][1]:
        raise CacheError(f"evaluate: cache {c.path!r} has no held-out split; evaluation reads only held-out "
                         "tokens (`pipeline harvest` holds out at least one chunk: --holdout)")
    check_disjoint(path, cfg, c)
    return c


def _lm_of(cache: Cache, settings: EvaluateConfig, lms: dict[str, LM | None], progress: bool) -> LM | None:
    """The cache's LM, loaded at its first run; None, said in one line, with --no-lm or a cache without one."""
    if cache.fingerprint not in lms:
        reason = "--no-lm" if not settings.lm else no_lm_reason(cache)
        if reason is not None:
            print(f"evaluate: downstream LM metrics skipped ({reason})", file=sys.stderr)
        lms.clear()  # one LM in memory at a time
        lms[cache.fingerprint] = None if reason else LM.load(
            cache, tokens=settings.lm_tokens, batch_size=settings.lm_batch_size, device=settings.device,
            progress=progress)
    return lms[cache.fingerprint]


def _features_and_contexts(dic: Dictionary, cache: Cache, settings: EvaluateConfig, density: np.ndarray, path: Path,
                           progress: bool) -> dict[str, Any] | None:
    """One more pass over the held-out split: feature metrics from its first ``feature_tokens`` tokens, top
    contexts from all of it; ``eval.npz`` written first, so an ``eval.json`` always has a current one."""
    top = TopContexts(dic.width, settings.contexts) if settings.contexts else None
    codes = None
    if settings.features or top is not None:
        codes = heldout_codes(dic, cache, dic.config["source"], settings.feature_tokens if settings.features else 0,
                              settings.batch_size, on_batch=top.add if top is not None else None, progress=progress)
    arrays = {"density": density} | ({"top_values": top.values, "top_rows": top.rows} if top is not None else {})
    tmp = path / "eval.npz.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path / "eval.npz")
    if not settings.features:
        return None
    return feature_metrics(dic.W_dec, dic.group_sizes, codes, settings.absorption_above, settings.split_above,
                           settings.rare_below, settings.block_mb, progress=progress).to_json()


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def table(results: list[dict[str, Any]]) -> str:
    truth = any("ground_truth" in r for r in results)  # a synthetic cache: recovery and absorption columns
    downstream = any(r.get("lm") for r in results)  # CE recovered against zero- and mean-ablation, KL
    head = f"{'run':<24} {'arch':<10} {'width':>7} {'k':>4} {'L0':>7} {'FVU':>7} {'FVU seed':>8} {'cos':>6} " \
           f"{'dead':>6} {'dense':>6}" + (f" {'recovery':>8} {'absorb':>7}" if truth else "") + \
           (f" {'CE rec0':>7} {'CE recM':>7} {'KL':>7}" if downstream else "") + "  prefix FVU"
    lines = [head]
    for r in results:
        c = r["config"]
        gt = r.get("ground_truth")
        cells = (f" {gt['recovery']:>8.3f} {gt['absorption']:>7.3f}" if gt else f" {'-':>8} {'-':>7}") if truth else ""
        if downstream:
            lm = r.get("lm") or {}
            cells += "".join(f" {_num(lm.get(k)):>7}" for k in ("ce_recovered_zero", "ce_recovered_mean", "kl"))
        lines.append(f"{r['run']:<24} {c['arch']:<10} {c['width']:>7} {c['k']:>4} {r['l0']:>7.1f} {r['fvu']:>7.4f} "
                     f"{r['fvu_seed']:>8.4f} {r['cosine']:>6.3f} {r['dead']:>6} {r['dense']:>6}{cells}  "
                     + " ".join(f"{v:.3f}" for v in r["prefix_fvu"]))
    return "\n".join(lines)
