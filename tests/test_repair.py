"""`pipeline cache repair`: a chunk with flipped bytes and a deleted chunk are re-harvested byte-identical,
for model and synthetic caches, local and on object storage; a healthy cache is left untouched; a cache
being written is refused."""
from __future__ import annotations

from pathlib import Path

import fsspec
import pytest
from typer.testing import CliRunner

from helpers import harvest_config
from matryoshka.cache.lock import LOCK_NAME, writer_lock
from matryoshka.cli import app
from matryoshka.config import HarvestConfig, from_dict
from matryoshka.harvest import harvest

SYNTHETIC = {"d_model": 16, "n_parents": 4, "children": 2, "d_target": 8}


def _synthetic(cache: str) -> HarvestConfig:
    """8 chunks of 4 sequences; LM batches of 6 sequences, so resume blocks of 3 chunks."""
    return from_dict(HarvestConfig, dict(source="synthetic", synthetic=SYNTHETIC, layers=0, sites="resid_mid,mlp_out",
                                         tokens=32 * 32, context_size=32, batch_size=6, dtype="float32",
                                         chunk_mb=4 * 32 * 16 * 4 / 2**20, holdout=4 * 32, cache=cache,
                                         writer_threads=2, seed=1), "harvest")


def _files(cache: str) -> dict[str, bytes]:
    """Every file (object) of a cache but its writer lock, by key."""
    fs, root = fsspec.core.url_to_fs(cache)
    fs.invalidate_cache()
    root = root.rstrip("/")
    return {p[len(root) + 1:]: fs.cat_file(p) for p in fs.find(root) if not p.endswith(LOCK_NAME)}


def _damage(cache: str) -> None:
    """Flip bytes in the middle of chunk 4 of the first array, delete chunk 7 of the tokens."""
    fs, root = fsspec.core.url_to_fs(cache)
    key = sorted(p for p in fs.find(root) if "/acts/" in p and p.endswith("/c/4/0"))[0]
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2] ^= 0xFF
    data[len(data) // 2 + 1] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    fs.rm_file(f"{root.rstrip('/')}/tokens/c/7")
    fs.invalidate_cache()


def _repair(cache: str):
    return CliRunner().invoke(app, ["cache", "repair", cache, "-q"])


def _repaired_equals_original(cache: str) -> None:
    original = _files(cache)
    _damage(cache)
    verify = CliRunner().invoke(app, ["cache", "verify", cache, "-q"])
    assert verify.exit_code == 1 and verify.output.count("DAMAGED") == 2, verify.output
    result = _repair(cache)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == (f"repaired: chunks 4, 7 (2 damaged or missing file(s)) re-harvested in "
                                     f"{cache}; verify: ok")
    assert _files(cache) == original


def test_a_synthetic_cache_is_repaired_byte_for_byte(tmp_path):
    cache = str(harvest(_synthetic(str(tmp_path / "c")), progress=False))
    _repaired_equals_original(cache)


@pytest.mark.slow
def test_a_model_cache_is_repaired_byte_for_byte(tmp_path, gpt2_dir, corpus):
    cfg = harvest_config(gpt2_dir, corpus, tmp_path / "c", sites="1.resid_mid,1.mlp_out", layers=None,
                         tokens=32 * 32, batch_size=6)
    _repaired_equals_original(str(harvest(cfg, progress=False)))


@pytest.mark.slow
def test_a_cache_on_object_storage_is_repaired_byte_for_byte(s3_bucket):
    cache = harvest(_synthetic(f"{s3_bucket}/c"), progress=False)
    _repaired_equals_original(cache)


def test_a_healthy_cache_is_said_healthy_and_not_written(tmp_path):
    cache = str(harvest(_synthetic(str(tmp_path / "c")), progress=False))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in Path(cache).rglob("*") if p.is_file()}
    result = _repair(cache)
    assert result.exit_code == 0
    assert result.output.strip() == f"ok: {cache} is healthy; nothing to repair, nothing written"
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in Path(cache).rglob("*") if p.is_file()} == before


def test_a_cache_being_written_is_not_repaired(tmp_path):
    cache = str(harvest(_synthetic(str(tmp_path / "c")), progress=False))
    _damage(cache)
    damaged = _files(cache)
    with writer_lock(cache):
        result = _repair(cache)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cache {cache} is being written by pid "), lines
    assert _files(cache) == damaged
