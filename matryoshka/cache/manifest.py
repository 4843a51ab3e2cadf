"""The one place a cache's manifest is built: a model harvest, the synthetic source and the test fixture
all describe their cache through :func:`build_manifest`, so every cache has the same fields.

``source`` says what produced the rows: ``model`` (a language model: its tokens can be replayed through
it), ``synthetic`` (the ground-truth generator: no LM, no tokenizer; the token ids are zeros) or
``fixture`` (rows handed to :func:`matryoshka.fixtures.write_cache`). Caches written before the field
existed are model caches: read it as ``manifest.get("source", "model")``.
"""
from __future__ import annotations

from typing import Any

from .. import __version__
from .format import FORMAT_VERSION, fingerprint

CACHE_SOURCES = ("model", "synthetic", "fixture")


def build_manifest(*, source: str, identity: dict[str, Any], model: dict[str, Any], tokenizer: dict[str, Any],
                   dataset: dict[str, Any], context_size: int, bos: dict[str, Any], dtype: str, codec: str,
                   seqs_per_chunk: int, arrays: dict[str, dict[str, Any]], n_sequences: int, batch_size: int,
                   heldout_seqs: int, holdout_asked: str | None = None, fingerprint_override: str | None = None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A cache's manifest. ``identity`` is everything that determines the rows; its hash is the
    fingerprint (``fingerprint_override`` lets a test fixture pick its own). The held-out split is the
    first ``heldout_seqs`` sequences; ``holdout_asked`` (the ``--holdout`` it was made from) is kept beside
    it, so ``cache info`` can say what was asked and what was held out. The split is not part of the
    fingerprint: which rows a run trained on is recorded in the run and checked by evaluation
    (evaluate/stage.py). ``extra`` adds source-specific fields (the synthetic parameters)."""
    if source not in CACHE_SOURCES:
        raise ValueError(f"source: {source!r} is not one of {', '.join(CACHE_SOURCES)}")
    n_tokens = n_sequences * context_size
    heldout = heldout_seqs * context_size
    return {
        "format_version": FORMAT_VERSION, "tool_version": __version__, "source": source,
        "fingerprint": fingerprint_override or fingerprint(identity), "identity": identity,
        "model": model, "tokenizer": tokenizer, "dataset": dataset,
        "context_size": context_size, "bos": bos,
        "storage": {"dtype": dtype, "codec": codec, "seqs_per_chunk": seqs_per_chunk,
                    "chunk_tokens": seqs_per_chunk * context_size, "checksum": "crc32c"},
        "arrays": arrays,
        "n_tokens": n_tokens, "n_sequences": n_sequences, "batch_size": batch_size,
        "split": {"heldout": [0, heldout], "train": [heldout, n_tokens]}, "holdout_asked": holdout_asked,
        **(extra or {}),
    }


def holdout_summary(manifest: dict[str, Any]) -> str:
    """What was held out, against what ``--holdout`` asked: harvest says it and ``cache info`` shows it."""
    (a, b), n = manifest["split"]["heldout"], manifest["n_tokens"]
    asked = manifest.get("holdout_asked")
    return (f"held-out tokens {a:,}..{b:,} ({(b - a) / n:.1%} of {n:,}"
            + (f"; --holdout {asked!s} asked" if asked is not None else "") + f"), train {b:,}..{n:,}")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested identity as ``{"dataset.seed": 0, ...}``."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _short(v: Any) -> str:
    text = ",".join(map(str, v)) if isinstance(v, list) else str(v)
    return text if len(text) <= 24 else text[:21] + "..."


def identity_difference(here: dict[str, Any], cache: dict[str, Any]) -> str:
    """The settings two manifests' fingerprints differ by, as ``dtype: float32 here, bfloat16 in the cache``
    (every one, ``; ``-separated), so a refused harvest says what to change rather than two hashes."""
    a, b = _flat(here.get("identity", {})), _flat(cache.get("identity", {}))
    diffs = [f"{k}: {_short(a.get(k, '(none)'))} here, {_short(b.get(k, '(none)'))} in the cache"
             for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(diffs) if diffs else "the same settings, hashed by another version"
