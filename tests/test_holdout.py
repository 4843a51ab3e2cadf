"""The held-out split: a run is never evaluated on rows it trained on, and the split is what was asked.

The reproduction of issue 17: two synthetic caches that differ only in ``--tokens`` (40K and 80K) share one
fingerprint; a run trained on the smaller one must not be scored on the larger one's held-out rows when
those include rows it trained on."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from matryoshka.cache import Cache
from matryoshka.cli import app
from matryoshka.config import HOLDOUT_TOLERANCE, HarvestConfig, TrainConfig, from_dict
from matryoshka.harvest import harvest
from matryoshka.train.trainer import train

SYNTHETIC = {"d_model": 16, "n_parents": 4, "children": 2}


def _harvest(path: Path, tokens: str, holdout: str) -> Cache:
    cfg = from_dict(HarvestConfig, dict(source="synthetic", synthetic=SYNTHETIC, layers=0, sites="resid_mid",
                                        tokens=tokens, context_size=128, batch_size=16, holdout=holdout,
                                        cache=str(path), writer_threads=2, seed=0), "harvest")
    return Cache(harvest(cfg, progress=False))


def _train(cache: Cache, runs_dir: Path) -> Path:
    run = {"name": "m", "source": "0.resid_mid", "width": 16, "k": 2, "group_sizes": [4, 12], "tokens": "4K",
           "lr": 0.003, "warmup_steps": 2}
    return train(TrainConfig(cache=str(cache.path), runs=[run], runs_dir=str(runs_dir), batch_size=256,
                             buffer_tokens=20_000, checkpoint_every=100, log_every=10), progress=False)[0]


def _evaluate(cache: Cache, runs_dir: Path):
    return CliRunner().invoke(app, ["evaluate", "--cache", str(cache.path), "--runs-dir", str(runs_dir),
                                    "--no-lm", "--no-features", "--contexts", "0", "-q"])


@pytest.mark.slow
@pytest.mark.parametrize("small, large", [("10%", "10%"), ("4K", "8K")], ids=["percentage", "tokens"])
def test_a_run_is_not_evaluated_on_rows_it_trained_on(tmp_path, small, large):
    a = _harvest(tmp_path / "a", "40K", small)
    b = _harvest(tmp_path / "b", "80K", large)
    assert a.fingerprint == b.fingerprint and a.split["heldout"][1] < b.split["heldout"][1]
    run = _train(a, tmp_path / "runs")
    recorded = json.loads((run / "checkpoint" / "config.json").read_text())["trained_rows"]
    assert recorded == [a.split["train"]]

    result = _evaluate(b, tmp_path / "runs")
    (start, end), held = a.split["train"], b.split["heldout"][1]
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (
        f"error: evaluate: run {str(run)!r} trained on rows {start:,}..{end:,} and {str(b.path)!r} holds "
        f"out rows 0..{held:,}: {held - start:,} held-out rows were trained on; evaluate it on a cache whose "
        f"held-out split ends by row {start:,} (its own: {str(a.path)!r})")
    assert not (run / "eval.json").exists()
    assert _evaluate(a, tmp_path / "runs").exit_code == 0  # its own cache: disjoint


@pytest.mark.slow
def test_a_larger_cache_with_the_same_held_out_split_evaluates(tmp_path):
    a = _harvest(tmp_path / "a", "40K", "4K")
    b = _harvest(tmp_path / "b", "80K", "4K")
    assert a.split["heldout"] == b.split["heldout"] == [0, 35 * 128]  # 32 contexts asked, chunks of 35
    run = _train(a, tmp_path / "runs")
    result = _evaluate(b, tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "eval.json").read_text())["tokens"] == 35 * 128


@pytest.mark.slow
def test_a_run_without_a_record_is_checked_against_its_own_cache(tmp_path):
    """A run trained before runs recorded their rows: its cache's train split stands in for the record."""
    a = _harvest(tmp_path / "a", "40K", "10%")
    b = _harvest(tmp_path / "b", "80K", "10%")
    run = _train(a, tmp_path / "runs")
    for f in (run / "checkpoint" / "config.json", run / "config.json"):
        cfg = json.loads(f.read_text())
        del cfg["trained_rows"]
        f.write_text(json.dumps(cfg))
    result = _evaluate(b, tmp_path / "runs")
    assert result.exit_code == 2 and "held-out rows were trained on" in result.output, result.output


@pytest.mark.parametrize("tokens, holdout, spc, held", [
    ("40K", "1%", 78, 4),      # 1 % of 313 contexts: 4 contexts (1.3 %), not a 78-context chunk (25 %)
    ("40K", "10%", 78, 35),    # 32 asked: chunks of 35 hold out 35 (within 10 %)
    ("10M", "1%", 21, 798),    # a large cache: the planned chunks already fit (782 asked)
    ("40K", "4K", 78, 35),     # a token count: 32 contexts (4,000 tokens rounded up), in chunks of 35
])
def test_the_held_out_split_stays_close_to_what_was_asked(tokens, holdout, spc, held):
    cfg = HarvestConfig(tokens=tokens, context_size=128, layers=1, holdout=holdout)
    chunk, got = cfg.holdout_layout(spc)
    assert got == held and got % chunk == 0 and chunk <= spc
    asked = cfg.holdout_sequences(1)
    assert asked <= got <= asked * (1 + HOLDOUT_TOLERANCE)


def test_harvest_and_cache_info_say_what_was_held_out(tmp_path, capsys):
    cfg = from_dict(HarvestConfig, dict(source="synthetic", synthetic=SYNTHETIC, layers=0, sites="resid_mid",
                                        tokens="40K", context_size=128, batch_size=16, cache=str(tmp_path / "c"),
                                        writer_threads=2, seed=0), "harvest")  # the default holdout: 1%
    harvest(cfg, progress=True)
    line = "held-out tokens 0..512 (1.3% of 40,064; --holdout 1% asked), train 512..40,064"
    assert f"harvest: {line}" in capsys.readouterr().err
    info = CliRunner().invoke(app, ["cache", "info", str(tmp_path / "c")])
    assert f"split        {line}" in info.output, info.output
