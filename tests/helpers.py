"""Plain helpers the tests share (fixtures live in conftest.py). Tests import them as ``from helpers import
...``: pytest puts tests/ on sys.path (``pythonpath`` in pyproject.toml), so no test imports conftest."""
from __future__ import annotations

import sys
from pathlib import Path

from matryoshka.fixtures import build_model, build_tokenizer, write_corpus


def harvest_config(model_dir: Path, corpus: Path, cache: Path, **overrides):
    """A small harvest of a tiny model: 4 chunks of 4 sequences of 32 tokens, float32 storage."""
    from matryoshka.config import HarvestConfig

    kw = dict(model=str(model_dir), dataset=str(corpus), layers="1",
              sites="resid_pre,attn_out,resid_mid,mlp_in,mlp_out,resid_post",
              tokens=16 * 32, context_size=32, batch_size=4, dtype="float32", chunk_mb=4 * 32 * 64 * 4 / 2**20,
              holdout=4 * 32, cache=str(cache) if cache else None, writer_threads=2)
    kw.update(overrides)
    return HarvestConfig(**kw)


def new_bucket(protocol: str, prefix: str = "test") -> str:
    """A new, empty bucket on the session's server for ``protocol`` (s3 or gs): ``PROTOCOL://NAME``."""
    import uuid

    import fsspec

    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem(protocol).mkdir(name)
    return f"{protocol}://{name}"


if __name__ == "__main__":  # build the fixtures by hand: python tests/helpers.py OUT_DIR
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    c = write_corpus(out / "corpus.txt")
    t = build_tokenizer(c)
    for a in ("gpt2", "gemma2"):
        build_model(a, out / f"tiny-{a}", t)
