"""The cache's one entry point for writing (cache/lifecycle.py) and its one location type (cache/location.py),
on a real local store and real locks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from matryoshka.cache import Cache
from matryoshka.cache.lifecycle import open_writer
from matryoshka.cache.location import Folder, Location, Prefix
from matryoshka.cache.lock import CacheLockedError, WriterLock
from matryoshka.cache.manifest import build_manifest
from matryoshka.config import ConfigError

CTX, SPC, N_SEQS, WIDTH = 4, 2, 8, 3


def _manifest() -> dict:
    return build_manifest(
        source="fixture", identity={}, fingerprint_override="0123456789abcdef",
        model={"name": "synthetic", "resolved": "synthetic", "revision": None, "arch": "none", "d_model": WIDTH,
               "n_layers": 0, "dtype": "float32"},
        tokenizer={"name": "synthetic", "vocab_size": 10},
        dataset={"id": "synthetic", "config": None, "split": "train", "revision": None, "text_column": "text",
                 "token_column": None, "seed": None, "shuffle_buffer": 0},
        context_size=CTX, bos={"policy": "context", "token_id": 0}, dtype="float32", codec="none",
        seqs_per_chunk=SPC, arrays={"x": {"layer": 0, "site": "x", "hook_name": "x", "width": WIDTH}},
        n_sequences=N_SEQS, batch_size=SPC, heldout_seqs=0)


def _write_all(session) -> None:
    writer = session.writer(session.state, threads=1, batch_seqs=SPC)
    for _ in range(N_SEQS // SPC):
        writer.write(torch.ones(SPC, CTX, dtype=torch.int32), {"x": torch.ones(SPC, CTX, WIDTH)})
    writer.finish()


def test_an_error_removes_the_folder_it_created_and_releases_the_lock(tmp_path):
    where = tmp_path / "new" / "cache"
    with pytest.raises(RuntimeError, match="boom"):
        with open_writer(where, _manifest()) as session:
            assert session.created and not session.complete and (where / "zarr.json").is_file()
            with pytest.raises(CacheLockedError, match="is being written by pid"):
                WriterLock(where).acquire()  # held while the session is open
            raise RuntimeError("boom")
    assert not (tmp_path / "new").exists()  # the topmost folder it created, nothing committed


def test_committed_chunks_stay_unless_the_session_is_discarded(tmp_path):
    kept, discarded = tmp_path / "kept", tmp_path / "discarded"
    for where, discard in [(kept, False), (discarded, True)]:
        with pytest.raises(RuntimeError):
            with open_writer(where, _manifest()) as session:
                _write_all(session)
                session.discard = discard
                raise RuntimeError("after the last commit")
    assert Cache(kept).complete and not discarded.exists()
    with open_writer(kept, _manifest()) as session:  # complete: nothing to write, nothing removed
        assert session.complete and not session.created
    WriterLock(kept).acquire().release()  # released


def test_a_foreign_folder_and_an_unfinished_cache_without_resume_are_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is a folder that is not a cache and holds 1 other entry"):
        with open_writer(tmp_path, _manifest()):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing written
    where = tmp_path / "c"
    with open_writer(where, _manifest()) as session:
        session.writer(session.state, threads=1, batch_seqs=SPC)  # opened, nothing written: unfinished
    with pytest.raises(Exception, match="pass --resume to continue it"):
        with open_writer(where, _manifest()):
            pass
    with open_writer(where, _manifest(), resume=True) as session:
        _write_all(session)
    c = Cache(where)
    assert c.complete and np.all(c.read("x", 0, N_SEQS * CTX) == 1)


def test_a_location_is_made_once_from_a_path_or_url(tmp_path):
    assert Location.of(f"file://{tmp_path}") == Folder(tmp_path) and not Location.of(tmp_path).remote
    assert Location.of(Location.of(tmp_path)) == Folder(tmp_path)
    s3 = Location.of("s3://bucket/team/")
    assert isinstance(s3, Prefix) and s3.remote and s3.root == "bucket/team"
    assert str(s3.join("model", "fp")) == "s3://bucket/team/model/fp"  # no folded "//"
    assert Location.of(tmp_path).join("a", "b").pathlike == Path(tmp_path, "a", "b")
