"""Text -> packed token contexts, deterministic for a seed, restartable at any sequence.

Documents come from a Hugging Face dataset (streamed) or a local file (.txt: one document per line;
.jsonl / .json; .parquet), in a seeded order (a streaming shuffle buffer). They are tokenized in
batches and packed into contexts of ``context_size`` tokens under a BOS policy:

* ``context``  - every context starts with BOS, then ``context_size - 1`` tokens of the stream in
  which documents are separated by EOS (or BOS when the tokenizer has no EOS). Every position has a
  start-of-text anchor, as the model saw in training; BOS rows are outliers that readers skip.
* ``document`` - every document starts with BOS; the stream is cut into contexts wherever it falls.
* ``none``     - no BOS at all; documents separated by EOS.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError, HarvestConfig
from ..hub import offline_hint, offline_reason

_LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TOKENIZE_BATCH = 256


def _is_local(dataset: str) -> bool:
    """A local file, checked to be one we can read; anything else is a Hugging Face dataset id."""
    p = Path(dataset).expanduser()
    if p.exists():
        if p.suffix not in _LOCAL_BUILDERS:
            raise ConfigError(f"dataset: {dataset!r} has suffix {p.suffix!r}; local files may be "
                              f"{', '.join(_LOCAL_BUILDERS)}")
        return True
    if p.suffix in _LOCAL_BUILDERS or dataset.startswith((".", "/", "~")):
        raise ConfigError(f"dataset: local file {dataset!r} does not exist")
    return False


def dataset_identity(cfg: HarvestConfig) -> dict[str, Any]:
    """What determines the document stream: a content hash for a local file, the id and revision otherwise."""
    ident: dict[str, Any] = {"split": cfg.dataset_split, "text_column": cfg.text_column,
                             "token_column": cfg.token_column, "seed": cfg.seed,
                             "shuffle_buffer": cfg.shuffle_buffer if cfg.seed is not None else None}
    if _is_local(cfg.dataset):
        p = Path(cfg.dataset).expanduser()
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(1 << 23):
                h.update(block)
        ident.update(content="sha256:" + h.hexdigest(), split="train")
    else:
        ident.update(name=cfg.dataset, config=cfg.dataset_config, revision=cfg.dataset_revision or "main")
    return ident


def open_documents(cfg: HarvestConfig):
    """The streaming dataset in its seeded order; fails early with a clear line if it can't be read."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if _is_local(cfg.dataset):
            p = Path(cfg.dataset).expanduser()
            ds = datasets.load_dataset(_LOCAL_BUILDERS[p.suffix], data_files=str(p), split="train", streaming=True)
        else:
            offline = offline_reason()
            if offline is not None:  # a streamed dataset is read from the Hub as it goes: offline, it cannot be
                raise ConfigError(f"dataset: {cfg.dataset!r} could not be resolved offline ({offline}): a Hugging "
                                  f"Face dataset is streamed from the Hub; {offline_hint('dataset')}")
            ds = datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.dataset_split,
                                       revision=cfg.dataset_revision, streaming=True)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types here
        raise ConfigError(f"dataset: cannot open {cfg.dataset!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          "give a local .txt/.jsonl/.parquet file or a Hugging Face dataset id") from None
    column = cfg.token_column or cfg.text_column
    try:
        first = next(iter(ds))
    except StopIteration:
        raise ConfigError(f"dataset: {cfg.dataset!r} is empty") from None
    if column not in first:
        key = "token_column" if cfg.token_column else "text_column"
        raise ConfigError(f"{key}: {column!r} is not a column of {cfg.dataset!r}; columns are {', '.join(first)}")
    if cfg.seed is not None:
        ds = ds.shuffle(seed=cfg.seed, buffer_size=cfg.shuffle_buffer)
    return ds


def token_stream(ds, cfg: HarvestConfig, tokenizer) -> Iterator[list[int]]:
    """Token ids of each document, tokenized in batches (or read as given from ``token_column``)."""
    if cfg.token_column:
        for row in ds:
            if ids := list(row[cfg.token_column]):  # an empty document is skipped, as an empty text is
                yield ids
        return
    batch: list[str] = []
    for row in ds:
        text = row[cfg.text_column]
        if text:
            batch.append(text)
        if len(batch) == TOKENIZE_BATCH:
            yield from tokenizer(batch, add_special_tokens=False)["input_ids"]
            batch = []
    if batch:
        yield from tokenizer(batch, add_special_tokens=False)["input_ids"]


def bos_id(tokenizer, policy: str) -> int | None:
    if policy == "none":
        return None
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise ConfigError(f"bos: the tokenizer {tokenizer.name_or_path!r} has no BOS or EOS token; use --bos none")
    return tid


def pack(docs: Iterator[list[int]], context_size: int, policy: str, bos: int | None,
         sep: int | None) -> Iterator[np.ndarray]:
    """Pack documents into contexts of exactly ``context_size`` ids (see the module docstring)."""
    body = context_size - 1 if policy == "context" else context_size
    buf: list[int] = []
    for i, doc in enumerate(docs):
        if policy == "document":
            buf.append(bos)
        elif i and sep is not None:
            buf.append(sep)
        buf.extend(doc)
        while len(buf) >= body:
            ids = buf[:body]
            del buf[:body]
            yield np.asarray([bos] + ids if policy == "context" else ids, dtype=np.int32)


def contexts(cfg: HarvestConfig, tokenizer, ds=None) -> Iterator[np.ndarray]:
    """Every context of the harvest, in order, from the first."""
    ds = ds if ds is not None else open_documents(cfg)
    bos = bos_id(tokenizer, cfg.bos)
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    return pack(token_stream(ds, cfg, tokenizer), cfg.context_size, cfg.bos, bos, sep)


def batches(stream: Iterator[np.ndarray], start_seq: int, n_seqs: int,
            batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """Batches ``(first_seq, ids [B, T])`` of sequences ``start_seq .. n_seqs-1``; raises if the text runs out."""
    seq = 0
    batch: list[np.ndarray] = []
    first = start_seq
    for ctx in stream:
        if seq >= n_seqs:
            break
        if seq >= start_seq:
            batch.append(ctx)
            if len(batch) == batch_size or seq == n_seqs - 1:
                yield first, np.stack(batch)
                first += len(batch)
                batch = []
        seq += 1
    if seq < n_seqs:
        raise DatasetExhausted(seq)


class DatasetExhausted(RuntimeError):
    def __init__(self, sequences: int) -> None:
        super().__init__(sequences)
        self.sequences = sequences
