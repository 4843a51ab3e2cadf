"""The shuffled reader: exact coverage, determinism, exact resume, mixing, bounded memory, pairing."""
from __future__ import annotations

import pickle
import threading
import time

import numpy as np
import pytest
import torch

from matryoshka.cache import Cache, CacheError
from matryoshka.cache.plan import ReadPlan, block_bounds, bos_to_exclude
from matryoshka.cache.reader import ReaderConfig, RecycledArrays, ShuffledReader, default_threads
from matryoshka.fixtures import write_cache

CTX, SPC, N_SEQS, HELD = 16, 4, 96, 8  # 24 chunks of 64 rows; 2 held out


def _rows(n: int, width: int, sign: float = 1.0) -> np.ndarray:
    """Row r carries r in column 0 (exact in float32), so every served row names itself."""
    a = np.random.default_rng(width).standard_normal((n, width)).astype(np.float32)
    a[:, 0] = sign * np.arange(n)
    return a


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    n = N_SEQS * CTX
    tokens = np.random.default_rng(0).integers(4, 300, n)
    tokens[::CTX] = 0  # BOS at every context start
    path = tmp_path_factory.mktemp("r") / "cache"
    return write_cache(path, {"src": _rows(n, 8), "tgt": _rows(n, 4, -1.0)}, tokens, CTX, SPC, heldout_seqs=HELD)


def _reader(cache, **kw):
    rank = kw.pop("rank", 0)
    world = kw.pop("world_size", 1)
    state = kw.pop("state", None)
    mirror = kw.pop("mirror", None)
    dtype = kw.pop("dtype", None)
    cfg = ReaderConfig(**{"batch_size": 32, "buffer_tokens": 256, **kw})
    return ShuffledReader(["src", "tgt"], str(cache), cfg, rank=rank, world_size=world, state=state, mirror=mirror,
                          dtype=dtype)


def _ids(batch) -> list[int]:
    return batch["src"][:, 0].long().tolist()


def _epoch(reader) -> list[list[int]]:
    return [_ids(next(reader)) for _ in range(reader.batches_per_epoch)]


def _train_rows(include_bos=False) -> set[int]:
    rows = range(HELD * CTX, N_SEQS * CTX)
    return {r for r in rows if include_bos or r % CTX}


def test_every_train_row_exactly_once_per_epoch(cache):
    with _reader(cache) as r:
        for epoch in range(2):
            rows = [x for b in _epoch(r) for x in b]
            assert sorted(rows) == sorted(_train_rows()) and r.epoch == epoch
        assert all(len(b) == 32 for b in _epoch(r)[:-1])


def test_drop_last_serves_full_batches_and_resumes_exactly(cache):
    """Training's setting: 22 chunks of 60 rows are 41 full batches of 32 and 8 rows left out, each epoch
    (a different 8); a cursor taken mid-epoch resumes the same stream."""
    with _reader(cache, drop_last=True) as r:
        assert r.batches_per_epoch == 41
        seen = []
        for _epoch_number in range(2):
            rows = [x for b in _epoch(r) for x in b]
            assert len(rows) == len(set(rows)) == 41 * 32 and set(rows) <= _train_rows()
            seen.append(_train_rows() - set(rows))
        assert seen[0] != seen[1]
        for _ in range(5):
            next(r)
        cursor = r.state_dict()  # mid-epoch, with batches being gathered
        expected = [_ids(next(r)) for _ in range(50)]
        r.load_state_dict(cursor)
        assert [_ids(next(r)) for _ in range(50)] == expected
        r.load_state_dict(cursor)
        next(r)
        cursor = r.state_dict()
        r.close()
        assert _same_cursor(r.state_dict(), cursor)  # closing keeps the rows being gathered waiting
        with pytest.raises(CacheError, match="reader: it is closed"):
            next(r)
    with _reader(cache, drop_last=True, state=cursor) as resumed:
        assert [_ids(next(resumed)) for _ in range(49)] == expected[1:]


def _same_cursor(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) if k == "pool_rows" else a[k] == b[k] for k in a)


def test_bos_rows_can_be_kept_and_heldout_split_is_separate(cache):
    with _reader(cache, exclude_bos=False) as r:
        assert sorted(x for b in _epoch(r) for x in b) == sorted(_train_rows(include_bos=True))
    with _reader(cache, split="heldout", batch_size=8, buffer_tokens=128) as r:
        assert sorted(x for b in _epoch(r) for x in b) == [x for x in range(HELD * CTX) if x % CTX]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_are_disjoint_and_cover_the_split(cache, world):
    seen = []
    for rank in range(world):
        with _reader(cache, rank=rank, world_size=world) as r:
            rows = [x for b in _epoch(r) for x in b]
            chunks = {x // (SPC * CTX) for x in rows}
            seen.append((rows, chunks))
    all_rows = [x for rows, _ in seen for x in rows]
    assert sorted(all_rows) == sorted(_train_rows())
    for i in range(world):
        for j in range(i):
            assert not seen[i][1] & seen[j][1]  # whole chunks per rank


def test_epochs_differ_and_seed_decides(cache):
    with _reader(cache) as a, _reader(cache) as b, _reader(cache, seed=1) as c:
        ea, eb, ec = _epoch(a), _epoch(b), _epoch(c)
        assert ea == eb and ea != ec
        assert _epoch(a) != ea


@pytest.mark.parametrize("mirror", [False, True])  # the CPU path, and the GPU's schedule run on the CPU
@pytest.mark.parametrize("stop_at", [1, 4, 7, 13, 20])  # mid-block, at a block's end, past an epoch (13 per epoch)
def test_resume_from_cursor_equals_uninterrupted(cache, stop_at, mirror):
    with _reader(cache) as whole:
        expected = [_ids(next(whole)) for _ in range(stop_at + 12)]
    with _reader(cache, mirror=mirror) as first:
        got = [_ids(next(first)) for _ in range(stop_at)]
        cursor = pickle.loads(pickle.dumps(first.state_dict()))  # as a checkpoint would store it
    with _reader(cache, state=cursor, mirror=mirror) as resumed:
        got += [_ids(next(resumed)) for _ in range(12)]
    assert got == expected


@pytest.mark.parametrize("buffer", [128, 256])  # blocks of 1 and of 2 chunks
def test_the_mirror_schedule_serves_the_same_stream_and_resumes(cache, buffer):
    """With a mirror (the GPU path, here on the CPU) two blocks decompress while one is served, and the
    stream is the plain reader's, bit for bit, across epochs and through a resume."""
    with _reader(cache, buffer_tokens=buffer) as plain, \
            ShuffledReader(["src", "tgt"], str(cache), ReaderConfig(batch_size=32, buffer_tokens=buffer),
                           mirror=True) as mirrored:
        depth = set()
        for _ in range(3 * plain.batches_per_epoch):
            a, b = next(plain), next(mirrored)
            depth.add((len(plain._loads), len(mirrored._loads)))
            assert torch.equal(a["src"], b["src"]) and torch.equal(a["tgt"], b["tgt"])
        assert max(p for p, _ in depth) <= 2 and max(m for _, m in depth) == 2
        cursor = mirrored.state_dict()
        expected = [_ids(next(plain)) for _ in range(8)]
    with ShuffledReader(["src", "tgt"], str(cache), ReaderConfig(batch_size=32, buffer_tokens=buffer),
                        mirror=True, state=cursor) as resumed:
        assert [_ids(next(resumed)) for _ in range(8)] == expected


def test_the_stream_does_not_depend_on_the_number_of_threads(cache):
    """One worker both decompresses and gathers (a decompression waits for gathers reading its half,
    which go first): the same stream as three workers, with no deadlock."""
    streams = []
    for threads in (1, 3):
        with _reader(cache, threads=threads, buffer_tokens=384) as r:
            streams.append([_ids(next(r)) for _ in range(2 * r.batches_per_epoch + 3)])
    assert streams[0] == streams[1]


def test_decode_threads_default_to_all_cores_but_a_quarter(cache):
    """The serving thread keeps a quarter of the cores (measured on a 16-core GPU host: 12 decode threads
    beat 16 and 8); on 2 cores both decode."""
    assert [default_threads(c) for c in (1, 2, 3, 4, 16, 64)] == [1, 2, 3, 3, 12, 48]
    with _reader(cache) as r:
        assert r._pool.workers == default_threads()


def test_training_streams_split_the_default_among_them(cache, monkeypatch):
    """The trainer's streams share the host: on 16 cores one stream decodes on 12 threads, two streams in
    one process on 6 each (8 cores each, less a quarter)."""
    from matryoshka.cache.store import Cache
    from matryoshka.train.distributed import RankStreams, Team

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    for data_ranks, want in ((1, [12]), (2, [6, 6])):
        streams = RankStreams(["src"], Cache(str(cache)), ReaderConfig(batch_size=32, buffer_tokens=256), Team(),
                              data_ranks, torch.device("cpu"), torch.float32)
        assert [r._pool.workers for r in streams.readers] == want
        streams.close()


def test_batches_mix_many_sequences_and_positions(cache):
    """Bound: a batch is a uniform sample of one block of buffer/2 rows from buffer/(2*chunk) chunks. With a
    256-row buffer (blocks of 2 chunks, 8 sequences), every full batch of 32 spans >= 4 sequences,
    >= 2 chunks and >= 10 positions, and no sequence supplies more than half of it."""
    with _reader(cache) as r:
        for batch in _epoch(r)[:-1]:
            seqs = np.asarray(batch) // CTX
            assert len(set(seqs)) >= 4 and len(set(np.asarray(batch) // (SPC * CTX))) >= 2
            assert len(set(np.asarray(batch) % CTX)) >= 10
            assert np.bincount(seqs).max() <= 16


def test_an_epochs_blocks_are_even_so_its_last_rows_still_mix_chunks(cache):
    """22 train chunks in blocks of at most 3: 8 blocks of 2 or 3 chunks, not 7 of 3 and a last one of 1
    whose rows, the epoch's last, would all come from one chunk. A cursor from before is refused."""
    assert block_bounds(22, 3).tolist() == [0, 2, 5, 8, 11, 13, 16, 19, 22]
    assert block_bounds(6, 3).tolist() == [0, 3, 6]
    with _reader(cache, buffer_tokens=6 * SPC * CTX) as r:
        last = np.concatenate(_epoch(r))[-SPC * (CTX - 1):]  # as many rows as one chunk serves
        assert len(set(last // (SPC * CTX))) >= 2
        old = {k: v for k, v in r.state_dict().items() if k != "blocks"}
        with pytest.raises(CacheError, match="reader cursor: saved blocks None differs from this reader's 'even'"):
            r.load_state_dict(old)


def test_source_and_target_stay_paired(cache):
    with _reader(cache) as r:
        for _ in range(2 * r.batches_per_epoch):
            b = next(r)
            assert torch.equal(b["src"][:, 0], -b["tgt"][:, 0])
            ref_src, ref_tgt = _rows(N_SEQS * CTX, 8), _rows(N_SEQS * CTX, 4, -1.0)
            ids = b["src"][:, 0].long().numpy()
            np.testing.assert_array_equal(r.last_rows, ids)
            np.testing.assert_array_equal(b["src"].numpy(), ref_src[ids])
            np.testing.assert_array_equal(b["tgt"].numpy(), ref_tgt[ids])


@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_batches_the_consumer_keeps_are_never_overwritten_and_released_ones_are_reused(cache, dtype):
    """The CPU path gathers into recycled arrays: only those no tensor or view refers to any more."""
    with _reader(cache, dtype=dtype) as keeper, _reader(cache, dtype=dtype) as copier:
        n = 2 * keeper.batches_per_epoch
        kept = [next(keeper) for _ in range(n)]
        views = [b["src"][:3] for b in kept[:5]]
        del kept[:5]  # only views of these remain, and they must hold on too
        copied = [{k: v.clone() for k, v in next(copier).items()} for _ in range(n)]
        assert len({b["src"].data_ptr() for b in kept}) == len(kept)
        for v, c in zip(views, copied[:5]):
            assert torch.equal(v, c["src"][:3])
        for b, c in zip(kept, copied[5:]):
            assert torch.equal(b["src"], c["src"]) and torch.equal(b["tgt"], c["tgt"])


def test_recycled_arrays_come_back_only_once_nothing_refers_to_them():
    def address(x: np.ndarray) -> int:
        return x.__array_interface__["data"][0]

    pool = RecycledArrays(keep=2)
    a = pool.get((4, 3), np.float32)
    first = address(a)
    view = torch.from_numpy(a)[1:]  # a view of a tensor made from it holds it
    del a
    b = pool.get((4, 3), np.float32)
    second = address(b)
    assert second != first
    extra = pool.get((4, 3), np.float32)  # both kept arrays are held: a new one, not kept
    assert address(extra) not in (first, second)
    del b, extra
    b = pool.get((4, 3), np.float32)
    assert address(b) == second
    del view
    assert address(pool.get((4, 3), np.float32)) == first  # b is still held


def test_the_reader_counts_the_time_its_consumer_waited_for_decompression(cache, monkeypatch):
    decode = ShuffledReader._decode

    def slow_decode(self, *args):
        time.sleep(0.02)
        return decode(self, *args)

    monkeypatch.setattr(ShuffledReader, "_decode", slow_decode)
    with _reader(cache, threads=2) as r:
        assert r.waited == {"decode": 0.0, "gather": 0.0, "upload": 0.0}
        t0 = time.perf_counter()
        _epoch(r)
        took = time.perf_counter() - t0
    # 22 chunks of 20 ms on 2 threads: at least 0.22 s of decoding, which serving 42 small batches hides
    # little of; no mirror, so no upload
    assert 0.15 < r.waited["decode"] <= took and r.waited["upload"] == 0


def test_output_dtype_is_the_consumers_choice(cache):
    cfg = ReaderConfig(batch_size=32, buffer_tokens=128)
    with ShuffledReader(["src"], str(cache), cfg, dtype=torch.bfloat16) as r:
        b = next(r)
        assert b["src"].dtype == torch.bfloat16 and list(b) == ["src"]


@pytest.mark.parametrize("storage", ["bfloat16", "float16"])
def test_float32_output_is_the_exact_cast_of_the_stored_values(tmp_path, storage):
    n = 8 * CTX
    rows = _rows(n, 8) / 7  # values a half-precision format must round
    path = write_cache(tmp_path / storage, {"x": rows}, np.ones(n, int), CTX, SPC, dtype=storage)
    stored = torch.from_numpy(rows).to(getattr(torch, storage))
    with ShuffledReader(["x"], str(path), ReaderConfig(batch_size=32, buffer_tokens=128, exclude_bos=False),
                        dtype=torch.float32) as r:
        b = next(r)
        assert b["x"].dtype == torch.float32
        assert torch.equal(b["x"], stored[torch.from_numpy(r.last_rows)].float())


def test_memory_stays_bounded_on_a_cache_much_larger_than_the_buffer(tmp_path):
    import psutil

    width, ctx, n = 512, 64, 1 << 17  # 256 MiB of float32 rows
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 300, n)
    tokens[::ctx] = 0
    path = write_cache(tmp_path / "big", {"x": rng.standard_normal((n, width), dtype=np.float32)}, tokens, ctx,
                       seqs_per_chunk=16, heldout_seqs=16)
    cfg = ReaderConfig(batch_size=1024, buffer_tokens=16384)
    # the buffer and, float32 rows served as stored, 4 batch arrays: 2 being gathered, 1 served, 1 still held
    budget = (cfg.buffer_tokens + 4 * cfg.batch_size) * width * 4  # 40 MiB
    proc = psutil.Process()
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(0.005)

    base = proc.memory_info().rss
    with ShuffledReader(["x"], str(path), cfg) as r:
        assert r.host_bytes == budget
        t = threading.Thread(target=sample)
        t.start()
        served = sum(next(r)["x"].shape[0] for _ in range(2 * r.batches_per_epoch)) // 2
        done.set()
        t.join()
    assert served == (n - 16 * ctx) * (ctx - 1) // ctx
    growth = peak[0] - base
    # The budget counts our buffers; the compressed chunks being read and the allocator's per-thread
    # arenas add a constant on top. Whatever the constant, it is far below the 512 MiB streamed.
    assert growth < 2 * budget, (f"reader grew by {growth / 2**20:.0f} MiB streaming 512 MiB "
                                 f"(budget {budget / 2**20:.0f})")
    with ShuffledReader(["x"], str(path), cfg, mirror=True) as mirrored:  # a mirror on the CPU: the buffer twice
        assert mirrored.host_bytes == 2 * cfg.buffer_tokens * width * 4


def test_the_plan_checks_the_team_and_lays_out_each_ranks_epochs(cache):
    """A rank outside the team, or more ranks than chunks, is one line. For 3 ranks the plan gives the 22
    train chunks (60 rows each without BOS) out as 8, 7 and 7, disjoint and together the split, in blocks
    of at most 2 chunks (a 256-row buffer: two halves of two 64-row chunks) that alternate halves."""
    with pytest.raises(CacheError, match=r"rank: 3 is not in 0\.\.2"):
        _reader(cache, rank=3, world_size=3)
    with pytest.raises(CacheError, match="world_size: 23 ranks but the train split has only 22 chunks"):
        _reader(cache, world_size=23)
    c = Cache(str(cache))
    plans = [ReadPlan.make(c, ReaderConfig(batch_size=32, buffer_tokens=256), r, 3, bos_to_exclude(c.manifest, True))
             for r in range(3)]
    orders = [p.chunk_order(5) for p in plans]
    assert [len(o) for o in orders] == [8, 7, 7] and sorted(c for o in orders for c in o) == plans[0].chunks
    assert plans[0].chunk_order(5, every_rank=True)[1::3] == orders[1]
    assert [p.split_tokens for p in plans] == [22 * 60] * 3 and plans[0].half == 128
    assert [p.bounds.tolist() for p in plans] == [[0, 2, 4, 6, 8], [0, 1, 3, 5, 7], [0, 1, 3, 5, 7]]
    assert [p.batches_in_epoch(5) for p in plans] == [15, 14, 14]  # 480 and 420 rows in batches of 32
    assert [plans[0].half_of(e, b) for e in (0, 1) for b in range(4)] == [0, 1, 0, 1] * 2
    assert plans[1].block_chunks(orders[1], 1) == orders[1][1:3]
    assert plans[1].places(orders[1])[orders[1][2]] == (1, 1)


def test_bad_input(cache, tmp_path):
    with pytest.raises(CacheError, match="is not a cache"):
        ShuffledReader(["src"], str(tmp_path / "nope"))
    with pytest.raises(CacheError, match="has no array 'mlp_out'; it has src, tgt"):
        ShuffledReader(["mlp_out"], str(cache))
    with pytest.raises(CacheError, match="buffer_tokens: 48 is smaller than two batches of 32"):
        ShuffledReader(["src"], str(cache), ReaderConfig(batch_size=32, buffer_tokens=48))
    with pytest.raises(CacheError, match=r"buffer_tokens: 96 is less than two chunks of 64 rows; .* >= 128"):
        ShuffledReader(["src"], str(cache), ReaderConfig(batch_size=16, buffer_tokens=96))
    with pytest.raises(CacheError, match=r"buffer_tokens: 128 makes blocks of as few as 1 chunk\(s\) of 64 rows, "
                       r"which can "
                       r"serve as few as 60 rows without BOS, fewer than batch_size 64; .* use buffer_tokens >= 256"):
        ShuffledReader(["src"], str(cache), ReaderConfig(batch_size=64, buffer_tokens=128))
    with pytest.raises(CacheError, match="mirror: False needs device cpu, not meta"):
        ShuffledReader(["src"], str(cache), ReaderConfig(batch_size=32, buffer_tokens=128), device="meta", mirror=False)
    with pytest.raises(CacheError, match="batch_size: 5000 is larger than the train split"):
        ShuffledReader(["src"], str(cache), ReaderConfig(batch_size=5000, buffer_tokens=10000))
    n = 8 * CTX
    other = write_cache(tmp_path / "other", {"tgt": _rows(n, 4)}, np.zeros(n, int), CTX, SPC, fingerprint="other")
    with pytest.raises(CacheError, match="different caches"):
        ShuffledReader(["src", (str(other), "tgt")], str(cache))
    with ShuffledReader(["src", (str(cache), "tgt")], str(cache),
                        ReaderConfig(batch_size=32, buffer_tokens=128)) as same:
        b = next(same)
        assert torch.equal(b["src"][:, 0], -b["tgt"][:, 0])
    import zarr

    partial = write_cache(tmp_path / "partial", {"src": _rows(n, 4)}, np.zeros(n, int), CTX, SPC)
    zarr.open_group(str(partial), mode="r+").attrs.update({"complete": False, "progress": {"chunks": 1}})
    with pytest.raises(CacheError,
                       match=r"unfinished harvest \(1 of 2 chunks\); finish it with `pipeline harvest --resume`"):
        ShuffledReader(["src"], str(partial))


def test_a_file_url_is_the_local_cache(cache):
    """``file://`` names the local directory (its flock, its reads); object storage is tests/test_remote.py's."""
    with _reader(cache) as local, _reader(f"file://{cache}") as url:
        assert url.cache.path == str(cache) and not url.cache.remote
        assert _epoch(local) == _epoch(url)


@pytest.mark.parametrize("codec, dtype", [("lz4", np.uint16), ("zstd", np.uint16), ("none", np.float32),
                                          ("zstd", np.int32)])
def test_writer_encodes_the_bytes_zarr_would_store(tmp_path, codec, dtype):
    """The writer encodes chunks on its own threads; zarr must store, and read back, the very same bytes."""
    import zarr

    from matryoshka.cache.format import compressors, encode_chunk

    a = (np.random.default_rng(0).standard_normal((64, 24)) * 100).astype(dtype)
    arr = zarr.create_group(str(tmp_path)).create_array("x", shape=a.shape, chunks=a.shape, dtype=a.dtype,
                                                        compressors=compressors(codec, a.itemsize), fill_value=0)
    arr[...] = a
    assert (tmp_path / "x" / "c" / "0" / "0").read_bytes() == encode_chunk(a, codec)


def test_float8_rows_carry_their_scale_and_round_to_the_nearest_step():
    from matryoshka.cache.format import decode, from_storage, to_storage

    exact = torch.tensor([[896.0, 3.0, -0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])  # scale 2: every value representable
    stored = to_storage(exact, "float8")
    assert stored.dtype == torch.uint8 and stored.shape == (2, 8)
    assert stored[0, 4:].view(torch.float32).item() == 2.0 and stored[1, 4:].view(torch.float32).item() == 1.0
    assert torch.equal(from_storage(stored, "float8", torch.float32), exact)
    x = torch.randn(64, 256) * torch.logspace(-3, 3, 256)  # six decades within each row
    stored = to_storage(x, "float8")
    y = from_storage(stored, "float8", torch.float32)
    np.testing.assert_array_equal(decode(stored.numpy(), "float8"), y.numpy())  # numpy and torch agree
    scale = x.abs().amax(1, keepdim=True) / 448
    # e4m3: 3 mantissa bits, so half a step is |x| / 16 at most; below 2**-6 * scale, subnormal steps of 2**-9
    assert ((y - x).abs() <= torch.maximum(x.abs() / 16, scale * 2**-10) * (1 + 1e-6)).all()
    assert y.abs().amax(1).sub(x.abs().amax(1)).abs().max() < 1e-3 * x.abs().max()  # the row's peak is kept


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float8"])
def test_writer_finds_non_finite_rows_from_the_stored_bits_and_sums_in_float64(dtype):
    from matryoshka.cache.format import decode, to_storage
    from matryoshka.cache.writer import chunk_sums, nonfinite_rows

    x = torch.randn(64, 16, dtype=torch.float64) * 100
    stored = to_storage(x, dtype).numpy()
    assert len(nonfinite_rows(stored, decode(stored, dtype), dtype)) == 0
    for row, value in [(3, float("inf")), (40, float("nan")), (41, -float("inf"))]:
        x[row, row % 16] = value
    stored = to_storage(x, dtype).numpy()
    assert nonfinite_rows(stored, decode(stored, dtype), dtype).tolist() == [3, 40, 41]
    served = decode(to_storage(x[:3], dtype).numpy(), dtype).astype(np.float64)
    count, total, sq = chunk_sums(decode(to_storage(x[:3], dtype).numpy(), dtype))
    assert count == 3 and np.array_equal(total, served.sum(0)) and sq == pytest.approx((served**2).sum(), rel=1e-15)


def test_data_ranks_with_drop_last_stay_in_step_and_never_serve_a_row_twice(cache):
    """22 training chunks over 3 ranks: 8, 7 and 7 of them, so the ranks' rows differ. With drop_last (how
    training reads), every rank serves the batches the smallest one fills (7 x 60 rows // 32 = 13), so the
    streams stay in one epoch, step by step, and a global batch (one batch per rank) never holds a row twice;
    the cursor still resumes across the epoch boundary the cut makes."""
    readers = [_reader(cache, rank=r, world_size=3, drop_last=True) for r in range(3)]
    try:
        for epoch in range(3):
            assert [r.batches_in_epoch(epoch) for r in readers] == [13, 13, 13]
            seen: set[int] = set()
            for _ in range(13):
                rows = [x for r in readers for x in _ids(next(r))]
                assert [r.epoch for r in readers] == [epoch] * 3
                assert len(set(rows)) == len(rows) == 96 and not seen & set(rows)
                seen |= set(rows)
            assert seen < _train_rows()
        state = readers[0].state_dict()
        want = [_ids(next(readers[0])) for _ in range(20)]
    finally:
        for r in readers:
            r.close()
    with _reader(cache, rank=0, world_size=3, drop_last=True, state=state) as resumed:
        assert [_ids(next(resumed)) for _ in range(20)] == want
    with pytest.raises(CacheError, match="batch_size: 448 rows is more than one of the 3 ranks holds in epoch 0"):
        _reader(cache, rank=1, world_size=3, drop_last=True, batch_size=448, buffer_tokens=1024)


def test_a_reader_stopped_by_an_error_refuses_to_go_on(tmp_path):
    """An unreadable chunk ends the stream's place in it (the batch being served is lost), so the reader
    says so on every later call instead of serving a stream with a hole, and gives no cursor."""
    n = 8 * SPC * CTX
    path = write_cache(tmp_path / "c", {"src": _rows(n, 8)}, np.ones(n, int), CTX, SPC)
    chunk = path / "acts" / "src" / "c" / "5" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 1
    chunk.write_bytes(bytes(data))
    with ShuffledReader(["src"], str(path), ReaderConfig(batch_size=16, buffer_tokens=128)) as r:
        with pytest.raises(CacheError, match="chunk 5 of src .* is unreadable"):
            for _ in range(r.batches_per_epoch):
                next(r)
        with pytest.raises(CacheError, match=r"reader: it stopped at an error \(CacheError: cache: chunk 5"):
            next(r)
        with pytest.raises(CacheError, match="its cursor is lost"):
            r.state_dict()


def test_a_cursor_of_a_reader_that_kept_bos_rows_is_refused_by_name(cache):
    with _reader(cache, exclude_bos=False) as r:
        next(r)
        state = r.state_dict()
    with pytest.raises(CacheError, match="reader cursor: saved exclude_bos False differs from this reader's True"):
        _reader(cache, state=state)
