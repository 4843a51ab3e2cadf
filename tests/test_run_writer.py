"""A run folder has one writer, and a signal stops it cleanly: real `pipeline` processes, real signals.

* While `pipeline train` trains a run, a second `pipeline train`, a `pipeline run` and a `pipeline evaluate`
  of it are refused with one line naming the holder's pid and host (exit 2); a SIGKILL leaves no lock
  behind, so the resume trains.
* SIGINT and SIGTERM write a checkpoint at the current step, say so in one line and exit 130 / 143; the
  resumed run equals an uninterrupted one bit for bit.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from matryoshka.config import load_pipeline
from matryoshka.harvest import harvest
from matryoshka.train.trainer import train

pytestmark = pytest.mark.slow  # training subprocesses interrupted by real signals

RUN = {"name": "sae", "source": "0.resid_mid", "width": 80, "group_sizes": [16, 64], "k": 2, "lr": 0.01,
       "dead_tokens": "4K"}


def write_config(root: Path, tokens: str, checkpoint_every: int, cache_root: Path | None = None) -> Path:
    """The repository's synthetic pipeline, small, with one run; the cache at its default path under
    ``cache_root`` (no ``cache`` key), so `pipeline train --config` finds it from the harvest section."""
    data = yaml.safe_load((Path(__file__).parents[1] / "pipeline.yaml").read_text())
    data["harvest"].update(tokens="16K", holdout="2K", chunk_mb=0.0625, cache_root=str(cache_root or root / "cache"))
    data["train"] = {"runs_dir": str(root / "runs"), "buffer_tokens": 4096, "batch_size": 256, "log_every": 1,
                     "checkpoint_every": checkpoint_every, "runs": [{**RUN, "tokens": tokens}]}
    data["evaluate"] = {"features": False, "contexts": 0, "report": False}
    config = root / "pipeline.yaml"
    config.write_text(yaml.safe_dump(data))
    return config


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    """One synthetic cache under a root the tests' configs share (harvested once)."""
    root = tmp_path_factory.mktemp("writer")
    harvest(load_pipeline(write_config(root, "8K", 5)).harvest, progress=False)
    return root


ENV = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(Path(__file__).parents[1])}


def _pipeline(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "matryoshka.cli", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _logged(run_dir: Path) -> list[dict]:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [json.loads(x) for x in lines if x.endswith("}")]


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    """Until ``run_dir``'s metrics.jsonl has logged ``step`` (the process must still be training then)."""
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if any(r["step"] >= step for r in _logged(run_dir)):
            return
        time.sleep(0.05)
    out, err = proc.communicate() if proc.poll() is not None else ("", "")
    pytest.fail(f"training did not reach step {step} while running (exit {proc.returncode}): {err[-2000:]}")


def _run_dir(config: Path) -> Path:
    cfg = load_pipeline(config)
    fingerprint = next((Path(cfg.harvest.cache_root) / "synthetic").iterdir()).name
    return Path(cfg.train.runs_dir) / fingerprint / "sae"


def test_a_run_being_trained_refuses_other_writers_and_a_sigkill_leaves_no_lock(cache_root, tmp_path):
    config = write_config(tmp_path, "100M", 5, cache_root / "cache")  # never finishes: killed below
    run_dir = _run_dir(config)
    first = _pipeline("train", "--config", str(config), "--quiet")
    try:
        _wait_for_step(first, run_dir, 5)  # the checkpoint of step 5 exists: evaluate would otherwise run
        others = {"train": _pipeline("train", "--config", str(config), "--quiet"),
                  "run": _pipeline("run", str(config), "--quiet"),
                  "evaluate": _pipeline("evaluate", str(run_dir), "--quiet", "--no-features", "--contexts", "0")}
        holder = f"pid {first.pid} on {socket.gethostname()}"
        for what, proc in others.items():
            out, err = proc.communicate(timeout=300)
            lines = err.strip().splitlines()
            assert proc.returncode == 2 and len(lines) == 1, (what, proc.returncode, err)
            assert lines[0].startswith(f"error: run {run_dir} is being trained by {holder} since "), (what, err)
            assert "one writer per run" in lines[0]
        assert first.poll() is None  # untouched by the refused ones
        assert not (run_dir / "eval.json").exists()
    finally:
        first.kill()
        first.wait()
    done = max(r["step"] for r in _logged(run_dir))
    resumed = _pipeline("train", "--config", str(config), "--quiet")  # the kernel released the lock: it trains
    try:
        _wait_for_step(resumed, run_dir, done + 2)
    finally:
        resumed.kill()
        resumed.wait()


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoint" / "model.safetensors")


def _interrupt(config: Path, run_dir: Path, signum: int, after: int) -> int:
    """Start `pipeline train`, send ``signum`` once it has logged step ``after``; check the one line and the
    exit status; return the step of the checkpoint it wrote."""
    proc = _pipeline("train", "--config", str(config), "--quiet")
    _wait_for_step(proc, run_dir, after)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    step = torch.load(run_dir / "checkpoint" / "state.pt", weights_only=False)["step"]
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, (proc.returncode, err)
    assert err.strip().splitlines() == [f"train: stopped by {name} at step {step}; checkpoint written for sae in "
                                        f"{run_dir.parent}; run the same command to resume"], err
    assert out == ""
    return step


def test_sigint_and_sigterm_checkpoint_and_the_resume_is_bit_identical(cache_root, tmp_path):
    """Interrupted by SIGINT, resumed, interrupted by SIGTERM, resumed to the end: the weights and metrics of
    an uninterrupted run. Periodic checkpoints are off (checkpoint_every past the end), so the resumes
    start from the signals' checkpoints."""
    config = write_config(tmp_path, "12K", 10_000, cache_root / "cache")  # 47 steps of 256 tokens
    run_dir = _run_dir(config)
    cfg = load_pipeline(config)
    whole_dir = tmp_path / "whole"
    cache = str(Path(cfg.harvest.cache_root) / "synthetic" / run_dir.parent.name)
    (whole,) = train(cfg.train.model_copy(update={"cache": cache, "runs_dir": str(whole_dir)}), progress=False)

    first = _interrupt(config, run_dir, signal.SIGINT, after=3)
    assert 3 <= first < 47
    assert max(r["step"] for r in _logged(run_dir)) == first  # every step it took is logged, none after
    second = _interrupt(config, run_dir, signal.SIGTERM, after=first + 3)
    assert first + 3 <= second < 47
    done = subprocess.run([sys.executable, "-m", "matryoshka.cli", "train", "--config", str(config), "--quiet"],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    w, resumed = _weights(whole), _weights(run_dir)
    assert w.keys() == resumed.keys()
    for k in w:
        assert torch.equal(w[k], resumed[k]), k
    keys = ("step", "loss", "aux", "fvu", "aux_dead")
    assert [[r[k] for k in keys] for r in _logged(run_dir)] == [[r[k] for k in keys] for r in _logged(whole)]
