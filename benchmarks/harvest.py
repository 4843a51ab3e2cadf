"""Harvest throughput and codec benchmark.

Table 1, once per context size (default 128 and 1024): tokens/s of a GPT-2-small-shaped model (d_model
768, 12 heads, random weights) capturing ``8.resid_mid,8.mlp_out`` (so 9 blocks run), bf16 storage: a
bare Hugging Face forward of the same weights stopped after block 8 with eager attention and with sdpa
(the fastest forward that computes the model's function, the harvest's own ``auto`` choice for GPT-2),
our capture alone (no writing), the full ``harvest()`` call, and TransformerLens's bridge
``run_with_cache(stop_at_layer=9)`` (eager, as the bridge forces). Every row is reported against the
fastest bare forward. All rows run in one process on the same token batches, after a warm-up batch;
the bare forwards, capture and bridge take turns batch by batch; only forward loops are timed, except
the harvest row (see its note).

Table 2: lossless codecs on the model's own float32 ``8.resid_mid`` cast to bf16 and fp16: ratio,
encode and decode GB/s on one thread, decode GB/s on all cores (one task per ~4 MiB chunk).

Table 3: a writer thread's work per ~4 MiB chunk of each storage dtype: statistics (decode, finite
check, float64 sums) against encoding, and the tokens/s one writer thread sustains. On a GPU host the
writer threads, not the LM, bound the harvest once these exceed the forward's rate per thread.

    python benchmarks/harvest.py            # ~12K tokens, contexts 128 and 1024, 1024 tokens per batch
    python benchmarks/harvest.py --quick    # ~4K tokens, a smoke run
    python benchmarks/harvest.py --device cuda --tokens 1M --context 128,1024 --batch-tokens 65536
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import timeit
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

import numcodecs
import numpy as np
import torch
import transformers
from numcodecs import Blosc, Zstd
from numcodecs.blosc import BITSHUFFLE, SHUFFLE

from common import machine, print_table
from matryoshka.cache.format import STORAGE, decode, encode_chunk, to_storage
from matryoshka.cache.writer import chunk_sums, nonfinite_rows
from matryoshka.config import HarvestConfig, parse_count
from matryoshka.cpus import usable_cpus
from matryoshka.fixtures import build_model, build_tokenizer, write_corpus
from matryoshka.harvest import harvest
from matryoshka.harvest.plan import plan
from matryoshka.harvest.tokens import contexts
from matryoshka.models import Capture, load_model

LAYER, SITES = 8, [(8, "resid_mid"), (8, "mlp_out")]
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()


def gpt2_small_9(out: Path, n_docs: int, context: int) -> Path:
    """A corpus, a small BPE tokenizer and a 9-block GPT-2-small-shaped model (d 768, 12 heads), random weights."""
    corpus = write_corpus(out / "corpus.txt", n_docs=n_docs)
    return build_model("gpt2", out / "gpt2-9", build_tokenizer(corpus), n_layers=LAYER + 1, d_model=768,
                       n_heads=12, n_positions=max(1024, context))


def time_loops(steps: dict[str, Callable[[torch.Tensor], object]], batches: list[torch.Tensor],
               device: str) -> dict[str, float]:
    """Tokens/s of each step over every batch, after a warm-up batch. The steps take turns batch by batch,
    so a change in background load hits them alike."""
    spent = dict.fromkeys(steps, 0.0)
    for i, b in enumerate([batches[0], *batches]):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step(b)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            spent[name] += (time.perf_counter() - t0) * (i > 0)
    return {name: sum(b.numel() for b in batches) / t for name, t in spent.items()}


class _Stop(Exception):
    """Raised after block 8 to end the bare forward."""


def bare_forward(path: Path, dtype: torch.dtype, device: str, attn: str) -> Callable[[torch.Tensor], None]:
    """A plain HF forward with attention implementation ``attn`` that a hook on block 8 cuts short."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=dtype)
    model = model.to(device).eval()

    def stop(*_):
        raise _Stop

    model.transformer.h[LAYER].register_forward_hook(stop)

    @torch.inference_mode()
    def step(ids: torch.Tensor) -> None:
        try:
            model(input_ids=ids.to(device), use_cache=False)
        except _Stop:
            pass
    return step


def bridge_forward(path: Path, dtype: torch.dtype, device: str) -> Callable[[torch.Tensor], set[str]]:
    """TransformerLens's bridge ``run_with_cache`` of the two sites, stopped after block 8."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(path), device=device, dtype=dtype)
    names = {f"blocks.{LAYER}.hook_resid_mid", f"blocks.{LAYER}.hook_mlp_out"}

    @torch.inference_mode()
    def step(ids: torch.Tensor) -> set[str]:
        _, cache = bridge.run_with_cache(ids.to(device), stop_at_layer=LAYER + 1, names_filter=lambda n: n in names)
        return set(cache.keys())

    got = step(torch.zeros(1, 4, dtype=torch.long))
    if got != names:
        raise RuntimeError(f"bridge cached {sorted(got)}, expected {sorted(names)}")
    return step


def throughput(path: Path, args: argparse.Namespace, work: Path, context: int,
               ) -> tuple[list[tuple[str, float]], np.ndarray, str]:
    """Table 1's rows at one context size, the first row being the fastest bare forward; the codec data; a note."""
    device = args.device
    mdtype = "bfloat16" if device.startswith("cuda") else "float32"
    batch = max(1, args.batch_tokens // context)
    cfg = HarvestConfig(model=str(path), dataset=str(path.parent / "corpus.txt"), sites="8.resid_mid,8.mlp_out",
                        tokens=args.tokens, context_size=context, batch_size=batch, dtype="bfloat16",
                        model_dtype=mdtype, device=device, cache=str(work / f"cache-{context}"), seed=None)
    # Setup of a harvest call, timed on its own: plan (tokenizer, dataset, weights hash) + model load.
    t0 = time.perf_counter()
    p = plan(cfg)
    model = load_model(p.info, dtype=mdtype, device=device, tokenizer=p.tokenizer)
    setup = time.perf_counter() - t0
    stream = contexts(cfg, p.tokenizer, p.documents)
    ids = np.stack([next(stream) for _ in range(cfg.n_sequences)])
    batches = [torch.from_numpy(ids[i:i + batch]) for i in range(0, len(ids), batch)]
    n_tok, mt = ids.size, getattr(torch, mdtype)
    bare = {attn: bare_forward(path, mt, device, attn) for attn in ("eager", "sdpa")}
    capture = Capture(model, "gpt2", SITES, transform=lambda t: to_storage(t, "bfloat16"))
    loops = time_loops({**bare, "capture": capture, "bridge": bridge_forward(path, mt, device)}, batches, device)
    capture.close()
    fastest = max(bare, key=loops.get)
    # Codec data: the model's own float32 8.resid_mid (not the bf16 cache cast back up, whose zero
    # low mantissa bits would flatter the fp16/fp32 ratios).
    exact = Capture(model, "gpt2", SITES[:1])
    f32 = torch.cat([exact(b)[SITES[0]].float().reshape(-1, 768).cpu()
                     for b in batches[: max(1, 8192 // batches[0].numel())]])
    exact.close()
    t0 = time.perf_counter()
    harvest(cfg, progress=False)
    total = time.perf_counter() - t0
    other = "eager" if fastest == "sdpa" else "sdpa"
    rows = [(f"bare truncated HF forward ({fastest}, the fastest)", loops[fastest]),
            (f"bare truncated HF forward ({other})", loops[other]),
            (f"matryoshka Capture only ({model.config._attn_implementation})", loops["capture"]),
            (f"full harvest (call {total:.1f}s - setup {setup:.1f}s)", n_tok / (total - setup)),
            ("full harvest, whole call incl. setup", n_tok / total),
            ("TL bridge run_with_cache(stop_at_layer=9), eager", loops["bridge"]),
            (f"bare forward ({fastest}), again after harvest (noise check)",
             time_loops({fastest: bare[fastest]}, batches, device)[fastest])]
    note = (f"{n_tok:,} tokens, context {context}, batch {batch}, model {mdtype}, storage bf16, harvest attention "
            f"{p.manifest['model']['attn_implementation']}. Harvest row: wall time of harvest(progress=False) minus "
            f"its setup (plan + model load, {setup:.2f}s, timed separately).")
    return rows, f32.numpy(), note


CODECS: dict[str, numcodecs.abc.Codec | None] = {
    "blosc lz4 + bitshuffle (clevel 5)": Blosc("lz4", 5, BITSHUFFLE),
    "blosc zstd-1 + bitshuffle": Blosc("zstd", 1, BITSHUFFLE),
    "blosc lz4 + byte shuffle": Blosc("lz4", 5, SHUFFLE),
    "plain zstd-1 (numcodecs.Zstd)": Zstd(level=1),
    "none": None,
}


def chunks_of(a: np.ndarray, mib: float = 4.0) -> list[np.ndarray]:
    rows = max(1, int(mib * 2**20 // (a.shape[1] * a.itemsize)))
    return [np.ascontiguousarray(a[i:i + rows]) for i in range(0, len(a), rows)]


def codec_row(codec: numcodecs.abc.Codec | None, data: dict[str, np.ndarray], workers: int) -> tuple[float, ...]:
    """bf16 ratio, encode GB/s, decode GB/s (1 thread), decode GB/s (``workers`` threads), fp16 and fp32 ratios."""
    enc, dec = (codec.encode, codec.decode) if codec is not None else (lambda c: c, lambda c: c)
    ratios = {name: a.nbytes / sum(memoryview(enc(c)).nbytes for c in chunks_of(a)) for name, a in data.items()}
    chunks, nbytes = chunks_of(data["bf16"]), data["bf16"].nbytes
    packed = [enc(c) for c in chunks]
    t_enc = min(timeit.repeat(lambda: [enc(c) for c in chunks], number=1, repeat=3))
    t_dec = min(timeit.repeat(lambda: [dec(c) for c in packed], number=1, repeat=3))
    with ThreadPoolExecutor(workers) as pool:
        t_par = min(timeit.repeat(lambda: list(pool.map(dec, packed)), number=1, repeat=3))
    return (ratios["bf16"], nbytes / t_enc / 1e9, nbytes / t_dec / 1e9, nbytes / t_par / 1e9, ratios["fp16"],
            ratios["fp32"])


def codec_table(f32: np.ndarray) -> list[tuple[str, tuple[float, ...]]]:
    numcodecs.blosc.use_threads = False  # one blosc thread per call: parallelism comes from our pool
    numcodecs.blosc.set_nthreads(1)
    bits = to_storage(torch.from_numpy(f32), "bfloat16").numpy().view(np.uint16)
    data = {"bf16": bits, "fp16": f32.astype(np.float16), "fp32": f32}
    return [(name, codec_row(codec, data, usable_cpus())) for name, codec in CODECS.items()]


def writer_table(f32: np.ndarray) -> list[list[str]]:
    """Per ~4 MiB chunk of ``f32`` cast to each storage dtype, on one thread, the writer thread's work:
    statistics (decode, finite check, float64 sums) and encoding (blosc lz4 + bitshuffle, crc32c); and
    the tokens/s one writer thread sustains for a two-array harvest (best of 5)."""
    rows = chunks_of(f32)[0]
    keep = np.ones(len(rows), bool)
    keep[::128] = False
    out = []
    for dtype in STORAGE:
        a = to_storage(torch.from_numpy(rows), dtype).numpy()

        def stats(a: np.ndarray = a, dtype: str = dtype) -> None:  # bound now: timeit calls it in this iteration
            x = decode(a, dtype)
            assert not len(nonfinite_rows(a, x, dtype))
            chunk_sums(x[keep])
        t_stats = min(timeit.repeat(stats, number=1, repeat=5))
        t_enc = min(timeit.repeat(lambda a=a: encode_chunk(a, "lz4"), number=1, repeat=5))
        out.append([dtype, f"{a.nbytes / 2**20:.2f}", f"{1e3 * t_stats:.2f}", f"{1e3 * t_enc:.2f}",
                    f"{t_stats / t_enc:.2f}", f"{len(rows) / (2 * (t_stats + t_enc)):,.0f}"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda computes in bf16)")
    ap.add_argument("--tokens", type=parse_count, default=None, help="tokens per row (default 12288, --quick 4096)")
    ap.add_argument("--context", default="128,1024", help="context sizes, one table 1 each (default 128,1024)")
    ap.add_argument("--batch-tokens", type=int, default=1024, help="tokens per forward: batch = this // context")
    args = ap.parse_args()
    args.contexts = [int(c) for c in args.context.split(",")]
    args.tokens = args.tokens or (4096 if args.quick else 12288)
    print(machine(args.device))
    start, ncpu = time.perf_counter(), usable_cpus()
    with tempfile.TemporaryDirectory(prefix="bench-harvest-") as tmp:
        path = gpt2_small_9(Path(tmp), n_docs=(args.tokens + 20 * max(args.contexts)) // 20, context=max(args.contexts))
        for i, context in enumerate(args.contexts):
            rows, data, note = throughput(path, args, Path(tmp), context)
            if i == 0:  # the per-chunk table uses the first context's activations
                f32 = data
            print(f"\n1{'abcdefgh'[i]}. Harvest throughput at context {context}, GPT-2-small shape (d 768, 12 heads, "
                  "random weights), sites 8.resid_mid,8.mlp_out")
            print(f"   {note}")
            print_table(["what", "tok/s", "vs fastest bare"],
                        [[n, f"{t:,.0f}", f"{t / rows[0][1]:.2f}x"] for n, t in rows])
            print("   target (issue 21): full harvest >= 0.90x the fastest bare truncated forward")
        table = codec_table(f32)
        writer = writer_table(f32)
    print(f"\n2. Codecs on harvested 8.resid_mid ({f32.shape[0]:,} x {f32.shape[1]}), ~4 MiB chunks, "
          f"decode on all cores = {ncpu} threads, one blosc thread each")
    print("   caveat: random-weight activations compress differently from a trained model's; rerun on a real cache.")
    hdr = ["codec", "bf16 ratio", "enc GB/s", "dec GB/s 1T", f"dec GB/s {ncpu}T", "fp16 ratio", "fp32 ratio"]
    print_table(hdr, [[n] + [f"{v:.2f}" if n != "none" or "ratio" in h else "-" for v, h in zip(vals, hdr[1:])]
                      for n, vals in table])
    print("\n3. Writer thread work per ~4 MiB chunk of harvested 8.resid_mid, one thread (a harvest keeps "
          f"{ncpu} writer threads busy at most)")
    print_table(["storage", "chunk MiB", "statistics ms", "encode ms", "statistics / encode",
                 "tok/s per writer thread, 2 arrays"], writer)
    print(f"\ntotal {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
