"""Names that configs and the language-model code share: the capturable sites, and whether a model name
is a local directory. Their own module, so that models.py need not import config.py (which reads a model's width
through models.py): no import cycle."""
from __future__ import annotations

from pathlib import Path

SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")
"""Capturable sites in the order a block computes them. ``mlp_in`` is the true MLP input
(after ``ln2``, or Gemma-2's pre-feedforward norm), which differs from ``resid_mid``."""


def looks_like_path(name: str) -> bool:
    """Whether a model name is meant as a local directory rather than a Hub id: it exists as one, starts like a
    path (``/``, ``.``, ``~``), or has more than the one ``/`` of ``namespace/repo``."""
    return Path(name).expanduser().is_dir() or name.startswith(("/", ".", "~")) or name.count("/") > 1


def is_hub_id(text: str) -> bool:
    """Whether ``text`` has the shape of a Hugging Face Hub model id (``name`` or ``owner/name``, the Hub's own
    rules: word characters, ``-`` and ``.``, no ``--`` or ``..``). A shape only: nothing is looked up."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(str(text))
    except HFValidationError:
        return False
    return True
