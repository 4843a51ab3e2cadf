"""Object storage that fails for a while: chunk reads and writes ride it out, and a long outage ends in
one clear line. The outage is real: the S3 server the clients talk to is stopped, so connections are
refused, and started again on the same port (moto keeps its buckets in the process, so they survive)."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time

import numpy as np
import pytest

from helpers import new_bucket
from matryoshka.cache import Cache, CacheError
from matryoshka.cache.copy import copy_cache
from matryoshka.cache.reader import ReaderConfig, ShuffledReader
from matryoshka.cache.remote import ChunkSource
from matryoshka.cache.retry import StoreUnavailable, retry_seconds, transient
from matryoshka.fixtures import write_cache

CTX, SPC = 16, 2  # 16-token contexts, 2 per chunk: 32-row chunks


class Outage:
    """An S3 server on a fixed localhost port that a test takes down and brings back."""

    def __init__(self) -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.server = None
        self.up()

    def up(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def down(self) -> None:
        self.server.stop()
        self.server = None


@pytest.fixture
def outage(s3_server, monkeypatch):
    """Clients pointed at a server of their own (the session's keeps serving the other tests), with
    botocore's own retries off, so each failed attempt takes about 2 s (s3fs's few retries), not 6-9."""
    import s3fs

    from matryoshka.cache import retry

    monkeypatch.setattr(retry, "_last_warning", [-retry.WARN_EVERY_S])  # this test's first retry warns at once
    o = Outage()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{o.port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    yield o
    if o.server is None:
        o.up()
    o.down()
    s3fs.S3FileSystem.clear_instance_cache()


def _warned(caplog, timeout: float = 60.0) -> None:
    """Wait until a read or write has failed and been scheduled for a retry."""
    t0 = time.monotonic()
    while "retrying in" not in caplog.text:
        assert time.monotonic() - t0 < timeout, "no retry was logged"
        time.sleep(0.05)


def _bucket_cache(tmp_path) -> str:
    """A 16-chunk cache of known rows (row i holds i), copied to a new bucket."""
    n = 16 * SPC * CTX
    rows = np.repeat(np.arange(n, dtype=np.float32)[:, None], 4, axis=1)
    local = write_cache(tmp_path / "local", {"x": rows}, np.ones(n, np.int32), CTX, SPC)
    return str(copy_cache(local, f"{new_bucket('s3')}/team", workers=2, progress=False))


def _stream(reader: ShuffledReader, n: int) -> list[list[int]]:
    return [next(reader)["x"][:, 0].long().tolist() for _ in range(n)]


@pytest.mark.slow
def test_the_reader_rides_out_an_outage_and_serves_the_same_stream(outage, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="matryoshka.cache")
    url = _bucket_cache(tmp_path)
    cfg = ReaderConfig(batch_size=32, buffer_tokens=128)  # blocks of 2 chunks: 8 fetches an epoch
    with ShuffledReader(["x"], url, cfg) as r:
        want = _stream(r, 2 * r.batches_per_epoch)
    with ShuffledReader(["x"], url, cfg) as r:
        got = _stream(r, 1)
        outage.down()
        reading = threading.Thread(target=lambda: got.extend(_stream(r, 2 * r.batches_per_epoch - 1)))
        reading.start()
        _warned(caplog)
        outage.up()
        reading.join(120)
        assert not reading.is_alive()
    assert got == want
    assert "fetching" in caplog.text and "s3://" in caplog.text


@pytest.mark.slow
def test_a_long_outage_ends_in_one_clear_line(outage, tmp_path, monkeypatch):
    url = _bucket_cache(tmp_path)
    monkeypatch.setenv("MATRYOSHKA_STORE_RETRY_S", "1")
    with ShuffledReader(["x"], url, ReaderConfig(batch_size=32, buffer_tokens=128)) as r:
        outage.down()
        with pytest.raises(CacheError, match=r"chunk \d+ of x in 's3://.*' could not be read: fetching .* the store "
                                             r"kept failing for \d+ s .*MATRYOSHKA_STORE_RETRY_S"):
            _stream(r, 2 * r.batches_per_epoch)


@pytest.mark.slow
def test_a_chunk_write_rides_out_an_outage(outage, tmp_path, caplog):
    """The harvest's chunk writes (one whole object each, so safe to repeat) wait for the store."""
    import zarr

    from matryoshka.cache.format import decode_chunk, encode_chunk
    from matryoshka.cache.writer import CacheWriter

    caplog.set_level(logging.WARNING, logger="matryoshka.cache")
    url = _bucket_cache(tmp_path)
    c = Cache(url)
    writer = CacheWriter(zarr.open_group(url, mode="r+"), c.manifest, {"chunks": c.n_chunks}, threads=1,
                         batch_seqs=SPC)
    rows = np.arange(c.chunk_tokens * 4, dtype=np.float32).reshape(-1, 4)
    outage.down()
    put = threading.Thread(target=writer._put, args=("acts/x/c/3/0", rows, "lz4", 0))
    put.start()
    _warned(caplog)
    outage.up()
    put.join(120)
    assert not put.is_alive()
    assert c.chunk_bytes("x", 3) == encode_chunk(rows, "lz4")
    np.testing.assert_array_equal(decode_chunk(c.chunk_bytes("x", 3), "lz4", np.empty_like(rows)), rows)


@pytest.mark.slow
def test_the_lock_check_before_a_commit_rides_out_an_outage(outage, caplog):
    """A writer asks its lock before every commit; during an outage it waits for the answer rather than
    stop (a lock broken meanwhile is still seen: test_remote.py)."""
    from matryoshka.cache.lock import ObjectLock

    caplog.set_level(logging.WARNING, logger="matryoshka.cache")
    lock = ObjectLock(f"{new_bucket('s3')}/c", heartbeat_s=3600).acquire()
    outage.down()
    errors: list[BaseException] = []
    check = threading.Thread(target=lambda: errors.extend(_raised(lock.check)))
    check.start()
    _warned(caplog)
    outage.up()
    check.join(120)
    assert not check.is_alive() and errors == [] and "reading the writer lock of s3://" in caplog.text
    lock.release()


def _raised(fn) -> list[BaseException]:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - handed to the test's thread
        return [e]
    return []


@pytest.mark.slow
def test_a_missing_chunk_fails_at_once(s3_bucket, caplog):
    caplog.set_level(logging.WARNING, logger="matryoshka.cache")
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError):
        ChunkSource(f"{s3_bucket}/nothing", "fp").get_many(["acts/x/c/0/0"])
    assert time.monotonic() - t0 < 10 and "retrying" not in caplog.text


def test_retries_back_off_within_their_budget_and_warn_once_across_threads(monkeypatch, caplog):
    """Four threads meet the same outage (every attempt refused). Each tries at 0, 0.5 and 1.5 s and then
    gives up, since its next wait (2 s) would pass the 2.5 s budget, in one line; the four log one warning
    between them."""
    import re

    from matryoshka.cache import retry

    monkeypatch.setattr(retry, "_last_warning", [-retry.WARN_EVERY_S])
    monkeypatch.setenv("MATRYOSHKA_STORE_RETRY_S", "2.5")
    caplog.set_level(logging.WARNING, logger="matryoshka.cache")
    attempts: dict[int, list[float]] = {i: [] for i in range(4)}
    errors: list[str] = []

    def refused(i: int) -> None:
        attempts[i].append(time.monotonic())
        raise ConnectionRefusedError("refused")

    def read(i: int) -> None:
        try:
            retry.retrying(lambda: refused(i), f"reading chunk {i}")
        except StoreUnavailable as e:
            errors.append(str(e))
    threads = [threading.Thread(target=read, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for times in attempts.values():
        gaps = np.diff(times)
        assert len(times) == 3 and 0.5 <= gaps[0] < 1.0 and 1.0 <= gaps[1] < 1.5, times
    want = (r"reading chunk \d: the store kept failing for \d s \(ConnectionRefusedError: "
            r"refused\); .* \(MATRYOSHKA_STORE_RETRY_S sets how long to retry\)")
    assert len(errors) == 4 and all(re.fullmatch(want, e) for e in errors), errors
    assert caplog.text.count("retrying in") == 1
    assert re.search(r"reading chunk \d failed \(ConnectionRefusedError: refused\); "
                     r"retrying in 0.5 s \(0 of 2 s spent\)", caplog.text)


def test_which_errors_are_transient(monkeypatch):
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    class HttpError(Exception):
        def __init__(self, code: int) -> None:
            self.code = code
    assert [transient(e) for e in (ConnectionRefusedError(), TimeoutError(), OSError("503 SlowDown"),
                                   EndpointConnectionError(endpoint_url="http://x"), HttpError(503), HttpError(429))] \
        == [True] * 6
    assert [transient(e) for e in (FileNotFoundError(), PermissionError(), HttpError(404), NoCredentialsError(),
                                   StoreUnavailable("gave up"), ValueError())] == [False] * 6
    # S3's own codes, as s3fs translates them: a malformed request is answered at once, not retried for minutes
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    def s3(code: str) -> BaseException:
        return translate_boto_error(ClientError({"Error": {"Code": code, "Message": code}}, "GetObject"))
    assert [transient(s3(c)) for c in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
                                      "SomethingNew")] == [True] * 5
    assert [transient(s3(c)) for c in ("PermanentRedirect", "InvalidBucketName", "InvalidArgument",
                                      "KeyTooLongError", "NotImplemented", "AccessDenied", "NoSuchKey")] == [False] * 7
    assert retry_seconds() == 120
    monkeypatch.setenv("MATRYOSHKA_STORE_RETRY_S", "2.5")
    assert retry_seconds() == 2.5
    monkeypatch.setenv("MATRYOSHKA_STORE_RETRY_S", "soon")
    with pytest.raises(ValueError, match="MATRYOSHKA_STORE_RETRY_S: 'soon' is not a number of seconds"):
        retry_seconds()


@pytest.mark.slow
def test_a_harvest_rides_out_an_outage_to_the_same_bytes(outage, gpt2_dir, corpus, tmp_path):
    """A real harvest process loses its store mid-run for 3 s: it waits (the outage meets its chunk writes;
    a commit's write goes through the same retry, a lock check through its own, tested above), and the
    cache ends byte for byte the cache an undisturbed local harvest writes."""
    import subprocess

    from test_remote import _committed, _same_cache
    from test_resume import _args

    url, small = f"{new_bucket('s3')}/c", ("--tokens", str(32 * 144))  # 36 chunks, commits every 3
    assert subprocess.run(_args(gpt2_dir, corpus, tmp_path / "local", *small), capture_output=True).returncode == 0
    proc = subprocess.Popen(_args(gpt2_dir, corpus, url, *small), env=dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _committed(url) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the harvest finished before the outage; make it longer"  # it cannot finish
    # without the store now (its last write completes the cache), so the outage meets it mid-run
    outage.down()
    time.sleep(3)
    outage.up()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "retrying in" in err
    assert Cache(url).complete
    _same_cache(tmp_path / "local", url)


@pytest.mark.slow
def test_an_unreachable_store_or_a_missing_bucket_is_one_line(outage, gpt2_dir, corpus):
    """Before the LM loads, harvest tells a bucket that does not exist from a store it cannot reach (an
    existence check answers False for both); any command meeting a storage error says it in one line."""
    from test_errors import harvest_args, run_bad

    run_bad(harvest_args(gpt2_dir, corpus, "s3://no-such-bucket/c"), "bucket 'no-such-bucket' does not exist")
    outage.down()
    run_bad(harvest_args(gpt2_dir, corpus, "s3://no-such-bucket/c"), "cannot reach 's3://no-such-bucket/c' "
            "(EndpointConnectionError: Could not connect to the endpoint URL", "AWS_ENDPOINT_URL")
    run_bad(["cache", "ls", "s3://no-such-bucket"], "storage: EndpointConnectionError: Could not connect",
            "AWS_ENDPOINT_URL")


@pytest.mark.slow
def test_a_full_local_disk_stops_the_copies_not_the_run(s3_server, tmp_path):
    """``local_cache_dir`` on a disk that fills up: the reader keeps streaming from the store, warns once,
    and leaves no half-written file. The full disk is real for the process: RLIMIT_FSIZE makes every
    write past 64 bytes fail (EFBIG), as ENOSPC would."""
    import json
    import subprocess
    import sys

    url = _bucket_cache(tmp_path)
    cfg = ReaderConfig(batch_size=32, buffer_tokens=128)
    with ShuffledReader(["x"], url, cfg) as r:
        want = _stream(r, r.batches_per_epoch)
    keep = tmp_path / "chunks"
    code = f"""
import json, resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as a full disk does
resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
from matryoshka.cache import Cache
from matryoshka.cache.reader import ReaderConfig, ShuffledReader
with ShuffledReader(["x"], Cache({url!r}, local_cache_dir={str(keep)!r}),
                    ReaderConfig(batch_size=32, buffer_tokens=128)) as r:
    print(json.dumps([next(r)["x"][:, 0].long().tolist() for _ in range(r.batches_per_epoch)]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == want
    assert out.stderr.count("cannot keep copies of chunks") == 1 and "File too large" in out.stderr
    assert not [p for p in keep.rglob(".part-*")]  # no half-written temporary file
