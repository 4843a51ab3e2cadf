"""Training objectives: the seed's math (``reference``) and its repaired ``default``.

Both compute, for a batch x (source) and y (target; y = x for an SAE), every mse a mean over all
B * d elements::

    matryoshka (G groups)   loss = (mse(b_dec, y) + sum_g mse(prefix_g, y)) / (G + 1) + aux
    batchtopk, topk         loss = mse(y_hat, y) + aux

BatchTopK and TopK are the standard baselines (the seed's ``BatchTopKSAE`` and ``TopKSAE``, and every
peer's): their single group is the whole dictionary, and they have no bias-only prefix to average in,
which would pull b_dec towards the mean and halve the reconstruction's weight. The objectives differ
where the seed is faulty (docs/training.md, "Objectives"):

===================  ==========================================  ============================================
                     reference (the seed, exactly)               default
===================  ==========================================  ============================================
aux residual         y - y_hat, not detached                     detached: aux trains dead latents only
aux latents k_aux    min(512, n_dead)                            min(d_out, n_dead)
no dead latent       matryoshka: aux skipped (0); batchtopk:     aux_penalty * mse(0, residual): a constant,
fires                aux_penalty * mse(0, residual), which       no gradient (see :meth:`Objective._aux`)
                     trains live weights through the residual
dead latent          20 *steps* in a row without firing          ``dead_tokens`` tokens without firing
threshold            EMA from 0 (biased low for ~100s of steps)  EMA started at the first batch's value
decoder unit norm    renormalised *before* the optimiser step    renormalised *after* it: always unit norm
===================  ==========================================  ============================================

``reference`` reproduces the seed's ``GlobalBatchTopKMatryoshkaSAE`` (and its transcoder) for
``arch: matryoshka`` and its ``BatchTopKSAE`` for ``arch: batchtopk``; ``arch: topk`` has only the default.
The state each objective keeps (threshold, dead counters) lives in the dictionary's buffers and the
objective's own tensors, and is saved in checkpoints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..config import OBJECTIVES
from .dictionary import Dictionary
from .sparse import Code, group_partials, row_topk

if TYPE_CHECKING:
    from .distributed import Team


def wide(t: torch.Tensor) -> torch.Tensor:
    """At least float32: losses of bf16 activations are computed in float32, float64 stays float64."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (wide(a) - wide(b)).pow(2).mean()


@dataclass
class StepOutput:
    loss: torch.Tensor
    main: torch.Tensor
    aux: torch.Tensor
    code: Code
    recon: torch.Tensor  # [B, d_out], all groups
    prefix_mse: torch.Tensor  # [G]


class Objective:
    """Loss and bookkeeping of one dictionary. ``reference`` reproduces the seed point by point."""

    def __init__(self, dic: Dictionary, kind: str = "default", aux_penalty: float = 1 / 32,
                 dead_steps: int = 20, dead_tokens: int = 10_000_000, ema: float = 0.01,
                 team: Team | None = None) -> None:
        """``team``: data-parallel ranks; the batch is then their global batch (train/distributed.py)."""
        if kind not in OBJECTIVES:
            raise ValueError(f"objective: {kind!r} is not one of {', '.join(OBJECTIVES)}")
        self.dic, self.kind, self.team = dic, kind, team
        self.aux_penalty, self.dead_steps, self.dead_tokens, self.ema = aux_penalty, dead_steps, dead_tokens, ema
        # reference: batches in a row without firing; default: tokens since last fired
        self.inactive = torch.zeros(dic.width, dtype=torch.long, device=dic.W_dec.device)
        self.started = torch.zeros((), dtype=torch.bool, device=dic.W_dec.device)

    @property
    def reference(self) -> bool:
        return self.kind == "reference"

    def dead_mask(self) -> torch.Tensor:
        return self.inactive >= (self.dead_steps if self.reference else self.dead_tokens)

    def k_aux(self) -> int:
        return 512 if self.reference else self.dic.d_out

    # -- the step ------------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        dic = self.dic
        acts = dic.pre_acts(x)
        code = dic.select(acts, training=True, team=self.team)
        code.values = dic.attach(x, code.rows, code.latents, code.values)
        self._update_threshold(code)
        self._update_inactive(code, x.shape[0] * (self.team.size if self.team is not None else 1))
        prefixes = dic.prefixes(code, x)
        prefix_mse = (wide(prefixes) - wide(y).unsqueeze(1)).pow(2).mean(dim=(0, 2))
        if dic.arch == "matryoshka":
            main = (mse(dic.b_dec.expand_as(y), y) + prefix_mse.sum()) / (dic.n_groups + 1)
        else:  # the standard loss: one group, the whole reconstruction
            main = prefix_mse[-1]
        recon = prefixes[:, -1]
        aux = self._aux(x, acts, y, recon)
        return StepOutput(main + aux, main, aux, code, recon, prefix_mse.detach())

    @torch.no_grad()
    def _update_threshold(self, code: Code) -> None:
        if self.dic.arch == "topk":
            return
        low = code.values.min() if len(code.values) else torch.tensor(math.inf, device=code.values.device)
        if self.team is not None:
            low = self.team.all_reduce(low.clone(), "min")  # the global batch's lowest selected value
        # On the device, without reading anything back (a host sync stalls the GPU's queue every step):
        # the EMA step, or (default, first batch) a warm start at the batch's value rather than at 0;
        # no update while no value was selected.
        t = self.dic.threshold
        ema = t * (1 - self.ema) + self.ema * low
        new = ema if self.reference else torch.where(self.started, ema, low)
        selected = ~torch.isinf(low)
        t.copy_(torch.where(selected, new, t))
        self.started |= selected

    @torch.no_grad()
    def _update_inactive(self, code: Code, batch: int) -> None:
        fired = torch.zeros_like(self.inactive, dtype=torch.bool)
        fired[code.latents] = True
        if self.team is not None:
            fired = self.team.all_reduce(fired.to(torch.int32), "max").bool()  # fired on any rank
        self.inactive.add_(1 if self.reference else batch)
        self.inactive.masked_fill_(fired, 0)  # a boolean-mask assignment would sync (it takes nonzero)

    def _aux(self, x: torch.Tensor, acts: torch.Tensor, y: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Dead latents' top activations per row, decoded without bias, fit to the residual.

        When no dead latent fires on any row (every dead pre-activation is <= 0), their decoded sum is 0:

        * ``reference``, matryoshka: the seed's Matryoshka SAE and transcoder skip the term
          (``aux_reconstruct.abs().sum() > 0``), so aux is 0 and moves nothing;
        * ``reference``, batchtopk: the seed's ``BatchTopKSAE`` keeps ``aux_penalty * mse(0, residual)``, and
          with its residual not detached that term trains the live latents (a larger reconstruction weight);
        * ``default``: the term is kept as ``aux_penalty * mse(0, residual)`` for every arch. Its residual is
          detached, so it is a constant with no gradient: no weight moves, exactly as if it were skipped, and
          the logged aux stays a continuous measure of how much of the residual the dead latents fail to
          explain (all of it, while they are silent) rather than dropping to 0 when they are most silent.
        """
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if n_dead == 0:
            return torch.zeros((), device=y.device)
        residual = wide(y) - wide(recon)
        if not self.reference:
            residual = residual.detach()
        idx = torch.nonzero(dead).squeeze(1)
        code = row_topk(acts[:, idx], min(self.k_aux(), n_dead))
        code.values = self.dic.attach(x, code.rows, idx[code.latents], code.values)
        partial = group_partials(code, self.dic.W_dec[idx], torch.tensor([n_dead], device=y.device))[:, 0]
        aux = self.aux_penalty * mse(partial, residual)
        if self.reference and self.dic.arch == "matryoshka":
            aux = torch.where(partial.abs().sum() > 0, aux, torch.zeros_like(aux))  # the seed's test, no host sync
        return aux

    # -- the decoder's unit norm ---------------------------------------------------------------------
    @torch.no_grad()
    def before_step(self) -> None:
        """Remove the gradient's radial component; the reference also renormalises the rows here."""
        W = self.dic.W_dec
        if W.grad is None:
            return
        unit = W / W.norm(dim=-1, keepdim=True)
        W.grad -= (W.grad * unit).sum(-1, keepdim=True) * unit
        if self.reference:
            W.copy_(unit)

    @torch.no_grad()
    def after_step(self) -> None:
        if not self.reference:
            W = self.dic.W_dec
            W.div_(W.norm(dim=-1, keepdim=True))

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"inactive": self.inactive.clone(), "started": self.started.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.inactive.copy_(state["inactive"])
        self.started.copy_(state["started"])
