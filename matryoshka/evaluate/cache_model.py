"""Which model the downstream metrics load: the cache's own, or a local copy of it checked against its record.

A cache harvested from a local model directory records that directory's absolute path, which a teammate on
another machine does not have; it also records the Hub id the directory came from where the directory says
so (``hub_id``: ``harvest --hub-id``, else its config's ``_name_or_path``), and its model's identity
(architecture, widths and a hash of the weights). A cache harvested from a Hub name records that name and
commit as its identity, and a hash of the model's safetensors files (``model.weights``), which is what a
copy of those files is checked by. ``pipeline evaluate --model PATH`` points at a local copy; the copy is
used only when it is the same model by that record, or refused with one line naming what differs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..cache import Cache, CacheError
from ..config import ConfigError
from ..models import ModelInfo, model_info, weights_hash

HINT = "evaluate without the downstream metrics with --no-lm"


def _where_hint(m: dict[str, Any]) -> str:
    hub = m.get("hub_id")
    origin = f" (a copy of {hub!r} on the Hub)" if hub else ""
    return f"point --model at a local copy of the cache's model{origin}, or {HINT}"


def _weights(cache: Cache, info: ModelInfo, model: str | None) -> tuple[str | None, str | None]:
    """(recorded, found): the weights' hash the cache records and the one ``info`` has, compared alike. A local
    copy of a model harvested by Hub name is compared by its safetensors files (``model.weights``); anything
    else by the identity (a local directory's content hash, or a Hub name and commit)."""
    recorded = cache.manifest["identity"]["model"]
    if model and not recorded.startswith("sha256:") and Path(info.resolved).is_dir():
        return cache.manifest["model"].get("weights"), weights_hash(info.resolved)
    return recorded, info.identity


def cache_model(cache: Cache, model: str | None = None) -> ModelInfo:
    """The ``ModelInfo`` of the model to splice into: ``model`` (a local copy) if given, else the cache's own.
    One-line ConfigError when it cannot be loaded, CacheError when it is not the cache's model."""
    m = cache.manifest["model"]
    where = model or m["resolved"]
    try:
        info = model_info(where, None if model else m["revision"])
    except ConfigError as e:
        what, hint = ("--model", HINT) if model else ("the cache's model", _where_hint(m))
        raise ConfigError(f"evaluate: cannot load {what} {where!r} ({e}); {hint}") from None
    recorded_weights, found_weights = _weights(cache, info, model)
    if recorded_weights is None:
        raise CacheError(f"evaluate: cache {cache.path!r} records its model as {m['resolved']!r} at "
                         f"{cache.manifest['identity']['model']!r} but no hash of its weight files (harvested "
                         "before caches recorded one, or the model has no safetensors files), so the copy at "
                         f"{where!r} cannot be checked against it; evaluate without --model (the model loads from "
                         f"the Hub or the local Hugging Face cache), or {HINT}")
    recorded = {"architecture": m.get("arch"), "d_model": m.get("d_model"), "n_layers": m.get("n_layers"),
                "weights": recorded_weights}
    found = {"architecture": info.arch, "d_model": info.d_model, "n_layers": info.n_layers, "weights": found_weights}
    differ = [f"{k} {found[k]} here, {recorded[k]} in the cache" for k in recorded
              if recorded[k] is not None and found[k] != recorded[k]]
    if differ:
        raise CacheError(f"evaluate: the model at {where!r} is not the one cache {cache.path!r} was harvested with "
                         f"({'; '.join(differ)}); {HINT if model else _where_hint(m)}")
    return info
