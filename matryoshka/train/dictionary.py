"""One dictionary core for every architecture: SAE or transcoder, TopK, BatchTopK or Matryoshka.

An SAE is a dictionary whose target is its source; a transcoder one whose target is another array
(its widths may differ, and it may add a linear skip connection). BatchTopK and TopK are Matryoshka
dictionaries with a single group, so one code path computes every architecture's prefixes (their loss is
not the Matryoshka's, though: see :mod:`matryoshka.train.objectives`).

    SAE         acts = relu((x - b_dec) @ W_enc)          (the seed never adds b_enc)
    transcoder  acts = relu(x @ W_enc + b_enc)
    prefix g    x_hat_g = b_dec [+ x @ W_skip] + sum over groups <= g of acts_g @ W_dec_g

Training keeps the batch's top ``k * B`` activations (TopK: each row's top ``k``); inference keeps
activations above the learned ``threshold`` (TopK: still each row's top ``k``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ARCHS
from .encode import selected
from .sparse import Code, above, batch_topk, group_partials, row_topk

if TYPE_CHECKING:
    from .distributed import Team


class Dictionary(nn.Module):
    def __init__(self, d_in: int, d_out: int, width: int, k: int, arch: str = "matryoshka",
                 group_sizes: list[int] | None = None, transcoder: bool = False, skip: bool = False) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch: {arch!r} is not one of {', '.join(ARCHS)}")
        groups = list(group_sizes) if arch == "matryoshka" else [width]
        if sum(groups) != width:
            raise ValueError(f"group_sizes {groups} sum to {sum(groups)}, not the width {width}")
        self.d_in, self.d_out, self.width, self.k = d_in, d_out, width, k
        self.arch, self.transcoder = arch, transcoder
        self.group_sizes = groups
        self.W_enc = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(d_in, width)))
        if transcoder:
            W_dec = nn.init.kaiming_uniform_(torch.empty(width, d_out))
        else:
            W_dec = self.W_enc.detach().t().contiguous()  # row-major: embedding_bag's fast path
        self.W_dec = nn.Parameter(W_dec / W_dec.norm(dim=-1, keepdim=True))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.b_enc = nn.Parameter(torch.zeros(width)) if transcoder else None
        self.W_skip = nn.Parameter(torch.zeros(d_in, d_out)) if skip else None
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("bounds", torch.cumsum(torch.tensor(groups), 0))

    @property
    def n_groups(self) -> int:
        return len(self.group_sizes)

    def centred(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's input: x for a transcoder, x - b_dec for an SAE (b_dec's gradient through
        this path is added by :func:`~matryoshka.train.encode.selected`)."""
        return x if self.transcoder else x - self.b_dec.detach()

    @torch.no_grad()
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Dense [B, width] activations before selection (the encoder matmul), without autograd."""
        h = self.centred(x) @ self.W_enc
        if self.b_enc is not None:
            h = h + self.b_enc
        return F.relu(h)

    def attach(self, x: torch.Tensor, rows: torch.Tensor, latents: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Make selected activations differentiable, with the encoder's sparse backward."""
        return selected(values, self.centred(x), self.W_enc, self.b_enc, None if self.transcoder else self.b_dec,
                        rows, latents)

    def select(self, acts: torch.Tensor, training: bool, team: Team | None = None) -> Code:
        """Active latents (values without autograd: see :meth:`attach`); ``team``: data-parallel ranks
        whose batches together form the batch of batch top-k."""
        if self.arch == "topk":
            return row_topk(acts, self.k)
        return batch_topk(acts, self.k, team) if training else above(acts, self.threshold)

    def prefixes(self, code: Code, x: torch.Tensor) -> torch.Tensor:
        """[B, groups, d_out]: the reconstruction from each prefix of groups (the last one uses them all)."""
        partial = group_partials(code, self.W_dec, self.bounds)
        base = self.b_dec if self.W_skip is None else self.b_dec + x @ self.W_skip
        return base.unsqueeze(-2) + torch.cumsum(partial, dim=1)

    # -- stateless inference API -------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense [B, width] latent activations at inference (threshold, or per-row top-k)."""
        return self.select(self.pre_acts(x), training=False).dense()

    @torch.no_grad()
    def decode(self, acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction from dense activations (``x`` is needed only for a skip connection)."""
        out = acts @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise ValueError("decode: this transcoder has a skip connection; pass the source x too")
            out = out + x @ self.W_skip
        return out

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code = self.select(self.pre_acts(x), training=False)
        return self.prefixes(code, x)[:, -1]
