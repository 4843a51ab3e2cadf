"""Top contexts and the report: a small harvested cache, two trained runs, `pipeline evaluate --cache`."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import harvest_config
from matryoshka.cache import Cache
from matryoshka.cli import app
from matryoshka.config import ConfigError, EvaluateConfig, TrainConfig
from matryoshka.evaluate.contexts import TopContexts, cache_tokenizer, context_text
from matryoshka.evaluate.report import training_curves
from matryoshka.evaluate.stage import evaluate
from matryoshka.fixtures import write_cache
from matryoshka.harvest import harvest
from matryoshka.train.sparse import Code
from matryoshka.train.trainer import train

RUNS = [
    {"name": "mat", "source": "1.resid_mid", "width": 64, "k": 4, "group_sizes": [8, 16, 40], "lr": 0.003,
     "tokens": "3K", "dead_tokens": "1K", "warmup_steps": 2},
    {"name": "btk", "source": "1.resid_mid", "arch": "batchtopk", "width": 64, "k": 4, "lr": 0.003,
     "tokens": "3K", "dead_tokens": "1K", "warmup_steps": 2},
]
PNG = b"\x89PNG\r\n\x1a\n"


def _train(cache: Path, runs_dir: Path, runs=RUNS) -> None:
    train(TrainConfig(cache=str(cache), runs=[dict(r) for r in runs], runs_dir=str(runs_dir), batch_size=128,
                      buffer_tokens=1024, checkpoint_every=100, log_every=10), progress=False)


@pytest.fixture(scope="module")
def cache(gpt2_dir, corpus, tmp_path_factory) -> Path:
    cfg = harvest_config(gpt2_dir, corpus, tmp_path_factory.mktemp("r") / "cache", sites="1.resid_mid",
                         tokens="4K", layers=None)
    return harvest(cfg, progress=False)


def test_top_contexts_equal_a_full_sort():
    rng = np.random.default_rng(0)
    width, n, top = 9, 400, 3
    acts = rng.exponential(1.0, (n, width)) * (rng.random((n, width)) < 0.3)
    acts[5, 2] = acts[17, 2] = acts[30, 2] = acts[40, 2] = 50.0  # a four-way tie: the lower rows win
    cache_rows = rng.permutation(n) + 1000
    tc = TopContexts(width, top)
    for b0 in range(0, n, 64):  # batches in stream order, rows mapped to cache rows
        b = slice(b0, b0 + 64)
        r, j = np.nonzero(acts[b] > 0)
        values = torch.from_numpy(acts[b][r, j]).float()
        code = Code(torch.from_numpy(r), torch.from_numpy(j), values, len(acts[b]), width)
        tc.add(code, cache_rows[b])
    for j in range(width):
        fired = np.flatnonzero(acts[:, j] > 0)
        order = sorted(fired, key=lambda t: (-np.float32(acts[t, j]), cache_rows[t]))[:top]
        np.testing.assert_array_equal(tc.rows[j, :len(order)], cache_rows[order])
        np.testing.assert_array_equal(tc.values[j, :len(order)], acts[order, j].astype(np.float32))
    assert tc.values[2].tolist() == [50.0] * 3
    assert list(tc.rows[2]) == sorted(cache_rows[[5, 17, 30, 40]])[:3]


@pytest.mark.slow
def test_context_text_marks_the_token_inside_its_sequence(cache):
    c = Cache(cache)
    tok, why = cache_tokenizer(c)
    assert tok is not None, why
    ctx = c.manifest["context_size"]
    tokens = np.asarray(c.tokens[:3 * ctx])
    row = ctx + 2  # third token of the second sequence: the window stops at the sequence's start
    text = context_text(tokens, row, ctx, tok, before=5, after=1)
    assert text == tok.decode(tokens[ctx:row].tolist()) + f"«{tok.decode([int(tokens[row])])}»" + \
        tok.decode([int(tokens[row + 1])])
    assert context_text(tokens, ctx - 1, ctx, None, before=2, after=3) == \
        f"{tokens[ctx - 3]} {tokens[ctx - 2]} «{tokens[ctx - 1]}»"  # ids; nothing from the next sequence


@pytest.mark.slow
def test_report_renders_two_runs_with_plots(cache, tmp_path):
    _train(cache, tmp_path)
    out = CliRunner().invoke(app, ["evaluate", "--cache", str(cache), "--runs-dir", str(tmp_path), "--quiet",
                                   "--rare-below", "2", "--contexts", "5"])
    assert out.exit_code == 0, out.output
    fp = Cache(cache).fingerprint
    report = tmp_path / fp / "report.md"
    assert f"report: {report}" in out.output
    md = report.read_text()
    assert "| FVU (scalar mean) |" in md and "FVU (seed)" not in md  # not to be read as a random seed
    assert "*dead*: latents that fire on none of the evaluated held-out tokens. Training's *AuxDead*" in md
    for run in ("mat", "btk"):
        assert f"| {run} |" in md and f"### {run}" in md
        ev = json.loads((tmp_path / fp / run / "eval.json").read_text())
        f = ev["features"]
        assert 0 <= f["absorption"] <= 1 and 0 <= f["splitting"] <= 1 and f["tokens"] > 0
        assert f["monosemanticity_scored"] + f["monosemanticity_excluded"] == 64
        assert [g["size"] for g in f["hierarchy"]] == ([8, 16, 40] if run == "mat" else [64])
        with np.load(tmp_path / fp / run / "eval.npz") as z:
            assert z["top_rows"].shape == (64, 5) and z["density"].shape == (64,)
            live = z["density"] > 0
            assert ((z["top_rows"][:, 0] >= 0) == live).all()  # every live latent has a context, dead ones none
            assert len(z["density"][live]) == 64 - ev["dead"]
    images = re.findall(r"!\[[^\]]*\]\((report/[^)]+\.png)\)", md)
    assert sorted(images) == ["report/density.png", "report/fvu_l0.png", "report/prefix_fvu.png",
                              "report/training.png"]
    logged = [json.loads(x) for x in (tmp_path / fp / "mat" / "metrics.jsonl").read_text().splitlines()]
    with open(tmp_path / fp / "mat" / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "tok')  # a line cut short by a kill
    curves = training_curves(tmp_path / fp / "mat")
    assert curves["tokens"].tolist() == [r["tokens"] for r in logged] == [1280, 2560, 3072]  # 24 steps of 128
    assert curves["fvu"].tolist() == [r["fvu"] for r in logged]
    assert curves["aux_dead"].tolist() == [r["aux_dead"] for r in logged]
    for name in images:
        data = (tmp_path / fp / name).read_bytes()
        assert data[:8] == PNG and len(data) > 2000
        from matplotlib.image import imread

        assert imread(tmp_path / fp / name).shape[0] > 100
    assert "«" in md and "»" in md and "Token ids are shown" not in md  # decoded with the model's tokenizer
    assert "## Hierarchy per Matryoshka group" in md and "**mat**" in md


@pytest.mark.slow
def test_features_off_and_bounded_tokens(cache, tmp_path):
    _train(cache, tmp_path, RUNS[:1])
    (r,) = evaluate(EvaluateConfig(cache=str(cache), runs_dir=str(tmp_path), features=False, contexts=0))
    assert "features" not in r and Path(r["report"]).is_file()
    with np.load(Path(r["path"]) / "eval.npz") as z:
        assert set(z.files) == {"density"}
    (r,) = evaluate(EvaluateConfig(cache=str(cache), runs_dir=str(tmp_path), feature_tokens=50, report=False))
    assert r["features"]["tokens"] == 50 and "report" not in r
    with pytest.raises(ConfigError, match="split_above: 1.5 must be between 0 and 1"):
        EvaluateConfig(split_above=1.5)
    with pytest.raises(ConfigError, match="feature_tokens: 0 must be an integer >= 1"):
        EvaluateConfig(feature_tokens=0)


@pytest.mark.slow
def test_cache_without_heldout_split_is_refused(tmp_path):
    ctx, n = 16, 32 * 16
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 50, n)
    tokens[::ctx] = 0
    path = write_cache(tmp_path / "c", {"x": rng.standard_normal((n, 8)).astype(np.float32)}, tokens, ctx, 4,
                       heldout_seqs=0, fingerprint="noheldout")
    _train(path, tmp_path / "runs", [{"name": "a", "source": "x", "width": 16, "k": 2, "arch": "batchtopk",
                                      "tokens": "512", "warmup_steps": 1}])
    out = CliRunner().invoke(app, ["evaluate", "--cache", str(path), "--runs-dir", str(tmp_path / "runs")])
    assert out.exit_code == 2
    assert out.output.strip() == f"error: evaluate: cache {str(path)!r} has no held-out split; evaluation reads " \
        "only held-out tokens (`pipeline harvest` holds out at least one chunk: --holdout)"
    assert not (tmp_path / "runs" / "noheldout" / "a" / "eval.json").exists()
