"""Team sharing (issue 20): files teammates can read, storage errors that say what they are, and reads
that say what a local copy served, against the real local S3 server and the local file system."""
from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from matryoshka.cache import Cache
from matryoshka.cache.copy import copy_cache
from matryoshka.fixtures import write_cache
from test_errors import run_bad

CTX, SEQS = 16, 2


def _small_cache(path: Path) -> Path:
    """8 chunks of 2 contexts of 16 tokens, one array ``x`` of width 8, 2 held-out contexts."""
    rng = np.random.default_rng(0)
    n = 8 * SEQS * CTX
    return write_cache(path, {"x": rng.standard_normal((n, 8)).astype(np.float32)}, rng.integers(4, 50, n),
                       CTX, SEQS, heldout_seqs=2, fingerprint="5ha7edcafe000001")


@pytest.fixture
def bucket_cache(s3_bucket, tmp_path) -> str:
    """The small cache, copied to a fresh bucket: its URL."""
    return str(copy_cache(_small_cache(tmp_path / "src"), s3_bucket, progress=False))


def _pipeline(*args: str, umask: int | None = None, **kw) -> subprocess.CompletedProcess:
    """`pipeline ARGS` in a subprocess of its own (this worktree's code), optionally under ``umask``."""
    return subprocess.run([sys.executable, "-m", "matryoshka.cli", *args], capture_output=True, text=True,
                          check=False, timeout=300, **kw,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def _train_args(url: str, keep: Path, runs: Path, tmp: Path) -> list[str]:
    cfg = tmp / "train.yaml"
    cfg.write_text(json.dumps({"train": {"runs": [{"name": "sae", "source": "x", "width": 16, "k": 2,
                                                   "tokens": "512"}]}}))
    return ["train", "--cache", url, "--config", str(cfg), "--local-cache-dir", str(keep), "--runs-dir", str(runs),
            "--batch-size", "32", "--buffer-tokens", "512", "--device", "cpu"]


def _files(*roots: Path) -> list[Path]:
    return [p for r in roots for p in r.rglob("*") if p.is_file()]


# -- item 2: files teammates can read ------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_written_file_gets_the_umask_mode(bucket_cache, tmp_path, umask):
    """`cache copy` to a folder, the chunks kept under local_cache_dir (the 7 training chunks), and a run's
    checkpoint and export:
    each file has the mode open() gives a new file under the user's umask (mkstemp and safetensors alone
    would leave them 0600, readable by their writer only)."""
    copied, keep, runs = tmp_path / "copied", tmp_path / "keep", tmp_path / "runs"
    r = _pipeline("cache", "copy", bucket_cache, str(copied), umask=umask)
    assert r.returncode == 0, r.stderr
    r = _pipeline(*_train_args(bucket_cache, keep, runs, tmp_path), umask=umask)
    assert r.returncode == 0, r.stderr
    files = _files(copied, keep, runs)
    assert any(p.name == "model.safetensors" for p in files) and any(p.suffix == ".safetensors" and
                                                                     "saelens" in p.parts for p in files)
    assert len(_files(keep)) == 7 and len(_files(copied)) > 16
    want = 0o666 & ~umask
    wrong = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files if stat.S_IMODE(p.stat().st_mode) != want}
    assert not wrong, f"not {oct(want)}: {wrong}"


def _other_user() -> str:
    """A second user who can read what the umask lets others read (root can act as ``nobody``)."""
    if os.geteuid() != 0:
        pytest.skip("a second user needs root on this machine (to run a command as another user)")
    try:
        import pwd

        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("this machine has no user 'nobody' to act as a teammate")
    return "nobody"


@pytest.mark.slow
def test_a_second_user_reads_the_copies_and_the_weights(bucket_cache):
    """A teammate (another uid) reads every file of a `cache copy`, the local chunk copies and the run's
    weights when the writer's umask is 022 (plain `cat` as that user: its Python may not be readable)."""
    other = _other_user()
    shared = Path(tempfile.mkdtemp(prefix="matryoshka-shared-", dir="/tmp"))  # pytest's tmp is 0700
    try:
        shared.chmod(0o755)
        r = _pipeline("cache", "copy", bucket_cache, str(shared / "copied"), umask=0o022)
        assert r.returncode == 0, r.stderr
        r = _pipeline(*_train_args(bucket_cache, shared / "keep", shared / "runs", shared), umask=0o022)
        assert r.returncode == 0, r.stderr
        files = _files(shared / "copied", shared / "keep", shared / "runs")
        assert any(p.name == "model.safetensors" for p in files)
        for p in files:
            got = subprocess.run(["cat", str(p)], user=other, capture_output=True, check=False)
            assert got.returncode == 0 and got.stdout == p.read_bytes(), (p, got.stderr)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.slow
def test_a_file_a_teammate_cannot_read_is_named_as_a_permission_problem(bucket_cache, tmp_path):
    """A kept chunk that this user may not read (a teammate's, written owner-only) stops training with one
    line naming the file and saying it is a permission problem, not the hint to verify the cache. The
    kernel really refuses the read: the files belong to another uid, and the command runs without root's
    capability to bypass file permissions (setpriv)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as a user who may not read another's files")
    keep = tmp_path / "keep"
    r = _pipeline(*_train_args(bucket_cache, keep, tmp_path / "runs", tmp_path), umask=0o077)
    assert r.returncode == 0, r.stderr
    kept = _files(keep)
    assert kept and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in kept)  # as that umask says
    for p in kept:
        os.chown(p, 65534, 65534)  # a teammate's files now
    drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
            "-dac_override,-dac_read_search", sys.executable, "-m", "matryoshka.cli"]
    got = subprocess.run([*drop, *_train_args(bucket_cache, keep, tmp_path / "mine", tmp_path)], capture_output=True,
                         text=True, timeout=300, check=False)
    lines = [ln for ln in got.stderr.splitlines() if ln.strip() and not ln.startswith(("sae:", "local copy:"))]
    assert got.returncode == 2 and len(lines) == 1, got.stderr
    assert lines[0].startswith("error: ") and "permission denied" in lines[0], lines[0]
    assert str(keep) in lines[0] and "a permission problem" in lines[0] and "verify" not in lines[0], lines[0]


# -- item 3: storage errors that do not hide ------------------------------------------------------------
def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def auth_s3():
    """A second real S3 server (moto) that checks credentials: its first request (creating bucket ``team``)
    is let through, every later one must be signed by a key it knows, and it knows none."""
    import boto3

    from helpers import moto_server

    with moto_server(unauthenticated=1) as endpoint:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="any",
                     aws_secret_access_key="any").create_bucket(Bucket="team")
        yield endpoint


@pytest.mark.slow
def test_cache_ls_of_a_missing_bucket_or_with_wrong_credentials_is_one_line(s3_server, auth_s3):
    """Both used to print "no caches under ..." and exit 0; each is now one line saying which it is."""
    run_bad(["cache", "ls", "s3://no-such-bucket-h20"], "cache ls:", "bucket 'no-such-bucket-h20' does not exist")
    r = _pipeline("cache", "ls", "s3://team", env={**os.environ, "AWS_ENDPOINT_URL": auth_s3,
                                                    "AWS_ACCESS_KEY_ID": "wrong", "AWS_SECRET_ACCESS_KEY": "wrong"})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and not r.stdout, (r.stdout, r.stderr)
    assert lines[0].startswith("error: cache ls: 's3://team': access to bucket 'team' was denied"), lines[0]
    assert "credentials" in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["info", "verify", "train"])
def test_a_wrong_endpoint_is_one_line_and_nothing_after_it(bucket_cache, tmp_path, command):
    """No "Exception ignored in: <coroutine ...>" tracebacks from requests abandoned at exit."""
    args = (_train_args(bucket_cache, tmp_path / "keep", tmp_path / "runs", tmp_path) if command == "train"
            else ["cache", command, bucket_cache])
    r = _pipeline(*args, env={**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}",
                              "MATRYOSHKA_STORE_RETRY_S": "1"})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("error: ") and "Could not connect" in lines[0], lines[0]


@pytest.mark.slow
def test_a_cache_deleted_while_read_is_reported_as_deleted(bucket_cache, tmp_path):
    """Opened, then removed by a teammate (`cache rm`): reading a chunk says the cache was deleted, not
    that a chunk is unreadable with a hint to verify."""
    from matryoshka.cache import CacheError
    from matryoshka.cache.location import Location
    from matryoshka.cache.reader import ReaderConfig, ShuffledReader

    for where in (bucket_cache, str(_small_cache(tmp_path / "local"))):
        with ShuffledReader(["x"], Cache(where), ReaderConfig(batch_size=16, buffer_tokens=64)) as reader:
            batches = iter(reader)  # blocks of one chunk: the rest are read after the first batch
            next(batches)
            Location.of(where).remove()
            with pytest.raises(CacheError, match="was deleted while being read") as e:
                for _ in range(8 * SEQS * CTX // 16):
                    next(batches)
        assert "verify" not in str(e.value)


@pytest.mark.slow
def test_a_lock_held_by_a_dead_pid_on_this_host_is_stale_at_once(s3_bucket):
    """A killed harvest's lock object (fresh heartbeat, its pid gone from this host): refused as stale (not
    "wait for it to finish"), and --break-lock takes it over at once."""
    import fsspec

    from matryoshka.cache.lock import LOCK_NAME, CacheLockedError, ObjectLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    url = f"{s3_bucket}/c"
    body = {"host": socket.gethostname(), "pid": dead.pid, "id": "0" * 32, "since": 0, "doing": "harvested"}
    fs = fsspec.core.url_to_fs(url)[0]
    import time

    fs.pipe_file(f"{url.split('://')[1]}/{LOCK_NAME}", json.dumps({**body, "heartbeat": time.time()}).encode())
    with pytest.raises(CacheLockedError, match="no longer runs on this host.*--break-lock"):
        ObjectLock(url).acquire()
    lock = ObjectLock(url, break_lock=True).acquire()
    lock.release()
    fs.pipe_file(f"{url.split('://')[1]}/{LOCK_NAME}",  # a live pid here, or any pid elsewhere: still live
                 json.dumps({**body, "pid": os.getpid(), "heartbeat": time.time()}).encode())
    with pytest.raises(CacheLockedError, match="wait for it to finish"):
        ObjectLock(url, break_lock=True).acquire()
    fs.pipe_file(f"{url.split('://')[1]}/{LOCK_NAME}",
                 json.dumps({**body, "host": "another-host", "heartbeat": time.time()}).encode())
    with pytest.raises(CacheLockedError, match="wait for it to finish"):
        ObjectLock(url, break_lock=True).acquire()


# -- item 4: visible and portable -----------------------------------------------------------------------
@pytest.mark.slow
def test_a_read_says_what_the_local_copy_served(bucket_cache, tmp_path, capsys):
    """One line at the start (how much of the cache is local already) and one at the end (how many chunks
    came from the store): the first training fills the copy, the second reads nothing from the store."""
    from matryoshka.config import TrainConfig
    from matryoshka.train.trainer import train

    def once(runs: str) -> list[str]:
        train(TrainConfig(cache=bucket_cache, runs=[{"name": "sae", "source": "x", "width": 16, "k": 2,
                                                     "tokens": "512"}], runs_dir=str(tmp_path / runs),
                          local_cache_dir=str(tmp_path / "keep"), batch_size=32, buffer_tokens=512, device="cpu"),
              progress=False)
        return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("local copy:")]

    first = once("a")
    assert len(first) == 2 and first[0].startswith("local copy: 0 of 8 chunks (0%) of " + bucket_cache), first
    assert first[1].startswith("local copy: 7 chunk(s) came from the store, "), first
    second = once("b")
    assert second[0].startswith("local copy: 7 of 8 chunks (88%) of "), second
    assert second[1].startswith("local copy: 0 chunk(s) came from the store, "), second


@pytest.mark.slow
def test_a_cache_of_a_local_model_names_its_hub_id_and_evaluates_with_a_teammates_copy(
        s3_bucket, gpt2_dir, gemma2_dir, corpus, tmp_path):
    """Harvested to the bucket from a local directory saved from a Hub model: the cache records the Hub id;
    on a machine without that directory, evaluation names it and `--model` a local copy, which is used when
    it is the same model (architecture, widths, weights hash) and refused in one line when not."""
    from helpers import harvest_config
    from matryoshka.cache import CacheError
    from matryoshka.config import ConfigError
    from matryoshka.evaluate.splice import LM
    from matryoshka.harvest import harvest

    alice = tmp_path / "alice" / "gpt2"
    shutil.copytree(gpt2_dir, alice)
    cfg = json.loads((alice / "config.json").read_text())
    (alice / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "openai-community/gpt2"}))
    url = harvest(harvest_config(alice, corpus, f"{s3_bucket}/c", sites="1.resid_mid", layers=None, tokens=8 * 32),
                  progress=False)
    cache = Cache(url)
    assert cache.manifest["model"]["hub_id"] == "openai-community/gpt2"
    bob = tmp_path / "bob" / "gpt2"
    shutil.copytree(alice, bob)
    shutil.rmtree(alice)  # Bob's machine has no /.../alice
    with pytest.raises(ConfigError, match=r"point --model at a local copy of the cache's model \(a copy of "
                                          r"'openai-community/gpt2' on the Hub\)"):
        LM.load(cache, tokens=64)
    assert LM.load(cache, tokens=64, model=str(bob)).arch == "gpt2"
    with pytest.raises(CacheError, match="architecture gemma2 here, gpt2 in the cache.*weights sha256:"):
        LM.load(cache, tokens=64, model=str(gemma2_dir))
    from matryoshka.models import hub_id

    assert hub_id(gpt2_dir) is None  # a directory saved from no Hub model (no _name_or_path) records none


def test_evaluate_takes_a_model_flag():
    from typer.testing import CliRunner

    from matryoshka.cli import app

    out = CliRunner().invoke(app, ["evaluate", "--help"], env={"COLUMNS": "200"})
    assert "--model" in out.output


@pytest.mark.slow
def test_evaluate_says_what_the_local_copy_served(bucket_cache, tmp_path):
    """`pipeline evaluate --local-cache-dir` prints train's two lines, once for the cache, counting the chunks
    it reads (the held-out split: chunk 0 of x). Training kept the 7 training chunks only, so the first
    evaluation finds 0 of 1 and fetches it once (every later read of it, the feature codes' pass included,
    reads the copy); the second finds 1 of 1 and fetches nothing."""
    keep, runs = tmp_path / "keep", tmp_path / "runs"
    r = _pipeline(*_train_args(bucket_cache, keep, runs, tmp_path))
    assert r.returncode == 0, r.stderr

    def evaluate() -> list[str]:
        r = _pipeline("evaluate", "--cache", bucket_cache, "--runs-dir", str(runs), "--local-cache-dir", str(keep),
                      "--no-lm", "--device", "cpu")
        assert r.returncode == 0, r.stderr
        return [ln for ln in r.stderr.splitlines() if ln.startswith("local copy:")]

    local = keep / "5ha7edcafe000001-256x32"  # the copy's folder: the cache's fingerprint and layout
    first = evaluate()
    assert first[0] == (f"local copy: 0 of 1 chunks (0%) of the held-out split of {bucket_cache} are already in "
                        f"{local}; the rest come from the store"), first
    assert len(first) == 2 and first[1].startswith("local copy: 1 chunk(s) came from the store, "), first
    assert first[1].endswith(f" from {local}"), first  # every later read of the chunk: from the copy
    second = evaluate()
    assert len(second) == 2 and second[0].startswith("local copy: 1 of 1 chunks (100%) of the held-out split of ")
    assert second[1].startswith("local copy: 0 chunk(s) came from the store, "), second


@pytest.mark.slow
def test_hub_id_flag_is_recorded_shown_and_named_by_evaluate(gpt2_dir, corpus, tmp_path):
    """`harvest --hub-id` records the Hub id of a local directory (winning over its config's _name_or_path),
    leaves the fingerprint alone (the weights hash names the model), `cache info` shows it, and `evaluate` on
    a machine without the directory names it in its one-line error."""
    from matryoshka.cli import app
    from matryoshka.config import TrainConfig
    from matryoshka.train.trainer import train
    from test_errors import harvest_args, runner

    model = tmp_path / "alice" / "gpt2"
    shutil.copytree(gpt2_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "openai-community/gpt2"}))
    caches = {}
    for name, extra in (("flag", ["--hub-id", "tiny-org/tiny-gpt2"]), ("config", [])):
        r = runner.invoke(app, harvest_args(model, corpus, tmp_path / name, *extra))
        assert r.exit_code == 0, r.output
        caches[name] = Cache(tmp_path / name)
    assert caches["flag"].manifest["model"]["hub_id"] == "tiny-org/tiny-gpt2"
    assert caches["config"].manifest["model"]["hub_id"] == "openai-community/gpt2"
    assert caches["flag"].fingerprint == caches["config"].fingerprint
    info = runner.invoke(app, ["cache", "info", str(tmp_path / "flag")])
    assert info.exit_code == 0, info.output
    assert "(gpt2, d_model 64, 3 layers, computed in float32), a copy of 'tiny-org/tiny-gpt2' on the Hub" \
        in info.output, info.output

    train(TrainConfig(cache=str(tmp_path / "flag"), runs=[{"name": "sae", "source": "1.resid_mid", "width": 16,
                                                           "k": 2, "tokens": "256"}], runs_dir=str(tmp_path / "runs"),
                      batch_size=32, buffer_tokens=256, device="cpu"), progress=False)
    shutil.rmtree(model)  # a teammate's machine: no /.../alice
    run_bad(["evaluate", "--cache", str(tmp_path / "flag"), "--runs-dir", str(tmp_path / "runs"), "--device", "cpu"],
            f"evaluate: cannot load the cache's model {str(model)!r}",
            "point --model at a local copy of the cache's model (a copy of 'tiny-org/tiny-gpt2' on the Hub)")


def _refused(r: subprocess.CompletedProcess, *fragments: str) -> str:
    """A command's one-line error (exit 2), holding every fragment."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


class HubCache:
    """A cache harvested by Hub name ``repo`` (offline, from Alice's Hugging Face cache, which holds ``model_dir``
    as that name), one run trained on it, and `pipeline evaluate` of it on Bob's machine, whose Hugging Face
    cache is empty."""

    def __init__(self, model_dir: Path, repo: str, corpus: Path, tmp: Path) -> None:
        from helpers import put_in_hub_cache
        from matryoshka.config import TrainConfig
        from matryoshka.train.trainer import train
        from test_errors import harvest_args

        self.alice_hub, self.bob_hub, self.cache, self.runs = tmp / "alice-hf", tmp / "bob-hf", tmp / "c", tmp / "runs"
        self.commit = put_in_hub_cache(self.alice_hub, repo, model_dir)
        self.bob_hub.mkdir()
        self.offline = {**os.environ, "HF_HUB_OFFLINE": "1"}
        r = _pipeline(*harvest_args(repo, corpus, self.cache),
                      env={**self.offline, "HF_HUB_CACHE": str(self.alice_hub)})
        assert r.returncode == 0, r.stderr
        self.manifest = Cache(self.cache).manifest
        train(TrainConfig(cache=str(self.cache), runs=[{"name": "sae", "source": "1.resid_mid", "width": 16, "k": 2,
                                                        "tokens": "256"}], runs_dir=str(self.runs),
                          batch_size=32, buffer_tokens=256, device="cpu"), progress=False)

    def snapshot(self, repo: str) -> Path:
        from huggingface_hub.file_download import repo_folder_name

        return self.alice_hub / repo_folder_name(repo_id=repo, repo_type="model") / "snapshots" / self.commit

    def evaluate(self, *extra: str) -> subprocess.CompletedProcess:
        return _pipeline("evaluate", "--cache", str(self.cache), "--runs-dir", str(self.runs), "--device", "cpu",
                         "--quiet", *extra, env={**self.offline, "HF_HUB_CACHE": str(self.bob_hub)})


@pytest.mark.slow
def test_a_cache_of_a_hub_model_evaluates_offline_with_a_local_copy(gpt2_dir, gemma2_dir, corpus, tmp_path):
    """Harvested by Hub name (offline, from a Hugging Face cache that holds it): the cache records the name and
    a hash of its safetensors files. On a teammate's machine whose Hugging Face cache lacks the model, evaluate
    says so in one line; `--model` a copy of the model's files is used; a copy with one weight changed, or
    another architecture, is refused in one line naming what differs."""
    from matryoshka.models import weights_hash

    hub = HubCache(gpt2_dir, "tiny-org/tiny-gpt2", corpus, tmp_path)
    m = hub.manifest
    assert (m["model"]["resolved"], m["model"]["arch"]) == ("tiny-org/tiny-gpt2", "gpt2") and "hub_id" not in m["model"]
    assert m["model"]["weights"] == weights_hash(gpt2_dir) is not None  # the files the snapshot links to
    # the fingerprint's: name and commit, the commit read from the Hugging Face cache offline (not "@main")
    assert m["identity"]["model"] == f"tiny-org/tiny-gpt2@{hub.commit}"
    evaluate = hub.evaluate
    _refused(evaluate(), "evaluate: cannot load the cache's model 'tiny-org/tiny-gpt2'", "could not be resolved "
             "offline", "point --model at a local copy of the cache's model")
    copy = tmp_path / "bob" / "gpt2"  # Bob's copy of the model's files (links followed: the bytes)
    shutil.copytree(hub.snapshot("tiny-org/tiny-gpt2"), copy)
    r = evaluate("--model", str(copy))
    assert r.returncode == 0, r.stderr
    lm = json.loads((hub.runs / Cache(hub.cache).fingerprint / "sae" / "eval.json").read_text())["lm"]
    assert lm is not None and lm["sequences"] > 0 and np.isfinite(lm["ce_clean"])

    changed = tmp_path / "bob" / "gpt2-changed"
    shutil.copytree(copy, changed)
    with open(changed / "model.safetensors", "r+b") as f:  # the last weight's last byte: same shapes, other values
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0x01]))
    line = _refused(evaluate("--model", str(changed)), f"evaluate: the model at {str(changed)!r} is not the one",
                    f"(weights {weights_hash(changed)} here, {m['model']['weights']} in the cache)")
    assert "architecture" not in line
    _refused(evaluate("--model", str(gemma2_dir)), "architecture gemma2 here, gpt2 in the cache")


@pytest.mark.slow
def test_a_hub_model_without_safetensors_refuses_a_local_copy_in_one_line(gpt2_dir, corpus, tmp_path):
    """A Hub model whose weights are a pytorch_model.bin only: harvested and recorded with no weights hash, so a
    `--model` copy cannot be checked, and evaluate says so in one line rather than trusting it."""
    import torch
    from safetensors.torch import load_file

    model = tmp_path / "tiny-bin"
    shutil.copytree(gpt2_dir, model)
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    hub = HubCache(model, "tiny-org/tiny-gpt2-bin", corpus, tmp_path)
    assert "weights" not in hub.manifest["model"]
    _refused(hub.evaluate("--model", str(hub.snapshot("tiny-org/tiny-gpt2-bin"))),
             f"evaluate: cache {str(hub.cache)!r} records its model as 'tiny-org/tiny-gpt2-bin' at "
             "'tiny-org/tiny-gpt2-bin@", "but no hash of its weight files", "evaluate without --model")
