"""Evaluation throughput, and the memory of the pairwise feature metrics at Gemma-2-2B width.

Table 1: held-out tokens/s of ``evaluate()`` on one run, from a harvested cache of a GPT-2-small-shaped
model (d 768, 12 heads, random weights, 9 blocks, ``8.resid_mid``, bf16 storage) and a Matryoshka SAE
(16x: 12,288 latents, groups [768, 1536, 3072, 6912], k 64) trained briefly so that its threshold is set.
Rows add one stage at a time to the baseline (reconstruction metrics only): the second pass with the top
contexts, the feature metrics, the report, and the LM splice when ``EvaluateConfig`` has an ``lm`` key.
Each row is one ``evaluate()`` call, timed whole, in one process on the same cache and run.

Row "pipeline browse of the run (alone)": building the feature browser of the same run (one in-order pass over the
held-out rows, parents and children, the site's files), its site's bytes per latent in the note.

Table 4 (``--only browse``): the browser at Gemma-2-2B width: a random 36,864-latent dictionary (groups as
Gemma's, a threshold giving about 64 active latents per token) over the table-1 cache: build seconds, bytes
per latent, and seconds from opening a latent page in headless Chromium to its rendered contexts (when
chromium and selenium are installed).

Table 3: the LM splice of K = 1 and K = 3 runs of one cache (same model and cache as table 1, three
smaller SAEs at ``8.resid_mid``): the LM part of ``evaluate()`` (the call with ``lm`` minus the call
without), and its ratio K = 3 / K = 1. All runs of a cache share one pass over the held-out batches: per
batch 1 clean forward, one spliced forward per run, and the zero- and mean-ablations once per target,
so the ideal ratio is (1 + 3 + 2) / (1 + 1 + 2) = 1.5 (one pass per run would be (3 x 2 + 2) / 4 = 2).

Table 2: peak memory of the pairwise feature metrics at 36,864 latents (d 2304, a random decoder) on
synthetic sparse codes: ``--tokens`` tokens (default 131,072, the ``feature_tokens`` default) with about 64
active latents each, latent frequencies log-uniform over three decades (as real dictionaries' are). Each
stage runs in its own child process, which resets its peak RSS once the decoder and codes exist
(``/proc/self/clear_refs``); the stage's peak is then VmHWM minus that RSS, so the inputs are not counted.
Compared with what the seed's dense computation would hold: one W x W float32 matrix (it builds
several), and the dense N x W float32 activation history it collects first.

    python benchmarks/evaluate.py            # all tables (~15 min on 2 CPUs)
    python benchmarks/evaluate.py --quick    # small sizes, a smoke run
    python benchmarks/evaluate.py --only lm  # table 3 alone
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "WANDB_MODE": "offline"}.items():
    os.environ.setdefault(_k, _v)

import numpy as np
import torch

from common import machine, print_table
from matryoshka.config import EvaluateConfig, HarvestConfig, TrainConfig
from matryoshka.evaluate.features import Codes, coactivation, decoder_similarity, hierarchy, monosemanticity
from matryoshka.fixtures import build_model, build_tokenizer, write_corpus

GEMMA = (36_864, 2304, [2304, 4608, 9216, 20736])  # width, d, groups


# -- table 1 -----------------------------------------------------------------------------------------
def lm_cache(work: Path, quick: bool) -> Path:
    """The harvested cache tables 1 and 3 evaluate on (harvested once)."""
    from matryoshka.harvest import harvest

    if (work / "cache").is_dir():
        return work / "cache"
    corpus = write_corpus(work / "corpus.txt", n_docs=400 if quick else 1500)
    model = build_model("gpt2", work / "gpt2-9", build_tokenizer(corpus), n_layers=9, d_model=768, n_heads=12,
                        n_positions=128)
    cache = harvest(HarvestConfig(model=str(model), dataset=str(corpus), sites="8.resid_mid",
                                  tokens=8192 if quick else 20480, context_size=128, batch_size=8, dtype="bfloat16",
                                  holdout=2048 if quick else 8192, cache=str(work / "cache"), seed=None),
                    progress=False)
    return cache


def throughput(work: Path, quick: bool) -> tuple[list[list[str]], str]:
    from matryoshka.evaluate.stage import evaluate
    from matryoshka.train.trainer import train

    cache = lm_cache(work, quick)
    width, groups = (3072, [192, 384, 768, 1728]) if quick else (12_288, [768, 1536, 3072, 6912])
    train(TrainConfig(cache=str(cache), runs_dir=str(work / "runs"), batch_size=1024, buffer_tokens=8192,
                      runs=[{"name": "sae", "source": "8.resid_mid", "width": width, "group_sizes": groups, "k": 64,
                             "tokens": 4096 if quick else 8192, "warmup_steps": 1}]), progress=False)
    has_lm = "lm" in EvaluateConfig.model_fields
    off = {"lm": False} if has_lm else {}
    rows = [("reconstruction only (baseline)", dict(features=False, contexts=0, report=False, **off)),
            ("+ second pass with top contexts", dict(features=False, contexts=10, report=False, **off)),
            ("+ feature metrics (all held-out tokens)", dict(contexts=10, report=False, **off)),
            ("+ report (default evaluate, no LM)", dict(**off))]
    if has_lm:
        rows.append(("+ LM splice (default evaluate with the LM)", dict(lm=True)))
    out, base = [], None
    for label, kw in rows:
        cfg = EvaluateConfig(cache=str(cache), runs_dir=str(work / "runs"), batch_size=1024, **kw)
        t0 = time.perf_counter()
        (r,) = evaluate(cfg, progress=False)
        dt = time.perf_counter() - t0
        base = base or dt
        out.append([label, f"{dt:.2f}", f"{r['tokens'] / dt:,.0f}", f"{base / dt:.2f}x"])
    out.append(browse_row(r["path"], cache, base))
    note = (f"{r['tokens']:,} held-out tokens, dictionary width {width}, L0 {r['l0']:.0f}; {out[-1].pop()}"
            + ("" if has_lm else "; EvaluateConfig has no `lm` key in this tree, so no row with the LM"))
    return out, note


def site_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def browse_row(run: str, cache: Path, base: float) -> list[str]:
    """``pipeline browse`` of one run, timed whole; the last cell is a note on the site's size."""
    from matryoshka.browse import browse
    from matryoshka.run_folder import Workspace

    t0 = time.perf_counter()
    with Workspace() as space:  # a local run: built in place
        index = browse([Path(run)], space, str(cache)).index
    dt = time.perf_counter() - t0
    width = json.loads((Path(run) / "eval.json").read_text())["config"]["width"]
    per = site_bytes(index.parent / Path(run).name) / width
    return ["pipeline browse of the run (alone)", f"{dt:.2f}", "", f"{base / dt:.2f}x",
            f"browser site {per:,.0f} bytes per latent"]


def browse_scale(work: Path, quick: bool) -> tuple[list[list[str]], str]:
    """Table 4: a random Gemma-width dictionary through the browser, and its first latent page's load time."""
    from matryoshka.browse.build import dictionary_data
    from matryoshka.browse.site import write_run
    from matryoshka.cache import Cache
    from matryoshka.harvest import harvest
    from matryoshka.train.dictionary import Dictionary

    corpus = write_corpus(work / "corpus.txt", n_docs=400 if quick else 1500)
    model = build_model("gpt2", work / "gpt2", build_tokenizer(corpus), n_layers=2, d_model=768, n_heads=12,
                        n_positions=128)
    held = 4096 if quick else 16384
    cache = Cache(harvest(HarvestConfig(model=str(model), dataset=str(corpus), sites="1.resid_mid",
                                        tokens=held + 4096, context_size=128, batch_size=8, dtype="bfloat16",
                                        holdout=held,
                                        cache=str(work / "cache"), seed=None), progress=False))
    width, _, groups = GEMMA
    if quick:
        width, groups = 4608, [288, 576, 1152, 2592]
    torch.manual_seed(0)
    dic = Dictionary(768, 768, width, 64, "matryoshka", groups).eval()
    a, _ = cache.split["heldout"]
    with torch.no_grad():
        pre = dic.pre_acts(torch.from_numpy(cache.read("1.resid_mid", a, a + 512)))
        dic.threshold.fill_(float(pre.flatten().kthvalue(pre.numel() - 64 * 512).values))  # ~64 per token
    dic.config = {"source": "1.resid_mid", "target": None, "arch": "matryoshka", "k": 64}
    t0 = time.perf_counter()
    data = dictionary_data(dic, "random", cache, tokens=held)
    t1 = time.perf_counter()
    site = work / "browse"
    write_run(data, site)
    t2 = time.perf_counter()
    from matryoshka.browse.site import write_index

    write_index(site, [], "benchmark")
    size = site_bytes(site / "random")
    rows = [[f"{width:,} latents, {held:,} held-out tokens", f"{t1 - t0:.1f}", f"{t2 - t1:.1f}", f"{size / 1e6:.1f}",
             f"{size / width:,.0f}", first_page(site / "random", data.meta["start"], width)]]
    return rows, f"L0 {sum(r['n'] for r in data.latents) / data.meta['live_tokens']:.0f} per token; d 768"


def first_page(run: Path, start: int, width: int) -> str:
    """Seconds from opening two latent pages (first and last shard) to their top contexts, in headless
    Chromium; '-' without chromium or selenium."""
    import shutil

    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as EC
        from selenium.webdriver.support.ui import WebDriverWait
    except ImportError:
        return "-"
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return "-"
    opts = Options()
    opts.binary_location = shutil.which("chromium")
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    d = webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))
    try:
        times = []
        for i in (start, width - 1):
            t0 = time.perf_counter()
            d.get((run / "latent.html").as_uri() + f"?i={i}")
            WebDriverWait(d, 30).until(EC.presence_of_element_located((By.ID, "latent-title")))
            times.append(time.perf_counter() - t0)
        return " / ".join(f"{t:.2f}" for t in times)
    finally:
        d.quit()


# -- table 3 -----------------------------------------------------------------------------------------
def lm_runs(work: Path, quick: bool, device: str = "cpu") -> tuple[list[list[str]], str]:
    from matryoshka.evaluate.stage import evaluate
    from matryoshka.train.trainer import train

    cache = lm_cache(work, quick)
    runs_dir = work / "runs-k"
    train(TrainConfig(cache=str(cache), runs_dir=str(runs_dir), batch_size=1024, buffer_tokens=8192, device=device,
                      runs=[{"name": f"sae{i}", "source": "8.resid_mid", "width": 1536, "group_sizes": [256, 1280],
                             "k": 32, "tokens": 2048, "warmup_steps": 1, "seed": i} for i in range(3)]),
          progress=False)
    one = next(runs_dir.glob("*/sae0"))
    common = dict(runs_dir=str(runs_dir), batch_size=1024, features=False, contexts=0, report=False, device=device,
                  lm_tokens=1024 if quick else 4096, lm_batch_size=8)
    lm_seconds, rows = {}, []
    for k, where in ((1, dict(run=str(one))), (3, dict(cache=str(cache)))):
        spent = {}
        for lm in (False, True):
            t0 = time.perf_counter()
            results = evaluate(EvaluateConfig(lm=lm, **where, **common), progress=False)
            spent[lm] = time.perf_counter() - t0
        assert len(results) == k
        lm_seconds[k] = spent[True] - spent[False]
        rows.append([f"K = {k}", f"{spent[False]:.2f}", f"{spent[True]:.2f}", f"{lm_seconds[k]:.2f}",
                     f"{lm_seconds[k] / lm_seconds[1]:.2f}x"])
    note = (f"{results[0]['lm']['sequences']} held-out contexts of 128 tokens, LM batch 8, device {device}; ideal "
            "ratio 1.50 (1 clean + K spliced + 2 ablations per batch), one pass per run would be 2.00")
    return rows, note


# -- table 2 -----------------------------------------------------------------------------------------
def synthetic_codes(width: int, n: int, l0: int, seed: int = 0) -> Codes:
    """~l0 latents per token, latent i drawn with a log-uniform frequency over three decades; built in
    slices so the generator's temporaries stay small beside the codes."""
    rng = np.random.default_rng(seed)
    p = 10 ** rng.uniform(-3, 0, width)
    cdf = np.cumsum(p / p.sum())
    toks, lats = [], []
    for t0 in range(0, n, 4096):
        m = min(4096, n - t0)
        draw = np.minimum(np.searchsorted(cdf, rng.random((m, l0))), width - 1)
        flat = np.unique(draw + (np.arange(m)[:, None] + t0) * width)
        toks.append(flat // width)
        lats.append(flat % width)
    tokens, latents = np.concatenate(toks), np.concatenate(lats)
    values = rng.exponential(1.0, len(tokens)).astype(np.float32) + 0.01
    return Codes(tokens, latents, values, n, width)


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB, from /proc/self/status."""
    status = Path("/proc/self/status").read_text()
    return tuple(int(re.search(rf"{k}:\s+(\d+) kB", status).group(1)) / 1024 for k in ("VmRSS", "VmHWM"))


def child(stage: str, n: int, block_mb: float) -> dict:
    """One stage in this fresh process: its seconds and its peak RSS above the inputs."""
    width, d, groups = GEMMA
    torch.manual_seed(0)
    W = torch.randn(width, d)
    codes = synthetic_codes(width, n, 64)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS (Linux >= 4.0)
    rss0, peak0 = rss_mib()
    t0 = time.perf_counter()
    if stage == "cosines":
        decoder_similarity(W, groups, 0.9, block_mb)
    elif stage == "coactivation":
        coactivation(codes, 0.5, 50, block_mb)
    else:
        monosemanticity(codes, 50)
        hierarchy(codes, groups, 50)
    dt = time.perf_counter() - t0
    peak = rss_mib()[1]
    return {"seconds": dt, "extra": peak - rss0, "reset": peak0 - rss0 < 1,
            "inputs": W.numel() * 4 + codes.tokens.nbytes + codes.latents.nbytes + codes.values.nbytes,
            "nnz": len(codes.latents)}


def memory(n: int, blocks: list[float]) -> tuple[list[list[str]], str]:
    width, d, _ = GEMMA
    runs = [(f"decoder cosines (absorption, group cosines), block {b:g} MiB", "cosines", b) for b in blocks]
    runs += [(f"co-activation (splitting), block {blocks[0]:g} MiB", "coactivation", blocks[0]),
             ("monosemanticity + hierarchy", "mono", blocks[0])]
    rows, info = [], {}
    for label, stage, b in runs:
        res = subprocess.run([sys.executable, __file__, "--child", stage, "--tokens", str(n), "--block-mb", str(b)],
                             capture_output=True, text=True, check=True)
        info = json.loads(res.stdout.strip().splitlines()[-1])
        if not info["reset"]:
            raise RuntimeError("the peak RSS could not be reset (/proc/self/clear_refs): no clean measurement")
        rows.append([label, f"{info['seconds']:.1f}", f"{info['extra']:,.0f}"])
    rows.append(["dense W x W float32 matrix (not run)", "", f"{width * width * 4 / 2**20:,.0f}"])
    rows.append([f"dense N x W float32 activations, N {n:,} (not run)", "", f"{n * width * 4 / 2**20:,.0f}"])
    note = (f"width {width}, d {d}, {n:,} tokens, {info['nnz'] / n:.1f} active latents per token on average; "
            f"inputs (decoder + codes) {info['inputs'] / 2**20:,.0f} MiB, not counted")
    return rows, note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    ap.add_argument("--tokens", type=int, default=None,
                    help="tokens of synthetic codes (default 131072, --quick 16384)")
    ap.add_argument("--only", choices=["throughput", "lm", "memory", "browse"], default=None)
    ap.add_argument("--device", default="cpu", help="device of table 3's LM and training (cpu or cuda)")
    ap.add_argument("--blocks", type=float, nargs="+", default=[64.0],
                    help="block_mb values for the decoder-cosine rows of table 2 (each row is a full W^2 d/2 pass)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--block-mb", type=float, default=64.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    n = args.tokens or (16_384 if args.quick else 131_072)
    if args.child:
        print(json.dumps(child(args.child, n, args.block_mb)))
        return
    print(machine(args.device))
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "throughput"):
            rows, note = throughput(Path(tmp), args.quick)
            print("\nTable 1: evaluate() on one run, CPU\n")
            print_table(["what", "s", "held-out tok/s", "vs baseline"], rows)
            print(f"\n{note}")
        if args.only in (None, "lm"):
            rows, note = lm_runs(Path(tmp), args.quick, args.device)
            print("\nTable 3: the LM splice of K runs of one cache in one pass\n")
            print_table(["runs", "evaluate without LM s", "with LM s", "LM part s", "LM part vs K = 1"], rows)
            print(f"\n{note}")
    if args.only in (None, "browse"):
        with tempfile.TemporaryDirectory() as tmp:
            rows, note = browse_scale(Path(tmp), args.quick)
        print("\nTable 4: the feature browser at Gemma-2-2B width, CPU\n")
        print_table(["dictionary", "data s", "files s", "site MB", "bytes/latent", "latent page s (first/last shard)"],
                    rows)
        print(f"\n{note}")
    if args.only in (None, "memory"):
        rows, note = memory(n, args.blocks)
        print("\nTable 2: pairwise feature metrics at 36,864 latents, peak memory above the inputs\n")
        print_table(["stage", "s", "peak MiB"], rows)
        print(f"\n{note}")


if __name__ == "__main__":
    main()
