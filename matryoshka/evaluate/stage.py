"""`pipeline evaluate`: metrics of trained runs on their cache's held-out split, and one comparison table.

With a run folder: that run. With ``--cache``: every run trained on that cache. With neither: the most
recently trained run under ``runs_dir`` (as the seed's evaluation script did). With ``--sae FOLDER``
(repeatable): those SAELens dictionaries on ``--cache`` (and the run folder, if one is given), their results
in ``RUNS_DIR/<fingerprint>/NAME/`` (see saelens.py). Each run gets an ``eval.json``::

    {"run": name, "fingerprint": cache fingerprint, "tokens": evaluated tokens,
     "fvu", "fvu_seed" (the tables' "FVU (scalar mean)"), "mse", "cosine", "l0", "prefix_fvu": [per group],
     "dead", "dense", "dead_per_group": [...], "dense_above": 0.1, "config": the run's config.json,
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

Each run folder is locked while it is evaluated (the lock training holds, see ``train/trainer.py``): a run
being trained is refused before anything is evaluated. JSON is written by ``strict_json``: a non-finite
metric is ``null``, and non-finite LM metrics (a spliced CE or KL of NaN or inf) also put a ``failed`` line
into that eval.json and fail the command (:class:`~matryoshka.evaluate.errors.NonFiniteMetrics`, exit 1)
once every run is evaluated; ``pipeline run`` evaluates a failed run again.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import shutil
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from .. import strict_json
from ..cache import Cache, CacheError, local_copy
from ..cache.location import Location
from ..config import EvaluateConfig, check_device
from ..files import write_atomic
from ..run_folder import RunFolder, Workspace, is_trained, last_trained, trained_runs
from ..train.dictionary import Dictionary
from ..train.load import checkpoint_dir, load
from ..train.saelens import SAELensConfig
from .contexts import TopContexts
from .errors import NonFiniteMetrics
from .features import feature_metrics, heldout_codes
from .ground_truth import ground_truth
from .metrics import reconstruction
from .overlap import check_disjoint
from .report import publish_report
from .saelens import check_saes, load_sae
from .splice import LM, Splice, dictionary_fn, no_lm_reason


def find_runs(run: str | None, cache: str | None, runs_dir: str = "runs") -> list[Location]:
    """The run folders to evaluate (module docstring), local or on object storage."""
    if run is not None:
        where = Location.of(run)
        if not is_trained(where):
            raise CacheError(f"evaluate: {run!r} is not a trained run (no checkpoint/model.safetensors)")
        return [where]
    root = Location.of(runs_dir)
    if cache is not None:
        root = root.join(Cache(cache).fingerprint)
    runs = trained_runs(root)
    if not runs:
        raise CacheError(f"evaluate: no trained runs under {str(root)!r}; train some with `pipeline train`")
    return runs if cache is not None else [last_trained(runs)]


@dataclasses.dataclass
class _Entry:
    """One dictionary to evaluate: where its results go (``out``), where it is read from (``source``: a trained
    run; None for a SAELens folder), its run config, its cache, and how to load it (when its turn comes, so
    that only one is in memory at a time)."""

    out: RunFolder
    source: RunFolder | None
    config: dict[str, Any]
    cache: Cache
    load: Callable[[], Dictionary]


def _folders(cfg: EvaluateConfig, space: Workspace,
             runs: list[str | Path | Location]) -> list[tuple[RunFolder, RunFolder]]:
    """Each run's folder and the folder its results go to: the run's own, or with ``results_dir`` one of
    the same name there (the run folder is then only read: it may be a teammate's)."""
    out = []
    for where in runs:
        source = space.run(where)
        if cfg.results_dir is None:
            out.append((source, source))
            continue
        saved = source.saved_config() or {}
        home = Location.of(cfg.results_dir).join(str(saved.get("fingerprint")), source.name)
        out.append((source, source if home.same_place(source.home) else space.run(home)))
    return out


def _entries(settings: EvaluateConfig, runs: list[tuple[RunFolder, RunFolder]], saes: list[str],
             space: Workspace) -> list[_Entry]:
    """Each run, then each SAELens folder in ``saes``, all checked against their cache before the first is
    evaluated (a refusal leaves no eval.json behind; see saelens.py). Runs on one cache share one ``Cache``,
    so that its local copy's counts (:mod:`~matryoshka.cache.local_copy`) are the whole command's."""
    cache, local_cache_dir = settings.cache, settings.local_cache_dir
    opened: dict[str, Cache] = {}

    def open_cache(where: str) -> Cache:
        if where not in opened:
            opened[where] = Cache(where, local_cache_dir=local_cache_dir)
        return opened[where]

    checked = []
    if saes:
        if cache is None:
            raise CacheError("evaluate: --sae needs --cache, the cache to evaluate the SAELens dictionaries on")
        _check_heldout(open_cache(cache))
        checked = check_saes(saes, opened[cache], settings.results_dir or settings.runs_dir, space)
    entries = []
    for source, out in runs:
        c, cfg = _checked_cache(source, cache, open_cache)
        entries.append(_Entry(out, source, cfg, c, functools.partial(load, source.work)))
    for sae, sae_cfg, home in checked:
        out = space.run(home)
        entries.append(_Entry(out, None, sae_cfg, opened[cache], functools.partial(_sae_dictionary, sae, sae_cfg, out)))
    return entries


def _sae_dictionary(sae: SAELensConfig, cfg: dict[str, Any], out: RunFolder) -> Dictionary:
    out.work.mkdir(parents=True, exist_ok=True)
    return load_sae(sae, cfg)


def evaluate(cfg: EvaluateConfig, progress: bool = False,
             runs: list[str | Path | Location] | None = None) -> list[dict[str, Any]]:
    """Evaluate runs (see the module docstring; ``runs``: these run folders instead; ``cfg.sae``: SAELens
    folders, on ``cfg.cache``, with the run ``cfg.run`` if one is given), write their eval.json, return the
    results. Each cache's LM is loaded once for all of its runs and run once per held-out batch for all of
    them (their splices in the same pass). Every folder results go to is locked first: a run being trained
    (or evaluated) elsewhere stops the command before any work."""
    check_device(cfg.device)
    saes = list(cfg.sae or [])
    if runs is None:
        runs = [] if saes and cfg.run is None else find_runs(cfg.run, cfg.cache, cfg.runs_dir)
    with Workspace() as space, ExitStack() as locks:
        folders = _folders(cfg, space, runs)
        for _, out in folders:
            locks.enter_context(out.lock("evaluated", cfg.break_lock))
        for source, out in folders:  # after the locks: what an evaluation of one's own run reads no longer changes
            source.fetch(keep=lambda key: not key.startswith(("saelens/", "eval.")), state=False)
            if out is not source and (source.work / "metrics.jsonl").is_file():  # the report's curves
                shutil.copyfile(source.work / "metrics.jsonl", out.work / "metrics.jsonl")
                out.publish("metrics.jsonl")
        return _evaluate(cfg, progress, folders, saes, space)


def _evaluate(cfg: EvaluateConfig, progress: bool, runs: list[tuple[RunFolder, RunFolder]], saes: list[str],
              space: Workspace) -> list[dict[str, Any]]:
    batch_size, dense_above = cfg.batch_size, cfg.dense_above
    settings, results, caches = cfg, [], {}
    lms: dict[str, LM | None] = {}  # per cache fingerprint: its LM, loaded once, or None (skipped)
    pending: list[tuple[RunFolder, dict[str, Any], Splice]] = []  # runs of the current LM, waiting for its one pass
    lm = None
    entries = _entries(settings, runs, saes, space)
    read = _ReadLines(entries)
    for e in entries:
        c = e.cache
        read.start(c)
        dic = e.load()
        cfg = dic.config
        if pending and pending[0][1]["fingerprint"] != c.fingerprint:
            results += _lm_pass(lm, pending)  # before the next cache's LM replaces this one
            pending = []
        lm = _lm_of(c, settings, lms, progress)  # before any work: a model that cannot be loaded stops here
        r = reconstruction(dic, c, cfg["source"], cfg["target"], batch_size=batch_size, dense_above=dense_above)
        out = {"run": cfg["name"], "path": str(e.source.home if e.source else e.out.home),
               "fingerprint": c.fingerprint, **{k: v for k, v in dataclasses.asdict(r).items() if k != "density"},
               "dense_above": dense_above, "config": cfg}
        truth = ground_truth(dic, c, cfg["source"], cfg["target"], batch_size=batch_size)
        if truth is not None:
            out["ground_truth"] = truth.to_json()
        features = _features_and_contexts(dic, c, settings, r.density, e.out.work, progress)
        if features is not None:
            out["features"] = features
        pending.append((e.out, out, Splice(cfg["target"] or cfg["source"], dictionary_fn(dic), cfg["source"])))
        caches[str(e.out.home).rsplit("/", 1)[0]] = c
    results += _lm_pass(lm, pending)
    read.end()
    if settings.report:
        for folder, c in caches.items():
            report = publish_report(c, space.place(folder))
            for r in results:
                if r["fingerprint"] == c.fingerprint:
                    r["report"] = str(report)
    failed = [r["failed"] for r in results if "failed" in r]
    if failed:
        raise NonFiniteMetrics(f"evaluate: {'; '.join(failed)}: the spliced dictionary makes the LM's predictions "
                               "non-finite (look for NaN or inf in its weights or its training metrics); "
                               "eval.json records these metrics as null")
    return results


def _lm_pass(lm: LM | None, pending: list[tuple[RunFolder, dict[str, Any], Splice]]) -> list[dict[str, Any]]:
    """The LM metrics of one cache's runs in one pass over its held-out contexts (one clean forward per
    batch for all of them: :meth:`LM.downstream_many`), then each run's eval.json."""
    lm_results = {} if lm is None or not pending else lm.downstream_many(
        {i: splice for i, (_, _, splice) in enumerate(pending)},
        desc=f"LM {pending[0][1]['run']}" if len(pending) == 1 else f"LM {len(pending)} runs")
    for i, (folder, out, _) in enumerate(pending):
        out["lm"] = lm_results.get(i)
        bad = strict_json.non_finite(out["lm"] or {})
        if bad:
            out["failed"] = (f"run {out['run']}: non-finite LM metrics "
                             + ", ".join(f"{k} = {v}" for k, v in bad.items()))
        (folder.work / "eval.json").write_text(strict_json.dumps(out, indent=2))
        folder.publish("eval.npz", "eval.json")  # eval.json last: it always has a current eval.npz
    return [out for _, out, _ in pending]


def _checked_cache(run: RunFolder, cache: str | None,
                   open_cache: Callable[[str], Cache]) -> tuple[Cache, dict[str, Any]]:
    """The cache a run is evaluated on (``cache``, else the one it trained on) and the run's config, refused
    unless the cache has the run's fingerprint and a held-out split that shares no row with the rows the run
    trained on."""
    path = run.home
    cfg = json.loads((checkpoint_dir(run.work) / "config.json").read_text())
    c = open_cache(cache or cfg["cache"])
    if c.fingerprint != cfg["fingerprint"]:
        raise CacheError(f"evaluate: run {str(path)!r} was trained on cache {cfg['fingerprint']}, not on "
                         f"{c.path!r} ({c.fingerprint})")
    _check_heldout(c)
    check_disjoint(path, cfg, c)
    return c, cfg


@dataclasses.dataclass
class _ReadLines:
    """The local copy's two lines (:mod:`~matryoshka.cache.local_copy`) for each cache the command reads:
    at its first dictionary, how much of the held-out chunks it reads are already local; at the end, how many
    chunks came from the store. Nothing for a cache without a local copy."""

    entries: list[_Entry]
    started: list[Cache] = dataclasses.field(default_factory=list)

    def start(self, cache: Cache) -> None:
        if any(c is cache for c in self.started):
            return
        self.started.append(cache)
        arrays = sorted({a for e in self.entries if e.cache is cache
                         for a in (e.config["source"], e.config.get("target")) if a})
        _say(local_copy.start_line(cache, arrays, split="heldout"))

    def end(self) -> None:
        for cache in self.started:
            _say(local_copy.end_line(cache))


def _say(line: str | None) -> None:
    if line:
        print(line, file=sys.stderr)


def _check_heldout(c: Cache) -> None:
    if c.split["heldout"][0] == c.split["heldout"][1]:
        raise CacheError(f"evaluate: cache {c.path!r} has no held-out split; evaluation reads only held-out "
                         "tokens (`pipeline harvest` holds out at least one chunk: --holdout)")


def _lm_of(cache: Cache, settings: EvaluateConfig, lms: dict[str, LM | None], progress: bool) -> LM | None:
    """The cache's LM, loaded at its first run; None, said in one line, with --no-lm or a cache without one."""
    if cache.fingerprint not in lms:
        reason = "--no-lm" if not settings.lm else no_lm_reason(cache)
        if reason is not None:
            print(f"evaluate: downstream LM metrics skipped ({reason})", file=sys.stderr)
        lms.clear()  # one LM in memory at a time
        lms[cache.fingerprint] = None if reason else LM.load(
            cache, tokens=settings.lm_tokens, batch_size=settings.lm_batch_size, device=settings.device,
            progress=progress, model=settings.model)
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
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(path / "eval.npz", buffer.getvalue())
    if not settings.features:
        return None
    return feature_metrics(dic.W_dec, dic.group_sizes, codes, settings.absorption_above, settings.split_above,
                           settings.rare_below, settings.block_mb, progress=progress).to_json()


def _num(v: float | None, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


LEGEND = ("dead: latents that fire on none of the evaluated held-out tokens (training's AuxDead counts those "
          "that fired on none of the last dead_tokens training tokens); FVU scalar-mean: the squared error over "
          "the variance about one mean of all numbers (the seed repository's FVU), FVU: about each dimension's mean")
"""The legend printed under :func:`table` (by ``pipeline evaluate`` and ``pipeline run``): which "dead" it
counts, and what its second FVU is."""


def table(results: list[dict[str, Any]]) -> str:
    truth = any("ground_truth" in r for r in results)  # a synthetic cache: recovery and absorption columns
    downstream = any(r.get("lm") for r in results)  # CE recovered against zero- and mean-ablation, KL
    head = f"{'run':<24} {'arch':<10} {'width':>7} {'k':>4} {'L0':>7} {'FVU':>7} {'FVU scalar-mean':>15} {'cos':>6} " \
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
        k = "-" if c["k"] is None else c["k"]  # a SAELens dictionary without a k (ReLU, JumpReLU)
        lines.append(f"{r['run']:<24} {c['arch']:<10} {c['width']:>7} {k:>4} {_num(r['l0'], '.1f'):>7} "
                     f"{_num(r['fvu']):>7} {_num(r['fvu_seed']):>15} {_num(r['cosine'], '.3f'):>6} {r['dead']:>6} "
                     f"{r['dense']:>6}{cells}  " + " ".join(_num(v, ".3f") for v in r["prefix_fvu"]))
    return "\n".join(lines)
