"""Shuffled-reader throughput against the page-cache read and the codec's decode ceiling.

Builds, in a temporary directory, a GPT-2-size cache through the real writer (``fixtures.write_cache``):
two arrays ``8.resid_mid`` and ``8.mlp_out`` of width 768, bf16 storage, blosc lz4 + bitshuffle (the
default codec), context 128, 21 sequences per chunk (2,688 rows, ~4 MiB per array chunk). The data is
activation-like (low rank plus noise, per-token norm and per-dimension scale spread, a few outlier
dimensions), not iid noise; its measured compression ratio is printed. The whole cache fits in the page
cache, so every row measures CPU work (read syscalls, decode, crc, copies), not the disk.

Rows, all on the same cache in one run: plain ``open().read()`` of every chunk file on all cores (after a
warm-up pass); zarr's own ``a[r0:r1]`` per chunk, for reference; the decode ceiling, every chunk read,
crc-checked and decompressed by the codec on a thread pool of one worker per core (best of two passes);
on the CPU, the bound for any reader that delivers shuffled batches in host memory: the ceiling's
decode plus one gather of every row from a random place in a written buffer of the reader's size
(measured alone), all cores busy; ``ShuffledReader`` for one array (SAE), for the pair (transcoder)
and with float32 output, each in a fresh process whose peak RSS growth is sampled: a warm-up epoch,
then ``--rounds`` times an untimed epoch, a timed one and a ceiling pass, the best of each compared;
and where the consumer's thread spent the best epoch (the reader's ``waited`` and its CPU time).

Streaming is timed in its steady state. A reader decodes ahead of its consumer, so the ceiling pass
first waits for that work to finish (else the two share the cores and the ceiling reads low), and the
epoch after a ceiling pass, which starts with blocks decoded during it, is not timed (else it reads
high). Before this, each timed epoch followed a ceiling pass: ratios read 0.1-0.2 too high.

    python benchmarks/reader.py            # 2 x ~590 MiB raw bf16 (150 chunks), buffer 2**18 (~1 min on 2 CPUs)
    python benchmarks/reader.py --quick    # 2 x ~100 MiB raw (25 chunks), buffer 2**16 (~20 s), a smoke run
    python benchmarks/reader.py --device cuda --chunks 400 --threads 0,16,8   # and compare thread counts
    python benchmarks/reader.py --switch-interval 0,0.0002                    # and GIL switch intervals

On a GPU it adds the upload bound: copying pinned blocks to the device, which every row crosses once.
"""
from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from common import machine, print_table
from matryoshka.cache.format import chunk_key, decode_chunk, numpy_view
from matryoshka.cache.reader import ReaderConfig, ShuffledReader, host_buffer
from matryoshka.cache.store import Cache
from matryoshka.cpus import usable_cpus
from matryoshka.fixtures import write_cache

D, CONTEXT, SPC, BOS = 768, 128, 21, 0
SAE, PAIR = ["8.resid_mid"], ["8.resid_mid", "8.mlp_out"]
GPU_STEP = {"seed training step, GPT-2 size, fp32 (H200)": 262e3, "same, TF32 matmuls (H200)": 532e3}


def activations(n: int, seed: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``[n, D]`` rows: rank-64 signal with per-token norm spread, noise, per-dim scales, 4 outlier dims."""
    g = torch.Generator().manual_seed(seed)
    basis, scale = torch.randn(64, D, generator=g) / 8, torch.exp(0.2 * torch.randn(D, generator=g))
    scale[:4] *= 20
    out = torch.empty(n, D, dtype=dtype)
    for i in range(0, n, 2**15):
        m = min(2**15, n - i)
        z = torch.randn(m, 64, generator=g) * torch.exp(0.6 * torch.randn(m, 1, generator=g))
        out[i:i + m] = ((z @ basis + 0.3 * torch.randn(m, D, generator=g)) * scale).to(dtype)
    return out


def build(path: Path, n_chunks: int) -> None:
    n = n_chunks * SPC * CONTEXT
    tokens = np.random.default_rng(0).integers(1, 50257, n, dtype=np.int32)
    tokens[::CONTEXT] = BOS  # BOS at position 0 of every context
    write_cache(path, {name: activations(n, seed) for seed, name in enumerate(PAIR)}, tokens, CONTEXT, SPC,
                dtype="bfloat16", codec="lz4", bos_policy="context", bos_id=BOS, fingerprint="bench-reader")


def timed_pool(fn: Callable[[Any], object], items: list, workers: int) -> float:
    """Seconds to map ``fn`` over ``items`` on a thread pool (pool start-up excluded)."""
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda _: None, range(workers)))
        t0 = time.perf_counter()
        list(pool.map(fn, items))
        return time.perf_counter() - t0


def raw_read(cache: Cache, workers: int) -> tuple[float, int]:
    """Best-of-two seconds to read every chunk file of the SAE array from the page cache, and their bytes."""
    files = [Path(cache.path) / chunk_key(SAE[0], i) for i in range(cache.n_chunks)]

    def read(f: Path) -> int:
        with open(f, "rb") as fh:
            return len(fh.read())
    timed_pool(read, files, workers)  # warm-up: bring the files into the page cache
    return min(timed_pool(read, files, workers) for _ in range(2)), sum(f.stat().st_size for f in files)


def decode_ceiling(cache: Cache, names: list[str], workers: int) -> float:
    """Best-of-two seconds to read, crc-check and decompress every chunk of ``names`` with the codec itself
    (one reused output buffer per thread): the most any reader of these chunks can deliver."""
    scratch = threading.local()

    def load(i: int) -> None:
        for n in names:
            if not hasattr(scratch, "out"):
                scratch.out = np.empty((cache.chunk_tokens, D), np.uint16)
            decode_chunk(cache.chunk_bytes(n, i), "lz4", scratch.out)
    return min(timed_pool(load, list(range(cache.n_chunks)), workers) for _ in range(2))


def zarr_reads(cache: Cache, workers: int) -> float:
    """Best-of-two seconds to read every chunk of one array through zarr (``a[r0:r1]``), for reference."""
    a = cache.array(SAE[0])

    def load(i: int) -> None:
        r = cache.chunk_rows(i)
        a[r.start:r.stop]
    return min(timed_pool(load, list(range(cache.n_chunks)), workers) for _ in range(2))


def gather_seconds(buffer_tokens: int, n_arrays: int, batch: int = 4096) -> float:
    """Median seconds to gather a batch of rows from random places of ``n_arrays`` written buffers of
    ``buffer_tokens`` rows (bf16, huge pages as the reader's), into reused arrays, on one thread: the
    copy any reader that delivers shuffled batches in host memory makes, on top of the decode."""
    bufs = [numpy_view(host_buffer((buffer_tokens, D), torch.bfloat16, pinned=False)) for _ in range(n_arrays)]
    rng = np.random.default_rng(0)
    for b in bufs:  # written: pages never written all map the zero page, which stays in cache
        b[:] = rng.integers(0, 2**16, (1, D), dtype=np.uint16)
    out = [np.empty((batch, D), np.uint16) for _ in bufs]
    times = []
    for _ in range(60):
        idx = rng.integers(0, buffer_tokens, batch)
        t0 = time.perf_counter()
        for b, o in zip(bufs, out):
            np.take(b, idx, axis=0, out=o, mode="wrap")
        times.append(time.perf_counter() - t0)
    return float(np.median(times[5:]))


def upload_seconds(block_rows: int, n_arrays: int) -> float:
    """Best-of-five seconds of one block's host->device copy (pinned, non-blocking, ``n_arrays`` arrays):
    with a device mirror, every row crosses once this way, so it bounds the reader like the decode does."""
    host = [torch.zeros((block_rows, D), dtype=torch.bfloat16, pin_memory=True) for _ in range(n_arrays)]
    dev = [torch.empty_like(h, device="cuda") for h in host]
    times = []
    for _ in range(6):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for h, d in zip(host, dev):
            d.copy_(h, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def reader_run(path: str, names: list[str], buffer_tokens: int, device: str, dtype: torch.dtype | None,
               rounds: int, threads: int, switch_interval: float = 0.0) -> dict[str, Any]:
    """In a fresh process: after a warm-up epoch, ``rounds`` times an untimed epoch, a timed one and one
    decode ceiling pass of the same arrays, alternating, so both see the same machine (a shared VM's
    speed drifts by tens of percent within a minute); the best of each. The untimed epoch starts with
    the blocks decoded during the last ceiling pass; the timed one streams as training does. Also peak
    RSS growth, the stated budget and the number of decode threads the reader started."""
    proc, peak, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)
    if switch_interval:
        sys.setswitchinterval(switch_interval)
    cfg = ReaderConfig(batch_size=4096, buffer_tokens=buffer_tokens, exclude_bos=True, threads=threads)
    if device.startswith("cuda"):
        torch.zeros(1, device=device)  # the CUDA context's own host memory is not the reader's
    base = proc.memory_info().rss
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cache, workers = Cache(path), usable_cpus()
    epochs, ceilings, splits = [], [], []
    with ShuffledReader(names, path, cfg, device=device, dtype=dtype) as reader:
        threads, budget = reader._pool.workers, reader.host_bytes
        for _ in range(reader.batches_per_epoch):  # warm-up epoch: threads, first block, page cache
            next(reader)
        for _ in range(rounds):
            for _ in range(reader.batches_per_epoch):
                next(reader)
            waited, cpu = dict(reader.waited), time.thread_time()
            n, t0 = 0, time.perf_counter()
            for _ in range(reader.batches_per_epoch):
                n += len(next(reader)[names[0]])
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            epochs.append(time.perf_counter() - t0)
            split = [(reader.waited[k] - waited[k]) / epochs[-1] for k in ("decode", "gather", "upload")]
            splits.append([*split, (time.thread_time() - cpu) / epochs[-1]])
            reader.settle()
            done.set()  # the ceiling's own buffers are not the reader's memory
            ceilings.append(decode_ceiling(cache, names, workers))
            done.clear()
    done.set()
    sampler.join()
    return {"seconds": min(epochs), "rows": n, "ceiling": min(ceilings), "rss": peak[0] - base, "budget": budget,
            "threads": threads, "split": splits[epochs.index(min(epochs))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 x ~100 MiB cache, buffer 2**16: a smoke run")
    ap.add_argument("--device", default="cpu", help="where the reader delivers batches: cpu or cuda")
    ap.add_argument("--chunks", type=int, default=None, help="chunks per array (default 150, --quick 25)")
    ap.add_argument("--rounds", type=int, default=3, help="timed reader epochs (and ceiling passes) per reader")
    ap.add_argument("--switch-interval", default="0", help="seconds, comma-separated to compare several: the "
                    "reader process's sys.setswitchinterval, how long a thread waiting for the GIL lets its holder run "
                    "on (0: Python's default, 5 ms)")
    ap.add_argument("--threads", default="0", help="the readers' decode threads, comma-separated to compare several "
                    "(0: the reader's default)")
    args = ap.parse_args()
    n_chunks = args.chunks or (25 if args.quick else 150)
    buffer_tokens = 2**16 if args.quick else 2**18
    workers, start = usable_cpus(), time.perf_counter()
    print(machine(args.device))
    with tempfile.TemporaryDirectory(prefix="bench-reader-") as tmp:
        path = Path(tmp) / "cache"
        t0 = time.perf_counter()
        build(path, n_chunks)
        cache, build_s = Cache(path), time.perf_counter() - t0
        n_rows = cache.manifest["n_tokens"]
        raw_mib = n_rows * D * 2 / 2**20
        stored = {a: sum((path / chunk_key(a, i)).stat().st_size for i in range(n_chunks)) for a in PAIR}
        ratios = ", ".join(f"{a} {n_rows * D * 2 / s:.3f}" for a, s in stored.items())
        print(f"cache: {n_rows:,} rows x {D} per array, {len(PAIR)} arrays, bf16, lz4 + bitshuffle, {n_chunks} chunks "
              f"of {cache.chunk_tokens:,} rows ({cache.chunk_tokens * D * 2 / 2**20:.2f} MiB raw per array), "
              f"{raw_mib:,.0f} MiB raw per array, written in {build_s:.0f}s")
        print(f"compression ratio (raw / stored bytes): {ratios}; whole cache in page cache "
              f"({sum(stored.values()) / 2**20:,.0f} MiB on disk, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM)")

        raw_s, raw_bytes = raw_read(cache, workers)
        ceil = {len(names): decode_ceiling(cache, names, workers) for names in (SAE, PAIR)}
        block = buffer_tokens // 2 // cache.chunk_tokens * cache.chunk_tokens
        rows: list[tuple[str, float, int, int, float | None]] = [  # what, seconds, rows, bytes per row, ceiling s
            (f"raw open().read() of chunk files, {workers} threads (file bytes {raw_bytes / raw_s / 1e9:.2f} GB/s)",
             raw_s, n_rows, D * 2, None),
            (f"zarr a[r0:r1] per chunk, {workers} threads, 1 array (for reference)", zarr_reads(cache, workers),
             n_rows, D * 2, None),
            (f"decode ceiling: read + crc32c + lz4 per chunk, {workers} threads, 1 array", ceil[1], n_rows, D * 2,
             ceil[1]),
            (f"decode ceiling: read + crc32c + lz4 per chunk, {workers} threads, 2 arrays", ceil[2], n_rows,
             2 * D * 2, ceil[2])]
        if args.device.startswith("cuda"):
            for names in (SAE, PAIR):
                per_block = upload_seconds(block, len(names))
                rows.append((f"upload bound: host->device copy of pinned blocks of {block:,} rows, {len(names)} "
                             f"array{'s' * (len(names) > 1)}", per_block * n_rows / block, n_rows,
                             len(names) * D * 2, ceil[len(names)]))
        else:
            for names in (SAE, PAIR):
                g = gather_seconds(buffer_tokens, len(names)) * n_rows / 4096 / workers
                rows.append((f"bound: ceiling's decode + a random-row gather per row from a written "
                             f"{buffer_tokens:,}-row buffer (alone {g * workers / n_rows * 4096e3:.2f} ms per "
                             f"4096 rows), {workers} cores, {len(names)} array{'s' * (len(names) > 1)}",
                             ceil[len(names)] + g, n_rows,
                             len(names) * D * 2, ceil[len(names)]))
        runs = [("ShuffledReader SAE, 1 array, out bf16", SAE, None),
                ("ShuffledReader transcoder, 2 arrays, out bf16", PAIR, None),
                ("ShuffledReader SAE, 1 array, out float32", SAE, torch.float32)]
        mem, split = [], []
        ctx = mp.get_context("spawn")
        for what, names, dtype in runs:
            for threads, switch in itertools.product([int(t) for t in args.threads.split(",")],
                                                     [float(x) for x in args.switch_interval.split(",")]):
                with ProcessPoolExecutor(1, mp_context=ctx) as pool:
                    r = pool.submit(reader_run, str(path), names, buffer_tokens, args.device, dtype, args.rounds,
                                    threads, switch).result()
                what_t = f"{what}, {r['threads']} threads" + (f", GIL switch {switch * 1e3:g} ms" if switch else "")
                rows.append((what_t, r["seconds"], r["rows"], len(names) * D * 2, r["ceiling"]))
                mem.append((what_t, r["rss"], r["budget"]))
                split.append((what_t, *r["split"]))

    print(f"\nReader throughput: best of {args.rounds} steady-state epochs (each after an untimed one), batch 4096, "
          f"buffer_tokens "
          f"{buffer_tokens:,}, exclude_bos, device {args.device}")
    print("   GB/s = delivered activation bytes in storage dtype (bf16, all arrays); readers deliver 127/128 of the "
          "rows (BOS dropped)")
    print("   vs ceiling = GB/s / the decode ceiling of the same arrays; for the upload bound and the readers, the "
          "ceiling measured between their passes (best of as many), as the machine's speed drifts")
    table = []
    for what, s, n, row, ceiling_s in rows:
        vs = f"{n * row / s / (n_rows * row / ceiling_s):.2f}x" if ceiling_s else "-"
        table.append([what, f"{n / s:,.0f}", f"{n * row / s / 1e9:.2f}", vs])
    print_table(["what", "tok/s", "GB/s", "vs ceiling"], table)
    print("   target (issue): ShuffledReader >= 0.80x the decode ceiling")

    print("\nReader peak RSS growth (sampled every 2 ms) against its stated budget (reader.host_bytes: the buffer's "
          "two halves and, on the CPU, 4 batches: 2 being gathered, 1 served, 1 still held)")
    print_table(["reader", "peak RSS growth MiB", "budget MiB", "growth / budget"],
                [[w, f"{r / 2**20:,.0f}", f"{b / 2**20:,.0f}", f"{r / b:.2f}"] for w, r, b in mem])

    print("\nWhere the consumer's thread spent its best epoch: waiting for blocks to decompress, for workers to "
          "gather a batch (CPU), for a half's copy to the device, and serving batches on a core or off one (waiting "
          "for the GIL or a core; on the CPU this includes gathering a batch no worker had begun)")
    print_table(["reader", "wait decode", "wait gather", "wait upload", "serving on CPU", "serving off CPU"],
                [[w, *(f"{x:.0%}" for x in (d, g, u, c, max(0.0, 1 - d - g - u - c)))] for w, d, g, u, c in split])

    sae = max(n / s for what, s, n, _, _ in rows if what.startswith("ShuffledReader SAE"))
    print(f"\nContext (design.md section 9; GPU figures from an H200, reader figure from this {workers}-CPU machine):")
    print_table(["training step", "tok/s", "reader SAE tok/s / step"],
                [[k, f"{v:,.0f}", f"{sae / v:.2f}x"] for k, v in GPU_STEP.items()])
    print(f"\ntotal {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
