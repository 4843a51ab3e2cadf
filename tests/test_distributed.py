"""Scale-out on one machine, for real: harvests split over 2 processes (torchrun, and two ``--shard``
processes) equal a single-process harvest; 2-rank data-parallel training (gloo) equals one process
reading the same 2 rank streams, and resumes across ranks."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from matryoshka.cache import Cache, CacheError
from matryoshka.cache.inspect import describe
from matryoshka.cache.lock import WriterLock
from matryoshka.config import ConfigError, HarvestConfig, TrainConfig
from matryoshka.fixtures import write_cache
from matryoshka.harvest import harvest
from matryoshka.train.trainer import train

pytestmark = pytest.mark.slow  # torchrun and shard processes, each loading torch

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(Path(__file__).parents[1])}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _cli(*args: str, launcher: list[str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + ["-m", "matryoshka.cli", *args]
    storage = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}  # set by s3_server after ENV was made
    out = subprocess.run(cmd, env={**ENV, **storage}, capture_output=True, text=True, check=False)
    if check and out.returncode:
        said = "\n".join(ln for ln in out.stderr.splitlines() if ln.startswith("error"))  # each rank's one line
        raise AssertionError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}\n{said}")
    return out


# -- harvest ------------------------------------------------------------------------------------------
def _harvest_args(model: Path, corpus: Path, cache: Path, *extra: str) -> list[str]:
    # 48 sequences, 4 per chunk (12 chunks), 6 per LM batch: shards are cut on 12-sequence (3-chunk) units.
    return ["harvest", "--model", str(model), "--dataset", str(corpus), "--sites", "0.resid_mid,1.mlp_out",
            "--tokens", str(32 * 48), "--context-size", "32", "--batch-size", "6",
            "--chunk-mb", str(4 * 32 * 64 * 2 / 2**20),
            "--holdout", "128", "--cache", str(cache), "--quiet", *extra]


def _files(root: Path) -> dict[str, bytes]:
    """Every chunk and array metadata file (group attributes and shard records are compared apart)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] in ("acts", "tokens")}


def _attrs(root: Path) -> dict:
    return json.loads((root / "zarr.json").read_text())["attributes"]


def _harvest_config(model: Path, corpus: Path, cache: Path, **kw) -> HarvestConfig:
    """The config of :func:`_harvest_args`, for runs in this process."""
    return HarvestConfig(model=str(model), dataset=str(corpus), sites="0.resid_mid,1.mlp_out", tokens=32 * 48,
                         context_size=32, batch_size=6, chunk_mb=4 * 32 * 64 * 2 / 2**20, holdout=128,
                         cache=str(cache), **kw)


@pytest.fixture(scope="module")
def single(gpt2_dir, corpus, tmp_path_factory) -> Path:
    """The single-process harvest every sharded one must equal (run here: its bytes do not depend on threads)."""
    return harvest(_harvest_config(gpt2_dir, corpus, tmp_path_factory.mktemp("single") / "cache"), progress=False)


def _assert_same_cache(single: Path, sharded: Path) -> None:
    fa, fb = _files(single), _files(sharded)
    assert fa.keys() == fb.keys() and len(fa) == 4 + 3 * 12  # 12 chunks of 2 arrays and tokens, 4 metadata files
    assert [k for k in fa if fa[k] != fb[k]] == []  # byte-identical chunks: same tokens, order, activations
    a, b = _attrs(single), _attrs(sharded)
    assert a["manifest"] == b["manifest"] and b["complete"] is True  # same config, fingerprint, held-out split
    assert a["progress"]["chunks"] == b["progress"]["chunks"] == 12
    for name, s in a["stats"].items():  # float64 sums added per shard: equal up to float64 rounding
        t = b["stats"][name]
        assert s["count"] == t["count"]
        np.testing.assert_allclose(t["mean"], s["mean"], rtol=1e-12, atol=1e-15)
        assert t["mean_sq_norm"] == pytest.approx(s["mean_sq_norm"], rel=1e-12)
    ca, cb = Cache(single), Cache(sharded)
    np.testing.assert_array_equal(ca.tokens[:], cb.tokens[:])
    assert ca.split == cb.split == {"heldout": [0, 128], "train": [128, 1536]}


def test_torchrun_harvest_equals_single_process(single, gpt2_dir, corpus, tmp_path):
    _cli(*_harvest_args(gpt2_dir, corpus, tmp_path / "c"), launcher=TORCHRUN)
    _assert_same_cache(single, tmp_path / "c")
    info = _cli("cache", "info", str(tmp_path / "c")).stdout
    assert "shard 0/2    chunks 0..5: done" in info and "shard 1/2    chunks 6..11: done" in info


def test_shard_processes_equal_single_process_and_the_last_completes(single, gpt2_dir, corpus, tmp_path):
    path = tmp_path / "c"
    _cli(*_harvest_args(gpt2_dir, corpus, path, "--shard", "1/2"))
    assert not Cache(path).complete  # shard 0 has not run: readers see an unfinished cache
    assert describe(Cache(path))["status"] == "2 shards, unfinished"  # as `cache ls` shows it
    info = _cli("cache", "info", str(path)).stdout
    assert "shard 0/2    chunks 0..5: 0 of 6 chunks committed" in info and "chunks 6..11: done" in info
    with pytest.raises(CacheError, match="is being harvested in shards; continue it with --shard"):
        harvest(_harvest_config(gpt2_dir, corpus, path, resume=True), progress=False)
    with pytest.raises(CacheError, match="is being harvested in 2 shards, not 3"):
        harvest(_harvest_config(gpt2_dir, corpus, path, shard="0/3"), progress=False)
    with pytest.raises(ConfigError, match="shard: '2/2' is not I/N with 0 <= I < N"):
        _harvest_config(gpt2_dir, corpus, path, shard="2/2")
    _cli(*_harvest_args(gpt2_dir, corpus, path, "--shard", "0/2"))  # the last shard to finish completes it
    _assert_same_cache(single, path)
    with WriterLock(path / "shards" / "1"):  # a shard's writer (say, a resume) holds its own lock
        out = _cli("cache", "rm", str(path), "--yes", check=False)
        assert out.returncode == 2 and f"cache {path / 'shards' / '1'} is being written by pid" in out.stderr
    assert Cache(path).complete
    _cli("cache", "rm", str(path), "--yes")
    assert not path.exists()


# -- data-parallel training ---------------------------------------------------------------------------
RUNS = [  # 60 steps of 256 tokens; a latent dies (dead_tokens) so the aux loss and the dead counters take part
    {"name": "sae", "source": "src", "width": 128, "k": 4, "lr": 0.003, "tokens": 60 * 256,
     "group_sizes": [16, 32, 80], "dead_tokens": 2000, "warmup_steps": 5},
    {"name": "tc", "source": "src", "target": "tgt", "arch": "batchtopk", "width": 64, "k": 4, "lr": 0.003,
     "tokens": 60 * 256, "skip": True, "dead_tokens": 2000},
]
TRAIN = {"batch_size": 256, "buffer_tokens": 2048, "checkpoint_every": 10, "log_every": 5}
TOLERANCE = 1e-5
"""Largest weight difference allowed between 2 ranks and 1 process on the same global batches (weights are
O(0.1..1); measured ~1.5e-7 after 60 steps: the all-reduce adds in another order)."""


@pytest.fixture(scope="module")
def train_cache(tmp_path_factory) -> Path:
    """16K synthetic rows (sparse features in 32 dims, and a nonlinear target), 32 chunks of 512."""
    rng = np.random.default_rng(0)
    n, d, m = 16384, 32, 96
    codes = (rng.random((n, m)) < 0.04) * rng.random((n, m)) * 3
    src = (codes @ rng.standard_normal((m, d)) + 0.05 * rng.standard_normal((n, d))).astype(np.float32)
    tgt = np.tanh(src @ rng.standard_normal((d, d)) / 4).astype(np.float32)
    tokens = rng.integers(4, 300, n)
    tokens[::32] = 0
    return write_cache(tmp_path_factory.mktemp("train") / "cache", {"src": src, "tgt": tgt}, tokens, 32, 16,
                       heldout_seqs=16)


def _train_args(cache: Path, runs_dir: Path, config: Path) -> list[str]:
    return ["train", "--config", str(config), "--cache", str(cache), "--runs-dir", str(runs_dir), "--quiet"]


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "pipeline.yaml"
    path.write_text(json.dumps({"train": {**TRAIN, "runs": RUNS}}))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def two_ranks(train_cache, config, tmp_path_factory) -> Path:
    """An uninterrupted 2-process (gloo) training; returns the runs' folder."""
    runs = tmp_path_factory.mktemp("two") / "runs"
    _cli(*_train_args(train_cache, runs, config), launcher=TORCHRUN)
    return runs / Cache(train_cache).fingerprint


def _weights(run_dir: Path) -> dict:
    return load_file(run_dir / "checkpoint" / "model.safetensors")


def _assert_close(a: Path, b: Path, atol: float) -> None:
    for name in ("sae", "tc"):
        wa, wb = _weights(a / name), _weights(b / name)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=atol, msg=f"{name}.{k}")


def test_two_ranks_equal_one_process_at_the_same_global_batch(two_ranks, train_cache, tmp_path):
    one = TrainConfig(cache=str(train_cache), runs=[dict(r) for r in RUNS], runs_dir=str(tmp_path), data_ranks=2,
                      **TRAIN)
    (sae, _) = train(one, progress=False)  # one process reading both rank streams: the same global batches
    _assert_close(sae.parent, two_ranks, TOLERANCE)
    for name in ("sae", "tc"):
        mine = [json.loads(x) for x in (sae.parent / name / "metrics.jsonl").read_text().splitlines()]
        theirs = [json.loads(x) for x in (two_ranks / name / "metrics.jsonl").read_text().splitlines()]
        assert len(theirs) == len(mine) == 12  # rank 0 alone writes metrics
        for x, y in zip(mine, theirs):  # metrics are means over the global batch
            assert (y["step"], y["l0"], y["aux_dead"]) == (x["step"], x["l0"], x["aux_dead"])
            assert y["fvu"] == pytest.approx(x["fvu"], rel=1e-4)
        if name == "sae":
            assert max(x["aux_dead"] for x in mine) > 0  # the dead-latent path ran (counted over both ranks' tokens)
    state = torch.load(two_ranks / "sae" / "checkpoint" / "state.pt", weights_only=False)
    assert [(c["rank"], c["world_size"]) for c in state["cursor"]] == [(0, 2), (1, 2)]  # each rank's cursor


def _kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its ranks, and wait until the ranks are gone. torchrun starts each rank in a
    session of its own, so killing torchrun's process group leaves them training on (holding their run
    folders' locks: a resume would be refused, rightly)."""
    ranks = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    assert len(ranks) == 2, ranks
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in ranks:  # each rank leads a process group: anything it started goes with it (no fd of its lock left)
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 60
    for pid in ranks:  # orphans now: reaped by init, or left as zombies, which hold no files
        while time.monotonic() < deadline:
            try:
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            except OSError:
                break
            time.sleep(0.05)


def _wait_unlocked(locks: list[Path], timeout: float = 60.0) -> None:
    """Wait until no process holds these run locks (``flock``): the kernel drops a killed rank's lock when its
    files are closed, which under load can come after the test moves on."""
    import fcntl

    deadline = time.monotonic() + timeout
    for path in locks:
        fd = os.open(path, os.O_RDONLY)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        break  # the resume below then says who holds it
                    time.sleep(0.05)
        finally:
            os.close(fd)


def test_killed_two_rank_training_resumes_across_ranks(two_ranks, train_cache, config, tmp_path):
    killed = tmp_path / "killed"
    cmd = TORCHRUN + ["-m", "matryoshka.cli", *_train_args(train_cache, killed, config)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = killed / Cache(train_cache).fingerprint / "tc" / "checkpoint" / "state.pt"
    deadline = time.monotonic() + 300
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed"
    _kill_job(proc)
    _wait_unlocked([killed / Cache(train_cache).fingerprint / r["name"] / ".writer.lock" for r in RUNS])
    step = torch.load(state, weights_only=False)["step"]
    assert 0 < step < 60
    runs = killed / Cache(train_cache).fingerprint
    with pytest.raises(ConfigError, match="holds reader cursors of 2 data ranks, this job has 1"):
        train(TrainConfig(cache=str(train_cache), runs=[dict(r) for r in RUNS], runs_dir=str(killed), **TRAIN),
              progress=False)
    copy = tmp_path / "copy"
    shutil.copytree(killed, copy)

    _cli(*_train_args(train_cache, killed, config), launcher=TORCHRUN)  # 2 ranks resume 2 ranks' checkpoint
    _assert_close(two_ranks, runs, 0.0)  # exactly the uninterrupted 2-rank run

    train(TrainConfig(cache=str(train_cache), runs=[dict(r) for r in RUNS], runs_dir=str(copy), data_ranks=2,
                      **TRAIN), progress=False)  # one process resumes it, reading both ranks' streams
    _assert_close(two_ranks, copy / Cache(train_cache).fingerprint, TOLERANCE)


def test_two_ranks_train_into_a_bucket_as_into_a_folder(two_ranks, train_cache, config, s3_server):
    """Runs on object storage under torchrun: rank 0 publishes, the other rank only reads; the same run."""
    import fsspec
    from safetensors.torch import load as load_safetensors

    from helpers import new_bucket

    runs = f"{new_bucket('s3')}/runs"
    _cli(*_train_args(train_cache, runs, config), launcher=TORCHRUN)
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    for name in ("sae", "tc"):
        run = f"{runs}/{Cache(train_cache).fingerprint}/{name}"
        got = load_safetensors(fs.cat_file(f"{run}/checkpoint/model.safetensors"))
        want = _weights(two_ranks / name)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), name
