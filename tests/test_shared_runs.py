"""Run folders on object storage (issue 20): trained, resumed, exported, evaluated, reported and loaded
through a bucket, against the real local S3 server, with the same results as a local run folder."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load as load_safetensors

import matryoshka
from matryoshka.cache import Cache
from matryoshka.config import EvaluateConfig, PipelineConfig, TrainConfig
from matryoshka.evaluate import evaluate
from matryoshka.fixtures import write_cache
from matryoshka.pipeline import run_pipeline
from matryoshka.run_folder import Workspace
from matryoshka.train.trainer import train

pytestmark = pytest.mark.slow  # real training through a real S3 server

RUN = {"name": "sae", "source": "x", "width": 32, "k": 4, "tokens": "6K", "group_sizes": [8, 24],
       "lr": 0.003, "dead_tokens": "1K"}
TRAIN = {"batch_size": 64, "buffer_tokens": 512, "checkpoint_every": 10, "log_every": 5, "device": "cpu"}
RUN_FILES = {"config.json", "metrics.jsonl", "checkpoint/config.json", "checkpoint/model.safetensors",
             "checkpoint/state.pt", "saelens/cfg.json", "saelens/sae_weights.safetensors"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """16 chunks of 4 contexts of 16 tokens, one array ``x`` of width 16, 4 held-out contexts."""
    rng = np.random.default_rng(0)
    n = 16 * 4 * 16
    parents = rng.standard_normal((8, 16)).astype(np.float32)
    x = parents[rng.integers(0, 8, n)] * rng.random((n, 1)).astype(np.float32) + 0.1 * rng.standard_normal((n, 16))
    return write_cache(tmp_path_factory.mktemp("c") / "cache", {"x": x.astype(np.float32)}, rng.integers(4, 50, n),
                       16, 4, heldout_seqs=4, fingerprint="5ha7ed0000run001")


def _cfg(cache: Path, runs_dir: str | Path) -> TrainConfig:
    return TrainConfig(cache=str(cache), runs=[RUN], runs_dir=str(runs_dir), **TRAIN)


def _objects(url: str) -> dict[str, bytes]:
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return {p[len(root) + 1:]: fs.cat_file(p) for p in fs.find(root)}


def _logged(lines: str) -> list[tuple[int, float]]:
    return [(x["step"], x["loss"]) for x in map(json.loads, lines.splitlines())]


def _pipeline(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "matryoshka.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


@pytest.fixture(scope="module")
def local_run(cache, tmp_path_factory) -> Path:
    """The run trained into a local folder, uninterrupted: what the bucket's must equal."""
    (run,) = train(_cfg(cache, tmp_path_factory.mktemp("local")), progress=False)
    return run


@pytest.fixture(scope="module")
def bucket_runs(s3_server, cache, local_run, tmp_path_factory) -> str:
    """The run trained into a bucket through `pipeline train`, SIGKILLed after a checkpoint, left as a kill in
    the middle of a checkpoint swap would leave it, then resumed to the end: the runs folder's URL."""
    from helpers import new_bucket

    runs = f"{new_bucket('s3')}/team/runs"
    tmp = tmp_path_factory.mktemp("shared")
    config = tmp / "train.yaml"
    config.write_text(yaml.safe_dump({"train": {"runs": [RUN], **TRAIN}}))
    args = [sys.executable, "-m", "matryoshka.cli", "train", "--cache", str(cache), "--config", str(config),
            "--runs-dir", runs, "--quiet"]
    scratch = tmp / "scratch"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run = f"{runs}/{Cache(cache).fingerprint}/sae"
    fs, root = fsspec.core.url_to_fs(run)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        fs.invalidate_cache()
        try:
            if json.loads(fs.cat_file(f"{root}/checkpoint/config.json"))["step"] >= 20:
                break
        except FileNotFoundError:  # none yet, or between two of a swap's steps
            pass
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # a kill between deleting checkpoint/config.json and the new one landing: checkpoint.old/ is the whole one
    for name in ("model.safetensors", "state.pt", "config.json"):
        fs.copy(f"{root}/checkpoint/{name}", f"{root}/checkpoint.old/{name}")
    fs.rm_file(f"{root}/checkpoint/config.json")
    fs.pipe_file(f"{root}/checkpoint/model.safetensors", b"half a file")
    fs.pipe_file(f"{root}/checkpoint.tmp/model.safetensors", b"half a file")
    fs.pipe_file(f"{root}/metrics.jsonl", fs.cat_file(f"{root}/metrics.jsonl") + b'{"step": ')
    left = set(scratch.iterdir())  # the killed process's local copy stays: a kill runs no clean-up
    refused = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"error: run {run} has a stale writer lock of pid {proc.pid} on {os.uname().nodename} "
        f"(lock {json.loads(fs.cat_file(f'{root}/.writer.lock'))['id'][:8]}): that process no longer runs on this "
        "host, so the writer died; pass --break-lock to take the lock over"]
    done = subprocess.run([*args, "--break-lock"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == run  # train prints where the team finds each run
    assert set(scratch.iterdir()) == left  # the finished command removed its local copy
    return runs


def test_a_run_trained_into_a_bucket_through_a_kill_equals_one_trained_locally(bucket_runs, local_run, cache):
    run = f"{bucket_runs}/{Cache(cache).fingerprint}/sae"
    objects = _objects(run)
    assert set(objects) == RUN_FILES  # the local layout, no lock, no checkpoint.old/ or .tmp/ left
    want = {p.relative_to(local_run).as_posix(): p.read_bytes() for p in local_run.rglob("*") if p.is_file()}
    for key in ("checkpoint/model.safetensors", "saelens/sae_weights.safetensors"):
        a, b = load_safetensors(objects[key]), load_safetensors(want[key])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), key
    assert _logged(objects["metrics.jsonl"].decode()) == _logged(want["metrics.jsonl"].decode())
    loaded, here = matryoshka.load(run), matryoshka.load(local_run)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), here.state_dict().values()))
    assert loaded.config["step"] == here.config["step"] == 94
    assert not Path("s3:").exists()


def test_a_run_on_a_bucket_has_one_writer(bucket_runs, cache):
    run = f"{bucket_runs}/{Cache(cache).fingerprint}/sae"
    with Workspace() as space, space.run(run).lock("trained"):
        for args in (["train", "--cache", str(cache), "--runs-dir", bucket_runs, "--config", "t.yaml"],
                     ["evaluate", run, "--no-lm"]):
            Path("t.yaml").write_text(yaml.safe_dump({"train": {"runs": [{**RUN, "tokens": "12K"}], **TRAIN}}))
            done = _pipeline(*args)
            assert done.returncode == 2, done.stderr
            (line,) = done.stderr.strip().splitlines()
            assert re.fullmatch(f"error: run {run} is being trained by pid {os.getpid()} on {os.uname().nodename} "
                                r"\(lock \w{8}\), last heartbeat \d+s ago; wait for it to finish "
                                r"\(one writer per run\)", line), line


def test_a_teammate_evaluates_runs_on_the_bucket_into_a_folder_of_their_own(bucket_runs, cache, tmp_path):
    """Read-only: the run folder is not locked (its owner may be training it) and not written."""
    fingerprint = Cache(cache).fingerprint
    run = f"{bucket_runs}/{fingerprint}/sae"
    before = _objects(bucket_runs)
    with Workspace() as space, space.run(run).lock("trained"):  # its owner is at work on it
        (result,) = evaluate(EvaluateConfig(cache=str(cache), runs_dir=bucket_runs, results_dir=str(tmp_path / "mine"),
                                            lm=False, feature_tokens=256, contexts=2))
    assert _objects(bucket_runs) == before
    mine = tmp_path / "mine" / fingerprint
    written = json.loads((mine / "sae" / "eval.json").read_text())
    assert written == {k: v for k, v in result.items() if k != "report"} and written["path"] == run
    assert sorted(p.name for p in (mine / "sae").iterdir()) == [".writer.lock", "eval.json", "eval.npz",
                                                               "metrics.jsonl"]
    assert result["report"] == str(mine / "report.md") and "## Training curves" in (mine / "report.md").read_text()


def test_evaluating_into_the_bucket_equals_evaluating_a_local_copy(bucket_runs, local_run, cache, tmp_path):
    fingerprint = Cache(cache).fingerprint
    settings = dict(cache=str(cache), lm=False, feature_tokens=256, contexts=2)
    (shared,) = evaluate(EvaluateConfig(runs_dir=bucket_runs, **settings))
    (here,) = evaluate(EvaluateConfig(runs_dir=str(local_run.parent.parent), **settings))
    drop = ("path", "report", "config")
    assert {k: v for k, v in shared.items() if k not in drop} == {k: v for k, v in here.items() if k not in drop}
    objects = _objects(f"{bucket_runs}/{fingerprint}")
    assert {"sae/eval.json", "sae/eval.npz", "report.md"} <= set(objects)
    assert {k for k in objects if k.startswith("report/")} == {f"report/{p.name}" for p in
                                                             (local_run.parent / "report").iterdir()}
    assert shared["report"] == f"{bucket_runs}/{fingerprint}/report.md"
    assert json.loads(objects["sae/eval.json"])["fvu"] == shared["fvu"]


def test_pipeline_run_with_runs_on_a_bucket_does_nothing_the_second_time(bucket_runs, cache, tmp_path):
    cfg = PipelineConfig.model_validate({"harvest": None, "train": {"cache": str(cache), "runs": [RUN],
                                                                    "runs_dir": bucket_runs, **TRAIN},
                                         "evaluate": {"lm": False, "feature_tokens": 256}})
    said: list[str] = []
    run_pipeline(cfg, progress=False, echo=said.append)
    before = _objects(bucket_runs)
    said.clear()
    out = run_pipeline(cfg, progress=False, echo=said.append)
    assert said[1:] == ["train: all 1 runs are finished", "evaluate: all 1 runs are evaluated"]
    assert _objects(bucket_runs) == before and out.results[0]["run"] == "sae"


def test_a_saelens_export_on_a_bucket_evaluates_as_its_local_copy(bucket_runs, local_run, cache, tmp_path):
    run = f"{bucket_runs}/{Cache(cache).fingerprint}/sae"
    settings = dict(cache=str(cache), lm=False, features=False, contexts=0, report=False)
    (shared,) = evaluate(EvaluateConfig(sae=[f"{run}/saelens"], runs_dir=str(tmp_path / "a"), **settings))
    (here,) = evaluate(EvaluateConfig(sae=[str(local_run / "saelens")], runs_dir=str(tmp_path / "b"), **settings))
    assert shared["run"] == here["run"] == "sae-saelens" and shared["fvu"] == here["fvu"]
    assert shared["config"]["sae"] == f"{run}/saelens"


def test_a_missing_bucket_or_run_is_one_line(s3_server, cache, tmp_path):
    Path("t.yaml").write_text(yaml.safe_dump({"train": {"runs": [RUN], **TRAIN}}))
    done = _pipeline("train", "--cache", str(cache), "--runs-dir", "s3://no-such-bucket-here/runs",
                     "--config", "t.yaml")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: run: cannot write to 's3://no-such-bucket-here/runs/5ha7ed0000run001/sae': bucket "
        "'no-such-bucket-here' does not exist"]
    from helpers import new_bucket

    empty = new_bucket("s3")
    with pytest.raises(FileNotFoundError, match=f"load: '{empty}/runs/x' holds no trained run"):
        matryoshka.load(f"{empty}/runs/x")
    done = _pipeline("evaluate", f"{empty}/runs/x", "--no-lm")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: evaluate: '{empty}/runs/x' is not a trained run (no checkpoint/model.safetensors)"]


def test_a_run_trained_into_google_cloud_storage_equals_one_trained_locally(gs_server, cache, local_run):
    from helpers import new_bucket

    runs = f"{new_bucket('gs')}/runs"
    (run,) = train(_cfg(cache, runs), progress=False)
    assert set(_objects(run)) == RUN_FILES
    loaded, here = matryoshka.load(run), matryoshka.load(local_run)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), here.state_dict().values()))


@pytest.fixture(scope="module")
def team_s3():
    """A third S3 server (moto) that checks IAM policies, with bucket ``team`` and two accounts: Bob may do
    anything, Carol may only read. Returns the endpoint and each account's environment."""
    import boto3

    from helpers import moto_server

    with moto_server(unauthenticated=7) as endpoint:  # the set-up below
        setup = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
        boto3.client("s3", **setup).create_bucket(Bucket="team")
        iam, env = boto3.client("iam", **setup), {}
        for user, actions in (("bob", ["s3:*"]), ("carol", ["s3:Get*", "s3:List*", "s3:Head*"])):
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            env[user] = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                         "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        yield env


def test_a_teammate_who_may_only_read_the_bucket_is_told_to_evaluate_into_a_folder_of_their_own(
        team_s3, monkeypatch):
    """Carol's credentials may read the bucket, not write it: taking a run's lock to evaluate it in place is
    refused in one line naming --results-dir (it once said another writer was taking the lock); Bob's works.
    In process: moto's signature check rejects s3fs's listings under IAM, so the commands cannot run there."""
    import s3fs

    from matryoshka.cache import CacheError

    for user in ("carol", "bob"):
        for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.setenv(key, team_s3[user][key])
        s3fs.S3FileSystem.clear_instance_cache()  # a filesystem made with other credentials is cached
        with Workspace() as space:
            run = space.run("s3://team/runs/5ha7ed0000run001/sae")
            if user == "carol":
                with pytest.raises(CacheError) as refused, run.lock("evaluated"):
                    pass
                assert str(refused.value) == (
                    "run s3://team/runs/5ha7ed0000run001/sae: cannot write its lock, permission denied "
                    "(PermissionError: Access Denied); to evaluate runs you cannot write, give --results-dir DIR")
            else:
                with run.lock("evaluated"):
                    assert run.read_json(".writer.lock")["doing"] == "evaluated"
                assert run.read_json(".writer.lock") is None  # released: the lock object is gone
    s3fs.S3FileSystem.clear_instance_cache()
