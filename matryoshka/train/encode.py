"""The encoder's sparse backward.

The forward pass must compute every pre-activation (a dense [B, d] @ [d, M] matmul) to select the top
ones, but only the selected entries get a gradient. Plain autograd would still run two more dense
matmuls of the same size in the backward pass (the W_enc gradient, and the gradient of the centred
input that b_dec needs). Here both are sums over the selected (row, latent) entries only, done by
``embedding_bag``: the backward pass costs O(selected x d) instead of O(B x M x d).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .sparse import bag_counts


def _bag_sum(weight: torch.Tensor, index: torch.Tensor, bag: torch.Tensor, n_bags: int,
             scale: torch.Tensor) -> torch.Tensor:
    """[n_bags, d]: sum over entries i of ``scale[i] * weight[index[i]]`` into bag ``bag[i]``."""
    order = torch.argsort(bag, stable=True)
    counts = bag_counts(bag, n_bags)
    offsets = torch.cumsum(counts, 0) - counts
    return F.embedding_bag(index[order], weight, offsets, mode="sum", per_sample_weights=scale[order])


class SelectedPreActs(torch.autograd.Function):
    """Pre-activations at chosen (row, latent) entries, with a sparse backward.

    ``values`` are those entries of the dense forward (computed without autograd); the function makes
    them differentiable with respect to ``W_enc``, ``b_enc`` and ``b_dec`` (the SAE's input centring).
    """

    @staticmethod
    def forward(ctx, values, x_centred, W_enc, b_enc, b_dec, rows, latents):  # noqa: D102
        ctx.save_for_backward(x_centred, W_enc, rows, latents)
        ctx.has_b_enc, ctx.has_b_dec = b_enc is not None, b_dec is not None
        return values.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x_c, W_enc, rows, latents = ctx.saved_tensors
        g = grad.to(x_c.dtype)
        M = W_enc.shape[1]
        # dL/dW_enc[:, j] = sum over selected (r, j) of g * x_c[r]
        grad_W = _bag_sum(x_c, rows, latents, M, g).t() if ctx.needs_input_grad[2] else None
        per_latent = torch.zeros(M, dtype=g.dtype, device=g.device).index_add_(0, latents, g)
        grad_b_enc = per_latent if ctx.has_b_enc and ctx.needs_input_grad[3] else None
        # x_c = x - b_dec, so dL/db_dec = -W_enc @ (the gradient summed per latent)
        grad_b_dec = -(W_enc @ per_latent) if ctx.has_b_dec and ctx.needs_input_grad[4] else None
        return None, None, grad_W, grad_b_enc, grad_b_dec, None, None


def selected(values: torch.Tensor, x_centred: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor | None,
             b_dec: torch.Tensor | None, rows: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """Differentiable pre-activations at (rows, latents); zero gradient where the value is not positive."""
    out = SelectedPreActs.apply(values, x_centred, W_enc, b_enc, b_dec, rows, latents)
    return torch.where(values > 0, out, torch.zeros_like(out))
