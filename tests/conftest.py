"""Offline fixtures: tiny GPT-2 and Gemma-2 models built from configs, saved with save_pretrained and
loaded back through the real loading path, plus a small text corpus the tests write themselves."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from helpers import new_bucket
from matryoshka.fixtures import build_model, build_tokenizer, write_corpus

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
# Tests run in their own temporary directories (below), so `python -m matryoshka.cli` in a subprocess no longer
# finds this tree's package through the working directory: put the repository first on its path instead.
REPO = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join([REPO, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                    if p and p != REPO]])

@pytest.fixture(autouse=True)
def _own_working_directory(tmp_path, monkeypatch):
    """Every test runs in its own empty temporary directory, so nothing a test writes to a relative or
    default path (``cache/``, ``runs/``, a mistyped ``None``) can land in the repository. Tests find the
    repository's own files (README.md, pipeline.yaml, examples/) from their own path, never the cwd."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on a free localhost port, for the session.

    Clients find it the standard way, through the environment: ``AWS_ENDPOINT_URL`` and test credentials
    (subprocesses inherit them)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL"]
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="session")
def gs_server():
    """A real Google Cloud Storage JSON API server (gcp-storage-emulator, in memory) on a free localhost
    port, for the session. gcsfs finds it the standard way, through ``STORAGE_EMULATOR_HOST`` (subprocesses
    inherit it), and then needs no credentials."""
    import logging

    # gcsfs would first ask the server over gRPC whether a bucket is zonal; the emulator speaks only HTTP
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # it logs every 404 it answers
    server = create_server("127.0.0.1", 0, in_memory=True)
    server.start()
    httpd = server._api._httpd
    port = httpd.server_address[1]  # port 0: the OS chose one, no race with another process
    report = httpd.handle_error

    def handle_error(request, client_address):  # a client that hung up early is no server error: no traceback
        if not isinstance(sys.exc_info()[1], ConnectionError):
            report(request, client_address)
    httpd.handle_error = handle_error
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    yield os.environ["STORAGE_EMULATOR_HOST"]
    server.stop()
    os.environ.pop("STORAGE_EMULATOR_HOST") if saved is None else os.environ.__setitem__("STORAGE_EMULATOR_HOST", saved)


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A new, empty bucket on the session's S3 server: ``s3://NAME``."""
    return new_bucket("s3")


@pytest.fixture(params=["s3", "gs"])
def store_bucket(request) -> str:
    """A new, empty bucket on each kind of object store: S3, then Google Cloud Storage."""
    request.getfixturevalue(f"{request.param}_server")
    return new_bucket(request.param)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data") / "corpus.txt")


@pytest.fixture(scope="session")
def tokenizer(corpus):
    return build_tokenizer(corpus)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, tokenizer) -> Path:
    return build_model("gpt2", tmp_path_factory.mktemp("models") / "tiny-gpt2", tokenizer)


@pytest.fixture(scope="session")
def gemma2_dir(tmp_path_factory, tokenizer) -> Path:
    return build_model("gemma2", tmp_path_factory.mktemp("models") / "tiny-gemma2", tokenizer)


@pytest.fixture(scope="session", params=["gpt2", "gemma2"])
def model_dir(request) -> Path:
    return request.getfixturevalue(f"{request.param}_dir")
