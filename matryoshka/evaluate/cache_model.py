"""Which model the downstream metrics load: the cache's own, or a local copy of it checked against its record.

A cache harvested from a local model directory records that directory's absolute path, which a teammate on
another machine does not have; it also records the Hub id the directory came from where the directory says
so (``hub_id``, from its config's ``_name_or_path``), and its model's identity (architecture, widths and a
hash of the weights). ``pipeline evaluate --model PATH`` points at a local copy; the copy is used only when
it is the same model by that record, or refused with one line naming what differs.
"""
from __future__ import annotations

from typing import Any

from ..cache import Cache, CacheError
from ..config import ConfigError
from ..models import ModelInfo, model_info

HINT = "evaluate without the downstream metrics with --no-lm"


def _where_hint(m: dict[str, Any]) -> str:
    hub = m.get("hub_id")
    origin = f" (a copy of {hub!r} on the Hub)" if hub else ""
    return f"point --model at a local copy of the cache's model{origin}, or {HINT}"


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
    recorded = {"architecture": m.get("arch"), "d_model": m.get("d_model"), "n_layers": m.get("n_layers"),
                "weights": cache.manifest["identity"]["model"]}
    found = {"architecture": info.arch, "d_model": info.d_model, "n_layers": info.n_layers, "weights": info.identity}
    differ = [f"{k} {found[k]} here, {recorded[k]} in the cache" for k in recorded
              if recorded[k] is not None and found[k] != recorded[k]]
    if differ:
        raise CacheError(f"evaluate: the model at {where!r} is not the one cache {cache.path!r} was harvested with "
                         f"({'; '.join(differ)}); {HINT if model else _where_hint(m)}")
    return info

