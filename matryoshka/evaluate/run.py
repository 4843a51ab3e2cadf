"""`pipeline evaluate`: metrics of trained runs on their cache's held-out split, and one comparison table.

With a run folder: that run. With ``--cache``: every run trained on that cache. With neither: the most
recently trained run under ``runs_dir`` (as the seed's evaluation script did). Each run gets an
``eval.json``::

    {"run": name, "fingerprint": cache fingerprint, "tokens": evaluated tokens,
     "fvu", "fvu_seed", "mse", "cosine", "l0", "prefix_fvu": [per group], "dead", "dense",
     "dead_per_group": [...], "dense_above": 0.1, "config": the run's config.json}
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..cache import Cache, CacheError
from ..config import EvaluateConfig
from ..train.load import load
from .metrics import reconstruction

def find_runs(run: str | None, cache: str | None, runs_dir: str = "runs") -> list[Path]:
    if run is not None:
        p = Path(run)
        if not (p / "checkpoint" / "model.safetensors").is_file():
            raise CacheError(f"evaluate: {run!r} is not a trained run (no checkpoint/model.safetensors)")
        return [p]
    root = Path(runs_dir)
    if cache is not None:
        root = root / Cache(cache).fingerprint
    runs = sorted(p.parent.parent for p in root.glob("**/checkpoint/model.safetensors"))
    if not runs:
        raise CacheError(f"evaluate: no trained runs under {str(root)!r}; train some with `pipeline train`")
    if cache is None:
        runs = [max(runs, key=lambda p: (p / "checkpoint" / "model.safetensors").stat().st_mtime)]
    return runs


def evaluate(cfg: EvaluateConfig, progress: bool = False) -> list[dict[str, Any]]:
    """Evaluate runs (see the module docstring), write their eval.json, return the results."""
    cache, batch_size, dense_above = cfg.cache, cfg.batch_size, cfg.dense_above
    results = []
    for path in find_runs(cfg.run, cache, cfg.runs_dir):
        dic = load(path)
        cfg = dic.config
        c = Cache(cache or cfg["cache"])
        if c.fingerprint != cfg["fingerprint"]:
            raise CacheError(f"evaluate: run {str(path)!r} was trained on cache {cfg['fingerprint']}, not on "
                             f"{c.path!r} ({c.fingerprint})")
        r = reconstruction(dic, c, cfg["source"], cfg["target"], batch_size=batch_size, dense_above=dense_above)
        out = {"run": cfg["name"], "path": str(path), "fingerprint": c.fingerprint,
               **{k: v for k, v in dataclasses.asdict(r).items() if k != "density"},
               "dense_above": dense_above, "config": cfg}
        (path / "eval.json").write_text(json.dumps(out, indent=2))
        results.append(out)
    return results


def table(results: list[dict[str, Any]]) -> str:
    head = f"{'run':<24} {'arch':<10} {'width':>7} {'k':>4} {'L0':>7} {'FVU':>7} {'FVU seed':>8} {'cos':>6} " \
           f"{'dead':>6} {'dense':>6}  prefix FVU"
    lines = [head]
    for r in results:
        c = r["config"]
        lines.append(f"{r['run']:<24} {c['arch']:<10} {c['width']:>7} {c['k']:>4} {r['l0']:>7.1f} {r['fvu']:>7.4f} "
                     f"{r['fvu_seed']:>8.4f} {r['cosine']:>6.3f} {r['dead']:>6} {r['dense']:>6}  "
                     + " ".join(f"{v:.3f}" for v in r["prefix_fvu"]))
    return "\n".join(lines)
