"""`pipeline browse` of runs on object storage (issue 20), against the real local S3 server: the site built
from a bucket's runs equals the site of a local copy of the same runs, is published next to the report,
replaces a run's old pages, can go to a local --out folder instead, and is served from the local copy."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import fsspec
import numpy as np
import pytest
from typer.testing import CliRunner

from matryoshka.cache import Cache
from matryoshka.cli import app
from matryoshka.config import EvaluateConfig, TrainConfig
from matryoshka.evaluate import evaluate
from matryoshka.fixtures import write_cache
from matryoshka.train.trainer import train

pytestmark = pytest.mark.slow  # training, evaluation and a real S3 server

RUNS = [{"name": "mat", "source": "x", "width": 32, "k": 4, "tokens": "2K", "group_sizes": [8, 24], "lr": 0.003,
         "dead_tokens": "1K"},
        {"name": "wide", "source": "x", "width": 48, "k": 4, "tokens": "2K", "group_sizes": [8, 40], "lr": 0.003,
         "dead_tokens": "1K"}]


@pytest.fixture(scope="module")
def shared(s3_server, tmp_path_factory) -> dict:
    """Two runs trained and evaluated locally on a small synthetic cache, their folders uploaded to a bucket
    (a run copied with any tool is a run folder), and the site of the local runs: what the bucket's must equal."""
    from helpers import new_bucket

    work = tmp_path_factory.mktemp("shared")
    rng = np.random.default_rng(0)
    n = 12 * 4 * 16
    parents = rng.standard_normal((8, 16)).astype(np.float32)
    x = parents[rng.integers(0, 8, n)] * rng.random((n, 1)).astype(np.float32) + 0.1 * rng.standard_normal((n, 16))
    cache = write_cache(work / "cache", {"x": x.astype(np.float32)}, rng.integers(4, 50, n), 16, 4, heldout_seqs=4,
                        fingerprint="5ha7ed00b0a5e001")
    runs = work / "runs"
    train(TrainConfig(cache=str(cache), runs=RUNS, runs_dir=str(runs), batch_size=64, buffer_tokens=512,
                      checkpoint_every=100, log_every=10, device="cpu"), progress=False)
    evaluate(EvaluateConfig(cache=str(cache), runs_dir=str(runs), batch_size=256, lm=False), progress=False)
    url = f"{new_bucket('s3')}/team/runs"
    fs, root = fsspec.core.url_to_fs(url)
    for f in sorted(p for p in runs.rglob("*") if p.is_file()):
        fs.put_file(str(f), f"{root}/{f.relative_to(runs).as_posix()}")
    fp = Cache(str(cache)).fingerprint
    local = _browse("--cache", str(cache), "--runs-dir", str(runs))
    assert local == str(runs / fp / "browse" / "index.html")
    return {"cache": str(cache), "fp": fp, "runs": runs, "url": url, "local": runs / fp / "browse"}


def _browse(*args: str) -> str:
    """`pipeline browse ARGS -q` in this process: its last line of output."""
    res = CliRunner().invoke(app, ["browse", *args, "-q"])
    assert res.exit_code == 0, res.output
    return res.output.strip().splitlines()[-1]


def _objects(url: str) -> dict[str, bytes]:
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return {p[len(root) + 1:]: fs.cat_file(p) for p in fs.find(root)}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_same_site(got: dict[str, bytes], want: dict[str, bytes]) -> None:
    """The same files, byte for byte, but for the runs page's inline plots (matplotlib stamps each drawing
    with the time and random ids): the runs page without them equal, linking both runs."""
    assert sorted(got) == sorted(want)
    for key in want:
        if key != "index.html":
            assert got[key] == want[key], key
    assert _without_plots(got["index.html"]) == _without_plots(want["index.html"])
    assert b'href="mat/latent.html"' in got["index.html"] and b'href="wide/latent.html"' in got["index.html"]


def _without_plots(page: bytes) -> bytes:
    return re.sub(rb"<svg.*?</svg>", b"<svg/>", page, flags=re.DOTALL)


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    """Where this process's workspaces go, to see that each command removes its local copy."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_a_site_of_runs_on_a_bucket_equals_the_local_one_and_is_published_next_to_the_report(shared, scratch):
    url, fp = shared["url"], shared["fp"]
    printed = _browse("--cache", shared["cache"], "--runs-dir", url)
    assert printed == f"{url}/{fp}/browse/index.html"  # where the team finds it
    assert_same_site(_objects(f"{url}/{fp}/browse"), _files(shared["local"]))
    assert "report.md" in _objects(f"{url}/{fp}")  # the site sits next to the report
    assert list(scratch.iterdir()) == [] and not Path("s3:").exists()
    # with neither a run nor --cache: the most recently evaluated run, alone (it is the site's first run)
    assert _browse("--runs-dir", url) == printed


def test_one_run_rebuilt_keeps_the_others_pages_and_drops_its_stale_objects(shared, scratch):
    url, fp = shared["url"], shared["fp"]
    _browse("--cache", shared["cache"], "--runs-dir", url)
    site = f"{url}/{fp}/browse"
    fs, root = fsspec.core.url_to_fs(site)
    fs.pipe_file(f"{root}/mat/data/s/99999.js", b"an earlier, wider build's shard")
    fs.pipe_file(f"{root}/wide/data/meta.js", b"wide's pages as they were")  # not rebuilt: left as it is
    before = _objects(site)
    assert _browse(f"{url}/{fp}/mat") == f"{site}/index.html"
    after = _objects(site)
    assert "mat/data/s/99999.js" not in after
    assert after["wide/data/meta.js"] == b"wide's pages as they were"
    assert {k: v for k, v in after.items() if k.startswith("wide/")} == \
        {k: v for k, v in before.items() if k.startswith("wide/")}
    want = _files(shared["local"])
    assert sorted(after) == sorted(want)
    assert all(after[k] == want[k] for k in want if k.startswith("mat/"))
    assert b'href="wide/latent.html"' in after["index.html"]  # the runs page still links the pages not rebuilt
    assert list(scratch.iterdir()) == []


def test_out_writes_the_site_locally_and_publishes_nothing(shared, scratch, tmp_path):
    url, fp = shared["url"], shared["fp"]
    before = _objects(url)
    out = tmp_path / "site"
    assert _browse("--cache", shared["cache"], "--runs-dir", url, "--out", str(out)) == str(out / "index.html")
    assert_same_site(_files(out), _files(shared["local"]))
    assert _objects(url) == before and list(scratch.iterdir()) == []
    # local runs the same way: the site goes to --out, nothing next to the runs
    runs = tmp_path / "runs"
    shutil.copytree(shared["runs"], runs, ignore=shutil.ignore_patterns("browse"))
    mine = tmp_path / "mine"
    assert _browse(str(runs / fp / "mat"), str(runs / fp / "wide"), "--out", str(mine)) == str(mine / "index.html")
    assert_same_site(_files(mine), _files(shared["local"]))
    assert not (runs / fp / "browse").exists()


def test_bad_input_on_a_bucket_is_one_line_and_writes_nothing(shared, s3_server):
    url, fp = shared["url"], shared["fp"]
    fs, root = fsspec.core.url_to_fs(url)
    for name in ("config.json", "model.safetensors"):  # a trained run that was never evaluated
        fs.put_file(str(shared["runs"] / fp / "mat" / "checkpoint" / name), f"{root}/{fp}/bare/checkpoint/{name}")
    before = _objects(url)
    bucket = url.split("/team/")[0]
    cases = [
        (["--runs-dir", f"{bucket}/elsewhere"],
         f"error: browse: no evaluated runs under '{bucket}/elsewhere'; run `pipeline evaluate` first"),
        (["--runs-dir", "s3://no-such-bucket-b0a5e/runs"],
         "error: browse: no evaluated runs under 's3://no-such-bucket-b0a5e/runs'; run `pipeline evaluate` first"),
        ([f"{url}/{fp}/nope"],
         f"error: browse: '{url}/{fp}/nope' is not a trained run (no checkpoint/model.safetensors)"),
        ([f"{url}/{fp}/bare"], f"error: browse: run '{url}/{fp}/bare' has no eval.json; evaluate it first: "
                               f"pipeline evaluate {url}/{fp}/bare"),
        ([f"{url}/{fp}/mat", "--out", f"{bucket}/site"],
         f"error: browse: --out '{bucket}/site' is not a local folder; without --out the site is published next to "
         "the runs' report"),
    ]
    for args, line in cases:
        res = CliRunner().invoke(app, ["browse", *args, "-q"])
        assert res.exit_code == 2 and res.output.strip().splitlines() == [line], (args, res.output)
    assert _objects(url) == before and not Path("s3:").exists()


def test_serve_serves_the_local_copy_of_a_bucket_site_until_interrupted(shared, tmp_path):
    """A real `pipeline` process: prints the site's URL, serves its local copy, and removes it on SIGINT."""
    url, fp = shared["url"], shared["fp"]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "matryoshka.cli", "browse", "--cache", shared["cache"],
                             "--runs-dir", url, "--serve", "--port", "0", "-q"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(scratch)})
    try:
        printed, line = proc.stdout.readline().strip(), proc.stdout.readline().strip()
        assert printed == f"{url}/{fp}/browse/index.html" and line.startswith("serving http://127.0.0.1:"), \
            (printed, line, proc.stderr.read() if proc.poll() is not None else "")
        served = line.split()[1]
        want = _files(shared["local"])
        for key in ("index.html", "mat/data/meta.js", "wide/data/s/00000.js", "static/browse.js"):
            with urllib.request.urlopen(served.replace("index.html", key), timeout=10) as r:
                body = r.read()
                assert r.status == 200 and (key == "index.html" or body == want[key]), key
        copy = {p.relative_to(scratch).as_posix() for p in scratch.rglob("*") if p.is_file()}
        assert any(k.endswith(f"/{fp}/mat/checkpoint/model.safetensors") for k in copy)  # kept while serving
        assert not [k for k in copy if k.endswith(("/state.pt", "/metrics.jsonl", "/eval.npz")) or "/saelens/" in k]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        assert list(scratch.iterdir()) == []
    finally:
        if proc.poll() is None:
            proc.kill()
