"""The synthetic source (``harvest.source: synthetic``): activations with a known ground truth.

A dictionary of ``F = n_parents * (1 + children)`` hierarchical sparse features, each with a random
unit direction in the source space (and another in the target space). On every token:

* each parent fires independently with probability ``parent_rate``;
* when a parent fires, with probability ``child_rate`` exactly one of its children (uniform) fires too:
  a child never fires without its parent, and siblings never fire together;
* a firing feature has magnitude ``max(1 + magnitude_std * N(0, 1), 0.1)``;
* ``x = codes @ D + noise * N(0, I)`` is the first site's array, and, with a second site,
  ``y = codes @ T + target_noise * N(0, I)`` is a known target map for transcoders.

Features are ordered parents first (``0..P-1``), then the children of parent ``p`` at
``P + p * children + j``. Rows go through the real :class:`~matryoshka.cache.writer.CacheWriter`, so
the cache is an ordinary one (chunks, checksums, statistics, held-out split, resume) with, besides:

* ``acts/features`` [n_tokens, F]: the true feature activations (``codes``), in the storage dtype;
* ``ground_truth/<array>`` [F, width] float32: the true unit direction of every feature in that array;
* ``manifest["synthetic"]``: the settings, the seed, ``parent`` (per feature: its parent, -1 for a
  parent), the features array's name and the direction arrays' paths;
* ``manifest["source"] == "synthetic"``; the token ids are all 0 and no BOS is marked (there is no LM).

Sequence ``s`` is drawn from its own generator seeded by ``(seed, 1, s)`` and the dictionary from
``(seed, 0)``: the rows do not depend on batch sizes, shards or resumes, and the fingerprint covers the
settings, the seed and :data:`GENERATOR_VERSION`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..cache.format import FORMAT_VERSION, row_bytes, seqs_per_chunk, to_storage
from ..cache.manifest import build_manifest
from ..config import HarvestConfig, SyntheticConfig, site_name

GENERATOR_VERSION = 1
FEATURES = "features"
"""The array of true feature activations."""


@dataclasses.dataclass
class Truth:
    """The known dictionary: a direction per feature for x (and the target), and the hierarchy."""

    directions: np.ndarray  # [F, d_model] unit rows
    target_directions: np.ndarray | None  # [F, d_target] unit rows, or None without a target
    parent: np.ndarray  # [F] int: the parent feature, -1 for a parent


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    w = rng.standard_normal((n, d))
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def truth(s: SyntheticConfig, seed: int, target: bool) -> Truth:
    rng = np.random.default_rng([seed, 0])
    directions = _unit_rows(rng, s.n_features, s.d_model)
    target_directions = _unit_rows(rng, s.n_features, s.d_target or s.d_model) if target else None
    parent = np.concatenate([np.full(s.n_parents, -1), np.repeat(np.arange(s.n_parents), s.children)])
    return Truth(directions, target_directions, parent)


def sample(s: SyntheticConfig, t: Truth, seed: int, seqs: range, ctx: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Rows of sequences ``seqs``: (codes [n, F], x [n, d_model], y [n, d_target] or None), float64."""
    P, C, F = s.n_parents, s.children, s.n_features
    draws = []
    for q in seqs:
        rng = np.random.default_rng([seed, 1, q])
        draws.append((rng.random((ctx, P)), rng.random((ctx, P)), rng.integers(0, C, (ctx, P)),
                      rng.standard_normal((ctx, F)), rng.standard_normal((ctx, s.d_model)),
                      rng.standard_normal((ctx, t.target_directions.shape[1])) if t.target_directions is not None
                      else None))
    u_parent, u_child, which, z_mag, z_x, z_y = (np.concatenate(d) if d[0] is not None else None
                                                 for d in zip(*draws))
    magnitude = np.maximum(1 + s.magnitude_std * z_mag, 0.1)
    parents = u_parent < s.parent_rate
    children = parents & (u_child < s.child_rate)
    codes = np.zeros((len(u_parent), F))
    codes[:, :P] = np.where(parents, magnitude[:, :P], 0.0)
    rows, ps = np.nonzero(children)
    cols = P + ps * C + which[rows, ps]
    codes[rows, cols] = magnitude[rows, cols]
    x = codes @ t.directions + s.noise * z_x
    y = codes @ t.target_directions + s.target_noise * z_y if t.target_directions is not None else None
    return codes, x, y


def _arrays(cfg: HarvestConfig) -> tuple[str, str | None]:
    names = [site_name(layer, site) for layer, site in cfg.site_list]
    return names[0], names[1] if len(names) > 1 else None


def manifest(cfg: HarvestConfig) -> dict[str, Any]:
    """The manifest of a synthetic cache (no model, tokenizer or dataset is opened)."""
    s = cfg.synthetic
    x_name, y_name = _arrays(cfg)
    d_target = s.d_target or s.d_model
    arrays = {x_name: {"layer": cfg.site_list[0][0], "site": cfg.site_list[0][1], "hook_name": "synthetic.x",
                       "width": s.d_model}}
    if y_name is not None:
        arrays[y_name] = {"layer": cfg.site_list[1][0], "site": cfg.site_list[1][1], "hook_name": "synthetic.y",
                          "width": d_target}
    arrays[FEATURES] = {"layer": None, "site": FEATURES, "hook_name": "synthetic.features", "width": s.n_features}
    widest = max(row_bytes(a["width"], cfg.dtype) for a in arrays.values())
    spc, heldout = cfg.holdout_layout(seqs_per_chunk(cfg.context_size, widest, cfg.chunk_mb, cfg.n_sequences))
    settings = s.model_dump()
    identity = {"format_version": FORMAT_VERSION, "source": "synthetic", "generator": GENERATOR_VERSION,
                "synthetic": settings, "seed": cfg.seed, "context_size": cfg.context_size,
                "sites": list(arrays), "dtype": cfg.dtype}
    directions = {x_name: f"ground_truth/{x_name}"} | ({y_name: f"ground_truth/{y_name}"} if y_name else {})
    parent = truth(s, cfg.seed, False).parent
    return build_manifest(
        source="synthetic", identity=identity,
        model={"name": "synthetic", "resolved": "synthetic", "revision": None, "arch": "synthetic",
               "d_model": s.d_model, "n_layers": 0, "dtype": "float64"},
        tokenizer={"name": "none (synthetic source: no language model)", "vocab_size": 1},
        dataset={"id": "synthetic", "config": None, "split": None, "revision": None, "text_column": None,
                 "token_column": None, "seed": cfg.seed, "shuffle_buffer": 0},
        context_size=cfg.context_size, bos={"policy": "none", "token_id": None}, dtype=cfg.dtype, codec=cfg.codec,
        seqs_per_chunk=spc, arrays=arrays, n_sequences=cfg.n_sequences, batch_size=cfg.batch_size,
        heldout_seqs=heldout, holdout_asked=str(cfg.holdout),
        extra={"synthetic": {"settings": settings, "seed": cfg.seed, "generator": GENERATOR_VERSION,
                             "features": FEATURES, "parent": parent.tolist(), "directions": directions}})


def generate(cfg: HarvestConfig, writer, progress: bool, desc: str = "") -> None:
    """Write the ground truth into the cache, then generate the writer's sequences and write them."""
    s, m = cfg.synthetic, writer.manifest
    x_name, y_name = _arrays(cfg)
    t = truth(s, cfg.seed, y_name is not None)
    for name, d in ((x_name, t.directions), (y_name, t.target_directions)):
        if name is not None and writer.first == 0 and writer.only is None:  # one writer (the shard with chunk 0;
            # not a repair); a resume rewrites the same
            writer.group.create_array(m["synthetic"]["directions"][name], data=d.astype(np.float32), overwrite=True)
    ctx = cfg.context_size
    start, first, end = writer.start_row // ctx, writer.first * m["storage"]["seqs_per_chunk"], writer.end_row // ctx
    bar = tqdm(total=(end - first) * ctx, initial=(start - first) * ctx, unit="tok", unit_scale=True,
               disable=not progress, desc=f"harvest synthetic{desc}", dynamic_ncols=True)
    try:
        for q in range(start, end, cfg.batch_size):
            seqs = range(q, min(q + cfg.batch_size, end))
            codes, x, y = sample(s, t, cfg.seed, seqs, ctx)
            rows = {x_name: x, FEATURES: codes} | ({y_name: y} if y_name is not None else {})
            writer.write(torch.zeros(len(seqs), ctx, dtype=torch.int32),
                         {n: to_storage(torch.from_numpy(a), cfg.dtype).reshape(len(seqs), ctx, -1)
                          for n, a in rows.items()})
            bar.update(len(seqs) * ctx)
        writer.finish()
    finally:
        bar.close()
