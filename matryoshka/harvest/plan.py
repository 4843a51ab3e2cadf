"""What a harvest will write, checked and decided before the LM is loaded: its manifest, and the model,
tokenizer and documents it needs (none for the synthetic source)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cache.format import FORMAT_VERSION, row_bytes, seqs_per_chunk
from ..cache.manifest import build_manifest
from ..config import HarvestConfig, check_device, site_name
from ..errors import ConfigError
from ..models import (
    ModelInfo,
    check_context_size,
    check_sites,
    hook_name,
    hub_id,
    hub_weights,
    load_tokenizer,
    model_info,
    resolve_attention,
    resolve_name,
    tokenizer_identity,
)
from ..names import looks_like_path
from .synthetic import manifest as synthetic_manifest
from .tokens import bos_id, dataset_identity, open_documents


@dataclass
class Plan:
    """Everything checked and decided before the LM is loaded."""

    manifest: dict[str, Any]
    info: ModelInfo | None  # None (and no tokenizer or documents) for the synthetic source
    tokenizer: Any
    documents: Any


def recorded_hub_id(cfg: HarvestConfig) -> str | None:
    """The Hub id given for the manifest (``hub_id``), checked before anything loads: None when not given.

    It is a record for people (``cache info``, and evaluate's hint on a machine without the directory), not
    part of the cache's identity: the identity already names the model by a hash of its weights, and two
    harvests of the same directory, one told its Hub id and one not, write the same rows and so share one
    fingerprint. A Hub id given for a model that is itself a Hub name would contradict that name: refused."""
    if cfg.hub_id is not None and not Path(resolve_name(cfg.model)).is_dir() and not looks_like_path(cfg.model):
        raise ConfigError(f"hub_id: {cfg.hub_id!r} is only for a local model directory; model {cfg.model!r} is a "
                          f"Hub name and is recorded as such; drop hub_id")
    return cfg.hub_id


def plan(cfg: HarvestConfig) -> Plan:
    """Validate the config against the model, tokenizer and dataset, and write the manifest."""
    check_device(cfg.device)
    if cfg.source == "synthetic":
        return Plan(synthetic_manifest(cfg), None, None, None)
    given = recorded_hub_id(cfg)
    info = model_info(cfg.model, cfg.revision)
    hub = given or hub_id(info.resolved)  # the flag wins over the directory's _name_or_path
    # a Hub name's identity is its name and commit: the weights' hash lets evaluate check a local copy of it
    weights = None if Path(info.resolved).is_dir() else hub_weights(info)
    check_sites(info, cfg.site_list)
    attention = resolve_attention(info, cfg.attn_implementation)
    check_context_size(info, cfg.context_size)
    tokenizer = load_tokenizer(info)
    ds = open_documents(cfg)
    bos = bos_id(tokenizer, cfg.bos)
    spc, heldout = cfg.holdout_layout(
        seqs_per_chunk(cfg.context_size, row_bytes(info.d_model, cfg.dtype), cfg.chunk_mb, cfg.n_sequences))
    arrays = {site_name(layer, s): {"layer": layer, "site": s, "hook_name": hook_name(layer, s), "width": info.d_model}
              for layer, s in cfg.site_list}
    identity = {
        "format_version": FORMAT_VERSION,
        "model": info.identity, "model_dtype": cfg.model_dtype,
        # rows differ at rounding level between implementations; eager, what every cache was harvested
        # with before the choice existed, is left out so that those caches keep their fingerprints
        **({} if attention == "eager" else {"attn_implementation": attention}),
        "tokenizer": tokenizer_identity(tokenizer),
        "dataset": dataset_identity(cfg),
        "context_size": cfg.context_size, "bos": cfg.bos,
        "sites": list(arrays), "dtype": cfg.dtype,
    }
    manifest = build_manifest(
        source="model", identity=identity,
        model={"name": info.name, "resolved": info.resolved, "revision": info.revision, "arch": info.arch,
               "d_model": info.d_model, "n_layers": info.n_layers, "dtype": cfg.model_dtype,
               "attn_implementation": attention, **({"hub_id": hub} if hub else {}),
               **({"weights": weights} if weights else {})},
        tokenizer={"name": tokenizer.name_or_path, **tokenizer_identity(tokenizer)},
        dataset={"id": cfg.dataset, "config": cfg.dataset_config, "split": cfg.dataset_split,
                 "revision": cfg.dataset_revision, "text_column": cfg.text_column,
                 "token_column": cfg.token_column, "seed": cfg.seed, "shuffle_buffer": cfg.shuffle_buffer},
        context_size=cfg.context_size, bos={"policy": cfg.bos, "token_id": bos}, dtype=cfg.dtype, codec=cfg.codec,
        seqs_per_chunk=spc, arrays=arrays, n_sequences=cfg.n_sequences, batch_size=cfg.batch_size,
        heldout_seqs=heldout, holdout_asked=str(cfg.holdout))
    return Plan(manifest, info, tokenizer, ds)
