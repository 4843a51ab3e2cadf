"""Packing and text sources: known answers for each BOS policy; txt, jsonl, parquet and pre-tokenized ids agree."""
from __future__ import annotations

import json

import numpy as np
import pytest

from matryoshka.config import HarvestConfig
from matryoshka.harvest.tokens import DatasetExhausted, batches, contexts, pack

DOCS = [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34]]


def _pack(policy, ctx=4):
    return [list(c) for c in pack(iter(DOCS), ctx, policy, bos=1, sep=2)]


def test_pack_context_policy():
    # BOS + 3 stream tokens per context; documents separated by EOS (2)
    assert _pack("context") == [[1, 10, 11, 12], [1, 2, 20, 21], [1, 2, 30, 31], [1, 32, 33, 34]]


def test_pack_document_policy():
    assert _pack("document") == [[1, 10, 11, 12], [1, 20, 21, 1], [30, 31, 32, 33]]


def test_pack_none_policy():
    assert _pack("none") == [[10, 11, 12, 2], [20, 21, 2, 30], [31, 32, 33, 34]]


def test_batches_restart_and_exhaustion():
    stream = [np.full(4, i) for i in range(10)]
    got = [(first, ids[:, 0].tolist()) for first, ids in batches(iter(stream), 3, 8, 2)]
    assert got == [(3, [3, 4]), (5, [5, 6]), (7, [7])]
    with pytest.raises(DatasetExhausted) as e:
        list(batches(iter(stream), 0, 12, 4))
    assert e.value.sequences == 10


def test_local_formats_and_pretokenized_ids_agree(corpus, tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = corpus.read_text().splitlines()
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)))
    parquet = tmp_path / "c.parquet"
    ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    pq.write_table(pa.table({"text": docs, "input_ids": ids}), parquet)

    def first(n, **kw):
        cfg = HarvestConfig(layers=0, context_size=16, **kw)
        return np.stack([c for c, _ in zip(contexts(cfg, tokenizer), range(n))])

    ref = first(50, dataset=str(corpus))
    np.testing.assert_array_equal(first(50, dataset=str(jsonl), text_column="body"), ref)
    np.testing.assert_array_equal(first(50, dataset=str(parquet)), ref)
    np.testing.assert_array_equal(first(50, dataset=str(parquet), token_column="input_ids"), ref)
    assert not np.array_equal(first(50, dataset=str(corpus), seed=1), ref)  # the seed orders the documents
    unshuffled = first(50, dataset=str(corpus), seed=None)
    assert list(unshuffled[0, 1:6]) == ids[0][:5]


def test_empty_documents_are_skipped_in_text_and_in_token_ids(corpus, tokenizer, tmp_path):
    """An empty document adds no separator, whichever column it comes from."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = corpus.read_text().splitlines()
    with_empty = [d for i, doc in enumerate(docs) for d in ([doc, ""] if i % 3 == 0 else [doc])]
    ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in with_empty]
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": with_empty, "input_ids": ids}), parquet)

    def first(n, **kw):
        cfg = HarvestConfig(layers=0, context_size=16, seed=None, **kw)
        return np.stack([c for c, _ in zip(contexts(cfg, tokenizer), range(n))])

    ref = first(50, dataset=str(corpus))
    np.testing.assert_array_equal(first(50, dataset=str(parquet)), ref)
    np.testing.assert_array_equal(first(50, dataset=str(parquet), token_column="input_ids"), ref)
