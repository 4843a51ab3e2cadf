"""Data-parallel training with torch.distributed: the team of ranks, its reductions, and the rank streams.

``torchrun --nproc-per-node N -m matryoshka.cli train ...`` starts N processes; each joins the process
group (gloo on CPU, nccl on GPUs, one GPU per local rank) and trains the same dictionaries on its part of
every global batch. What makes N processes equal one process at the same global batch:

* **Data.** The global batch of ``batch_size`` rows is the concatenation, in rank order, of the batches
  of ``data_ranks`` disjoint reader streams (a :class:`~matryoshka.cache.reader.ShuffledReader` per data
  rank: rank ``r`` of ``W`` reads every ``W``-th chunk of each epoch's order). Process ``p`` of ``P`` reads
  data ranks ``p*W/P .. (p+1)*W/P - 1``. ``data_ranks`` defaults to the world size; one process with
  ``--data-ranks N`` reads all N streams and sees exactly the global batches an N-process job sees, which
  is how the tests compare the two, and how an N-rank job can be resumed on fewer processes.
* **Batch top-k.** The k*B largest activations of the *global* batch: each rank finds its local k*B
  largest values, the ranks all-gather them to find the global (k*B)-th value ``t``, keep every value
  above ``t``, and share the values equal to ``t`` in global row order (a tie rule one process applies
  too). So the selection is exact, not a per-rank approximation.
* **State.** Gradients are averaged (each rank's loss is a mean over its equal share of rows); the
  inference threshold's EMA uses the global minimum selected value; dead-latent counters count global
  tokens and a latent fired anywhere. Every rank applies the same update, so weights stay identical
  across ranks without broadcasts.
* **Files.** Rank 0 writes config, metrics, checkpoints, exports and W&B; a checkpoint holds every data
  rank's reader cursor (gathered to rank 0), so a resumed job continues each stream where it stopped.

The sums of the all-reduce run in another order than one process's, so weights agree to float rounding
(the tests bound the difference), not bit for bit; a resumed N-rank job equals an uninterrupted one exactly.

It lives in ``train/`` because training is its only user (the trainer, the objectives, batch top-k).
The reader it wraps stays in ``cache/`` and knows nothing of processes (a data rank is two integers
passed to :class:`ShuffledReader`), so stages import downward only: train -> cache.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..cache.reader import ReaderConfig, ShuffledReader, default_threads
from ..cache.store import Cache
from ..config import ConfigError
from ..cpus import usable_cpus


@dataclass
class Team:
    """This process's place among the training processes (one process: rank 0 of 1, no communication)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    started: bool = False
    """True when this process initialised the process group (and so destroys it in :meth:`leave`)."""

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @classmethod
    def join(cls, device: torch.device | None) -> Team:
        """Join torchrun's process group (from RANK, WORLD_SIZE, MASTER_ADDR...) if there is more than one rank."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        team = cls(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")),
                   int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if size > 1 and not dist.is_initialized():
            cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(team.local_rank)
            dist.init_process_group("nccl" if cuda else "gloo")
            team.started = True
        return team

    def leave(self) -> None:
        if self.started:
            dist.destroy_process_group()
            self.started = False

    # -- reductions (no-ops for one process) ---------------------------------------------------------
    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``t`` reduced over the ranks, in place (``op``: sum, min or max)."""
        if self.size > 1:
            dist.all_reduce(t, {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` (equal shapes), concatenated in rank order."""
        if self.size == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def mean(self, values: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """Each value (a number or tensor) averaged over the ranks: metrics of equal shares of a batch."""
        if self.size == 1:
            return values
        parts = [torch.as_tensor(v).detach().to(device, torch.float64).reshape(-1) for v in values.values()]
        flat = self.all_reduce(torch.cat(parts)).div_(self.size)
        return {k: piece.reshape(torch.as_tensor(v).shape)
                for (k, v), piece in zip(values.items(), flat.split([p.numel() for p in parts]))}

    def average_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over the ranks (one all-reduce for all of them)."""
        grads = [p.grad for p in params if p.grad is not None]
        if self.size == 1 or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.all_reduce(flat).div_(self.size)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


class RankStreams:
    """Global batches: this process's data ranks' reader batches (the rest come from the other processes).

    ``cursors``: the saved cursor of every data rank (from :meth:`state_dict`), to resume.
    """

    def __init__(self, arrays: Sequence[str], cache: Cache, cfg: ReaderConfig, team: Team, data_ranks: int,
                 device: torch.device, dtype: torch.dtype, cursors: list[dict[str, Any]] | None = None) -> None:
        w = data_ranks or team.size
        if w % team.size:
            raise ConfigError(f"data_ranks: {w} is not a multiple of the {team.size} training processes")
        if cfg.batch_size % w:
            raise ConfigError(f"batch_size: {cfg.batch_size} does not split into {w} equal rank batches; "
                              f"use a multiple of {w}")
        if cursors is not None and len(cursors) != w:
            raise ConfigError(f"data_ranks: the checkpoint holds reader cursors of {len(cursors)} data ranks, this "
                              f"job has {w}; resume with --data-ranks {len(cursors)} (any process count dividing it)")
        self.team, self.data_ranks = team, w
        per = w // team.size
        # each stream's decode threads: its share of the host's cores, less the quarter the default leaves
        threads = cfg.threads or default_threads(max(1, usable_cpus() // (team.local_size * per)))
        sub = dataclasses.replace(cfg, batch_size=cfg.batch_size // w, threads=threads)
        self.readers = [ShuffledReader(arrays, cache, sub, rank=r, world_size=w, device=device, dtype=dtype,
                                       state=cursors[r] if cursors is not None else None)
                        for r in range(team.rank * per, (team.rank + 1) * per)]

    def __iter__(self) -> RankStreams:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        parts = [next(r) for r in self.readers]
        if len(parts) == 1:
            return parts[0]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def state_dict(self) -> list[dict[str, Any]]:
        """Every data rank's cursor, in rank order (a collective call: every process must make it)."""
        return [c for part in self.team.gather_objects([r.state_dict() for r in self.readers]) for c in part]

    def close(self) -> None:
        for r in self.readers:
            r.close()
