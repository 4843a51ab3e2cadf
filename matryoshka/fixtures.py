"""Tiny offline language models and text, for tests, benchmarks and demos.

Nothing here downloads: the tokenizer is a small BPE trained on the text we write, and the models are
built from a config with random weights and saved with ``save_pretrained``, so they load back through
exactly the same path as a real checkpoint and exercise the same hooks.
"""
from __future__ import annotations

import random
from pathlib import Path

WORDS = ("the a cat dog sat on mat ran to park red blue green big small house tree river stone "
         "quickly slowly because then after before under over light dark bird fish sky sea").split()


def write_corpus(path: Path, n_docs: int = 400, seed: int = 0) -> Path:
    """One document per line, 5-60 words each."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) for _ in range(n_docs)]
    path.write_text("\n".join(lines) + "\n")
    return path


def build_tokenizer(corpus: Path, vocab_size: int = 320):
    """A byte-level BPE with <bos>=0, <eos>=1, <unk>=2, <pad>=3, trained on ``corpus``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<eos>", "<unk>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(corpus)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", pad_token="<pad>")


def build_model(arch: str, out: Path, tokenizer, n_layers: int = 3, d_model: int = 64, n_heads: int = 4,
                n_positions: int = 256, seed: int = 0) -> Path:
    """A random-weight ``gpt2`` or ``gemma2`` model saved with its tokenizer to ``out``."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    vocab = len(tokenizer)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=n_heads, vocab_size=vocab,
                                           n_positions=n_positions, bos_token_id=0, eos_token_id=1))
    elif arch == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(
            num_hidden_layers=n_layers, hidden_size=d_model, intermediate_size=2 * d_model, num_attention_heads=n_heads,
            num_key_value_heads=max(1, n_heads // 2), head_dim=d_model // n_heads, vocab_size=vocab,
            max_position_embeddings=n_positions, sliding_window=16, bos_token_id=0, eos_token_id=1, pad_token_id=3))
    else:
        raise ValueError(f"arch: {arch!r} is not gpt2 or gemma2")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_cache(path: Path, arrays: dict, tokens, context_size: int, seqs_per_chunk: int, heldout_seqs: int = 0,
                dtype: str = "float32", codec: str = "lz4", bos_policy: str = "context", bos_id: int | None = 0,
                fingerprint: str = "synthetic") -> Path:
    """Write given activation rows (``{name: [n_tokens, d] float array}``) and token ids to a cache through
    the real writer, with no language model: for readers' tests and benchmarks."""
    import numpy as np
    import torch
    import zarr

    from .cache.format import row_width, to_storage
    from .cache.manifest import build_manifest
    from .cache.writer import CacheWriter, create_arrays

    tokens = np.asarray(tokens, dtype=np.int32)
    n = len(tokens)
    if n % context_size:
        raise ValueError(f"{n} tokens are not whole contexts of {context_size}")
    n_seqs = n // context_size
    chunk = seqs_per_chunk * context_size
    manifest = build_manifest(
        source="fixture", identity={}, fingerprint_override=fingerprint,
        model={"name": "synthetic", "resolved": "synthetic", "revision": None, "arch": "none",
               "d_model": max(a.shape[1] for a in arrays.values()), "n_layers": 0, "dtype": "float32"},
        tokenizer={"name": "synthetic", "vocab_size": int(tokens.max()) + 1},
        dataset={"id": "synthetic", "config": None, "split": "train", "revision": None, "text_column": "text",
                 "token_column": None, "seed": None, "shuffle_buffer": 0},
        context_size=context_size, bos={"policy": bos_policy, "token_id": bos_id}, dtype=dtype, codec=codec,
        seqs_per_chunk=seqs_per_chunk, arrays={name: {"layer": 0, "site": name, "hook_name": name,
                                                       "width": int(a.shape[1])} for name, a in arrays.items()},
        n_sequences=n_seqs, batch_size=seqs_per_chunk, heldout_seqs=heldout_seqs)
    group = zarr.create_group(str(path), attributes={"manifest": manifest, "progress": {"chunks": 0}})
    create_arrays(group, manifest)
    writer = CacheWriter(group, manifest, {"chunks": 0}, threads=2, batch_seqs=seqs_per_chunk)
    try:
        for r0 in range(0, n, chunk):
            r1 = min(r0 + chunk, n)
            writer.write(torch.from_numpy(tokens[r0:r1]).reshape(-1, context_size),
                         {k: to_storage(torch.as_tensor(a[r0:r1]), dtype)
                          .reshape(-1, context_size, row_width(a.shape[1], dtype)) for k, a in arrays.items()})
        writer.finish()
    finally:
        writer.abort()
    return path
