"""What a harvest will write, checked and decided before the LM is loaded: its manifest, and the model,
tokenizer and documents it needs (none for the synthetic source)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..cache.format import FORMAT_VERSION, row_bytes, seqs_per_chunk
from ..cache.manifest import build_manifest
from ..config import HarvestConfig, check_device, site_name
from ..models import (
    ModelInfo,
    check_context_size,
    check_sites,
    hook_name,
    hub_id,
    load_tokenizer,
    model_info,
    resolve_attention,
    tokenizer_identity,
)
from .synthetic import manifest as synthetic_manifest
from .tokens import bos_id, dataset_identity, open_documents


@dataclass
class Plan:
    """Everything checked and decided before the LM is loaded."""

    manifest: dict[str, Any]
    info: ModelInfo | None  # None (and no tokenizer or documents) for the synthetic source
    tokenizer: Any
    documents: Any


def plan(cfg: HarvestConfig) -> Plan:
    """Validate the config against the model, tokenizer and dataset, and write the manifest."""
    check_device(cfg.device)
    if cfg.source == "synthetic":
        return Plan(synthetic_manifest(cfg), None, None, None)
    info = model_info(cfg.model, cfg.revision)
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
               "attn_implementation": attention, **({"hub_id": hub} if (hub := hub_id(info.resolved)) else {})},
        tokenizer={"name": tokenizer.name_or_path, **tokenizer_identity(tokenizer)},
        dataset={"id": cfg.dataset, "config": cfg.dataset_config, "split": cfg.dataset_split,
                 "revision": cfg.dataset_revision, "text_column": cfg.text_column,
                 "token_column": cfg.token_column, "seed": cfg.seed, "shuffle_buffer": cfg.shuffle_buffer},
        context_size=cfg.context_size, bos={"policy": cfg.bos, "token_id": bos}, dtype=cfg.dtype, codec=cfg.codec,
        seqs_per_chunk=spc, arrays=arrays, n_sequences=cfg.n_sequences, batch_size=cfg.batch_size,
        heldout_seqs=heldout, holdout_asked=str(cfg.holdout))
    return Plan(manifest, info, tokenizer, ds)
