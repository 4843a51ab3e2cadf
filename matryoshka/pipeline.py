"""`pipeline run`: harvest -> train -> evaluate from one pipeline.yaml, each stage doing only what is missing.

Every stage is already resumable on its own; this module decides what is left and hands it to the stage:

* **harvest** runs with ``resume`` on: a missing cache is harvested, an unfinished one continued, a complete
  one left alone (the harvest stage checks that its fingerprint is the config's).
* **train** trains the runs whose checkpoint is missing or short of its steps, from their checkpoints. Runs
  stopped at different steps (e.g. one added to the config later) train in separate groups, one per step:
  a run trained with others is bit-identical to one trained alone on the same stream, so the result equals
  an uninterrupted run. A run folder trained with another config is refused, never silently reused.
* **evaluate** evaluates the runs whose ``eval.json`` is missing, unreadable, of another cache, or older
  than their checkpoint.

So a second ``pipeline run`` of the same config writes nothing. The cache path is the harvest's (its
``cache`` key, else ``train.cache``, else the fingerprinted default), and it is what train and evaluate use.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cache import Cache
from .cache.location import Location
from .config import ConfigError, EvaluateConfig, PipelineConfig, TrainConfig, check_pipeline
from .run_folder import Place, RunFolder, Workspace


@dataclass
class Outcome:
    """What one ``pipeline run`` found and did."""

    cache: str
    trained: list[str]
    """Runs trained (or resumed) by this call; empty when every run was finished."""
    evaluated: list[str]
    """Runs evaluated by this call; empty when every eval.json was current."""
    results: list[dict[str, Any]]
    """Every run's eval.json, in config order."""
    table: str
    report: Path | str | None
    """The report's path (a URL for runs on object storage); None with ``evaluate.report: false``."""


def run_pipeline(cfg: PipelineConfig, progress: bool = True, echo: Callable[[str], None] = print) -> Outcome:
    """Bring every stage of ``cfg`` up to date (see the module docstring) and return what was done."""
    check_pipeline(cfg)
    _check_sections(cfg)
    cache = Cache(_harvest(cfg, progress, echo))
    train_cfg = cfg.train.model_copy(update={"cache": cache.path})
    root = Location.of(train_cfg.runs_dir).join(cache.fingerprint)
    with Workspace() as space:  # reads what each run has done, from wherever the runs are
        folders = [space.run(root.join(r.name)) for r in train_cfg.runs]
        trained = _train(train_cfg, cache, folders, progress, echo)
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 alone evaluates and writes the report
            return Outcome(cache=cache.path, trained=trained, evaluated=[], results=[], table="", report=None)
        evaluate_cfg = cfg.evaluate.model_copy(update={"runs_dir": train_cfg.runs_dir})
        evaluated = _evaluate(evaluate_cfg, folders, cache, progress, echo)
        results = [f.read_json("eval.json") for f in folders]
        from .evaluate.stage import table

        return Outcome(cache=cache.path, trained=trained, evaluated=evaluated, results=results,
                       table=table(results), report=_report(evaluate_cfg, cache, space.place(root), bool(evaluated)))


def _check_sections(cfg: PipelineConfig) -> None:
    """Keys that would point the stages at different data than the pipeline's own."""
    h, t, e = cfg.harvest, cfg.train, cfg.evaluate
    if not t.runs:
        raise ConfigError("train.runs: no runs to train; list at least one under train.runs")
    if h is None and not t.cache:
        raise ConfigError("harvest: the file has no harvest section and no train.cache; add a harvest section "
                          "(what to harvest) or train.cache (a cache to train from)")
    if h is not None and h.shard is not None:
        raise ConfigError(f"harvest.shard: {h.shard!r} writes one worker's part of a cache; pipeline run needs the "
                          "whole: harvest the shards with `pipeline harvest --shard I/N`, then run without shard")
    if h is not None and h.cache and t.cache and Path(h.cache) != Path(t.cache):
        raise ConfigError(f"train.cache: {t.cache!r} differs from harvest.cache {h.cache!r}; pipeline run trains "
                          "on the cache its harvest writes, so give one of them")
    for key in ("run", "cache", "sae", "results_dir"):
        if getattr(e, key) is not None:
            raise ConfigError(f"evaluate.{key}: pipeline run evaluates the runs of train.runs on its own cache; "
                              f"remove this key (it is for `pipeline evaluate`)")
    if e.runs_dir not in (t.runs_dir, EvaluateConfig.default_of("runs_dir")):  # left at its default, it follows train's
        raise ConfigError(f"evaluate.runs_dir: {e.runs_dir!r} differs from train.runs_dir {t.runs_dir!r}; "
                          "pipeline run evaluates the runs it trains, so give one value")


def _harvest(cfg: PipelineConfig, progress: bool, echo: Callable[[str], None]) -> Path:
    from .harvest import harvest

    if cfg.harvest is None:  # nothing to harvest: train from the cache as it is
        Cache(cfg.train.cache).require_complete()
        echo(f"harvest: none asked; training from {cfg.train.cache}")
        return cfg.train.cache
    h = cfg.harvest.model_copy(update={"resume": True, "cache": _given_cache(cfg)})
    path = harvest(h, progress=progress)
    echo(f"harvest: {path} is complete")
    return path


def _given_cache(cfg: PipelineConfig) -> str | None:
    """The cache path the file names for its harvest: ``harvest.cache``, else ``train.cache``, else None (the
    harvest's fingerprinted default under ``cache_root``)."""
    return (cfg.harvest.cache if cfg.harvest is not None else None) or cfg.train.cache or None


def harvest_cache(cfg: PipelineConfig) -> str | None:
    """The cache ``pipeline run`` trains on, found without harvesting (``pipeline train --config`` without
    ``--cache``): the one the harvest section writes, its default path computed from the planned manifest;
    ``train.cache`` for a file without a harvest section."""
    given = _given_cache(cfg)
    if given or cfg.harvest is None:
        return given
    from .cache.store import cache_location
    from .harvest.stage import plan

    return str(cache_location(cfg.harvest.cache_root, plan(cfg.harvest).manifest))


def _train(cfg: TrainConfig, cache: Cache, folders: list[RunFolder], progress: bool,
           echo: Callable[[str], None]) -> list[str]:
    """Train the unfinished runs, one group per step their checkpoints reached."""
    from .train.trainer import saved_steps, train

    groups: dict[int, list] = {}
    unexported = []
    for i, (run, folder) in enumerate(zip(cfg.runs, folders)):
        for key in ("source", "target"):
            name = getattr(run, key)
            if name is not None and name not in cache.array_names:
                raise ConfigError(f"train.runs[{i}].{key}: {name} is not in the cache {cache.path}; it has "
                                  f"{', '.join(cache.array_names)}")
        try:
            resolved = run.resolve(cache.manifest["arrays"][run.source]["width"])
        except ConfigError as e:
            raise ConfigError(f"train.runs[{i}].{e}") from None
        total = -(-resolved.tokens // cfg.batch_size)
        done = saved_steps(folder.saved_config(), resolved, total, folder) or 0
        if done < total:
            groups.setdefault(done, []).append(run)
        elif not folder.exists("saelens/cfg.json"):  # a kill between its last checkpoint and its export
            unexported.append(run)
    if unexported:  # training a finished run only exports it, under its lock
        train(cfg.model_copy(update={"runs": unexported}), progress=False)
    if not groups:
        echo(f"train: all {len(cfg.runs)} runs are finished")
        return []
    for step, runs in sorted(groups.items()):
        echo(f"train: {', '.join(r.name for r in runs)}" + (f" (resuming at step {step})" if step else ""))
        train(cfg.model_copy(update={"runs": runs}), progress=progress)
    return [r.name for step in sorted(groups) for r in groups[step]]


def _current(folder: RunFolder, fingerprint: str) -> bool:
    """Whether ``eval.json`` exists, parses, is of this cache, did not fail (non-finite LM metrics), and is
    no older than the checkpoint."""
    result = folder.read_json("eval.json")
    if not isinstance(result, dict) or result.get("fingerprint") != fingerprint or result.get("failed"):
        return False
    ck = folder.checkpoint()
    evaluated, trained = folder.modified("eval.json"), folder.modified(f"{ck}/model.safetensors") if ck else None
    return evaluated is not None and trained is not None and evaluated >= trained


def _evaluate(cfg: EvaluateConfig, folders: list[RunFolder], cache: Cache, progress: bool,
              echo: Callable[[str], None]) -> list[str]:
    from .evaluate.stage import evaluate

    stale = [f for f in folders if not _current(f, cache.fingerprint)]
    if not stale:
        echo(f"evaluate: all {len(folders)} runs are evaluated")
        return []
    echo(f"evaluate: {', '.join(f.name for f in stale)}")
    evaluate(cfg.model_copy(update={"cache": cache.path, "report": False}), progress=progress,
             runs=[f.home for f in stale])
    return [f.name for f in stale]


def _report(cfg: EvaluateConfig, cache: Cache, folder: Place, changed: bool) -> Path | str | None:
    """The cache's report over every evaluated run of its folder, rewritten only when an evaluation changed
    (or it is missing); None with ``evaluate.report: false``."""
    if not cfg.report:
        return None
    from .evaluate.report import publish_report

    return publish_report(cache, folder, rewrite=changed)
