"""Harvest end to end on tiny GPT-2 and Gemma-2 models: what lands in the cache is what the model computed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import harvest_config
from matryoshka.cache import Cache
from matryoshka.cache.format import from_storage, to_storage
from matryoshka.cache.reader import ReaderConfig, ShuffledReader
from matryoshka.harvest import harvest
from matryoshka.models import Capture, load_model, model_info


@pytest.fixture(scope="module")
def harvested(model_dir, corpus, tmp_path_factory):
    cfg = harvest_config(model_dir, corpus, tmp_path_factory.mktemp("h") / "cache")
    return Cache(harvest(cfg, progress=False)), cfg


def test_layout_and_manifest(harvested):
    cache, cfg = harvested
    m = cache.manifest
    assert cache.complete and cache.tokens_committed == 512 == m["n_tokens"]
    assert cache.array_names == ["1.resid_pre", "1.attn_out", "1.resid_mid", "1.mlp_in", "1.mlp_out", "1.resid_post"]
    assert m["arrays"]["1.mlp_out"]["hook_name"] == "blocks.1.hook_mlp_out"
    assert m["arrays"]["1.mlp_in"]["hook_name"] == "blocks.1.mlp.hook_in"
    assert m["storage"]["chunk_tokens"] == 128 and cache.array("1.resid_mid").chunks == (128, 64)
    assert m["split"] == {"heldout": [0, 128], "train": [128, 512]}
    tokens = cache.tokens[:].reshape(-1, 32)
    assert (tokens[:, 0] == m["bos"]["token_id"]).all()  # BOS policy "context"
    assert (tokens[:, 1:] != m["bos"]["token_id"]).all()


def test_residual_identities_read_back(harvested):
    cache, _ = harvested
    r = {s: cache.read(f"1.{s}", 0, 512) for s in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")}
    np.testing.assert_allclose(r["resid_pre"] + r["attn_out"], r["resid_mid"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r["resid_mid"] + r["mlp_out"], r["resid_post"], rtol=1e-5, atol=1e-6)


def test_cached_rows_equal_a_fresh_forward(harvested, model_dir):
    cache, _ = harvested
    info = model_info(str(model_dir))
    model = load_model(info, dtype="float32", device="cpu")
    toks = torch.from_numpy(cache.tokens[:].reshape(-1, 32).astype(np.int64))
    cap = Capture(model, info.arch, [(1, "resid_mid"), (1, "mlp_out")])
    fresh = cap(toks)
    for site in ("resid_mid", "mlp_out"):
        np.testing.assert_array_equal(cache.read(f"1.{site}", 0, 512), fresh[(1, site)].reshape(512, 64).numpy())


def test_statistics_match_a_recomputation(harvested):
    cache, _ = harvested
    bos = cache.manifest["bos"]["token_id"]
    keep = cache.tokens[:] != bos
    for name in cache.array_names:
        x = cache.read(name, 0, 512)[keep].astype(np.float64)
        s = cache.stats(name)
        mu = x.mean(0)
        assert s.count == keep.sum()
        np.testing.assert_allclose(s.mean, mu, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(s.mean_sq_norm, (x * x).sum(1).mean(), rtol=1e-10)
        np.testing.assert_allclose(s.total_variance, ((x - mu) ** 2).sum(1).mean(), rtol=1e-8)


def test_bfloat16_and_float16_storage(gpt2_dir, corpus, tmp_path, harvested):
    ref, _ = harvested
    if ref.manifest["model"]["arch"] != "gpt2":
        pytest.skip("one architecture is enough")
    for dtype in ("bfloat16", "float16", "float8"):
        c = Cache(harvest(harvest_config(gpt2_dir, corpus, tmp_path / dtype, dtype=dtype), progress=False))
        assert c.manifest["storage"]["dtype"] == dtype
        assert c.array("1.mlp_out").dtype == {"bfloat16": np.uint16, "float16": np.float16, "float8": np.uint8}[dtype]
        exact = torch.from_numpy(ref.read("1.mlp_out", 0, 512))
        if dtype == "float8":  # values then the row's float32 scale: 4 more bytes per row
            assert c.array("1.mlp_out").shape[1] == c.manifest["arrays"]["1.mlp_out"]["width"] + 4
            expect = from_storage(to_storage(exact, dtype), dtype, torch.float32).numpy()
        else:
            expect = exact.to(getattr(torch, dtype)).float().numpy()
        got = c.read("1.mlp_out", 0, 512)
        np.testing.assert_array_equal(got, expect)
        assert c.fingerprint != ref.fingerprint
        keep = c.tokens[:] != c.manifest["bos"]["token_id"]  # statistics describe the stored values
        np.testing.assert_allclose(c.stats("1.mlp_out").mean, got[keep].astype(np.float64).mean(0), rtol=1e-9,
                                   atol=1e-12)
        with ShuffledReader(["1.mlp_out"], c, ReaderConfig(batch_size=64, buffer_tokens=2048),
                            dtype=torch.float32) as r:  # the reader serves what `read` returns
            batch = next(r)["1.mlp_out"].numpy()
            np.testing.assert_array_equal(batch, c.read("1.mlp_out", 0, c.manifest["n_tokens"])[r.last_rows])
        with ShuffledReader(["1.mlp_out"], c, ReaderConfig(batch_size=64, buffer_tokens=2048), dtype=torch.float32,
                            mirror=True) as m:  # the GPU path casts on the device, from the same stored rows
            np.testing.assert_array_equal(next(m)["1.mlp_out"].numpy(), batch)


def test_same_config_same_fingerprint_and_reuse(gpt2_dir, corpus, tmp_path):
    a = harvest(harvest_config(gpt2_dir, corpus, None, cache_root=str(tmp_path / "root")), progress=False)
    assert a.parent.name == "tiny-gpt2" and a.name == Cache(a).fingerprint
    again = harvest(harvest_config(gpt2_dir, corpus, None, cache_root=str(tmp_path / "root")), progress=False)
    assert again == a  # complete: reused, nothing rewritten
    other = harvest_config(gpt2_dir, corpus, None, cache_root=str(tmp_path / "root"), seed=1)
    assert harvest(other, progress=False) != a


def test_the_attention_implementation_is_in_the_manifest_and_the_identity(gpt2_dir, corpus, tmp_path, harvested):
    """``auto`` is recorded as what it resolved to; forcing eager is another cache (its rows differ at
    rounding level), whose rows equal the sdpa cache's within float32's tolerance. Eager is left out of
    the identity: caches harvested before the choice existed (all eager) keep their fingerprints."""
    ref, _ = harvested
    if ref.manifest["model"]["arch"] != "gpt2":
        pytest.skip("Gemma-2's auto is eager: one implementation")
    assert ref.manifest["model"]["attn_implementation"] == ref.manifest["identity"]["attn_implementation"] == "sdpa"
    eager = Cache(harvest(harvest_config(gpt2_dir, corpus, tmp_path / "e", attn_implementation="eager"),
                          progress=False))
    assert eager.manifest["model"]["attn_implementation"] == "eager" and eager.fingerprint != ref.fingerprint
    assert "attn_implementation" not in eager.manifest["identity"]
    for name in ref.array_names:
        np.testing.assert_allclose(ref.read(name, 0, 512), eager.read(name, 0, 512), rtol=1.3e-6, atol=1e-5)


def test_document_policy_and_unshuffled_order(gpt2_dir, corpus, tmp_path, tokenizer):
    c = Cache(harvest(harvest_config(gpt2_dir, corpus, tmp_path / "c", bos="document", seed=None), progress=False))
    first_doc = tokenizer(corpus.read_text().splitlines()[0], add_special_tokens=False)["input_ids"]
    toks = c.tokens[:]
    assert toks[0] == tokenizer.bos_token_id
    assert list(toks[1:1 + len(first_doc)]) == first_doc
    assert toks[1 + len(first_doc)] == tokenizer.bos_token_id


def test_aliases_of_one_model_share_its_cache_folder():
    """The folder follows the resolved id: one model, one fingerprint, one path, however it was spelled."""
    from matryoshka.cache.store import cache_location

    def where(name: str, resolved: str) -> str:
        return str(cache_location("root", {"model": {"name": name, "resolved": resolved}, "fingerprint": "fp"}))
    assert where("gpt2", "openai-community/gpt2") == where("openai-community/gpt2", "openai-community/gpt2") \
        == "root/openai-community--gpt2/fp"
    assert where("./models/tiny", "/abs/models/tiny") == "root/tiny/fp"
    assert where("synthetic", "synthetic") == "root/synthetic/fp"
