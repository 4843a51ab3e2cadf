"""Export a trained run to the folder format SAELens loads (``cfg.json`` + ``sae_weights.safetensors``).

BatchTopK and Matryoshka dictionaries are exported as JumpReLU SAEs whose threshold is the learned
inference threshold (the same activations as our ``encode``); TopK as SAELens's ``topk``; transcoders
as ``jumprelu_transcoder`` / ``jumprelu_skip_transcoder`` with their output hook and width in the
metadata. Weights are in the cache's units (input scales folded, see :mod:`matryoshka.train.load`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..files import shareable
from .load import load
from .saelens import saelens_metadata


def _architecture(dic) -> str:
    if dic.transcoder:
        return "jumprelu_skip_transcoder" if dic.W_skip is not None else "jumprelu_transcoder"
    return "topk" if dic.arch == "topk" else "jumprelu"


def export_missing(run_dir: str | Path, manifest: dict[str, Any] | None = None) -> bool:
    """Export a finished run unless its export is there (``cfg.json`` is written last); whether it exported."""
    if (Path(run_dir) / "saelens" / "cfg.json").is_file():
        return False
    export_saelens(run_dir, Path(run_dir) / "saelens", manifest)
    return True


def export_saelens(run: str | Path, out: str | Path, manifest: dict[str, Any] | None = None) -> Path:
    """Write ``out/cfg.json`` and ``out/sae_weights.safetensors`` for the run at ``run``."""
    dic = load(run)
    cfg = dic.config
    arch = _architecture(dic)
    weights = {"W_enc": dic.W_enc, "W_dec": dic.W_dec, "b_dec": dic.b_dec,
               "b_enc": dic.b_enc if dic.b_enc is not None else torch.zeros(dic.width)}
    if arch != "topk":
        weights["threshold"] = torch.full((dic.width,), float(dic.threshold))
    if dic.W_skip is not None:
        weights["W_skip"] = dic.W_skip.t()  # SAELens keeps it as [d_out, d_in]
    metadata = saelens_metadata(cfg, manifest or {})
    config: dict[str, Any] = {"architecture": arch, "d_in": dic.d_in, "d_sae": dic.width, "dtype": "float32",
                              "device": "cpu", "apply_b_dec_to_input": not dic.transcoder,
                              "normalize_activations": "none", "reshape_activations": "none", "metadata": metadata}
    if arch == "topk":
        config["k"] = dic.k
    if dic.transcoder:
        config["d_out"] = dic.d_out
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().float() for k, v in weights.items()}, out / "sae_weights.safetensors")
    shareable(out / "sae_weights.safetensors")  # safetensors writes 0600: teammates load exports too
    (out / "cfg.json").write_text(json.dumps(config, indent=2))
    return out
