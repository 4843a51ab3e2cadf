"""SAELens interop, both ways: exports keep their identity in SAELens; any SAELens folder evaluates on a cache.

The tests that need SAELens itself skip without it here; CI runs this file in a second environment with
SAELens installed (``.ci/run``), where they must not skip. The others read and write the folder format
directly, as the pipeline does, and run everywhere.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import harvest_config
from matryoshka.cache import Cache
from matryoshka.config import TrainConfig
from matryoshka.harvest import harvest
from matryoshka.train.saelens import RAW_ACTIVATIONS, read_saelens
from matryoshka.train.trainer import train

RUNS = [  # every architecture we export
    {"name": "mat", "source": "1.resid_mid", "width": 128, "k": 4, "group_sizes": [16, 32, 80], "tokens": "4K"},
    {"name": "btk", "source": "1.mlp_in", "width": 128, "k": 4, "arch": "batchtopk", "tokens": "4K"},
    {"name": "topk", "source": "1.resid_mid", "width": 128, "k": 4, "arch": "topk", "tokens": "4K"},
    {"name": "tc", "source": "1.mlp_in", "target": "1.mlp_out", "width": 128, "k": 4, "arch": "batchtopk",
     "tokens": "4K"},
    {"name": "skip", "source": "1.mlp_in", "target": "1.mlp_out", "width": 128, "k": 4, "arch": "batchtopk",
     "tokens": "4K", "skip": True},
]
HOOKS = {"1.resid_mid": "blocks.1.hook_resid_mid", "1.mlp_in": "blocks.1.mlp.hook_in",
         "1.mlp_out": "blocks.1.hook_mlp_out"}
EVAL = ["--no-features", "--contexts", "0", "--lm-tokens", "96", "--lm-batch-size", "2", "--batch-size", "64", "-q"]


@pytest.fixture(scope="module")
def trained(gpt2_dir, corpus, tmp_path_factory):
    """Runs of every exported architecture on a tiny GPT-2 cache: (cache, runs folder, {name: run dir})."""
    tmp = tmp_path_factory.mktemp("saelens")
    path = harvest(harvest_config(gpt2_dir, corpus, tmp / "cache", sites="1.resid_mid,1.mlp_in,1.mlp_out",
                                  layers=None), progress=False)
    dirs = train(TrainConfig(cache=str(path), runs=RUNS, runs_dir=str(tmp / "runs"), batch_size=128,
                             buffer_tokens=1024, checkpoint_every=100), progress=False)
    return Cache(path), tmp / "runs", {d.name: d for d in dirs}


def _cfg(run: Path) -> dict:
    return json.loads((run / "saelens" / "cfg.json").read_text())


def _heldout(cache: Cache, array: str) -> torch.Tensor:
    """The held-out rows evaluation reads: every one but the BOS rows (position 0 of each context)."""
    a, b = cache.split["heldout"]
    rows = np.arange(a, b)
    return torch.from_numpy(cache.read(array, a, b)[rows % cache.manifest["context_size"] != 0])


def _fvu(y_hat: torch.Tensor, y: torch.Tensor, cache: Cache, array: str) -> float:
    mu = torch.as_tensor(cache.stats(array).mean, dtype=torch.float64)
    return float((y_hat.double() - y.double()).pow(2).sum() / (y.double() - mu).pow(2).sum())


def test_exports_carry_what_saelens_needs_to_rebuild_their_metadata(trained, gpt2_dir, corpus):
    cache, _, dirs = trained
    for name, run in dirs.items():
        cfg, spec = _cfg(run), next(r for r in RUNS if r["name"] == name)
        meta = cfg["metadata"]
        assert meta["sae_lens_version"] == "6.0.0" and meta["sae_lens_training_version"] is None
        assert meta["model_name"] == str(Path(gpt2_dir).resolve())  # resolved, not as typed
        assert meta["dataset_path"] == str(Path(corpus).resolve())
        assert (meta["context_size"], meta["prepend_bos"]) == (32, True)
        assert meta["exclude_special_tokens"] == [cache.manifest["bos"]["token_id"]]
        assert meta["model_from_pretrained_kwargs"] == RAW_ACTIVATIONS
        assert meta["model_from_pretrained_kwargs"]["fold_ln"] is False
        assert meta["hook_name"] == HOOKS[spec["source"]]
        assert meta.get("hook_name_out") == (HOOKS[spec["target"]] if "target" in spec else None)
        assert cfg["normalize_activations"] == "none"
        assert cfg["architecture"] == {"mat": "jumprelu", "btk": "jumprelu", "topk": "topk", "tc": "jumprelu_transcoder",
                                       "skip": "jumprelu_skip_transcoder"}[name]
    assert _cfg(dirs["mat"])["matryoshka_widths"] == _cfg(dirs["mat"])["metadata"]["matryoshka_widths"] == [16, 48, 128]
    assert "matryoshka_widths" not in _cfg(dirs["btk"])


def test_a_saelens_folder_reads_as_the_run_it_was_exported_from(trained):
    import matryoshka

    cache, _, dirs = trained
    for name, run in dirs.items():
        ours, theirs = matryoshka.load(run), read_saelens(run / "saelens")
        x = _heldout(cache, ours.config["source"])
        torch.testing.assert_close(theirs.encode(x), ours.encode(x), rtol=0, atol=0, msg=name)
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-6, msg=name)
        assert theirs.group_sizes == ours.group_sizes


def _evaluate(cache: Cache, runs: Path, *args: str):
    from typer.testing import CliRunner

    from matryoshka.cli import app

    return CliRunner().invoke(app, ["evaluate", "--cache", cache.path, "--runs-dir", str(runs), *EVAL, *args])


def test_evaluate_sae_gives_an_export_the_metrics_of_its_run(trained):
    cache, runs, dirs = trained
    run = dirs["mat"]
    assert _evaluate(cache, runs, str(run)).exit_code == 0
    out = _evaluate(cache, runs, "--sae", str(run / "saelens"), "--sae", str(dirs["skip"] / "saelens"))
    assert out.exit_code == 0, out.output
    assert "mat-saelens" in out.output and "skip-saelens" in out.output
    mine = json.loads((run / "eval.json").read_text())
    folder = runs / cache.fingerprint
    sae = json.loads((folder / "mat-saelens" / "eval.json").read_text())
    assert sae["config"]["sae"] == str((run / "saelens").resolve()) and sae["config"]["arch"] == "jumprelu"
    for key in ("tokens", "l0", "dead", "dense"):
        assert sae[key] == mine[key], key
    for key in ("fvu", "fvu_seed", "mse", "cosine"):
        assert sae[key] == pytest.approx(mine[key], rel=1e-5), key
    assert sae["prefix_fvu"] == pytest.approx(mine["prefix_fvu"], rel=1e-5)  # the Matryoshka groups came along
    for key in ("ce_clean", "ce_spliced", "kl"):
        assert sae["lm"][key] == pytest.approx(mine["lm"][key], rel=1e-4, abs=1e-7), key
    report = (folder / "report.md").read_text()
    assert "| mat |" in report and "| mat-saelens |" in report and "| skip-saelens |" in report


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["metadata"].update(model_name="gpt2"), "is for model 'gpt2', but cache .* holds "),
    (lambda c: c["metadata"].update(hook_name="blocks.0.hook_resid_mid"),
     "its hook_name 'blocks.0.hook_resid_mid' is not in cache .*; it holds blocks.1.hook_resid_mid, "),
    (lambda c: c["metadata"].update(hook_name_out="blocks.1.hook_resid_post"), "its hook_name_out 'blocks.1.hook_resid_post'"),
    (lambda c: c.update(architecture="gated"), "architecture 'gated' is not supported; supported: standard, "),
    (lambda c: c.update(normalize_activations="layer_norm"), "normalize_activations 'layer_norm' is not supported"),
    (lambda c: c.update(d_in=32), r"sae_weights.safetensors: W_enc is \(64, 128\), cfg.json implies \(32, 128\)"),
])
def test_a_sae_that_does_not_fit_the_cache_is_one_line_and_writes_nothing(trained, tmp_path, edit, message):
    import re

    cache, runs, dirs = trained
    bad = tmp_path / "bad"
    shutil.copytree(dirs["tc"] / "saelens", bad)
    cfg = json.loads((bad / "cfg.json").read_text())
    edit(cfg)
    (bad / "cfg.json").write_text(json.dumps(cfg))
    out = _evaluate(cache, tmp_path / "runs", "--sae", str(dirs["btk"] / "saelens"), "--sae", str(bad))
    assert out.exit_code == 2 and len(out.output.strip().splitlines()) == 1, out.output
    assert re.search(message, out.output), out.output
    assert not (tmp_path / "runs").exists()  # checked before the first one was evaluated


def test_evaluate_sae_needs_a_cache_and_distinct_names(trained, tmp_path):
    from typer.testing import CliRunner

    from matryoshka.cli import app

    cache, runs, dirs = trained
    out = CliRunner().invoke(app, ["evaluate", "--runs-dir", str(tmp_path), "--sae", str(dirs["tc"] / "saelens")])
    assert out.exit_code == 2 and "--sae needs --cache" in out.output
    twin = tmp_path / "x" / "tc" / "saelens"
    shutil.copytree(dirs["tc"] / "saelens", twin)
    out = _evaluate(cache, tmp_path / "runs", "--sae", str(dirs["tc"] / "saelens"), "--sae", str(twin))
    assert out.exit_code == 2 and "would both be named 'tc-saelens'" in out.output
    out = _evaluate(cache, tmp_path / "runs", "--sae", str(tmp_path))
    assert out.exit_code == 2 and "is not a SAELens folder" in out.output
