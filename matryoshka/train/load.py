"""Load a trained run as a plain dictionary in the cache's own units.

Training sees inputs scaled so that E||x||^2 = d. Loading folds those constants into the weights, so
``encode`` takes raw activations and ``decode`` returns raw activations, with no state to carry::

    SAE         W_enc' = s W_enc     b_dec' = b_dec / s      W_dec' = W_dec / s       (s = s_in = s_out)
    transcoder  W_enc' = s_in W_enc  b_dec' = b_dec / s_out  W_dec' = W_dec / s_out   W_skip' = W_skip s_in / s_out

The latent activations (and so the threshold) are unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..cache.location import Location
from ..run_folder import CHECKPOINTS, Workspace, whole_checkpoint
from .dictionary import Dictionary


def checkpoint_dir(run_dir: str | Path) -> Path:
    """Where a local run folder's checkpoint is: ``checkpoint/``, or ``checkpoint.old/`` when a save was killed
    between moving the last checkpoint aside and renaming the new one into place (see ``run_folder.py``)."""
    run_dir = Path(run_dir)
    return run_dir / (whole_checkpoint(lambda key: (run_dir / key).is_file()) or "checkpoint")


def load(path: str | Path, device: str | torch.device = "cpu") -> Dictionary:
    """A run folder (``runs/<cache>/<run>``, local or a URL such as ``s3://team/runs/<cache>/<run>``), its
    ``checkpoint/`` folder, or a W&B artifact reference ``wandb:ENTITY/PROJECT/NAME:VERSION`` (downloaded
    first; needs the network), as a :class:`Dictionary` in eval mode."""
    if str(path).startswith("wandb:"):
        import wandb

        path = Path(wandb.Api().artifact(str(path)[len("wandb:"):], type="model").download())
    where = Location.of(path)
    if where.remote:
        with Workspace() as space:
            run = space.run(where)
            if not run.trained():
                raise FileNotFoundError(f"load: {str(path)!r} holds no trained run (no checkpoint/model.safetensors)")
            run.fetch(keep=lambda key: key.split("/")[0] in CHECKPOINTS, state=False)
            return load(run.work, device)
    path = Path(str(where))
    ck = checkpoint_dir(path)
    ck = ck if ck.is_dir() else path
    if not (ck / "model.safetensors").is_file():
        raise FileNotFoundError(f"load: {str(path)!r} holds no trained run (no checkpoint/model.safetensors)")
    cfg = json.loads((ck / "config.json").read_text())
    dic = Dictionary(cfg["d_in"], cfg["d_out"], cfg["width"], cfg["k"], cfg["arch"], cfg["group_sizes"],
                     transcoder=cfg["transcoder"], skip=cfg["skip"])
    dic.load_state_dict(load_file(ck / "model.safetensors"))
    s_in, s_out = cfg["scale_in"], cfg["scale_out"]
    with torch.no_grad():
        dic.W_enc.mul_(s_in)
        dic.W_dec.div_(s_out)
        dic.b_dec.div_(s_out)
        if dic.W_skip is not None:
            dic.W_skip.mul_(s_in / s_out)
    dic.config = cfg
    return dic.to(device).eval().requires_grad_(False)
