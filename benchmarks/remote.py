"""Caches on object storage: reader throughput from a local S3 server against the local-disk reader.

Builds the GPT-2-size cache of ``benchmarks/reader.py`` (two bf16 arrays of width 768, lz4, ~4 MiB chunks
of 2,688 tokens) in a temporary directory, starts moto's S3 server in its own process on a free localhost
port, uploads the cache to it, and reads one epoch of the transcoder pair (``8.resid_mid``, ``8.mlp_out``) with
``ShuffledReader`` from each place, after a warm-up epoch, in one run:

* local disk (page cache): the baseline;
* S3, the shipped reader: an I/O thread fetches each next block's chunks in one concurrent request;
* S3, one request per chunk from the decode threads (the read-ahead switched off), for comparison;
* S3 with a local read-through copy (``local_cache_dir``): the warm-up epoch fills it, the timed one reads it;
* and, for scale, the server's own ceiling: every chunk of the epoch fetched in one request, not decoded.

A local S3 server has no network latency but costs CPU per request (moto is Python), on the same cores
as the reader; a real bucket adds latency, which the concurrent fetch hides, and takes the server's CPU
off this machine.

Copy (``--section copy``): ``pipeline cache copy`` of that cache up to the server and back down, against
fsspec's own recursive put and get of the same files.

Harvest (``--section harvest``): tokens/s of one harvest with 1 worker and with 2 (torchrun), to local
disk and to S3, start-up subtracted (see ``harvest_section``).

Runs (``--section runs``): one training with its run folder on local disk, then on S3 (checkpoints
published; see ``runs_section``).

    python benchmarks/remote.py            # 48 chunks (2 x ~250 MiB raw), blocks of 8 chunks
    python benchmarks/remote.py --quick    # 12 chunks, blocks of 2, a smoke run
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fsspec

from common import machine, print_table
from matryoshka.cache.copy import copy_cache
from matryoshka.cache.format import chunk_key
from matryoshka.cache.reader import ReaderConfig, ShuffledReader
from matryoshka.cache.store import Cache
from matryoshka.cpus import usable_cpus
from reader import PAIR, build


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3() -> subprocess.Popen:
    """moto's S3 server in its own process; clients find it through AWS_ENDPOINT_URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def epoch(cache: Cache, buffer: int, batched: bool = True) -> tuple[float, int]:
    """Seconds for one epoch of the pair, after a warm-up epoch on the same reader, and its tokens."""
    cfg = ReaderConfig(batch_size=4096, buffer_tokens=buffer, seed=0)
    with ShuffledReader(PAIR, cache, cfg) as r:
        if not batched:  # every chunk fetched by its decode thread, one request at a time
            r._io.shutdown()
            r._io = None
        n = r.batches_per_epoch
        for _ in range(n):
            next(r)
        t0 = time.perf_counter()
        for _ in range(n):
            next(r)
        return time.perf_counter() - t0, r.plan.split_tokens


def reader_section(args: argparse.Namespace, tmp: Path) -> None:
    local = tmp / "cache"
    build(local, args.chunks)
    url = "s3://bench/cache"
    fs = fsspec.filesystem("s3")
    fs.mkdir("bench")
    fs.put(str(local), url, recursive=True)
    c = Cache(local)
    base, tokens = epoch(c, args.buffer)
    raw = tokens * 2 * 768 * 2
    stored = sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
    keys = [f"bench/cache/{chunk_key(n, i)}" for n in PAIR for i in c.split_chunks("train")]
    fs.cat(keys)
    t0 = time.perf_counter()
    fs.cat(keys)  # every chunk of the epoch in one concurrent request: what this server can deliver
    ceiling = time.perf_counter() - t0
    rows = [("local disk (page cache)", base), ("S3 fetch only, no decode (server ceiling)", ceiling),
            ("S3, batched read-ahead (shipped)", epoch(Cache(url), args.buffer)[0]),
            ("S3, one request per chunk", epoch(Cache(url), args.buffer, batched=False)[0]),
            # the warm-up epoch fills the copy; the timed epoch reads it
            ("S3 + local read-through copy", epoch(Cache(url, local_cache_dir=tmp / "copy"), args.buffer)[0])]
    print(f"\nReader, transcoder pair, one epoch: {tokens:,} tokens, {raw / 2**20:.0f} MiB raw bf16, "
          f"{stored / 2**20:.0f} MiB stored, {c.n_chunks} chunks; batch 4096, buffer {args.buffer:,}\n")
    print_table(["source", "tok/s", "raw MB/s", "vs local disk"],
                [[name, f"{tokens / s:,.0f}", f"{raw / s / 1e6:,.0f}", f"{base / s:.2f}x"] for name, s in rows])


def copy_section(args: argparse.Namespace, tmp: Path) -> None:
    """``pipeline cache copy`` up to S3 and back down, against fsspec's own recursive put and get of the same
    files (no checks, no ordering): what crc-checking every chunk and committing the root last cost."""
    local = tmp / "copy-src"
    build(local, args.chunks)
    fs = fsspec.filesystem("s3")
    fs.mkdir("copies")
    stored = sum(f.stat().st_size for f in local.rglob("*") if f.is_file())

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    shared: list = []
    rows = [("fsspec put -r (baseline up)", timed(lambda: fs.put(str(local), "s3://copies/raw", recursive=True))),
            ("pipeline cache copy, local -> S3",
             timed(lambda: shared.append(copy_cache(local, "s3://copies/team", progress=False)))),
            ("fsspec get -r (baseline down)", timed(lambda: fs.get("s3://copies/raw", str(tmp / "raw-down"),
                                                                   recursive=True))),
            ("pipeline cache copy, S3 -> local", timed(lambda: copy_cache(shared[0], tmp / "down", progress=False)))]
    print(f"\nCopying one cache ({stored / 2**20:.0f} MiB stored, {n_files(local)} objects) to the local S3 "
          "server and back; the copy runs 16 objects at a time\n")
    print_table(["what", "seconds", "MB/s", "vs fsspec's own"],
                [[w, f"{t:.2f}", f"{stored / t / 1e6:,.0f}", f"{rows[i - i % 2][1] / t:.2f}x"]
                 for i, (w, t) in enumerate(rows)])


def n_files(path: Path) -> int:
    return sum(1 for f in path.rglob("*") if f.is_file())


def harvest_run(cmd: list[str], threads: int) -> float:
    """Wall seconds of one harvest command (torch threads per process: ``threads``)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(Path(__file__).parents[1])}
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def harvest_section(args: argparse.Namespace, tmp: Path) -> None:
    """Harvest throughput with 1 worker and with 2 (torchrun ranks writing disjoint chunks of one store),
    to local disk and to S3. Each worker is a process that imports torch and loads the model, so every
    command is also timed on its finished cache (it plans, finds the cache complete and exits): that
    start-up is subtracted to give the harvest's own tokens/s."""
    from harvest import gpt2_small_9

    (tmp / "model").mkdir()
    model = gpt2_small_9(tmp / "model", n_docs=(args.harvest_tokens + 20 * 128) // 20, context=128)
    seqs_per_chunk = 8  # 1.5 MiB bf16 chunks: 16 chunks, 8 per worker
    base = [sys.executable, "-m", "matryoshka.cli", "harvest", "--model", str(model),
            "--dataset", str(model.parent / "corpus.txt"), "--sites", "8.resid_mid,8.mlp_out",
            "--tokens", str(args.harvest_tokens), "--context-size", "128", "--batch-size", "8",
            "--chunk-mb", str(seqs_per_chunk * 128 * 768 * 2 / 2**20), "--holdout", "1024", "--quiet"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "matryoshka.cli"] + base[3:]
    cores = usable_cpus()
    fs = fsspec.filesystem("s3")
    if not fs.exists("bench"):
        fs.mkdir("bench")
    rows, one = [], {}
    half = max(1, cores // 2)
    plans = {"local disk": [(1, cores), (1, half), (2, half)], "S3": [(1, cores), (2, half)]}
    for where, root in (("local disk", str(tmp)), ("S3", "s3://bench")):
        for workers, threads in plans[where]:
            target = f"{root}/harvest-{workers}-{threads}"
            cmd = (base if workers == 1 else torchrun) + ["--cache", target]
            total = harvest_run(cmd, threads)
            startup = harvest_run(cmd, threads)  # the finished cache: plan, check, exit
            work = max(total - startup, 1e-9)
            one.setdefault(where, work)  # the first row of each place: 1 worker on every core
            rows.append([f"{where}, {workers} worker{'s' * (workers > 1)} x {threads} thread{'s' * (threads > 1)}",
                         f"{total:.1f}", f"{startup:.1f}", f"{args.harvest_tokens / work:,.0f}",
                         f"{one[where] / work:.2f}x"])
    print(f"\nHarvest, GPT-2-small shape (9 blocks, d 768), 8.resid_mid + 8.mlp_out, bf16: {args.harvest_tokens:,} "
          f"tokens, context 128, batch 8, {args.harvest_tokens // (128 * seqs_per_chunk)} chunks; "
          "torch threads per worker as shown\n")
    print_table(["harvest", "wall s", "start-up s", "tok/s", "vs 1 worker"], rows)


def runs_section(args: argparse.Namespace, tmp: Path) -> None:
    """One training with its run folder on local disk, then on S3: what publishing the checkpoints costs
    (each one uploaded, then swapped in with copies on the store, see matryoshka/run_folder.py)."""
    import numpy as np

    from matryoshka.config import TrainConfig
    from matryoshka.fixtures import write_cache
    from matryoshka.train.trainer import train

    d, width, steps, every, batch = 256, 4096, 40 if args.quick else 200, 10 if args.quick else 50, 1024
    rng = np.random.default_rng(0)
    n = 64 * 1024
    x = rng.standard_normal((n, d)).astype(np.float32)
    cache = write_cache(tmp / "runs-cache", {"x": x}, rng.integers(4, 50, n), 128, 8, heldout_seqs=8)
    fs = fsspec.filesystem("s3")
    fs.mkdir("runs-bench")
    run = {"name": "sae", "source": "x", "width": width, "k": 32, "tokens": steps * batch, "group_sizes": [512, 3584]}

    def timed(runs_dir: str) -> float:
        cfg = TrainConfig(cache=str(cache), runs=[run], runs_dir=runs_dir, batch_size=batch, buffer_tokens=16384,
                          checkpoint_every=every, log_every=10, device="cpu")
        t0 = time.perf_counter()
        train(cfg, progress=False)
        return time.perf_counter() - t0
    local, remote = timed(str(tmp / "runs")), timed("s3://runs-bench/runs")
    checkpoints = steps // every
    weights = 2 * d * width * 4 / 2**20
    print(f"\nTraining one Matryoshka SAE (d {d}, width {width}, batch {batch}) for {steps} steps, a checkpoint "
          f"every {every} ({checkpoints} checkpoints of {weights:.0f} MiB of weights + {2 * weights:.0f} MiB of Adam "
          "state)\n")
    print_table(["run folder", "wall s", "vs local", "extra s per checkpoint"],
                [["local disk (baseline)", f"{local:.1f}", "1.00x", "-"],
                 ["S3 (local copy, published)", f"{remote:.1f}", f"{local / remote:.2f}x",
                  f"{(remote - local) / checkpoints:.2f}"]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--buffer", type=int, default=0, help="reader buffer in tokens (default: a sixth of the cache)")
    ap.add_argument("--section", choices=("all", "reader", "copy", "harvest", "runs"), default="all")
    ap.add_argument("--harvest-tokens", type=int, default=0,
                    help="tokens per harvest (default 16,384; a multiple of 1,024)")
    args = ap.parse_args()
    args.harvest_tokens = args.harvest_tokens or 16 * 8 * 128 // (4 if args.quick else 1)
    args.chunks = 12 if args.quick else 48
    args.buffer = args.buffer or 2 * (args.chunks // 6) * 2688  # three blocks per epoch: read-ahead overlaps
    print(machine("cpu"))
    server = start_s3()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if args.section in ("all", "reader"):
                reader_section(args, Path(tmp))
            if args.section in ("all", "copy"):
                copy_section(args, Path(tmp))
            if args.section in ("all", "harvest"):
                harvest_section(args, Path(tmp))
            if args.section in ("all", "runs"):
                runs_section(args, Path(tmp))
    finally:
        server.kill()


if __name__ == "__main__":
    main()
