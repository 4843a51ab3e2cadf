"""Offline fixtures: tiny GPT-2 and Gemma-2 models built from configs, saved with save_pretrained and
loaded back through the real loading path, plus a small text corpus the tests write themselves."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from matryoshka.fixtures import build_model, build_tokenizer, write_corpus

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data") / "corpus.txt")


@pytest.fixture(scope="session")
def tokenizer(corpus):
    return build_tokenizer(corpus)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, tokenizer) -> Path:
    return build_model("gpt2", tmp_path_factory.mktemp("models") / "tiny-gpt2", tokenizer)


@pytest.fixture(scope="session")
def gemma2_dir(tmp_path_factory, tokenizer) -> Path:
    return build_model("gemma2", tmp_path_factory.mktemp("models") / "tiny-gemma2", tokenizer)


@pytest.fixture(scope="session", params=["gpt2", "gemma2"])
def model_dir(request) -> Path:
    return request.getfixturevalue(f"{request.param}_dir")


if __name__ == "__main__":  # build the fixtures by hand: python tests/conftest.py OUT_DIR
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    c = write_corpus(out / "corpus.txt")
    t = build_tokenizer(c)
    for a in ("gpt2", "gemma2"):
        build_model(a, out / f"tiny-{a}", t)


def harvest_config(model_dir: Path, corpus: Path, cache: Path, **overrides):
    """A small harvest of a tiny model: 4 chunks of 4 sequences of 32 tokens, float32 storage."""
    from matryoshka.config import HarvestConfig

    kw = dict(model=str(model_dir), dataset=str(corpus), layers="1", sites="resid_pre,attn_out,resid_mid,mlp_in,mlp_out,resid_post",
              tokens=16 * 32, context_size=32, batch_size=4, dtype="float32", chunk_mb=4 * 32 * 64 * 4 / 2**20,
              holdout=4 * 32, cache=str(cache) if cache else None, writer_threads=2)
    kw.update(overrides)
    return HarvestConfig(**kw)
