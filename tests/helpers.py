"""Plain helpers the tests share (fixtures live in conftest.py). Tests import them as ``from helpers import
...``: pytest puts tests/ on sys.path (``pythonpath`` in pyproject.toml), so no test imports conftest."""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from matryoshka.fixtures import build_model, build_tokenizer, write_corpus


def harvest_config(model_dir: Path, corpus: Path, cache: Path, **overrides):
    """A small harvest of a tiny model: 4 chunks of 4 sequences of 32 tokens, float32 storage."""
    from matryoshka.config import HarvestConfig

    kw = dict(model=str(model_dir), dataset=str(corpus), layers="1",
              sites="resid_pre,attn_out,resid_mid,mlp_in,mlp_out,resid_post",
              tokens=16 * 32, context_size=32, batch_size=4, dtype="float32", chunk_mb=4 * 32 * 64 * 4 / 2**20,
              holdout=4 * 32, cache=str(cache) if cache else None, writer_threads=2)
    kw.update(overrides)
    return HarvestConfig(**kw)


@contextmanager
def moto_server(unauthenticated: int) -> Iterator[str]:
    """A real S3 server (moto) of its own that checks credentials and IAM policies once its first
    ``unauthenticated`` requests (the set-up: buckets, users, policies, keys) are done: its endpoint."""
    import socket
    import subprocess
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(unauthenticated)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(30)


def new_bucket(protocol: str, prefix: str = "test") -> str:
    """A new, empty bucket on the session's server for ``protocol`` (s3 or gs): ``PROTOCOL://NAME``."""
    import uuid

    import fsspec

    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem(protocol).mkdir(name)
    return f"{protocol}://{name}"


if __name__ == "__main__":  # build the fixtures by hand: python tests/helpers.py OUT_DIR
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    c = write_corpus(out / "corpus.txt")
    t = build_tokenizer(c)
    for a in ("gpt2", "gemma2"):
        build_model(a, out / f"tiny-{a}", t)


def put_in_hub_cache(hub_cache: Path, repo_id: str, model_dir: Path) -> str:
    """Lay ``model_dir``'s files out in a Hugging Face hub cache (``HF_HUB_CACHE``) as ``repo_id`` at one commit,
    as a download would (blobs named by their sha256, snapshot links to them, ``refs/main``): what an offline
    process finds for a Hub name it downloaded before. Folder names come from huggingface_hub
    (``repo_folder_name``), and the test asks huggingface_hub (``scan_cache_dir``) to read the result back.
    Returns the commit."""
    import hashlib

    from huggingface_hub import scan_cache_dir
    from huggingface_hub.file_download import repo_folder_name

    repo = hub_cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    commit = hashlib.sha1(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for p in files:
        data = p.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / p.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    found = {(r.repo_id, rev.commit_hash) for r in scan_cache_dir(hub_cache).repos for rev in r.revisions}
    assert (repo_id, commit) in found, found
    return commit
