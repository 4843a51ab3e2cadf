"""Training from a harvested cache: it learns, many configs equal each alone, resume is exact."""
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

from helpers import harvest_config
from matryoshka.cache import Cache
from matryoshka.config import ConfigError, RunConfig, TrainConfig
from matryoshka.harvest import harvest
from matryoshka.train.trainer import train

RUNS = [
    {"name": "sae", "source": "1.resid_mid", "width": 256, "k": 8, "lr": 0.003, "tokens": "40K",
     "group_sizes": [16, 32, 64, 144], "dead_tokens": "5K"},
    {"name": "tc", "source": "1.resid_mid", "target": "1.mlp_out", "width": 128, "k": 8, "lr": 0.003,
     "tokens": "40K", "dead_tokens": "5K", "skip": True},
    {"name": "ref", "source": "1.resid_mid", "width": 256, "k": 8, "lr": 0.003, "tokens": "20K",
     "objective": "reference", "group_sizes": [16, 32, 64, 144]},
]


@pytest.fixture(scope="module")
def cache(gpt2_dir, corpus, tmp_path_factory) -> Path:
    cfg = harvest_config(gpt2_dir, corpus, tmp_path_factory.mktemp("t") / "cache", sites="1.resid_mid,1.mlp_out",
                         tokens="24K", batch_size=16, layers=None)
    return harvest(cfg, progress=False)


def _cfg(cache: Path, runs_dir: Path, runs=RUNS, **kw) -> TrainConfig:
    return TrainConfig(cache=str(cache), runs=[dict(r) for r in runs], runs_dir=str(runs_dir), batch_size=256,
                       buffer_tokens=2048, checkpoint_every=kw.pop("checkpoint_every", 40), log_every=5, **kw)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoint" / "model.safetensors")


def _last(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.mark.slow
def test_training_lowers_fvu_for_sae_and_transcoder(cache, tmp_path):
    dirs = {p.name: p for p in train(_cfg(cache, tmp_path), progress=False)}
    assert set(dirs) == {"sae", "tc", "ref"} and dirs["sae"].parent.name == Cache(cache).fingerprint
    for name, bound in (("sae", 0.2), ("tc", 0.3), ("ref", 0.5)):
        last = _last(dirs[name])
        first = json.loads((dirs[name] / "metrics.jsonl").read_text().splitlines()[0])
        assert last["fvu"] < bound < first["fvu"], (name, first["fvu"], last["fvu"])
        assert last["l0"] == pytest.approx(8, abs=0.01)
    prefix = _last(dirs["sae"])["prefix_fvu"]
    assert prefix == sorted(prefix, reverse=True)  # each Matryoshka prefix reconstructs better than the last
    again = train(_cfg(cache, tmp_path), progress=False)  # finished runs are not trained again
    assert [p.name for p in again] == ["sae", "tc", "ref"]
    assert len((dirs["sae"] / "metrics.jsonl").read_text().splitlines()) == 32


@pytest.mark.slow
def test_metrics_report_the_share_of_time_spent_waiting_on_the_reader(cache, tmp_path, monkeypatch):
    """A reader slowed by a known sleep: each metrics line's share times its interval (from the lines'
    wall-clock times) accounts for every sleep of that interval, whatever the machine's load."""
    from matryoshka.train import distributed

    run = {**RUNS[0], "tokens": "5K"}  # 20 steps of 256 tokens, a metrics line every 5
    nap = 0.25

    def waited(run_dir: Path) -> list[float]:
        """Seconds spent in next(reader) per line, from the second line on (the first has no start time)."""
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [5, 10, 15, 20] and all(0 <= r["reader_wait"] <= 1 for r in rows)
        return [b["reader_wait"] * (b["time"] - a["time"]) for a, b in zip(rows, rows[1:])]

    fast = waited(train(_cfg(cache, tmp_path / "fast", runs=[run]), progress=False)[0])
    read = distributed.RankStreams.__next__

    def slow_read(self):
        time.sleep(nap)
        return read(self)

    monkeypatch.setattr(distributed.RankStreams, "__next__", slow_read)
    slow = waited(train(_cfg(cache, tmp_path / "slow", runs=[run]), progress=False)[0])
    for s in slow:  # five reads per line, each at least a nap
        assert 5 * nap - 0.05 < s < 5 * nap + 1.0, slow
    assert max(fast) < 5 * nap / 2, fast


@pytest.mark.slow
def test_many_configs_from_one_read_equal_each_alone(cache, tmp_path):
    together = {p.name: _weights(p) for p in train(_cfg(cache, tmp_path / "all", runs=RUNS[:2]), progress=False)}
    for run in RUNS[:2]:
        (alone,) = train(_cfg(cache, tmp_path / run["name"], runs=[run]), progress=False)
        w = _weights(alone)
        assert w.keys() == together[run["name"]].keys()
        for k in w:
            assert torch.equal(w[k], together[run["name"]][k]), (run["name"], k)


def kill_after_first_checkpoint(cache: Path, runs_dir: Path, runs: list[dict], device: str = "cpu") -> list[str]:
    """Start `pipeline train` in a subprocess and SIGKILL it once every run has a checkpoint (20 steps
    apart: the kill lands between two); return the command line that resumes it."""
    config = runs_dir.parent / f"{runs_dir.name}.yaml"
    config.write_text(yaml.safe_dump({"train": {"runs": runs, "batch_size": 256, "buffer_tokens": 2048,
                                                "checkpoint_every": 20, "log_every": 5, "device": device}}))
    args = [sys.executable, "-m", "matryoshka.cli", "train", "--cache", str(cache), "--config", str(config),
            "--runs-dir", str(runs_dir), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    state = runs_dir / Cache(cache).fingerprint / runs[-1]["name"] / "checkpoint" / "state.pt"
    deadline = time.monotonic() + 120
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return args


def _logged(run_dir: Path) -> list[tuple[int, float]]:
    return [(x["step"], x["loss"]) for x in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.slow
def test_killed_training_resumes_bitwise(cache, tmp_path):
    """Killed, resumed: the same weights and the same metrics lines as an uninterrupted run, also when
    the kill left what it can leave: metrics lines past the checkpoint, a line cut short, and a
    checkpoint swap stopped between its renames (only checkpoint.old/ and a partial checkpoint.tmp/)."""
    whole = {p.name: p for p in train(_cfg(cache, tmp_path / "whole", runs=RUNS[:2], checkpoint_every=20),
                                      progress=False)}
    args = kill_after_first_checkpoint(cache, tmp_path / "killed", RUNS[:2])
    killed = tmp_path / "killed" / Cache(cache).fingerprint
    step = torch.load(killed / "tc" / "checkpoint" / "state.pt", weights_only=False)["step"]
    assert 0 < step < 157
    (killed / "tc" / "checkpoint").rename(killed / "tc" / "checkpoint.old")
    (killed / "tc" / "checkpoint.tmp").mkdir()
    (killed / "tc" / "checkpoint.tmp" / "model.safetensors").write_bytes(b"half a file")
    for name in whole:
        with open(killed / name / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step + 5, "loss": 123.0}) + '\n{"step": ')
    subprocess.run(args, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}, check=True,
                   capture_output=True)
    for name, run in whole.items():
        w, resumed = _weights(run), _weights(killed / name)
        for k in w:
            assert torch.equal(w[k], resumed[k]), (name, k)
        assert _logged(killed / name) == _logged(run)
    assert sorted(p.name for p in (killed / "tc").iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]


@pytest.mark.slow
def test_a_run_killed_before_its_export_is_exported_by_the_next_train(cache, tmp_path):
    (run,) = train(_cfg(cache, tmp_path, runs=RUNS[2:]), progress=False)
    want = (run / "saelens" / "sae_weights.safetensors").read_bytes()
    for p in (run / "saelens").iterdir():
        p.unlink()
    assert train(_cfg(cache, tmp_path, runs=RUNS[2:]), progress=False) == [run]
    assert (run / "saelens" / "sae_weights.safetensors").read_bytes() == want
    assert json.loads((run / "saelens" / "cfg.json").read_text())["d_sae"] == 256


@pytest.mark.parametrize("run, message", [
    ({"group_sizes": [16, 32]}, r"group_sizes: \[16, 32\] must be positive and sum to the width 256"),
    ({"k": 256}, "k: 256 must be positive and below the width 256"),
    ({"source": "9.resid_mid"}, "array '9.resid_mid' is not in the cache; it has 1.resid_mid, 1.mlp_out"),
    ({"target": "1.attn_out"}, "array '1.attn_out' is not in the cache"),
    ({"arch": "batchtopk", "group_sizes": [128, 128]}, "only a matryoshka run has groups"),
])
def test_config_errors_before_training(cache, tmp_path, run, message):
    with pytest.raises(ConfigError, match=message):
        train(_cfg(cache, tmp_path, runs=[{**RUNS[0], **run}]), progress=False)
    assert not (tmp_path / Cache(cache).fingerprint).exists()


def test_config_errors_in_the_yaml():
    with pytest.raises(ConfigError, match=r"train\.runs\[0\]\.arch: 'jumprelu' is not one of matryoshka"):
        TrainConfig(cache="x", runs=[{"name": "a", "source": "s", "arch": "jumprelu"}])
    with pytest.raises(ConfigError, match="run name 'a' is used twice"):
        TrainConfig(cache="x", runs=[{"name": "a", "source": "s"}, {"name": "a", "source": "s"}])
    with pytest.raises(ConfigError, match="reference' reproduces the seed's Matryoshka BatchTopK"):
        RunConfig(name="a", source="s", arch="topk", objective="reference")
    # the seed's BatchTopKSAE
    assert RunConfig(name="a", source="s", arch="batchtopk", objective="reference").objective == "reference"
    assert RunConfig(name="a", source="s").resolve(768).group_sizes == [768, 1536, 3072, 6912]


@pytest.mark.slow
def test_wandb_offline_logs_every_run(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    runs = [{**RUNS[0], "tokens": "5K"}, {**RUNS[1], "tokens": "5K"}]
    for d in train(_cfg(cache, tmp_path, runs=runs, wandb="matryoshka-tests"), progress=False):
        offline = list((d / "wandb").glob("offline-run-*"))
        assert len(offline) == 1 and f"{Cache(cache).fingerprint}-{d.name}" in offline[0].name
        history = list(offline[0].glob("*.wandb"))  # the run's history, ready for `wandb sync`
        assert len(history) == 1
        assert d.name.encode() in history[0].read_bytes() and b"saelens/cfg.json" in history[0].read_bytes()


@pytest.mark.slow
def test_load_folds_the_input_scales(cache, tmp_path):
    import matryoshka
    from matryoshka.run_folder import Workspace
    from matryoshka.train.trainer import TrainingRun

    runs = [{**RUNS[0], "tokens": "5K"}, {**RUNS[1], "tokens": "5K"}]
    dirs = {p.name: p for p in train(_cfg(cache, tmp_path, runs=runs), progress=False)}
    c = Cache(cache)
    x_raw = torch.from_numpy(c.read("1.resid_mid", 0, 256))
    for cfg in runs:
        folder = Workspace().run(tmp_path / Cache(cache).fingerprint / cfg["name"])
        run = TrainingRun(RunConfig(**cfg), c, folder, 256, torch.device("cpu"))
        run.load()  # the trained dictionary, in training (scaled) units
        loaded = matryoshka.load(dirs[cfg["name"]])
        acts = loaded.encode(x_raw)
        torch.testing.assert_close(acts, run.dic.encode(x_raw * run.scale_in))  # the same latents
        assert (acts > 0).sum(1).float().mean() > 0
        want = run.dic.decode(acts, x_raw * run.scale_in) / run.scale_out
        torch.testing.assert_close(loaded.decode(acts, x_raw), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="holds no trained run"):
        matryoshka.load(tmp_path)


@pytest.mark.slow
def test_evaluate_runs_of_a_cache(cache, tmp_path):
    from typer.testing import CliRunner

    from matryoshka.cli import app
    from matryoshka.config import EvaluateConfig
    from matryoshka.evaluate.stage import LEGEND, evaluate

    runs = [{**RUNS[0], "tokens": "20K"}, {**RUNS[1], "tokens": "20K"}]
    train(_cfg(cache, tmp_path, runs=runs), progress=False)
    results = {r["run"]: r for r in evaluate(EvaluateConfig(cache=str(cache), runs_dir=str(tmp_path)))}
    assert set(results) == {"sae", "tc"}
    held = Cache(cache).split["heldout"]
    for r in results.values():
        assert r["tokens"] == (held[1] - held[0]) * 31 // 32  # every held-out non-BOS token once
        assert 0 < r["fvu"] < 0.5 and r["l0"] > 0
        assert json.loads((Path(r["path"]) / "eval.json").read_text())["fvu"] == r["fvu"]
    out = CliRunner().invoke(app, ["evaluate", "--cache", str(cache), "--runs-dir", str(tmp_path)])
    head = next(line for line in out.output.splitlines() if " FVU " in line)  # the table's header
    assert out.exit_code == 0 and "sae" in out.output and "FVU scalar-mean" in head and "seed" not in head
    latest = CliRunner().invoke(app, ["evaluate", "--runs-dir", str(tmp_path), "--quiet"])
    lines = latest.output.strip().splitlines()
    # header, newest run, legend, report
    assert latest.exit_code == 0 and len(lines) == 4 and lines[3].startswith("report: ")
    assert lines[2] == LEGEND and "dead: latents that fire on none of the evaluated held-out tokens" in LEGEND
    missing = CliRunner().invoke(app, ["evaluate", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "is not a trained run" in missing.output
    import numpy as np

    from matryoshka.fixtures import write_cache

    n = 8 * 32
    other = write_cache(tmp_path / "other", {"1.resid_mid": np.ones((n, 64), np.float32)}, np.zeros(n, int), 32, 2,
                        heldout_seqs=2, fingerprint="another")
    wrong = CliRunner().invoke(app, ["evaluate", results["sae"]["path"], "--cache", str(other)])
    assert wrong.exit_code == 2 and f"was trained on cache {Cache(cache).fingerprint}" in wrong.output


@pytest.mark.slow
def test_non_finite_lm_metrics_fail_in_one_line_and_eval_json_stays_json(cache, tmp_path):
    """A dictionary whose decoder bias is NaN: the spliced CE and the KL are NaN. The command fails (exit 1)
    with one line naming them; eval.json parses with a strict parser, those metrics null."""
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from matryoshka.cli import app

    (run,) = train(_cfg(cache, tmp_path, runs=[{**RUNS[0], "tokens": "2K"}]), progress=False)
    weights = _weights(run)
    weights["b_dec"] = torch.full_like(weights["b_dec"], float("nan"))
    save_file(weights, run / "checkpoint" / "model.safetensors")
    out = CliRunner().invoke(app, ["evaluate", str(run), "--quiet", "--no-features", "--contexts", "0",
                                   "--lm-tokens", "64", "--no-report"])
    errors = [line for line in out.output.splitlines() if line.startswith("error:")]
    assert out.exit_code == 1 and len(errors) == 1, out.output
    assert errors[0].startswith("error: evaluate: run sae: non-finite LM metrics ce_spliced = nan, ")
    assert "kl = nan" in errors[0] and "eval.json records these metrics as null" in errors[0]

    def bare(constant: str):
        raise AssertionError(f"eval.json holds a bare {constant}")

    result = json.loads((run / "eval.json").read_text(), parse_constant=bare)
    assert result["lm"]["ce_spliced"] is None and result["lm"]["kl"] is None and result["fvu"] is None
    assert result["lm"]["ce_clean"] > 0 and result["failed"] == errors[0][len("error: evaluate: "):].split(": the ")[0]
