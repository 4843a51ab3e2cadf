"""What each storage dtype costs: bytes on disk, rounding error, and the FVU of an SAE trained on it.

One float32 dataset, GPT-2-sized activation-like rows (``reader.activations``: rank-64 signal, per-token
norm spread, noise, per-dimension scales and 4 outlier dimensions 20x the others), is written through the
real writer once per storage dtype (blosc lz4 + bitshuffle, context 128, BOS at each context start).
For each cache:

* stored bytes per token (all chunks on disk / tokens) and the ratio to float32;
* rounding FVU: sum of squared differences between what the cache serves and the float32 rows, over
  their total variance (what storage alone adds to any SAE's FVU);
* the same Matryoshka SAE (width 3072, k 32, seed 0), trained on that cache with the project's trainer,
  then evaluated on the **float32** cache's held-out split: its FVU against the true rows, and the
  difference to the SAE trained on float32 (the baseline, in the same run).

    python benchmarks/storage.py            # 131K tokens, 524K training tokens per SAE (~7 min on 2 CPUs)
    python benchmarks/storage.py --quick    # 65K tokens, 131K training tokens (~2 min)
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import machine, print_table
from matryoshka import load
from matryoshka.cache.store import Cache
from matryoshka.config import TrainConfig
from matryoshka.evaluate.metrics import reconstruction
from matryoshka.fixtures import write_cache
from matryoshka.train.trainer import train
from reader import CONTEXT, D, activations

DTYPES = ["float32", "bfloat16", "float16", "float8"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="65K tokens, 131K training tokens: a smoke run")
    args = ap.parse_args()
    n = 2**16 if args.quick else 2**17
    train_tokens = 2**17 if args.quick else 2**19
    start = time.perf_counter()
    print(machine("cpu"))
    x = activations(n, seed=0, dtype=torch.float32).numpy()
    tokens = np.random.default_rng(0).integers(1, 50257, n)
    tokens[::CONTEXT] = 0
    run = {"name": "sae", "source": "x", "arch": "matryoshka", "width": 3072, "k": 32, "tokens": train_tokens,
           "seed": 0}
    rows, fvu = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        caches = {}
        for dtype in DTYPES:
            path = write_cache(Path(tmp) / dtype, {"x": x}, tokens, CONTEXT, 16, heldout_seqs=n // CONTEXT // 8,
                               dtype=dtype, bos_policy="context", bos_id=0, fingerprint=f"bench-{dtype}")
            caches[dtype] = Cache(path)
        truth = caches["float32"]
        for dtype, cache in caches.items():
            disk = sum(f.stat().st_size for f in Path(cache.path).glob("acts/x/c/**/*") if f.is_file())
            served = cache.read("x", 0, n)
            rounding = float(((served - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
            t0 = time.perf_counter()
            runs_dir = Path(tmp) / f"runs-{dtype}"
            train(TrainConfig(cache=cache.path, runs=[dict(run)], runs_dir=str(runs_dir), batch_size=1024,
                              buffer_tokens=2**15, log_every=50, checkpoint_every=10**6, device="cpu"), progress=False)
            dic = load(next(runs_dir.glob("*/sae")))
            fvu[dtype] = reconstruction(dic, truth, "x").fvu
            rows.append((dtype, disk / n, rounding, time.perf_counter() - t0))
    base = rows[0][1]
    print(f"\n{n:,} tokens x {D} (activation-like, float32), lz4 + bitshuffle; Matryoshka SAE width 3072, k 32, "
          f"{train_tokens:,} training tokens, batch 1024, evaluated on the float32 held-out rows")
    print_table(["storage", "bytes / token", "vs float32", "rounding FVU", "SAE FVU (true rows)",
                 "vs float32-trained", "train s"],
                [[d, f"{b:,.0f}", f"{b / base:.3f}", f"{r:.2e}", f"{fvu[d]:.4f}", f"{fvu[d] - fvu['float32']:+.4f}",
                  f"{s:.0f}"] for d, b, r, s in rows])
    print(f"\ntotal {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
