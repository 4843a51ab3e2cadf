"""The synthetic source: its statistics match its parameters, and it is an ordinary cache with a ground truth."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from matryoshka.cache import Cache
from matryoshka.cache.reader import ReaderConfig, ShuffledReader
from matryoshka.cli import app
from matryoshka.config import ConfigError, HarvestConfig, SyntheticConfig, from_dict
from matryoshka.harvest import harvest
from matryoshka.harvest.synthetic import FEATURES, sample, truth

SETTINGS = SyntheticConfig(d_model=24, n_parents=6, children=3, parent_rate=0.2, child_rate=0.6,
                           magnitude_std=0.3, noise=0.05, target_noise=0.02, d_target=16)


def _config(tmp_path, **overrides) -> HarvestConfig:
    kw = dict(source="synthetic", synthetic=SETTINGS.model_dump(), layers=0, sites="resid_mid,mlp_out",
              tokens=48 * 32, context_size=32, batch_size=4, dtype="float32", chunk_mb=8 * 32 * 24 * 4 / 2**20,
              holdout=8 * 32, cache=str(tmp_path / "c"), writer_threads=2, seed=3)
    kw.update(overrides)
    return from_dict(HarvestConfig, kw, "harvest")


def test_statistics_match_the_parameters():
    s, P, C = SETTINGS, SETTINGS.n_parents, SETTINGS.children
    t = truth(s, seed=0, target=True)
    codes, x, y = sample(s, t, seed=0, seqs=range(400), ctx=32)  # 12,800 tokens
    on = codes > 0
    parents, children = on[:, :P], on[:, P:].reshape(-1, P, C)
    n = len(codes)
    assert abs(parents.mean() - s.parent_rate) < 4 * np.sqrt(s.parent_rate / (n * P))
    with_child = children.any(axis=2)
    assert abs(with_child[parents].mean() - s.child_rate) < 0.03
    assert not (with_child & ~parents).any()                      # a child only with its parent
    assert children.sum(axis=2).max() == 1                        # siblings exclusive
    per_child = children.mean(axis=(0, 1))                        # which child: uniform
    np.testing.assert_allclose(per_child, s.parent_rate * s.child_rate / C, atol=0.006)
    np.testing.assert_allclose(np.linalg.norm(t.directions, axis=1), 1, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(t.target_directions, axis=1), 1, atol=1e-12)
    assert t.directions.shape == (P * (1 + C), 24) and t.target_directions.shape == (P * (1 + C), 16)
    assert list(t.parent[:P]) == [-1] * P and list(t.parent[P:P + C]) == [0] * C and t.parent[-1] == P - 1
    m = codes[on]
    assert m.min() >= 0.1 and abs(m.mean() - 1) < 0.02 and abs(m.std() - s.magnitude_std) < 0.02
    assert abs((x - codes @ t.directions).std() - s.noise) < 0.002
    assert abs((y - codes @ t.target_directions).std() - s.target_noise) < 0.001


def test_rows_do_not_depend_on_batching():
    t = truth(SETTINGS, 5, True)
    whole = sample(SETTINGS, t, 5, range(6), 8)
    parts = [sample(SETTINGS, t, 5, range(a, b), 8) for a, b in ((0, 1), (1, 4), (4, 6))]
    for i in range(3):
        np.testing.assert_array_equal(whole[i], np.concatenate([p[i] for p in parts]))


def test_harvest_writes_a_verified_cache_with_its_ground_truth(tmp_path):
    cfg = _config(tmp_path)
    result = CliRunner().invoke(app, ["harvest", "--source", "synthetic",
                                      "--synthetic", str(SETTINGS.model_dump()),
                                      "--layers", "0", "--tokens", str(48 * 32), "--context-size", "32",
                                      "--batch-size", "4", "--dtype", "float32", "--chunk-mb", str(cfg.chunk_mb),
                                      "--holdout", "256", "--cache", cfg.cache, "--seed", "3", "-q"])
    assert result.exit_code == 0, result.output
    verify = CliRunner().invoke(app, ["cache", "verify", cfg.cache, "-q"])
    assert verify.exit_code == 0 and verify.output.startswith("ok: 6 chunks x 4 arrays"), verify.output
    c = Cache(cfg.cache)
    m = c.manifest
    assert m["source"] == "synthetic" and m["bos"]["token_id"] is None and m["split"]["heldout"] == [0, 256]
    assert c.array_names == ["0.resid_mid", "0.mlp_out", FEATURES]
    assert m["synthetic"]["parent"] == truth(SETTINGS, 3, False).parent.tolist()
    assert not np.asarray(c.tokens[:]).any()
    t = truth(SETTINGS, 3, True)
    np.testing.assert_array_equal(c.group["ground_truth/0.resid_mid"][:], t.directions.astype(np.float32))
    np.testing.assert_array_equal(c.group["ground_truth/0.mlp_out"][:], t.target_directions.astype(np.float32))
    codes, x, y = sample(SETTINGS, t, 3, range(48), 32)
    n = 48 * 32
    for name, want in (("0.resid_mid", x), ("0.mlp_out", y), (FEATURES, codes)):
        np.testing.assert_array_equal(c.read(name, 0, n), want.astype(np.float32))
    assert c.stats(FEATURES).count == n                         # no BOS: every row counts
    # the same settings through a config file give the same cache: the fingerprint covers what makes the rows
    assert harvest(_config(tmp_path, cache=str(tmp_path / "again")), progress=False)
    assert Cache(tmp_path / "again").fingerprint == c.fingerprint


def test_fingerprint_covers_every_parameter_and_the_seed(tmp_path):
    from matryoshka.harvest.synthetic import manifest

    base = manifest(_config(tmp_path))["fingerprint"]
    assert manifest(_config(tmp_path))["fingerprint"] == base
    assert manifest(_config(tmp_path, seed=4))["fingerprint"] != base
    for name in SyntheticConfig.model_fields:
        v = getattr(SETTINGS, name)
        changed = SETTINGS.model_dump() | {name: v + 1 if isinstance(v, int) else v / 2}
        assert manifest(_config(tmp_path, synthetic=changed))["fingerprint"] != base, name


def test_reader_streams_aligned_rows(tmp_path):
    cfg = _config(tmp_path, dtype="bfloat16")
    c = Cache(harvest(cfg, progress=False))
    t = truth(SETTINGS, 3, True)
    a, b = c.split["train"]
    rows = []
    with ShuffledReader(["0.resid_mid", "0.mlp_out", FEATURES], c,
                        ReaderConfig(batch_size=64, buffer_tokens=1024, split="train", seed=1),
                        dtype=torch.float32) as r:
        for _ in range(r.batches_per_epoch):
            batch = next(r)
            codes = batch[FEATURES].double().numpy()
            # row pairing survives the shuffle: x and y are the known maps of the same row's features
            for name, d, noise in (("0.resid_mid", t.directions, SETTINGS.noise),
                                   ("0.mlp_out", t.target_directions, SETTINGS.target_noise)):
                err = batch[name].double().numpy() - codes @ d
                assert np.abs(err).max() < 6 * noise + 0.05
            rows.append(batch[FEATURES])
    got = torch.cat(rows).double().numpy()
    want = c.read(FEATURES, a, b).astype(np.float64)
    assert len(got) == b - a
    np.testing.assert_array_equal(np.sort(got.view(np.int64).ravel()), np.sort(want.view(np.int64).ravel()))


@pytest.mark.parametrize("data, message", [
    ({"synthetic": {"n_parents": 0}}, "harvest.synthetic.n_parents: 0 must be a positive integer"),
    ({"synthetic": {"child_rate": 1.5}}, "harvest.synthetic.child_rate: 1.5 must be a probability in (0, 1]"),
    ({"synthetic": {"parents": 3}}, "harvest.synthetic.parents: unknown key"),
    ({"synthetic": "[1, 2"}, "harvest.synthetic: '[1, 2' is not a YAML mapping"),
    ({"sites": "resid_pre,resid_mid,mlp_out"}, "harvest.sites: the synthetic source writes one array"),
    ({"seed": None}, "harvest.seed: None; the synthetic source needs an integer seed"),
    ({"source": "synthetic-ish"}, "harvest.source: 'synthetic-ish' is not one of model, synthetic"),
    ({"source": "model", "synthetic": {"n_parents": 3}}, "harvest.synthetic: settings given but source is 'model'"),
])
def test_bad_settings_name_their_key(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(HarvestConfig, {"source": "synthetic", "layers": 0} | data, "harvest")
    assert str(e.value).startswith(message), str(e.value)


def test_bad_settings_on_the_command_line_write_nothing(tmp_path):
    out = tmp_path / "c"
    result = CliRunner().invoke(app, ["harvest", "--source", "synthetic", "--synthetic", "{noise: -1}",
                                      "--layers", "0", "--cache", str(out), "-q"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: harvest.synthetic.noise: -1 must be a number >= 0"]
    assert not out.exists()


def test_two_shards_write_the_same_cache_as_one_process(tmp_path):
    one = Cache(harvest(_config(tmp_path / "one"), progress=False))
    for i in range(2):
        harvest(_config(tmp_path / "two", shard=f"{i}/2"), progress=False)
    two = Cache(tmp_path / "two" / "c")
    assert two.complete and two.manifest == one.manifest
    for i in range(one.n_chunks):
        for name in one.array_names + ["tokens"]:
            assert two.chunk_bytes(name, i) == one.chunk_bytes(name, i), (name, i)
    for name in ("0.resid_mid", "0.mlp_out"):
        np.testing.assert_array_equal(two.group[f"ground_truth/{name}"][:], one.group[f"ground_truth/{name}"][:])
