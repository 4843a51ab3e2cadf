"""A harvest killed with SIGKILL leaves a readable cache; --resume finishes it byte-identical."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from matryoshka.cache import Cache
from matryoshka.cache.inspect import verify

pytestmark = pytest.mark.slow  # a real harvest killed with SIGKILL, then resumed


def _args(model: Path, corpus: Path, cache: Path, *extra: str) -> list[str]:
    # 6 sequences per batch, 4 per chunk: a resume must restart on a 12-sequence boundary.
    return [sys.executable, "-m", "matryoshka.cli", "harvest", "--model", str(model), "--dataset", str(corpus),
            "--sites", "0.resid_mid,1.mlp_out", "--tokens", str(32 * 600), "--context-size", "32",
            "--batch-size", "6", "--chunk-mb", str(4 * 32 * 64 * 2 / 2**20), "--holdout", "128",
            "--cache", str(cache), "--quiet", *extra]


def _committed(cache: Path) -> int:
    try:
        return json.loads((cache / "zarr.json").read_text())["attributes"]["progress"]["chunks"]
    except (OSError, ValueError, KeyError):
        return 0


def _files(root: Path) -> dict[str, bytes]:
    skip = {root / "zarr.json", root / ".writer.lock"}  # group attributes are compared as JSON
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p not in skip}


def kill_after_commits(args: list[str], committed: Callable[[], int], env: dict, commits: int = 3) -> int:
    """Start a harvest and SIGKILL it once ``committed()`` reaches ``commits`` chunks, before it can finish;
    the killed process's pid."""
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while committed() < commits and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "harvest finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.pid


def test_sigkill_then_resume_is_byte_identical(gpt2_dir, corpus, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_args(gpt2_dir, corpus, whole), check=True, env=env, capture_output=True)

    kill_after_commits(_args(gpt2_dir, corpus, killed), lambda: _committed(killed), env)

    partial = Cache(killed)
    n_total = partial.n_chunks
    assert not partial.complete and 3 <= partial.chunks_committed < n_total
    assert partial.chunks_committed % 3 == 0  # commits only on batch-aligned chunk counts
    problems = verify(partial, progress=False)
    assert [d.key for d in problems] == ["zarr.json"]  # unfinished, but every committed chunk reads back
    rows = partial.tokens_committed
    np.testing.assert_array_equal(partial.read("1.mlp_out", 0, rows), Cache(whole).read("1.mlp_out", 0, rows))

    again = subprocess.run(_args(gpt2_dir, corpus, killed), env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "pass --resume" in again.stderr

    # What a write cut short by the kill would leave: zarr's temporary file, never renamed into place.
    (killed / "acts" / "1.mlp_out" / "c" / "0" / "0.0123abcd.partial").write_bytes(b"half a chunk")
    subprocess.run(_args(gpt2_dir, corpus, killed, "--resume"), check=True, env=env, capture_output=True)
    a, b = Cache(whole), Cache(killed)
    assert b.complete and a.fingerprint == b.fingerprint
    fa, fb = _files(whole), _files(killed)
    assert fa.keys() == fb.keys() and len(fa) > 2 * n_total
    assert [k for k in fa if fa[k] != fb[k]] == []
    ja = json.loads((whole / "zarr.json").read_text())["attributes"]
    jb = json.loads((killed / "zarr.json").read_text())["attributes"]
    assert ja == jb  # manifest, progress and statistics too
