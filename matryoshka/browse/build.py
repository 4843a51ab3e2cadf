"""Everything one run's latent pages show, computed in one pass over held-out rows.

:func:`run_data` encodes the first ``tokens`` held-out rows in order (:mod:`.sample`), derives the
per-latent records (:mod:`.records`), the likely parent and children of each latent (:mod:`.family`), the
ground truth on a synthetic cache (:mod:`.truth`) and, for a language model's cache, the output tokens each
latent's decoder direction promotes and suppresses (:mod:`.logits`). The result is plain JSON-ready data;
:mod:`.site` splits it into shards.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..cache import Cache
from ..evaluate.contexts import cache_tokenizer
from ..train.dictionary import Dictionary
from ..train.load import load
from .family import family
from .logits import output_tokens
from .records import latent_records
from .sample import sample_heldout
from .truth import latent_truth


@dataclass
class RunData:
    name: str
    meta: dict[str, Any]
    latents: list[dict[str, Any]]
    strings: dict[int, str]
    labels: list[str] = field(default_factory=list)


def label(rec: dict[str, Any], strings: dict[int, str]) -> str:
    """A latent's short name: the token its top contexts most often fire on."""
    toks = Counter(strings[c["t"][c["c"]]].strip() or strings[c["t"][c["c"]]] for c in rec["top"])
    return toks.most_common(1)[0][0] if toks else ""


def run_data(path: Path, cache: Cache, tokens: int, batch_size: int = 4096, n_top: int = 10, per_band: int = 2,
             min_share: float = 0.5, progress: bool = False) -> RunData:
    """The data of the trained run in folder ``path``."""
    return dictionary_data(load(path), path.name, cache, tokens, batch_size, n_top, per_band, min_share, progress)


def dictionary_data(dic: Dictionary, name: str, cache: Cache, tokens: int, batch_size: int = 4096, n_top: int = 10,
                    per_band: int = 2, min_share: float = 0.5, progress: bool = False) -> RunData:
    """The data of a dictionary with a run's ``config`` (``source``, ``target``, ``arch``, ``k``)."""
    cfg = dic.config
    source, target = cfg["source"], cfg.get("target") or cfg["source"]
    sample = sample_heldout(dic, cache, source, tokens, batch_size, progress)
    tokenizer, why = cache_tokenizer(cache)
    recs, strings = latent_records(sample, cache.manifest["context_size"], tokenizer, n_top, per_band)
    fam = family(sample.codes, dic.W_dec, dic.group_sizes, min_share)
    kids = fam.children()
    truth = latent_truth(dic.W_dec, cache, target, sample)
    logits, logit_note = output_tokens(dic.W_dec, cache, target, tokenizer)
    bounds = np.cumsum([0, *dic.group_sizes]).tolist()
    for j, r in enumerate(recs):
        g = int(fam.group[j])
        r.update(id=j, group=g, prefix=bounds[g + 1], parent=int(fam.parent[j]),
                 candidates=[[i, round(s, 4), round(c, 4)] for i, s, c in fam.candidates[j]],
                 children=[[k, round(float(fam.share[k]), 4)] for k in kids[j]])
        if truth is not None:
            r["truth"] = truth[j]
        if logits is not None:
            r["logits"] = logits[j]
    labels = [label(r, strings) for r in recs]
    first = [j for j in range(bounds[1]) if recs[j]["n"]] or [0]
    meta = {"run": name, "arch": cfg["arch"], "width": dic.width, "k": cfg.get("k"), "groups": dic.group_sizes,
            "bounds": bounds, "source": source, "target": target, "transcoder": bool(cfg.get("target")),
            "tokens": sample.codes.n, "live_tokens": sample.live, "context_size": cache.manifest["context_size"],
            "tokenizer": why or "decoded with the model's tokenizer", "logits": logit_note,
            "synthetic": truth is not None, "min_share": min_share, "fingerprint": cache.fingerprint,
            "start": max(first, key=lambda j: (recs[j]["n"], -j))}  # the page without ?i=: the busiest root
    return RunData(name, meta, recs, strings, labels)
