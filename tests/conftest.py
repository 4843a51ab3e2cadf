"""Offline fixtures: tiny GPT-2 and Gemma-2 models built from configs, saved with save_pretrained and
loaded back through the real loading path, plus a small text corpus the tests write themselves."""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

WORDS = ("the a cat dog sat on mat ran to park red blue green big small house tree river stone "
         "quickly slowly because then after before under over light dark bird fish sky sea").split()


def write_corpus(path: Path, n_docs: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) for _ in range(n_docs)]
    path.write_text("\n".join(lines) + "\n")
    return path


def build_tokenizer(corpus: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<bos>", "<eos>", "<unk>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(corpus)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", pad_token="<pad>")


def build_model(arch: str, out: Path, tokenizer, n_layers: int = 3, d_model: int = 64) -> Path:
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    vocab = len(tokenizer)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=4, vocab_size=vocab,
                                           n_positions=256, bos_token_id=0, eos_token_id=1))
    else:
        model = Gemma2ForCausalLM(Gemma2Config(
            num_hidden_layers=n_layers, hidden_size=d_model, intermediate_size=2 * d_model, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=vocab, max_position_embeddings=256, sliding_window=16,
            bos_token_id=0, eos_token_id=1, pad_token_id=3))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


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
