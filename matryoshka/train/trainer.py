"""`pipeline train`: every run of a config trains from one shuffled read of one cache.

Each batch is read once and fed to every run still training (SAEs and transcoders, any widths and
sites), so K configs cost one read. Each run keeps its own dictionary, objective, optimiser and
schedule, writes metrics to ``metrics.jsonl``, and checkpoints to ``checkpoint/`` together with the
reader's cursor, so a resumed run continues the very stream it was on.

A run folder has one writer: training holds its lock (``.writer.lock``, the cache's lock, see
``cache/lock.py``) from before it reads the checkpoint until it returns, so a second ``pipeline train``
or ``pipeline run`` of the run, or an evaluation of it, is refused while it trains. SIGINT and SIGTERM
write a checkpoint at the current step and stop (``stop.py``). ``runs_dir`` may be a URL: each run is then
trained in a local copy that is fetched first and published at every checkpoint (``run_folder.py``).

``aux_dead`` (metrics.jsonl, the progress bar's ``AuxDead``) counts the latents the auxiliary loss treats
as dead now: none of the last ``dead_tokens`` training tokens fired them (20 steps under ``reference``).
It is not evaluation's ``dead`` (no firing on any held-out token), which is named differently for that.

Inputs are scaled by constants from the cache's statistics so every array has E||x||^2 = d (the
scales are saved with the run); FVU is reported against the cache's total variance.

Reading order: :func:`train` holds one ``ExitStack`` for everything that must be closed (the signal
handlers, run locks, the reader, metrics files, W&B runs, progress bars); :func:`_train` sets up
(:func:`_open_cache`, a :class:`TrainingRun` per run, :func:`_resume`, :func:`_open_reader`, the
:class:`~matryoshka.train.monitor.Monitor` that reports) and hands over to :func:`_loop`, the idea itself.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..cache import Cache, CacheError, local_copy
from ..cache.location import Location
from ..cache.reader import ReaderConfig
from ..config import ConfigError, RunConfig, TrainConfig, check_device
from ..files import shareable
from ..run_folder import RunFolder, Workspace
from .dictionary import Dictionary
from .distributed import RankStreams, Team
from .export import export_missing, export_saelens
from .load import checkpoint_dir
from .monitor import Monitor, trim_metrics
from .objectives import Objective
from .stop import Interrupted, StopSignals, signal_name


class TrainingRun:
    """One dictionary in training: model, objective, optimiser, schedule, counters, files."""

    def __init__(self, cfg: RunConfig, cache: Cache, folder: RunFolder, batch_size: int, device: torch.device,
                 team: Team | None = None) -> None:
        self.team = team  # data-parallel ranks (train/distributed.py); None: this process sees whole batches
        self.source, self.target = cfg.source, cfg.target or cfg.source
        for name in (self.source, self.target):
            if name not in cache.array_names:
                raise ConfigError(f"train.runs.{cfg.name}: array {name!r} is not in the cache; it has "
                                  f"{', '.join(cache.array_names)}")
        d_in = cache.manifest["arrays"][self.source]["width"]
        d_out = cache.manifest["arrays"][self.target]["width"]
        self.cfg = cfg.resolve(d_in)
        self.folder = folder  # where the team finds the run; ``dir``: its local copy, which training writes
        self.dir = folder.work
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
        """Continue from the checkpoint in the local copy (fetched first: :meth:`RunFolder.fetch`), if any."""
        ck = checkpoint_dir(self.dir)
        saved = json.loads((ck / "config.json").read_text()) if (ck / "config.json").is_file() else None
        if saved_steps(saved, self.cfg, self.total_steps, self.folder) is None or not (ck / "state.pt").exists():
            return None
        self.dic.load_state_dict(load_file(ck / "model.safetensors", device=str(self.dic.W_dec.device)))
        state = torch.load(ck / "state.pt", weights_only=False, map_location=self.dic.W_dec.device)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.objective.load_state_dict(state["objective"])
        self.step = state["step"]
        rows = saved.get("trained_rows", [])
        self.trained_rows = [*rows, *(r for r in self.trained_rows if r not in rows)]
        return state

    def describe(self) -> dict[str, Any]:
        return {**self.cfg.model_dump(), "d_in": self.dic.d_in, "d_out": self.dic.d_out,
                "transcoder": self.dic.transcoder, "scale_in": self.scale_in, "scale_out": self.scale_out,
                "cache": self.cache_path, "fingerprint": self.fingerprint, "trained_rows": self.trained_rows,
                "total_steps": self.total_steps, "step": self.step}


def saved_steps(saved: dict[str, Any] | None, cfg: RunConfig, total_steps: int, where: RunFolder) -> int | None:
    """Steps done by the checkpoint whose config.json is ``saved`` (None: there is none), in the run folder
    ``where``. A checkpoint trained with another resolved config (``cfg.resolve``) or another number of steps
    (batch size, tokens) is refused: resuming it would mix two runs."""
    if saved is None:
        return None
    changed = [f"{k} ({saved.get(k)!r} -> {v!r})" for k, v in cfg.model_dump().items() if saved.get(k) != v]
    if saved.get("total_steps") != total_steps:
        changed.append(f"total_steps (tokens / batch_size: {saved.get('total_steps')} -> {total_steps})")
    if changed:
        raise ConfigError(f"train.runs.{cfg.name}: {str(where)!r} was trained with another {', '.join(changed)}; "
                          "rename the run or delete its folder")
    return int(saved["step"])


def _say(line: str | None, team: Team) -> None:
    """One line on stderr from the leader (nothing for None)."""
    if line and team.leader:
        print(line, file=sys.stderr)


def train(cfg: TrainConfig, progress: bool = True) -> list[Path | str]:
    """Train every run of ``cfg`` from one read of its cache; resume runs that have checkpoints.
    Under torchrun, the ranks train data-parallel (train/distributed.py) and rank 0 writes the files."""
    team = Team.join(torch.device(cfg.device) if cfg.device else None)
    try:
        with ExitStack() as closing:  # signals first: they stay recorded until the rest is closed
            stop = closing.enter_context(StopSignals())
            return _train(cfg, progress, team, stop, closing)
    finally:
        team.leave()


def _train(cfg: TrainConfig, progress: bool, team: Team, stop: StopSignals,
           closing: ExitStack) -> list[Path | str]:
    """Set up, resume, train. ``closing`` closes what is opened here (run locks, reader, metrics files,
    W&B runs, progress bars) in the reverse order, however training ends."""
    cache = _open_cache(cfg)
    device = torch.device(cfg.device or (f"cuda:{team.local_rank}" if torch.cuda.is_available() else "cpu"))
    space = closing.enter_context(Workspace())  # before the locks: removed after they are released
    root = Location.of(cfg.runs_dir).join(cache.fingerprint)
    runs = [TrainingRun(r, cache, space.run(root.join(r.name)), cfg.batch_size, device,
                        team if team.size > 1 else None) for r in cfg.runs]
    state = _resume(runs, cache, team, closing, cfg.break_lock)
    active = [r for r in runs if not r.done]
    if active:
        reader = _open_reader(cfg, cache, active, state, team, device)
        closing.callback(reader.close)
        _say(local_copy.start_line(cache, _arrays(active)), team)  # the config is valid: the read begins
        for r in active if team.leader else []:
            r.dir.mkdir(parents=True, exist_ok=True)
            (r.dir / "config.json").write_text(json.dumps(r.describe(), indent=2))
            r.folder.publish("config.json")
        monitor = Monitor(cfg, active, cache, team, device, progress, closing)
        _loop(cfg, active, reader, monitor, stop, team, device)
        _say(local_copy.end_line(cache), team)
    return [r.folder.home.pathlike for r in runs]


def _loop(cfg: TrainConfig, active: list[TrainingRun], reader: RankStreams, monitor: Monitor, stop: StopSignals,
          team: Team, device: torch.device) -> None:
    """Each batch is read once and trains every unfinished run one step. Checkpoints are written every
    ``checkpoint_every`` steps, at a run's last step and at a stop signal; a finished run is exported."""
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.autocast and device.type == "cuda"
                else nullcontext())
    while active:
        batch = monitor.read(reader, active)
        for r in active:
            monitor.stepped(r, r.train_step(batch, autocast))
        finished = [r for r in active if r.done]
        signum = _stopping(stop, team, device)
        if finished or signum or any(r.step % cfg.checkpoint_every == 0 for r in active):
            _checkpoint(active, reader, team)
        for r in finished if team.leader else []:
            export_saelens(r.dir, r.dir / "saelens", monitor.cache.manifest)
            r.folder.publish("saelens")
            monitor.exported(r)
        active = [r for r in active if not r.done]
        if signum and active:
            raise Interrupted(signum, f"train: stopped by {signal_name(signum)} at step {active[0].step}; "
                                      f"checkpoint written for {', '.join(r.cfg.name for r in active)} in "
                                      f"{str(active[0].folder.home).rsplit('/', 1)[0]}; run the same command to resume")


def _open_cache(cfg: TrainConfig) -> Cache:
    """The complete cache ``cfg`` trains from, after the checks that need no data."""
    if not cfg.runs:
        raise ConfigError("train.runs: no runs to train; list at least one under train.runs")
    check_device(cfg.device)
    if not cfg.cache:
        raise ConfigError("cache: none given; pass --cache CACHE (or set train.cache in the config)")
    cache = Cache(cfg.cache, local_cache_dir=cfg.local_cache_dir)
    cache.require_complete()
    return cache


def _resume(runs: list[TrainingRun], cache: Cache, team: Team, closing: ExitStack,
            break_lock: bool = False) -> dict[str, Any] | None:
    """Lock every run folder (rank 0), load the checkpoints, and tidy what a kill left: a finished run's
    missing export, metrics lines past the checkpoint (they are logged again). Returns the state the
    unfinished runs continue from (None: they start afresh)."""
    for r in runs if team.leader else []:  # before the checkpoint is read: no other writer can change it now
        closing.enter_context(r.folder.lock("trained", break_lock))
    for r in runs:
        r.folder.fetch()  # a run on object storage: into its local copy (a local run is its own)
    states = [r.load() for r in runs]
    for r in runs if team.leader else []:
        if r.done:  # a kill between its last checkpoint and its export leaves the export missing
            if export_missing(r.dir, cache.manifest):
                r.folder.publish("saelens")
        else:
            trim_metrics(r.dir / "metrics.jsonl", r.step)
    resumed = {s["step"]: s for r, s in zip(runs, states) if s is not None and not r.done}
    if len(resumed) > 1 or (resumed and any(s is None for r, s in zip(runs, states) if not r.done)):
        raise CacheError("train: the unfinished runs stopped at different steps of the stream; "
                         "resume them with separate configs, or with `pipeline run`, which groups them by step")
    state = next(iter(resumed.values()), None)
    if state is not None:
        torch.set_rng_state(state["rng"].cpu())  # loaded onto the run's device with the rest of the state
    return state


def _arrays(active: list[TrainingRun]) -> list[str]:
    return sorted({a for r in active for a in (r.source, r.target)})


def _open_reader(cfg: TrainConfig, cache: Cache, active: list[TrainingRun], state: dict[str, Any] | None,
                 team: Team, device: torch.device) -> RankStreams:
    """The shuffled stream of the arrays ``active`` train on, at the checkpoint's cursors if resuming."""
    arrays = _arrays(active)
    cursors = state["cursor"] if state is not None else None  # one per data rank
    if isinstance(cursors, dict):  # a checkpoint written before data-parallel training: one stream
        cursors = [cursors]
    return RankStreams(arrays, cache, ReaderConfig(batch_size=cfg.batch_size, buffer_tokens=cfg.buffer_tokens,
                                                   seed=cfg.seed, drop_last=True),
                       team, cfg.data_ranks, device, torch.float32, cursors)


def _checkpoint(active: list[TrainingRun], reader: RankStreams, team: Team) -> None:
    """Every unfinished run's checkpoint at this step, with every data rank's cursor (a collective call). The
    metrics lines up to it are on disk already: the Monitor writes them line-buffered."""
    cursor = reader.state_dict()
    for r in active if team.leader else []:
        r.save(cursor)
        # metrics first: lines past a checkpoint are trimmed on resume, lines missing before it never come back
        r.folder.publish("metrics.jsonl")
        r.folder.publish_checkpoint()


def _stopping(stop: StopSignals, team: Team, device: torch.device) -> int | None:
    """The signal that stops training after this step, agreed by every rank (the highest one received)."""
    if team.size == 1:
        return stop.received
    got = team.all_reduce(torch.tensor([stop.received or 0], device=device), "max")
    return int(got) or None
