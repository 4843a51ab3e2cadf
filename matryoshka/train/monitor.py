"""Where training reports: each run's ``metrics.jsonl``, its W&B run and its progress bar.

Rank 0 writes all three; the other ranks only join the averaging of each logged step's metrics over the
ranks (a collective call every rank makes). ``reader_wait`` is the share of the loop's time since a run's
last metrics line spent waiting for the next batch: the cache exists so that it stays near zero.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from .. import strict_json
from ..cache import Cache
from ..config import TrainConfig
from ..files import write_atomic
from .distributed import Team
from .load import checkpoint_dir

if TYPE_CHECKING:
    from .trainer import TrainingRun


class Monitor:
    """The reports of the runs one loop trains; what it opens is closed by ``closing``."""

    def __init__(self, cfg: TrainConfig, runs: list[TrainingRun], cache: Cache, team: Team,
                 device: torch.device, progress: bool, closing: ExitStack) -> None:
        self.cache, self.team, self.device = cache, team, device
        self.log_every, self.batch_size = cfg.log_every, cfg.batch_size
        self.writes = team.leader  # rank 0 writes every file
        # line-buffered: `tail -f metrics.jsonl` follows training (lines past the checkpoint are trimmed on resume)
        self.logs = {r.cfg.name: closing.enter_context(open(r.dir / "metrics.jsonl", "a", buffering=1))
                     for r in runs} if self.writes else {}
        self.wandb = _wandb_runs(cfg, runs, cache) if self.writes else {}
        for w in self.wandb.values():
            closing.callback(w.finish)
        self.bars = {r.cfg.name: closing.enter_context(
            tqdm(total=r.total_steps, initial=r.step, desc=r.cfg.name, position=i, leave=True,
                 disable=not (progress and self.writes), dynamic_ncols=True)) for i, r in enumerate(runs)}
        # per run: seconds spent waiting on the reader since its last metrics line, and when that line was
        self.waits = {r.cfg.name: [0.0, time.perf_counter()] for r in runs}

    def read(self, reader: Iterator[dict[str, torch.Tensor]], runs: list[TrainingRun]) -> dict[str, torch.Tensor]:
        """The next batch, its wait counted against each of ``runs``."""
        t0 = time.perf_counter()
        batch = next(reader)
        waited = time.perf_counter() - t0
        for r in runs:
            self.waits[r.cfg.name][0] += waited
        return batch

    def stepped(self, run: TrainingRun, metrics: dict[str, Any]) -> None:
        """After a step of ``run``: every ``log_every`` steps and at its last, its metrics averaged over the
        ranks are logged (every rank must call this); the progress bar moves."""
        if run.step % self.log_every == 0 or run.done:
            metrics = self.team.mean(metrics, self.device)  # every rank's share of the global batch
            if not self.writes:
                return
            self._log(run, metrics)
        self.bars[run.cfg.name].update(1)

    def _log(self, run: TrainingRun, metrics: dict[str, Any]) -> None:
        name = run.cfg.name
        row = {k: _json_value(v) for k, v in metrics.items()}
        now, (spent, since) = time.perf_counter(), self.waits[name]
        self.waits[name] = [0.0, now]
        row.update(step=run.step, tokens=run.step * self.batch_size, lr=run.sched.get_last_lr()[0],
                   time=time.time(), reader_wait=round(spent / max(now - since, 1e-9), 4))
        self.logs[name].write(strict_json.dumps(row) + "\n")
        if name in self.wandb:
            self.wandb[name].log(row, step=run.step)
        self.bars[name].set_postfix_str(
            f"Loss: {row['loss']:.4g}, L0: {row['l0']:.1f}, L2: {row['l2']:.4g}, "
            f"FVU: {row['fvu']:.3f}, AuxDead: {int(row['aux_dead'])}, Wait: {row['reader_wait']:.0%}",
            refresh=False)

    def exported(self, run: TrainingRun) -> None:
        """``run`` finished and is exported: on W&B, its files become a model artifact."""
        if run.cfg.name in self.wandb:
            _log_artifact(self.wandb[run.cfg.name], run, self.cache)


def trim_metrics(path: Path, step: int) -> None:
    """Keep the metrics lines of steps up to ``step`` (and drop a line cut off by a kill)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            pass
    write_atomic(path, "".join(kept).encode())


def _json_value(v: Any) -> float | list:
    """A logged metric as JSON: tensors detached, vectors as lists."""
    if torch.is_tensor(v):
        v = v.detach()
        return v.tolist() if v.ndim else float(v)
    return float(v)


def _wandb_runs(cfg: TrainConfig, runs: list[TrainingRun], cache: Cache) -> dict[str, Any]:
    """One W&B run per dictionary when ``cfg.wandb`` names a project. ``WANDB_MODE=offline`` logs to
    ``<run>/wandb/`` without an account (``wandb sync`` uploads it later)."""
    if not cfg.wandb:
        return {}
    import wandb

    # a run on object storage is trained in a temporary copy: W&B's files go to its default place (WANDB_DIR)
    return {r.cfg.name: wandb.init(project=cfg.wandb, name=r.cfg.name, reinit="create_new",
                                   dir=None if r.folder.home.remote else str(r.dir),
                                   config={**r.describe(), "cache": cache.path, "fingerprint": cache.fingerprint},
                                   id=f"{cache.fingerprint}-{r.cfg.name}", resume="allow")
            for r in runs}


def _log_artifact(wandb_run: Any, run: TrainingRun, cache: Cache) -> None:
    """The finished run (checkpoint and SAELens export) as a W&B model artifact named after the run,
    loadable with ``matryoshka.load("wandb:ENTITY/PROJECT/NAME:latest")``."""
    import wandb

    art = wandb.Artifact(run.cfg.name, type="model", metadata={**run.describe(), "fingerprint": cache.fingerprint})
    art.add_dir(str(checkpoint_dir(run.dir)), name="checkpoint")
    art.add_dir(str(run.dir / "saelens"), name="saelens")
    wandb_run.log_artifact(art)
