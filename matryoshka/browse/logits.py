"""The output tokens a latent promotes and suppresses: its decoder direction through the unembedding.

For a dictionary whose decoder writes into the residual stream (``resid_*`` sites) the direction w_j is
multiplied by the model's unembedding W_U: the tokens with the largest and smallest w_j . W_U[t]. This is
the *direct path* only: it skips every later block and the final LayerNorm's scaling (it is exact in
direction only for the last residual site), and the page says so. Writes into other sites (attention or MLP
outputs, which add to the residual stream) are read the same way, as what they add directly. Caches without a
language model (synthetic, ``none``) or whose model cannot be loaded offline get no such view, said once.
"""
from __future__ import annotations

from typing import Any

import torch

from ..cache import Cache

TOP_TOKENS = 8


def output_tokens(W_dec: torch.Tensor, cache: Cache, target: str, tokenizer: Any | None,
                  block: int = 1024) -> tuple[list[dict[str, list]] | None, str]:
    """Per latent ``{"up": [[token, logit], ...], "down": [...]}``, and a note on what they mean."""
    m = cache.manifest["model"]
    if tokenizer is None or m.get("arch") in ("none", "synthetic"):
        return None, "no output tokens: the cache has no language model"
    try:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(m["resolved"], revision=m.get("revision"))
        W_U = model.get_output_embeddings().weight.detach().float()  # [vocab, d]
    except Exception as e:  # noqa: BLE001 - offline, gated, missing: no view, said once
        return None, f"no output tokens: the model {m['name']!r} could not be loaded ({type(e).__name__})"
    if W_U.shape[1] != W_dec.shape[1]:
        return None, f"no output tokens: {target} (width {W_dec.shape[1]}) is not the residual width {W_U.shape[1]}"
    out: list[dict[str, list]] = []
    w = W_dec.detach().float().cpu()
    for i0 in range(0, w.shape[0], block):
        logits = w[i0:i0 + block] @ W_U.T
        up, down = logits.topk(TOP_TOKENS, dim=1), (-logits).topk(TOP_TOKENS, dim=1)
        for k in range(logits.shape[0]):
            out.append({"up": [[tokenizer.decode([int(t)]), round(float(v), 3)]
                               for v, t in zip(up.values[k], up.indices[k])],
                        "down": [[tokenizer.decode([int(t)]), round(-float(v), 3)]
                                 for v, t in zip(down.values[k], down.indices[k])]})
    direct = "the last residual site" if target.endswith("resid_post") else f"{target}, a mid-network site"
    return out, (f"output tokens: the decoder direction through the unembedding, the direct path from {direct} "
                 "(later blocks and the final LayerNorm's scaling are skipped)")
