"""`pipeline run`: the stages end to end, a second run does nothing, and a run killed in harvest and then
in training resumes to exactly the result of an uninterrupted one. Plus pipeline.yaml's cross-section checks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from matryoshka.cache import Cache
from matryoshka.cli import app
from matryoshka.config import ConfigError, load_pipeline
from matryoshka.pipeline import run_pipeline
from test_resume import _committed, _files

RUNS = [
    {"name": "sae", "source": "1.resid_mid", "width": 256, "group_sizes": [16, 32, 64, 144], "k": 8, "lr": 0.003,
     "tokens": "5K", "dead_tokens": "2K"},
    {"name": "tc", "source": "1.resid_mid", "target": "1.mlp_out", "width": 128, "k": 8, "lr": 0.003,
     "tokens": "5K", "dead_tokens": "2K", "skip": True},
    {"name": "btk", "source": "1.resid_mid", "arch": "batchtopk", "width": 128, "k": 8, "lr": 0.003, "tokens": "2500"},
]


def _config(model: Path, corpus: Path, root: Path, runs=RUNS) -> Path:
    """A small pipeline over the tiny GPT-2: 200 contexts of 32 tokens in 50 chunks (batches of 3 chunks),
    long enough to be killed in its harvest and in its training."""
    cfg = {
        "harvest": {"model": str(model), "dataset": str(corpus), "sites": "1.resid_mid,1.mlp_out",
                    "tokens": 32 * 200, "context_size": 32, "batch_size": 12, "dtype": "float32",
                    "chunk_mb": 4 * 32 * 64 * 4 / 2**20, "holdout": 128, "writer_threads": 2,
                    "cache": str(root / "cache")},
        "train": {"runs": runs, "runs_dir": str(root / "runs"), "batch_size": 256, "buffer_tokens": 2048,
                  "checkpoint_every": 5, "log_every": 5},
        "evaluate": {"runs_dir": str(root / "runs"), "batch_size": 1024},
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "pipeline.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root / "pipeline.yaml"


def _run(config: Path):
    lines: list[str] = []
    out = run_pipeline(load_pipeline(config), progress=False, echo=lines.append)
    return out, lines


def _mtimes(root: Path) -> dict[str, int]:
    """Modification times of every file but the writer lock (a harvest takes it even to find nothing to do)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".writer.lock"}


def _comparable(result: dict) -> dict:
    """An eval.json without the fields that name where it lives."""
    return {k: v for k, v in result.items() if k not in ("path", "config")}


@pytest.fixture(scope="module")
def whole(gpt2_dir, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("whole")
    config = _config(gpt2_dir, corpus, root)
    out, lines = _run(config)
    return root, config, out, lines


@pytest.mark.slow
def test_end_to_end_then_a_second_run_does_nothing(whole):
    root, config, first, lines = whole
    assert first.trained == ["sae", "tc", "btk"] and first.evaluated == ["sae", "tc", "btk"]
    assert [r["run"] for r in first.results] == ["sae", "tc", "btk"]
    assert all(r["l0"] > 0 and r["tokens"] > 0 for r in first.results) and first.results[0]["fvu"] < 1  # 20 steps
    assert first.table.splitlines()[0].startswith("run") and len(first.table.splitlines()) == 4
    assert Cache(first.cache).complete and first.cache == str(root / "cache")

    before = _mtimes(root)
    evals = {r["run"]: (Path(r["path"]) / "eval.json").read_bytes() for r in first.results}
    again, lines = _run(config)
    assert again.trained == [] and again.evaluated == []
    assert "train: all 3 runs are finished" in lines and "evaluate: all 3 runs are evaluated" in lines
    assert again.results == first.results and again.table == first.table
    assert _mtimes(root) == before  # not one file rewritten: cache, checkpoints, metrics, eval.json
    assert {r["run"]: (Path(r["path"]) / "eval.json").read_bytes() for r in again.results} == evals


@pytest.mark.slow
def test_a_stale_or_torn_eval_json_is_evaluated_again_and_a_missing_export_written(whole, tmp_path):
    root, config, first, _ = whole
    tc = Path(first.results[1]["path"])
    good = (tc / "eval.json").read_text()
    try:
        (tc / "eval.json").write_text(good[: len(good) // 2])  # what a kill mid-write leaves
        out, _ = _run(config)
        assert out.trained == [] and out.evaluated == ["tc"] and out.results == first.results
        os.utime(tc / "checkpoint" / "model.safetensors")  # a checkpoint newer than its evaluation
        out, _ = _run(config)
        assert out.evaluated == ["tc"]
        exported = (tc / "saelens" / "cfg.json").read_bytes()
        (tc / "saelens" / "cfg.json").unlink()  # killed after its last checkpoint, before the export
        out, _ = _run(config)
        assert out.trained == out.evaluated == [] and (tc / "saelens" / "cfg.json").read_bytes() == exported
    finally:
        (tc / "eval.json").write_text(good)


@pytest.mark.slow
def test_only_rank_zero_evaluates_under_torchrun(whole, monkeypatch):
    root, config, first, _ = whole
    tc = Path(first.results[1]["path"])
    good = (tc / "eval.json").read_text()
    try:
        (tc / "eval.json").unlink()
        monkeypatch.setenv("RANK", "1")  # a second rank of a finished pipeline: nothing left for it to do
        out, _ = _run(config)
        assert out.evaluated == [] and out.results == [] and out.report is None
        assert not (tc / "eval.json").exists()
        monkeypatch.setenv("RANK", "0")
        out, _ = _run(config)
        assert out.evaluated == ["tc"] and out.results == first.results
    finally:
        (tc / "eval.json").write_text(good)


def _wait(proc: subprocess.Popen, until, what: str) -> None:
    deadline = time.monotonic() + 180
    while not until() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"pipeline run finished before it could be killed {what}; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_killed_in_harvest_then_in_training_resumes_to_the_uninterrupted_result(whole, gpt2_dir, corpus, tmp_path):
    ref_root, _, ref, _ = whole
    root = tmp_path / "killed"
    config = _config(gpt2_dir, corpus, root, runs=RUNS[:2])  # btk joins after the kills: it trains alone
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "PYTHONPATH": str(Path(__file__).parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = [sys.executable, "-m", "matryoshka.cli", "run", str(config), "--quiet"]

    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait(proc, lambda: _committed(root / "cache") >= 3, "in its harvest")
    assert not Cache(root / "cache").complete and not (root / "runs").exists()

    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    fingerprint = ref.results[0]["fingerprint"]
    state = root / "runs" / fingerprint / "tc" / "checkpoint" / "state.pt"
    _wait(proc, state.exists, "in its training")
    assert Cache(root / "cache").complete
    step = torch.load(state, weights_only=False)["step"]
    assert 0 < step < 20 and not (root / "runs" / fingerprint / "tc" / "eval.json").exists()

    _config(gpt2_dir, corpus, root)  # all three runs now
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"train: sae, tc (resuming at step {step})" in done.stdout and "train: btk" in done.stdout

    fa, fb = _files(ref_root / "cache"), _files(root / "cache")
    assert fa.keys() == fb.keys() and [k for k in fa if fa[k] != fb[k]] == []
    for run in ("sae", "tc", "btk"):
        a = load_file(ref_root / "runs" / fingerprint / run / "checkpoint" / "model.safetensors")
        b = load_file(root / "runs" / fingerprint / run / "checkpoint" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), run
    resumed = [json.loads((root / "runs" / fingerprint / r / "eval.json").read_text()) for r in ("sae", "tc", "btk")]
    assert [_comparable(r) for r in resumed] == [_comparable(r) for r in ref.results]


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["train"]["runs"][1].update(target="9.mlp_out"),
     "train.runs[1].target: 9.mlp_out is not harvested; the harvest writes 1.resid_mid, 1.mlp_out"),
    (lambda c: c["train"]["runs"][0].update(group_sizes=[16, 32]),
     r"train.runs[0].group_sizes: [16, 32] must be positive and sum to the width 256"),
    (lambda c: c["train"]["runs"][2].update(widht=64), "train.runs[2].widht: unknown key; valid keys are"),
    (lambda c: c["train"]["runs"][0].update(width="wide"), "train.runs[0].width: 'wide' is a str; expected an integer"),
    (lambda c: c["harvest"].update(layers=1.5), "harvest.layers: 1.5 is a float; expected"),
    (lambda c: c["evaluate"].update(runs_dir="elsewhere"),
     "evaluate.runs_dir: 'elsewhere' differs from train.runs_dir"),
    (lambda c: c["evaluate"].update(cache="x"), "evaluate.cache: pipeline run evaluates the runs of train.runs"),
    (lambda c: c["evaluate"].update(sae=["x"]), "evaluate.sae: pipeline run evaluates the runs of train.runs"),
    (lambda c: c["harvest"].update(shard="0/2"), "harvest.shard: '0/2' writes one worker's part of a cache"),
    (lambda c: c.pop("harvest"), "harvest: the file has no harvest section and no train.cache"),
    (lambda c: c["train"]["runs"][0].update(decay_fraction=5.0), "train.runs[0].decay_fraction: 5.0 must be between"),
    (lambda c: c["train"]["runs"][0].update(name="../elsewhere"), "train.runs[0].name: '../elsewhere' must be a plain"),
])
def test_config_errors_name_their_key_path_before_anything_runs(gpt2_dir, corpus, tmp_path, edit, message):
    config = _config(gpt2_dir, corpus, tmp_path)
    data = yaml.safe_load(config.read_text())
    edit(data)
    config.write_text(yaml.safe_dump(data))
    out = CliRunner().invoke(app, ["run", str(config), "--quiet"])
    assert out.exit_code == 2 and out.output.count("\n") == 1, out.output
    assert message in out.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline.yaml"]  # nothing harvested or trained


@pytest.mark.slow
def test_a_file_without_a_harvest_section_trains_from_train_cache_as_it_is(whole, tmp_path):
    """No harvest is assumed (once, a default GPT-2 harvest was, and its arrays checked against the runs)."""
    root, _, first, _ = whole
    cfg = {"train": {"cache": first.cache, "runs": [dict(RUNS[2], name="again")], "runs_dir": str(tmp_path / "runs"),
                     "batch_size": 256, "buffer_tokens": 2048}, "evaluate": {"batch_size": 1024}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    before = _mtimes(root / "cache")
    out, lines = _run(tmp_path / "p.yaml")
    assert lines[0] == f"harvest: none asked; training from {first.cache}"
    assert out.trained == ["again"] and out.results[0]["run"] == "again" and _mtimes(root / "cache") == before


@pytest.mark.slow
def test_evaluate_with_a_config_finds_the_runs_under_train_runs_dir(whole, tmp_path):
    """As `pipeline run` does, `pipeline evaluate --config` follows train.runs_dir when evaluate sets none."""
    import shutil

    root, _, first, _ = whole
    fp = Cache(first.cache).fingerprint
    shutil.copytree(root / "runs" / fp / "btk", tmp_path / "mine" / fp / "btk",
                    ignore=shutil.ignore_patterns("eval.json"))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"train": {"runs_dir": str(tmp_path / "mine")}}))
    out = CliRunner().invoke(app, ["evaluate", "--config", str(tmp_path / "p.yaml"), "--cache", first.cache,
                                   "--no-lm", "--no-features", "--quiet"])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "mine" / fp / "btk" / "eval.json").is_file()


def test_group_sizes_of_a_model_width_run_are_checked_from_the_models_config(gpt2_dir, corpus, tmp_path):
    config = _config(gpt2_dir, corpus, tmp_path, runs=[{"name": "a", "source": "1.resid_mid",
                                                        "group_sizes": [64, 128, 256, 512]}])
    out = CliRunner().invoke(app, ["run", str(config)])  # width 0: 16 x the tiny model's 64 = 1024
    assert out.exit_code == 2
    assert "train.runs[0].group_sizes: [64, 128, 256, 512] must be positive and sum to the width 1024" in out.output


@pytest.mark.slow
def test_a_finished_run_whose_config_changed_is_refused(whole, tmp_path):
    root, config, first, _ = whole
    data = yaml.safe_load(config.read_text())
    data["train"]["runs"][2]["k"] = 4
    changed = tmp_path / "pipeline.yaml"
    changed.write_text(yaml.safe_dump(data))
    before = _mtimes(root)
    out = CliRunner().invoke(app, ["run", str(changed), "--quiet"])
    assert out.exit_code == 2 and "train.runs.btk:" in out.output and "k (8 -> 4)" in out.output, out.output
    assert _mtimes(root) == before


def test_every_flag_of_harvest_train_and_evaluate_is_a_key_of_its_section():
    import typer

    from matryoshka.config import EvaluateConfig, HarvestConfig, TrainConfig

    command = typer.main.get_command(app)
    common = {"config", "quiet", "help"}
    for name, cls, not_flags in (("harvest", HarvestConfig, set()), ("train", TrainConfig, {"runs"}),
                                 ("evaluate", EvaluateConfig, set())):
        params = {p.name for p in command.commands[name].params} - common
        keys = set(cls.model_fields)
        assert params == keys - not_flags, name
        for p in command.commands[name].params:
            if p.name in keys and p.param_type_name == "option":
                assert f"--{p.name.replace('_', '-')}" in p.opts, (name, p.name)


@pytest.mark.slow
def test_the_default_synthetic_pipeline_shrunk_runs_then_does_nothing(tmp_path):
    """The repository's pipeline.yaml (the synthetic source: no model), with fewer tokens."""
    data = yaml.safe_load((Path(__file__).parents[1] / "pipeline.yaml").read_text())
    data["harvest"].update(tokens="16K", holdout="2K", chunk_mb=0.0625, cache=str(tmp_path / "cache"))
    data["train"].update(runs_dir=str(tmp_path / "runs"), buffer_tokens=4096, batch_size=512)
    for run in data["train"]["runs"]:
        run.update(tokens="8K", dead_tokens="4K")
    data["evaluate"] = {**(data.get("evaluate") or {}), "runs_dir": str(tmp_path / "runs")}
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(data))
    names = [r["name"] for r in data["train"]["runs"]]
    first, _ = _run(config)
    assert first.trained == names and first.evaluated == names and len(first.table.splitlines()) == len(names) + 1
    before = _mtimes(tmp_path)
    again, _ = _run(config)
    assert again.trained == again.evaluated == [] and again.results == first.results and _mtimes(tmp_path) == before


def test_an_unreadable_model_config_skips_only_the_checks_that_need_it(tmp_path):
    config = tmp_path / "pipeline.yaml"
    runs = [{"name": "a", "source": "8.resid_mid", "k": 5},  # needs the model's width: left to training
            {"name": "b", "source": "8.resid_mid", "width": 100, "group_sizes": [10, 20]}]
    config.write_text(yaml.safe_dump({"harvest": {"model": "no-such-org/no-such-model", "layers": 8},
                                      "train": {"runs": runs}}))
    with pytest.raises(ConfigError, match=r"^train\.runs\[1\]\.group_sizes: \[10, 20\] must be positive and sum "
                                          r"to the width 100"):
        load_pipeline(config)
    runs[1]["group_sizes"] = [10, 90]
    config.write_text(yaml.safe_dump({"harvest": {"model": "no-such-org/no-such-model", "layers": 8},
                                      "train": {"runs": runs}}))
    assert [r.name for r in load_pipeline(config).train.runs] == ["a", "b"]
