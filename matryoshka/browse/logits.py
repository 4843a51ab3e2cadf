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
    w = W_dec.detach().float().cpu()
    ups, downs = [], []
    for i0 in range(0, w.shape[0], block):
        logits = w[i0:i0 + block] @ W_U.T
        ups.append(logits.topk(TOP_TOKENS, dim=1))
        downs.append(logits.topk(TOP_TOKENS, dim=1, largest=False))
    up_v, up_i = torch.cat([u.values for u in ups]).tolist(), torch.cat([u.indices for u in ups]).tolist()
    dn_v, dn_i = torch.cat([d.values for d in downs]).tolist(), torch.cat([d.indices for d in downs]).tolist()
    text = {t: tokenizer.decode([t]) for t in {t for row in up_i + dn_i for t in row}}  # each token decoded once
    out = [{"up": [[text[t], round(v, 3)] for v, t in zip(uv, ui)],
            "down": [[text[t], round(v, 3)] for v, t in zip(dv, di)]}
           for uv, ui, dv, di in zip(up_v, up_i, dn_v, dn_i)]
    direct = "the last residual site" if target.endswith("resid_post") else f"{target}, a mid-network site"
    return out, (f"output tokens: the decoder direction through the unembedding, the direct path from {direct} "
                 "(later blocks and the final LayerNorm's scaling are skipped)")
