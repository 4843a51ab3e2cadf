"""JSON that every parser reads: a non-finite number (NaN, inf) is written as ``null``.

Python's ``json.dumps`` writes ``NaN`` and ``Infinity`` bare, which is not JSON: ``jq``, JavaScript and
strict parsers reject the whole file. Every JSON file the pipeline writes (eval.json, metrics.jsonl)
goes through :func:`dumps`, so a diverged metric costs one value, never the file. Whoever computes such
a metric says so separately (see ``evaluate/stage.py``): ``null`` alone would be a silent fallback.
"""
from __future__ import annotations

import json
import math
from typing import Any


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float, at any depth, replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kw: Any) -> str:
    """``json.dumps`` of :func:`finite` ``(obj)``; raises if anything non-finite were left."""
    return json.dumps(finite(obj), allow_nan=False, **kw)


def non_finite(values: dict[str, Any]) -> dict[str, float]:
    """The entries of a flat dict whose value is a non-finite float (what :func:`dumps` writes as null)."""
    return {k: v for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)}
