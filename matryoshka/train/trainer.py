"""`pipeline train`: every run of a config trains from one shuffled read of one cache.

Each batch is read once and fed to every run still training (SAEs and transcoders, any widths and
sites), so K configs cost one read. Each run keeps its own dictionary, objective, optimiser and
schedule, writes metrics to ``metrics.jsonl``, and checkpoints to ``checkpoint/`` together with the
reader's cursor, so a resumed run continues the very stream it was on.

A run folder has one writer: training holds its lock (``.writer.lock``, the cache's lock, see
``cache/lock.py``) from before it reads the checkpoint until it returns, so a second ``pipeline train``
or ``pipeline run`` of the run, or an evaluation of it, is refused while it trains. SIGINT and SIGTERM
write a checkpoint at the current step and stop (``stop.py``).

``aux_dead`` (metrics.jsonl, the progress bar's ``AuxDead``) counts the latents the auxiliary loss treats
as dead now: none of the last ``dead_tokens`` training tokens fired them (20 steps under ``reference``).
It is not evaluation's ``dead`` (no firing on any held-out token), which is named differently for that.

Inputs are scaled by constants from the cache's statistics so every array has E||x||^2 = d (the
scales are saved with the run); FVU is reported against the cache's total variance.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import strict_json
from ..cache import Cache, CacheError
from ..cache import local_copy
from ..cache.lock import writer_lock
from ..cache.reader import ReaderConfig
from ..distributed import RankStreams, Team
from ..files import shareable
from ..config import ConfigError, RunConfig, TrainConfig, check_device
from .dictionary import Dictionary
from .export import export_missing, export_saelens
from .load import checkpoint_dir
from .objectives import Objective
from .stop import Interrupted, StopSignals, signal_name


class Run:
    """One dictionary in training: model, objective, optimiser, schedule, counters, files."""

    def __init__(self, cfg: RunConfig, cache: Cache, root: Path, batch_size: int, device: torch.device,
                 team: Team | None = None) -> None:
        self.team = team  # data-parallel ranks (matryoshka/distributed.py); None: this process sees whole batches
        self.source, self.target = cfg.source, cfg.target or cfg.source
        for name in (self.source, self.target):
            if name not in cache.array_names:
                raise ConfigError(f"train.runs.{cfg.name}: array {name!r} is not in the cache; it has "
                                  f"{', '.join(cache.array_names)}")
        d_in = cache.manifest["arrays"][self.source]["width"]
        d_out = cache.manifest["arrays"][self.target]["width"]
        self.cfg = cfg.resolve(d_in)
        self.dir = root / cfg.name
        self.total_steps = -(-self.cfg.tokens // batch_size)
        torch.manual_seed(self.cfg.seed)
        self.dic = Dictionary(d_in, d_out, self.cfg.width, self.cfg.k, self.cfg.arch, self.cfg.group_sizes,
                              transcoder=cfg.target is not None, skip=self.cfg.skip).to(device)
        self.objective = Objective(self.dic, self.cfg.objective, aux_penalty=self.cfg.aux_penalty,
                                   dead_tokens=self.cfg.dead_tokens, team=team)
        self.opt = torch.optim.Adam(self.dic.parameters(), lr=self.cfg.lr, betas=(0.9, 0.99), fused=True)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        src, tgt = cache.stats(self.source), cache.stats(self.target)
        self.scale_in = math.sqrt(d_in / src.mean_sq_norm)
        self.scale_out = math.sqrt(d_out / tgt.mean_sq_norm)
        self.variance = tgt.total_variance * self.scale_out**2  # FVU denominator, in scaled units
        self.cache_path, self.fingerprint = cache.path, cache.fingerprint
        # every row range this run has read (a resume on a larger cache of the same fingerprint adds one):
        # evaluation refuses held-out rows inside them (evaluate/overlap.py)
        self.trained_rows: list[list[int]] = [list(cache.split["train"])]
        self.step = 0

    def _lr_factor(self, step: int) -> float:
        """Warm-up, constant, linear decay to 0 (default); constant (reference, as the seed)."""
        if self.cfg.objective == "reference":
            return 1.0
        warm = min(1.0, (step + 1) / max(1, self.cfg.warmup_steps))
        decay_steps = int(self.total_steps * self.cfg.decay_fraction)
        left = self.total_steps - step
        return warm * (min(1.0, left / decay_steps) if decay_steps else 1.0)

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    def train_step(self, batch: dict[str, torch.Tensor], autocast) -> dict[str, float]:
        x = batch[self.source] * self.scale_in
        y = batch[self.target] * self.scale_out if self.target != self.source else x
        with autocast:
            out = self.objective(x, y)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.team is not None:
            self.team.average_gradients(list(self.dic.parameters()))
        self.objective.before_step()
        if self.cfg.objective == "default" and self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.dic.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.objective.after_step()
        self.step += 1
        prefix_fvu = out.prefix_mse * y.shape[-1] / self.variance  # the last prefix is the full reconstruction
        return {"loss": out.loss, "aux": out.aux, "l0": len(out.code.values) / x.shape[0],
                "l2": out.prefix_mse[-1], "fvu": prefix_fvu[-1],
                "aux_dead": self.objective.dead_mask().sum(), "prefix_fvu": prefix_fvu}

    # -- files ---------------------------------------------------------------------------------------
    def save(self, cursor: dict[str, Any]) -> None:
        """Write the checkpoint as a new folder, then swap it in: the old one is moved aside, the new one
        renamed into place, the old one deleted. A kill at any point leaves a whole checkpoint, which
        :func:`checkpoint_dir` finds (``checkpoint.old/`` between the two renames)."""
        tmp = self.dir / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors = {k: v.detach().contiguous() for k, v in self.dic.state_dict().items()}
        save_file(tensors, tmp / "model.safetensors")
        shareable(tmp / "model.safetensors")  # safetensors writes 0600: teammates read checkpoints too
        torch.save({"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                    "objective": self.objective.state_dict(), "step": self.step,
                    "cursor": cursor, "rng": torch.get_rng_state()}, tmp / "state.pt")
        (tmp / "config.json").write_text(json.dumps(self.describe(), indent=2))
        final = self.dir / "checkpoint"
        old = self.dir / "checkpoint.old"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)  # left by a kill after the last swap's renames
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def load(self) -> dict[str, Any] | None:
        ck = checkpoint_dir(self.dir)
        if saved_steps(self.dir, self.cfg, self.total_steps) is None or not (ck / "state.pt").exists():
            return None
        self.dic.load_state_dict(load_file(ck / "model.safetensors", device=str(self.dic.W_dec.device)))
        state = torch.load(ck / "state.pt", weights_only=False, map_location=self.dic.W_dec.device)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.objective.load_state_dict(state["objective"])
        self.step = state["step"]
        saved = json.loads((ck / "config.json").read_text()).get("trained_rows", [])
        self.trained_rows = [*saved, *(r for r in self.trained_rows if r not in saved)]
        return state

    def describe(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.cfg), "d_in": self.dic.d_in, "d_out": self.dic.d_out,
                "transcoder": self.dic.transcoder, "scale_in": self.scale_in, "scale_out": self.scale_out,
                "cache": self.cache_path, "fingerprint": self.fingerprint, "trained_rows": self.trained_rows,
                "total_steps": self.total_steps, "step": self.step}


def saved_steps(run_dir: Path, cfg: RunConfig, total_steps: int) -> int | None:
    """Steps done by the checkpoint in ``run_dir`` (None: there is none), read from its config.json
    without loading weights. A checkpoint trained with another resolved config (``cfg.resolve``) or
    another number of steps (batch size, tokens) is refused: resuming it would mix two runs."""
    path = checkpoint_dir(run_dir) / "config.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    changed = [f"{k} ({saved.get(k)!r} -> {v!r})" for k, v in dataclasses.asdict(cfg).items() if saved.get(k) != v]
    if saved.get("total_steps") != total_steps:
        changed.append(f"total_steps (tokens / batch_size: {saved.get('total_steps')} -> {total_steps})")
    if changed:
        raise ConfigError(f"train.runs.{cfg.name}: {str(run_dir)!r} was trained with another {', '.join(changed)}; "
                          "rename the run or delete its folder")
    return int(saved["step"])


def _say(line: str | None, team: Team) -> None:
    """One line on stderr from the leader (nothing for None)."""
    if line and team.leader:
        print(line, file=sys.stderr)


def _trim_metrics(path: Path, step: int) -> None:
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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


def _json_value(v: Any) -> float | list:
    """A logged metric as JSON: tensors detached, vectors as lists."""
    if torch.is_tensor(v):
        v = v.detach()
        return v.tolist() if v.ndim else float(v)
    return float(v)


def train(cfg: TrainConfig, progress: bool = True) -> list[Path]:
    """Train every run of ``cfg`` from one read of its cache; resume runs that have checkpoints.
    Under torchrun, the ranks train data-parallel (matryoshka/distributed.py) and rank 0 writes the files."""
    team = Team.join(torch.device(cfg.device) if cfg.device else None)
    try:
        with ExitStack() as locks, StopSignals() as stop:
            return _train(cfg, progress, team, locks, stop)
    finally:
        team.leave()


def run_lock(run_dir: Path, doing: str) -> Any:
    """The run folder's writer lock (the folder is created), to hold with ``with``: entering it is refused,
    naming the holder's pid and host, while another process trains or evaluates the run (exit 2)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    return writer_lock(run_dir, what="run", doing=doing)


def _stopping(stop: StopSignals, team: Team, device: torch.device) -> int | None:
    """The signal that stops training after this step, agreed by every rank (the highest one received)."""
    if team.size == 1:
        return stop.received
    got = team.all_reduce(torch.tensor([stop.received or 0], device=device), "max")
    return int(got) or None


def _train(cfg: TrainConfig, progress: bool, team: Team, locks: ExitStack, stop: StopSignals) -> list[Path]:
    if not cfg.runs:
        raise ConfigError("train.runs: no runs to train; list at least one under train.runs")
    check_device(cfg.device)
    if not cfg.cache:
        raise ConfigError("cache: none given; pass --cache CACHE (or set train.cache in the config)")
    cache = Cache(cfg.cache, local_cache_dir=cfg.local_cache_dir)
    cache.require_complete()
    device = torch.device(cfg.device or (f"cuda:{team.local_rank}" if torch.cuda.is_available() else "cpu"))
    root = Path(cfg.runs_dir) / cache.fingerprint
    runs = [Run(r, cache, root, cfg.batch_size, device, team if team.size > 1 else None) for r in cfg.runs]
    for r in runs if team.leader else []:  # before the checkpoint is read: no other writer can change it now
        locks.enter_context(run_lock(r.dir, "trained"))
    states = [r.load() for r in runs]
    active = [r for r in runs if not r.done]
    for r in runs if team.leader else []:
        if r.done:  # a kill between its last checkpoint and its export leaves the export missing
            export_missing(r.dir, cache.manifest)
        else:  # metrics logged after the checkpoint it resumes from are logged again
            _trim_metrics(r.dir / "metrics.jsonl", r.step)
    if not active:
        return [r.dir for r in runs]
    resumed = {s["step"]: s for r, s in zip(runs, states) if s is not None and not r.done}
    if len(resumed) > 1 or (resumed and any(s is None for r, s in zip(runs, states) if not r.done)):
        raise CacheError("train: the unfinished runs stopped at different steps of the stream; "
                         "resume them with separate configs, or with `pipeline run`, which groups them by step")
    state = next(iter(resumed.values()), None)
    if state is not None:
        torch.set_rng_state(state["rng"].cpu())  # loaded onto the run's device with the rest of the state
    arrays = sorted({a for r in active for a in (r.source, r.target)})
    cursors = state["cursor"] if state is not None else None  # one per data rank
    if isinstance(cursors, dict):  # a checkpoint written before data-parallel training: one stream
        cursors = [cursors]
    reader = RankStreams(arrays, cache, ReaderConfig(batch_size=cfg.batch_size, buffer_tokens=cfg.buffer_tokens,
                                                     seed=cfg.seed, drop_last=True),
                         team, cfg.data_ranks, device, torch.float32, cursors)
    _say(local_copy.start_line(cache, arrays), team)  # the config is valid: the read begins
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.autocast and device.type == "cuda"
                else nullcontext())
    writes = team.leader  # rank 0 writes every file
    for r in active if writes else []:
        r.dir.mkdir(parents=True, exist_ok=True)
        (r.dir / "config.json").write_text(json.dumps(r.describe(), indent=2))
    # line-buffered: `tail -f metrics.jsonl` follows training (lines past the checkpoint are trimmed on resume)
    logs = {r.cfg.name: open(r.dir / "metrics.jsonl", "a", buffering=1) for r in active} if writes else {}
    wandb_runs = _wandb_runs(cfg, active, cache) if writes else {}
    bars = {r.cfg.name: tqdm(total=r.total_steps, initial=r.step, desc=r.cfg.name, position=i, leave=True,
                             disable=not (progress and writes), dynamic_ncols=True) for i, r in enumerate(active)}
    # per run: seconds spent waiting on the reader since its last metrics line, and when that line was
    waits = {r.cfg.name: [0.0, time.perf_counter()] for r in active}
    try:
        while active:
            t0 = time.perf_counter()
            batch = next(reader)
            waited = time.perf_counter() - t0
            for r in active:
                waits[r.cfg.name][0] += waited
                m = r.train_step(batch, autocast)
                if r.step % cfg.log_every == 0 or r.done:
                    m = team.mean(m, device)  # every rank's share of the global batch
                    if not writes:
                        continue
                    row = {k: _json_value(v) for k, v in m.items()}
                    now, (spent, since) = time.perf_counter(), waits[r.cfg.name]
                    waits[r.cfg.name] = [0.0, now]
                    row.update(step=r.step, tokens=r.step * cfg.batch_size, lr=r.sched.get_last_lr()[0],
                               time=time.time(), reader_wait=round(spent / max(now - since, 1e-9), 4))
                    logs[r.cfg.name].write(strict_json.dumps(row) + "\n")
                    if r.cfg.name in wandb_runs:
                        wandb_runs[r.cfg.name].log(row, step=r.step)
                    bars[r.cfg.name].set_postfix_str(
                        f"Loss: {row['loss']:.4g}, L0: {row['l0']:.1f}, L2: {row['l2']:.4g}, "
                        f"FVU: {row['fvu']:.3f}, AuxDead: {int(row['aux_dead'])}, Wait: {row['reader_wait']:.0%}",
                        refresh=False)
                bars[r.cfg.name].update(1)
            finished = [r for r in active if r.done]
            signum = _stopping(stop, team, device)
            if finished or signum or any(r.step % cfg.checkpoint_every == 0 for r in active):
                cursor = reader.state_dict()  # every data rank's cursor
                for r in active if writes else []:
                    r.save(cursor)
                    logs[r.cfg.name].flush()
            for r in finished if writes else []:
                export_saelens(r.dir, r.dir / "saelens", cache.manifest)
                if r.cfg.name in wandb_runs:
                    _log_artifact(wandb_runs[r.cfg.name], r, cache)
            active = [r for r in active if not r.done]
            if signum and active:
                raise Interrupted(signum, f"train: stopped by {signal_name(signum)} at step {active[0].step}; "
                                          f"checkpoint written for {', '.join(r.cfg.name for r in active)} in "
                                          f"{root}; run the same command to resume")
    finally:
        for f in logs.values():
            f.close()
        for w in wandb_runs.values():
            w.finish()
        for b in bars.values():
            b.close()
        reader.close()
    _say(local_copy.end_line(cache), team)
    return [r.dir for r in runs]


def _wandb_runs(cfg: TrainConfig, runs: list[Run], cache: Cache) -> dict[str, Any]:
    """One W&B run per dictionary when ``cfg.wandb`` names a project. ``WANDB_MODE=offline`` logs to
    ``<run>/wandb/`` without an account (``wandb sync`` uploads it later)."""
    if not cfg.wandb:
        return {}
    import wandb

    return {r.cfg.name: wandb.init(project=cfg.wandb, name=r.cfg.name, dir=str(r.dir), reinit="create_new",
                                   config={**r.describe(), "cache": cache.path, "fingerprint": cache.fingerprint},
                                   id=f"{cache.fingerprint}-{r.cfg.name}", resume="allow")
            for r in runs}


def _log_artifact(wandb_run: Any, run: Run, cache: Cache) -> None:
    """The finished run (checkpoint and SAELens export) as a W&B model artifact named after the run,
    loadable with ``matryoshka.load("wandb:ENTITY/PROJECT/NAME:latest")``."""
    import wandb

    art = wandb.Artifact(run.cfg.name, type="model", metadata={**run.describe(), "fingerprint": cache.fingerprint})
    art.add_dir(str(checkpoint_dir(run.dir)), name="checkpoint")
    art.add_dir(str(run.dir / "saelens"), name="saelens")
    wandb_run.log_artifact(art)
